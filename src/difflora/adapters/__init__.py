"""Conditional low-rank adapters: the one mechanism behind TimeLoRA, ClassLoRA, per-task adapters, ...

A wrapped layer computes ``W(c) x + b`` with ``W(c) = W + scaling * sum_i w_i(c) B_i A_i`` where c is
each sample's condition (timestep, class, task, guidance scale), read from the enclosing
:func:`conditions` block. See ``layer.py`` (the wrapper), ``weightings.py`` (c -> w; timestep
convention), ``inject.py`` (by module path), ``io.py`` (safetensors + JSON with a base fingerprint).

    from difflora.adapters import conditions, inject_adapter, LinearWeighting
    report = inject_adapter(net, "time", lambda: LinearWeighting(11, 0, 4000), "t", ["qkv", "proj_out"])
    with conditions(t=t):          # [N] original-process timesteps
        out = net(x, t, None)
"""

from difflora.adapters.context import ConditionValue, MissingConditionError, active, conditions, current
from difflora.adapters.inject import (
    DEFAULT_TARGETS,
    InjectedLayer,
    InjectionReport,
    adapter_layers,
    adapter_parameters,
    find_targets,
    freeze_base,
    inject_adapter,
    inject_adapters,
    make_weighting,
    match_target,
    merge_adapters,
    merge_shared,
    unmerge_adapters,
)
from difflora.adapters.io import AdapterLoadError, base_fingerprint, load_adapters, read_adapter_config, save_adapters
from difflora.adapters.layer import SUPPORTED_LAYERS, ConditionalLoRA, LoRABank
from difflora.adapters.weightings import (
    NULL_VALUE,
    IndexWeighting,
    LinearWeighting,
    Mix,
    TrainableWeighting,
    Weighting,
    weighting_from_spec,
)

__all__ = [
    "DEFAULT_TARGETS",
    "NULL_VALUE",
    "SUPPORTED_LAYERS",
    "AdapterLoadError",
    "ConditionValue",
    "ConditionalLoRA",
    "IndexWeighting",
    "InjectedLayer",
    "InjectionReport",
    "LinearWeighting",
    "LoRABank",
    "MissingConditionError",
    "Mix",
    "TrainableWeighting",
    "Weighting",
    "active",
    "adapter_layers",
    "adapter_parameters",
    "base_fingerprint",
    "conditions",
    "current",
    "find_targets",
    "freeze_base",
    "inject_adapter",
    "inject_adapters",
    "load_adapters",
    "make_weighting",
    "match_target",
    "merge_adapters",
    "merge_shared",
    "read_adapter_config",
    "save_adapters",
    "unmerge_adapters",
    "weighting_from_spec",
]
