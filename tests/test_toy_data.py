"""The toy dataset (toy.data) and its detector (toy.detector): determinism, the held-out split, prompts, geometry,
and the detector's accuracy on ground-truth clips, clean and degraded like a generated video."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toy.data import (
    BACKGROUND_RGB, BACKGROUNDS, COLOUR_RGB, COLOURS, DIRECTIONS, SHAPES, SIZE_PX, SPEED_PX, Scene,
    frames_uint8, is_held_out, parse_prompt, render_clips, sample_scenes,
)
from toy.detector import adherence, detect

FRAMES = 17
DETECTOR_SCENES = 300
ATTRIBUTES = ("colour", "shape", "direction", "background")
UNIT_XY = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # image rows grow down


def degrade(clips: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A 3x3 box blur, then gaussian noise of std 0.05 (in [0, 1] units), clamped: a stand-in for generated video."""
    batch, channels, frames, height, width = clips.shape
    pixels = ((clips + 1) / 2).permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
    pixels = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pixels = pixels + 0.05 * torch.randn(pixels.shape, generator=torch.Generator().manual_seed(seed))
    pixels = pixels.clamp(0, 1).reshape(batch, frames, channels, height, width).permute(0, 2, 1, 3, 4)
    return pixels * 2 - 1


def accuracies(scenes: list[Scene], clips: torch.Tensor) -> dict[str, float]:
    scores = [adherence(detect(frames_uint8(clip)), scene.attributes) for scene, clip in zip(scenes, clips)]
    return {key: float(np.mean([score[key] for score in scores])) for key in (*ATTRIBUTES, "all")}


@pytest.fixture(scope="module", params=["train", "eval"])
def split_clips(request) -> tuple[str, list[Scene], torch.Tensor]:
    scenes = sample_scenes(DETECTOR_SCENES, seed=11, split=request.param)
    return request.param, scenes, render_clips(scenes, frames=FRAMES)


def test_sampling_and_rendering_are_deterministic():
    scenes = sample_scenes(24, seed=3, split="train")
    assert scenes == sample_scenes(24, seed=3, split="train")
    assert torch.equal(render_clips(scenes), render_clips(sample_scenes(24, seed=3, split="train")))
    assert scenes != sample_scenes(24, seed=4, split="train")
    assert not torch.equal(render_clips(scenes), render_clips(sample_scenes(24, seed=4, split="train")))


def test_held_out_split_tests_composition_of_trained_words():
    combos = list(itertools.product(SHAPES, COLOURS, DIRECTIONS, BACKGROUNDS))
    held_out = [combo for combo in combos if is_held_out(*combo)]
    trained = [combo for combo in combos if not is_held_out(*combo)]
    assert 0.15 <= len(held_out) / len(combos) <= 0.25, f"{len(held_out)} of {len(combos)} held out"
    for position, vocabulary in enumerate((SHAPES, COLOURS, DIRECTIONS, BACKGROUNDS)):
        assert {combo[position] for combo in trained} == set(vocabulary)

    def combination(scene: Scene) -> tuple[str, str, str, str]:
        return scene.shape, scene.colour, scene.direction, scene.background

    train, evaluation = sample_scenes(500, seed=0, split="train"), sample_scenes(500, seed=0, split="eval")
    assert not any(is_held_out(*combination(scene)) for scene in train)
    assert all(is_held_out(*combination(scene)) for scene in evaluation)
    assert len({combination(scene) for scene in evaluation}) > len(held_out) // 2  # spread over the held-out set
    every = sample_scenes(500, seed=0, split="all")
    assert any(is_held_out(*combination(s)) for s in every) and not all(is_held_out(*combination(s)) for s in every)


def test_prompt_round_trip():
    for scene in sample_scenes(200, seed=5, split="all"):
        assert parse_prompt(scene.prompt) == scene.attributes
    scene = Scene("circle", "red", "large", "left", "slowly", "black", 32.0, 32.0)
    assert scene.prompt == "a large red circle moving left slowly on a black background"
    with pytest.raises(ValueError, match="colour 'purple'"):
        parse_prompt("a large purple circle moving left slowly on a black background")
    with pytest.raises(ValueError, match="does not follow"):
        parse_prompt("a red ball bouncing")
    with pytest.raises(ValueError, match="shape"):
        Scene("hexagon", "red", "large", "left", "slowly", "black", 32.0, 32.0)


@pytest.mark.parametrize("height, width", [(64, 64), (32, 48)])
def test_rendered_geometry(height: int, width: int):
    scenes = sample_scenes(120, seed=2, split="all", height=height, width=width)
    clips = render_clips(scenes, frames=FRAMES, height=height, width=width)
    assert clips.shape == (len(scenes), 3, FRAMES, height, width) and clips.dtype == torch.float32
    assert clips.min() >= -1 and clips.max() <= 1

    scale = min(height, width) / 64
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    for scene, clip in zip(scenes, clips):
        background = torch.tensor(BACKGROUND_RGB[scene.background])[:, None, None, None] * 2 - 1
        foreground = torch.tensor(COLOUR_RGB[scene.colour])[:, None, None, None] * 2 - 1
        border = torch.ones(height, width, dtype=torch.bool)
        border[1:-1, 1:-1] = False
        assert torch.equal(clip[..., border], background[..., 0].expand(3, FRAMES, int(border.sum()))), scene
        # Coverage of each pixel, from its position between background and shape colour.
        coverage = ((clip - background).abs().sum(0) / (foreground - background).abs().sum()).clamp(0, 1)
        area = coverage.sum((1, 2))
        assert area.min() > 0.4 * (2 * SIZE_PX[scene.size] * scale) ** 2, scene  # a triangle is half its box
        centroid_x = (coverage * xs).sum((1, 2)) / area
        centroid_y = (coverage * ys).sum((1, 2)) / area
        moved = torch.stack([centroid_x[-1] - centroid_x[0], centroid_y[-1] - centroid_y[0]])
        expected = torch.tensor(UNIT_XY[scene.direction]) * SPEED_PX[scene.speed] * scale
        assert torch.allclose(moved, expected, atol=0.5), (scene, moved, expected)


@pytest.mark.parametrize("shape, inside, outside", [
    ("square", [(0, 0), (-11, -11), (11, 11), (11, -11)], [(0, -13), (13, 0)]),
    ("circle", [(0, 0), (0, -11), (-11, 0), (7, 7)], [(-11, -11), (11, 11), (0, 13)]),
    # Points up: apex on top (row index decreases upwards), base corners at the bottom of the box.
    ("triangle", [(0, 0), (0, -10), (-10, 11), (10, 11)], [(-11, -11), (11, -11), (-6, -6), (0, 13)]),
])
def test_shape_outlines(shape: str, inside: list[tuple[int, int]], outside: list[tuple[int, int]]):
    scene = Scene(shape, "red", "large", "right", "slowly", "black", 32.0, 32.0)
    red = render_clips([scene], frames=2)[0, 0, 0]  # red channel of frame 0, centre (32, 32), radius 12
    assert all(red[32 + dy, 32 + dx] > 0.9 for dx, dy in inside), shape
    assert all(red[32 + dy, 32 + dx] == -1 for dx, dy in outside), shape


def test_frames_uint8_layout():
    scene = Scene("square", "yellow", "large", "down", "quickly", "gray", 30.0, 20.0)
    clip = render_clips([scene], frames=5)[0]
    frames = frames_uint8(clip)
    assert frames.shape == (5, 64, 64, 3) and frames.dtype == np.uint8
    assert frames[0, 0, 0].tolist() == [128, 128, 128]  # gray background, 0.5 * 255 rounded
    assert frames[0, 20, 30].tolist() == [255, 255, 0]  # the square's centre at frame 0


def test_detector_on_ground_truth(split_clips):
    split, scenes, clips = split_clips
    scores = accuracies(scenes, clips)
    message = f"{split} clean accuracies over {len(scenes)} clips: {scores}"
    assert all(scores[key] >= 0.99 for key in ATTRIBUTES), message
    assert scores["all"] >= 0.98, message


def test_detector_on_noisy_blurred_clips(split_clips):
    split, scenes, clips = split_clips
    scores = accuracies(scenes, degrade(clips))
    assert all(scores[key] >= 0.95 for key in ATTRIBUTES), f"{split} noisy accuracies: {scores}"


def test_detector_static_and_empty_clips():
    scene = Scene("circle", "green", "large", "right", "quickly", "white", 20.0, 32.0)
    clip = render_clips([scene], frames=FRAMES)[0]
    static = frames_uint8(clip[:, :1].expand(-1, FRAMES, -1, -1))
    detection = detect(static)
    assert (detection.colour, detection.shape, detection.direction) == ("green", "circle", "none"), detection
    assert detect(static.astype(np.float32) / 255) == detection  # float frames in [0, 1] read the same

    moving = detect(frames_uint8(clip))
    assert adherence(moving, scene.attributes) == dict.fromkeys((*ATTRIBUTES, "all"), True), moving
    assert moving.motion_px == pytest.approx(SPEED_PX["quickly"], abs=1.0)

    empty = np.full((FRAMES, 64, 64, 3), 128, dtype=np.uint8)
    detection = detect(empty)
    assert (detection.colour, detection.shape, detection.direction, detection.background) == (
        "none", "none", "none", "gray"), detection
    assert not adherence(detection, scene.attributes)["all"]
