"""The feature network: a small classifier difflora trains itself to measure sample quality offline.

No pretrained Inception weights exist on an offline machine, so difflora measures Frechet distance,
KID and precision/recall in the penultimate feature space of a CNN classifier trained on the
dataset's train split (the role Inception-v3 plays for ImageNet-like data), and uses its logits
to check that class-conditional samples show the requested class.

**Its own split.** The network trains on one half of the train split (stratified by class,
``split_train``); the other half, which it never sees, is the *floor pool*: real images from which
``difflora.eval.uncertainty`` draws sets as a perfect generator would, to measure the level each
metric reaches for real data (a set the feature network was trained on would look closer to the
held-out data than fresh real data does, and bias that level).

A trained network is stored as safetensors (weights) plus JSON (architecture, dataset name, image
size, channels, classes, test accuracy, a fingerprint of the data config, the sha256 of the weights
file). ``get_feature_net`` looks it up in a cache directory and trains it on first use::

    net = get_feature_net(cfg.data)            # ~/.cache/difflora/features/digits-8px-<key>.*
    feats = net.features(images)               # [N x 128]

Which cache directory: ``cache_dir`` if given, else ``$DIFFLORA_CACHE/features``, else
``~/.cache/difflora/features``.

One evaluator per dataset and size: the feature network ignores ``data.limit`` and ``data.hflip``
(settings of a diffusion run, not of the data being measured), so every run on a dataset is scored
in the same feature space and their distances are comparable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from difflora.config.schema import DataConfig
from difflora.data import load_dataset
from difflora.data.split import stratified_split
from difflora.eval.inception import InceptionFeatures, load_inception
from difflora.eval.kernel import kid_feature_scale
from difflora.files.atomic import write_bytes
from difflora.files.cachedir import cache_root
from difflora.files.jsonfile import read_json_file
from difflora.files.tensorfile import check_finite, save_tensors

__all__ = [
    "FeatureNet",
    "FeatureNetConfig",
    "FeatureNetInfo",
    "FeatureNetMismatchError",
    "FeatureTrainConfig",
    "InceptionFeatures",
    "check_feature_net",
    "data_fingerprint",
    "default_cache_dir",
    "feature_net_key",
    "floor_pool",
    "split_train",
    "get_feature_net",
    "load_inception",
    "load_feature_net",
    "save_feature_net",
    "train_feature_net",
]

log = logging.getLogger(__name__)

FORMAT = "difflora-feature-net"
# 2: trained on half of the train split (``split_train``) and records ``kid_scale``.
FORMAT_VERSION = 2
# The feature network's half of the train split; the rest is the floor pool.
FEATURE_FRACTION = 0.5
# A seed of its own, so this split is independent of the train/test split of the data sources.
FEATURE_SPLIT_SEED = 20241


class FeatureNetMismatchError(ValueError):
    """A feature network was trained for another dataset, image size or channel count."""


@dataclass(frozen=True)
class FeatureNetConfig:
    """Architecture of the feature network.

    A 3x3 stem conv to ``widths[0]`` channels at full resolution, then one stage per further width:
    a strided 3x3 conv that halves the resolution (8 -> 4 -> 2 px for digits, 28 -> 14 -> 7 for
    MNIST) and a second 3x3 conv, each followed by GroupNorm and SiLU. (One conv, not two, at full
    resolution: that is where a conv costs most, and it cut the time per step by ~30%.) An adaptive average pool to
    ``pool_size`` x ``pool_size`` makes any input size work and keeps some layout (a global pool on
    8 px digits throws away where the strokes are); a linear layer then gives the ``feature_dim``
    penultimate features, and a last linear layer the class logits.
    """

    image_size: int
    in_channels: int
    num_classes: int
    widths: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 128
    pool_size: int = 2
    # 2 halves the resolution in the stem already: train_feature_net picks it from 16 px up, where
    # full-resolution convs cost most of the time (~4x slower per step at 28 px) for little accuracy.
    stem_stride: int = 1

    def __post_init__(self) -> None:
        # JSON gives lists; a tuple keeps the config hashable and comparable.
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.num_classes < 2:
            raise ValueError(f"a feature network needs a dataset with classes (num_classes={self.num_classes})")
        if not self.widths or min(self.widths) < 1 or min(self.feature_dim, self.pool_size, self.stem_stride) < 1:
            raise ValueError(f"invalid feature network architecture: {self}")


@dataclass(frozen=True)
class FeatureTrainConfig:
    """How the feature network is trained: AdamW at a constant learning rate, cross-entropy, seeded."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-2
    seed: int = 0
    # Stop after this many optimizer steps (0 = run all epochs). Bounds the one-time cost on big
    # datasets: digits' 5 epochs are 60 steps; Fashion-MNIST stops after ~1.3 epochs at ~87% test
    # accuracy, minutes on 2 CPU cores. Raise it (or set 0) where compute is cheap.
    max_steps: int = 600


@dataclass
class FeatureNetInfo:
    """What a saved feature network was trained on; stored as its JSON file."""

    arch: FeatureNetConfig
    dataset: str
    data_fingerprint: str
    test_accuracy: float
    train: FeatureTrainConfig = field(default_factory=FeatureTrainConfig)
    train_seconds: float = 0.0
    # KID's feature scale (difflora.eval.kernel.kid_feature_scale on the training images' features).
    kid_scale: float = 1.0

    def describe(self) -> str:
        a = self.arch
        return f"'{self.dataset}' at {a.image_size}x{a.image_size} px, {a.in_channels} channel(s)"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dataset": self.dataset,
            "image_size": self.arch.image_size,
            "in_channels": self.arch.in_channels,
            "num_classes": self.arch.num_classes,
            "test_accuracy": self.test_accuracy,
            "data_fingerprint": self.data_fingerprint,
            "arch": dataclasses.asdict(self.arch),
            "train": dataclasses.asdict(self.train),
            "train_seconds": self.train_seconds,
            "kid_scale": self.kid_scale,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FeatureNetInfo:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a difflora feature network (format={d.get('format')!r})")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"feature network format version {d.get('version')} (this difflora reads {FORMAT_VERSION})"
            )
        return cls(
            arch=FeatureNetConfig(**d["arch"]),
            dataset=d["dataset"],
            data_fingerprint=d["data_fingerprint"],
            test_accuracy=float(d["test_accuracy"]),
            train=FeatureTrainConfig(**d["train"]),
            train_seconds=float(d.get("train_seconds", 0.0)),
            kid_scale=float(d["kid_scale"]),
        )


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: features of a sample never depend on the rest of its batch.
    return nn.GroupNorm(min(8, channels), channels)


class FeatureNet(nn.Module):
    """CNN classifier whose penultimate layer is the feature space of difflora's quality metrics.

    Input: images [N x C x H x W] in [-1, 1] at the size it was built for.
    """

    def __init__(self, cfg: FeatureNetConfig, info: FeatureNetInfo | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.info = info
        # torchmetrics reads num_features from a custom feature extractor.
        self.num_features = cfg.feature_dim
        layers: list[nn.Module] = []
        c_in = cfg.in_channels
        for i, width in enumerate(cfg.widths):
            convs = [nn.Conv2d(c_in, width, 3, stride=cfg.stem_stride, padding=1)]
            if i > 0:
                convs = [nn.Conv2d(c_in, width, 3, stride=2, padding=1), nn.Conv2d(width, width, 3, padding=1)]
            for conv in convs:
                layers += [conv, _norm(width), nn.SiLU()]
            c_in = width
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(cfg.pool_size)
        self.proj = nn.Linear(c_in * cfg.pool_size**2, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def check_input(self, x: torch.Tensor) -> None:
        c, s = self.cfg.in_channels, self.cfg.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            what = self.info.describe() if self.info else f"{s}x{s} px, {c} channel(s)"
            raise FeatureNetMismatchError(
                f"feature network trained for {what} got images of shape {tuple(x.shape)}; "
                f"expected [N x {c} x {s} x {s}]"
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [N x D] of images [N x C x H x W] in [-1, 1]."""
        self.check_input(x)
        h = self.pool(self.body(x)).flatten(1)
        return F.silu(self.proj(h))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [N x num_classes]."""
        return self.head(self.features(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both in one pass: ([N x D], [N x num_classes])."""
        f = self.features(x)
        return f, self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


# ----------------------------------------------------------------------------- keys and fingerprints


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _eval_data_config(cfg: DataConfig) -> DataConfig:
    # limit and hflip shape a diffusion run's training, not the data being measured (module docstring).
    return cfg.model_copy(update={"limit": 0, "hflip": False})


def _resolved_root(root: str | None) -> str | None:
    return str(Path(root).expanduser().resolve()) if root else None


def data_fingerprint(cfg: DataConfig) -> str:
    """sha256 of what decides the evaluation data: dataset name, root directory, resolved image size,
    and, for a multi-dataset config (the union of its tasks' splits, with offset or shared labels),
    every task's dataset: a network trained on the union must never be cached as data.name's."""
    size, channels = cfg.resolved_shape()
    record: dict[str, Any] = {
        "name": cfg.name,
        "root": _resolved_root(cfg.root),
        "image_size": size,
        "channels": channels,
    }
    if cfg.tasks:  # absent otherwise, so single-dataset fingerprints (and cached networks) stay valid
        record["tasks"] = [{"name": t.name, "root": _resolved_root(t.root)} for t in cfg.tasks]
        record["task_labels"] = cfg.task_labels
    return _sha256_json(record)


def feature_net_key(
    cfg: DataConfig, widths: tuple[int, ...], feature_dim: int, pool_size: int, train: FeatureTrainConfig
) -> str:
    """Cache file stem, e.g. ``digits-8px-3f2a...``: readable prefix plus a hash of everything that decides the weights."""
    size, _ = cfg.resolved_shape()
    arch = {"widths": list(widths), "feature_dim": feature_dim, "pool_size": pool_size}
    # The format version too: a change of the architecture rules (e.g. when the stem strides) bumps it.
    key = {"data": data_fingerprint(cfg), "arch": arch, "train": dataclasses.asdict(train), "format": FORMAT_VERSION}
    h = _sha256_json(key)
    names = "+".join([cfg.name, *(t.name for t in cfg.tasks)])
    return f"{names}-{size or 'native'}px-{h[:16]}"


def default_cache_dir() -> Path:
    """``$DIFFLORA_CACHE/features`` if the variable is set, else ``~/.cache/difflora/features``."""
    return cache_root() / "features"


# ----------------------------------------------------------------------------- save / load


def _paths(path: str | Path) -> tuple[Path, Path]:
    """(weights.safetensors, info.json) for a stem or either file's path."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_feature_net(net: FeatureNet, path: str | Path) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` atomically; returns the weights path.

    The JSON records the weights file's sha256, so a JSON paired with other weights (a crash or a
    concurrent writer between the two renames) is detected at load time.
    """
    if net.info is None:
        raise ValueError("save_feature_net needs net.info (what the network was trained on)")
    w_path, j_path = _paths(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    w_path.parent.mkdir(parents=True, exist_ok=True)
    # shared: runs sharing the cache may train and save the same network at once.
    save_tensors(state, w_path, metadata={"format": FORMAT}, shared=True)
    meta = net.info.to_json() | {"weights_sha256": _file_sha256(w_path)}
    write_bytes(j_path, json.dumps(meta, indent=2) + "\n", shared=True)
    return w_path


def check_feature_net(net: FeatureNet, cfg: DataConfig, source: str | Path | None = None) -> None:
    """Raise FeatureNetMismatchError unless ``net`` was trained for ``cfg``'s dataset, size and channels."""
    if net.info is None:
        raise FeatureNetMismatchError("feature network has no record of its training data; cannot check it")
    size, channels = cfg.resolved_shape()
    a = net.info.arch
    if net.info.dataset != cfg.name or (size is not None and size != a.image_size) or channels != a.in_channels:
        where = f" ({source})" if source else ""
        want = f"'{cfg.name}' at {size or 'native'} px, {channels} channel(s)"
        raise FeatureNetMismatchError(
            f"feature network{where} was trained on {net.info.describe()}, but the images to evaluate are "
            f"{want}; use a feature network trained for {want} (get_feature_net trains and caches one)"
        )


def load_feature_net(
    path: str | Path, expect: DataConfig | None = None, map_location: str | torch.device = "cpu"
) -> FeatureNet:
    """Load a feature network saved by ``save_feature_net`` (stem or either file's path).

    With ``expect``, a network trained for another dataset, image size or channel count is a
    FeatureNetMismatchError naming both. The network is returned in eval mode without gradients.
    """
    w_path, j_path = _paths(path)
    for p in (w_path, j_path):
        if not p.is_file():
            raise FileNotFoundError(f"feature network file {p} does not exist")
    damaged = f"the feature network {j_path.with_suffix('')} is damaged; delete both of its files to retrain it"
    meta = read_json_file(j_path, fix=damaged, expect=dict)
    try:
        info = FeatureNetInfo.from_json(meta)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{j_path} is not a feature network's description ({exc}); {damaged}") from None
    if meta.get("weights_sha256") and meta["weights_sha256"] != _file_sha256(w_path):
        raise ValueError(f"{w_path} does not match {j_path} (sha256 differs): an interrupted write? delete both")
    net = FeatureNet(info.arch, info)
    try:
        tensors = load_file(str(w_path), device=str(map_location))
        check_finite(tensors, str(w_path), damaged)
        net.load_state_dict(tensors)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(
            f"{w_path} does not hold this feature network's weights ({str(exc).splitlines()[0]}); {damaged}"
        ) from None
    if expect is not None:
        check_feature_net(net, expect, source=w_path)
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- training


def split_train(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature network's indices, floor pool's indices) of a train split with labels [N]: halves per class."""

    own, pool = stratified_split(labels.cpu().numpy(), 1.0 - FEATURE_FRACTION, seed=FEATURE_SPLIT_SEED)
    return torch.from_numpy(own), torch.from_numpy(pool)


def floor_pool(data_cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [P x C x H x W] and labels [P] of the train images no feature network of ``data_cfg`` saw."""

    tr = load_dataset(_eval_data_config(data_cfg), "train")
    _, pool = split_train(tr.labels)
    return tr.images[pool], tr.labels[pool]


@torch.no_grad()
def _features(net: FeatureNet, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = next(net.parameters()).device
    return torch.cat(
        [net.features(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    )


@torch.no_grad()
def _accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    device = next(net.parameters()).device
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        logits = net.logits(images[i : i + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == labels[i : i + batch_size]).sum())
    return correct / max(1, images.shape[0])


def train_feature_net(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    *,
    dataset: str = "custom",
    fingerprint: str = "",
    train: FeatureTrainConfig | None = None,
    widths: tuple[int, ...] = (32, 64, 128),
    feature_dim: int = 128,
    pool_size: int = 2,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> FeatureNet:
    """Train a feature network on images [N x C x H x W] in [-1, 1] with int64 labels [N].

    Seeded (initialisation and batch order), AdamW, cross-entropy; reports the test accuracy in
    ``net.info.test_accuracy`` and in the log. Returns the network in eval mode without gradients.
    """
    tc = train or FeatureTrainConfig()
    n, c, h, w = train_images.shape
    if h != w:
        raise ValueError(f"feature networks expect square images, got {h}x{w}")
    arch = FeatureNetConfig(h, c, num_classes, tuple(widths), feature_dim, pool_size, stem_stride=2 if h >= 16 else 1)
    # fork_rng: seeding initialisation must not reset the caller's global random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)
        net = FeatureNet(arch).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    steps_per_epoch = -(-n // tc.batch_size)
    total = steps_per_epoch * tc.epochs
    if tc.max_steps:
        total = min(total, tc.max_steps)
    start = time.perf_counter()
    net.train()
    bar = tqdm(total=total, desc=f"feature net ({dataset})", disable=not progress, leave=False)
    step = 0
    while step < total:
        for idx in torch.randperm(n, generator=gen).split(tc.batch_size):
            if step >= total:
                break
            x = train_images[idx].to(device)
            y = train_labels[idx].to(device)
            loss = F.cross_entropy(net.logits(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    net.eval()
    acc = _accuracy(net, test_images, test_labels, batch_size=512)
    seconds = time.perf_counter() - start
    kid_scale = kid_feature_scale(_features(net, train_images, batch_size=512))
    net.info = FeatureNetInfo(arch, dataset, fingerprint, acc, tc, seconds, kid_scale)
    msg = f"feature network for {dataset}: test accuracy {acc:.4f} after {step} steps ({seconds:.1f} s)"
    log.info(msg)
    if progress:
        tqdm.write(msg)
    return net.requires_grad_(False)


def get_feature_net(
    data_cfg: DataConfig,
    cache_dir: str | Path | None = None,
    train_if_missing: bool = True,
    *,
    train: FeatureTrainConfig | None = None,
    widths: tuple[int, ...] = (32, 64, 128),
    feature_dim: int = 128,
    pool_size: int = 2,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> FeatureNet:
    """The feature network for ``data_cfg``'s dataset: from the cache, or trained and cached on first use.

    The cache file is ``<cache_dir>/<name>-<size>px-<hash>.{safetensors,json}``, the hash covering
    the data fingerprint, the architecture and the training settings (see ``feature_net_key``).
    The network trains on its half of the train split (``split_train``).
    Without a cached file and with ``train_if_missing=False`` this raises FileNotFoundError.
    """

    cfg = _eval_data_config(data_cfg)
    tc = train or FeatureTrainConfig()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    stem = cache / feature_net_key(cfg, tuple(widths), feature_dim, pool_size, tc)
    w_path, j_path = _paths(stem)
    if w_path.is_file() and j_path.is_file():
        try:
            net = load_feature_net(stem, expect=cfg, map_location=device)
            log.info("feature network for %s loaded from %s", cfg.name, w_path)
            return net
        except (ValueError, KeyError, TypeError, OSError) as exc:
            if not train_if_missing:
                raise
            log.warning("cached feature network %s is unreadable (%s); retraining", w_path, exc)
    elif not train_if_missing:
        raise FileNotFoundError(
            f"no cached feature network for '{cfg.name}' at {w_path}; call get_feature_net with train_if_missing=True"
        )
    tr = load_dataset(cfg, "train")
    te = load_dataset(cfg, "test")
    own, _ = split_train(tr.labels)
    net = train_feature_net(
        tr.images[own],
        tr.labels[own],
        te.images,
        te.labels,
        tr.num_classes,
        dataset=cfg.name,
        fingerprint=data_fingerprint(cfg),
        train=tc,
        widths=widths,
        feature_dim=feature_dim,
        pool_size=pool_size,
        device=device,
        progress=progress,
    )
    save_feature_net(net, stem)
    return net
