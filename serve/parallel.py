"""Sequence-parallel (xfuser USP) and CFG-parallel denoising over a group of ranks, one rank per device.

A stage (sketch, or render with its own degree) can spread each transformer forward over
N = cfg_degree x ulysses_degree x ring_degree ranks:

    ParallelConfig          the degrees and the attention backend, validated on their own
    check_parallel(...)     the checks that need the model (heads vs Ulysses) and the placement (bundles), run before
                            any weights load; ModelCapabilities declares what each model family supports
    init_rank(...)          per rank: torch.distributed (NCCL on GPUs, gloo on CPU) and xfuser's process groups,
                            returned as an explicit ParallelContext; teardown(ctx) undoes it
    load_parallel_transformer / to_sequence_parallel
                            the diffusers transformer (loaded by serve.models, so real checkpoints load the same
                            way) adopted, weights shared, by xfuser's Wan wrapper, whose attention is USP
    ParallelDenoiser        the stage denoiser interface on one rank: with cfg_degree 2, CFG group 0 runs the cond
                            rows and group 1 the uncond rows, the predictions are all-gathered over the CFG group and
                            every rank applies `stages.combine_guidance`; inside a group xfuser splits the sequence
    ParallelWorker          one rank of a worker group: device, groups, model, `denoise` (vLLM's worker)
    ProcessWorkerGroup      N spawned processes (tests, CPU, a single host without Ray); the Ray actor group with
                            the same interface lives in deployments/worker_group.py
    RemoteDenoiser          the stage denoiser interface in the driver: each call fans `denoise` out to every rank
                            (the same inputs: SPMD) and returns rank 0's result

The denoising loop, the sampler, switch tracking, progress and cancellation stay in the driver and run the same
`stages.sketch` / `stages.render` code as the one-rank engine: only the transformer forward is distributed, as in
vLLM's executor (`collective_rpc("execute_model")` every step). With identical inputs on every rank, every rank
computes the same guided prediction; rank 0's is the one returned.

xfuser keeps its groups and runtime state (attention backend) in module globals, which its Wan wrapper reads inside
`forward`; that state is per process, set once by `init_rank`/`load_parallel_transformer` and cleared by `teardown`.
Code here passes the ParallelContext explicitly and reads no globals of its own.

No Ray here: the engine runs without it.
"""

from __future__ import annotations

import importlib
import importlib.util
import multiprocessing.connection
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve import stages
from serve.families import base as _families
from serve.families.base import ModelCapabilities
from serve.handoff import PromptEmbeds

# --------------------------------------------------------------------------------------------------------------------
# Configuration and validation (no xfuser import: the app config and the driver use these)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionBackend:
    """One attention kernel xfuser can call inside USP."""

    xfuser_name: str | None  # xfuser's AttentionBackendType member; None: let xfuser pick
    returns_lse: bool | None  # ring attention merges partial results by log-sum-exp; None: depends on xfuser's pick
    description: str


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": AttentionBackend("SDPA", False, "torch scaled_dot_product_attention, torch picks the kernel"),
    "sdpa_flash": AttentionBackend("SDPA_FLASH", True, "torch's flash-attention kernel (returns log-sum-exp)"),
    "sdpa_efficient": AttentionBackend("SDPA_EFFICIENT", True, "torch's memory-efficient kernel (returns LSE)"),
    "cudnn": AttentionBackend("CUDNN", True, "torch's cuDNN attention kernel (returns LSE)"),
    "flash": AttentionBackend("FLASH", True, "the flash-attn 2 package (returns LSE)"),
    "flash_3": AttentionBackend("FLASH_3", True, "the flash-attn 3 package, Hopper (returns LSE)"),
    "auto": AttentionBackend(None, None, "xfuser's own choice (cuDNN on an H100 without flash-attn 3/4)"),
}
LSE_BACKENDS = tuple(name for name, b in ATTENTION_BACKENDS.items() if b.returns_lse)


class ParallelConfig(BaseModel):
    """How one stage spreads a transformer forward over ranks. World size = cfg x ulysses x ring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cfg_degree: int = Field(
        1, description="1, or 2 to run the cond and uncond halves of classifier-free guidance on separate rank groups."
    )
    ulysses_degree: int = Field(
        1, description="Ulysses sequence parallelism (all-to-all over heads); must divide the attention head count."
    )
    ring_degree: int = Field(
        1, description="Ring attention sequence parallelism; needs an attention backend that returns log-sum-exp."
    )
    attention_backend: Literal[tuple(ATTENTION_BACKENDS)] = Field(  # type: ignore[valid-type]
        "sdpa",
        description=(
            "Attention kernel inside USP. Default `sdpa` (torch's own choice): on the H100, xfuser's automatic pick "
            "(cuDNN) was ~3% slower (DESIGN.md); bench/xfuser_overhead.py measures each. Ring needs one of "
            + ", ".join(LSE_BACKENDS) + "."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        for name in ("cfg_degree", "ulysses_degree", "ring_degree"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1 but is {getattr(self, name)}")
        if self.cfg_degree not in (1, 2):
            raise ValueError(
                f"`cfg_degree` must be 1 or 2 (one rank group per half of classifier-free guidance: cond and "
                f"uncond) but is {self.cfg_degree}"
            )
        if self.ring_degree > 1 and not ATTENTION_BACKENDS[self.attention_backend].returns_lse:
            raise ValueError(
                f"`ring_degree` {self.ring_degree} needs an attention backend that returns log-sum-exp (ring "
                f"attention merges partial results with it), one of {', '.join(LSE_BACKENDS)}; "
                f"`attention_backend` is {self.attention_backend!r}"
            )
        return self

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        return self.cfg_degree * self.sp_degree

    def check_tokens(self, tokens: int) -> None:
        """Ring attention cannot mask the zero padding xfuser adds to split the sequence evenly (Ulysses can, by
        trimming padded keys), so with ring the token count must divide evenly."""
        if self.ring_degree > 1 and tokens % self.sp_degree:
            raise ValueError(
                f"with `ring_degree` {self.ring_degree} the latent's token count ({tokens}) must be divisible by "
                f"ulysses_degree x ring_degree = {self.sp_degree}; choose another width/height/num_frames"
            )


# Each model family declares what it supports in parallel (serve/families/); the checks below ask it.
WAN_CAPABILITIES = _families.family_named("WanPipeline").capabilities


def _capabilities() -> dict[str, ModelCapabilities]:
    return {name: f.capabilities for f in _families.families() for name in f.capabilities.transformer_classes}


def capabilities_for(transformer_config: dict) -> ModelCapabilities:
    name = transformer_config.get("_class_name")
    capabilities = _capabilities()
    if name not in capabilities:
        raise ValueError(
            f"no parallel support is declared for transformer class {name!r}; supported: {', '.join(capabilities)}"
        )
    return capabilities[name]


def check_parallel(
    config: ParallelConfig, transformer_config: dict, bundles: int | None = None, role: str = "sketch"
) -> ModelCapabilities:
    """The checks that need the model's config or the placement; run before spawning ranks or loading weights."""
    caps = capabilities_for(transformer_config)
    heads = transformer_config["num_attention_heads"]
    if config.world_size > 1 and caps.xfuser_wrapper is None:
        raise ValueError(
            f"the {caps.family} family runs on one rank only in this engine (no sequence or CFG parallelism is "
            f"declared for it): cfg_degree x ulysses_degree x ring_degree must be 1 but is {config.world_size}"
        )
    if config.ulysses_degree > 1 and not caps.ulysses:
        raise ValueError(f"the {caps.family} family does not support Ulysses parallelism (`ulysses_degree` > 1)")
    if config.ring_degree > 1 and not caps.ring:
        raise ValueError(f"the {caps.family} family does not support ring attention (`ring_degree` > 1)")
    if config.cfg_degree > caps.max_cfg_degree:
        raise ValueError(
            f"`cfg_degree` {config.cfg_degree} is more than the {caps.family} family supports ({caps.max_cfg_degree})"
        )
    if heads % config.ulysses_degree:
        raise ValueError(
            f"the {role} transformer's attention head count ({heads}) must be divisible by `ulysses_degree` "
            f"({config.ulysses_degree}): Ulysses gives each rank heads/ulysses_degree heads"
        )
    if bundles is not None and bundles != config.world_size:
        raise ValueError(
            f"cfg_degree x ulysses_degree x ring_degree = {config.cfg_degree} x {config.ulysses_degree} x "
            f"{config.ring_degree} = {config.world_size} ranks must equal the {role} replica's placement-group "
            f"bundles ({bundles}): one rank per bundle"
        )
    return caps


def load_transformer_config(engine_config, role: str) -> dict:
    """The config of the stage's transformer (heads, patch size), read without loading weights."""
    from serve import models

    pair = engine_config.models()
    source = pair.sketch if role == "sketch" else pair.render
    subfolder = None if role == "sketch" else pair.render_subfolder
    return models._transformer_config(models._locate(source, role), role, subfolder)


def latent_tokens(shape, patch) -> int:
    _, _, f, h, w = shape
    return (f // patch[0]) * (h // patch[1]) * (w // patch[2])


# --------------------------------------------------------------------------------------------------------------------
# xfuser on this process
# --------------------------------------------------------------------------------------------------------------------


def _needs_cpu_patch() -> bool:
    """Whether xfuser must be patched before import: exactly when torch has no usable CUDA device.

    xfuser 0.7.0 decides at import time, from the CUDA device, whether long-context attention (yunchang's Ulysses and
    ring groups) is available and whether its USP module binds yunchang's process groups; and from the torch build
    which device version and distributed backend to report (raising on a CPU-only build). Without a CUDA device it
    would therefore not import (CPU build) or silently run USP without its groups. With a device, nothing is patched:
    GPUs run xfuser exactly as shipped.
    """
    return not torch.cuda.is_available()


def _patch_xfuser_for_cpu() -> None:
    """Import xfuser on a CPU-only torch, ready for gloo (the way xfuser's own tests run its distributed code on CPU).

    1. `envs.get_device_version` / `get_torch_distributed_backend` raise without an accelerator; they are read while
       xfuser/__init__ runs. They return None (as xfuser does on MPS) and "gloo".
    2. `has_long_ctx_attn` is forced True (yunchang imports fine on CPU), so that initialize_model_parallel builds
       yunchang's Ulysses/ring groups and the sequence-parallel group reports the real Ulysses/ring sizes.
    3. USP's modules bind `PROCESS_GROUP = None` unless CUDA is available; they are rebound to yunchang's singleton.
    4. xfuser's SDPA_FLASH entry calls `aten._scaled_dot_product_flash_attention`, which has no CPU kernel; torch's
       CPU flash kernel (`_scaled_dot_product_flash_attention_for_cpu`, what F.scaled_dot_product_attention runs on
       CPU) has the same (out, logsumexp) contract, so SDPA_FLASH, and with it ring attention, runs on CPU too.

    xfuser/__init__ imports the whole package, so the package module is created without running it, xfuser.envs is
    imported and patched, and then xfuser/__init__ runs.
    """
    spec = importlib.util.find_spec("xfuser")
    if spec is None:
        raise ImportError("sequence parallelism needs xfuser: pip install 'srdiffusion-serve[parallel]'")
    package = importlib.util.module_from_spec(spec)
    sys.modules["xfuser"] = package
    try:
        import xfuser.envs as envs

        envs.get_device_version = lambda: None
        envs.get_torch_distributed_backend = lambda: "gloo"
        envs.PACKAGES_CHECKER.packages_info["has_long_ctx_attn"] = True
        spec.loader.exec_module(package)
    except BaseException:
        for name in [m for m in sys.modules if m == "xfuser" or m.startswith("xfuser.")]:
            del sys.modules[name]
        raise

    from yunchang.globals import PROCESS_GROUP

    for name in (
        "xfuser.model_executor.layers.usp",
        "xfuser.model_executor.layers.usp_legacy",
        "xfuser.core.sparge_attention.head_balance",
        "xfuser.core.distributed.fp8_comms",
    ):
        module = importlib.import_module(name)
        if getattr(module, "PROCESS_GROUP", None) is None:
            module.PROCESS_GROUP = PROCESS_GROUP

    from xfuser.core.distributed.attention_backend import ATTENTION_FUNCTION_REGISTRY, AttentionBackendType

    def _cpu_flash_attention(query, key, value, dropout_p, is_causal, attention_kwargs=None):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p=dropout_p, is_causal=is_causal
        )[:2]
        return out, lse

    ATTENTION_FUNCTION_REGISTRY[AttentionBackendType.SDPA_FLASH] = _cpu_flash_attention


def import_xfuser():
    """xfuser, imported the one way that works on this machine (see `_needs_cpu_patch`). Idempotent."""
    if "xfuser" not in sys.modules and _needs_cpu_patch():
        _patch_xfuser_for_cpu()
    import xfuser

    return xfuser


# --------------------------------------------------------------------------------------------------------------------
# Per rank: process groups, model, denoiser
# --------------------------------------------------------------------------------------------------------------------


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

    declared = [cls.__name__ for cls in type(model).__mro__ if cls.__name__ in _capabilities()]
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


class ParallelDenoiser(stages.GuidedDenoiser):
    """The stage denoiser interface on one rank of a ParallelContext: stages.GuidedDenoiser over xfuser's wrapper.

    cfg_degree 1: every rank runs all rows (cond, then uncond of guided requests), the sequence split by USP.
    cfg_degree 2: CFG group 0 runs the cond rows, group 1 the uncond rows; the predictions are all-gathered over the
    CFG group (padded to the same row count) and every rank applies `stages.combine_guidance`.
    """

    def __init__(self, transformer, ctx: ParallelContext, max_tokens_per_forward: int):
        super().__init__(transformer, max_tokens_per_forward)
        self.ctx = ctx

    def forward_rows(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Transformer forwards over row chunks, the sequence split over this rank's sequence-parallel group."""
        tokens = latent_tokens(latents.shape, self.transformer.config.patch_size)
        config = self.ctx.config
        config.check_tokens(tokens)
        # xfuser's wrapper zero-pads the sequence to a multiple of the SP degree and does not mask the padding; its
        # USP trims padded keys when told the valid length. The wrapper reads this dict (its attention_kwargs,
        # shared by its self-attention processors) during forward; a rank runs one forward at a time.
        kwargs = self.transformer.attention_kwargs
        if config.ring_degree == 1 and tokens % config.sp_degree:
            kwargs["valid_kv_len"] = tokens
        else:
            kwargs.pop("valid_kv_len", None)
        return super().forward_rows(latents, timesteps, embeds)

    def __call__(
        self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: list[PromptEmbeds], guidance: list[float]
    ) -> torch.Tensor:
        if self.ctx.config.cfg_degree == 1:
            return super().__call__(latents, timesteps, embeds, guidance)
        dtype = self.dtype
        x = latents.to(dtype)
        guided = [i for i, g in enumerate(guidance) if g > 1.0]
        if self.ctx.cfg_rank == 0:
            mine = [(x, timesteps, [e.prompt for e in embeds])]
        else:
            mine = [(x[guided], timesteps[guided], [embeds[i].negative for i in guided])] if guided else []
        rows = max(len(embeds), len(guided))
        out = torch.zeros((rows, *x.shape[1:]), dtype=dtype, device=x.device)
        for x_, t_, e_ in mine:
            out[: len(x_)] = self.forward_rows(x_, t_, torch.cat(e_).to(dtype))
        gathered = self.ctx.cfg_group.all_gather(out, dim=0)  # [cond rows (padded); uncond rows (padded)]
        cond, uncond = gathered[: len(embeds)], gathered[rows : rows + len(guided)]
        return stages.combine_guidance(cond, uncond, guided, guidance)


class ParallelWorker:
    """One rank of a stage's worker group (vLLM's worker): owns its device, its process groups and its model shard.

    Constructed on the rank's own process; construction returning is the READY handshake. The driver fans methods
    out by name to every rank and reads rank 0's result.
    """

    def __init__(
        self, rank: int, world_size: int, master_addr: str, master_port: int, engine_config, parallel_config,
        role: str = "sketch", device: str | None = None, num_threads: int | None = None,
    ):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.role = role
        device = device or engine_config.device
        self.ctx = init_rank(rank, world_size, master_addr, master_port, parallel_config, device)
        models = engine_config.models()
        source = models.sketch if role == "sketch" else models.render
        self.subfolder = None if role == "sketch" else models.render_subfolder  # Wan2.2: "transformer_2"
        self.weights = engine_config.weights
        transformer = self.load_transformer(source, role, engine_config.torch_dtype)
        self.denoiser = ParallelDenoiser(transformer, self.ctx, engine_config.max_tokens_per_forward)

    def load_transformer(self, source: str, role: str, dtype: torch.dtype):
        """The stage transformer on this rank's device, adopted by xfuser's wrapper (a subclass may wrap this:
        bench/sketch_scaling.py seeds the random-init build so that every rank draws the same weights)."""
        return load_parallel_transformer(source, role, self.ctx, dtype, self.weights, self.subfolder)

    def ready(self) -> dict:
        return {
            "rank": self.ctx.rank, "pid": os.getpid(), "device": str(self.ctx.device), "backend": self.ctx.backend,
            "cfg_rank": self.ctx.cfg_rank, "sp_rank": self.ctx.sp_rank,
            "attention_backend": self.denoiser.transformer.attention_backend,
        }

    @torch.inference_mode()
    def denoise(self, latents, timesteps, embeds: list[PromptEmbeds], guidance: list[float]):
        """The guided prediction on rank 0 (on its device); None elsewhere (only the output rank answers)."""
        device = self.ctx.device
        out = self.denoiser(latents.to(device), timesteps.to(device), [e.to(device) for e in embeds], guidance)
        return out if self.ctx.is_output_rank else None

    def shutdown(self) -> None:
        teardown(self.ctx)


# --------------------------------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------------------------------


class WorkerDiedError(RuntimeError):
    """A rank of a worker group exited; the group is unusable and has been shut down."""


class RemoteDenoiser:
    """The stage denoiser interface over a worker group: every call runs `denoise` on every rank, rank 0 answers.

    `group` is a ProcessWorkerGroup or deployments' RayWorkerGroup (anything with `execute(method, *args)`, `config`
    and `transformer_config`). Latents travel in the transformer's dtype (the first thing a denoiser does is cast
    them); the guided prediction comes back on the caller's device.
    """

    def __init__(self, group, dtype: torch.dtype):
        self.group = group
        self.config: ParallelConfig = group.config
        self.dtype = dtype
        self.patch = tuple(group.transformer_config["patch_size"])

    def __call__(self, latents, timesteps, embeds: list[PromptEmbeds], guidance: list[float]) -> torch.Tensor:
        self.config.check_tokens(latent_tokens(latents.shape, self.patch))  # fail here, not on every rank
        out = self.group.execute("denoise", latents.to(self.dtype), timesteps, embeds, list(guidance))
        return out.to(latents.device)


def to_cpu(value):
    """Tensors (also inside lists, tuples, dicts and PromptEmbeds) moved to the CPU: what crosses a process."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, PromptEmbeds):
        return value.to("cpu")
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    return value


def _worker_main(conn, worker_kwargs: dict, worker_cls: type[ParallelWorker] = ParallelWorker) -> None:
    """A spawned rank: build the worker, answer READY, then run (method, args, kwargs) messages until shutdown."""
    try:
        worker = worker_cls(**worker_kwargs)
        conn.send(("ok", worker.ready()))
    except BaseException as e:  # report, then exit: the driver raises it
        conn.send(("error", _portable(e), traceback.format_exc()))
        return
    while True:
        try:
            method, args, kwargs = conn.recv()
        except EOFError:  # driver gone
            break
        try:
            conn.send(("ok", to_cpu(getattr(worker, method)(*args, **kwargs))))
        except BaseException as e:
            conn.send(("error", _portable(e), traceback.format_exc()))
        if method == "shutdown":
            break


def _receive(conn, waiting: dict, results: dict, errors: dict) -> bool:
    """Read one rank's answer if there is one; False if none (nothing sent yet, or the rank exited without one)."""
    try:
        if not conn.poll():
            return False
        status, *payload = conn.recv()
    except (EOFError, OSError):
        return False
    rank = waiting.pop(conn)
    if status == "ok":
        results[rank] = payload[0]
    else:
        errors[rank] = payload
    return True


def _portable(e: BaseException) -> BaseException:
    """The exception itself if it pickles (so a ValueError stays a ValueError in the driver), else a RuntimeError."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


class ProcessWorkerGroup:
    """A stage's worker group as N spawned processes on this host (tests, CPU, or a GPU host without Ray).

    Validates the degrees against the model before spawning, waits for every rank's READY, fans methods out by name,
    returns rank 0's result, and watches the processes: a rank that dies fails the call with WorkerDiedError and
    takes the group down. `worker_cls` (a ParallelWorker subclass, importable by the spawned ranks) is vLLM's
    `worker_cls`: benchmarks use it to seed and time the ranks.
    """

    def __init__(
        self, engine_config, parallel_config: ParallelConfig, role: str = "sketch", devices: list[str] | None = None,
        num_threads: int | None = None, start_timeout_s: float = 600.0, error_grace_s: float = 30.0,
        worker_cls: type[ParallelWorker] = ParallelWorker,
    ):
        self.transformer_config = load_transformer_config(engine_config, role)
        check_parallel(parallel_config, self.transformer_config, role=role)
        n = parallel_config.world_size
        if devices is None:
            devices = [f"cuda:{r}" for r in range(n)] if engine_config.device.startswith("cuda") else ["cpu"] * n
        if len(devices) != n:
            raise ValueError(f"{len(devices)} devices given for a group of {n} ranks")
        self.config = parallel_config
        self.role = role
        self.error_grace_s = error_grace_s
        self._closed = False
        ctx = torch.multiprocessing.get_context("spawn")
        port = free_port()
        self._conns, self._procs = [], []
        for rank in range(n):
            parent, child = ctx.Pipe()
            kwargs = dict(
                rank=rank, world_size=n, master_addr="127.0.0.1", master_port=port, engine_config=engine_config,
                parallel_config=parallel_config, role=role, device=devices[rank], num_threads=num_threads,
            )
            proc = ctx.Process(
                target=_worker_main, args=(child, kwargs, worker_cls), daemon=True, name=f"srd-{role}-rank{rank}"
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        try:
            self.info = self._collect(start_timeout_s, "start")
        except BaseException:
            self.shutdown()
            raise

    @property
    def world_size(self) -> int:
        return len(self._procs)

    def execute(self, method: str, *args, timeout_s: float | None = None, **kwargs):
        """Run `method(*args, **kwargs)` on every rank; rank 0's result."""
        if self._closed:
            raise RuntimeError(f"the {self.role} worker group is shut down")
        message = (method, to_cpu(args), to_cpu(kwargs))
        for conn in self._conns:
            conn.send(message)
        return self._collect(timeout_s, method)[0]

    def _collect(self, timeout_s: float | None, what: str) -> list:
        results: dict[int, Any] = {}
        errors: dict[int, tuple] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        waiting = {conn: rank for rank, conn in enumerate(self._conns)}
        while waiting:
            if errors and deadline is None:
                deadline = time.monotonic() + self.error_grace_s
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            sentinels = {self._procs[r].sentinel: r for r in waiting.values()}
            ready = multiprocessing.connection.wait([*waiting, *sentinels], timeout=left)
            if not ready:
                break
            for obj in ready:
                if obj in waiting:
                    _receive(obj, waiting, results, errors)
            for rank in sorted(waiting.values()):
                conn = self._conns[rank]
                if not self._procs[rank].is_alive() and not _receive(conn, waiting, results, errors):
                    code = self._procs[rank].exitcode
                    self.shutdown()
                    raise WorkerDiedError(
                        f"{self.role} worker rank {rank} (pid {self._procs[rank].pid}) died during {what!r} "
                        f"with exit code {code}; the worker group has been shut down"
                    )
        if errors:
            rank, (exc, tb) = min(errors.items())
            if waiting:  # the others are stuck (e.g. in a collective the failed rank never joined)
                self.shutdown()
            exc.add_note(f"raised on {self.role} worker rank {rank} during {what!r}:\n{tb}")
            raise exc
        if waiting:
            self.shutdown()
            raise TimeoutError(f"{self.role} worker ranks {sorted(waiting.values())} did not answer {what!r} in time")
        return [results[r] for r in range(len(self._conns))]

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Tear down every rank's process groups, then end the processes. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for conn, proc in zip(self._conns, self._procs):
            if proc.is_alive():
                try:
                    conn.send(("shutdown", (), {}))
                except (BrokenPipeError, OSError):
                    pass
        deadline = time.monotonic() + timeout_s
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> ProcessWorkerGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.shutdown()
