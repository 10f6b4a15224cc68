"""Triton kernels of cdp_fast, installed as the subpackage ``cdp_fast.kernels``
(pyproject [tool.setuptools.package-dir]; never a top-level ``kernels`` package).

  contrastive   per-row log-sum-exp statistics of the contrastive losses, forward and backward,
                O((m + N)·d) memory (the op: :mod:`cdp_fast.ops.contrastive`)
  ddim          fused guided DDIM update (the op: :mod:`cdp_fast.ops.ddim`)

The kernels are leaves: they import torch and triton, nothing from cdp_fast. Their references,
registrations and autograd live in :mod:`cdp_fast.ops`; which implementation runs is decided
in :mod:`cdp_fast.ops.backend` only. Importing this package imports nothing heavy.
"""
