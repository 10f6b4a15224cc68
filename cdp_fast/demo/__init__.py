"""`cdp-fast demo`: the paper's scarce-real-data claim (revised paper, MNIST Figure 3) tested in
miniature on scikit-learn's 8×8 digits, plus the §3 Gaussian mechanism end to end.

Digits (:func:`run_demo`; the pieces are in :mod:`cdp_fast.demo.digits`):

1. k real digits per class (default 10: 100 images) chosen once by a fixed seed from the
   training split; the rest of the split is unused by every arm. The ε-model is the bundled one
   (:func:`cdp_fast.models.digits.load_digits_eps_model`), trained on the *whole* training
   split: the synthetic sets carry information from all 1347 training digits (:data:`LEAKAGE`),
   equally for every synthetic arm;
2. on the k images only: a labeller (cross-entropy) and a TRADES-trained small CNN as the
   guidance features (robust, as the paper's WRN); the §1 metrics use neither (PCA of the k
   images, a pixel logistic regression);
3. λ is chosen once, before any training, on a sweep seed no arm uses, by
   :func:`cdp_fast.demo.digits.select_lambda` (largest independent Fisher ratio whose precision
   against the k images stays within 0.05 of DDIM's); the class-conditional arm gets its own λ
   by the same rule;
4. per seed s: DDIM, CDP (unconditional HNM, the library's = the authors' defaults) and
   CDP-class (negatives="class") sets from the same x_T (seed s), 50 uniform DDIM steps,
   batch 128; then :data:`ARMS` each TRADES-trained with seed s for the same number of updates
   (recipe "gowal"), evaluated on the test split (clean, PGD-20, optionally APGD-CE + APGD-T);
5. mean ± std per arm and the paired difference of every arm to ``real+ddim`` with a 95%
   Student-t interval (:mod:`cdp_fast.demo.stats`); the test curve of every run; the §1
   metrics of every set.

The Gaussian part is :func:`cdp_fast.demo.gaussian.gaussian_chain`. Every number is what the
run measures; nothing is tuned on robust accuracy.

The modules: :mod:`~cdp_fast.demo.config` (the arms, budgets and notes), :mod:`~cdp_fast.demo.runner`
(the stages, :class:`~cdp_fast.demo.runner.Run`), :mod:`~cdp_fast.demo.digits` and
:mod:`~cdp_fast.demo.gaussian` (the two experiments' pieces), :mod:`~cdp_fast.demo.stats` (paired
intervals), :mod:`~cdp_fast.demo.tables` (the printed tables), :mod:`~cdp_fast.demo.outputs`
(results.json, the plot, the grids) and :mod:`~cdp_fast.demo.preset` (the previous demo's sweep).
"""
from __future__ import annotations

from cdp_fast.demo.config import ARMS, BUDGET_NOTE, DEFAULTS, FULL, LAMS, LEAKAGE
from cdp_fast.demo.runner import Run
from cdp_fast.demo.tables import format_metrics_table, format_sweep_table, format_table

__all__ = ["run_demo", "format_table", "format_metrics_table", "format_sweep_table", "ARMS", "LAMS", "LEAKAGE",
           "DEFAULTS", "FULL", "BUDGET_NOTE"]


# ----------------------------------------------------------------------------- driver
def run_demo(*, out="cdp_demo", full: bool = False, seeds=None, k_per_class: int | None = None,
             n_synthetic: int | None = None, epochs: int | None = None, updates_per_epoch: int | None = None,
             eps: float | None = None, real_fraction: float | None = None, batch_size: int | None = None,
             width: int | None = None, pgd_steps: int | None = None, attacks=None, test_n: int | None = None,
             aa_n: int | None = None,
             sampling_steps: int | None = None, arms=ARMS, lams=LAMS, sweep_n: int | None = None,
             metrics: bool = True, digits: bool = True, gaussian: bool = True, gaussian_seeds: int | None = None,
             labeler_steps: int | None = None, guide_updates: int | None = None, device=None,
             progress: bool = True, callback=None) -> dict:
    """Run the scarce-data comparison (module docstring) and, with ``gaussian``, the Gaussian chain.

    Args (None = :data:`DEFAULTS`, or :data:`FULL` with ``full=True``):
        out: output folder (results.json, results.png, grid_*.png, synthetic_*.npz); None: nothing.
        seeds: list of paired seeds (default 0..4; ``full`` 0..9); seed s generates the synthetic
            sets and trains every arm. k_per_class: real digits per class.
        n_synthetic: images per synthetic set (a multiple of 128 keeps every contrastive batch full).
        epochs, updates_per_epoch: the fixed budget = epochs × updates_per_epoch updates for every
            arm; the test curve is measured at every epoch end.
        eps: L∞ radius on [0, 1] pixels. real_fraction: real share of a mixed batch.
        batch_size: TRADES batch. width: the arms' small CNN width. pgd_steps: TRADES inner
            steps (step 2.5·eps/steps).
        attacks: subset of :data:`cdp_fast.robust.evaluation.ATTACKS`. test_n: first N test digits (default all 450).
        aa_n: AutoAttack on the first ``aa_n`` of them only (default 150: APGD-CE + APGD-T on all
            450 costs ~9 s a model on 2 cores, 25 models do not fit 10 minutes; 0 = all; ``full``: all,
            standard AutoAttack).
        sampling_steps: DDIM steps. arms: subset of :data:`ARMS` (real+ddim is always trained).
        lams: the λ grid of the rule. sweep_n: sweep samples per λ (at most ``n_synthetic``).
        metrics: the §1 report of every set. digits: run the digits experiment; gaussian: run the
            Gaussian chain (:func:`cdp_fast.demo.gaussian.gaussian_settings`, ``gaussian_seeds``).
        labeler_steps, guide_updates: budgets of the labeller and of the guidance network.
        device: torch device (default CPU). progress: sampler bars. callback: called with
            {"stage", ...} dicts as stages finish.
    Returns:
        the JSON-ready dict written to results.json ("table", "metrics_table", "gaussian_table"
        are the printed text).
    """
    if not digits and not gaussian:
        raise ValueError("nothing to run: digits and gaussian are both off")
    opts = dict(out=out, full=full, seeds=seeds, k_per_class=k_per_class, n_synthetic=n_synthetic, epochs=epochs,
                updates_per_epoch=updates_per_epoch, eps=eps, real_fraction=real_fraction, batch_size=batch_size,
                width=width, pgd_steps=pgd_steps, attacks=attacks, test_n=test_n, aa_n=aa_n,
                sampling_steps=sampling_steps,
                arms=arms, lams=lams, sweep_n=sweep_n, metrics=metrics, gaussian=gaussian,
                gaussian_seeds=gaussian_seeds, labeler_steps=labeler_steps, guide_updates=guide_updates,
                device=device, progress=progress, callback=callback)
    run = Run(opts)
    return run.execute() if digits else run.execute_gaussian_only()
