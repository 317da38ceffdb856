"""Teachers (SPEC section 4): what the student block is aligned with. The protocol
(`teacher(batch, latents, captured) -> TeacherTokens`), the encoder teacher (decoders: VAE, tiny
autoencoders incl. FLUX.2's TAEF2; frozen timm encoders loaded from local checkpoints or the hub),
the backbone teacher, the feature cache, and `build_teacher`. May import: choices, config, maths,
models. No Lightning."""

from lightning_repa.teachers.backbone import BackboneTeacher
from lightning_repa.teachers.build import build_teacher
from lightning_repa.teachers.encoder_teacher import EncoderTeacher
from lightning_repa.teachers.protocol import TeacherProtocol

__all__ = ["BackboneTeacher", "EncoderTeacher", "TeacherProtocol", "build_teacher"]
