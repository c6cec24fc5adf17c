"""Save and load adapters on their own: ``adapters.safetensors`` + ``adapter_config.json`` in a directory.

The JSON holds, for every (layer path, adapter name), the adapter's spec (condition, rank, alpha,
weighting) and a **fingerprint of the base model's adapted layers**: each layer's type and shapes
and a SHA-256 of their (unmerged) base weights and biases. Loading checks the fingerprint before
touching the model, so an adapter file can be loaded into a matching base only; a different base
is an error that names the first mismatching layer. Nothing is unpickled.

Loading into a plain base injects the adapters at the saved paths first; loading into a model
that already has them (same names, same specs) overwrites their values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from difflora.adapters.inject import InjectedLayer, InjectionReport, adapter_layers
from difflora.adapters.layer import SUPPORTED_LAYERS, ConditionalLoRA
from difflora.adapters.weightings import weighting_from_spec

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
_VERSION = 1


class AdapterLoadError(ValueError):
    """An adapter file does not fit the model it is loaded into (or is not an adapter file)."""


def _layer_structure(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, ConditionalLoRA):
        return module.fingerprint()
    return ConditionalLoRA(module).fingerprint()  # a throwaway wrapper describes a plain layer


def _base_tensors(module: nn.Module) -> list[torch.Tensor]:
    if isinstance(module, ConditionalLoRA):
        weight = module._unmerged_weight if module._unmerged_weight is not None else module.base_layer.weight
        bias = module.base_layer.bias
    else:
        weight, bias = module.weight, module.bias
    return [weight] + ([bias] if bias is not None else [])


def base_fingerprint(model: nn.Module, paths: list[str]) -> dict[str, Any]:
    """Structure of each layer in ``paths`` and a SHA-256 over their unmerged base weights and biases."""
    digest = hashlib.sha256()
    layers = {}
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, SUPPORTED_LAYERS + (ConditionalLoRA,)):
            raise AdapterLoadError(f"{path!r} is a {type(module).__name__}, not a layer adapters can wrap")
        layers[path] = _layer_structure(module)
        digest.update(path.encode())
        for tensor in _base_tensors(module):
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {"layers": layers, "weights_sha256": digest.hexdigest()}


def save_adapters(
    model: nn.Module, directory: str | Path, names: list[str] | None = None, metadata: dict[str, Any] | None = None
) -> Path:
    """Write the adapters of ``model`` (all, or those named in ``names``) to ``directory``.

    Paths are relative to ``model``: load into the same kind of module (the net, or the
    DiffusionModel around it). ``metadata`` (JSON-able: step, config, ...) is stored alongside.
    """
    directory = Path(directory)
    entries, tensors = [], {}
    for path, layer in adapter_layers(model):
        for name, bank in layer.adapters.items():
            if names is not None and name not in names:
                continue
            entries.append({"path": path, "name": name, **bank.spec()})
            for key, value in bank.state_dict().items():
                tensors[f"{path}.adapters.{name}.{key}"] = value.detach().to("cpu").contiguous()
    if not entries:
        raise ValueError("no adapters to save" + (f" named {names}" if names else " (none injected)"))
    paths = list(dict.fromkeys(e["path"] for e in entries))
    config = {
        "format": _FORMAT,
        "version": _VERSION,
        "adapters": entries,
        "fingerprint": base_fingerprint(model, paths),
        "metadata": metadata or {},
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The JSON of an adapter directory, checked to be one."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterLoadError(f"{path} does not exist: not an adapter directory (save_adapters writes one)")
    config = json.loads(path.read_text())
    if config.get("format") != _FORMAT or config.get("version") != _VERSION:
        raise AdapterLoadError(f"{path} is not a difflora adapter file of version {_VERSION}")
    return config


def load_adapters(model: nn.Module, directory: str | Path, check_weights: bool = True) -> InjectionReport:
    """Load the adapters in ``directory`` into ``model`` (injecting them where absent); returns a report.

    Raises :class:`AdapterLoadError` before changing anything if a saved layer path is missing,
    its structure differs, or (``check_weights=True``) the base weights differ from those the
    adapters were saved with. Pass ``check_weights=False`` to load onto a base whose weights
    changed on purpose (e.g. further trained).
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    saved_fp = config["fingerprint"]
    paths = list(saved_fp["layers"])
    modules = dict(model.named_modules())
    missing = [p for p in paths if p not in modules]
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
    for entry in config["adapters"]:
        module = modules[entry["path"]]
        if isinstance(module, ConditionalLoRA):
            if module.merged:
                raise AdapterLoadError(f"layer {entry['path']!r} has merged adapters: unmerge before loading")
            bank = module.adapters[entry["name"]] if entry["name"] in module.adapters else None
            if bank is not None and bank.spec() != {k: entry[k] for k in ("condition", "rank", "alpha", "weighting")}:
                raise AdapterLoadError(
                    f"layer {entry['path']!r} already has an adapter {entry['name']!r} with a different spec: "
                    f"{bank.spec()} vs saved {entry}"
                )
    tensors = load_file(str(directory / WEIGHTS_NAME))

    report = InjectionReport()
    for entry in config["adapters"]:
        path, name = entry["path"], entry["name"]
        module = model.get_submodule(path)
        if not isinstance(module, ConditionalLoRA):
            module = ConditionalLoRA(module)
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, module)
        if name not in module.adapters:
            module.add_adapter(
                name, weighting_from_spec(entry["weighting"]), entry["condition"], entry["rank"], entry["alpha"]
            )
        bank = module.adapters[name]
        prefix = f"{path}.adapters.{name}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            bank.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise AdapterLoadError(f"adapter {name!r} at {path!r}: {exc}") from None
        report.layers.append(InjectedLayer.of(path, module, name, entry["condition"]))
    report.total_params = sum(p.numel() for p in model.parameters())
    return report
