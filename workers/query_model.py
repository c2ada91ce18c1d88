"""The query encoder: the model exported to ONNX and run by ONNX Runtime on the CPU, or PyTorch.

One query is a small forward pass whose time on a CPU is mostly per-operator
dispatch: ONNX Runtime runs the same graph 2.7x faster than eager PyTorch here
(8.7 against 24.9 ms p50 for a Cranfield query on 2 cores; torch.compile gave
20 ms after a 47 s compile). The export (mean pooling and normalisation
included) is cached per model fingerprint in ``$XDG_CACHE_HOME/shoal/onnx``;
at load its vectors are compared with PyTorch's on fixed passages and below a
cosine of 0.9999 the encoder stays on PyTorch and says so.

A load that passed the check leaves a *query card* beside the export, filed under
the model directory's file names, sizes and modification times and the versions
of torch, transformers, tokenizers and onnxruntime: the fingerprint, the
dimension, the pad id and the check's cosine. While the directory and those
versions are unchanged, a CPU process loads its query encoder from the card
alone: ``tokenizers`` and ONNX Runtime, no torch, no transformers, no hashing of
the weights (a cold ``shoal query`` in 2 s instead of 15; an Ingress replica
without PyTorch in its memory). Anything else (a hub name, a card that is
missing or does not match, a visible card) takes the full load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np

from shoal.index.errors import ShoalError
from shoal.workers.embed import (LoadedModel, cuda_absent, encode, is_null_model, load_model, probe_texts, resolve_model_path,
                                 token_batches, tokenize)

log = logging.getLogger(__name__)

Runtime = Literal["auto", "onnx", "torch"]
MIN_COSINE = 0.9999  # the exported graph must give PyTorch's vectors
MAX_ROWS = 64  # queries per ONNX Runtime call
_CHECKED: dict[Path, float] = {}  # exports whose vectors were compared with PyTorch's in this process


def onnx_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shoal" / "onnx"


class QueryModel:
    """Embeds queries -> (n, d) float32, L2-normalised: the vectors of :func:`shoal.workers.embed.encode`."""

    def __init__(self, lm: LoadedModel, session: Any = None, lone: Any = None) -> None:
        """``session`` runs batches; ``lone`` (if any) a single query: its threads spin-wait for the next
        operator instead of sleeping (2 ms less for one query here), which under load would take the cores
        the rest of the request needs."""
        self.lm, self.session, self.lone = lm, session, lone
        self.runtime = "onnx" if session is not None else "torch"

    @property
    def name(self) -> str:
        return self.lm.name

    @property
    def fingerprint(self) -> str:
        return self.lm.fingerprint

    @property
    def dim(self) -> int:
        return self.lm.dim

    @property
    def device(self) -> str:
        return self.lm.device

    def encode(self, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        if self.session is None or not texts:
            return encode(list(texts), self.lm, batch_size)
        batch = tokenize(list(texts), self.lm)
        order = np.argsort(-batch.lengths, kind="stable")
        off, out = batch.offsets, np.empty((len(texts), self.lm.dim), dtype=np.float32)
        for i0, i1 in token_batches(batch.lengths[order], None, MAX_ROWS):
            rows = order[i0:i1]
            width = int(batch.lengths[rows[0]])
            ids = np.full((len(rows), width), self.lm.pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                ids[r, :off[i + 1] - off[i]] = batch.ids[off[i]:off[i + 1]]
                mask[r, :off[i + 1] - off[i]] = 1
            sess = self.lone if self.lone is not None and len(texts) == 1 else self.session
            out[rows] = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        return out


def load_query_model(name: str, *, max_seq_length: int = 256, allow_download: bool = False, threads: int = 0,
                     runtime: Runtime = "auto", device: str = "cpu", lm: Optional[LoadedModel] = None) -> QueryModel:
    """The model for queries: ONNX Runtime on the CPU where ``runtime`` allows and onnxruntime imports
    (auto), else PyTorch (a card, the null embedder, or an export that fails its check)."""
    if lm is None:
        carded = _from_card(name, max_seq_length, threads, runtime, device)
        if carded is not None:
            return carded
        lm = load_model(name, device=device, max_seq_length=max_seq_length, allow_download=allow_download,
                        threads=threads)
    if runtime == "torch" or lm.is_null or lm.device != "cpu":
        return QueryModel(lm)
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        if runtime == "onnx":
            from shoal.index.errors import ShoalError

            raise ShoalError("model.query_runtime onnx needs onnxruntime: pip install onnxruntime onnx") from e
        return QueryModel(lm)
    try:
        session, lone = _session(export_onnx(lm), threads, spin=False), _session(export_onnx(lm), threads, spin=True)
    except Exception as e:  # noqa: BLE001 - an architecture the exporter cannot take: PyTorch serves
        log.warning("model %s: no ONNX export (%s: %s); queries run on PyTorch", lm.name, type(e).__name__,
                    str(e)[:200])
        return QueryModel(lm)
    qm = QueryModel(lm, session, lone)
    path = export_onnx(lm)
    if path not in _CHECKED:
        texts = probe_texts()
        _CHECKED[path] = float((qm.encode(texts) * encode(texts, lm, 16)).sum(1).min())
    cos = _CHECKED[path]
    if cos < MIN_COSINE:
        log.warning("model %s: the ONNX export's vectors are %.6f from PyTorch's (below %g): queries run on "
                    "PyTorch", lm.name, cos, MIN_COSINE)
        return QueryModel(lm)
    log.info("queries for %s run on ONNX Runtime (min cosine to PyTorch %.7f)", lm.name, cos)
    _write_card(lm, path, cos)
    return qm


# -- the query card: a checked export loaded without torch ---------------------------------------------
CARD_VERSION = 1
MAX_DIR_FILES = 2000  # a model directory with more is not listed at every load: it takes the full load


def cards_dir() -> Path:
    return onnx_cache_dir() / "cards"


def model_dir_key(path: str) -> Optional[str]:
    """What a model directory's card is filed under: its absolute path, each file's name, size and
    modification time, and the versions of what computes the fingerprint, tokenizes and runs the graph.
    None for a hub name or a directory too big to list at every load."""
    root = Path(path)
    if not root.is_dir():
        return None
    files = []
    for i, f in enumerate(sorted(root.rglob("*"))):
        if i >= MAX_DIR_FILES:
            return None
        if f.is_file():
            st = f.stat()
            files.append((f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    versions = {m: _version(m) for m in ("torch", "transformers", "tokenizers", "onnxruntime")}
    blob = json.dumps({"card": CARD_VERSION, "path": str(root.resolve()), "files": files, "versions": versions})
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def _write_card(lm: LoadedModel, onnx: Path, cos: float) -> None:
    """File the card of a model whose export passed its check, if its directory can be keyed and
    ``tokenizers`` alone gives its tokenizer's ids (else the next load is a full one again)."""
    key = model_dir_key(lm.path)
    if key is None or not direct_tokenizer_agrees(lm):
        return
    st = onnx.stat()
    card = {"card": CARD_VERSION, "name": lm.name, "path": lm.path, "fingerprint": lm.fingerprint, "dim": lm.dim,
            "max_position_embeddings": int(getattr(lm.model.config, "max_position_embeddings", lm.max_seq_length)),
            "pad_id": lm.pad_id, "onnx": onnx.name, "onnx_size": st.st_size, "onnx_mtime_ns": st.st_mtime_ns,
            "min_cosine": cos}
    target = cards_dir() / f"{key}.json"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(card, indent=1), encoding="utf-8")
        os.replace(tmp, target)
    except OSError as e:  # a read-only cache: every load is a full one, nothing else changes
        log.info("cannot write the query card %s: %s", target, e)


def read_card(path: str) -> Optional[dict[str, Any]]:
    """The card of this model directory, if there is one and its export is the one it was checked with."""
    key = model_dir_key(path)
    if key is None:
        return None
    try:
        card = json.loads((cards_dir() / f"{key}.json").read_text(encoding="utf-8"))
        st = (onnx_cache_dir() / card["onnx"]).stat()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if card.get("card") != CARD_VERSION or (st.st_size, st.st_mtime_ns) != (card["onnx_size"], card["onnx_mtime_ns"]):
        return None
    return card if card["min_cosine"] >= MIN_COSINE else None


def _from_card(name: str, max_seq_length: int, threads: int, runtime: Runtime, device: str) -> Optional[QueryModel]:
    """The query encoder from its card, on the CPU, without torch; None where the full load must run."""
    if runtime == "torch" or is_null_model(name) or not (device == "cpu" or (device == "auto" and cuda_absent())):
        return None
    try:
        path = resolve_model_path(name)
        card = read_card(path)
        if card is None:
            return None
        import onnxruntime  # noqa: F401

        tok = DirectTokenizer(path, card["pad_id"])
        onnx = onnx_cache_dir() / card["onnx"]
        lm = LoadedModel(name, path, tok, None, "cpu", min(max_seq_length, int(card["max_position_embeddings"])),
                         int(card["dim"]), str(card["fingerprint"]))
        qm = QueryModel(lm, _session(onnx, threads, spin=False), _session(onnx, threads, spin=True))
    except (ShoalError, ImportError, OSError, ValueError, KeyError, RuntimeError) as e:
        log.info("model %s: no query card load (%s: %s); loading it in full", name, type(e).__name__, str(e)[:200])
        return None
    log.info("queries for %s run on ONNX Runtime, loaded from its card (checked at min cosine %.7f)", name,
             card["min_cosine"])
    return qm


class DirectTokenizer:
    """A model directory's ``tokenizer.json`` run by ``tokenizers`` itself: the ids transformers' fast
    tokenizer gives (``truncation=True, max_length=n``, special tokens added, no padding), without
    importing transformers (which imports torch). Only used where :func:`direct_tokenizer_agrees`."""

    def __init__(self, path: str, pad_token_id: Optional[int]) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
        self.tok.no_padding()
        self.pad_token_id = pad_token_id
        self._max_length: Optional[int] = None

    def __call__(self, texts: Sequence[str], truncation: bool = True, max_length: Optional[int] = None,
                 verbose: bool = False) -> dict[str, list[list[int]]]:
        if max_length != self._max_length:
            if truncation and max_length:
                self.tok.enable_truncation(max_length, stride=0, strategy="longest_first", direction="right")
            else:
                self.tok.no_truncation()
            self._max_length = max_length
        return {"input_ids": [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=True)]}


def tokenizer_probe(max_length: int) -> list[str]:
    """Texts the two tokenizers must agree on: the probe passages, the empty string, odd spacing and
    scripts, accents and case, and one text far past ``max_length`` (the cut)."""
    return probe_texts() + ["", "   ", "a", "Naïve CAFÉ façade — résumé", "tab\there\nnew line\r\n end",
                            "[CLS] [SEP] [PAD] <s> </s> [MASK]", "x" * 3000, "word " * (max_length * 2)]


def direct_tokenizer_agrees(lm: LoadedModel) -> bool:
    """``tokenizers`` alone gives ``lm``'s tokenizer's ids on :func:`tokenizer_probe`."""
    if not (Path(lm.path) / "tokenizer.json").is_file():
        return False
    try:
        direct = DirectTokenizer(lm.path, lm.pad_id)
    except Exception as e:  # noqa: BLE001 - a tokenizer.json this version cannot read: full loads it is
        log.info("model %s: tokenizer.json does not load on its own (%s)", lm.name, e)
        return False
    texts, n = tokenizer_probe(lm.max_seq_length), lm.max_seq_length
    want = lm.tokenizer(texts, truncation=True, max_length=n, verbose=False)["input_ids"]
    return [list(r) for r in want] == direct(texts, truncation=True, max_length=n)["input_ids"]


def export_onnx(lm: LoadedModel, cache: Optional[Path] = None) -> Path:
    """The model, mean pooling and normalisation as one ONNX graph (dynamic batch and length), exported
    once per fingerprint and kept in ``cache``; written to a temporary name, then renamed."""
    import torch

    cache = cache or onnx_cache_dir()
    path = cache / f"{lm.fingerprint.replace(':', '-')}.onnx"
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)

    class Pooled(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            from shoal.workers.embed import mean_pool

            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return torch.nn.functional.normalize(mean_pool(hidden, attention_mask), p=2, dim=1)

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    example = torch.ones((1, 8), dtype=torch.long)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Pooled(lm.model).eval(), (example, example), str(tmp),
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                        "attention_mask": {0: "batch", 1: "tokens"}, "embedding": {0: "batch"}},
                          opset_version=17, dynamo=False)
    os.replace(tmp, path)
    log.info("exported %s to %s", lm.name, path)
    return path


def _session(path: Path, threads: int, spin: bool) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads if threads > 0 else min(4, os.cpu_count() or 1)  # one query: 2-4 threads do it
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
