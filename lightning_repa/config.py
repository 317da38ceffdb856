"""Every option of the callback, documented once (SPEC section 10), and what a configuration
resolves to.

`RepaConfig` is the single source of truth: `RepaCallback(**options)` builds one,
the Hydra app composes one under the `repa` node (choices are Enums, so a wrong
value is refused by OmegaConf at compose time), and `validate()` checks what a
type cannot express (ranges, combinations). Checks that need the model (family
class, block count, batch keys) happen in the callback at fit start.

`resolve(config)` turns a configuration into the family, the method, the block index and the
objective it means; the callback, the probe and the cache precompute all start from it, and the
family's default block is applied there only.
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, List, Optional

from lightning_repa.choices import (
    RANGES,
    Cache,
    Decoder,
    DistanceUnit,
    ManifoldScope,
    Method,
    Projector,
    ScheduleKind,
    Teacher,
    ThresholdMode,
    check_option,
    require,
)
from lightning_repa.models.families import Family, get_family
from lightning_repa.objectives import OBJECTIVES, Objective, build_objective


@dataclass
class RepaConfig:
    """Options of `RepaCallback` and of the `repa` node of the Hydra app."""

    # --- what to align -------------------------------------------------------
    family: Any = "flux"
    """Model family: a name of `lightning_repa.FAMILIES` (the README's options table lists them with
    their methods). It fixes the block lists, token layout, grid, method and default block. Or a
    family declared as data for a class the package does not ship: a `Family`, or a dict / Hydra
    node with its block lists and token layout (`lightning_repa.family_from_dict`)."""
    method: Optional[Method] = None
    """repa | urepa | crepa. None takes the family's own method; a method that does not fit
    the family is an error that names the right one."""
    denoiser: Optional[str] = None
    """Dotted path of the denoiser inside the LightningModule (e.g. "model.net"). None
    searches `denoiser`, `transformer`, `unet`, `model`, in that order."""
    block_index: Optional[int] = None
    """0-based index over all transformer blocks in forward order (dual-stream blocks first,
    then single-stream). None takes the family's `default_block_index` (`resolve` applies it).
    UNets have one block to align, the mid block (index 0)."""
    lam: float = 0.5
    """Peak weight of the alignment loss (REPA paper: 0.5)."""
    align_call: Any = "first"
    """Which denoiser call of a training step is aligned when it runs more than once with
    gradients (e.g. a caption-dropout pass, then the real one): "first", "last", or, from Python,
    a predicate on the call's arguments by name, `lambda call: call["encoder_hidden_states"] is
    not None` (the first call it accepts). Calls without gradients are never aligned. With the
    default, a step that calls the denoiser more than once with gradients warns once."""
    name: Optional[str] = None
    """Name of this callback in the logs. One callback logs `repa/<metric>`; with several, each logs
    `repa/<name>/<metric>`, the name defaulting to the encoder (or `backbone<teacher_block_index>`),
    numbered when two are alike. A name given to a single callback is used too."""
    cknna_every_n_steps: int = 0
    """Every this many optimizer steps, log `repa/cknna`: the CKNNA (k = min(10, B - 1)) between the
    projected student tokens and the teacher tokens, each pooled per sample and L2-normalised (as
    REPA measures it; `lightning_repa.maths.kernel_alignment.cknna`), on the first batch of
    the validation loader (a fixed held-out batch, at the first validation run at or after each
    N steps), without gradients. 0: off. Needs a validation loop and batches of at least 4."""
    max_nonfinite_steps: int = 10
    """A step whose teacher tokens, student tokens or alignment loss are not finite adds no
    alignment loss (counted in `repa/skipped`); after this many such optimizer steps in a row
    the run stops with an error."""

    # --- projector -----------------------------------------------------------
    projector: Projector = Projector.linear
    """linear (LayerNorm + Linear) | mlp (REPA's 3-layer SiLU MLP) | conv (iREPA) | identity (no
    projection: LayerSync, with teacher=backbone; refused where the widths differ)."""
    projector_hidden: int = 2048
    """Width of the mlp projector's hidden layers (REPA paper: 2048)."""

    # --- teacher ---------------------------------------------------------------
    teacher: Teacher = Teacher.encoder
    """encoder (frozen vision encoder) | backbone (a deeper block, no VAE or encoder)."""
    teacher_block_index: Optional[int] = None
    """Backbone teacher's block; must be greater than `block_index`."""
    encoder: str = "dinov2_vits14"
    """dinov2_vit{s,b,l,g}14[_reg] or any timm ViT name."""
    encoder_checkpoint: Optional[str] = None
    """Local weights file (.pth/.bin/.safetensors) in the official DINOv2 or timm format.
    None downloads timm's pretrained weights (needs the hub)."""
    encoder_image_size: int = 224
    """The encoder sees about (encoder_image_size / patch)^2 tokens, aspect preserved
    (224 -> 16x16 for DINOv2/14 on square images)."""
    encoder_batch_size: int = 0
    """Decode and encode in chunks of this many images (0: the whole batch at once)."""

    # --- decoding the clean latents -----------------------------------------
    decoder: Decoder = Decoder.vae
    """vae (the module's VAE) | tae (tiny autoencoder from tae_checkpoint) | pixels (batch
    holds the clean images, nothing is decoded)."""
    vae_attr: str = "vae"
    """Attribute of the LightningModule holding the VAE (dotted paths allowed)."""
    tae_checkpoint: Optional[str] = None
    """Tiny autoencoder weights: a taesd-style .pth file or a diffusers AutoencoderTiny
    directory. Required with decoder=tae."""
    drop_vae_encoder: bool = False
    """Free the VAE's encoder at fit start (training on cached latents never encodes)."""

    # --- batch keys ------------------------------------------------------------
    latents_key: str = "latents"
    """Batch key of the clean latents in training space, (B, C, h, w) or (B, C, T, h, w)."""
    pixels_key: str = "pixels"
    """Batch key of the clean images (B, 3, H, W) or (B, T, 3, H, W), for decoder=pixels."""
    pixels_range: List[float] = field(default_factory=lambda: [0.0, 1.0])
    """Value range of the batch's pixels: [0, 1] or [-1, 1]."""
    ids_key: str = "ids"
    """Batch key of stable sample ids (needed by the teacher cache)."""
    frames_per_latent: Optional[int] = None
    """Video families: the VAE's temporal compression r, its pixel frames per latent frame (latent
    frame 0 holds pixel frame 0, latent frame t the frames (t-1)*r+1 .. t*r; the teacher sees the
    last of them). None reads it from the VAE at `vae_attr`, or takes the family's (Wan, SANA-Video,
    Kandinsky 5, HunyuanVideo 1.5: 4; LTX-Video, LTX-2: 8); set it for `decoder=pixels` with a VAE
    of another compression and none attached. A clip of more frames than 1 + (T-1)*r loses its tail,
    as the VAE's encoder drops it."""
    cache: Cache = Cache.none
    """Teacher feature cache, keyed by `batch[ids_key]`: each sample's tokens computed once, stored in
    float16. none | memory (in this process's RAM, for one run) | disk (safetensors shards under
    `cache_dir`, shared by ranks and runs, precomputed by `lightning-repa-cache` or filled while
    training). A sample that comes back different under its id (random crops or flips) is refused:
    key the views with `views_key`, or use none."""
    cache_dir: Optional[str] = None
    """Directory of the disk cache (cache=disk). A cache made with another encoder, checkpoint, image
    size, resize rule, latent decoder or package version is refused, naming the field that differs."""
    views_key: Optional[str] = None
    """Batch key of a view id per sample (e.g. flip flag, crop index): with a cache, the features are
    kept per (id, view). None: one view per id."""

    # --- alignment -------------------------------------------------------------
    spatial_align: bool = True
    """True: resample projected tokens to the teacher grid. False: mean-pool both sides to
    one token per frame."""
    manifold_weight: float = 3.0
    """U-REPA manifold term weight (an explicit 0 means 0)."""
    manifold_scope: ManifoldScope = ManifoldScope.tokens
    """tokens | batch (see `losses.manifold_loss`)."""
    distance: int = 1
    """CREPA neighbour distance (0: per-frame REPA)."""
    tau: float = 1.0
    """CREPA neighbour weight temperature: w_k = exp(-k / tau)."""
    cumulative_neighbours: bool = False
    """CREPA: use all distances 1..d instead of d alone."""
    normalize_neighbours: bool = False
    """CREPA: divide each frame's score by 1 + the sum of the neighbour weights applied."""
    normalize_by_frames: bool = True
    """CREPA: average the per-frame scores over frames instead of summing."""
    distance_unit: DistanceUnit = DistanceUnit.latent
    """CREPA: `distance` counted in latent frames or in pixel frames."""
    irepa: bool = False
    """iREPA: conv projector and spatially z-scored teacher features."""
    irepa_alpha: float = 0.6
    """iREPA: how much of the token mean is removed from the teacher features."""
    irepa_kernel_size: int = 3
    """iREPA: kernel size of the conv projector (odd)."""

    # --- weight schedule and cutoff -------------------------------------------
    schedule: ScheduleKind = ScheduleKind.constant
    """constant | linear | cosine | polynomial decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to lam over this many optimizer steps."""
    decay_steps: int = 0
    """Decay length after warm-up; 0 decays until the trainer's max_steps."""
    lambda_end: float = 0.0
    """Weight at the end of the decay."""
    power: float = 1.0
    """Exponent of the polynomial schedule."""
    cutoff_step: int = 0
    """Weight 0 from this optimizer step on (0: never)."""
    similarity_threshold: Optional[float] = None
    """Switch the loss off when the similarity EMA reaches this value (None: never)."""
    similarity_ema_decay: float = 0.99
    """Decay of the similarity EMA (updated once per optimizer step)."""
    threshold_mode: ThresholdMode = ThresholdMode.permanent
    """permanent | recoverable."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "RepaConfig":
        """Parse choices, check ranges and every combination that needs no model; return self.

        The one home of option validation: ranges (`RANGES`), the family and the method that fits
        it, the options only one method reads (declared by that method's objective), the backbone
        teacher's block order, and options that the chosen decoder, teacher or projector never read.
        """
        for f in fields(self):
            kind = _ENUM_FIELDS.get(f.name)
            value = getattr(self, f.name)
            if kind is not None and value is not None:
                setattr(self, f.name, kind.parse(value, f.name))
        for name in RANGES:
            check_option(name, getattr(self, name))
        require(self.align_call in ("first", "last") or callable(self.align_call), "align_call", self.align_call,
                 "'first', 'last' or a predicate on the call's arguments")
        require(self.name is None or (isinstance(self.name, str) and self.name.strip("/ ") == self.name and self.name),
                 "name", self.name, "a non-empty name without leading or trailing '/' or spaces, or None")
        self.pixels_range = [float(v) for v in self.pixels_range]
        require(self.pixels_range in ([0.0, 1.0], [-1.0, 1.0]), "pixels_range", self.pixels_range, "[0, 1] or [-1, 1]")
        family, method, block_index = _identify(self)
        if method is not family.method:
            raise ValueError(
                f"method={method.value!r} does not fit family={family.name!r}; use method={family.method.value!r} "
                f"({family.name} is a {family.method.value} family)"
            )
        self._check_method_options(method)
        if self.frames_per_latent is not None and (not family.video or self.teacher is Teacher.backbone):
            raise ValueError("`frames_per_latent` is only read by the encoder teacher of a video family (which pixel "
                             f"frame each latent frame is aligned with); remove it for family={family.name!r}")
        if method is Method.urepa and self.teacher is Teacher.backbone:
            raise ValueError(
                "`teacher=backbone` needs a deeper block of the same model, but U-REPA aligns the UNet's "
                "mid block only; use teacher=encoder"
            )
        self._check_teacher(block_index)
        if self.cache is not Cache.none and self.teacher is Teacher.backbone:
            raise ValueError("`cache` keeps encoder features; teacher=backbone computes its tokens in the same "
                             "forward and has nothing to cache: use cache=none")
        if self.distance_unit is DistanceUnit.pixel and self.teacher is Teacher.backbone:
            raise ValueError(
                "`distance_unit=pixel` converts with the frames the teacher decodes, but teacher=backbone sees no "
                "pixel frames; give `distance` in latent frames (distance_unit=latent)"
            )
        if self.cache is Cache.disk and not self.cache_dir:
            raise ValueError("`cache=disk` needs `cache_dir`, the directory of the cache (created if missing)")
        if self.decoder is Decoder.tae and not self.tae_checkpoint:
            raise ValueError("`decoder=tae` needs `tae_checkpoint` (a taesd .pth file or an AutoencoderTiny directory)")
        if self.irepa and self.projector in (Projector.mlp, Projector.identity):
            raise ValueError(
                f"`irepa=True` uses the conv projector; drop `projector={self.projector.value}` (or set irepa=False)"
            )
        if self.irepa and not self.spatial_align:
            raise ValueError(
                "`irepa=True` z-scores the teacher over its spatial tokens, which `spatial_align=False` pools "
                "away (with irepa_alpha=1 the pooled teacher is 0): keep spatial_align=True with irepa"
            )
        if self.irepa:
            self.projector = Projector.conv
        self._refuse_unused()
        return self

    def _check_method_options(self, method: Method) -> None:
        """An option that only another method reads is an error, not a silent no-op."""
        for other, objective in OBJECTIVES.items():
            ignored = self.non_default(objective.options) if other is not method else []
            if ignored:
                raise ValueError(
                    f"`{ignored[0]}` is a {other.value} option; it has no effect with method={method.value!r}"
                )

    def _check_teacher(self, block_index: int) -> None:
        if self.teacher is not Teacher.backbone:
            if self.teacher_block_index is not None:
                raise ValueError(
                    "`teacher_block_index` is only used with `teacher=backbone`; remove it or set teacher=backbone"
                )
            return
        if self.teacher_block_index is None:
            raise ValueError("`teacher=backbone` needs `teacher_block_index` (a block deeper than `block_index`)")
        if self.teacher_block_index <= block_index:
            unset = " (the family default, as `block_index` is unset)" if self.block_index is None else ""
            raise ValueError(
                f"`teacher_block_index` ({self.teacher_block_index}) must be greater than `block_index` "
                f"({block_index}{unset}): a teacher at or before the student block aligns nothing"
            )

    def non_default(self, names: tuple[str, ...]) -> list[str]:
        """The options among `names` whose value differs from their default."""
        defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(self)}
        return [name for name in names if getattr(self, name) != defaults[name]]

    def _refuse_unused(self) -> None:
        """An option the chosen decoder, teacher or projector never reads is an error, not a no-op."""
        unused = {
            "decoder=tae": (self.decoder is not Decoder.tae, ("tae_checkpoint",)),
            "decoder=pixels": (self.decoder is not Decoder.pixels, ("pixels_key", "pixels_range")),
            "teacher=encoder": (self.teacher is not Teacher.encoder, ("encoder_checkpoint",)),
            "projector=mlp": (self.projector is not Projector.mlp, ("projector_hidden",)),
            "irepa=True": (not self.irepa, ("irepa_alpha",)),
            "a teacher cache (cache=memory|disk)": (self.cache is Cache.none, ("ids_key", "views_key")),
            "cache=disk": (self.cache is not Cache.disk, ("cache_dir",)),
        }
        for needs, (off, names) in unused.items():
            ignored = self.non_default(names) if off else []
            if ignored:
                raise ValueError(f"`{ignored[0]}` is only read with {needs}; remove it or set that option")

    @classmethod
    def from_node(cls, node: Any) -> "RepaConfig":
        """From a RepaConfig, a dict or an OmegaConf node (the Hydra app's `repa` node; `_target_` ignored)."""
        if isinstance(node, RepaConfig):
            return node.validate()
        from omegaconf import DictConfig, OmegaConf  # ships with hydra-core

        if isinstance(node, DictConfig):
            node = OmegaConf.to_container(node, resolve=True)
        return cls.from_options(**{k: v for k, v in dict(node).items() if k != "_target_"})

    @classmethod
    def from_options(cls, **options: Any) -> "RepaConfig":
        """Like `RepaConfig(**options)`, but an unknown option names the closest valid one."""
        valid = [f.name for f in fields(cls)]
        for key in options:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f"; did you mean `{close[0]}`?" if close else ""
                raise TypeError(f"unknown RepaCallback option `{key}`{hint} (options: {', '.join(valid)})")
        return cls(**options)


_ENUM_FIELDS = {
    "method": Method,
    "projector": Projector,
    "teacher": Teacher,
    "decoder": Decoder,
    "cache": Cache,
    "manifold_scope": ManifoldScope,
    "distance_unit": DistanceUnit,
    "schedule": ScheduleKind,
    "threshold_mode": ThresholdMode,
}


@dataclass(frozen=True)
class Resolved:
    """What a configuration means for the model it aligns (see `resolve`)."""

    family: Family  # block lists, token layout, grid
    method: Method  # the family's own unless the configuration names it (and then it must fit)
    block_index: int  # the student block: the configured one, or the family's default
    objective: Objective  # the method's objective, configured
    hooked_blocks: tuple[int, ...]  # the blocks to capture: the student's, and a backbone teacher's


def _identify(config: RepaConfig) -> tuple[Family, Method, int]:
    """The family, the method and the student block of a configuration: the one place where the
    family's own method and default block are applied."""
    family = get_family(config.family)
    method = Method.parse(config.method, "method") if config.method is not None else family.method
    return family, method, family.default_block_index if config.block_index is None else config.block_index


def resolve(config: RepaConfig) -> Resolved:
    """The family, method, block index and objective of a validated configuration."""
    family, method, block_index = _identify(config)
    teacher_block = (config.teacher_block_index,) if config.teacher is Teacher.backbone else ()
    return Resolved(family, method, block_index, build_objective(method, config), (block_index, *teacher_block))
