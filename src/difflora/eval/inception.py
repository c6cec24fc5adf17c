"""Inception-v3 from a local weights file: Inception FID / KID / IS where a user has the weights.

Nothing is downloaded; the file is read as tensors only (safetensors, or torch.load with
weights_only=True), and torch-fidelity provides the network definition.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from difflora.files.atomic import storage_errors
from difflora.files.tensorfile import check_finite
from difflora.optional import require

__all__ = ["InceptionFeatures", "load_inception"]


class InceptionFeatures(nn.Module):
    """Inception-v3 of the FID protocol (torch-fidelity's port of the 2015 TensorFlow graph).

    Same interface as FeatureNet (``features``, ``logits``, ``features_and_logits``), so
    ``compute_metrics`` gives Inception FID / KID / precision-recall and the Inception Score with it.
    Takes images [N x C x H x W] in [-1, 1] with C = 1 or 3 at any size: they are quantised to
    uint8 (as FID is defined on 8-bit images), grey is repeated to RGB, and torch-fidelity resizes
    to 299 px with TensorFlow-1 compatible bilinear interpolation.
    """

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.num_features = 2048
        # No training record: KID uses scale 1 (the kernel was designed for these features).
        self.info: Any = None

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Inception takes images [N x 1|3 x H x W], got shape {tuple(x.shape)}")

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool3 features [N x 2048], unbiased logits [N x 1008]): torch-fidelity's FID and IS inputs."""
        self.check_input(x)
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if u8.shape[1] == 1:
            u8 = u8.expand(-1, 3, -1, -1)
        feats, logits = self.extractor(u8)
        return feats, logits

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


# What to do about a damaged Inception weights file.
_REFETCH = "copy the weights file again from a machine where it is intact"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch pickle read with weights_only=True (no code runs)."""
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None
        check_finite(state, str(path), _REFETCH)
        return state
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise ValueError(f"{path} is not a state dict of tensors readable with weights_only=True: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    check_finite(state, str(path), _REFETCH)
    return state


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> InceptionFeatures:
    """Inception-v3 for FID / IS from a local weights file; nothing is downloaded.

    ``path`` is torch-fidelity's converted state dict ``weights-inception-2015-12-05-6726825d.pth``
    (the file torchmetrics' and torch-fidelity's FID download; copy it from a machine with
    internet), or the same tensors saved as ``.safetensors``. It is read as tensors only
    (safetensors, or ``torch.load(weights_only=True)``): nothing is unpickled from the user's file.

    Needs the optional package torch-fidelity for the network definition (``pip install
    'difflora[inception]'``); its package imports torchvision, which must match the installed torch.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"Inception weights file {p} does not exist")
    state = _read_state_dict(p)
    # torch-fidelity imports torchvision, which must match the installed torch (the error says so).
    extractor = require(
        "torch_fidelity.feature_extractor_inceptionv3",
        "load_inception (the Inception-v3 definition)",
        extra="inception",
    )
    # torch-fidelity downloads when given no path and unpickles a given path (its torch.load
    # allows arbitrary objects); so it gets a file we wrote from the tensors checked above, never
    # the user's file.
    with tempfile.TemporaryDirectory() as tmp:
        own = Path(tmp) / "inception.pt"
        with storage_errors(own, sum(t.numel() * t.element_size() for t in state.values())):
            torch.save(state, own)
        ext = extractor.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(own)
        )
    return InceptionFeatures(ext).to(device).eval().requires_grad_(False)
