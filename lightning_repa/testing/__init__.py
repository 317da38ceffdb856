"""Test fixtures that ship with the package, as `torch.testing` and `lightning.pytorch.demos` do:
tiny random diffusers denoisers and video VAEs of every family (`tiny_models`,
`tiny_video_models`) and tiny Lightning modules that train them (`modules`). Nothing in the core
package imports this subpackage; tests, notebooks, the demo checks and the benchmarks do."""

from lightning_repa.testing.modules import (
    LatentData,
    TinyFlow,
    TinyVideoFlow,
    VideoData,
    tiny_loader,
    tiny_video_loader,
)
from lightning_repa.testing.tiny_models import TINY_FAMILIES, TinyFamily
from lightning_repa.testing.tiny_video_models import TINY_VIDEO_FAMILIES, TinyVideoFamily

__all__ = ["TINY_FAMILIES", "TINY_VIDEO_FAMILIES", "LatentData", "TinyFamily", "TinyFlow", "TinyVideoFamily",
           "TinyVideoFlow", "VideoData", "tiny_loader", "tiny_video_loader"]
