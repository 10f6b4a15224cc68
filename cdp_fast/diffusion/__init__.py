"""Generic diffusion machinery, pure: noise schedules and timestep sequences
(:mod:`.schedule`), adapters that make foreign models ε-models or σ-denoisers
(:mod:`.adapters`; v- and x̂_0-predicting networks included), the sampling loops with
guidance as an argument (:mod:`.solvers`), and training an ε-model (:mod:`.train`:
:func:`train_diffusion`, with its inputs :mod:`.inputs` and per-sample augmentation
:mod:`.augment`)."""
from cdp_fast.diffusion.adapters import EpsFromPrediction, EpsModel, SigmaDenoiser
from cdp_fast.diffusion.schedule import karras_sigmas, make_alphas_cumprod, timesteps
from cdp_fast.diffusion.solvers import SOLVERS, guided_ddim, guided_ddpm, guided_dpmpp_2m, guided_heun
from cdp_fast.diffusion.train import train_diffusion

__all__ = ["EpsModel", "SigmaDenoiser", "EpsFromPrediction", "timesteps",
           "make_alphas_cumprod", "karras_sigmas", "SOLVERS", "guided_ddim", "guided_ddpm",
           "guided_dpmpp_2m", "guided_heun", "train_diffusion"]
