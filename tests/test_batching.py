"""Several requests in one stage call (what a batching deployment does) give each request its own unbatched result."""

from __future__ import annotations

import pytest

from serve.pipeline.segment import RenderStage, SketchStage
from serve.denoise import Cancelled

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def requests(make_params):
    return [
        make_params(seed=1, guidance_scale=5.0, switch="step:1"),
        make_params(seed=2, guidance_scale=1.0, switch="step:3"),  # no CFG: one row, no negative embeddings
        make_params(seed=3, guidance_scale=3.0, switch="step:2", num_inference_steps=5, negative_prompt="blurry"),
        make_params(seed=4, guidance_scale=5.0, switch="step:4"),  # K = N: nothing to render
    ]


@pytest.fixture(scope="module")
def mixed_shapes(make_params):
    return [
        make_params(seed=5, switch="step:2"),
        make_params(seed=6, switch="step:1", num_frames=9, height=48),
        make_params(seed=7, switch="step:3", width=64, guidance_scale=1.0),
        make_params(seed=8, switch="step:2", num_frames=9, height=48, guidance_scale=2.0),
    ]


_unbatched: dict = {}


def unbatched(engine, params):
    """One request alone through the engine's stages: its hand-off and final latents (computed once per request)."""
    if params not in _unbatched:
        (embeds,) = engine.stages["encode"]([params])
        (handoff,) = engine.stages["sketch"]([(params, embeds)])
        (latents,) = engine.stages["render"]([handoff])
        _unbatched[params] = handoff, latents
    return _unbatched[params]


@pytest.fixture(params=[None, 16], ids=["one-forward", "two-rows-per-forward"])
def stages(request, engine, tiny_config):
    """The engine's own stages (all rows in one forward), or stages whose forwards take at most 2 rows of the
    8-token test latents, so a batch is split over several forwards."""
    if request.param is None:
        return engine.stages["sketch"], engine.stages["render"]
    config = tiny_config.model_copy(update={"max_tokens_per_forward": request.param})
    return SketchStage.load(config), RenderStage.load(config)


@pytest.mark.parametrize("batch", ["requests", "mixed_shapes"])
def test_batched_stages_equal_unbatched(engine, stages, rel_err, batch, request):
    batch = request.getfixturevalue(batch)
    sketcher, renderer = stages
    embeds = engine.stages["encode"](batch)  # one encoder call for the whole batch, too
    handoffs = sketcher(list(zip(batch, embeds)))
    finals = renderer(handoffs)

    for params, handoff, latents in zip(batch, handoffs, finals):
        alone_handoff, alone = unbatched(engine, params)
        assert handoff.step_index == alone_handoff.step_index == params.switch.value
        assert rel_err(handoff.latents, alone_handoff.latents) <= TOLERANCE
        assert latents.shape == alone.shape
        assert rel_err(latents, alone) <= TOLERANCE


def test_requests_in_a_batch_differ(engine, requests, rel_err):
    """Guards the batching test: the rows really are different requests (seed, guidance, K all matter)."""
    embeds = engine.stages["encode"](requests)
    finals = engine.stages["render"](engine.stages["sketch"](list(zip(requests, embeds))))
    for i in range(len(finals)):
        for j in range(i):
            assert rel_err(finals[i], finals[j]) > 1e-2


def test_cancelling_one_request_leaves_the_others(engine, requests, rel_err):
    embeds = engine.stages["encode"](requests)
    stop_second_at_step_1 = lambda index, step, total: not (index == 1 and step == 1)  # noqa: E731
    handoffs = engine.stages["sketch"](list(zip(requests, embeds)), on_step=stop_second_at_step_1)
    assert isinstance(handoffs[1], Cancelled) and handoffs[1].step_index == 1
    for i in (0, 2, 3):
        _, alone = unbatched(engine, requests[i])
        (latents,) = engine.stages["render"]([handoffs[i]])
        assert rel_err(latents, alone) <= TOLERANCE
