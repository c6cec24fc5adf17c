"""The forms part of ``bench_adapters.py`` (``--part forms``) and what its parts share: alternated timing
and the machine's description (threads, load, CPU flags).

Each update form (lowrank, lowrank_act, scale, shift; one entry per task, index weighting, 3 tasks
plus base rows in the batch) on the qkv projection of 000 (Conv1d 256 -> 768, 64 tokens, batch 64)
with a frozen base, and a position adapter (004) between the input and the output of a block that
is that projection, against the plain layer and a naive per-sample reference (a Python loop over
samples building each sample's weight, as peers' mixed-batch adapters do).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from devices import minor_faults, wall
from torch import nn

from difflora.adapters import ConditionalLayer, IndexWeighting, PositionAdapter, add_position_adapter, conditions

ROOT = Path(__file__).resolve().parents[1]
FORMS = ("lowrank", "lowrank_act", "scale", "shift", "position")


def fastest_of(fns: dict[str, Callable[[], None]], runs: int) -> dict[str, float]:
    """Seconds of the fastest of ``runs`` alternated calls of each function (after one warm-up each)."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = wall(torch.get_default_device())
            fn()
            best[name] = min(best[name], wall(torch.get_default_device()) - t0)
    return best


def fwd_bwd(x: torch.Tensor, grad: torch.Tensor, forward: Callable, *modules: nn.Module) -> Callable[[], None]:
    """One timed call: clear the gradients of ``x`` and ``modules``, run ``forward()`` and backpropagate ``grad``."""

    def f() -> None:
        x.grad = None
        for mod in modules:
            mod.zero_grad(set_to_none=True)
        forward().backward(grad)

    return f


def cpu_flags() -> list[str]:
    """The CPU features that decide the fast paths here (``/proc/cpuinfo``; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    have = set(next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split())
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have]


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (the machine's other work while measuring)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else []


def machine(args: argparse.Namespace) -> dict:
    """What the numbers were measured on: torch, threads, CPUs, load, CPU flags."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "load_average": load_average(),
        "cpu_flags": cpu_flags(),
        "quick": args.quick,
        "allocator": args.allocator,
    }


def describe(env: dict) -> str:
    return (
        f"{env['threads']} thread(s), {env['cpus']} CPUs, load average "
        f"{' '.join(f'{v:.2f}' for v in env['load_average'])}, CPU flags: {' '.join(env['cpu_flags']) or 'none found'}, "
        f"allocator {env.get('allocator', 'glibc')}"
    )


def print_ratio_table(title: str, rows: dict[str, dict]) -> None:
    print(title)
    for name, v in rows.items():
        print(f"  {name:<34}{v['median']:>7.2f}x  (range {v['min']:.2f}-{v['max']:.2f})")


def _naive_forms(layer, x, task):
    """Per-sample loop (peers' mixed batches): each sample's own weight, bias and branch."""
    base = layer.base_layer
    w0, b0 = base.weight[:, :, 0], base.bias
    outs = []
    for n in range(x.shape[0]):
        w, b, extra = w0, b0, 0
        k = int(task[n])
        for br in layer.adapters.values() if k >= 0 else ():
            if br.form == "lowrank":
                w = w + br.lora_B[k] @ br.lora_A[k]
            elif br.form == "scale":
                w = (1 + br.scale[k])[:, None] * w
            elif br.form == "shift":
                b = b + br.shift[k]
            else:
                extra = extra + br.lora_s[k] * br.lora_up[k] @ F.gelu(br.lora_down[k] @ x[n])
        outs.append(torch.addmm(b[:, None], w, x[n]) + extra)
    return torch.stack(outs)


class _TappedProjection(nn.Module):
    """A block that is the qkv projection, with taps at its input and output (where 004's adapter sits)."""

    TAPS = ("in", "out")
    tap_layout = "channels_first"

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj, self.tap_in, self.tap_out = proj, nn.Identity(), nn.Identity()
        self.tap_channels = {"in": proj.in_channels, "out": proj.out_channels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tap_out(self.proj(self.tap_in(x)))


def _naive_position(block, x, task):
    """Per-sample loop: ``W x_n + b + scale (up_k (down_k x_n + down_bias_k) + bias_k)`` for task k."""
    pa, base = block.position_adapters["task"], block.proj
    outs = []
    for n in range(x.shape[0]):
        out, k = torch.addmm(base.bias[:, None], base.weight[:, :, 0], x[n]), int(task[n])
        if k >= 0:
            z = pa.lora_down[k] @ x[n] + pa.down_bias[k][:, None]
            out = out + pa.scale * (pa.lora_up[k] @ z + pa.bias[k][:, None])
        outs.append(out)
    return torch.stack(outs)


def _adapted_module(form: str, base: nn.Conv1d) -> tuple[nn.Module, Callable]:
    """(the adapted module, its naive per-sample reference) for ``form`` on a copy of ``base``."""
    proj = nn.Conv1d(base.in_channels, base.out_channels, 1)
    proj.load_state_dict(base.state_dict())
    proj.requires_grad_(False)
    if form == "position":
        block = _TappedProjection(proj)
        add_position_adapter(block, PositionAdapter(block, "task", IndexWeighting(3), "task", "in", "out", rank=4))
        return block, _naive_position
    layer = ConditionalLayer(proj)
    act = "gelu" if form == "lowrank_act" else None
    layer.add_adapter("task", IndexWeighting(3), "task", rank=4, form=form, activation=act)
    return layer, _naive_forms


def _bench_form(
    form: str, runs: int, repeats: int, variants: list[str] | None, batch: int, tokens: int, d: int
) -> dict:
    torch.manual_seed(0)
    base = nn.Conv1d(d, 3 * d, 1).requires_grad_(False)
    module, naive = _adapted_module(form, base)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:  # the adapter's tensors: trained-looking values
                p.normal_(0, 0.02)
    x = torch.randn(batch, d, tokens, requires_grad=True)
    grad = torch.randn(batch, 3 * d, tokens)
    task = torch.arange(batch) % 4 - 1  # -1 (base rows), 0, 1, 2

    def step(forward, mod):
        return fwd_bwd(x, grad, forward, mod)

    def adapted():
        with conditions(task=task):
            return module(x)

    with torch.no_grad():
        assert torch.allclose(adapted(), naive(module, x, task), atol=1e-4, rtol=1e-4)
    fns = {
        "plain": step(lambda: base(x), base),
        "adapted": step(adapted, module),
        "naive_per_sample": step(lambda: naive(module, x, task), module),
    }
    if variants:  # time only these besides plain
        fns = {k: f for k, f in fns.items() if k == "plain" or k in variants}
    ratios = {"adapted_over_plain": [], **({"naive_over_adapted": []} if "naive_per_sample" in fns else {})}
    for _ in range(repeats):
        best = fastest_of(fns, runs)
        ratios["adapted_over_plain"].append(best["adapted"] / best["plain"])
        if "naive_per_sample" in fns:
            ratios["naive_over_adapted"].append(best["naive_per_sample"] / best["adapted"])
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} for k, v in ratios.items()}


def bench_forms(
    runs: int, repeats: int, variants: list[str] | None = None, batch: int = 64, tokens: int = 64, d: int = 256
) -> dict:
    """Each form on the qkv projection, frozen base, 3 tasks + base rows, against plain and naive."""
    forms = {f: _bench_form(f, runs, repeats, variants, batch, tokens, d) for f in FORMS}
    return {"shape": {"batch": batch, "tokens": tokens, "d_in": d, "d_out": 3 * d, "tasks": 3}, "forms": forms}


def main_forms(args: argparse.Namespace) -> None:
    env = machine(args)
    faults = minor_faults()
    forms = bench_forms(args.runs, args.p1_repeats, args.variants)
    env["minor_page_faults"] = minor_faults() - faults
    print(
        f"forms: frozen qkv Conv1d 256->768 fwd+bwd, {forms['shape']}, fastest of {args.runs} runs, x{args.p1_repeats}"
    )
    print(
        f" measured with {describe(env)}; {env['minor_page_faults']} minor page faults in the part (set-up and checks included)"
    )
    for form, v in forms["forms"].items():
        print_ratio_table(f" {form} (target adapted <= 1.25x):", v)
    forms["targets"] = {"adapted_over_plain": 1.25}
    forms["env"] = {**env, "load_average_after": load_average()}
    out = ROOT / "benchmarks" / "results" / (args.out_name or "adapters_forms.json")
    out.write_text(json.dumps(forms, indent=1))
    print(f"wrote {out}")
