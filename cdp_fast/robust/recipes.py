"""The training recipes of :func:`cdp_fast.train_trades` / :func:`cdp_fast.train_pgd_at`, with
their sources: the two recipes (:data:`RECIPES`), the objectives (:func:`trades_loss`,
:func:`pgd_at_loss`), the schedules (:func:`cosine_lr`, :func:`ema_decay`), the optimizer
(:func:`make_optimizer`) and a run's validated configuration (:class:`RunConfig`).

The paper's setting (App. D, "Adversarial Training": "we follow the same setting as Gowal et
al. (2021)"), with the facts of the public trainers cited by file (the Contrastive-DP authors'
``adversarial_robustness_pytorch-main/`` is a fork of ``imrahulr/adversarial_robustness_pytorch``;
its README trains with ``train-wa.py`` — missing from their snapshot, present upstream — whose
``WATrainer`` is ``gowal21uncovering/utils/watrain.py``):

- every batch mixes real and synthetic images at a fixed ratio: ``real_fraction`` = 0.3 of the
  batch is real (``--unsup-fraction 0.7``, ``core/data/semisup.py``); an "epoch" is
  ``ceil(len(real) / batch_size)`` updates whatever the synthetic set size (their epoch length
  is derived from the real set size the same way);
- TRADES (Zhang et al. 2019, eq. (5)), β = 6 by default:

      L = CE(f(x), y) + β · (1/B) Σ_i KL(p(x_i) ‖ p(x'_i)),   p = softmax ∘ f,

  where x' comes from :func:`cdp_fast.robust.attacks.trades_attack` (10 L∞ PGD steps on the same KL).
  In code that is ``F.kl_div(log_softmax(f(x')), softmax(f(x)), reduction="batchmean")``: the
  natural distribution is the *target* of ``kl_div``, so gradients flow through both f(x) and
  f(x'); the clean forward and the adversarial forward both run in train mode, one after the
  other, each updating the BatchNorm running statistics;
- ``norm="l2"``: the same objectives with the inner attack in the L2 ball
  (:func:`cdp_fast.robust.attacks.pgd_step_l2`); TRADES' L2 attack starts from x + 0.001·N(0, I)
  in *both* recipes (``core/utils/trades.py`` ``attack='l2-pgd'`` and Zhang's ``distance='l_2'``
  do so; the mode stays the recipe's); PGD-AT's start is uniform in the L2 ball;
- PGD-AT (Madry et al. 2018): L = CE(f(x'), y) with x' from
  :func:`cdp_fast.robust.attacks.pgd_attack` (uniform random start, model in eval mode for the
  attack, as ``core/utils/train.py``'s ``Trainer.adversarial_loss``);
- SGD with Nesterov momentum 0.9, weight decay 5e-4 on every parameter except those of the
  normalisation layers (``watrain.py``'s ``group_weight``), cosine learning-rate schedule per
  update (optionally after a linear warm-up);
- an EMA of the weights ("stochastic weight averaging with decay 0.995", App. D);
- augmentation on tensors: random crop after zero padding and horizontal flips, by default
  fitted to the input (:func:`cdp_fast.robust.batches.augment_defaults`: padding ``min(H, W)/8``
  rounded, at least 1 — 4 at 32×32 as ``RandomCrop(32, padding=4)`` in
  ``core/data/cifar10s.py``, 1 at 8×8 — and flips only for 3-channel images);
- on CUDA: bf16 autocast and ``torch.compile`` (``amp="auto"``, ``compile="auto"``); on CPU
  fp32 eager unless asked.

Two recipes (``recipe=``) differ in five places; everything else above is common:

=====================  ====================================  ==================================
                       ``"gowal"`` (default, the paper's)    ``"zhang"`` (before recipes)
=====================  ====================================  ==================================
TRADES attack start    clip(x + U(−ε, ε), 0, 1)              x + 0.001·N(0, I)
                       (``gowal21uncovering/utils/           (``yaodongyu/TRADES`` ``trades.py``;
                       trades.py`` L33–34)                   the authors' ``core/utils/trades.py``
                                                             L30)
TRADES attack mode     train mode, BatchNorm on batch        eval mode (running statistics)
                       statistics, running statistics        (``trades.py``; ``core/utils/
                       frozen; p(x) in that mode too         trades.py`` L27)
                       (``gowal21uncovering/utils/
                       trades.py`` L29–35, ``track_bn_stats``
                       in ``core/utils/utils.py``)
label smoothing        0.1 on the clean CE of TRADES         0
(``label_smoothing=    (``gowal21uncovering/utils/trades.py``
None``)                L22, L27); 0 for PGD-AT (``core/
                       utils/train.py``: plain
                       ``nn.CrossEntropyLoss``)
EMA decay after        0 (an exact copy) while k < 2.5 % of  min(ema, (1 + k)/(10 + k)) from
update k               the run's updates, then min(ema,      the first update
                       (1 + δ)/(10 + δ)), δ = k − warm-up
                       (``watrain.py`` ``ema_update``,
                       ``warmup_steps = 0.025 · epochs ·
                       update_steps``)
EMA's BatchNorm        the model's, copied at the end of     averaged like the weights
statistics             every epoch; only parameters are      (integer buffers copied after
                       averaged (``watrain.py``              every update)
                       ``update_bn``, which aliases the
                       buffers: equal at every epoch end)
=====================  ====================================  ==================================

``recipe`` sets these five; the only one an argument overrides is the label smoothing
(``label_smoothing=None``: the recipe's; a number: that). PGD-AT's attack (uniform start, eval
mode) is the same in both recipes, so for :func:`cdp_fast.train_pgd_at` the recipes differ in the EMA
only (and in the label smoothing when passed explicitly). Not reproduced by either recipe:
``watrain.py``'s BatchNorm momentum 1.0 on the first update (then 0.01) and its one-cycle
learning-rate schedule stepped per epoch (``core/utils/train.py``); the model's own BatchNorm
momentum is used, and the cosine schedule above. ``"zhang"`` is this library's behaviour before
``recipe`` existed, bit for bit (its default call then used pad 4 and flips; pass them to
reproduce an old default run).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Recipe", "RECIPES", "LEGACY_RECIPE", "trades_loss", "pgd_at_loss", "ema_decay", "cosine_lr",
           "RunConfig", "make_optimizer"]


# --------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    """What a ``recipe=`` name sets (the module docstring documents the sources).

    trades_start: the TRADES attack's start, "uniform" (clip(x + U(−ε, ε), 0, 1)) or "normal"
        (x + 0.001·N(0, I)); PGD-AT starts uniformly in both recipes.
    trades_mode: the model's mode during the TRADES attack, "train" (batch statistics, running
        statistics frozen) or "eval"; PGD-AT attacks in eval mode in both recipes.
    label_smoothing: the default ``label_smoothing`` per objective ("trades": on the clean CE,
        "pgd_at": on the adversarial CE) when the caller passes None.
    ema_warmup: fraction of the run's updates during which the EMA is an exact copy of the
        model; the decay ramp (1 + δ)/(10 + δ) starts after it (δ = updates − warm-up).
    ema_buffers: "copy" (the model's buffers — BatchNorm statistics — copied into the EMA model
        at the end of every epoch; only parameters are averaged) or "average" (buffers averaged
        like the parameters, integer buffers copied after every update).
    """
    trades_start: str
    trades_mode: str
    label_smoothing: dict
    ema_warmup: float
    ema_buffers: str


RECIPES = {
    "gowal": Recipe(trades_start="uniform", trades_mode="train",
                    label_smoothing={"trades": 0.1, "pgd_at": 0.0}, ema_warmup=0.025,
                    ema_buffers="copy"),
    "zhang": Recipe(trades_start="normal", trades_mode="eval",
                    label_smoothing={"trades": 0.0, "pgd_at": 0.0}, ema_warmup=0.0,
                    ema_buffers="average"),
}
# Checkpoints written before ``recipe`` existed were trained with today's "zhang" behaviour.
LEGACY_RECIPE = "zhang"


# --------------------------------------------------------------------------- objectives
def trades_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, *,
                beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """TRADES objective (Zhang et al. 2019, eq. (5); public ``trades.py``):
    ``CE(f(x), y) + β · KL(p(x) ‖ p(x'))`` averaged over the batch (KL "batchmean").

    Shapes: logits (B, K), y (B,) int64 -> scalar. Computed in fp32.
    """
    logits_nat = logits_nat.float()
    logits_adv = logits_adv.float()
    natural = F.cross_entropy(logits_nat, y, label_smoothing=label_smoothing)
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1),
                      reduction="batchmean")
    return natural + beta * robust


def pgd_at_loss(logits_adv: torch.Tensor, y: torch.Tensor, *,
                label_smoothing: float = 0.0) -> torch.Tensor:
    """Madry et al. (2018) adversarial training objective: CE(f(x'), y), batch mean."""
    return F.cross_entropy(logits_adv.float(), y, label_smoothing=label_smoothing)


# --------------------------------------------------------------------------- schedules
def ema_decay(ema: float, k: int, warmup: float = 0.0) -> float:
    """EMA decay after the k-th update (k >= 1): 0 (the EMA becomes a copy of the model) while
    k < ``warmup``, then min(ema, (1 + δ) / (10 + δ)) with δ = k − warmup
    (``gowal21uncovering/utils/watrain.py``: ``ema_update(..., warmup_steps,
    dynamic_decay=True)``, warmup_steps = 0.025 · the run's updates). With warmup = 0 this is
    min(ema, (1 + k) / (10 + k)) from the first update (the "zhang" recipe)."""
    if k < warmup:
        return 0.0
    delta = k - warmup
    return min(float(ema), (1.0 + delta) / (10.0 + delta))


def cosine_lr(lr: float, step: int, total: int, warmup: int = 0) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up over ``warmup`` updates, then
    ``lr · ½(1 + cos(π · (step − warmup) / (total − warmup)))``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


# --------------------------------------------------------------------------- setup
@dataclass(frozen=True)
class RunConfig:
    """A run's arguments after validation (the integer ones as ints; :mod:`cdp_fast.robust.train`
    validates them): its configuration, read by every part of the run (the optimizer here,
    :mod:`cdp_fast.robust.checkpoint`, :mod:`cdp_fast.robust.loop`)."""
    kind: str
    real_fraction: float
    epochs: int
    eps: float
    step_size: float
    steps: int
    beta: float
    batch_size: int
    ema: Optional[float]
    progress: bool
    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool
    label_smoothing: float
    augment: bool
    pad: int
    flip: bool
    steps_per_epoch: Optional[int]
    warmup_epochs: int
    seed: int
    amp: Any
    compile: Any
    sync_bn: bool
    recipe: str = "gowal"
    norm: str = "linf"        # the inner attack's threat model: "linf" or "l2"


def make_optimizer(model: nn.Module, run: RunConfig) -> torch.optim.SGD:
    """SGD, weight decay on every parameter except the normalisation layers' (DM-Improves-AT's
    ``group_weight``)."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                  nn.modules.instancenorm._InstanceNorm)
    no_decay = set()
    for m in model.modules():
        if isinstance(m, norm_types):
            no_decay.update(id(p) for p in m.parameters(recurse=False))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": run.weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=run.lr, momentum=run.momentum, nesterov=bool(run.nesterov))

