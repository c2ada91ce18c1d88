"""Ray actors around the plain embedding functions."""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np
import ray

from shoal.workers.embed import encode, load_model

log = logging.getLogger(__name__)


def card_slug(name: str) -> str:
    """A short card name for labels: "NVIDIA GeForce RTX 4080" -> "rtx4080", "Quadro P4000" -> "p4000"."""
    words = [w for w in name.lower().split() if w not in ("nvidia", "geforce", "quadro", "tesla", "corporation")]
    return "".join(c for c in "".join(words) if c.isalnum()) or "gpu"


@ray.remote(max_restarts=3, max_task_retries=0)  # a failed batch is resubmitted by the pool, to a live actor
class EmbedActor:
    """Holds one model on one device (the GPU Ray assigned, or the CPU).

    Named ``shoal-embed-<device><slot>-run<run>`` by the pool; its ``repr`` (the
    dashboard's Repr column) and its metric labels say which card it got.
    """

    def __init__(self, model_name: str, device: str, max_seq_length: int, batch_size: int,
                 threads: int, allow_download: bool, run: str = "", job: str = "") -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        self.cuda_visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        self.gpu_ids = ray.get_gpu_ids()
        self.lm = load_model(model_name, device=device, max_seq_length=max_seq_length,
                             threads=threads, allow_download=allow_download)
        self.batch_size = batch_size
        if self.lm.device == "cuda":  # per-device batch: the 16 GB card takes twice the 8 GB card's
            import torch

            mem = torch.cuda.get_device_properties(0).total_memory
            self.batch_size = max(16, int(batch_size * mem / (16 << 30)))
            log.info("GPU %s with %.1f GB: batch size %d", torch.cuda.get_device_name(0), mem / 1e9, self.batch_size)
        if self.lm.device == "cuda":
            import torch

            self.card = card_slug(torch.cuda.get_device_name(0))
            self.tag = f"gpu{','.join(str(g) for g in self.gpu_ids)}-{self.card}"
        else:
            self.card = "cpu"
            self.tag = f"cpu-{os.getpid()}"
        self.run, self.job = run, job
        self.busy_s, self.embedded = 0.0, 0  # seconds spent embedding, chunks embedded
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
            "gpu_ids": [str(g) for g in self.gpu_ids],
            "cuda_visible_devices": self.cuda_visible,
            "model": self.lm.name,
            "fingerprint": self.lm.fingerprint,
            "dim": self.lm.dim,
            "max_seq_length": self.lm.max_seq_length,
            "batch_size": self.batch_size,
            "node_ip": ray.util.get_node_ip_address(),
        }

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> (n, d) float32, L2-normalised."""
        import time

        from shoal.workers.metrics import ingest_metrics

        t0 = time.perf_counter()
        xb = encode(texts, self.lm, self.batch_size)
        dt = time.perf_counter() - t0
        self.busy_s += dt
        self.embedded += len(texts)
        m, tags = ingest_metrics(), {"actor": self.tag, "card": self.card, "job": self.job, "run": self.run}
        m.chunks_embedded.inc(len(texts), tags=tags)
        m.batch_latency_s.observe(dt, tags=tags)
        m.actor_chunks_per_s.set(len(texts) / dt if dt > 0 else 0.0, tags=tags)
        return xb

    def stats(self) -> dict[str, Any]:
        """Seconds spent embedding and chunks embedded since the actor started."""
        return {"busy_s": round(self.busy_s, 3), "embedded": self.embedded}
