"""The driver's handle on one rank group: `sharding.ranks` Rank actors (sharding/rank.py) placed together by a
placement group, joined into one torch.distributed group, each running a DeepSpeed engine over the backbone.

Placement: STRICT_PACK puts the whole group on one node (collectives stay on the node's fast links); with
`sharding.span_nodes` it is PACK, which fills nodes in turn when a group is bigger than a node. Start-up is never
waited for here: creating the actors, binding rank 0's rendezvous socket, joining and building the engines are
queued calls whose inputs are each other's object refs, so a group is rebuilt in the background while the others
compute, and work items queue behind its set-up.

A group is one worker to the pool (cluster/pool.py): it takes a WorkItem to every rank and gives back one
WorkResult, the ranks' partitions of a ZeRO-3 meta-gradient put back together whole (sharding/engine.py:
assemble). A group that loses a rank is useless (its collectives cannot complete), so it is ended whole, with its
placement group, and built again.
"""

from __future__ import annotations

from typing import Any

from metascale.cluster.messages import WorkItem, WorkResult
from metascale.config import JobSpec
from metascale.extras import check
from metascale.sharding.engine import assemble
from metascale.sharding.rank import Rank, is_partitioned


class RankGroup:
    def __init__(self, spec: JobSpec, index: int, env: dict[str, str]):
        import ray

        check("deepspeed")  # here, on the driver, rather than as a traceback from every rank

        self.ray, self.spec, self.index, self.env = ray, spec, index, env
        self.ranks = spec.sharding.ranks
        self.partitioned = is_partitioned(spec)
        self.generation = 0  # how many times this group was built (1 + rebuilds after losses)
        self._build()

    def _build(self) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from metascale.cluster.pool import actor_prefix

        s, c = self.spec.sharding, self.spec.cluster
        self.generation += 1
        name = f"{actor_prefix(self.spec)}-group-{self.index}-g{self.generation}"  # a rebuild never reuses a name
        bundle = {"CPU": c.cpus_per_process, **({"GPU": c.gpus_per_process} if c.gpus_per_process else {})}
        self.pg = placement_group([bundle] * self.ranks, strategy="PACK" if s.span_nodes else "STRICT_PACK", name=name)
        spec_json = self.spec.model_dump(mode="json")
        self.actors = [
            self.ray.remote(Rank)
            .options(
                num_cpus=c.cpus_per_process,
                num_gpus=c.gpus_per_process,
                max_restarts=0,  # a lone restarted rank cannot rejoin its group's collectives: the group is rebuilt
                max_task_retries=0,
                runtime_env={"env_vars": self.env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
                name=f"{name}-rank-{r}",  # findable by operators (and fault tests)
            )
            .remote(spec_json, self.index, r, self.ranks)
            for r in range(self.ranks)
        ]
        described = [a.describe.remote() for a in self.actors]
        endpoint = self.actors[0].endpoint.remote(not s.span_nodes)  # one node: the store listens on loopback
        # The collectives' own limit: a rank whose peer hangs raises after it, unless the pool ends the group first.
        limit = self.spec.cluster.timeout.startup_s + self.spec.cluster.timeout.min_s
        self.ready = [a.setup.remote(endpoint, limit, *described) for a in self.actors]
        self.shapes: dict[str, tuple[int, ...]] | None = None

    def submit(self, item: WorkItem, params: Any) -> list[Any]:
        return [a.run.remote(item, params) for a in self.actors]

    def combine(self, parts: list[WorkResult]) -> WorkResult:
        first = parts[0]
        if self.partitioned and first.grads:
            if self.shapes is None:
                self.shapes = self.ray.get(self.ready[0])["shapes"]  # done: the item ran after the set-up
            first.grads = {k: assemble([p.grads[k] for p in parts], shape) for k, shape in self.shapes.items()}
        first.data_s = max(p.data_s for p in parts)
        first.compute_s = max(p.compute_s for p in parts)
        peaks = [p.peak_bytes for p in parts if p.peak_bytes is not None]
        first.peak_bytes = max(peaks) if peaks else None
        return first

    def restart(self, hung: bool) -> None:
        self.stop()
        self._build()

    def stop(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)

    def nodes(self) -> list[str]:
        """The Ray node of each rank (placement checks)."""
        return [info["node"] for info in self.ray.get(self.ready)]

    def held(self) -> list[dict[str, int]]:
        """What each rank holds of the backbone (Rank.held)."""
        return self.ray.get([a.held.remote() for a in self.actors])
