"""Distilling classifier-free guidance into a LoRA (003): 003's Table 1 (peak training memory) at
our scale, P4 (the fused student's sampling speed against the guided teacher) at three image
sizes, and the shared-forward vs two-call speed of the distillation step.

Memory settings, each in a fresh subprocess reporting its peak resident set size (``ru_maxrss``),
on the paper CIFAR U-Net (configs/paper/iddpm-cifar10-class.yaml, 52.5M parameters, batch 2) and
on the small digits config (configs/digits.yaml, batch 64). 003's four rows:

* ``baseline``: the whole network fine-tuned with the ordinary diffusion loss (no distillation);
* ``usual distill`` (+ distillation): difflora's fully fine-tuned student (``train.train_base``)
  with its separate frozen teacher copy (003's "distillation without LoRA");
* ``lora`` (+ LoRA): the distillation LoRA's targets and rank on the frozen W0, the diffusion loss;
* ``lora distill`` (+ distillation + LoRA): 003's setup, one module, W0 frozen, the LoRA trained,
  the teacher = the same module with the LoRA off;

and ``load`` (building W0 + LoRA, no training: the floor), ``sample teacher`` / ``sample student``
(DDIM sampling, guided teacher 2N per step / student fused into W0, N per step). Every training row
runs the same steps on the same random batch of the config's shape (weight values do not change
memory) with AdamW and an EMA over its trainable weights.

P4 (``sample_speed``): CPU seconds per image of the guided teacher (the plain base network, CFG at
w = 3, a forward of 2N per step) and the fused student (the same weights + LoRA fused, N per step),
timed in alternation, fastest run of each, ratio repeated (median and range); digits 8 px, the
Fashion-MNIST base architecture 16 px and the CIFAR U-Net 32 px, random weights and no dataset.
Distillation step (digits): CPU seconds per step with ``distill.shared_forward`` true (one forward
of 3N) and false (2N no-grad + N).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_distill.py   # writes benchmarks/results/distill.json
    ... --parts memory | --parts speed                                # one part; the other's entries are kept
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from devices import add_device_argument, clock, machine, machine_line

from difflora.model.accounting import peak_memory_mb
from difflora.presets import CONFIGS_DIR

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "cifar": (CONFIGS_DIR / "paper" / "iddpm-cifar10-class.yaml", 2),
    "digits": (CONFIGS_DIR / "digits.yaml", 64),
}
MEMORY = ["load", "baseline", "usual distill", "lora", "lora distill", "sample teacher", "sample student"]
# 003's Table 1 (Stable Diffusion, GB): its four rows and the settings here that stand for them.
PAPER_TABLE1 = {"baseline": 21.0, "usual distill": 24.4, "lora": 9.6, "lora distill": 10.3}
# Training steps per memory setting: the first creates the optimizer state (the peak); the second is timed.
STEPS = 2


def _cfg(name: str, *extra: str):
    from difflora.config.schema import load_config

    path, batch = CONFIGS[name]
    # init_from names the teacher the loop would load; here the weights stay random (memory only).
    over = ["train.objective=distill", "train.train_base=false", "train.init_from=teacher", "distill.guidance=3"]
    return load_config(path, [f"train.batch_size={batch}", "sample.steps=4", *over, *extra])


def _plain_cfg(name: str, *extra: str):
    """The config without distillation: the ordinary diffusion loss, nothing to load."""
    return _cfg(name, "train.objective=diffusion", "train.init_from=null", *extra)


def _data(cfg, generator, device):
    """A random batch of the config's shape, drawn on the CPU (the same on every device), on ``device``."""
    import torch

    from difflora.train.objectives import Batch

    m, n = cfg.model, cfg.train.batch_size
    x = torch.rand(n, m.in_channels, m.image_size, m.image_size, generator=generator) * 2 - 1
    y = torch.randint(0, m.num_classes, (n,), generator=generator)
    return Batch(x.to(device), {"y": y.to(device)})


def _lora_setup(cfg, device):
    """003: one module; the objective's teacher is the same module with the LoRA off."""
    import torch

    from difflora.distill.objective import DistillObjective
    from difflora.model.build import build_diffusion, build_model
    from difflora.train.ema import EMA

    model = build_model(cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, DistillObjective(cfg, build_diffusion(cfg)), torch.optim.AdamW(params, lr=1e-4), EMA(model), params


def _usual_setup(name: str, device):
    """003's "+ distillation": difflora's fully fine-tuned student (``train.train_base``) guided by
    its separate frozen teacher copy, the same objective and target (w = 3) as the LoRA setting."""
    import torch

    from difflora.distill.objective import DistillObjective
    from difflora.model.build import build_diffusion, build_model
    from difflora.train.ema import EMA

    plain = _plain_cfg(name, "train.train_base=true")
    student = build_model(plain).to(device)
    objective = DistillObjective(_cfg(name), build_diffusion(plain))
    # The copy train_base loads from the teacher run (distill.frozen_teacher); here the random weights.
    objective.teacher_copy = copy.deepcopy(student).eval().requires_grad_(False)
    params = list(student.parameters())
    return student, objective, torch.optim.AdamW(params, lr=1e-4), EMA(student), params


def _diffusion_setup(cfg, device):
    """003's rows without distillation: the ordinary diffusion loss on the model of ``cfg``, with the
    same optimizer and EMA over its trainable weights as the distillation rows."""
    import torch

    from difflora.model.build import build_diffusion, build_model
    from difflora.train.ema import EMA
    from difflora.train.objectives import build_objective

    model = build_model(cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    objective = build_objective(cfg, build_diffusion(cfg))
    return model, objective, torch.optim.AdamW(params, lr=1e-4), EMA(model), params


def _baseline_setup(name: str, device):
    """003's "baseline": the whole network fine-tuned with the diffusion loss (one copy, all trained)."""
    return _diffusion_setup(_plain_cfg(name, "train.train_base=true"), device)


def _plain_lora_setup(name: str, device):
    """003's "+ LoRA": the distillation LoRA's targets and rank on the frozen W0, shared by every
    sample (no on/off condition), trained with the diffusion loss."""
    arch = _cfg(name).model.arch
    lora = _cfg(name).distill.adapter(arch).model_dump(mode="json")
    lora.update(name="lora", condition="t", weighting="shared", num_values=1)
    return _diffusion_setup(_plain_cfg(name, "train.train_base=false", f"model.adapters=[{json.dumps(lora)}]"), device)


def _train(setup, cfg, steps: int, device) -> list[float]:
    """Run ``steps`` training steps; returns the seconds of each (CPU seconds on a CPU, one thread)."""
    import torch

    model, objective, optim, ema, _ = setup
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        batch = _data(cfg, g, device)
        t0 = clock(device)
        loss = objective(model, batch, g, device)["loss"].mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        ema.update(model)
        times.append(clock(device) - t0)
    return times


def _sample(cfg, student: bool, device) -> None:
    import torch

    from difflora.distill.student import fuse_student
    from difflora.model.build import build_model
    from difflora.sampling.generate import generate, sampling_settings

    model = build_model(cfg).to(device)
    n = cfg.train.batch_size
    if student:
        fuse_student(model, cfg)
    labels = torch.arange(n) % cfg.model.num_classes
    settings = sampling_settings(cfg, num=n, steps=cfg.sample.steps)
    generate(model, cfg, settings, labels=labels, teacher=not student, device=device)


def run_one(setting: str, name: str, device) -> dict:
    """One memory setting in this process (called in a fresh subprocess)."""
    import torch

    from difflora.model.accounting import parameter_counts

    torch.manual_seed(0)
    cfg = _cfg(name)
    t0 = time.perf_counter()
    row: dict = {"setting": setting, "config": name, "batch": cfg.train.batch_size}
    trained = {
        "baseline": lambda: _baseline_setup(name, device),
        "usual distill": lambda: _usual_setup(name, device),
        "lora": lambda: _plain_lora_setup(name, device),
        "lora distill": lambda: _lora_setup(cfg, device),
    }
    setup = None
    if setting == "load":
        setup = _lora_setup(cfg, device)
    elif setting in trained:
        setup = trained[setting]()
        # The same random batch (config shape and size) for every row.
        row["step_s"] = statistics.median(_train(setup, cfg, STEPS, device)[1:])
        if setting == "usual distill":
            row["teacher_params"] = parameter_counts(setup[1].teacher_copy)["total"]
    else:
        _sample(cfg, setting == "sample student", device)
    if setup is not None:
        counts = parameter_counts(setup[0])
        row.update(params=counts["total"], trainable=counts["trainable"])
    # Peak resident set size on a CPU; on CUDA the allocator's peak (the memory the device held).
    row.update(seconds=time.perf_counter() - t0, peak_rss_mb=peak_memory_mb(device))
    return row


def speed(name: str, steps: int, device) -> dict:
    """Seconds per distillation step, shared forward (3N) vs two calls (2N no-grad + N)."""
    out = {"config": name}
    for shared in (True, False):
        cfg = _cfg(name, f"distill.shared_forward={str(shared).lower()}")
        times = _train(_lora_setup(cfg, device), cfg, steps + 1, device)[1:]
        out["shared_forward_s" if shared else "two_calls_s"] = statistics.median(times)
    out["two_calls_speedup"] = out["shared_forward_s"] / out["two_calls_s"]
    return out


# P4 at three image sizes: config, samples per run (one sampler batch), DDIM steps, alternated
# rounds per repeat, repeats. Fewer images and steps at 32 px keep the CIFAR U-Net within minutes.
SPEED = {
    "digits": (CONFIGS_DIR / "digits.yaml", 64, 4, 3, 3),
    "fmnist16": (CONFIGS_DIR / "pretrain" / "fmnist16-unet.yaml", 32, 3, 3, 3),
    "cifar": (CONFIGS_DIR / "paper" / "iddpm-cifar10-class.yaml", 2, 1, 3, 2),
    # The same at a sampler batch of 8: how much of the shortfall from 2x at batch 2 is the
    # convolutions' lower efficiency on 2 images than on the teacher's 4 (run it with --speed-configs).
    "cifar-b8": (CONFIGS_DIR / "paper" / "iddpm-cifar10-class.yaml", 8, 1, 3, 2),
}


def sample_speed(name: str, device, rounds: int | None = None, repeats: int | None = None) -> dict:
    """P4: seconds per sampled image (CPU seconds on a CPU), the guided teacher against the fused student at the same
    images, seed and DDIM steps.

    Teacher: the class-conditional base network sampled with classifier-free guidance at w = 3 (one
    forward of 2N per step), as ``difflora sample TEACHER_RUN --guidance 3`` runs it. Student: the same
    base weights with the distillation LoRA, fused (``difflora.sampling.generate.fuse_student``: the LoRA
    written into W0, the wrappers gone), one forward of N per step, as ``difflora sample`` runs a
    distilled run. Both are then the same plain network. Two model objects (speed, not memory).
    After a warm-up of each, the two alternate for ``rounds`` rounds (the order flips every round)
    and each keeps its fastest run; the ratio of the fastest runs is repeated ``repeats`` times
    (``rounds`` and ``repeats``: the size's defaults in ``SPEED`` unless given).
    """
    import torch

    from difflora.config.schema import load_config
    from difflora.distill.student import fuse_student
    from difflora.model.build import build_model
    from difflora.sampling.generate import generate, sampling_settings

    path, num, steps, default_rounds, default_repeats = SPEED[name]
    rounds, repeats = rounds or default_rounds, repeats or default_repeats
    over = ["train.objective=distill", "train.train_base=false", "train.init_from=teacher", "distill.guidance=3"]
    cfg = load_config(path, [*over, f"sample.batch_size={num}"])
    plain = load_config(path, [f"sample.batch_size={num}"])
    torch.manual_seed(0)
    teacher = build_model(plain).to(device)
    torch.manual_seed(0)  # the same base weights: the network is built before the LoRA is injected
    student = build_model(cfg).to(device)
    fuse_student(student, cfg)
    assert [type(m) for m in student.modules()] == [type(m) for m in teacher.modules()]  # one network
    labels = torch.arange(num) % cfg.model.num_classes
    guided = sampling_settings(plain, num=num, steps=steps, guidance=cfg.distill.guidance)
    runs = {
        "teacher": lambda: generate(teacher, plain, guided, labels=labels, device=device),
        "student": lambda: generate(
            student, cfg, sampling_settings(cfg, num=num, steps=steps), labels=labels, device=device
        ),
    }
    for fn in runs.values():
        fn()
    order, ratios, fastest = list(runs), [], []
    for _ in range(repeats):
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(rounds):
            for key in order:
                t0 = clock(device)
                runs[key]()
                best[key] = min(best[key], clock(device) - t0)
            order.reverse()
        ratios.append(best["teacher"] / best["student"])
        fastest.append({k: v / num for k, v in best.items()})
    return {
        "config": name,
        "image_size": cfg.model.image_size,
        "sample_batch": num,
        "sample_steps": steps,
        "rounds": rounds,
        "teacher_s_per_image": min(f["teacher"] for f in fastest),
        "student_s_per_image": min(f["student"] for f in fastest),
        "student_speedup_median": statistics.median(ratios),
        "student_speedup_range": [min(ratios), max(ratios)],
        "student_speedups": ratios,
    }


def _subprocess(args: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def table1(rows: list[dict], configs: list[str]) -> dict:
    """003's Table 1 beside ours: per config and row, peak RSS and its ratio to the baseline row
    (003's "memory saving" is 1 minus that ratio)."""
    out = {}
    for name in configs:
        by = {r["setting"]: r for r in rows if r["config"] == name}
        base = by["baseline"]["peak_rss_mb"]
        out[name] = {
            key: {
                "peak_rss_mb": by[key]["peak_rss_mb"],
                "over_baseline": by[key]["peak_rss_mb"] / base,
                "paper_gb": gb,
                "paper_over_baseline": gb / PAPER_TABLE1["baseline"],
            }
            for key, gb in PAPER_TABLE1.items()
        }
        out[name]["lora distill over usual distill"] = (
            by["lora distill"]["peak_rss_mb"] / by["usual distill"]["peak_rss_mb"]
        )
        out[name]["sample student over teacher"] = (
            by["sample student"]["peak_rss_mb"] / by["sample teacher"]["peak_rss_mb"]
        )
    return out


def _print_report(table: dict, speeds: list[dict]) -> None:
    print("003 Table 1: peak RSS per fresh process, MB (x baseline); paper GB (x baseline)")
    for name, by in table.items():
        for key in PAPER_TABLE1:
            r = by[key]
            print(
                f"  {name:7s} {key:14s} {r['peak_rss_mb']:8.0f} MB ({r['over_baseline']:.2f}x)"
                f"   paper {r['paper_gb']:4.1f} GB ({r['paper_over_baseline']:.2f}x)"
            )
    print(
        "P4: guided teacher / fused student s per image (CPU s on a CPU), fastest of alternated runs; speed-up median [range]"
    )
    for sp in speeds:
        lo, hi = sp["student_speedup_range"]
        print(
            f"  {sp['config']:8s} {sp['image_size']:2d} px, batch {sp['sample_batch']}, {sp['sample_steps']} steps: "
            f"teacher {sp['teacher_s_per_image']:.4f} s, student {sp['student_s_per_image']:.4f} s, "
            f"{sp['student_speedup_median']:.2f}x [{lo:.2f}, {hi:.2f}]"
        )


def _child(args: argparse.Namespace) -> dict:
    """The one measurement a subprocess was started for (``--one``, ``--speed``, ``--sample-speed``)."""
    import torch

    if args.one:
        return run_one(*args.one, args.device)
    torch.manual_seed(0)
    if args.speed:
        return speed(args.speed, args.speed_steps, args.device)
    return sample_speed(args.sample_speed, args.device, args.p4_rounds, args.p4_repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", nargs=2, metavar=("SETTING", "CONFIG"), help=argparse.SUPPRESS)
    p.add_argument("--speed", metavar="CONFIG", help=argparse.SUPPRESS)
    p.add_argument("--sample-speed", metavar="CONFIG", choices=list(SPEED), help=argparse.SUPPRESS)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--speed-configs", nargs="+", default=["digits", "fmnist16", "cifar"], choices=list(SPEED))
    p.add_argument("--speed-steps", type=int, default=6)
    p.add_argument("--parts", nargs="+", default=["memory", "speed"], choices=["memory", "speed"])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill.json"))
    p.add_argument("--p4-rounds", type=int, default=None, help="P4: alternated rounds per repeat (default per size)")
    p.add_argument("--p4-repeats", type=int, default=None, help="P4: repeats of the ratio (default per size)")
    add_device_argument(p)
    args = p.parse_args()
    if args.one or args.speed or args.sample_speed:
        print(json.dumps(_child(args)))
        return
    on = ["--device", str(args.device)]
    p4 = [f"--p4-{k}={v}" for k, v in (("rounds", args.p4_rounds), ("repeats", args.p4_repeats)) if v]
    result: dict = {"machine": machine(args.device)}
    print(machine_line(result["machine"]), flush=True)
    if "memory" in args.parts:
        rows = []
        for name in args.configs:
            for setting in MEMORY:
                rows.append(_subprocess(["--one", setting, name, *on]))
                print(json.dumps(rows[-1]), flush=True)
        result.update(rows=rows, table1=table1(rows, args.configs))
    if "speed" in args.parts:
        samples = []
        for name in args.speed_configs:
            samples.append(_subprocess(["--sample-speed", name, *on, *p4]))
            print(json.dumps(samples[-1]), flush=True)
        result.update(sample_speed=samples)
        if args.speed_steps:  # 0: skip (the file keeps its earlier entry)
            steps = ["--speed", "digits", "--speed-steps", str(args.speed_steps), *on]
            result.update(distill_step_speed=_subprocess(steps))
    result.update(
        threads=1,
        machine_after=machine(args.device),
        note="peak RSS per fresh process (includes the interpreter and torch, ~300 MB); P4 in CPU seconds "
        "of the process (one thread); shared 2-core CPU",
    )
    print(machine_line(result["machine_after"]), flush=True)
    out = Path(args.out)
    # A part not run keeps its entries from the existing file (read now: parts may run side by side).
    if out.exists() and set(args.parts) != {"memory", "speed"}:
        result = {**json.loads(out.read_text()), **result}
    for stale in ("ratios", "speed"):  # the keys of the file's earlier layout
        result.pop(stale, None)
    _print_report(result.get("table1", {}), result.get("sample_speed", []))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
