"""difflora's adapters inside diffusers' UNet2DModel, UNet2DConditionModel and DiTTransformer2DModel.

References: the raw diffusers model (zero-init adapters change nothing), and a naive per-sample
merge of the adapter formula ``W + sum_i w_i(t) B_i A_i + B_y A_y`` into a copy of the raw model,
run one sample at a time (per-sample routing of a mixed batch).
"""

import copy
import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from difflora.adapters import DEFAULT_TARGETS, IndexWeighting, LinearWeighting, adapter_layers, inject_adapter
from difflora.cli.commands import main
from difflora.config.schema import ConfigError, parse_config
from difflora.model.build import DiffusionModel, build_model
from difflora.nets.diffusers_wrap import DiffusersNet, build_diffusers_model
from difflora.train import latest_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
# float32 through a whole diffusers network, computed two ways ((W + sum B A) x against W x + B (A x)):
# up to ~2e-5 apart on some CPUs' kernels; a wrong timestep or class moves the output by 0.2 or more.
TOL = 1e-4
T_VALUES, BASES = 100, 5  # TimeLoRA: bases at t_i = i * 99 / 4
TINY = {
    "UNet2DModel": {
        "block_out_channels": [16, 32],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": 8,
        "num_class_embeds": 10,
    },
    "UNet2DConditionModel": {
        "block_out_channels": [16, 32],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": 8,
        "cross_attention_dim": 16,
    },
    "DiTTransformer2DModel": {
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "num_layers": 2,
        "patch_size": 2,
        "num_embeds_ada_norm": 10,
    },
}
SHAPE = {"sample_size": 8, "in_channels": 1, "out_channels": 1}


def _model(name):
    """(raw diffusers model, the same weights as a DiffusionModel with TimeLoRA and ClassLoRA)."""
    raw = build_diffusers_model(name, {**SHAPE, **TINY[name]}).eval()
    model = DiffusionModel(DiffusersNet(copy.deepcopy(raw), num_classes=10)).eval()
    targets = DEFAULT_TARGETS["diffusers"]
    inject_adapter(model, "time", lambda: LinearWeighting(BASES, 0, T_VALUES - 1), "t", targets, rank=2)
    inject_adapter(model, "cls", lambda: IndexWeighting(10), "y", targets, rank=2, alpha=4.0)
    return raw, model


def _raw_forward(raw, name, x, t, labels, context):
    kwargs = {"encoder_hidden_states": context} if name == "UNet2DConditionModel" else {}
    return raw(x, t, class_labels=labels, return_dict=False, **kwargs)[0]


def _batch(name):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 17, 50, 99])
    context = torch.randn(4, 1, 16, generator=g) if name == "UNet2DConditionModel" else None
    return x, t, context


@pytest.mark.parametrize("name", list(TINY))
def test_zero_init_adapters_leave_the_diffusers_output_unchanged(name):
    raw, model = _model(name)
    x, t, context = _batch(name)
    y = torch.tensor([0, 3, 7, 9])
    labels = None if name == "UNet2DConditionModel" else y
    extra = {} if context is None else {"context": context}
    with torch.no_grad():
        expected = _raw_forward(raw, name, x, t, labels, context)
        got = model(x, t, y, **extra)
    assert len(list(adapter_layers(model))) >= 4
    assert torch.equal(got, expected)


def _time_weights(t: int) -> torch.Tensor:
    """Linear interpolation over bases at i * k, k = (T - 1) / (m), by hand."""
    k = (T_VALUES - 1) / (BASES - 1)
    w = torch.zeros(BASES)
    i = min(int(t // k), BASES - 2)
    frac = t / k - i
    w[i], w[i + 1] = 1 - frac, frac
    return w


def _naive_copy(raw, model, t: int, y: int):
    """A copy of ``raw`` whose wrapped weights hold W + sum_i w_i(t) B_i A_i + (alpha/r) B_y A_y."""
    ref = copy.deepcopy(raw)
    with torch.no_grad():
        for path, layer in adapter_layers(model):
            time, cls = layer.adapters["time"], layer.adapters["cls"]
            delta = sum(w * time.lora_B[i] @ time.lora_A[i] for i, w in enumerate(_time_weights(t)))
            if y >= 0:
                delta = delta + 2.0 * cls.lora_B[y] @ cls.lora_A[y]
            ref.get_submodule(path.removeprefix("net.model.")).weight += delta
    return ref


@pytest.mark.parametrize("name", list(TINY))
def test_a_mixed_batch_routes_each_sample_to_its_timestep_and_class_update(name):
    raw, model = _model(name)
    g = torch.Generator().manual_seed(2)
    for _, layer in adapter_layers(model):
        for branch in layer.adapters.values():
            branch.lora_B.data = 0.3 * torch.randn(branch.lora_B.shape, generator=g)
    x, t, context = _batch(name)
    y = torch.tensor([0, 3, -1, 9])  # -1: the null label (no ClassLoRA update)
    extra = {} if context is None else {"context": context}
    with torch.no_grad():
        got = model(x, t, y, **extra)
        for i in range(4):
            ref = _naive_copy(raw, model, int(t[i]), int(y[i]))
            labels = y[i : i + 1]
            if name == "UNet2DModel" and y[i] < 0:
                ref.class_embedding, labels = None, None  # 10 rows for 10 classes: null adds no embedding
            elif name == "DiTTransformer2DModel" and y[i] < 0:
                labels = torch.tensor([10])  # diffusers' learned null row
            elif name == "UNet2DConditionModel":
                labels = None
            ctx = None if context is None else context[i : i + 1]
            if ctx is not None and y[i] < 0:
                ctx = model.net.context_embedder.null(1)
            expected = _raw_forward(ref, name, x[i : i + 1], t[i : i + 1], labels, ctx)
            assert (got[i : i + 1] - expected).abs().max() < TOL, f"sample {i}"


def _doc_config(tmp_path: Path) -> Path:
    """The YAML example of docs/interop.md (so the documented config is the one tested)."""
    text = (ROOT / "docs" / "interop.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block, "docs/interop.md has no yaml example"
    path = tmp_path / "diffusers-unet.yaml"
    path.write_text(block.group(1))
    return path


def test_difflora_train_trains_a_diffusers_unet_with_timelora_on_digits(tmp_path, capsys):
    config = _doc_config(tmp_path)
    run = tmp_path / "run"
    sets = ["train.steps=12", "train.log_every=1", "train.ckpt_every=12", "sample.num=2", "sample.steps=2"]
    assert (
        main(["train", str(config), "--out", str(run), "--no-progress", *[a for s in sets for a in ("--set", s)]]) == 0
    )
    assert "trained 12 steps" in capsys.readouterr().out
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and bool(torch.isfinite(torch.tensor(losses)).all())
    # A random diffusers UNet starts near an epsilon-MSE of 1; a dozen steps at lr 1e-3 halve it.
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4


def test_adapter_fine_tuning_of_a_diffusers_unet_changes_only_the_adapters(tmp_path):
    cfg = parse_config(
        {
            "model": {
                "arch": "diffusers",
                "num_classes": 10,
                "learn_sigma": False,
                "diffusers": {"class_name": "UNet2DModel", "config": TINY["UNet2DModel"]},
                "adapters": [{"name": "time", "weighting": "linear", "num_values": T_VALUES, "num_bases": BASES}],
            },
            "diffusion": {"steps": T_VALUES},
            "train": {"steps": 4, "batch_size": 8, "lr": 1e-2, "train_base": False, "ckpt_every": 4, "ema_decay": 0},
            "sample": {"num": 2, "steps": 2},
        }
    )
    from difflora.train import train

    train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    trained = load_checkpoint(latest_checkpoint(tmp_path / "run")).model
    torch.manual_seed(cfg.train.seed)
    fresh = build_model(cfg).state_dict()
    changed = sorted(k for k in fresh if not torch.equal(fresh[k], trained[k]))
    assert changed and all(".adapters.time." in k for k in changed)
    assert any(k.endswith("lora_B") for k in changed)


def test_a_diffusers_config_that_does_not_fit_is_an_error_naming_the_key():
    base = {"arch": "diffusers", "learn_sigma": False, "num_classes": 10}
    with pytest.raises(ConfigError, match="out_channels"):
        parse_config({"model": {**base, "diffusers": {"config": {"out_channels": 3}}}})
    cfg = parse_config({"model": {**base, "diffusers": {"config": {"block_out_chanels": [8]}}}})
    with pytest.raises(ValueError, match=r"no argument\(s\) \['block_out_chanels'\]"):
        build_model(cfg)
    cfg = parse_config({"model": {**base, "diffusers": {"config": {**TINY["UNet2DModel"], "num_class_embeds": 4}}}})
    with pytest.raises(ValueError, match="num_class_embeds"):
        build_model(cfg)


@pytest.mark.parametrize("name", list(TINY))
def test_model_arch_diffusers_builds_each_class_with_shapes_from_the_data(name):
    cfg = parse_config(
        {
            "model": {
                "arch": "diffusers",
                "num_classes": 10,
                "learn_sigma": True,  # out_channels is filled in as 2 x 1
                "diffusers": {"class_name": name, "config": TINY[name]},
                "adapters": [{"name": "cls", "condition": "y", "weighting": "index", "num_values": 10}],
            },
            "diffusion": {"loss": "hybrid"},
        }
    )
    model = build_model(cfg)
    assert type(model.net.model).__name__ == name
    assert {p.rsplit(".", 1)[-1] for p in model.adapter_report.paths} == {"to_q", "to_k", "to_v", "0"}
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([2, -1, 7])
    assert model(x, t, y).shape == (3, 2, 8, 8)
