"""Incremental classes (002 section 3.1, eq. 1): add M classes to a class-conditional base.

002 appends the new classes' embedding rows after the unconditional row,
``W_emb = [W_1 .. W_N, W_uc, W_{N+2} .. W_{N+M+1}]``, and initialises each new row as ``W_uc``,
so at step 0 a new class is denoised exactly as the unconditional model denoises (a stable start;
the Affiner then learns what the class needs). In difflora:

* **DiT**: the label table keeps its N + 1 rows (classes, then the learned null row, read for
  ``y = -1``) frozen and gains M trainable rows that start as the null row (stored as offsets from
  it, initialised to zero); label ``N + j`` reads new row j. This is 002's layout: the old rows and their indices are untouched.
* **U-Net**: the class embedding has no null row (the unconditional branch adds no class
  embedding), so the new rows start at zero: adding a zero embedding is exactly the null-class
  behaviour.

From a config: ``model.new_classes: M`` with ``model.num_classes: N + M`` adds the M classes to a
base of N classes (``train.init_from``) when the model is built.

The old rows are a frozen parameter (``requires_grad=False``), so training the new classes cannot
move the old classes' embeddings (no gradient, weight decay or EMA reaches them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from difflora.config.schema import Config, ModelConfig

__all__ = ["GrownEmbedding", "GrownLabelEmbedder", "add_classes", "base_model_config", "grow_classes"]


class GrownEmbedding(nn.Module):
    """An embedding of ``old + M`` rows: ``weight`` [old x D] (frozen) then M new rows.

    ``forward(idx [N]) -> [N x D]``: index i < old reads ``weight[i]``, index old + j reads new row j
    = ``weight[null_row] + new_rows[j]`` (``new_rows`` [M x D], trainable, initialised to zero; without
    a ``null_row`` just ``new_rows[j]``). New rows are stored as offsets from the null row so that
    they equal it at step 0 whatever values the base loads into ``weight`` later (``train.init_from``
    fills ``weight`` after the model is built), and gradients reach them unchanged.
    """

    # Parameters no base checkpoint holds (difflora.train.base: they keep their initialisation).
    new_parameters = ("new_rows",)

    def __init__(self, old: nn.Embedding | GrownEmbedding, num_new: int, null_row: int | None):
        super().__init__()
        if num_new < 1:
            raise ValueError(f"add_classes: the number of new classes must be >= 1, got {num_new}")
        table = old.full_table().detach() if isinstance(old, GrownEmbedding) else old.weight.detach()
        self.weight = nn.Parameter(table.clone(), requires_grad=False)
        self.null_row = null_row
        self.new_rows = nn.Parameter(table.new_zeros(num_new, table.shape[1]))

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0] + self.new_rows.shape[0]

    def full_table(self) -> torch.Tensor:
        """Every row, [old + M x D]."""
        new = self.new_rows if self.null_row is None else self.new_rows + self.weight[self.null_row]
        return torch.cat([self.weight, new])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.full_table())


class GrownLabelEmbedder(nn.Module):
    """The DiT label embedder after :func:`add_classes`: ``forward(y [N]) -> [N x D]`` with 002's row
    layout ``[W_1 .. W_N, W_uc, new ...]``: y = -1 reads the null row N, label N + j reads row N + 1 + j."""

    def __init__(self, old: nn.Module, num_new: int):
        super().__init__()
        self.num_old = old.num_old if isinstance(old, GrownLabelEmbedder) else old.num_classes
        null = self.num_old  # the null row's index, the same in a table grown before
        self.embedding_table = GrownEmbedding(old.embedding_table, num_new, null_row=null)
        self.num_classes = self.embedding_table.num_embeddings - 1

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        n = self.num_old
        rows = torch.where(y < 0, torch.full_like(y, n), torch.where(y >= n, y + 1, y))
        return self.embedding_table(rows)


def add_classes(net: nn.Module, num_new: int) -> int:
    """Add ``num_new`` classes to the class-conditional U-Net or DiT ``net`` in place; returns their
    first label (the old number of classes N: new labels are N .. N + M - 1).

    Adding classes twice freezes the first additions too (their rows join the frozen table).
    """
    if getattr(net, "y_embedder", None) is not None:  # DiT: N + 1 rows, the null row N
        first = net.num_classes
        net.y_embedder = GrownLabelEmbedder(net.y_embedder, num_new)
    elif getattr(net, "label_emb", None) is not None:  # U-Net: N rows, no null row
        first = net.label_emb.num_embeddings
        net.label_emb = GrownEmbedding(net.label_emb, num_new, null_row=None)
    else:
        raise ValueError("add_classes: the network has no class embedding (model.num_classes = 0 or class_embed off)")
    net.num_classes = first + num_new
    return first


def grow_classes(net: nn.Module, cfg: Config) -> None:
    """``model.new_classes`` of ``cfg`` on the built base ``net`` (a step of the model's expansion, after
    the base is frozen, so the new class rows train and the old ones do not)."""
    if cfg.model.new_classes:
        add_classes(net, cfg.model.new_classes)


def base_model_config(cfg: ModelConfig) -> ModelConfig:
    """The model config of the base that ``model.new_classes`` grows: ``num_classes - new_classes`` classes."""
    if not cfg.new_classes:
        return cfg
    if cfg.new_classes >= cfg.num_classes:
        raise ValueError(
            f"model.new_classes ({cfg.new_classes}) must be below model.num_classes ({cfg.num_classes}), which "
            "counts the base's classes and the new ones"
        )
    return cfg.model_copy(update={"num_classes": cfg.num_classes - cfg.new_classes, "new_classes": 0})
