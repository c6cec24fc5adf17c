"""The papers' tables on their real architectures (issue 30, item 4), built from the published
configs with random weights (memory, time and parameter counts do not depend on the weights;
nothing is downloaded).

Architectures (the configs are written out below): the Stable Diffusion 1.5 UNet
(``UNet2DConditionModel``, 859,520,964 parameters, checked), SD's VAE (``AutoencoderKL``) and the
CLIP ViT-L/14 text encoder; DiT-XL/2 at 256 px (latents 32 x 32 x 4, patch 2, 28 layers, hidden
1152, 16 heads, 1000 classes, learned variance: 8 output channels) with the SD VAE, as difflora's
own DiT (where the Affiner and masked training live; diffusers' ``DiTTransformer2DModel`` is counted
beside it).

Rows, each in a fresh subprocess (its peak resident set is its own, ``ru_maxrss`` of the child),
one after another, ``OMP_NUM_THREADS=2``; a training row times one step (wall clock) after a
warm-up step. The frozen VAE and text encoder are in memory in every SD row (as in the papers'
training scripts) and encode the batch once; the step is the denoiser's forward, backward and
AdamW update (``foreach=False``: no optimizer temporaries the size of the model).

* ``counts``: parameter counts; 004's recipe (a linear position adapter ``attn2_out -> ff_in`` in
  every transformer block, ``src/difflora/presets/experiments/design-space``) at difflora's rank 8
  and at bottleneck c / 4 (004's width), LoRA on the attention projections at rank 4 and 8, as a
  fraction of the UNet; the rank-4 LoRA's FLOP share of a UNet forward (base FLOPs counted by
  ``torch.utils.flop_counter`` with math attention, LoRA FLOPs ``2 n r (in + out)`` per layer from
  the shapes); the Affiner's parameters per task on DiT-XL/2.
* 003 Table 1 (SD UNet, batch 1, 64 x 64 latents, context 77 x 768): ``baseline`` (the UNet fully
  trained, diffusion loss), ``usual distill`` (the same plus a frozen teacher copy, guided target
  from a forward of 2), ``lora`` (rank 4 on ``to_q/k/v/out.0`` of both attentions, base frozen),
  ``lora distill`` (difflora's 003 student: the teacher is the same module with the LoRA off,
  ``adapters_disabled``). In fp32 and, where the CPU has native bf16 (``avx512_bf16`` or
  ``amx_bf16``), bf16 mixed precision as the diffusers training scripts run it: trained weights
  fp32, frozen weights bf16, the forward under ``torch.autocast``.
* ``sample``: forward passes per sampling step (guided teacher 2, fused student 1) and the measured
  time of the guided teacher (a batch of 2, and two calls of 1) over the student (one call of 1).
* 002 on DiT-XL/2: ``dit affiner`` (d = 64, base frozen), ``dit affiner masked`` (mask ratio 0.5,
  002's masked DiT training) and ``dit full`` (every weight trained), hybrid loss, batch 2.
* ``overhead``: in one process, alternating (ABBA), the step of the frozen UNet with only the input
  requiring gradients against the same UNet with the rank-4 LoRA trained (same graph), beside the
  FLOP share.

Before each row its peak is estimated (weights x bytes x (1 + grads + 2 Adam states) +
activations) and checked against ``MemAvailable``: a row that would leave less than 3 GB is skipped
and says so. The full-training SD rows run last.

    python benchmarks/bench_real_arch.py            # ~25 min (2 shared cores); writes benchmarks/results/real_arch.json
    python benchmarks/bench_real_arch.py --quick    # 256 px SD, 128 px DiT: ~15 min on 2 busy cores (the UNet's weights, not its latents, set a step's cost), real_arch_quick.json
    ... --rows counts sample                        # some rows only (the file keeps the others)
    ... --device cuda                               # on a GPU: peaks are the CUDA allocator's, times wall
                                                    # seconds between synchronisations; counts stay on the CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from devices import add_device_argument, clock, machine, machine_line, wall
from real_arch_models import DIT_XL2, SD_VAE, UNET_PARAMS, VAE_SCALE, build_sd, dit_cfg, encode_sd, wrap

from difflora.model.accounting import peak_memory_mb

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
MARGIN_GB = 3.0

AFFINER_PARAMS = 48_448_652
LORA_TARGETS = [r"re:.*attn[12]\.(to_q|to_k|to_v|to_out\.0)"]
RECIPE_TARGETS = [r"re:.*transformer_blocks\.\d+"]
PAPER_003 = {"baseline": 21.0, "usual distill": 24.4, "lora": 9.6, "lora distill": 10.3}
GUIDANCE = 7.5
SD_SETTINGS = ["lora", "lora distill", "baseline", "usual distill"]  # full training last
DIT_SETTINGS = {"dit affiner": ("affiner", 0.0), "dit affiner masked": ("affiner", 0.5), "dit full": ("full", 0.0)}


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 2**20


def estimate_gb(row: str, dtype: str, latent: int, batch: int) -> float:
    """The row's peak: weights x bytes x (1 + grads + 2 Adam states) + frozen weights + activations
    (measured: ~2.5 GB for the SD UNet's fp32 backward at 64 x 64, batch 1) + ~0.6 GB of runtime."""
    frozen_bytes = 2 if dtype == "bf16" else 4
    act = 2.5 * (latent / 64) ** 2 * batch * (0.6 if dtype == "bf16" else 1.0)
    if row.startswith("dit"):
        trained = 0.675 if "full" in row else 0.048
        base = 0 if "full" in row else 0.675 * 4
        act = 1.0 * (latent / 32) ** 2 * batch * (0.5 if "masked" in row else 1.0)
        return trained * 16 + base + 0.33 + act + 0.6
    encoders = 0.207 * frozen_bytes
    if row in ("baseline", "usual distill"):
        teacher = 0.86 * frozen_bytes if row == "usual distill" else 0.0
        return 0.86 * 16 + teacher + encoders + act + 0.6
    if row in ("counts", "sample"):
        return 0.86 * 4 * 2 + encoders + 1.5
    return 0.86 * frozen_bytes + 0.01 + encoders + act + 0.6


def run_row(spec: dict, estimate: float) -> dict:
    """One row in a fresh subprocess, or a "skipped" entry when it would not fit."""
    label = {"row": spec.get("setting", spec["kind"]), **{k: v for k, v in spec.items() if k == "dtype"}}
    available = mem_available_gb()
    if estimate + MARGIN_GB > available:
        reason = f"skipped: needs ~{estimate:.1f} GB, {available:.1f} GB available (margin {MARGIN_GB:.0f} GB)"
        return {**label, "skipped": reason, "estimate_gb": estimate}
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(ROOT / "src")
    res = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        tail = res.stderr.strip().splitlines()[-3:]
        return {**label, "failed": f"exit {res.returncode}: {' | '.join(tail)}", "estimate_gb": estimate}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out.update(estimate_gb=estimate, available_gb_before=available)
    return out


# --- inside a row's subprocess -------------------------------------------------------------------


def peak_gb(device: torch.device) -> float:
    """Peak resident set size on a CPU, the CUDA allocator's peak on a GPU."""
    return peak_memory_mb(device) / 2**10


def inject_lora(model, name: str, rank: int, distill: bool) -> None:
    """Rank-``rank`` LoRA on both attentions' projections: shared (003's "+ LoRA") or the 003
    student's (condition ``distill``, one entry, off for the teacher), the base frozen."""
    from difflora.adapters import IndexWeighting, SharedWeighting, freeze_base, inject_adapter

    if distill:
        inject_adapter(model, name, lambda: IndexWeighting(1), "distill", LORA_TARGETS, rank=rank)
    else:
        inject_adapter(model, name, SharedWeighting, "t", LORA_TARGETS, rank=rank)
    freeze_base(model)


def cast_frozen(model, dtype) -> None:
    """Frozen weights to ``dtype`` (bf16 mixed precision), trained ones stay fp32."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


def sd_setup(setting: str, unet, dtype):
    """(model, loss(latents, ctx, null, t, noise), trained parameters) of one 003 setting."""
    model = wrap(unet)
    model.requires_grad_(False)
    teacher = None
    if setting in ("baseline", "usual distill"):
        unet.requires_grad_(True)
        if setting == "usual distill":
            teacher = copy.deepcopy(model).eval().requires_grad_(False).to(dtype)
    else:
        inject_lora(model, "distill" if setting == "lora distill" else "lora", 4, setting == "lora distill")
    cast_frozen(model, dtype)
    params = [p for p in model.parameters() if p.requires_grad]

    def guided(net, x, t, ctx, null):
        with torch.no_grad():  # the teacher: one forward of 2N (prompt, empty prompt)
            both = net(torch.cat([x, x]), torch.cat([t, t]), context=torch.cat([ctx, null])).float()
        cond, uncond = both.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    def loss(latents, ctx, null, t, noise):
        x = latents + noise
        if setting in ("baseline", "lora"):
            return (model(x, t, context=ctx).float() - noise).square().mean()
        if setting == "usual distill":
            return (model(x, t, context=ctx).float() - guided(teacher, x, t, ctx, null)).square().mean()
        with model.adapters_disabled("distill"):
            target = guided(model, x, t, ctx, null)
        student = model(x, t, context=ctx, distill=torch.zeros(len(t), dtype=torch.long, device=t.device))
        return (student.float() - target).square().mean()

    return model, loss, params


def timed_steps(loss_fn, params, autocast: bool, device: torch.device, steps: int = 2) -> list[tuple[float, float]]:
    """``steps`` training steps (forward, backward, AdamW); (wall, CPU) seconds of each. CPU time
    (both threads) is the step's own work, robust to the other jobs of the shared machine (on CUDA
    both are wall seconds between synchronisations)."""
    optim = torch.optim.AdamW(params, lr=1e-5, foreach=False) if params else None
    times = []
    for _ in range(steps):
        t0, c0 = wall(device), clock(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn()
        loss.backward()
        if optim is not None:
            optim.step()
            optim.zero_grad(set_to_none=True)
        times.append((wall(device) - t0, clock(device) - c0))
    return times


def sd_row(setting: str, dtype_name: str, size: int, device: torch.device) -> dict:
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    t0 = time.perf_counter()
    unet, vae, text = build_sd(dtype)
    latents, ctx, null = (v.to(device) for v in encode_sd(vae, text, size, 1))
    model, loss, params = sd_setup(setting, unet.to(device), dtype)
    g = torch.Generator().manual_seed(1)
    t, noise = torch.randint(0, 1000, (1,), generator=g), torch.randn(latents.shape, generator=g)
    t, noise = t.to(device), noise.to(device)
    times = timed_steps(lambda: loss(latents, ctx, null, t, noise), params, dtype_name == "bf16", device)
    return {
        "row": setting,
        "dtype": dtype_name,
        "image_px": size,
        "latent": list(latents.shape),
        "trained_params": sum(p.numel() for p in params),
        "warmup_s": times[0][0],
        "step_s": times[1][0],
        "step_cpu_s": times[1][1],
        "seconds": time.perf_counter() - t0,
        "peak_rss_gb": peak_gb(device),
    }


def lora_flops(model, rank: int):
    """Forward hooks on the LoRA targets adding ``2 n r (in + out)`` per call; returns (handles, total)."""
    from difflora.adapters import find_targets

    total = [0]

    def hook(module, args, out):
        n = args[0].numel() // module.in_features
        total[0] += 2 * n * rank * (module.in_features + module.out_features)

    handles = [model.get_submodule(p).register_forward_hook(hook) for p in find_targets(model, LORA_TARGETS)]
    return handles, total


def adapter_count(model, inject) -> int:
    """Parameters ``inject(model)`` adds (the adapters are deleted again)."""
    from difflora.adapters import adapter_names, delete_adapter

    before = sum(p.numel() for p in model.parameters())
    inject(model)
    added = sum(p.numel() for p in model.parameters()) - before
    for name in adapter_names(model):
        delete_adapter(model, name)
    return added


def sd_counts(latent: int) -> dict:
    """UNet / VAE / text encoder counts, 004's recipe and LoRA as fractions, the LoRA's FLOP share."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from difflora.adapters import SharedWeighting, inject_adapter, inject_position_adapter

    unet, vae, text = build_sd(torch.float32)
    n_unet = sum(p.numel() for p in unet.parameters())
    assert n_unet == UNET_PARAMS, f"SD 1.5 UNet config gives {n_unet:,} parameters, not {UNET_PARAMS:,}"
    out = {"unet": n_unet, "vae": sum(p.numel() for p in vae.parameters())}
    out["text_encoder"] = sum(p.numel() for p in text.parameters())
    model = wrap(unet)
    blocks = [(p, m) for p, m in model.named_modules() if re.fullmatch(r".*transformer_blocks\.\d+", p)]
    widths = sorted({m.norm1.normalized_shape[0] for _, m in blocks})

    def recipe(rank_of):
        def inject(m):
            for c in widths:
                paths = [p for p, b in blocks if b.norm1.normalized_shape[0] == c]
                inject_position_adapter(m, f"pa{c}", SharedWeighting, "t", paths, "attn2_out", "ff_in", rank_of(c))

        return inject

    fractions = {
        "recipe_004_rank8": adapter_count(model, recipe(lambda c: 8)),
        "recipe_004_width_c/4": adapter_count(model, recipe(lambda c: c // 4)),
        **{
            f"lora_attn_rank{r}": adapter_count(
                model, lambda m, r=r: inject_adapter(m, "l", SharedWeighting, "t", LORA_TARGETS, rank=r)
            )
            for r in (4, 8)
        },
    }
    out["transformer_blocks"] = {str(c): sum(b.norm1.normalized_shape[0] == c for _, b in blocks) for c in widths}
    out["added"] = {k: {"params": v, "fraction_of_unet": v / n_unet} for k, v in fractions.items()}
    handles, lora = lora_flops(model, 4)
    x, ctx = torch.randn(1, 4, latent, latent), torch.randn(1, 77, 768)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([500]), context=ctx)
    for h in handles:
        h.remove()
    base = counter.get_total_flops()
    out["forward_flops"] = {"latent": latent, "unet": base, "lora_rank4": lora[0], "lora_share": lora[0] / base}
    return out


def dit_counts() -> dict:
    from diffusers import DiTTransformer2DModel

    from difflora.model.accounting import parameter_counts
    from difflora.model.build import build_model

    torch.manual_seed(0)
    out = {"diffusers_dit_xl2": sum(p.numel() for p in DiTTransformer2DModel(**DIT_XL2).parameters())}
    counts = parameter_counts(build_model(dit_cfg("affiner", 0.0, 32)))
    out["difflora_dit_xl2_base"] = counts["total"] - counts["trainable"]
    out["affiner_per_task"] = counts["per_task"]["stored_per_task"]
    assert out["affiner_per_task"] == AFFINER_PARAMS, f"Affiner per task {out['affiner_per_task']:,}"
    return out


def dit_row(setting: str, latent: int, batch: int, device: torch.device) -> dict:
    """One 002 setting on DiT-XL/2: the SD VAE encodes the batch, then difflora's objective trains."""
    from diffusers import AutoencoderKL

    from difflora.model.build import build_diffusion, build_model
    from difflora.train.objectives import Batch, build_objective

    kind, ratio = DIT_SETTINGS[setting]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        image = torch.rand(batch, 3, 8 * latent, 8 * latent, generator=g) * 2 - 1
        latents = vae.encode(image).latent_dist.sample(generator=g) * VAE_SCALE
    cfg = dit_cfg(kind, ratio, latent)
    model = build_model(cfg).to(device)
    objective = build_objective(cfg, build_diffusion(cfg))
    conditions = {"y": torch.randint(0, 1000, (batch,), generator=g).to(device)}
    if kind == "affiner":
        conditions["task"] = torch.zeros(batch, dtype=torch.long, device=device)
    data = Batch(latents.to(device), conditions)
    params = [p for p in model.parameters() if p.requires_grad]
    times = timed_steps(lambda: objective(model, data, g, device)["loss"].mean(), params, False, device)
    return {
        "row": setting,
        "dtype": "fp32",
        "image_px": 8 * latent,
        "latent": list(latents.shape),
        "mask_ratio": ratio,
        "trained_params": sum(p.numel() for p in params),
        "warmup_s": times[0][0],
        "step_s": times[1][0],
        "step_cpu_s": times[1][1],
        "seconds": time.perf_counter() - t0,
        "peak_rss_gb": peak_gb(device),
    }


def best_of(fn, reps: int, device: torch.device) -> float:
    """The fastest of ``reps`` calls, in CPU seconds of the process (on CUDA wall seconds)."""
    best = float("inf")
    for _ in range(reps):
        t0 = clock(device)
        fn()
        best = min(best, clock(device) - t0)
    return best


def sample_row(latent: int, reps: int, device: torch.device) -> dict:
    """One sampling step of the guided teacher (2 passes: a batch of 2, or two calls) and of the fused
    student (1 pass: the same plain UNet, the LoRA written into its weights), no grad, fp32."""
    unet = build_sd(torch.float32)[0].eval().requires_grad_(False)
    model = wrap(unet).to(device)
    x, ctx = torch.randn(1, 4, latent, latent, device=device), torch.randn(1, 77, 768, device=device)
    null, t = torch.randn(1, 77, 768, device=device), torch.tensor([500], device=device)
    runs = {
        "teacher_batch2": lambda: model(torch.cat([x, x]), torch.cat([t, t]), context=torch.cat([ctx, null])),
        "teacher_2calls": lambda: (model(x, t, context=ctx), model(x, t, context=null)),
        "student": lambda: model(x, t, context=ctx),
    }
    with torch.no_grad():
        runs["student"]()  # warm-up
        best = {k: best_of(fn, reps, device) for k, fn in runs.items()}
    return {
        "row": "sample",
        "latent": latent,
        "passes_per_step": {"guided_teacher": 2, "fused_student": 1},
        "cpu_seconds": best,
        "teacher_batch2_over_student": best["teacher_batch2"] / best["student"],
        "teacher_2calls_over_student": best["teacher_2calls"] / best["student"],
        "peak_rss_gb": peak_gb(device),
    }


def overhead_row(latent: int, rounds: int, device: torch.device) -> dict:
    """ABBA: the frozen UNet with the input requiring gradients (A) against the rank-4 LoRA trained (B)."""
    unet = build_sd(torch.float32)[0]
    model = wrap(unet)
    inject_lora(model, "lora", 4, False)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    x, ctx = torch.randn(1, 4, latent, latent, device=device), torch.randn(1, 77, 768, device=device)
    t = torch.tensor([500], device=device)

    def input_grad():
        with model.adapters_disabled("lora"):
            return model(x.clone().requires_grad_(True), t, context=ctx).square().mean()

    def lora():
        return model(x, t, context=ctx).square().mean()

    steps = {
        "input_grad": lambda: timed_steps(input_grad, [], False, device, 1)[0],
        "lora": lambda: timed_steps(lora, params, False, device, 1)[0],
    }
    for fn in steps.values():
        fn()  # warm-up
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in steps}
    order = list(steps)
    for _ in range(rounds):
        for key in order:
            times[key].append(steps[key]())
        order.reverse()
    best = {k: min(c for _, c in v) for k, v in times.items()}  # CPU seconds
    return {
        "row": "overhead",
        "latent": latent,
        "trained_params": sum(p.numel() for p in params),
        "wall_cpu_s": times,
        "best_cpu_s": best,
        "lora_over_input_grad": best["lora"] / best["input_grad"],
        "peak_rss_gb": peak_gb(device),
    }


def run_one(spec: dict) -> dict:
    torch.set_num_threads(THREADS)
    kind, device = spec["kind"], torch.device(spec.get("device", "cpu"))
    if kind == "counts":  # parameter and FLOP counts: on the CPU whatever the device
        cpu = torch.device("cpu")
        return {"row": "counts", "sd": sd_counts(spec["latent"]), "dit": dit_counts(), "peak_rss_gb": peak_gb(cpu)}
    if kind == "sd":
        return sd_row(spec["setting"], spec["dtype"], spec["size"], device)
    if kind == "dit":
        return dit_row(spec["setting"], spec["latent"], spec["batch"], device)
    if kind == "sample":
        return sample_row(spec["latent"], spec["reps"], device)
    return overhead_row(spec["latent"], spec["rounds"], device)


# Full and quick sizes: SD image px, DiT latent side and batch, sampling and overhead latent sides.
SIZES = {
    "full": {"sd": 512, "dit": 32, "dit_batch": 2, "sample": 64, "reps": 1, "overhead": 32, "rounds": 2},
    "quick": {"sd": 256, "dit": 16, "dit_batch": 1, "sample": 32, "reps": 1, "overhead": 16, "rounds": 2},
}


def plan(size: dict, dtypes: list[str]) -> list[tuple[dict, float]]:
    """Every row with its memory estimate, in running order (the full-training SD rows last)."""
    lat = size["sd"] // 8
    rows: list[tuple[dict, float]] = [
        ({"kind": "counts", "latent": lat}, estimate_gb("counts", "fp32", lat, 1)),
        ({"kind": "sample", "latent": size["sample"], "reps": size["reps"]}, estimate_gb("sample", "fp32", lat, 1)),
        (
            {"kind": "overhead", "latent": size["overhead"], "rounds": size["rounds"]},
            estimate_gb("lora", "fp32", lat, 1),
        ),
    ]
    for setting in DIT_SETTINGS:
        spec = {"kind": "dit", "setting": setting, "latent": size["dit"], "batch": size["dit_batch"]}
        rows.append((spec, estimate_gb(setting, "fp32", size["dit"], size["dit_batch"])))
    for setting in SD_SETTINGS:
        for dtype in dtypes:
            rows.append(
                (
                    {"kind": "sd", "setting": setting, "dtype": dtype, "size": size["sd"]},
                    estimate_gb(setting, dtype, lat, 1),
                )
            )
    return rows


def table_003(rows: list[dict]) -> dict:
    """Per dtype: each 003 setting's peak RSS and its ratio to the baseline, beside 003's GB and ratio."""
    out: dict = {}
    for dtype in sorted({r["dtype"] for r in rows if r.get("row") in PAPER_003}):
        by = {r["row"]: r for r in rows if r.get("row") in PAPER_003 and r["dtype"] == dtype}
        base = by.get("baseline", {}).get("peak_rss_gb")
        out[dtype] = {
            key: {
                "peak_rss_gb": by.get(key, {}).get("peak_rss_gb"),
                "step_s": by.get(key, {}).get("step_s"),
                "over_baseline": by[key]["peak_rss_gb"] / base if base and "peak_rss_gb" in by.get(key, {}) else None,
                "paper_gb": gb,
                "paper_over_baseline": gb / PAPER_003["baseline"],
                **{k: by[key][k] for k in ("skipped", "failed") if k in by.get(key, {})},
            }
            for key, gb in PAPER_003.items()
        }
    return out


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def report(result: dict) -> None:
    rows = {(r["row"], r.get("dtype")): r for r in result["rows"]}
    print(f"CPU: {result['cpu']}")
    for r in result["rows"]:
        if "skipped" in r or "failed" in r:
            print(f"  {r['row']} {r.get('dtype', '')}: {r.get('skipped') or r.get('failed')}")
    print("003 Table 1 (SD 1.5 UNet, batch 1): peak RSS GB (x baseline), step s; paper GB (x baseline)")
    for dtype, by in result["table_003"].items():
        for key, r in by.items():
            print(
                f"  {dtype:4s} {key:14s} {_fmt(r['peak_rss_gb'], '6.2f', '     -')} GB "
                f"({_fmt(r['over_baseline'], '.2f')}x) step {_fmt(r['step_s'], '6.1f', '     -')} s"
                f"   paper {r['paper_gb']:4.1f} GB ({r['paper_over_baseline']:.2f}x)"
            )
    if ("sample", None) in rows:
        s = rows[("sample", None)]
        print(
            f"sampling step (latent {s['latent']}): passes teacher 2, student 1; teacher/student time "
            f"batch of 2 {s['teacher_batch2_over_student']:.2f}x, two calls {s['teacher_2calls_over_student']:.2f}x"
        )
    if ("counts", None) in rows:
        c = rows[("counts", None)]
        print(f"counts: {json.dumps(c['sd']['added'])}")
        print(f"  UNet {c['sd']['unet']:,}, VAE {c['sd']['vae']:,}, text {c['sd']['text_encoder']:,}; {c['dit']}")
        print(f"  forward FLOPs: {c['sd']['forward_flops']}")
    for key in DIT_SETTINGS:
        r = rows.get((key, "fp32"), {})
        if "step_s" in r:
            print(
                f"002 {key:20s} peak {r['peak_rss_gb']:6.2f} GB, step {r['step_s']:6.1f} s, trained {r['trained_params']:,}"
            )
    if ("overhead", None) in rows:
        o = rows[("overhead", None)]
        print(
            f"overhead (latent {o['latent']}): LoRA r4 step / input-grad step {o['lora_over_input_grad']:.3f} (CPU s {o['best_cpu_s']})"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="256 px SD, 128 px DiT at batch 1: about half the full run")
    p.add_argument("--rows", nargs="+", choices=["counts", "sample", "overhead", "dit", "sd"], help="only these kinds")
    p.add_argument("--out", help="results file (default benchmarks/results/real_arch[_quick].json)")
    add_device_argument(p)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    torch.set_num_threads(THREADS)
    cpu = machine(args.device) | {"cpus": os.cpu_count()}
    print(machine_line(cpu), flush=True)
    dtypes = ["fp32", "bf16"] if cpu["native_bf16"] else ["fp32"]
    mode = "quick" if args.quick else "full"
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"real_arch{'_quick' if args.quick else ''}.json")
    old = json.loads(out.read_text())["rows"] if out.exists() and args.rows else []
    rows = []
    for spec, estimate in plan(SIZES[mode], dtypes):
        if args.rows and spec["kind"] not in args.rows:
            continue
        rows.append(run_row(spec | {"device": str(args.device)}, estimate))
        print(json.dumps(rows[-1]), flush=True)
    keys = {(r["row"], r.get("dtype")) for r in rows}
    rows = [r for r in old if (r["row"], r.get("dtype")) not in keys] + rows  # a partial run keeps the others
    result = {
        "mode": mode,
        "sizes": SIZES[mode],
        "cpu": cpu,
        "bf16": "run (native bf16)" if cpu["native_bf16"] else "not run: no avx512_bf16 / amx_bf16",
        "rows": rows,
        "table_003": table_003(rows),
        "note": "random weights; peak RSS of a fresh process per row (interpreter + torch included); wall-clock "
        f"step time after a warm-up step, {THREADS} threads on a shared CPU",
    }
    report(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
