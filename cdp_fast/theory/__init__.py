"""Section 3 of the paper: the Gaussian model's closed forms and the self-training simulation
(:mod:`.gaussian`), and the exact-score two-Gaussian mixture used to show the guidance's
mechanism (:mod:`.mixture`)."""
from cdp_fast.theory.gaussian import *  # noqa: F401,F403  (the closed forms, listed in its __all__)
from cdp_fast.theory.gaussian import __all__  # noqa: F401
