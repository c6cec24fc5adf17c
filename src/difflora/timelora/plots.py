"""Plots of trained adapters: the composition weights of a trainable TimeLoRA weighting (000 Figure 3).

000 appendix C.3 shows, for one attention block, the mean absolute composition weight
``|w_i(t)|`` over the timesteps t near each basis time ``t_i``: a square heatmap whose rows are
groups of timesteps (one per basis) and whose columns are the bases i. A onehot-initialised table
starts as the identity; linear interpolation gives a band of width 2.

Groups, in difflora's 0..T-1 timesteps (``t_i = i k``, ``k = (T - 1) / m``): timestep t belongs to
the basis nearest to it, ties to the later basis, i.e. group ``floor(t / k + 1/2)``. Only the
timesteps the diffusion uses are averaged (``0..diffusion.steps - 1``; row T - 1 of a table with
T = steps + 1 is never trained). For 000's T = 4001, m = 10 this is exactly the paper's grouping:
the first row averages t = 1..200 of the paper (0..199 here), the second t = 201..600, and so on.

    difflora plot-weights runs/tclora --out weights.png            # one layer (see default_layer)
    difflora plot-weights runs/tclora --layer all                  # mean over every wrapped layer
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch

from difflora.adapters import adapter_layers
from difflora.config.schema import Config
from difflora.files.atomic import write_bytes
from difflora.files.images import agg_figure
from difflora.model.build import build_model
from difflora.train import load_run_config, open_run

__all__ = [
    "WeightTables",
    "basis_groups",
    "default_layer",
    "draw_heatmap",
    "group_mean_abs",
    "load_weight_tables",
    "plot_weights",
]


def basis_groups(num_timesteps: int, num_values: int, num_bases: int) -> torch.Tensor:
    """Group of each timestep ``t = 0..num_timesteps-1``: the nearest basis, ties to the later one. [num_timesteps].

    Basis i sits at ``i (T - 1) / m`` (T = ``num_values``, m = ``num_bases - 1``); integer arithmetic
    (``floor((2 t m + T - 1) / (2 (T - 1)))``) so that ties are exact for any T and m.
    """
    if not 1 <= num_timesteps <= num_values:
        raise ValueError(f"num_timesteps must be in 1..num_values ({num_values}), got {num_timesteps}")
    m, span = num_bases - 1, num_values - 1
    t = torch.arange(num_timesteps, dtype=torch.int64)
    return torch.div(2 * t * m + span, 2 * span, rounding_mode="floor").clamp(max=m)


def group_mean_abs(table: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """000 Figure 3's matrix: ``M[g, i] = mean over t in group g of |table[t, i]|``. [(m+1) x (m+1)].

    ``table`` [T x (m+1)] is a trainable weighting's table; rows ``t >= num_timesteps`` are ignored.
    """
    num_values, num_bases = table.shape
    groups = basis_groups(num_timesteps, num_values, num_bases)
    w = table[:num_timesteps].detach().abs().to(torch.float64)
    sums = torch.zeros(num_bases, num_bases, dtype=torch.float64).index_add_(0, groups, w)
    counts = torch.bincount(groups, minlength=num_bases).to(torch.float64)
    # A group with no timestep (only when steps < T - k / 2) is shown as NaN (blank), not 0.
    return sums / counts[:, None].where(counts[:, None] > 0, torch.tensor(float("nan"), dtype=torch.float64))


@dataclass
class WeightTables:
    """The trainable weighting tables of one adapter of a run, in model order."""

    adapter: str
    tables: dict[str, torch.Tensor]  # layer path (as in the backbone) -> [T x (m+1)]
    num_timesteps: int  # diffusion.steps: the timesteps that occur in training and sampling


def _adapter_layers_in_order(cfg: Config) -> list[tuple[str, dict[str, str]]]:
    """``(path, {adapter name: weighting kind})`` of every wrapped layer, in model order (no weights allocated)."""
    with torch.device("meta"):
        model = build_model(cfg)
    return [
        (path, {name: bank.weighting.kind for name, bank in layer.adapters.items()})
        for path, layer in adapter_layers(model.net)
    ]


def load_weight_tables(run_dir: str | Path, weights: str = "ema", adapter: str | None = None) -> WeightTables:
    """Read the trainable weighting tables of a run's newest checkpoint (``weights``: ema or model).

    ``adapter`` picks one adapter by name; by default the run's only adapter with a trainable
    weighting. Raises ``ValueError`` when there is none (or several and none was named).
    """

    cfg = load_run_config(run_dir)
    layers = _adapter_layers_in_order(cfg)
    kinds: dict[str, str] = {}
    for _, adapters in layers:
        kinds.update(adapters)
    trainable = [n for n, k in kinds.items() if k == "trainable"]
    described = ", ".join(f"{n} ({k})" for n, k in kinds.items()) or "none"
    if adapter is None:
        if not trainable:
            raise ValueError(
                f"run {run_dir} has no trainable weighting to plot (its adapters: {described}); plot-weights "
                f"draws trainable tables (model.adapters[...].weighting: trainable)"
            )
        if len(trainable) > 1:
            raise ValueError(
                f"run {run_dir} has several trainable adapters ({', '.join(trainable)}); pick one with --adapter"
            )
        adapter = trainable[0]
    elif kinds.get(adapter) != "trainable":
        what = f"has weighting {kinds[adapter]!r}, not trainable" if adapter in kinds else "does not exist"
        raise ValueError(
            f"adapter {adapter!r} of run {run_dir} {what}; trainable adapters: {', '.join(trainable) or 'none'}"
        )
    state = open_run(run_dir, weights)[1].state_dict()
    tables = {}
    for path, adapters in layers:
        if adapter in adapters:
            key = f"net.{path}.adapters.{adapter}.weighting.table"
            if key not in state:
                raise ValueError(f"the checkpoint of {run_dir} lacks {key}")
            tables[path] = state[key].float()
    return WeightTables(adapter, tables, min(cfg.diffusion.steps, next(iter(tables.values())).shape[0]))


def default_layer(paths: list[str]) -> str:
    """The layer plotted by default: the middle block's ``qkv`` if there is one, else the median
    ``qkv`` layer in model order (else the median layer).

    For 000's CIFAR-10 U-Net that is ``middle_block.1.qkv``, the attention at the bottleneck; for a
    DiT of depth 12, ``blocks.6.attn.qkv``.
    """
    qkv = [p for p in paths if p.split(".")[-1] == "qkv"] or paths
    middle = [p for p in qkv if p.startswith("middle_block.")]
    return middle[0] if middle else qkv[len(qkv) // 2]


def _select(tables: dict[str, torch.Tensor], layer: str | None) -> tuple[str, list[torch.Tensor]]:
    paths = list(tables)
    if layer is None:
        layer = default_layer(paths)
    if layer == "all":
        return f"mean over {len(paths)} layers", list(tables.values())
    hits = [p for p in paths if p == layer] or [p for p in paths if p.endswith("." + layer)]
    if len(hits) != 1:
        what = "matches several layers" if hits else "matches no layer with this adapter"
        raise ValueError(f"--layer {layer!r} {what}; choose one of: {', '.join(paths)} (or 'all')")
    return hits[0], [tables[hits[0]]]


def draw_heatmap(matrix: torch.Tensor, path: str | Path, title: str) -> Path:
    """Write ``matrix`` [(m+1) x (m+1)] as a heatmap PNG (rows: t near basis t_i; columns: basis i)."""
    data = matrix.numpy()
    n = data.shape[0]
    size = max(4.0, 0.45 * n + 1.5)
    fig = agg_figure((size + 1.0, size), "the TimeLoRA weight plot")
    ax = fig.add_subplot()
    im = ax.imshow(data, cmap="viridis", origin="upper", aspect="equal")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="mean |w_i(t)|")
    ax.set_xlabel("basis LoRA i")
    ax.set_ylabel("timesteps t nearest to basis time t_j")
    ticks = list(range(n)) if n <= 21 else list(range(0, n, max(1, n // 10)))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_title(title, fontsize=9)
    if n <= 12:  # values in the cells while they stay readable
        for r in range(n):
            for c in range(n):
                v = data[r, c]
                ax.text(
                    c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < data.max() / 2 else "k"
                )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".").lower() or "png", dpi=120)
    return write_bytes(path, buf.getvalue())


def plot_weights(
    run_dir: str | Path,
    layer: str | None = None,
    out: str | Path | None = None,
    weights: str = "ema",
    adapter: str | None = None,
) -> tuple[Path, str, torch.Tensor]:
    """Draw 000 Figure 3 for a run: returns (PNG path, layer description, matrix [(m+1) x (m+1)]).

    ``layer``: a wrapped layer's path (or a dotted suffix of it), ``"all"`` for the mean over every
    layer, or None for :func:`default_layer`. ``out`` defaults to ``<run_dir>/weights.png``.
    """
    loaded = load_weight_tables(run_dir, weights, adapter)
    name, tables = _select(loaded.tables, layer)
    matrix = torch.stack([group_mean_abs(t, loaded.num_timesteps) for t in tables]).mean(0)
    t_count, m = tables[0].shape[0], tables[0].shape[1] - 1
    title = f"{Path(run_dir).name}: adapter {loaded.adapter!r}, {name}\nT = {t_count}, m = {m}, {weights} weights"
    path = draw_heatmap(matrix, out if out is not None else Path(run_dir) / "weights.png", title)
    return path, name, matrix
