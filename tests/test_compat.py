"""Module paths of cdp_fast ≤ 0.1's layout keep importing (with a DeprecationWarning) and give
the same values as the new homes: code in other repos written against them keeps working."""
import importlib
import sys

import pytest
import torch

import cdp_fast


@pytest.fixture
def fresh(monkeypatch):
    """Import an old module path afresh; afterwards the package attribute and sys.modules entry
    are put back, so other tests in this process see ``cdp_fast.evaluate`` the function again
    (importing the submodule binds the package attribute to it: Python's import system does)."""
    def imp(name):
        parent, _, child = name.rpartition(".")
        monkeypatch.setattr(sys.modules[parent], child, getattr(sys.modules[parent], child, None), raising=False)
        monkeypatch.delitem(sys.modules, name, raising=False)
        with pytest.warns(DeprecationWarning, match=name.replace(".", r"\.")):
            return importlib.import_module(name)
    return imp


def test_old_chunked_module_gives_the_new_values_and_gradients(fresh):
    old = fresh("cdp_fast.chunked")
    from cdp_fast.losses import hnm_loss_ref, infonce_loss_ref
    from cdp_fast.ops.contrastive import chunked as new

    g = torch.Generator().manual_seed(3)
    a = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.randn(7, 5, generator=g, dtype=torch.float64)
    for got_fn, ref_fn, kw in ((old.hnm_loss_chunked, hnm_loss_ref, dict(tau=0.5, tau_plus=0.1, beta=1.0)),
                               (old.infonce_loss_chunked, infonce_loss_ref, dict(tau=0.5))):
        got = got_fn(a, p, **kw, chunk=3)
        ref = ref_fn(a, p, **kw)
        (g_got,) = torch.autograd.grad(got, a)
        (g_ref,) = torch.autograd.grad(ref, a)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)   # float64: rounding only
        torch.testing.assert_close(g_got, g_ref, rtol=1e-8, atol=1e-10)
    # the old positional signature (chunk 8th, no floor) still means what it meant
    args = (a.detach(), a.detach(), None, None, 2.0, 1.0, True)
    for x, y in zip(old.lse_stats_forward(*args, 3), new.lse_stats_forward(*args)):
        torch.testing.assert_close(x, y)


def test_old_evaluate_module_imports_and_the_public_function_stays_callable(fresh):
    old = fresh("cdp_fast.evaluate")
    from cdp_fast import robustness
    assert old.autoattack_accuracy is robustness.autoattack_accuracy
    assert old.evaluate is robustness.evaluate
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 0])
    # whichever object the package attribute is bound to now, calling it evaluates
    got = cdp_fast.evaluate(model, x, y, attacks=("clean",), progress=False)
    assert got == robustness.evaluate(model, x, y, attacks=("clean",), progress=False)


def test_old_ext_module_is_the_pgd_step_op(fresh):
    old = fresh("cdp_fast._ext")
    from cdp_fast.ops import pgd_step
    assert old.pgd_step is pgd_step.pgd_step and old.pgd_step_ref is pgd_step.pgd_step_ref
