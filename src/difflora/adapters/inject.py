"""Inject conditional adapters into any ``nn.Module`` by module path, and act on all of them at once.

``inject_adapter(model, "time", weighting_factory, condition="t", targets=["qkv", "proj_out"])``
replaces every matching layer by a :class:`~difflora.adapters.layer.ConditionalLayer` (or adds the
adapter to an existing wrapper, so TimeLoRA and ClassLoRA share one wrapper per projection) and
returns an :class:`InjectionReport`; ``form=`` picks the update form (``forms.py``).
``inject_position_adapter(model, "pa", factory, "task", ["re:blocks\\.\\d+"], "attn_out", "mlp_in")``
adds a position adapter to every matching block with taps (``positions.py``). This module takes
Python objects only; turning config entries into adapters is model building's job
(``difflora.model.expand``). A target is

* an exact module path (``"input_blocks.4.1.qkv"``),
* a suffix of whole path components (``"qkv"`` matches ``"middle_block.1.qkv"``, not ``"myqkv"``),
* or a regex matched against the whole path when prefixed with ``"re:"`` (``"re:.*blocks\\.[0-3]\\.attn\\.qkv"``).

A target that matches nothing, or that matches a module that cannot be wrapped, is an error that
names it. Since adapters are zero-initialised (B = 0), injection changes no output.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from difflora.adapters.context import ConditionValue, checkpoint, is_disabled
from difflora.adapters.forms import Branch, make_branch
from difflora.adapters.layer import SUPPORTED_LAYERS, ConditionalLayer
from difflora.adapters.positions import (
    PositionAdapter,
    add_position_adapter,
    check_position_adapter,
    fit_position_adapter,
    has_taps,
    position_adapters,
    remove_position_adapter,
)
from difflora.adapters.tokens import NewClassTokens
from difflora.adapters.weightings import Weighting
from difflora.config.adapters import target_regex
from difflora.nets.layers import BaseExtension

__all__ = [
    "DEFAULT_TARGETS",
    "InjectedLayer",
    "InjectionReport",
    "ModelEdit",
    "adapter_layers",
    "adapter_names",
    "adapter_parameters",
    "checkpoint_modules",
    "delete_adapter",
    "find_targets",
    "freeze_base",
    "inject_adapter",
    "inject_position_adapter",
    "match_target",
    "merge_adapters",
    "merge_shared",
    "unmerge_adapters",
]

# The "dense weights in attention blocks" of each backbone (000 section 3): the IDDPM U-Net's
# AttentionBlock has 1x1 Conv1d ``qkv`` and ``proj_out``; DiT's Attention has Linear ``qkv``, ``proj``.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "unet": ("qkv", "proj_out"),
    "dit": ("attn.qkv", "attn.proj"),
    # diffusers' Attention modules (difflora.nets.diffusers_wrap), in all three wrapped models.
    "diffusers": ("to_q", "to_k", "to_v", "to_out.0"),
}


@dataclass
class InjectedLayer:
    """One layer that received an adapter."""

    path: str
    layer_type: str
    in_features: int
    out_features: int
    adapter: str
    condition: str
    num_params: int

    form: str = "lowrank"

    @classmethod
    def of(cls, path: str, module: ConditionalLayer, adapter: str, condition: str) -> InjectedLayer:
        """The report row of adapter ``adapter`` in the wrapper ``module`` at ``path``."""
        return cls(
            path=path,
            layer_type=type(module.base_layer).__name__,
            in_features=module.in_features,
            out_features=module.out_features,
            adapter=adapter,
            condition=condition,
            num_params=sum(p.numel() for p in module.adapters[adapter].parameters()),
            form=module.adapters[adapter].form,
        )

    @classmethod
    def of_position(cls, path: str, adapter: PositionAdapter) -> InjectedLayer:
        """The report row of a position adapter of the block at ``path``."""
        return cls(
            path=path,
            layer_type=f"{adapter.source}->{adapter.dest}",
            in_features=adapter.geometry.in_features,
            out_features=adapter.geometry.out_features,
            adapter=adapter.name,
            condition=adapter.condition,
            num_params=sum(p.numel() for p in adapter.parameters()),
            form="position",
        )


@dataclass
class InjectionReport:
    """What an injection wrapped: one :class:`InjectedLayer` per (layer, adapter)."""

    layers: list[InjectedLayer] = field(default_factory=list)
    total_params: int = 0

    @property
    def paths(self) -> list[str]:
        return list(dict.fromkeys(layer.path for layer in self.layers))

    @property
    def adapter_params(self) -> int:
        return sum(layer.num_params for layer in self.layers)

    def extend(self, other: InjectionReport) -> None:
        self.layers.extend(other.layers)
        self.total_params = other.total_params

    def __str__(self) -> str:
        rows = [
            f"{'path':<40} {'type':<7} {'in':>5} {'out':>5} {'adapter':<10} {'form':<11} {'cond':<5} {'params':>10}"
        ]
        for e in self.layers:
            rows.append(
                f"{e.path:<40} {e.layer_type:<7} {e.in_features:>5} {e.out_features:>5} {e.adapter:<10} "
                f"{e.form:<11} {e.condition:<5} {e.num_params:>10,}"
            )
        rows.append(
            f"{len(self.paths)} layers wrapped, {self.adapter_params:,} adapter parameters added; "
            f"model total {self.total_params:,}"
        )
        return "\n".join(rows)


def match_target(path: str, target: str) -> bool:
    """Whether module ``path`` matches ``target`` (exact, dotted suffix, or ``re:`` full-match regex)."""
    regex = target_regex(target)
    if regex is not None:
        return regex.fullmatch(path) is not None
    return path == target or path.endswith("." + target)


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules, skipping those inside a wrapper (its base layer and banks are not targets)."""
    inside: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, ConditionalLayer):
            inside.append(path)
        yield path, module


def find_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Paths of the modules ``targets`` select, in model order; errors on no match or unsupported types."""
    if not targets:
        raise ValueError("no adapter targets given (module paths, suffixes, or 're:' regexes)")
    found: list[str] = []
    unmatched = set(targets)
    wrappable: list[str] = []
    for path, module in _candidates(model):
        if isinstance(module, SUPPORTED_LAYERS + (ConditionalLayer,)):
            wrappable.append(path)
        hits = [t for t in targets if path and match_target(path, t)]
        if not hits:
            continue
        unmatched.difference_update(hits)
        if not isinstance(module, SUPPORTED_LAYERS + (ConditionalLayer,)):
            raise ValueError(
                f"adapter target {hits[0]!r} matches {path!r}, a {type(module).__name__}; adapters wrap "
                f"nn.Linear and nn.Conv1d/2d/3d only: make the target more specific"
            )
        found.append(path)
    if unmatched:
        lines = []
        for t in sorted(unmatched):
            close = difflib.get_close_matches(t, wrappable, n=3, cutoff=0.3)
            hint = f" (close: {', '.join(close)})" if close else ""
            lines.append(f"{t!r}{hint}")
        sample = ", ".join(wrappable[:6]) + (", ..." if len(wrappable) > 6 else "")
        raise ValueError(
            f"adapter targets matched no module: {'; '.join(lines)}. Targets are exact paths, dotted "
            f"suffixes or 're:' regexes; wrappable layers include: {sample or 'none'}"
        )
    return found


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


class ModelEdit:
    """Changes to a model's adapters, each checked when it is planned, all made by :meth:`apply`.

    Every call that adds adapters to a model or loads values into them (:func:`inject_adapter`,
    :func:`inject_position_adapter`, ``load_adapters``, ``import_peft``) plans its changes here
    first: new wrappers, branches and position adapters are built and checked (and may be filled
    with values) detached from the model, so any error leaves the model exactly as it was, its
    module tree, parameter names and values. :meth:`apply` then only attaches what was planned,
    which cannot fail.

        edit = ModelEdit(model)
        branch = edit.add_branch("blocks.0.qkv", "lora", LowRankForm(IndexWeighting(1), "lora", geometry))
        branch.lora_B.data.copy_(values)  # still detached from the model
        edit.apply()
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._wrappers: dict[str, ConditionalLayer] = {}  # path -> the model's wrapper or a new one
        self._branches: list[tuple[str, str, Branch]] = []
        self._positions: list[tuple[str, PositionAdapter]] = []
        self._values: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []

    def layer(self, path: str) -> ConditionalLayer:
        """The wrapper of the layer at ``path``: the model's, or a new one (put in place by :meth:`apply`)."""
        if path not in self._wrappers:
            module = self.model.get_submodule(path)
            self._wrappers[path] = module if isinstance(module, ConditionalLayer) else ConditionalLayer(module)
        return self._wrappers[path]

    def add_branch(self, path: str, name: str, branch: Branch) -> Branch:
        """Plan adding ``branch`` as adapter ``name`` of the layer at ``path``; returns it, moved to
        the layer's device and type (values may be written into it before :meth:`apply`)."""
        layer = self.layer(path)
        try:
            layer.check_branch(name)
        except (ValueError, RuntimeError) as exc:
            raise type(exc)(f"{path!r}: {exc}") from None
        if any(p == path and n == name for p, n, _ in self._branches):
            raise ValueError(f"{path!r} would get two adapters named {name!r}")
        self._branches.append((path, name, layer.fit(branch)))
        return branch

    def add_position(self, path: str, adapter: PositionAdapter) -> PositionAdapter:
        """Plan attaching position ``adapter`` to the block at ``path``; returns it, moved to the block's type."""
        block = self.model.get_submodule(path)
        try:
            check_position_adapter(block, adapter.name)
        except ValueError as exc:
            raise ValueError(f"{path!r}: {exc}") from None
        if any(p == path and a.name == adapter.name for p, a in self._positions):
            raise ValueError(f"{path!r} would get two position adapters named {adapter.name!r}")
        self._positions.append((path, fit_position_adapter(block, adapter)))
        return adapter

    def set_values(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Plan copying ``state`` into ``module``'s state dict (the caller checked keys and shapes)."""
        own = module.state_dict()
        for key, value in state.items():
            if key not in own or own[key].shape != value.shape:
                raise ValueError(f"{key!r} of shape {list(value.shape)} does not fit {type(module).__name__}")
        self._values.append((module, state))

    def apply(self) -> InjectionReport:
        """Make every planned change; returns the report of the added adapters, in planned order."""
        for path, layer in self._wrappers.items():
            if self.model.get_submodule(path) is not layer:
                _set_submodule(self.model, path, layer)
        report = InjectionReport()
        for path, name, branch in self._branches:
            layer = self._wrappers[path]
            layer.add_branch(name, branch)
            report.layers.append(InjectedLayer.of(path, layer, name, branch.condition))
        for path, adapter in self._positions:
            report.layers.append(
                InjectedLayer.of_position(path, add_position_adapter(self.model.get_submodule(path), adapter))
            )
        with torch.no_grad():
            for module, state in self._values:
                own = module.state_dict()
                for key, value in state.items():
                    own[key].copy_(value)
        report.total_params = sum(p.numel() for p in self.model.parameters())
        return report


def inject_adapter(
    model: nn.Module,
    name: str,
    weighting: Callable[[], Weighting],
    condition: str,
    targets: Sequence[str],
    rank: int = 4,
    alpha: float | None = None,
    form: str = "lowrank",
    activation: str | None = None,
    kernel: str = "full",
) -> InjectionReport:
    """Add adapter ``name`` (reading ``condition``, of ``form``) to every layer ``targets`` selects, in place.

    ``weighting`` is called once per layer (each layer gets its own weighting, e.g. its own
    trainable table). Raises ``ValueError`` on no match, or on a name, condition, form or option
    that does not fit a layer; ``model`` is unchanged on error (:class:`ModelEdit`).
    """
    edit = ModelEdit(model)
    for path in find_targets(model, targets):
        geometry = edit.layer(path).geometry
        branch = make_branch(form, weighting(), condition, geometry, rank, alpha, activation, kernel)
        edit.add_branch(path, name, branch)
    return edit.apply()


def inject_position_adapter(
    model: nn.Module,
    name: str,
    weighting: Callable[[], Weighting],
    condition: str,
    targets: Sequence[str],
    source: str,
    dest: str,
    rank: int = 4,
    activation: str = "identity",
    scale: float = 1.0,
    kernel: int | str = "full",
    up_init: str = "zero",
) -> InjectionReport:
    """Add position adapter ``name`` (``dest += scale f(source)``) to every block ``targets`` selects.

    Targets match block paths (exact, suffix, ``re:``) and must select blocks with named taps
    (``positions.py``); modules without taps inside a matched path are an error naming them.
    ``model`` is unchanged on error (:class:`ModelEdit`).
    """
    if not targets:
        raise ValueError("no position-adapter targets given (block paths, suffixes, or 're:' regexes)")
    blocks = [(p, m) for p, m in model.named_modules() if p and any(match_target(p, t) for t in targets)]
    tapped = [(p, m) for p, m in blocks if has_taps(m)]
    unmatched = [t for t in targets if not any(match_target(p, t) for p, _ in tapped)]
    if unmatched:
        examples = [p for p, m in model.named_modules() if has_taps(m)][:6]
        raise ValueError(
            f"position-adapter targets {unmatched} match no block with taps; blocks with taps include: "
            f"{', '.join(examples) or 'none (position adapters need difflora blocks or SD-style diffusers blocks)'}"
        )
    edit = ModelEdit(model)
    for path, block in tapped:
        adapter = PositionAdapter(
            block, name, weighting(), condition, source, dest, rank, activation, scale, kernel, up_init
        )
        edit.add_position(path, adapter)
    return edit.apply()


def checkpoint_modules(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Run every module ``targets`` selects under activation checkpointing; returns their paths.

    Each selected module's forward becomes :func:`difflora.adapters.checkpoint` of itself
    (``use_reentrant=False``, conditions and disabled adapters re-entered for the recompute), set
    as an instance attribute: no parameter name changes. ``checkpoint_modules(net, ["re:blocks\\.\\d+"])``.
    """
    paths = [p for p, _ in model.named_modules() if p and any(match_target(p, t) for t in targets)]
    if not paths:
        raise ValueError(f"checkpoint targets {list(targets)} match no module (exact paths, suffixes or 're:' regexes)")
    for path in paths:
        module = model.get_submodule(path)
        module.forward = functools.partial(checkpoint, type(module).forward.__get__(module))
    return paths


# --- acting on every adapter of a model ----------------------------------------------------------
def adapter_layers(model: nn.Module) -> Iterator[tuple[str, ConditionalLayer]]:
    """``(path, wrapper)`` for every :class:`ConditionalLayer` in ``model``."""
    for path, module in model.named_modules():
        if isinstance(module, ConditionalLayer):
            yield path, module


def adapter_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The adapters' own parameters: every form's factors and vectors, position adapters, trainable tables,
    new class tokens (their table only, not the base embedder they wrap), and modules a base lacks
    (:class:`~difflora.nets.layers.BaseExtension`: spatial input, ControlNet branch)."""
    for module in model.modules():
        if isinstance(module, Branch | PositionAdapter | BaseExtension):
            yield from module.parameters()
        elif isinstance(module, NewClassTokens):
            yield module.new_tokens


def freeze_base(model: nn.Module, frozen: bool = True) -> int:
    """Set ``requires_grad = not frozen`` on every parameter that is not an adapter's; returns their count."""
    own = {id(p) for p in adapter_parameters(model)}
    count = 0
    for p in model.parameters():
        if id(p) not in own:
            p.requires_grad_(not frozen)
            count += p.numel()
    return count


def adapter_names(model: nn.Module) -> list[str]:
    """The names of every layer branch and position adapter in ``model``, sorted."""
    names = {n for _, layer in adapter_layers(model) for n in layer.adapters}
    return sorted(names | {a.name for _, a in position_adapters(model)})


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` (layer branches and position adapters) from ``model``, in place.

    A wrapper left with no adapter is replaced by its base layer, the very module it wrapped, so
    parameter names and values are those of the model before the adapter was added. All-or-nothing:
    an unknown name, or an adapter merged into some layer's weights (unmerge it first), changes
    nothing. Returns ``model`` (its base layer if ``model`` itself was a wrapper left empty).
    """
    layers = [(p, layer) for p, layer in adapter_layers(model) if name in layer.adapters]
    blocks = [(p, a) for p, a in position_adapters(model) if a.name == name]
    if not layers and not blocks:
        raise ValueError(
            f"no adapter named {name!r} in the model (adapters: {', '.join(adapter_names(model)) or 'none'})"
        )
    merged = [p for p, layer in layers if name in layer.merged]
    if merged:
        raise ValueError(f"adapter {name!r} is merged into the weights of {merged[0]!r}: unmerge it before deleting it")
    for path, layer in layers:
        del layer.adapters[name]
        if not len(layer.adapters):
            if not path:
                return layer.base_layer
            _set_submodule(model, path, layer.base_layer)
    for path, adapter in blocks:
        remove_position_adapter(model.get_submodule(path), adapter.name)
    return model


def merge_adapters(model: nn.Module, **values: ConditionValue) -> None:
    """:meth:`ConditionalLayer.merge` on every wrapper: ``merge_adapters(model, t=500)``.

    All-or-nothing: a layer whose merge would be refused is an error naming it, before any merges.
    """
    layers = list(adapter_layers(model))
    for path, layer in layers:
        problem = layer.merge_problem(**values)
        if problem:
            raise ValueError(f"{path!r}: {problem}")
    for _, layer in layers:
        layer.merge(**values)


def unmerge_adapters(model: nn.Module, *conditions: str) -> None:
    """:meth:`ConditionalLayer.unmerge` on every wrapper (all merged adapters if no condition is named)."""
    for _, layer in adapter_layers(model):
        layer.unmerge(*conditions)


def _shared_values(values: dict[str, ConditionValue]) -> dict[str, tuple[bool, Any]]:
    """{name: (True, v)} for a condition whose samples all have the value v (a Python number), else
    {name: (False, None)}.

    Whether a merge is possible is a host decision (it rewrites the weights), so the batch's values
    must be read once: every tensor condition's "all equal" flag and first value are packed into
    one float64 tensor and read back in a single ``.tolist()``, one readback per call however many
    conditions there are (float64 holds every float value and every integer up to 2**53 exactly:
    timesteps, labels and task ids are far below).
    """
    out: dict[str, tuple[bool, Any]] = {}
    flat = {}
    for name, value in values.items():
        if not isinstance(value, torch.Tensor):
            out[name] = (True, value)
        elif value.numel() == 0:
            out[name] = (False, None)
        else:
            flat[name] = value.reshape(-1)
    if not flat:
        return out
    device = next(iter(flat.values())).device
    packed = [torch.stack([_all_equal(f).double(), f[0].double()]).to(device) for f in flat.values()]
    read = torch.cat(packed).tolist()  # the one host readback (see above)
    for i, (name, f) in enumerate(flat.items()):
        same, first = read[2 * i], read[2 * i + 1]
        if not same:
            out[name] = (False, None)
        elif f.dtype == torch.bool:
            out[name] = (True, bool(first))
        else:
            out[name] = (True, first if f.is_floating_point() else int(first))
    return {name: out[name] for name in values}


def _all_equal(flat: torch.Tensor) -> torch.Tensor:
    """Whether every value of ``flat`` [K >= 1] equals the first, a bool on its device (one value: True, NaN too)."""
    return (flat == flat[0]).all() if flat.numel() > 1 else torch.ones((), dtype=torch.bool, device=flat.device)


def merge_shared(model: nn.Module, **values: ConditionValue) -> dict[str, bool]:
    """Merge the adapters reading each condition whose batch values are all equal; unmerge the others.

    The fast sampling path: in a sampler step every sample shares t, so ``merge_shared(net, t=t)``
    merges the TimeLoRA update once, while ClassLoRA (different y per sample under classifier-free
    guidance) stays per sample. With different t in a batch the t-adapters fall back to the
    per-sample path. Merging at the value already merged is a no-op. A layer whose merge would be
    refused (a non-mergeable form reads the condition, see :meth:`ConditionalLayer.merge_problem`)
    stays per sample: same output, no speed-up. Inside :func:`adapters_disabled` a condition read
    by a disabled adapter of a layer stays per sample there (unmerged), where the disabled adapter
    adds nothing: the base model's output. Returns {condition: shared by the batch}.
    """
    read = _shared_values(values)  # at most one host readback per call, whatever the conditions
    merged = {name: shared for name, (shared, _) in read.items()}
    for _, layer in adapter_layers(model):
        # A merge writes every branch reading the condition into the weight: never a disabled one's.
        off = {b.condition for n, b in layer.adapters.items() if is_disabled(n)}
        stale = [c for c, ok in merged.items() if not ok or c in off]
        if stale:
            layer.unmerge(*stale)
        to_merge = {name: v for name, (shared, v) in read.items() if shared and name not in off}
        # Skip layers already merged at these values (the common case within one sampler step).
        wanted = {n: to_merge[b.condition] for n, b in layer.adapters.items() if b.condition in to_merge}
        if wanted and any(layer.merged.get(n, _MISSING) != v for n, v in wanted.items()):
            if layer.merge_problem(**to_merge) is None:
                layer.merge(**to_merge)
            else:  # e.g. a lowrank_act branch reads t: this layer stays per sample (same output)
                layer.unmerge(*to_merge)
    return merged


_MISSING = object()
