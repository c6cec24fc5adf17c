"""The one expansion step of model building: config entries -> a backbone with its adapters.

:func:`expand_model` builds the backbone and adds everything the config asks for on top of it,
once: the adapter entries (``model.adapters``, and the entries a paper derives from its own
section, e.g. 002's ``model.affiner``), new class tokens (``model.context.new_tokens``), the frozen
base, and what a paper adds after that (e.g. 002's trainable base groups and new classes). The
papers' parts are :class:`Expansion` entries of the ordered registry :data:`EXPANSIONS`, which
their ``register()`` fills (:mod:`difflora.registry`); the shared entries come first.

``difflora.adapters`` takes Python objects only (weightings, forms, targets); this module reads
the typed config (:class:`difflora.config.schema.AdapterConfig`), checks each entry against the rest of
the config (a timestep adapter must cover every diffusion step, a class adapter every class),
and calls :func:`~difflora.adapters.inject_adapter` or
:func:`~difflora.adapters.inject_position_adapter`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from difflora.adapters import (
    DEFAULT_TARGETS,
    IndexWeighting,
    InjectionReport,
    LinearWeighting,
    SharedWeighting,
    TrainableWeighting,
    Weighting,
    adapter_layers,
    add_new_class_tokens,
    freeze_base,
    inject_adapter,
    inject_position_adapter,
)
from difflora.config.schema import AdapterConfig, Config, ModelConfig
from difflora.nets import adopt_net, build_net
from difflora.registry import Registry

__all__ = [
    "EXPANSIONS",
    "Expansion",
    "adapter_entries",
    "add_context_tokens",
    "check_adapter_configs",
    "expand_model",
    "freeze_entries",
    "inject_adapters",
    "make_weighting",
]


@dataclass(frozen=True)
class Expansion:
    """One part of the expansion step; each hook is optional. In the order of :func:`expand_model`:

    * ``net_config(model_cfg) -> model_cfg``: the backbone to build before expanding it (e.g. the
      base of fewer classes that 002's ``model.new_classes`` grows);
    * ``adapter_configs(model_cfg, net) -> [AdapterConfig]``: adapter entries this part adds.
      ``net`` is None when only the entries' conditions and values are wanted (``--condition``
      checks): the entries may then lack their default targets;
    * ``extend(net, cfg)``: changes after the adapters are injected and, without
      ``train.train_base``, the base is frozen (trainable tokens, base groups, class rows).
    """

    net_config: Callable[[ModelConfig], ModelConfig] | None = None
    adapter_configs: Callable[[ModelConfig, nn.Module | None], list[AdapterConfig]] | None = None
    extend: Callable[[nn.Module, Config], None] | None = None


# The parts of the expansion step, applied in registration order: the shared ones below, then each
# paper's (its register(), difflora.registry).
EXPANSIONS: Registry[Expansion] = Registry("model.expansion")


def expand_model(cfg: Config, net: nn.Module | None = None) -> tuple[nn.Module, InjectionReport | None]:
    """The backbone of ``cfg.model`` (or ``net``, one the caller built for it: see
    :func:`difflora.nets.adopt_net`) with everything the config adds (module docstring), and the
    report of the adapters injected (None when the config injects none).

    Entries with empty ``targets`` go on the backbone's default targets
    (:data:`difflora.adapters.DEFAULT_TARGETS`, its attention projections).
    """
    parts = EXPANSIONS.values()
    model_cfg = cfg.model
    for part in parts:
        if part.net_config is not None:
            model_cfg = part.net_config(model_cfg)
    net = build_net(model_cfg) if net is None else adopt_net(net, model_cfg)
    configs = adapter_entries(cfg, net)
    report = None
    if configs:
        check_adapter_configs(cfg, configs)
        report = inject_adapters(net, configs, DEFAULT_TARGETS.get(cfg.model.arch, ()))
    if not cfg.train.train_base:
        freeze_base(net)
    for part in parts:
        if part.extend is not None:
            part.extend(net, cfg)
    return net, report


def adapter_entries(cfg: Config, net: nn.Module | None = None) -> list[AdapterConfig]:
    """Every adapter entry ``cfg`` expands into, ``model.adapters`` first; ``net`` gives default targets
    (without it, entries a paper derives may lack targets: enough to know the conditions read)."""
    return [
        entry
        for part in EXPANSIONS.values()
        if part.adapter_configs is not None
        for entry in part.adapter_configs(cfg.model, net)
    ]


def make_weighting(cfg: AdapterConfig) -> Weighting:
    """A fresh weighting for one layer from an :class:`~difflora.config.schema.AdapterConfig`."""
    if cfg.weighting == "shared":
        return SharedWeighting()
    if cfg.weighting == "index":
        return IndexWeighting(cfg.num_values)
    assert cfg.num_bases is not None  # the config validates it
    if cfg.weighting == "linear":
        low, high = cfg.value_range if cfg.value_range is not None else (0.0, float(cfg.num_values - 1))
        return LinearWeighting(cfg.num_bases, low, high)
    return TrainableWeighting(cfg.num_values, cfg.num_bases, cfg.init)


def check_adapter_configs(cfg: Config, configs: Sequence[AdapterConfig]) -> None:
    """Errors for adapter entries (``configs``, from :func:`adapter_entries`) that do not fit the rest
    of ``cfg`` (diffusion steps, classes)."""
    for a in configs:
        if a.weighting == "shared":
            continue  # one entry for every sample: no range to cover
        if a.condition == "t" and a.weighting != "linear" and a.num_values < cfg.diffusion.steps:
            raise ValueError(
                f"model.adapters[{a.name}].num_values ({a.num_values}) covers timesteps 0..{a.num_values - 1} "
                f"but diffusion.steps is {cfg.diffusion.steps}; set num_values >= {cfg.diffusion.steps}"
            )
        if a.condition == "t" and a.weighting == "linear":
            high = a.value_range[1] if a.value_range is not None else a.num_values - 1
            if high < cfg.diffusion.steps - 1:
                raise ValueError(
                    f"model.adapters[{a.name}]: the linear weighting spans timesteps up to {high:g} but "
                    f"diffusion.steps is {cfg.diffusion.steps}; set num_values >= {cfg.diffusion.steps}"
                )
        if a.frozen and cfg.train.train_base:
            raise ValueError(
                f"adapter {a.name}: frozen entries (model.affiner.frozen_tasks, model.adapters[].frozen) keep their "
                "outputs only on a frozen base; set train.train_base=false"
            )
        if a.condition == "y" and cfg.model.num_classes and a.num_values != cfg.model.num_classes:
            raise ValueError(
                f"model.adapters[{a.name}].num_values ({a.num_values}) differs from model.num_classes "
                f"({cfg.model.num_classes}): a class adapter needs one entry per class"
            )


def inject_adapters(
    model: nn.Module, configs: Sequence[AdapterConfig], default_targets: Sequence[str] = ()
) -> InjectionReport:
    """Inject every adapter of ``configs`` (``cfg.model.adapters``); empty ``targets`` use ``default_targets``."""
    report = InjectionReport()
    for cfg in configs:
        targets = list(cfg.targets) or list(default_targets)
        if not targets:
            raise ValueError(f"adapter {cfg.name!r}: no targets given and no default targets for this model")

        def weighting(cfg: AdapterConfig = cfg) -> Weighting:
            return make_weighting(cfg)

        if cfg.form == "position":
            assert cfg.source is not None and cfg.dest is not None  # the config validates it
            part = inject_position_adapter(
                model,
                cfg.name,
                weighting,
                cfg.condition,
                targets,
                cfg.source,
                cfg.dest,
                cfg.rank,
                cfg.activation or "identity",
                cfg.scale,
                cfg.kernel,
                cfg.up_init,
            )
        else:
            part = inject_adapter(
                model,
                cfg.name,
                weighting,
                cfg.condition,
                targets,
                cfg.rank,
                cfg.alpha,
                cfg.form,
                cfg.activation,
                cfg.kernel,
            )
        report.extend(part)
        if cfg.frozen:
            freeze_entries(model, cfg.name, cfg.frozen)
    return report


def add_context_tokens(net: nn.Module, cfg: Config) -> None:
    """``model.context.new_tokens``: a trainable class-token table on a cross-attention backbone."""
    init = cfg.model.context.new_tokens
    if init is None:
        return
    if cfg.model.attention != "cross" or not cfg.model.num_classes:
        raise ValueError(
            "model.context.new_tokens needs class tokens to replace: set model.attention=cross and model.num_classes"
        )
    add_new_class_tokens(net, init)


def freeze_entries(model: nn.Module, name: str, frozen: int) -> None:
    """Hold the first ``frozen`` entries of every bank of adapter ``name`` as frozen parameters: on
    every layer or (a ValueError naming the first layer that refuses) on none."""
    plans = [
        (path, branch, {n: branch.entries(n) for n in branch.bank_names})
        for path, layer in adapter_layers(model)
        if (branch := layer.adapters[name] if name in layer.adapters else None) is not None
    ]
    for path, branch, banks in plans:
        if (problem := branch.entries_problem(banks, frozen)) is not None:
            raise ValueError(f"adapter {name} on {path}: {problem}; no layer was changed")
    for _, branch, banks in plans:
        branch.set_entries(banks, frozen)


def _model_adapters(cfg: ModelConfig, net: nn.Module | None) -> list[AdapterConfig]:
    return list(cfg.adapters)


EXPANSIONS.register("adapters", Expansion(adapter_configs=_model_adapters))  # model.adapters
EXPANSIONS.register("context_tokens", Expansion(extend=add_context_tokens))  # model.context.new_tokens
