"""Frames -> mp4 (H.264 through PyAV), and the PNG of a preview frame.

PyAV is imported when a video is encoded, not when this module is: the offline GPU image lacks it (its 35 MB wheel
does not fit beside the carried Ray wheels), and there `encode_mp4` falls back to OpenCV's bundled FFmpeg, which
writes MPEG-4 Part 2 instead of H.264 (`mp4_encoder()` says which one runs; a warning is logged once).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import tempfile
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


def _import(name: str):
    try:
        return __import__(name)
    except ImportError:
        return None


@functools.cache
def mp4_encoder() -> str:
    """"pyav-h264" where PyAV is installed, else "opencv-mpeg4" where OpenCV is; ImportError with neither."""
    if _import("av") is not None:
        return "pyav-h264"
    if _import("cv2") is not None:
        logger.warning("PyAV is not installed: videos are encoded as MPEG-4 Part 2 through OpenCV, not H.264")
        return "opencv-mpeg4"
    raise ImportError("encoding an mp4 needs PyAV (`pip install av`, H.264) or OpenCV (MPEG-4 Part 2); neither is "
                      "installed")


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """uint8 frames [F, H, W, 3] -> an mp4 in memory: H.264 (yuv420p, CRF 18) through PyAV, or MPEG-4 Part 2 through
    OpenCV where PyAV is missing. H and W must be even (ours are x16)."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3] but are {frames.dtype} {tuple(frames.shape)}")
    if mp4_encoder() == "opencv-mpeg4":
        return _encode_mp4_opencv(frames, fps)
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _encode_mp4_opencv(frames: np.ndarray, fps: int) -> bytes:
    import cv2

    with tempfile.TemporaryDirectory(prefix="srd-mp4-") as tmp:
        path = os.path.join(tmp, "video.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (frames.shape[2], frames.shape[1]))
        if not writer.isOpened():
            raise RuntimeError("OpenCV could not open an MPEG-4 (mp4v) video writer")
        try:
            for frame in frames:
                writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        finally:
            writer.release()
        with open(path, "rb") as f:
            return f.read()


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def read_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def read_mp4(data: bytes) -> np.ndarray:
    """Decode an mp4 back to uint8 frames [F, H, W, 3] (for tests and clients; needs PyAV)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@dataclass(frozen=True)
class Clip:
    """Decoded frames, uint8 [F, H, W, 3], and their rate: the VIDEO artifact's value (serve/pipeline/artifacts.py)."""

    frames: np.ndarray
    fps: int

    def mp4(self) -> bytes:
        return encode_mp4(self.frames, self.fps)
