"""Both worker groups behind the one interface (serve/parallel/group.py): spawned processes (ProcessWorkerGroup) and
Ray actors in a placement group (deployments/worker_group.py RayWorkerGroup, hosted by an actor on bundle 0 as a
Serve replica hosts it). Ranks talk over gloo, xfuser's USP is real, and a rank is killed for real.

The same test runs on each: a step equals the one-rank engine's (float32, relative error <= 1e-5); the prompt
embeddings cross once for two steps; then rank 1 is killed and the group raises WorkerDiedError naming it, on that
call and on every later one (health check included), and its other ranks are stopped.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import time

import pytest
import torch

TOL = 1e-5


class _Replica:
    """Stands in for a Serve replica: a RayWorkerGroup whose rank 0 runs in this actor's process."""

    def __init__(self, engine_config, parallel_config, placement_group):
        from deployments.worker_group import RayWorkerGroup

        self.group = RayWorkerGroup(engine_config, parallel_config, placement_group=placement_group, num_threads=1)

    def describe(self):
        return self.group.config, self.group.transformer_config, self.group.info

    def execute(self, method, *args):
        return self.group.execute(method, *args)

    def traffic(self):
        return self.group.traffic

    def check_health(self):
        self.group.check_health()

    def shutdown(self):
        self.group.shutdown()


class _HostedGroup:
    """The replica's group as seen from this process (what RemoteDenoiser needs: `execute`, `config`,
    `transformer_config`), each call answered by the replica actor."""

    def __init__(self, actor):
        import ray

        self.actor, self._ray = actor, ray
        self.config, self.transformer_config, self.info = ray.get(actor.describe.remote())

    def execute(self, method, *args):
        return self._ray.get(self.actor.execute.remote(method, *args))

    @property
    def traffic(self):
        return self._ray.get(self.actor.traffic.remote())

    def check_health(self):
        self._ray.get(self.actor.check_health.remote())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(params=["process", "ray"])
def group(request, tiny_config):
    from serve.parallel import ParallelConfig, ProcessWorkerGroup

    config = ParallelConfig(ulysses_degree=2)
    if request.param == "process":
        with ProcessWorkerGroup(tiny_config, config, num_threads=1) as process_group:
            yield process_group
        return

    ray = request.getfixturevalue("ray_cluster")
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test module is not importable by workers
    pg = placement_group([{"CPU": 0.5, "GPU": 1}] * 2, strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)
    replica = ray.remote(_Replica).options(
        num_cpus=0.5, num_gpus=1, max_restarts=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
    ).remote(tiny_config, config, pg)
    try:
        yield _HostedGroup(replica)
    finally:
        ray.kill(replica)
        remove_placement_group(pg)


def test_a_step_a_dead_rank_and_a_broken_group(group, tiny_config, make_params, rel_err):
    from serve.pipeline.encode import EncodeStage
    from serve.pipeline.segment import SketchStage
    from serve.parallel import RemoteDenoiser, WorkerDiedError, tensor_bytes

    (embeds,) = EncodeStage.load(tiny_config)([make_params()])
    latents, timesteps = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([999])
    expected = SketchStage.load(tiny_config).denoiser(latents, timesteps, [embeds], [5.0])

    denoiser = RemoteDenoiser(group, tiny_config.torch_dtype)
    before = copy.deepcopy(group.traffic)
    for _ in range(2):  # two steps of one batch
        assert rel_err(denoiser(latents, timesteps, [embeds], [5.0]), expected) <= TOL
    after = group.traffic
    assert after.calls - before.calls == {"hold_prompts": 1, "denoise": 2}
    assert after.tensor_bytes["hold_prompts"] - before.tensor_bytes["hold_prompts"] == tensor_bytes(embeds)
    assert after.tensor_bytes["denoise"] - before.tensor_bytes["denoise"] == 2 * tensor_bytes([latents, timesteps])

    rank1 = group.info[1]["pid"]
    assert rank1 != os.getpid() and _alive(rank1)
    os.kill(rank1, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match=r"sketch worker rank 1 died during 'denoise'"):
        denoiser(latents, timesteps, [embeds], [5.0])
    assert time.monotonic() - start < 60  # seen at once, not after a collective's timeout
    # Broken stays broken, saying which rank and why: the next call, and the health check a replica reports.
    with pytest.raises(WorkerDiedError, match=r"sketch worker rank 1 died during 'denoise'"):
        group.execute("ready")
    with pytest.raises(WorkerDiedError, match=r"sketch worker rank 1 died during 'denoise'"):
        group.check_health()
    if hasattr(group, "processes"):  # rank 0, which would wait in a collective forever, was stopped too
        assert not any(p.is_alive() for p in group.processes)
