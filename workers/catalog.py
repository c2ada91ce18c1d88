"""The SQLite catalog: files, chunks (chunk id = FAISS id), skipped files, runs, vector parts.

WAL mode; every write is one transaction. Chunk ids come from
``AUTOINCREMENT`` so an id is never reused, even after deletes. The ingest
driver writes it; :class:`CatalogReader` reads it (and the keyword index of a
generation) for queries, on the data node only.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from shoal.index import layout
from shoal.index.errors import CorruptFileError, ShoalError, Unavailable
from shoal.workers.chunking import Chunk
from shoal.workers.scan import Skipped

ROOTS_TTL_S = 5.0  # the ingested roots change only when an ingest commits; a removed root's chunks leave the catalog

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    root TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    n_chunks INTEGER NOT NULL,
    indexed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL,
    char_start INTEGER NOT NULL,
    char_end INTEGER NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_file ON chunks(file_id);
CREATE INDEX IF NOT EXISTS files_root ON files(root);
CREATE INDEX IF NOT EXISTS files_sha256 ON files(sha256);
CREATE TABLE IF NOT EXISTS skipped (
    path TEXT PRIMARY KEY,
    root TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    run_id INTEGER
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL,
    finished_at REAL,
    status TEXT NOT NULL,
    roots TEXT NOT NULL,
    stats TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS parts (
    name TEXT PRIMARY KEY,
    n INTEGER NOT NULL,
    min_id INTEGER NOT NULL,
    max_id INTEGER NOT NULL,
    created_at REAL NOT NULL
);
"""


def prefix_upper_bound(prefix: str) -> Optional[str]:
    """The least string above every string that starts with ``prefix`` (SQLite's BINARY collation
    orders UTF-8 by code point), or None where there is none (a last character of U+10FFFF)."""
    last = ord(prefix[-1])
    if last >= 0x10FFFF:
        return None
    nxt = last + 1
    if 0xD800 <= nxt <= 0xDFFF:  # surrogates cannot be stored: skip to the next encodable code point
        nxt = 0xE000
    return prefix[:-1] + chr(nxt)


@dataclass(frozen=True)
class FileRow:
    id: int
    path: str
    root: str
    size: int
    mtime_ns: int
    sha256: str
    kind: str
    n_chunks: int


@dataclass(frozen=True)
class FileBatch:
    """One file's chunks, ready to commit with their vectors."""

    path: str
    root: str
    size: int
    mtime_ns: int
    sha256: str
    kind: str
    chunks: Sequence[Chunk]


@dataclass(frozen=True)
class ChunkHit:
    id: int
    path: str
    kind: str
    ordinal: int
    start: int
    end: int
    text: str


def storable(s: str) -> str:
    """A str SQLite can store: undecodable bytes of file names (surrogate escapes) become \\xNN."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class Catalog:
    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            if not self.path.exists():
                raise CorruptFileError(f"catalog not found: {self.path}")
            uri = f"file:{self.path}?mode=ro"
            self.db = sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False)
        self.db.execute("PRAGMA foreign_keys=ON")
        try:
            if not readonly:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                with self.db:
                    self.db.executescript(SCHEMA)
                    self.db.execute(
                        "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),),
                    )
            self.db.execute("SELECT id FROM files LIMIT 1").fetchone()  # a damaged file fails here, in O(1)
        except sqlite3.OperationalError as e:
            self.db.close()
            if "disk" in str(e) or "full" in str(e):
                raise ShoalError(f"catalog {self.path}: {e} (is the disk full or a file-size limit reached?)") from e
            raise CorruptFileError(f"catalog {self.path} is damaged or not a shoal catalog: {e}") from e
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise CorruptFileError(f"catalog {self.path} is damaged or not a shoal catalog: {e}") from e

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")

    # -- meta ---------------------------------------------------------------
    def get_meta(self, key: str) -> Optional[str]:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -- files --------------------------------------------------------------
    def files_under(self, root: str) -> dict[str, FileRow]:
        """Catalog files at or below ``root`` (by path, whatever root they came in with)."""
        prefix = root.rstrip("/") + "/"
        rows = self.db.execute(
            "SELECT id, path, root, size, mtime_ns, sha256, kind, n_chunks FROM files"
            " WHERE path = ? OR substr(path, 1, ?) = ?",
            (root, len(prefix), prefix),
        )
        return {r[1]: FileRow(*r) for r in rows}

    def file_by_path(self, path: str) -> Optional[FileRow]:
        r = self.db.execute(
            "SELECT id, path, root, size, mtime_ns, sha256, kind, n_chunks FROM files WHERE path=?", (path,)
        ).fetchone()
        return FileRow(*r) if r else None

    def chunks_with_digest(self, sha256: str, n_chunks: int, other_than: str) -> Optional[np.ndarray]:
        """The chunk ids, in order, of another file with these bytes cut into as many chunks (a copy or a
        rename: its vectors can be reused); None where there is none."""
        row = self.db.execute("SELECT id FROM files WHERE sha256=? AND n_chunks=? AND path<>? LIMIT 1",
                              (sha256, n_chunks, other_than)).fetchone()
        if row is None:
            return None
        ids = [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE file_id=? ORDER BY ordinal", (row[0],))]
        return np.asarray(ids, dtype=np.int64) if len(ids) == n_chunks else None

    def touch_file(self, path: str, size: int, mtime_ns: int) -> None:
        """Record a new mtime for a file whose content hash did not change."""
        with self.transaction() as db:
            db.execute("UPDATE files SET size=?, mtime_ns=? WHERE path=?", (size, mtime_ns, path))

    def commit_files(self, batch: Sequence[FileBatch], write_part: Any = None) -> np.ndarray:
        """Replace each file's chunks with new ones in one transaction; return the new ids.

        ``write_part(ids)`` runs inside the transaction (after the ids are known,
        before COMMIT): it writes the vectors and returns the part's name, so the
        rows and the vectors land together or not at all.
        """
        now = time.time()
        rows: list[tuple[int, int, int, int, int, str]] = []
        with self.transaction() as db:  # BEGIN IMMEDIATE: the write lock is ours, the next ids are too
            next_id = self._next_chunk_id(db)
            for fb in batch:
                db.execute("DELETE FROM files WHERE path=?", (fb.path,))  # cascades to old chunks
                db.execute("DELETE FROM skipped WHERE path=?", (fb.path,))
                cur = db.execute(
                    "INSERT INTO files(path, root, size, mtime_ns, sha256, kind, status, n_chunks, indexed_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, 'indexed', ?, ?)",
                    (fb.path, fb.root, fb.size, fb.mtime_ns, fb.sha256, fb.kind, len(fb.chunks), now),
                )
                file_id = int(cur.lastrowid)  # type: ignore[arg-type]
                rows += [(next_id + len(rows) + j, file_id, c.ordinal, c.start, c.end, c.text)
                         for j, c in enumerate(fb.chunks)]
            db.executemany("INSERT INTO chunks(id, file_id, ordinal, char_start, char_end, text) VALUES (?, ?, ?, ?, ?, ?)",
                           rows)
            id_arr = np.arange(next_id, next_id + len(rows), dtype=np.int64)
            if write_part is not None and len(id_arr):
                name = write_part(id_arr)
                db.execute(
                    "INSERT INTO parts(name, n, min_id, max_id, created_at) VALUES (?, ?, ?, ?, ?)",
                    (name, len(id_arr), int(id_arr.min()), int(id_arr.max()), now),
                )
        return id_arr

    @staticmethod
    def _next_chunk_id(db: sqlite3.Connection) -> int:
        """The id AUTOINCREMENT would give the next chunk: above every id ever used, never reused."""
        seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name='chunks'").fetchone()
        top = db.execute("SELECT MAX(id) FROM chunks").fetchone()[0]
        return max(int(seq[0]) if seq else 0, int(top or 0)) + 1

    def delete_files(self, paths: Iterable[str]) -> int:
        """Remove files and their chunks; returns the number of chunks removed."""
        removed = 0
        with self.transaction() as db:
            for p in paths:
                row = db.execute("SELECT n_chunks FROM files WHERE path=?", (p,)).fetchone()
                if row:
                    removed += row[0]
                    db.execute("DELETE FROM files WHERE path=?", (p,))
        return removed

    # -- skipped ------------------------------------------------------------
    def record_skipped(self, items: Sequence[Skipped], root: str, run_id: Optional[int]) -> None:
        with self.transaction() as db:
            for s in items:
                path = storable(s.path)
                db.execute("DELETE FROM files WHERE path=?", (path,))
                db.execute(
                    "INSERT OR REPLACE INTO skipped(path, root, reason, detail, run_id) VALUES (?, ?, ?, ?, ?)",
                    (path, root, s.reason, storable(s.detail), run_id),
                )

    def clear_skipped(self, root: str, keep: Iterable[str] = (), under: Optional[Sequence[str]] = None) -> None:
        """Forget the root's skipped files (``under``: only those at or below these paths)."""
        keep = set(keep)
        scope = None if under is None else tuple(p.rstrip("/") + "/" for p in under)
        exact = set(under or ())
        with self.transaction() as db:
            rows = db.execute("SELECT path FROM skipped WHERE root=?", (root,)).fetchall()
            for (p,) in rows:
                if p in keep or (scope is not None and p not in exact and not p.startswith(scope)):
                    continue
                db.execute("DELETE FROM skipped WHERE path=?", (p,))

    def skipped(self) -> list[Skipped]:
        return [Skipped(*r) for r in self.db.execute("SELECT path, reason, detail FROM skipped ORDER BY path")]

    # -- runs ---------------------------------------------------------------
    def start_run(self, roots: Sequence[str]) -> tuple[int, Optional[int]]:
        """Open a run; returns (run id, id of an unfinished earlier run or None)."""
        with self.transaction() as db:
            prev = db.execute(
                "SELECT id FROM runs WHERE status='running' ORDER BY id DESC LIMIT 1"
            ).fetchone()
            db.execute("UPDATE runs SET status='interrupted' WHERE status='running'")
            cur = db.execute(
                "INSERT INTO runs(started_at, status, roots) VALUES (?, 'running', ?)",
                (time.time(), json.dumps(list(roots))),
            )
        return int(cur.lastrowid), (prev[0] if prev else None)  # type: ignore[arg-type]

    def finish_run(self, run_id: int, status: str, stats: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET finished_at=?, status=?, stats=? WHERE id=?",
                (time.time(), status, json.dumps(stats), run_id),
            )

    def last_run(self) -> Optional[dict[str, Any]]:
        r = self.db.execute(
            "SELECT id, started_at, finished_at, status, roots, stats FROM runs ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if not r:
            return None
        return {"id": r[0], "started_at": r[1], "finished_at": r[2], "status": r[3],
                "roots": json.loads(r[4]), "stats": json.loads(r[5])}

    # -- parts --------------------------------------------------------------
    def part_names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM parts ORDER BY name")]

    def parts(self) -> list[tuple[str, int, int]]:
        """(name, min_id, max_id) of every registered part, by min_id."""
        return [(r[0], int(r[1]), int(r[2])) for r in
                self.db.execute("SELECT name, min_id, max_id FROM parts ORDER BY min_id, name")]

    def staged_vectors(self) -> int:
        return int(self.db.execute("SELECT coalesce(sum(n), 0) FROM parts").fetchone()[0])

    def replace_parts(self, old: Sequence[str], new: Sequence[tuple[str, np.ndarray]]) -> None:
        """Swap compacted parts (old names -> new (name, ids) parts) in one transaction."""
        with self.transaction() as db:
            for name in old:
                db.execute("DELETE FROM parts WHERE name=?", (name,))
            for name, ids in new:
                if len(ids):
                    db.execute(
                        "INSERT INTO parts(name, n, min_id, max_id, created_at) VALUES (?, ?, ?, ?, ?)",
                        (name, len(ids), int(ids.min()), int(ids.max()), time.time()),
                    )

    # -- chunks -------------------------------------------------------------
    def chunk_ids(self) -> np.ndarray:
        """Every live chunk id, sorted (streamed from the cursor: no Python list of 10M rows)."""
        return np.fromiter((r[0] for r in self.db.execute("SELECT id FROM chunks ORDER BY id")), dtype=np.int64)

    def chunk_text_blocks(self, block: int = 100_000) -> Iterator[tuple[np.ndarray, list[str]]]:
        """Every live chunk in id order, ``block`` at a time: (ids, texts) (keyset pages, never all in RAM)."""
        last = -1
        while True:
            rows = self.db.execute("SELECT id, text FROM chunks WHERE id > ? ORDER BY id LIMIT ?",
                                   (last, block)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)), [r[1] for r in rows]

    def chunk_texts_for(self, ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """The texts of ``ids`` (live ones; gone ones are left out), sorted by id."""
        got: dict[int, str] = {}
        wanted = [int(i) for i in np.unique(ids)]
        for i0 in range(0, len(wanted), 500):
            part = wanted[i0:i0 + 500]
            q = ",".join("?" * len(part))
            got.update(self.db.execute(f"SELECT id, text FROM chunks WHERE id IN ({q})", part).fetchall())
        keys = sorted(got)
        return np.asarray(keys, dtype=np.int64), [got[k] for k in keys]

    def chunk_row(self, chunk_id: int) -> Optional[dict[str, Any]]:
        """One chunk with its file's row: what the passage view shows."""
        r = self.db.execute(
            "SELECT c.id, c.ordinal, c.char_start, c.char_end, c.text, f.path, f.kind, f.size, f.mtime_ns, f.sha256,"
            " f.n_chunks, f.root FROM chunks c JOIN files f ON f.id = c.file_id WHERE c.id = ?", (int(chunk_id),)
        ).fetchone()
        if r is None:
            return None
        keys = ("id", "ordinal", "start", "end", "text", "path", "kind", "size", "mtime_ns", "sha256", "n_chunks",
                "root")
        return dict(zip(keys, r))

    def lookup(self, ids: Iterable[int]) -> dict[int, ChunkHit]:
        ids = [int(i) for i in ids if i >= 0]
        out: dict[int, ChunkHit] = {}
        for i0 in range(0, len(ids), 500):
            part = ids[i0:i0 + 500]
            q = ",".join("?" * len(part))
            for r in self.db.execute(
                "SELECT c.id, f.path, f.kind, c.ordinal, c.char_start, c.char_end, c.text"
                f" FROM chunks c JOIN files f ON f.id = c.file_id WHERE c.id IN ({q})",
                part,
            ):
                out[r[0]] = ChunkHit(*r)
        return out

    def ids_matching(self, path_prefix: Optional[str] = None, kinds: Optional[Sequence[str]] = None) -> np.ndarray:
        """Sorted ids of the chunks whose file path starts with ``path_prefix`` and kind is in ``kinds``."""
        sql, args = "SELECT c.id FROM files f JOIN chunks c ON c.file_id = f.id WHERE 1=1", []
        if path_prefix:
            upper = prefix_upper_bound(path_prefix)
            if upper is not None:  # a range on the path index: the matching files only, not a scan of all
                sql += " AND f.path >= ? AND f.path < ?"
                args += [path_prefix, upper]
            else:
                sql += " AND substr(f.path, 1, ?) = ?"
                args += [len(path_prefix), path_prefix]
        if kinds:
            sql += f" AND f.kind IN ({','.join('?' * len(kinds))})"
            args += list(kinds)
        rows = self.db.execute(sql + " ORDER BY c.id", args).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def counts(self) -> dict[str, int]:
        one = lambda sql: int(self.db.execute(sql).fetchone()[0])  # noqa: E731
        return {
            "files": one("SELECT count(*) FROM files"),
            "chunks": one("SELECT count(*) FROM chunks"),
            "skipped": one("SELECT count(*) FROM skipped"),
            "parts": one("SELECT count(*) FROM parts"),
        }

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT reason, count(*) FROM skipped GROUP BY reason ORDER BY 2 DESC"))

    def roots(self) -> list[str]:
        """The distinct roots, one index probe each (a DISTINCT would read every file row)."""
        out: list[str] = []
        while True:
            row = self.db.execute("SELECT min(root) FROM files WHERE root > ?", (out[-1] if out else "",)).fetchone()
            if row is None or row[0] is None:
                return out
            out.append(row[0])


def snippet(text: str, spans: Sequence[tuple[int, int]] = (), chars: int = 200) -> tuple[str, list[list[int]]]:
    """At most ``chars`` characters of ``text`` with runs of whitespace made one space, starting a little
    before the first highlighted span (at a word's start) so that a match shows; the spans moved into it."""
    start = 0
    if spans and spans[0][0] > chars // 4:
        start = text.rfind(" ", 0, max(0, spans[0][0] - chars // 5)) + 1
    out: list[str] = []
    pos: dict[int, int] = {}  # text offset -> snippet offset, at span edges
    edges = {e for a, b in spans for e in (a, b)}
    space = False
    i = start
    while i < len(text) and len(out) < chars:
        ch = text[i]
        if i in edges:
            pos[i] = len(out)
        if ch.isspace():
            if not space and out:
                out.append(" ")
            space = True
        else:
            out.append(ch)
            space = False
        i += 1
    end_i = i
    if end_i in edges:
        pos[end_i] = len(out)
    body = "".join(out).rstrip()
    marks = [[pos[a], min(pos.get(b, len(body)), len(body))] for a, b in spans
             if a >= start and a in pos and pos[a] < len(body)]
    prefix = "…" if start > 0 else ""
    suffix = "…" if end_i < len(text) and text[end_i:].strip() else ""
    shift = len(prefix)
    return prefix + body + suffix, [[a + shift, b + shift] for a, b in marks]


@dataclass(frozen=True)
class Passage:
    """Another matching passage of a file in a per-file answer (``group: file``): its chunk, offsets, score."""

    id: int
    rank: int  # its rank among the chunks before grouping
    score: float
    start: int
    end: int
    text: str
    highlights: Optional[list[list[int]]] = None

    def as_dict(self, snippet_chars: Optional[int] = 200) -> dict[str, Any]:
        text, marks = (self.text, self.highlights) if snippet_chars is None else \
            snippet(self.text, [tuple(x) for x in self.highlights or []], snippet_chars)
        d = {"id": self.id, "rank": self.rank, "score": self.score, "start": self.start, "end": self.end,
             "text": text}
        if self.highlights is not None:
            d["highlights"] = marks
        return d


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    id: int
    path: str
    kind: str
    start: int
    end: int
    text: str
    first_stage_score: Optional[float] = None
    # per-file answers (group: file): the file's other matching passages, best first
    passages: Optional[list[Passage]] = None
    # where the query's terms are in ``text`` (the keyword analysis's matches), when asked for
    highlights: Optional[list[list[int]]] = None

    def snippet(self, chars: int = 200) -> str:
        flat = " ".join(self.text.split())
        return flat if len(flat) <= chars else flat[:chars].rstrip() + "…"

    def as_dict(self, snippet_chars: Optional[int] = 200) -> dict[str, Any]:
        d = {"rank": self.rank, "score": self.score, "id": self.id, "path": self.path, "kind": self.kind,
             "start": self.start, "end": self.end, "text": self.text}
        if self.first_stage_score is not None:
            d["first_stage_score"] = self.first_stage_score
        if self.highlights is not None:
            d["text"], d["highlights"] = (self.text, self.highlights) if snippet_chars is None else \
                snippet(self.text, [tuple(x) for x in self.highlights], snippet_chars)
        elif snippet_chars is not None:
            d["text"] = self.snippet(snippet_chars)
        if self.passages is not None:
            d["passages"] = [p.as_dict(snippet_chars) for p in self.passages]
        return d


def within(path: str, roots: Sequence[str]) -> bool:
    """Is ``path`` one of the roots (each given with a trailing "/") or under one?"""
    return (path + "/").startswith(tuple(roots)) or path.startswith(tuple(roots))


def group_by_file(hits: Sequence[Hit], k: int) -> list[Hit]:
    """Chunk hits (best first) -> at most ``k`` file hits: each file's best chunk, ranked by it, with the
    file's other chunks among ``hits`` as its passages."""
    best: dict[str, Hit] = {}
    more: dict[str, list[Passage]] = {}
    for h in hits:
        if h.path not in best:
            if len(best) == k:
                continue
            best[h.path], more[h.path] = h, []
        else:
            more[h.path].append(Passage(h.id, h.rank, h.score, h.start, h.end, h.text, h.highlights))
    return [replace(h, rank=r, passages=more[h.path]) for r, h in enumerate(best.values(), 1)]


class CatalogReader:
    """Reads catalog.sqlite and the keyword index of a generation; lives on the data node only.

    SQLite never goes over a network filesystem: a core elsewhere reaches this
    through the DataNode deployment. One lock keeps the catalog connection to
    one user at a time.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data = Path(data_dir)
        self._catalog: Any = None
        self._db_lock = threading.Lock()
        self._kw: Optional[tuple[str, Any]] = None
        self._kw_lock = threading.Lock()
        self._roots: tuple[float, tuple[str, ...]] = (0.0, ())
        self._parts: Optional[tuple[float, Any]] = None

    def catalog(self) -> Any:
        if self._catalog is None:
            self._catalog = Catalog(layout.catalog(self.data), readonly=True)
        return self._catalog

    def _db(self, fn: str, *args: Any) -> Any:
        with self._db_lock:
            return getattr(self.catalog(), fn)(*args)

    def ids_matching(self, prefix: Optional[str], types: Any) -> np.ndarray:
        return self._db("ids_matching", prefix, types)

    def counts(self) -> dict[str, Any]:
        return self._db("counts")

    def keyword_index(self, generation: Optional[str]) -> Any:
        """The BM25 index of ``generation`` (or CURRENT), with the analysis it was built with; None if it has none."""
        from shoal.index import generations
        from shoal.index.keyword import KeywordIndex

        name = generation or generations.current_name(self.data)
        if name is None:
            raise Unavailable("no index generation yet: run `shoal ingest` first")
        with self._kw_lock:
            if self._kw is None or self._kw[0] != name:
                gen_dir = generations.generations_dir(self.data) / name
                kw = KeywordIndex.open(gen_dir, generations.read_manifest(gen_dir)) \
                    if KeywordIndex.exists(gen_dir) else None
                self._kw = (name, kw)
            return self._kw

    def keyword_search(self, generation: Optional[str], queries: list[str],
                       n: int) -> Optional[tuple[np.ndarray, np.ndarray, str]]:
        """(D, I, generation) of the keyword index, or None where the generation has none."""
        name, kw = self.keyword_index(generation)
        if kw is None:
            return None
        D, I = kw.search(queries, n)
        return D, I, name

    def health(self) -> dict[str, Any]:
        """The catalog answers (one indexed row, not a count) and the live generation's keyword index
        (if it has one) opens."""
        with self._db_lock:
            self.catalog().db.execute("SELECT id FROM chunks ORDER BY id LIMIT 1").fetchall()
        name, kw = self.keyword_index(None)
        return {"generation": name, "keyword": kw is not None}

    def _ingested_roots(self) -> tuple[str, ...]:
        """The roots (each ending in "/"); call with the catalog lock held."""
        if time.monotonic() - self._roots[0] > ROOTS_TTL_S:  # a DISTINCT over files: not per query
            self._roots = (time.monotonic(), tuple(r.rstrip("/") + "/" for r in self.catalog().roots()))
        return self._roots[1]

    def hits(self, D: np.ndarray, I: np.ndarray, n: int) -> list[list[Hit]]:
        """Ids -> catalog rows, best first, at most n per query. Ids no longer in the catalog are
        dropped, and so is anything outside the ingested roots: no path outside them is ever served."""
        with self._db_lock:
            rows = self.catalog().lookup(np.unique(I[I >= 0]).tolist())
            roots = self._ingested_roots()
        out = []
        for drow, irow in zip(D, I):
            hs: list[Hit] = []
            for score, i in zip(drow, irow):
                c = rows.get(int(i))
                if c is None or not within(c.path, roots):
                    continue
                hs.append(Hit(len(hs) + 1, float(score), c.id, c.path, c.kind, c.start, c.end, c.text))
                if len(hs) == n:
                    break
            out.append(hs)
        return out

    def vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found ids, float32 vectors) of live chunks, from the staged parts (memory-mapped rows)."""
        from shoal.index.staging import PartVectors

        ids = np.asarray(ids, dtype=np.int64)
        now = time.monotonic()
        pv = self._parts
        if pv is None or now - pv[0] > ROOTS_TTL_S:  # parts change only when an ingest commits or a build compacts
            with self._db_lock:
                pv = self._parts = (now, PartVectors(layout.staging(self.data), self.catalog().parts()))
        got = pv[1].get(ids)
        if len(got[0]) < len(ids):  # a commit or a compaction since: look again once
            with self._db_lock:
                self._parts = (now, PartVectors(layout.staging(self.data), self.catalog().parts()))
            got = self._parts[1].get(ids)
        return got

    def analysis(self, generation: Optional[str]) -> Any:
        """The keyword analysis of ``generation`` (its manifest's, the default where none is recorded)."""
        from shoal.index import generations
        from shoal.index.keyword import Analysis

        name, kw = self.keyword_index(generation)
        if kw is not None:
            return kw.analysis
        return Analysis.from_manifest(generations.read_manifest(generations.generations_dir(self.data) / name)) \
            if (generations.generations_dir(self.data) / name / layout.MANIFEST).exists() else Analysis()

    def highlights(self, generation: Optional[str], query: str, texts: list[str]) -> list[list[list[int]]]:
        """Where ``query``'s terms are in each text, by the generation's keyword analysis."""
        from shoal.index.keyword import highlight_spans

        a = self.analysis(generation)
        return [[list(x) for x in highlight_spans(t, query, a)] for t in texts]

    def passage(self, chunk_id: int, query: Optional[str] = None, context_chars: int = 1500,
                whole: bool = False) -> dict[str, Any]:
        """A chunk inside its file: the text around it (or the whole extracted text), where it is (char
        offsets, line), the file's path, kind, size and mtime, and the query's terms highlighted. Only chunks
        of files inside the ingested roots; a file changed since it was indexed says so and shows the chunk
        as indexed. Raises NotFound (404)."""
        from shoal.index.errors import NotFound
        from shoal.workers.scan import SkipFile, read_text

        with self._db_lock:
            row = self.catalog().chunk_row(int(chunk_id))
            roots = self._ingested_roots()
        if row is None:
            raise NotFound(f"no passage {chunk_id} in this index (it was never indexed, or its file changed or "
                           "was removed since)")
        if not within(row["path"], roots) or not within(os.path.realpath(row["path"]), roots):
            raise NotFound(f"passage {chunk_id} is not in a file inside the ingested roots")
        out = {**row, "current": False, "note": ""}
        try:
            text, _, digest = read_text(row["path"], max(int(row["size"]) * 2, 1 << 20))
        except SkipFile as e:
            text, digest = "", ""
            out["note"] = f"the file cannot be read now ({e.reason}: {e.detail}); showing the passage as indexed"
        if digest and digest == row["sha256"] and text[row["start"]:row["end"]] == row["text"]:
            out["current"] = True
        elif not out["note"]:
            out["note"] = "the file changed since it was indexed; showing the passage as indexed"
        if not out["current"]:
            text, lo, hi = row["text"], 0, len(row["text"])
        else:
            lo = 0 if whole else max(0, row["start"] - context_chars)
            hi = len(text) if whole else min(len(text), row["end"] + context_chars)
        a, b = (row["start"], row["end"]) if out["current"] else (0, len(row["text"]))
        out.update(before=text[lo:a], passage=text[a:b], after=text[b:hi], line=text.count("\n", 0, a) + 1 if
                   out["current"] else None, text_start=lo, text_end=hi, text_chars=len(text))
        if query:  # offsets into before + passage + after
            out["highlights"] = self.highlights(None, query, [text[lo:hi]])[0]
        return out

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None

