"""The standard FID feature space: Inception-v3 (the TF 2015-12-05 graph ported to PyTorch by
torch-fidelity, bit-compatible with the TF reference; the network torchmetrics' FID also
loads), as a feature extractor for :func:`cdp_fast.metrics.frechet.fid`.

Weights are never fetched behind the user's back (a machine without network would hang or
fail deep inside torch.hub): :func:`inception_weights` finds them as ``weights=PATH``, else
$CDP_FAST_FID_WEIGHTS, else the file torch-fidelity would have cached in the torch hub
(``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``), and otherwise
raises a one-line FileNotFoundError that says how to get them; ``weights="download"`` opts in
to the download. The file is checked with ``torch.load(weights_only=True)`` before
torch-fidelity reads it (it does not pass weights_only), so no arbitrary pickle is loaded.

Image convention: the extractor takes float32 (B, C, H, W) in [0, 1], C = 1 or 3, any size;
it quantises to uint8 with rounding (round(255·x): exact for images that came from uint8;
torchmetrics' ``normalize=True`` truncates instead), repeats grey to RGB (as EDM's fid.py),
and the network resizes to 299 × 299 with TF-1.x-compatible bilinear interpolation (as
torch-fidelity and EDM; not torchmetrics' default antialiased resize).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from cdp_fast.utils.checkpoint import read_weights_only

__all__ = ["inception_v3", "inception_weights", "InceptionV3Features", "WEIGHTS_ENV", "WEIGHTS_URL"]

WEIGHTS_ENV = "CDP_FAST_FID_WEIGHTS"
#: torch-fidelity's URL_INCEPTION_V3 (0.2.0 release asset); the file name is what torch.hub caches.
WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
_EXTRA = ("pip install 'cdp_fast[fid]' (torch-fidelity imports torchvision: install the torchvision "
          "built for your torch)")


def _hub_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_URL.rsplit("/", 1)[1]


def inception_weights(weights=None) -> Path:
    """The Inception-v3 weights file: ``weights`` (a path, or ``"download"`` to fetch it into
    the torch hub cache), else $CDP_FAST_FID_WEIGHTS, else torch.hub's cached copy.
    FileNotFoundError (one line, saying how) when none exists."""
    if weights == "download":
        dest = _hub_file()
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(WEIGHTS_URL, str(dest), progress=False)
        return dest
    given = weights if weights is not None else os.environ.get(WEIGHTS_ENV) or None
    if given is not None:
        p = Path(given).expanduser()
        if not p.is_file():
            src = "fid weights" if weights is not None else f"${WEIGHTS_ENV}"
            raise FileNotFoundError(f"{src}: {given} is not a file (expected the Inception-v3 weights "
                                    f"{WEIGHTS_URL.rsplit('/', 1)[1]})")
        return p
    if _hub_file().is_file():
        return _hub_file()
    raise FileNotFoundError(
        f"FID needs the Inception-v3 weights and none were found: download {WEIGHTS_URL} (on a machine with "
        f"network) and pass --fid-weights PATH (API: weights=PATH) or set ${WEIGHTS_ENV}; or pass --fid-weights "
        "download to fetch it into the torch hub cache")


class InceptionV3Features(torch.nn.Module):
    """float32 (B, C, H, W) in [0, 1] -> (pool3 features (B, 2048), unbiased logits (B, 1008)),
    both float32: torch-fidelity's ``inception-v3-compat`` network (module docstring)."""

    description = "Inception-v3 pool3 (2048), torch-fidelity's TF-compatible port"

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Inception-v3 takes (B, 1|3, H, W) images in [0, 1], got {tuple(x.shape)}")
        if x.is_floating_point():
            if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
                raise ValueError("Inception-v3 takes images in [0, 1]")
            x = (x * 255).round_().to(torch.uint8)
        elif x.dtype != torch.uint8:
            raise ValueError(f"Inception-v3 takes float [0, 1] or uint8 images, got {x.dtype}")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        feats, logits = self.net(x)
        return feats.float(), logits.float()


def inception_v3(weights=None, device=None) -> InceptionV3Features:
    """The Inception-v3 extractor (:class:`InceptionV3Features`) on ``device``, weights from
    :func:`inception_weights`. Raises FileNotFoundError (no weights) before ImportError (no
    torch-fidelity), so the missing file is named first."""
    path = inception_weights(weights)
    # torch-fidelity loads the file without weights_only: check it the package's one way first
    read_weights_only(path, "fid weights:", "a plain state dict of tensors (refusing to unpickle it)")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ImportError(f"FID with Inception-v3 needs torch-fidelity ({e}): {_EXTRA}") from None
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(path))
    return InceptionV3Features(net).to(device if device is not None else "cpu").eval()
