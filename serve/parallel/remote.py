"""The stage denoiser interface in the driver, over a worker group: the denoising loop stays here, each transformer
forward runs on every rank.

The loop, the sampler, switch tracking, progress and cancellation stay in the driver and run the same
denoising loop (serve/denoise.py) as the one-rank engine: only the forward is distributed, as in vLLM's executor.
A step sends the ranks only what changes per step (latents, timesteps, guidance); a request's prompt embeddings
cross once, the first time a step names them, and stay on the ranks while the loop runs.
"""

from __future__ import annotations

import itertools
import threading
import weakref

import torch

from serve.handoff import PromptEmbeds
from serve.parallel.config import ParallelConfig, latent_tokens


class HeldPrompts:
    """Which prompt embeddings the ranks hold, under which keys, as the driver sees it.

    Keyed by the PromptEmbeds objects the loop passes (the same object every step of a stage call), held weakly: an
    object nobody holds any more (its stage call returned) is dropped from the ranks with the next prompts sent. A
    new batch's loop passes new objects, so each batch's embeddings cross once.
    """

    def __init__(self):
        self._held: dict[int, tuple[int, weakref.ref]] = {}  # id(embeds) -> (key, weak reference)
        self._keys = itertools.count()
        self._lock = threading.Lock()  # a replica may run stage calls in several threads

    def keys(self, embeds: list[PromptEmbeds], send) -> list[int]:
        """The ranks' keys for `embeds`; first `send(add, drop)` the embeddings they lack (and the keys of those no
        caller holds any more), if any."""
        with self._lock:
            dead = [key for key, ref in self._held.values() if ref() is None]
            held = {i: entry for i, entry in self._held.items() if entry[1]() is not None}
            add = {}
            for e in embeds:
                if id(e) not in held:
                    held[id(e)] = (next(self._keys), weakref.ref(e))
                    add[held[id(e)][0]] = e
            if add:
                send(add, dead)
                self._held = held
            return [held[id(e)][0] for e in embeds]


class RemoteDenoiser:
    """The stage denoiser interface over a worker group: every call runs `denoise` on every rank, rank 0 answers.

    `group` is anything with `execute(method, *args)`, `config` and `transformer_config` (a WorkerGroup: the
    ProcessWorkerGroup or deployments' RayWorkerGroup). Latents travel in the transformer's dtype (the first thing a
    denoiser does is cast them); the guided prediction comes back on the caller's device.
    """

    def __init__(self, group, dtype: torch.dtype):
        self.group = group
        self.config: ParallelConfig = group.config
        self.dtype = dtype
        self.patch = tuple(group.transformer_config["patch_size"])
        self.prompts = HeldPrompts()

    def __call__(self, latents, timesteps, embeds: list[PromptEmbeds], guidance: list[float]) -> torch.Tensor:
        self.config.check_tokens(latent_tokens(latents.shape, self.patch))  # fail here, not on every rank
        keys = self.prompts.keys(embeds, lambda add, drop: self.group.execute("hold_prompts", add, drop))
        out = self.group.execute("denoise", latents.to(self.dtype), timesteps, keys, list(guidance))
        return out.to(latents.device)
