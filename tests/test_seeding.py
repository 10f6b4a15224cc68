"""Per-sample randomness (cdp_fast.utils.seeding): the counter-based on-device noise against a
Python transcription of splitmix64, its distribution, and its independence of the batch."""
import math

import numpy as np
import torch

from cdp_fast.utils import seeding


def _splitmix_py(z):
    mask = (1 << 64) - 1
    z &= mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & mask


def test_mix64_is_splitmix64():
    """The int64 tensor version (wrapping multiply, masked shifts) equals splitmix64 on
    unsigned 64-bit integers, negative int64 inputs (the upper half) included."""
    rng = np.random.default_rng(0)
    xs = [int(v) for v in rng.integers(-(1 << 63), (1 << 63) - 1, size=500, dtype=np.int64)]
    out = seeding._mix64(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert all((o & ((1 << 64) - 1)) == _splitmix_py(x) for o, x in zip(out, xs))


def test_counter_normal_is_standard_normal():
    """Mean 0, variance 1, tail mass P(|z| > 3) = 0.0027 and the normal CDF at a few points,
    within 5 standard errors of 256k draws."""
    z = seeding.counter_normal(seeding.sample_seeds(7, range(1000)), 0, (256,), torch.float64).flatten()
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    for q in (-1.5, 0.0, 0.7, 2.0):
        p = 0.5 * (1 + math.erf(q / math.sqrt(2)))
        assert abs(float((z <= q).double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_counter_normal_depends_on_key_draw_and_element_only():
    keys = seeding.sample_seeds(3, range(10))
    a = seeding.counter_normal(keys, 2, (3, 4))
    np.testing.assert_array_equal(seeding.counter_normal(keys[4:7], 2, (3, 4)), a[4:7])   # any batch
    assert not torch.equal(seeding.counter_normal(keys, 3, (3, 4)), a)                 # another draw
    b = seeding.counter_normal(keys, 2, (3, 4), torch.float64)
    torch.testing.assert_close(b.float(), a)                                          # dtype: a cast
    # consecutive draws and neighbouring samples are uncorrelated
    z = seeding.counter_normal(seeding.sample_seeds(0, range(4000)), 0, (2,), torch.float64)
    w = seeding.counter_normal(seeding.sample_seeds(0, range(4000)), 1, (2,), torch.float64)
    assert abs(float(torch.corrcoef(torch.stack([z.flatten(), w.flatten()]))[0, 1])) < 0.05
    assert abs(float(torch.corrcoef(torch.stack([z[:-1, 0], z[1:, 0]]))[0, 1])) < 0.05
