"""What stages pass each other: named values, each with its codec to bytes and its file in a job's results location.

    EMBEDS        PromptEmbeds         encode -> the first denoising segment
    handoff(i)    Handoff              denoising segment i -> segment i+1 (HANDOFF = handoff(0), after the sketch)
    LATENTS       float32 [1, C, F', H', W'] tensor, the last segment's output -> decode
    VIDEO         Clip (frames, fps)   decode -> the mp4 a client downloads
    THUMBNAIL     uint8 image          decode -> the video's first frame, PNG
    PREVIEW       uint8 image          preview -> the sketch's estimate of the first frame, PNG
    resume(i)     Handoff              segment i, preempted mid-way -> the same segment's next call

In one process (the Engine) artifacts stay values; a stage deployment reads its inputs' files and writes its
outputs' through the codecs, so a stage call carries only a job id and its parameters. The file names are part of
the results layout that clients and earlier releases see; the codecs never pickle (serve/checkpoint.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serve import checkpoint
from serve.video import Clip, encode_png, read_png


@dataclass(frozen=True)
class Artifact:
    file: str  # its name in the job's directory of the results location
    kind: str  # embeds, handoff, latents, video or image: what its value is
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any] | None  # None: streamed to clients as stored, never read back by a stage

    def __repr__(self) -> str:
        return f"Artifact({self.file})"


EMBEDS = Artifact("embeds.safetensors", "embeds", checkpoint.embeds_to_bytes, checkpoint.embeds_from_bytes)
LATENTS = Artifact("latents.safetensors", "latents", checkpoint.latents_to_bytes, checkpoint.latents_from_bytes)
VIDEO = Artifact("video.mp4", "video", Clip.mp4, None)
THUMBNAIL = Artifact("thumbnail.png", "image", encode_png, read_png)
PREVIEW = Artifact("preview.png", "image", encode_png, read_png)


def handoff(index: int) -> Artifact:
    """The trajectory after denoising segment `index` (0: the sketch's hand-off, `handoff.safetensors`; later ones
    `handoff.2.safetensors`, ...)."""
    name = "handoff.safetensors" if index == 0 else f"handoff.{index + 1}.safetensors"
    return Artifact(name, "handoff", checkpoint.handoff_to_bytes, checkpoint.handoff_from_bytes)


HANDOFF = handoff(0)


def resume(index: int) -> Artifact:
    """Denoising segment `index` stopped mid-way (its stage yielded to more urgent work): the trajectory so far, a
    hand-off that continues the same segment (`resume.1.safetensors` for the first segment, ...)."""
    return Artifact(f"resume.{index + 1}.safetensors", "handoff", checkpoint.handoff_to_bytes,
                    checkpoint.handoff_from_bytes)
