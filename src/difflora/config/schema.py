"""Typed configuration: one tree of pydantic models, loaded from YAML with dotted overrides.

This module is the bottom of the house: every layer may import it and it imports nothing of
difflora but its own parts (``config.base``: the strict base model; ``config.adapters``: the adapter,
Affiner and distillation sections; ``config.diffusers``: a diffusers backbone; ``config.diffusion``: the noise process; ``config.data``: the data section), which it re-exports, and :mod:`difflora.presets` (where the
shipped configs are). A config is passed whole to the code
that needs it (``UNetModel(cfg.model)``), never unpacked into a dozen keyword arguments.

Errors name the key and what is allowed::

    >>> load_config("configs/digits.yaml", ["train.lr=fast"])
    ConfigError: train.lr: input should be a valid number, got 'fast'
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from difflora.config.adapters import (
    DISTILL_ADAPTER,
    DISTILL_OBJECTIVE,
    DISTILL_TARGETS,
    AdapterConfig,
    AffinerConfig,
    DistillConfig,
)
from difflora.config.backbones import DIT_PRESETS, ContextConfig, DiTConfig, UNetConfig
from difflora.config.base import ConfigError, GuidanceScale, StrictModel, hold_fixed, unused_at_default
from difflora.config.data import (
    DATASET_SHAPES,
    DataConfig,
    DatasetName,
    SpatialConfig,
    TaskDataConfig,
)
from difflora.config.diffusers import DiffusersConfig, diffusers_problem
from difflora.config.diffusion import DiffusionConfig
from difflora.config.latent import LatentConfig, TextConfig
from difflora.config.overrides import apply_override, parse_override, yaml_problem
from difflora.config.pretrained import expand_pretrained
from difflora.presets import config_presets, resolve_config

__all__ = [
    "DISTILL_ADAPTER",
    "DISTILL_OBJECTIVE",
    "DISTILL_TARGETS",
    "DIT_PRESETS",
    "AdapterConfig",
    "AffinerConfig",
    "Config",
    "ConfigError",
    "ContextConfig",
    "DataConfig",
    "DiffusionConfig",
    "DiTConfig",
    "DiffusersConfig",
    "DistillConfig",
    "ModelConfig",
    "SampleConfig",
    "SpatialConfig",
    "TaskDataConfig",
    "TrainConfig",
    "UNetConfig",
    "config_to_dict",
    "load_config",
    "parse_config",
    "parse_saved_config",
    "DATASET_SHAPES",
    "DatasetName",
]


# model.arch -> its section of model (each backbone is described by its own section).
BACKBONES = ("unet", "dit", "diffusers")


class ModelConfig(StrictModel):
    # diffusers: a diffusers model built from model.diffusers (difflora.nets.diffusers_wrap).
    arch: Literal["unet", "dit", "diffusers"] = "unet"
    """The backbone: unet, dit, or diffusers (a diffusers model from model.diffusers)."""
    # A diffusers model or pipeline folder (difflora.config.pretrained): it decides the architecture
    # and the noise process, and its weights are the base (train.init_from defaults to it).
    pretrained: str | None = None
    """A diffusers model or pipeline folder: its architecture, noise process and weights are the base."""
    # A pipeline's vae and text encoder (difflora.config.latent; filled from the folder).
    latent: LatentConfig | None = None
    """A pipeline's VAE: the model trains and samples in its latent space (filled from model.pretrained)."""
    text: TextConfig | None = None
    """A pipeline's text encoder: prompts become cross-attention context (filled from model.pretrained)."""
    # Filled from the data config when None.
    image_size: int | None = Field(default=None, ge=4)
    """Side of the images (or latents) the model sees (unset: from the data)."""
    in_channels: int | None = Field(default=None, ge=1)
    """Channels of the model's input (unset: from the data)."""
    learn_sigma: bool = True
    """Learn the variance too (IDDPM): the network outputs twice the input channels."""
    # 0 = unconditional. With classes, y = -1 is the null label (no class conditioning).
    num_classes: int = Field(default=0, ge=0)
    """Number of class labels (0: unconditional); label -1 is the null class."""
    # Incremental classes (DiffScaler, 002 eq. 1): the last new_classes of num_classes are new to a
    # base of num_classes - new_classes classes (train.init_from); they start as the null class.
    new_classes: int = Field(default=0, ge=0)
    """The last N of num_classes are new to the base (002's incremental classes)."""
    time_embed: bool = True
    """Keep the timestep embedding (000's TimeLoRA removes it)."""
    class_embed: bool = True
    """Keep the class embedding (000's ClassLoRA removes it)."""
    unet: UNetConfig = Field(default_factory=UNetConfig)
    """The U-Net's settings (model.arch: unet)."""
    dit: DiTConfig = Field(default_factory=DiTConfig)
    """The DiT's settings (model.arch: dit)."""
    diffusers: DiffusersConfig = Field(default_factory=DiffusersConfig)
    """The diffusers model's class and arguments (model.arch: diffusers)."""
    # self: the backbone's own attention blocks. cross: LDM-style transformer blocks (self-attention,
    # cross-attention over model.context, GEGLU feed-forward) in their place; the class label then
    # enters through the context only (learned tokens per class, a learned null context for y = -1).
    attention: Literal["self", "cross"] = "self"
    """self: the backbone's own attention; cross: LDM-style blocks reading a context (the class enters through it)."""
    context: ContextConfig = Field(default_factory=ContextConfig)
    """The context of model.attention: cross."""
    adapters: list[AdapterConfig] = Field(default_factory=list)
    """The conditional adapters injected into the backbone."""
    # DiffScaler's Affiner on many layers at once (expanded into adapters when the model is built).
    affiner: AffinerConfig | None = None
    """DiffScaler's Affiner on many layers at once (expanded into adapters)."""
    # Channels of the spatial condition image (filled from data.spatial; 0 = none) and how it enters:
    # concat: extra input channels of the first conv, zero-initialised (difflora.data.spatial);
    # controlnet: a trainable copy of the encoder joined by zero 1x1 convs (difflora.nets.controlnet).
    spatial_channels: int | None = Field(default=None, ge=0)
    """Channels of the spatial condition image (unset: from data.spatial; 0: none)."""
    spatial_input: Literal["concat", "controlnet"] = "concat"
    """How a spatial condition enters: concat (extra input channels) or controlnet (a trainable encoder copy)."""
    # Activation checkpointing (training): each block of the backbone (U-Net input/middle/output
    # blocks, DiT blocks) recomputes its activations in backward instead of storing them; the
    # per-sample conditions are re-entered for the recompute (difflora.adapters.checkpoint).
    checkpoint_blocks: bool = False
    """Activation checkpointing: recompute each block's activations in backward to save memory."""

    @property
    def out_channels(self) -> int:
        assert self.in_channels is not None
        return self.in_channels * (2 if self.learn_sigma else 1)

    @model_validator(mode="after")
    def _unused_backbones(self) -> ModelConfig:
        # The sections of the backbones model.arch does not build cannot take effect: they keep their
        # defaults, and one set to another value is refused. (`--set model.arch=dit` on a U-Net preset
        # switches: parse_config then drops the preset's own backbone section, see _switch_arch.)
        for name in [b for b in BACKBONES if b != self.arch]:
            section = getattr(self, name)
            hold_fixed(section, f"model.{name}", unused_at_default(section), f"model.arch={self.arch}")
        if self.arch != "diffusers" and self.attention == "self":  # a diffusers UNet2DConditionModel reads it
            by = "model.attention=self (no cross-attention reads a context: set model.attention=cross)"
            # (new_tokens has its own error, naming what it needs, where the model is built)
            unused = unused_at_default(self.context, ("dim", "tokens", "depth", "ff_mult"))
            hold_fixed(self.context, "model.context", unused, by)
        return self


class TrainConfig(StrictModel):
    steps: int = Field(default=1000, ge=1)
    """Number of optimizer steps."""
    batch_size: int = Field(default=64, ge=1)
    """Global batch size (over every process and micro-batch)."""
    lr: float = Field(default=1e-4, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW's weight decay."""
    # Linear warm-up over the first warmup_steps steps (step s runs at lr * (s+1)/warmup_steps), then
    # lr_schedule: constant holds train.lr; linear and cosine decay it towards 0 over the steps left
    # (difflora.train.step.scheduled_lr). A decaying schedule's length is train.steps.
    warmup_steps: int = Field(default=0, ge=0)
    """Steps of linear learning-rate warm-up."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning rate after warm-up: constant, or linear or cosine decay towards 0."""
    # 0 disables clipping.
    grad_clip: float = Field(default=1.0, ge=0)
    """Clip the gradients' global norm to this (0: no clipping)."""
    ema_decay: float = Field(default=0.9999, ge=0, le=1)
    """Decay of the exponential moving average of the weights (sampled by default)."""
    # Probability that a training label is replaced by the null label (classifier-free guidance).
    label_dropout: float = Field(default=0.1, ge=0, le=1)
    """Probability a training label is replaced by the null label (classifier-free guidance)."""
    # A text pipeline's captions replaced by the empty prompt with this probability (guidance's unconditional branch).
    prompt_dropout: float = Field(default=0.1, ge=0, le=1)
    """Probability a caption is replaced by the empty prompt (a text pipeline's guidance)."""
    # Train the backbone's own weights too (000 trains W with the LoRAs from scratch). False freezes
    # every parameter that is not an adapter's (build_model applies it): adapter fine-tuning.
    train_base: bool = True
    """Train the backbone's own weights too (false: adapters only)."""
    # With train_base false: groups of the base's own parameters that still train (bias, norm,
    # embedding: BitFit, DiffFit and embedding-only baselines; difflora.diffscaler.baselines).
    base_groups: list[Literal["bias", "norm", "embedding"]] = Field(default_factory=list)
    """With train_base false: groups of base parameters that still train (bias, norm, embedding)."""
    # Learning rate of the new class-token table (model.context.new_tokens); None: train.lr. The
    # table starts at one base token and must travel the distance between the base's class tokens
    # (~14 in the design-space base), far beyond what the adapters' lr moves it in a short run.
    token_lr: float | None = Field(default=None, gt=0)
    """Learning rate of the new class-token table (unset: train.lr)."""
    # Adapt a trained model: a run directory (its newest checkpoint) or one checkpoint directory
    # of a run trained without adapters. Its weights fill the base (wrapped layers' base_layer);
    # the run's checkpoints then hold the trainable tensors only, plus the base's fingerprint.
    init_from: str | None = None
    """Start from a trained run (its newest checkpoint), a checkpoint, or pretrained:NAME; its weights are the base."""
    # Which weights of init_from: the EMA weights (what sampling uses) or the raw model weights.
    init_weights: Literal["ema", "model"] = "ema"
    """Which weights of init_from: ema or model."""
    # What the loop minimises (difflora.train.objectives): the diffusion loss of cfg.diffusion, or
    # distill: a LoRA student matches the classifier-free-guided teacher (the distill section).
    objective: Literal["diffusion", "distill"] = "diffusion"
    """What the loop minimises: diffusion (the diffusion loss) or distill (003's LoRA student)."""
    # DiT masked training (DiffScaler, 002 section 4.2): each sample drops this fraction of its patch
    # tokens (random per sample) and the loss covers the kept patches only. 0: no masking.
    mask_ratio: float = Field(default=0.0, ge=0, lt=1)
    """DiT masked training (002): fraction of patch tokens each sample drops (0: none)."""
    seed: int = 0
    """Seed of initialisation, data order and noise."""
    device: str = "auto"
    """Device to train on: auto, cpu, cuda, cuda:N or mps."""
    log_every: int = Field(default=50, ge=1)
    """Log the training metrics every N steps."""
    ckpt_every: int = Field(default=500, ge=1)
    """Write a checkpoint every N steps."""
    # Retention: the newest keep_checkpoints checkpoints (0 keeps all), plus every one whose step is a
    # multiple of keep_every (0: none), plus every one another run was started from (train.dependents).
    keep_checkpoints: int = Field(default=2, ge=0)
    """Keep the newest N checkpoints (0: all)."""
    keep_every: int = Field(default=0, ge=0)
    """Also keep every checkpoint whose step is a multiple of N (0: none)."""
    # 0 disables periodic sample grids.
    sample_every: int = Field(default=0, ge=0)
    """Write a sample grid every N steps (0: none)."""
    # Mixed precision (autocast; weights, optimizer state and EMA stay fp32): bf16, or fp16 with a
    # gradient scaler; auto: bf16 where the CPU or GPU computes bf16 natively, else fp32. See README
    # "Training at scale" and docs/speed.md.
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    """Mixed precision of the forward and backward: fp32, bf16, fp16 or auto (bf16 where native, else fp32); weights stay fp32."""
    # Micro-batches per step: batch_size (the global batch, over all processes) is split into
    # grad_accum parts whose gradients are summed before one optimizer step.
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step (batch_size is split into them)."""
    # torch.compile the model for training (needs a C++ compiler on CPU).
    compile: bool = False
    """torch.compile the model for training."""
    # Trackers of the training loop (difflora.train.trackers): scalars, sample grids, the resolved
    # config and the evaluation metrics. wandb runs offline (the wandb extra), never over the network.
    trackers: list[Literal["tensorboard", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    """Where training is logged besides metrics.jsonl: tensorboard (RUN_DIR/tb), wandb (offline, RUN_DIR/wandb)."""


class SampleConfig(StrictModel):
    """Defaults for sample grids written during training and by ``difflora sample``."""

    num: int = Field(default=64, ge=1)
    """Number of images to draw."""
    steps: int = Field(default=50, ge=1)
    """Sampler steps."""
    sampler: Literal["ddpm", "ddim"] = "ddim"
    """ddpm (ancestral) or ddim."""
    eta: float = Field(default=0.0, ge=0)
    """DDIM's noise scale (0: deterministic)."""
    guidance: GuidanceScale = 1.0
    """Classifier-free guidance scale w (1: conditional, 0: unconditional)."""
    # Selective guidance: classifier-free guidance on the first (noisiest) fraction of the sampler's
    # steps only, the rest conditional (one pass per step); 1 = guidance on every step.
    guidance_fraction: float = Field(default=1.0, ge=0, le=1)
    """Guide only the first (noisiest) fraction of the steps (1: every step)."""
    batch_size: int = Field(default=256, ge=1)
    """Images per sampling forward."""

    def with_changes(self, changes: dict[str, Any]) -> SampleConfig:
        """These settings with ``changes`` applied, validated by the same rules; a change of sampler
        drops the eta that belonged to the old one."""
        base = self.model_dump()
        if changes.get("sampler", self.sampler) != self.sampler:
            del base["eta"]
        return SampleConfig.model_validate(base | changes)

    @model_validator(mode="after")
    def _ddpm_has_no_eta(self) -> SampleConfig:
        if self.sampler == "ddpm":  # ancestral sampling draws the diffusion's own variance
            hold_fixed(self, "sample", {"eta": 0.0}, "sample.sampler=ddpm")
        return self


class Config(StrictModel):
    data: DataConfig = Field(default_factory=DataConfig)
    """The training data."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The network and its adapters."""
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    """The noise process and loss."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """The training loop."""
    sample: SampleConfig = Field(default_factory=SampleConfig)
    """Sampling defaults (grids during training, difflora sample, eval)."""
    distill: DistillConfig = Field(default_factory=DistillConfig)
    """003's distillation of guidance into a LoRA student (train.objective: distill)."""

    @model_validator(mode="after")
    def _resolve(self) -> Config:
        size, channels = self.data.resolved_shape()
        m = self.model
        if m.latent is not None:  # the model sees the VAE's latents of the data's images
            size, channels = m.latent.model_shape(size, channels)
        if m.image_size is None:
            if size is None:
                raise ValueError("model.image_size: set it or data.image_size (image folders have no native size)")
            object.__setattr__(m, "image_size", size)
        elif size is not None and m.image_size != size:
            raise ValueError(
                f"model.image_size ({m.image_size}) differs from the data's image size ({size}); set data.image_size={m.image_size}"
            )
        if m.in_channels is None:
            object.__setattr__(m, "in_channels", channels)
        elif m.in_channels != channels:
            raise ValueError(
                f"model.in_channels ({m.in_channels}) differs from the data's channels ({channels}) for data.name={self.data.name}"
            )
        self._resolve_spatial()
        if self.diffusion.loss is None:
            object.__setattr__(self.diffusion, "loss", "hybrid" if m.learn_sigma else "mse")
        if self.diffusion.loss == "hybrid" and not m.learn_sigma:
            raise ValueError("diffusion.loss=hybrid needs model.learn_sigma=true (the vb term trains the variance)")
        if self.diffusion.loss == "mse" and m.learn_sigma:
            raise ValueError(
                "diffusion.loss=mse with model.learn_sigma=true leaves the variance channels untrained; use diffusion.loss=hybrid (IDDPM) or model.learn_sigma=false"
            )
        if m.arch == "dit" and m.image_size % m.dit.patch_size:
            raise ValueError(f"model.dit.patch_size ({m.dit.patch_size}) must divide model.image_size ({m.image_size})")
        if m.pretrained is not None and m.arch != "diffusers":
            raise ValueError(
                "model.pretrained: load the config with load_config or parse_config (they read the folder)"
            )
        if m.arch == "diffusers" and (problem := diffusers_problem(m)):
            raise ValueError(problem)
        self._check_affiner_tasks()
        if self.train.mask_ratio and (m.arch != "dit" or self.train.objective != "diffusion"):
            raise ValueError(
                "train.mask_ratio drops DiT patch tokens in the diffusion loss: it needs model.arch=dit and train.objective=diffusion"
            )
        self._hold_unused_train_keys()
        self._hold_sample_steps()
        if self.distilled:
            self._resolve_distill()
        else:
            by = "train.objective=diffusion (to distil, run `difflora distill` or set train.objective=distill)"
            hold_fixed(self.distill, "distill", unused_at_default(self.distill), by)
        return self

    def _hold_sample_steps(self) -> None:
        """A sampler takes at most one step per timestep: an explicit sample.steps above
        diffusion.steps is refused, the default is held at diffusion.steps."""
        s, steps = self.sample, self.diffusion.steps
        if s.steps > steps:
            if "steps" in s.model_fields_set:
                raise ValueError(
                    f"sample.steps ({s.steps}) exceeds diffusion.steps ({steps}): a sampler takes at most one "
                    f"step per timestep; set sample.steps to at most {steps}"
                )
            object.__setattr__(s, "steps", steps)

    def _hold_unused_train_keys(self) -> None:
        """train keys that only act with another setting keep their defaults without it."""
        t = self.train
        if t.init_from is None:
            no_base = "train.init_from=None (no base to take weights from)"
            hold_fixed(t, "train", unused_at_default(t, ("init_weights",)), no_base)
        if self.model.context.new_tokens is None:
            hold_fixed(
                t,
                "train",
                unused_at_default(t, ("token_lr",)),
                "model.context.new_tokens=None (no new class tokens: set model.context.new_tokens to train a table at this rate)",
            )
        if t.train_base:
            hold_fixed(
                t,
                "train",
                unused_at_default(t, ("base_groups",)),
                "train.train_base=true (for a frozen base with these groups training, set train.train_base=false)",
            )
        if self.model.text is None:
            hold_fixed(t, "train", unused_at_default(t, ("prompt_dropout",)), "a model without a text encoder")
        if self.distilled:
            teacher = "train.objective=distill (the teacher's labels and captions, no dropout)"
            hold_fixed(t, "train", unused_at_default(t, ("label_dropout", "prompt_dropout")), teacher)

    @property
    def distilled(self) -> bool:
        """Whether this is a distilled run (``train.objective: distill``, 003): its network samples as
        a one-pass student of a guided teacher. The one place the code asks it."""
        return self.train.objective == DISTILL_OBJECTIVE

    def _resolve_spatial(self) -> None:
        """model.spatial_channels follows data.spatial; spatial conditioning needs the U-Net."""
        sp, m = self.data.spatial, self.model
        want = sp.channels(m.in_channels) if sp is not None else 0
        if m.spatial_channels is None:
            object.__setattr__(m, "spatial_channels", want)
        elif m.spatial_channels != want:
            raise ValueError(
                f"model.spatial_channels ({m.spatial_channels}) differs from the {want} channels data.spatial gives; "
                "leave it unset (it follows data.spatial)"
            )
        if want and m.arch != "unet":
            raise ValueError("data.spatial: spatial conditioning is built for model.arch=unet")

    def _check_affiner_tasks(self) -> None:
        """A ``task`` Affiner needs data that carries task ids, and one entry per id."""
        aff, data = self.model.affiner, self.data
        if aff is None or aff.condition != "task":
            return
        if not data.tasks and data.task_id is None and data.spatial is None:
            raise ValueError(
                "model.affiner reads the condition task but the data carries no task ids: set data.task_id=K "
                "(the task id of these images, e.g. 0) or list more datasets in data.tasks"
            )
        extra = len(data.spatial.tasks) - 1 if data.spatial is not None else len(data.tasks)
        needed = (data.task_id or 0) + extra + 1
        if aff.tasks < needed:
            raise ValueError(
                f"model.affiner.tasks ({aff.tasks}) does not cover the data's task ids 0..{needed - 1}; "
                f"set model.affiner.tasks={needed}"
            )

    def _resolve_distill(self) -> None:
        """Distillation needs a class-conditional teacher; the distill section generates the
        student's LoRA entry in model.adapters (a saved config already holds it: it must match)."""
        if self.model.arch == "diffusers" and not self.distill.targets:
            raise ValueError(
                "train.objective=distill on a diffusers model needs distill.targets (module paths; no defaults)"
            )
        if not self.model.num_classes and self.model.text is None:
            raise ValueError(
                "train.objective=distill distils classifier-free guidance, which needs a class-conditional "
                "teacher (model.num_classes > 0) or a text pipeline; train the teacher with classes first"
            )
        if not self.train.init_from:
            raise ValueError(
                "train.objective=distill needs the teacher: set train.init_from to the teacher's run directory"
            )
        if self.train.train_base:
            # 003's "distillation without LoRA": the whole network trains, a frozen teacher copy guides it.
            if self.distill.guidance_range is not None or self.distill.shared_forward or self.model.adapters:
                raise ValueError(
                    "train.objective=distill with train.train_base=true fully fine-tunes the teacher's plain network "
                    "at one w: no distill.guidance_range, distill.shared_forward or model.adapters (or set "
                    "train.train_base=false for the LoRA student)"
                )
            return
        want = self.distill.adapter(self.model.arch)
        have = [a for a in self.model.adapters if a.name == DISTILL_ADAPTER]
        if not have:
            object.__setattr__(self.model, "adapters", [*self.model.adapters, want])
        elif have[0] != want:
            raise ValueError(
                f"model.adapters[{DISTILL_ADAPTER}] differs from the one the distill section generates; "
                "remove it from model.adapters (the distill section describes the student's LoRA)"
            )


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-after"))


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the parent of ``loc`` (to list valid keys)."""
    model: Any = Config
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _explain(err: ValidationError) -> ConfigError:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = _format_loc(loc)
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc)
            valid = sorted(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"{key}: unknown key{hint}; valid keys here: {', '.join(valid)}")
        elif e["type"] == "value_error":
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            got = e.get("input")
            lines.append(f"{key}: {e['msg'][0].lower() + e['msg'][1:]}, got {got!r}")
    return ConfigError("invalid config:\n  " + "\n  ".join(lines))


def _switch_arch(tree: dict[str, Any], key: str, value: Any) -> None:
    """``--set model.arch=dit`` on a U-Net config switches the backbone: the section of the backbone
    it leaves (between unet and dit), set before the switch, belonged to the old arch and is dropped."""
    model = tree.get("model")
    if key != "model.arch" or value not in ("unet", "dit") or not isinstance(model, dict):
        return
    old = model.get("arch", "unet")
    if old != value and old in ("unet", "dit"):
        model.pop(old, None)


def parse_saved_config(tree: dict[str, Any]) -> Config:
    """A config a run saved (``config.json``, a checkpoint's ``state.json``). It records every key,
    also sections its mode did not use; those never took effect (a run saved before they were held
    at their defaults may record a preset's values there), so they are read as unset: the backbone
    sections model.arch does not build, and the distill section of a run that is not distilled."""
    tree = copy.deepcopy(tree)
    model = tree.get("model")
    if isinstance(model, dict):
        for name in [b for b in BACKBONES if b != model.get("arch", "unet")]:
            model.pop(name, None)
    if isinstance(tree.get("train"), dict) and tree["train"].get("objective", "diffusion") != DISTILL_OBJECTIVE:
        tree.pop("distill", None)
    return parse_config(tree)


def parse_config(tree: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    tree = copy.deepcopy(tree or {})
    if not isinstance(tree, dict):
        raise ConfigError("a config must be a mapping of sections (data, model, diffusion, train, sample)")
    for text in overrides:
        key, value = parse_override(text)
        _switch_arch(tree, key, value)
        apply_override(tree, key, value)
    try:
        return Config.model_validate(expand_pretrained(tree))
    except ValidationError as err:
        raise _explain(err) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply ``key=value`` overrides.

    ``path`` is a file, a repository-relative ``configs/...`` path or a preset name (``digits``):
    see :mod:`difflora.presets`.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = resolve_config(path)
        if p is None:
            raise ConfigError(
                f"config file {path} does not exist, neither on disk nor as a shipped preset "
                f"(presets: {', '.join(config_presets())})"
            )
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"{p} is not a YAML text file (not UTF-8)") from None
        except OSError as exc:  # a directory, a special file, no permission: name the file, not an errno
            raise ConfigError(
                f"{p}: cannot read it ({(exc.strerror or str(exc)).lower()}); give a YAML config file"
            ) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {yaml_problem(exc)}") from None
    return parse_config(tree, overrides)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
