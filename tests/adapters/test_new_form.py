"""A new form is one class: the wrapped layer asks its branches and knows no form by name.

Also: the names the adapters had before issue 27 still import, as aliases of the new ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from difflora.adapters import (
    FORMS,
    ActivationBank,
    Branch,
    ConditionalLayer,
    ConditionalLoRA,
    IndexWeighting,
    LayerTerms,
    LoRABank,
    LowRankActForm,
    LowRankForm,
    MergedUpdate,
    Mix,
    Route,
    ScaleBank,
    ScaleForm,
    ShiftBank,
    ShiftForm,
    Weighting,
    conditions,
)
from difflora.adapters.router import Geometry


class DoubledShiftForm(Branch):
    """``+ 2 sum_i w_i(c) o_i`` per output channel: a bias shift with another law, mergeable into the bias."""

    form = "doubled_shift"
    mergeable = True
    bank_names = ("offset",)

    def __init__(self, weighting: Weighting, condition: str, geometry: Geometry):
        super().__init__(weighting, condition, geometry)
        self.offset = nn.Parameter(torch.zeros(weighting.num_bases, geometry.out_features))

    @classmethod
    def from_options(cls, weighting, condition, geometry, options) -> DoubledShiftForm:
        return cls(weighting, condition, geometry)

    def options(self) -> dict[str, Any]:
        return {}

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.offset)

    def add_term(self, terms: LayerTerms, route: Route, dtype: torch.dtype) -> None:
        terms.shifts.append(2 * route.vectors(self.entries("offset"), dtype))

    def delta_bias(self, value) -> torch.Tensor:
        return 2 * self.shared_weights(value, self.offset.device).to(self.offset.dtype) @ self.offset

    def merge_into(self, update: MergedUpdate, value) -> None:
        update.shift += self.delta_bias(value).to(update.shift.dtype)


def test_a_form_defined_outside_the_package_runs_per_sample_and_merges(monkeypatch):
    monkeypatch.setitem(FORMS, DoubledShiftForm.form, DoubledShiftForm)
    layer = ConditionalLayer(nn.Linear(5, 4).double())
    branch = layer.add_adapter("d", IndexWeighting(3), "task", form="doubled_shift")
    assert isinstance(branch, DoubledShiftForm)
    with torch.no_grad():
        branch.offset.copy_(torch.randn(3, 4, dtype=torch.float64))
    x, task = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 2, -1, 1])
    with conditions(task=task):
        out = layer(x)
    expected = layer.base_layer(x) + 2 * torch.where(task[:, None] >= 0, branch.offset[task.clamp(min=0)], 0)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    with conditions(task=torch.full((4,), 2)):
        per_sample = layer(x)
    layer.merge(task=2)
    assert layer.merged == {"d": 2}
    torch.testing.assert_close(layer(x), per_sample, atol=1e-12, rtol=0)  # a merged branch reads no condition


def test_the_old_names_are_aliases_of_the_new():
    assert ConditionalLoRA is ConditionalLayer
    assert (LoRABank, ActivationBank, ScaleBank, ShiftBank) == (LowRankForm, LowRankActForm, ScaleForm, ShiftForm)
    assert Mix is Route
