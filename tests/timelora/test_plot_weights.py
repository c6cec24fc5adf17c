"""``difflora plot-weights``: 000 Figure 3's matrix of mean |w_i(t)| per group of timesteps, and its PNG.

The run directories are written directly (config.json plus one checkpoint with tables we choose),
so the expected matrices are known by hand and no training is needed.
"""

import json

import pytest
import torch

from difflora.adapters import TrainableWeighting
from difflora.cli.commands import main
from difflora.config.schema import config_to_dict
from difflora.model.build import build_model
from difflora.timelora.plots import basis_groups, group_mean_abs, plot_weights
from difflora.train.checkpoint import save_checkpoint
from helpers import tiny_config


def naive_matrix(table: torch.Tensor, steps: int) -> torch.Tensor:
    """Reference: for each basis j, average |w_i(t)| over the t whose nearest basis time is t_j (ties: later)."""
    num_values, num_bases = table.shape
    k = (num_values - 1) / (num_bases - 1)
    sums = [[0.0] * num_bases for _ in range(num_bases)]
    counts = [0] * num_bases
    for t in range(steps):
        dist = [abs(t - j * k) for j in range(num_bases)]
        j = max(i for i in range(num_bases) if dist[i] == min(dist))
        counts[j] += 1
        for i in range(num_bases):
            sums[j][i] += abs(float(table[t, i]))
    return torch.tensor(
        [[s / counts[j] if counts[j] else float("nan") for s in row] for j, row in enumerate(sums)], dtype=torch.float64
    )


def test_groups_are_the_papers_for_t4001_m10():
    g = basis_groups(4000, 4001, 11)
    # 000 C.3: first row t = 1..200 (paper) = 0..199 here, second row 201..600 = 200..599, ...
    assert torch.bincount(g).tolist() == [200] + [400] * 9 + [200]
    assert g[199] == 0 and g[200] == 1 and g[599] == 1 and g[600] == 2 and g[3799] == 9 and g[3800] == 10


def test_onehot_table_gives_the_hand_computed_pattern():
    table = TrainableWeighting(101, 11, "onehot").table.detach()
    m = group_mean_abs(table, 100)
    # Row j averages t in [10j - 5, 10j + 4]; onehot puts t on basis floor(t / 10): half of the row
    # on j - 1, half on j. Row 0 is t = 0..4 (all basis 0); row 10 is t = 95..99 (t = 100 is never
    # used with 100 diffusion steps), all on basis 9.
    expected = torch.zeros(11, 11, dtype=torch.float64)
    expected[0, 0] = expected[10, 9] = 1.0
    for j in range(1, 10):
        expected[j, j - 1] = expected[j, j] = 0.5
    assert torch.equal(m, expected)


@pytest.mark.parametrize("num_values, num_bases, steps", [(101, 11, 100), (4001, 11, 4000), (50, 8, 49), (50, 8, 30)])
def test_matrix_equals_naive_reference_on_random_tables(num_values, num_bases, steps):
    table = torch.randn(num_values, num_bases)
    got = group_mean_abs(table, steps)
    want = naive_matrix(table, steps)
    # Groups no timestep reaches (steps=30 < T) are NaN in both.
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)


def _write_run(tmp_path, preset, tables=None):
    cfg = tiny_config(preset)
    model = build_model(cfg)
    state = model.state_dict()
    for path, table in (tables or {}).items():
        state[f"net.{path}.adapters.time.weighting.table"] = table
    run = tmp_path / preset
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(run, 1, model=state, ema=state, optimizer=opt, rng={"g": torch.zeros(1)}, meta={})
    return run


def test_cli_writes_a_png_for_the_default_layer_and_all_layers(tmp_path, capsys):
    # Known tables: layer l holds the constant l + 1, so the mean over all layers is known too.
    model = build_model(tiny_config("tiny-tclora-unet"))
    keys = [k for k, _ in model.named_parameters() if k.endswith(".time.weighting.table")]  # model order
    paths = [k.removeprefix("net.").removesuffix(".adapters.time.weighting.table") for k in keys]
    tables = {p: torch.full((101, 11), float(i + 1)) for i, p in enumerate(paths)}
    run = _write_run(tmp_path, "tiny-tclora-unet", tables)
    default = "middle_block.1.qkv"
    assert default in paths

    out = tmp_path / "w.png"
    assert main(["plot-weights", str(run), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert default in capsys.readouterr().out
    _, name, matrix = plot_weights(run, out=tmp_path / "d.png")
    assert name == default
    assert torch.equal(matrix, torch.full((11, 11), float(paths.index(default) + 1), dtype=torch.float64))

    _, name, matrix = plot_weights(run, layer="all", out=tmp_path / "all.png")
    mean = sum(range(1, len(paths) + 1)) / len(paths)
    assert name == f"mean over {len(paths)} layers"
    assert torch.allclose(matrix, torch.full((11, 11), mean, dtype=torch.float64), rtol=1e-12, atol=0)
    assert (run / "weights.png").exists() is False  # --out was always given

    one = paths[0]
    _, name, _ = plot_weights(run, layer=one, out=tmp_path / "one.png")
    assert name == one


def test_errors_are_clear(tmp_path, capsys):
    run = _write_run(tmp_path, "tiny-timelora-unet")  # linear weighting: nothing trainable
    assert main(["plot-weights", str(run), "--out", str(tmp_path / "x.png")]) == 2
    assert "has no trainable weighting to plot (its adapters: time (linear))" in capsys.readouterr().err

    run = _write_run(tmp_path, "tiny-tclora-unet")
    assert main(["plot-weights", str(run), "--layer", "nope.qkv", "--out", str(tmp_path / "x.png")]) == 2
    assert "--layer 'nope.qkv' matches no layer" in capsys.readouterr().err
    assert main(["plot-weights", str(run), "--adapter", "cls", "--out", str(tmp_path / "x.png")]) == 2
    assert "adapter 'cls' of run" in capsys.readouterr().err
    assert main(["plot-weights", str(run), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "--out must name a .png file" in capsys.readouterr().err
    assert main(["plot-weights", str(tmp_path / "missing")]) == 2
    assert "is not a difflora run directory" in capsys.readouterr().err
