"""shoal's own Ray metrics (Prometheus via the Ray metrics agent, shown in the dashboard).

Created on first use in each process (driver or actor), never at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60]
# job: the Ray job id of the ingest driver; run: the catalog's ingest run; card: "rtx4080", "p4000", "cpu"
ACTOR_TAGS = ("actor", "card", "job", "run")


@dataclass(frozen=True)
class IngestMetrics:
    files_scanned: Any
    files_skipped: Any
    bytes_read: Any
    chunks_embedded: Any
    batch_latency_s: Any
    actor_chunks_per_s: Any
    inflight_batches: Any


@lru_cache(maxsize=1)
def ingest_metrics() -> IngestMetrics:
    from ray.util.metrics import Counter, Gauge, Histogram

    return IngestMetrics(
        files_scanned=Counter("shoal_files_scanned", "Files seen by the ingest scan"),
        files_skipped=Counter("shoal_files_skipped", "Files skipped, by reason", tag_keys=("reason",)),
        bytes_read=Counter("shoal_bytes_read", "Bytes of files read for chunking"),
        chunks_embedded=Counter("shoal_chunks_embedded", "Chunks embedded, by actor",
                                tag_keys=ACTOR_TAGS),
        batch_latency_s=Histogram("shoal_embed_batch_latency_s", "Seconds to embed one batch",
                                  boundaries=LATENCY_BOUNDARIES_S, tag_keys=ACTOR_TAGS),
        actor_chunks_per_s=Gauge("shoal_actor_chunks_per_s", "Chunks/s of an embedding actor's last batch",
                                 tag_keys=ACTOR_TAGS),
        inflight_batches=Gauge("shoal_ingest_inflight_batches",
                               "Batches submitted to the embedding actors and not yet committed",
                               tag_keys=("job", "run")),
    )
