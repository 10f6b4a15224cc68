"""Deprecated home of the robustness evaluation (now :mod:`cdp_fast.robustness`), kept so
``from cdp_fast.evaluate import autoattack_accuracy`` written against cdp_fast ≤ 0.1 still works.

The public name ``cdp_fast.evaluate`` is the *function*; importing this module binds the
package attribute to the module when it was not read before, so the module is callable and
calls :func:`cdp_fast.robustness.evaluate`: ``cdp_fast.evaluate(model, x, y)`` works either way.
"""
import sys
import types
import warnings

from .robustness import ATTACKS, autoattack_accuracy, evaluate, pgd_starts  # noqa: F401

warnings.warn("cdp_fast.evaluate (the module) is deprecated: import from cdp_fast.robustness; "
              "cdp_fast.evaluate(...) the function is unchanged", DeprecationWarning, stacklevel=2)

__all__ = ["evaluate", "autoattack_accuracy", "ATTACKS"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
