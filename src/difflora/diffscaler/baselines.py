"""The baselines of 002 Table 1 and the Affiner ablations of 002 Table 3, as config overrides.

Every method adapts the same frozen base (``train.init_from``) and differs only in what trains:

==============  =====================================================================================
method          what trains (config)
==============  =====================================================================================
``full``        every base parameter (``train.train_base: true``, no adapters): full fine-tuning
``lora``        LoRA (rank 8) on the attention projections (U-Net ``qkv``/``proj_out``; DiT
                ``attn.qkv``/``attn.proj``), the default targets of ``model.adapters``
``difffit``     DiffFit (Xie et al., arXiv 2304.06648): every bias, every normalisation layer's scale
                and shift, and a learnable per-channel scale ``gamma`` (initialised to 1) on the output
                of each block's residual branches (U-Net ResBlock ``out_layers.3`` and attention
                ``proj_out``; DiT ``attn.proj`` and ``mlp.fc2``): a ``scale`` adapter (``1 + a``, a = 0)
``bitfit``      BitFit (arXiv 2106.10199): every bias term (layers and normalisations)
``embeddings``  the embeddings only: the timestep MLP and the class embedding table (002's claim:
                embedding rows alone cannot produce a new dataset)
``affiner``     the Affiner, every part, latent d = 32 (U-Net) or 64 (DiT): 002's DiffScaler
``affiner-b``   002 Table 3(a) "b": the bias shift only
``affiner-a``   002 Table 3(a) "a": the weight scale only
``affiner-ab``  a and b (the cumulative reading of Table 3(a)'s second row)
``affiner-dN``  002 Table 3(b): every part with latent width d = N (N in 1, 4, 16, 32)
==============  =====================================================================================

Matched budgets (issue 31): 002 Table 1 compares methods of nearly equal size, so each side also runs
at the other's parameter count:

====================  ===============================================================================
method                what trains (config)
====================  ===============================================================================
``lora-all-rN``       LoRA of rank N on every ``nn.Linear`` and ``nn.Conv`` of the network
                      (:data:`ALL_LAYERS`): the rank whose count reaches the Affiner's (the study's U-Net
                      r = 13: 298,415 against 292,508; DiT r = 59: 771,012 against 769,044)
``affiner-at-lora``   the Affiner at rank-8 attention LoRA's count (U-Net 12,288, DiT 24,576): U-Net
                      every part at d = 1 on every layer but the ResBlocks' ``emb_layers`` (12,564);
                      DiT every part at d = 2 on the blocks' attention and MLP layers (25,616)
``affiner-at-difffit`` the Affiner at DiffFit's count (U-Net 8,802, DiT 9,352): ``a`` and ``b`` (U-Net on
                      every layer, which is ``affiner-ab``: 8,708; DiT on the blocks' attention and MLP
                      layers: 9,216)
``task-row``          002's "embedding rows": one new learnable row per task added to the conditioning
                      embedding of every sample of the task (a ``shift`` on the time embedding's output
                      layer, read by ``task``), the rest frozen. On the U-Net it is a new class row
                      exactly (its class rows add to the time embedding and a new row starts at zero); on
                      the DiT, with every label dropped, the null row plus the trained offset: 002's
                      layout of a new row (``classes.py``). 128 parameters on either study backbone.
``difffit-002``       DiffFit as 002 describes it: the biases of the MLP (``fc1``, ``fc2``) and of the
                      attention's second layer (``attn.proj``) of every DiT block, trained as ``shift``
                      offsets of the frozen biases (the same function; weight decay pulls the offset, not
                      the bias, to zero). DiT only: the U-Net's blocks have no MLP. ``difffit`` is
                      DiffFit's own definition (Xie et al.), the one the study's DiffFit claims use.
====================  ===============================================================================

002 Table 3(a)'s "+ W_up" and "Full" rows differ only in the branch's scalar ``s`` (one parameter per
layer) and ``W_up``'s initialisation; our Affiner always has ``s = 0`` and Kaiming ``W_up`` (the
"Full" row), so "+ low-rank branch" is ``affiner``. Adapters read the ``task`` condition through
an index weighting (one entry per task, -1 = the base), so every method serves task ids like the
Affiner; the data must carry them (``data.task_id``).

``train.base_groups`` (the base's own parameters that train while ``train.train_base`` is false):

* ``bias``: every parameter named ``bias`` (Linear, Conv and normalisation layers);
* ``norm``: every weight and bias of a GroupNorm / LayerNorm with affine parameters;
* ``embedding``: every ``nn.Embedding`` (class rows) and the timestep MLP (``time_embed``,
  ``t_embedder``), including new class rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from torch import nn

from difflora.adapters import adapter_parameters
from difflora.config.schema import Config
from difflora.model.accounting import per_task_counts

__all__ = [
    "BASELINES",
    "ALL_LAYERS",
    "BASE_GROUPS",
    "DIFFFIT_TARGETS",
    "MATCHED_BUDGETS",
    "baseline_overrides",
    "baseline_values",
    "group_parameters",
    "per_task_counts",
    "unfreeze_base_groups",
    "unfreeze_groups",
]

BASE_GROUPS = ("bias", "norm", "embedding")
_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)
_TIME_MLPS = ("time_embed", "t_embedder")

# DiffFit's gamma: the output layer of every residual branch.
DIFFFIT_TARGETS: dict[str, list[str]] = {
    "unet": [r"re:.*out_layers\.3$", r"re:.*\.proj_out$"],
    "dit": [r"re:blocks\.\d+\.(attn\.proj|mlp\.fc2)$"],
}
# LoRA's targets are model.adapters' defaults (the attention projections).
LORA_RANK = 8
# Every nn.Linear and nn.Conv of the study backbones (the fmnist16 bases: an IDDPM U-Net with
# channel_mult [1, 2, 2], whose skip connections are convolutions where the width changes, and a DiT:
# embedders, blocks and final layer); tests check them against an isinstance rule.
_UNET_LAYERS = (
    r"time_embed\.[02]|input_blocks\.0\.0|out\.2|(input_blocks\.3|output_blocks\.\d+)\.0\.skip_connection"
    r"|.*\.(in_layers\.2|out_layers\.3|op|qkv|proj_out|conv{emb})"
)
ALL_LAYERS: dict[str, list[str]] = {
    "unet": ["re:(" + _UNET_LAYERS.format(emb=r"|emb_layers\.1") + ")"],
    "dit": [
        r"re:(x_embedder\.proj|t_embedder\.mlp\.[02]|blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12]"
        r"|adaLN_modulation\.1)|final_layer\.(linear|adaLN_modulation\.1))"
    ],
}
# The DiT blocks' attention and MLP layers (the Affiner's default targets without adaLN_modulation).
DIT_ATTN_MLP = [r"re:blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"]
# The time embedding's output layer, whose output every sample's conditioning embedding adds to.
TIME_EMBED_OUT = {"unet": ["time_embed.2"], "dit": ["t_embedder.mlp.2"]}
# (latent width, parts, targets) of the Affiner at LoRA's and at DiffFit's budget (module docstring);
# targets None: the Affiner's default layers.
_MATCHED_AFFINER: dict[tuple[str, str], tuple[int | None, list[str], list[str] | None]] = {
    ("affiner-at-lora", "unet"): (1, ["scale", "shift", "lowrank"], ["re:(" + _UNET_LAYERS.format(emb="") + ")"]),
    ("affiner-at-lora", "dit"): (2, ["scale", "shift", "lowrank"], DIT_ATTN_MLP),
    ("affiner-at-difffit", "unet"): (None, ["scale", "shift"], None),
    ("affiner-at-difffit", "dit"): (None, ["scale", "shift"], DIT_ATTN_MLP),
}
# Parametric methods (the rank N of lora-all-rN) and those defined per backbone, besides BASELINES.
MATCHED_BUDGETS = ("lora-all-rN", "affiner-at-lora", "affiner-at-difffit", "task-row", "difffit-002")

BASELINES = (
    "full",
    "lora",
    "difffit",
    "bitfit",
    "embeddings",
    "affiner",
    "affiner-b",
    "affiner-a",
    "affiner-ab",
    "affiner-d1",
    "affiner-d4",
    "affiner-d16",
    "affiner-d32",
)


def _task_adapter(name: str, tasks: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "condition": "task", "weighting": "index", "num_values": tasks, **extra}


def baseline_overrides(method: str, arch: str, tasks: int = 1) -> list[str]:
    """``--set`` overrides (``key=value``) that turn an adaptation config into ``method`` (module docstring)."""
    return [f"{k}={json.dumps(v)}" for k, v in baseline_values(method, arch, tasks).items()]


def baseline_values(method: str, arch: str, tasks: int = 1) -> dict[str, Any]:
    """The config values (dotted keys) of :func:`baseline_overrides`."""
    frozen = {"train.train_base": False}
    if method == "full":
        return {"train.train_base": True, "model.affiner": None, "model.adapters": []}
    if method == "lora":
        return {**frozen, "model.affiner": None, "model.adapters": [_task_adapter("lora", tasks, rank=LORA_RANK)]}
    if method == "difffit":
        gamma = _task_adapter("difffit_gamma", tasks, form="scale", targets=DIFFFIT_TARGETS[arch])
        return {**frozen, "model.affiner": None, "model.adapters": [gamma], "train.base_groups": ["bias", "norm"]}
    if method in ("bitfit", "embeddings"):
        group = "bias" if method == "bitfit" else "embedding"
        return {**frozen, "model.affiner": None, "model.adapters": [], "train.base_groups": [group]}
    matched = _matched_budget_values(method, arch, tasks)
    if matched is not None:
        return {**frozen, **matched}
    parts = {"affiner-b": ["shift"], "affiner-a": ["scale"], "affiner-ab": ["scale", "shift"]}
    if method == "affiner" or method in parts:
        return {
            **frozen,
            "model.adapters": [],
            "model.affiner": {"tasks": tasks, **({"parts": parts[method]} if method in parts else {})},
        }
    if method.startswith("affiner-d") and method[len("affiner-d") :].isdigit():
        return {
            **frozen,
            "model.adapters": [],
            "model.affiner": {"tasks": tasks, "latent": int(method[len("affiner-d") :])},
        }
    raise ValueError(f"unknown baseline {method!r}; choose one of {', '.join(BASELINES + MATCHED_BUDGETS)}")


def _matched_budget_values(method: str, arch: str, tasks: int) -> dict[str, Any] | None:
    """The values of the matched-budget methods (:data:`MATCHED_BUDGETS`) besides ``train.train_base``; None
    for another method."""
    if method.startswith("lora-all-r") and method[len("lora-all-r") :].isdigit():
        lora = _task_adapter("lora", tasks, rank=int(method[len("lora-all-r") :]), targets=ALL_LAYERS[arch])
        return {"model.affiner": None, "model.adapters": [lora]}
    if (method, arch) in _MATCHED_AFFINER:
        latent, parts, targets = _MATCHED_AFFINER[method, arch]
        affiner = {"tasks": tasks, "parts": parts, **({"latent": latent} if latent else {})}
        return {"model.adapters": [], "model.affiner": affiner | ({"targets": targets} if targets else {})}
    if method == "task-row":
        row = _task_adapter("task_row", tasks, form="shift", targets=TIME_EMBED_OUT[arch])
        return {"model.affiner": None, "model.adapters": [row]}
    if method == "difffit-002" and arch == "dit":
        biases = _task_adapter(
            "difffit_bias", tasks, form="shift", targets=[r"re:blocks\.\d+\.(mlp\.fc[12]|attn\.proj)"]
        )
        return {"model.affiner": None, "model.adapters": [biases]}
    return None


def group_parameters(net: nn.Module, group: str) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the base's parameters in ``group`` (module docstring); adapters' excluded."""
    if group not in BASE_GROUPS:
        raise ValueError(f"unknown base parameter group {group!r}; choose from {', '.join(BASE_GROUPS)}")
    own = {id(p) for p in adapter_parameters(net)}
    for path, module in net.named_modules():
        top = path.split(".")[0]
        for name, p in module.named_parameters(recurse=False):
            if id(p) in own:
                continue
            hit = (
                (group == "bias" and name == "bias")
                or (group == "norm" and isinstance(module, _NORMS))
                or (
                    group == "embedding"
                    and (isinstance(module, nn.Embedding) or top in _TIME_MLPS or name == "new_rows")
                )
            )
            if hit:
                yield (f"{path}.{name}" if path else name), p


def unfreeze_groups(net: nn.Module, groups: list[str]) -> int:
    """Let the base's parameters of ``groups`` train (after ``freeze_base``); returns their number.

    Frozen class rows of incremental classes (``GrownEmbedding.weight``) stay frozen: they are the
    old classes, which must not move.
    """
    count = 0
    seen: set[int] = set()
    for group in groups:
        for name, p in group_parameters(net, group):
            if id(p) in seen or (name.endswith(".weight") and hasattr(_owner(net, name), "new_rows")):
                continue
            seen.add(id(p))
            p.requires_grad_(True)
            count += p.numel()
    return count


def unfreeze_base_groups(net: nn.Module, cfg: Config) -> None:
    """``train.base_groups`` of ``cfg`` on the built ``net`` (a step of the model's expansion, after the
    base is frozen): let those groups of the base train."""
    if not cfg.train.base_groups:
        return
    if cfg.train.train_base:
        raise ValueError("train.base_groups picks what trains of a frozen base; set train.train_base=false")
    unfreeze_groups(net, cfg.train.base_groups)


def _owner(net: nn.Module, name: str) -> nn.Module:
    return net.get_submodule(name.rpartition(".")[0]) if "." in name else net
