"""Build the network a config describes and wrap it as the model callable the diffusion code uses.

``build_model(cfg)`` returns a :class:`DiffusionModel`: ``model(x, t, y=None, **conditions)``. The
wrapper is where per-sample conditions (t, y, task, ...) are handed to adapters for the duration
of one forward, so that backbones keep their plain ``net(x, t, y)`` signature.

Timesteps. The diffusion hands the model IDDPM's timesteps: original-process timesteps, times
1000/T when ``diffusion.rescale_timesteps``. Adapters read condition ``t`` as the **original-process
integer timestep 0..T-1** (see ``difflora.adapters.weightings`` for the convention against 000's
1..T), so the wrapper multiplies by ``timestep_scale`` (T/1000 or 1) and rounds. The backbone
still receives the diffusion's t unchanged (its time embedding, if any, was built for that range).
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

__all__ = ["NET_INPUTS", "DiffusionModel", "build_diffusion", "build_model"]

# What the model callable passes to the backbone rather than to adapters: a cross-attention
# context, the kept tokens of masked DiT training, a spatial condition image. Everything else it
# receives is an adapter condition.
NET_INPUTS = ("context", "keep", "spatial")


class DiffusionModel(nn.Module):
    """The model callable: ``forward(x [N x C x H x W], t [N], y [N] | None, **conditions) -> [N x C_out x H x W]``.

    Args:
        net: the backbone, called ``net(x, t, y)``.
        timestep_scale: original-process timestep = model-facing ``t * timestep_scale``
            (``T / 1000`` when the diffusion rescales timesteps, else 1).
    """

    def __init__(self, net: nn.Module, timestep_scale: float = 1.0):
        super().__init__()
        self.net = net
        self.timestep_scale = float(timestep_scale)
        # Conditions whose adapters are merged whenever a batch shares their value (see merged()).
        self._merge_shared: tuple[str, ...] = ()
        self.adapter_report: InjectionReport | None = None

    def adapters_disabled(self, *names: str) -> contextlib.AbstractContextManager[None]:
        """``with model.adapters_disabled():`` the base model (peft's ``disable_adapter``); names: only those."""
        return adapters_disabled(*names)

    def adapter_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Model-facing timesteps [N] -> original-process integer timesteps [N] (int64), condition ``t``."""
        if not t.is_floating_point() and self.timestep_scale == 1.0:
            return t.long()
        # Rounding undoes the float error of t * 1000 / T (the original timesteps are integers).
        return (t.float() * self.timestep_scale).round().long()

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **values: torch.Tensor
    ) -> torch.Tensor:
        """Run ``net(x, t, y)`` with the adapter conditions set: ``t`` (original units), ``y`` and ``values``.

        ``values`` (e.g. ``task=[N]``, ``guidance=[N]``) are seen by adapters only, not by the backbone,
        except the backbone inputs (:data:`NET_INPUTS`): ``context`` [N x L x D], which goes to a
        cross-attention backbone (``model.attention: cross``), ``keep`` [N x K], the kept tokens of masked
        DiT training (``train.mask_ratio``), and ``spatial`` [N x C_s x H x W], the condition image of
        spatial tasks (``data.spatial``).
        """
        # None backbone inputs are left out (a plain net takes none).
        net_inputs = {k: v for k in NET_INPUTS if (v := values.pop(k, None)) is not None}
        values.update(t=self.adapter_timesteps(t), y=y)
        if self._merge_shared:
            merge_shared(self.net, **{k: values[k] for k in self._merge_shared if k in values})
        with conditions(**values):
            return self.net(x, t, y, **net_inputs)

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


def build_model(cfg: Config) -> DiffusionModel:
    """The network of ``cfg.model`` wrapped as a :class:`DiffusionModel` (weights freshly initialised).

    The one expansion step (:func:`difflora.model.expand.expand_model`) adds what the config asks
    for: the adapter entries (``cfg.model.adapters``, empty targets: the backbone's attention
    projections; then the entries the papers' expansions derive), frozen non-adapter parameters
    when ``cfg.train.train_base`` is false, and the papers' other parts. The injection report is
    kept as ``model.adapter_report`` (None when no adapter is injected).
    """
    net, report = expand_model(cfg)
    scale = cfg.diffusion.steps / 1000.0 if cfg.diffusion.rescale_timesteps else 1.0
    model = DiffusionModel(net, timestep_scale=scale)
    model.adapter_report = report
    return model


def build_diffusion(cfg: Config, respacing: str | int | None = None):
    """The Gaussian diffusion of ``cfg.diffusion``; ``respacing`` (e.g. 50 or "ddim50") for sampling."""
    return create_diffusion(cfg.diffusion, learn_sigma=cfg.model.learn_sigma, respacing=respacing)
