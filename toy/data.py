"""Procedural text-to-video clips: one coloured shape moving in a straight line over a solid background.

Every clip is described by a `Scene` and its prompt ("a large red circle moving left slowly on a black background"),
so that a toy pair of video diffusion models can be trained on it and its samples scored by `toy.detector`.
A fixed ~20% of the (shape, colour, direction, background) combinations is held out of training: prompts from it
test composition of known words, not unseen ones.

Coordinates are pixel coordinates with pixel centres at integer indices: x is the column, y the row, and "up"
means decreasing y. Sizes and travel are given at 64x64 and scale with min(height, width).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
BACKGROUNDS = ("black", "gray", "white")
SIZES = ("small", "large")
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slowly", "quickly")

# Blue is lightened so that it stays clearly visible on black.
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.15, 0.35, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
BACKGROUND_RGB: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
    "white": (1.0, 1.0, 1.0),
}
SIZE_PX = {"small": 7.0, "large": 12.0}  # half-extent at 64x64
SPEED_PX = {"slowly": 14.0, "quickly": 28.0}  # travel over the whole clip at 64x64
DIRECTION_XY = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}

HELD_OUT_FRACTION = 0.2
EDGE_MARGIN_PX = 1.0  # kept clear between the shape's box and the frame border, so the border stays background

_VOCABULARY = {
    "shape": SHAPES, "colour": COLOURS, "size": SIZES, "direction": DIRECTIONS, "speed": SPEEDS,
    "background": BACKGROUNDS,
}
PROMPT_TEMPLATE = "a <size> <colour> <shape> moving <direction> <speed> on a <background> background"
EXAMPLE_PROMPT = "a large red circle moving right slowly on a black background"
_PROMPT = re.compile(r"a (\S+) (\S+) (\S+) moving (\S+) (\S+) on a (\S+) background")
_PROMPT_FIELDS = ("size", "colour", "shape", "direction", "speed", "background")


@dataclass(frozen=True)
class Scene:
    """One clip: the prompt's attributes, and the shape's centre at frame 0 in pixels (at the size sampled for)."""

    shape: str
    colour: str
    size: str
    direction: str
    speed: str
    background: str
    start_x: float
    start_y: float

    def __post_init__(self) -> None:
        for key, vocabulary in _VOCABULARY.items():
            if getattr(self, key) not in vocabulary:
                raise ValueError(f"{key} must be one of {vocabulary}, not {getattr(self, key)!r}")

    @property
    def prompt(self) -> str:
        return (
            f"a {self.size} {self.colour} {self.shape} moving {self.direction} {self.speed} "
            f"on a {self.background} background"
        )

    @property
    def attributes(self) -> dict[str, str]:
        """The prompt's words by attribute, as `parse_prompt` returns them."""
        return {key: getattr(self, key) for key in _VOCABULARY}


def vocabulary() -> str:
    """The grammar's words, one group per attribute in prompt order: "sizes: small, large; colours: red, ...; ..."
    (for help texts and warnings, so that they never re-type the words)."""
    plural = {"size": "sizes", "colour": "colours", "shape": "shapes", "direction": "directions", "speed": "speeds",
              "background": "backgrounds"}
    return "; ".join(f"{plural[key]}: {', '.join(_VOCABULARY[key])}" for key in _PROMPT_FIELDS)


def grammar() -> dict:
    """The grammar as data, for clients that compose prompts (the API's `GET /v1/models`, the playground): the
    template, an example and each slot's words, slots in prompt order."""
    return {"template": PROMPT_TEMPLATE, "example": EXAMPLE_PROMPT,
            "vocabulary": {key: list(_VOCABULARY[key]) for key in _PROMPT_FIELDS}}


def parse_prompt(prompt: str) -> dict[str, str]:
    """Invert `Scene.prompt`: attribute -> word. ValueError for a prompt outside the grammar or vocabulary."""
    match = _PROMPT.fullmatch(prompt.strip())
    if match is None:
        raise ValueError(
            f"prompt {prompt!r} does not follow "
            "'a <size> <colour> <shape> moving <direction> <speed> on a <background> background'"
        )
    attributes = dict(zip(_PROMPT_FIELDS, match.groups()))
    for key, word in attributes.items():
        if word not in _VOCABULARY[key]:
            raise ValueError(f"unknown {key} {word!r} in prompt {prompt!r}; expected one of {_VOCABULARY[key]}")
    return {key: attributes[key] for key in _VOCABULARY}


@functools.cache
def held_out_combinations() -> frozenset[tuple[str, str, str, str]]:
    """The (shape, colour, direction, background) combinations reserved for evaluation.

    The round(20%) of all combinations with the smallest SHA-256 of "shape|colour|direction|background": stable
    across Python processes (unlike the salted `hash()`) and torch versions (unlike a seeded permutation).
    """
    combos = list(itertools.product(SHAPES, COLOURS, DIRECTIONS, BACKGROUNDS))
    ranked = sorted(combos, key=lambda combo: hashlib.sha256("|".join(combo).encode()).hexdigest())
    return frozenset(ranked[: round(HELD_OUT_FRACTION * len(combos))])


def is_held_out(shape: str, colour: str, direction: str, background: str) -> bool:
    """Whether the combination is reserved for the eval split (see `held_out_combinations`)."""
    return (shape, colour, direction, background) in held_out_combinations()


def _split_combinations(split: Literal["train", "eval", "all"]) -> list[tuple[str, str, str, str]]:
    combos = list(itertools.product(SHAPES, COLOURS, DIRECTIONS, BACKGROUNDS))
    if split == "all":
        return combos
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', not {split!r}")
    return [combo for combo in combos if is_held_out(*combo) == (split == "eval")]


def _scale(height: int, width: int) -> float:
    return min(height, width) / 64.0


def sample_scenes(
    n: int, seed: int, split: Literal["train", "eval", "all"] = "train", height: int = 64, width: int = 64,
) -> list[Scene]:
    """n scenes, deterministic from (seed, split): a uniform combination of the split, uniform size and speed, and
    a start uniform over the positions that keep the shape's box (plus a 1 px margin) inside the frame all clip long.

    The travel is per clip, not per frame, so the number of frames rendered later does not change the scenes.
    """
    combos = _split_combinations(split)
    generator = torch.Generator().manual_seed(seed)
    combo_index = torch.randint(len(combos), (n,), generator=generator).tolist()
    size_index = torch.randint(len(SIZES), (n,), generator=generator).tolist()
    speed_index = torch.randint(len(SPEEDS), (n,), generator=generator).tolist()
    uniform = torch.rand((n, 2), generator=generator, dtype=torch.float64).tolist()
    scale = _scale(height, width)
    scenes = []
    for i in range(n):
        shape, colour, direction, background = combos[combo_index[i]]
        size, speed = SIZES[size_index[i]], SPEEDS[speed_index[i]]
        margin = SIZE_PX[size] * scale + EDGE_MARGIN_PX
        travel = SPEED_PX[speed] * scale
        start = []
        for unit, extent, u in zip(DIRECTION_XY[direction], (width, height), uniform[i]):
            low, high = margin + max(0.0, -unit * travel), extent - 1 - margin - max(0.0, unit * travel)
            if high < low:
                raise ValueError(f"a {size} shape moving {speed} does not fit in {height}x{width}")
            start.append(low + (high - low) * u)
        scenes.append(Scene(shape, colour, size, direction, speed, background, start[0], start[1]))
    return scenes


def signed_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Signed distance in pixels (negative inside) from the shape centred at the origin, broadcast over the inputs.

    The triangle points up (apex at dy = -radius, base at dy = +radius, corners at dx = +-radius); its distance is
    the largest of its half-plane distances, clipped to its box so that the mitred apex does not overshoot the box.
    """
    if shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - radius
    box = torch.maximum(dx.abs(), dy.abs()) - radius
    if shape == "square":
        return box
    slanted = (2 * dx.abs() - dy - radius) / math.sqrt(5.0)
    return torch.maximum(torch.maximum(dy - radius, slanted), box)


def render_clips(
    scenes: list[Scene], frames: int = 17, height: int = 64, width: int = 64, device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Render scenes to [B, 3, frames, height, width] float32 in [-1, 1], vectorised over batch, frames and pixels.

    Edges are anti-aliased over ~1 px (coverage = clamp(0.5 - signed distance, 0, 1)). The shape travels linearly
    from its start (frame 0) to start + direction * travel (last frame).
    """
    if not scenes:
        raise ValueError("render_clips needs at least one scene")
    scale = _scale(height, width)

    def column(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)

    start = column([(s.start_x, s.start_y) for s in scenes])  # [B, 2]
    step = column([DIRECTION_XY[s.direction] for s in scenes]) * column([SPEED_PX[s.speed] for s in scenes])[:, None]
    progress = torch.arange(frames, dtype=torch.float32, device=device) / max(frames - 1, 1)
    centre = start[:, None, :] + step[:, None, :] * scale * progress[None, :, None]  # [B, F, 2]
    xs = torch.arange(width, dtype=torch.float32, device=device)
    ys = torch.arange(height, dtype=torch.float32, device=device)
    dx = xs[None, None, None, :] - centre[..., 0, None, None]  # [B, F, 1, W]
    dy = ys[None, None, :, None] - centre[..., 1, None, None]  # [B, F, H, 1]
    radius = column([SIZE_PX[s.size] * scale for s in scenes])[:, None, None, None]

    distance = torch.empty((len(scenes), frames, height, width), dtype=torch.float32, device=device)
    kinds = [s.shape for s in scenes]
    for shape in SHAPES:
        rows = torch.tensor([k == shape for k in kinds], device=device)
        if rows.any():
            distance[rows] = signed_distance(shape, dx[rows], dy[rows], radius[rows])
    coverage = (0.5 - distance).clamp(0.0, 1.0)[:, None]  # [B, 1, F, H, W]

    foreground = column([COLOUR_RGB[s.colour] for s in scenes])[:, :, None, None, None]
    background = column([BACKGROUND_RGB[s.background] for s in scenes])[:, :, None, None, None]
    pixels = background + (foreground - background) * coverage
    return pixels * 2 - 1


def frames_uint8(clip: torch.Tensor) -> np.ndarray:
    """One clip [3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3], the layout of serve.video's writer and decoder."""
    if clip.ndim != 4 or clip.shape[0] != 3:
        raise ValueError(f"clip must be [3, F, H, W] but is {tuple(clip.shape)}")
    pixels = ((clip.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous().numpy()
