"""The latent and prompt caches (difflora.latent) on Stable Diffusion's own VAE and text encoder sizes.

The parts are built from configs with random weights (values do not matter for speed or memory)
and written with ``save_pretrained``, as a pipeline folder holds them: an AutoencoderKL with SD's
architecture (83.7M parameters) and a CLIPTextModel with CLIP ViT-L/14's text tower (123.1M,
77 tokens), with a tokenizer over letters whose vocabulary and merges are written here. The data
are ``--num`` smooth random images at ``--size`` px and one caption per 4 images.

Settings, each in a fresh subprocess that reports its peak resident set size (``ru_maxrss``):

* ``build``: load the VAE and text encoder (``from_pretrained``), encode the images and the
  captions into the caches: encode throughput;
* ``read``: what training from the caches holds: open both caches (every shard read and its
  sha256 checked) and draw batches of latents and contexts: read throughput, and no VAE, text
  encoder, diffusers or transformers in memory;
* ``read + VAE + text encoder``: the same, then both models loaded and run on one batch, as a
  training loop that encoded every batch would hold them (``from_pretrained`` maps safetensors
  files, so weights count in RSS once they are used).

    OMP_NUM_THREADS=1 python benchmarks/bench_latents.py     # writes benchmarks/results/latents.json

``--device cuda`` puts the VAE and text encoder on the GPU (encode times are then wall seconds up to
a synchronisation, and the peak is the CUDA allocator's); the caches are read on the host either way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from devices import add_device_argument, machine, machine_line, wall

from difflora.model.accounting import peak_memory_mb

ROOT = Path(__file__).resolve().parents[1]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
BATCH = 16


def _parts(work: Path) -> None:
    """SD-sized VAE and text encoder, random weights, saved as a pipeline folder saves them; a tokenizer."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    ).save_pretrained(work / "vae")
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
    )
    CLIPTextModel(config).save_pretrained(work / "text_encoder")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in [*LETTERS, *(c + "</w>" for c in LETTERS)]:
        vocab[word] = len(vocab)
    (work / "tokenizer").mkdir()
    (work / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (work / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")


def _data(num: int, size: int):
    import torch

    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(num, 3, size // 8, size // 8, generator=g) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    words = ["".join(LETTERS[(7 * i + 3 * j) % 26] for j in range(3 + i % 5)) for i in range(num)]
    captions = [f"a photo of {words[i // 4]} {words[(i // 4 + 1) % num]}" for i in range(num)]
    return images, captions


def _load(work: Path, device: torch.device):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(work / "vae").eval().to(device)
    return vae, CLIPTextModel.from_pretrained(work / "text_encoder").eval().to(device)


def _tokenizer(work: Path):
    from transformers import CLIPTokenizer

    t = work / "tokenizer"
    return CLIPTokenizer(str(t / "vocab.json"), str(t / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>")


def _read(work: Path) -> dict:
    import torch

    from difflora.latent import open_latent_cache, open_prompt_cache

    t0 = time.perf_counter()
    latents = open_latent_cache(work / "cache" / "latents")
    prompts = open_prompt_cache(work / "cache" / "prompts")
    opened = time.perf_counter() - t0
    mb = sum(p.stat().st_size for p in (work / "cache").rglob("*.safetensors")) / 2**20
    rows = prompts.indices(json.loads((work / "captions.json").read_text()))
    g = torch.Generator().manual_seed(0)
    steps = 200
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(latents), (BATCH,), generator=g)
        z, context = latents.batch(idx, g), prompts.embeddings[rows[idx]]
    drawn = time.perf_counter() - t0
    return {
        "cache_mb": mb,
        "open_s": opened,
        "open_mb_per_s": mb / opened,
        "batch_samples_per_s": steps * BATCH / drawn,
        "batch_shapes": [list(z.shape), list(context.shape)],
    }


def one(work: Path, setting: str, size: int, device: torch.device) -> dict:
    row: dict = {"setting": setting}
    images, captions = _data(int(os.environ["BENCH_NUM"]), size)
    if setting == "build":
        from difflora.latent import LatentSettings, cache_latents, cache_prompts, module_fingerprint

        (work / "captions.json").write_text(json.dumps(captions))
        vae, text_encoder = _load(work, device)
        t0 = wall(device)
        ids = {"vae_id": module_fingerprint(vae), "encoder_id": module_fingerprint(text_encoder)}
        row["fingerprint_s"] = wall(device) - t0
        t0 = wall(device)
        latents = LatentSettings(batch_size=8, shard_size=64)
        cache_latents(vae, images, latents, path=work / "cache" / "latents", vae_id=ids["vae_id"])
        row["encode_images_per_s"] = len(images) / (wall(device) - t0)
        t0 = wall(device)
        tokenizer = _tokenizer(work)
        prompts = cache_prompts(
            tokenizer, text_encoder, captions, path=work / "cache" / "prompts", encoder_id=ids["encoder_id"]
        )
        row["encode_captions_per_s"] = (len(prompts) - 1) / (wall(device) - t0)
        row["distinct_captions"] = len(prompts) - 1
        row["params"] = {"vae": sum(p.numel() for p in vae.parameters()), "text_encoder": text_encoder.num_parameters()}
    else:
        row |= _read(work)
        if setting != "read":
            from difflora.latent import encode_images, encode_prompts

            # What a loop that encodes every batch holds: both models, run on one batch each.
            vae, text_encoder = _load(work, device)
            t0 = wall(device)
            encode_images(vae, images[:BATCH])
            encode_prompts(_tokenizer(work), text_encoder, captions[:BATCH])
            row["encode_batch_s"] = wall(device) - t0
        row["diffusers_imported"] = "diffusers" in sys.modules
    row["peak_rss_mb"] = peak_memory_mb(device)
    row["threads"] = torch.get_num_threads()
    return row


SETTINGS = ("build", "read", "read + VAE + text encoder")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=2, metavar=("WORK", "SETTING"), help=argparse.SUPPRESS)
    ap.add_argument("--parts", metavar="WORK", help=argparse.SUPPRESS)
    ap.add_argument("--num", type=int, default=64, help="images (one caption per 4)")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (latents are size / 8)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latents.json"))
    add_device_argument(ap)
    args = ap.parse_args()
    if args.parts:
        _parts(Path(args.parts))
        return
    if args.one:
        print(json.dumps(one(Path(args.one[0]), args.one[1], args.size, args.device)))
        return
    info = machine(args.device)
    print(machine_line(info), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "BENCH_NUM": str(args.num)}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, __file__, "--parts", str(work)], check=True, env=env)
        for setting in SETTINGS:
            cmd = [sys.executable, __file__, "--one", str(work), setting, "--size", str(args.size)]
            cmd += ["--device", str(args.device)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode:
                sys.exit(f"{setting} failed:\n{r.stderr}")
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    saved = rows[2]["peak_rss_mb"] - rows[1]["peak_rss_mb"]
    print(
        f"peak RSS reading the caches: {rows[1]['peak_rss_mb']:.0f} MB without the VAE and text encoder, "
        f"{rows[2]['peak_rss_mb']:.0f} MB with them: {saved:.0f} MB saved"
    )
    result = {
        "rows": rows,
        "num_images": args.num,
        "image_size": args.size,
        "batch_size": BATCH,
        "rss_saved_mb": saved,
        "python": sys.version.split()[0],
        "machine": info,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
