"""Section 3 of the paper: the Gaussian model's closed forms and the self-training simulation
(:mod:`.gaussian`), and the exact-score two-Gaussian mixture used to show the guidance's
mechanism (:mod:`.mixture`)."""
from cdp_fast.theory.gaussian import (Q, draw_holdout, err_robust, err_standard, hard_threshold, holdout_accuracy,
                                      holdout_sd, make_mu, robust_optimal_theta, self_training, simulate,
                                      synthetic_mean)

__all__ = ["Q", "err_standard", "err_robust", "hard_threshold", "robust_optimal_theta", "make_mu",
           "synthetic_mean", "self_training", "simulate", "draw_holdout", "holdout_accuracy", "holdout_sd"]
