"""The paper's contribution: the contrastive losses of Algorithm 1 (:mod:`.losses`), their
options and paper defaults (:mod:`.options`), and :class:`ContrastiveGuidance`, the callable
that turns them into the guidance term λ∇ℓ of a sampling step (:mod:`.contrastive`)."""
from cdp_fast.guidance.contrastive import ContrastiveGuidance
from cdp_fast.guidance.losses import hnm_loss, infonce_loss
from cdp_fast.guidance.options import PAPER_DEFAULTS, MLPHead

__all__ = ["ContrastiveGuidance", "MLPHead", "PAPER_DEFAULTS", "hnm_loss", "infonce_loss"]
