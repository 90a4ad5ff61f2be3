"""mp4 encoding: H.264 through PyAV; where PyAV is missing (the offline GPU image), MPEG-4 through OpenCV."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from serve import video


@pytest.fixture
def without_pyav(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    video.mp4_encoder.cache_clear()
    yield
    video.mp4_encoder.cache_clear()


def frames(count: int = 9, height: int = 32, width: int = 48) -> np.ndarray:
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    return np.broadcast_to(ramp[None, None, :, None], (count, height, width, 3)).copy()


def test_pyav_h264_round_trip():
    assert video.mp4_encoder() == "pyav-h264"
    decoded = video.read_mp4(video.encode_mp4(frames(), fps=16))
    assert decoded.shape == (9, 32, 48, 3)


def test_opencv_fallback_without_pyav(without_pyav, tmp_path):
    cv2 = pytest.importorskip("cv2")
    assert video.mp4_encoder() == "opencv-mpeg4"
    data = video.encode_mp4(frames(), fps=16)
    assert data[4:8] == b"ftyp"  # an ISO base media (mp4) file
    path = tmp_path / "v.mp4"
    path.write_bytes(data)
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    assert count == 9


def test_no_encoder_is_a_clear_error(without_pyav, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match="PyAV .* or OpenCV"):
        video.encode_mp4(frames(), fps=16)
