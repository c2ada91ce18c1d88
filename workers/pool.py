"""The embedding actors of one ingest: one per GPU (else N CPU actors), fed through bounded queues.

Batches go to the least-loaded live actor and come back in submission order, so
chunk ids depend on the file order alone; a batch whose actor is lost (its
process, or its node) is sent to another one.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from shoal.index.errors import IndexMismatchError

from shoal.workers.embed import EmbedSpec, TokenBatch

log = logging.getLogger(__name__)

Work = Union[TokenBatch, list]  # input ids (what readers send), or texts

@dataclass(frozen=True)
class PoolSpec:
    """How many actors, where, and how deep their queues are (embed.* of the config, as plain data)."""

    embed: EmbedSpec
    cpu_actors: int = 1
    cpus_per_actor: float = 1.0
    threads_per_actor: int = 0  # 0: the machine's cores shared out between CPU actors
    max_in_flight: int = 2  # batches queued per actor

class EmbedPool:
    """Embedding actors, started by :meth:`start` (in a running Ray), fed with bounded queues."""

    def __init__(self, spec: PoolSpec, run: str = "") -> None:
        self.spec = spec
        self.run, self.job = run, ""
        self.actors: list[Any] = []
        self.info: list[dict[str, Any]] = []
        self.inflight: dict[Any, tuple[int, Any, float, int, Work]] = {}  # ref -> (actor, payload, t0, seq, work)
        self.lost: set[int] = set()  # actors whose node or process went away: no new work for them
        self.resubmitted = 0
        self.batches: Counter = Counter()  # batches each actor finished
        self.done: dict[int, tuple[Any, np.ndarray, float]] = {}  # finished early, waiting for their turn
        self.next_submit = 0
        self.next_commit = 0
        self.load: Counter = Counter()
        self._info_refs: list[Any] = []
        self.actor_cpus = 0.0  # CPUs the embedding actors hold (set by start)

    def start(self) -> None:
        import ray

        from shoal.workers.actors import EmbedActor, actor_options
        from shoal.workers.embed import torch_threads_for

        s, e = self.spec, self.spec.embed
        n_gpus = self.gpus_to_use()
        self.actor_cpus = (n_gpus or s.cpu_actors) * s.cpus_per_actor
        if n_gpus > 0:
            opts = [dict(num_gpus=1, num_cpus=s.cpus_per_actor, **actor_options(True))] * n_gpus
            spec = EmbedSpec(**{**e.__dict__, "threads": 1})
            log.info("embedding on %d GPU actor(s), one per GPU", n_gpus)
        else:
            opts = [dict(num_cpus=s.cpus_per_actor, scheduling_strategy=st) for st in spread_over_nodes(s.cpu_actors)]
            threads = torch_threads_for(s.cpu_actors, s.threads_per_actor)
            spec = EmbedSpec(**{**e.__dict__, "threads": threads, "device": "cpu"})
            log.info("no GPU in the Ray cluster: embedding on %d CPU actor(s), %d threads each", s.cpu_actors, threads)
        job = self.job = ray.get_runtime_context().get_job_id()
        kind = "gpu" if n_gpus > 0 else "cpu"
        self.actors = [  # named per slot and run; the card each one got is in its repr and labels
            EmbedActor.options(name=f"shoal-embed-{kind}{i}-run{self.run or job}", **o).remote(spec, self.run, job)
            for i, o in enumerate(opts)
        ]
        self._info_refs = [a.info.remote() for a in self.actors]  # the models load while files are read

    def gpus_to_use(self) -> int:
        """The cluster's GPUs not held by other work (a running `shoal serve`): one actor each."""
        import ray

        n_gpus = int(ray.cluster_resources().get("GPU", 0))
        free = int(ray.available_resources().get("GPU", 0))
        if 0 < n_gpus and free < n_gpus:
            log.warning("%d of the cluster's %d GPU(s) are held by other work (a running `shoal serve`?): "
                        "embedding on %s", n_gpus - free, n_gpus,
                        f"the {free} free one(s)" if free else "the CPU")
            n_gpus = free
        return n_gpus

    def ready(self) -> None:
        """Wait until every actor has loaded its model; check they agree."""
        import ray

        if self.info or not self.actors:
            return
        self.info = ray.get(self._info_refs)
        fps = {i["fingerprint"] for i in self.info}
        if len(fps) != 1:
            raise IndexMismatchError(f"embedding actors loaded different models: {sorted(fps)}")

    def busy(self) -> list[dict[str, Any]]:
        import ray

        try:
            return ray.get([a.stats.remote() for a in self.actors], timeout=30)
        except Exception:  # a lost actor: its figures are gone
            return [{"busy_s": 0.0, "embedded": 0, "prep_cpu_s": 0.0} for _ in self.actors]

    @property
    def fingerprint(self) -> str:
        return self.info[0]["fingerprint"]

    @property
    def dtypes(self) -> list[str]:
        """The dtypes the actors' forward passes run in (float32 on the CPU)."""
        return sorted({i.get("dtype", "float32") for i in self.info})

    def full(self) -> bool:
        if not self.actors:
            return False
        return len(self.inflight) + len(self.done) >= len(self.actors) * self.spec.max_in_flight

    def submit(self, work: Work, payload: Any) -> None:
        """Queue a batch (input ids, or texts) with what to hand back beside its vectors."""
        if not self.actors:
            self.start()
        self._send(work, payload, self.next_submit)
        self.next_submit += 1
        self._gauge()

    def _send(self, work: Work, payload: Any, seq: int, avoid: Optional[int] = None) -> None:
        live = [j for j in range(len(self.actors)) if j not in self.lost and j != avoid]
        i = min(live or [avoid if avoid is not None else 0], key=lambda j: self.load[j])
        actor = self.actors[i]
        ref = actor.embed_tokens.remote(work) if isinstance(work, TokenBatch) else actor.embed.remote(work)
        self.load[i] += 1
        self.inflight[ref] = (i, payload, time.perf_counter(), seq, work)

    def _gauge(self) -> None:
        from shoal.workers.metrics import ingest_metrics

        ingest_metrics().inflight_batches.set(len(self.inflight) + len(self.done),
                                              tags={"job": self.job, "run": self.run})

    def pending(self) -> bool:
        return bool(self.inflight or self.done)

    def wait_one(self) -> tuple[Any, np.ndarray, float]:
        """The next batch in submission order: (payload, xb, seconds).

        Actors finish out of order (a faster card, a restarted actor's retried
        batch); committing in submission order keeps chunk ids a function of the
        file order alone, so a resumed run gets the same ids as an uninterrupted one.
        """
        import ray
        from ray.exceptions import RayActorError

        while self.next_commit not in self.done:
            [ref], _ = ray.wait(list(self.inflight), num_returns=1)
            i, payload, t0, seq, work = self.inflight.pop(ref)
            self.load[i] -= 1
            try:
                self.done[seq] = (payload, ray.get(ref), time.perf_counter() - t0)
                self.batches[i] += 1
            except RayActorError as e:  # its process or its node is gone: the batch goes to another actor
                self.lost.add(i)
                self.resubmitted += 1
                log.warning("embedding actor %d lost (%s): batch %d sent to another actor", i,
                            type(e).__name__, seq)
                self._send(work, payload, seq, avoid=i)
        self.ready()
        out = self.done.pop(self.next_commit)
        self.next_commit += 1
        self._gauge()
        return out

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

def spread_over_nodes(n: int) -> list[Any]:
    """Scheduling strategies for ``n`` CPU actors: one per node first, round-robin over the alive nodes
    with CPUs (soft: an actor goes elsewhere when its node is full). Ray's SPREAD is best effort and
    may put two on one node while another is idle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted((nd for nd in ray.nodes() if nd.get("Alive") and nd.get("Resources", {}).get("CPU", 0) > 0),
                   key=lambda nd: (not nd.get("Resources", {}).get("node:__internal_head__"), nd["NodeManagerAddress"]))
    if len(nodes) < 2:
        return ["DEFAULT"] * n
    return [NodeAffinitySchedulingStrategy(node_id=nodes[i % len(nodes)]["NodeID"], soft=True) for i in range(n)]
