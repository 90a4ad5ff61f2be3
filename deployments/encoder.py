"""Encoder deployment: the text encoder (umT5), with an LRU cache of prompt embeddings.

The embeddings do not depend on the video's shape, so the encoder batches any requests together (one queue). Each
job's embeddings are stored as its first checkpoint (EMBEDS), where the sketcher reads them.
"""

from __future__ import annotations

from collections import OrderedDict

from deployments.batching import StageDone, StageRunner
from deployments.config import EncoderConfig, JobsConfig
from serve.checkpoint import embeds_to_bytes
from serve.engine import EncodeStage, EngineConfig
from serve.handoff import PromptEmbeds
from serve.request import GenerationParams
from serve.results import EMBEDS, ResultStore
from serve.stages import Cancelled

CacheKey = tuple[str, str, bool]


def cache_key(params: GenerationParams) -> CacheKey:
    """What the embeddings depend on: without guidance the negative prompt is not encoded at all."""
    return (params.prompt, params.negative_prompt if params.do_cfg else "", params.do_cfg)


class EmbeddingCache:
    """Least-recently-used prompt embeddings (CPU tensors), at most `capacity` of them."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[CacheKey, PromptEmbeds] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: CacheKey) -> PromptEmbeds | None:
        embeds = self._entries.get(key)
        if embeds is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return embeds

    def put(self, key: CacheKey, embeds: PromptEmbeds) -> None:
        if self.capacity == 0:
            return
        self._entries[key] = embeds
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


class Encoder:
    def __init__(self, engine: EngineConfig, config: EncoderConfig, jobs: JobsConfig):
        self._stage = EncodeStage(engine)
        self._cache = EmbeddingCache(config.cache_size)
        self._results = ResultStore(jobs.results)
        self._runner = StageRunner("encode", config.batching, jobs, self._encode_jobs)

    async def encode(self, job_id: str, params: GenerationParams) -> StageDone | Cancelled:
        return await self._runner.run(job_id, params)

    def _encode_jobs(self, job_ids: list[str], requests: list[GenerationParams], on_step=None) -> list[dict]:
        for job_id, embeds in zip(job_ids, self.embed(requests)):
            self._results.put(job_id, EMBEDS, embeds_to_bytes(embeds))
        return [{} for _ in job_ids]

    def embed(self, requests: list[GenerationParams]) -> list[PromptEmbeds]:
        """Embeddings of each request's prompts, from the cache where it has them."""
        keys = [cache_key(r) for r in requests]
        found = {key: self._cache.get(key) for key in dict.fromkeys(keys)}
        missing = {key: r for key, r in zip(keys, requests) if found[key] is None}
        if missing:  # one engine call for all prompts not seen before (each distinct prompt once)
            for key, embeds in zip(missing, self._stage(list(missing.values()))):
                found[key] = embeds
                self._cache.put(key, embeds)
        return [found[key] for key in keys]

    async def stats(self) -> dict:
        return {**self._runner.stats(), "cache": {"hits": self._cache.hits, "misses": self._cache.misses}}

    async def record_autoscaling_stats(self) -> dict[str, float]:  # Ray Serve's hook for custom autoscaling metrics
        return self._runner.autoscaling_stats()
