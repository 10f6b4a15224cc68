"""The files and records of a `cdp-fast demo` run: results.json, results.png (:func:`plot_results`),
the sample grids and synthetic sets of seed 0 (:func:`write_outputs`), and where the numbers
were measured (:func:`machine_info`)."""
from __future__ import annotations

import io
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from cdp_fast.utils.io import atomic_write_bytes
from cdp_fast.utils.png import save_grid_png

__all__ = ["machine_info", "write_outputs", "plot_results", "write_json"]


def write_json(results: dict, path: Path) -> None:
    """``results`` as indented JSON at ``path``, atomically."""
    atomic_write_bytes(path, (json.dumps(results, indent=2) + "\n").encode())


def machine_info() -> dict:
    """Where the numbers were measured: platform, CPU, threads, versions, load, git commit."""
    import subprocess

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        root = Path(__file__).resolve().parents[2]
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                        text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["working_tree_modified"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def write_outputs(results: dict, out: Path, sets0: dict) -> dict:
    """results.json, results.png (matplotlib, if installed), the sample grids and npz of seed 0."""
    files = {}
    k = min(64, min(len(s) for s in sets0.values()))
    imgs = {kind: np.asarray(s.images[:k]) for kind, s in sets0.items()}
    for kind, a in imgs.items():
        save_grid_png(out / f"grid_{kind.replace('-', '_')}.png", a)
        files[f"grid_{kind}"] = str(out / f"grid_{kind.replace('-', '_')}.png")
        sets0[kind].save_npz(out / f"synthetic_{kind.replace('-', '_')}.npz")
    order = [kd for kd in ("ddim", "cdp", "cdp-class") if kd in imgs]
    sep = np.full((1,) + imgs[order[0]].shape[1:], 255, np.uint8)
    rows = []
    for i in range(0, k, 8):
        parts = []
        for kd in order:
            parts += [imgs[kd][i:i + 8], sep]
        rows.append(np.concatenate(parts[:-1]))
    save_grid_png(out / "grid_pair.png", np.concatenate(rows), nrow=9 * len(order) - 1)
    files["grid_pair"] = str(out / "grid_pair.png")
    if plot_results(results, out / "results.png"):
        files["plot"] = str(out / "results.png")
    files["json"] = str(out / "results.json")
    results["files"] = files
    write_json(results, out / "results.json")
    return files


def plot_results(results: dict, path: Path) -> bool:
    """results.png: (a) accuracy per arm (mean ± std), (b) paired Δ vs real+ddim with 95% CIs,
    (c) the mean test curve (PGD-20) of every arm. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    attacks = results["config"]["attacks"]
    arms = list(results["arms"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    w = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        m = [100 * results["arms"][arm][a]["mean"] for a in attacks]
        s = [100 * (results["arms"][arm][a]["std"] or 0.0) for a in attacks]
        axes[0].bar(np.arange(len(attacks)) + (i - (len(arms) - 1) / 2) * w, m, w, yerr=s, capsize=3, label=arm)
    axes[0].set_xticks(range(len(attacks)))
    axes[0].set_xticklabels(attacks)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_ylim(0, 100)
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"k = {results['config']['k_per_class']}/class, {len(results['config']['seeds'])} seeds")
    others = list(results["paired_vs_ddim"])
    w = 0.8 / max(1, len(others))
    for i, arm in enumerate(others):
        for j, a in enumerate(attacks):
            p = results["paired_vs_ddim"][arm][a]
            x = j + (i - (len(others) - 1) / 2) * w
            err = None if p["lo"] is None else [[100 * (p["mean"] - p["lo"])], [100 * (p["hi"] - p["mean"])]]
            axes[1].errorbar([x], [100 * p["mean"]], yerr=err, fmt="o", color=f"C{arms.index(arm)}", capsize=3,
                             label=arm if j == 0 else None)
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set_xticks(range(len(attacks)))
    axes[1].set_xticklabels(attacks)
    axes[1].set_ylabel("paired difference to real+ddim (points)")
    axes[1].set_title("mean and 95% CI (Student t)")
    axes[1].legend(fontsize=7)
    for arm, pts in results.get("mean_curves", {}).items():
        axes[2].plot([p["updates"] for p in pts], [100 * p["pgd"] for p in pts], marker=".",
                     color=f"C{arms.index(arm)}", label=arm)
    axes[2].set_xlabel("updates")
    axes[2].set_ylabel("PGD-20 accuracy (%), curve subset")
    axes[2].set_title("test curve (mean over seeds)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return True
