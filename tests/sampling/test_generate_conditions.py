"""generate() with per-sample conditions (a task adapter), its validation, and non-finite samples.

Reference: a batch with a different task per sample must equal, sample by sample, batches whose
samples all share that task (the initial noise of sample i depends only on the seed and i).
"""

from __future__ import annotations

import pytest
import torch

from difflora.model.build import build_model
from difflora.sampling.generate import NonFiniteSamplesError, condition_tensors, generate, sampling_settings
from helpers import tiny_config

TASK_ADAPTER = "model.adapters=[{name: task, condition: task, weighting: index, num_values: 3, rank: 2}]"
# float32 sampler steps over a batch against the same steps over other batches: ~1e-6 apart.
ATOL = 1e-5


def task_model():
    cfg = tiny_config("tiny-unet", TASK_ADAPTER, "sample.batch_size=8")
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        # Zero-initialised parts (the output conv, LoRA B) would hide every difference between tasks.
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p), alpha=0.5 if ".adapters." in name else 0.05)
    return cfg, model.eval()


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_per_sample_tasks_match_one_task_per_batch(guidance):
    cfg, model = task_model()
    labels = torch.tensor([1, 4, 7])
    s = sampling_settings(cfg, num=3, steps=3, sampler="ddpm", guidance=guidance)
    kw = dict(labels=labels, seed=5)
    mixed = generate(model, cfg, s, conditions={"task": [0, 2, 1]}, **kw)
    for i, task in enumerate([0, 2, 1]):
        alone = generate(model, cfg, s, conditions={"task": task}, **kw)
        torch.testing.assert_close(mixed[i], alone[i], atol=ATOL, rtol=0)
    other = generate(model, cfg, s, conditions={"task": 1}, **kw)
    assert (mixed[0] - other[0]).abs().max() > 1e-2  # the task changes the samples: the test can fail


def test_no_update_rows_equal_the_base_model():
    cfg, model = task_model()
    base_cfg = tiny_config("tiny-unet", "sample.batch_size=8")
    base = build_model(base_cfg)
    # The adapted model wraps each target layer: its weights live under `<path>.base_layer.`.
    state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".adapters." not in k}
    base.load_state_dict(state)
    kw = dict(labels=torch.tensor([0, 3]), seed=1)
    got = generate(model, cfg, sampling_settings(cfg, num=2, steps=2, sampler="ddim"), conditions={"task": -1}, **kw)
    want = generate(base, base_cfg, sampling_settings(base_cfg, num=2, steps=2, sampler="ddim"), **kw)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


TIME_CLASS_ADAPTERS = (
    "model.adapters=[{name: time, condition: t, weighting: linear, num_values: 1000, num_bases: 5, rank: 2}, "
    "{name: cls, condition: y, weighting: index, num_values: 10, rank: 2}]"
)


@pytest.mark.parametrize("sampler,guidance", [("ddim", 1.0), ("ddpm", 2.0)])
def test_generate_with_adapters_disabled_is_the_base_model(sampler, guidance):
    # generate() merges the t-adapters at every step (model.merged("t")); inside adapters_disabled()
    # no disabled adapter may be merged: the samples must be those of the model built without adapters.
    cfg = tiny_config("tiny-unet", TIME_CLASS_ADAPTERS, "sample.batch_size=8")
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p), alpha=0.5 if ".adapters." in name else 0.05)
    model.eval()
    base_cfg = tiny_config("tiny-unet", "sample.batch_size=8")
    base = build_model(base_cfg)
    base.load_state_dict(
        {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".adapters." not in k}
    )
    kw = dict(labels=torch.tensor([0, 3, 5]), seed=2)
    s = dict(num=3, steps=3, sampler=sampler, guidance=guidance)
    with model.adapters_disabled():
        off = generate(model, cfg, sampling_settings(cfg, **s), **kw)
    want = generate(base.eval(), base_cfg, sampling_settings(base_cfg, **s), **kw)
    assert torch.equal(off, want)
    with model.adapters_disabled("time"):  # the class adapter stays on: not the base model
        time_off = generate(model, cfg, sampling_settings(cfg, **s), **kw)
    assert (time_off - want).abs().max() > 1e-2
    on = generate(model, cfg, sampling_settings(cfg, **s), **kw)
    assert (on - want).abs().max() > 1e-2  # the adapters change the samples: the test can fail


def test_condition_tensors_validation():
    assert condition_tensors({"task": 2}, 3)["task"].tolist() == [2, 2, 2]
    assert condition_tensors({"task": [0.0, 1.0]}, 2)["task"].dtype == torch.int64
    assert condition_tensors({"guidance": [1.5, 2.0]}, 2)["guidance"].dtype == torch.float32
    with pytest.raises(ValueError, match="one value or 3"):
        condition_tensors({"task": [0, 1]}, 3)
    with pytest.raises(ValueError, match="finite"):
        condition_tensors({"guidance": float("nan")}, 2)
    with pytest.raises(ValueError, match="identifier other than t and y"):
        condition_tensors({"t": 1}, 2)
    with pytest.raises(ValueError, match="identifier other than t and y"):
        condition_tensors({"two words": 1}, 2)


def test_non_finite_samples_are_an_error():
    cfg, model = task_model()
    with torch.no_grad():
        model.net.out[-1].bias.fill_(float("nan"))
    with pytest.raises(NonFiniteSamplesError, match="NaN or infinite values in 2 of 2 samples"):
        generate(
            model, cfg, sampling_settings(cfg, num=2, steps=2), conditions={"task": 0}, labels=torch.tensor([0, 1])
        )
