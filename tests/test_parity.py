"""The engine computes what diffusers computes (docs/ARCHITECTURE.md, "Contracts").

Oracle: `WanPipeline(transformer=sketch, transformer_2=render, boundary_ratio=r)` with r * 1000 in (t_K, t_{K-1}]
sends steps 0..K-1 to the sketch model and K..N-1 to the render model; `output_type="latent"` returns the final
latents. The engine's switch step:K must give the same latents (float32, relative error <= 1e-5). A plan of more
segments (step:A:B) is held against WanPipeline with the transformer swapped in `callback_on_step_end`.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

from serve.engine import Engine, EngineConfig

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def oracle(tiny_models):
    """oracle(params, boundary_ratio=None, render=True) -> diffusers' final latents for the same request."""
    base = WanPipeline.from_pretrained(tiny_models.sketch)
    render = WanTransformer3DModel.from_pretrained(tiny_models.render)

    def run(params, boundary_ratio: float | None = None, render_model=render):
        pipe = WanPipeline(
            tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
            scheduler=UniPCMultistepScheduler.from_config(base.scheduler.config, flow_shift=params.flow_shift),
            transformer=base.transformer,
            transformer_2=render_model if boundary_ratio is not None else None,
            boundary_ratio=boundary_ratio,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            prompt=params.prompt, negative_prompt=params.negative_prompt, height=params.height, width=params.width,
            num_frames=params.num_frames, num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale, generator=torch.Generator("cpu").manual_seed(params.seed),
            output_type="latent",
        ).frames

    def swapped(params, swaps: dict[int, object]):
        """diffusers' pipeline with the sketch transformer at first and `swaps[i]` from step i on (the callback
        after step i-1 sets it)."""
        pipe = WanPipeline(
            tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
            scheduler=UniPCMultistepScheduler.from_config(base.scheduler.config, flow_shift=params.flow_shift),
            transformer=base.transformer,
        )
        pipe.set_progress_bar_config(disable=True)

        def swap(pipeline, index, timestep, tensors):
            if index + 1 in swaps:
                pipeline.transformer = swaps[index + 1]
            return tensors

        return pipe(
            prompt=params.prompt, negative_prompt=params.negative_prompt, height=params.height, width=params.width,
            num_frames=params.num_frames, num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale, generator=torch.Generator("cpu").manual_seed(params.seed),
            output_type="latent", callback_on_step_end=swap,
        ).frames

    run.scheduler_config = base.scheduler.config
    run.swapped = swapped
    run.large, run.small = base.transformer, render
    return run


def boundary_for(scheduler_config, params, k: int) -> float:
    """A boundary_ratio r with r * 1000 in (t_K, t_{K-1}]: diffusers then sketches exactly steps 0..K-1."""
    scheduler = UniPCMultistepScheduler.from_config(scheduler_config, flow_shift=params.flow_shift)
    scheduler.set_timesteps(params.num_inference_steps)
    t = scheduler.timesteps.tolist()
    r = (t[k] + t[k - 1]) / 2000
    assert t[k] < r * 1000 <= t[k - 1]
    return r


_engines: dict[int, Engine] = {}


@pytest.fixture(params=[1, 1 << 20], ids=["two-forwards", "one-batched-forward"])
def any_engine(request, tiny_config):
    """The tiny engine with max_tokens_per_forward=1 (cond and uncond as two forwards, exactly as diffusers does)
    and with a large limit (cond and uncond stacked into one forward)."""
    limit = request.param
    if limit not in _engines:
        _engines[limit] = Engine(tiny_config.model_copy(update={"max_tokens_per_forward": limit}))
    return _engines[limit]


def count_forwards(transformer):
    calls = []
    handle = transformer.register_forward_hook(lambda module, args, kwargs, out: calls.append(1), with_kwargs=True)
    return calls, handle


def generate_counting_forwards(engine, params):
    """The engine's latents-only result, and how many forwards the sketch and the render transformer ran."""
    sketch_calls, sketch_hook = count_forwards(engine.stages["sketch"].denoiser.transformer)
    render_calls, render_hook = count_forwards(engine.stages["render"].denoiser.transformer)
    try:
        return engine.generate(params, decode=False), len(sketch_calls), len(render_calls)
    finally:
        sketch_hook.remove()
        render_hook.remove()


@pytest.mark.parametrize(
    ("steps", "k", "seed"),
    [(4, 1, 0), (4, 3, 1), (6, 2, 2), (5, 4, 3)],
    ids=["N4-K1", "N4-K3", "N6-K2", "N5-K4"],
)
def test_step_switch_equals_diffusers_two_model_pipeline(any_engine, oracle, make_params, rel_err, steps, k, seed):
    params = make_params(num_inference_steps=steps, switch=f"step:{k}", seed=seed)
    expected = oracle(params, boundary_for(oracle.scheduler_config, params, k))
    result, sketch_calls, render_calls = generate_counting_forwards(any_engine, params)

    assert result.switch_step == k
    assert result.latents.dtype == torch.float32 and result.latents.shape == expected.shape
    assert rel_err(result.latents, expected) <= TOLERANCE
    # Guidance on: two rows per step, in two forwards or one.
    rows_per_forward = 1 if any_engine.config.max_tokens_per_forward == 1 else 2
    assert sketch_calls == k * 2 // rows_per_forward
    assert render_calls == (steps - k) * 2 // rows_per_forward


@pytest.mark.parametrize(("steps", "seed"), [(1, 4), (4, 5)])
def test_no_switch_equals_plain_pipeline(any_engine, oracle, make_params, rel_err, steps, seed):
    """K = N: the render model never runs; the result is plain WanPipeline with the sketch transformer."""
    params = make_params(num_inference_steps=steps, switch=f"step:{steps}", seed=seed)
    result = any_engine.generate(params, decode=False)
    assert result.switch_step == steps
    assert rel_err(result.latents, oracle(params)) <= TOLERANCE


def test_render_model_and_seed_matter(engine, make_params, rel_err):
    """Guards the parity tests against passing vacuously (e.g. a zero-output model)."""
    sketched_only = engine.generate(make_params(switch="step:4"), decode=False).latents
    rendered = engine.generate(make_params(switch="step:1"), decode=False).latents
    other_seed = engine.generate(make_params(switch="step:4", seed=1), decode=False).latents
    assert rel_err(rendered, sketched_only) > 1e-2
    assert rel_err(other_seed, sketched_only) > 1e-2


@pytest.mark.parametrize(
    ("ratio", "expected_k"),
    [(0.8, 2), (0.75, 3), (0.1, 4), (1.0, 0)],
    ids=["between-steps", "exactly-on-t", "all-sketched", "nothing-sketched"],
)
def test_boundary_policy_equals_diffusers_boundary_ratio(engine, oracle, make_params, rel_err, ratio, expected_k):
    """Timesteps for N=4 are [999, 900, 750, 500]; t >= ratio * 1000 is sketched, as in diffusers."""
    params = make_params(switch=f"boundary:{ratio}", seed=6)
    result = engine.generate(params, decode=False)
    assert result.switch_step == expected_k
    assert rel_err(result.latents, oracle(params, boundary_ratio=ratio)) <= TOLERANCE


@pytest.mark.parametrize("guidance", [1.0, 0.5])
def test_without_guidance_equals_diffusers(any_engine, oracle, make_params, rel_err, guidance):
    """guidance_scale <= 1 turns classifier-free guidance off: one row per step, no negative embeddings."""
    params = make_params(guidance_scale=guidance, switch="step:2", seed=7)
    assert not params.do_cfg
    calls, hook = count_forwards(any_engine.stages["sketch"].denoiser.transformer)
    try:
        result = any_engine.generate(params, decode=False)
    finally:
        hook.remove()
    assert len(calls) == 2  # K = 2 steps, one forward each
    assert rel_err(result.latents, oracle(params, boundary_for(oracle.scheduler_config, params, 2))) <= TOLERANCE


def test_same_transformer_in_both_stages_gives_single_model_result(tiny_models, oracle, make_params, rel_err):
    """Render with the sketch pipeline's own transformer directory: every K gives the one-model trajectory, so the
    hand-off (latent, step index, sampler state) loses nothing."""
    steps = 5
    same = Engine(EngineConfig(sketch=tiny_models.sketch, render=f"{tiny_models.sketch}/transformer",
                               speed="exact"))
    single = oracle(make_params(num_inference_steps=steps, seed=8))
    for k in range(1, steps + 1):
        result = same.generate(make_params(num_inference_steps=steps, seed=8, switch=f"step:{k}"), decode=False)
        assert result.switch_step == k
        assert rel_err(result.latents, single) <= TOLERANCE, f"K={k}"


@pytest.mark.parametrize(
    ("height", "width", "frames"), [(48, 32, 1), (32, 64, 9)], ids=["tall-one-frame", "wide-nine-frames"]
)
def test_parity_holds_for_other_shapes(engine, oracle, make_params, rel_err, height, width, frames):
    """Non-square frames and other frame counts: the noise shape and draw order follow diffusers' prepare_latents."""
    params = make_params(height=height, width=width, num_frames=frames, switch="step:2", seed=9)
    result = engine.generate(params, decode=False)
    expected = oracle(params, boundary_for(oracle.scheduler_config, params, 2))
    assert result.latents.shape == expected.shape == (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    assert rel_err(result.latents, expected) <= TOLERANCE


@pytest.mark.parametrize(("steps", "switch", "a", "b"), [(6, "step:2:4", 2, 4), (5, "step:1:4", 1, 4),
                                                      (8, "ratio:0.25:0.75", 2, 6)])
def test_three_segments_equal_diffusers_with_the_transformer_swapped(any_engine, oracle, make_params, rel_err,
                                                                     steps, switch, a, b):
    """Large for steps < A, small for A..B-1, large again from B: each switch a hand-off, the same latents as
    diffusers' pipeline whose transformer is swapped at steps A and B, and each model runs its own steps."""
    params = make_params(num_inference_steps=steps, switch=switch, seed=10)
    expected = oracle.swapped(params, {a: oracle.small, b: oracle.large})
    result, sketch_calls, render_calls = generate_counting_forwards(any_engine, params)
    assert result.segments == [("sketch", 0, a), ("render", a, b), ("sketch.2", b, steps)]
    assert rel_err(result.latents, expected) <= TOLERANCE
    rows_per_forward = 1 if any_engine.config.max_tokens_per_forward == 1 else 2
    assert sketch_calls == (a + steps - b) * 2 // rows_per_forward
    assert render_calls == (b - a) * 2 // rows_per_forward
    # guards the oracle: swapping at other steps gives other latents
    assert rel_err(oracle.swapped(params, {a: oracle.small}), expected) > 1e-2


def test_a_batch_runs_each_step_once_for_all_and_equals_each_request_alone(engine, make_params, rel_err):
    """Engine.generate_batch (what the benchmarks run): one stage call per step for the whole batch, in the
    steps' order, and each request's latents equal to generating it alone."""
    batch = [make_params(seed=3, switch="step:2"), make_params(seed=4, switch="step:2", prompt="a blue cube")]
    calls = []
    runs = {name: stage.run for name, stage in engine.stages.items()}
    for name, stage in engine.stages.items():
        stage.run = lambda tasks, on_step=None, name=name: calls.append(name) or runs[name](tasks, on_step)
    try:
        results = engine.generate_batch(batch)
    finally:
        for stage in engine.stages.values():
            del stage.run
    assert calls == ["encode", "sketch", "render", "decode"]  # side steps (the preview) only when asked
    assert [r.switch_step for r in results] == [2, 2] and all(r.frames is not None for r in results)
    for params, result in zip(batch, results):
        assert rel_err(result.latents, engine.generate(params, decode=False).latents) <= TOLERANCE
