"""Robustness evaluation: clean, PGD and AutoAttack accuracy of a classifier on images in
[0, 1] (:func:`evaluate`, public as ``cdp_fast.evaluate``).

Threat model: ``norm`` "linf" (default), "l2" or "l1" (AutoAttack only: no PGD-L1 here), radius
``eps`` (the field's CIFAR-10 settings: L∞ 8/255, L2 128/255 as DM-Improves-AT / RobustBench).

- clean: argmax accuracy, model in eval mode;
- pgd: PGD-k (L∞ or L2) with random start on the cross-entropy (Madry et al. 2018), k = ``pgd_steps``
  (20 by default), α = ``pgd_step_size`` (ε/4 by default), one restart, through
  :func:`cdp_fast.robust.attacks.pgd_attack` (same formula); the random start of point i is drawn
  from (seed, i) alone (:func:`pgd_starts`), so the result does not depend on the batching or
  on the number of processes;
- autoattack: Croce & Hein (2020) through ``pyautoattack`` (the maintained packaging of the
  reference code, import name ``pyautoattack``; keyword-only constructor
  ``AutoAttack(model, *, attacks, device, eps, norm, seed, version)``;
  ``run_standard_evaluation(x, y, *, batch_size)`` returns ``(x_adv, y_adv)``, where
  ``y_adv`` are the model's predictions on ``x_adv``). ``version="standard"`` runs
  APGD-CE, APGD-T (9 targets), FAB-T (9 targets) and Square (5000 queries), the numbers the
  paper reports (Table 2, "AUTOATTACK"); ``version="custom"`` runs ``aa_attacks`` only
  (e.g. ``("apgd-ce", "apgd-t")``, much faster on CPU); "plus" and "rand" as pyautoattack
  defines them. The reported accuracy is mean(y_adv == y) and x_adv is checked to lie in the
  ε-ball and in [0, 1]. The attacks run one at a time over all of this process's blocks
  (:mod:`cdp_fast.robust.autoattack`, the same flags as one pyautoattack call per block), so
  ``aa_log=True`` returns the robust accuracy after each attack and ``state_path`` (a folder)
  makes a killed evaluation resume where it stopped, at the same numbers.

AutoAttack "standard" is slow on CPU. Measured on the development machine (1 thread, load
average ~5 from other jobs), TRADES-trained small CNN on 8x8 digits, ε = 0.1, 200 points:
standard 108 s (robust accuracy 0.86), custom ("apgd-ce", "apgd-t") 25 s (0.86), PGD-20 0.5 s
(0.87). ``n_ex`` evaluates the first ``n_ex`` points only (every attack, so the numbers stay
comparable).

Blocks and torch.distributed. The points are cut into blocks of ``batch_size`` (block b holds
points [b·batch_size, (b + 1)·batch_size)); AutoAttack runs on each block separately (every
point still faces every attack of the version; a point counts as robust when all fail). Under
an initialised process group with world size N > 1 (``torchrun``; :func:`evaluate` joins it
through :func:`cdp_fast.utils.distributed.maybe_init` unless ``distributed=False``), rank r takes
blocks b ≡ r (mod N), counts its correct points per attack and the counts are all-reduced:
every rank returns the same dict, equal to the single-process result (each block is computed
exactly as in one process). Every rank must call :func:`evaluate` with the same arguments.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from cdp_fast.robust.attacks import check_norm, pgd_from_draws
from cdp_fast.robust import autoattack as aa
from cdp_fast.data.sources import check_unit_range, open_images
from cdp_fast.models.ranges import UNIT_RANGE, check_range_contract
from cdp_fast.utils.runtime import eval_mode, model_device, rank_device

__all__ = ["evaluate", "autoattack_accuracy", "pgd_starts", "ATTACKS"]

ATTACKS = ("clean", "pgd", "autoattack")


def autoattack_accuracy(model, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                        version: str = "standard", attacks: Optional[Sequence[str]] = None,
                        batch_size: int = 256, seed: int = 0, device=None,
                        norm: str = "linf") -> float:
    """Robust accuracy under AutoAttack (``norm`` "linf", "l2" or "l1"); x (N, C, H, W) in
    [0, 1], y (N,) int64; the same flags as one ``run_standard_evaluation(x, y,
    batch_size=batch_size)`` of pyautoattack.

    The model must be in eval mode (``evaluate`` does that). Raises ImportError naming the
    package when ``pyautoattack`` is missing.
    """
    norm = check_norm(norm, aa.AA_NORMS)
    attacks = aa.check_aa(version, attacks)
    dev = torch.device(device) if device is not None else x.device
    robust = aa.clean_flags(model, x, y, batch_size=batch_size, device=dev)
    for name in aa.aa_order(norm=norm, version=version, attacks=attacks):
        robust = aa.attack_flags(model, name, x, y, robust, eps=eps, norm=norm, version=version,
                                 attacks=attacks, batch_size=batch_size, seed=seed, device=dev)
    return int(robust.sum()) / len(x)


def pgd_starts(x: torch.Tensor, first: int, seed: int) -> torch.Tensor:
    """Uniform draws u (B, C, H, W) in [0, 1) of :func:`evaluate`'s PGD random start for the
    points ``first, first + 1, ...`` of x (B, C, H, W): row j from the seed (seed, 7, first + j)
    alone, so the randomness is per point, independent of batching and sharding."""
    out = torch.empty(x.shape, dtype=torch.float32)
    for j in range(len(x)):
        g = torch.Generator().manual_seed(
            int(np.random.SeedSequence([int(seed), 7, first + j]).generate_state(1)[0]))
        out[j] = torch.rand(x.shape[1:], generator=g)
    return out.to(x.dtype)


def evaluate(model: nn.Module, x, y, *, eps: float = 8 / 255,
             attacks: Iterable[str] = ATTACKS, pgd_steps: int = 20,
             pgd_step_size: Optional[float] = None, batch_size: int = 256, seed: int = 0,
             progress: bool = False, version: str = "standard",
             aa_attacks: Optional[Sequence[str]] = None, n_ex: Optional[int] = None,
             device=None, distributed: bool = True, per_example: bool = False,
             norm: str = "linf", state_path=None, aa_log: bool = False) -> dict:
    """Accuracy of ``model`` under the requested attacks (radius ``eps`` in ``norm``).

    Args:
        model: classifier, (B, C, H, W) in [0, 1] -> logits (B, K). Evaluated in eval mode;
            its previous train/eval modes are restored. A network that declares another
            input range (``cdp_fast.models.as_labeler`` / ``as_feature_extractor`` adapters,
            which take the sampler's [-1, 1]) is refused (:mod:`cdp_fast.models.ranges`).
        x: (N, C, H, W) float in [0, 1] (tensor or array), or uint8 NHWC (any form
            :func:`cdp_fast.data.open_images` reads).
        y: (N,) integer labels.
        eps: radius (L∞ 8/255, L2 128/255 for CIFAR-10).
        attacks: any of "clean", "pgd", "autoattack".
        pgd_steps, pgd_step_size: PGD-k and its step (default ε/4, in either norm).
        batch_size: evaluation batch size (and AutoAttack's block size).
        seed: PGD random starts and AutoAttack's seed.
        progress: tqdm bar (rank 0 only) with one step per attack and block of points, the
            attack under way in its description (an AutoAttack block can take minutes on CPU).
        version: AutoAttack version, "standard" (the reported numbers), "plus", "rand" or
            "custom" with ``aa_attacks`` (e.g. ("apgd-ce", "apgd-t")).
        n_ex: evaluate only the first n_ex points (every attack, so results are comparable).
        device: defaults to the model's device (under torchrun with CUDA: cuda:LOCAL_RANK;
            the model is then moved there).
        distributed: under torch.distributed (world size > 1) split the blocks of points
            over the ranks and all-reduce the counts (every rank must call); False
            evaluates every point in this process.
        per_example: also return ``"per_example"``: {attack: (N,) bool numpy array, True where
            point i is classified correctly under that attack} (for paired per-point
            comparisons of two classifiers; gathered over the ranks).
        norm: "linf" (default), "l2" or "l1" (L1: AutoAttack only, pyautoattack's APGD-L1).
        state_path: a folder (created if missing) for AutoAttack's resumable state: one JSON
            file per block, written atomically after each attack on it, and ``log.json`` (the
            per-attack log). A call with the same arguments resumes from it, skipping the
            attacks already run, and returns the numbers of an uninterrupted run; a state
            written for other settings, data or weights is refused (ValueError).
        aa_log: also return ``"autoattack_log"``: [{"attack": "clean" | name,
            "robust_accuracy": float, "seconds": float}, ...], AutoAttack's accuracy after each
            of its attacks in order (seconds summed over blocks and ranks).
    Returns:
        {"clean": acc, "pgd": acc, "autoattack": acc} (only the requested keys), floats in
        [0, 1]; plus "per_example" / "autoattack_log" when asked.

    Example:
        >>> cdp_fast.evaluate(model, x_test, y_test, eps=8/255, n_ex=1000)
        {'clean': 0.87, 'pgd': 0.58, 'autoattack': 0.55}
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # the attacks' box is [0, 1]: a sampler adapter (it takes [-1, 1]) would see the wrong values
    check_range_contract(model, UNIT_RANGE, "model (evaluate gives it images in [0, 1])",
                         "pass the classifier itself (the adapter's .model)")
    if isinstance(attacks, str):
        attacks = (attacks,)
    attacks = tuple(attacks)
    unknown = [a for a in attacks if a not in ATTACKS]
    if not attacks or unknown:
        raise ValueError(f"attacks must be a non-empty subset of {ATTACKS}, got {attacks}")
    norm = check_norm(norm, aa.AA_NORMS)
    if norm == "l1" and "pgd" in attacks:
        check_norm(norm)   # (its message: L1 is AutoAttack only)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if isinstance(pgd_steps, bool) or not isinstance(pgd_steps, int) or pgd_steps < 1:
        raise ValueError(f"pgd_steps must be an int >= 1, got {pgd_steps!r}")
    if pgd_step_size is None:
        pgd_step_size = eps / 4
    if not isinstance(pgd_step_size, (int, float)) or not pgd_step_size >= 0:
        raise ValueError(f"pgd_step_size must be a number >= 0, got {pgd_step_size!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if n_ex is not None and (isinstance(n_ex, bool) or not isinstance(n_ex, int) or n_ex < 1):
        raise ValueError(f"n_ex must be an int >= 1 or None, got {n_ex!r}")
    for name, flag in (("distributed", distributed), ("per_example", per_example), ("aa_log", aa_log)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if state_path is not None:
        state_path = Path(state_path)
        if state_path.exists() and not state_path.is_dir():
            raise ValueError(f"state_path: {state_path} exists and is not a folder (AutoAttack's "
                             "state is a folder of per-block files)")
    x = open_images(x, "x").all()
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if y.dtype.is_floating_point or y.dim() != 1 or len(y) != len(x):
        raise ValueError(f"y must be integer labels of shape ({len(x)},), got {y.dtype} "
                         f"{tuple(y.shape)}")
    y = y.long()
    check_unit_range(x, "x")
    if n_ex is not None:
        x, y = x[:n_ex], y[:n_ex]
    from cdp_fast.utils import distributed as cdist

    dev = rank_device(device, model) if distributed else model_device(model, device)
    if model_device(model) != dev:
        model.to(dev)

    aa_list = aa.check_aa(version, aa_attacks) if "autoattack" in attacks else None  # every rank
    rank, world = 0, 1
    if distributed:
        rank, world = cdist.maybe_init(dev)
    blocks = list(range(0, len(x), batch_size))[rank::world]   # this rank's blocks
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    names = [a for a in ATTACKS if a in attacks]
    order = (aa.aa_order(norm=norm, version=version, attacks=aa_list)
             if "autoattack" in names else [])
    steps = len(blocks) * (len(names) - ("autoattack" in names) + len(order))
    bar = (tqdm(total=steps, desc="evaluate", unit="attack-block",
                disable=not progress or rank != 0, leave=False) if tqdm else None)

    def step(name, b, detail=""):
        """The bar shows the attack about to run (and the block, when there are several)."""
        if bar is not None:
            where = f" block {b + 1}/{len(blocks)}" if len(blocks) > 1 else ""
            bar.set_description(f"evaluate: {name}{where}{detail}")

    def done():
        if bar is not None:
            bar.update(1)

    hits = {a: torch.zeros(len(x), dtype=torch.int64) for a in names}   # 1 where point i survives
    log = None
    try:
        with eval_mode(model):
            for b, i in enumerate(blocks):
                xb, yb = x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)
                if "clean" in names:
                    step("clean", b)
                    with torch.no_grad():
                        hits["clean"][i:i + len(xb)] = (model(xb).argmax(1) == yb).long().cpu()
                    done()
                if "pgd" in names:
                    step("pgd", b)
                    u = pgd_starts(x[i:i + batch_size], i, seed).to(dev)
                    xa = pgd_from_draws(model, xb, yb, u, eps=eps, step_size=pgd_step_size,
                                        steps=pgd_steps, norm=norm)
                    with torch.no_grad():
                        hits["pgd"][i:i + len(xb)] = (model(xa).argmax(1) == yb).long().cpu()
                    done()
            if "autoattack" in names:
                log = _autoattack_blocks(
                    model, x, y, blocks, hits["autoattack"], order=order, eps=eps, norm=norm,
                    version=version, attacks=aa_list, batch_size=batch_size, seed=seed, dev=dev,
                    world=world, rank=rank, state_path=state_path, step=step, done=done)
    finally:
        if bar is not None:
            bar.close()
    table = torch.stack([hits[a] for a in names]).to(dev)        # (attacks, N); zero off this rank
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(table)
    table = table.cpu()
    out = {a: int(table[j].sum()) / len(x) for j, a in enumerate(names)}
    if per_example:
        out["per_example"] = {a: table[j].numpy().astype(bool) for j, a in enumerate(names)}
    if aa_log and log is not None:
        out["autoattack_log"] = log
    return out


def _autoattack_blocks(model, x, y, blocks, hits, *, order, eps, norm, version, attacks,
                       batch_size, seed, dev, world, rank, state_path, step, done) -> list:
    """AutoAttack on this rank's blocks, attack by attack (each attack over every block before
    the next), resuming each block from its saved state; ``hits`` (N,) filled with the final
    flags. Returns the per-attack log (counts all-reduced over the ranks: every rank must call)."""
    import time

    model_sha = aa.model_digest(model) if state_path is not None else None
    if state_path is not None:
        state_path.mkdir(parents=True, exist_ok=True)
    st = {}
    for b, i in enumerate(blocks):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        cfg = (aa.block_config(eps=eps, norm=norm, version=version, order=order, seed=seed,
                               batch_size=batch_size, n_points=len(x), xb=xb, yb=yb,
                               model_sha=model_sha) if state_path is not None else None)
        saved = aa.load_block(state_path, i, cfg) if state_path is not None else None
        if saved is None:
            clean = aa.clean_flags(model, xb, yb, batch_size=batch_size, device=dev)
            saved = {"clean": clean.tolist(), "robust": clean.tolist(), "done": [], "counts": {},
                     "seconds": {}}
        st[i] = dict(saved, cfg=cfg)
    n = len(x)

    def reduced(count, secs):
        """(count, seconds) summed over the ranks."""
        t = torch.tensor([float(count), float(secs)], dtype=torch.float64)
        if world > 1:
            import torch.distributed as dist

            t = t.to(dev)
            dist.all_reduce(t)
        return t.cpu().tolist()

    def write(log):
        if state_path is not None and rank == 0:
            from cdp_fast.utils.io import atomic_write_json

            atomic_write_json(state_path / "log.json", log)

    c, _ = reduced(sum(sum(s["clean"]) for s in st.values()), 0.0)
    log = [{"attack": "clean", "robust_accuracy": c / n, "seconds": 0.0}]
    for name in order:
        count, secs = 0, 0.0
        for b, i in enumerate(blocks):
            s = st[i]
            step("autoattack", b, f" ({name})")
            if name not in s["done"]:
                t0 = time.perf_counter()
                robust = aa.attack_flags(model, name, x[i:i + batch_size], y[i:i + batch_size],
                                         torch.tensor(s["robust"], dtype=torch.bool), eps=eps,
                                         norm=norm, version=version, attacks=attacks,
                                         batch_size=batch_size, seed=seed, device=dev)
                s["robust"] = robust.tolist()
                s["done"].append(name)
                s["seconds"][name] = time.perf_counter() - t0
                s["counts"][name] = int(robust.sum())
                if state_path is not None:
                    aa.save_block(state_path, i, s["cfg"], s)
            count += s["counts"][name]
            secs += s["seconds"].get(name, 0.0)
            done()
        c, secs = reduced(count, secs)
        log.append({"attack": name, "robust_accuracy": c / n, "seconds": secs})
        write(log)   # after every attack: a live log of a long run
    for i in blocks:
        hits[i:i + len(st[i]["robust"])] = torch.tensor(st[i]["robust"], dtype=torch.int64)
    write(log)
    return log
