"""Commands that load a trained run: sample, export (and export-peft, its deprecated name for peft)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from difflora.adapters.peft_format import export_peft
from difflora.cli.inputs import (
    check_device,
    parse_conditions,
    refuse_inapplicable,
    run_config,
    sample_settings,
    spatial_inputs,
)
from difflora.cli.parser import CLIError
from difflora.config.schema import DISTILL_ADAPTER
from difflora.distill.command import sampling_guidance, without_student
from difflora.files.atomic import write_together
from difflora.files.images import check_image_dir, grid_png, save_image_dir, save_npz
from difflora.files.tensorfile import tensor_bytes
from difflora.model.export import export_model, writes_pipeline
from difflora.sampling.generate import default_labels, generate
from difflora.train.checkpoint import load_base_tensors
from difflora.train.footprint import check_memory
from difflora.train.pipeline_data import text_inputs
from difflora.train.run_loader import open_run


def _open_run(run_dir: str, weights: str, checkpoint: str | None = None):
    run_config(run_dir)  # a missing or damaged config.json: the CLI's one-line errors
    return open_run(run_dir, weights, checkpoint)


def _check_outputs(args) -> None:
    """Every output is checked before anything is sampled."""
    if args.out is None and args.out_dir is None and args.npz is None:
        raise CLIError(
            "sample writes nothing: give --out FILE.png (a grid), --out-dir DIR (one PNG each) or --npz FILE"
        )
    if args.out is not None and not args.out.lower().endswith(".png"):
        raise CLIError(f"--out must name a .png file, got {args.out}")
    if args.out is not None and Path(args.out).is_dir():
        raise CLIError(f"--out {args.out} is a directory; name a .png file")
    if args.save_tensor is not None and not args.save_tensor.endswith(".safetensors"):
        raise CLIError(f"--save-tensor must name a .safetensors file, got {args.save_tensor}")
    if args.npz is not None and not args.npz.endswith(".npz"):
        raise CLIError(f"--npz must name a .npz file, got {args.npz}")
    if args.npz is not None and Path(args.npz).is_dir():
        raise CLIError(f"--npz {args.npz} is a directory; name a .npz file")
    if args.out_dir is not None:
        check_image_dir(args.out_dir, args.overwrite)


def _write_outputs(args, images, labels, spatial, nrow: int | None) -> list[str]:
    """Write every output asked for; returns where each went."""
    written = []
    outputs: dict[Path, bytes] = {}
    if args.out is not None:
        outputs[Path(args.out)] = grid_png(images, nrow)
    if args.save_tensor:
        tensors = {"images": images.contiguous(), **({"labels": labels} if labels is not None else {})}
        tensors |= {"spatial": spatial.contiguous()} if spatial is not None else {}
        outputs[Path(args.save_tensor)] = tensor_bytes(tensors)
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
    write_together(outputs)  # the grid and its tensors both, or neither: never one without the other
    written = [str(p) for p in outputs if p != Path(args.save_tensor or "")]
    if args.out_dir is not None:
        written.append(f"{save_image_dir(images, args.out_dir, overwrite=args.overwrite)}/ (one PNG each)")
    if args.npz is not None:
        written.append(str(save_npz(images, args.npz, labels)))
    return written


def sample_command(args) -> int:
    _check_outputs(args)
    device = check_device(args.device, "--device")
    cfg = run_config(args.run_dir)  # a missing or damaged config.json: the CLI's one-line errors
    s = sample_settings(
        cfg,
        num=args.num,
        steps=args.steps,
        sampler=args.sampler,
        eta=args.eta,
        guidance=args.guidance,
        guidance_fraction=args.guidance_fraction,
    )
    unguided = s.guidance == 1 and not cfg.distilled  # a distilled run's teacher guides at distill.guidance
    refuse_inapplicable(
        {
            "--guidance-fraction": (
                args.guidance_fraction,
                "guidance is 1 (no guided steps to select)" if unguided else None,
            ),
            "--condition-images": (
                args.condition_images,
                None if cfg.data.spatial else "the run has no spatial tasks (data.spatial)",
            ),
        }
    )
    # What the draw will hold is checked before the run's weights are read.
    check_memory(cfg, device, f"sample --num {s.num}", samples=s.num, guided=s.guidance != 1)
    cfg, model, meta = open_run(args.run_dir, args.weights, args.checkpoint)
    spatial = None
    if cfg.data.spatial is not None:  # spatial tasks: --condition task=K picks the condition images
        conditions, spatial = spatial_inputs(args.condition, args.num, cfg, args.condition_images)
    else:
        student = {
            a.condition: "--guidance (the student's scale)" for a in cfg.model.adapters if a.name == DISTILL_ADAPTER
        }
        conditions = parse_conditions(args.condition, args.num, without_student(cfg), set_by=student)
    labels = default_labels(cfg, args.num, args.cls)
    if args.teacher and not cfg.distilled:
        raise CLIError(f"--teacher samples the guided teacher of a distilled run; {args.run_dir} is not one")
    if cfg.distilled:
        w = sampling_guidance(model, cfg, args.guidance, args.guidance_fraction, args.teacher)
        s = s.model_copy(update={"guidance": w})
    text = (
        text_inputs(cfg, _prompts(args), args.num) if cfg.model.text is not None or args.prompt or args.prompts else {}
    )
    model.to(device)
    images = generate(
        model,
        cfg,
        s,
        labels=labels,
        conditions=conditions,
        spatial=spatial,
        seed=args.seed,
        device=device,
        progress=not args.no_progress,
        teacher=args.teacher,
        **text,
    )
    nrow = cfg.model.num_classes if (labels is not None and args.cls is None) else None
    written = _write_outputs(args, images, labels, spatial, nrow)
    print(f"wrote {args.num} samples (step {meta['step']}, {args.weights} weights) to {' and '.join(written)}")
    return 0


def _prompts(args) -> list[str] | None:
    """--prompt texts, then the lines of --prompts FILE (blank lines skipped); None when neither is given."""
    prompts = list(args.prompt or [])
    if args.prompts:
        try:
            prompts += [
                line.strip() for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()
            ]
        except (OSError, UnicodeDecodeError) as exc:
            raise CLIError(
                f"--prompts {args.prompts}: cannot read it ({exc}); give a UTF-8 text file, one prompt per line"
            ) from None
    return prompts or None


def _fixed_conditions(texts: list[str] | None) -> dict[str, int | float]:
    """``--condition t=500`` (one value each) -> {name: value}: an integer where the text is one, else a float."""
    values: dict[str, int | float] = {}
    for text in texts or []:
        name, sep, raw = text.partition("=")
        if not sep or not name.isidentifier() or name in values:
            raise CLIError(f"--condition {text!r}: expected NAME=VALUE once per condition, e.g. t=500")
        try:
            value = float(raw)
        except ValueError:
            raise CLIError(f"--condition {text!r}: {raw!r} is not a number (nan: no update)") from None
        if math.isinf(value):
            raise CLIError(f"--condition {text!r}: expected a finite number or nan")
        values[name] = int(value) if value.is_integer() and "." not in raw and "e" not in raw.lower() else value
    return values


def export_command(args) -> int:
    values = _fixed_conditions(args.condition)
    cfg, model, meta = _open_run(args.run_dir, args.weights, args.checkpoint)
    if writes_pipeline(cfg, args.to) and (base := meta.get("base")) and not base["keys"]:
        # The checkpoint holds every weight, so loading did not read the base: check it before copying its pipeline.
        load_base_tensors(base, keep=False)
    out = export_model(model, cfg, args.to, args.out_dir, values, overwrite=args.overwrite)
    at = ", ".join(f"{k}={v}" for k, v in values.items()) or "no conditions"
    print(f"wrote {args.to} export at {at} to {out}")
    return 0


def export_peft_command(args) -> int:
    warnings.warn("export-peft is deprecated: use `difflora export RUN --to peft OUT --condition NAME=0`", stacklevel=1)
    cfg, model, _ = _open_run(args.run_dir, args.weights, args.checkpoint)
    # peft wraps the backbone: the diffusers model itself for model.arch=diffusers.
    root = model.net.model if cfg.model.arch == "diffusers" else model.net
    out = export_peft(root, args.out_dir, args.adapter)
    base = f"the diffusers {cfg.model.diffusers.class_name}" if cfg.model.arch == "diffusers" else "the run's net"
    print(f"wrote a peft LoRA to {out} (adapter_config.json, adapter_model.safetensors); load it onto {base}")
    return 0
