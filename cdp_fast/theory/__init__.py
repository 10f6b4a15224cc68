"""Section 3 of the paper: the Gaussian model's closed forms and the self-training simulation
(:mod:`.gaussian`), and the exact-score two-Gaussian mixture used to show the guidance's
mechanism (:mod:`.mixture`); and the exact-score class-conditional PCA Gaussian mixture, a
diffusion model of real images that needs no training (:mod:`.pca_mixture`)."""
from cdp_fast.theory.gaussian import (Q, draw_holdout, err_robust, err_standard, hard_threshold, holdout_accuracy,
                                      holdout_sd, make_mu, robust_optimal_theta, self_training, simulate,
                                      synthetic_mean)
from cdp_fast.theory.pca_mixture import PCAMixtureEps, fit_pca_mixture

__all__ = ["Q", "err_standard", "err_robust", "hard_threshold", "robust_optimal_theta", "make_mu",
           "synthetic_mean", "self_training", "simulate", "draw_holdout", "holdout_accuracy", "holdout_sd",
           "PCAMixtureEps", "fit_pca_mixture"]
