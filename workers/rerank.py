"""Re-ranking with a cross-encoder: (query, passage) pairs scored jointly.

A bi-encoder re-scoring its own candidates adds no information (on Cranfield it
cost 0.0125 nDCG@10), so re-ranking needs a real cross-encoder: any Hugging Face
``AutoModelForSequenceClassification`` directory (e.g. cross-encoder/ms-marco-MiniLM-L-6-v2)
named by ``serve.rerank_model``. Without one, re-ranking is off.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from shoal.index.errors import ShoalError

log = logging.getLogger(__name__)

RERANK_OFF = ("re-ranking is off: set serve.rerank_model to a cross-encoder directory "
              "(an AutoModelForSequenceClassification, e.g. cross-encoder/ms-marco-MiniLM-L-6-v2)")


class CrossEncoder:
    """Loads a sequence-classification model once; ``score(query, texts)`` -> one float per text."""

    def __init__(self, name: str, *, allow_download: bool = False, device: str = "auto",
                 max_length: int = 512) -> None:
        from pathlib import Path

        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from shoal.workers.embed import pick_device, resolve_model_path

        path = resolve_model_path(name)
        local = Path(path).is_dir() or not allow_download
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=local)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=local)
        except OSError as e:
            raise ShoalError(f"cannot load the cross-encoder {name!r} from {path}: {e}") from e
        self.device = pick_device(device)
        self.model.eval().to(self.device)
        self.name, self.max_length = name, max_length
        log.info("cross-encoder %s on %s", name, self.device)

    def score(self, query: str, texts: Sequence[str], batch_size: int = 32) -> list[float]:
        """Relevance of each text to ``query``, higher is better (the first logit)."""
        import torch

        out: list[float] = []
        with torch.inference_mode():
            for i0 in range(0, len(texts), batch_size):
                part = list(texts[i0:i0 + batch_size])
                enc = self.tok([query] * len(part), part, padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt").to(self.device)
                logits = self.model(**enc).logits
                out += (logits[:, 0] if logits.ndim == 2 else logits).float().cpu().tolist()
        return out


def rerank_order(scores: Sequence[float]) -> list[int]:
    """Positions of the re-scored head, best first (ties keep the first-stage order)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def load_reranker(cfg: Any) -> CrossEncoder:
    if not cfg.serve.rerank_model:
        raise ShoalError(RERANK_OFF)
    return CrossEncoder(cfg.serve.rerank_model, allow_download=cfg.model.allow_download, device=cfg.model.device)
