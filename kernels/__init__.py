"""Triton kernels of cdp_fast, installed as the subpackage ``cdp_fast.kernels``
(pyproject [tool.setuptools.package-dir]; never a top-level ``kernels`` package).

  contrastive   fused similarity + HNM/InfoNCE statistics, forward and backward, O(N) memory
                (ops ``cdp_fast::contrastive_stats`` / ``contrastive_stats_backward``)
  ddim          fused DDIM update (op ``cdp_fast::ddim_update``)

Importing this package imports nothing heavy; the submodules import triton (and register the
torch.library ops). Which implementation runs is decided in :mod:`cdp_fast.backend` only.
"""
