"""DiffScaler's Affiner (002 eq. 5) as a recipe over the generic update forms.

    y = (1 + a) W x + s W_up ReLU(W_down x) + b_hat + b

is three branches of one wrapped layer, all selected per sample by the ``task`` condition
(an index weighting: one entry per task, -1 = the untouched base):

=============  ===============  ==============================================================
term           adapter name     form (``difflora.adapters.forms``)
=============  ===============  ==============================================================
``a``          ``affiner_a``    ``scale``: per output channel, stored as the deviation from 1,
                                initialised to 0 (002 writes "a initialised as ones" for the
                                factor ``1 + a``; we start the factor at exactly 1, so a fresh
                                Affiner changes no output)
``b``          ``affiner_b``    ``shift``: per output channel, initialised to 0
``s W_up ..``  ``affiner_lr``   ``lowrank_act``, ReLU, rank d (``latent``), W_down and W_up
                                Kaiming-normal, s = 0; on a k x k convolution 1x1 convolutions
                                (002 section 3.2) reading the centre of each receptive field
=============  ===============  ==============================================================

``model.affiner`` (:class:`~difflora.config.schema.AffinerConfig`) expands into these
:class:`~difflora.config.schema.AdapterConfig` entries when the model is built
(:func:`affiner_adapter_configs`), so everything that handles adapters (injection, freezing,
checkpoints, adapter files, ``--condition task=K``) handles the Affiner.

Default targets (002 section 4.3 and its supplement):

* **DiT**: in every block ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` and
  ``adaLN_modulation.1``; not the patch embedding (``x_embedder.proj``), the timestep MLP, nor
  the final layer. For DiT-XL/2 the ``a`` (or ``b``) parameters number 28 x 17,280 = 483,840,
  002 Table 3(a)'s 0.48M.
* **U-Net**: every ``nn.Linear`` and ``nn.Conv1d/2d`` of the network ("each trainable layer",
  002 section 3.2): the input and output convolutions, the timestep MLP (``time_embed.0/2``),
  every ResBlock's ``in_layers.2``, ``emb_layers.1``, ``out_layers.3`` and 1x1
  ``skip_connection``, every attention ``qkv`` and ``proj_out`` and the resampling convolutions.
  The class embedding is an ``nn.Embedding``, not a target (incremental classes: ``classes.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from difflora.adapters import SUPPORTED_LAYERS, adapter_layers
from difflora.config.schema import AdapterConfig, ModelConfig
from difflora.nets.layers import BaseExtension

__all__ = [
    "AFFINER_NAMES",
    "DEFAULT_LATENT",
    "DIT_TARGETS",
    "affiner_adapter_configs",
    "affiner_counts",
    "default_affiner_targets",
]

# Eq. 5's terms -> adapter names (part of parameter names: ``...qkv.adapters.affiner_a.scale``).
AFFINER_NAMES: dict[str, str] = {"scale": "affiner_a", "shift": "affiner_b", "lowrank": "affiner_lr"}
_FORMS = {"scale": "scale", "shift": "shift", "lowrank": "lowrank_act"}

# 002 section 4.3: d = 64 for DiT (hidden 1152), 32 for CNN backbones (<= 512 channels).
DEFAULT_LATENT: dict[str, int] = {"unet": 32, "dit": 64}

DIT_TARGETS: tuple[str, ...] = (r"re:blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|adaLN_modulation\.1)",)


def default_affiner_targets(net: nn.Module, arch: str) -> list[str]:
    """The layers 002 adapts (module docstring): a regex for the DiT, every layer path for the U-Net."""
    if arch == "dit":
        return list(DIT_TARGETS)
    # Not the layers of modules the base lacks (a spatial input, a ControlNet branch): they train whole.
    extra = [p + "." for p, m in net.named_modules() if isinstance(m, BaseExtension)]
    return [
        p for p, m in net.named_modules() if p and isinstance(m, SUPPORTED_LAYERS) and not p.startswith(tuple(extra))
    ]


def affiner_adapter_configs(cfg: ModelConfig, net: nn.Module | None = None) -> list[AdapterConfig]:
    """``cfg.affiner`` as ``model.adapters`` entries (none without it); ``net`` gives default targets.

    Without ``net`` and without explicit targets the entries have no targets: enough to know which
    conditions and values the model reads (``--condition`` checks), not to inject them.
    """
    aff = cfg.affiner
    if aff is None:
        return []
    clash = sorted({a.name for a in cfg.adapters} & {AFFINER_NAMES[p] for p in aff.parts})
    if clash:
        raise ValueError(f"model.adapters uses the name(s) {clash} that model.affiner creates; rename them")
    targets = list(aff.targets)
    if not targets and net is not None:
        targets = default_affiner_targets(net, cfg.arch)
    latent = aff.latent or DEFAULT_LATENT[cfg.arch]
    out = []
    for part in aff.parts:
        extra: dict[str, Any] = {}
        if part == "lowrank":
            extra = {"rank": latent, "activation": "relu", "kernel": aff.kernel}
        out.append(
            AdapterConfig(
                name=AFFINER_NAMES[part],
                condition=aff.condition,
                form=_FORMS[part],
                weighting="index",
                num_values=aff.tasks,
                targets=targets,
                frozen=aff.frozen_tasks,
                **extra,
            )
        )
    return out


def affiner_counts(net: nn.Module, names: Sequence[str] = tuple(AFFINER_NAMES.values())) -> dict[str, Any]:
    """Parameters of the Affiner per task: ``{"tasks": N, "per_task": {adapter: n}, "total_per_task": n,
    "layers": L}``; frozen entries count (they serve their task), every entry has the same size."""
    per_task: dict[str, int] = {}
    tasks, layers = 0, 0
    for _, layer in adapter_layers(net):
        hit = False
        for name, branch in layer.adapters.items():
            if name not in names:
                continue
            hit = True
            size = sum(p.numel() for p in branch.parameters()) - _weighting_size(branch)
            per_task[name] = per_task.get(name, 0) + size // branch.num_bases
            tasks = max(tasks, branch.num_bases)
        layers += hit
    return {"tasks": tasks, "per_task": per_task, "total_per_task": sum(per_task.values()), "layers": layers}


def _weighting_size(branch: nn.Module) -> int:
    return sum(p.numel() for p in branch.weighting.parameters())
