"""A plain LoRA in peft's and diffusers' on-disk formats: export, import, and merge into a plain model.

A *plain* LoRA is a low-rank branch with a bank of one (an index weighting over one value): its
update ``scaling B A`` is the same for every sample it is on for (value 0; -1 switches it off per
sample). peft stores exactly that, in a directory of two files:

* ``adapter_config.json``: ``peft_type: LORA``, ``r``, ``lora_alpha``, ``target_modules`` (here the
  exact module paths), ``rank_pattern`` / ``alpha_pattern`` for layers whose rank or alpha differ;
* ``adapter_model.safetensors``: ``base_model.model.<path>.lora_A.weight`` and ``...lora_B.weight``.

Layouts. For ``nn.Linear`` peft's ``lora_A.weight`` is [r x d_in] and ``lora_B.weight`` [d_out x r];
for a k x k ``nn.Conv2d`` (``Conv1d``) ``lora_A`` is a k x k convolution with the base's stride,
padding and dilation, [r x C_in x k x k], and ``lora_B`` a 1x1 one, [d_out x r x 1 x 1]. difflora's
:class:`~difflora.adapters.forms.LowRankForm` is the same factorisation stored flattened, with the
bank first: ``lora_A`` [1 x r x C_in k k], ``lora_B`` [1 x d_out x r]; ``scaling = alpha / r`` in both
(peft's rsLoRA, ``alpha / sqrt(r)``, is imported as ``alpha sqrt(r)``). So conversion is a reshape.

diffusers' LoRA file (``pytorch_lora_weights.safetensors``, what ``save_lora_weights`` writes and
``load_lora_weights`` / ``load_lora_adapter`` read) holds the same tensors with the pipeline
component's name (``unet`` / ``transformer``) in place of ``base_model.model``, and the
``LoraConfig`` under the same prefix in the header's ``lora_adapter_metadata``
(:func:`write_diffusers_lora`); :func:`import_peft` reads both. Adapters at fixed conditions
(TimeLoRA at one t) become a plain LoRA in ``lora_export.py``.

Paths are relative to the module passed: export from (and import into) the module peft wraps,
e.g. the diffusers model inside a :class:`~difflora.nets.diffusers_wrap.DiffusersNet`
(``model.net.model``). Both directions check everything before writing or changing anything.
Only safetensors and JSON are read.

:func:`merge_and_unload` (peft's name) writes every adapter into its base weight and puts the
base layer back in place of its wrapper: the result holds no difflora module.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from difflora.adapters.context import ConditionValue
from difflora.adapters.forms import LowRankForm
from difflora.adapters.inject import InjectionReport, ModelEdit, adapter_layers
from difflora.adapters.layer import SUPPORTED_LAYERS, ConditionalLayer
from difflora.adapters.positions import position_adapters, remove_position_adapter
from difflora.adapters.weightings import IndexWeighting
from difflora.files.atomic import write_together
from difflora.files.jsonfile import read_json_file
from difflora.files.tensorfile import check_finite, save_tensors, tensor_bytes

__all__ = [
    "DIFFUSERS_METADATA",
    "DIFFUSERS_PREFIXES",
    "DIFFUSERS_WEIGHTS",
    "PEFT_CONFIG",
    "PEFT_WEIGHTS",
    "PeftFormatError",
    "PlainLora",
    "export_peft",
    "import_peft",
    "lora_config",
    "merge_and_unload",
    "write_diffusers_lora",
    "write_peft",
]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# diffusers' LoRA file (``save_lora_weights`` / ``load_lora_weights``) and the header key of its config.
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA = "lora_adapter_metadata"
# The names diffusers' pipelines give their denoiser, which prefix the keys of its LoRA file.
DIFFUSERS_PREFIXES = ("unet", "transformer")
# peft options whose effect difflora's plain LoRA cannot reproduce: (key, the value that is fine).
_UNSUPPORTED = (
    ("use_dora", False),
    ("fan_in_fan_out", False),
    ("bias", "none"),
    ("lora_bias", False),
    ("modules_to_save", None),
    ("layers_to_transform", None),
)


class PeftFormatError(ValueError):
    """A peft adapter directory that difflora cannot read, or an adapter that is not a plain LoRA."""


# --- export -------------------------------------------------------------------------------------
def _plain_branches(
    model: nn.Module, adapter: str | None
) -> tuple[str, dict[str, tuple[ConditionalLayer, LowRankForm]]]:
    """The adapter to export (named, or the only one) and its branch at each path; errors otherwise."""
    names = sorted({n for _, layer in adapter_layers(model) for n in layer.adapters})
    if adapter is None:
        if not names:
            raise PeftFormatError(
                "the model has no adapter: only a run with a plain LoRA (model.adapters) can be exported"
            )
        if len(names) != 1:
            raise PeftFormatError(
                f"the model has adapters {names}: name the plain LoRA to export (adapter=... / --adapter NAME)"
            )
        adapter = names[0]
    found = {p: (layer, layer.adapters[adapter]) for p, layer in adapter_layers(model) if adapter in layer.adapters}
    if not found:
        raise PeftFormatError(f"no adapter named {adapter!r} in the model (adapters: {', '.join(names) or 'none'})")
    for path, (_, branch) in found.items():
        if not isinstance(branch, LowRankForm) or branch.num_bases != 1:
            raise PeftFormatError(
                f"adapter {adapter!r} at {path!r} is a {branch.form} bank of {branch.num_bases} entries "
                f"({branch.weighting.kind} weighting); peft's format holds a plain LoRA only (form lowrank, "
                f"weighting index, num_values 1)"
            )
    return adapter, found


def export_peft(model: nn.Module, directory: str | Path, adapter: str | None = None) -> Path:
    """Write the plain LoRA ``adapter`` of ``model`` as a peft adapter directory; returns it.

    Paths (``target_modules`` and tensor names) are relative to ``model``: pass the module peft
    will wrap. ``PeftModel.from_pretrained(base, directory)`` on the same base then computes what
    difflora computes with the adapter on. Adapters at fixed conditions (TimeLoRA at one t, several
    adapters at once) export with :func:`difflora.adapters.lora_export.export_lora`.
    """
    adapter, found = _plain_branches(model, adapter)
    layers, condition = {}, ""
    for path, (layer, branch) in found.items():
        a, b = branch.entries("lora_A")[0], branch.entries("lora_B")[0]
        layers[path] = PlainLora(a.detach(), b.detach(), branch.alpha, tuple(layer.base_layer.weight.shape[2:]))
        condition = branch.condition
    return write_peft(directory, layers, {"difflora_adapter": adapter, "difflora_condition": condition})


@dataclass
class PlainLora:
    """One layer's plain LoRA ``(alpha / r) B A``: ``a`` [r x fan_in] and ``b`` [d_out x r] flattened as
    difflora stores them; ``kernel`` is the base's kernel size (() for Linear)."""

    a: torch.Tensor
    b: torch.Tensor
    alpha: float
    kernel: tuple[int, ...]

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A, lora_B) in peft's layout (module docstring), contiguous on the CPU."""
        a = self.a.reshape(self.rank, -1, *self.kernel).detach().cpu().contiguous()
        b = self.b.reshape(self.b.shape[0], self.rank, *([1] * len(self.kernel))).detach().cpu().contiguous()
        return a, b


def lora_config(layers: dict[str, PlainLora]) -> dict[str, Any]:
    """peft's ``LoraConfig`` of ``layers``: the most common rank and alpha, the others as patterns."""
    ranks = {p: layer.rank for p, layer in layers.items()}
    alphas = {p: layer.alpha for p, layer in layers.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(layers),
        "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def _tensors(layers: dict[str, PlainLora], prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for path, layer in layers.items():
        out[f"{prefix}{path}.lora_A.weight"], out[f"{prefix}{path}.lora_B.weight"] = layer.factors()
    return out


def write_peft(directory: str | Path, layers: dict[str, PlainLora], meta: dict[str, str]) -> Path:
    """Write ``layers`` as a peft adapter directory (``meta``: difflora's notes in the safetensors header)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Both files under temporary names first: a crash or a full disk never leaves a half-written pair.
    weights = tensor_bytes(_tensors(layers, _PREFIX), metadata={"format": "pt", **meta})
    write_together(
        {directory / PEFT_WEIGHTS: weights, directory / PEFT_CONFIG: json.dumps(lora_config(layers), indent=2)}
    )
    return directory


def write_diffusers_lora(
    directory: str | Path, layers: dict[str, PlainLora], prefix: str, meta: dict[str, str]
) -> Path:
    """Write ``layers`` as diffusers' LoRA file ``directory/pytorch_lora_weights.safetensors``; returns it.

    Keys are ``<prefix>.<path>.lora_A.weight`` (peft's layout under the pipeline component's name,
    ``unet`` or ``transformer``), and the header's ``lora_adapter_metadata`` holds the ``LoraConfig``
    under the same prefix, as diffusers' ``save_lora_weights`` writes: ``load_lora_weights`` and
    ``load_lora_adapter(..., prefix=prefix)`` read rank and alpha from it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {f"{prefix}.{k}": v for k, v in lora_config(layers).items()}
    header = {"format": "pt", DIFFUSERS_METADATA: json.dumps(config, indent=2, sort_keys=True), **meta}
    save_tensors(_tensors(layers, f"{prefix}."), directory / DIFFUSERS_WEIGHTS, metadata=header)
    return directory / DIFFUSERS_WEIGHTS


# --- import -------------------------------------------------------------------------------------
def _check_config(config: Any, where: Path) -> dict[str, Any]:
    """``config`` if it is a LoRA difflora can hold (peft_type LORA, none of :data:`_UNSUPPORTED`)."""
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise PeftFormatError(f"{where}: peft_type is {kind!r}; difflora imports LoRA adapters (peft_type LORA)")
    for key, fine in _UNSUPPORTED:
        if config.get(key, fine) not in (fine, [], {}):
            raise PeftFormatError(
                f"{where}: {key}={config[key]!r} is not a plain LoRA; difflora imports adapters with {key}={fine!r}"
            )
    return config


def _read_tensors(w_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(w_path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise PeftFormatError(f"{w_path} is not a readable safetensors file ({exc})") from None
    check_finite(tensors, str(w_path), "export an adapter that was trained without diverging", PeftFormatError)
    return tensors, meta


def _read_peft(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """(config, tensors, safetensors metadata) of a peft directory, checked to be a LoRA difflora can hold."""
    cfg_path, w_path = directory / PEFT_CONFIG, directory / PEFT_WEIGHTS
    for path in (cfg_path, w_path):
        if not path.is_file():
            raise PeftFormatError(
                f"{path} does not exist: not a peft adapter directory (save_pretrained writes one) nor a "
                f"diffusers LoRA ({DIFFUSERS_WEIGHTS})"
            )
    config = read_json_file(cfg_path, fix="export the adapter again with peft's save_pretrained", error=PeftFormatError)
    _check_config(config, cfg_path)
    return (config, *_read_tensors(w_path))


def _read_diffusers(path: Path, prefix: str | None) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """(config, tensors with ``base_model.model.`` keys, metadata) of diffusers' LoRA file ``path``.

    ``prefix`` (the pipeline component, ``unet`` / ``transformer``; None: the one every key starts
    with, or none as ``save_lora_adapter`` writes) is removed from keys and config. Without a
    ``lora_adapter_metadata`` header, alpha is each layer's rank (diffusers' convention: scale 1).
    """
    tensors, meta = _read_tensors(path)
    if prefix is None:
        heads = {k.split(".", 1)[0] for k in tensors}
        prefix = heads.pop() if len(heads) == 1 and heads <= set(DIFFUSERS_PREFIXES) else ""
    lead = f"{prefix}." if prefix else ""
    stray = [k for k in tensors if not k.startswith(lead)]
    if stray:
        raise PeftFormatError(f"{path}: tensor {stray[0]!r} does not start with {lead!r}; pass the component's prefix")
    tensors = {_PREFIX + k[len(lead) :]: v for k, v in tensors.items()}
    raw = meta.get(DIFFUSERS_METADATA)
    if raw:
        try:
            config = {k[len(lead) :]: v for k, v in json.loads(raw).items() if k.startswith(lead)}
        except (json.JSONDecodeError, AttributeError) as exc:
            raise PeftFormatError(f"{path}: its {DIFFUSERS_METADATA} header is not a JSON object ({exc})") from None
    else:
        ranks = {
            re.escape(k[len(_PREFIX) : -len(".lora_B.weight")]): v.shape[1]
            for k, v in tensors.items()
            if k.endswith(".lora_B.weight") and v.dim() >= 2
        }
        config = {"lora_alpha": 8, "alpha_pattern": ranks}
    return _check_config(config, path), tensors, meta


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """peft's per-layer override: the first pattern that matches the end of ``path`` at a dot."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", path):
            return value
    return default


def _peft_layers(
    model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], name: str, where: Path, config_at: Path
):
    """[(path, rank, alpha, A [r x fan_in], B [d_out x r])] for every layer of the file, all checked."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(rf"{re.escape(_PREFIX)}(.+)\.(lora_A|lora_B)\.weight", key)
        if m is None:
            raise PeftFormatError(f"{where}: tensor {key!r} is not a LoRA factor (lora_A / lora_B) difflora can import")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    if not pairs:
        raise PeftFormatError(f"{where} holds no LoRA tensors")
    modules = dict(model.named_modules())
    layers = []
    for path, factors in pairs.items():
        if set(factors) != {"lora_A", "lora_B"}:
            raise PeftFormatError(f"{where}: {path!r} has {sorted(factors)} only; a LoRA needs lora_A and lora_B")
        module = modules.get(path)
        if isinstance(module, ConditionalLayer):
            if name in module.adapters:
                raise PeftFormatError(f"{path!r} already has an adapter named {name!r}; import under another name")
            module = module.base_layer
        if not isinstance(module, SUPPORTED_LAYERS):
            what = "no such module" if module is None else f"a {type(module).__name__}"
            raise PeftFormatError(
                f"{where}: the LoRA of {path!r} does not fit this model ({what}; difflora wraps Linear and "
                f"Conv1d/2d/3d); import into the module peft wrapped"
            )
        a, b = factors["lora_A"], factors["lora_B"]
        weight = module.weight
        r = a.shape[0]
        if tuple(a.shape) != (r, *weight.shape[1:]) or tuple(b.shape) != (
            weight.shape[0],
            r,
            *[1] * (weight.dim() - 2),
        ):
            raise PeftFormatError(
                f"{where}: {path!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, which do not fit its "
                f"weight {list(weight.shape)}; the adapter belongs to another base"
            )
        raw = _pattern_value(config.get("alpha_pattern", {}), path, config.get("lora_alpha", 8))
        alpha = float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else math.nan
        if not math.isfinite(alpha):  # JSON readers accept NaN and Infinity
            raise PeftFormatError(
                f"{config_at}: the alpha of {path!r} (lora_alpha / alpha_pattern) is {raw!r}; "
                f"a LoRA's alpha is a finite number"
            )
        if config.get("use_rslora", False):
            alpha *= math.sqrt(r)  # peft's rsLoRA scales by alpha / sqrt(r); difflora by alpha / r
        layers.append((path, r, alpha, a.reshape(r, -1), b.reshape(b.shape[0], r)))
    return layers


def _read_lora(path: Path, prefix: str | None):
    """(config, tensors, metadata, weights file, config file) of a peft directory or a diffusers LoRA."""
    if path.is_dir() and (path / DIFFUSERS_WEIGHTS).is_file() and not (path / PEFT_CONFIG).is_file():
        path = path / DIFFUSERS_WEIGHTS
    if path.is_file():
        return (*_read_diffusers(path, prefix), path, path)
    return (*_read_peft(path), path / PEFT_WEIGHTS, path / PEFT_CONFIG)


def import_peft(
    model: nn.Module,
    directory: str | Path,
    name: str | None = None,
    condition: str | None = None,
    prefix: str | None = None,
) -> InjectionReport:
    """Load a LoRA into ``model`` as plain LoRA ``name`` reading ``condition``; returns a report.

    ``directory`` is a peft adapter directory, or diffusers' LoRA file (``pytorch_lora_weights.safetensors``,
    or a directory holding it; ``prefix`` is its component, ``unet`` / ``transformer``, found from
    the keys when not given). Defaults: the adapter and condition names an export records, else
    ``"lora"`` for both. The imported LoRA is on for samples whose condition is 0 and off for -1:
    ``model(x, t, y, lora=0)``, or merge it (:func:`merge_and_unload` with ``lora=0``).
    All-or-nothing: every tensor is checked against ``model`` before it changes.
    """
    directory = Path(directory)
    try:
        config, tensors, meta, w_path, c_path = _read_lora(directory, prefix)
        name = name or meta.get("difflora_adapter") or "lora"
        condition = condition or meta.get("difflora_condition") or "lora"
        layers = _peft_layers(model, config, tensors, name, w_path, c_path)
    except PeftFormatError:
        raise
    except (re.error, ValueError, TypeError, AttributeError, IndexError, RuntimeError) as exc:
        # A config value of the wrong type (lora_alpha "abc", an alpha_pattern that does not
        # compile) or a tensor of the wrong rank, met while checking: nothing has changed yet.
        detail = f"pattern {exc.pattern!r}: {exc}" if isinstance(exc, re.error) else str(exc)
        raise PeftFormatError(f"{directory}: not a LoRA difflora can import ({detail})") from None
    edit = ModelEdit(model)
    for path, r, alpha, a, b in layers:
        try:
            geometry = edit.layer(path).geometry
            branch = edit.add_branch(path, name, LowRankForm(IndexWeighting(1), condition, geometry, r, alpha))
        except (ValueError, TypeError, RuntimeError) as exc:
            raise PeftFormatError(f"{directory}: cannot import the LoRA of {path!r} as {name!r} ({exc})") from None
        with torch.no_grad():  # still detached from the model
            branch.lora_A[0].copy_(a.to(branch.lora_A.dtype))
            branch.lora_B[0].copy_(b.to(branch.lora_B.dtype))
    return edit.apply()


# --- merge into a plain model -------------------------------------------------------------------
def merge_and_unload(model: nn.Module, **values: ConditionValue) -> nn.Module:
    """Merge every adapter at ``values`` (``lora=0``, ``t=500``, ...) and replace each wrapper by its
    base layer, in place; returns ``model`` (its base layer if ``model`` itself is a wrapper).

    Every adapter must read a condition given here (a dropped adapter would silently change the
    output) and be mergeable at its value; a position adapter only at its "no update" value (it is
    then removed). At every adapter's "no update" value (``task=-1``) the result is the base model,
    bit for bit. Otherwise nothing changes.
    """
    blocks = position_adapters(model)
    layers = list(adapter_layers(model))
    read = {b.condition for _, layer in layers for b in layer.adapters.values()} | {a.condition for _, a in blocks}
    missing = sorted(read - set(values))
    if missing:
        raise ValueError(f"merge_and_unload: the model has adapters reading {missing}; give a value for each")
    for path, adapter in blocks:
        value = values[adapter.condition]
        if not adapter.weighting.is_null(value.item() if isinstance(value, torch.Tensor) else value):
            raise ValueError(
                f"merge_and_unload: position adapter {adapter.name!r} of {path!r} adds f(h) between two taps, which "
                f"no weight holds; merge at its no-update value or delete_adapter({adapter.name!r}) first"
            )
    for path, layer in layers:
        problem = layer.merge_problem(**values)
        if problem:
            raise ValueError(f"merge_and_unload: {path!r}: {problem}")
    for path, adapter in blocks:
        remove_position_adapter(model.get_submodule(path), adapter.name)
    for path, layer in layers:
        layer.merge(**values)
        if not path:
            return layer.base_layer
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
    return model
