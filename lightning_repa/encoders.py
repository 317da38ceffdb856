"""The frozen image encoders at their public path (SPEC section 2): they live in
`lightning_repa.teachers.encoders`; `spatial_zscore`, iREPA's teacher normalisation, lives with
the objectives (`lightning_repa.objectives.base`)."""

from lightning_repa.objectives.base import spatial_zscore
from lightning_repa.teachers.encoders import ENCODER_ALIASES, FrozenEncoder, load_encoder, resolve_encoder_name

__all__ = ["ENCODER_ALIASES", "FrozenEncoder", "load_encoder", "resolve_encoder_name", "spatial_zscore"]
