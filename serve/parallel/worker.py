"""One rank of a stage's worker group: its denoiser (CFG-parallel maths over USP) and the worker the driver calls.

    ParallelDenoiser   the stage denoiser interface on one rank: with cfg_degree 2, CFG group 0 runs the cond rows and
                       group 1 the uncond rows, the predictions are all-gathered over the CFG group and every rank
                       applies `combine_guidance`; inside a group xfuser splits the sequence
    ParallelWorker     vLLM's worker: owns its device, process groups and model; holds the prompt embeddings the
                       driver sent for the current batch (`hold_prompts`), so that a step (`denoise`) carries only
                       latents, timesteps, prompt keys and guidance

With identical inputs on every rank (SPMD), every rank computes the same guided prediction; rank 0's is returned.
"""

from __future__ import annotations

import os

import torch

from serve.denoise import GuidedDenoiser, combine_guidance
from serve.handoff import PromptEmbeds
from serve.parallel.config import latent_tokens
from serve.parallel.context import ParallelContext, init_rank, load_parallel_transformer, teardown


class ParallelDenoiser(GuidedDenoiser):
    """The stage denoiser interface on one rank of a ParallelContext: GuidedDenoiser over xfuser's wrapper.

    cfg_degree 1: every rank runs all rows (cond, then uncond of guided requests), the sequence split by USP.
    cfg_degree 2: CFG group 0 runs the cond rows, group 1 the uncond rows; the predictions are all-gathered over the
    CFG group (padded to the same row count) and every rank applies `combine_guidance`.
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
        return combine_guidance(cond, uncond, guided, guidance)




class ParallelWorker:
    """One rank of a stage's worker group (vLLM's worker): owns its device, its process groups and its model shard.

    Constructed on the rank's own process; construction returning is the READY handshake. The driver fans methods
    out by name to every rank and reads rank 0's result. The prompt embeddings of the batch being denoised stay here,
    on the rank's device, under keys the driver chose (`hold_prompts`); each step names them by key.
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
        source, self.subfolder = engine_config.models().transformer(role)  # Wan2.2's render: "transformer_2"
        self.weights = engine_config.weights
        self.prompts: dict[int, PromptEmbeds] = {}
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

    def hold_prompts(self, add: dict[int, PromptEmbeds], drop: list[int]) -> None:
        """Keep `add`'s embeddings on this rank's device for the steps that follow; forget the `drop` keys."""
        for key in drop:
            self.prompts.pop(key, None)
        self.prompts.update({key: embeds.to(self.ctx.device) for key, embeds in add.items()})

    def held_prompts(self) -> list[int]:
        return sorted(self.prompts)

    @torch.inference_mode()
    def denoise(self, latents, timesteps, prompts: list[int], guidance: list[float]):
        """One step: the guided prediction for rows whose embeddings are held under `prompts`, on rank 0 (on its
        device); None elsewhere (only the output rank answers)."""
        device = self.ctx.device
        embeds = [self.prompts[key] for key in prompts]
        out = self.denoiser(latents.to(device), timesteps.to(device), embeds, guidance)
        return out if self.ctx.is_output_rank else None

    def shutdown(self) -> None:
        self.prompts.clear()
        teardown(self.ctx)
