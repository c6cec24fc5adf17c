"""diffusers backbones behind difflora's ``net(x, t, y=None, context=None)`` signature.

:class:`DiffusersNet` wraps a diffusers ``UNet2DModel``, ``UNet2DConditionModel`` or
``DiTTransformer2DModel`` (held as ``.model``, so its parameter names are diffusers' own under
``model.``) and translates difflora's call into diffusers' one. Wrapped in
:class:`difflora.model.build.DiffusionModel`, adapters injected anywhere inside it (TimeLoRA on
``to_q``/``to_k``/``to_v``/``to_out.0``, ClassLoRA, task adapters) read their per-sample
conditions as in difflora's own backbones: the diffusers code is not changed::

    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=2, ...)
    model = DiffusionModel(DiffusersNet(unet, num_classes=10))
    inject_adapter(model, "time", lambda: LinearWeighting(11, 0, 100), "t", ["to_q", "to_v"])
    eps = model(x, t, y)                      # [N x C_out x H x W]

Timesteps. The diffusers model gets the backbone's time input that ``DiffusionModel`` computes from
the integer timestep: float ``t * 1000 / T`` with ``diffusion.rescale_timesteps`` (diffusers' own
0..999 range whatever T is; its time embeddings take floats), else the integer t. Adapters inside
it read the integer t, as everywhere.

Class labels. difflora's null label is ``y = -1`` (``y=None``: every sample). A backbone's label
table (the UNets' ``class_embedding``, ``num_class_embeds`` rows; the DiT's per-block
``LabelEmbedding``, ``num_embeds_ada_norm`` rows plus diffusers' null row) is used as follows:
with ``num_classes + 1`` rows, row ``num_classes`` is a learned null label (diffusers' DiT
convention); with ``num_classes`` rows, a null sample gets no class embedding at all (difflora's
convention, as ClassLoRA's null class adds no update). With ``class_embed=False`` every sample is
null: the class enters through adapters only (ClassLoRA). diffusers' own label dropout in the DiT
is switched off: difflora's ``train.label_dropout`` drops labels (to -1).

Context. A ``UNet2DConditionModel`` needs ``encoder_hidden_states`` [N x L x D]: the caller's
``context`` or, without one, learned tokens per class label and a learned null context
(:class:`difflora.nets.transformer.ContextEmbedder`, ``context_embedder.``), as difflora's
``model.attention: cross`` backbones do.

Position adapters (004). The supported blocks inside (``BasicTransformerBlock``, ``ResnetBlock2D``)
get named taps when wrapped (:mod:`difflora.nets.diffusers_taps`), so ``form: position`` adapters
target them as difflora's own blocks: ``targets: ["re:.*transformer_blocks\\.\\d+"]``.

diffusers is an optional dependency (``pip install 'difflora[interop]'``); it is imported when a
net is built, never at ``import difflora``. Models are built from their config only: nothing is
downloaded.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from difflora.config.schema import ModelConfig
from difflora.nets.diffusers_taps import add_diffusers_taps
from difflora.nets.transformer import ContextEmbedder
from difflora.optional import require

__all__ = ["DiffusersNet", "build_diffusers_model", "diffusers_classes"]


def diffusers_classes() -> dict[str, type[nn.Module]]:
    """Name -> class of the wrapped diffusers models; a clear error when diffusers is absent."""
    diffusers = require("diffusers", "model.arch=diffusers", extra="interop")
    return {
        "UNet2DModel": diffusers.UNet2DModel,
        "UNet2DConditionModel": diffusers.UNet2DConditionModel,
        "DiTTransformer2DModel": diffusers.DiTTransformer2DModel,
    }


def build_diffusers_model(class_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``class_name(**kwargs)``, freshly initialised; an unknown argument is an error listing the valid ones."""
    classes = diffusers_classes()
    if class_name not in classes:
        raise ValueError(f"model.diffusers.class_name: {class_name!r} is not wrapped; choose {', '.join(classes)}")
    cls = classes[class_name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"model.diffusers.config: {class_name} has no argument(s) {unknown}; valid: {', '.join(valid)}"
        )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise ValueError(f"model.diffusers.config: {class_name}(...) refused the config: {exc}") from None


class DiffusersNet(nn.Module):
    """``forward(x [N x C x H x W], t [N], y [N] | None, context [N x L x D] | None) -> [N x C_out x H x W]``.

    Args:
        model: a diffusers ``UNet2DModel``, ``UNet2DConditionModel`` or ``DiTTransformer2DModel``.
        num_classes: class labels 0..num_classes-1 (0: unconditional); -1 is the null label.
        class_embed: feed labels to the model's own label table (False: every sample is null).
        context_tokens: tokens L per class of the learned context (``UNet2DConditionModel`` only).
        learned_context: False for a text pipeline's UNet: the caller always gives ``context``.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int = 0,
        class_embed: bool = True,
        context_tokens: int = 1,
        learned_context: bool = True,
    ):
        super().__init__()
        classes = diffusers_classes()
        self.kind = next((name for name, cls in classes.items() if isinstance(model, cls)), None)
        if self.kind is None:
            raise TypeError(f"DiffusersNet wraps {', '.join(classes)}; got {type(model).__name__}")
        self.model = model
        add_diffusers_taps(model)  # 004's positions inside its blocks (nets/diffusers_taps.py)
        self.num_classes, self.class_embed = int(num_classes), bool(class_embed)
        self._label_modules = self._find_label_modules()
        self.null_row = self._check_label_table()
        for module in self._label_modules:
            module.register_forward_hook(self._zero_null_rows)
            if hasattr(module, "dropout_prob"):  # diffusers' LabelEmbedding: difflora drops labels itself
                module.dropout_prob = 0.0
        self._keep: torch.Tensor | None = None  # [N] 1 = labelled, 0 = null; set during forward only
        self.context_embedder = None
        if self.kind == "UNet2DConditionModel" and learned_context:
            dim = model.config.cross_attention_dim
            if not isinstance(dim, int):
                raise ValueError(f"UNet2DConditionModel: cross_attention_dim must be one int, got {dim!r}")
            self.context_embedder = ContextEmbedder(self.num_classes, context_tokens, dim)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> DiffusersNet:
        """The net of ``cfg.diffusers`` (``model.arch: diffusers``), built offline from its config."""
        assert cfg.image_size is not None and cfg.in_channels is not None  # Config resolves them
        kwargs = cfg.diffusers.resolved(cfg.image_size, cfg.in_channels, cfg.out_channels)
        model = build_diffusers_model(cfg.diffusers.class_name, kwargs)
        return cls(model, cfg.num_classes, cfg.class_embed, cfg.context.tokens, learned_context=cfg.text is None)

    # --- class labels ---------------------------------------------------------------------------
    def _find_label_modules(self) -> list[nn.Module]:
        """The modules that embed class labels: the UNets' ``class_embedding``, the DiT's label tables."""
        if self.kind == "DiTTransformer2DModel":
            embeddings = require("diffusers.models.embeddings", "model.arch=diffusers", extra="interop")
            return [m for m in self.model.modules() if isinstance(m, embeddings.LabelEmbedding)]
        emb = self.model.class_embedding
        if emb is None:
            return []
        if not isinstance(emb, nn.Embedding):
            raise ValueError(
                f"{self.kind}: class_embed_type={self.model.config.class_embed_type!r} is not supported; "
                f"use num_class_embeds with class_embed_type None (a table of class rows)"
            )
        return [emb]

    def _table_rows(self) -> int:
        m = self._label_modules[0]
        return (m.embedding_table if hasattr(m, "embedding_table") else m).num_embeddings

    def _check_label_table(self) -> int | None:
        """The learned null row (None: null samples get no class embedding); errors on a table that does not fit."""
        if not self._label_modules:
            # UNet2DConditionModel: the class enters through the learned context tokens.
            if self.class_embed and self.num_classes and self.kind != "UNet2DConditionModel":
                raise ValueError(
                    f"{self.kind} has no class embedding but model.num_classes={self.num_classes} and "
                    f"model.class_embed=true: set num_class_embeds={self.num_classes} in model.diffusers.config, "
                    f"or model.class_embed=false (classes through ClassLoRA only)"
                )
            return None
        if not (self.class_embed and self.num_classes):
            return None  # every sample is null: zero class embedding
        rows = self._table_rows()
        if rows not in (self.num_classes, self.num_classes + 1):
            key = "num_embeds_ada_norm" if self.kind == "DiTTransformer2DModel" else "num_class_embeds"
            raise ValueError(
                f"{self.kind}: the class table has {rows} rows but model.num_classes={self.num_classes}; set "
                f"{key} so that it has num_classes rows (null: no embedding) or num_classes + 1 (a learned null row)"
            )
        return self.num_classes if rows == self.num_classes + 1 else None

    def backbone_labels(self, y: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
        """The labels [N] the diffusers model receives (None: it has no label table); sets the null mask."""
        if not self._label_modules:
            return None
        if y is None or not (self.class_embed and self.num_classes):
            y = torch.full((n,), -1, dtype=torch.long, device=device)
        y = y.to(device=device, dtype=torch.long)
        null = y < 0
        if self.null_row is not None:
            self._keep = None
            return torch.where(null, torch.full_like(y, self.null_row), y)
        self._keep = (~null).float()
        return torch.where(null, torch.zeros_like(y), y)

    def _zero_null_rows(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook on each label table: null samples' embeddings become zero (no class embedding)."""
        if self._keep is None:
            return None
        return output * self._keep.to(output.dtype).view(-1, *([1] * (output.dim() - 1)))

    # --- forward --------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        n = x.shape[0]
        labels = self.backbone_labels(y, n, x.device)
        try:
            if self.kind == "UNet2DConditionModel":
                if self.context_embedder is None and context is None:
                    raise ValueError("a text pipeline's UNet2DConditionModel needs context= (the prompts' embeddings)")
                y_ctx = y if self.num_classes and self.class_embed else None
                ctx = context if self.context_embedder is None else self.context_embedder(y_ctx, n, context)
                ctx = ctx.to(x.dtype)
                return self.model(x, t, encoder_hidden_states=ctx, class_labels=labels, return_dict=False)[0]
            if context is not None:
                raise ValueError(f"context= is for UNet2DConditionModel (cross-attention); this net is a {self.kind}")
            if self.kind == "DiTTransformer2DModel":
                return self.model(x, timestep=t, class_labels=labels, return_dict=False)[0]
            return self.model(x, t, class_labels=labels, return_dict=False)[0]
        finally:
            self._keep = None

    def extra_repr(self) -> str:
        return f"kind={self.kind}, num_classes={self.num_classes}, class_embed={self.class_embed}"
