"""DiT (Peebles & Xie 2023): a transformer on patches, conditioned by adaLN-Zero.

Layer for layer as facebookresearch/DiT ``models.py`` (with timm's PatchEmbed / Attention / Mlp):
module paths ``x_embedder.proj``, ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table``,
``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``, ``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2``,
``blocks.{i}.adaLN_modulation.1``, ``final_layer.{linear,adaLN_modulation.1}``. Adapters target the
attention's ``attn.qkv`` and ``attn.proj`` (nn.Linear). Initialisation is DiT's
``initialize_weights``: xavier-uniform linears, N(0, 0.02) embeddings, and zeros for every adaLN
modulation and the final linear, so a fresh DiT outputs exactly zero and every block is the identity.

Conditioning vector ``c`` [N x hidden] fed to every adaLN modulation:

* ``c = t_embedder(t) + y_embedder(y)``. The label table has ``num_classes + 1`` rows; the last
  one (index ``num_classes``) is the learned null embedding, used where ``y == -1`` and for all
  samples when ``y=None``. Label dropout for classifier-free guidance is the training loop's job
  (it sets labels to -1); the net never drops labels itself, unlike DiT's ``LabelEmbedder``.
* ``class_embed: false`` or ``num_classes == 0``: no ``y_embedder``, ``c = t_embedder(t)``.
* ``time_embed: false`` (TimeLoRA replaces the time input): no ``t_embedder``; ``c`` is the class
  embedding alone, and with no class embedding either ``c`` is a zero vector, so each
  ``adaLN_modulation`` (SiLU then Linear) outputs exactly its Linear's learned bias: the shifts,
  scales and gates become per-block learned constants, the same for every sample.

``attention: cross`` (not DiT's published blocks): every block is the LDM-style
:class:`~difflora.nets.transformer.TransformerBlock` (self-attention, cross-attention over a
context, GEGLU feed-forward of width ``mlp_ratio * hidden``) keeping adaLN-Zero for the time
vector; the class label enters through the context (``context_embedder``), so there is no
``y_embedder`` and ``c = t_embedder(t)``; ``net(x, t, y, context=...)`` takes a caller's context.

Masked training (DiffScaler, 002 section 4.2; ``train.mask_ratio``): ``net(strip, t, y, keep=idx)``
runs only the kept tokens ``idx`` [N x K] of each sample, given as a strip of their patches
(:func:`patch_strip`), and returns the strip of their outputs; the dropped tokens never enter
(the objective that draws them is 002's, ``difflora.diffscaler.masked``).

Other differences: the fixed 2D sin-cos position embedding is a non-persistent buffer (not a
parameter, so it is never trained nor saved; DiT keeps it as a frozen ``nn.Parameter``);
attention is ``layers.dot_product_attention`` (SDPA, or written out on a CPU in bf16); images are
square (``image_size``), and ``patch_size`` must divide it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from difflora.config.schema import DIT_PRESETS, ModelConfig
from difflora.nets.layers import dot_product_attention, timestep_embedding
from difflora.nets.transformer import ContextEmbedder, TransformerBlock

__all__ = ["DIT_PRESETS", "DiT", "DiTBlock", "get_2d_sincos_pos_embed", "patch_strip"]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with per-sample [N x D] shift/scale broadcast over tokens of x [N x T x D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    # [M] positions -> [M x dim]: sin of the first dim/2 frequencies, then cos (MAE / DiT order).
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding, [grid_size**2 x dim] float32, tokens in row-major order.

    As DiT (after MAE): the first dim/2 channels encode the column index, the last dim/2 the row.
    """
    if dim % 4:
        raise ValueError(f"DiT hidden_size must be divisible by 4 for the 2D sin-cos embedding, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.cat([_sincos_1d(dim // 2, cols.reshape(-1)), _sincos_1d(dim // 2, rows.reshape(-1))], dim=1).float()


def patch_strip(x: torch.Tensor, keep: torch.Tensor, patch: int) -> torch.Tensor:
    """The kept p x p patches of images side by side: x [N x C x H x W], keep [N x K] row-major token
    indices -> [N x C x p x K p]; patch k of the strip is token ``keep[:, k]``.

    A strip is an image to the patch embedding (a p x p convolution with stride p reads each patch
    alone) and to the diffusion's element-wise losses, so masked training needs no other layout.
    """
    n, c, h, w = x.shape
    g = w // patch
    tiles = x.reshape(n, c, h // patch, patch, g, patch).permute(0, 1, 2, 4, 3, 5).reshape(n, c, -1, patch, patch)
    idx = keep[:, None, :, None, None].expand(n, c, keep.shape[1], patch, patch)
    kept = tiles.gather(2, idx)  # (N, C, K, p, p)
    return kept.permute(0, 1, 3, 2, 4).reshape(n, c, patch, keep.shape[1] * patch)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: [N x C x H x W] -> [N x (H/p)(W/p) x D] (timm's PatchEmbed)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """[N] timesteps -> [N x D]: 256-wide sinusoid, Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """[N] labels (-1 = null) -> [N x D]; row ``num_classes`` of the table is the null embedding."""

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(torch.where(y < 0, torch.full_like(y, self.num_classes), y))


class Attention(nn.Module):
    """Multi-head self-attention on [N x T x D] with ``qkv`` (D -> 3D) and ``proj`` (D -> D) linears.

    The 3D outputs of ``qkv`` are laid out as (3, heads, D/heads), as timm's Attention.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"DiT hidden_size={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        h = dot_product_attention(qkv[0], qkv[1], qkv[2])  # (N, heads, T, D/heads)
        return self.proj(h.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))`` on [N x T x D]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: c [N x D] gives shift, scale and gate for attention and MLP.

    Taps (parameter-free ``nn.Identity`` points for position adapters, 004), all [N x T x D], in
    forward order: ``in`` (block input), ``attn_in`` (the modulated, normalised input of attention),
    ``attn_out`` (attention's output, before its gate), ``mlp_in``, ``mlp_out`` (likewise) and
    ``out`` (block output).
    """

    TAPS = ("in", "attn_in", "attn_out", "mlp_in", "mlp_out", "out")
    tap_layout = "channels_last"

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        for tap in self.TAPS:
            setattr(self, f"tap_{tap}", nn.Identity())
        self.tap_channels = dict.fromkeys(self.TAPS, hidden_size)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """:param x: [N x T x D]. :param c: [N x D]. :return: [N x T x D]."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = self.tap_in(x)
        a = self.tap_attn_out(self.attn(self.tap_attn_in(modulate(self.norm1(x), shift_msa, scale_msa))))
        x = x + gate_msa.unsqueeze(1) * a
        m = self.tap_mlp_out(self.mlp(self.tap_mlp_in(modulate(self.norm2(x), shift_mlp, scale_mlp))))
        return self.tap_out(x + gate_mlp.unsqueeze(1) * m)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a linear to p*p*C_out values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """DiT built from a :class:`difflora.config.schema.ModelConfig` (``arch: dit``).

    ``net(x, t, y=None)``: x [N x C x H x W] (H = W = image_size), t [N] timesteps (or a scalar),
    y [N] int64 with -1 for the null label, or None (all null; ignored without a class embedding)
    -> [N x C_out x H x W], C_out = 2C with ``learn_sigma``. ``cfg.dit.preset`` (a key of
    :data:`DIT_PRESETS`) fixes depth, hidden_size, num_heads and patch_size in the config.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.image_size is None or cfg.in_channels is None:
            raise ValueError(
                "model.image_size and model.in_channels must be set (they are filled from data in a Config)"
            )
        d = cfg.dit  # a preset's sizes are in its fields (DiTConfig holds them)
        depth, hidden, heads, patch = d.depth, d.hidden_size, d.num_heads, d.patch_size
        if cfg.image_size % patch:
            raise ValueError(f"model.dit patch_size={patch} must divide model.image_size={cfg.image_size}")
        self.image_size = cfg.image_size
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.patch_size = patch
        self.hidden_size = hidden
        self.num_classes = cfg.num_classes if cfg.class_embed else 0
        self.grid = cfg.image_size // patch

        self.x_embedder = PatchEmbed(patch, cfg.in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden) if cfg.time_embed else None
        cross = cfg.attention == "cross"
        self.y_embedder = LabelEmbedder(self.num_classes, hidden) if self.num_classes > 0 and not cross else None
        ctx = cfg.context
        self.context_embedder = ContextEmbedder(self.num_classes, ctx.tokens, ctx.dim) if cross else None
        # Fixed, so a buffer: never trained, and recomputed rather than loaded.
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(hidden, self.grid)[None], persistent=False)
        if cross:
            inner = int(hidden * d.mlp_ratio)
            self.blocks = nn.ModuleList(TransformerBlock(hidden, heads, ctx.dim, inner, hidden) for _ in range(depth))
        else:
            self.blocks = nn.ModuleList(DiTBlock(hidden, heads, d.mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden, patch, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: adaLN-Zero and a zero final linear make a fresh model output zeros."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:  # cross-attention's to_q, to_k, to_v have none
                    nn.init.zeros_(m.bias)
        # The patch conv is initialised like the linear map it is (xavier on the flattened kernel).
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        if self.t_embedder is not None:
            nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N x T x p*p*C_out] tokens (row-major patches) -> [N x C_out x H x W]."""
        n, p, g, c = x.shape[0], self.patch_size, self.grid, self.out_channels
        x = x.reshape(n, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, g * p, g * p)

    def unpatchify_strip(self, x: torch.Tensor) -> torch.Tensor:
        """[N x K x p*p*C_out] tokens of kept patches -> their strip [N x C_out x p x K p] (:func:`patch_strip`)."""
        n, k, p, c = x.shape[0], x.shape[1], self.patch_size, self.out_channels
        return torch.einsum("nkpqc->ncpkq", x.reshape(n, k, p, p, c)).reshape(n, c, p, k * p)

    def condition(self, t: torch.Tensor, y: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor:
        """The adaLN conditioning vector c [N x hidden] (see the module docstring)."""
        device = self.pos_embed.device
        c = torch.zeros(n, self.hidden_size, device=device, dtype=dtype)
        if self.t_embedder is not None:
            t = torch.as_tensor(t, device=device)
            c = c + self.t_embedder(t.expand(n) if t.ndim == 0 else t)
        if self.y_embedder is not None:
            if y is None:
                y = torch.full((n,), -1, dtype=torch.long, device=device)
            c = c + self.y_embedder(y)
        return c

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:param x: [N x C x H x W]. :param t: [N]. :param y: [N] labels (-1 = null) or None.
        :param context: ``attention: cross`` only: a caller's context [N x L x D].
        :param keep: masked training (002 section 4.2): [N x K] indices of the tokens each sample
            keeps; x is then their strip [N x C x p x K p] (:func:`patch_strip`), the dropped tokens
            never enter the network, and the output is the strip [N x C_out x p x K p].
        :return: [N x C_out x H x W]."""
        if self.context_embedder is None and context is not None:
            raise ValueError("context= is for cross-attention blocks; set model.attention=cross")
        if keep is None:
            h = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (N, T, D), T = (H/p)(W/p)
        else:  # masked training: x is a strip of the kept patches, only their tokens are processed
            h = self.x_embedder(x) + self.pos_embed[0, keep].to(x.dtype)  # (N, K, D)
        c = self.condition(t, y, x.shape[0], h.dtype)  # (N, D)
        if self.context_embedder is None:
            for block in self.blocks:
                h = block(h, c)  # (N, T, D)
        else:
            ctx = self.context_embedder(y, x.shape[0], context).to(h.dtype)  # (N, L, D_ctx)
            for block in self.blocks:
                h = block(h, ctx, c)  # (N, T, D)
        h = self.final_layer(h, c)  # (N, T, p*p*C_out)
        return self.unpatchify(h) if keep is None else self.unpatchify_strip(h)
