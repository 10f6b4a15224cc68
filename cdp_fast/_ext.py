"""Deprecated home of the PGD-step op (private, but imported by code written against
cdp_fast ≤ 0.1's layout): everything lives in :mod:`cdp_fast.ops.pgd_step`."""
import warnings

from .ops.pgd_step import (extension_available, load_extension, pgd_step,  # noqa: F401
                           pgd_step_ref, resolved_impl)

warnings.warn("cdp_fast._ext is deprecated: import from cdp_fast.ops.pgd_step",
              DeprecationWarning, stacklevel=2)

__all__ = ["pgd_step", "pgd_step_ref", "load_extension", "extension_available", "resolved_impl"]
