"""Read a toy clip's attributes back from its pixels, to score how well a generated video follows its prompt.

Generated videos are blurrier and noisier than the rendered ground truth, so every decision is a nearest-palette
or threshold test on medians over many pixels and frames, never an exact pixel value; shapes are read by
matching the renderer's own templates (toy.data), drawn with torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import torch

from toy.data import BACKGROUND_RGB, COLOUR_RGB, SHAPES, signed_distance

FOREGROUND_DISTANCE = 0.25  # RGB distance (in [0, 1] units) from the background beyond which a pixel is shape
MIN_NEIGHBOURS = 2  # foreground pixels with fewer foreground 8-neighbours are noise specks
MIN_FOREGROUND_PIXELS = 8  # a frame with fewer foreground pixels shows no shape
CORE_QUANTILE = 0.5  # the shape's colour is the median of its foreground pixels farthest from the background
WINDOW_MARGIN_PX = 2  # around the solid part's box: the blurred edge, not the background's noise
RADIUS_OFFSETS_PX = (-1.0, -0.75, -0.5, -0.25, 0.0)  # tried around the measured half-extent: blur widens the box
MIN_MOTION_PX = 3.0  # least-squares displacement over the clip below which the shape counts as static

NONE = "none"


@dataclass(frozen=True)
class Detection:
    """Attributes read from a clip ("none" where not determinable), and the measurements behind them.

    shape_misfit: the chosen shape's template misfit (`_template_misfits`; 0 is a perfect fit, nan without a
        shape).
    motion_px: size of the least-squares displacement over the clip along the dominant axis; below
        MIN_MOTION_PX the direction is "none".
    colour_error: RGB distance from the median shape colour to the chosen palette colour (nan without a shape).
    """

    colour: str
    shape: str
    direction: str
    background: str
    shape_misfit: float
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


def _template_misfits(alpha: np.ndarray, solid: np.ndarray) -> dict[str, float]:
    """Per shape, how far each frame's coverage alpha [F, H, W] (inside its solid part's box grown by
    WINDOW_MARGIN_PX, so that background noise far away does not count) lies from that shape drawn as the renderer
    draws it (toy.data's signed distances) at the frame's measured centre and size: the median over frames of the
    summed |template - alpha| over the summed alpha, at the best of a few radii around the measured one.

    Centre and half-extent come from the per-column (per-row) peak coverage, whose sums are the box's width
    (height) for all three shapes: each spans +-r on both axes around its centre. Matching whole templates reads a
    blurred small triangle right where a single statistic (the fill of its box) confuses it with a circle.
    """
    height, width = alpha.shape[1:]
    rows, cols = solid.any(axis=2), solid.any(axis=1)
    top, bottom = rows.argmax(axis=1) - WINDOW_MARGIN_PX, height - 1 - rows[:, ::-1].argmax(axis=1) + WINDOW_MARGIN_PX
    left, right = cols.argmax(axis=1) - WINDOW_MARGIN_PX, width - 1 - cols[:, ::-1].argmax(axis=1) + WINDOW_MARGIN_PX
    in_rows = (np.arange(height) >= top[:, None]) & (np.arange(height) <= bottom[:, None])
    in_cols = (np.arange(width) >= left[:, None]) & (np.arange(width) <= right[:, None])
    alpha = alpha * (in_rows[:, :, None] & in_cols[:, None, :])
    column_peak, row_peak = alpha.max(axis=1), alpha.max(axis=2)  # [F, W], [F, H]
    box_w, box_h = column_peak.sum(axis=1), row_peak.sum(axis=1)
    cx = (column_peak * np.arange(width)).sum(axis=1) / box_w
    cy = (row_peak * np.arange(height)).sum(axis=1) / box_h
    radius = (box_w + box_h) / 4
    dx = torch.from_numpy(np.arange(width)[None, None, :] - cx[:, None, None])
    dy = torch.from_numpy(np.arange(height)[None, :, None] - cy[:, None, None])
    target = torch.from_numpy(alpha.astype(np.float64))
    area = target.sum(dim=(1, 2)).clamp_min(1.0)
    misfits = {}
    for shape in SHAPES:
        per_frame = torch.stack([
            ((0.5 - signed_distance(shape, dx, dy, torch.from_numpy(radius + offset)[:, None, None])).clamp(0, 1)
             - target).abs().sum(dim=(1, 2)) / area
            for offset in RADIUS_OFFSETS_PX
        ]).amin(dim=0)
        misfits[shape] = float(per_frame.median())
    return misfits


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
    """The shape whose template fits the frames best (`_template_misfits`) and its misfit; ("none", nan) where no
    frame shows a shape.

    Coverage is each pixel's position between the background and shape colours; frames count where the solid part
    (pixels at least half way) is large enough, so that a frame with the shape blurred away does not vote.
    """
    contrast = shape_rgb - background_rgb
    alpha = np.clip(((video - background_rgb) @ contrast) / (contrast @ contrast), 0.0, 1.0)
    solid = _drop_specks(alpha > 0.5)
    shown = solid.sum(axis=(1, 2)) >= MIN_FOREGROUND_PIXELS
    if not shown.any():
        return NONE, float("nan")
    misfits = _template_misfits(alpha[shown], solid[shown])
    shape = min(misfits, key=misfits.get)
    return shape, misfits[shape]


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
        return Detection(NONE, NONE, NONE, background, shape_misfit=float("nan"), motion_px=0.0,
                         colour_error=float("nan"))
    mask[~present] = False

    # The shape's own colour is in its core: blurred edge pixels are mixed with the background.
    core = distance[mask] >= np.quantile(distance[mask], CORE_QUANTILE)
    shape_rgb = np.median(video[mask][core], axis=0)
    colour, colour_error = _nearest(shape_rgb, COLOUR_RGB)
    shape, shape_misfit = _shape(video, background_rgb, shape_rgb)
    direction, motion_px = _direction(mask, present)
    return Detection(colour, shape, direction, background, shape_misfit, motion_px, colour_error)


def adherence(detection: Detection, attributes: dict[str, str]) -> dict[str, bool]:
    """Per attribute, whether the detection matches the prompt's (`parse_prompt`) attributes; "all" covers colour,
    shape and direction (the background is reported but a solid fill is too easy to count)."""
    result = {key: getattr(detection, key) == attributes[key] for key in ("colour", "shape", "direction", "background")}
    result["all"] = result["colour"] and result["shape"] and result["direction"]
    return result
