"""One root exception type for shoal; the CLI turns a ShoalError into exit code 2."""

from typing import Any


class ShoalError(Exception):
    """A problem the user can fix: bad input, bad config, missing index."""


class ConfigError(ShoalError, ValueError):
    """A configuration key or value is wrong."""


class IndexMismatchError(ShoalError):
    """The index on disk does not match the model or settings in use."""


class CorruptFileError(ShoalError):
    """A file in the data dir failed its checksum or could not be parsed."""


# -- errors with an HTTP status: the CLI prints them (exit 2), the app returns them ---------------
class QueryError(ShoalError):
    """A query that cannot be answered as asked; ``status`` is its HTTP status."""

    status = 422

    def __init__(self, detail: Any, **extra: Any) -> None:
        super().__init__(detail if isinstance(detail, str) else "; ".join(
            f"{d['field']}: {d['msg']}" if d.get("field") else d["msg"] for d in detail))
        self.detail, self.extra = detail, extra


class Conflict(QueryError):
    """The index or the configuration cannot do this (no keyword index, re-ranking off)."""

    status = 409


class Unavailable(QueryError):
    """No generation yet, or shard groups down."""

    status = 503


class NotFound(QueryError):
    """What was asked for is not there (an unknown passage, one outside the ingested roots)."""

    status = 404
