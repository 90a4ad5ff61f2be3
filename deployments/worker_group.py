"""A stage replica's worker group on Ray: one rank per bundle of the replica's placement group.

Rank 0 is the replica itself: Serve schedules the replica actor on its placement group's first bundle, so that
bundle's GPU is the replica's own, and the replica runs rank 0's `ParallelWorker` in its process (the loop, the
sampler and rank 0's forward stay on one device, and the result needs no transfer). Ranks 1..N-1 are Ray actors
scheduled on bundles 1..N-1 of the same placement group (STRICT_PACK: one node, NVLink). This file only places the
ranks and carries calls to them, like vLLM's Ray executor; the rank code (serve/parallel/worker.py) and the group's
fan-out and failure handling (serve/parallel/group.py: a dead or hung rank breaks the group with WorkerDiedError or
WorkerTimeoutError, the replica's health check then fails and Serve replaces the replica, ranks and all) are the
engine's.
"""

from __future__ import annotations

import threading
import traceback

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from serve.parallel import (
    ParallelConfig, ParallelWorker, RemoteDenoiser, WorkerGroup, check_parallel, free_port, load_transformer_config,
    to_cpu,
)
from serve.parallel.group import Answer, Died, Raised, Returned


class RayWorkerGroup(WorkerGroup):
    """Rank 0 in this process (a thread per call, so that the actors are watched meanwhile), ranks 1..N-1 as actors
    on the placement group's other bundles."""

    def __init__(
        self, engine_config, parallel_config: ParallelConfig, role: str = "sketch",
        placement_group: PlacementGroup | None = None, num_threads: int | None = None,
        start_timeout_s: float = 900.0, error_grace_s: float = 30.0,
    ):
        pg = placement_group or get_current_placement_group()
        n = parallel_config.world_size
        if pg is None:
            raise ValueError(
                f"the {role} stage has {n} ranks but its replica runs outside a placement group; give its "
                f"deployment placement_group_bundles (one bundle per rank)"
            )
        transformer_config = load_transformer_config(engine_config, role)
        check_parallel(parallel_config, transformer_config, bundles=len(pg.bundle_specs), role=role)
        super().__init__(parallel_config, transformer_config, role, error_grace_s)
        self._actors: list = []
        self._local: ParallelWorker | None = None
        self._rank0: threading.Thread | None = None
        common = dict(
            world_size=n, master_addr=ray.util.get_node_ip_address(), master_port=free_port(),
            engine_config=engine_config, parallel_config=parallel_config, role=role, num_threads=num_threads,
        )
        actor_cls = ray.remote(ParallelWorker)
        self._actors = [
            actor_cls.options(
                num_cpus=spec.get("CPU", 0), num_gpus=spec.get("GPU", 0), max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            ).remote(rank=rank, **common)
            for rank, spec in enumerate(pg.bundle_specs)
            if rank > 0
        ]
        # Every rank's constructor meets the others in torch.distributed's rendezvous, so rank 0's runs alongside.
        def start_rank0() -> dict:
            self._local = ParallelWorker(rank=0, **common)
            return self._local.ready()

        self._launch(start_rank0, [a.ready.remote() for a in self._actors], "start")
        self.info = self._start(start_timeout_s)

    @property
    def world_size(self) -> int:
        return 1 + len(self._actors)

    def _launch(self, local_call, refs: list, what: str) -> None:
        self._refs = {ref: rank for rank, ref in enumerate(refs, start=1)}
        self._local_answer: Answer | None = None

        def run_rank0():
            try:
                self._local_answer = Returned(local_call())
            except BaseException as e:
                self._local_answer = Raised(e, traceback.format_exc())

        self._rank0 = threading.Thread(target=run_rank0, daemon=True, name=f"srd-{self.role}-rank0-{what}")
        self._rank0.start()

    def _send(self, method: str, args: tuple, kwargs: dict) -> None:
        remote_args = [ray.put(a) for a in to_cpu(args)]  # stored once, read by every actor
        remote_kwargs = {k: ray.put(v) for k, v in to_cpu(kwargs).items()}
        refs = [getattr(a, method).remote(*remote_args, **remote_kwargs) for a in self._actors]
        local = getattr(self._local, method)
        self._launch(lambda: local(*args, **kwargs), refs, method)

    def _receive(self, pending: set[int], timeout_s: float | None) -> list[tuple[int, Answer]]:
        wait_s = 0.2 if timeout_s is None else min(timeout_s, 0.2)  # look at rank 0's thread this often
        if 0 in pending and not self._rank0.is_alive():
            return [(0, self._local_answer)]
        refs = [ref for ref, rank in self._refs.items() if rank in pending]
        if not refs:
            self._rank0.join(wait_s)
            return []
        done, _ = ray.wait(refs, num_returns=1, timeout=wait_s)
        answers = []
        for ref in done:
            rank = self._refs[ref]
            try:
                answers.append((rank, Returned(ray.get(ref))))
            except ray.exceptions.RayActorError as e:
                answers.append((rank, Died(f"its actor died: {str(e).splitlines()[0]}")))
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if isinstance(e.cause, BaseException) else e
                answers.append((rank, Raised(cause, str(e))))
        return answers

    def _stop(self, graceful: bool, timeout_s: float) -> None:
        refs = [a.shutdown.remote() for a in self._actors] if graceful else []
        if self._local is not None and not (self._rank0 and self._rank0.is_alive()):  # rank 0 not stuck in a call
            try:
                self._local.shutdown()
            except Exception:
                pass
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for actor in self._actors:
            ray.kill(actor)


def parallel_denoiser(engine_config, parallel_config: ParallelConfig, role: str):
    """A stage's denoiser over a worker group on this replica's placement group (rank 0 in this process)."""
    return RemoteDenoiser(RayWorkerGroup(engine_config, parallel_config, role=role), engine_config.torch_dtype)
