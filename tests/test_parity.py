"""The engine computes what diffusers computes (DESIGN.md, "Seeds and parity").

Oracle: `WanPipeline(transformer=sketch, transformer_2=render, boundary_ratio=r)` with r * 1000 in (t_K, t_{K-1}]
sends steps 0..K-1 to the sketch model and K..N-1 to the render model; `output_type="latent"` returns the final
latents. The engine's switch step:K must give the same latents (float32, relative error <= 1e-5).
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

    run.scheduler_config = base.scheduler.config
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


@pytest.mark.parametrize(
    ("steps", "k", "seed"),
    [(4, 1, 0), (4, 3, 1), (6, 2, 2), (5, 4, 3)],
    ids=["N4-K1", "N4-K3", "N6-K2", "N5-K4"],
)
def test_step_switch_equals_diffusers_two_model_pipeline(any_engine, oracle, make_params, rel_err, steps, k, seed):
    params = make_params(num_inference_steps=steps, switch=f"step:{k}", seed=seed)
    expected = oracle(params, boundary_for(oracle.scheduler_config, params, k))

    sketch_calls, sketch_hook = count_forwards(any_engine.sketcher.denoiser.transformer)
    render_calls, render_hook = count_forwards(any_engine.renderer.denoiser.transformer)
    try:
        result = any_engine.generate(params, decode=False)
    finally:
        sketch_hook.remove()
        render_hook.remove()

    assert result.switch_step == k
    assert result.latents.dtype == torch.float32 and result.latents.shape == expected.shape
    assert rel_err(result.latents, expected) <= TOLERANCE
    # Guidance on: two rows per step, in two forwards or one.
    rows_per_forward = 1 if any_engine.config.max_tokens_per_forward == 1 else 2
    assert len(sketch_calls) == k * 2 // rows_per_forward
    assert len(render_calls) == (steps - k) * 2 // rows_per_forward


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
    calls, hook = count_forwards(any_engine.sketcher.denoiser.transformer)
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
    same = Engine(EngineConfig(sketch=tiny_models.sketch, render=f"{tiny_models.sketch}/transformer"))
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


def test_run_plan_runs_a_batch_in_plan_order_equal_to_each_request_alone(engine, make_params, rel_err):
    """serve.plan.run_plan (what the Engine and the benchmarks run): the stages in the plan's order, one call each
    for the whole batch, and each request's latents equal to generating it alone."""
    from serve.plan import run_plan

    batch = [make_params(seed=3, switch="step:2"), make_params(seed=4, switch="step:2", prompt="a blue cube")]
    plan = engine.plan(batch[0])
    calls = []
    run = run_plan(plan, batch, engine.encoder, {"sketch": engine.sketcher, "render": engine.renderer},
                   engine.decoder, around=lambda stage, call: calls.append(stage) or call())
    assert calls == list(plan.stages) == ["encode", "sketch", "render", "decode"]
    assert [h.step_index for h in run.outputs["sketch"]] == [2, 2]
    assert len(run.frames) == 2
    for params, latents in zip(batch, run.latents):
        assert rel_err(latents, engine.generate(params, decode=False).latents) <= TOLERANCE
