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


@dataclass(frozen=True)
class WatchMetrics:
    updates: Any
    files_per_update: Any
    freshness_s: Any
    queue: Any


FRESHNESS_BOUNDARIES_S = [0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300]
FILES_BOUNDARIES = [1, 2, 5, 10, 50, 100, 500, 1000, 10000]


@lru_cache(maxsize=1)
def watch_metrics() -> WatchMetrics:
    """`shoal ingest --watch`: ray_shoal_watch_* in Prometheus."""
    from ray.util.metrics import Counter, Gauge, Histogram

    return WatchMetrics(
        updates=Counter("shoal_watch_updates", "Updates the watcher made (one delta generation each)"),
        files_per_update=Histogram("shoal_watch_files_per_update", "Files new, changed or deleted per update",
                                   boundaries=FILES_BOUNDARIES),
        freshness_s=Histogram("shoal_watch_freshness_s", "Seconds from an update's first change to its generation",
                              boundaries=FRESHNESS_BOUNDARIES_S),
        queue=Gauge("shoal_watch_queue", "Changed paths waiting for the next update"),
    )
