"""Ray actors around the plain embedding functions."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Sequence

import numpy as np
import ray

from shoal.workers.embed import EmbedSpec, EncodeTimes, TokenBatch, encode, encode_ids, gpu_dtype_for, load_model, \
    settle_dtype

log = logging.getLogger(__name__)

TOKENS_PER_GIB = 4096  # embed.gpu_batch_tokens: 0 gives this many padded tokens per GiB of the card's memory
MAX_AUTO_TOKENS = 262_144  # ... at most (an H200's 141 GB would give 577k: past that batches buy nothing)


def card_slug(name: str) -> str:
    """A short card name for labels: "NVIDIA GeForce RTX 4080" -> "rtx4080", "Quadro P4000" -> "p4000"."""
    words = [w for w in name.lower().split() if w not in ("nvidia", "geforce", "quadro", "tesla", "corporation")]
    return "".join(c for c in "".join(words) if c.isalnum()) or "gpu"


def batch_tokens_for(memory_bytes: int, configured: int = 0) -> int:
    """Padded tokens per forward pass on a card: the configured number, or TOKENS_PER_GIB per GiB of its
    memory (the 16 GB card takes twice the 8 GB one's), between 8,192 and MAX_AUTO_TOKENS."""
    if configured > 0:
        return configured
    return int(min(MAX_AUTO_TOKENS, max(8192, TOKENS_PER_GIB * memory_bytes / (1 << 30))))


@ray.remote(max_restarts=3, max_task_retries=0)  # a failed batch is resubmitted by the pool, to a live actor
class EmbedActor:
    """Holds one model on one device (the GPU Ray assigned, or the CPU).

    Named ``shoal-embed-<device><slot>-run<run>`` by the pool; its ``repr`` (the
    dashboard's Repr column) and its metric labels say which card it got. On a
    card the model runs in ``embed.gpu_dtype`` once it passes the dtype check
    (:func:`settle_dtype`), in batches of ``embed.gpu_batch_tokens`` padded tokens.
    """

    def __init__(self, spec: EmbedSpec, run: str = "", job: str = "") -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        self.cuda_visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        self.gpu_ids = ray.get_gpu_ids()
        self.lm = load_model(spec.model, device=spec.device, max_seq_length=spec.max_seq_length,
                             threads=spec.threads, allow_download=spec.allow_download)
        self.batch_size, self.batch_tokens = spec.batch_size, None
        self.dtype_check: dict[str, Any] = {}
        if self.lm.device == "cuda":
            import torch

            props = torch.cuda.get_device_properties(0)
            self.card = card_slug(props.name)
            self.tag = f"gpu{','.join(str(g) for g in self.gpu_ids)}-{self.card}"
            self.batch_size, self.batch_tokens = spec.gpu_batch_size, batch_tokens_for(props.total_memory,
                                                                                      spec.gpu_batch_tokens)
            check = settle_dtype(self.lm, gpu_dtype_for(spec.gpu_dtype, (props.major, props.minor)),
                                 spec.gpu_min_cosine)
            self.dtype_check = {"requested": check.requested, "min_cosine": round(check.min_cosine, 6),
                                "fell_back": check.fell_back}
            log.info("GPU %s (%.1f GB, sm_%d%d): %s, batches of %d tokens / %d texts", props.name,
                     props.total_memory / 1e9, props.major, props.minor, self.lm.dtype, self.batch_tokens,
                     self.batch_size)
        else:
            self.card = "cpu"
            self.tag = f"cpu-{os.getpid()}"
        self.run, self.job = run, job
        self.busy_s, self.embedded = 0.0, 0  # seconds spent embedding, chunks embedded
        self.times = EncodeTimes()
        self._lock = threading.Lock()  # a GPU actor runs two calls at once (the next batch is padded meanwhile)
        if self.gpu_ids and self.lm.device == "cpu":
            log.warning("Ray assigned GPU %s (CUDA_VISIBLE_DEVICES=%s) but no card answers; embedding on the CPU",
                        self.gpu_ids, self.cuda_visible)
        log.info("embed actor pid %d: device %s, Ray GPUs %s, CUDA_VISIBLE_DEVICES=%r",
                 os.getpid(), self.lm.device, self.gpu_ids, self.cuda_visible)

    def __repr__(self) -> str:
        return f"shoal-embed-{self.tag} (run {self.run})"

    def info(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "card": self.card,
            "pid": os.getpid(),
            "device": self.lm.device,
            "dtype": self.lm.dtype,
            "dtype_check": self.dtype_check,
            "gpu_ids": [str(g) for g in self.gpu_ids],
            "cuda_visible_devices": self.cuda_visible,
            "model": self.lm.name,
            "fingerprint": self.lm.fingerprint,
            "dim": self.lm.dim,
            "max_seq_length": self.lm.max_seq_length,
            "batch_size": self.batch_size,
            "batch_tokens": self.batch_tokens,
            "node_ip": ray.util.get_node_ip_address(),
        }

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> (n, d) float32, L2-normalised (tokenized here: for callers that have only text)."""
        return self._timed(len(texts), lambda t: encode(texts, self.lm, self.batch_size,
                                                        max_tokens=self.batch_tokens, times=t))

    def embed_tokens(self, batch: TokenBatch) -> np.ndarray:
        """Rows of input ids (what the readers made) -> (n, d) float32, L2-normalised; no tokenizing."""
        return self._timed(len(batch), lambda t: encode_ids(batch, self.lm, self.batch_size,
                                                            max_tokens=self.batch_tokens, times=t))

    def _timed(self, n: int, run: Any) -> np.ndarray:
        import time

        from shoal.workers.metrics import ingest_metrics

        t0 = time.perf_counter()
        times = EncodeTimes()
        xb = run(times)
        dt = time.perf_counter() - t0
        with self._lock:
            self.busy_s += dt
            self.embedded += n
            for k in ("prep_cpu_s", "forward_s", "rows", "batches"):
                setattr(self.times, k, getattr(self.times, k) + getattr(times, k))
        m, tags = ingest_metrics(), {"actor": self.tag, "card": self.card, "job": self.job, "run": self.run}
        m.chunks_embedded.inc(n, tags=tags)
        m.batch_latency_s.observe(dt, tags=tags)
        m.actor_chunks_per_s.set(n / dt if dt > 0 else 0.0, tags=tags)
        return xb

    def stats(self) -> dict[str, Any]:
        """Seconds spent embedding, chunks embedded, and the CPU seconds outside the forward pass, since
        the actor started."""
        with self._lock:
            return {"busy_s": round(self.busy_s, 3), "embedded": self.embedded,
                    "prep_cpu_s": round(self.times.prep_cpu_s, 4), "forward_s": round(self.times.forward_s, 3),
                    "forward_batches": self.times.batches}


def actor_options(gpu: bool) -> dict[str, Any]:
    """A card's actor takes two calls at once: while the card runs one, the other pads its next batch."""
    return {"max_concurrency": 2} if gpu else {}


