"""Evaluate a trained run: sample from its weights and score the samples against the held-out split.

``evaluate_run`` loads a run directory's newest checkpoint (EMA weights by default), draws
``num_samples`` images per guidance scale with the given sampler and number of steps, and compares
them with the test split of the run's dataset at the run's image size, in the feature space of the
classifier difflora trains on that dataset (``get_feature_net``)::

    result = evaluate_run("runs/digits", EvalSettings(num_samples=1000, steps=50, sampler="ddim", guidance=[1, 2, 4]))
    result["results"][0]["fd"]

It writes a ``metrics.json`` (the settings used, the checkpoint step, the feature network's test
accuracy, the noise floor and one entry of metrics with bootstrap intervals per guidance scale) and
one sample grid per scale -- without ``out``, kept under a key made of its settings
(``run_dir/eval/<key>/``, :mod:`difflora.eval.store`) so no evaluation overwrites another, and
added to the run's TensorBoard log if it has one (``eval/<key>/fd@w2``, ...) -- and merges the
sampling speed into the run's ``accounting.json`` (key ``sampling``). The noise floor is what
real images reach at the same sample count (``difflora.eval.uncertainty``): a score means something
only next to it, and only at equal counts.

A one-pass student's run (:mod:`difflora.sampling.student`, e.g. 003's LoRA student) is scored
as its student; ``teacher=True`` scores the guided teacher held in the same files instead (the
student off, classifier-free guidance at each scale; its newest copy in ``run_dir/eval-teacher``), so
teacher and student sit side by side.

Class-conditional models are sampled with labels balanced over the classes (0, 1, ..., C-1
repeated) and get a class accuracy: the fraction of samples the feature network classifies as the
class they were generated for. A class-conditional base adapted with every label dropped
(``train.label_dropout`` 1) learned only its null label: it is sampled and scored unconditionally. FD here is not Inception FID: its values are only comparable between
runs scored by the same feature network (same dataset, size and feature-net settings).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from difflora.config.schema import Config, SampleConfig
from difflora.data import load_dataset
from difflora.eval.features import (
    FeatureNet,
    FeatureTrainConfig,
    check_feature_net,
    default_cache_dir,
    floor_pool,
    get_feature_net,
    load_feature_net,
)
from difflora.eval.fidelity import spatial_requests, task_fidelity
from difflora.eval.metrics import extract_features, feature_kid_scale, knn_radii, metrics_from_features
from difflora.eval.settings import MIN_SAMPLES, EvalSettings
from difflora.eval.store import STORE, write_evaluation
from difflora.eval.target import EvalError, default_eval_dir, scored_config
from difflora.eval.uncertainty import (
    bootstrap_intervals,
    check_pool,
    interval_kind,
    reference_level,
    reported_interval,
)
from difflora.files.images import grid_png
from difflora.sampling.generate import data_conditions, default_labels, generate
from difflora.sampling.student import Student, student_of
from difflora.train.checkpoint import CheckpointError
from difflora.train.footprint import check_memory
from difflora.train.loop import write_json
from difflora.train.pipeline_data import text_inputs
from difflora.train.run_dir import read_json
from difflora.train.run_loader import open_run
from difflora.train.trackers import log_evaluation

__all__ = [
    "EvalError",
    "EvalSettings",
    "METRICS_VERSION",
    "default_eval_dir",
    "evaluate_run",
    "merge_accounting",
    "MIN_SAMPLES",
]

# 2: stratified KID on rescaled features, noise floors and bootstrap intervals (a study re-evaluates
# runs whose metrics.json has another version).
METRICS_VERSION = 2


def merge_accounting(run_dir: str | Path, update: dict[str, Any]) -> Path:
    """Merge keys into ``run_dir/accounting.json`` (created if missing), written atomically."""
    path = Path(run_dir) / "accounting.json"
    acc = read_json(path) or {}  # missing or damaged: rebuilt from what is known now
    acc.update(update)
    write_json(path, acc)
    return path


def _resolve_feature_net(
    cfg: Config,
    feature_net: str | Path | FeatureNet | None,
    cache_dir: str | Path | None,
    feature_train: FeatureTrainConfig | None,
    device: torch.device,
    progress: bool,
) -> tuple[FeatureNet, str]:
    if isinstance(feature_net, FeatureNet):
        check_feature_net(feature_net, cfg.data)
        return feature_net, "given"
    if feature_net is not None:
        # A feature network trained for another dataset or size raises FeatureNetMismatchError here.
        return load_feature_net(feature_net, expect=cfg.data, map_location=device), str(feature_net)
    net = get_feature_net(cfg.data, cache_dir, train=feature_train, device=device, progress=progress)
    return net, str(Path(cache_dir) if cache_dir is not None else default_cache_dir())


def _fmt_scale(w: float) -> str:
    return f"{w:g}".replace(".", "p")


def _check_out_dir(out_dir: Path, given: bool) -> None:
    """Raise EvalError unless ``out_dir`` can be created and written (checked before any work);
    ``given``: the user named it (--out), else it is one of the run's own evaluation directories."""
    fix = "choose another --out" if given else "move it away, or pass --out DIR"
    if out_dir.exists() and not out_dir.is_dir():
        raise EvalError(f"{'--out ' * given}{out_dir} is a file, not a directory: {fix}")
    parent = out_dir
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EvalError(f"cannot write to {parent} (for {out_dir}): {'choose a writable --out' if given else fix}")


def _reference(cfg: Config, net: FeatureNet, num_samples: int, labels: torch.Tensor | None, seed: int, draws: int):
    """(reference features, reference labels, their k-NN radii, noise floor, pool size) -- everything
    that can fail before sampling, and what every scored set is compared with."""
    ref = load_dataset(cfg.data.model_copy(update={"limit": 0, "hflip": False}), "test")
    if ref.images.shape[0] < MIN_SAMPLES:
        raise EvalError(f"the test split of {cfg.data.name} has {ref.images.shape[0]} images; eval needs {MIN_SAMPLES}")
    pool_images, pool_labels = floor_pool(cfg.data)
    try:
        check_pool(pool_labels, num_samples, labels)
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    ref_f, _ = extract_features(net, ref.images)
    radii = knn_radii(ref_f)
    pool_f, pool_logits = extract_features(net, pool_images)
    floor = reference_level(
        ref_f,
        pool_f,
        pool_labels,
        num_samples,
        ref_labels=ref.labels,
        labels=labels,
        pool_logits=pool_logits,
        kid_scale=feature_kid_scale(net),
        draws=draws,
        seed=seed,
        ref_radii=radii,
    )
    return ref_f, ref.labels, radii, floor, int(pool_labels.shape[0])


def _fmt_floor(metrics: dict[str, Any], floor: dict[str, dict[str, float]], ci: dict[str, list[float]]) -> str:
    parts = []
    for key, name, d in (
        ("fd", "FD", 3),
        ("kid_mean", "KID", 5),
        ("precision", "precision", 3),
        ("recall", "recall", 3),
    ):
        lo, hi = reported_interval(key, metrics[key], ci.get(key, (math.nan, math.nan)))
        parts.append(
            f"{name} {metrics[key]:.{d}f} [{lo:.{d}f}, {hi:.{d}f}] ({interval_kind(key)} 95% bootstrap; "
            f"real data: {floor[key]['mean']:.{d}f} ± {floor[key]['std']:.{d}f})"
        )
    return ", ".join(parts)


def evaluate_run(
    run_dir: str | Path,
    settings: EvalSettings | None = None,
    *,
    out: str | Path | None = None,
    feature_net: str | Path | FeatureNet | None = None,
    cache_dir: str | Path | None = None,
    feature_train: FeatureTrainConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    update_accounting: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Sample from a run and score the samples; returns (and writes to ``out/metrics.json``) the result.

    ``settings``: what to draw and score (:class:`~difflora.eval.settings.EvalSettings`; default
    ``EvalSettings()``), one result entry per guidance scale, all drawn from the same initial noise
    and labels. Without ``out`` the evaluation is kept under its key, ``run_dir/eval/<key>/``
    (the result's ``key``; its ``request`` says teacher, task and against), with a copy in
    ``run_dir/eval`` (``eval-teacher``, ``eval-task<K>``, ...) as the newest of its kind
    (:func:`~difflora.eval.store.write_evaluation`); ``out`` writes there alone.
    ``feature_net`` is a saved feature network (path stem) or a FeatureNet; default: the cached one
    for the run's dataset (trained on first use, with ``feature_train``).
    Each entry holds fd, kid_mean, kid_std, precision, recall, class_accuracy (class-conditional
    runs), "ci" (95% bootstrap intervals of each), sample_seconds (wall time of the whole
    draw), sample_seconds_per_image and sample_images_per_s; "noise_floor" holds the same scores
    of real sets drawn like the samples (``difflora.eval.uncertainty``). Everything that can be checked (settings, the output
    directory, the data sizes the floor needs) is checked before any sampling, and nothing is
    written unless the evaluation succeeds. A teacher's sampling speed goes to ``accounting.json``
    as ``teacher_sampling``.
    """
    e = settings if settings is not None else EvalSettings()
    run_dir = Path(run_dir)
    out_dir = Path(out) if out is not None else default_eval_dir(run_dir, e.teacher, e.task, e.against)
    cfg, model, meta = _open(run_dir, e)
    cfg = scored_config(cfg, e.task, e.against)
    student = _check_teacher(cfg, run_dir, e.teacher)
    _check_out_dir(out_dir, out is not None)
    if out is None:
        _check_out_dir(run_dir / STORE, False)
    s, scales = e.sampling(cfg, run_dir)
    dev = torch.device(device)
    check_memory(cfg, dev, f"eval of {e.num_samples} samples", samples=e.num_samples, guided=scales != [1.0])
    # Spatial tasks: features, reference and floor of the plain dataset; one entry per task and scale.
    plain = cfg.model_copy(update={"data": cfg.data.model_copy(update={"spatial": None})})
    net, net_source = _resolve_feature_net(plain, feature_net, cache_dir, feature_train, dev, progress)

    labels = default_labels(cfg, e.num_samples)  # balanced classes; None if unconditional or trained so
    ref_f, ref_labels, radii, floor, pool_size = _reference(plain, net, e.num_samples, labels, e.seed, e.floor_draws)
    model.to(dev)

    # data_conditions: data.name's own task (Affiner runs); spatial tasks set theirs per request.
    draw = dict(labels=labels, seed=e.seed, teacher=e.teacher, conditions=data_conditions(cfg))
    draw |= text_inputs(cfg, None, e.num_samples)  # a text pipeline: the test split's captions
    if student is not None and not e.teacher:
        model = _FusedStudent(run_dir, e, student, dev)
    scored = (model, cfg, net, (ref_f, ref_labels, radii), floor)
    results, grids = _score_all(scored, s, scales, draw, e, dev, progress, log)

    settings_record = _settings_record(s, scales, draw, e)
    result = _result_record(
        run_dir, cfg, meta, e.weights, settings_record, net, net_source, ref_f, pool_size, floor, dev
    )
    if out is None:  # kept under its key (difflora.eval.store)
        result["request"] = dict(teacher=e.teacher, task=e.task, against=e.against)
    result["results"] = results
    written = _write((out_dir, None if out else run_dir), result, grids, cfg, labels is not None)
    if out is None:  # a run with a TensorBoard log shows a kept evaluation there too, under its key
        log_evaluation(run_dir, result["key"], result, {e["grid"]: written / e["grid"] for e in results})
    if update_accounting:
        _record_speed(run_dir, _sampling_accounting(results, s.sampler, s.steps, e.num_samples, dev), e.teacher)
    return result


def _open(run_dir: Path, e: EvalSettings) -> tuple[Config, torch.nn.Module, dict[str, Any]]:
    """:func:`~difflora.train.open_run` with its errors as EvalError."""
    try:
        return open_run(run_dir, e.weights, e.checkpoint)
    except (FileNotFoundError, CheckpointError) as exc:
        raise EvalError(str(exc)) from None


def _settings_record(s: SampleConfig, scales: list[float], draw: dict[str, Any], e: EvalSettings) -> dict[str, Any]:
    """The sampling settings an evaluation records (``settings`` of metrics.json)."""
    settings = dict(steps=s.steps, sampler=s.sampler, eta=s.eta, seed=e.seed, teacher=e.teacher)
    settings |= dict(guidance_fraction=s.guidance_fraction, guidance=scales)
    settings |= dict(labels="balanced" if draw["labels"] is not None else None, task=draw["conditions"].get("task"))
    counts = dict(num_samples=e.num_samples, bootstrap=e.bootstrap, floor_draws=e.floor_draws)
    return settings | counts | dict(metrics_version=METRICS_VERSION)


def _record_speed(run_dir: Path, acc: dict[str, Any], teacher: bool) -> None:
    """Merge the sampling speed into the run's accounting.json: a one-pass student's guided teacher
    under ``teacher_sampling``, so the student's own ``sampling`` record stays."""
    merge_accounting(run_dir, {"teacher_sampling": acc["sampling"]} if teacher else acc)


def _score_all(
    scored: tuple[Any, ...],
    s: SampleConfig,
    scales: list[float],
    draw: dict[str, Any],
    e: EvalSettings,
    dev: torch.device,
    progress: bool,
    log: Callable[[str], None] | None,
) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """One result entry and sample grid per guidance scale (and per spatial task of a spatial run).

    ``scored``: (model, cfg, feature net, (reference features, labels, k-NN radii), noise floor);
    ``s``: the sampling settings, ``draw``: generate's other inputs shared by every scale.
    """
    model, cfg, net, ref, floor = scored
    say = log or (lambda _msg: None)
    results, grids = [], []
    for w in scales:
        for req in spatial_requests(cfg.data, e.num_samples) or [None]:
            at = dict(draw)
            at |= {} if req is None else {"conditions": {"task": req.task_id}, "spatial": req.spatial}
            at_w = model.at(w) if isinstance(model, _FusedStudent) else model
            sampled = (s.model_copy(update={"guidance": w}), at)
            entry, fake = _score_scale(at_w, cfg, net, ref, sampled, e.bootstrap, dev, progress)
            if req is not None:
                entry |= {"task": req.task, "task_id": req.task_id, "grid": f"samples_w{_fmt_scale(w)}_{req.task}.png"}
                entry["fidelity"] = task_fidelity(req.task, fake, req.clean, cfg.data.spatial)
            grids.append(fake[: min(e.grid_size, e.num_samples)])
            results.append(entry)
            say(f"guidance {w:g}: {_fmt_entry(entry, floor)}")
    return results, grids


class _FusedStudent:
    """A one-pass student's run as it samples: the student fused into W0 once for the whole draw at
    the scale asked for (:meth:`~difflora.sampling.student.Student.fuse`), so one pass per step with no
    adapter work, as ``difflora sample`` runs it. Each scale reopens the run, which keeps a single
    copy of W0 in memory (a reversible merge would hold a second one)."""

    def __init__(self, run_dir: Path, e: EvalSettings, student: Student, dev: torch.device):
        self.source = (run_dir, e)
        self.student = student
        self.dev = dev

    def at(self, w: float) -> torch.nn.Module:
        cfg, model, _ = _open(*self.source)
        self.student.fuse(model, cfg, w)
        return model.to(self.dev)


def _check_teacher(cfg: Config, run_dir: Path, teacher: bool) -> Student | None:
    """The run's one-pass student (None: an ordinary run); ``teacher`` needs one whose files hold
    the teacher."""
    student = student_of(cfg)
    if not teacher:
        return student
    if student is None:
        raise EvalError(
            f"--teacher scores the guided teacher of a distilled run; {run_dir} is not one (evaluate it without --teacher)"
        )
    problem = student.teacher_problem(cfg)
    if problem is not None:
        raise EvalError(f"{run_dir} is {problem}")
    return student


def _fmt_entry(entry: dict[str, Any], floor: dict[str, dict[str, float]]) -> str:
    acc = f", class accuracy {entry['class_accuracy']:.3f}" if "class_accuracy" in entry else ""
    fid = ", ".join(f"{k} {v:.3f}" for k, v in entry.get("fidelity", {}).items())
    task = f"task {entry['task']}: " if "task" in entry else ""
    fid = f", {fid}" if fid else ""
    return f"{task}{_fmt_floor(entry, floor, entry['ci'])}{acc}{fid} ({entry['sample_images_per_s']:.1f} images/s)"


def _score_scale(
    model: torch.nn.Module,
    cfg: Config,
    net: FeatureNet,
    ref: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor],
    sampled: tuple[SampleConfig, dict[str, Any]],
    bootstrap: int,
    dev: torch.device,
    progress: bool,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Draw images at one guidance scale (``sampled``: generate's settings and other inputs) and score
    them against the reference (features, labels, k-NN radii); returns the result entry and the images."""

    s, draw = sampled
    t0 = time.perf_counter()
    fake = generate(model, cfg, s, device=dev, progress=progress, **draw)
    seconds = time.perf_counter() - t0
    fake_f, fake_logits = extract_features(net, fake)
    ref_f, ref_labels, radii = ref
    scored = dict(
        real_labels=ref_labels,
        fake_labels=draw["labels"],
        fake_logits=fake_logits,
        kid_scale=feature_kid_scale(net),
    )
    seed = draw["seed"]
    metrics = metrics_from_features(ref_f, fake_f, seed=seed, real_radii=radii, **scored)
    ci = bootstrap_intervals(ref_f, fake_f, draws=bootstrap, seed=seed, **scored) if bootstrap else {}
    entry = {
        "guidance": s.guidance,
        **metrics,
        "ci": ci,
        "sample_seconds": seconds,
        "sample_seconds_per_image": seconds / s.num,
        "sample_images_per_s": s.num / seconds,
        "grid": f"samples_w{_fmt_scale(s.guidance)}.png",
    }
    return entry, fake


def _result_record(
    run_dir: Path,
    cfg: Config,
    meta: dict[str, Any],
    weights: str,
    settings: dict[str, Any],
    net: FeatureNet,
    net_source: str,
    ref_f: torch.Tensor,
    pool_size: int,
    floor: dict[str, Any],
    dev: torch.device,
) -> dict[str, Any]:
    """What ``metrics.json`` records besides the per-scale results: the run, the settings, the
    feature net and the noise floor."""
    info = net.info
    return {
        "run_dir": str(run_dir),
        "checkpoint_step": int(meta["step"]),
        "weights": weights,
        "dataset": cfg.data.name,
        "image_size": cfg.model.image_size,
        "num_real": int(ref_f.shape[0]),
        "num_floor_pool": pool_size,
        "settings": settings,
        "feature_net": {
            "source": net_source,
            "test_accuracy": info.test_accuracy if info is not None else None,
            "data_fingerprint": info.data_fingerprint if info is not None else None,
            "kid_scale": feature_kid_scale(net),
        },
        "noise_floor": floor,
        "device": str(dev),
        "threads": torch.get_num_threads(),
    }


def _write(
    kept: tuple[Path, Path | None], result: dict[str, Any], grids: list[torch.Tensor], cfg: Config, conditional: bool
) -> Path:
    """The grids and metrics.json (:func:`~difflora.eval.store.write_evaluation`; ``kept``: the output
    directory and the run directory when the evaluation is kept under its key); returns their directory."""
    nrow = cfg.model.num_classes if conditional else None
    pngs = {e["grid"]: grid_png(images, nrow) for e, images in zip(result["results"], grids, strict=True)}
    out_dir, run_dir = kept
    return write_evaluation(out_dir, result, pngs, run_dir)


def _sampling_accounting(
    results: list[dict[str, Any]], sampler: str, steps: int, num_samples: int, dev: torch.device
) -> dict[str, Any]:
    return {
        "sample_images_per_s": results[0]["sample_images_per_s"],
        "sampling": [
            {
                "sampler": sampler,
                "steps": steps,
                "guidance": e["guidance"],
                "images_per_s": e["sample_images_per_s"],
                "num_samples": num_samples,
                "device": str(dev),
                "threads": torch.get_num_threads(),
            }
            for e in results
        ],
    }
