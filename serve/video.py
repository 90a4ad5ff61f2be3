"""Frames -> H.264 mp4 (PyAV), and the PNG of a preview frame."""

from __future__ import annotations

import io

import av
import numpy as np


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """uint8 frames [F, H, W, 3] -> an H.264 (yuv420p) mp4 in memory. H and W must be even (ours are x16)."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3] but are {frames.dtype} {tuple(frames.shape)}")
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


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def read_mp4(data: bytes) -> np.ndarray:
    """Decode an mp4 back to uint8 frames [F, H, W, 3] (for tests and clients)."""
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
