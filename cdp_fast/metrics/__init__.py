"""Is a set of generated (images, labels) better training data? Measurements to run *before*
spending GPU-days training on it (`cdp-fast inspect`; project issue 13).

Modules: :mod:`~cdp_fast.metrics.inputs` (the image convention), :mod:`~cdp_fast.metrics.features`
(feature spaces), :mod:`~cdp_fast.metrics.separation`, :mod:`~cdp_fast.metrics.neighbours`,
:mod:`~cdp_fast.metrics.classifiers` (the metrics), :mod:`~cdp_fast.metrics.report` and
:mod:`~cdp_fast.metrics.figure` (all of them together), :mod:`~cdp_fast.metrics.defaults`
(:data:`METRIC_DEFAULTS`).

Every function takes images as float NCHW tensors in [0, 1] (or anything
:func:`as_image_set` converts: a :class:`cdp_fast.Samples`, an npz path / out folder, uint8
NHWC arrays) and integer labels (N,). Everything is deterministic (fixed seeds, no sampling
unless seeded) and chunked: no N×N matrix is ever built beyond ``chunk`` rows.

Feature space. Class separation, precision/recall/density/coverage and the feature-space
memorisation distances are computed in a feature space that the guidance did *not* use: by
default the PCA of the real training images (:func:`fit_pca`, 20 components, fitted on the
real set only, unwhitened so that distances are pixel distances within the subspace), or a
user callable ``features(x01) -> (B, d)``. Using the guidance's own features would measure
what the guidance optimised, not whether the data got better.

==========================  =========================================================  =======
function                    what                                                       source
==========================  =========================================================  =======
:func:`class_separation`    Fisher ratio tr S_B / tr S_W; per-pair mean distance over   Fisher
                            the within-class std (the paper's ‖2μ‖/σ)                   1936; §3
:func:`effective_c`         the paper's c: synthetic over real separation              §3
:func:`prdc`                precision / recall, density / coverage on k-NN balls       [K19],[N20]
:func:`class_balance`       histogram, entropy (nats, / log K), largest / smallest     —
:func:`label_agreement`     stored labels vs an independent classifier's argmax        —
:func:`confidence_summary`  mean and quantiles of the stored confidences               —
:func:`linear_probe`        logistic regression on the synthetic set, real test acc.,   [A16]
                            robust acc. under L∞ PGD on the probe                      [M18]
:func:`memorisation`        NN distance to the training set, fraction closer than the  [W21]
                            real set's own 5th-percentile NN distance
:func:`paired`              same x_T, two samplers: label-flip rate, ‖Δx‖                —
:func:`report`              all of the above that apply, as a JSON-serialisable dict    —
:func:`fid`                 FID, KID, IS in Inception-v3 space (``[fid]`` extra;        [H17],
                            :mod:`~cdp_fast.metrics.frechet`), streamed statistics      [B18]
==========================  =========================================================  =======

[K19] Kynkäänniemi, Karras, Laine, Lehtinen, Aila, "Improved Precision and Recall Metric for
Assessing Generative Models", NeurIPS 2019. [N20] Naeem, Oh, Uh, Choi, Yoo, "Reliable Fidelity
and Diversity Metrics for Generative Models", ICML 2020 (reference code
``clovaai/generative-evaluation-prdc``, whose strict ``<`` and k-th-neighbour-excluding-self
radii are followed here). [H17], [B18]: see :mod:`cdp_fast.metrics.frechet`. [A16] Alain,
Bengio, "Understanding intermediate layers using linear classifier probes", 2016. [M18] Madry
et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018. [W21] the
nearest-neighbour memorisation check of generated images against the training set (e.g. Webster
et al., "This Person (Probably) Exists", 2021; Carlini et al., "Extracting Training Data from
Diffusion Models", 2023). §3: Section 3 of the paper (``contrastive-dp-iclr2023``): real x | y
~ N(yμ, σ²I), synthetic 0.5 N(μ̃, σ²I) + 0.5 N(−μ̃, σ²I) with μ̃ = cμ; "the bigger the c, the
smaller the error".
"""
from cdp_fast.metrics.classifiers import (class_balance, confidence_summary, fit_logistic_regression,
                                          label_agreement, linear_probe)
from cdp_fast.metrics.defaults import METRIC_DEFAULTS
from cdp_fast.metrics.features import PCAFeatures, extract_features, fit_pca
from cdp_fast.metrics.frechet import FeatureStats, feature_stats, fid, frechet_distance, kernel_distance
from cdp_fast.metrics.figure import figure
from cdp_fast.metrics.inputs import ImageSet, as_image_set
from cdp_fast.metrics.neighbours import knn_radii, memorisation, nn_distances, prdc
from cdp_fast.metrics.report import paired, report, table_rows
from cdp_fast.metrics.separation import class_separation, effective_c

__all__ = [
    "ImageSet", "as_image_set", "PCAFeatures", "fit_pca", "extract_features", "class_separation",
    "effective_c", "knn_radii", "prdc", "class_balance", "label_agreement", "confidence_summary",
    "fit_logistic_regression", "linear_probe", "nn_distances", "memorisation", "paired", "report",
    "table_rows", "figure", "METRIC_DEFAULTS", "FeatureStats", "feature_stats", "frechet_distance",
    "kernel_distance", "fid",
]
