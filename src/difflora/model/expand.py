"""Turn ``model.adapters`` config entries into adapters on a backbone (model building, not ``adapters/``).

``difflora.adapters`` takes Python objects only (weightings, forms, targets); this module reads
the typed config (:class:`difflora.config.schema.AdapterConfig`), checks each entry against the rest of
the config (a timestep adapter must cover every diffusion step, a class adapter every class),
and calls :func:`~difflora.adapters.inject_adapter` or
:func:`~difflora.adapters.inject_position_adapter`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from difflora.adapters import (
    IndexWeighting,
    InjectionReport,
    LinearWeighting,
    SharedWeighting,
    TrainableWeighting,
    Weighting,
    adapter_layers,
    add_new_class_tokens,
    inject_adapter,
    inject_position_adapter,
)
from difflora.config.schema import AdapterConfig, Config
from difflora.diffscaler.affiner import affiner_adapter_configs

__all__ = ["add_context_tokens", "check_adapter_configs", "freeze_entries", "inject_adapters", "make_weighting"]


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


def check_adapter_configs(cfg: Config) -> None:
    """Errors for adapter entries that do not fit the rest of ``cfg`` (diffusion steps, classes)."""
    for a in [*cfg.model.adapters, *affiner_adapter_configs(cfg.model)]:
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
    """Hold the first ``frozen`` entries of every bank of adapter ``name`` as frozen parameters."""
    for _, layer in adapter_layers(model):
        branch = layer.adapters[name] if name in layer.adapters else None
        if branch is not None:
            branch.set_entries({n: branch.entries(n) for n in branch.bank_names}, frozen)
