"""What a user typed, checked: the command line's validation, shared by every ``difflora`` command.

Each check raises :class:`CLIError` with one line that names the flag, key or file and the fix;
``difflora.cli.commands.main`` prints it as ``error: ...`` with exit code 2. Flags share the config's
rules (``sample_settings`` validates them with :class:`~difflora.config.schema.SampleConfig`), numbers
must be finite, devices must exist here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from difflora.cli.parser import CLIError, finite_float, one_line
from difflora.config.schema import Config, ConfigError, SampleConfig
from difflora.data.spatial import heldout_conditions
from difflora.files.tensorfile import check_finite
from difflora.model.expand import adapter_entries
from difflora.train import resolve_device
from difflora.train.run_dir import RESTORE_CONFIG, load_run_config

__all__ = [
    "check_device",
    "parse_conditions",
    "refuse_inapplicable",
    "run_config",
    "sample_settings",
    "spatial_inputs",
]


def check_device(name: str, key: str) -> torch.device:
    """``--device`` / ``train.device`` as a torch.device, or a CLIError naming ``key`` and the choices."""
    choices = "auto, cpu, cuda, cuda:N or mps"
    if name != "auto":
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            raise CLIError(f"{key}: {name!r} is not a device; use {choices}") from None
        if dev.type not in ("cpu", "cuda", "mps"):
            raise CLIError(f"{key}: {name!r} cannot run a model; use {choices}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise CLIError(f"{key}={name}: CUDA is not available here; use cpu or auto")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"{key}={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise CLIError(f"{key}={name}: MPS is not available here; use cpu or auto")
    return resolve_device(name)


def refuse_inapplicable(flags: dict[str, tuple[object, str | None]]) -> None:
    """The one rule for flags that cannot act on this run: ``flags`` maps a flag to (its value, why it
    does not apply here, or None when it does); a flag that was given (not None, not False) and does
    not apply is refused naming it and why, never ignored."""
    for flag, (value, why) in flags.items():
        if value is not None and value is not False and why is not None:
            raise CLIError(f"{flag} does not apply here: {why}; remove it")


def run_config(run_dir: str | Path) -> Config:
    """The saved config of a run, with errors that name ``RUN_DIR/config.json`` and the way out."""
    path = Path(run_dir) / "config.json"
    if Path(run_dir).is_dir() and not path.is_file():
        raise CLIError(f"{run_dir} is not a difflora run directory: {path} is missing")
    try:
        return load_run_config(run_dir)
    except ConfigError as exc:
        raise CLIError(f"{path}: {one_line(str(exc))}; {RESTORE_CONFIG}") from None
    except ValueError as exc:  # not valid JSON; the message names the file and the repair
        raise CLIError(str(exc)) from None


def sample_settings(cfg: Config, **flags: object) -> SampleConfig:
    """``cfg.sample`` with the given flags applied, validated by the same rules as the config keys
    (``--guidance -2`` fails exactly as ``sample.guidance=-2`` does)."""
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return cfg.sample.with_changes(given)
    except ValidationError as err:
        e = err.errors()[0]
        if not e["loc"]:  # a rule between keys (e.g. no eta for ddpm): its message names them
            raise CLIError(f"{e['msg'].removeprefix('Value error, ')} (the flag of the same name sets it)") from None
        key = str(e["loc"][0])
        msg = e["msg"][0].lower() + e["msg"][1:]
        raise CLIError(f"--{key}: {msg}, got {e.get('input')!r} (the rule of sample.{key})") from None


def parse_conditions(
    texts: list[str] | None, num: int, cfg: Config, set_by: dict[str, str] | None = None
) -> dict[str, float | list[float]]:
    """``--condition task=2`` / ``task=0,1,2`` (one value, or one per sample) -> name -> values,
    checked against the conditions the run's adapters read and the values their weightings take.
    ``set_by``: conditions another flag sets (name -> that flag), besides t and y (the sampler's)."""
    set_by = {"t": "the sampler", "y": "the sampler (use --class)", **(set_by or {})}
    adapters = adapter_entries(cfg)
    read = {a.condition: a for a in adapters if a.condition not in set_by}
    out: dict[str, list[float]] = {}
    for text in texts or []:
        name, eq, raw = text.partition("=")
        name = name.strip()
        if not eq or not name.isidentifier():
            raise CLIError(f"--condition {text!r}: expected NAME=VALUE[,VALUE...] with NAME an identifier, e.g. task=2")
        if name in set_by:
            raise CLIError(f"--condition {name}: set by {set_by[name]}")
        if name not in read:
            have = f"conditions it reads: {', '.join(sorted(read))}" if read else "it reads no condition but t and y"
            raise CLIError(f"--condition {name}: no adapter of this run reads it ({have}); remove it")
        try:
            values = [finite_float(v.strip()) for v in raw.split(",")]
        except argparse.ArgumentTypeError as exc:
            raise CLIError(f"--condition {name}: {exc}") from None
        if len(values) not in (1, num):
            raise CLIError(f"--condition {name}: give one value or --num ({num}) values, got {len(values)}")
        a = read[name]
        if a.weighting != "linear" and any(v != int(v) or not -1 <= v < a.num_values for v in values):
            raise CLIError(
                f"--condition {name}: adapter {a.name} takes integers -1..{a.num_values - 1} (-1 = no update), got {raw}"
            )
        out[name] = values if len(values) == num else values[0]
    missing = sorted(set(read) - set(out))
    if missing:
        raise CLIError(
            f"this run's adapters read condition(s) {', '.join(missing)}: pass --condition {missing[0]}=VALUE"
        )
    return out


def _condition_images(path: str, num: int) -> torch.Tensor:
    """Clean images [num x C x H x W] from ``--condition-images FILE.safetensors`` (tensor ``images``)."""
    if not path.endswith(".safetensors") or not Path(path).is_file():
        raise CLIError(f"--condition-images {path}: give an existing .safetensors file holding a tensor 'images'")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CLIError(f"--condition-images {path}: not a readable safetensors file ({exc})") from None
    check_finite(tensors, f"--condition-images {path}", "give finite pixel values", CLIError)
    images = tensors.get("images")
    if images is None or images.ndim != 4 or len(images) < num:
        got = "no tensor 'images'" if images is None else f"'images' of shape {tuple(images.shape)}"
        raise CLIError(f"--condition-images {path}: needs 'images' [N x C x H x W] with N >= --num ({num}), has {got}")
    return images[:num].float()


def spatial_inputs(
    texts: list[str] | None, num: int, cfg: Config, images_path: str | None
) -> tuple[dict[str, float | list[float]], torch.Tensor]:
    """A run with spatial tasks (``data.spatial``): (the conditions, with ``task``, and the condition
    images [num x C_s x H x W]) for ``--condition task=K`` (one id or one per sample). The images
    come from ``--condition-images`` or the held-out split (:func:`difflora.data.spatial.heldout_conditions`)."""
    texts = list(texts or [])
    task_texts = [t for t in texts if t.partition("=")[0].strip() == "task"]
    if len(task_texts) != 1:
        names = ", ".join(f"{(cfg.data.task_id or 0) + k}={t}" for k, t in enumerate(cfg.data.spatial.tasks))
        raise CLIError(f"this run has spatial tasks ({names}): pass --condition task=K once")
    reads_task = any(a.condition == "task" for a in adapter_entries(cfg))
    conditions = parse_conditions(texts if reads_task else [t for t in texts if t not in task_texts], num, cfg)
    try:
        values = [int(finite_float(v.strip())) for v in task_texts[0].partition("=")[2].split(",")]
    except argparse.ArgumentTypeError as exc:
        raise CLIError(f"--condition task: {exc}") from None
    if len(values) not in (1, num):
        raise CLIError(f"--condition task: give one value or --num ({num}) values, got {len(values)}")
    task = torch.tensor(values, dtype=torch.long).expand(num)
    images = _condition_images(images_path, num) if images_path else None
    try:
        spatial, _ = heldout_conditions(cfg.data, task, images)
    except ValueError as exc:
        raise CLIError(f"--condition task: {exc}") from None
    return {**conditions, "task": task.tolist()}, spatial
