"""Config sections that describe adapters: one adapter entry, DiffScaler's Affiner recipe, and the
distillation student (the section that generates its LoRA entry).

Imported and re-exported by ``difflora.config.schema``; like it, this imports nothing else of difflora.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from difflora.config.base import GuidanceScale, StrictModel, hold_fixed, unused_at_default

__all__ = ["DISTILL_ADAPTER", "DISTILL_TARGETS", "AdapterConfig", "AffinerConfig", "DistillConfig", "target_regex"]


def target_regex(target: str) -> re.Pattern[str] | None:
    """The compiled regex of a ``"re:"`` adapter target (None for a path or suffix). A regex that
    does not compile is a ValueError naming it: checked when a config is read, and again by the
    injection that matches it (the Python API takes targets without a config)."""
    if not target.startswith("re:"):
        return None
    try:
        return re.compile(target[3:])
    except re.error as exc:
        raise ValueError(f"adapter target {target!r} is not a regular expression: {exc}") from None


def _checked_target(target: str) -> str:
    target_regex(target)
    return target


# Module paths to wrap: exact names, dotted suffixes, or regexes prefixed with "re:".
Target = Annotated[str, AfterValidator(_checked_target)]


class AdapterConfig(StrictModel):
    """One conditional adapter injected into the backbone (issues 3 and 7; difflora.adapters).

    ``form`` picks the update of each wrapped layer ``y = W x + b`` (c = the sample's ``condition``):
    ``lowrank`` ``W(c) = W + alpha/rank * sum_i w_i(c) B_i A_i``; ``lowrank_act``
    ``+ s W_up act(W_down x)`` (DiffScaler); ``scale`` ``(1 + a(c)) ⊙ (W x)``; ``shift`` ``+ b(c)``; or
    ``position``: ``h_dest += scale * f(h_source)`` between two taps of each target *block* (004).
    Timesteps count 0..T-1 (000's t minus 1); basis i of linear / trainable weightings sits at
    ``i (num_values - 1) / (num_bases - 1)``. Examples (000): TimeLoRA non-compositional
    ``weighting=index, num_values=1000``; linear ``weighting=linear, num_values=4001, num_bases=11``
    (m = 10); ClassLoRA ``condition=y, weighting=index, num_values=10`` (y = -1: no update).
    """

    # Part of parameter names (``...qkv.adapters.<name>.lora_A``): a Python identifier.
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """The adapter's name: part of its parameter names (a Python identifier)."""
    # Which per-sample condition the adapter reads: t (original-process timestep), y (class label),
    # or any identifier (task, guidance, ...) passed as model(x, t, y, task=...).
    condition: str = Field(default="t", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """The per-sample condition it reads: t (timestep), y (class label) or any identifier passed to the model (task, guidance)."""
    # The update form (see the class docstring).
    form: Literal["lowrank", "lowrank_act", "scale", "shift", "position"] = "lowrank"
    """The update of each wrapped layer: lowrank (B A), lowrank_act (s W_up act(W_down x)), scale, shift, or position (between two taps)."""
    # index: one entry per value; linear: interpolate m+1 evenly spaced bases; trainable: a learned
    # [num_values x num_bases] table of mixing weights per wrapped layer; shared: one entry for every
    # sample, an unconditional adapter (004's; condition t, which every forward has).
    weighting: Literal["index", "linear", "trainable", "shared"] = "linear"
    """How a condition value picks bank entries: index (one each), linear (between two bases), trainable (a learned table), shared (one for all)."""
    # Number of distinct condition values T (timesteps 0..T-1, classes, tasks); for t it must be
    # at least diffusion.steps.
    num_values: int = Field(default=1, ge=1)
    """Number of distinct condition values (timesteps 0..T-1, classes, tasks); for t at least diffusion.steps."""
    # m + 1 basis entries for linear / trainable; must be unset for index (one per value).
    num_bases: int | None = Field(default=None, ge=2)
    """Basis entries (m + 1) of a linear or trainable weighting; unset for index."""
    # linear only: the condition range the bases span (default [0, num_values - 1]); for real
    # conditions such as a guidance scale.
    value_range: tuple[float, float] | None = None
    """Linear weighting only: the condition range [lo, hi] the bases span (default [0, num_values - 1])."""
    # trainable only: gaussian N(0, 1), onehot, or linear (= the linear weighting) initial table.
    init: Literal["gaussian", "onehot", "linear"] = "linear"
    """Trainable weighting only: the initial table (gaussian, onehot, or linear interpolation)."""
    # lowrank / lowrank_act: the rank; position: the bottleneck width of f.
    rank: int = Field(default=4, ge=1)
    """Rank of the low-rank update (lowrank, lowrank_act), or the bottleneck width of a position adapter."""
    # lowrank only: scaling = alpha / rank; None means alpha = rank (scaling 1, 000's plain W + B A).
    alpha: float | None = Field(default=None, gt=0)
    """Lowrank only: the update is scaled by alpha / rank (unset: alpha = rank, scaling 1)."""
    # lowrank_act (default relu, 002) and position (default identity: a linear f).
    activation: Literal["relu", "silu", "gelu", "sigmoid", "identity"] | None = None
    """The activation of lowrank_act (default relu) and position adapters (default identity)."""
    # lowrank_act on a k x k convolution: "full" (k x k down factor) or "1x1" (002's 1x1 convolutions
    # reading the centre of each receptive field, on the base's output grid). position: "full" is the
    # block's own kernel (3x3 down and up convolutions in a U-Net ResBlock, 004's; per token in
    # transformer blocks), "1x1" per pixel.
    kernel: Literal["full", "1x1"] = "full"
    """On a k x k convolution: full (k x k down factor) or 1x1 (pointwise)."""
    # position only: the taps read and written (e.g. DiT attn_out -> mlp_in; U-Net in -> out), and
    # the fixed scale of f's output.
    source: str | None = None
    """Position only: the tap the adapter reads (e.g. attn_out, in)."""
    dest: str | None = None
    """Position only: the tap the adapter writes into (e.g. mlp_in, out)."""
    scale: float = 1.0
    """Position only: the fixed scale of the adapter's output."""
    # position only: how f's up projection starts: "zero" (a fresh adapter changes nothing,
    # difflora's recipe) or "linear" (nn.Linear's default initialisation, 004's reference code).
    up_init: Literal["zero", "linear"] = "zero"
    """Position only: how the up projection starts: zero (no change at start) or linear (nn.Linear's default, 004's reference)."""
    # Module paths to wrap (layers; blocks for position): exact names, dotted suffixes, or regexes
    # prefixed with "re:". Empty: the attention qkv and output projections of the backbone.
    targets: list[Target] = Field(default_factory=list)
    """Module paths to wrap: exact names, dotted suffixes or re: regexes (empty: the attention projections)."""
    # index weighting only: the first ``frozen`` entries (tasks, classes) are held frozen (002's
    # sequential regime: entries a previous run trained, loaded from train.init_from).
    frozen: int = Field(default=0, ge=0)
    """Index weighting only: the first N entries stay frozen (tasks or classes an earlier run trained)."""

    @model_validator(mode="after")
    def _check(self) -> AdapterConfig:
        where = f"model.adapters[{self.name}]"
        if self.frozen and (self.weighting != "index" or self.frozen > self.num_values):
            raise ValueError(f"{where}.frozen: only an index weighting freezes entries, at most num_values of them")
        if self.weighting == "shared":
            if self.num_bases is not None or self.num_values != 1:
                raise ValueError(
                    f"{where}: a shared weighting has one entry for every sample; leave num_values, num_bases unset"
                )
        elif self.weighting == "index":
            if self.num_bases not in (None, self.num_values):
                raise ValueError(f"{where}.num_bases: index weighting has one LoRA per value; leave num_bases unset")
        elif self.num_bases is None:
            raise ValueError(f"{where}.num_bases: {self.weighting} weighting needs num_bases (m + 1 basis LoRAs, >= 2)")
        if self.weighting == "linear" and self.value_range is None and self.num_values < 2:
            raise ValueError(f"{where}.num_values: linear weighting needs num_values >= 2 (or a value_range)")
        if self.weighting == "trainable" and self.num_values < 2:
            raise ValueError(f"{where}.num_values: trainable weighting needs num_values >= 2 (rows of its table)")
        if self.value_range is not None:
            if self.weighting != "linear":
                raise ValueError(f"{where}.value_range: only the linear weighting uses a value range")
            if not self.value_range[1] > self.value_range[0]:
                raise ValueError(f"{where}.value_range: need low < high, got {list(self.value_range)}")
        position = self.form == "position"
        if position and (self.source is None or self.dest is None or not self.targets):
            raise ValueError(f"{where}: form position needs source and dest taps and targets (block paths)")
        # The options this form has no use for keep their defaults (an explicit other value is refused).
        form = f"form {self.form}"
        if not position:
            hold_fixed(
                self,
                where,
                unused_at_default(self, ("source", "dest", "scale", "up_init")),
                f"{form} (for position only)",
            )
        if self.form not in ("lowrank_act", "position"):
            why = "(only forms lowrank_act and position have an activation and a kernel choice)"
            hold_fixed(self, where, unused_at_default(self, ("activation", "kernel")), f"{form} {why}")
        if self.form != "lowrank":
            hold_fixed(self, where, unused_at_default(self, ("alpha",)), f"{form} (only lowrank has alpha / rank)")
        return self


class AffinerConfig(StrictModel):
    """DiffScaler's Affiner (002 eq. 5), ``y = (1 + a) W x + s W_up ReLU(W_down x) + b_hat + b``, on
    every target layer, one parameter set per task (an index weighting over ``condition``; -1 is
    the untouched base). Expands to up to three ``model.adapters`` entries named ``affiner_a``
    (form scale), ``affiner_b`` (shift) and ``affiner_lr`` (lowrank_act, ReLU, rank ``latent``);
    see ``difflora.diffscaler.affiner`` and the README section "DiffScaler: one model, many tasks".
    """

    # Number of tasks (parameter sets); task ids 0..tasks-1.
    tasks: int = Field(default=1, ge=1)
    """Number of tasks (one Affiner parameter set each, task ids 0..tasks-1)."""
    # Latent width d of the low-rank branch; None: 32 for the U-Net, 64 for the DiT (002 section 4.3).
    latent: int | None = Field(default=None, ge=1)
    """Width of the low-rank branch (unset: 32 for the U-Net, 64 for the DiT)."""
    # Which terms of eq. 5 (002 Table 3(a) ablations: [shift] is "b only", [scale] "a only").
    parts: list[Literal["scale", "shift", "lowrank"]] = Field(default_factory=lambda: ["scale", "shift", "lowrank"])
    """Which terms of 002's eq. 5 to add: scale (a), shift (b), lowrank."""
    # Layers (exact paths, suffixes, "re:" regexes). Empty: every Linear/Conv of the U-Net; the
    # DiT blocks' attn.qkv, attn.proj, mlp.fc1, mlp.fc2 and adaLN_modulation.1.
    targets: list[Target] = Field(default_factory=list)
    """Layers to adapt: exact paths, suffixes or re: regexes (empty: every layer 002 adapts)."""
    condition: str = Field(default="task", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """The per-sample condition naming the task."""
    # The low-rank branch on a k x k convolution: 1x1 convolutions (002) or a k x k down factor.
    kernel: Literal["1x1", "full"] = "1x1"
    """The low-rank branch on a k x k convolution: 1x1 convolutions (002) or full (k x k down factor)."""
    # Sequential regime (002 section 3.3): tasks 0..frozen_tasks-1 come from the multi-task run
    # train.init_from names and stay frozen, bit for bit; the tasks after them train.
    frozen_tasks: int = Field(default=0, ge=0)
    """Sequential regime: tasks 0..frozen_tasks-1 come from train.init_from and stay frozen."""

    @model_validator(mode="after")
    def _check(self) -> AffinerConfig:
        if not self.parts or len(set(self.parts)) != len(self.parts):
            raise ValueError(f"model.affiner.parts: give each of scale, shift, lowrank at most once, got {self.parts}")
        if self.frozen_tasks >= self.tasks:
            raise ValueError(
                f"model.affiner.frozen_tasks ({self.frozen_tasks}) leaves no task to train; set model.affiner.tasks "
                f"to at least {self.frozen_tasks + 1}"
            )
        return self


# Default distillation LoRA targets (003: the student is W0 plus LoRA on the network's dense weights):
# the attention projections and the 3x3 convolutions of every U-Net ResBlock; the attention and MLP
# of every DiT block.
DISTILL_TARGETS: dict[str, tuple[str, ...]] = {
    "unet": ("qkv", "proj_out", "in_layers.2", "out_layers.3"),
    "dit": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
}
# The adapter the distill section generates, and the conditions it reads: a fixed-w student's LoRA
# reads ``distill`` (0 = on, -1 = off: the teacher's rows); a guidance-scale LoRA reads ``guidance``
# (the scale w; NaN = off).
DISTILL_ADAPTER = "distill"
# The ``train.objective`` of a distilled run (asked through ``Config.distilled``).
DISTILL_OBJECTIVE = "distill"


class DistillConfig(StrictModel):
    """Distilling classifier-free guidance into a LoRA student (``train.objective: distill``, 003).

    The teacher is the base run (``train.init_from``) with guidance at scale ``guidance``; the
    student is the same frozen weights plus the LoRA ``model.adapters[distill]``, which this section
    generates. With ``guidance_range: [lo, hi]`` the LoRA is a bank of ``num_bases`` LoRAs over w
    with the linear weighting (a guidance-scale LoRA), each training sample draws w ~ U[lo, hi],
    and one student serves every scale in the range.
    """

    # The teacher's guidance scale w of a fixed-w student.
    guidance: GuidanceScale = 2.0
    """The teacher's classifier-free guidance scale w of a fixed-w student."""
    # [w_min, w_max] of a guidance-scale LoRA; None: a fixed-w student.
    guidance_range: tuple[GuidanceScale, GuidanceScale] | None = None
    """[w_min, w_max] of a guidance-scale LoRA (one student for every scale); unset: a fixed-w student."""
    # Bases of the guidance-scale LoRA, evenly spaced over guidance_range.
    num_bases: int = Field(default=5, ge=2)
    """Bases of the guidance-scale LoRA, evenly spaced over guidance_range."""
    rank: int = Field(default=8, ge=1)
    """Rank of the student's LoRA."""
    # Module paths the LoRA wraps (see AdapterConfig.targets); empty: DISTILL_TARGETS of the arch.
    targets: list[Target] = Field(default_factory=list)
    """Module paths the student's LoRA wraps (empty: the architecture's dense layers)."""
    # Teacher and student rows in one forward of 3N (per-row "no update") instead of a no-grad
    # teacher call of 2N and a student call of N. Off by default: two calls are faster on CPU
    # (benchmarks/results/distill.json; the teacher call keeps no activations for backward).
    shared_forward: bool = False
    """Teacher and student rows in one forward of 3N instead of two calls (faster on GPUs)."""

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        r = self.guidance_range
        if r is not None and not r[1] > r[0]:
            raise ValueError(f"distill.guidance_range: need low < high, got {list(r)}")
        if r is not None and not r[0] <= self.guidance <= r[1]:
            raise ValueError(
                f"distill.guidance ({self.guidance:g}) is the default sampling scale of the guidance-scale LoRA and "
                f"must lie in distill.guidance_range [{r[0]:g}, {r[1]:g}]"
            )
        return self

    def adapter(self, arch: str) -> AdapterConfig:
        """The student's LoRA as a ``model.adapters`` entry."""
        targets = list(self.targets) or list(DISTILL_TARGETS[arch])
        if self.guidance_range is None:
            return AdapterConfig(
                name=DISTILL_ADAPTER,
                condition="distill",
                weighting="index",
                num_values=1,
                rank=self.rank,
                targets=targets,
            )
        return AdapterConfig(
            name=DISTILL_ADAPTER,
            condition="guidance",
            weighting="linear",
            num_bases=self.num_bases,
            value_range=self.guidance_range,
            rank=self.rank,
            targets=targets,
        )
