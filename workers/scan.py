"""Walk the roots, decide what is text, and read it.

Every file under a root ends as a :class:`FileEntry` (to index) or a
:class:`Skipped` (with a reason): nothing is dropped silently, and one bad
file never stops the walk.
"""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import html.parser
import io
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

SNIFF_BYTES = 8192

BINARY_EXTS = frozenset(
    ".png .jpg .jpeg .gif .bmp .tiff .ico .webp .svgz .mp3 .mp4 .wav .flac .ogg .avi .mov .mkv "
    ".zip .gz .tgz .bz2 .xz .7z .rar .zst .tar .jar .war .whl .egg .exe .dll .so .dylib .o .a "
    ".class .pyc .pyo .bin .dat .db .sqlite .sqlite3 .parquet .npy .npz .pt .pth .safetensors "
    ".onnx .pkl .pickle .h5 .hdf5 .woff .woff2 .ttf .otf .eot .iso .img .dmg .doc .xls .ppt "
    ".docx .xlsx .pptx .odt .ods .odp .index .ivfdata".split()
)
HTML_EXTS = frozenset({".html", ".htm", ".xhtml"})
MARKDOWN_EXTS = frozenset({".md", ".markdown", ".mdx"})
CODE_EXTS = frozenset(
    ".py .js .ts .tsx .jsx .java .c .h .cc .cpp .hpp .cs .go .rs .rb .php .swift .kt .scala .sh "
    ".bash .zsh .sql .r .jl .lua .pl .m .hs .ml .ex .exs .erl .clj .dart .vue .css .scss".split()
)
DATA_EXTS = frozenset({".csv", ".tsv", ".json", ".jsonl", ".yaml", ".yml", ".toml", ".xml", ".ini", ".cfg"})


@dataclass(frozen=True)
class FileEntry:
    path: str  # absolute
    root: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str  # short key: binary, too-large, unreadable, undecodable, ignored, symlink, ...
    detail: str = ""


class SkipFile(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def file_kind(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".pdf":
        return "pdf"
    if ext in HTML_EXTS:
        return "html"
    if ext in MARKDOWN_EXTS:
        return "markdown"
    if ext == ".rst":
        return "rst"
    if ext in CODE_EXTS:
        return "code"
    if ext in DATA_EXTS:
        return "data"
    return "text"


def ignore_matcher(patterns: Iterable[str]) -> Callable[[str, str], bool]:
    """``ignored(name, rel)``: does an ignore glob match the entry's name or its path below the root?
    One compiled regex for every glob (fnmatch's own translation), not a fnmatch call per glob."""
    pats = tuple(patterns)
    if not pats:
        return lambda name, rel: False
    match = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in pats)).match
    return lambda name, rel: match(name) is not None or match(rel) is not None


def _within(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def walk(
    roots: Iterable[str],
    *,
    ignore: Iterable[str] = (),
    max_file_bytes: int = 20 << 20,
    follow_symlinks: bool = True,
    exclude_dirs: Iterable[str] = (),
    only: Optional[Iterable[str]] = None,
) -> Iterator[Union[FileEntry, Skipped]]:
    """Yield every file under ``roots`` as a FileEntry or a Skipped.

    Symlinked directories are never followed (no loops); a symlinked file is
    indexed only when its target lies inside one of the roots. ``only``: just
    these paths under the roots (a file, or a folder and what is under it; one
    that does not exist yields nothing), as a watcher's update asks; ignore globs
    and every rule apply as in a full walk.
    """
    roots = [os.path.realpath(r) for r in roots]
    rules = _Rules(ignore_matcher(ignore), max_file_bytes, follow_symlinks,
                   {os.path.realpath(d) for d in exclude_dirs}, roots)
    for root in roots:
        if not os.path.isdir(root):
            if only is None or root in set(only):
                yield from _walk_file_root(root, max_file_bytes)
            continue
        if only is None:
            yield from _walk_tree(root, root, rules)
            continue
        for path in _outermost(os.path.abspath(p) for p in only if _within(os.path.abspath(p), [root])):
            if path == root:
                yield from _walk_tree(root, root, rules)
                continue
            rel = path[len(root.rstrip(os.sep)) + 1:]
            if any(rules.ignored(part, "/".join(rel.split(os.sep)[:i + 1])) for i, part in enumerate(rel.split(os.sep))):
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                if os.path.realpath(path) not in rules.excluded:
                    yield from _walk_tree(root, path, rules)
            elif os.path.lexists(path):
                yield from _entry(root, path, os.path.basename(path), rules)


def _outermost(paths: Iterable[str]) -> list[str]:
    """Sorted, without the paths that lie under another one (a folder's walk yields them already)."""
    every = set(paths)

    def under_another(p: str) -> bool:
        up = os.path.dirname(p)
        while up and up != p:
            if up in every:
                return True
            p, up = up, os.path.dirname(up)
        return False

    return sorted(p for p in every if not under_another(p))


@dataclass(frozen=True)
class _Rules:
    ignored: Callable[[str, str], bool]
    max_file_bytes: int
    follow_symlinks: bool
    excluded: set
    roots: list


def _walk_tree(root: str, top: str, rules: _Rules) -> Iterator[Union[FileEntry, Skipped]]:
    """Every file under ``top`` (a folder inside ``root``), in name order."""
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield Skipped(d, "unreadable-dir", e.strerror or str(e))
            continue
        for e in entries:
            rel = e.path[len(root.rstrip(os.sep)) + 1:]  # scandir joins d and the name: the path lies under root
            if rules.ignored(e.name, rel):
                continue  # ignore globs are the user's wish, not a problem to list
            for got in _entry(root, e.path, e.name, rules):
                if isinstance(got, str):
                    stack.append(got)
                else:
                    yield got


def _entry(root: str, path: str, name: str, rules: _Rules) -> Iterator[Union[FileEntry, Skipped, str]]:
    """One path inside ``root``: a FileEntry, a Skipped with its reason, or the path itself (a folder to enter)."""
    try:
        if os.path.islink(path):
            target = os.path.realpath(path)
            if os.path.isdir(target):
                yield Skipped(path, "symlink-dir", "symlinked directories are not followed")
                return
            if not rules.follow_symlinks:
                yield Skipped(path, "symlink", "scan.follow_symlinks is false")
                return
            if not os.path.exists(target):
                yield Skipped(path, "broken-symlink", f"target {target} does not exist")
                return
            if not _within(target, rules.roots):
                yield Skipped(path, "symlink-outside-roots", f"target {target} is outside the roots")
                return
        st = os.stat(path)
    except OSError as err:
        yield Skipped(path, "unreadable", err.strerror or str(err))
        return
    if stat.S_ISDIR(st.st_mode):
        if os.path.realpath(path) not in rules.excluded:
            yield path
        return
    if not stat.S_ISREG(st.st_mode):
        yield Skipped(path, "not-a-regular-file")
        return
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        yield Skipped(path, "undecodable-name", "file name is not valid UTF-8")
        return
    if st.st_size > rules.max_file_bytes:
        yield Skipped(path, "too-large", f"{st.st_size} bytes > scan.max_file_bytes {rules.max_file_bytes}")
        return
    if os.path.splitext(name)[1].lower() in BINARY_EXTS:
        yield Skipped(path, "binary", "binary file type")
        return
    yield FileEntry(path, root, st.st_size, st.st_mtime_ns)


def _walk_file_root(path: str, max_file_bytes: int) -> Iterator[Union[FileEntry, Skipped]]:
    """A root that is a single file."""
    try:
        st = os.stat(path)
    except OSError as e:
        yield Skipped(path, "unreadable", e.strerror or str(e))
        return
    if st.st_size > max_file_bytes:
        yield Skipped(path, "too-large", f"{st.st_size} bytes > scan.max_file_bytes {max_file_bytes}")
    elif os.path.splitext(path)[1].lower() in BINARY_EXTS:
        yield Skipped(path, "binary", "binary file type")
    else:
        yield FileEntry(path, path, st.st_size, st.st_mtime_ns)


class _HTMLText(html.parser.HTMLParser):
    _SKIP = frozenset({"script", "style", "noscript", "template", "head"})
    _BREAK = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag == "title":
            self._in_title = True
        if tag in self._SKIP:
            self._skip += 1
        elif tag in self._BREAK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if tag in self._SKIP and self._skip:
            self._skip -= 1
        elif tag in self._BREAK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if not self._skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    p = _HTMLText()
    p.feed(markup)
    p.close()
    body = "".join(p.parts)
    lines = [" ".join(line.split()) for line in body.splitlines()]
    text = "\n".join(line for line in lines if line)
    title = " ".join(p.title.split())
    return f"{title}\n{text}" if title and not text.startswith(title) else text


def decode_text(data: bytes) -> str:
    """UTF-8 (BOM or not) or UTF-16/32 with a BOM; anything else raises SkipFile."""
    for bom, enc in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                     (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                     (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            try:
                return data.decode(enc)
            except UnicodeDecodeError as e:
                raise SkipFile("undecodable", f"invalid {enc}: {e.reason} at byte {e.start}") from e
    if b"\x00" in data[:SNIFF_BYTES]:
        raise SkipFile("binary", "NUL bytes in the first 8 KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipFile("undecodable", f"not valid UTF-8 ({e.reason} at byte {e.start})") from e
    return text.replace("\x00", " ")


def pdf_to_text(data: bytes) -> str:
    if not data.startswith(b"%PDF-"):
        raise SkipFile("bad-pdf", "no %PDF- header")
    try:
        from pypdf import PdfReader
    except ImportError as e:  # pragma: no cover - pypdf is a dependency
        raise SkipFile("bad-pdf", "install pypdf to read PDF files") from e
    try:
        reader = PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as e:  # pypdf raises many types on broken files
        raise SkipFile("bad-pdf", f"{type(e).__name__}: {e}") from e
    return "\n\n".join(pages)


# a file that moved under the reader: read again by the next pass, its committed version kept meanwhile
IN_MOTION = ("changed-while-read", "replaced-while-read")


def read_text(path: str, max_bytes: int = 20 << 20) -> tuple[str, str, str]:
    """Read one file -> (text, kind, sha256 of the bytes). Raises SkipFile."""
    text, kind, digest, _ = read_text_stat(path, max_bytes)
    return text, kind, digest


def read_bytes_stable(path: str, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """The file's bytes (up to max_bytes + 1) and its stat as they were read. A file written, truncated,
    replaced or deleted while it was read raises SkipFile: its bytes may be half old, half new."""
    try:
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
            data = f.read(max_bytes + 1)
            after = os.fstat(f.fileno())
        now = os.stat(path)
    except FileNotFoundError as e:
        raise SkipFile("vanished", "file disappeared before it was read") from e
    except OSError as e:
        raise SkipFile("unreadable", e.strerror or str(e)) from e
    if (now.st_ino, now.st_dev) != (before.st_ino, before.st_dev):
        raise SkipFile("replaced-while-read", "another file took its name while it was read; read again next time")
    if any((a.st_size, a.st_mtime_ns) != (before.st_size, before.st_mtime_ns) for a in (after, now)):
        raise SkipFile("changed-while-read", "the file was written while it was read; read again next time")
    return data, before


def read_text_stat(path: str, max_bytes: int = 20 << 20) -> tuple[str, str, str, os.stat_result]:
    """Read one file -> (text, kind, sha256 of the bytes, its stat when read). Raises SkipFile."""
    data, st = read_bytes_stable(path, max_bytes)
    if len(data) > max_bytes:
        raise SkipFile("too-large", f"more than scan.max_file_bytes {max_bytes}")
    digest = hashlib.sha256(data).hexdigest()
    kind = file_kind(path)
    if kind == "pdf":
        text = pdf_to_text(data)
    else:
        text = decode_text(data)
        if kind == "html":
            text = html_to_text(text)
    if not text.strip():
        raise SkipFile("empty", "no text content")
    return text, kind, digest, st


def display_path(path: str | Path) -> str:
    """A printable form of a path (control characters escaped)."""
    s = str(path)
    return s.encode("unicode_escape").decode("ascii") if any(ord(c) < 32 for c in s) else s
