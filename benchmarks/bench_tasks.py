"""P3 (DiffScaler, issue 8): the cost of serving many tasks from one model, in one batch.

1. **Mixed-task training** (target <= 1.2x): forward + backward of the Affiner-adapted U-Net (the
   shared base's architecture, configs/pretrain/fmnist16-unet.yaml: 16 x 16, 32 channels; every
   Linear / Conv adapted, d = 32, 8 tasks, base frozen) on a batch whose samples belong to 8
   different tasks, against the same batch all of one task. The router gathers each sample's
   entry, so mixing tasks should cost (almost) nothing.
2. **Mixed-task inference against peft** (target >= 2x faster): a no-grad forward of a DiT (4 blocks,
   hidden 256, patch 2, 16 x 16: 64 tokens) with a rank-8 LoRA per task on every ``attn.qkv``,
   ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` (8 tasks), on a batch mixing the 8 tasks: difflora's
   ``lowrank`` form with an index weighting (``task`` condition) against peft's mixed adapter
   batches (``adapter_names=[...]``, one LoRA adapter per task, the same factors copied in; the
   outputs are checked equal before timing). peft loops over the adapters present in the batch,
   running each LoRA on its sub-batch; difflora gathers every sample's factors and runs one
   batched product. Also per layer: each of the four adapted layers of one block alone (base GEMM +
   LoRA) on the same tokens. A third variant, the frozen base alone (adapters disabled; per layer
   its base GEMM), gives each adapter path's own cost above the base, which is where the two differ.

Timing: CPU time of the process (``time.process_time``; one thread, so it is the work done,
robust to the other jobs of a loaded machine). Within each repeat the variants alternate for
``--runs`` runs and each variant's fastest run counts; the ratio of the fastest runs is reported
as the median over ``--repeats`` repeats with its range (the spread).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_tasks.py    # writes benchmarks/results/tasks.json

Needs peft (``pip install difflora[bench]``). ``--device cuda`` runs every variant on the GPU, timed
in wall seconds between synchronisations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from devices import add_device_argument, clock, machine, machine_line

from difflora.config.schema import load_config, parse_config
from difflora.model.build import build_model
from difflora.presets import CONFIGS_DIR

ROOT = Path(__file__).resolve().parents[1]
TASKS = 8
LORA_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
OURS, PEFT, BASE = "difflora", "peft adapter_names", "base alone"


def _fastest(fns: dict[str, Callable[[], object]], runs: int, device: torch.device) -> dict[str, float]:
    """Fastest time of each variant over ``runs`` alternated runs (CPU time on a CPU)."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = clock(device)
            fn()
            best[name] = min(best[name], clock(device) - t0)
    return best


def _summary(ratios: list[float], times: list[dict[str, float]]) -> dict:
    out = {
        "ratio_median": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "fastest_s": {k: min(t[k] for t in times) for k in times[0]},
        "repeats": [{"ratio": r, **t} for r, t in zip(ratios, times, strict=True)],
    }
    if BASE in times[0]:
        # The adapters' own cost: each variant's time above the frozen base alone (the same GEMMs in
        # both), measured in the same alternation.
        over = [(t[PEFT] - t[BASE]) / (t[OURS] - t[BASE]) for t in times]
        out |= {"overhead_ratio_median": statistics.median(over), "overhead_ratio_range": [min(over), max(over)]}
    return out


def mixed_training(batch: int, runs: int, repeats: int, device: torch.device) -> dict:
    cfg = load_config(
        CONFIGS_DIR / "pretrain" / "fmnist16-unet.yaml",
        [f"model.affiner={{tasks: {TASKS}}}", "data.task_id=0", "train.train_base=false"],
    )
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    with torch.no_grad():  # trained-looking task entries (fresh ones are exact no-ops)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 16, 16, generator=g).to(device)
    t = torch.randint(1000, (batch,), generator=g).to(device)
    y = torch.randint(10, (batch,), generator=g).to(device)
    mixed = torch.arange(batch, device=device) % TASKS
    tasks = {"single task": torch.full((batch,), 3, device=device), f"{TASKS} tasks mixed": mixed}

    def step(task: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            model(x, t, y, task=task).square().mean().backward()

        return run

    fns = {name: step(task) for name, task in tasks.items()}
    _fastest(fns, 1, device)  # warm-up
    times = [_fastest(fns, runs, device) for _ in range(repeats)]
    ratios = [tt[f"{TASKS} tasks mixed"] / tt["single task"] for tt in times]
    return {"batch": batch, "target": "<= 1.2", **_summary(ratios, times)}


def _dit_cfg(adapters: list[dict]) -> dict:
    return {
        "data": {"name": "fashion-mnist", "image_size": 16, "task_id": 0},
        "model": {
            "arch": "dit",
            "num_classes": 10,
            "dit": {"depth": 4, "hidden_size": 256, "num_heads": 4, "patch_size": 2},
            "adapters": adapters,
        },
        "train": {"train_base": False},
    }


def _peft_twin(ours: torch.nn.Module, rank: int):
    """The same DiT wrapped by peft with one LoRA adapter per task, factors copied from ``ours``."""
    from peft import LoraConfig, inject_adapter_in_model

    plain = build_model(parse_config(_dit_cfg([]))).net
    state = {k.replace(".base_layer", ""): v for k, v in ours.net.state_dict().items() if ".adapters." not in k}
    plain.load_state_dict(state)
    with warnings.catch_warnings():  # peft warns that a model with one adapter gets another: intended
        warnings.simplefilter("ignore", UserWarning)
        for k in range(TASKS):
            config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, lora_dropout=0.0)
            plain = inject_adapter_in_model(config, plain, adapter_name=f"task{k}")
    with torch.no_grad():
        for name, module in plain.named_modules():
            if hasattr(module, "lora_A") and "task0" in module.lora_A:
                bank = ours.net.get_submodule(name).adapters["lora"]
                for k in range(TASKS):
                    module.lora_A[f"task{k}"].weight.copy_(bank.lora_A[k])
                    module.lora_B[f"task{k}"].weight.copy_(bank.lora_B[k])
    return plain


def _peft_forward(net: torch.nn.Module, x, t, y, names: list[str]) -> torch.Tensor:
    """peft's mixed adapter batch on a model it did not wrap as a PeftModel: its layers read
    ``adapter_names`` from a forward pre-hook, as PeftModel's ``_enable_peft_forward_hooks`` installs."""
    from peft.tuners.lora import LoraLayer

    def hook(_module, args, kwargs):
        return args, {**kwargs, "adapter_names": names}

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in net.modules() if isinstance(m, LoraLayer)]
    try:
        return net(x, t, y)
    finally:
        for h in handles:
            h.remove()


def mixed_inference_vs_peft(batch: int, runs: int, repeats: int, device: torch.device, rank: int = 8) -> dict:
    import peft

    lora = {"name": "lora", "condition": "task", "weighting": "index", "num_values": TASKS, "rank": rank}
    torch.manual_seed(0)
    ours = build_model(parse_config(_dit_cfg([{**lora, "targets": LORA_TARGETS}]))).eval()
    with torch.no_grad():  # trained-looking LoRAs and blocks (a fresh DiT outputs zeros)
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    twin = _peft_twin(ours, rank).eval().to(device)
    ours = ours.to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 16, 16, generator=g).to(device)
    t = torch.randint(1000, (batch,), generator=g).to(device)
    y = torch.randint(10, (batch,), generator=g).to(device)
    names = [f"task{k % TASKS}" for k in range(batch)]
    task = torch.arange(batch, device=device) % TASKS
    with torch.no_grad():
        a, b = ours(x, t, y, task=task), _peft_forward(twin, x, t, y, names)
    error = (a - b).abs().max().item()
    if error > 1e-4:
        sys.exit(f"difflora and peft disagree on the mixed batch (max abs error {error:.2e}): not comparable")

    def run_ours() -> None:
        with torch.no_grad():
            ours(x, t, y, task=task)

    def run_peft() -> None:
        with torch.no_grad():
            _peft_forward(twin, x, t, y, names)

    def run_base() -> None:
        with torch.no_grad(), ours.adapters_disabled():
            ours(x, t, y, task=task)

    fns = {OURS: run_ours, PEFT: run_peft, BASE: run_base}
    _fastest(fns, 1, device)
    times = [_fastest(fns, runs, device) for _ in range(repeats)]
    ratios = [tt[PEFT] / tt[OURS] for tt in times]
    layers = _layers_vs_peft(ours, twin, batch, task, names, runs, repeats)
    return {
        "layers": layers,
        "batch": batch,
        "rank": rank,
        "peft": peft.__version__,
        "max_abs_difference": error,
        "target": ">= 2 (peft time / difflora time)",
        **_summary(ratios, times),
    }


def _layers_vs_peft(ours, twin, batch: int, task, names: list[str], runs: int, repeats: int) -> dict:
    """The four adapted layers of one block alone (base GEMM + LoRA), tokens [batch x 64 x fan_in]."""
    from difflora.adapters import conditions

    g = torch.Generator().manual_seed(2)
    out = {}
    for path in LORA_TARGETS:
        mine, theirs = ours.net.get_submodule(f"blocks.0.{path}"), twin.get_submodule(f"blocks.0.{path}")
        h = torch.randn(batch, 64, mine.base_layer.in_features, generator=g).to(task.device)

        def run_ours(layer=mine, h=h) -> None:
            with torch.no_grad(), conditions(task=task):
                layer(h)

        def run_peft(layer=theirs, h=h) -> None:
            with torch.no_grad():
                layer(h, adapter_names=names)

        def run_base(layer=mine, h=h) -> None:
            with torch.no_grad():
                layer.base_layer(h)

        fns = {OURS: run_ours, PEFT: run_peft, BASE: run_base}
        _fastest(fns, 1, task.device)
        times = [_fastest(fns, runs, task.device) for _ in range(repeats)]
        out[path] = _summary([tt[PEFT] / tt[OURS] for tt in times], times)
    return out


def _line(what: str, row: dict) -> str:
    lo, hi = row["ratio_range"]
    fastest = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in row["fastest_s"].items())
    line = f"{what} = x{row['ratio_median']:.3f} (range {lo:.3f}..{hi:.3f}); fastest {fastest}"
    if "overhead_ratio_median" in row:
        olo, ohi = row["overhead_ratio_range"]
        line += f"; adapter cost above the base x{row['overhead_ratio_median']:.2f} ({olo:.2f}..{ohi:.2f})"
    return line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tasks.json"))
    add_device_argument(ap)
    args = ap.parse_args()
    result = {
        "machine": machine(args.device),
        "threads": torch.get_num_threads(),
        "note": "run with nice -n 5 and OMP_NUM_THREADS=1 on a loaded 2-core machine; times are process CPU time",
        "torch": torch.__version__,
    }
    print(machine_line(result["machine"]), flush=True)
    train = mixed_training(args.batch, args.runs, args.repeats, args.device)
    result["mixed_training"] = train
    print(_line(f"P3 train: {TASKS} tasks mixed / single task", train), flush=True)
    infer = mixed_inference_vs_peft(args.batch, args.runs, args.repeats, args.device)
    result["mixed_inference_vs_peft"] = infer
    print(_line("P3 inference: peft / difflora", infer), flush=True)
    for path, row in infer["layers"].items():
        print(_line(f"  layer {path:<10} peft / difflora", row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
