"""``model.pretrained: PATH``: a diffusers model or pipeline folder as a run's base, described by its JSON.

A folder is one of:

- a **model folder**: ``config.json`` (with diffusers' ``_class_name``) and safetensors weights;
- a **pipeline folder**: ``model_index.json`` naming its components, the denoiser in ``unet/`` or
  ``transformer/`` (a model folder) and the noise process in ``scheduler/scheduler_config.json``.

The architecture comes from the folder: :func:`expand_pretrained` fills the config tree (before it
is validated) with the keys the folder decides (``model.arch: diffusers``, the class and its
config, channels, ``learn_sigma``, classes, and from a scheduler the ``diffusion`` keys; the model
gets diffusers' integer timestep). A config that restates one of them must agree; it is refused
otherwise. ``train.init_from`` defaults to the folder (its weights fill the base); a folder given
as ``train.init_from`` alone is the same as ``model.pretrained``. The weights are read by
:mod:`difflora.model.pretrained`. This module reads JSON only, never weights, and imports no
diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difflora.config.base import ConfigError
from difflora.config.diffusers import DIFFUSERS_CLASSES
from difflora.config.diffusion import BETA_SCHEDULES, PREDICTION_TYPES
from difflora.files.jsonfile import read_json_file

__all__ = [
    "DENOISERS",
    "SCHEDULERS",
    "PretrainedFolder",
    "expand_pretrained",
    "is_pretrained_folder",
    "read_pretrained",
]

PIPELINE_INDEX = "model_index.json"
# The pipeline components that hold the denoiser, in the order they are looked for.
DENOISERS: tuple[str, ...] = ("unet", "transformer")
# Discrete-time schedulers of the DDPM family: they all train with the same betas and target, so
# their config is the noise process whatever sampler the pipeline ships. Which grid of timesteps a
# pipeline samples on is difflora's sample.steps (its timestep_spacing is not read); the DDIM grid
# honours the scheduler's steps_offset.
SCHEDULERS: tuple[str, ...] = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
)
# The classes' default in_channels (save_pretrained writes the key; a hand-written config may not).
_DEFAULT_CHANNELS = {"UNet2DModel": 3, "UNet2DConditionModel": 4, "DiTTransformer2DModel": 4}
# diffusers' variance_type -> diffusion.sigma_small (learned_range: the model's own channels).
_VARIANCES = {"fixed_small": True, "fixed_small_log": True, "fixed_large": False, "fixed_large_log": False}


@dataclass(frozen=True)
class PretrainedFolder:
    """What a folder's JSON says: ``path`` (absolute), ``denoiser`` (the model folder holding the
    weights), its ``class_name`` and ``config``, the ``scheduler`` config (None: a model folder) and
    the pipeline's other ``components``."""

    path: Path
    denoiser: Path
    class_name: str
    config: dict[str, Any]
    scheduler: dict[str, Any] | None
    components: tuple[str, ...]


def _diffusers_config(path: Path) -> dict[str, Any] | None:
    """The diffusers config of a model folder, None when ``path`` holds none (e.g. a difflora run)."""
    if not (path / "config.json").is_file() or (path / "checkpoints").is_dir() or (path / "state.json").is_file():
        return None
    config = read_json_file(path / "config.json", fix="re-save the model with save_pretrained", error=ConfigError)
    return config if isinstance(config, dict) and "_class_name" in config else None


def is_pretrained_folder(path: str | Path) -> bool:
    """Whether ``path`` is a diffusers model or pipeline folder (not a difflora run or checkpoint)."""
    p = Path(path)
    return p.is_dir() and ((p / PIPELINE_INDEX).is_file() or _diffusers_config(p) is not None)


def _denoiser(path: Path, index: dict[str, Any]) -> str:
    names = [name for name in DENOISERS if name in index]
    if not names:
        raise ConfigError(
            f"model.pretrained: the pipeline {path} has no unet or transformer (its components: "
            f"{', '.join(k for k in index if not k.startswith('_'))}); difflora adapts the denoiser of a pipeline"
        )
    return names[0]


def read_pretrained(path: str | Path) -> PretrainedFolder:
    """The folder's description; a folder that is neither a model nor a pipeline is a one-line error."""
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise ConfigError(f"model.pretrained: {path} does not exist (give a diffusers model or pipeline folder)")
    fix = "re-save the pipeline with save_pretrained"
    if (p / PIPELINE_INDEX).is_file():
        index = read_json_file(p / PIPELINE_INDEX, fix=fix, error=ConfigError, expect=dict)
        name = _denoiser(p, index)
        denoiser = p / name
        scheduler = read_json_file(
            p / "scheduler" / "scheduler_config.json",
            fix=fix,
            error=ConfigError,
            expect=dict,
            missing=f"model.pretrained: the pipeline {p} has no scheduler/scheduler_config.json (the noise process "
            f"its denoiser was trained with); add the scheduler, or point model.pretrained at {p / name}",
        )
        components = tuple(k for k, v in index.items() if not k.startswith("_") and k != name and v)
    else:
        denoiser, scheduler, components = p, None, ()
    config = _diffusers_config(denoiser)
    if config is None:
        raise ConfigError(
            f"model.pretrained: {denoiser} is neither a diffusers model folder (config.json with _class_name) nor a "
            f"pipeline folder ({PIPELINE_INDEX}); give a folder written by save_pretrained"
        )
    return PretrainedFolder(p, denoiser, config["_class_name"], config, scheduler, components)


def _model_keys(folder: PretrainedFolder) -> dict[str, Any]:
    """The ``model.*`` keys the denoiser's config decides."""
    name, config = folder.class_name, folder.config
    if name not in DIFFUSERS_CLASSES:
        raise ConfigError(
            f"model.pretrained: {folder.denoiser} holds a {name}; difflora adapts {', '.join(DIFFUSERS_CLASSES)}"
        )
    c_in = config.get("in_channels", _DEFAULT_CHANNELS[name])
    c_out = config.get("out_channels") or c_in
    if c_out not in (c_in, 2 * c_in):
        raise ConfigError(
            f"model.pretrained: {name} has {c_in} input and {c_out} output channels; difflora reads the output as "
            "the prediction (as many channels as the input) and optionally a learned variance (as many again)"
        )
    shape_keys = ("sample_size", "in_channels", "out_channels")
    keys = {
        "model.arch": "diffusers",
        "model.diffusers.class_name": name,
        "model.diffusers.config": {k: v for k, v in config.items() if not k.startswith("_") and k not in shape_keys},
        "model.in_channels": c_in,
        "model.learn_sigma": c_out == 2 * c_in,
    }
    # A label table fixes the classes; without one, classes may still enter through adapters (ClassLoRA).
    classes = config.get("num_embeds_ada_norm" if name == "DiTTransformer2DModel" else "num_class_embeds")
    if classes:
        keys["model.num_classes"] = classes
    return keys


def _scheduler_problem(scheduler: dict[str, Any], learn_sigma: bool) -> str | None:
    name = scheduler.get("_class_name")
    if name not in SCHEDULERS:
        return f"its scheduler is a {name}; difflora reads the noise process of {', '.join(SCHEDULERS)}"
    if scheduler.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        return f"beta_schedule {scheduler['beta_schedule']!r} is not supported (supported: {', '.join(BETA_SCHEDULES)})"
    if scheduler.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        return f"prediction_type {scheduler['prediction_type']!r} is not supported (supported: {', '.join(PREDICTION_TYPES)})"
    if scheduler.get("trained_betas") is not None or scheduler.get("rescale_betas_zero_snr"):
        return "trained_betas and rescale_betas_zero_snr are not supported (a beta_schedule only)"
    if scheduler.get("thresholding") or (scheduler.get("clip_sample") and scheduler.get("clip_sample_range", 1.0) != 1):
        return "thresholding and a clip_sample_range other than 1 are not supported (clip_sample to [-1, 1] is)"
    variance = scheduler.get("variance_type") or "fixed_small"
    if variance not in _VARIANCES and not (variance == "learned_range" and learn_sigma):
        why = "its model has no variance channels" if variance == "learned_range" else "it is not supported"
        return f"variance_type {variance!r}: {why} (supported: {', '.join(_VARIANCES)}, learned_range)"
    return None


def _diffusion_keys(folder: PretrainedFolder, learn_sigma: bool) -> dict[str, Any]:
    """The ``diffusion.*`` keys of the folder: diffusers' integer timestep, and a pipeline's scheduler."""
    keys: dict[str, Any] = {"diffusion.rescale_timesteps": False}
    sched = folder.scheduler
    if sched is None:
        return keys
    if problem := _scheduler_problem(sched, learn_sigma):
        raise ConfigError(f"model.pretrained: {folder.path}/scheduler: {problem}")
    keys |= {
        "diffusion.steps": sched.get("num_train_timesteps", 1000),
        "diffusion.beta_schedule": sched.get("beta_schedule", "linear"),
        "diffusion.beta_start": sched.get("beta_start", 0.0001),
        "diffusion.beta_end": sched.get("beta_end", 0.02),
        "diffusion.prediction_type": sched.get("prediction_type", "epsilon"),
        "diffusion.steps_offset": sched.get("steps_offset", 0),
        # A scheduler without the key (PNDM, Euler, ...) does not clip.
        "diffusion.clip_denoised": bool(sched.get("clip_sample", False)),
    }
    if not learn_sigma:
        keys["diffusion.sigma_small"] = _VARIANCES[sched.get("variance_type") or "fixed_small"]
    return keys


def _component(folder: PretrainedFolder, name: str) -> dict[str, Any]:
    return read_json_file(
        folder.path / name / "config.json",
        fix="re-save the pipeline with save_pretrained",
        error=ConfigError,
        expect=dict,
        missing=f"model.pretrained: the pipeline {folder.path} lists a {name} but has no {name}/config.json; "
        "re-save the pipeline with save_pretrained",
    )


def _latent_keys(folder: PretrainedFolder) -> dict[str, Any]:
    """``model.latent.*`` from the pipeline's vae; a latent denoiser without one is refused."""
    c_in = folder.config.get("in_channels", _DEFAULT_CHANNELS[folder.class_name])
    if "vae" not in folder.components:
        if folder.scheduler is not None and c_in not in (1, 3):
            raise ConfigError(
                f"model.pretrained: the {folder.class_name} of {folder.path} takes {c_in} channels, latents of a "
                "VAE, but the pipeline has no vae; add the vae the model was trained with (save_pretrained it "
                "into the pipeline's vae/)"
            )
        return {}
    vae = _component(folder, "vae")
    if vae.get("_class_name") != "AutoencoderKL":
        raise ConfigError(
            f"model.pretrained: {folder.path}/vae holds a {vae.get('_class_name')}; difflora reads an AutoencoderKL"
        )
    channels = vae.get("latent_channels", 4)
    if channels != c_in:
        raise ConfigError(
            f"model.pretrained: the vae of {folder.path} makes {channels}-channel latents but its "
            f"{folder.class_name} takes {c_in} channels; the pipeline's parts do not fit"
        )
    blocks = vae.get("block_out_channels", [64])
    return {
        "model.latent.channels": channels,
        "model.latent.image_channels": vae.get("in_channels", 3),
        "model.latent.downsample": 2 ** (len(blocks) - 1),
    }


def _text_keys(folder: PretrainedFolder) -> dict[str, Any]:
    """``model.text.*`` from the pipeline's text encoder (which needs a tokenizer and a cross-attention UNet)."""
    if "text_encoder" not in folder.components:
        return {}
    if "tokenizer" not in folder.components:
        raise ConfigError(
            f"model.pretrained: {folder.path} has a text_encoder but no tokenizer; re-save the pipeline with both"
        )
    hidden = _component(folder, "text_encoder").get("hidden_size")
    dim = folder.config.get("cross_attention_dim")
    if folder.class_name != "UNet2DConditionModel" or hidden != dim:
        raise ConfigError(
            f"model.pretrained: the text_encoder of {folder.path} gives {hidden}-wide context but its "
            f"{folder.class_name} reads {dim if folder.class_name == 'UNet2DConditionModel' else 'no'} context; "
            "a text pipeline needs a UNet2DConditionModel with cross_attention_dim equal to the encoder's hidden_size"
        )
    return {"model.text.hidden": hidden}


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
    node[last] = value


def _folder_of(tree: dict[str, Any]) -> str | None:
    """``model.pretrained``, else a ``train.init_from`` that is a diffusers folder."""
    given = _get(tree, "model.pretrained")
    if given is not None:
        return str(given)
    init = _get(tree, "train.init_from")
    return str(init) if isinstance(init, str) and is_pretrained_folder(init) else None


def expand_pretrained(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` (a config mapping, changed in place) with the keys its pretrained folder decides.

    A key the tree restates with another value is a ConfigError naming both; ``model.image_size``
    defaults to the model's ``sample_size`` (give ``data.image_size`` to train at another size the
    model can take).
    """
    given = _folder_of(tree)
    if given is None:
        return tree
    folder = read_pretrained(given)
    keys = {"model.pretrained": str(folder.path)} | _model_keys(folder) | _latent_keys(folder) | _text_keys(folder)
    keys |= _diffusion_keys(folder, keys["model.learn_sigma"])
    if _get(tree, "train.init_from") is None or _get(tree, "train.init_from") == given:
        keys["train.init_from"] = str(folder.path)
    for dotted, value in keys.items():
        have = _get(tree, dotted)
        if have is not None and have != value and dotted not in ("model.pretrained", "train.init_from"):
            raise ConfigError(
                f"{dotted}={have!r} contradicts the pretrained folder {folder.path}, which gives {value!r}; "
                f"remove {dotted} (the folder decides it)"
            )
        _put(tree, dotted, value)
    size = folder.config.get("sample_size")
    if isinstance(size, int) and _get(tree, "model.image_size") is None and _get(tree, "data.image_size") is None:
        # A latent model's sample_size counts latents: the data's images are downsample times larger.
        factor = keys.get("model.latent.downsample")
        _put(tree, *(("data.image_size", size * factor) if factor else ("model.image_size", size)))
    return tree
