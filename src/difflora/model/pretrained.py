"""The weights of a pretrained diffusers folder (``model.pretrained``): safetensors only, fp16 variants too.

:func:`pretrained_weights` maps every tensor of the denoiser's folder to the safetensors file that
holds it, for :func:`difflora.train.base.load_base` to stream into a built model (one tensor at a
time, with its fingerprint). The folder's JSON is read by :mod:`difflora.config.pretrained`.

Which files: ``diffusion_pytorch_model.safetensors``, or its shards listed in
``diffusion_pytorch_model.safetensors.index.json``; without those, the one variant present
(``diffusion_pytorch_model.fp16.safetensors``, ``diffusion_pytorch_model.safetensors.index.fp16.json``;
what ``save_pretrained(..., variant="fp16")`` writes). Pickle files (``.bin``, ``.ckpt``, ``.pt``,
``.pth``) are never read: a folder with nothing else is refused.

In the built model the diffusers model sits at ``net.model.`` (:class:`difflora.nets.DiffusersNet`);
the folder's keys are diffusers' own, so model key ``net.model.K`` comes from folder key ``K``.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from difflora.config.pretrained import read_pretrained
from difflora.errors import DiffloraError
from difflora.files.jsonfile import read_json_file

__all__ = ["PRETRAINED_KEY_PREFIX", "PretrainedError", "pretrained_weights"]

# Where DiffusionModel(DiffusersNet(model)) holds the diffusers model's own keys.
PRETRAINED_KEY_PREFIX = "net.model."
WEIGHTS_NAME = "diffusion_pytorch_model"
_PICKLES = (".bin", ".ckpt", ".pt", ".pth")


class PretrainedError(ValueError, DiffloraError):
    """A pretrained folder's weights cannot be read (none, pickle only, several variants, a bad index)."""


def _index(folder: Path, index: Path) -> dict[str, Path]:
    fix = "re-save the model with save_pretrained"
    data = read_json_file(index, fix=fix, error=PretrainedError, expect=dict)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise PretrainedError(f"{index} has no weight_map of tensor names to files; {fix}")
    files = {name: folder / name for name in set(weight_map.values())}
    missing = sorted(name for name, path in files.items() if not path.is_file() or not name.endswith(".safetensors"))
    if missing:
        raise PretrainedError(f"{index} lists {missing[0]}, which is not a safetensors file in {folder}; {fix}")
    return {key: files[name] for key, name in weight_map.items()}


def _variants(folder: Path) -> dict[str, Path]:
    """``{variant: weights file or index}`` of the variants saved in ``folder``."""
    found = {}
    for path in folder.iterdir():
        name = path.name
        if name.startswith(f"{WEIGHTS_NAME}.safetensors.index.") and name.endswith(".json"):
            found[name[len(f"{WEIGHTS_NAME}.safetensors.index.") : -len(".json")]] = path
        elif name.startswith(f"{WEIGHTS_NAME}.") and name.endswith(".safetensors") and name.count(".") == 2:
            found[name.split(".")[1]] = path
    return found


def _file_keys(path: Path) -> dict[str, Path]:
    """``{key: path}`` for every tensor of one safetensors file (its header only is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict.fromkeys(f.keys(), path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise PretrainedError(f"{path} is not a readable safetensors file ({exc}); re-save the model") from None


def _weights_of(folder: Path) -> dict[str, Path]:
    single, index = folder / f"{WEIGHTS_NAME}.safetensors", folder / f"{WEIGHTS_NAME}.safetensors.index.json"
    if single.is_file():
        return _file_keys(single)
    if index.is_file():
        return _index(folder, index)
    variants = _variants(folder)
    if len(variants) == 1:
        (path,) = variants.values()
        return _index(folder, path) if path.suffix == ".json" else _file_keys(path)
    if variants:
        raise PretrainedError(
            f"{folder} holds the weight variants {', '.join(sorted(variants))} and no default weights; keep one "
            "variant (difflora reads the one it finds)"
        )
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLES)
    if pickles:
        raise PretrainedError(
            f"{folder} holds pickle weights only ({', '.join(pickles)}); difflora reads safetensors only (a pickle "
            "can run code): re-save with save_pretrained(..., safe_serialization=True)"
        )
    raise PretrainedError(f"{folder} holds no {WEIGHTS_NAME}.safetensors; re-save the model with save_pretrained")


def pretrained_weights(path: str | Path) -> dict[str, Path]:
    """``{folder key: safetensors file}`` for the denoiser of the model or pipeline folder ``path``."""
    return _weights_of(read_pretrained(path).denoiser)
