"""The encode stage: the prompts' text embeddings, with the sketch pipeline's text encoder (shared by both models,
so a prompt is encoded once), and an LRU cache of embeddings for prompts seen before."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from serve.handoff import PromptEmbeds
from serve.models import ModelCache
from serve.pipeline.artifacts import EMBEDS
from serve.pipeline.stage import Output, Stage, Task
from serve.request import GenerationParams

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


class EncodeStage(Stage):
    name = "encode"
    deployment = "Encoder"
    writes = (EMBEDS,)

    def __init__(self, family, pipe, device: str, cache_size: int):
        self.family = family
        self.pipe = pipe
        self.device = device
        self.cache = EmbeddingCache(cache_size)

    @classmethod
    def load(cls, config, models=None, cache_size: int = 0) -> EncodeStage:
        family = config.family()
        components = ("text_encoder", "tokenizer")
        source = config.models().sketch
        pipe = (models or ModelCache()).get(("pipeline", source, components), lambda: family.load_pipeline(
            source, components, config.device, config.torch_dtype, config.weights))
        return cls(family, pipe, config.device, cache_size)

    @staticmethod
    def batch_key(params: GenerationParams) -> Hashable:
        return ()  # embeddings do not depend on the video's shape: any prompts share a call

    def __call__(self, requests: list[GenerationParams]) -> list[PromptEmbeds]:
        """Each request's embeddings, from the cache where it has them; one encoder call for the others (each
        distinct prompt once)."""
        keys = [cache_key(r) for r in requests]
        found = {key: self.cache.get(key) for key in dict.fromkeys(keys)}
        missing = {key: r for key, r in zip(keys, requests) if found[key] is None}
        if missing:
            for key, embeds in zip(missing, self.family.encode(self.pipe, list(missing.values()), self.device)):
                found[key] = embeds
                self.cache.put(key, embeds)
        return [found[key] for key in keys]

    def run(self, tasks: list[Task], on_step=None) -> list[Output]:
        return [Output({EMBEDS: embeds}) for embeds in self([task.params for task in tasks])]

    def stats(self) -> dict:
        return {"cache": {"hits": self.cache.hits, "misses": self.cache.misses}}
