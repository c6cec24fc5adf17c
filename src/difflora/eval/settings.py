"""What an evaluation draws and scores, as one settings object checked when it is made.

:class:`EvalSettings` travels whole from the CLI, a study or Python into
:func:`difflora.eval.evaluate.evaluate_run`; :meth:`EvalSettings.sampling` resolves it against a
run into the :class:`~difflora.config.schema.SampleConfig` that ``generate`` takes and the list of
guidance scales to score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from difflora.config.schema import Config, SampleConfig
from difflora.eval.target import EvalError
from difflora.sampling.generate import sampling_settings
from difflora.sampling.student import student_of

__all__ = ["MIN_SAMPLES", "EvalSettings"]

# Precision/recall use the 3rd nearest neighbour within each set, KID needs 2 per subset: 4 samples
# is the least for which every metric is defined (meaningful values need hundreds).
MIN_SAMPLES = 4


@dataclass(frozen=True)
class EvalSettings:
    """An evaluation request. Unset ``steps``, ``sampler``, ``eta``, ``guidance_fraction`` come from
    the run's ``sample`` config; ``guidance`` lists classifier-free guidance scales, one result entry
    each (default: the run's own scale). ``weights`` / ``checkpoint`` pick the weights
    (:func:`difflora.train.open_run`). ``teacher``: score the guided teacher held in a one-pass
    student's run; ``task``: task K of a multi-task run against its own dataset; ``against``:
    unconditional samples against another dataset's split (:func:`difflora.eval.target.scored_config`).
    ``bootstrap`` draws give the 95% intervals, ``floor_draws`` real sets the noise floor; the first
    ``grid_size`` samples of each scale go into its grid. Raises EvalError when made with a value
    no run could take."""

    num_samples: int = 1000
    steps: int | None = None
    sampler: str | None = None
    eta: float | None = None
    guidance: Sequence[float] | None = None
    guidance_fraction: float | None = None
    seed: int = 0
    weights: str = "ema"
    checkpoint: str | int | Path | None = None
    teacher: bool = False
    task: int | None = None
    against: str | None = None
    grid_size: int = 100
    bootstrap: int = 100
    floor_draws: int = 20

    def __post_init__(self) -> None:
        if self.num_samples < MIN_SAMPLES:
            raise EvalError(
                f"--num-samples must be at least {MIN_SAMPLES} (precision/recall use 3 nearest neighbours), "
                f"got {self.num_samples}"
            )
        if self.steps is not None and self.steps < 1:
            raise EvalError(f"--steps must be at least 1, got {self.steps}")
        if self.sampler is not None and self.sampler not in ("ddpm", "ddim"):
            raise EvalError(f"--sampler must be ddpm or ddim, got {self.sampler!r}")
        if self.bootstrap < 0 or self.floor_draws < 2:
            raise EvalError(f"bootstrap must be >= 0 and floor draws >= 2, got {self.bootstrap} and {self.floor_draws}")

    def sampling(self, cfg: Config, run_dir: Path) -> tuple[SampleConfig, list[float]]:
        """(the sampling settings of the first scale, every scale) for the run ``run_dir`` of config
        ``cfg``: the request with unset values from the run, checked against the run before any
        sampling (a one-pass student: the scales it can sample, and no selective guidance)."""
        s = sampling_settings(cfg)
        steps, sampler = self.steps or s.steps, self.sampler or s.sampler
        eta = s.eta if self.eta is None else self.eta
        scales = [float(w) for w in (self.guidance if self.guidance else [s.guidance])]
        if any(w < 0 or not math.isfinite(w) for w in scales):
            raise EvalError(f"guidance scales must be finite and >= 0, got {scales}")
        if cfg.model.num_classes == 0 and cfg.model.text is None and any(w != 1.0 for w in scales):
            raise EvalError(f"{run_dir} is unconditional (model.num_classes = 0): guidance must be 1, got {scales}")
        if steps > cfg.diffusion.steps:
            raise EvalError(f"--steps {steps} exceeds the run's {cfg.diffusion.steps} diffusion timesteps")
        if eta < 0 or not math.isfinite(eta):
            raise EvalError(f"--eta must be finite and >= 0, got {eta}")
        fraction = s.guidance_fraction if self.guidance_fraction is None else float(self.guidance_fraction)
        if not 0.0 <= fraction <= 1.0:
            raise EvalError(f"the guidance fraction must lie in [0, 1], got {fraction}")
        student = student_of(cfg)
        if student is not None and not self.teacher:
            if fraction != 1.0:
                raise EvalError(
                    f"a guidance fraction of {fraction:g} applies to classifier-free guidance; the student has none "
                    "(score its guided teacher with teacher=True / --teacher)"
                )
            try:
                for w in scales:
                    student.check_guidance(cfg, w)
            except ValueError as exc:
                raise EvalError(str(exc)) from None
        changes = dict(num=self.num_samples, steps=steps, sampler=sampler, eta=eta, guidance_fraction=fraction)
        return s.model_copy(update=changes | {"guidance": scales[0]}), scales
