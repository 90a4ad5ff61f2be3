"""LoRA adapters per stage and per request (serve/lora.py), on the tiny preset, without Ray.

Adapters are made here with PEFT (random A and B on the tiny models' attention projections, saved as diffusers
saves a trained LoRA). Oracle: diffusers' `WanPipeline` with the same adapters loaded by its own
`load_lora_weights` (the render one with `load_into_transformer_2`). The served path is the stage deployments and
the drive loop in this process (tests/conftest.py `InProcessApp`) behind the HTTP routes (FastAPI's TestClient).
"""

from __future__ import annotations

import time

import pytest
import torch

TOLERANCE = 1e-5
SMALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 4, "switch": "step:2"}
PROMPT = "a red ball bouncing"
DISTILLED_STEPS = 3


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory) -> dict[str, str]:
    """Adapter directories by name: two of the sketch model, one of the render model, a "distilled" sketch one."""
    from serve.lora import save_random_adapter
    from serve.tiny import tiny_transformer

    root = tmp_path_factory.mktemp("loras")
    made = {}
    for name, (heads, layers, seed) in {"style_a": (4, 2, 11), "style_b": (4, 2, 12), "texture": (2, 1, 13),
                                        "distilled": (4, 2, 14)}.items():
        # the tiny sketch model has 4 heads and 2 layers, the render model 2 and 1 (serve/tiny.py)
        made[name] = save_random_adapter(tiny_transformer(heads, layers, seed=0), root / name, rank=4, seed=seed,
                                         std=0.1)
    return made


def registry(adapters: dict[str, str]) -> dict:
    return {
        "style_a": {"path": adapters["style_a"], "stage": "sketch"},
        "style_b": {"path": adapters["style_b"], "stage": "sketch"},
        "texture": {"path": adapters["texture"], "stage": "render"},
        "distilled": {"path": adapters["distilled"], "stage": "sketch", "num_inference_steps": DISTILLED_STEPS,
                      "guidance_scale": 1.0},
    }


@pytest.fixture(scope="module")
def lora_config(adapters):
    from serve.config import EngineConfig

    # two adapters loaded at most: the third evicts the least recently used
    return EngineConfig(preset="tiny", speed="exact", loras=registry(adapters), max_loaded_loras=2)


@pytest.fixture(scope="module")
def lora_engine(lora_config):
    from serve.engine import Engine

    return Engine(lora_config)


@pytest.fixture(scope="module")
def params(lora_config):
    """params(**fields) -> GenerationParams resolved against the tiny preset and the registry."""
    from serve.request import VideoRequest

    def make(**fields):
        return VideoRequest(**{"prompt": PROMPT, "seed": 0, **SMALL, **fields}).resolve(
            lora_config.defaults, loras=lora_config.loras, max_loras=lora_config.max_loaded_loras)

    return make


@pytest.fixture(scope="module")
def oracle(tiny_models, adapters):
    """oracle(params, sketch={name: scale}, render={name: scale}) -> diffusers' final latents with those adapters
    loaded into its pipeline (sketch steps 0..K-1 on `transformer`, the rest on `transformer_2`)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    base = WanPipeline.from_pretrained(tiny_models.sketch)
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                       scheduler=base.scheduler, transformer=base.transformer,
                       transformer_2=WanTransformer3DModel.from_pretrained(tiny_models.render))
    pipe.set_progress_bar_config(disable=True)
    for name in ("style_a", "style_b"):
        pipe.load_lora_weights(adapters[name], adapter_name=name)
    pipe.load_lora_weights(adapters["texture"], adapter_name="texture", load_into_transformer_2=True)

    def run(p, sketch: dict[str, float], render: dict[str, float]):
        k = int(str(p.switch).split(":")[1])
        scheduler = UniPCMultistepScheduler.from_config(base.scheduler.config, flow_shift=p.flow_shift)
        scheduler.set_timesteps(p.num_inference_steps)
        t = scheduler.timesteps.tolist()
        pipe.scheduler, pipe.config.boundary_ratio = scheduler, (t[k] + t[k - 1]) / 2000
        for model, chosen in ((pipe.transformer, sketch), (pipe.transformer_2, render)):
            if chosen:
                model.enable_lora()
                model.set_adapters(list(chosen), weights=list(chosen.values()))
            else:
                model.disable_lora()
        return pipe(prompt=p.prompt, negative_prompt=p.negative_prompt, height=p.height, width=p.width,
                    num_frames=p.num_frames, num_inference_steps=p.num_inference_steps,
                    guidance_scale=p.guidance_scale, guidance_scale_2=p.render_guidance,
                    generator=torch.Generator("cpu").manual_seed(p.seed), output_type="latent").frames

    return run


# -- must-show 1: the engine equals diffusers with the same adapters ---------------------------------------------

def test_a_request_with_adapters_equals_diffusers_with_them_loaded(lora_engine, engine, oracle, params, rel_err):
    with_adapters = params(sketch_loras=[{"name": "style_a", "scale": 0.8}], render_loras=[{"name": "texture"}])
    got = lora_engine.generate(with_adapters, decode=False).latents
    expected = oracle(with_adapters, {"style_a": 0.8}, {"texture": 1.0})
    assert rel_err(got, expected) <= TOLERANCE
    plain = engine.generate(params(), decode=False).latents
    assert rel_err(got, plain) > 100 * TOLERANCE  # the adapters do change the video

    render_only = params(render_loras=[{"name": "texture", "scale": 0.5}])
    assert rel_err(lora_engine.generate(render_only, decode=False).latents,
                   oracle(render_only, {}, {"texture": 0.5})) <= TOLERANCE


def test_two_concurrent_requests_with_different_adapters_each_get_their_own_result(
        lora_engine, served, params, rel_err):
    """Through the HTTP routes and the stage deployments' batching: both jobs are queued before the orchestrator
    starts, so it drives them at once; each equals its request run alone in the engine, and the sketch ran them in
    two batches (a batch applies one set). The engine's own batched call groups them the same way."""
    bodies = [{"prompt": PROMPT, "seed": 3, "size": "32x32", "num_frames": 5, "num_inference_steps": 4,
               "switch": "step:2", "sketch_loras": [{"name": name}]} for name in ("style_a", "style_b")]
    ids = [served.submit(body) for body in bodies]
    served.local.start()  # the orchestrator: it claims both queued jobs and drives them concurrently
    jobs = [served.wait(job_id) for job_id in ids]
    alone = [lora_engine.generate(params(seed=3, sketch_loras=[{"name": name}]), decode=False).latents
             for name in ("style_a", "style_b")]
    for job, expected in zip(jobs, alone):
        assert job["status"] == "completed", job
        assert rel_err(served.latents(job["id"]), expected) <= TOLERANCE
    assert rel_err(alone[0], alone[1]) > 100 * TOLERANCE
    sketch_batches = [jobs[i]["stages"]["sketch"]["batch_id"] for i in range(2)]
    assert sketch_batches[0] != sketch_batches[1]

    batched = lora_engine.generate_batch([params(seed=3, sketch_loras=[{"name": n}]) for n in ("style_a", "style_b")],
                                         decode=False)
    assert all(rel_err(r.latents, e) <= TOLERANCE for r, e in zip(batched, alone))


def test_a_request_without_adapters_is_unchanged_after_adapters_were_used(lora_engine, engine, params):
    """The lora engine has applied adapters by now (and has adapter layers in its transformers); a request
    without adapters gives bit for bit what an engine that never saw an adapter gives."""
    lora_engine.generate(params(sketch_loras=[{"name": "style_b"}], render_loras=[{"name": "texture"}]),
                         decode=False)
    assert lora_engine.stages["sketch"].adapters.loaded and lora_engine.stages["render"].adapters.loaded
    for seed in (0, 5):
        assert torch.equal(lora_engine.generate(params(seed=seed), decode=False).latents,
                           engine.generate(params(seed=seed), decode=False).latents)


def test_the_lru_loads_each_adapter_once_until_it_is_evicted(lora_config, params):
    from serve.engine import Engine

    engine = Engine(lora_config)  # a fresh replica: nothing loaded
    adapters = engine.stages["sketch"].adapters
    for name in ("style_a", "style_a", "style_b", "distilled", "style_a"):
        engine.generate(params(sketch_loras=[{"name": name}], num_inference_steps=2), decode=False)
    stats = adapters.stats()
    assert stats["loads"] == {"style_a": 2, "style_b": 1, "distilled": 1}  # style_a evicted by distilled, reloaded
    assert stats["hits"] == {"style_a": 1} and stats["evictions"] == {"style_a": 1, "style_b": 1}
    assert stats["loaded"] == ["distilled", "style_a"]
    assert set(engine.stages["sketch"].denoiser.transformer.peft_config) == {"distilled", "style_a"}


# -- the request: defaults, the job record, the batch key -----------------------------------------------------------

def test_an_adapters_defaults_fill_what_the_request_leaves_out(params, lora_config):
    from serve.pipeline.segment import SketchStage

    distilled = params(sketch_loras=[{"name": "distilled"}], num_inference_steps=None, switch="step:1")
    preset = lora_config.defaults
    assert distilled.num_inference_steps == DISTILLED_STEPS and distilled.guidance_scale == 1.0
    assert distilled.render_guidance == preset.guidance_scale  # a sketch adapter's guidance is the sketch's alone
    given = params(sketch_loras=[{"name": "distilled"}], num_inference_steps=4, guidance_scale=3.0)
    assert given.num_inference_steps == 4 and given.guidance_scale == 3.0

    from serve.request import GenerationParams

    assert GenerationParams.from_dict(distilled.to_dict()) == distilled  # the job record and the hand-off
    assert distilled.to_dict()["sketch_loras"] == [{"name": "distilled", "scale": 1.0}]
    keys = {SketchStage.batch_key(params(sketch_loras=s)) for s in
            ([], [{"name": "style_a"}], [{"name": "style_a", "scale": 0.5}], [{"name": "style_b"}])}
    assert len(keys) == 4


@pytest.mark.parametrize(("body", "field", "says"), [
    ({"sketch_loras": [{"name": "nope"}]}, "sketch_loras.0.name", "no adapter 'nope'"),
    ({"sketch_loras": [{"name": "texture"}]}, "sketch_loras.0.name", "fits the render model"),
    ({"render_loras": [{"name": "style_a"}]}, "render_loras.0.name", "fits the sketch model"),
    ({"sketch_loras": [{"name": "style_a"}, {"name": "style_a"}]}, "sketch_loras.1.name", "named twice"),
    ({"sketch_loras": [{"name": n} for n in ("style_a", "style_b", "distilled")]}, "sketch_loras", "at most 2"),
    ({"sketch_loras": [{"name": "style_a", "scale": "NaN"}]}, "sketch_loras.0.scale", "finite"),
    ({"render_loras": [{"name": "texture", "scale": "Infinity"}]}, "render_loras.0.scale", "finite"),
])
def test_bad_adapter_input_is_a_422_naming_the_field(served, body, field, says):
    response = served.http.post("/v1/videos", json={"prompt": PROMPT, **body})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == field and says in error["message"], error


def test_models_lists_the_adapters_without_their_paths(served, adapters):
    listed = served.http.get("/v1/models").json()["data"][0]["loras"]
    assert [(a["name"], a["stage"], a["field"]) for a in listed] == [
        ("distilled", "sketch", "sketch_loras"), ("style_a", "sketch", "sketch_loras"),
        ("style_b", "sketch", "sketch_loras"), ("texture", "render", "render_loras")]
    assert listed[0]["num_inference_steps"] == DISTILLED_STEPS and adapters["distilled"] not in str(listed)


def test_a_registry_that_cannot_be_served_fails_before_any_weights_load(adapters, tiny_models):
    from serve.config import EngineConfig

    config = EngineConfig(preset="tiny", speed="exact",
                          loras={"texture": {"path": adapters["texture"], "stage": "sketch"}})
    with pytest.raises(ValueError, match=r"`loras.texture` \(stage sketch\): adapter 'texture' does not fit module "
                                         r"'blocks.0.attn1.to_\w+(\.0)?': its LoRA maps 32 -> 32 features, the "
                                         r"model's layer 64 -> 64"):
        config.check_loras()
    missing = EngineConfig(preset="tiny", loras={"gone": {"path": "/no/such/lora.safetensors", "stage": "render"}})
    with pytest.raises(ValueError, match=r"`loras.gone` \(stage render\): LoRA file '/no/such/lora.safetensors' "
                                         "does not exist"):
        missing.check_loras()
    from deployments.config import AppConfig

    with pytest.raises(ValueError, match=r"registers render adapters but `renderer.parallel` runs 2 ranks"):
        AppConfig.model_validate({"engine": {"preset": "tiny", "loras": {"texture": registry(adapters)["texture"]}},
                                  "renderer": {"parallel": {"cfg_degree": 2}}})
    with pytest.raises(ValueError, match="must be 1 to 64 letters"):
        EngineConfig(preset="tiny", loras={"a.b": {"path": adapters["texture"], "stage": "render"}})


def test_a_stage_with_adapters_runs_its_blocks_uncompiled(adapters):
    """Compiled blocks recompile for every new adapter set, and fail at dynamo's recompile limit: the profile's
    compile (and FP8 linear layers, which pay only compiled) is dropped on a stage with adapters, with the reason,
    and refused where the config gives it; attention backends stay."""
    from serve.config import EngineConfig

    render_only = {"texture": registry(adapters)["texture"]}
    config = EngineConfig(preset="tiny", speed="fast", loras=render_only)
    family = config.family()
    levers, why = config.kernels_for("render", family)
    assert levers.attention == "cudnn-fp8" and not levers.compile and not levers.fp8_linear
    assert "compile and fp8_linear dropped, the render stage serves LoRA adapters" in why
    assert config.kernels_for("sketch", family) == (config.stage_kernels("sketch"), None)  # no adapters there
    given = EngineConfig(preset="tiny", loras=render_only, render_kernels={"compile": True})
    with pytest.raises(ValueError, match=r"`render_kernels.compile` cannot serve the render stage's LoRA adapters"):
        given.kernels_for("render", family)


def test_srd_generate_takes_adapter_flags_and_refuses_bad_ones_in_one_line(capsys, adapters, tmp_path):
    from serve.cli import main

    base = ["generate", "--prompt", PROMPT, "--preset", "tiny", "--out", str(tmp_path / "v.mp4")]
    for flags, says in ((["--sketch-lora", str(tmp_path / "missing.safetensors") + ":0.5"], "does not exist"),
                        (["--render-lora", adapters["texture"] + ":inf"], "render_loras.0.scale"),
                        (["--render-lora", adapters["style_a"]], "does not fit module")):
        assert main(base + flags) == 2
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and error.startswith("srd generate: error: ") and says in error, error


# -- the served path, in process ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(lora_config, tmp_path_factory, loop, in_process_app):
    """The app's stage deployments in this process, behind the HTTP routes; no auth. Its orchestrator starts when
    a test calls `local.start()`."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from deployments.config import AppConfig
    from deployments.ingress import VideoService, make_api
    from serve.pipeline.artifacts import LATENTS

    config = AppConfig.model_validate({
        "engine": lora_config.model_dump(),
        "jobs": {"data_dir": str(tmp_path_factory.mktemp("srd-lora")), "poll_interval_s": 0.05,
                 "progress_interval_s": 0.05},
        "auth": {"tokens_env": None},
    })
    local = in_process_app(config.engine, config.jobs, loop)

    def submit(body: dict) -> str:
        response = http.post("/v1/videos", json=body)
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def wait(job_id: str, timeout_s: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            job = http.get(f"/v1/videos/{job_id}").json()
            if job["status"] in ("completed", "failed"):
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.05)

    try:
        with TestClient(make_api(VideoService(config))) as http:
            yield SimpleNamespace(http=http, submit=submit, wait=wait, local=local,
                                  latents=lambda job_id: LATENTS.decode(local.results.get(job_id, LATENTS.file)))
    finally:
        local.close()
