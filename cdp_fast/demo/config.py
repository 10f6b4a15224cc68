"""The settings of `cdp-fast demo` (:func:`cdp_fast.demo.run_demo`): the arms, attacks and λ grid,
the default budget (:data:`DEFAULTS`) and what ``full=True`` changes (:data:`FULL`), and the
stated leakage and budget notes that go into results.json."""
from __future__ import annotations

from cdp_fast.robust.evaluation import ATTACKS   # the demo evaluates with every attack evaluate() has

__all__ = ["ARMS", "LAMS", "QUICK_AA", "LEAKAGE", "BUDGET_NOTE", "DEFAULTS", "FULL"]

ARMS = ("real", "real+ddim", "real+cdp", "real+cdp-class", "syn-only")
LAMS = (5e3, 1e4, 2e4, 4e4)
#: AutoAttack of the demo: APGD-CE + APGD-T, the two attacks of standard AutoAttack that make
#: nearly all of its reductions (Croce & Hein 2020); ``full`` runs the standard four.
QUICK_AA = ("apgd-ce", "apgd-t")
LEAKAGE = ("The epsilon-model is the bundled one (cdp_fast.models.digits.load_digits_eps_model), trained on the "
           "WHOLE digits training split (1347 images), not on the k real images: every synthetic set carries "
           "information from training digits the real arms never see. The leakage is the same for every "
           "synthetic arm (ddim, cdp, cdp-class, syn-only), so their differences are fair; their differences to "
           "'real' are not a scarce-data result.")
#: How the budget was chosen (a pre-study on the real-only arm alone, before the arms were run;
#: test PGD-20 of the EMA model on the 450 test digits, same k = 10/class subset, small CNN width
#: 16, batch 64, lr 0.05, recipe gowal, eps 0.1, 5-step TRADES; 2-core CPU, 2026-11-30).
BUDGET_NOTE = ("Real-only did not robust-overfit within reach: in one 1500-update cosine run (seed 0) the test "
               "PGD-20 accuracy rose 0.57 (100 updates), 0.70 (200), 0.77 (400), 0.80 (600), 0.82 (800), peaked at "
               "0.824 (1200) and ended at 0.816 (1500; 4 of 450 test digits below the peak, within noise) while "
               "the training-set PGD accuracy reached 1.00 at 500 updates; final accuracy against the budget "
               "(seeds 0/1): 0.61/0.66 at 200 updates, 0.72/0.73 at 400, 0.77/0.79 at 800. The default budget, "
               "400 updates, is the longest that keeps the default run under 10 minutes on 2 cores (real-only at "
               "~90% of its plateau); --full trains 800. Chosen from the real-only curve only, never from which "
               "arm wins.")
#: the default run (``full=False``) and what ``full=True`` changes
DEFAULTS = {"k_per_class": 10, "seeds": 5, "n_synthetic": 512, "epochs": 8, "updates_per_epoch": 50,
            "batch_size": 64, "width": 16, "real_fraction": 0.3, "lr": 0.05, "pgd_steps": 5, "eps": 0.1,
            "attacks": ATTACKS, "aa_n": 150, "sweep_n": 256, "sweep_seed": 1000, "tau": 10.0, "sampling_steps": 50,
            "labeler_steps": 300, "guide_updates": 150, "curve_n": 200, "gaussian_seeds": 20}
FULL = {"seeds": 10, "n_synthetic": 2048, "epochs": 16, "pgd_steps": 10, "aa_n": 0, "gaussian_seeds": 50}
