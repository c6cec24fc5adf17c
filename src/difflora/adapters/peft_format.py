"""A plain LoRA in peft's on-disk format: export, import, and merge into a plain model.

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
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from difflora.adapters.context import ConditionValue
from difflora.adapters.forms import LowRankForm
from difflora.adapters.inject import InjectionReport, ModelEdit, adapter_layers
from difflora.adapters.layer import SUPPORTED_LAYERS, ConditionalLayer
from difflora.adapters.positions import position_adapters
from difflora.adapters.weightings import IndexWeighting
from difflora.files.jsonfile import read_json_file
from difflora.files.tensorfile import check_finite, save_tensors

__all__ = ["PEFT_CONFIG", "PEFT_WEIGHTS", "PeftFormatError", "export_peft", "import_peft", "merge_and_unload"]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
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
    difflora computes with the adapter on.
    """
    adapter, found = _plain_branches(model, adapter)
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas = {}, {}
    condition = ""
    for path, (layer, branch) in found.items():
        a, b = branch.entries("lora_A")[0], branch.entries("lora_B")[0]
        kernel = layer.base_layer.weight.shape[2:]  # () for Linear
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = a.reshape(branch.rank, -1, *kernel).detach().cpu().contiguous()
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = (
            b.reshape(b.shape[0], branch.rank, *([1] * len(kernel))).detach().cpu().contiguous()
        )
        ranks[path], alphas[path], condition = branch.rank, branch.alpha, branch.condition
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank and alpha
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(found),
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
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "difflora_adapter": adapter, "difflora_condition": condition}
    # Both files under temporary names first: a crash never leaves a half-written pair.
    tmp_w, tmp_c = directory / (PEFT_WEIGHTS + ".tmp"), directory / (PEFT_CONFIG + ".tmp")
    save_tensors(tensors, tmp_w, metadata=meta)
    tmp_c.write_text(json.dumps(config, indent=2))
    tmp_w.replace(directory / PEFT_WEIGHTS)
    tmp_c.replace(directory / PEFT_CONFIG)
    return directory


# --- import -------------------------------------------------------------------------------------
def _read_peft(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """(config, tensors, safetensors metadata) of a peft directory, checked to be a LoRA difflora can hold."""
    cfg_path, w_path = directory / PEFT_CONFIG, directory / PEFT_WEIGHTS
    for path in (cfg_path, w_path):
        if not path.is_file():
            raise PeftFormatError(f"{path} does not exist: not a peft adapter directory (save_pretrained writes one)")
    config = read_json_file(cfg_path, fix="export the adapter again with peft's save_pretrained", error=PeftFormatError)
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise PeftFormatError(f"{cfg_path}: peft_type is {kind!r}; difflora imports LoRA adapters (peft_type LORA)")
    for key, fine in _UNSUPPORTED:
        if config.get(key, fine) not in (fine, [], {}):
            raise PeftFormatError(
                f"{cfg_path}: {key}={config[key]!r} is not a plain LoRA; difflora imports adapters with {key}={fine!r}"
            )
    try:
        with safe_open(str(w_path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise PeftFormatError(f"{w_path} is not a readable safetensors file ({exc})") from None
    check_finite(tensors, str(w_path), "export an adapter that was trained without diverging", PeftFormatError)
    return config, tensors, meta


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """peft's per-layer override: the first pattern that matches the end of ``path`` at a dot."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", path):
            return value
    return default


def _peft_layers(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], name: str, where: Path):
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
                f"{where.parent / PEFT_CONFIG}: the alpha of {path!r} (lora_alpha / alpha_pattern) is {raw!r}; "
                f"a LoRA's alpha is a finite number"
            )
        if config.get("use_rslora", False):
            alpha *= math.sqrt(r)  # peft's rsLoRA scales by alpha / sqrt(r); difflora by alpha / r
        layers.append((path, r, alpha, a.reshape(r, -1), b.reshape(b.shape[0], r)))
    return layers


def import_peft(
    model: nn.Module, directory: str | Path, name: str | None = None, condition: str | None = None
) -> InjectionReport:
    """Load a peft LoRA directory into ``model`` as plain LoRA ``name`` reading ``condition``; returns a report.

    Defaults: the adapter and condition names an :func:`export_peft` directory records, else
    ``"lora"`` for both. The imported LoRA is on for samples whose condition is 0 and off for -1:
    ``model(x, t, y, lora=0)``, or merge it (:func:`merge_and_unload` with ``lora=0``).
    All-or-nothing: every tensor is checked against ``model`` before it changes.
    """
    directory = Path(directory)
    try:
        config, tensors, meta = _read_peft(directory)
        name = name or meta.get("difflora_adapter") or "lora"
        condition = condition or meta.get("difflora_condition") or "lora"
        layers = _peft_layers(model, config, tensors, name, directory / PEFT_WEIGHTS)
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
    output), be mergeable, and no position adapter may be present; otherwise nothing changes.
    """
    if any(True for _ in position_adapters(model)):
        raise ValueError("merge_and_unload: position adapters cannot be merged into weights; remove them first")
    layers = list(adapter_layers(model))
    for path, layer in layers:
        missing = sorted({b.condition for b in layer.adapters.values()} - set(values))
        if missing:
            raise ValueError(f"merge_and_unload: {path!r} has adapters reading {missing}; give a value for each")
        problem = layer.merge_problem(**values)
        if problem:
            raise ValueError(f"merge_and_unload: {path!r}: {problem}")
    for path, layer in layers:
        layer.merge(**values)
        if not path:
            return layer.base_layer
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
    return model
