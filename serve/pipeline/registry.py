"""The pipeline every runner iterates: a new stage is one module and one line here."""

from serve.pipeline.decode import DecodeStage
from serve.pipeline.encode import EncodeStage
from serve.pipeline.preview import PreviewStage
from serve.pipeline.segment import RenderStage, SketchStage
from serve.pipeline.stage import Pipeline

PIPELINE = Pipeline(
    prepare=(EncodeStage,),  # prompt -> EMBEDS
    denoise=(SketchStage, RenderStage),  # EMBEDS -> the plan's segments, hand-off to hand-off -> LATENTS
    finish=(DecodeStage,),  # LATENTS -> THUMBNAIL, VIDEO
    side=(PreviewStage,),  # the sketch's HANDOFF -> PREVIEW, beside rendering
)
