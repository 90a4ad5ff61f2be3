"""One rank's membership of a worker group, as an explicit context: process groups in, model adopted, groups out.

    init_rank(...)          torch.distributed (NCCL on GPUs, gloo on CPU) and xfuser's CFG/sequence groups,
                            returned as a ParallelContext; teardown(ctx) undoes it
    to_sequence_parallel    the diffusers transformer (loaded by serve.models, so real checkpoints load the same way)
                            adopted, weights shared, by xfuser's wrapper, whose attention is USP

xfuser keeps its groups and runtime state (attention backend) in module globals, which its Wan wrapper reads inside
`forward`; that state is per process, set once by `init_rank`/`to_sequence_parallel` and cleared by `teardown`.
Code here passes the ParallelContext explicitly and reads no globals of its own.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from serve.parallel.config import ATTENTION_BACKENDS, ParallelConfig, capabilities_for, declared_capabilities
from serve.parallel.xfuser_cpu import import_xfuser


@dataclass(frozen=True)
class ParallelContext:
    """This rank's place in the group and its process groups (xfuser GroupCoordinators), passed explicitly."""

    config: ParallelConfig
    rank: int
    world_size: int
    device: torch.device
    backend: str  # "nccl" | "gloo"
    cfg_rank: int
    sp_rank: int
    world_group: Any
    cfg_group: Any
    sp_group: Any
    xfuser_config: Any  # xfuser EngineConfig: parallel degrees and attention backend for its runtime state

    @property
    def is_output_rank(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_rank(
    rank: int, world_size: int, master_addr: str, master_port: int, config: ParallelConfig, device
) -> ParallelContext:
    """Join the group as `rank`: torch.distributed (NCCL on GPUs, gloo on CPU), then xfuser's CFG/sequence groups."""
    if world_size != config.world_size:
        raise ValueError(f"world_size {world_size} != cfg x ulysses x ring = {config.world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the group of {world_size}")
    device = torch.device(device)
    import_xfuser()
    from xfuser.config import xFuserArgs
    from xfuser.core.distributed import parallel_state as ps

    if torch.distributed.is_initialized() or ps.model_parallel_is_initialized():
        raise RuntimeError("this process already belongs to a parallel group; call teardown(ctx) before init_rank")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        if device.index is None:  # "cuda": the process's current device (a Ray actor sees only its own GPU)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    ps.init_distributed_environment(
        world_size=world_size, rank=rank, local_rank=device.index or 0, backend=backend,
        distributed_init_method=f"tcp://{master_addr}:{master_port}",
    )
    ps.initialize_model_parallel(
        classifier_free_guidance_degree=config.cfg_degree, sequence_parallel_degree=config.sp_degree,
        ulysses_degree=config.ulysses_degree, ring_degree=config.ring_degree, backend=backend,
    )
    xfuser_config, _ = xFuserArgs(
        model="srd", ulysses_degree=config.ulysses_degree, ring_degree=config.ring_degree,
        use_cfg_parallel=config.cfg_degree == 2,
        attention_backend=ATTENTION_BACKENDS[config.attention_backend].xfuser_name,
    ).create_config()
    return ParallelContext(
        config=config, rank=rank, world_size=world_size, device=device, backend=backend,
        cfg_rank=ps.get_classifier_free_guidance_rank(), sp_rank=ps.get_sequence_parallel_rank(),
        world_group=ps.get_world_group(), cfg_group=ps.get_cfg_group(), sp_group=ps.get_sp_group(),
        xfuser_config=xfuser_config,
    )


def teardown(ctx: ParallelContext | None = None) -> None:
    """Destroy this process's groups and xfuser's process-wide state, so that init_rank may run again."""
    if "xfuser" not in sys.modules:
        return
    import xfuser.core.distributed.runtime_state as runtime_state
    from xfuser.core.distributed import parallel_state as ps
    from yunchang.globals import PROCESS_GROUP

    ps.destroy_model_parallel()
    if ps._DIT is not None:  # not reset by destroy_model_parallel
        torch.distributed.destroy_process_group(ps._DIT)
        ps._DIT = None
    runtime_state._RUNTIME = None
    PROCESS_GROUP.ULYSSES_PG = None
    PROCESS_GROUP.RING_PG = None
    ps.destroy_distributed_environment()


def _import_attr(path: str):
    module, _, attr = path.partition(":")
    return getattr(__import__(module, fromlist=[attr]), attr)


def _contiguous_hidden_states(block, args):
    """xfuser's Wan forward hands the blocks the patch embedding's transposed view ([B, S, D] with strides
    (S*D, 1, S)); elementwise ops keep that layout, so every residual add and copy of every block ran as a strided,
    unvectorised kernel: +7% per 14B forward at 480p on an H100 (bench/RESULTS.md, profile). diffusers' own forward
    hands the blocks a contiguous tensor; making the first block's input contiguous restores that everywhere."""
    hidden_states, *rest = args
    return (hidden_states.contiguous(), *rest)


def to_sequence_parallel(model, ctx: ParallelContext):
    """xfuser's wrapper around `model`'s weights (no copy): the same module tree with USP attention processors.

    Also (re)binds xfuser's runtime state (attention backend, parallel config) for this process.
    """
    from xfuser.core.distributed import get_runtime_state, initialize_runtime_state

    declared = [cls.__name__ for cls in type(model).__mro__ if cls.__name__ in declared_capabilities()]
    caps = capabilities_for({"_class_name": declared[0] if declared else type(model).__name__})
    wrapper_cls = _import_attr(caps.xfuser_wrapper)
    init_config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    with torch.device("meta"):
        wrapped = wrapper_cls(**init_config, attention_kwargs={})
    wrapped.load_state_dict(model.state_dict(), strict=True, assign=True)
    buffers = dict(model.named_buffers())
    for name, _ in list(wrapped.named_buffers()):
        owner_name, _, attr = name.rpartition(".")
        owner = wrapped.get_submodule(owner_name)
        if name in buffers:
            setattr(owner, attr, buffers[name])
        elif attr == "head_perm":  # xfuser's identity head permutation (Ulysses head balancing, unused here)
            setattr(owner, attr, torch.arange(owner.heads, dtype=torch.long, device=model.device))
    leftover = [n for n, t in list(wrapped.named_parameters()) + list(wrapped.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"xfuser's wrapper has tensors the diffusers model lacks: {leftover[:5]}")
    wrapped.eval().requires_grad_(False)
    wrapped.blocks[0].register_forward_pre_hook(_contiguous_hidden_states)
    initialize_runtime_state(pipeline=SimpleNamespace(transformer=wrapped), engine_config=ctx.xfuser_config)
    wrapped.attention_backend = get_runtime_state().attention_backend.name  # what USP calls, for reports
    return wrapped


def load_parallel_transformer(source: str, role: str, ctx: ParallelContext, dtype: torch.dtype,
                              weights: str = "pretrained", subfolder: str | None = None):
    """The transformer loaded by serve.models (diffusers' from_pretrained, or random-init from its config), adopted
    by xfuser's wrapper."""
    from serve.models import load_transformer

    return to_sequence_parallel(load_transformer(source, role, str(ctx.device), dtype, weights, subfolder), ctx)

