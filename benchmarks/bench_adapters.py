"""Cost of conditional adapters, measured side by side in one run: P1, every form, the layer and a sampling step.

0. **P1** (``--part p1``, issues 7 and 33): forward + backward of the adapted qkv below (a different
   t per sample, linear weighting) against the plain layer, in two settings: the base trained too
   (000) and the base frozen with gradients to the input and the adapter only (002-004). Besides
   the library path (``adapted``: the sparse kernel ``router.SparseLowRank``): the library's
   earlier path (``autograd_gathered``: the same gather, bmm and in-place baddbmm differentiated by
   autograd), all bases concatenated into one down and one up projection with the per-sample
   weights in rank space (``concat_bases``: two GEMMs shared by the batch), a naive per-sample
   weight, a custom ``autograd.Function`` that adds the update into the base GEMM's output and
   accumulates the input gradient in place (one pass less over the output and over the input
   gradient), and, with ``--compile``, ``torch.compile`` of the adapted forward. The ratio reported
   is that of the fastest of ``--runs`` alternated runs, repeated ``--p1-repeats`` times (median
   and range over the repeats). ``--variants`` times only some (all are checked against the naive
   reference first), for a shorter run on a loaded machine.
   **Forms** (``--part forms``, ``adapter_forms.py``): each update form (lowrank, lowrank_act,
   scale, shift, and a position adapter; one entry per task, index weighting, 3 tasks plus base
   rows in the batch) on the same projection with a frozen base, against the plain layer and a
   naive per-sample reference (a Python loop over samples building each sample's weight, as peers'
   mixed-batch adapters do). Both parts print the threads, the load average and the CPU flags.

1. Forward + backward of the adapted attention projection of 000's U-Net: the qkv 1x1 Conv1d
   256 -> 768 on 64 tokens (an 8x8 attention map), batch 64, a different timestep per sample,
   m = 10 (11 bases), r = 4, against

   * the plain layer (the cost floor),
   * a naive per-sample weight: ``W_n = W + sum_i w_i(t_n) B_i A_i`` built for every sample and
     applied with one batched matmul (einsum + bmm), and the same naive scheme with a Python loop
     over samples.

   Reported for the linear-interpolation weighting (sparse: 2 bases per sample; the adapter gathers
   them), for the same weighting computed densely (all 44 rows of A in one shared GEMM: the
   alternative design, kept here for comparison) and for a trainable table (dense: all 11 bases).
2. One sampling step (a no-grad forward of all samples at one shared t) of the TimeLoRA U-Net of
   000 (no time embedding; the TimeLoRA update merged into W once per step, merge included in the
   time: each timed step uses a new t) against the time-embedding U-Net of the same width. The
   architecture is 000's CIFAR-10 one (128 channels, 32 px); the batch is ``--sample-batch``.

Timing: all variants of a part are interleaved within each repeat (so a slow phase of the shared
machine hits them all), each repeat times ``--iters`` calls, the reported time is the median over
repeats and the noise is the spread (max - min) / median across repeats. Ratios are of medians.

    python benchmarks/bench_adapters.py              # writes benchmarks/results/adapters.json
    python benchmarks/bench_adapters.py --quick      # fewer repeats, smaller sampling batch
    python benchmarks/bench_adapters.py --part p1    # writes benchmarks/results/adapters_p1.json
    python benchmarks/bench_adapters.py --part forms # writes benchmarks/results/adapters_forms.json

Allocator (``--allocator``): by default (``steady``) glibc is told to keep freed memory in the
process, so that no timed call faults fresh pages in. With glibc's own policy (``--allocator
glibc``), each new tensor of a few MB is mapped fresh or not depending on what was freed before: a
P1 step then spends 0 or 14-17 ms (of 35-54) in page faults, and the alternated variants time the
allocator's state as much as their own work. Both parts print the page faults seen while timing.

Run with OMP_NUM_THREADS=1 on a shared machine (the script also sets one torch thread).
``--device cuda`` creates every tensor and module on the GPU; the timers then synchronise it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import devices
import torch
from adapter_forms import describe, fastest_of, fwd_bwd, load_average, machine, main_forms, print_ratio_table
from devices import add_allocator_argument, add_device_argument, machine_line, minor_faults, steady_allocator, wall
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

TARGETS = {"adapted_over_plain": 1.10, "naive_over_adapted": 5.0, "timelora_over_embedding_unet": 1.0}


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, iters: int) -> dict[str, dict]:
    """Median seconds per call of each function, timed in interleaved repeats, and the spread."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up: allocation, first touch, lazy init
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = wall(torch.get_default_device())
            for _ in range(iters):
                fn()
            times[name].append((wall(torch.get_default_device()) - t0) / iters)
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {
            "median_ms": med * 1e3,
            "min_ms": min(ts) * 1e3,
            "max_ms": max(ts) * 1e3,
            "spread": (max(ts) - min(ts)) / med,
        }
    return out


def bench_layer(repeats: int, iters: int, batch: int = 64, tokens: int = 64, d: int = 256) -> dict:
    from difflora.adapters import ConditionalLayer, LinearWeighting, TrainableWeighting, conditions

    torch.manual_seed(0)
    m, r, T = 10, 4, 4001
    d_out = 3 * d
    base = nn.Conv1d(d, d_out, 1)
    x = torch.randn(batch, d, tokens, requires_grad=True)
    grad = torch.randn(batch, d_out, tokens)
    t = torch.randint(0, T - 1, (batch,))

    def adapted(weighting):
        layer = ConditionalLayer(nn.Conv1d(d, d_out, 1), weighting, "t", rank=r)
        layer.base_layer.load_state_dict(base.state_dict())
        with torch.no_grad():  # trained-looking factors (B = 0 at init would let no one skip work anyway)
            for bank in layer.adapters.values():
                bank.lora_B.normal_(0, 0.02)
        return layer

    linear = adapted(LinearWeighting(m + 1, 0, T - 1))
    table = adapted(TrainableWeighting(T, m + 1, "linear"))
    bank = linear.adapters["default"]
    A, B = bank.lora_A, bank.lora_B  # [m+1 x r x d], [m+1 x d_out x r]
    W, bias = base.weight, base.bias  # [d_out x d x 1], [d_out]

    def run_plain():
        base.zero_grad(set_to_none=True)
        x.grad = None
        base(x).backward(grad)

    def run_layer(layer):
        def f():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            with conditions(t=t):
                out = layer(x)
            out.backward(grad)

        return f

    def naive_weights():
        w = bank.weighting(t).dense(m + 1).to(x.dtype)  # [N x (m+1)]
        delta = torch.einsum("nb,bor,brf->nof", w, B, A)  # [N x d_out x d]: one weight per sample
        return W[:, :, 0].unsqueeze(0) + delta

    def run_naive_batched():
        linear.zero_grad(set_to_none=True)
        base.zero_grad(set_to_none=True)
        x.grad = None
        out = torch.baddbmm(bias[None, :, None], naive_weights(), x)  # [N x d_out x L]
        out.backward(grad)

    def run_naive_loop():
        linear.zero_grad(set_to_none=True)
        base.zero_grad(set_to_none=True)
        x.grad = None
        w = bank.weighting(t).dense(m + 1).to(x.dtype)
        outs = []
        for n in range(batch):  # the per-sample loop peers use: build W_n, apply it
            w_n = W[:, :, 0] + torch.einsum("b,bor,brf->of", w[n], B, A)
            outs.append(torch.addmm(bias[:, None], w_n, x[n]))
        torch.stack(outs).backward(grad)

    def run_dense_stacked():
        # The alternative to the adapter's gather: all (m+1) r rows of A in one shared GEMM, the
        # sparse weights (2 non-zeros per sample) scaling rank space, then all of B.
        linear.zero_grad(set_to_none=True)
        base.zero_grad(set_to_none=True)
        x.grad = None
        s = bank.weighting(t).dense(m + 1).to(x.dtype).repeat_interleave(r, dim=1)  # [N x (m+1) r]
        h = torch.matmul(A.reshape(-1, d), x) * s[:, :, None]  # [N x (m+1) r x L]
        out = base(x)
        out.baddbmm_(B.permute(1, 0, 2).reshape(d_out, -1).expand(batch, -1, -1), h)
        out.backward(grad)

    # Correctness of the comparison: the naive output equals the adapter's.
    with torch.no_grad(), conditions(t=t):
        ref = torch.baddbmm(bias[None, :, None], naive_weights(), x)
        assert torch.allclose(linear(x), ref, atol=1e-4, rtol=1e-4)

    fns = {
        "plain": run_plain,
        "adapted_linear": run_layer(linear),
        "adapted_trainable": run_layer(table),
        "dense_stacked": run_dense_stacked,
        "naive_batched": run_naive_batched,
        "naive_loop": run_naive_loop,
    }
    res = interleaved(fns, repeats, iters)
    p, a, tr = (res[k]["median_ms"] for k in ("plain", "adapted_linear", "adapted_trainable"))
    ratios = {
        "adapted_linear_over_plain": a / p,
        "adapted_trainable_over_plain": tr / p,
        "dense_stacked_over_plain": res["dense_stacked"]["median_ms"] / p,
        "naive_batched_over_adapted_linear": res["naive_batched"]["median_ms"] / a,
        "naive_loop_over_adapted_linear": res["naive_loop"]["median_ms"] / a,
        "naive_batched_over_adapted_trainable": res["naive_batched"]["median_ms"] / tr,
    }
    shape = {"batch": batch, "tokens": tokens, "d_in": d, "d_out": d_out, "m": m, "r": r, "T": T}
    return {"shape": shape, "times": res, "ratios": ratios}


class FusedLowRank(torch.autograd.Function):
    """``W x + b + B_g (s * (A_g x))`` for a pointwise base with gathered factors, one output pass.

    Forward: the base GEMM's output takes the update in place; backward: ``g`` is read by two
    bmm's (``B_g^T g`` and ``h g^T``), and the input gradient ``W^T g`` takes ``A_g^T (s B_g^T g)``
    in place instead of a separate sum. x3 [N x F x L], w [d_out x F], a [N x R x F],
    bt [N x R x d_out], s [N x R].
    """

    @staticmethod
    def forward(ctx, x3, w, bias, a, bt, s):
        h0 = torch.bmm(a, x3)  # (N, R, L)
        h = h0 * s[:, :, None]
        out = torch.matmul(w, x3)  # (N, d_out, L)
        if bias is not None:
            out += bias[:, None]
        out.baddbmm_(bt.transpose(1, 2), h)
        ctx.save_for_backward(x3, w, a, bt, s, h0, h)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, g):
        x3, w, a, bt, s, h0, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        gh = torch.bmm(bt, g)  # (N, R, L)
        ghs = gh * s[:, :, None]
        g_x = torch.matmul(w.t(), g).baddbmm_(a.transpose(1, 2), ghs) if need[0] else None
        g_w = torch.einsum("nol,nfl->of", g, x3) if need[1] else None
        g_b = g.sum((0, 2)) if ctx.has_bias and need[2] else None
        g_a = torch.bmm(ghs, x3.transpose(1, 2)) if need[3] else None
        g_bt = torch.bmm(h, g.transpose(1, 2)) if need[4] else None
        g_s = (gh * h0).sum(-1) if need[5] else None
        return g_x, g_w, g_b, g_a, g_bt, g_s


def _p1_setting(
    frozen: bool, runs: int, repeats: int, compile_: bool, variants: list[str] | None, batch=64, tokens=64, d=256
) -> dict:
    from difflora.adapters import ConditionalLayer, LinearWeighting, conditions

    torch.manual_seed(0)
    m, r, T = 10, 4, 4001
    d_out = 3 * d
    base = nn.Conv1d(d, d_out, 1)
    layer = ConditionalLayer(nn.Conv1d(d, d_out, 1), LinearWeighting(m + 1, 0, T - 1), "t", rank=r)
    layer.base_layer.load_state_dict(base.state_dict())
    bank = layer.adapters["default"]
    with torch.no_grad():
        bank.lora_B.normal_(0, 0.02)
    base.requires_grad_(not frozen)
    layer.base_layer.requires_grad_(not frozen)
    x = torch.randn(batch, d, tokens, requires_grad=True)
    grad = torch.randn(batch, d_out, tokens)
    t = torch.randint(0, T - 1, (batch,))

    def step(forward, *modules):
        return fwd_bwd(x, grad, forward, *modules)

    def adapted():
        with conditions(t=t):
            return layer(x)

    def fused():
        mix = bank.weighting(t)
        n, k = mix.index.shape
        flat = mix.index.reshape(-1)
        a = bank.lora_A.reshape(m + 1, -1).index_select(0, flat).view(n, k * r, d)
        bt = bank.lora_B.index_select(0, flat).transpose(1, 2).reshape(n, k * r, d_out)
        s = mix.weight.to(x.dtype).repeat_interleave(r, 1)
        return FusedLowRank.apply(x, layer.base_layer.weight[:, :, 0], layer.base_layer.bias, a, bt, s)

    def gathered():
        # The library's path before the sparse kernel (router.SparseLowRank): the same gather, bmm and
        # in-place baddbmm, differentiated by autograd.
        mix = bank.weighting(t)
        n, k = mix.index.shape
        flat = mix.index.reshape(-1)
        a = bank.lora_A.reshape(m + 1, -1).index_select(0, flat).view(n, k * r, d)
        up = bank.lora_B.reshape(m + 1, -1).index_select(0, flat).view(n, k, d_out, r)
        up = up.transpose(1, 2).reshape(n, d_out, k * r)
        h = torch.bmm(a, x) * mix.weight.to(x.dtype).repeat_interleave(r, 1)[:, :, None]
        return layer.base_layer(x).baddbmm_(up, h)

    def concat_bases():
        # All bases in one down and one up projection, the per-sample weights in rank space: two
        # GEMMs shared by the batch (m + 1 = 11 entries of rank 4: 44 rows) instead of a gather and bmm's.
        s = bank.weighting(t).dense(m + 1).to(x.dtype).repeat_interleave(r, 1)  # (N, 44)
        h = torch.matmul(bank.lora_A.reshape(-1, d), x) * s[:, :, None]  # (N, 44, L)
        up = bank.lora_B.permute(1, 0, 2).reshape(d_out, -1)  # (d_out, 44)
        return layer.base_layer(x).baddbmm_(up.expand(batch, -1, -1), h)

    def naive():
        w = bank.weighting(t).dense(m + 1).to(x.dtype)
        weights = layer.base_layer.weight[:, :, 0] + torch.einsum("nb,bor,brf->nof", w, bank.lora_B, bank.lora_A)
        return torch.baddbmm(layer.base_layer.bias[None, :, None], weights, x)

    fns = {
        "plain": step(lambda: base(x), base),
        "adapted": step(adapted, layer),
        "autograd_gathered": step(gathered, layer),
        "concat_bases": step(concat_bases, layer),
        "fused_function": step(fused, layer),
        "naive_per_sample": step(naive, layer),
    }
    if compile_:
        compiled = torch.compile(adapted)
        fns["compiled"] = step(compiled, layer)
    # The variants compute the same thing: outputs and gradients against the naive reference.
    check = {}
    for name in fns:
        if name == "plain":
            continue
        fns[name]()
        check[name] = [x.grad.clone(), bank.lora_A.grad.clone(), bank.lora_B.grad.clone()]
    for name, got in check.items():
        for g, want in zip(got, check["naive_per_sample"], strict=True):
            assert torch.allclose(g, want, rtol=1e-3, atol=1e-3), f"{name} disagrees with the naive reference"
    if variants:  # --variants: time only these (all were checked above)
        fns = {k: f for k, f in fns.items() if k == "plain" or k in variants}
    ratios = {k: [] for k in fns if k != "plain"}
    best_ms = {k: [] for k in fns}
    for _ in range(repeats):
        best = fastest_of(fns, runs)
        for k in fns:
            best_ms[k].append(best[k] * 1e3)
            if k != "plain":
                ratios[k].append(best[k] / best["plain"])
    summary = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} for k, v in ratios.items()}
    return {"fastest_ms": best_ms, "ratio_over_plain": summary}


def bench_p1(runs: int, repeats: int, compile_: bool, variants: list[str] | None = None) -> dict:
    """P1 in both settings (see the module docstring)."""
    out = {
        "shape": {"batch": 64, "tokens": 64, "d_in": 256, "d_out": 768, "m": 10, "r": 4, "T": 4001},
        "runs": runs,
        "repeats": repeats,
        "targets": {"base_trained": 1.10, "base_frozen": 1.20},
    }
    for name, frozen in (("base_trained", False), ("base_frozen", True)):
        out[name] = _p1_setting(frozen, runs, repeats, compile_, variants)
    return out


def bench_sampling(repeats: int, iters: int, batch: int) -> dict:
    from difflora.cli.commands import resolve_config_path
    from difflora.config.schema import load_config
    from difflora.model.build import build_model

    torch.manual_seed(0)
    models = {}
    for name, preset in (("embedding_unet", "paper/iddpm-cifar10"), ("timelora_unet", "paper/timelora-linear")):
        cfg = load_config(resolve_config_path(preset))
        model = build_model(cfg).eval()
        with torch.no_grad():  # trained-looking adapters
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(0, 0.02)
        models[name] = (cfg, model)
    cfg = models["embedding_unet"][0]
    x = torch.randn(batch, 3, 32, 32)
    steps = cfg.diffusion.steps
    counter = {"i": 0}

    def step(model, merged=False):
        def f():
            # A new timestep at each call, as in a sampler: the TimeLoRA merge is paid every step
            # (and the unmerge on leaving the block, which a sampler pays once per draw).
            counter["i"] += 1
            t = torch.full((batch,), (counter["i"] * 37) % steps)
            with torch.no_grad(), model.merged("t") if merged else contextlib.nullcontext():
                model(x, t)

        return f

    emb, tl = models["embedding_unet"][1], models["timelora_unet"][1]
    fns = {
        "embedding_unet": step(emb),
        "timelora_unet_merged": step(tl, merged=True),
        "timelora_unet_per_sample": step(tl),  # no merge: the training-time path, for reference
    }
    res = interleaved(fns, repeats, iters)
    ratios = {
        "timelora_merged_over_embedding_unet": res["timelora_unet_merged"]["median_ms"]
        / res["embedding_unet"]["median_ms"],
        "timelora_per_sample_over_embedding_unet": res["timelora_unet_per_sample"]["median_ms"]
        / res["embedding_unet"]["median_ms"],
    }
    params = {k: sum(p.numel() for p in m.parameters()) for k, (_, m) in models.items()}
    return {
        "config": "000 CIFAR-10 U-Net, 32x32, 128 channels",
        "batch": batch,
        "params": params,
        "times": res,
        "ratios": ratios,
    }


def main_p1(args: argparse.Namespace) -> None:
    env = machine(args)
    faults = minor_faults()
    p1 = bench_p1(args.runs, args.p1_repeats, args.compile, args.variants)
    env["minor_page_faults"] = minor_faults() - faults
    print(
        f"P1: adapted qkv Conv1d 256->768 fwd+bwd, {p1['shape']}, fastest of {args.runs} alternated runs, x{args.p1_repeats}"
    )
    print(
        f" measured with {describe(env)}; {env['minor_page_faults']} minor page faults in the part (set-up and checks included)"
    )
    for setting in ("base_trained", "base_frozen"):
        target = p1["targets"][setting]
        print_ratio_table(
            f" {setting} (target adapted <= {target:.2f}x); ratio over plain:", p1[setting]["ratio_over_plain"]
        )
        fastest = {k: min(v) for k, v in p1[setting]["fastest_ms"].items()}
        print("  fastest ms: " + ", ".join(f"{k} {v:.1f}" for k, v in fastest.items()))
    p1["env"] = {**env, "load_average_after": load_average()}
    # A --compile run goes to its own file: its compile time and extra variant change the alternation.
    default = "adapters_p1_compile.json" if args.compile else "adapters_p1.json"
    out = ROOT / "benchmarks" / "results" / (args.out_name or default)
    out.write_text(json.dumps(p1, indent=1))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and a smaller sampling batch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--sample-batch", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adapters.json"))
    ap.add_argument(
        "--part", choices=["layer", "p1", "forms"], default="layer", help="layer: the 000 layer and sampling step"
    )
    ap.add_argument("--runs", type=int, default=25, help="p1 / forms: alternated runs per repeat")
    ap.add_argument("--p1-repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="p1: also time torch.compile of the adapted forward (slow)")
    ap.add_argument("--out-name", default=None, help="p1 / forms: the results file's name in benchmarks/results/")
    ap.add_argument(
        "--variants",
        type=lambda v: v.split(","),
        default=None,
        help="p1 / forms: time only these variants besides plain, comma-separated (a loaded machine's shorter run)",
    )
    add_device_argument(ap)
    add_allocator_argument(ap)
    args = ap.parse_args()
    if args.allocator == "steady" and not steady_allocator():
        args.allocator = "glibc (steady not available here)"
    torch.set_num_threads(args.threads)
    # Every tensor and module the parts create is made on --device (their timers synchronise it).
    torch.set_default_device(args.device)
    print(machine_line(devices.machine(args.device)), flush=True)
    if args.part == "p1":
        return main_p1(args)
    if args.part == "forms":
        return main_forms(args)
    repeats = 5 if args.quick else 11
    sample_batch = args.sample_batch or (4 if args.quick else 16)

    layer = bench_layer(repeats, iters=5 if args.quick else 10)
    print(f"adapted qkv Conv1d 256->768, fwd+bwd, {layer['shape']}")
    for k, v in layer["times"].items():
        print(
            f"  {k:<22}{v['median_ms']:>10.3f} ms   (min {v['min_ms']:.3f}, max {v['max_ms']:.3f}, spread {v['spread']:.0%})"
        )
    for k, v in layer["ratios"].items():
        print(f"  {k:<40}{v:>8.2f}x")

    sampling = bench_sampling(max(3, repeats // 2), iters=1 if args.quick else 2, batch=sample_batch)
    print(f"one sampling step, {sampling['config']}, batch {sampling['batch']}, params {sampling['params']}")
    for k, v in sampling["times"].items():
        print(
            f"  {k:<26}{v['median_ms']:>10.1f} ms   (min {v['min_ms']:.1f}, max {v['max_ms']:.1f}, spread {v['spread']:.0%})"
        )
    for k, v in sampling["ratios"].items():
        print(f"  {k:<40}{v:>8.2f}x")

    checks = {
        "adapted_linear_over_plain <= 1.10": layer["ratios"]["adapted_linear_over_plain"] <= 1.10,
        "naive_batched_over_adapted_linear >= 5": layer["ratios"]["naive_batched_over_adapted_linear"] >= 5.0,
        "timelora_merged_over_embedding_unet <= 1.0": sampling["ratios"]["timelora_merged_over_embedding_unet"] <= 1.0,
    }
    for k, ok in checks.items():
        print(f"target {k}: {'met' if ok else 'MISSED'}")
    result = {
        "layer": layer,
        "sampling": sampling,
        "targets": checks,
        "env": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "repeats": repeats,
            "quick": args.quick,
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
