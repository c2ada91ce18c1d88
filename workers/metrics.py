"""shoal's own Ray metrics (Prometheus via the Ray metrics agent, shown in the dashboard).

Created on first use in each process (driver or actor), never at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60]


@dataclass(frozen=True)
class IngestMetrics:
    files_scanned: Any
    files_skipped: Any
    bytes_read: Any
    chunks_embedded: Any
    batch_latency_s: Any
    actor_chunks_per_s: Any


@lru_cache(maxsize=1)
def ingest_metrics() -> IngestMetrics:
    from ray.util.metrics import Counter, Gauge, Histogram

    return IngestMetrics(
        files_scanned=Counter("shoal_files_scanned", "Files seen by the ingest scan"),
        files_skipped=Counter("shoal_files_skipped", "Files skipped, by reason", tag_keys=("reason",)),
        bytes_read=Counter("shoal_bytes_read", "Bytes of files read for chunking"),
        chunks_embedded=Counter("shoal_chunks_embedded", "Chunks embedded, by actor", tag_keys=("actor",)),
        batch_latency_s=Histogram("shoal_embed_batch_latency_s", "Seconds to embed one batch",
                                  boundaries=LATENCY_BOUNDARIES_S, tag_keys=("actor",)),
        actor_chunks_per_s=Gauge("shoal_actor_chunks_per_s", "Chunks/s of an embedding actor's last batch",
                                 tag_keys=("actor",)),
    )
