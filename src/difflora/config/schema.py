"""Typed configuration: one tree of pydantic models, loaded from YAML with dotted overrides.

This module is the bottom of the house: every layer may import it and it imports nothing of
difflora but its own parts (``config.base``: the strict base model; ``config.adapters``: the adapter,
Affiner and distillation sections; ``config.diffusers``: a diffusers backbone; ``config.diffusion``: the noise process), which it re-exports, and :mod:`difflora.presets` (where the
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
from difflora.config.diffusers import DiffusersConfig, diffusers_problem
from difflora.config.diffusion import DiffusionConfig
from difflora.config.latent import LatentConfig, TextConfig
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
    "DATASET_SHAPES",
]


# Native (image_size, channels) of each dataset; None where the files decide (image folders).
DATASET_SHAPES: dict[str, tuple[int | None, int]] = {
    "digits": (8, 1),
    "mnist": (28, 1),
    "fashion-mnist": (28, 1),
    "mnist-5k": (28, 1),
    "cifar10": (32, 3),
    "image-folder": (None, 3),
}

DatasetName = Literal["digits", "mnist", "fashion-mnist", "mnist-5k", "cifar10", "image-folder"]


class TaskDataConfig(StrictModel):
    """One more dataset of a multi-dataset run (``data.tasks``); its samples carry its task index."""

    name: DatasetName
    root: str | None = None
    # First N training examples of this dataset (0 = all).
    limit: int = Field(default=0, ge=0)
    channels: Literal[1, 3] | None = None  # as data.channels


SpatialTask = Literal["edges", "lowres", "inpaint"]


class SpatialConfig(StrictModel):
    """Spatial conditioning tasks (DiffScaler 002 section 3.4, ``difflora.data.spatial``): each clean
    image appears once per task, paired with the condition image the task computes from it."""

    # Task k of this list has task id data.task_id + k (0 + k when unset).
    tasks: list[SpatialTask] = Field(min_length=1)
    # lowres: the side of the block-mean image the condition shows (upsampled to the model size).
    lowres: int = Field(default=4, ge=1)
    # inpaint: the side of the masked (unknown) centre square, as a fraction of the image side.
    hole: float = Field(default=0.5, gt=0, lt=1)
    # edges: None keeps the Sobel magnitude (in [0, 1]); a number gives binary edges above it.
    edge_threshold: float | None = Field(default=None, gt=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> SpatialConfig:
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"data.spatial.tasks: give each task at most once, got {self.tasks}")
        return self

    def channels(self, image_channels: int) -> int:
        """Channels of the condition image: one slot per task (edges and lowres: C, inpaint: C + 1 for the mask)."""
        return sum(image_channels + (t == "inpaint") for t in self.tasks)


class DataConfig(StrictModel):
    name: DatasetName = "digits"
    # Directory holding the files; None means the dataset's default location (see data/).
    root: str | None = None
    # Resize to this side length (bilinear, antialiased); None keeps the native size.
    image_size: int | None = Field(default=None, ge=4, le=1024)
    hflip: bool = False
    # Restrict training to the first N examples (0 = all); handy for quick experiments.
    limit: int = Field(default=0, ge=0)
    # Multi-dataset training: more datasets, tasks 1..K (the dataset above is task 0). Every sample
    # carries its task index as the per-sample condition ``task``; images are resized to the run's
    # image size and must have its number of channels.
    tasks: list[TaskDataConfig] = Field(default_factory=list)
    # Class labels of a multi-dataset run: "shared" keeps each dataset's own labels (class 3 of
    # every task is label 3: one class embedding serves all tasks, as when adapting a base model);
    # "offset" numbers the classes of task k after those of tasks 0..k-1 (disjoint labels).
    task_labels: Literal["shared", "offset"] = "shared"
    # The task id of data.name's samples (data.tasks[k] then get task_id + k + 1). None: 0 with
    # data.tasks, and no task condition for a single dataset. Set it to adapt to one dataset as a
    # task of a multi-task model (DiffScaler: model.affiner), e.g. the new task of the sequential regime.
    task_id: int | None = Field(default=None, ge=0)
    # Spatial conditioning (edge map / low-res / masked centre -> image), one task id per spatial task.
    spatial: SpatialConfig | None = None
    # An image folder read as 1 (grayscale) or 3 (RGB, default) channels; other datasets: their own.
    channels: Literal[1, 3] | None = None
    # Decoding processes of a streamed image folder (difflora.data.stream); None: min(4, CPUs/process - 1).
    workers: int | None = Field(default=None, ge=0)
    # Folder of image-folder indexes (difflora.data.folder_index); None: $DIFFLORA_CACHE/image-folders.
    index_cache: str | None = None

    def resolved_shape(self) -> tuple[int | None, int]:
        return (self.image_size or DATASET_SHAPES[self.name][0]), _resolve_channels(self, "data")

    @property
    def streams(self) -> bool:
        """Whether training reads this data from disk batch by batch (one image folder), not from memory."""
        return self.name == "image-folder" and not self.tasks and self.spatial is None

    @model_validator(mode="after")
    def _check_tasks(self) -> DataConfig:
        size, channels = self.resolved_shape()
        for k, task in enumerate(self.tasks, start=1):
            c = _resolve_channels(task, f"data.tasks[{k - 1}]")
            if c != channels:
                fix = {task.name: f"data.tasks[{k - 1}].channels={channels}", self.name: f"data.channels={c}"}
                fix = f" (an image folder reads as either: set {fix['image-folder']})" if "image-folder" in fix else ""
                raise ValueError(
                    f"data.tasks[{k - 1}].name: {task.name} has {c} channel(s) but task 0 ({self.name}) has "
                    f"{channels}; every task of a run needs the same number of channels{fix}"
                )
            if size is None:
                raise ValueError("data.image_size: required with data.tasks when data.name=image-folder")
        if self.spatial is not None and (self.tasks or self.hflip):
            raise ValueError(
                "data.spatial: spatial tasks pair each image with its own condition image; remove data.tasks "
                "and data.hflip (a flip would no longer match its condition)"
            )
        if self.spatial is not None and size is not None and size < self.spatial.lowres:
            raise ValueError(f"data.spatial.lowres ({self.spatial.lowres}) exceeds the image size ({size})")
        if not self.streams:  # only one image folder streams; no folder, no index
            hold_fixed(self, "data", {"workers": None}, "a run that does not stream one image folder")
        if "image-folder" not in {self.name, *(t.name for t in self.tasks)}:
            hold_fixed(self, "data", {"index_cache": None}, "a run without an image folder")
        return self


def _resolve_channels(data: DataConfig | TaskDataConfig, where: str) -> int:
    """The channels ``data`` is read with: a folder's ``channels`` (3 when unset), else the dataset's own."""
    native = DATASET_SHAPES[data.name][1]
    fixed = {"channels": native} if data.name != "image-folder" or data.channels is None else {}
    hold_fixed(data, where, fixed, f"{where}.name={data.name} ({native} channel(s))")
    return data.channels


class ModelConfig(StrictModel):
    # diffusers: a diffusers model built from model.diffusers (difflora.nets.diffusers_wrap).
    arch: Literal["unet", "dit", "diffusers"] = "unet"
    # A diffusers model or pipeline folder (difflora.config.pretrained): it decides the architecture
    # and the noise process, and its weights are the base (train.init_from defaults to it).
    pretrained: str | None = None
    # A pipeline's vae and text encoder (difflora.config.latent; filled from the folder).
    latent: LatentConfig | None = None
    text: TextConfig | None = None
    # Filled from the data config when None.
    image_size: int | None = Field(default=None, ge=4)
    in_channels: int | None = Field(default=None, ge=1)
    learn_sigma: bool = True
    # 0 = unconditional. With classes, y = -1 is the null label (no class conditioning).
    num_classes: int = Field(default=0, ge=0)
    # Incremental classes (DiffScaler, 002 eq. 1): the last new_classes of num_classes are new to a
    # base of num_classes - new_classes classes (train.init_from); they start as the null class.
    new_classes: int = Field(default=0, ge=0)
    time_embed: bool = True
    class_embed: bool = True
    unet: UNetConfig = Field(default_factory=UNetConfig)
    dit: DiTConfig = Field(default_factory=DiTConfig)
    diffusers: DiffusersConfig = Field(default_factory=DiffusersConfig)
    # self: the backbone's own attention blocks. cross: LDM-style transformer blocks (self-attention,
    # cross-attention over model.context, GEGLU feed-forward) in their place; the class label then
    # enters through the context only (learned tokens per class, a learned null context for y = -1).
    attention: Literal["self", "cross"] = "self"
    context: ContextConfig = Field(default_factory=ContextConfig)
    adapters: list[AdapterConfig] = Field(default_factory=list)
    # DiffScaler's Affiner on many layers at once (expanded into adapters when the model is built).
    affiner: AffinerConfig | None = None
    # Channels of the spatial condition image (filled from data.spatial; 0 = none) and how it enters:
    # concat: extra input channels of the first conv, zero-initialised (difflora.data.spatial);
    # controlnet: a trainable copy of the encoder joined by zero 1x1 convs (difflora.nets.controlnet).
    spatial_channels: int | None = Field(default=None, ge=0)
    spatial_input: Literal["concat", "controlnet"] = "concat"
    # Activation checkpointing (training): each block of the backbone (U-Net input/middle/output
    # blocks, DiT blocks) recomputes its activations in backward instead of storing them; the
    # per-sample conditions are re-entered for the recompute (difflora.adapters.checkpoint).
    checkpoint_blocks: bool = False

    @property
    def out_channels(self) -> int:
        assert self.in_channels is not None
        return self.in_channels * (2 if self.learn_sigma else 1)

    @model_validator(mode="after")
    def _unused_backbones(self) -> ModelConfig:
        # A diffusers model is described by model.diffusers alone: difflora's backbone sections cannot take
        # effect and keep their defaults. (Between unet and dit, `--set model.arch=dit` on a U-Net preset is
        # the way to switch; only the other backbone's section is then unused, as config.json says.)
        sections = ("unet", "dit") if self.arch == "diffusers" else ("diffusers",)
        for name in sections:
            section = getattr(self, name)
            hold_fixed(section, f"model.{name}", unused_at_default(section), f"model.arch={self.arch}")
        return self


class TrainConfig(StrictModel):
    steps: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    # 0 disables clipping.
    grad_clip: float = Field(default=1.0, ge=0)
    ema_decay: float = Field(default=0.9999, ge=0, le=1)
    # Probability that a training label is replaced by the null label (classifier-free guidance).
    label_dropout: float = Field(default=0.1, ge=0, le=1)
    # A text pipeline's captions replaced by the empty prompt with this probability (guidance's unconditional branch).
    prompt_dropout: float = Field(default=0.1, ge=0, le=1)
    # Train the backbone's own weights too (000 trains W with the LoRAs from scratch). False freezes
    # every parameter that is not an adapter's (build_model applies it): adapter fine-tuning.
    train_base: bool = True
    # With train_base false: groups of the base's own parameters that still train (bias, norm,
    # embedding: BitFit, DiffFit and embedding-only baselines; difflora.diffscaler.baselines).
    base_groups: list[Literal["bias", "norm", "embedding"]] = Field(default_factory=list)
    # Learning rate of the new class-token table (model.context.new_tokens); None: train.lr. The
    # table starts at one base token and must travel the distance between the base's class tokens
    # (~14 in the design-space base), far beyond what the adapters' lr moves it in a short run.
    token_lr: float | None = Field(default=None, gt=0)
    # Adapt a trained model: a run directory (its newest checkpoint) or one checkpoint directory
    # of a run trained without adapters. Its weights fill the base (wrapped layers' base_layer);
    # the run's checkpoints then hold the trainable tensors only, plus the base's fingerprint.
    init_from: str | None = None
    # Which weights of init_from: the EMA weights (what sampling uses) or the raw model weights.
    init_weights: Literal["ema", "model"] = "ema"
    # What the loop minimises (difflora.train.objectives): the diffusion loss of cfg.diffusion, or
    # distill: a LoRA student matches the classifier-free-guided teacher (the distill section).
    objective: Literal["diffusion", "distill"] = "diffusion"
    # DiT masked training (DiffScaler, 002 section 4.2): each sample drops this fraction of its patch
    # tokens (random per sample) and the loss covers the kept patches only. 0: no masking.
    mask_ratio: float = Field(default=0.0, ge=0, lt=1)
    seed: int = 0
    device: str = "auto"
    log_every: int = Field(default=50, ge=1)
    ckpt_every: int = Field(default=500, ge=1)
    # 0 disables periodic sample grids.
    sample_every: int = Field(default=0, ge=0)
    # Mixed precision (autocast; weights, optimizer state and EMA stay fp32): bf16, or fp16 with a
    # gradient scaler. See README "Training at scale".
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Micro-batches per step: batch_size (the global batch, over all processes) is split into
    # grad_accum parts whose gradients are summed before one optimizer step.
    grad_accum: int = Field(default=1, ge=1)
    # torch.compile the model for training (needs a C++ compiler on CPU).
    compile: bool = False


class SampleConfig(StrictModel):
    """Defaults for sample grids written during training and by ``difflora sample``."""

    num: int = Field(default=64, ge=1)
    steps: int = Field(default=50, ge=1)
    sampler: Literal["ddpm", "ddim"] = "ddim"
    eta: float = Field(default=0.0, ge=0)
    guidance: GuidanceScale = 1.0
    # Selective guidance: classifier-free guidance on the first (noisiest) fraction of the sampler's
    # steps only, the rest conditional (one pass per step); 1 = guidance on every step.
    guidance_fraction: float = Field(default=1.0, ge=0, le=1)
    batch_size: int = Field(default=256, ge=1)

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
    model: ModelConfig = Field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)

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
        if self.distilled:
            self._resolve_distill()
        return self

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
            teacher = "train.objective=distill (the teacher's labels, no dropout)"
            hold_fixed(t, "train", unused_at_default(t, ("label_dropout",)), teacher)

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
        if not self.model.num_classes:
            raise ValueError(
                "train.objective=distill distils classifier-free guidance, which needs a class-conditional "
                "teacher (model.num_classes > 0); train the teacher with classes first"
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


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    # PyYAML's str() spans several lines with a drawing of the text; the problem and its place suffice.
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{getattr(exc, 'problem', None) or exc}"


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=2e-4"`` -> ``("train.lr", 0.0002)``; values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.lr=2e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {_yaml_problem(exc)}") from None
    # YAML reads "1e-4" as a string (no dot); a number is what the user meant.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return key, value


def parse_config(tree: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    tree = copy.deepcopy(tree or {})
    if not isinstance(tree, dict):
        raise ConfigError("a config must be a mapping of sections (data, model, diffusion, train, sample)")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
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
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {_yaml_problem(exc)}") from None
    return parse_config(tree, overrides)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
