"""Distilling classifier-free guidance into a LoRA (003): peak memory against the usual setup, and
the shared-forward vs two-call speed of the distillation step.

Memory settings, each in a fresh subprocess reporting its peak resident set size (``ru_maxrss``),
on the paper CIFAR U-Net (configs/paper/iddpm-cifar10-class.yaml, 52.5M parameters, batch 2) and
on the small digits config (configs/digits.yaml, batch 64):

* ``load``: build the distillation model (W0 + LoRA), no training (the floor);
* ``lora distill``: 003's setup with difflora's objective: one module, W0 frozen, the LoRA (default
  targets, rank 8) trained with AdamW and an EMA, the teacher = the same module with the LoRA off;
* ``usual distill``: a frozen teacher copy plus a fully fine-tuned student copy (AdamW and an EMA
  over every weight), the same loss (003's "distillation without LoRA");
* ``sample teacher`` / ``sample student``: DDIM sampling with the guided teacher (2N per step)
  and with the student fused once into W0 (N per step).

Both training settings run the same steps (teacher CFG pass of 2N under no_grad, student pass of N,
backward, optimizer and EMA update) on random data of the config's shape; weight values do not
change memory. Speed (digits): seconds per distillation step with ``distill.shared_forward`` true
(one forward of 3N) and false (2N no-grad + N), median of timed steps after a warm-up; and seconds
per sampled image of the guided teacher against the fused student at the same number of steps.

    OMP_NUM_THREADS=1 python benchmarks/bench_distill.py     # writes benchmarks/results/distill.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from difflora.presets import CONFIGS_DIR

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "cifar": (CONFIGS_DIR / "paper" / "iddpm-cifar10-class.yaml", 2),
    "digits": (CONFIGS_DIR / "digits.yaml", 64),
}
MEMORY = ["load", "lora distill", "usual distill", "sample teacher", "sample student"]
STEPS = 3


def _cfg(name: str, *extra: str):
    from difflora.config import load_config

    path, batch = CONFIGS[name]
    # init_from names the teacher the loop would load; here the weights stay random (memory only).
    over = ["train.objective=distill", "train.train_base=false", "train.init_from=teacher", "distill.guidance=3"]
    return load_config(path, [f"train.batch_size={batch}", "sample.steps=4", *over, *extra])


def _data(cfg, generator):
    import torch

    from difflora.train.objectives import Batch

    m, n = cfg.model, cfg.train.batch_size
    x = torch.rand(n, m.in_channels, m.image_size, m.image_size, generator=generator) * 2 - 1
    return Batch(x, {"y": torch.randint(0, m.num_classes, (n,), generator=generator)})


def _lora_setup(cfg):
    """003: one module; the objective's teacher is the same module with the LoRA off."""
    import torch

    from difflora.model import build_diffusion, build_model
    from difflora.train.distill import DistillObjective
    from difflora.train.ema import EMA

    model = build_model(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, DistillObjective(cfg, build_diffusion(cfg)), torch.optim.AdamW(params, lr=1e-4), EMA(model), params


class _UsualObjective:
    """The usual distillation: a separate frozen teacher copy guides a fully trained student copy."""

    def __init__(self, cfg, teacher):
        from difflora.model import build_diffusion
        from difflora.train.distill import DistillObjective

        self.inner = DistillObjective(cfg, build_diffusion(cfg))
        self.teacher = teacher

    def __call__(self, student, batch, generator, device):
        import torch

        from difflora.diffusion.guidance import ClassifierFreeGuidance
        from difflora.train.distill import distill_losses

        d, n = self.inner.diffusion, batch.x.shape[0]
        t = torch.randint(d.num_timesteps, (n,), generator=generator)
        x_t = d.q_sample(batch.x, t, torch.randn(batch.x.shape, generator=generator))
        tm, y = d.model_timesteps(t), batch.conditions["y"]
        with torch.no_grad():
            target = ClassifierFreeGuidance(self.teacher, self.inner.cfg.distill.guidance)(x_t, tm, y)
        return distill_losses(student(x_t, tm, y=y), target, self.inner.channels)


def _usual_setup(name: str):
    import torch

    from difflora.model import build_model
    from difflora.train.ema import EMA

    plain = _cfg(name, "train.objective=diffusion", "train.train_base=true", "train.init_from=null")
    teacher = build_model(plain).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    params = list(student.parameters())
    # plain keeps distill.guidance=3 from _cfg: the same target as the LoRA setting.
    return student, _UsualObjective(plain, teacher), torch.optim.AdamW(params, lr=1e-4), EMA(student), params


def _train(setup, cfg, steps: int) -> list[float]:
    """Run ``steps`` distillation steps; returns the seconds of each."""
    import torch

    model, objective, optim, ema, _ = setup
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = objective(model, _data(cfg, g), g, torch.device("cpu"))["loss"].mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        ema.update(model)
        times.append(time.perf_counter() - t0)
    return times


def _sample(cfg, student: bool) -> None:
    import torch

    from difflora.generate import fuse_student, generate
    from difflora.model import build_model

    model = build_model(cfg)
    n = cfg.train.batch_size
    if student:
        fuse_student(model, cfg)
    labels = torch.arange(n) % cfg.model.num_classes
    generate(model, cfg, n, steps=cfg.sample.steps, labels=labels, teacher=not student)


def run_one(setting: str, name: str) -> dict:
    """One memory setting in this process (called in a fresh subprocess)."""
    import torch

    from difflora.accounting import count_parameters

    torch.manual_seed(0)
    cfg = _cfg(name)
    t0 = time.perf_counter()
    row: dict = {"setting": setting, "config": name, "batch": cfg.train.batch_size}
    if setting == "load":
        setup = _lora_setup(cfg)
    elif setting == "lora distill":
        setup = _lora_setup(cfg)
        row["step_s"] = statistics.median(_train(setup, cfg, STEPS)[1:])
    elif setting == "usual distill":
        setup = _usual_setup(name)
        row["step_s"] = statistics.median(_train(setup, cfg, STEPS)[1:])
        row["teacher_params"] = count_parameters(setup[1].teacher)["total"]
    else:
        _sample(cfg, student=setting == "sample student")
        setup = None
    if setup is not None:
        counts = count_parameters(setup[0])
        row.update(params=counts["total"], trainable=counts["trainable"])
    row.update(seconds=time.perf_counter() - t0, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def speed(name: str, steps: int) -> dict:
    """Seconds per distillation step, shared forward (3N) vs two calls (2N no-grad + N)."""
    out = {"config": name}
    for shared in (True, False):
        cfg = _cfg(name, f"distill.shared_forward={str(shared).lower()}")
        times = _train(_lora_setup(cfg), cfg, steps + 1)[1:]
        out["shared_forward_s" if shared else "two_calls_s"] = statistics.median(times)
    out["two_calls_speedup"] = out["shared_forward_s"] / out["two_calls_s"]
    out.update(sample_speed(_cfg(name)))
    return out


def sample_speed(cfg, num: int = 64, steps: int = 20) -> dict:
    """Seconds per sampled image at ``steps`` DDIM steps: the guided teacher (2N per step) against the
    fused student (N per step); best of two runs each."""
    import torch

    from difflora.generate import fuse_student, generate
    from difflora.model import build_model

    model = build_model(cfg)
    labels = torch.arange(num) % cfg.model.num_classes

    def timed(**kw) -> float:
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            generate(model, cfg, num, steps=steps, labels=labels, **kw)
            best = min(best, time.perf_counter() - t0)
        return best / num

    teacher = timed(teacher=True)
    fuse_student(model, cfg)
    student = timed()
    return {
        "sample_steps": steps,
        "teacher_s_per_image": teacher,
        "student_s_per_image": student,
        "student_speedup": teacher / student,
    }


def _subprocess(args: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", nargs=2, metavar=("SETTING", "CONFIG"), help=argparse.SUPPRESS)
    p.add_argument("--speed", metavar="CONFIG", help=argparse.SUPPRESS)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--speed-steps", type=int, default=6)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill.json"))
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return
    if args.speed:
        import torch

        torch.manual_seed(0)
        print(json.dumps(speed(args.speed, args.speed_steps)))
        return
    rows = []
    for name in args.configs:
        for setting in MEMORY:
            rows.append(_subprocess(["--one", setting, name]))
            print(json.dumps(rows[-1]), flush=True)
    ratios = {}
    for name in args.configs:
        by = {r["setting"]: r for r in rows if r["config"] == name}
        ratios[name] = {
            "train_lora_over_usual": by["lora distill"]["peak_rss_mb"] / by["usual distill"]["peak_rss_mb"],
            "sample_student_over_teacher": by["sample student"]["peak_rss_mb"] / by["sample teacher"]["peak_rss_mb"],
        }
    speeds = [_subprocess(["--speed", "digits", "--speed-steps", str(args.speed_steps)])]
    result = {
        "rows": rows,
        "ratios": ratios,
        "speed": speeds,
        "threads": 1,
        "note": "peak RSS per fresh process (includes the interpreter and torch, ~300 MB); shared 2-core CPU",
    }
    print(json.dumps({"ratios": ratios, "speed": speeds}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
