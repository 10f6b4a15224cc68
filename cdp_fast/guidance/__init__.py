"""The paper's contribution: the contrastive losses of Algorithm 1 (:mod:`.losses`) and
:class:`ContrastiveGuidance`, the callable that turns them into the guidance term λ∇ℓ of a
sampling step (:mod:`.contrastive`)."""
from cdp_fast.guidance.contrastive import DEFAULTS, ContrastiveGuidance, MLPHead
from cdp_fast.guidance.losses import hnm_loss, infonce_loss

__all__ = ["ContrastiveGuidance", "MLPHead", "DEFAULTS", "hnm_loss", "infonce_loss"]
