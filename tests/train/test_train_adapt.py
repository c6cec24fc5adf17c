"""Adapting a trained model (train.init_from): key mapping, trainable-only checkpoints, the base's
fingerprint, one copy of the base in memory, and merged weights kept out of checkpoints."""

import shutil
from pathlib import Path

import pytest
import torch

import difflora.sampling.generate
import difflora.train.loop as loop
from difflora.adapters import adapter_layers, adapter_parameters, merge_adapters
from difflora.model.build import build_model
from difflora.train import CheckpointError, latest_checkpoint, load_base, load_checkpoint, load_weights, train
from difflora.train.base import stored_state

QUIET = {"progress": False, "log": lambda s: None}
# A rank-2 LoRA (two linearly interpolated bases over t) on the attention projections.
LORA = "model.adapters=[{name: lora, condition: t, weighting: linear, num_values: 100, num_bases: 2, rank: 2}]"

# On tiny-unet: the base run, and the adapting run's settings (train.init_from names the base run).
BASE = ["train.steps=4", "train.ckpt_every=4"]
ADAPT = [*BASE, LORA, "train.train_base=false", "train.ckpt_every=2"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_config) -> Path:
    run = tmp_path_factory.mktemp("base") / "run"
    train(tiny_config("tiny-unet", *BASE), run, **QUIET)
    return run


def _base_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_weights(latest_checkpoint(run), "ema")[0]


def test_base_keys_map_into_base_layer_and_adapters_stay_new(base_run, tiny_config):
    cfg = tiny_config("tiny-unet", *ADAPT, f"train.init_from={base_run}")
    torch.manual_seed(0)
    model = build_model(cfg)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    record = load_base(model, base_run)
    base = _base_weights(base_run)
    state = model.state_dict()
    wrapped = [k for k in state if ".base_layer." in k]
    assert wrapped and len(record["keys"]) == len(base)
    for key, tensor in state.items():
        plain = key.replace(".base_layer.", ".")
        if ".adapters." in key:
            assert torch.equal(tensor, fresh[key]), key  # adapter-owned: keeps its initialisation
        else:
            assert torch.equal(tensor, base[plain]), key
    assert record["path"] == str(latest_checkpoint(base_run).resolve())


def test_missing_unexpected_and_misshapen_keys_are_named(base_run, tiny_config):
    with pytest.raises(ValueError, match=r"unexpected in the base .*net\.label_emb\.weight"):
        load_base(
            build_model(tiny_config("tiny-unet", *ADAPT, f"train.init_from={base_run}", "model.num_classes=0")),
            base_run,
        )
    with pytest.raises(ValueError, match=r"missing from the base .*net\.input_blocks"):
        load_base(
            build_model(tiny_config("tiny-unet", *ADAPT, f"train.init_from={base_run}", "model.unet.num_res_blocks=2")),
            base_run,
        )
    with pytest.raises(ValueError, match=r"shapes differ: net\.\S+ \(\d+"):
        load_base(
            build_model(tiny_config("tiny-unet", *ADAPT, f"train.init_from={base_run}", "model.unet.model_channels=8")),
            base_run,
        )


def test_adapter_run_stores_trainable_tensors_and_the_base_fingerprint(base_run, tmp_path, tiny_config):
    run = tmp_path / "adapted"
    train(tiny_config("tiny-unet", *ADAPT, f"train.init_from={base_run}"), run, **QUIET)
    ckpt = load_checkpoint(latest_checkpoint(run))
    model = build_model(tiny_config("tiny-unet", *ADAPT, f"train.init_from={base_run}"))
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = sorted(names[id(p)] for p in adapter_parameters(model))
    assert sorted(ckpt.model) == sorted(ckpt.ema) == trainable
    assert len(ckpt.optim["state"]) == len(trainable)
    base = ckpt.state["base"]
    assert base["path"] == str(latest_checkpoint(base_run).resolve()) and len(base["fingerprint"]) == 64
    # The frozen base is unchanged by training; the complete weights load strictly into the model.
    full, _ = load_weights(latest_checkpoint(run), "ema")
    model.load_state_dict(full)
    plain = _base_weights(base_run)
    for key, b in base["keys"].items():
        assert torch.equal(full[key], plain[b])
    assert (latest_checkpoint(run) / "model.safetensors").stat().st_size * 20 < (
        latest_checkpoint(base_run) / "model.safetensors"
    ).stat().st_size


def test_missing_or_replaced_base_is_named(base_run, tmp_path, tiny_config):
    copy = tmp_path / "base"
    shutil.copytree(base_run, copy)
    run = tmp_path / "adapted"
    train(tiny_config("tiny-unet", *ADAPT, f"train.init_from={copy}", "train.steps=2"), run, **QUIET)
    shutil.rmtree(copy)
    with pytest.raises(CheckpointError, match=r"adapts the base checkpoint .*step_0000004 .* which is missing"):
        load_weights(latest_checkpoint(run))
    with pytest.raises(CheckpointError, match="which is missing"):
        train(tiny_config("tiny-unet", *ADAPT, f"train.init_from={copy}"), run, resume=True, **QUIET)
    # Another base at the same path (a different seed): refused by its fingerprint.
    train(tiny_config("tiny-unet", *BASE, "train.seed=1"), copy, **QUIET)
    with pytest.raises(CheckpointError, match="now holds other weights"):
        load_weights(latest_checkpoint(run))
    with pytest.raises(CheckpointError, match="now holds other weights"):
        train(tiny_config("tiny-unet", *ADAPT, f"train.init_from={copy}"), run, resume=True, **QUIET)


def test_adapter_run_resumes_bit_identical(base_run, tmp_path, tiny_config):
    cfg = tiny_config("tiny-unet", *ADAPT, f"train.init_from={base_run}", "train.steps=6")
    train(cfg, tmp_path / "straight", **QUIET)
    train(cfg, tmp_path / "cut", stop_at=3, **QUIET)
    train(cfg, tmp_path / "cut", resume=True, **QUIET)
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / r)) for r in ("straight", "cut"))
    for name in ("model", "ema"):
        for k, v in getattr(a, name).items():
            assert torch.equal(v, getattr(b, name)[k]), f"{name}.{k}"


def test_train_base_stores_everything_and_needs_no_base(base_run, tmp_path, tiny_config):
    copy = tmp_path / "base"
    shutil.copytree(base_run, copy)
    run = tmp_path / "full"
    train(
        tiny_config("tiny-unet", *ADAPT, f"train.init_from={copy}", "train.train_base=true", "train.steps=2"),
        run,
        **QUIET,
    )
    ckpt = load_checkpoint(latest_checkpoint(run))
    assert ckpt.state["base"]["keys"] == {}
    shutil.rmtree(copy)
    full, _ = load_weights(latest_checkpoint(run))
    build_model(tiny_config("tiny-unet", *ADAPT, f"train.init_from={copy}")).load_state_dict(full)


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _running_tensors(st, grads: bool = True) -> list[torch.Tensor]:
    out = list(st.model.state_dict().values()) + list(st.ema.shadow.values())
    out += [p.grad for p in st.model.parameters() if p.grad is not None and grads]
    out += [v for s in st.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return out


@pytest.mark.parametrize("train_base", [False, True])
def test_one_copy_of_the_base_in_memory(base_run, tmp_path, monkeypatch, train_base, tiny_config):
    seen = {}

    def spy(st):
        seen["st"] = st
        seen["storages"] = _storages(_running_tensors(st))
        seen["held"] = _storages(_running_tensors(st, grads=False))

    real_generate = loop.generate

    def grid(model, *args, **kwargs):
        st = seen["st"]
        # During a grid the model holds the EMA values (swapped in: no new storage anywhere).
        assert _storages(_running_tensors(st, grads=False)) == seen["held"]
        return real_generate(model, *args, **kwargs)

    monkeypatch.setattr(loop, "generate", grid)
    cfg = tiny_config(
        "tiny-unet",
        *ADAPT,
        f"train.init_from={base_run}",
        f"train.train_base={str(train_base).lower()}",
        "train.sample_every=2",
    )
    train(cfg, tmp_path / "run", callback=spy, **QUIET)
    model = seen["st"].model
    # Each trainable tensor: value, grad, EMA, Adam's two moments (and a 4-byte step count);
    # each frozen tensor: exactly one storage, never a second copy.
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [t for k, t in model.state_dict().items() if k not in seen["st"].stored_keys or not train_base]
    frozen = [t for t in frozen if not any(t.data_ptr() == p.data_ptr() for p in trainable)]
    expected = sum(t.nbytes for t in frozen) + sum(5 * p.nbytes + 4 for p in trainable)
    assert sum(seen["storages"].values()) == expected
    assert train_base or sum(t.nbytes for t in frozen) > 20 * sum(p.nbytes for p in trainable)


def test_sample_grid_swaps_ema_values_in_and_out(base_run, tmp_path, monkeypatch, tiny_config):
    seen = {}
    real_step, real_generate = loop.train_step, loop.generate

    def step(st, i):
        lr = real_step(st, i)
        seen["st"] = st
        seen["model"] = {k: v.detach().clone() for k, v in st.model.named_parameters()}
        seen["ema"] = {k: v.clone() for k, v in st.ema.shadow.items()}
        return lr

    def grid(model, *args, **kwargs):
        params = dict(model.named_parameters())
        for k, v in seen["ema"].items():
            assert torch.equal(params[k], v), k  # the EMA values are in the model
            assert torch.equal(seen["st"].ema.shadow[k], seen["model"][k]), k  # its own values are kept aside
        seen["grids"] = seen.get("grids", 0) + 1
        return real_generate(model, *args, **kwargs)

    def after(st):
        for k, v in st.model.named_parameters():
            assert torch.equal(v, seen["model"][k]), k  # and back after the grid

    monkeypatch.setattr(loop, "train_step", step)
    monkeypatch.setattr(loop, "generate", grid)
    train(
        tiny_config("tiny-unet", *ADAPT, f"train.init_from={base_run}", "train.sample_every=1", "train.steps=3"),
        tmp_path / "run",
        callback=after,
        **QUIET,
    )
    assert seen["grids"] == 3  # steps 1 and 2, and the final grid


def test_a_merged_weight_never_reaches_a_checkpoint(base_run, tmp_path, monkeypatch, tiny_config):
    cfg = tiny_config("tiny-timelora-unet", "train.steps=4", "train.ckpt_every=2")
    model = build_model(cfg)
    keys = list(model.state_dict())
    merge_adapters(model.net, t=3)
    with pytest.raises(RuntimeError, match="must never reach a checkpoint"):
        stored_state(model, keys)
    # A Ctrl-C inside a sample grid, while the TimeLoRA update is merged into the base weights:
    # the interrupt checkpoint must hold the unmerged weights of the uninterrupted run.
    train(cfg, tmp_path / "straight", **QUIET)

    real_sample = difflora.sampling.generate.sample

    def interrupted(diffusion, model, *args, **kwargs):
        def first_forward_then_ctrl_c(*a, **k):
            model(*a, **k)  # merges the TimeLoRA update at this step's t
            assert any(layer.merged for _, layer in adapter_layers(model))
            raise KeyboardInterrupt

        return real_sample(diffusion, first_forward_then_ctrl_c, *args, **kwargs)

    monkeypatch.setattr(difflora.sampling.generate, "sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(
            cfg.model_copy(update={"train": cfg.train.model_copy(update={"sample_every": 2})}),
            tmp_path / "cut",
            **QUIET,
        )
    monkeypatch.undo()
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "step_0000002")
    b = load_checkpoint(latest_checkpoint(tmp_path / "cut"))
    assert b.step == 2
    for k, v in a.model.items():
        assert torch.equal(v, b.model[k]), k


def test_streamed_tensors_equal_the_safetensors_loader(tmp_path):
    from safetensors.torch import load_file, save_file

    from difflora.train.checkpoint import stream_weights, tensor_shapes

    tensors = {
        "f32": torch.randn(3, 4),
        "i64": torch.arange(5),
        "bf16": torch.randn(2, 1).to(torch.bfloat16),
        "f16": torch.randn(7).half(),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(3.5),
        "bool": torch.tensor([True, False]),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    reference = load_file(str(path))
    sources = dict.fromkeys(reference, path)
    streamed = dict(stream_weights(sources))
    assert streamed.keys() == reference.keys()
    for k, v in reference.items():
        assert streamed[k].dtype == v.dtype and streamed[k].shape == v.shape and torch.equal(streamed[k], v), k
    assert tensor_shapes(sources) == {k: tuple(v.shape) for k, v in reference.items()}


def test_sample_cli_loads_an_adapter_run_and_names_a_missing_base(base_run, tmp_path, capsys, tiny_config):
    from difflora.cli.commands import main

    copy = tmp_path / "base"
    shutil.copytree(base_run, copy)
    run = tmp_path / "adapted"
    train(tiny_config("tiny-unet", *ADAPT, f"train.init_from={copy}", "train.steps=2"), run, **QUIET)
    args = ["sample", str(run), "--num", "2", "--steps", "2", "--no-progress", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    shutil.rmtree(copy)
    assert main([*args, "--out", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: this run adapts the base checkpoint") and "which is missing" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "b.png").exists()


def test_eval_loads_an_adapter_run_through_the_shared_loader(base_run, tmp_path, tiny_config):
    from difflora.train import open_run

    run = tmp_path / "adapted"
    train(tiny_config("tiny-unet", *ADAPT, f"train.init_from={base_run}", "train.steps=2"), run, **QUIET)
    _, model, meta = open_run(run)
    full, _ = load_weights(latest_checkpoint(run))
    assert meta["step"] == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, full[k]), k


def test_a_moved_base_is_named_again_on_resume(base_run, tmp_path, tiny_config):
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(base_run, old)
    run = tmp_path / "adapted"
    train(tiny_config("tiny-unet", *ADAPT, f"train.init_from={old}", "train.steps=4"), run, stop_at=2, **QUIET)
    old.rename(new)
    with pytest.raises(CheckpointError, match="which is missing"):
        train(tiny_config("tiny-unet", *ADAPT, f"train.init_from={old}", "train.steps=4"), run, resume=True, **QUIET)
    train(tiny_config("tiny-unet", *ADAPT, f"train.init_from={new}", "train.steps=4"), run, resume=True, **QUIET)
    ckpt = load_checkpoint(latest_checkpoint(run))
    assert ckpt.step == 4 and ckpt.state["base"]["path"] == str(latest_checkpoint(new).resolve())
    load_weights(latest_checkpoint(run))  # the new checkpoint finds its base at the new place
