"""Fault catalogue: pipeline exports that must fail (issue 30).

``difflora export RUN --to diffusers OUT`` of a run on a pipeline folder writes the whole pipeline.
Refused, each in one line and with every file left as it was: OUT a file, OUT a non-empty directory
without ``--overwrite``, OUT the pipeline itself, the pipeline moved or its denoiser rewritten since
training (the recorded fingerprint; also for a run whose checkpoint holds every weight), an adapter
form no merged weight holds, a learned class context no pipeline holds, a full disk mid-write (no
half-written OUT, no staging directory left), and ``--overwrite`` where the export writes no pipeline.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from faultkit import Fault, both, cases, check_fault, write_tmp

pytest.importorskip("diffusers")

from difflora.cli.commands import main  # noqa: E402
from pretrained_folders import cond_unet_pipeline, unet_pipeline  # noqa: E402

TIMELORA = {"name": "time", "condition": "t", "weighting": "linear", "num_values": 100, "num_bases": 3, "rank": 2}


def pipeline_run(
    adapter: dict = TIMELORA, train_base: bool = False, make=unet_pipeline
) -> Callable[[Path, Path], None]:
    """A damage: the pipeline {tmp}/pipe and a one-step run on it, {tmp}/prun."""

    def damage(run: Path, tmp: Path) -> None:
        make(tmp / "pipe")
        tree = {
            "data": {"name": "digits", "limit": 16},
            "model": {"pretrained": str(tmp / "pipe"), "adapters": [adapter]},
            "train": {"train_base": train_base, "steps": 1, "batch_size": 4, "ckpt_every": 1},
            "sample": {"num": 2, "steps": 2},
        }
        (tmp / "adapt.yaml").write_text(yaml.safe_dump(tree))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(["train", str(tmp / "adapt.yaml"), "--out", str(tmp / "prun"), "--no-progress"]) == 0

    return damage


def moved(run: Path, tmp: Path) -> None:
    (tmp / "pipe").rename(tmp / "pipe-moved")


def other_weights(run: Path, tmp: Path) -> None:
    unet_pipeline(tmp / "pipe", seed=1)  # the same architecture and JSON, other weights


def export(out: str = "{tmp}/out", *extra: str) -> tuple[str, ...]:
    return ("export", "{tmp}/prun", "--to", "diffusers", out, "--condition", "t=5", *extra)


FAULTS = [
    Fault(
        "export-pipeline-out-is-a-file",
        export(),
        r"out is a file; name a directory for the exported pipeline",
        both(pipeline_run(), write_tmp("out", b"a file")),
    ),
    Fault(
        "export-pipeline-out-not-empty",
        export(),
        r"out is not empty; choose another directory or pass --overwrite",
        both(pipeline_run(), write_tmp("out/unet/config.json", b"an earlier export")),
    ),
    Fault(
        "export-pipeline-into-its-own-pipeline",
        export("{tmp}/pipe", "--overwrite"),
        r"pipe is, holds or lies inside the pipeline .*pipe the run adapts; export into another directory",
        pipeline_run(),
    ),
    Fault(
        "export-pipeline-folder-moved",
        export(),
        r"model\.pretrained: .*pipe does not exist",
        both(pipeline_run(), moved),
    ),
    Fault(
        "export-pipeline-denoiser-rewritten",
        export(),
        r"adapts the base checkpoint .*pipe \(fingerprint [0-9a-f]{12}\), which now holds other weights",
        both(pipeline_run(), other_weights),
    ),
    Fault(
        "export-pipeline-of-a-full-run-denoiser-rewritten",
        export(),
        r"adapts the base checkpoint .*pipe \(fingerprint [0-9a-f]{12}\), which now holds other weights",
        both(pipeline_run(train_base=True), other_weights),
    ),
    Fault(
        "export-pipeline-lowrank-act",
        export(),
        r"a merged model cannot hold adapter 'act' \(form lowrank_act.*not linear in x.*nothing was written",
        pipeline_run(TIMELORA | {"name": "act", "form": "lowrank_act"}),
    ),
    Fault(
        "export-pipeline-learned-context",
        export(),
        r"reads difflora's learned class context .* which a diffusers pipeline cannot hold; nothing was written",
        pipeline_run(make=cond_unet_pipeline),
    ),
    Fault(
        "export-pipeline-disk-full",
        export(),
        r"cannot write .*out: the file would exceed the file-size limit",
        pipeline_run(),
        fsize=4096,  # the copied JSON fits, the merged UNet's weights do not: no half-written OUT is left
    ),
    Fault(
        "export-overwrite-of-no-pipeline",
        ("export", "{run}", "--to", "peft", "{tmp}/out", "--condition", "task=1", "--overwrite"),
        r"--overwrite replaces a whole pipeline folder .* remove --overwrite",
        run="task",
    ),
]


@pytest.mark.parametrize("fault", cases(FAULTS))
def test_fault(fault, runs, tmp_path, capsys, monkeypatch):
    check_fault(fault, runs, tmp_path, capsys, monkeypatch)
