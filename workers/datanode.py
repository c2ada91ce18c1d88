"""The data node's deployment: the one process in the app that reads the data dir for others.

Pinned to the node that holds the data dir (where `shoal serve` runs, or the node
started with the ``shoal_data`` resource). It

- announces generations: replicas long-poll :meth:`DataNode.wait_generation`
  instead of polling a CURRENT file they may not see;
- streams a generation's files in bounded chunks through the object store
  (:meth:`DataNode.read`), for replicas on nodes without the data dir;
- answers catalog and keyword-index reads for an Ingress that runs elsewhere
  (SQLite never goes over a network filesystem).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from ray import serve

log = logging.getLogger(__name__)

MAX_READ_BYTES = 64 << 20  # one read() answers at most this much, whatever is asked


@serve.deployment(name="DataNode")
class DataNode:
    def __init__(self, data_dir: str) -> None:
        import ray

        from shoal.workers.catalog import CatalogReader

        self.data = Path(data_dir)
        self.reader = CatalogReader(self.data)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.host = socket.gethostname()
        self.bytes_sent = 0
        self._manifests: dict[str, bytes] = {}
        self.replicas: dict[str, tuple[float, dict[str, Any]]] = {}  # replica id -> (last seen, report)
        if not self.data.is_dir():
            raise RuntimeError(f"DataNode on {self.host}: data dir {self.data} is not here")

    # -- generations -----------------------------------------------------------------------
    def _announce(self) -> dict[str, Any]:
        from shoal.index import generations, layout
        from shoal.index.sync import manifest_sha256

        name = generations.current_name(self.data)
        if name is None:
            return {"generation": None, "data_dir": str(self.data), "data_node": self.host, "node_id": self.node_id}
        raw = self._manifests.get(name)
        if raw is None:
            raw = (layout.generations(self.data) / name / layout.MANIFEST).read_bytes()
            self._manifests = {name: raw}  # a generation's manifest never changes
        return {"generation": name, "manifest": raw, "manifest_sha256": manifest_sha256(raw),
                "data_dir": str(self.data), "data_node": self.host, "node_id": self.node_id}

    def current(self) -> dict[str, Any]:
        """The live generation: name, manifest bytes and their sha256, where the data dir is."""
        return self._announce()

    async def wait_generation(self, known: Optional[str], timeout_s: float = 10.0,
                              report: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Returns as soon as CURRENT names a generation other than ``known``, or after ``timeout_s``.
        ``report``: what the calling replica serves, where (shown by /stats and `shoal status`)."""
        from shoal.index import generations

        if report:
            self.replicas[str(report.get("replica"))] = (time.time(), report)

        deadline = time.monotonic() + min(max(timeout_s, 0.0), 60.0)
        while time.monotonic() < deadline:
            try:
                if generations.current_name(self.data) != known:
                    break
            except Exception:  # noqa: BLE001 - a CURRENT being replaced: look again
                pass
            await asyncio.sleep(0.2)
        return await asyncio.to_thread(self._announce)

    def read(self, generation: str, name: str, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of file ``name`` of ``generation`` from ``offset``. Only files the
        generation's manifest lists can be read: nothing else of this node is reachable."""
        from shoal.index import generations, layout

        if not generation.isdigit():
            raise ValueError(f"not a generation name: {generation!r}")
        gen_dir = layout.generations(self.data) / generation
        manifest = generations.read_manifest(gen_dir)
        if name not in manifest["files"]:
            raise ValueError(f"generation {generation} has no file {name!r}")
        with open(gen_dir / name, "rb") as f:
            f.seek(max(0, int(offset)))
            out = f.read(max(0, min(int(size), MAX_READ_BYTES)))
        self.bytes_sent += len(out)
        return out

    # -- the catalog and the keyword index, for an Ingress on another node ------------------
    def ids_matching(self, prefix: Optional[str], types: Any) -> np.ndarray:
        return self.reader.ids_matching(prefix, types)

    def keyword_search(self, generation: Optional[str], queries: list[str],
                       n: int) -> Optional[tuple[np.ndarray, np.ndarray, str]]:
        return self.reader.keyword_search(generation, queries, n)

    def hits(self, D: np.ndarray, I: np.ndarray, n: int) -> list[Any]:
        return self.reader.hits(D, I, n)

    def counts(self) -> dict[str, Any]:
        return self.reader.counts()

    def vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.reader.vectors(ids)

    def highlights(self, generation: Optional[str], query: str, texts: list[str]) -> list[list[list[int]]]:
        return self.reader.highlights(generation, query, texts)

    def passage(self, chunk_id: int, query: Optional[str], context_chars: int, whole: bool) -> dict[str, Any]:
        return self.reader.passage(chunk_id, query, context_chars, whole)

    def health(self) -> dict[str, Any]:
        return self.reader.health()

    def replica_reports(self) -> list[dict[str, Any]]:
        """Every ShardSearcher replica heard from, with the seconds since (a lost node's go stale)."""
        now = time.time()
        for rid, (seen, _r) in list(self.replicas.items()):
            if now - seen > 60:  # a live replica reports every 10 s
                del self.replicas[rid]
        return sorted((dict(r, seen_s_ago=round(now - seen, 1)) for seen, r in self.replicas.values()),
                      key=lambda r: (r.get("group", 0), r.get("node_ip", "")))

    def info(self) -> dict[str, Any]:
        return {"node": self.host, "node_id": self.node_id, "data_dir": str(self.data), "pid": os.getpid(),
                "bytes_sent": self.bytes_sent}


def node_of_this_process() -> dict[str, Any]:
    """This process's Ray node: id, address, host name, resources."""
    import ray

    me = ray.get_runtime_context().get_node_id()
    for n in ray.nodes():
        if n["NodeID"] == me:
            return {"node_id": me, "ip": n["NodeManagerAddress"], "host": n.get("NodeManagerHostname", ""),
                    "resources": n.get("Resources", {})}
    raise RuntimeError(f"this process's Ray node {me} is not in the cluster's node list")


def data_node_resources() -> dict[str, float]:
    """What pins a replica to the data node: the ``shoal_data`` resource where the cluster has one (an
    operator started that node with ``--resources='{"shoal_data": 1}'``), else the node of this process
    (`shoal serve` runs where the data dir is)."""
    import ray

    if ray.cluster_resources().get("shoal_data", 0) > 0:
        return {"shoal_data": 0.001}
    return {f"node:{node_of_this_process()['ip']}": 0.001}


def where() -> dict[str, Any]:
    """Node, host and GPUs of the calling replica (for /stats and `shoal status`)."""
    import ray

    ctx = ray.get_runtime_context()
    try:
        gpus = [str(g) for g in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001
        gpus = []
    ip = ""
    try:
        ip = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001
        pass
    return {"node": socket.gethostname(), "node_ip": ip, "node_id": ctx.get_node_id(), "gpu_ids": gpus}


def cache_root(configured: Optional[str]) -> Path:
    """serve.cache_dir, else $XDG_CACHE_HOME/shoal/generations (~/.cache/...), on each node."""
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shoal" / "generations"
