"""Live difflora adapters inside a diffusers pipeline: ``pipe(...)`` samples a run's model.

:func:`attach` puts the model of a run with a diffusers backbone (``model.arch: diffusers``, built
from a config or from ``model.pretrained``; both go through
:class:`~difflora.nets.diffusers_wrap.DiffusersNet`) into a pipeline's ``unet`` or
``transformer`` and routes the pipeline's calls through difflora's model callable, so every
adapter keeps its per-sample conditions::

    cfg, model, _ = difflora.open_run("runs/time")
    with difflora.attach(pipe, cfg, model, y=[3, 7]) as live:   # y: one label per sample, or one for all
        images = pipe(batch_size=2, generator=g).images
        with live.conditions(y=[1, 2]):                       # per call
            more = pipe(batch_size=2, generator=g).images

At every call of the denoiser:

- ``t``: the pipeline's ``timestep`` (a number, a 0-d tensor or one per sample; diffusers'
  0..num_train_timesteps-1) is difflora's original-process integer t, since the scheduler's
  ``num_train_timesteps`` must be the run's T (and its betas the run's): :func:`attach` refuses
  another scheduler, :func:`matching_scheduler` builds the right one. The backbone gets what
  ``difflora sample`` gives it (IDDPM's rescaled ``t * 1000 / T``), the adapters the integer t.
- ``y`` and the other conditions (``task``, a one-pass student's ``guidance``) come from
  :func:`attach` and :meth:`LiveAdapters.conditions`: one value for the whole batch or one per
  sample. When the pipeline doubles its batch for classifier-free guidance (2N rows, the
  conditional half first), per-sample values of N fill both halves as difflora's own guidance does:
  the unconditional half gets the null class (-1) and the same other conditions. Without ``y`` the
  pipeline's ``class_labels`` are used (a label outside 0..num_classes-1, such as ``DiTPipeline``'s
  null label 1000, is the null class).

The denoiser keeps its class and identity (``pipe.to``, ``pipe.unet.dtype``, offloading hooks keep
working): its submodules are, while attached, the run's diffusers model's submodules (shared with
``model``, not copied) and its ``forward`` is difflora's. :meth:`LiveAdapters.detach` puts its own
modules back, the very objects, so its module tree and parameters are bit for bit as before.
Attaching is all-or-nothing: every check runs before the first change. Save the pipeline after
detaching: while attached its state holds difflora's wrapped layers.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from difflora.adapters.lora_export import conditions_read
from difflora.config.schema import Config
from difflora.diffusion.guidance import NULL_LABEL
from difflora.errors import DiffloraError
from difflora.model.build import DiffusionModel, build_diffusion
from difflora.nets.diffusers_wrap import DiffusersNet
from difflora.optional import require
from difflora.sampling.student import student_of

__all__ = ["LiveAdapters", "PipelineAttachError", "attach", "detach", "matching_scheduler"]

# Where the handle of an attached run lives on the denoiser (an instance attribute).
_HANDLE = "_difflora_live"
# The arguments of a diffusers denoiser's forward that the attached model reads; any other one
# given a value is refused (the run's model would ignore it).
_READ = ("sample", "hidden_states", "timestep", "class_labels", "encoder_hidden_states", "return_dict")
# kind -> (module, class) of the output the diffusers model returns with return_dict.
_OUTPUTS = {
    "UNet2DModel": ("diffusers.models.unets.unet_2d", "UNet2DOutput"),
    "UNet2DConditionModel": ("diffusers.models.unets.unet_2d_condition", "UNet2DConditionOutput"),
    "DiTTransformer2DModel": ("diffusers.models.modeling_outputs", "Transformer2DModelOutput"),
}


class PipelineAttachError(ValueError, DiffloraError):
    """A run that cannot be attached to this pipeline, or a call the attached model cannot serve."""


def matching_scheduler(cfg: Config, scheduler_cls: type, **overrides: Any) -> Any:
    """A diffusers scheduler of class ``scheduler_cls`` with the run's process: its T and betas,
    epsilon prediction, and (for classes that have one) the run's variance (``learned_range`` with a
    learned sigma, else ``fixed_small`` / ``fixed_large`` as ``diffusion.sigma_small``); ``overrides``
    win (e.g. ``timestep_spacing="linspace"``)."""
    settings = {
        "num_train_timesteps": cfg.diffusion.steps,
        "trained_betas": build_diffusion(cfg).betas.tolist(),
        "prediction_type": "epsilon",
        "variance_type": _variance(cfg),
    }
    accepted = inspect.signature(scheduler_cls.__init__).parameters
    return scheduler_cls(**{k: v for k, v in settings.items() if k in accepted} | overrides)


def _variance(cfg: Config) -> str:
    """The run's reverse-process variance in diffusers' words."""
    if cfg.model.learn_sigma:
        return "learned_range"
    return "fixed_small" if cfg.diffusion.sigma_small else "fixed_large"


def _scheduler_problem(scheduler: Any, cfg: Config) -> str | None:
    """Why ``scheduler`` does not run the run's process (None if it does)."""
    if scheduler is None or not hasattr(scheduler, "config"):
        return "the pipeline has no diffusers scheduler: difflora.attach needs one to check the timesteps"
    conf, steps, name = dict(scheduler.config), cfg.diffusion.steps, type(scheduler).__name__
    fix = f"build it with difflora.sampling.pipeline.matching_scheduler(cfg, {name})"
    if conf.get("num_train_timesteps") != steps:
        return (
            f"the pipeline's scheduler has num_train_timesteps={conf.get('num_train_timesteps')} but the run's "
            f"diffusion has T={steps} (diffusion.steps): {fix}"
        )
    betas = getattr(scheduler, "betas", None)
    want = build_diffusion(cfg).betas
    if betas is not None and not np.allclose(torch.as_tensor(betas).double().numpy(), want, rtol=1e-5, atol=0):
        return f"the pipeline's scheduler has other betas than the run's {cfg.diffusion.noise_schedule} schedule: {fix}"
    if conf.get("prediction_type", "epsilon") != "epsilon":
        return f"the scheduler expects prediction_type={conf['prediction_type']!r}; difflora predicts epsilon: {fix}"
    variance, expected = conf.get("variance_type"), _variance(cfg)
    if variance is not None and variance != expected:
        return f"the scheduler's variance_type is {variance!r}, the run's variance is {expected!r}: {fix}"
    return None


def _config_problem(denoiser: nn.Module, inner: nn.Module) -> str | None:
    """Why ``denoiser`` is not the run's diffusers model's architecture (None if it is)."""
    if type(denoiser) is not type(inner):
        return f"the pipeline's denoiser is a {type(denoiser).__name__}, the run's a {type(inner).__name__}"

    def public(model: nn.Module) -> dict[str, str]:
        # JSON text: tuples and lists of one config compare equal (a config read from disk has lists).
        return {k: json.dumps(v, sort_keys=True, default=str) for k, v in model.config.items() if not k.startswith("_")}

    ours, theirs = public(denoiser), public(inner)
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if differ:
        k = differ[0]
        return (
            f"the pipeline's {type(denoiser).__name__} differs from the run's in {len(differ)} config key(s), e.g. "
            f"{k}: {ours.get(k, 'unset')} vs the run's {theirs.get(k, 'unset')}"
        )
    return None


def _denoiser(pipe: Any) -> tuple[str, nn.Module]:
    for component in ("unet", "transformer"):
        module = getattr(pipe, component, None)
        if isinstance(module, nn.Module):
            return component, module
    raise PipelineAttachError(f"{type(pipe).__name__} has no unet or transformer to attach a run to")


def _expand(name: str, value: torch.Tensor, m: int, null: int | None) -> torch.Tensor:
    """``value`` (one value, or one per sample) for a denoiser batch of ``m``; a batch doubled for
    guidance gets the null value ``null`` (if any) in its second half, else the same values."""
    if value.ndim == 0:
        return value.expand(m)
    n = value.shape[0]
    if n == m:
        return value
    if 2 * n == m:
        return torch.cat([value, value if null is None else torch.full_like(value, null)])
    raise PipelineAttachError(
        f"condition {name} has {n} values but the pipeline called the denoiser with a batch of {m}: give one "
        f"value, {m}, or {m // 2} when the pipeline doubles its batch for guidance"
    )


class LiveAdapters:
    """A run attached to a pipeline's denoiser (made by :func:`attach`); a context manager that detaches."""

    def __init__(self, pipe: Any, cfg: Config, model: DiffusionModel, values: dict[str, Any]):
        self.pipe, self.cfg, self.model = pipe, cfg, model
        self.component, self.denoiser = _denoiser(pipe)
        self.read = conditions_read(model.net) - {"t", "y"}
        self._values = self._complete(self._checked(values))
        self._signature = inspect.signature(type(self.denoiser).forward)
        module, name = _OUTPUTS[model.net.kind]
        self._output = getattr(require(module, "difflora.attach", extra="interop"), name)
        self._saved: tuple[Any, ...] | None = None

    # --- conditions -----------------------------------------------------------------------------
    def _checked(self, values: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``values`` as tensors, the student's conditions at ``guidance`` added, every name checked."""
        values = {k: v for k, v in values.items() if v is not None}
        student = student_of(self.cfg)
        if student is not None and "guidance" in values:
            scale = values.pop("guidance")
            if not isinstance(scale, int | float):
                raise PipelineAttachError(f"guidance: a one-pass student samples at one scale, got {scale!r}")
            values |= student.conditions(self.cfg, student.check_guidance(self.cfg, float(scale)))
        out = {}
        for name, value in values.items():
            v = torch.as_tensor(value)
            if (
                v.ndim > 1
                or v.dtype == torch.bool
                or not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64))
            ):
                raise PipelineAttachError(f"condition {name}: give a number or one number per sample, got {value!r}")
            out[name] = v.long() if not v.is_floating_point() or bool((v == v.round()).all()) else v.float()
        unknown = sorted(set(out) - self.read - {"y"})
        if unknown:
            raise PipelineAttachError(
                f"no adapter of the run reads condition(s) {', '.join(unknown)}; they read: "
                f"{', '.join(sorted(self.read | {'t'}))} (y: the class)"
            )
        k = self.cfg.model.num_classes
        y = out.get("y")
        if y is not None and (k == 0 or y.is_floating_point() or int(y.min()) < NULL_LABEL or int(y.max()) >= k):
            raise PipelineAttachError(
                f"y must lie in -1..{k - 1} (-1: the null class)" if k else "y was given but the run is unconditional"
            )
        return out

    def _complete(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = sorted(self.read - set(values))
        if missing:
            raise PipelineAttachError(
                f"the run's adapters read condition(s) {', '.join(missing)}: give a value, e.g. "
                f"difflora.attach(pipe, cfg, model, {missing[0]}=VALUE) (-1 or nan: the adapter's no-update value)"
            )
        return values

    def set(self, **values: Any) -> None:
        """Replace the values of the named conditions for every later call (``y``, ``task``, ...)."""
        self._values = self._complete({**self._values, **self._checked(values)})

    @contextlib.contextmanager
    def conditions(self, **values: Any) -> Iterator[LiveAdapters]:
        """Inside the block the named conditions take these values; the previous ones come back on exit."""
        previous = self._values
        self.set(**values)
        try:
            yield self
        finally:
            self._values = previous

    # --- the denoiser's forward -----------------------------------------------------------------
    def _timesteps(self, timestep: Any, m: int, device: torch.device) -> torch.Tensor:
        """The pipeline's timestep as difflora's integer t [m] (the scheduler's T is the run's)."""
        if timestep is None:
            raise PipelineAttachError("the pipeline called the denoiser without a timestep")
        ts = torch.as_tensor(timestep, device=device).reshape(-1)
        ts = ts.expand(m) if ts.numel() == 1 else ts
        steps = self.cfg.diffusion.steps
        if ts.shape != (m,) or (ts.is_floating_point() and not torch.equal(ts, ts.round())):
            raise PipelineAttachError(
                f"the pipeline's timestep {ts.tolist()} is not one integer per sample: difflora's adapters read "
                f"integer timesteps 0..{steps - 1} (use a scheduler with integer timesteps, e.g. DDPM or DDIM)"
            )
        if int(ts.min()) < 0 or int(ts.max()) >= steps:
            raise PipelineAttachError(f"the pipeline's timestep {ts.tolist()} is outside the run's 0..{steps - 1}")
        return ts.long()

    def _labels(self, class_labels: Any, m: int, device: torch.device) -> torch.Tensor | None:
        """y [m] for this call: the set ``y``, else the pipeline's class labels (out of range: null)."""
        if "y" in self._values:
            return _expand("y", self._values["y"], m, NULL_LABEL).to(device)
        k = self.cfg.model.num_classes
        if class_labels is None or k == 0:
            return None
        labels = torch.as_tensor(class_labels, device=device).reshape(-1).long()
        labels = labels.expand(m) if labels.numel() == 1 else labels
        return torch.where((labels >= 0) & (labels < k), labels, torch.full_like(labels, NULL_LABEL))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The denoiser's forward while attached: the run's model at the pipeline's timestep."""
        given = self._signature.bind(self.denoiser, *args, **kwargs).arguments
        ignored = sorted(k for k, v in given.items() if k not in (*_READ, "self") and v is not None)
        if ignored:
            raise PipelineAttachError(
                f"the attached {self.component} does not read {', '.join(ignored)} (it reads the sample, timestep, "
                "class_labels and encoder_hidden_states)"
            )
        x = given["sample"] if "sample" in given else given["hidden_states"]
        m, device = x.shape[0], x.device
        t = self._timesteps(given.get("timestep"), m, device)
        values = {k: _expand(k, v, m, None).to(device) for k, v in self._values.items() if k != "y"}
        context = given.get("encoder_hidden_states")
        if context is not None:
            values["context"] = context
        out = self.model(x, t, self._labels(given.get("class_labels"), m, device), **values)
        return self._output(sample=out) if given.get("return_dict", True) else (out,)

    # --- attach / detach ------------------------------------------------------------------------
    def _attach(self) -> None:
        d, inner = self.denoiser, self.model.net.model
        self._saved = (d._modules, d._parameters, d._buffers, d._non_persistent_buffers_set, self.model.training)
        d._modules, d._parameters = dict(inner._modules), dict(inner._parameters)
        d._buffers, d._non_persistent_buffers_set = dict(inner._buffers), set(inner._non_persistent_buffers_set)
        self.model.eval()
        d.forward = self.forward  # an instance attribute: the class, and its forward, stay diffusers'
        setattr(d, _HANDLE, self)

    def detach(self) -> None:
        """Put the denoiser's own modules and forward back (bit for bit); a second call does nothing."""
        if self._saved is None:
            return
        d = self.denoiser
        d._modules, d._parameters, d._buffers, d._non_persistent_buffers_set, training = self._saved
        del d.forward
        delattr(d, _HANDLE)
        self.model.train(training)
        self._saved = None

    def __enter__(self) -> LiveAdapters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def attach(
    pipe: Any, cfg: Config, model: DiffusionModel, *, y: Any = None, guidance: float | None = None, **conditions: Any
) -> LiveAdapters:
    """Attach the run ``(cfg, model)`` (``difflora.open_run``'s first two) to ``pipe``'s unet or
    transformer, so that ``pipe(...)`` samples the run's model with its adapters live (module doc).

    ``y``: the class, one label or one per sample (-1: null); default: the pipeline's class labels,
    else unconditional. ``guidance``: a one-pass student's scale (003; default: its own, as
    ``difflora sample``), else the condition of that name. ``conditions``: every other condition the adapters read (``task=2``); each is required.
    Raises :class:`PipelineAttachError` and leaves ``pipe`` unchanged when the run's backbone is not
    a diffusers model, the denoiser's class or config is not the run's, the scheduler's process is
    not the run's (T, betas, variance) or a condition is missing or read by no adapter.
    """
    net = getattr(model, "net", None)
    if not isinstance(net, DiffusersNet):  # model.arch: diffusers, from a config or a pretrained folder
        raise PipelineAttachError(
            f"attach needs a run whose backbone is a diffusers model (model.arch: diffusers); this run's is "
            f"model.arch {cfg.model.arch}: export it at fixed conditions instead (difflora export --to peft)"
        )
    component, denoiser = _denoiser(pipe)
    if hasattr(denoiser, _HANDLE):
        raise PipelineAttachError(f"a run is already attached to this pipeline's {component}: detach it first")
    problem = _config_problem(denoiser, net.model) or _scheduler_problem(getattr(pipe, "scheduler", None), cfg)
    if problem:
        raise PipelineAttachError(problem)
    student = student_of(cfg)
    if guidance is None and student is not None:
        guidance = student.default_guidance(cfg)
    live = LiveAdapters(pipe, cfg, model, {"y": y, "guidance": guidance, **conditions})
    live._attach()
    return live


def detach(pipe: Any) -> None:
    """Detach the run attached to ``pipe``'s denoiser (:meth:`LiveAdapters.detach`)."""
    component, denoiser = _denoiser(pipe)
    live = getattr(denoiser, _HANDLE, None)
    if live is None:
        raise PipelineAttachError(f"no difflora run is attached to this pipeline's {component}")
    live.detach()
