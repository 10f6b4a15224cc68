"""Argument checks shared by the public functions: a ValueError that names the argument."""
from __future__ import annotations

import math

import numpy as np

__all__ = ["check_number", "is_int", "looks_like_probabilities"]


def is_int(v) -> bool:
    """An int (Python or numpy), never a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_number(name, v, lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
    """ValueError naming ``name`` unless ``v`` is a finite number (an int if ``integer``;
    never a bool) within [lo, hi] (open ends with ``lo_open`` / ``hi_open``)."""
    ok_type = is_int(v) if integer else isinstance(v, (int, float, np.number))
    if isinstance(v, bool) or not ok_type or not math.isfinite(float(v)):
        kind = "an int" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind}, got {v!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v!r}")


def looks_like_probabilities(out, tol: float = 1e-2) -> bool:
    """Whether every row of a classifier's (B, K) output, K >= 2, is >= 0 and sums to 1 within
    ``tol`` (which a bf16 softmax meets): probabilities, not logits (logits practically never
    are). Used where a labeller's output is softmaxed, so that probabilities are not softmaxed
    twice (probe.md P1, P9)."""
    p = out.float()
    return out.shape[1] >= 2 and bool(((p >= 0).all() & ((p.sum(dim=1) - 1).abs() <= tol).all()))
