"""One :func:`cdp_fast.sample` run, batch by batch: :class:`RunPlan` (everything a batch needs,
fixed for the run), :func:`generate_group` (one batch: x_T from (seed, i), the guidance reset,
one trajectory of the chosen solver, labels) and :func:`batches` (the rows of a range, as
numpy arrays for memory or shards), with the per-timestep guidance-strength summary
(:class:`Strength`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from cdp_fast.data import to_uint8_nhwc
from cdp_fast.diffusion.adapters import EpsModel
from cdp_fast.diffusion.solvers import guided_ddim, guided_ddpm, guided_dpmpp_2m, guided_heun
from cdp_fast.guidance.contrastive import ContrastiveGuidance
from cdp_fast.sampling import graphs
from cdp_fast.sampling.prepare import check_logits
from cdp_fast.utils.checks import looks_like_probabilities
from cdp_fast.utils.seeding import generators, per_sample_randn, sample_seeds

__all__ = ["RunPlan", "Strength", "generate_group", "batches", "labels_from"]


class Strength:
    """Per-timestep summary of the guidance strength λ‖∇ℓ_i‖/‖ε_i‖ over the batches of a call:
    the mean of the batch means and the max, as {"t", "ratio_mean", "ratio_max", "batches"}
    (over each batch as computed: the last batch's padding rows are part of its contrastive
    batch and count too)."""

    def __init__(self):
        self.by_t = {}

    def add(self, records):
        if not records:
            return
        # one host sync per batch for all its steps
        values = torch.stack([torch.stack([mean, mx]) for _, mean, mx in records]).tolist()
        for (t, _, _), (mean, mx) in zip(records, values):
            s, m, c = self.by_t.get(t, (0.0, 0.0, 0))
            self.by_t[t] = (s + mean, max(m, mx), c + 1)

    def merge(self, others):
        for other in others:
            for t, (s, m, c) in other.items():
                s0, m0, c0 = self.by_t.get(t, (0.0, 0.0, 0))
                self.by_t[t] = (s0 + s, max(m0, m), c0 + c)
        return self

    def summary(self):
        return [{"t": int(t), "ratio_mean": s / c, "ratio_max": m, "batches": c}
                for t, (s, m, c) in sorted(self.by_t.items(), reverse=True)]


@dataclass(frozen=True)
class RunPlan:
    """Everything a batch of a :func:`sample` run needs, fixed for the run."""

    eps_model: EpsModel
    guidance: Optional[ContrastiveGuidance]   # None: no guidance (also for λ = 0)
    solver: str                               # one of SOLVERS
    sigmas: Optional[torch.Tensor]            # heun: (n + 1,) noise levels, else None
    clip_x0: bool                             # DDPM only
    head_scope: int                           # rows per online-head lifetime (the shard size)
    alphas_cumprod: torch.Tensor
    timesteps: torch.Tensor
    eta: float
    batch_size: int
    seed: int
    image_shape: tuple
    init_std: float
    device: torch.device
    channels_last: bool
    class_labels: Any                         # (n,) or None
    num_classes: Optional[int]
    labeler: Optional[Callable]
    output: str
    autocast: Callable
    strength: Strength
    step_graph: Optional[graphs.StepGraph]    # the steps' graphs (cdp_fast.sampling.graphs), or None
    behaviour: dict                           # the probe's fingerprints of plain-callable networks (manifest)


def labels_from(labeler, x):
    with torch.no_grad():
        logits = labeler(x.clamp(-1, 1) if x.dim() == 4 else x)
    check_logits(logits, len(x), "labeler")
    # rows that are already probabilities (a labeler ending in softmax) are not softmaxed again
    prob = logits.float() if looks_like_probabilities(logits) else torch.softmax(logits.float(), dim=1)
    conf, lab = prob.max(dim=1)
    return lab.to(torch.int64), conf


def generate_group(run: RunPlan, start: int, count: int, advance=None):
    """Samples [start, start + count): (images (count, ...) on CPU, labels or None, confidence
    or None). ``count`` may be < the batch size only for the last group; guided groups are
    always computed at full batch size and cut. ``advance(k)``: progress, ``count`` rows in
    total spread over the steps."""
    full = run.batch_size if run.guidance is not None else count
    idx = list(range(start, start + full))
    gens = generators(run.seed, idx)
    x_T = per_sample_randn(gens, run.image_shape, run.device)
    if run.init_std != 1.0:
        x_T = x_T * run.init_std
    if run.channels_last:
        x_T = x_T.contiguous(memory_format=torch.channels_last)
    cls = None
    if run.class_labels is not None:
        cl = run.class_labels
        # padded rows (beyond n) reuse labels cyclically: they are discarded
        cls = torch.as_tensor(np.asarray([cl[i % len(cl)] for i in idx]), dtype=torch.long, device=run.device)
    elif run.num_classes is not None:
        cls = torch.tensor([int(torch.randint(run.num_classes, (1,), generator=g)) for g in gens],
                           dtype=torch.long, device=run.device)
    y = cls if run.num_classes is not None else None
    guidance = run.guidance
    if guidance is not None:
        real_pos = None
        if guidance.positive == "real":
            real_pos = torch.tensor([int(torch.randint(len(guidance.real), (1,), generator=g)) for g in gens],
                                    dtype=torch.long, device=run.device)
        # the head lives for a shard (the authors': a run), so resume stays exact
        guidance.reset(class_labels=cls if guidance.negatives == "class" else None,
                       real_positive_index=real_pos, keep_head=start % run.head_scope != 0)
    on_step, moved = None, [0.0]
    if advance is not None:
        per_step = count / (len(run.sigmas) - 1 if run.solver == "heun" else len(run.timesteps))

        def on_step(step):
            # never past this group's rows; what is left (the steps a repeated timestep skips:
            # the bar used to stop short) is added when the group is done
            d = min(per_step, count - moved[0])
            if d > 0:
                moved[0] += d
                advance(d)
    with run.autocast():
        # per-step noise keyed by (seed, i) and drawn on the device: no host round trip per step
        keys = sample_seeds(run.seed, idx, run.device) if (run.solver == "ddpm" or run.eta > 0) else None
        if run.solver == "heun":
            x0 = guided_heun(run.eps_model, x_T, alphas_cumprod=run.alphas_cumprod, sigmas=run.sigmas,
                             guidance=guidance, y=y, on_step=on_step)
        elif run.solver == "dpmpp_2m":
            x0 = guided_dpmpp_2m(run.eps_model, x_T, alphas_cumprod=run.alphas_cumprod, timesteps=run.timesteps,
                                 guidance=guidance, y=y, on_step=on_step,
                                 step_graph=run.step_graph)
        elif run.solver == "ddpm":
            x0 = guided_ddpm(run.eps_model, x_T, alphas_cumprod=run.alphas_cumprod, timesteps=run.timesteps,
                             guidance=guidance, clip_x0=run.clip_x0, generator=keys, y=y, on_step=on_step,
                             step_graph=run.step_graph)
        else:
            x0 = guided_ddim(run.eps_model, x_T, alphas_cumprod=run.alphas_cumprod, timesteps=run.timesteps,
                             guidance=guidance, eta=run.eta, generator=keys, y=y, on_step=on_step,
                             step_graph=run.step_graph)
    if guidance is not None:
        run.strength.add(guidance.strength)
    if advance is not None and count - moved[0] > 0:
        advance(count - moved[0])
    x0 = x0[:count].float()
    labels = conf = None
    if run.labeler is not None:
        labels, conf = labels_from(run.labeler, x0)
        labels, conf = labels.cpu(), conf.cpu()
    elif cls is not None and run.num_classes is not None:
        labels = cls[:count].cpu()
    if run.output == "uint8":
        img = to_uint8_nhwc(x0).cpu()
    else:
        img = x0.cpu()
    return img, labels, conf


def batches(run: RunPlan, start: int, count: int, advance=None):
    """Rows [start, start + count) of the run, one dict of numpy arrays (``image``, and
    ``label`` / ``confidence`` when there are labels) per batch of ``run.batch_size``;
    ``advance(k)`` moves a progress bar by k rows, step by step."""
    for s in range(start, start + count, run.batch_size):
        img, lab, conf = generate_group(run, s, min(run.batch_size, start + count - s), advance)
        arrays = {"image": img.numpy()}
        if lab is not None:
            arrays["label"] = lab.numpy().astype(np.int64)
        if conf is not None:
            arrays["confidence"] = conf.numpy().astype(np.float32)
        yield arrays
