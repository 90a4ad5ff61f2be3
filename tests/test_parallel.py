"""Sequence-parallel (xfuser USP) and CFG-parallel denoising on CPU with gloo: the real multi-rank code path.

Each worker group is N spawned processes running xfuser's Wan wrapper over torch.distributed (gloo); the driver runs
the same denoising loop (serve/denoise.py) as the one-rank engine with a RemoteDenoiser. Results must equal the
one-rank engine's (float32, relative error <= 1e-5).
"""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch


TOL = 1e-5
# A small WanTransformer3DModel: 4 heads of 16, 2 blocks, text_dim 32.
SMALL_WAN = dict(patch_size=(1, 2, 2), attention_head_dim=16, in_channels=16, out_channels=16, text_dim=32,
                 freq_dim=64, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, num_attention_heads=4,
                 num_layers=2, ffn_dim=256, rope_max_seq_len=64)
STEPS = {"num_inference_steps": 3, "switch": "step:2"}  # 2 sketch steps, 1 render step


@pytest.fixture(scope="module")
def requests(make_params):
    """Three requests: an even token count (2x2x2 = 8), an odd one (3x3x3 = 27), and one without guidance."""
    return {
        "even": make_params(**STEPS),
        "odd": make_params(height=48, width=48, num_frames=9, seed=1, **STEPS),
        "unguided": make_params(guidance_scale=1.0, seed=2, prompt="a blue cube", **STEPS),
    }


@pytest.fixture(scope="module")
def one_rank(tiny_config, requests):
    """The one-rank engine's stages and, per request, its embeddings, hand-off and final latents."""
    from serve.pipeline.encode import EncodeStage
    from serve.pipeline.segment import RenderStage, SketchStage

    encoder, sketcher, renderer = (stage.load(tiny_config) for stage in (EncodeStage, SketchStage, RenderStage))
    embeds = dict(zip(requests, encoder(list(requests.values()))))
    handoffs = {k: sketcher([(requests[k], embeds[k])])[0] for k in requests}
    finals = {k: renderer([handoffs[k]])[0] for k in requests}
    # A mixed batch (guided and unguided rows in one forward), as a batching deployment sends it.
    mixed = sketcher([(requests["even"], embeds["even"]), (requests["unguided"], embeds["unguided"])])
    return {"sketcher": sketcher, "renderer": renderer, "embeds": embeds, "handoffs": handoffs, "finals": finals,
            "mixed": mixed}


def _group(tiny_config, role="sketch", **degrees):
    from serve.parallel import ParallelConfig, ProcessWorkerGroup

    return ProcessWorkerGroup(tiny_config, ParallelConfig(**degrees), role=role, num_threads=1)


def _sketch_stage(tiny_config, group):
    from serve.pipeline.segment import SketchStage
    from serve.parallel import RemoteDenoiser

    return SketchStage.load(tiny_config, denoiser=RemoteDenoiser(group, tiny_config.torch_dtype))


def _assert_same_handoff(actual, expected, rel_err):
    assert actual.step_index == expected.step_index == 2
    assert rel_err(actual.latents, expected.latents) <= TOL
    # The sampler state (UniPC's model outputs) carries on into rendering: it must match too.
    for a, e in zip(actual.scheduler.model_outputs, expected.scheduler.model_outputs):
        assert (a is None) == (e is None) and (a is None or rel_err(a, e) <= TOL)


@pytest.fixture(scope="module")
def ulysses_group(tiny_config):
    group = _group(tiny_config, ulysses_degree=2)
    yield group
    group.shutdown()


def test_ulysses2_sketch_equals_one_rank(tiny_config, ulysses_group, one_rank, requests, rel_err):
    info = ulysses_group.info
    assert [(i["rank"], i["sp_rank"], i["backend"], i["attention_backend"]) for i in info] == [
        (0, 0, "gloo", "SDPA"), (1, 1, "gloo", "SDPA")]
    assert len({i["pid"] for i in info} | {os.getpid()}) == 3  # two real ranks, neither is this process
    sketcher = _sketch_stage(tiny_config, ulysses_group)
    # "odd": 27 tokens split over 2 ranks, so xfuser pads the sequence; the padded keys must not change the result.
    for key in ("even", "odd"):
        (handoff,) = sketcher([(requests[key], one_rank["embeds"][key])])
        _assert_same_handoff(handoff, one_rank["handoffs"][key], rel_err)
        (final,) = one_rank["renderer"]([handoff])
        assert rel_err(final, one_rank["finals"][key]) <= TOL


def test_prompt_embeddings_cross_once_per_batch(tiny_config, ulysses_group, one_rank, requests, rel_err):
    """A sketch of 2 steps over a batch of 2 requests: the embeddings go to the ranks in one call before the first
    step, each step carries only the latents and timesteps (and guidance and prompt keys); the ranks keep the
    batch's embeddings and drop them when the next batch's arrive."""
    from serve.parallel import tensor_bytes

    sketcher = _sketch_stage(tiny_config, ulysses_group)
    batch = [(requests[k], one_rank["embeds"][k]) for k in ("even", "unguided")]
    before = copy.deepcopy(ulysses_group.traffic)
    handoffs = sketcher(batch)
    calls = ulysses_group.traffic.calls - before.calls
    sent = ulysses_group.traffic.tensor_bytes - before.tensor_bytes
    for actual, expected in zip(handoffs, one_rank["mixed"]):
        _assert_same_handoff(actual, expected, rel_err)

    assert calls == {"hold_prompts": 1, "denoise": 2}
    embeds_bytes = tensor_bytes([e for _, e in batch])
    assert sent["hold_prompts"] == embeds_bytes
    latents = handoffs[0].latents
    step_bytes = 2 * latents.numel() * latents.element_size() + 2 * handoffs[0].scheduler.timesteps.element_size()
    assert sent["denoise"] == 2 * step_bytes  # and no embeddings: they are larger than a step's latents here
    assert embeds_bytes > step_bytes

    held = ulysses_group.execute_all("held_prompts")
    assert held[0] == held[1] and len(held[0]) == 2  # every rank holds this batch's two prompts
    sketcher([(requests["odd"], one_rank["embeds"]["odd"])])  # the next batch: one prompt
    now_held = ulysses_group.execute_all("held_prompts")
    assert now_held[0] == now_held[1] and len(now_held[0]) == 1 and not set(now_held[0]) & set(held[0])


def test_cfg2_sketch_equals_one_rank(tiny_config, one_rank, requests, rel_err):
    """CFG-parallel: rank 0 runs the cond rows, rank 1 the uncond rows; predictions all-gathered, then guided."""
    with _group(tiny_config, cfg_degree=2) as group:
        assert [(i["cfg_rank"], i["sp_rank"]) for i in group.info] == [(0, 0), (1, 0)]
        sketcher = _sketch_stage(tiny_config, group)
        for key in ("even", "odd"):
            (handoff,) = sketcher([(requests[key], one_rank["embeds"][key])])
            _assert_same_handoff(handoff, one_rank["handoffs"][key], rel_err)
            (final,) = one_rank["renderer"]([handoff])
            assert rel_err(final, one_rank["finals"][key]) <= TOL
        # Two requests in one forward, one guided and one not: 2 cond rows against 1 uncond row.
        mixed = sketcher([(requests[k], one_rank["embeds"][k]) for k in ("even", "unguided")])
        for actual, expected in zip(mixed, one_rank["mixed"]):
            _assert_same_handoff(actual, expected, rel_err)


@pytest.fixture(scope="module")
def ring_group(tiny_config):
    # The render stage with its own degree, over ring attention. On CPU, xfuser's SDPA_FLASH entry runs torch's CPU
    # flash kernel, which returns the log-sum-exp that ring attention merges with (serve.parallel's CPU patch,
    # item 4); on GPUs it is torch's CUDA flash kernel.
    group = _group(tiny_config, role="render", ring_degree=2, attention_backend="sdpa_flash")
    yield group
    group.shutdown()


def test_ring2_render_equals_one_rank_cpu_flash_lse(tiny_config, ring_group, one_rank, requests, rel_err):
    """The render stage uses the same mechanism with its own degree: ring 2 over the tiny render model."""
    from serve.pipeline.segment import RenderStage
    from serve.parallel import RemoteDenoiser

    assert ring_group.transformer_config["num_attention_heads"] == 2  # the render model, not the sketch model
    assert [(i["sp_rank"], i["attention_backend"]) for i in ring_group.info] == [(0, "SDPA_FLASH"), (1, "SDPA_FLASH")]
    renderer = RenderStage.load(tiny_config, denoiser=RemoteDenoiser(ring_group, tiny_config.torch_dtype))
    (final,) = renderer([one_rank["handoffs"]["even"]])
    assert rel_err(final, one_rank["finals"]["even"]) <= TOL

    # Ring attention cannot mask xfuser's sequence padding: an odd token count is refused, in the driver...
    with pytest.raises(ValueError, match=r"ring_degree.*token count \(27\).*divisible by"):
        renderer([one_rank["handoffs"]["odd"]])
    # ...and on the ranks (the error crosses the process boundary as the same ValueError); the group stays usable.
    latents = torch.zeros(1, 16, 3, 6, 6)
    ring_group.execute("hold_prompts", {-1: one_rank["embeds"]["odd"]}, [])
    with pytest.raises(ValueError, match=r"token count \(27\)") as info:
        ring_group.execute("denoise", latents, torch.tensor([999]), [-1], [5.0])
    assert "rank 0" in str(info.value.__notes__)
    (again,) = renderer([one_rank["handoffs"]["even"]])
    assert torch.equal(again, final)


# ---------------------------------------------------------------------------------------------------------------------
# Start-up validation: impossible degrees fail before any rank starts or any weights load
# ---------------------------------------------------------------------------------------------------------------------

WAN_14B = {"_class_name": "WanTransformer3DModel", "num_attention_heads": 40, "patch_size": [1, 2, 2]}
WAN_1_3B = {"_class_name": "WanTransformer3DModel", "num_attention_heads": 12, "patch_size": [1, 2, 2]}


@pytest.mark.parametrize(
    "degrees, message",
    [
        ({"cfg_degree": 3}, r"`cfg_degree` must be 1 or 2 .* but is 3"),
        ({"cfg_degree": 0}, r"`cfg_degree` must be at least 1 but is 0"),
        ({"ulysses_degree": 0}, r"`ulysses_degree` must be at least 1"),
        ({"ring_degree": 2}, r"`ring_degree` 2 needs an attention backend that returns log-sum-exp.*'sdpa'"),
        ({"ring_degree": 2, "attention_backend": "auto"}, r"log-sum-exp.*'auto'"),
        ({"attention_backend": "nope"}, r"attention_backend"),
    ],
)
def test_impossible_degrees_are_refused(degrees, message):
    from serve.parallel import ParallelConfig

    with pytest.raises(ValueError, match=message):
        ParallelConfig(**degrees)


@pytest.mark.parametrize(
    "transformer, degrees, bundles, message",
    [
        (WAN_1_3B, {"ulysses_degree": 8}, None, r"head count \(12\) must be divisible by `ulysses_degree` \(8\)"),
        (WAN_14B, {"ulysses_degree": 3}, None, r"head count \(40\) must be divisible by `ulysses_degree` \(3\)"),
        (WAN_14B, {"ulysses_degree": 4, "cfg_degree": 2}, 4,
         r"2 x 4 x 1 = 8 ranks must equal the sketch replica's placement-group bundles \(4\)"),
        ({**WAN_14B, "_class_name": "FluxTransformer2DModel"}, {}, None,
         r"no parallel support is declared for transformer class 'FluxTransformer2DModel'"),
    ],
)
def test_impossible_combinations_for_the_model_are_refused(transformer, degrees, bundles, message):
    from serve.parallel import ParallelConfig, check_parallel

    with pytest.raises(ValueError, match=message):
        check_parallel(ParallelConfig(**degrees), transformer, bundles=bundles)


def test_possible_combinations_pass():
    from serve.parallel import ParallelConfig, check_parallel

    check_parallel(ParallelConfig(ulysses_degree=4, cfg_degree=2), WAN_14B, bundles=8)
    check_parallel(ParallelConfig(ulysses_degree=4, ring_degree=2, attention_backend="sdpa_flash"), WAN_1_3B, bundles=8)


def test_worker_group_refuses_before_spawning(tiny_config):
    """The tiny sketch model has 4 heads: Ulysses 8 fails in the driver, before any process starts."""
    import multiprocessing

    from serve.parallel import ParallelConfig, ProcessWorkerGroup

    before = set(multiprocessing.active_children())
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"head count \(4\) must be divisible by `ulysses_degree` \(8\)"):
        ProcessWorkerGroup(tiny_config, ParallelConfig(ulysses_degree=8))
    assert time.monotonic() - start < 5 and set(multiprocessing.active_children()) <= before


def test_sequence_parallel_blocks_get_contiguous_hidden_states(rel_err):
    """xfuser's Wan forward hands its blocks a transposed view, which made every elementwise op of every block a
    strided kernel (+7% per 14B forward on the H100); to_sequence_parallel makes it contiguous, as in diffusers."""
    from diffusers import WanTransformer3DModel

    from serve.models import random_init
    from serve.parallel import ParallelConfig, free_port, import_xfuser, init_rank, teardown, to_sequence_parallel

    import_xfuser()
    model = random_init(WanTransformer3DModel, SMALL_WAN, "cpu", torch.float32)
    latents, timestep, embeds = torch.randn(1, 16, 3, 8, 8), torch.tensor([999.0]), torch.randn(1, 12, 32)
    ctx = init_rank(0, 1, "127.0.0.1", free_port(), ParallelConfig(), "cpu")
    try:
        wrapped = to_sequence_parallel(model, ctx)
        contiguous = []
        for block in wrapped.blocks:
            block.register_forward_pre_hook(lambda _, args: contiguous.append(args[0].is_contiguous()))
        with torch.inference_mode():
            out = wrapped(latents, timestep, embeds, return_dict=False)[0]
            ref = model(latents, timestep, embeds, return_dict=False)[0]
    finally:
        teardown(ctx)
    assert contiguous == [True] * len(wrapped.blocks)
    assert rel_err(out, ref) <= TOL


@pytest.mark.skipif(
    (os.cpu_count() or 1) < 4 and not os.environ.get("SRD_TEST_4_RANKS"),
    reason="4 ranks on fewer than 4 cores take minutes; set SRD_TEST_4_RANKS=1 to run anyway",
)
def test_cfg2_by_ulysses2_on_4_ranks_equals_one_rank(tiny_config, one_rank, requests, rel_err):
    """The layout of a real replica (CFG groups [0, 2] and [1, 3], sequence groups [0, 1] and [2, 3]): a padded
    sequence, and a batch of a guided and an unguided request."""
    with _group(tiny_config, cfg_degree=2, ulysses_degree=2) as group:
        assert [(i["cfg_rank"], i["sp_rank"]) for i in group.info] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        sketcher = _sketch_stage(tiny_config, group)
        (handoff,) = sketcher([(requests["odd"], one_rank["embeds"]["odd"])])
        _assert_same_handoff(handoff, one_rank["handoffs"]["odd"], rel_err)
        mixed = sketcher([(requests[k], one_rank["embeds"][k]) for k in ("even", "unguided")])
        for actual, expected in zip(mixed, one_rank["mixed"]):
            _assert_same_handoff(actual, expected, rel_err)
