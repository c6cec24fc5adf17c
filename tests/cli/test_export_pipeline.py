"""``difflora export RUN --to diffusers OUT`` of runs on pipeline folders (issue 30): OUT is a whole
pipeline that diffusers' ``DiffusionPipeline.from_pretrained`` loads offline, with the run's denoiser
merged at the given conditions and every other component copied byte for byte.

Three pipelines: a pixel ``DDPMPipeline`` (UNet2DModel), a latent ``DiTPipeline`` (DiT + VAE) and an
SD-like ``StableDiffusionPipeline`` (UNet2DConditionModel + VAE + CLIP text encoder and tokenizer).
The exported denoiser is compared with the run's own diffusers model under difflora's conditions
(within 1e-5 relative), the pipeline is called, and OUT is written whole or not at all. The LoRA
exports of the same runs load onto the pipelines' own denoisers (peft's ``PeftModel``, diffusers'
``pipe.load_lora_weights`` for SD, ``load_lora_adapter`` for the others) and agree alike.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from diffusers.loaders import PeftAdapterMixin  # noqa: E402

from difflora.adapters import conditions  # noqa: E402
from difflora.cli.commands import main  # noqa: E402
from difflora.train import open_run  # noqa: E402
from latent_pipelines import dit_latent_pipeline, image_folder, sd_pipeline  # noqa: E402
from pretrained_folders import unet_pipeline  # noqa: E402

TOL = 1e-5
TIMELORA = {"name": "time", "condition": "t", "weighting": "linear", "num_values": 100, "num_bases": 3, "rank": 2}
KINDS = ("ddpm", "dit", "sd")


def _train(kind: str, root: Path) -> tuple[Path, Path]:
    """(the pipeline folder, a run of three TimeLoRA steps at lr 1e-2 on it, which moves B)."""
    make = {"ddpm": unet_pipeline, "dit": dit_latent_pipeline, "sd": sd_pipeline}[kind]
    with contextlib.redirect_stderr(io.StringIO()):
        pipe = make(root / "pipe")
    if kind == "ddpm":
        data, model = {"name": "digits", "limit": 32}, {}
    else:
        images = image_folder(root / "images", n=12, classes=3)
        data = {"name": "image-folder", "root": str(images), "index_cache": str(root / "idx")}
        model = {"latent": {"cache": str(root / "latents")}}
    tree = {
        "data": data,
        "model": {"pretrained": str(pipe), "adapters": [TIMELORA], **model},
        "train": {"train_base": False, "steps": 3, "batch_size": 4, "lr": 1e-2, "ema_decay": 0, "ckpt_every": 3},
        "sample": {"num": 2, "steps": 2},
    }
    (root / "adapt.yaml").write_text(yaml.safe_dump(tree))
    assert main(["train", str(root / "adapt.yaml"), "--out", str(root / "run"), "--no-progress"]) == 0
    return pipe, root / "run"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    os_env = pytest.MonkeyPatch()
    os_env.setenv("DIFFLORA_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        yield {kind: _train(kind, tmp_path_factory.mktemp(kind)) for kind in KINDS}
    finally:
        os_env.undo()


def _files(folder: Path, skip: str) -> dict[str, bytes]:
    """Every file under ``folder`` outside its ``skip`` subfolder: relative path -> bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] != skip
    }


def _forward(net: torch.nn.Module, kind: str) -> torch.Tensor:
    """One forward of a denoiser of ``kind`` on fixed inputs (diffusers' own call)."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, *((1, 8, 8) if kind == "ddpm" else (4, 8, 8)), generator=g), torch.tensor([33, 33])
    extra = {
        "ddpm": {},
        "dit": {"class_labels": torch.tensor([0, 2])},
        "sd": {"encoder_hidden_states": torch.randn(2, 12, 32, generator=g)},
    }[kind]
    with torch.no_grad():
        return net(x, t, **extra).sample


def _call(pipe, kind: str):
    args = {"num_inference_steps": 2, "output_type": "np", "generator": torch.Generator().manual_seed(0)}
    if kind == "ddpm":
        return pipe(batch_size=2, **args).images
    if kind == "dit":
        return pipe(class_labels=[0, 2], guidance_scale=1.0, **args).images
    return pipe(["a cat", "a dog"], height=16, width=16, guidance_scale=2.0, **args).images


@pytest.mark.parametrize("kind", KINDS)
def test_a_pipeline_run_exports_a_whole_pipeline_diffusers_loads(trained, kind, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe_dir, run = trained[kind]
    out = tmp_path / "out"
    assert main(["export", str(run), "--to", "diffusers", str(out), "--condition", "t=33"]) == 0
    assert f"wrote diffusers export at t=33 to {out}" in capsys.readouterr().out
    index = json.loads((pipe_dir / "model_index.json").read_text())
    name = "transformer" if kind == "dit" else "unet"
    with contextlib.redirect_stderr(io.StringIO()):
        loaded = diffusers.DiffusionPipeline.from_pretrained(out)
        original = diffusers.DiffusionPipeline.from_pretrained(pipe_dir)
    assert type(loaded).__name__ == index["_class_name"]
    for component, (_, cls) in ((k, v) for k, v in index.items() if isinstance(v, list) and v[1]):
        assert type(getattr(loaded, component)).__name__ == cls, component
    # Every file but the denoiser's is a byte-identical copy; the scheduler's config is the folder's.
    assert _files(out, name) == _files(pipe_dir, name)
    assert dict(loaded.scheduler.config) == dict(original.scheduler.config)
    # The exported denoiser is the run's, merged at t = 33: difflora's model under its condition.
    _, model, _ = open_run(run)
    with conditions(t=torch.full((2,), 33)):
        ours = _forward(model.net.model, kind)
    theirs = _forward(getattr(loaded, name).eval(), kind)
    assert float((theirs - ours).abs().max() / ours.abs().max()) < TOL
    assert (ours - _forward(getattr(original, name).eval(), kind)).abs().max() > 1e-5  # the adapters moved it
    with contextlib.redirect_stderr(io.StringIO()):
        images = _call(loaded, kind)
    assert images.shape[0] == 2 and images.shape[-1] in (1, 3) and bool(torch.isfinite(torch.as_tensor(images)).all())


def test_a_pipeline_export_replaces_a_non_empty_out_only_with_overwrite(trained, tmp_path, capsys):
    pipe_dir, run = trained["ddpm"]
    out = tmp_path / "out"
    (out / "old").mkdir(parents=True)
    (out / "old" / "stale.txt").write_text("an earlier export")
    argv = ["export", str(run), "--to", "diffusers", str(out), "--condition", "t=5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {out} is not empty; choose another directory or pass --overwrite" in err
    assert [p.name for p in out.rglob("*")] == ["old", "stale.txt"]
    assert main([*argv, "--overwrite"]) == 0
    # Replaced whole: nothing of the earlier contents is mixed into the new pipeline, and no staging is left.
    assert not (out / "old").exists() and (out / "unet" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert _files(out, "unet") == _files(pipe_dir, "unet")


@pytest.mark.parametrize("kind", KINDS)
def test_the_lora_exports_of_a_pipeline_run_load_onto_the_pipelines_denoiser(trained, kind, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe_dir, run = trained[kind]
    for to in ("peft", "diffusers-lora"):
        assert main(["export", str(run), "--to", to, str(tmp_path / to), "--condition", "t=33"]) == 0
    name = "transformer" if kind == "dit" else "unet"
    _, model, _ = open_run(run)
    with conditions(t=torch.full((2,), 33)):
        ours = _forward(model.net.model, kind)
    with contextlib.redirect_stderr(io.StringIO()):
        pipe = diffusers.DiffusionPipeline.from_pretrained(pipe_dir)
    base = getattr(pipe, name).eval()
    loaded = {"peft": peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")}
    if kind == "sd":  # the pipeline's own reader of diffusers' LoRA files
        pipe.load_lora_weights(tmp_path / "diffusers-lora")
        loaded["diffusers-lora"] = pipe.unet
    else:  # UNet2DModel and DiTTransformer2DModel lack diffusers' LoRA mixin (diffusers 0.42)
        lora = type(f"Lora{type(base).__name__}", (type(base), PeftAdapterMixin), {}).from_config(base.config)
        lora.load_state_dict(base.state_dict())
        lora.load_lora_adapter(tmp_path / "diffusers-lora", prefix=name, use_safetensors=True)
        loaded["diffusers-lora"] = lora
    for to, theirs in loaded.items():
        got = _forward(theirs.eval(), kind)
        assert float((got - ours).abs().max() / ours.abs().max()) < TOL, to
