"""Weightings: map each sample's condition value to mixing weights over an adapter's bank of LoRAs.

An adapter computes ``W(c) = W + scaling * sum_i w_i(c) B_i A_i``; the weighting supplies w(c) for
a batch of values ``c`` ([N]) as a :class:`~difflora.adapters.router.Route`, in one of two layouts,
chosen so that no weight matrix is ever built per sample:

* **sparse** (:class:`IndexWeighting`, :class:`LinearWeighting`): each sample uses at most K bases
  (K = 1 or 2). The weighting returns ``index`` [N x K] and ``weight`` [N x K]; the layer gathers
  only those K factors per sample.
* **dense** (:class:`TrainableWeighting`): every basis may be used. The weighting returns ``weight``
  [N x num_bases]; the layer applies all bases once (shared across the batch) and mixes the
  results in rank space.

Timestep convention (000 sections 3.2 and 5). 000 counts timesteps 1..T and puts basis time
``t_i = 1 + i k``, ``k = (T - 1) / m``. difflora counts as code does, **0..T-1**, with ``t = t_paper - 1``,
so basis ``i`` sits at ``t_i = i k`` (``t_0 = 0``, ``t_m = T - 1``). ``T = num_values`` is the number of
values the adapter covers: 000's m = 10 runs use T = 4001 with a 4000-step diffusion (values
0..3999 occur; row 4000 of a trainable table is never read, exactly as in the paper's parameter
counts). Linear interpolation is exact at the basis times (weight 1 on basis i at t = t_i).

"No update" for a sample (every weighting): the sample's mixing weights are all zero, so its row
of the batch gets exactly the base layer's output while the other rows are adapted.

* ``NaN`` means "no update" for every weighting (a float condition tensor);
* ``-1`` (:data:`NULL_VALUE`) also means it for the integer-valued weightings, index and trainable
  (an int64 tensor cannot hold NaN; -1 is classifier-free guidance's null label).

The linear weighting accepts NaN only, since -1 may be a real value of its range (a guidance scale).
The no-update rows still gather bank entry 0 (with weight 0), so every sample has the same shapes
and the batch is routed without a branch.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from difflora.adapters.router import Route

__all__ = [
    "IndexWeighting",
    "SharedWeighting",
    "LinearWeighting",
    "NULL_VALUE",
    "TrainableWeighting",
    "Weighting",
    "check_values",
    "weighting_from_spec",
]

# The null value of index weightings: y == -1 is classifier-free guidance's unconditional label,
# and for any index-weighted condition it means "this sample gets no update".
NULL_VALUE = -1


def check_values(ok: torch.Tensor, message: Callable[[], str], short: str) -> None:
    """Raise ``ValueError(message())`` unless every entry of the bool tensor ``ok`` is true.

    On CPU this is a plain check. Elsewhere it is an asynchronous device assert with the ``short``
    message, so that adapters never force a host-device synchronisation per layer and per forward.
    The long message is built only on failure (it reads tensor values). Inside ``torch.compile`` it
    is the assert on every device: the compiler keeps it in the graph (a bad value raises a
    ``RuntimeError`` with the ``short`` message), where a host check would break the graph.
    """
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok.all()):
            raise ValueError(message())
    else:
        torch._assert_async(ok.all(), short)


def _integral(values: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values as int64 with null rows set to 0, keep [N] bool): NaN and -1 are "no update"."""
    if values.is_floating_point():
        nan = values.isnan()
        values = torch.where(nan, torch.full_like(values, NULL_VALUE), values)
        check_values(
            values == values.round(), lambda: f"{what}: values must be integers, got {values.tolist()[:8]}", what
        )
        values = values.round()
    v = values.long()
    keep = v != NULL_VALUE
    return torch.where(keep, v, 0), keep


def _position_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps interpolation positions exact for any realistic T * m; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


class Weighting(nn.Module, abc.ABC):
    """Abstract base: ``forward(values [N]) -> Route`` over ``num_bases`` bases.

    Subclasses (index, linear, trainable) must define both methods; instantiating one that
    does not is a TypeError, not a failure at the first forward.
    """

    kind: str = ""
    num_bases: int
    sparse: bool

    @abc.abstractmethod
    def forward(self, values: torch.Tensor | None) -> Route | None:
        """Mixing weights of each sample over the bank; None when no sample gets an update."""

    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-able description from which :func:`weighting_from_spec` rebuilds the weighting."""

    def is_null(self, value: float | int | bool | None) -> bool:
        """Whether one value shared by every sample is this weighting's "no update" (module docstring):
        ``NaN`` (and ``None``) for every weighting, ``-1`` too for the integer-valued ones. A host
        check of a Python number: merging and exporting at it leave the base layer exactly as it is."""
        return value is None or (isinstance(value, float) and math.isnan(value))


class IndexWeighting(Weighting):
    """One bank entry per value (non-compositional TimeLoRA, ClassLoRA, one adapter per task).

    ``values`` [N] integers in ``0..num_values-1``, or ``-1`` (:data:`NULL_VALUE`): weight 0, no update.
    ``values=None`` (whole batch null, ``y=None``) returns None: the adapter adds nothing.
    """

    kind = "index"
    sparse = True

    def __init__(self, num_values: int):
        super().__init__()
        if num_values < 1:
            raise ValueError(f"IndexWeighting: num_values must be >= 1, got {num_values}")
        self.num_values = self.num_bases = int(num_values)

    def forward(self, values: torch.Tensor | None) -> Route | None:
        if values is None:
            return None
        v, keep = _integral(values, "index weighting")
        check_values(
            (v >= 0) & (v < self.num_values),
            lambda: (
                f"index weighting: values must be in 0..{self.num_values - 1} (or {NULL_VALUE} / NaN for no "
                f"update), got min {int(v.min())}, max {int(v.max())}"
            ),
            "index weighting: value out of range",
        )
        # A null sample gathers bank entry 0 with weight 0: same shapes for every sample, no branch.
        return Route(weight=keep.float()[:, None], index=v[:, None])

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_values": self.num_values}

    def is_null(self, value: float | int | bool | None) -> bool:
        return super().is_null(value) or value == NULL_VALUE

    def extra_repr(self) -> str:
        return f"num_values={self.num_values}"


class LinearWeighting(Weighting):
    """Linear interpolation between the two nearest of ``m + 1 = num_bases`` evenly spaced bases (000 3.2).

    Basis i sits at ``low + i (high - low) / m``; for values between basis i and i+1 the weights are
    ``(t_{i+1} - t) / (t_{i+1} - t_i)`` and ``(t - t_i) / (t_{i+1} - t_i)``, all others zero. Values
    outside ``[low, high]`` are an error. For timesteps ``low = 0, high = T - 1`` (module docstring).
    Real-valued conditions (e.g. a guidance scale) work the same way.
    """

    kind = "linear"
    sparse = True

    def __init__(self, num_bases: int, low: float, high: float):
        super().__init__()
        if num_bases < 2:
            raise ValueError(f"LinearWeighting: num_bases (m + 1) must be >= 2, got {num_bases}")
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise ValueError(f"LinearWeighting: need finite high > low, got low={low}, high={high}")
        self.num_bases = int(num_bases)
        self.low, self.high = float(low), float(high)

    def basis_points(self) -> torch.Tensor:
        """The condition values at which the bases sit: [num_bases] (float64)."""
        m = self.num_bases - 1
        return torch.tensor([self.low + i * (self.high - self.low) / m for i in range(m + 1)], dtype=torch.float64)

    def forward(self, values: torch.Tensor | None) -> Route:
        if values is None:
            raise ValueError("linear weighting: the condition is None; it needs a value for every sample")
        m = self.num_bases - 1
        v = values.to(_position_dtype(values.device))
        keep = ~v.isnan()  # NaN: no update for this sample
        v = torch.where(keep, v, self.low)
        check_values(
            (v >= self.low) & (v <= self.high),
            lambda: (
                f"linear weighting: values must be in [{self.low:g}, {self.high:g}], got min "
                f"{float(v.min()):g}, max {float(v.max()):g}"
            ),
            "linear weighting: value out of range",
        )
        # Position in basis units. (v - low) * m is computed before the division so that values on
        # a basis give an exact integer position (IEEE division of exact multiples is exact).
        pos = (v - self.low) * m / (self.high - self.low)
        lower = pos.floor().clamp(0, m - 1)
        frac = pos - lower
        index = torch.stack([lower, lower + 1], dim=1).long()
        weight = torch.stack([1 - frac, frac], dim=1) * keep[:, None]  # float64 (float32 on MPS); the layer casts
        return Route(weight=weight, index=index)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_bases": self.num_bases, "low": self.low, "high": self.high}

    def extra_repr(self) -> str:
        return f"num_bases={self.num_bases}, low={self.low:g}, high={self.high:g}"


class SharedWeighting(Weighting):
    """One entry for every sample: an unconditional adapter (004's adapters are one module per site).

    It reads a condition every forward has (``t``) only to size the batch and for the usual
    "no update" rows (NaN, or -1 in an integer tensor); ``values=None`` returns None.
    """

    kind = "shared"
    sparse = True
    num_bases = 1

    def forward(self, values: torch.Tensor | None) -> Route | None:
        if values is None:
            return None
        keep = ~values.isnan() if values.is_floating_point() else values != NULL_VALUE
        return Route(weight=keep.float()[:, None], index=torch.zeros_like(keep, dtype=torch.long)[:, None])

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def is_null(self, value: float | int | bool | None) -> bool:
        # -1 is "no update" in an integer tensor only (a float -1.0 row is kept, as in forward)
        return super().is_null(value) or (type(value) is int and value == NULL_VALUE)


class TrainableWeighting(Weighting):
    """A trainable table ``table`` [num_values x num_bases]: sample with value t mixes row t (000 3.2).

    Initialisations (basis i sits at ``t_i = i (T - 1) / m``, T = num_values, m = num_bases - 1):

    * ``gaussian``: every entry N(0, 1) (000 C.1: PyTorch's default ``normal_``).
    * ``onehot``: row t is one-hot at the basis i with ``t_i <= t < t_{i+1}`` (the last basis
      takes ``t = t_m``).
    * ``linear``: row t equals :class:`LinearWeighting`'s weights at t.
    """

    kind = "trainable"
    sparse = False

    def __init__(self, num_values: int, num_bases: int, init: Literal["gaussian", "onehot", "linear"] = "linear"):
        super().__init__()
        if num_values < 2 or num_bases < 2:
            raise ValueError(
                f"TrainableWeighting: need num_values >= 2 and num_bases >= 2, got {num_values}, {num_bases}"
            )
        self.num_values, self.num_bases, self.init = int(num_values), int(num_bases), init
        self.table = nn.Parameter(torch.empty(self.num_values, self.num_bases))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        t = torch.arange(self.num_values, dtype=torch.float64)
        m = self.num_bases - 1
        if self.init == "gaussian":
            nn.init.normal_(self.table, 0.0, 1.0)
        elif self.init == "onehot":
            basis = torch.floor(t * m / (self.num_values - 1)).clamp(max=m).long()
            self.table.copy_(nn.functional.one_hot(basis, self.num_bases).to(self.table.dtype))
        elif self.init == "linear":
            mix = LinearWeighting(self.num_bases, 0, self.num_values - 1)(t)
            self.table.copy_(mix.dense(self.num_bases))
        else:
            raise ValueError(f"TrainableWeighting: init must be gaussian, onehot or linear, got {self.init!r}")

    def forward(self, values: torch.Tensor | None) -> Route:
        if values is None:
            raise ValueError("trainable weighting: the condition is None; it needs a value for every sample")
        v, keep = _integral(values, "trainable weighting")
        check_values(
            (v >= 0) & (v < self.num_values),
            lambda: (
                f"trainable weighting: values must be in 0..{self.num_values - 1} (or {NULL_VALUE} / NaN for no "
                f"update), got min {int(v.min())}, "
                f"max {int(v.max())}"
            ),
            "trainable weighting: value out of range",
        )
        # The mask, not the table row, zeroes a null sample: row 0 then gets no gradient from it.
        return Route(weight=self.table[v] * keep[:, None].to(self.table.dtype))

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_values": self.num_values, "num_bases": self.num_bases, "init": self.init}

    def is_null(self, value: float | int | bool | None) -> bool:
        return super().is_null(value) or value == NULL_VALUE

    def extra_repr(self) -> str:
        return f"num_values={self.num_values}, num_bases={self.num_bases}, init={self.init}"


def weighting_from_spec(spec: dict[str, Any]) -> Weighting:
    """Rebuild a weighting from :meth:`Weighting.spec` (adapter files store these)."""
    kind = spec.get("kind")
    try:
        if kind == "index":
            return IndexWeighting(spec["num_values"])
        if kind == "linear":
            return LinearWeighting(spec["num_bases"], spec["low"], spec["high"])
        if kind == "trainable":
            return TrainableWeighting(spec["num_values"], spec["num_bases"], spec.get("init", "linear"))
        if kind == "shared":
            return SharedWeighting()
    except KeyError as exc:
        raise ValueError(f"weighting spec {spec} lacks key {exc}") from None
    raise ValueError(f"unknown weighting kind {kind!r}; valid: index, linear, trainable, shared")
