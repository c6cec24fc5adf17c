"""Training throughput at scale options: bf16, channels-last and torch.compile against fp32 eager,
and P5: difflora's IDDPM U-Net against improved-diffusion's own ``UNetModel`` at the CIFAR config.

A step is what the training loop does: q-sample, forward, hybrid loss, backward, AdamW, EMA, on a
random batch of the dataset's shape. All variants live in one process and are timed in
alternation: each round runs every variant for a few steps and keeps its fastest step; the table
gives the fastest round and the spread of the rounds (slowest / fastest - 1). A step is timed in
CPU seconds of this process (one thread: its compute), not wall seconds: on a machine shared with
other jobs the wall clock measures the scheduler's share more than the step. Run it on one thread:

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --improved-diffusion DIR [--compile]

DIR is a checkout of openai/improved-diffusion (the directory holding ``improved_diffusion/``);
its model is imported from there as it is, nothing of it is part of difflora. Without it the P5
rows of improved-diffusion are left out. Results go to ``benchmarks/results/scale.json``.

Each P5 option's contribution is a row of its own against ``difflora fp32`` (its attention kernel
chosen per device and dtype by ``difflora.nets.layers.dot_product_attention``, channels-first,
fp32, eager): ``plain SDPA`` calls ``scaled_dot_product_attention`` on the head split's strided
views whatever the dtype (difflora's attention before the choice), so its ratio is what the choice
gives; ``channels-last``, ``bf16`` and ``compiled`` each change one thing. A compiled variant warms up
for two steps (compilation, then any recompilation) before it is timed. ``--skip NAME`` leaves
out every variant whose name contains NAME (to bound the run time on a busy machine).

``difflora auto`` is ``train.precision: auto``: bf16 autocast where the CPU (or GPU) computes bf16
natively (``avx512_bf16`` / ``amx_bf16``; difflora.train.precision), fp32 elsewhere; on a CPU
without them bf16 is emulated and several times slower (the digits table). ``improved-diffusion
bf16`` is its model under the same autocast: what the precision gives either code. The whole P5
measurement runs ``--repeats`` times; the ratio of each repeat's fastest steps is reported as the
median and range over the repeats. ``--device cuda`` runs every variant on the GPU (wall seconds
between synchronisations, benchmarks/devices.py). The run prints the machine: device, threads,
the CPU flags that decide the kernels, and the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from devices import add_device_argument, clock, machine, machine_line  # noqa: E402

from difflora.cli.commands import resolve_config_path  # noqa: E402
from difflora.config.schema import load_config  # noqa: E402
from difflora.model.build import build_diffusion, build_model  # noqa: E402
from difflora.nets import unet  # noqa: E402
from difflora.train.ema import EMA  # noqa: E402
from difflora.train.precision import autocast, resolve_precision  # noqa: E402


@dataclass
class Trainer:
    """One model with its diffusion, optimizer and EMA; ``step`` runs one training step."""

    model: torch.nn.Module
    diffusion: object
    x: torch.Tensor  # on the model's device
    callables: dict[bool, torch.nn.Module] = field(default_factory=dict)
    plain_sdpa: bool = False

    def __post_init__(self) -> None:
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.ema = EMA(self.model, 0.9999)
        self.callables[False] = self.model

    def step(self, precision: str, compiled: bool) -> None:
        if compiled and True not in self.callables:
            self.callables[True] = torch.compile(self.model)
        t = torch.randint(self.diffusion.num_timesteps, (self.x.shape[0],), device=self.x.device)
        swap = plain_sdpa() if self.plain_sdpa else contextlib.nullcontext()
        with autocast(precision, self.x.device), swap:
            loss = self.diffusion.training_losses(self.callables[compiled], self.x, t, {})["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.ema.update(self.model)


@contextlib.contextmanager
def plain_sdpa():
    """The U-Net's attention as ``scaled_dot_product_attention`` on its inputs as they come, whatever
    the device and dtype, for the duration of the block."""
    with mock.patch.object(unet, "dot_product_attention", torch.nn.functional.scaled_dot_product_attention):
        yield


def difflora_trainer(config: str, batch: int, device: torch.device, channels_last: bool = False) -> Trainer:
    torch.manual_seed(0)
    cfg = load_config(resolve_config_path(config), ["model.num_classes=0"])
    model = build_model(cfg).train().to(device)
    m = cfg.model
    x = torch.randn(batch, m.in_channels, m.image_size, m.image_size, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return Trainer(model, build_diffusion(cfg), x)


def improved_diffusion_trainer(root: Path, batch: int, device: torch.device) -> Trainer:
    """improved-diffusion's model and diffusion with the flags of configs/paper/iddpm-cifar10.yaml."""
    sys.path.insert(0, str(root))
    from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    torch.manual_seed(0)
    flags = model_and_diffusion_defaults()
    flags.update(
        image_size=32,
        num_channels=128,
        num_res_blocks=3,
        learn_sigma=True,
        dropout=0.3,
        diffusion_steps=4000,
        noise_schedule="cosine",
    )
    model, diffusion = create_model_and_diffusion(**flags)
    return Trainer(model.train().to(device), diffusion, torch.randn(batch, 3, 32, 32, device=device))


def measure(variants: dict[str, tuple], rounds: int, steps: int, log) -> dict[str, dict]:
    """variants: name -> (trainer, precision, compiled). Warm-up (and compilation) first, then
    ``rounds`` alternated rounds of ``steps`` steps; per variant the fastest step of each round."""
    for name, (trainer, precision, compiled) in variants.items():
        device = trainer.x.device
        for _ in range(2 if compiled else 1):
            t0 = clock(device)
            trainer.step(precision, compiled)
            log(f"  warm-up {name}: {clock(device) - t0:.1f} s")
    best: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, (trainer, precision, compiled) in variants.items():
            times = []
            for _ in range(steps):
                t0 = clock(trainer.x.device)
                trainer.step(precision, compiled)
                times.append(clock(trainer.x.device) - t0)
            best[name].append(min(times))
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {best[n][-1] * 1000:.0f} ms" for n in variants))
    out = {}
    for name, (trainer, _, _) in variants.items():
        fastest = min(best[name])
        out[name] = {
            "step_ms": fastest * 1000,
            "images_per_s": trainer.x.shape[0] / fastest,
            "spread": max(best[name]) / fastest - 1,
            "rounds_ms": [b * 1000 for b in best[name]],
        }
    return out


def table(title: str, rows: dict[str, dict], reference: str) -> str:
    ref = rows[reference]["step_ms"]
    lines = [
        title,
        f"| variant | ms/step | images/s | throughput vs {reference} | spread of rounds |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['step_ms']:.0f} | {r['images_per_s']:.2f} | {ref / r['step_ms']:.2f}x | {r['spread'] * 100:.0f}% |"
        )
    return "\n".join(lines)


def _variants(
    trainers: dict[str, Trainer], options: list[tuple[str, str, str, bool]], skip: list[str]
) -> dict[str, tuple]:
    return {
        name: (trainers[key], precision, compiled)
        for name, key, precision, compiled in options
        if not any(s in name for s in skip)
    }


def ratios(repeats: list[dict[str, dict]], reference: str) -> dict[str, dict]:
    """Per variant: the throughput ratio to ``reference`` of each repeat's fastest steps, and its
    median and range over the repeats."""
    out = {}
    for name in repeats[0]:
        r = [rows[reference]["step_ms"] / rows[name]["step_ms"] for rows in repeats]
        out[name] = {"median": statistics.median(r), "range": [min(r), max(r)], "ratios": r}
    return out


def _digits(args: argparse.Namespace, result: dict, log) -> None:
    log("digits preset, batch 64: bf16 and compile against fp32 eager")
    tr = {"digits": difflora_trainer("digits", 64, args.device)}
    opts = [("fp32 eager", "digits", "fp32", False), ("bf16 eager", "digits", "bf16", False)]
    opts += [(f"{p} compiled", "digits", p, True) for p in ("fp32", "bf16") if args.compile]
    result["digits"] = measure(_variants(tr, opts, args.skip), args.rounds, 3, log)
    result["digits_run"] = {"rounds": args.rounds, "skipped": args.skip, "steps_per_round": 3}
    log(table("digits (1,081,730 parameters), batch 64", result["digits"], "fp32 eager"))


def _p5(args: argparse.Namespace, result: dict, log) -> None:
    log("P5: the CIFAR-10 U-Net (52,546,438 parameters), batch 4")
    device, cifar = args.device, "paper/iddpm-cifar10"
    auto = resolve_precision("auto", device)
    tr = {"d": difflora_trainer(cifar, 4, device), "cl": difflora_trainer(cifar, 4, device, True)}
    opts = []
    if args.improved_diffusion is not None:
        tr["id"] = improved_diffusion_trainer(args.improved_diffusion, 4, device)
        opts += [("improved-diffusion fp32", "id", "fp32", False), ("improved-diffusion bf16", "id", "bf16", False)]
    tr["sdpa"] = difflora_trainer(cifar, 4, device)
    tr["sdpa"].plain_sdpa = True
    opts += [
        ("difflora fp32", "d", "fp32", False),
        (f"difflora auto ({auto})", "d", auto, False),
        ("difflora fp32 plain SDPA", "sdpa", "fp32", False),
        ("difflora fp32 channels-last", "cl", "fp32", False),
        *([("difflora bf16", "d", "bf16", False)] if auto != "bf16" else []),  # else it is the auto row
        ("difflora bf16 plain SDPA", "sdpa", "bf16", False),
        ("difflora bf16 channels-last", "cl", "bf16", False),
    ]
    opts += [("difflora fp32 compiled", "d", "fp32", True)] if args.p5_compile else []
    opts += [("difflora bf16 compiled", "d", "bf16", True)] if args.p5_compile_bf16 else []
    ref = "improved-diffusion fp32" if args.improved_diffusion is not None else "difflora fp32"
    variants = _variants(tr, opts, args.skip)
    repeats = []
    for r in range(args.repeats):
        log(f" repeat {r + 1}/{args.repeats}")
        repeats.append(measure(variants, args.rounds, 1, log))
        log(table(f"P5: CIFAR-10 U-Net, batch 4, repeat {r + 1}", repeats[-1], ref))
    result["p5"] = {name: min((rows[name] for rows in repeats), key=lambda v: v["step_ms"]) for name in variants}
    result["p5_ratios"] = ratios(repeats, ref)
    result["p5_run"] = {"rounds": args.rounds, "repeats": args.repeats, "skipped": args.skip, "steps_per_round": 1}
    log(f"P5: throughput against {ref}, median [range] over {args.repeats} repeats")
    for name, q in result["p5_ratios"].items():
        log(f"  {name}: {q['median']:.2f}x [{q['range'][0]:.2f}, {q['range'][1]:.2f}]")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--improved-diffusion", type=Path, default=None, help="checkout of openai/improved-diffusion")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compilation)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="P5: whole measurements, for the ratios' median and range")
    ap.add_argument("--only", choices=["digits", "p5"], default=None)
    ap.add_argument("--p5-compile", action="store_true", help="compile the CIFAR U-Net too, fp32 (long)")
    ap.add_argument("--p5-compile-bf16", action="store_true", help="and bf16 compiled (long; slow without AVX512-BF16)")
    ap.add_argument("--skip", action="append", default=[], help="leave out variants whose name contains this")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    add_device_argument(ap)
    args = ap.parse_args()
    log = lambda s: print(s, flush=True)  # noqa: E731
    result: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__, "machine": machine(args.device)}
    log(machine_line(result["machine"]))
    if args.only in (None, "digits"):
        _digits(args, result, log)
    if args.only in (None, "p5"):
        _p5(args, result, log)
    result["machine_after"] = machine(args.device)  # the load average at the end of the run
    log(machine_line(result["machine_after"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        result = json.loads(args.out.read_text()) | result  # --only keeps the other part
    args.out.write_text(json.dumps(result, indent=2))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
