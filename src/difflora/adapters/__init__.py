"""Conditional adapters: the one mechanism behind TimeLoRA, ClassLoRA, DiffScaler, LoRA distillation, ...

A wrapped layer computes ``y = W x + b`` plus any number of conditional branches, each a bank of
entries, a weighting (condition value -> mixing weights over the bank) and a form: low-rank
``B A x``, low-rank with activation ``s W_up act(W_down x)``, weight scale ``(1 + a) (W x)`` or bias
shift ``+ b``; position adapters add ``scale f(h)`` between two named taps of a block. Each
sample's condition (timestep, class, task, guidance scale, any name) is read from the enclosing
:func:`conditions` block. See ``forms.py`` (the forms: one class each, ``...Form``), ``router.py``
(per-sample routing, written once), ``layer.py`` (:class:`ConditionalLayer`, the wrapper; merge),
``positions.py`` (taps), ``weightings.py`` (c -> w; timestep convention; "no update" values),
``inject.py`` (by module path; :func:`delete_adapter`), ``io.py`` (safetensors + JSON with a base fingerprint),
``peft_format.py`` and ``lora_export.py`` (peft's and diffusers' LoRA files; every adapter
at fixed conditions as an exact plain LoRA, or refused), ``context.py`` (conditions, :func:`adapters_disabled`, :func:`checkpoint`).

    from difflora.adapters import conditions, inject_adapter, LinearWeighting
    report = inject_adapter(net, "time", lambda: LinearWeighting(11, 0, 4000), "t", ["qkv", "proj_out"])
    with conditions(t=t):          # [N] original-process timesteps
        out = net(x, t, None)
"""

from difflora.adapters.context import (
    ALL_ADAPTERS,
    ConditionValue,
    MissingConditionError,
    active,
    adapters_disabled,
    checkpoint,
    conditions,
    current,
    is_disabled,
)
from difflora.adapters.forms import (
    ACTIVATIONS,
    FORMS,
    Branch,
    FormOptions,
    LowRankActForm,
    LowRankForm,
    MergedUpdate,
    ScaleForm,
    ShiftForm,
    branch_from_spec,
    make_branch,
)
from difflora.adapters.inject import (
    DEFAULT_TARGETS,
    InjectedLayer,
    InjectionReport,
    ModelEdit,
    adapter_layers,
    adapter_names,
    adapter_parameters,
    checkpoint_modules,
    delete_adapter,
    find_targets,
    freeze_base,
    inject_adapter,
    inject_position_adapter,
    match_target,
    merge_adapters,
    merge_shared,
    unmerge_adapters,
)
from difflora.adapters.io import AdapterLoadError, base_fingerprint, load_adapters, read_adapter_config, save_adapters
from difflora.adapters.layer import SUPPORTED_LAYERS, ConditionalLayer
from difflora.adapters.positions import (
    PositionAdapter,
    add_position_adapter,
    has_taps,
    position_adapters,
    remove_position_adapter,
)
from difflora.adapters.router import Geometry, LayerTerms, Route
from difflora.adapters.tokens import NEW_TOKEN_INITS, NewClassTokens, add_new_class_tokens
from difflora.adapters.weightings import (
    NULL_VALUE,
    IndexWeighting,
    LinearWeighting,
    SharedWeighting,
    TrainableWeighting,
    Weighting,
    weighting_from_spec,
)

# The names these had before issue 27, kept so that old code keeps working: ConditionalLoRA held
# every form (not only LoRA), the ``...Bank`` names were the forms, and a weighting's ``Mix`` was
# the same two fields as the router's ``Route``.
ConditionalLoRA = ConditionalLayer  # old name of ConditionalLayer
LoRABank = LowRankForm  # old name of LowRankForm
ActivationBank = LowRankActForm  # old name of LowRankActForm
ScaleBank = ScaleForm  # old name of ScaleForm
ShiftBank = ShiftForm  # old name of ShiftForm
Mix = Route  # old name of Route (what a weighting returns)

__all__ = [
    "ACTIVATIONS",
    "NEW_TOKEN_INITS",
    "NewClassTokens",
    "add_new_class_tokens",
    "ALL_ADAPTERS",
    "DEFAULT_TARGETS",
    "FORMS",
    "NULL_VALUE",
    "SUPPORTED_LAYERS",
    "ActivationBank",
    "AdapterLoadError",
    "Branch",
    "ConditionValue",
    "ConditionalLayer",
    "ConditionalLoRA",
    "Geometry",
    "IndexWeighting",
    "InjectedLayer",
    "InjectionReport",
    "LayerTerms",
    "LinearWeighting",
    "LoRABank",
    "LowRankActForm",
    "LowRankForm",
    "MergedUpdate",
    "MissingConditionError",
    "ModelEdit",
    "Mix",
    "PositionAdapter",
    "Route",
    "ScaleBank",
    "ScaleForm",
    "SharedWeighting",
    "ShiftBank",
    "ShiftForm",
    "TrainableWeighting",
    "Weighting",
    "active",
    "adapter_layers",
    "adapter_names",
    "adapter_parameters",
    "adapters_disabled",
    "add_position_adapter",
    "base_fingerprint",
    "branch_from_spec",
    "checkpoint",
    "checkpoint_modules",
    "conditions",
    "current",
    "delete_adapter",
    "find_targets",
    "freeze_base",
    "has_taps",
    "inject_adapter",
    "inject_position_adapter",
    "is_disabled",
    "load_adapters",
    "make_branch",
    "FormOptions",
    "match_target",
    "merge_adapters",
    "merge_shared",
    "position_adapters",
    "read_adapter_config",
    "remove_position_adapter",
    "save_adapters",
    "unmerge_adapters",
    "weighting_from_spec",
]
