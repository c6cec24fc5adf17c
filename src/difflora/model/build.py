"""Build the network a config describes and wrap it as the model callable the diffusion code uses.

``build_model(cfg)`` returns a :class:`DiffusionModel`: ``model(x, t, y=None, **conditions)``. The
wrapper is where per-sample conditions (t, y, task, ...) are handed to adapters for the duration
of one forward, so that backbones keep their plain ``net(x, t, y)`` signature.

Timesteps. The diffusion hands the model the **original-process integer timestep** t (int64, 0..T-1,
also under respacing). Adapters read it as condition ``t`` unchanged (see
``difflora.adapters.weightings`` for the convention against 000's 1..T). The backbone gets IDDPM's
rescaled float ``t * 1000 / T`` when ``diffusion.rescale_timesteps`` (its time embedding was built
for the range of a T = 1000 process), else t itself: the wrapper computes it
(:meth:`DiffusionModel.backbone_timesteps`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from difflora.adapters import (
    InjectionReport,
    adapters_disabled,
    conditions,
    merge_shared,
    unmerge_adapters,
)
from difflora.config.schema import Config
from difflora.diffusion import create_diffusion
from difflora.model.expand import expand_model

__all__ = ["NET_INPUTS", "DiffusionModel", "backbone_steps", "build_diffusion", "build_model"]

# What the model callable passes to the backbone rather than to adapters: a cross-attention
# context, the kept tokens of masked DiT training, a spatial condition image. Everything else it
# receives is an adapter condition.
NET_INPUTS = ("context", "keep", "spatial")


class DiffusionModel(nn.Module):
    """The model callable: ``forward(x [N x C x H x W], t [N], y [N] | None, **conditions) -> [N x C_out x H x W]``.

    Args:
        net: the backbone, called ``net(x, backbone_timesteps(t), y)``.
        rescale_steps: T of the diffusion when the backbone takes IDDPM's rescaled timesteps
            (``diffusion.rescale_timesteps``): it then gets float ``t * 1000 / T``; None: the
            integer t.
    """

    def __init__(self, net: nn.Module, rescale_steps: int | None = None):
        super().__init__()
        # A float here is the old timestep_scale (T / 1000) passed by position: refuse it.
        if rescale_steps is not None and (type(rescale_steps) is not int or rescale_steps < 1):
            raise ValueError(f"rescale_steps must be a positive int T (or None), got {rescale_steps!r}")
        self.net = net
        self.rescale_steps = rescale_steps
        # Conditions whose adapters are merged whenever a batch shares their value (see merged()).
        self._merge_shared: tuple[str, ...] = ()
        self.adapter_report: InjectionReport | None = None

    def adapters_disabled(self, *names: str) -> contextlib.AbstractContextManager[None]:
        """``with model.adapters_disabled():`` the base model (peft's ``disable_adapter``); names: only those."""
        return adapters_disabled(*names)

    def backbone_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The backbone's time input for original-process integer timesteps ``t`` [N]: float
        ``t * 1000 / T`` with ``rescale_steps``, else ``t``."""
        if self.rescale_steps is None:
            return t
        return t.float() * (1000.0 / self.rescale_steps)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **values: torch.Tensor
    ) -> torch.Tensor:
        """Run ``net(x, backbone_timesteps(t), y)`` with the adapter conditions set: ``t`` (the
        original-process integer timesteps, int64 [N]), ``y`` and ``values``.

        ``values`` (e.g. ``task=[N]``, ``guidance=[N]``) are seen by adapters only, not by the backbone,
        except the backbone inputs (:data:`NET_INPUTS`): ``context`` [N x L x D], which goes to a
        cross-attention backbone (``model.attention: cross``), ``keep`` [N x K], the kept tokens of masked
        DiT training (``train.mask_ratio``), and ``spatial`` [N x C_s x H x W], the condition image of
        spatial tasks (``data.spatial``).
        """
        # None backbone inputs are left out (a plain net takes none). Two steps: torch.compile cannot
        # trace an assignment expression inside a comprehension.
        popped = {k: values.pop(k, None) for k in NET_INPUTS}
        net_inputs = {k: v for k, v in popped.items() if v is not None}
        if t.is_floating_point():
            raise TypeError(
                f"model(x, t): t must be the original-process integer timestep (int64), got {t.dtype}; "
                f"the backbone's rescaled input is computed here"
            )
        values.update(t=t, y=y)
        if self._merge_shared:
            merge_shared(self.net, **{k: values[k] for k in self._merge_shared if k in values})
        with conditions(**values):
            return self.net(x, self.backbone_timesteps(t), y, **net_inputs)

    @contextlib.contextmanager
    def merged(self, *names: str) -> Iterator[DiffusionModel]:
        """Fast sampling path: inside the block, adapters reading ``names`` (default ``"t"``) are
        merged into the weights whenever every sample of a forward shares the value.

        In a sampler step all samples share t, so the TimeLoRA update is merged once per step
        (the class part stays per sample under classifier-free guidance); a batch with different
        t falls back to the per-sample path. The decision is taken at each forward from the t the
        model actually receives, so no sampler hook is needed and a stale merge cannot be used.
        On exit every merge is undone (exactly: the original weights are restored). Inference
        only: merged adapters get no gradient.

            with model.merged():
                x = sample(diffusion, model, shape, generator=g)
        """
        names = names or ("t",)
        previous = self._merge_shared
        self._merge_shared = tuple(dict.fromkeys(previous + names))
        try:
            yield self
        finally:
            self._merge_shared = previous
            unmerge_adapters(self.net, *names)


def build_model(cfg: Config, net: nn.Module | None = None) -> DiffusionModel:
    """The network of ``cfg.model`` wrapped as a :class:`DiffusionModel` (weights freshly initialised).

    ``net``: a backbone the caller built for ``cfg.model`` instead (a diffusers model loaded with
    ``from_pretrained``, a :class:`~difflora.nets.diffusers_wrap.DiffusersNet`, or a
    :class:`DiffusionModel` whose backbone is taken), checked against the config
    (:func:`difflora.nets.adopt_net`). Either way the wrapper's timestep convention is the one of
    ``cfg.diffusion`` (:func:`backbone_steps`): nobody passes it by hand.

    The one expansion step (:func:`difflora.model.expand.expand_model`) adds what the config asks
    for: the adapter entries (``cfg.model.adapters``, empty targets: the backbone's attention
    projections; then the entries the papers' expansions derive), frozen non-adapter parameters
    when ``cfg.train.train_base`` is false, and the papers' other parts. The injection report is
    kept as ``model.adapter_report`` (None when no adapter is injected).
    """
    if isinstance(net, DiffusionModel):
        net = net.net
    net, report = expand_model(cfg, net)
    model = DiffusionModel(net, rescale_steps=backbone_steps(cfg))
    model.adapter_report = report
    return model


def backbone_steps(cfg: Config) -> int | None:
    """The ``rescale_steps`` of the model of ``cfg``: T when the backbone takes IDDPM's float
    ``t * 1000 / T`` (``diffusion.rescale_timesteps``), None for the integer t (diffusers' models)."""
    return cfg.diffusion.steps if cfg.diffusion.rescale_timesteps else None


def build_diffusion(cfg: Config, respacing: str | int | None = None):
    """The Gaussian diffusion of ``cfg.diffusion``; ``respacing`` (e.g. 50 or "ddim50") for sampling."""
    return create_diffusion(cfg.diffusion, learn_sigma=cfg.model.learn_sigma, respacing=respacing)
