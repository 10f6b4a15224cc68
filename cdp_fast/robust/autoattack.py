"""AutoAttack (Croce & Hein 2020, the ``pyautoattack`` package) as the field runs it, driven one
attack at a time so that a long evaluation can be logged per attack and resumed after a kill.

Attack by attack. ``pyautoattack.AutoAttack.run_standard_evaluation`` computes the clean
predictions, then runs each attack of the version in turn on the points still robust (in
batches of ``batch_size``, in index order), every attack reseeding torch with ``seed``. Here
:func:`clean_flags` is that first pass and :func:`attack_flags` runs one attack of the version
(a fresh ``AutoAttack`` of that version, ``attacks_to_run = [name]``) on the points still
robust, in the same order and batches: the flags after the last attack are those of one
``run_standard_evaluation`` call (tested, ``tests/test_autoattack.py``).

Why not pyautoattack's own ``state_path``: in pyautoattack 0.2.0 it cannot resume. The state
file stores the attack set with ``json.dump(default=str)`` as the string "{'apgd-ce', ...}",
which never equals the set on reading, so every resume raises "The state was created with a
different set of attacks"; the finished attacks are saved at most once a minute; and a resumed
run never defines ``y_adv`` (UnboundLocalError). :func:`cdp_fast.evaluate` therefore keeps its
own state (:func:`load_block`, :func:`save_block`): one JSON file per block of points in the
``state_path`` folder, written atomically after each attack on the block, with the run's
configuration and sha256 digests of the block's data and of the model, so a resume with other
settings, data or weights is refused by name.

Norms: ``"linf"``, ``"l2"``, ``"l1"`` (pyautoattack's "Linf" / "L2" / "L1"); every attack of
pyautoattack 0.2.0 (APGD-CE/DLR/T, FAB(-T), Square) takes all three; for L1 its "standard"
version switches APGD to ``use_largereps`` with 5 restarts and 5 target classes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from cdp_fast.utils.checkpoint import state_digest
from cdp_fast.utils.io import atomic_write_json

__all__ = ["AA_NAMES", "AA_NORMS", "VERSIONS", "check_aa", "aa_order", "clean_flags", "attack_flags",
           "block_config", "load_block", "save_block", "model_digest"]

AA_NAMES = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
AA_NORMS = ("linf", "l2", "l1")
VERSIONS = ("standard", "plus", "rand", "custom")
_PYAA_NORM = {"linf": "Linf", "l2": "L2", "l1": "L1"}
_FORMAT = "cdp_fast.autoattack-state"


def check_aa(version, attacks) -> Optional[list]:
    """The custom attack list (None for the other versions); ValueError naming ``version`` or
    ``aa_attacks`` when they do not fit together."""
    if version not in VERSIONS:
        raise ValueError(f"version must be 'standard', 'custom', 'plus' or 'rand', got {version!r}")
    if version == "custom":
        if not attacks:
            raise ValueError("version='custom' needs aa_attacks, e.g. ('apgd-ce', 'apgd-t')")
        bad = [a for a in attacks if a not in AA_NAMES]
        if bad:
            raise ValueError(f"aa_attacks must be among {AA_NAMES}, got {bad}")
        if len(set(attacks)) != len(attacks):
            raise ValueError(f"aa_attacks names an attack twice: {list(attacks)}")
        return list(attacks)
    if attacks is not None:
        raise ValueError(f"aa_attacks is only used with version='custom' (got version={version!r})")
    return None


def _adversary(model, *, eps, norm, version, attacks, seed, device):
    try:
        from pyautoattack import AutoAttack
    except ImportError as e:  # pragma: no cover - a declared runtime dependency
        raise ImportError("AutoAttack needs the 'pyautoattack' package "
                          "(pip install pyautoattack)") from e
    adversary = AutoAttack(model, attacks=attacks, device=device, eps=float(eps),
                           norm=_PYAA_NORM[norm], seed=int(seed), version=version)
    adversary.verbose = False
    return adversary


def aa_order(*, norm: str, version: str, attacks: Optional[Sequence[str]]) -> list:
    """The attacks a version runs, in pyautoattack's order (e.g. standard: apgd-ce, apgd-t,
    fab-t, square)."""
    adv = _adversary(torch.nn.Identity(), eps=0.0, norm=norm, version=version,
                     attacks=attacks, seed=0, device="cpu")
    return list(adv.attacks_to_run)


@torch.no_grad()
def clean_flags(model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, device) -> torch.Tensor:
    """(N,) bool on the CPU: argmax model(x) == y in batches (AutoAttack's first pass)."""
    out = torch.zeros(len(x), dtype=torch.bool)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        out[i:i + len(xb)] = (model(xb).max(dim=1)[1] == yb).cpu()
    return out


def attack_flags(model, name: str, x: torch.Tensor, y: torch.Tensor, robust: torch.Tensor, *,
                 eps: float, norm: str, version: str, attacks, batch_size: int, seed: int,
                 device) -> torch.Tensor:
    """``robust`` (N,) bool after AutoAttack's attack ``name`` (of ``version``) on the points
    still robust; x (N, C, H, W) in [0, 1], y (N,) int64. RuntimeError if the attack returns a
    point outside the ε-ball of ``norm`` or outside [0, 1]."""
    idx = robust.nonzero().reshape(-1)
    if len(idx) == 0:
        return robust.clone()
    adversary = _adversary(model, eps=eps, norm=norm, version=version, attacks=attacks,
                           seed=seed, device=device)
    adversary.attacks_to_run = [name]
    xs, ys = x[idx], y[idx]
    x_adv, y_adv = adversary.run_standard_evaluation(xs, ys, batch_size=int(batch_size))
    d = (x_adv.detach().cpu().double() - xs.detach().cpu().double()).flatten(1)
    size = {"linf": d.abs().amax(1), "l2": d.norm(dim=1), "l1": d.abs().sum(1)}[norm].max()
    if float(size) > eps * (1 + 1e-5) + 1e-5 or float(x_adv.min()) < -1e-6 or float(x_adv.max()) > 1 + 1e-6:
        raise RuntimeError(f"AutoAttack {name} returned points outside the {norm} ε-ball "
                           f"({float(size):.6g} > {eps}) or outside [0, 1]")
    out = robust.clone()
    out[idx] = y_adv.cpu() == ys.cpu()
    return out


# --------------------------------------------------------------------------- resumable state
def model_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's state_dict (names, dtypes, shapes, bytes: :func:`cdp_fast.utils.checkpoint.state_digest`)."""
    return state_digest(model.state_dict())


def _pyaa_version() -> Optional[str]:
    """The installed pyautoattack's version (its attacks' defaults and order may change with it)."""
    from importlib import metadata

    try:
        return metadata.version("pyautoattack")
    except metadata.PackageNotFoundError:
        import pyautoattack

        return getattr(pyautoattack, "__version__", None)


def block_config(*, eps, norm, version, order, seed, batch_size, n_points, xb, yb, model_sha) -> dict:
    """What a block's saved state must match to be resumed — also the pyautoattack version, so a
    resume after an upgrade (whose attacks may differ) is refused rather than mixed."""
    return {"eps": float(eps), "norm": norm, "version": version, "attacks": list(order),
            "seed": int(seed), "batch_size": int(batch_size), "n_points": int(n_points),
            "data_sha256": state_digest((xb, yb)), "model_sha256": model_sha, "pyautoattack": _pyaa_version()}


def _block_path(folder: Path, first: int) -> Path:
    return Path(folder) / f"block-{first:09d}.json"


def load_block(folder, first: int, config: dict) -> Optional[dict]:
    """The saved state of the block starting at point ``first`` (as :func:`save_block` takes
    it), or None when none is saved; ValueError naming
    the file and the first differing setting when it was written for another run."""
    path = _block_path(folder, first)
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"state_path: {path} is not a readable AutoAttack state ({e}); delete it "
                         "to rerun that block") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"state_path: {path} is not a cdp_fast AutoAttack state file")
    old = state.get("config", {})
    for key, value in config.items():
        if old.get(key) != value:
            raise ValueError(f"state_path: {path} was written with {key}={old.get(key)!r}, this "
                             f"evaluation has {key}={value!r}; pass another state_path (or delete it)")
    return state


def save_block(folder, first: int, config: dict, state: dict) -> None:
    """A block's ``state`` ({"clean", "robust": [bool], "done": [names], "counts": {name:
    robust points after it}, "seconds": {name: s}}), atomically (temp + fsync + rename)."""
    atomic_write_json(_block_path(folder, first), {
        "format": _FORMAT, "version": 1, "config": config, "first": int(first),
        "clean": [bool(v) for v in state["clean"]], "robust": [bool(v) for v in state["robust"]],
        "done": list(state["done"]), "counts": dict(state["counts"]),
        "seconds": dict(state["seconds"])})
