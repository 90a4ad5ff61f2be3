"""Placement planner: how many sketch and render replicas, and where the text encoder and the VAE go, from the
measured cost model. No Ray: plain arithmetic over measured figures, which live in serve/placement_costs.json (one
entry per GPU model, each saying where and when it was measured; `python -m bench.run ... --write-costs` writes the
entry of the card it runs on).

A video costs K x C_sketch + (N-K) x C_render + encode + decode (the engine sits within 0.5% of it), where C is the
seconds of one denoising step (two forwards with classifier-free guidance) at the video's token count. With one
denoiser replica per GPU, throughput is min(sketch GPUs / sketch seconds, render GPUs / render seconds) per
second, so the planner splits the GPUs between the two in that ratio (the integer split with the best minimum).
The encoder and the decoder use a GPU for ~2.5 s of a ~120 s video, so they go as fractional replicas beside the
renderers when the renderer's GPU has the memory for them (the 1.3B's few GiB leave plenty), charging their seconds
to the render side; else beside the sketchers; else on a GPU of their own (today's gpu.yaml did the latter).

Forward seconds at other token counts come from a fit a*t + b*t^2 (linear layers plus attention) through the two
measured shapes of each model (480p and 720p); forward peaks are interpolated between them, the decode's seconds
and peak scale from 480p with the pixels (its time also with the frames).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from serve.denoise import WAN_LATENTS

COSTS_FILE = Path(__file__).with_name("placement_costs.json")
MEMORY_HEADROOM = 0.9  # of a card's memory a plan may fill (allocator fragmentation, CUDA context)
SIDE_GPU_SHARE = 0.1  # Ray GPU fraction of an encoder or decoder replica placed beside a denoiser


@dataclass(frozen=True)
class Card:
    """One GPU model's measured figures (seconds per B=1 forward, GiB), as serve/placement_costs.json holds them."""

    name: str
    measured: str  # where and when
    memory_gib: float
    sketch_forward_s: tuple[float, float]  # Wan 14B at 480p/81, 720p/81
    render_forward_s: tuple[float, float]  # Wan 1.3B
    encode_s: float  # umT5-XXL, one prompt pair
    decode_s_480p: float  # the decode stage at 480p/81, untiled
    weights_gib: dict[str, float]  # resident weights: sketch, render, encoder, vae
    forward_peak_gib: dict[str, tuple[float, float]]  # above the weights, per B=1 forward at 480p / 720p
    decode_peak_gib_480p: float  # untiled; it scales with a frame's pixels, hardly with the frame count
    encode_peak_gib: float


def _entry(cards: dict, name: str) -> dict:
    """Card `name`'s figures, with those it lacks taken from its `fill_from` card (forwards at a missing shape scaled
    by the two cards' ratio at 480p)."""
    entry = cards[name]
    if "fill_from" not in entry:
        return entry
    base = _entry(cards, entry["fill_from"])
    forward = {}
    for role, seconds in base["forward_s"].items():
        own = entry["forward_s"][role]
        forward[role] = {shape: own[shape] if shape in own else s * own["480p"] / seconds["480p"]
                         for shape, s in seconds.items()}
    return {**base, **entry, "forward_s": forward}


def read_costs(doc: dict) -> tuple[dict[str, tuple[int, int, int]], dict[str, Card]]:
    """The measured shapes ((height, width, frames) by name: 480p, 720p) and every card of a cost table; a
    ValueError names a card's missing figure."""
    cards = {}
    for name in doc["cards"]:
        try:
            entry = _entry(doc["cards"], name)
            forward, peak = entry["forward_s"], entry["forward_peak_gib"]
            cards[name] = Card(
                name, entry["measured"], entry["memory_gib"],
                (forward["sketch"]["480p"], forward["sketch"]["720p"]),
                (forward["render"]["480p"], forward["render"]["720p"]), entry["encode_s"], entry["decode_480p_s"],
                entry["weights_gib"], {role: (peak[role]["480p"], peak[role]["720p"]) for role in ("sketch", "render")},
                entry["decode_480p_peak_gib"], entry["encode_peak_gib"])
        except KeyError as missing:
            raise ValueError(f"the cost table's card {name!r} lacks {missing} and no `fill_from` card has it") from None
    return {shape: tuple(size) for shape, size in doc["shapes"].items()}, cards


SHAPES, CARDS = read_costs(json.loads(COSTS_FILE.read_text()))
RESOLUTIONS = {shape: (height, width) for shape, (height, width, _) in SHAPES.items()}
(H480, W480, F480), (H720, W720, F720) = SHAPES["480p"], SHAPES["720p"]
TOKENS_480P, TOKENS_720P = WAN_LATENTS.tokens(F480, H480, W480), WAN_LATENTS.tokens(F720, H720, W720)


def _fit(tokens: int, at: tuple[float, float]) -> float:
    """a*t + b*t^2 through (TOKENS_480P, at[0]) and (TOKENS_720P, at[1]), evaluated at `tokens`."""
    t1, t2 = TOKENS_480P, TOKENS_720P
    b = (at[1] / t2 - at[0] / t1) / (t2 - t1)
    a = at[0] / t1 - b * t1
    return a * tokens + b * tokens * tokens


@dataclass(frozen=True)
class VideoCost:
    """Seconds and GiB of one video on one card."""

    sketch_s: float
    render_s: float
    encode_s: float
    decode_s: float
    sketch_gib: float  # weights + forward peak
    render_gib: float
    side_gib: float  # text encoder + VAE + the larger of their peaks

    @property
    def total_s(self) -> float:
        return self.sketch_s + self.render_s + self.encode_s + self.decode_s


def video_cost(card: Card, height: int, width: int, frames: int, steps: int, switch_step: int,
               guidance: bool = True) -> VideoCost:
    if not 0 <= switch_step <= steps:
        raise ValueError(f"the switch step K must lie in 0..steps={steps} but is {switch_step}")
    tokens = WAN_LATENTS.tokens(frames, height, width)
    forwards = 2 if guidance else 1
    pixels = height * width / (H480 * W480)
    peak_scale = (tokens - TOKENS_480P) / (TOKENS_720P - TOKENS_480P)

    def peak(role: str) -> float:
        lo, hi = card.forward_peak_gib[role]
        return max(lo, lo + (hi - lo) * peak_scale)

    weights = card.weights_gib
    return VideoCost(
        sketch_s=switch_step * forwards * _fit(tokens, card.sketch_forward_s),
        render_s=(steps - switch_step) * forwards * _fit(tokens, card.render_forward_s),
        encode_s=card.encode_s, decode_s=card.decode_s_480p * pixels * frames / F480,
        sketch_gib=weights["sketch"] + peak("sketch"), render_gib=weights["render"] + peak("render"),
        side_gib=weights["encoder"] + weights["vae"] + max(card.decode_peak_gib_480p * pixels, card.encode_peak_gib),
    )


@dataclass(frozen=True)
class Placement:
    """Replicas and GPU shares of each stage, and the throughput the cost model gives them."""

    gpus: int
    card: Card
    cost: VideoCost
    sketchers: int
    renderers: int
    side: str  # where the encoder and decoder go: "renderers", "sketchers", "own GPU" or "one GPU"
    gpu_share: dict[str, float] = field(default_factory=dict)  # Ray num_gpus per replica of each stage
    videos_per_hour: float = 0.0

    def _memory_line(self) -> str:
        c, of = self.cost, f"of {self.card.memory_gib:.0f} GiB"
        if self.side == "one GPU":
            return f"memory: {c.sketch_gib + c.render_gib + c.side_gib:.1f} GiB {of}"
        sketch = c.sketch_gib + (c.side_gib if self.side == "sketchers" else 0)
        render = c.render_gib + (c.side_gib if self.side == "renderers" else 0)
        own = f", encoder+VAE GPU {c.side_gib:.1f} GiB" if self.side == "own GPU" else ""
        return f"memory: sketch GPU {sketch:.1f} GiB, render GPU {render:.1f} GiB{own} {of}"

    def lines(self) -> list[str]:
        c = self.cost
        return [
            f"{self.gpus} x {self.card.name}: {self.sketchers} sketch + {self.renderers} render replica(s); "
            f"text encoder and VAE decoder: {self.side}",
            f"per video: sketch {c.sketch_s:.1f} s, render {c.render_s:.1f} s, encode {c.encode_s:.2f} s, "
            f"decode {c.decode_s:.1f} s (one GPU would take {c.total_s:.1f} s)",
            "GPU shares: " + ", ".join(f"{k} {v:g}" for k, v in self.gpu_share.items()),
            self._memory_line(),
            f"throughput (cost model): {self.videos_per_hour:.1f} videos/hour",
            f"figures: {self.card.measured}",
        ]


def gpu_shares(side: str) -> dict[str, float]:
    """Ray GPU fraction of one replica of each stage when the text encoder and the VAE decoder sit at `side`
    ("renderers", "sketchers", "own GPU" or "one GPU"); a plain function so that the planner and the simulator
    (deployments/simulate) lay out the same shares."""
    if side == "one GPU":
        return {"sketcher": 0.25, "renderer": 0.25, "encoder": 0.25, "decoder": 0.25}
    if side == "renderers":
        return {"sketcher": 1.0, "renderer": 1 - 2 * SIDE_GPU_SHARE, "encoder": SIDE_GPU_SHARE,
                "decoder": SIDE_GPU_SHARE}
    if side == "sketchers":
        return {"sketcher": 1 - 2 * SIDE_GPU_SHARE, "renderer": 1.0, "encoder": SIDE_GPU_SHARE,
                "decoder": SIDE_GPU_SHARE}
    if side == "own GPU":
        return {"sketcher": 1.0, "renderer": 1.0, "encoder": 0.5, "decoder": 0.5}
    raise ValueError(f"`side` must be one of renderers, sketchers, own GPU, one GPU but is {side!r}")


def _best_split(gpus: int, sketch_s: float, render_s: float) -> tuple[int, int]:
    """The integer split s + r = gpus (each >= 1) maximising min(s / sketch_s, r / render_s)."""
    return max(((s, gpus - s) for s in range(1, gpus)),
               key=lambda sr: (min(sr[0] / sketch_s if sketch_s else math.inf,
                                   sr[1] / render_s if render_s else math.inf), -sr[0]))


def plan(gpus: int, card: Card, height: int, width: int, frames: int, steps: int, switch_step: int,
         guidance: bool = True) -> Placement:
    if gpus < 1:
        raise ValueError(f"`gpus` must be >= 1 but is {gpus}")
    cost = video_cost(card, height, width, frames, steps, switch_step, guidance)
    room = card.memory_gib * MEMORY_HEADROOM
    if cost.sketch_gib > room:
        raise ValueError(f"the sketch model needs {cost.sketch_gib:.1f} GiB at {height}x{width}x{frames}, over "
                         f"{room:.0f} GiB of a {card.name}: use a sequence-parallel sketcher (parallel.*_degree)")
    side_s = cost.encode_s + cost.decode_s
    if gpus == 1:
        need = cost.sketch_gib + cost.render_gib + cost.side_gib
        if need > room:
            raise ValueError(f"one {card.name} cannot hold every model ({need:.1f} GiB > {room:.0f} GiB)")
        return Placement(1, card, cost, 1, 1, "one GPU", gpu_shares("one GPU"), 3600 / cost.total_s)
    if cost.render_gib + cost.side_gib <= room:
        side, (s, r) = "renderers", _best_split(gpus, cost.sketch_s, cost.render_s + side_s)
        rate = min(s / cost.sketch_s if cost.sketch_s else math.inf, r / (cost.render_s + side_s))
    elif cost.sketch_gib + cost.side_gib <= room:
        side, (s, r) = "sketchers", _best_split(gpus, cost.sketch_s + side_s, cost.render_s)
        rate = min(s / (cost.sketch_s + side_s), r / cost.render_s if cost.render_s else math.inf)
    else:
        if gpus < 3:
            raise ValueError("the text encoder and VAE need a GPU of their own at this size: `gpus` must be >= 3")
        side, (s, r) = "own GPU", _best_split(gpus - 1, cost.sketch_s, cost.render_s)
        rate = min(s / cost.sketch_s if cost.sketch_s else math.inf, r / cost.render_s if cost.render_s else math.inf)
    return Placement(gpus, card, cost, s, r, side, gpu_shares(side), 3600 * rate)


def serve_config(placement: Placement, preset: str = "wan2.1-t2v") -> dict:
    """A Serve config (as `serve deploy` takes it) for this placement: the app's AppConfig in `args`, the sketcher
    and renderer autoscaled by the cost-aware policy up to the planned replicas, within the planned GPU budget."""
    share = placement.gpu_share

    def denoiser(role: str, replicas: int) -> dict:
        return {"resources": {"num_cpus": 4, "num_gpus": share[role]},
                "batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0},
                "max_ongoing_requests": 8,
                "autoscaling": {"min_replicas": 1, "max_replicas": replicas, "upscale_delay_s": 30,
                                "downscale_delay_s": 600}}

    # decoders enough to be busy at most half the time at the planned throughput (at most one per host GPU)
    host = placement.renderers if placement.side == "renderers" else placement.sketchers
    decoders = min(max(1, host), math.ceil(2 * placement.videos_per_hour * placement.cost.decode_s / 3600))
    args = {
        "engine": {"preset": preset, "device": "cuda", "dtype": "bfloat16"},
        "encoder": {"resources": {"num_cpus": 2, "num_gpus": share["encoder"]},
                    "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05}, "cache_size": 4096},
        "sketcher": denoiser("sketcher", placement.sketchers),
        "renderer": denoiser("renderer", placement.renderers),
        "decoder": {"resources": {"num_cpus": 2, "num_gpus": share["decoder"]},
                    "num_replicas": max(1, decoders) if placement.side != "one GPU" else 1,
                    "batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}},
    }
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [{
            "name": "srd", "route_prefix": "/", "import_path": "deployments.app:app_builder",
            "autoscaling_policy": {
                "policy_function": "deployments.autoscaling:CostAwarePolicy",
                "policy_kwargs": {"target_work_s": 120, "hysteresis": 0.2, "cooldown_s": 60,
                                  "max_total_replicas": placement.sketchers + placement.renderers},
            },
            "args": args,
        }],
    }
