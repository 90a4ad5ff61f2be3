"""A stage replica's worker group on Ray: one rank per bundle of the replica's placement group.

Rank 0 is the replica itself: Serve schedules the replica actor on its placement group's first bundle, so that
bundle's GPU is the replica's own, and the replica runs rank 0's `ParallelWorker` in its process (the loop, the
sampler and rank 0's forward stay on one device, and the result needs no transfer). Ranks 1..N-1 are Ray actors
scheduled on bundles 1..N-1 of the same placement group (STRICT_PACK: one node, NVLink). The rank code is the
engine's (serve/parallel.py); this file only places it, like vLLM's Ray executor:

    start      every rank runs `ParallelWorker(...)` (device, process groups, model); the READY handshake is each
               actor's `ready()` answering, rank 0's constructor returning
    execute    fan a method out by name to every rank (same inputs), return rank 0's result; a rank that dies or
               never answers breaks the group with WorkerDiedError (the replica's health check then fails, so Serve
               replaces the replica and with it the whole group)
    shutdown   every rank destroys its process groups, then the actors are killed (they are also owned by the
               replica's process, so they die with it)
"""

from __future__ import annotations

import threading
import time

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from serve.parallel import (
    ParallelConfig, ParallelWorker, WorkerDiedError, check_parallel, free_port, load_transformer_config, to_cpu,
)


class RayWorkerGroup:
    """Same interface as serve.parallel.ProcessWorkerGroup: `execute(method, *args)`, `config`, `shutdown()`."""

    def __init__(
        self, engine_config, parallel_config: ParallelConfig, role: str = "sketch",
        placement_group: PlacementGroup | None = None, num_threads: int | None = None,
        start_timeout_s: float = 900.0, error_grace_s: float = 30.0,
    ):
        self.config = parallel_config
        self.role = role
        self.error_grace_s = error_grace_s
        self._lock = threading.Lock()  # one fan-out at a time: every rank must see calls in the same order
        self._broken: str | None = None
        self._closed = False
        self._actors = []
        self._local = None
        pg = placement_group or get_current_placement_group()
        n = parallel_config.world_size
        if pg is None:
            raise ValueError(
                f"the {role} stage has {n} ranks but its replica runs outside a placement group; give its "
                f"deployment placement_group_bundles (one bundle per rank)"
            )
        self.transformer_config = load_transformer_config(engine_config, role)
        check_parallel(parallel_config, self.transformer_config, bundles=len(pg.bundle_specs), role=role)
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
        try:
            # Every rank's constructor meets the others in torch.distributed's rendezvous, so rank 0's runs alongside.
            self._local, others = self._run(
                lambda: ParallelWorker(rank=0, **common), [a.ready.remote() for a in self._actors], "start",
                start_timeout_s,
            )
            self.info = [self._local.ready(), *others]
        except BaseException:
            self.shutdown()
            raise

    @property
    def world_size(self) -> int:
        return 1 + len(self._actors)

    def execute(self, method: str, *args, timeout_s: float | None = None, **kwargs):
        """Run `method(*args, **kwargs)` on every rank; rank 0's result."""
        with self._lock:
            self.check_health()
            remote_args = [ray.put(a) for a in to_cpu(args)]  # stored once, read by every actor
            remote_kwargs = {k: ray.put(v) for k, v in to_cpu(kwargs).items()}
            refs = [getattr(a, method).remote(*remote_args, **remote_kwargs) for a in self._actors]
            local = getattr(self._local, method)
            result, _ = self._run(lambda: local(*args, **kwargs), refs, method, timeout_s)
            return result

    def check_health(self) -> None:
        """Raise if the group cannot run calls any more (for the replica's `check_health`)."""
        if self._closed:
            raise RuntimeError(f"the {self.role} worker group is shut down")
        if self._broken:
            raise WorkerDiedError(self._broken)

    def _run(self, local_fn, refs: list, what: str, timeout_s: float | None):
        """Rank 0's part in a thread of this process while watching the actors' refs; both results."""
        box: dict = {}

        def target():
            try:
                box["result"] = local_fn()
            except BaseException as e:
                box["error"] = e

        thread = threading.Thread(target=target, daemon=True, name=f"srd-{self.role}-rank0-{what}")
        thread.start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending, results, failure = list(refs), {}, None
        while pending or thread.is_alive():
            if deadline is not None and time.monotonic() > deadline:
                failure = failure or TimeoutError(f"{self.role} worker group did not finish {what!r} in {timeout_s} s")
                break
            if failure is not None and deadline is None:  # one rank failed: give the others a grace period
                deadline = time.monotonic() + self.error_grace_s
            if pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=0.2)
                for ref in done:
                    rank = refs.index(ref) + 1
                    try:
                        results[rank] = ray.get(ref)
                    except ray.exceptions.RayActorError as e:
                        self._broken = f"{self.role} worker rank {rank} died during {what!r}: {e}"
                        raise WorkerDiedError(self._broken + "; the worker group is unusable") from e
                    except ray.exceptions.RayTaskError as e:
                        failure = failure or _unwrap(e, rank, self.role, what)
            else:
                thread.join(0.2)
        if thread.is_alive() or pending:  # a rank is stuck (e.g. in a collective a failed rank never joined)
            self._broken = f"{self.role} worker group is stuck after {what!r} failed or timed out"
        if "error" in box:
            raise box["error"]
        if failure is not None:
            raise failure
        return box["result"], [results[r] for r in range(1, len(refs) + 1)]

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Destroy every rank's process groups, then stop the actors. Idempotent."""
        if self._closed:
            return
        self._closed = True
        refs = [a.shutdown.remote() for a in self._actors]
        if self._local is not None:
            try:
                self._local.shutdown()
            except Exception:
                pass
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for actor in self._actors:
            ray.kill(actor)

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.shutdown()


def _unwrap(error: ray.exceptions.RayTaskError, rank: int, role: str, what: str) -> BaseException:
    """The exception a rank raised (a ValueError stays a ValueError), noting where."""
    cause = error.cause if isinstance(error.cause, BaseException) else error
    cause.add_note(f"raised on {role} worker rank {rank} during {what!r}")
    return cause


def build_denoising_stage(stage_cls, role: str, engine_config, parallel_config: ParallelConfig):
    """A replica's sketch or render stage: the model in this process, or spread over the placement group's ranks."""
    if parallel_config.world_size == 1:
        return stage_cls(engine_config)
    return stage_cls(engine_config, denoiser=parallel_denoiser(engine_config, parallel_config, role))


def parallel_denoiser(engine_config, parallel_config: ParallelConfig, role: str):
    """A stage's denoiser over a worker group on this replica's placement group (rank 0 in this process)."""
    from serve.parallel import RemoteDenoiser

    return RemoteDenoiser(RayWorkerGroup(engine_config, parallel_config, role=role), engine_config.torch_dtype)


def check_stage_health(stage) -> None:
    """Raise if the stage's worker group (if it has one) has a dead or stuck rank: Serve then replaces the replica."""
    group = getattr(stage.denoiser, "group", None)
    if group is not None:
        group.check_health()


def shutdown_stage(stage) -> None:
    """Tear down the stage's worker group (if it has one) on every rank."""
    group = getattr(stage.denoiser, "group", None)
    if group is not None:
        group.shutdown()
