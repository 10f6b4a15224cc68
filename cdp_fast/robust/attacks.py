"""L∞ and L2 attacks on classifiers taking images in [0, 1], NCHW: PGD (evaluation, PGD-AT) and
the TRADES inner maximisation (training). ``norm="linf"`` (the default): each step is the fused
:func:`cdp_fast.pgd_step`. ``norm="l2"``: each step is :func:`pgd_step_l2`, plain PyTorch (the
fused op is L∞ only; measured on CPU, ``benchmarks/l2_vs_linf.py``, the L2 step costs a few
elementwise passes more than the fused L∞ step, small beside the model's forward + backward).
L1 has no PGD here (AutoAttack's APGD-L1 in :func:`cdp_fast.evaluate` covers it).

L2 facts of the public code: the step is x + α·g/‖g‖₂ per example, then clamp to [0, 1], then
δ scaled by min(1, ε/‖δ‖₂) (``DM-Improves-AT/core/attacks/pgd.py`` ``perturb_iterative``
ord=2, ``normalize_by_pnorm`` then ``clamp`` then ``clamp_by_pnorm``; TRADES ``trades.py``
``distance='l_2'``: normalised gradient, SGD step of lr 2ε/k, clamp, ``renorm_(p=2,
maxnorm=ε)``); a zero gradient gives no step here (advertorch divides by max(‖g‖, 1e-6);
TRADES substitutes a Gaussian direction). TRADES' L2 start is x + 0.001·N(0, I) in both Zhang's
and Gowal et al.'s code (``core/utils/trades.py`` ``attack='l2-pgd'``); PGD's L2 random start
here is uniform in the ε-ball (then clipped to [0, 1]); DM-Improves-AT's ``rand_init_delta``
instead starts from a uniform random image pulled onto the ε-sphere.

Sources:
  - PGD with random start: Madry et al. 2018, "Towards deep learning models resistant to
    adversarial attacks", eq. (2); start uniform in [−ε, ε] (clipped to [0, 1]).
  - TRADES: Zhang et al. 2019, "Theoretically principled trade-off between robustness and
    accuracy"; facts of the public code (``yaodongyu/TRADES``, ``trades.py``): the model is
    put in eval mode for the attack, the start is ``x + 0.001·N(0, I)`` (not clipped), the
    inner loss is ``KLDivLoss(size_average=False)`` i.e. the *sum* over the batch of
    KL(p(x) ‖ p(x_adv)), and every step is the L∞ PGD step above. Gowal et al. 2021's
    variant (``imrahulr/adversarial_robustness_pytorch``, ``gowal21uncovering/utils/trades.py``,
    the trainer the Contrastive-DP authors used) differs in two places, both options of
    :func:`trades_attack`: the start is uniform in the ε-ball clipped to [0, 1]
    (``start="uniform"``), and the model stays in train mode with BatchNorm running
    statistics frozen (``mode="train"``: ``model.train()`` + ``track_bn_stats(model, False)``),
    so every forward of the attack, p(x) included, normalises with its own batch statistics.

Both functions run the model forward + backward only to get ∇_{x_adv} loss
(``torch.enable_grad`` + ``torch.autograd.grad`` w.r.t. the input alone, so parameter ``.grad``
buffers are never touched); everything else runs under ``torch.no_grad``. They return a
detached tensor and leave every submodule in the train/eval mode it was in.

torch.compile: ``torch.compile(pgd_attack, fullgraph=True)`` traces the whole loop (the
fused op through its ``register_fake``) when ``torch._dynamo.config.trace_autograd_ops`` is
True (recent torch); otherwise dynamo graph-breaks at ``torch.autograd.grad`` and compiles the
pieces. A ``generator=`` cannot be traced (graph break); compiled code uses the global RNG.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from cdp_fast.ops.pgd_step import check_scalar_or_per_sample, pgd_step
from cdp_fast.utils.runtime import eval_mode

__all__ = ["pgd_attack", "trades_attack", "batch_stats_mode", "frozen_params", "pgd_from_start",
           "pgd_from_draws", "trades_from_noise", "trades_from_draws", "trades_from_start",
           "pgd_step_l2", "check_norm", "NORMS"]

NORMS = ("linf", "l2")   # PGD / TRADES / PGD-AT; AutoAttack in evaluate also takes "l1"
_LOSSES = ("ce",)
_STARTS = ("normal", "uniform")
_MODES = ("eval", "train")


@contextlib.contextmanager
def batch_stats_mode(model):
    """Every submodule of ``model`` in train mode, BatchNorm layers normalising with the
    statistics of the batch they see while leaving their running statistics (and
    ``num_batches_tracked``) untouched; each submodule's ``training`` flag and each BatchNorm's
    ``track_running_stats`` restored afterwards, even on error. This is the attack mode of
    ``gowal21uncovering/utils/trades.py`` (``model.train(); track_bn_stats(model, False)``,
    ``core/utils/utils.py``). Dropout, if any, is active (as there). ``model`` may be a plain
    callable: then nothing is done."""
    if not isinstance(model, torch.nn.Module):
        yield model
        return
    modes = [(m, m.training) for m in model.modules()]
    bns = [(m, m.track_running_stats) for m in model.modules()
           if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.train()
    for m, _ in bns:
        # In train mode with track_running_stats False, BatchNorm passes no running buffers
        # to the kernel: batch statistics, nothing updated.
        m.track_running_stats = False
    try:
        yield model
    finally:
        for m, was in bns:
            m.track_running_stats = was
        for m, was in modes:
            m.training = was


@contextlib.contextmanager
def frozen_params(model):
    """The parameters of ``model`` with ``requires_grad=False`` for the duration (each one's
    flag restored afterwards, even on error). An attack needs ∇ with respect to the input
    only; eager autograd skips parameter gradients nobody asked for, but a compiled backward
    (torch.compile traces the parameters as graph inputs that require grad) computes them all.
    ``model`` may be a plain callable: then nothing is done. Inside a region torch.compile is
    tracing (a whole attack compiled with fullgraph) flags cannot change and nothing is done:
    the training loop compiles the model, not the loop, so its attacks get the frozen flags."""
    if not isinstance(model, torch.nn.Module) or torch.compiler.is_compiling():
        yield model
        return
    params = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, was in params:
            p.requires_grad_(was)


def _attack_mode(model, mode: str):
    return eval_mode(model) if mode == "eval" else batch_stats_mode(model)


def _check_common(model, x, eps, step_size, steps) -> None:
    if not callable(model):
        raise ValueError(f"model must be callable, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("x must be a floating tensor of images in [0, 1], shape (B, C, H, W)")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    for name, v in (("eps", eps), ("step_size", step_size)):
        if isinstance(v, torch.Tensor):
            check_scalar_or_per_sample(v, name, x)  # shape () or (B,), entries >= 0
            continue
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")


def _start_from_uniform(x: torch.Tensor, u: torch.Tensor, eps) -> torch.Tensor:
    """clip(x + (2u − 1)·ε, 0, 1): a point of the ε-ball ∩ [0, 1] from draws u in [0, 1)."""
    if isinstance(eps, torch.Tensor):
        eps = eps.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
    return torch.clamp(x + (2.0 * u - 1.0) * eps, 0.0, 1.0)


def _uniform_start(x: torch.Tensor, eps, generator, norm: str = "linf") -> torch.Tensor:
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return _start_from_draws(x, u, eps, norm)


def check_norm(norm, allowed=NORMS) -> str:
    """``norm`` lower-cased ("Linf" / "L2" / "L1", pyautoattack's spellings, are accepted);
    ValueError naming it unless it is one of ``allowed``."""
    n = norm.lower() if isinstance(norm, str) else norm
    if n not in allowed:
        extra = (" (L1 has no PGD / TRADES here: AutoAttack's APGD-L1 is evaluate(..., "
                 "attacks=('autoattack',), norm='l1'))" if n == "l1" else "")
        raise ValueError(f"norm must be one of {allowed}, got {norm!r}{extra}")
    return n


def _per_sample(v, x: torch.Tensor, dtype) -> torch.Tensor:
    """A float or a () / (B,) tensor as a (B, 1, ..., 1) tensor of ``dtype`` on x's device."""
    t = torch.as_tensor(v, dtype=dtype, device=x.device)
    return t.reshape(-1).expand(x.shape[0]).reshape((-1,) + (1,) * (x.dim() - 1))


def _safe_div(num: torch.Tensor, den: torch.Tensor, where: torch.Tensor, other: float):
    """num / den where ``where`` else ``other``, with no inf / NaN in either branch (so the
    gradients of the selected branch stay finite)."""
    return torch.where(where, num / torch.where(where, den, torch.ones_like(den)),
                       torch.full_like(den, other))


def pgd_step_l2(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, *, step_size,
                eps) -> torch.Tensor:
    """One L2 PGD step, plain PyTorch (the reference and the only implementation), per example i
    with α = ``step_size``, ε = ``eps`` and ‖·‖ the L2 norm over all of an example's elements:

        d = g / ‖g‖                   (d = 0 where g = 0: no step, never NaN)
        δ = clamp(x_adv + α·d, 0, 1) − x
        y = clamp(x + δ · min(1, ε / ‖δ‖), 0, 1)

    the order of DM-Improves-AT's / advertorch's ``perturb_iterative`` (ord=2) and of TRADES'
    ``l_2`` branch: clamp to the box, then scale onto the ball; scaling δ toward x keeps x + δ in
    the box, so y is in both (the last clamp only absorbs rounding). This is the field's step,
    not the Euclidean projection onto ball ∩ box.

    Args:
        x_adv, grad, x_nat: tensors of one shape (B, ...), floating; x_adv, x_nat in [0, 1].
        step_size (α), eps (ε): Python floats >= 0 or tensors of shape () or (B,).
    Returns:
        y, shape and dtype of x_adv, with ‖y − x‖ ≤ ε (up to rounding) and values in [0, 1].
        float16 / bfloat16 compute in float32 and round once. Differentiable (plain ops).
    """
    out_dtype = x_adv.dtype
    cdt = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    xa, g, x = x_adv.to(cdt), grad.to(cdt), x_nat.to(cdt)
    view = (-1,) + (1,) * (x.dim() - 1)
    gn = g.flatten(1).norm(dim=1)
    d = g * _safe_div(torch.ones_like(gn), gn, gn > 0, 0.0).reshape(view)
    delta = torch.clamp(xa + _per_sample(step_size, x, cdt) * d, 0.0, 1.0) - x
    dn = delta.flatten(1).norm(dim=1)
    e = _per_sample(eps, x, cdt).reshape(-1)
    factor = _safe_div(e, dn, dn > e, 1.0)
    return torch.clamp(x + delta * factor.reshape(view), 0.0, 1.0).to(out_dtype)


def _start_from_draws(x: torch.Tensor, u: torch.Tensor, eps, norm: str) -> torch.Tensor:
    """PGD's random start from uniform draws u (B, ...) in [0, 1). L∞: clip(x + (2u − 1)·ε,
    0, 1), uniform in the ε-cube. L2: uniform in the ε-ball, then clipped (clipping only
    shrinks |δ_j|, so it stays in the ball): z = Φ⁻¹(u) ~ N(0, I) (inverse CDF, float64), the
    direction z/‖z‖ and the radius ε·F_{χ²_D}(‖z‖²)^{1/D} ~ ε·U(0, 1)^{1/D}, independent of
    the direction (‖z‖ and z/‖z‖ are independent for a Gaussian), D the elements per example."""
    if norm == "linf":
        return _start_from_uniform(x, u, eps)
    tiny = 2.0 ** -30
    z = math.sqrt(2.0) * torch.erfinv(2.0 * u.double().clamp(tiny, 1.0 - tiny) - 1.0)
    dims = z[0].numel()
    s = z.flatten(1).pow(2).sum(1)
    r = torch.special.gammainc(torch.full_like(s, dims / 2.0), s / 2.0).pow(1.0 / dims)
    view = (-1,) + (1,) * (x.dim() - 1)
    delta = z * (r / s.sqrt()).reshape(view) * _per_sample(eps, z, torch.float64)
    return torch.clamp(x + delta.to(x.dtype), 0.0, 1.0)


def _step_fn(norm: str):
    return pgd_step if norm == "linf" else pgd_step_l2


def _input_grad(loss_fn, x_adv: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        xa = x_adv.detach().requires_grad_(True)
        loss = loss_fn(xa)
        (g,) = torch.autograd.grad(loss, (xa,))
    return g


def pgd_attack(model, x: torch.Tensor, y: torch.Tensor, *, eps=8 / 255, step_size=2 / 255,
               steps: int = 10, random_start: bool = True, loss: str = "ce",
               generator: torch.Generator | None = None, norm: str = "linf") -> torch.Tensor:
    """PGD maximising the cross-entropy (Madry et al. 2018, eq. (2)), L∞ or L2.

        L∞:  x⁰ = clip_[0,1](x + U[−ε, ε])   (x⁰ = x without random start)
             xᵏ⁺¹ = clamp(min(max(xᵏ + α·sign(∇ CE(f(xᵏ), y)), x − ε), x + ε), 0, 1)
        L2:  x⁰ = clip_[0,1](x + δ), δ uniform in the L2 ball of radius ε
             xᵏ⁺¹ = pgd_step_l2(xᵏ, ∇ CE(f(xᵏ), y), x)   (normalised step, clamp, scale onto
             the ball: :func:`pgd_step_l2`)

    Args:
        model: classifier, (B, C, H, W) in [0, 1] -> logits (B, K). Its train/eval mode is used
            as it is (put it in eval mode for evaluation) and never changed.
        x: clean images (B, C, H, W) in [0, 1].
        y: labels (B,) int64.
        eps, step_size: ε and α, Python floats or per-sample tensors (B,).
        steps: number of PGD steps (0 returns the start point).
        random_start: uniform start in the ε-ball (of the norm).
        loss: ``"ce"`` (summed over the batch: the sign, and the L2 direction, are
            scale-invariant, and a sum does not underflow small per-sample gradients to 0 the
            way a mean can).
        generator: torch.Generator for the random start.
        norm: ``"linf"`` (default) or ``"l2"``.
    Returns:
        x_adv, (B, C, H, W), detached, with ‖x_adv − x‖ ≤ ε in the norm and values in [0, 1].
    """
    _check_common(model, x, eps, step_size, steps)
    norm = check_norm(norm)
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.long or y.shape != x.shape[:1]:
        raise ValueError(f"y must be an int64 tensor of shape ({x.shape[0]},)")

    with torch.no_grad():
        x = x.detach()
        x_adv = _uniform_start(x, eps, generator, norm) if random_start else x.clone()
        return pgd_from_start(model, x, y, x_adv, eps=eps, step_size=step_size, steps=steps,
                              norm=norm)


def pgd_from_start(model, x, y, x_adv, *, eps, step_size, steps, norm="linf"):
    """The iterations of :func:`pgd_attack` from a given start ``x_adv`` (B, C, H, W), no
    argument checks, model mode untouched. Shared with the training loop, which draws the
    starts for a whole global batch and slices them per rank."""
    def ce(xa):
        return F.cross_entropy(model(xa), y, reduction="sum")

    step = _step_fn(norm)
    with torch.no_grad(), frozen_params(model):
        x = x.detach()
        for _ in range(steps):
            g = _input_grad(ce, x_adv)
            x_adv = step(x_adv, g, x, step_size=step_size, eps=eps)
    return x_adv.detach()


def pgd_from_draws(model, x, y, u, *, eps, step_size, steps, norm="linf"):
    """:func:`pgd_attack` (Madry et al. 2018, random start) with the uniform draws ``u``
    (B, C, H, W) in [0, 1) of its start given instead of drawn (L∞: x⁰ = clip(x + (2u − 1)·ε,
    0, 1); L2: uniform in the ball, from the same draws, see :func:`pgd_attack`), then
    :func:`pgd_from_start`. Model in eval mode during the attack (each submodule's mode
    restored); bitwise the same as ``pgd_attack`` for the same draws (tested). No argument
    checks. Shared with the training loop (draws for a whole global batch, sliced per rank) and
    :func:`cdp_fast.evaluate` (draws per point). Returns x_adv (B, C, H, W), detached."""
    with torch.no_grad(), eval_mode(model):
        x = x.detach()
        x_adv = _start_from_draws(x, u, eps, norm)
        return pgd_from_start(model, x, y, x_adv, eps=eps, step_size=step_size, steps=steps,
                              norm=norm)


def trades_attack(model, x: torch.Tensor, *, eps, step_size, steps: int = 10,
                  generator: torch.Generator | None = None, start: str = "normal",
                  mode: str = "eval", norm: str = "linf") -> torch.Tensor:
    """TRADES inner maximisation (Zhang et al. 2019, eq. (5)):

        x⁰ = x + 0.001·N(0, I)                       (start="normal", Zhang's ``trades.py``)
        x⁰ = clip(x + U(−ε, ε), 0, 1)                (start="uniform", Gowal et al.'s
                                                       ``gowal21uncovering/utils/trades.py``)
        xᵏ⁺¹ = clamp(min(max(xᵏ + α·sign(∇ Σ_i KL(p(x_i) ‖ p(xᵏ_i))), x − ε), x + ε), 0, 1)

    with p = softmax(model(·)). p(x) is computed once, in the attack's mode (Zhang's code
    recomputes it every step; the value is the same). ``norm="l2"``: every step is
    :func:`pgd_step_l2` on the same KL (TRADES ``distance='l_2'``; Zhang's and Gowal et al.'s
    code both start it from x + 0.001·N(0, I) and step with α = 2ε/k: pass step_size=2*eps/steps
    to match); start="uniform" is then uniform in the L2 ball (clipped).

    Args:
        model: classifier, (B, C, H, W) in [0, 1] -> logits (B, K).
        x: clean images (B, C, H, W) in [0, 1].
        eps, step_size: ε and α, Python floats or per-sample tensors (B,).
        steps: number of steps (TRADES uses 10 on CIFAR-10). With 0 steps the start point is
            projected onto the ε-ball ∩ [0, 1] and returned.
        generator: torch.Generator for the start.
        start: ``"normal"`` (Zhang et al.'s code; the default) or ``"uniform"`` (Gowal et al.'s).
        mode: the model's mode during the attack: ``"eval"`` (Zhang et al.'s code: BatchNorm
            with running statistics; the default) or ``"train"`` (Gowal et al.'s: train mode,
            BatchNorm with the statistics of the batch attacked, running statistics frozen;
            :func:`batch_stats_mode`). Either way each submodule's previous mode is restored
            on return and no running statistic changes.
        norm: ``"linf"`` (default) or ``"l2"``.
    Returns:
        x_adv, (B, C, H, W), detached, in the ε-ball around x and in [0, 1].
    """
    _check_common(model, x, eps, step_size, steps)
    norm = check_norm(norm)
    if start not in _STARTS:
        raise ValueError(f"start must be one of {_STARTS}, got {start!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if start == "normal":
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return trades_from_noise(model, x, noise, eps=eps, step_size=step_size, steps=steps,
                                 mode=mode, norm=norm)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return trades_from_draws(model, x, u, eps=eps, step_size=step_size, steps=steps, mode=mode,
                             norm=norm)


def trades_from_noise(model, x, noise, *, eps, step_size, steps, mode="eval", norm="linf"):
    """:func:`trades_attack` with start="normal" and its Gaussian draws ``noise`` (B, C, H, W)
    given instead of drawn (x⁰ = x + 0.001·noise), no argument checks. Shared with the training
    loop, which draws noise for a whole global batch and slices it per rank. Returns x_adv
    (B, C, H, W), detached."""
    return trades_from_start(model, x, x.detach() + 0.001 * noise, eps=eps,
                             step_size=step_size, steps=steps, mode=mode, norm=norm)


def trades_from_draws(model, x, u, *, eps, step_size, steps, mode="train", norm="linf"):
    """:func:`trades_attack` with start="uniform" and its uniform draws ``u`` (B, C, H, W) in
    [0, 1) given instead of drawn (L∞: x⁰ = clip(x + (2u − 1)·ε, 0, 1); L2: uniform in the
    ball, clipped), no argument checks; by default in Gowal et al.'s train mode. Returns x_adv
    (B, C, H, W), detached."""
    return trades_from_start(model, x, _start_from_draws(x.detach(), u, eps, norm), eps=eps,
                             step_size=step_size, steps=steps, mode=mode, norm=norm)


def trades_from_start(model, x, x_adv, *, eps, step_size, steps, mode="eval", norm="linf"):
    """The iterations of :func:`trades_attack` from a given start ``x_adv`` (B, C, H, W),
    model in ``mode`` ("eval" or "train", see :func:`trades_attack`) for p(x) and every step,
    no argument checks. Returns x_adv (B, C, H, W), detached."""
    with torch.no_grad(), _attack_mode(model, mode), frozen_params(model):
        x = x.detach()
        p_nat = F.softmax(model(x), dim=1)

        def kl(xa):
            return F.kl_div(F.log_softmax(model(xa), dim=1), p_nat, reduction="sum")

        step = _step_fn(norm)
        if steps == 0:
            x_adv = step(x_adv, torch.zeros_like(x_adv), x, step_size=0.0, eps=eps)
        for _ in range(steps):
            g = _input_grad(kl, x_adv)
            x_adv = step(x_adv, g, x, step_size=step_size, eps=eps)
    return x_adv.detach()
