"""Pseudo-labels for generated images and the selection of the best of them, by a classifier
on float NCHW images in [0, 1]:

- :mod:`~cdp_fast.label.pseudo`: :func:`pseudo_label` (label, max softmax, entropy) and
  :func:`pseudo_label_to_npz` (the same, written to an npz as it goes: memory flat in N);
- :mod:`~cdp_fast.label.selection`: :func:`select` / :func:`scores`, the paper's criteria
  (App. D.3) and DM-Improves-AT's ("label_probability" with ``top_fraction``), per class;
- :mod:`~cdp_fast.label.gradnorm`: per-sample gradient norms (:func:`per_sample_grad_norm`)
  and the seeded TRADES attack start of "robust_grad_norm" (:func:`attack_generator`).
"""
from cdp_fast.label.gradnorm import attack_generator, per_sample_grad_norm
from cdp_fast.label.pseudo import pseudo_label, pseudo_label_to_npz
from cdp_fast.label.selection import CRITERIA, scores, select

__all__ = ["pseudo_label", "pseudo_label_to_npz", "select", "scores", "per_sample_grad_norm",
           "attack_generator", "CRITERIA"]
