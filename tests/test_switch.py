"""Switch policies: parsing, the fixed rules, and SRDiffusion's adaptive rule (scripted, then on the tiny models)."""

from __future__ import annotations

import math

import pytest
import torch

from serve.models import PRESETS
from serve.request import VideoRequest
from serve.switch import SwitchTracker, make_plan, parse_switch

TIMESTEPS_N4 = torch.tensor([999, 900, 750, 500])


@pytest.mark.parametrize(
    ("spec", "text"),
    [("step:3", "step:3"), ("step:2:5", "step:2:5"), ("ratio:0.25", "ratio:0.25"), ("ratio:0.2:0.9", "ratio:0.2:0.9"),
     ("boundary:0.875", "boundary:0.875"), ("adaptive:0.02", "adaptive:0.02:5:30"),
     ("adaptive:0.02:3:12", "adaptive:0.02:3:12")],
)
def test_parse_round_trips(spec, text):
    assert str(parse_switch(spec)) == text
    assert parse_switch(text) == parse_switch(spec)


@pytest.mark.parametrize(
    "spec",
    ["", "step", "step:0", "step:2.5", "step:2:2", "step:3:2", "step:1:2:3", "ratio:0", "ratio:1.5", "ratio:x",
     "ratio:0.5:0.4", "ratio:0.2:1.5", "boundary:-0.1", "boundary:0.2:0.5", "adaptive:0", "adaptive:1",
     "adaptive:0.01:5", "adaptive:0.01:6:5", "adaptive:0.01:0:5", "sometimes:3"],
)
def test_malformed_specs_are_rejected_with_the_syntax(spec):
    with pytest.raises(ValueError, match=r"`switch` .* expected step:K \| step:A:B \| ratio:R"):
        parse_switch(spec)


def plan_of(spec: str, steps: int, timesteps=None):
    params = VideoRequest(prompt="x", num_inference_steps=steps, switch=spec).resolve(PRESETS["tiny"].defaults)
    return make_plan(params, timesteps)


@pytest.mark.parametrize(
    ("spec", "steps", "k"),
    [("step:1", 4, 1), ("step:4", 4, 4), ("ratio:0.5", 4, 2), ("ratio:0.01", 4, 1), ("ratio:1", 4, 4),
     ("boundary:0.9", 4, 2), ("boundary:0.95", 4, 1), ("boundary:1", 4, 0)],
)
def test_fixed_policies_know_k_from_the_timesteps(spec, steps, k):
    plan = plan_of(spec, steps, TIMESTEPS_N4[:steps])
    assert plan.switch_step == k and plan.names == ("sketch", "render")
    assert [(s.role, s.start, s.stop) for s in plan.segments] == [("sketch", 0, k), ("render", k, steps)]


@pytest.mark.parametrize(
    ("spec", "steps", "segments"),
    [("step:2:6", 8, [(0, 2), (2, 6), (6, 8)]), ("step:2:8", 8, [(0, 2), (2, 8)]),
     ("ratio:0.25:0.75", 8, [(0, 2), (2, 6), (6, 8)]), ("ratio:0.2:0.25", 4, [(0, 1), (1, 1), (1, 4)])],
)
def test_three_segment_forms_plan_large_small_large(spec, steps, segments):
    plan = plan_of(spec, steps)
    assert [(s.start, s.stop) for s in plan.segments] == segments
    assert [s.role for s in plan.segments] == ["sketch", "render", "sketch"][: len(segments)]
    assert plan.names == ("sketch", "render", "sketch.2")[: len(segments)]
    params = VideoRequest(prompt="x", num_inference_steps=steps, switch=spec, guidance_scale=5.0,
                          guidance_scale_2=2.0).resolve(PRESETS["tiny"].defaults)
    assert [s.guidance for s in make_plan(params).segments] == [5.0, 2.0, 5.0][: len(segments)]


def test_open_switches_are_decided_while_running_and_estimated_meanwhile():
    adaptive = plan_of("adaptive:0.01:2:6", 10)
    assert adaptive.switch_step is None and adaptive.segments[1].start is None
    assert adaptive.expected_span(0) == (0, 4) and adaptive.expected_span(1) == (4, 10)
    assert plan_of("boundary:0.9", 4).switch_step is None  # without the sampler's timesteps
    assert plan_of("boundary:0.9", 4, TIMESTEPS_N4).switch_step == 2


def test_step_beyond_n_is_rejected_naming_the_field():
    with pytest.raises(ValueError, match=r"`switch` step:5 must lie in 1..num_inference_steps=4"):
        parse_switch("step:5").check_steps(4)
    with pytest.raises(ValueError, match=r"`switch` step:2:5 must lie in 1..num_inference_steps=4"):
        parse_switch("step:2:5").check_steps(4)


def scripted_outputs(rates: list[float]) -> list[torch.Tensor]:
    """Model outputs whose successive d_i = tanh(mean|o_i - o_{i-1}| / mean|o_{i-1}|) are exactly `rates`:
    o_i = o_{i-1} * (1 + atanh(d_i)), from a positive o_0 (so the relative change is atanh(d_i))."""
    output = torch.linspace(0.5, 1.5, 24, dtype=torch.float64).reshape(1, 2, 3, 2, 2)
    outputs = [output]
    for d in rates:
        output = output * (1 + math.atanh(d))
        outputs.append(output)
    return outputs


def run_adaptive(spec: str, rates: list[float], steps: int) -> tuple[int | None, SwitchTracker]:
    """Feed the scripted outputs step by step; returns K (steps sketched when it asked to switch) or None."""
    tracker = parse_switch(spec).tracker(steps)
    for i, output in enumerate(scripted_outputs(rates)[:steps]):
        if tracker.after_step(i, output):
            assert tracker.switch_step == i + 1
            return i + 1, tracker
    return None, tracker


# d_1..d_9 (d_i is known after step i, 0-based). Changes d_{i-1} - d_i: 0.1 (a drop, too big at THR 0.01), -0.05 and
# -0.01 (small rises: not drops), 0.005 (a small drop), 0.3, 0.002 (a small drop), 0.253, 0.1.
RATES = [0.9, 0.8, 0.85, 0.86, 0.855, 0.555, 0.553, 0.3, 0.2]


def test_scripted_rates_are_measured_as_the_paper_defines_them():
    _, tracker = run_adaptive("adaptive:0.01:1:10", RATES, steps=10)
    assert tracker.rates == pytest.approx(RATES[:5], abs=1e-6)  # it stopped recording once it switched


@pytest.mark.parametrize(
    ("spec", "k"),
    [
        ("adaptive:0.01:1:10", 6),  # the rises are skipped; d_4 -> d_5 is known after step 5 (0-based): K = 6
        ("adaptive:0.001:1:10", 10),  # no drop is that small: MAX
        ("adaptive:0.2:1:10", 3),  # d_1 -> d_2 = 0.1 < 0.2: switch as soon as d_2 is known, K = 3
        ("adaptive:0.01:7:10", 8),  # MIN = 7 skips the drop at K = 6; the next small one gives K = 8
        ("adaptive:0.01:9:10", 10),  # MIN = 9: no later small drop, so MAX
        ("adaptive:0.01:1:4", 4),  # MAX = 4 comes before the first small drop
        ("adaptive:0.01:5:5", 5),  # MIN = MAX, where the rule alone would not switch
    ],
)
def test_adaptive_rule_switches_where_expected_and_honours_min_max(spec, k):
    got, _ = run_adaptive(spec, RATES, steps=10)
    assert got == k


def test_adaptive_max_is_capped_at_n():
    got, tracker = run_adaptive("adaptive:0.001", RATES, steps=4)  # default MAX = 30 > N = 4
    assert got == 4 and tracker.switch_step == 4


def test_adaptive_run_on_tiny_preset_reports_the_step_it_chose(engine, make_params, rel_err):
    """A full adaptive run: the chosen K follows the rule on the rates the sketch stage measured, is reported in the
    Handoff and in the result, and the final latents are those of the fixed policy step:K."""
    spec, min_step, max_step = "adaptive:0.05:2:5", 2, 5
    params = make_params(num_inference_steps=6, switch=spec, seed=0)
    (embeds,) = engine.stages["encode"]([params])
    (handoff,) = engine.stages["sketch"]([(params, embeds)])
    k = handoff.step_index

    # The rule, restated over the measured d_1, d_2, ...: rates[j] is d_{j+1}, known after step j+1 (K = j + 2).
    drops = [
        j + 2 for j in range(1, len(handoff.rates))
        if j + 2 >= min_step and 0 < handoff.rates[j - 1] - handoff.rates[j] < 0.05
    ]
    assert k == min(drops + [max_step])
    assert min_step <= k < max_step, "the rule itself (not MAX) should decide on these models"

    result = engine.generate(params, decode=False)
    assert result.switch_step == k
    fixed = engine.generate(make_params(num_inference_steps=6, switch=f"step:{k}", seed=0), decode=False)
    assert rel_err(result.latents, fixed.latents) <= 1e-6


def calibration_of(*schedules: tuple[str, float, float]):
    from serve.calibration import Calibration, ScheduleQuality

    return Calibration(pair="test", measured="by hand", steps=20, step_cost_ratio=0.5, proxy="none",
                       schedules=[ScheduleQuality(switch=s, cost=c, score=100 * q, quality=q) for s, c, q in schedules])


CALIBRATION = (("boundary:1", 0.5, 0.90), ("ratio:0.25", 0.625, 0.97), ("ratio:0.2:0.9", 0.65, 0.99),
               ("ratio:0.5", 0.75, 0.99), ("ratio:1", 1.0, 1.0))


@pytest.mark.parametrize(("target", "segments"), [
    (0.9, [("sketch", 0, 0), ("render", 0, 8)]),  # all-small is the cheapest at 0.9
    (0.95, [("sketch", 0, 2), ("render", 2, 8)]),  # ratio:0.25 of 8 steps
    (0.99, [("sketch", 0, 2), ("render", 2, 7), ("sketch", 7, 8)]),  # as good as ratio:0.5, and cheaper
    (1.0, [("sketch", 0, 8), ("render", 8, 8)]),  # only all-large
])
def test_quality_target_takes_the_cheapest_calibrated_schedule(target, segments):
    params = VideoRequest(prompt="x", num_inference_steps=8, switch=f"quality:{target}").resolve(
        PRESETS["tiny"].defaults)
    plan = make_plan(params, TIMESTEPS_N4.repeat(2), calibration_of(*CALIBRATION))
    assert [(s.role, s.start, s.stop) for s in plan.segments] == segments


def test_quality_target_needs_a_calibration_that_reaches_it():
    params = VideoRequest(prompt="x", num_inference_steps=8, switch="quality:0.99").resolve(PRESETS["tiny"].defaults)
    with pytest.raises(ValueError, match=r"`switch` quality:0.99 needs the model pair's calibration"):
        make_plan(params)
    with pytest.raises(ValueError, match=r"quality:0.99: the calibration of test has no schedule of that quality "
                                         r"\(best measured: 0.97\)"):
        make_plan(params, calibration=calibration_of(*CALIBRATION[:2]))

