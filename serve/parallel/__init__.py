"""Sequence-parallel (xfuser USP) and CFG-parallel denoising over a group of ranks, one rank per device.

A stage (sketch, or render with its own degree) can spread each transformer forward over
N = cfg_degree x ulysses_degree x ring_degree ranks. One module per concern:

    config          ParallelConfig, check_parallel (before any rank starts or any weights load), latent_tokens
    xfuser_cpu      import_xfuser: xfuser as shipped on a GPU, patched for gloo on a CPU-only torch
    context         init_rank / teardown: one rank's process groups as an explicit ParallelContext;
                    to_sequence_parallel: the diffusers transformer adopted by xfuser's wrapper
    worker          ParallelDenoiser (CFG-parallel maths over USP) and ParallelWorker (one rank: device, groups,
                    model, the batch's prompt embeddings, `denoise`)
    group           WorkerGroup: the one worker-group interface, its fan-out and rank-failure handling
                    (WorkerDiedError, WorkerTimeoutError; a broken group stays broken)
    process_group   ProcessWorkerGroup: ranks as spawned processes (tests, CPU, a host without Ray); the Ray actor
                    group with the same interface lives in deployments/worker_group.py
    remote          RemoteDenoiser: the stage denoiser interface in the driver; prompt embeddings cross to the
                    ranks once per batch, each step carries latents, timesteps and guidance

No Ray here: the engine runs without it. This module is the package's public face.
"""

from serve.parallel.config import (
    ATTENTION_BACKENDS, LSE_BACKENDS, AttentionBackend, ParallelConfig, capabilities_for, check_parallel,
    latent_tokens, load_transformer_config,
)
from serve.parallel.context import (
    ParallelContext, free_port, init_rank, load_parallel_transformer, teardown, to_sequence_parallel,
)
from serve.parallel.group import (
    Traffic, WorkerDiedError, WorkerGroup, WorkerGroupError, WorkerTimeoutError, tensor_bytes, to_cpu,
)
from serve.parallel.process_group import ProcessWorkerGroup
from serve.parallel.remote import HeldPrompts, RemoteDenoiser
from serve.parallel.worker import ParallelDenoiser, ParallelWorker
from serve.parallel.xfuser_cpu import import_xfuser

__all__ = [
    "ATTENTION_BACKENDS", "LSE_BACKENDS", "AttentionBackend", "HeldPrompts", "ParallelConfig", "ParallelContext",
    "ParallelDenoiser", "ParallelWorker", "ProcessWorkerGroup", "RemoteDenoiser", "Traffic", "WorkerDiedError",
    "WorkerGroup", "WorkerGroupError", "WorkerTimeoutError", "capabilities_for", "check_parallel", "free_port",
    "import_xfuser", "init_rank", "latent_tokens", "load_parallel_transformer", "load_transformer_config",
    "tensor_bytes", "teardown", "to_cpu", "to_sequence_parallel",
]
