"""Read a toy clip's attributes back from its pixels, to score how well a generated video follows its prompt.

Generated videos are blurrier and noisier than the rendered ground truth, so every decision is a nearest-palette
or threshold test on medians over many pixels and frames, never an exact pixel value. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toy.data import BACKGROUND_RGB, COLOUR_RGB

FOREGROUND_DISTANCE = 0.25  # RGB distance (in [0, 1] units) from the background beyond which a pixel is shape
MIN_NEIGHBOURS = 2  # foreground pixels with fewer foreground 8-neighbours are noise specks
MIN_FOREGROUND_PIXELS = 8  # a frame with fewer foreground pixels shows no shape
CORE_QUANTILE = 0.5  # the shape's colour is the median of its foreground pixels farthest from the background
# Fill ratio cuts: clean clips measure square 1.00, circle 0.79, triangle 0.51-0.57; a 3x3 blur plus noise of std
# 0.05 moves them to 0.88-0.96, 0.74-0.80 and 0.56-0.65, so each cut sits midway between the degraded ranges.
SQUARE_MIN_FILL = 0.84
CIRCLE_MIN_FILL = 0.69
MIN_MOTION_PX = 3.0  # least-squares displacement over the clip below which the shape counts as static

NONE = "none"


@dataclass(frozen=True)
class Detection:
    """Attributes read from a clip ("none" where not determinable), and the measurements behind them.

    fill_ratio: median over frames of the shape's area / its bounding box's area, both from soft coverage
        (0 without a shape): square ~1, circle ~pi/4, triangle ~1/2.
    motion_px: size of the least-squares displacement over the clip along the dominant axis; below
        MIN_MOTION_PX the direction is "none".
    colour_error: RGB distance from the median shape colour to the chosen palette colour (nan without a shape).
    """

    colour: str
    shape: str
    direction: str
    background: str
    fill_ratio: float
    motion_px: float
    colour_error: float


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[float, float, float]]) -> tuple[str, float]:
    names = list(palette)
    distances = np.linalg.norm(np.asarray([palette[name] for name in names]) - rgb, axis=1)
    best = int(np.argmin(distances))
    return names[best], float(distances[best])


def _unit_float(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3] but are {frames.shape}")
    if frames.dtype == np.uint8:
        return frames.astype(np.float32) / 255.0
    return np.clip(frames.astype(np.float32), 0.0, 1.0)


def _drop_specks(mask: np.ndarray) -> np.ndarray:
    """Clear foreground pixels of [F, H, W] masks that have fewer than MIN_NEIGHBOURS foreground 8-neighbours."""
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1))).astype(np.int8)
    height, width = mask.shape[1:]
    neighbours = sum(
        padded[:, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
        for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
    )
    return mask & (neighbours >= MIN_NEIGHBOURS)


def _fill_ratios(alpha: np.ndarray, solid: np.ndarray) -> np.ndarray:
    """Shape area / bounding-box area per frame, from the shape's coverage alpha [F, H, W] in [0, 1].

    Measured softly inside each frame's solid (alpha > 1/2) bounding box grown by 1 px: the area is the summed
    coverage, the box's width (height) the summed per-column (per-row) peak coverage. A hard mask's box would
    count a whole row for an edge that noise leaves half in, half out; sums of coverage don't jump like that.
    """
    rows, cols = solid.any(axis=2), solid.any(axis=1)
    row_index, col_index = np.arange(solid.shape[1]), np.arange(solid.shape[2])
    top, bottom = rows.argmax(axis=1) - 1, solid.shape[1] - rows[:, ::-1].argmax(axis=1)
    left, right = cols.argmax(axis=1) - 1, solid.shape[2] - cols[:, ::-1].argmax(axis=1)
    in_rows = (row_index >= top[:, None]) & (row_index <= bottom[:, None])
    in_cols = (col_index >= left[:, None]) & (col_index <= right[:, None])
    window = alpha * (in_rows[:, :, None] & in_cols[:, None, :])
    height = window.max(axis=2).sum(axis=1)
    width = window.max(axis=1).sum(axis=1)
    return window.sum(axis=(1, 2)) / (height * width)


def _direction(mask: np.ndarray, present: np.ndarray) -> tuple[str, float]:
    """Direction of the foreground centroid's least-squares motion over the frames where a shape is present."""
    t = np.flatnonzero(present).astype(np.float64)
    if len(t) < 2:
        return NONE, 0.0
    ys, xs = np.indices(mask.shape[1:])
    area = mask[present].sum(axis=(1, 2))
    cx = (mask[present] * xs).sum(axis=(1, 2)) / area
    cy = (mask[present] * ys).sum(axis=(1, 2)) / area
    t_centred = t - t.mean()
    span = len(mask) - 1
    slope_x = float(t_centred @ cx / (t_centred @ t_centred))
    slope_y = float(t_centred @ cy / (t_centred @ t_centred))
    if abs(slope_x) >= abs(slope_y):
        motion, direction = slope_x * span, ("right" if slope_x > 0 else "left")
    else:
        motion, direction = slope_y * span, ("down" if slope_y > 0 else "up")
    if abs(motion) < MIN_MOTION_PX:
        return NONE, abs(motion)
    return direction, abs(motion)


def _shape(video: np.ndarray, background_rgb: np.ndarray, shape_rgb: np.ndarray) -> tuple[str, float]:
    """Shape from the median fill ratio over frames, and that ratio; ("none", 0) where no frame shows a shape.

    Coverage is each pixel's position between the background and shape colours, and the solid part of the
    shape the pixels at least half way: a symmetric blur keeps straight edges there, where the looser
    foreground mask would grow and round them.
    """
    contrast = shape_rgb - background_rgb
    alpha = np.clip(((video - background_rgb) @ contrast) / (contrast @ contrast), 0.0, 1.0)
    solid = _drop_specks(alpha > 0.5)
    shown = solid.sum(axis=(1, 2)) >= MIN_FOREGROUND_PIXELS
    if not shown.any():
        return NONE, 0.0
    fill_ratio = float(np.median(_fill_ratios(alpha[shown], solid[shown])))
    if fill_ratio > SQUARE_MIN_FILL:
        return "square", fill_ratio
    if fill_ratio > CIRCLE_MIN_FILL:
        return "circle", fill_ratio
    return "triangle", fill_ratio


def detect(frames: np.ndarray) -> Detection:
    """Detect colour, shape, direction and background of one clip: uint8 [F, H, W, 3], or float in [0, 1]."""
    video = _unit_float(frames)
    border = np.concatenate(
        [video[:, 0], video[:, -1], video[:, 1:-1, 0], video[:, 1:-1, -1]], axis=1
    ).reshape(-1, 3)
    background_rgb = np.median(border, axis=0)
    background, _ = _nearest(background_rgb, BACKGROUND_RGB)

    distance = np.linalg.norm(video - background_rgb, axis=-1)
    mask = _drop_specks(distance > FOREGROUND_DISTANCE)
    present = mask.sum(axis=(1, 2)) >= MIN_FOREGROUND_PIXELS
    if not present.any():
        return Detection(NONE, NONE, NONE, background, fill_ratio=0.0, motion_px=0.0, colour_error=float("nan"))
    mask[~present] = False

    # The shape's own colour is in its core: blurred edge pixels are mixed with the background.
    core = distance[mask] >= np.quantile(distance[mask], CORE_QUANTILE)
    shape_rgb = np.median(video[mask][core], axis=0)
    colour, colour_error = _nearest(shape_rgb, COLOUR_RGB)
    shape, fill_ratio = _shape(video, background_rgb, shape_rgb)
    direction, motion_px = _direction(mask, present)
    return Detection(colour, shape, direction, background, fill_ratio, motion_px, colour_error)


def adherence(detection: Detection, attributes: dict[str, str]) -> dict[str, bool]:
    """Per attribute, whether the detection matches the prompt's (`parse_prompt`) attributes; "all" covers colour,
    shape and direction (the background is reported but a solid fill is too easy to count)."""
    result = {key: getattr(detection, key) == attributes[key] for key in ("colour", "shape", "direction", "background")}
    result["all"] = result["colour"] and result["shape"] and result["direction"]
    return result
