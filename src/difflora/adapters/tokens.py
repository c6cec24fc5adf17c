"""New class tokens on a frozen cross-attention base: a trainable token table in place of the base's.

Adapting a class-conditional cross-attention base (``model.attention: cross``) to a dataset with
other classes (Fashion-MNIST -> MNIST digits in the design-space study of 004, "A Closer Look at
Parameter-Efficient Tuning in Diffusion Models", arXiv 2303.18181) needs a context for each new
class. The base's class tokens mean the old classes, so :class:`NewClassTokens` wraps the base's
context embedder (``base_layer``, frozen with the rest of the base) and gives class c the context

    tokens(c) = origin(c) + new_tokens[c]         [L x D], c = 0 .. num_classes - 1

with ``new_tokens`` [num_classes x L D] trainable and zero-initialised, and ``origin`` read from the
base at every forward: its null context (``init="unconditional"``: at step 0 every class is the base's
unconditional model, exactly), the mean of its class tokens (``init="mean"``), or the base's own
token of class c (``init="base"``: new class c starts as old class c, so the classes are told apart
from step 0 and training only has to say what each one means now). The first two start every class
at one point, and the table must then be separated by the denoising loss alone, whose gradient
carries the class only weakly (at 200 steps of batch 32 the rows of the design-space study moved at
random); ``base`` plays the part of 004's frozen text encoder, whose prompts are distinct contexts
before any tuning. Storing the offset
rather than the table keeps the start exact whatever order the base weights are loaded in; it is
the same parameterisation up to a constant, so training follows the same gradients. Rows with
y = -1 keep the base's null context (classifier-free guidance is unchanged), and a caller's context
passes through as before.

The wrapper holds the base embedder as ``base_layer``, so base checkpoints map into it by the
usual rule (``context_embedder.base_layer.embedding.weight`` <- ``context_embedder.embedding.weight``),
and ``new_tokens`` is an adapter parameter (trainable when the base is frozen, stored in checkpoints).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NEW_TOKEN_INITS", "NewClassTokens", "add_new_class_tokens"]

NEW_TOKEN_INITS = ("unconditional", "mean", "base")


class NewClassTokens(nn.Module):
    """A trainable class-token table over a context embedder (``num_classes``, ``tokens``, ``dim``,
    ``embedding`` [num_classes + 1 x L D] whose last row is the null context, ``null(n)``)."""

    def __init__(self, base_layer: nn.Module, init: str = "unconditional") -> None:
        super().__init__()
        if init not in NEW_TOKEN_INITS:
            raise ValueError(f"new class tokens: init must be one of {', '.join(NEW_TOKEN_INITS)}, got {init!r}")
        if base_layer.num_classes < 1:
            raise ValueError("new class tokens need a class-conditional base (model.num_classes >= 1)")
        self.base_layer, self.init = base_layer, init
        self.num_classes, self.tokens, self.dim = base_layer.num_classes, base_layer.tokens, base_layer.dim
        weight = base_layer.embedding.weight
        self.new_tokens = nn.Parameter(torch.zeros(self.num_classes, self.tokens * self.dim, dtype=weight.dtype))

    def origin(self) -> torch.Tensor:
        """The base contexts new tokens start from, [num_classes x L D] (or [L D], the same for every
        class): its null row, the mean of its class rows, or its class rows themselves."""
        table = self.base_layer.embedding.weight
        if self.init == "unconditional":
            return table[self.num_classes]
        classes = table[: self.num_classes]
        return classes.mean(0) if self.init == "mean" else classes

    def null(self, n: int) -> torch.Tensor:
        """The base's null context for n samples, [N x L x D]."""
        return self.base_layer.null(n)

    def forward(self, y: torch.Tensor | None, n: int, context: torch.Tensor | None = None) -> torch.Tensor:
        """The context [N x L x D]: new tokens for y >= 0, the base's null context for y = -1 or y None;
        a caller's ``context`` goes to the base embedder unchanged (see ``ContextEmbedder.forward``)."""
        if context is not None or y is None:
            return self.base_layer(y, n, context)
        y = y.to(self.new_tokens.device)
        if bool((y >= self.num_classes).any()):
            raise ValueError(f"class labels must be < {self.num_classes} (the new token table's rows), got {y.max()}")
        rows = (self.origin() + self.new_tokens).index_select(0, y.clamp(min=0))  # (N, L D)
        null = self.base_layer.embedding.weight[self.num_classes].expand_as(rows)
        return torch.where((y < 0)[:, None], null, rows).view(n, self.tokens, self.dim)

    def extra_repr(self) -> str:
        return f"classes={self.num_classes}, tokens={self.tokens}, dim={self.dim}, init={self.init}"


def add_new_class_tokens(net: nn.Module, init: str = "unconditional") -> NewClassTokens:
    """Replace ``net.context_embedder`` by :class:`NewClassTokens` around it; returns the wrapper."""
    embedder = getattr(net, "context_embedder", None)
    if embedder is None:
        raise ValueError("new class tokens need a cross-attention backbone: set model.attention=cross")
    if isinstance(embedder, NewClassTokens):
        raise ValueError("this backbone already has new class tokens")
    wrapper = NewClassTokens(embedder, init).to(embedder.embedding.weight.device)
    net.context_embedder = wrapper
    return wrapper
