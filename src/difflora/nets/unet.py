"""The IDDPM U-Net (Nichol & Dhariwal 2021), layer for layer as openai/improved-diffusion's ``UNetModel``.

Module paths and parameter shapes are those of improved-diffusion's ``unet.py`` (``time_embed.0``,
``input_blocks.1.0.in_layers.2``, ``input_blocks.4.1.qkv``, ``middle_block.1.proj_out``,
``out.2``, ...), so its state dicts map one to one and adapters can target the attention layers by
name: every ``AttentionBlock`` has ``qkv`` (1x1 Conv1d, C -> 3C) and ``proj_out`` (1x1 Conv1d,
C -> C), the "dense weights in attention blocks" of TimeLoRA (paper 000).

Differences from improved-diffusion, all optional or outside the layers themselves:

* ``time_embed: false`` drops the ``time_embed`` MLP and every ResBlock's ``emb_layers`` (TimeLoRA's
  base, 000 section 5.1). If a class embedding remains, the class embedding alone is the vector fed
  to the ResBlocks (their ``emb_layers`` stay); with neither, ResBlocks take no embedding at all.
* Class conditioning has one embedding row per class and **no null row**: ``y == -1`` (or
  ``y=None``) adds no class embedding to that sample. improved-diffusion hardcodes 1000 classes and
  has no null label.
* ``attention_resolutions`` are side lengths in pixels (improved-diffusion's training script turns
  them into downsampling rates ``image_size // res``; here the current feature-map side is compared
  directly, which is the same for powers of two and also right for 28 px: 28, 14, 7). With the
  default ``[16, 8]``, an 8 px net has attention at 8 px, a 16 px net at 16 and 8, a 28 px net none
  (set e.g. ``[14, 7]``).
* Image sizes need not be powers of two, but must be divisible by ``2 ** (len(channel_mult) - 1)``
  so that every downsampling halves exactly and the skip connections line up (28 with
  ``(1, 2, 2)`` -> 28, 14, 7). Other sizes are refused with a message; nothing is padded.
* GroupNorm uses 32 groups, or ``gcd(32, C)`` for channel counts that are not multiples of 32.
* Attention is computed by ``layers.dot_product_attention`` (``scaled_dot_product_attention``, or
  on a CPU in bf16 the product written out, whichever is faster there); the head layout of the qkv
  channels is improved-diffusion's (per head: q, k, v of C/heads channels each), so weights are
  interchangeable.
* No fp16 conversion or gradient checkpointing flags (``difflora.adapters.checkpoint`` wraps any
  block, adapters and conditions included).
* ``attention: cross`` (not improved-diffusion) puts LDM's spatial transformers
  (``nets/transformer.py``) where the attention blocks were: the class label then reaches the net
  through the cross-attention's context (``context_embedder``), not ``label_emb``, and
  ``net(x, t, y, context=...)`` takes a caller's context [N x L x D].
* Spatial conditioning (``model.spatial_channels`` > 0, ``docs/spatial-tasks.md``): ``net(x, t, y,
  spatial=c)`` adds ``spatial_in(c)``, a zero-initialised 3x3 conv of the condition image, to the
  first conv's output. A conv is linear in its input channels, so this is the first conv with the
  condition concatenated to x as extra input channels whose weights start at zero, kept as its own
  module so the base's weights and state-dict keys stay as they are (002's package holds the
  ControlNet-style alternative, ``model.spatial_input: controlnet``, registered in
  ``difflora.nets.SPATIAL_INPUTS``).
* Named taps for position adapters (004): every ``ResBlock`` and ``AttentionBlock`` has
  parameter-free ``nn.Identity`` points ``tap_in`` (the block's input) and ``tap_out`` (its output,
  after the residual sum), listed in ``TAPS``. They add no parameters and change no parameter name.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from difflora.config.schema import ModelConfig
from difflora.nets.layers import (
    BaseExtension,
    dot_product_attention,
    group_norm,
    masked_label_embedding,
    timestep_embedding,
    zero_module,
)
from difflora.nets.transformer import ContextEmbedder, SpatialTransformer

__all__ = ["AttentionBlock", "Downsample", "ResBlock", "UNetModel", "Upsample", "default_channel_mult"]

# improved-diffusion's script_util choices (32, 64, 256), guided-diffusion's for 128, and ours for
# the small images of this project: 8 px (sklearn digits) stops at 4x4, 16 px goes 16-8-4, 28 px
# (Fashion-MNIST) goes 28-14-7 (7 is odd, so it cannot be halved again).
_DEFAULT_CHANNEL_MULT: dict[int, tuple[int, ...]] = {
    8: (1, 2),
    16: (1, 2, 2),
    28: (1, 2, 2),
    32: (1, 2, 2, 2),
    64: (1, 2, 3, 4),
    128: (1, 1, 2, 3, 4),
    256: (1, 1, 2, 2, 4, 4),
}


def default_channel_mult(image_size: int) -> tuple[int, ...]:
    """Channel multipliers per resolution level for a square image of side ``image_size``."""
    if image_size not in _DEFAULT_CHANNEL_MULT:
        known = ", ".join(str(s) for s in _DEFAULT_CHANNEL_MULT)
        raise ValueError(
            f"model.unet.channel_mult: no default for image_size={image_size} (defaults exist for {known}); set it"
        )
    return _DEFAULT_CHANNEL_MULT[image_size]


class ResBlock(nn.Module):
    """Residual block, optionally changing the channel count and conditioned on an embedding.

    ``in_layers`` = GroupNorm, SiLU, 3x3 conv; ``emb_layers`` = SiLU, Linear (absent when
    ``emb_channels`` is None); ``out_layers`` = GroupNorm, SiLU, Dropout, zero-initialised 3x3 conv.
    With ``use_scale_shift_norm`` the embedding gives (scale, shift) applied after the second
    GroupNorm: ``norm(h) * (1 + scale) + shift``; otherwise it is added before it.
    Taps (position adapters): ``in`` [N x C x H x W], ``out`` [N x C_out x H x W].
    """

    TAPS = ("in", "out")
    tap_layout = "channels_first"
    tap_kernel = 3  # position adapters here are 3x3 convolutions by default, as 004's ResBlock adapters

    def __init__(
        self,
        channels: int,
        emb_channels: int | None,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            group_norm(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        if emb_channels is not None:
            width = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
            self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, width))
        else:
            self.emb_layers = None
        self.out_layers = nn.Sequential(
            group_norm(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        # 1x1 conv on the skip path only when the channel count changes (improved-diffusion's use_conv=False).
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)
        self.tap_in, self.tap_out = nn.Identity(), nn.Identity()
        self.tap_channels = {"in": channels, "out": self.out_channels}

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        """:param x: [N x C x H x W]. :param emb: [N x emb_channels] or None. :return: [N x C_out x H x W]."""
        x = self.tap_in(x)
        h = self.in_layers(x)
        if self.emb_layers is None:
            h = self.out_layers(h)
        else:
            emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
            if self.use_scale_shift_norm:
                scale, shift = emb_out.chunk(2, dim=1)
                h = self.out_layers[0](h) * (1 + scale) + shift
                h = self.out_layers[1:](h)
            else:
                h = self.out_layers(h + emb_out)
        return self.tap_out(self.skip_connection(x) + h)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, residual, with ``qkv`` and ``proj_out`` as 1x1 Conv1d.

    The 3C channels of ``qkv`` are laid out head by head, each head holding its q, k and v
    (C / num_heads channels each), as improved-diffusion's reshape to [N*heads x 3C/heads x T] implies.
    Taps (position adapters): ``in`` and ``out`` (after the residual sum), both [N x C x H x W].
    """

    TAPS = ("in", "out")
    tap_layout = "channels_first"

    def __init__(self, channels: int, num_heads: int = 1) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention: {channels} channels are not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))
        self.tap_in, self.tap_out = nn.Identity(), nn.Identity()
        self.tap_channels = {"in": channels, "out": channels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: [N x C x H x W]. :return: [N x C x H x W]."""
        x = self.tap_in(x)
        n, c, *spatial = x.shape
        x = x.reshape(n, c, -1)  # (N, C, T)
        qkv = self.qkv(self.norm(x)).reshape(n, self.num_heads, 3 * c // self.num_heads, -1)
        q, k, v = qkv.transpose(-1, -2).chunk(3, dim=-1)  # each (N, heads, T, C/heads)
        # Softmax(q k^T / sqrt(d)) v: the scale is improved-diffusion's 1/sqrt(sqrt(d))^2.
        h = dot_product_attention(q, k, v)  # (N, heads, T, C/heads)
        h = h.transpose(-1, -2).reshape(n, c, -1)  # (N, C, T), head-major channels as the input
        return self.tap_out((x + self.proj_out(h)).reshape(n, c, *spatial))


class Downsample(nn.Module):
    """Halve H and W: 3x3 conv with stride 2 (``conv_resample``) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour interpolation, then a 3x3 conv if ``conv_resample``."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class SpatialInput(BaseExtension):
    """The condition image's extra input channels of the first conv: a 3x3 conv, zero-initialised
    (so at step 0 the net is exactly the base). [N x C_s x H x W] -> [N x model_channels x H x W]."""

    def __init__(self, channels: int, model_channels: int) -> None:
        super().__init__()
        self.conv = zero_module(nn.Conv2d(channels, model_channels, 3, padding=1))

    def forward(self, spatial: torch.Tensor) -> torch.Tensor:
        return self.conv(spatial)


class EmbedSequential(nn.Sequential):
    """A Sequential that hands the embedding to its ResBlocks (improved-diffusion's TimestepEmbedSequential)
    and the context to its spatial transformers."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, emb: torch.Tensor | None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """The IDDPM U-Net built from a :class:`difflora.config.schema.ModelConfig` (``arch: unet``).

    ``net(x, t, y=None)``: x [N x C x H x W], t [N] (timesteps, possibly fractional, or a scalar
    shared by the batch), y [N] int64 with -1 for the null label (or None: all null; ignored when
    the net has no class embedding) -> [N x C_out x H x W], C_out = 2C with ``learn_sigma``.

    The embedding vector fed to the ResBlocks (width 4 * model_channels) is
    ``time_embed(sinusoid(t)) + label_emb(y)`` with the class term zero where ``y == -1``;
    either term is absent when its embedding is switched off (see the module docstring).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.image_size is None or cfg.in_channels is None:
            raise ValueError(
                "model.image_size and model.in_channels must be set (they are filled from data in a Config)"
            )
        u, mc = cfg.unet, cfg.unet.model_channels
        channel_mult = tuple(u.channel_mult) if u.channel_mult else default_channel_mult(cfg.image_size)
        factor = 2 ** (len(channel_mult) - 1)
        if cfg.image_size % factor:
            raise ValueError(
                f"model.image_size={cfg.image_size} is not divisible by 2**(len(channel_mult)-1)={factor} "
                f"(channel_mult={list(channel_mult)}); use fewer levels or resize the data (data.image_size)"
            )
        num_heads_up = u.num_heads if u.num_heads_upsample == -1 else u.num_heads_upsample
        self.image_size = cfg.image_size
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.model_channels = mc
        self.channel_mult = channel_mult
        self.num_classes = cfg.num_classes if cfg.class_embed else 0
        cross = cfg.attention == "cross"

        emb_dim = 4 * mc
        if cfg.time_embed:
            self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        else:
            self.time_embed = None
        # Cross-attention: the label enters through the context; the null label gets a learned null context.
        self.context_embedder = (
            ContextEmbedder(self.num_classes, cfg.context.tokens, cfg.context.dim) if cross else None
        )
        if self.num_classes > 0 and not cross:
            # One row per class, no null row: the unconditional branch adds no class embedding.
            self.label_emb = nn.Embedding(self.num_classes, emb_dim)
        else:
            self.label_emb = None
        self.emb_channels = res_emb = emb_dim if (self.time_embed is not None or self.label_emb is not None) else None

        def res_block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, res_emb, u.dropout, cout, u.use_scale_shift_norm)

        def attention(c: int, heads: int) -> nn.Module:
            if cross:
                return SpatialTransformer(c, heads, cfg.context.dim, cfg.context.ff_mult, cfg.context.depth)
            return AttentionBlock(c, heads)

        attn_res = set(u.attention_resolutions)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chans = [mc]
        ch, res = mc, cfg.image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(u.num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * mc)]
                ch = mult * mc
                if res in attn_res:
                    layers.append(attention(ch, u.num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch, u.conv_resample)))
                skip_chans.append(ch)
                res //= 2

        self.middle_block = EmbedSequential(res_block(ch, ch), attention(ch, u.num_heads), res_block(ch, ch))
        self._init_spatial(cfg, skip_chans)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(u.num_res_blocks + 1):
                layers = [res_block(ch + skip_chans.pop(), mc * mult)]
                ch = mc * mult
                if res in attn_res:
                    layers.append(attention(ch, num_heads_up))
                if level and i == u.num_res_blocks:
                    layers.append(Upsample(ch, u.conv_resample))
                    res *= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_module(nn.Conv2d(mc, self.out_channels, 3, padding=1)))

    def _init_spatial(self, cfg: ModelConfig, skip_chans: list[int]) -> None:
        self.skip_channels = tuple(skip_chans)  # output channels of each input block (a ControlNet branch)
        self.spatial_channels = cfg.spatial_channels or 0
        concat = bool(self.spatial_channels) and cfg.spatial_input == "concat"
        self.spatial_in = SpatialInput(self.spatial_channels, self.model_channels) if concat else None

    def embedding(self, t: torch.Tensor, y: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The [N x 4*model_channels] vector fed to the ResBlocks, or None when they take none."""
        if self.emb_channels is None:
            return None
        device = self.input_blocks[0][0].weight.device
        if self.time_embed is not None:
            t = torch.as_tensor(t, device=device)
            if t.ndim == 0:
                t = t.expand(n)
            emb = self.time_embed(timestep_embedding(t, self.model_channels).to(dtype))
        else:
            emb = torch.zeros(n, self.emb_channels, device=device, dtype=dtype)
        if self.label_emb is not None and y is not None:
            emb = emb + masked_label_embedding(self.label_emb, y)
        return emb

    def encode(
        self, x: torch.Tensor, emb: torch.Tensor | None, ctx: torch.Tensor | None, spatial: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Input blocks and middle block: (skip features, one per input block, and the middle's output)."""
        hs = []
        h = x
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, ctx)
            if i == 0 and spatial is not None:
                h = h + self.spatial_in(spatial.to(h.dtype))
            hs.append(h)
        return hs, self.middle_block(h, emb, ctx)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        spatial: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:param x: [N x C x H x W]. :param t: [N] timesteps. :param y: [N] labels (-1 = null) or None.
        :param context: ``attention: cross`` only: a caller's context [N x L x D] (see
        :class:`~difflora.nets.transformer.ContextEmbedder`). :param spatial: the condition image
        [N x C_s x H x W] (``model.spatial_channels``) or None. :return: [N x C_out x H x W]."""
        if self.context_embedder is None and context is not None:
            raise ValueError("context= is for cross-attention blocks; set model.attention=cross")
        if spatial is not None and (self.spatial_channels == 0 or spatial.shape[1] != self.spatial_channels):
            raise ValueError(
                f"spatial= has {spatial.shape[1]} channels but the net takes {self.spatial_channels} "
                "(model.spatial_channels, set by data.spatial)"
            )
        ctx = None if self.context_embedder is None else self.context_embedder(y, x.shape[0], context).to(x.dtype)
        emb = self.embedding(t, y, x.shape[0], x.dtype)
        hs, h = self.encode(x, emb, ctx, spatial)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, ctx)
        return self.out(h)
