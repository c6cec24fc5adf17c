"""Shared test set-up: offline, deterministic, small."""

import os

# Nothing in the tests may wait on a network (diffusers would try the hub otherwise).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

import helpers  # noqa: E402

# Two cores here and in CI; fixed thread count keeps float reductions repeatable run to run.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_config():
    """The shared tiny-config factory (helpers.tiny_config), for tests that take it as a fixture."""
    return helpers.tiny_config
