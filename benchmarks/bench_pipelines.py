"""Latent and text pipelines in a run: is the data path the bottleneck, and what do the caches save?

Two pipeline folders are built from configs with random weights (values do not matter for speed or
memory) and written with ``save_pretrained``, as a user has them on disk; they are the test
fixtures' pipelines (tests/latent_pipelines.py) at the largest size that runs here in a few minutes:

* ``dit``: a class-conditional DiTTransformer2DModel shaped as DiT-S/2 (12 layers, 384 wide, 6
  heads, patch 2, learned variance) on the 4-channel latents of an AutoencoderKL with Stable
  Diffusion's four-block layout at a quarter of its width (32, 64, 128, 128; downsampling 8);
* ``sd``: a UNet2DConditionModel (64, 128, 256, 256 channels, cross-attention 384 wide) with the
  same VAE, a CLIPTextModel (6 layers, 384 wide, 77 tokens) and a CLIPTokenizer (letters; its
  vocabulary and merges are written here).

The data: ``--num`` smooth random ``--size`` px PNGs in three class folders, with captions. Each run
adapts the denoiser with a TimeLoRA (rank 4, 11 bases) on its attention projections, base frozen.

(a) Throughput, in one process, the variants alternated, the fastest of ``--reps`` (CPU seconds of
the process, one thread, so other load on the machine does not count):

* ``folder``: images/s decoding the folder's files (decode, resize, centre crop), what a loop that
  encodes every batch reads; ``cached``: samples/s drawing batches of latents (and contexts) from
  the caches, what difflora's loop reads;
* ``step``: images/s of one adapter training step (the run's objective, forward, backward, AdamW)
  from cached latents; ``encode + step``: the same step after encoding its batch with the VAE (and
  its captions with the text encoder).

(b) Peak resident set size (``ru_maxrss``), each variant in a fresh process: ``train()`` of the run
from existing caches (the VAE and text encoder never loaded), and the same with both loaded and run
on one batch first, as a loop that encoded every batch would hold them.

    OMP_NUM_THREADS=1 python benchmarks/bench_pipelines.py     # writes benchmarks/results/pipelines.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_real_arch import best_of
from devices import add_device_argument, machine

ROOT = Path(__file__).resolve().parents[1]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VAE = {
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 64, 128, 128],
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
DIT = {
    "in_channels": 4,
    "out_channels": 8,
    "num_attention_heads": 6,
    "attention_head_dim": 64,
    "num_layers": 12,
    "patch_size": 2,
    "num_embeds_ada_norm": 3,
}
UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [64, 128, 256, 256],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 384,
}
TEXT = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 6}
TIME_LORA = {"name": "time", "condition": "t", "weighting": "linear", "num_values": 1000, "num_bases": 11, "rank": 4}


def _pipelines(work: Path, size: int, num: int) -> None:
    """The two pipeline folders and the captioned image folder."""
    import diffusers
    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    latent = size // 8
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    dit = diffusers.DiTPipeline(
        transformer=diffusers.DiTTransformer2DModel(sample_size=latent, **DIT),
        vae=diffusers.AutoencoderKL(**VAE),
        scheduler=scheduler,
    )
    dit.save_pretrained(work / "dit")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab |= {w: i + 2 for i, w in enumerate([*LETTERS, *(c + "</w>" for c in LETTERS)])}
    (work / "vocab.json").write_text(json.dumps(vocab))
    (work / "merges.txt").write_text("#version: 0.2\n")
    files = (str(work / "vocab.json"), str(work / "merges.txt"))
    tokenizer = CLIPTokenizer(*files, model_max_length=77, pad_token="<|endoftext|>")
    text = CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, **TEXT)
    diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(**VAE),
        text_encoder=CLIPTextModel(text),
        tokenizer=tokenizer,
        unet=diffusers.UNet2DConditionModel(sample_size=latent, **UNET),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(work / "sd")
    rng, rows = np.random.default_rng(0), []
    for i in range(num):
        name = f"c{i % 3}/{i:04d}.png"
        (work / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(work / "images" / name)
        rows.append({"file_name": name, "text": f"a photo of {LETTERS[i % 26] * (1 + i % 4)} number {i % 7}"})
    (work / "images" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _config(work: Path, which: str, batch: int, device: str, steps: int = 2):
    from difflora.config.schema import parse_config

    return parse_config(
        {
            "data": {"name": "image-folder", "root": str(work / "images"), "index_cache": str(work / "index")},
            "model": {
                "pretrained": str(work / which),
                "adapters": [TIME_LORA],
                "latent": {"cache": str(work / "cache" / which / "latents")},
                **({"text": {"cache": str(work / "cache" / which / "prompts")}} if which == "sd" else {}),
            },
            "train": {"train_base": False, "steps": steps, "batch_size": batch, "ckpt_every": steps, "device": device},
            "sample": {"num": 2, "steps": 2},
        }
    )


def _train(work: Path, which: str, batch: int, with_encoders: bool, device: str) -> dict:
    """One ``train()`` from the caches (built by the caller first); with_encoders: VAE and text encoder held."""
    import torch

    from difflora.train import train

    cfg = _config(work, which, batch, device)
    held = _encoders(cfg, work) if with_encoders else None
    if held is not None:
        _encode_batch(held, cfg, batch)
    result = train(
        cfg, work / "runs" / f"{which}-{int(with_encoders)}-{time.time_ns()}", progress=False, log=lambda s: None
    )
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
        "diffusers_vae_loaded": held is not None,
        "trainable": result["accounting"]["parameters"]["trainable"],
        "params": result["accounting"]["parameters"]["total"],
        "threads": torch.get_num_threads(),
    }


def _encoders(cfg, work: Path) -> dict:
    from transformers import CLIPTextModel, CLIPTokenizer

    from difflora.data.folder_index import index_folder
    from difflora.model.pipeline import load_vae
    from difflora.train.pipeline_data import FolderImages

    index = index_folder(cfg.data, "train")
    held = {"vae": load_vae(cfg), "images": FolderImages(index, cfg.data), "captions": index.captions}
    folder = Path(cfg.model.pretrained)
    if cfg.model.text is not None:
        held["tokenizer"] = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        held["text_encoder"] = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    return held


def _encode_batch(held: dict, cfg, batch: int, start: int = 0) -> tuple:
    """Read, decode and encode one batch of images (and captions): a loop without caches does this per step."""
    import torch

    from difflora.latent import encode_images, encode_prompts

    rows = [(start + i) % len(held["images"]) for i in range(batch)]
    with torch.no_grad():
        images = torch.stack([held["images"][i] for i in rows])
        z = encode_images(held["vae"], images)
        context = None
        if "text_encoder" in held:
            context = encode_prompts(held["tokenizer"], held["text_encoder"], [held["captions"][i] for i in rows])
    return z, context


def _throughput(work: Path, which: str, batch: int, reps: int, device: torch.device) -> dict:
    """(a): the folder and the caches as loaders, the step from caches and the step encoding its batch."""
    import torch

    from difflora.model.build import build_diffusion, build_model
    from difflora.train.base import load_base
    from difflora.train.objectives import Batch, build_objective
    from difflora.train.pipeline_data import open_training_batches

    cfg = _config(work, which, batch, str(device))
    data = open_training_batches(cfg, seed=0, batch_size=batch, rows=list(range(batch)), log=lambda s: None)
    held = _encoders(cfg, work)
    model = build_model(cfg)
    load_base(model, cfg.train.init_from)
    model.to(device)
    objective = build_objective(cfg, build_diffusion(cfg))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step(x, conditions):
        losses = objective(model, Batch(x, conditions), g, device)
        losses["loss"].mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def cached_step():
        x, y, conditions = data.draw(0, g)
        step(x, {"y": y, **conditions})

    def encoded_step():
        x, y, conditions = data.draw(0, g)
        z, context = _encode_batch(held, cfg, batch)
        step(z, {"y": y, **conditions, **({"context": context} if context is not None else {})})

    variants = {
        "folder": lambda: [held["images"][i % len(held["images"])] for i in range(batch)],
        "cached": lambda: data.draw(0, g),
        "step": cached_step,
        "encode + step": encoded_step,
    }
    best = {name: float("inf") for name in variants}
    for _ in range(reps):  # alternate the variants: a change of load hits all of them alike
        for name, fn in variants.items():
            best[name] = min(best[name], best_of(fn, 1, device))
    return {f"{name} images/s": batch / s for name, s in best.items()} | {
        "vae_params": sum(p.numel() for p in held["vae"].parameters()),
        "text_encoder_params": sum(p.numel() for p in held["text_encoder"].parameters())
        if "text_encoder" in held
        else 0,
        "denoiser_params": sum(p.numel() for p in model.net.parameters() if not p.requires_grad),
    }


def _machine(device: torch.device) -> dict:
    return machine(device)


def _child(args: list[str], env: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=4, metavar=("WORK", "WHAT", "PIPELINE", "ENCODERS"), help=argparse.SUPPRESS)
    ap.add_argument("--num", type=int, default=48, help="images in the folder")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (latents are size / 8)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipelines.json"))
    add_device_argument(ap)
    args = ap.parse_args()
    if args.child:
        work, what, which, encoders = args.child
        if what == "build":
            _pipelines(Path(work), args.size, args.num)
            row = {}
        elif what == "caches":
            _train(Path(work), which, args.batch, False, str(args.device))  # builds the caches (and a first run)
            row = {}
        elif what == "train":
            row = _train(Path(work), which, args.batch, encoders == "1", str(args.device))
        else:
            row = _throughput(Path(work), which, args.batch, args.reps, args.device)
        print(json.dumps(row | {"machine": _machine(args.device)}))
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
    sizes = [
        "--num",
        str(args.num),
        "--size",
        str(args.size),
        "--batch",
        str(args.batch),
        "--reps",
        str(args.reps),
        "--device",
        str(args.device),
    ]
    result: dict = {"num_images": args.num, "image_size": args.size, "batch_size": args.batch, "pipelines": {}}
    print(json.dumps({"machine": _machine(args.device)}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        _child(["--child", tmp, "build", "-", "0", *sizes], env)
        for which in ("dit", "sd"):
            _child(["--child", tmp, "caches", which, "0", *sizes], env)
            row = {"throughput": _child(["--child", tmp, "speed", which, "0", *sizes], env)}
            for encoders in ("0", "1"):
                key = "peak_rss_mb with VAE + text encoder" if encoders == "1" else "peak_rss_mb from caches"
                row[key] = _child(["--child", tmp, "train", which, encoders, *sizes], env)["peak_rss_mb"]
            t = row["throughput"]
            print(
                f"{which}: folder {t['folder images/s']:.1f} img/s, cached {t['cached images/s']:.0f} img/s, "
                f"step {t['step images/s']:.2f} img/s, encode + step {t['encode + step images/s']:.2f} img/s "
                f"(cached step {t['step images/s'] / t['encode + step images/s']:.2f}x); train peak RSS "
                f"{row['peak_rss_mb from caches']:.0f} MB from caches, "
                f"{row['peak_rss_mb with VAE + text encoder']:.0f} MB with the encoders loaded",
                flush=True,
            )
            print(json.dumps(row), flush=True)
            result["pipelines"][which] = row
    result["machine_after"] = _machine(args.device)
    result["python"] = sys.version.split()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
