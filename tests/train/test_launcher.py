"""accelerate launch's flags (the environment variables it sets for the processes it starts) are
mapped onto the config or refused in one line, never silently ignored."""

import json

import pytest

from difflora.cli.commands import main
from difflora.train import latest_checkpoint, load_checkpoint, train
from difflora.train.launcher import accelerate_flags
from helpers import tiny_config

QUIET = {"progress": False, "log": lambda s: None}
# What `accelerate launch` with no flags sets (accelerate.utils.launch, accelerate 1.x).
LAUNCHED = {
    "ACCELERATE_USE_CPU": "False",
    "ACCELERATE_MIXED_PRECISION": "no",
    "ACCELERATE_DYNAMO_BACKEND": "NO",
    "ACCELERATE_DYNAMO_MODE": "default",
    "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False",
}


def test_no_launcher_and_the_launchers_defaults_change_nothing():
    cfg = tiny_config("tiny-unet", "train.precision=bf16")
    assert accelerate_flags(cfg, {}) == (cfg, [])
    assert accelerate_flags(cfg, LAUNCHED) == (cfg, [])  # "no": the config decides


@pytest.mark.parametrize("mixed", ["bf16", "fp16", "BF16"])
def test_mixed_precision_sets_a_precision_the_config_leaves_at_its_default(mixed):
    cfg = tiny_config("tiny-unet")
    got, notes = accelerate_flags(cfg, LAUNCHED | {"ACCELERATE_MIXED_PRECISION": mixed})
    assert got.train.precision == mixed.lower() and cfg.train.precision == "fp32"  # a copy; cfg unchanged
    assert notes == [f"accelerate launch --mixed_precision {mixed.lower()}: train.precision={mixed.lower()}"]
    same, notes = accelerate_flags(
        tiny_config("tiny-unet", f"train.precision={mixed.lower()}"), LAUNCHED | {"ACCELERATE_MIXED_PRECISION": mixed}
    )
    assert same.train.precision == mixed.lower() and notes == []


@pytest.mark.parametrize(
    ("sets", "env", "message"),
    [
        (
            ["train.precision=fp32"],
            {"ACCELERATE_MIXED_PRECISION": "bf16"},
            r"^train.precision='fp32' cannot take effect: accelerate launch --mixed_precision bf16 holds it at "
            r"'bf16'; remove train.precision$",
        ),
        (["train.precision=fp16"], {"ACCELERATE_MIXED_PRECISION": "bf16"}, r"train.precision='fp16' cannot take"),
        ([], {"ACCELERATE_MIXED_PRECISION": "fp8"}, r"--mixed_precision fp8: difflora trains in fp32, bf16 or fp16"),
        (["train.device=cuda"], {"ACCELERATE_USE_CPU": "True"}, r"train.device='cuda' cannot take effect: .* --cpu"),
        (
            [],
            {"ACCELERATE_DYNAMO_BACKEND": "AOT_EAGER"},
            r"--dynamo_backend aot_eager: difflora compiles with inductor",
        ),
        (["train.compile=false"], {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, r"train.compile=False cannot take effect"),
        ([], {"ACCELERATE_USE_DEEPSPEED": "true"}, r"--use_deepspeed: difflora trains with DDP and shards nothing"),
        ([], {"ACCELERATE_USE_FSDP": "true"}, r"--use_fsdp: .*launch without --use_fsdp$"),
    ],
)
def test_a_flag_the_config_contradicts_or_difflora_lacks_is_refused(sets, env, message):
    with pytest.raises(ValueError, match=message):
        accelerate_flags(tiny_config("tiny-unet", *sets), LAUNCHED | env)


def test_cpu_and_inductor_map_onto_device_and_compile():
    env = LAUNCHED | {"ACCELERATE_USE_CPU": "True", "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}
    got, notes = accelerate_flags(tiny_config("tiny-unet", "train.device=auto"), env)
    assert (got.train.device, got.train.compile) == ("cpu", True)
    assert notes == [
        "accelerate launch --cpu: train.device=cpu",
        "accelerate launch --dynamo_backend inductor: train.compile=true",
    ]


@pytest.mark.parametrize("mixed", ["bf16", "fp16"])
def test_mixed_precision_makes_the_choice_precision_auto_leaves_open(mixed):
    got, notes = accelerate_flags(
        tiny_config("tiny-unet", "train.precision=auto"), LAUNCHED | {"ACCELERATE_MIXED_PRECISION": mixed}
    )
    assert got.train.precision == mixed
    assert notes == [f"accelerate launch --mixed_precision {mixed}: train.precision={mixed}"]


def test_training_under_the_launchers_bf16_trains_and_records_bf16(tmp_path, monkeypatch):
    for k, v in (LAUNCHED | {"ACCELERATE_MIXED_PRECISION": "bf16"}).items():
        monkeypatch.setenv(k, v)
    lines = []
    cfg = tiny_config("tiny-unet", "train.steps=2", "train.ckpt_every=2", "sample.num=2")
    train(cfg, tmp_path / "run", progress=False, log=lines.append, stop_at=1)
    assert "accelerate launch --mixed_precision bf16: train.precision=bf16" in lines
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["precision"] == "bf16"
    # Resumed under the same launch, the config matches the one recorded.
    assert train(cfg, tmp_path / "run", resume=True, progress=False, log=lines.append)["main"]
    assert load_checkpoint(latest_checkpoint(tmp_path / "run")).step == 2
    # Resumed without it, the recorded bf16 and the config's fp32 differ: refused, not switched.
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    with pytest.raises(ValueError, match=r"train.precision: 'bf16' -> 'fp32'"):
        train(tiny_config("tiny-unet", "train.steps=3", "sample.num=2"), tmp_path / "run", resume=True, **QUIET)


def test_the_cli_refuses_a_conflict_in_one_line_before_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    assert main(["train", "tiny-unet", "--out", str(tmp_path / "run"), "--set", "train.steps=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: accelerate launch --mixed_precision fp8: ") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
