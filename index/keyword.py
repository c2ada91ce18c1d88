"""The keyword index beside the vectors: BM25 over the live chunks, in immutable segments.

A build costs what changed, not the corpus. A generation's ``keyword/`` folder
holds segments (one folder each: a term -> (doc, tf) posting matrix in CSC
form, doc lengths, chunk ids) and ``deleted.npy``, the chunk ids that are in a
segment but no longer live. A delta build hard-links the last generation's
segments, writes one small segment for the chunks added since and lists the
removed ones; segments are merged (postings concatenated, deleted docs
dropped, no re-tokenising) when there are too many or one is mostly dead.

Scores are exactly those of a BM25 index rebuilt from the live chunks alone:
document frequencies, the document count and the mean length are live
figures (a segment with deleted docs stores its live document frequencies),
summed over segments at query time. The formula is bm25s's "lucene" variant
(k1 1.5, b 0.75), so a generation built by an older shoal with bm25s ranks the
same. Terms are stored as 64-bit hashes (blake2b of the analysed term), sorted
for a binary search. Everything is saved with ``np.save`` and read memory-mapped
with ``allow_pickle=False``.

Text analysis (lower-casing, stop words, a Snowball stemmer from PyStemmer) is
an :class:`Analysis` recorded in the generation's manifest; queries against a
generation are analysed exactly as its chunks were, whatever the config says now.
"""

from __future__ import annotations

import hashlib
import shutil
import json
import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
from shoal.index import layout

log = logging.getLogger(__name__)

# stop-word lists bm25s ships, by the Snowball language names PyStemmer uses
_STOPWORDS = {"english": "en", "german": "de", "dutch": "nl", "french": "fr", "spanish": "es",
              "portuguese": "pt", "italian": "it", "russian": "ru", "swedish": "sv", "norwegian": "no",
              "danish": "da", "turkish": "tr"}


@dataclass(frozen=True)
class Analysis:
    """How text becomes BM25 terms: a Snowball stemmer language and a stop-word list (None: off)."""

    stemmer: Optional[str] = "english"
    stopwords: Optional[str] = "en"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "Analysis":
        """The analysis a generation was built with (generations before it was recorded: stop words only)."""
        a = (manifest.get("keyword") or {}).get("analysis")
        return cls(**a) if a is not None else cls(stemmer=None, stopwords="en")


def stemmer_languages() -> list[str]:
    import Stemmer  # PyStemmer

    return sorted(Stemmer.algorithms())


def analysis_for(language: str, stopwords: str = "auto") -> Analysis:
    """``index.keyword_language`` / ``index.keyword_stopwords`` -> Analysis.

    language: a Snowball language ("english", "german", ...) or "none" (no stemming);
    stopwords: "auto" (the language's list, none for "none"), a language name, or "none".
    """
    lang = language.lower()
    if lang != "none" and lang not in stemmer_languages():
        raise ValueError(f"no Snowball stemmer for {language!r}; one of: none, {', '.join(stemmer_languages())}")
    sw = stopwords.lower()
    if sw == "auto":
        sw = lang
    if sw == "none":
        return Analysis(None if lang == "none" else lang, None)
    if sw not in _STOPWORDS:
        raise ValueError(f"no stop-word list for {stopwords!r}; one of: auto, none, {', '.join(sorted(_STOPWORDS))}")
    return Analysis(None if lang == "none" else lang, _STOPWORDS[sw])


def _tokenize(texts: Sequence[str], analysis: Analysis) -> Any:
    import bm25s

    stemmer = None
    if analysis.stemmer:
        import Stemmer

        stemmer = Stemmer.Stemmer(analysis.stemmer)
    return bm25s.tokenize(list(texts), stopwords=analysis.stopwords or [], stemmer=stemmer, show_progress=False)


TOKEN_PATTERN = re.compile(r"(?u)\b\w\w+\b")  # bm25s's token pattern (scikit-learn's CountVectorizer)


def highlight_spans(text: str, query: str, analysis: Analysis) -> list[tuple[int, int]]:
    """(start, end) of each word of ``text`` whose analysed term (lower-cased, stop words dropped,
    stemmed: the BM25 side's analysis) is one of the query's: ``flutters`` lights up for ``flutter``."""
    want = set(_tokenize([query], analysis).vocab) - {""}
    if not want:
        return []
    words = [(m.start(), m.end(), m.group()) for m in TOKEN_PATTERN.finditer(text)]
    if not words:
        return []
    tok = _tokenize([w for _, _, w in words], analysis)
    term = {i: t for t, i in tok.vocab.items()}
    return [(a, b) for (a, b, _), ids in zip(words, tok.ids) if len(ids) and term.get(int(ids[0])) in want]


K1, B = 1.5, 0.75  # bm25s defaults
SEGMENT_DOCS = 250_000  # a full build writes segments of at most this many chunks
MAX_SEGMENTS = 8  # past this many segments smaller than SEGMENT_DOCS, the smallest are merged
MERGE_FACTOR = 4  # how many of the smallest segments one merge joins
MAX_DEAD = 0.5  # a segment with more deleted docs than this is rewritten without them
KEYWORD_DIR = "keyword"
SEG_FILES = ("terms", "indptr", "docs", "tfs", "dl", "ids")


def term_hashes(terms: Sequence[str]) -> np.ndarray:
    """Stable 64-bit hashes of analysed terms (blake2b), the keys of every segment's term table."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little")
                        for t in terms), dtype=np.uint64, count=len(terms))


def analyse(texts: Sequence[str], analysis: Analysis) -> tuple[list[np.ndarray], int]:
    """Each text -> the hashes of its terms, in order (repeats kept); and the total number of terms."""
    tok = _tokenize(texts, analysis)
    vocab = [""] * len(tok.vocab)
    for term, i in tok.vocab.items():
        vocab[i] = term
    h = term_hashes(vocab)
    out = [h[np.asarray(d, dtype=np.int64)] if len(d) else np.empty(0, np.uint64) for d in tok.ids]
    return out, sum(len(d) for d in out)


@dataclass
class Segment:
    """One immutable segment: postings by term (CSC) over its docs (rows), row -> chunk id."""

    terms: np.ndarray  # (T,) uint64, sorted
    indptr: np.ndarray  # (T+1,) int64
    docs: np.ndarray  # (nnz,) int32 rows, ascending within a term
    tfs: np.ndarray  # (nnz,) uint16 term frequency
    dl: np.ndarray  # (n,) int32 terms per doc
    ids: np.ndarray  # (n,) int64 chunk ids, ascending

    @property
    def n(self) -> int:
        return len(self.ids)

    @classmethod
    def from_pairs(cls, th: np.ndarray, rows: np.ndarray, tf: Optional[np.ndarray], dl: np.ndarray,
                   ids: np.ndarray) -> "Segment":
        """From (term hash, row[, tf]) entries in any order; without ``tf`` each entry is one occurrence."""
        order = np.lexsort((rows, th))
        th, rows = th[order], rows[order]
        if tf is None:
            new = np.ones(len(th), bool)
            if len(th):
                new[1:] = (th[1:] != th[:-1]) | (rows[1:] != rows[:-1])
            starts = np.flatnonzero(new)
            tf = np.diff(np.append(starts, len(th)))
            th, rows = th[starts], rows[starts]
        else:
            tf = tf[order]
        terms, first = np.unique(th, return_index=True)
        indptr = np.append(first, len(th)).astype(np.int64)
        return cls(terms.astype(np.uint64), indptr, rows.astype(np.int32),
                   np.minimum(tf, np.iinfo(np.uint16).max).astype(np.uint16), dl.astype(np.int32),
                   np.asarray(ids, dtype=np.int64))

    @classmethod
    def build(cls, texts: Sequence[str], ids: np.ndarray, analysis: Analysis, block: int = 20_000) -> "Segment":
        """Analyse ``texts`` (chunk ids ``ids``, ascending) ``block`` at a time: only (term, doc, tf) triples stay."""
        th_l, rows_l, tf_l, dl_l = [], [], [], []
        for i0 in range(0, len(texts), block):
            per_doc, total = analyse(texts[i0:i0 + block], analysis)
            dl = np.fromiter((len(d) for d in per_doc), dtype=np.int64, count=len(per_doc))
            th = np.concatenate(per_doc) if total else np.empty(0, np.uint64)
            part = cls.from_pairs(th, np.repeat(np.arange(len(per_doc), dtype=np.int64), dl), None, dl,
                                  np.arange(len(per_doc)))
            th_l.append(part.entry_terms())
            rows_l.append(part.docs.astype(np.int64) + i0)
            tf_l.append(part.tfs)
            dl_l.append(dl)
        if not th_l:
            return cls.from_pairs(np.empty(0, np.uint64), np.empty(0, np.int64), np.empty(0, np.uint16),
                                  np.empty(0, np.int64), np.asarray(ids, dtype=np.int64))
        return cls.from_pairs(np.concatenate(th_l), np.concatenate(rows_l), np.concatenate(tf_l),
                              np.concatenate(dl_l), ids)

    def entry_terms(self) -> np.ndarray:
        return np.repeat(self.terms, np.diff(self.indptr))

    def df_without(self, dead_rows: np.ndarray) -> np.ndarray:
        """Document frequency per term counting only rows not in ``dead_rows``."""
        df = np.diff(self.indptr)
        if not len(dead_rows):
            return df
        mask = np.zeros(self.n, bool)
        mask[dead_rows] = True
        hit = np.flatnonzero(mask[self.docs])
        term = np.searchsorted(self.indptr, hit, side="right") - 1
        return df - np.bincount(term, minlength=len(self.terms))

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True)
        for name in SEG_FILES:
            np.save(folder / f"{name}.npy", getattr(self, name), allow_pickle=False)

    @classmethod
    def load(cls, folder: Path, mmap: bool = True) -> "Segment":
        from shoal.index.errors import CorruptFileError

        arrays = {}
        for name in SEG_FILES:
            path = folder / f"{name}.npy"
            try:
                a = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
                # a plain ndarray over the same mapping: slicing a np.memmap builds a memmap per slice
                # (__array_finalize__), a cost paid per posting list per query
                arrays[name] = np.asarray(a) if mmap else a
            except (ValueError, OSError, EOFError) as e:
                raise CorruptFileError(f"keyword segment file {path} is damaged or missing: {e}") from e
        seg = cls(**arrays)
        if len(seg.indptr) != len(seg.terms) + 1 or len(seg.docs) != len(seg.tfs) or len(seg.dl) != len(seg.ids) \
                or (len(seg.indptr) and int(seg.indptr[-1]) != len(seg.docs)):
            raise CorruptFileError(f"keyword segment {folder} has inconsistent array shapes")
        return seg


def merge_segments(segs: Sequence[Segment], dead: np.ndarray) -> Segment:
    """One segment holding the live docs of ``segs`` (chunk ids in ``dead`` dropped), ids ascending."""
    ids = np.concatenate([s.ids for s in segs])
    order = np.argsort(ids, kind="stable")
    keep_sorted = ~np.isin(ids[order], dead, assume_unique=False)
    new_row = np.full(len(ids), -1, np.int64)  # old (concatenated) row -> new row
    new_row[order[keep_sorted]] = np.arange(int(keep_sorted.sum()))
    th, rows, tf, off = [], [], [], 0
    for s in segs:
        r = new_row[off + s.docs.astype(np.int64)]
        live = r >= 0
        th.append(s.entry_terms()[live])
        rows.append(r[live])
        tf.append(np.asarray(s.tfs)[live])
        off += s.n
    dl = np.concatenate([s.dl for s in segs])[order[keep_sorted]]
    return Segment.from_pairs(np.concatenate(th), np.concatenate(rows), np.concatenate(tf), dl,
                              ids[order[keep_sorted]])


def _new_segment_name() -> str:
    return f"seg-{time.time_ns():x}-{uuid.uuid4().hex[:6]}"


def write_keyword(out_dir: Path, analysis: Analysis, *, live: np.ndarray, texts_for: Callable[[np.ndarray], tuple[np.ndarray, list[str]]],
                  text_blocks: Callable[[], Iterator[tuple[np.ndarray, list[str]]]],
                  base_dir: Optional[Path] = None, base: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Write the keyword index for the ``live`` chunk ids (sorted) into out_dir/keyword; returns its manifest entry.

    With the last generation's keyword index (``base_dir``, ``base``: its manifest entry), built with the same
    analysis, its segments are hard-linked and only the chunks added since are analysed (a delta); else every
    live chunk is analysed (``text_blocks``), in segments of SEGMENT_DOCS.
    """
    from shoal.index.generations import link_or_copy

    t0 = time.perf_counter()
    kdir = out_dir / KEYWORD_DIR
    kdir.mkdir(parents=True, exist_ok=True)
    old: list[tuple[str, Segment]] = []
    if base_dir is not None and base is not None and base.get("kind") == "segments" \
            and Analysis(**base["analysis"]) == analysis:
        old = [(s["name"], Segment.load(base_dir / KEYWORD_DIR / s["name"])) for s in base["segments"]]
    segs: list[tuple[str, Segment, bool]] = []  # (name, segment, written now)
    analysed = 0
    if old:
        in_segs = np.sort(np.concatenate([s.ids for _, s in old])) if old else np.empty(0, np.int64)
        added = np.setdiff1d(live, in_segs, assume_unique=True)
        segs = [(n, s, False) for n, s in old]
        if len(added):
            ids, texts = texts_for(added)
            segs.append(_persist(kdir, Segment.build(texts, ids, analysis)))
            analysed = len(ids)
        mode = "delta"
    else:
        for ids, texts in text_blocks():
            segs.append(_persist(kdir, Segment.build(texts, ids, analysis)))  # written now: RAM holds one
            analysed += len(ids)
        mode = "full"
    all_ids = np.sort(np.concatenate([s.ids for _, s, _ in segs])) if segs else np.empty(0, np.int64)
    dead = np.setdiff1d(all_ids, live, assume_unique=True)
    segs, merged = _merge_policy(segs, dead, kdir)
    kept_ids = np.concatenate([s.ids for _, s, _ in segs]) if segs else np.empty(0, np.int64)
    dead = dead[np.isin(dead, kept_ids)]
    out = []
    n_live = sum_dl = 0
    for name, seg, fresh in segs:
        folder = kdir / name
        if not fresh:  # the last generation's: the same files
            folder.mkdir()
            for f in SEG_FILES:
                link_or_copy(base_dir / KEYWORD_DIR / name / f"{f}.npy", folder / f"{f}.npy")  # type: ignore[operator]
        dead_rows = np.flatnonzero(np.isin(seg.ids, dead, assume_unique=True))
        if len(dead_rows):
            np.save(kdir / f"{name}.df.npy", seg.df_without(dead_rows).astype(np.int64), allow_pickle=False)
        live_rows = seg.n - len(dead_rows)
        seg_dl = int(np.asarray(seg.dl, dtype=np.int64).sum()) - int(np.asarray(seg.dl)[dead_rows].sum())
        n_live += live_rows
        sum_dl += seg_dl
        out.append({"name": name, "docs": seg.n, "deleted": int(len(dead_rows))})
    np.save(kdir / "deleted.npy", dead.astype(np.int64), allow_pickle=False)
    entry = {"kind": "segments", "ntotal": int(n_live), "sum_dl": int(sum_dl), "segments": out,
            "deleted": int(len(dead)), "analysis": analysis.as_dict(), "k1": K1, "b": B, "build": mode,
            "analysed": int(analysed), "merged": merged, "build_seconds": round(time.perf_counter() - t0, 3)}
    (kdir / "index.json").write_text(json.dumps(entry, indent=1, sort_keys=True))
    return entry


def _persist(kdir: Path, seg: Segment) -> tuple[str, Segment, bool]:
    """Write a new segment into ``kdir`` and hold it memory-mapped from there."""
    name = _new_segment_name()
    seg.save(kdir / name)
    return name, Segment.load(kdir / name), True


def _merge_policy(segs: list[tuple[str, Segment, bool]], dead: np.ndarray,
                  kdir: Path) -> tuple[list[tuple[str, Segment, bool]], int]:
    """Rewrite mostly-dead segments; while more than MAX_SEGMENTS are smaller than SEGMENT_DOCS, join the
    MERGE_FACTOR smallest (full-size segments are left alone: a merge costs what it joins)."""
    merged = 0
    out = []

    def drop(name: str, fresh: bool) -> None:
        if fresh:  # written by this build and merged away
            shutil.rmtree(kdir / name, ignore_errors=True)

    for name, seg, fresh in segs:
        n_dead = int(np.isin(seg.ids, dead).sum()) if len(dead) else 0
        if n_dead == seg.n:
            merged += 1
            drop(name, fresh)
            continue  # nothing live left
        if n_dead > MAX_DEAD * seg.n:
            out.append(_persist(kdir, merge_segments([seg], dead)))
            drop(name, fresh)
            merged += 1
        else:
            out.append((name, seg, fresh))
    while True:
        small = sorted((t for t in out if t[1].n < SEGMENT_DOCS), key=lambda t: t[1].n)
        if len(small) <= MAX_SEGMENTS:
            break
        join = small[:MERGE_FACTOR]
        names = {t[0] for t in join}
        new = _persist(kdir, merge_segments([t[1] for t in join], dead))
        for t in join:
            drop(t[0], t[2])
        out = [t for t in out if t[0] not in names] + [new]
        merged += len(join)
    out.sort(key=lambda t: int(t[1].ids[0]) if t[1].n else 0)
    return out, merged


def build_keyword_index(texts: Sequence[str], ids: np.ndarray, out_dir: Path, analysis: Analysis) -> dict[str, Any]:
    """A fresh keyword index of ``texts`` (chunk i has global id ids[i]) in out_dir/keyword."""
    if len(texts) != len(ids):
        raise ValueError(f"{len(texts)} texts but {len(ids)} ids")
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    ids_s, texts_s = ids[order], [texts[i] for i in order]

    def blocks() -> Iterator[tuple[np.ndarray, list[str]]]:
        for i0 in range(0, len(ids_s), SEGMENT_DOCS):
            yield ids_s[i0:i0 + SEGMENT_DOCS], texts_s[i0:i0 + SEGMENT_DOCS]

    return write_keyword(out_dir, analysis, live=ids_s, texts_for=lambda _: (ids_s[:0], []), text_blocks=blocks)


class KeywordIndex:
    """The keyword index of one generation, memory-mapped; ``search`` is read-only and thread-safe."""

    def __init__(self, gen_dir: Path, analysis: Analysis, entry: Optional[dict[str, Any]] = None) -> None:
        from shoal.index.errors import CorruptFileError

        self.analysis = analysis
        kdir = gen_dir / KEYWORD_DIR
        if entry is None:
            entry = json.loads((kdir / "index.json").read_text())
        self.segments: list[Segment] = []
        self.dfs: list[np.ndarray] = []
        self.live: list[Optional[np.ndarray]] = []
        try:
            dead = np.load(kdir / "deleted.npy", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise CorruptFileError(f"keyword file {kdir / 'deleted.npy'} is damaged or missing: {e}") from e
        for s in entry["segments"]:
            seg = Segment.load(kdir / s["name"])
            self.segments.append(seg)
            if s.get("deleted"):
                self.dfs.append(np.load(kdir / f"{s['name']}.df.npy", mmap_mode="r", allow_pickle=False))
                self.live.append(~np.isin(seg.ids, dead, assume_unique=True))
            else:
                self.dfs.append(np.diff(seg.indptr))
                self.live.append(None)
        self.n = int(entry["ntotal"])
        self.avgdl = float(entry["sum_dl"]) / self.n if self.n else 1.0
        self.k1, self.b = float(entry.get("k1", K1)), float(entry.get("b", B))

    @staticmethod
    def exists(gen_dir: Path) -> bool:
        return (gen_dir / KEYWORD_DIR / "index.json").is_file() or (gen_dir / layout.BM25_IDS).is_file()

    @classmethod
    def open(cls, gen_dir: Path, manifest: dict[str, Any]) -> Optional[Any]:
        """The generation's keyword index with the analysis it was built with; None if it has none."""
        entry = manifest.get("keyword") or {}
        analysis = Analysis.from_manifest(manifest)
        if entry.get("kind") == "segments":
            return cls(gen_dir, analysis, entry)
        if (gen_dir / layout.BM25_IDS).is_file():  # a generation written by an older shoal
            return Bm25sIndex(gen_dir, analysis)
        return None

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """D (BM25 scores), I (chunk ids) of size (nq, k); missing hits are (0, -1)."""
        nq = len(queries)
        D = np.zeros((nq, k), np.float32)
        I = np.full((nq, k), -1, np.int64)
        if k == 0 or self.n == 0 or nq == 0:
            return D, I
        per_q, _ = analyse(queries, self.analysis)
        for qi, qh in enumerate(per_q):
            if not len(qh):
                continue
            found = []
            df = np.zeros(len(qh), np.int64)
            for seg, sdf in zip(self.segments, self.dfs):
                pos = np.searchsorted(seg.terms, qh)
                pos = np.minimum(pos, max(len(seg.terms) - 1, 0))
                ok = (seg.terms[pos] == qh) if len(seg.terms) else np.zeros(len(qh), bool)
                found.append((pos, ok))
                df += np.where(ok, np.asarray(sdf)[pos] if len(seg.terms) else 0, 0)
            idf = np.log(1.0 + (self.n - df + 0.5) / (df + 0.5))
            scores, ids = [], []
            for seg, live, (pos, ok) in zip(self.segments, self.live, found):
                rows_l, w_l = [], []
                for j in np.flatnonzero(ok & (df > 0)):
                    a, b = int(seg.indptr[pos[j]]), int(seg.indptr[pos[j] + 1])
                    rows = np.asarray(seg.docs[a:b])
                    tf = np.asarray(seg.tfs[a:b], dtype=np.float32)
                    norm = self.k1 * (1 - self.b + self.b * np.asarray(seg.dl[rows], dtype=np.float32) / self.avgdl)
                    rows_l.append(rows)
                    w_l.append(idf[j] * tf / (tf + norm))
                if not rows_l:
                    continue
                rows = np.concatenate(rows_l)
                if len(rows) * 8 < seg.n:  # few postings: sort them
                    cand, inv = np.unique(rows, return_inverse=True)
                    sc = np.bincount(inv, weights=np.concatenate(w_l))
                else:  # many: one dense pass over the segment's docs
                    dense = np.bincount(rows, weights=np.concatenate(w_l), minlength=seg.n)
                    cand = np.flatnonzero(dense)
                    sc = dense[cand]
                if live is not None:
                    keep = live[cand]
                    cand, sc = cand[keep], sc[keep]
                if len(sc) > k:
                    top = np.argpartition(-sc, k - 1)[:k]
                    cand, sc = cand[top], sc[top]
                scores.append(sc)
                ids.append(np.asarray(seg.ids)[cand])
            if not scores:
                continue
            sc, ii = np.concatenate(scores), np.concatenate(ids)
            order = np.lexsort((ii, -sc))[:k]
            D[qi, :len(order)] = sc[order]
            I[qi, :len(order)] = ii[order]
        return D, I


class Bm25sIndex:
    """A keyword index written by shoal before segments (one bm25s index per generation); read only."""

    def __init__(self, gen_dir: Path, analysis: Analysis) -> None:
        import bm25s

        self.analysis = analysis
        self.retriever = bm25s.BM25.load(str(gen_dir / layout.BM25), allow_pickle=False, show_progress=False,
                                         verbosity=0)
        self.ids = np.load(gen_dir / layout.BM25_IDS, allow_pickle=False)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        nq = len(queries)
        D = np.zeros((nq, k), np.float32)
        I = np.full((nq, k), -1, np.int64)
        kk = min(k, len(self.ids))
        if kk == 0:
            return D, I
        docs, scores = self.retriever.retrieve(_tokenize(queries, self.analysis), k=kk, show_progress=False,
                                               n_threads=1)
        ids = self.ids[docs]
        ok = (scores > 0) & (ids >= 0)  # a chunk sharing no term with the query is not a keyword hit
        I[:, :kk] = np.where(ok, ids, -1)
        D[:, :kk] = np.where(ok, scores, 0)
        return D, I
