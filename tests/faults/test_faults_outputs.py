"""Fault catalogue, part 5 (issue 28): what a run says about itself against its files (class 4),
a full disk or a file-size limit during a write (class 6), outputs of one command together or not
at all (class 15) and the last readers of user tensors that did not refuse NaN (class 8).

The full disk is simulated by a file-size limit (``ulimit -f``, :func:`faultkit.file_size_limit`):
the write fails as on a full disk, inside Python or inside safetensors. Each case checks, like the
rest of the catalogue, one error line, exit code 2, and every file byte-identical afterwards: no
``.tmp`` file, no half-written output, no earlier output changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from faultkit import CK2, CK4, Fault, both, cases, check_fault, edit_json, evaluate, nan_weights, sample, write
from safetensors.torch import load_file, save_file

from difflora.adapters import save_adapters
from difflora.cli.commands import main
from difflora.config.schema import config_to_dict
from difflora.eval.features import FORMAT as FEATURE_FORMAT
from difflora.eval.features import FeatureNet, FeatureNetConfig, FeatureNetInfo, load_feature_net, save_feature_net
from difflora.eval.inception import load_inception
from difflora.files.atomic import WriteError
from difflora.model.build import build_model
from difflora.train import load_run_config
from difflora.train.checkpoint import CheckpointMismatch, load_checkpoint, save_checkpoint
from helpers import tiny_config

PLAIN_LORA = "model.adapters=[{name: lora, condition: task, weighting: index, num_values: 1, rank: 2}]"
RESUME = ("train", "tiny-unet", "--out", "{run}", "--resume", "--set", "train.steps=6", "--no-progress")
EDITED = r"checkpoint .*step_0000004 disagrees with itself: state\.json was changed after it was written"
NONFINITE = r"tensor '[^']+' holds \d+ NaN or infinite values of \d+"
LIMIT = r"the file would exceed the file-size limit \(.* needed, the limit is 200 bytes\); raise it \(`ulimit -f`\)"


def _lr(state: dict) -> dict:
    state["optimizer"]["param_groups"][0]["lr"] *= 10
    return state


def _rename(old: str, new: str):
    def damage(run: Path, tmp: Path) -> None:
        (run / old).rename(run / new)

    return damage


def _older(state: dict) -> dict:
    """The state.json of a checkpoint written before the digest and the tensor counts existed."""
    return {k: v for k, v in state.items() if k not in ("digest", "tensor_counts")}


CONSISTENCY = [
    # Class 4: a value edited by hand in state.json is found by its digest, whatever the value.
    Fault(
        "state-lr-edited-resume", RESUME, EDITED + r" .*; restore the checkpoint", edit_json(f"{CK4}/state.json", _lr)
    ),
    Fault("state-step-edited-sample", sample(), EDITED, edit_json(f"{CK4}/state.json", lambda s: {**s, "step": 6})),
    Fault(
        "state-config-edited-sample",
        sample(),
        EDITED,
        edit_json(f"{CK4}/state.json", lambda s: {**s, "config": {**s["config"], "seed": 99}}),
    ),
    Fault(
        "state-ema-count-edited-resume",
        RESUME,
        EDITED,
        edit_json(f"{CK4}/state.json", lambda s: {**s, "ema_updates": 0}),
    ),
    # Never skipped for the older checkpoint (a resume from it would overwrite the newer one).
    Fault(
        "state-edited-newest-is-not-skipped",
        RESUME,
        r"step_0000004 disagrees with itself",
        edit_json(f"{CK4}/state.json", lambda s: {**s, "note": "edited"}),
    ),
    Fault(
        "checkpoint-dir-renamed",
        sample(),
        r"step_0000008 disagrees with its name: state\.json records step 4",
        _rename(CK4, "checkpoints/step_0000008"),
    ),
    Fault(
        "checkpoint-dir-renamed-older-format",
        sample("--checkpoint", "3"),
        r"step_0000003 disagrees with its name: state\.json records step 2",
        both(edit_json(f"{CK2}/state.json", _older), _rename(CK2, "checkpoints/step_0000003")),
    ),
    Fault(
        "checkpoint-extra-file",
        RESUME,
        r"step_0000004 holds files its state\.json does not account for: extra\.safetensors; move them out",
        write(f"{CK4}/extra.safetensors", "x"),
    ),
    Fault(
        "state-lists-an-extra-file",
        sample(),
        r"step_0000004 holds files its state\.json does not account for: extra",
        edit_json(f"{CK4}/state.json", lambda s: {**s, "files": {**s["files"], "extra": s["files"]["rng"]}}),
    ),
    Fault(
        "api-load-edited-state",
        api=lambda run, tmp: load_checkpoint(run / CK4),
        exc=CheckpointMismatch,
        error=EDITED,
        damage=edit_json(f"{CK4}/state.json", _lr),
    ),
    # A checkpoint written before the digest loads; what it lacks is not checked.
    Fault("older-checkpoint-without-digest-samples", sample(), None, edit_json(f"{CK4}/state.json", _older)),
]


# An evaluation that succeeds on the tiny run (every class sampled twice), into run/eval.
EVAL = ("eval", "{run}", "--num-samples", "20", "--steps", "2", "--no-progress", "--cache-dir", "{tmp}/c")


def _eval_once(run: Path, tmp: Path) -> None:
    """An earlier evaluation of the run (its grid and scores are what a failed one must keep)."""
    assert main(_argv(EVAL, run, tmp)) == 0


def _argv(argv: tuple[str, ...], run: Path, tmp: Path) -> list[str]:
    return [a.replace("{run}", str(run)).replace("{tmp}", str(tmp)) for a in argv]


def _task_model(run: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(load_run_config(run))


def _lora_run(run: Path, tmp: Path) -> None:
    """An untrained run with one plain LoRA (what peft's format holds) in tmp/lora, and tmp/peft."""
    cfg = tiny_config("tiny-unet", PLAIN_LORA, "data.task_id=0", "sample.num=2")
    model = build_model(cfg)
    state = model.state_dict()
    rng = {"loop": torch.Generator().get_state(), "torch": torch.get_rng_state()}
    meta = {"config": config_to_dict(cfg), "ema_updates": 0}
    save_checkpoint(
        tmp / "lora", 1, model=state, ema=state, optimizer=torch.optim.AdamW(model.parameters()), rng=rng, meta=meta
    )
    (tmp / "lora" / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    (tmp / "peft").mkdir()


def _mkdir(rel: str):
    return lambda run, tmp: (tmp / rel).mkdir(parents=True)


STORAGE = [
    # Class 6: every write of a command refused by the storage is one line naming the file, the space
    # it needed and the limit, and leaves nothing behind (the grid and --save-tensor: neither).
    Fault("disk-full-sample-grid", sample(), r"cannot write .*/a\.png: " + LIMIT, fsize=200),
    Fault(
        "disk-full-sample-save-tensor",
        sample("--save-tensor", "{tmp}/a.safetensors"),
        r"cannot write .*/a\.(png|safetensors): " + LIMIT,
        fsize=200,
    ),
    # An evaluation that cannot write keeps the scores and grids of the earlier one, as they were.
    Fault(
        "disk-full-eval-keeps-earlier-scores",
        (*EVAL, "--guidance", "1", "2"),
        r"cannot write .*/eval/(samples_w\w+\.png|metrics\.json): " + LIMIT,
        _eval_once,
        fsize=200,
    ),
    Fault(
        "disk-full-runs-csv",
        ("runs", "{tmp}", "--csv", "{tmp}/runs.csv"),
        r"cannot write .*/runs\.csv: the file would exceed the file-size limit \(.* needed, the limit is 20 bytes\)",
        fsize=20,
    ),
    Fault(
        "disk-full-export-peft",
        ("export-peft", "{tmp}/lora", "{tmp}/peft"),
        r"cannot write .*/peft/adapter_model\.safetensors: " + LIMIT,
        _lora_run,
        fsize=200,
    ),
    Fault(
        "api-disk-full-save-adapters",
        api=lambda run, tmp: save_adapters(_task_model(run), tmp / "ad"),
        run="task",
        exc=WriteError,
        error=r"cannot write .*/ad/adapters\.safetensors: " + LIMIT,
        damage=_mkdir("ad"),
        fsize=200,
    ),
]


def _feature_net(make):
    """A feature network saved to tmp/fn, its weights then replaced by ``make`` (and its record of
    their hash updated: damage only the values can show)."""

    def damage(run: Path, tmp: Path) -> None:
        arch = FeatureNetConfig(image_size=8, in_channels=1, num_classes=10)
        torch.manual_seed(0)
        path = save_feature_net(FeatureNet(arch, FeatureNetInfo(arch, "digits", "x", 0.9)), tmp / "fn")
        save_file(make(load_file(str(path))), str(path), metadata={"format": FEATURE_FORMAT})
        meta = json.loads((tmp / "fn.json").read_text())
        meta["weights_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (tmp / "fn.json").write_text(json.dumps(meta))

    return damage


def _inception_nan(run: Path, tmp: Path) -> None:
    save_file({"conv.weight": torch.full((2, 2), float("nan"))}, str(tmp / "inception.safetensors"))


READERS = [
    # Class 8, the last readers: the evaluation's feature network and Inception weights.
    Fault(
        "feature-net-nan-eval",
        evaluate("--feature-net", "{tmp}/fn"),
        rf"fn\.safetensors: {NONFINITE}; the feature network .* is damaged",
        _feature_net(nan_weights),
    ),
    Fault(
        "api-feature-net-nan",
        api=lambda run, tmp: load_feature_net(tmp / "fn"),
        exc=ValueError,
        error=rf"fn\.safetensors: {NONFINITE}",
        damage=_feature_net(nan_weights),
    ),
    Fault(
        "api-inception-nan",
        api=lambda run, tmp: load_inception(tmp / "inception.safetensors"),
        exc=ValueError,
        error=r"inception\.safetensors: tensor 'conv\.weight' holds 4 NaN",
        damage=_inception_nan,
    ),
]

CASES = CONSISTENCY + STORAGE + READERS


@pytest.mark.parametrize("fault", cases(CASES))
def test_fault(fault, runs, tmp_path, capsys, monkeypatch):
    check_fault(fault, runs, tmp_path, capsys, monkeypatch)
