"""Update forms: what one conditional branch of a wrapped layer ``y = W x + b`` adds.

Each branch is a bank with one entry per basis (or task, or class), a weighting that maps each
sample's condition to mixing weights over the bank, the name of the condition it reads, and a
form: one :class:`Branch` subclass per form (``...Form``), which answers everything the layer asks
of it (:meth:`Branch.add_term`, :meth:`Branch.delta_weight`, :meth:`Branch.delta_bias`,
:meth:`Branch.merge_problem`, :meth:`Branch.merge_into`); a new form is one class, listed in
:data:`FORMS`. Parameters are one tensor per kind with the bank as first dimension ([num_bases x ...]):

=================  ============================================  ==========  ============================
form               update (per sample, c = its condition)        mergeable   parameters, initialisation
=================  ============================================  ==========  ============================
``lowrank``        ``+ scaling sum_i w_i(c) B_i A_i x``          into W      ``lora_A`` N(0, 1/r), ``lora_B`` 0
``lowrank_act``    ``+ sum_i w_i(c) s_i W_up,i act(W_down,i x)``  no          ``lora_down``, ``lora_up``
                                                                             Kaiming-normal, ``lora_s`` 0
``scale``          ``(1 + sum_i w_i(c) a_i) ⊙ (W x)``             into W      ``scale`` [num_bases x d_out] 0
``shift``          ``+ sum_i w_i(c) b_i``                         into bias   ``shift`` [num_bases x d_out] 0
=================  ============================================  ==========  ============================

All four start as "no change" (DiffScaler 002 writes that ``a`` starts at ones; difflora stores
``a`` as the deviation from 1 and initialises it to 0, so the effective scale ``1 + a`` starts at
exactly 1, the paper's intent). The weight scale multiplies the base's ``W x`` only: not the bias
and not the other branches, as in 002's ``(1 + a) W x + s W_up ReLU(W_down x) + b_hat + b``.

For a k x k convolution the down factors (``lora_A``, ``lora_down``) are k x k convolutions with the
base's stride, padding and dilation, so the branch reads the base's receptive field (stored
flattened as [num_bases x r x C k k], the base weight's fan-in layout), and the up factors are
1x1. 002 says "1x1 convolutions" for its conv branches: ``lowrank_act`` takes ``kernel="1x1"`` for
that reading (the DiffScaler recipe uses it), a 1x1 convolution with the base's stride reading the
centre of each receptive field (:meth:`Geometry.centre_tap`), so it lands on the base's output grid.

**Frozen entries** (adding a task to a trained multi-task bank without changing the others): a
bank can hold its first ``frozen`` entries as separate parameters ``<name>_frozen`` with
``requires_grad=False`` and the rest as ``<name>``; forms see the concatenation
(:meth:`Branch.entries`). A frozen entry is not a leaf the optimizer holds, so no gradient,
optimizer state, weight decay or EMA can move it: it stays bit for bit. :meth:`Branch.add_entries`
grows an index-weighted bank (one entry per task) and :meth:`Branch.set_entries` rewrites it.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difflora.adapters.context import ConditionValue, current
from difflora.adapters.router import Geometry, LayerTerms, RankTerm, Route, per_row, rank_term
from difflora.adapters.weightings import IndexWeighting, Weighting, weighting_from_spec

__all__ = [
    "FormOptions",
    "ACTIVATIONS",
    "FORMS",
    "Branch",
    "LowRankActForm",
    "LowRankForm",
    "MergedUpdate",
    "ScaleForm",
    "ShiftForm",
    "as_batch",
    "branch_from_spec",
    "make_branch",
]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "sigmoid": torch.sigmoid,
    "identity": None,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The activation called ``name`` (None for identity); an unknown name is an error listing the valid ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def as_batch(value: ConditionValue, n: int, device: torch.device, name: str) -> torch.Tensor | None:
    """A condition value as an [n] tensor on ``device`` (numbers and 0-d / [1] tensors broadcast)."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        return torch.full((n,), value, device=device)
    if value.dim() == 0 or value.shape == (1,):
        return value.reshape(1).expand(n).to(device)
    if value.dim() != 1 or value.shape[0] != n:
        raise ValueError(
            f"condition {name!r} has shape {tuple(value.shape)} but the layer's input holds {n} samples; "
            f"give one value per sample ([{n}]) or one for all"
        )
    return value.to(device)


@dataclass
class MergedUpdate:
    """What the merged branches of a layer write into its base: ``W' = factor ⊙ W + delta`` (``factor``
    [d_out] scales the rows of W) and ``b' = b + shift``, accumulated in at least float32."""

    factor: torch.Tensor
    delta: torch.Tensor
    shift: torch.Tensor


@dataclass(frozen=True)
class FormOptions:
    """The options any form may be given (:func:`make_branch`), passed whole to
    :meth:`Branch.from_options`; each form takes the ones it has and refuses the others."""

    rank: int = 4
    alpha: float | None = None
    act: str | None = None
    kernel: str = "full"


class Branch(nn.Module, abc.ABC):
    """A conditional branch: a bank of ``weighting.num_bases`` entries and the condition it reads.

    Each subclass is one form and answers the wrapped layer's questions: its term for a batch's
    route (:meth:`add_term`), its update of the base weight and bias at one shared value
    (:meth:`delta_weight`, :meth:`delta_bias`, :meth:`merge_into`) and whether it can be merged
    (:meth:`merge_problem`).
    """

    form: str = ""
    mergeable: bool = False
    # What a merge of this form does to the base weight: add to it, or scale its rows. A layer
    # refuses to merge either while a scale stays per sample (the scale would multiply it too).
    adds_to_weight: bool = False
    scales_weight: bool = False
    # The parameters holding one row per bank entry (first dimension num_bases).
    bank_names: tuple[str, ...] = ()
    # What exporting this form as a plain LoRA would lose (:meth:`lora_at` gives None): the
    # one-line reason export errors name.
    lora_loss: str = ""

    def __init__(self, weighting: Weighting, condition: str, geometry: Geometry):
        super().__init__()
        if not condition.isidentifier():
            raise ValueError(f"condition name {condition!r} must be a Python identifier")
        self.weighting = weighting
        self.condition = condition
        self.geometry = geometry
        self.frozen = 0  # leading entries held as frozen ``<name>_frozen`` parameters

    def entries(self, name: str) -> torch.Tensor:
        """Bank ``name`` over every entry [num_bases x ...]: the frozen entries, then the trainable ones."""
        own = getattr(self, name)
        return torch.cat([getattr(self, name + "_frozen"), own]) if self.frozen else own

    @torch.no_grad()
    def set_entries(self, banks: dict[str, torch.Tensor], frozen: int) -> None:
        """Replace every bank by ``banks`` (name -> [num x ...]), the first ``frozen`` entries frozen.

        Changing the number of entries needs an index weighting (one entry per task or class); it
        is replaced by one over ``num`` values. The trainable part keeps its ``requires_grad``.
        """
        # Every bank is checked before any is replaced: a refused call leaves the branch as it was.
        problem = self.entries_problem(banks, frozen)
        if problem is not None:
            raise ValueError(problem)
        num = banks[self.bank_names[0]].shape[0]
        if num != self.num_bases:
            self.weighting = IndexWeighting(num)
        for name in self.bank_names:
            old = getattr(self, name)
            full = banks[name].detach().to(device=old.device, dtype=old.dtype)
            for key in (name + "_frozen", name):
                self._parameters.pop(key, None)
            if frozen:
                self.register_parameter(name + "_frozen", nn.Parameter(full[:frozen].clone(), requires_grad=False))
            self.register_parameter(name, nn.Parameter(full[frozen:].clone(), requires_grad=old.requires_grad))
        self.frozen = frozen

    def entries_problem(self, banks: dict[str, torch.Tensor], frozen: int) -> str | None:
        """Why :meth:`set_entries` would refuse ``banks`` and ``frozen``; None when it would not."""
        num = banks[self.bank_names[0]].shape[0]
        if not 0 <= frozen <= num:
            return f"frozen entries must be in 0..{num}, got {frozen}"
        if num != self.num_bases and not isinstance(self.weighting, IndexWeighting):
            return (
                f"only index-weighted banks (one entry per task or class) change their number of entries; "
                f"this one is {self.weighting.kind}"
            )
        for name in self.bank_names:
            shape, want = tuple(banks[name].shape), (num, *self.entries(name).shape[1:])
            if shape != want:
                return f"bank {name!r} of shape {list(shape)} does not fit {list(want)}"
        return None

    def fresh_entries(self, num: int) -> dict[str, torch.Tensor]:
        """``num`` freshly initialised entries of every bank (this form's "no change" initialisation)."""
        spec = {**self.spec(), "weighting": IndexWeighting(num).spec(), "frozen": 0}
        fresh = branch_from_spec(spec, self.geometry)
        return {name: getattr(fresh, name).detach() for name in self.bank_names}

    def add_entries(self, num: int, freeze_existing: bool = True) -> None:
        """Append ``num`` fresh entries (index weightings: new task ids ``num_bases..``); with
        ``freeze_existing`` every existing entry becomes frozen (DiffScaler's sequential regime)."""
        fresh = self.fresh_entries(num)
        banks = {n: torch.cat([self.entries(n).detach(), fresh[n].to(self.entries(n))]) for n in self.bank_names}
        self.set_entries(banks, self.num_bases if freeze_existing else self.frozen)

    @property
    def num_bases(self) -> int:
        return self.weighting.num_bases

    def route(self, values: ConditionValue, n: int, device: torch.device) -> Route | None:
        """This branch's routing of a batch of ``n`` samples (None: no sample gets an update)."""
        return self.weighting(as_batch(values, n, device, self.condition))

    def current_route(self, n: int, device: torch.device) -> Route | None:
        """:meth:`route` for the condition value set by the enclosing ``conditions`` block."""
        return self.route(current(self.condition), n, device)

    def shared_weights(self, value: ConditionValue, device: torch.device) -> torch.Tensor | None:
        """[num_bases] mixing weights of one value shared by every sample (merges), None for no update."""
        route = self.route(value, 1, device)
        return None if route is None else route.dense(self.num_bases)[0]

    def spec(self) -> dict[str, Any]:
        """JSON-able description: :func:`branch_from_spec` rebuilds the branch from it."""
        frozen = {"frozen": self.frozen} if self.frozen else {}
        return {
            "form": self.form,
            "condition": self.condition,
            "weighting": self.weighting.spec(),
            **self.options(),
            **frozen,
        }

    @abc.abstractmethod
    def options(self) -> dict[str, Any]:
        """The form's own constructor options (rank, activation, ...), part of :meth:`spec`."""

    @abc.abstractmethod
    def reset_parameters(self) -> None:
        """Initialise so that the branch changes no output."""

    @classmethod
    @abc.abstractmethod
    def from_options(cls, weighting: Weighting, condition: str, geometry: Geometry, options: FormOptions) -> Branch:
        """A fresh branch of this form from the options any form may be given (:func:`make_branch`);
        an option this form does not have, set to other than its default, is an error."""

    # --- what the wrapped layer asks of its branches ---------------------------------------------
    @abc.abstractmethod
    def add_term(self, terms: LayerTerms, route: Route, dtype: torch.dtype) -> None:
        """Add this branch's term for a batch routed by ``route`` to the layer's ``terms``."""

    def delta_weight(self, value: ConditionValue, weight: torch.Tensor) -> torch.Tensor | None:
        """This branch's change of the base weight ``weight`` at one value shared by all samples,
        shaped like it; None if the form does not change W."""
        return None

    def delta_bias(self, value: ConditionValue) -> torch.Tensor | None:
        """This branch's change of the base bias at one shared value ([d_out]); None if it has none."""
        return None

    def merge_problem(self, name: str, has_bias: bool) -> str | None:
        """Why this branch (called ``name``) cannot be merged into a base layer (``has_bias``: it has a
        bias), as a one-line message; None if it can."""
        if self.mergeable:
            return None
        return (
            f"adapter {name!r} has form {self.form!r}, which cannot be merged into the weights "
            f"(a non-linear branch); keep it per sample (do not merge condition {self.condition!r})"
        )

    def merge_into(self, update: MergedUpdate, value: ConditionValue) -> None:
        """Add this branch's update at one shared ``value`` to the layer's merged ``update``
        (the layer calls it only when :meth:`merge_problem` found none)."""
        raise ValueError(f"form {self.form!r} writes nothing into the weights: it cannot be merged")

    def lora_at(self, value: ConditionValue) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This branch's update at one shared, non-null ``value`` as an exact plain LoRA
        ``(A [R x fan_in], B [d_out x R])`` with ``B A`` the whole update (scaling and mixing weights
        folded in); None when the form's update is no LoRA (:attr:`lora_loss` says what it would lose)."""
        return None


class _RankForm(Branch):
    """Shared by the two rank-space forms: ``up (s * act(down x))`` routed by :func:`rank_term`."""

    act_name = "identity"
    branch_geometry: Geometry | None = None  # set when the branch's input layout differs from the layer's

    def add_term(self, terms: LayerTerms, route: Route, dtype: torch.dtype) -> None:
        terms.ranks.append(self.rank_term(route, dtype))

    def rank_term(self, route: Route, dtype: torch.dtype) -> RankTerm:
        down, up, scalars = self.factors()
        term = rank_term(route, down, up, route.slot_scales(scalars, dtype), activation(self.act_name), dtype)
        term.geometry = self.branch_geometry
        return term

    @abc.abstractmethod
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
        """(down [num_bases x r x F], up [num_bases x d_out x r], per-entry scalar(s))."""


class LowRankForm(_RankForm):
    """Low-rank ``scaling sum_i w_i B_i A_i x`` (TimeLoRA, ClassLoRA, plain LoRA): mergeable into W.

    ``lora_A`` [num_bases x rank x fan_in] ~ N(0, 1/rank) (000 C.1; variance 1/r),
    ``lora_B`` [num_bases x d_out x rank] = 0. ``scaling = alpha / rank`` (peft's convention;
    ``alpha=None`` means ``alpha = rank``, scaling 1, which is 000's un-scaled ``W + B A``).
    """

    form = "lowrank"
    mergeable = adds_to_weight = True
    bank_names = ("lora_A", "lora_B")

    def __init__(
        self, weighting: Weighting, condition: str, geometry: Geometry, rank: int = 4, alpha: float | None = None
    ):
        super().__init__(weighting, condition, geometry)
        if rank < 1:
            raise ValueError(f"LowRankForm: rank must be >= 1, got {rank}")
        if alpha is not None and not math.isfinite(alpha):
            raise ValueError(f"LowRankForm: alpha must be a finite number, got {alpha}")
        self.rank = int(rank)
        self.alpha = float(alpha) if alpha is not None else float(rank)
        self.scaling = self.alpha / self.rank
        self.lora_A = nn.Parameter(torch.empty(weighting.num_bases, rank, geometry.fan_in))
        self.lora_B = nn.Parameter(torch.empty(weighting.num_bases, geometry.out_features, rank))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.lora_A, 0.0, 1.0 / math.sqrt(self.rank))
        nn.init.zeros_(self.lora_B)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.entries("lora_A"), self.entries("lora_B"), self.scaling

    @classmethod
    def from_options(
        cls, weighting: Weighting, condition: str, geometry: Geometry, options: FormOptions
    ) -> LowRankForm:
        _full_kernel_only(cls.form, options.kernel)
        if options.act not in (None, "identity"):
            raise ValueError(f"the lowrank form has no activation (got {options.act!r}); use form lowrank_act")
        return cls(weighting, condition, geometry, options.rank, options.alpha)

    def delta_weight(self, value: ConditionValue, weight: torch.Tensor) -> torch.Tensor:
        """``scaling * sum_i w_i(value) B_i A_i`` for one shared value, shaped like ``weight``."""
        a, b = self.entries("lora_A"), self.entries("lora_B")
        w = self.shared_weights(value, a.device)
        if w is None:
            return b.new_zeros(b.shape[1], a.shape[2]).reshape(weight.shape)
        w = w.to(a.dtype) * self.scaling
        return torch.einsum("b,bor,brf->of", w, b, a).reshape(weight.shape)

    def merge_into(self, update: MergedUpdate, value: ConditionValue) -> None:
        update.delta += self.delta_weight(value, update.delta).to(update.delta.dtype)

    def lora_at(self, value: ConditionValue) -> tuple[torch.Tensor, torch.Tensor]:
        """The entries the weighting mixes at ``value`` (nonzero weight), concatenated along the rank:
        ``A = [A_i; A_j]``, ``B = [w_i scaling B_i, w_j scaling B_j]`` (R = rank x entries used, 0 if none),
        so ``B A = scaling sum_i w_i B_i A_i`` exactly, e.g. a rank-2r LoRA for TimeLoRA between two bases."""
        a, b = self.entries("lora_A").detach(), self.entries("lora_B").detach()
        w = self.shared_weights(value, a.device)
        assert w is not None, "lora_at takes a value that is not the weighting's no-update value"
        used = w.nonzero().reshape(-1)
        coef = w[used].to(b.dtype) * self.scaling
        factor_b = (b[used] * coef[:, None, None]).permute(1, 0, 2).reshape(b.shape[1], -1)
        return a[used].reshape(-1, a.shape[2]), factor_b

    def options(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha}

    def extra_repr(self) -> str:
        return f"condition={self.condition!r}, rank={self.rank}, scaling={self.scaling:g}"


class LowRankActForm(_RankForm):
    """Low-rank with activation ``sum_i w_i s_i W_up,i act(W_down,i x)`` (DiffScaler 002): not mergeable.

    ``lora_down`` [num_bases x rank x fan_in] and ``lora_up`` [num_bases x d_out x rank] are
    Kaiming-normal (fan-in mode, gain for ReLU, as ``nn.init.kaiming_normal_``), ``lora_s``
    [num_bases] = 0 (002: "s is initialised to zero"), so the branch starts as no change and both
    factors get gradient once s moves. ``kernel``: ``"full"`` (a k x k down factor on a k x k
    convolution) or ``"1x1"`` (002's 1x1 convolutions, :meth:`Geometry.centre_tap`); both are the
    same on linear and 1x1 layers.
    """

    form = "lowrank_act"
    bank_names = ("lora_down", "lora_up", "lora_s")
    lora_loss = "its term s W_up act(W_down x) is not linear in x: no LoRA and no merged weight computes it"

    def __init__(
        self,
        weighting: Weighting,
        condition: str,
        geometry: Geometry,
        rank: int = 4,
        act: str = "relu",
        kernel: str = "full",
    ):
        super().__init__(weighting, condition, geometry)
        if rank < 1:
            raise ValueError(f"LowRankActForm: rank must be >= 1, got {rank}")
        if kernel not in ("full", "1x1"):
            raise ValueError(f"LowRankActForm: kernel must be 'full' or '1x1', got {kernel!r}")
        activation(act)  # validates the name
        self.rank, self.act_name, self.kernel = int(rank), act, kernel
        if kernel == "1x1" and geometry.kind == "conv":
            self.branch_geometry = geometry.centre_tap()
        fan_in = (self.branch_geometry or geometry).fan_in
        self.lora_down = nn.Parameter(torch.empty(weighting.num_bases, rank, fan_in))
        self.lora_up = nn.Parameter(torch.empty(weighting.num_bases, geometry.out_features, rank))
        self.lora_s = nn.Parameter(torch.empty(weighting.num_bases))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for i in range(self.lora_down.shape[0]):  # per entry: each is its own [out x in] matrix
            nn.init.kaiming_normal_(self.lora_down[i], nonlinearity="relu")
            nn.init.kaiming_normal_(self.lora_up[i], nonlinearity="relu")
        nn.init.zeros_(self.lora_s)

    @classmethod
    def from_options(
        cls, weighting: Weighting, condition: str, geometry: Geometry, options: FormOptions
    ) -> LowRankActForm:
        return cls(weighting, condition, geometry, options.rank, options.act or "relu", options.kernel)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.entries("lora_down"), self.entries("lora_up"), self.entries("lora_s")

    def options(self) -> dict[str, Any]:
        # "kernel" only when not the default, so specs written before the option read back equal.
        kernel = {"kernel": self.kernel} if self.kernel != "full" else {}
        return {"rank": self.rank, "activation": self.act_name, **kernel}

    def extra_repr(self) -> str:
        return f"condition={self.condition!r}, rank={self.rank}, activation={self.act_name}"


class _VectorForm(Branch):
    """A per-output-channel vector per entry, ``sum_i w_i(c) v_i``: shared by the scale and shift forms."""

    mergeable = True
    param = ""

    def __init__(self, weighting: Weighting, condition: str, geometry: Geometry):
        super().__init__(weighting, condition, geometry)
        self.bank_names = (self.param,)
        self.register_parameter(self.param, nn.Parameter(torch.empty(weighting.num_bases, geometry.out_features)))
        self.reset_parameters()

    @property
    def bank(self) -> torch.Tensor:
        """The [num_bases x d_out] bank (``scale`` or ``shift``; frozen entries first)."""
        return self.entries(self.param)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(getattr(self, self.param))

    def vector(self, value: ConditionValue) -> torch.Tensor:
        """The mixed vector for one shared value: [d_out]."""
        w = self.shared_weights(value, self.bank.device)
        return self.bank.new_zeros(self.bank.shape[1]) if w is None else w.to(self.bank.dtype) @ self.bank

    def options(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_options(
        cls, weighting: Weighting, condition: str, geometry: Geometry, options: FormOptions
    ) -> _VectorForm:
        # rank, alpha and the activation do not apply to a vector per entry (and are not stored).
        _full_kernel_only(cls.form, options.kernel)
        return cls(weighting, condition, geometry)


class ScaleForm(_VectorForm):
    """Weight scale ``(1 + a(c)) ⊙ (W x)``, ``a(c) = sum_i w_i(c) a_i`` per output channel: mergeable into W.

    ``scale`` [num_bases x d_out] = 0 (the effective scale 1 + a starts at 1; see the module docstring).
    """

    form = param = "scale"
    scales_weight = True
    lora_loss = "its weight scale (1 + a) ⊙ W x changes the base weight, which a LoRA file cannot hold (--to diffusers merges it)"

    def add_term(self, terms: LayerTerms, route: Route, dtype: torch.dtype) -> None:
        terms.scales.append(route.vectors(self.bank, dtype))

    def delta_weight(self, value: ConditionValue, weight: torch.Tensor) -> torch.Tensor:
        """``a(value) ⊙ W``: the rows of ``weight`` scaled by the mixed vector."""
        return per_row(self.vector(value), weight) * weight

    def merge_into(self, update: MergedUpdate, value: ConditionValue) -> None:
        update.factor += self.vector(value).to(update.factor.dtype)


class ShiftForm(_VectorForm):
    """Bias shift ``+ b(c)``, ``b(c) = sum_i w_i(c) b_i`` per output channel: mergeable into the bias.

    ``shift`` [num_bases x d_out] = 0.
    """

    form = param = "shift"
    lora_loss = "its bias shift changes the base bias, which a LoRA file cannot hold (--to diffusers merges it)"

    def add_term(self, terms: LayerTerms, route: Route, dtype: torch.dtype) -> None:
        terms.shifts.append(route.vectors(self.bank, dtype))

    def delta_bias(self, value: ConditionValue) -> torch.Tensor:
        return self.vector(value)

    def merge_problem(self, name: str, has_bias: bool) -> str | None:
        if has_bias:
            return None
        return (
            f"adapter {name!r} is a bias shift but the base layer has no bias to merge it into; "
            f"keep it per sample (do not merge condition {self.condition!r})"
        )

    def merge_into(self, update: MergedUpdate, value: ConditionValue) -> None:
        update.shift += self.vector(value).to(update.shift.dtype)


FORMS: dict[str, type[Branch]] = {cls.form: cls for cls in (LowRankForm, LowRankActForm, ScaleForm, ShiftForm)}


def make_branch(
    form: str,
    weighting: Weighting,
    condition: str,
    geometry: Geometry,
    rank: int = 4,
    alpha: float | None = None,
    act: str | None = None,
    kernel: str = "full",
) -> Branch:
    """A fresh branch of ``form`` (see the module table); unknown forms are an error naming the valid ones."""
    if form not in FORMS:
        raise ValueError(f"unknown adapter form {form!r}; valid: {', '.join(FORMS)}")
    return FORMS[form].from_options(weighting, condition, geometry, FormOptions(rank, alpha, act, kernel))


def _full_kernel_only(form: str, kernel: str) -> None:
    if kernel != "full":
        raise ValueError(f"kernel {kernel!r} is an option of form lowrank_act only (got form {form!r})")


def branch_from_spec(spec: dict[str, Any], geometry: Geometry) -> Branch:
    """Rebuild a branch from :meth:`Branch.spec` (adapter files store these)."""
    try:
        branch = make_branch(
            spec.get("form", "lowrank"),  # version-1 files hold low-rank banks only
            weighting_from_spec(spec["weighting"]),
            spec["condition"],
            geometry,
            spec.get("rank", 4),
            spec.get("alpha"),
            spec.get("activation"),
            spec.get("kernel", "full"),
        )
    except KeyError as exc:
        raise ValueError(f"adapter spec {spec} lacks key {exc}") from None
    frozen = spec.get("frozen", 0)
    if frozen:  # the layout of a bank with frozen entries (their values come from the file)
        branch.set_entries({n: branch.entries(n) for n in branch.bank_names}, frozen)
    return branch
