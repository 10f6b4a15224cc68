"""The ops of cdp_fast, one folder per op, each holding the op's plain-PyTorch
reference (the paper's formula, line by line), its CPU path, its one ``torch.library``
registration and its one autograd glue:

  contrastive   per-row statistics of ℓ_HNM / InfoNCE (kernels/contrastive.py)
  ddim          the guided DDIM update (kernels/ddim.py)
  pgd_step      the fused L∞ PGD step (csrc/)

Each op has four homes with the same stem: ``kernels/<op>.py`` (Triton) or ``csrc/<op>*``
(C++/CUDA), ``cdp_fast/ops/<op>/``, ``tests/ops/test_<op>.py``, ``benchmarks/ops/<op>.py``.
:func:`cdp_fast.ops.backend.choose` decides which implementation is requested (it imports no
op); the ops execute it. Submodules are imported on use (``from cdp_fast.ops import ddim``).
"""
__all__ = []   # a namespace: the ops are its submodules
