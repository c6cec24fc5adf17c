"""Fault catalogue, part 6: exports a format cannot hold (issue 30).

``difflora export`` with conditions missing, unknown or out of range, a format the run's backbone
cannot take, a run without adapters, and (through the API) adapters no file can hold at the given
conditions: a weight scale in a LoRA file, ``lowrank_act`` and position adapters anywhere. Each is
one line naming what would be lost, and the case directory holds an earlier export that stays
byte-identical: nothing is written before every check has passed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from faultkit import Fault, cases, check_fault, write_tmp
from torch import nn

from difflora.adapters import IndexWeighting, has_taps, inject_adapter, inject_position_adapter
from difflora.adapters.lora_export import ExportError, export_lora
from difflora.model.build import build_model
from difflora.model.export import save_merged
from difflora.train import load_run_config

EARLIER = write_tmp("out/adapter_model.safetensors", b"an earlier export")


def export(to: str, *conditions: str) -> tuple[str, ...]:
    return ("export", "{run}", "--to", to, "{tmp}/out", *[a for c in conditions for a in ("--condition", c)])


def _adapted(form: str) -> nn.Module:
    """Two Linear layers with a task-indexed branch of ``form`` on the first (nonzero only where it matters)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    inject_adapter(model, "aff", lambda: IndexWeighting(2), "task", ["0"], form=form)
    return model


def _positioned(run: Path) -> nn.Module:
    """The task run's U-Net with a position adapter on its first block with taps."""
    net = build_model(load_run_config(run)).net
    block = next(p for p, m in net.named_modules() if p and has_taps(m))
    inject_position_adapter(net, "pa", lambda: IndexWeighting(3), "task", [block], "in", "out")
    return net


FAULTS = [
    Fault(
        "export-run-without-adapters",
        export("peft"),
        r"the model has no adapters: there is nothing to export",
        EARLIER,
    ),
    Fault(
        "export-condition-missing",
        export("peft"),
        r"the adapters read condition\(s\) task: give a value for each \(--condition task=VALUE",
        EARLIER,
        run="task",
    ),
    Fault(
        "export-condition-unknown",
        export("peft", "task=1", "guidance=3"),
        r"no adapter reads condition\(s\) guidance; they read: task",
        EARLIER,
        run="task",
    ),
    Fault(
        "export-condition-not-a-number",
        export("peft", "task=one"),
        r"--condition 'task=one': 'one' is not a number",
        EARLIER,
        run="task",
    ),
    Fault(
        "export-condition-out-of-range",
        export("peft", "task=7"),
        r"index weighting: values must be in 0\.\.2",
        EARLIER,
        run="task",
    ),
    Fault(
        "export-diffusers-of-a-difflora-unet",
        export("diffusers", "task=1"),
        r"--to diffusers is for a diffusers backbone \(model.arch: diffusers\); this run's is model.arch unet",
        EARLIER,
        run="task",
    ),
    Fault(
        "export-diffusers-lora-of-a-difflora-unet",
        export("diffusers-lora", "task=-1"),
        r"--to diffusers-lora is for a diffusers backbone",
        EARLIER,
        run="task",
    ),
    Fault(
        "export-peft-at-no-update-is-no-lora",
        export("peft", "task=-1"),
        r"no adapter changes the model .* there is no LoRA to write",
        EARLIER,
        run="task",
    ),
    Fault(
        "api-export-scale-as-lora",
        api=lambda run, tmp: export_lora(_adapted("scale"), tmp / "out", "peft", task=1),
        exc=ExportError,
        error=r"a LoRA file cannot hold adapter 'aff' \(form scale, 1 place\(s\), e\.g\. '0'\): its weight scale",
        damage=EARLIER,
    ),
    Fault(
        "api-export-shift-as-diffusers-lora",
        api=lambda run, tmp: export_lora(_adapted("shift"), tmp / "out", "diffusers-lora", task=0),
        exc=ExportError,
        error=r"adapter 'aff' \(form shift.*its bias shift changes the base bias.*nothing was written",
        damage=EARLIER,
    ),
    Fault(
        "api-export-lowrank-act-merged",
        api=lambda run, tmp: save_merged(_adapted("lowrank_act"), tmp / "out", task=1),
        exc=ExportError,
        error=r"a merged model cannot hold adapter 'aff' \(form lowrank_act.*not linear in x",
        damage=EARLIER,
    ),
    Fault(
        "api-export-position-adapter",
        api=lambda run, tmp: export_lora(_positioned(run), tmp / "out", "peft", task=2),
        run="task",
        exc=ExportError,
        error=r"adapter 'pa' \(position adapter in->out, 1 place\(s\).*between two taps of a block",
        damage=EARLIER,
    ),
]


@pytest.mark.parametrize("fault", cases(FAULTS))
def test_fault(fault, runs, tmp_path, capsys, monkeypatch):
    check_fault(fault, runs, tmp_path, capsys, monkeypatch)
