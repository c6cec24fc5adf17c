"""``torch.compile(fullgraph=True)`` of an adapted model against eager: a training step and a sampling step.

The models are the tests' tiny adapted ones (8 x 8 digits): 000's TimeLoRA U-Net (``tiny-timelora-unet``,
a linear weighting over 11 bases on the attention's qkv and proj_out) and 002's Affiner DiT
(``tiny-dit`` with ``model.affiner={tasks: 3}``: scale, shift and low-rank ReLU branches, index
weighting), with every zero-initialised tensor (LoRA B, output layers) made non-zero.

* training step: forward of a batch with a different t (and task) per sample, an MSE loss,
  backward (parameter gradients);
* sampling step: a no-grad forward of the batch at one t shared by all samples (a sampler's call;
  the per-sample path, since a merge reads the shared value on the host and so cannot be compiled).

Compile time is the wall time of the first compiled call (tracing, inductor's C++ build, the backward
graph for the training step). Then the compiled and eager calls alternate in one process; the ratio
reported is that of the fastest of ``--runs`` runs (eager over compiled: above 1 means compiled is
faster), repeated ``--repeats`` times (median and range). The output says the threads, the load and
the CPU flags; a loaded machine's numbers need a rerun on an idle one.

    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py            # writes benchmarks/results/compile.json
    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py --model affiner-dit --out-name compile_dit.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from adapter_forms import describe, fastest_of, load_average, machine
from devices import add_device_argument

from difflora.config.schema import load_config
from difflora.model.build import build_model

ROOT = Path(__file__).resolve().parents[1]
# name: (preset, overrides, extra per-sample conditions for a batch of n)
MODELS = {
    "timelora-unet": ("tiny-timelora-unet", [], {}),
    "affiner-dit": (
        "tiny-dit",
        ["model.affiner={tasks: 3}", "data.task_id=0"],
        {"task": lambda n: torch.arange(n) % 4 - 1},
    ),
}


def _model(name: str) -> tuple[torch.nn.Module, dict]:
    preset, overrides, extra = MODELS[name]
    torch.manual_seed(0)
    model = build_model(load_config(preset, overrides))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # zero-initialised adapters and output layers: make every path count
                p.normal_(0, 0.05)
    return model, extra


def _steps(model: torch.nn.Module, extra: dict, batch: int) -> dict:
    """The training and sampling step of ``model`` (called as given: eager or compiled)."""
    x, y = torch.randn(batch, 1, 8, 8), torch.randint(0, 10, (batch,))
    target = torch.randn(batch, 2, 8, 8)  # learn_sigma: two output channels
    conds = {k: f(batch) for k, f in extra.items()}
    counter = {"i": 0}

    def train(fn):
        def f():
            counter["i"] += 1
            t = (torch.arange(batch) * 7 + counter["i"]) % 100  # a different t per sample
            model.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(fn(x, t, y, **conds), target).backward()

        return f

    def sample(fn):
        def f():
            counter["i"] += 1
            with torch.no_grad():
                fn(x, torch.full((batch,), counter["i"] % 100), y, **conds)

        return f

    return {"train": train, "sample": sample}


def bench(name: str, batch: int, runs: int, repeats: int) -> dict:
    model, extra = _model(name)
    steps = _steps(model, extra, batch)
    compiled = torch.compile(model, fullgraph=True)
    out = {}
    for step, make in steps.items():
        eager, comp = make(model), make(compiled)
        t0 = time.perf_counter()
        comp()
        compile_s = time.perf_counter() - t0
        ratios, best_ms = [], {"eager": [], "compiled": []}
        for _ in range(repeats):
            best = fastest_of({"eager": eager, "compiled": comp}, runs)
            ratios.append(best["eager"] / best["compiled"])
            for k in best_ms:
                best_ms[k].append(best[k] * 1e3)
        out[step] = {
            "compile_s": compile_s,
            "eager_over_compiled": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "fastest_ms": best_ms,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(MODELS), default="timelora-unet")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--runs", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="5 runs, 3 repeats")
    ap.add_argument("--out-name", default="compile.json")
    add_device_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # Every module and tensor the benchmark creates is made on --device.
    torch.set_default_device(args.device)
    runs, repeats = (5, 3) if args.quick else (args.runs, args.repeats)
    env = machine(args)
    res = bench(args.model, args.batch, runs, repeats)
    print(
        f"{args.model}, batch {args.batch}: compiled (fullgraph) vs eager, fastest of {runs} alternated runs, x{repeats}"
    )
    print(f" measured with {describe(env)}")
    for step, v in res.items():
        r, ms = v["eager_over_compiled"], {k: min(t) for k, t in v["fastest_ms"].items()}
        print(
            f"  {step:<8} compile {v['compile_s']:6.1f} s   eager/compiled {r['median']:.2f}x (range {r['min']:.2f}-{r['max']:.2f})"
            f"   fastest ms: eager {ms['eager']:.1f}, compiled {ms['compiled']:.1f}"
        )
    result = {"model": args.model, "batch": args.batch, "runs": runs, "repeats": repeats, **res}
    result["env"] = {**env, "load_average_after": load_average()}
    out = ROOT / "benchmarks" / "results" / args.out_name
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
