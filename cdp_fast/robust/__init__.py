"""Adversarial training and evaluation: PGD and the TRADES inner maximisation, L∞ or L2
(:mod:`.attacks`), real/synthetic batches (:mod:`.batches`), the training recipes
(:mod:`.recipes`), checkpoints (:mod:`.checkpoint`), the training loop (:mod:`.train`,
:mod:`.loop`) and clean / PGD / AutoAttack evaluation (:mod:`.evaluation`; AutoAttack run attack
by attack, logged and resumable: :mod:`.autoattack`) and a run's held-out split and log
(:mod:`.monitor`)."""
from cdp_fast.robust.attacks import pgd_attack, pgd_step_l2, trades_attack
from cdp_fast.robust.evaluation import evaluate
from cdp_fast.robust.monitor import holdout_split
from cdp_fast.robust.recipes import RECIPES
from cdp_fast.robust.train import train_pgd_at, train_trades

__all__ = ["train_trades", "train_pgd_at", "evaluate", "pgd_attack", "trades_attack", "RECIPES",
           "pgd_step_l2", "holdout_split"]
