"""One root exception type for shoal; the CLI turns a ShoalError into exit code 2."""


class ShoalError(Exception):
    """A problem the user can fix: bad input, bad config, missing index."""


class ConfigError(ShoalError, ValueError):
    """A configuration key or value is wrong."""


class IndexMismatchError(ShoalError):
    """The index on disk does not match the model or settings in use."""


class CorruptFileError(ShoalError):
    """A file in the data dir failed its checksum or could not be parsed."""
