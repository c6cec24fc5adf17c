"""Save and load adapters on their own: ``adapters.safetensors`` + ``adapter_config.json`` in a directory.

The JSON holds one entry per adapter: every layer branch (``kind: layer``; form, condition,
weighting, rank, ...) and every position adapter (``kind: position``; taps, bottleneck, ...),
and a **fingerprint of the base model's adapted parts**: each adapted layer's type and shapes,
each adapted block's type and tap widths, and a SHA-256 of their (unmerged) base weights and
biases. Nothing is unpickled.

Loading is all-or-nothing: the JSON, the tensor file, the fingerprint, every spec and every
tensor's presence, shape, dtype (a floating type; a different float precision is converted) and
finiteness (no NaN or inf) are checked, and the changes planned (``ModelEdit``), before the model
changes at all. Any problem is an :class:`AdapterLoadError` naming the
file and the fix, also when the cause is a damaged file (a JSON or safetensors error).

Loading into a plain base injects the adapters at the saved paths first; loading into a model
that already has them (same names, same specs) overwrites their values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from difflora.adapters.forms import Branch, branch_from_spec
from difflora.adapters.inject import InjectedLayer, InjectionReport, ModelEdit, adapter_layers
from difflora.adapters.layer import SUPPORTED_LAYERS, ConditionalLayer
from difflora.adapters.positions import PositionAdapter, has_taps, position_adapters
from difflora.adapters.router import Geometry
from difflora.adapters.weightings import weighting_from_spec
from difflora.files.atomic import write_together
from difflora.files.jsonfile import read_json_file
from difflora.files.tensorfile import check_finite, tensor_bytes

__all__ = [
    "AdapterLoadError",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "base_fingerprint",
    "load_adapters",
    "read_adapter_config",
    "save_adapters",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
_FORMAT = "difflora.adapters"
_VERSION = 2
_READABLE = (1, 2)  # version 1: low-rank layer banks only


class AdapterLoadError(ValueError):
    """An adapter file does not fit the model it is loaded into (or is not an adapter file)."""


# --- fingerprint ------------------------------------------------------------------------------
def _base_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The unmerged base weights of a layer, or every base parameter of a block (adapters excluded)."""
    if isinstance(module, ConditionalLayer):
        weight, bias = module._original()
        return [weight] + ([bias] if bias is not None else [])
    if isinstance(module, SUPPORTED_LAYERS):
        return [module.weight] + ([module.bias] if module.bias is not None else [])
    out: list[torch.Tensor] = []
    for child in module.children():
        if not _adapter_container(child):
            out.extend(_base_tensors(child))
    out.extend(module.parameters(recurse=False))
    return out


def _adapter_container(module: nn.Module) -> bool:
    if isinstance(module, Branch | PositionAdapter):
        return True
    return isinstance(module, nn.ModuleDict) and all(isinstance(m, Branch | PositionAdapter) for m in module.values())


def _structure(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, ConditionalLayer):
        return module.fingerprint()
    if isinstance(module, SUPPORTED_LAYERS):
        return ConditionalLayer(module).fingerprint()  # a throwaway wrapper describes a plain layer
    return {"type": type(module).__name__, "taps": dict(module.tap_channels)}


def base_fingerprint(model: nn.Module, paths: list[str]) -> dict[str, Any]:
    """Structure of each layer / block in ``paths`` and a SHA-256 over their unmerged base weights."""
    digest = hashlib.sha256()
    layers = {}
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, SUPPORTED_LAYERS + (ConditionalLayer,)) and not has_taps(module):
            raise AdapterLoadError(f"{path!r} is a {type(module).__name__}, not a layer or block adapters can wrap")
        layers[path] = _structure(module)
        digest.update(path.encode())
        for tensor in _base_tensors(module):
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {"layers": layers, "weights_sha256": digest.hexdigest()}


# --- save -------------------------------------------------------------------------------------
def _prefix(entry: dict[str, Any]) -> str:
    where = "position_adapters" if entry["kind"] == "position" else "adapters"
    return f"{entry['path']}.{where}.{entry['name']}." if entry["path"] else f"{where}.{entry['name']}."


def save_adapters(
    model: nn.Module, directory: str | Path, names: list[str] | None = None, metadata: dict[str, Any] | None = None
) -> Path:
    """Write the adapters of ``model`` (all, or those named in ``names``) to ``directory``.

    Paths are relative to ``model``: load into the same kind of module (the net, or the
    DiffusionModel around it). ``metadata`` (JSON-able: step, config, ...) is stored alongside.
    Merged layers are saved with their unmerged base fingerprint (the adapters' own tensors never
    hold a merged weight).
    """
    directory = Path(directory)
    found: list[tuple[dict[str, Any], nn.Module]] = []
    for path, layer in adapter_layers(model):
        found += [({"path": path, "name": n, "kind": "layer", **b.spec()}, b) for n, b in layer.adapters.items()]
    for path, adapter in position_adapters(model):
        found.append(({"path": path, "name": adapter.name, "kind": "position", **adapter.spec()}, adapter))
    found = [(e, m) for e, m in found if names is None or e["name"] in names]
    if not found:
        raise ValueError("no adapters to save" + (f" named {names}" if names else " (none injected)"))
    tensors = {}
    for entry, module in found:
        for key, value in module.state_dict().items():
            tensors[_prefix(entry) + key] = value.detach().to("cpu").contiguous()
    entries = [e for e, _ in found]
    config = {
        "format": _FORMAT,
        "version": _VERSION,
        "adapters": entries,
        "fingerprint": base_fingerprint(model, list(dict.fromkeys(e["path"] for e in entries))),
        "metadata": metadata or {},
    }
    directory.mkdir(parents=True, exist_ok=True)
    # Both under temporary names, then renamed: a crash or a full disk never leaves a half-written pair.
    weights = tensor_bytes(tensors, metadata={"format": "pt"})
    write_together({directory / WEIGHTS_NAME: weights, directory / CONFIG_NAME: json.dumps(config, indent=2)})
    return directory


# --- load -------------------------------------------------------------------------------------
def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The JSON of an adapter directory, checked to be one."""
    path = Path(directory) / CONFIG_NAME
    config = read_json_file(
        path,
        fix="the file is damaged: save the adapters again",
        error=AdapterLoadError,
        missing=f"{path} does not exist: not an adapter directory (save_adapters writes one)",
    )
    if not isinstance(config, dict) or config.get("format") != _FORMAT or config.get("version") not in _READABLE:
        raise AdapterLoadError(f"{path} is not a difflora adapter file of version {_VERSION}")
    return config


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterLoadError(f"{path} does not exist: the adapter directory is incomplete; save the adapters again")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(f"{path} is not a readable safetensors file ({exc}); save the adapters again") from None
    check_finite(tensors, str(path), "save adapters that were trained without diverging", AdapterLoadError)
    return tensors


def _fresh_module(model: nn.Module, entry: dict[str, Any]) -> nn.Module:
    """The module an entry describes, built detached from the model (to validate tensors against)."""
    target = model.get_submodule(entry["path"])
    if entry.get("kind", "layer") == "position":
        return PositionAdapter(
            target,
            entry["name"],
            weighting_from_spec(entry["weighting"]),
            entry["condition"],
            entry["source"],
            entry["dest"],
            entry["rank"],
            entry["activation"],
            entry["scale"],
            entry.get("kernel", 1),  # files written before the kernel choice hold 1x1 adapters
        )
    base = target.base_layer if isinstance(target, ConditionalLayer) else target
    return branch_from_spec(entry, Geometry.of_layer(base))


def _existing(model: nn.Module, entry: dict[str, Any]) -> nn.Module | None:
    target = model.get_submodule(entry["path"])
    holder = getattr(target, "position_adapters" if entry.get("kind", "layer") == "position" else "adapters", None)
    if isinstance(target, ConditionalLayer) or entry.get("kind") == "position":
        return holder[entry["name"]] if holder is not None and entry["name"] in holder else None
    return None


def _check_tensors(module: nn.Module, state: dict[str, torch.Tensor], where: str, file: Path) -> None:
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterLoadError(
            f"{file}: {where} has missing tensors {missing} and unexpected {unexpected}; the file does not "
            f"match its adapter_config.json (save the adapters again)"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape or not value.is_floating_point():
            raise AdapterLoadError(
                f"{file}: {where}.{key} is {value.dtype} {list(value.shape)}, expected a floating tensor of shape "
                f"{list(expected[key].shape)}; the file does not match its adapter_config.json"
            )


def _plan(model: nn.Module, config: dict[str, Any], tensors: dict[str, torch.Tensor], directory: Path) -> ModelEdit:
    """Every check of :func:`load_adapters`, and its changes planned (new adapters built and filled
    with their values detached from the model, existing ones to be overwritten): nothing changed yet."""
    file = directory / WEIGHTS_NAME
    edit, claimed = ModelEdit(model), set()
    for entry in config["adapters"]:
        entry.setdefault("kind", "layer")
        where = f"adapter {entry['name']!r} at {entry['path']!r}"
        existing = _existing(model, entry)
        try:
            fresh = _fresh_module(model, entry)
        except (KeyError, ValueError, TypeError) as exc:
            raise AdapterLoadError(f"{directory / CONFIG_NAME}: {where} has an invalid spec ({exc})") from None
        target = model.get_submodule(entry["path"])
        if isinstance(target, ConditionalLayer) and target.merged:
            raise AdapterLoadError(f"layer {entry['path']!r} has merged adapters: unmerge before loading")
        if existing is not None and existing.spec() != fresh.spec():
            raise AdapterLoadError(
                f"{where} already exists with a different spec: {existing.spec()} vs saved {fresh.spec()}"
            )
        prefix = _prefix(entry)
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        claimed.update(prefix + k for k in state)
        _check_tensors(fresh, state, where, file)
        if existing is not None:
            edit.set_values(existing, state)
            continue
        try:
            if entry["kind"] == "position":
                module = edit.add_position(entry["path"], fresh)
            else:
                module = edit.add_branch(entry["path"], entry["name"], fresh)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise AdapterLoadError(f"{directory / CONFIG_NAME}: {where} cannot be added ({exc})") from None
        with torch.no_grad():  # still detached from the model
            own = module.state_dict()
            for key, value in state.items():
                own[key].copy_(value)
    extra = sorted(set(tensors) - claimed)
    if extra:
        raise AdapterLoadError(f"{file} holds tensors no adapter entry claims: {extra[:4]}; save the adapters again")
    return edit


def load_adapters(model: nn.Module, directory: str | Path, check_weights: bool = True) -> InjectionReport:
    """Load the adapters in ``directory`` into ``model`` (injecting them where absent); returns a report.

    All-or-nothing: raises :class:`AdapterLoadError` before changing anything if a file is damaged,
    a saved path is missing, its structure differs, a tensor is missing, unexpected, not finite, or
    of the wrong shape or type, or (``check_weights=True``) the base weights differ from those the
    adapters were saved with. Pass ``check_weights=False`` to load onto a base whose weights
    changed on purpose (e.g. further trained).
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    try:
        saved_fp = config["fingerprint"]
        paths = list(saved_fp["layers"])
        names = [(e["path"], e["name"]) for e in config["adapters"]]
    except (KeyError, TypeError) as exc:
        raise AdapterLoadError(
            f"{directory / CONFIG_NAME} lacks {exc}: a damaged adapter file; save it again"
        ) from None
    modules = dict(model.named_modules())
    missing = [p for p in paths + [p for p, _ in names] if p not in modules]
    if missing:
        raise AdapterLoadError(
            f"the model has no module {missing[0]!r} (and {len(missing) - 1} more missing): these adapters "
            f"were saved from a different base (or from a DiffusionModel / bare net: paths differ)"
        )
    fp = base_fingerprint(model, paths)
    for path in paths:
        if fp["layers"][path] != saved_fp["layers"][path]:
            raise AdapterLoadError(
                f"layer {path!r} differs from the base the adapters were saved with: saved "
                f"{saved_fp['layers'][path]}, model has {fp['layers'][path]}"
            )
    if check_weights and fp["weights_sha256"] != saved_fp["weights_sha256"]:
        raise AdapterLoadError(
            "the base weights of the adapted layers differ from those the adapters were saved with "
            "(fingerprint mismatch): a different base model. Pass check_weights=False to load anyway."
        )
    _plan(model, config, _read_tensors(directory), directory).apply()
    report = InjectionReport()
    for entry in config["adapters"]:
        path, name = entry["path"], entry["name"]
        if entry["kind"] == "position":
            report.layers.append(InjectedLayer.of_position(path, model.get_submodule(path).position_adapters[name]))
        else:
            report.layers.append(InjectedLayer.of(path, model.get_submodule(path), name, entry["condition"]))
    report.total_params = sum(p.numel() for p in model.parameters())
    return report
