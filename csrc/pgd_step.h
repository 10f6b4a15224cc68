// Shared by the CPU (.cpp) and CUDA (.cu) implementations of cdp_fast::pgd_step.
//
// One L-infinity PGD step (Madry et al. 2018, eq. (2); the update of the TRADES public code):
//     y = clamp(min(max(x_adv + a*sign(g), x - e), x + e), 0, 1),   sign(0) = 0
// computed per element in opmath precision (float for half/bfloat16, else the dtype itself)
// and rounded once. Semantics chosen to be bitwise equal to the eager PyTorch composite
// (cdp_fast.ops.pgd_step.pgd_step_ref): sign(NaN) = 0 like torch.sign, max/min propagate NaN like
// torch.maximum / torch.minimum / torch.clamp.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

namespace cdp_fast {

// NaN-propagating max/min with torch.maximum/minimum's tie rule (returns b on a == b).
template <typename T>
C10_HOST_DEVICE inline T max_nan(T a, T b) {
  return (a != a) ? a : ((a > b) ? a : b);
}
template <typename T>
C10_HOST_DEVICE inline T min_nan(T a, T b) {
  return (a != a) ? a : ((a < b) ? a : b);
}

// a * sign(g) without a multiply: +a, -a, or +0 (also for g = NaN: torch.sign(NaN) = 0).
template <typename T>
C10_HOST_DEVICE inline T signed_step(T g, T a) {
  return (g > T(0)) ? a : ((g < T(0)) ? -a : T(0));
}

// torch.clamp(y, 0, 1)'s rule: NaN passes through, ties keep y (so -0 stays -0).
template <typename T>
C10_HOST_DEVICE inline T clamp01(T y) {
  const T t = (T(0) > y) ? T(0) : y;
  return (T(1) < t) ? T(1) : t;
}

template <typename T>
C10_HOST_DEVICE inline T pgd_step_one(T xa, T g, T x, T a, T e) {
  T y = xa + signed_step(g, a);
  y = min_nan(max_nan(y, x - e), x + e);
  return clamp01(y);
}

// Argument checks shared by both devices (the Python wrapper raises ValueErrors first; these
// guard direct torch.ops calls).
inline void check_pgd_step_args(const at::Tensor& x_adv, const at::Tensor& grad,
                                const at::Tensor& x_nat, const at::Tensor& step_size,
                                const at::Tensor& eps) {
  TORCH_CHECK(x_adv.is_floating_point(), "pgd_step: x_adv must be floating, got ",
              x_adv.scalar_type());
  TORCH_CHECK(grad.sizes() == x_adv.sizes() && x_nat.sizes() == x_adv.sizes(),
              "pgd_step: x_adv, grad, x_nat must have one shape, got ", x_adv.sizes(), ", ",
              grad.sizes(), ", ", x_nat.sizes());
  TORCH_CHECK(grad.scalar_type() == x_adv.scalar_type() &&
                  x_nat.scalar_type() == x_adv.scalar_type(),
              "pgd_step: x_adv, grad, x_nat must have one dtype");
  TORCH_CHECK(grad.device() == x_adv.device() && x_nat.device() == x_adv.device(),
              "pgd_step: x_adv, grad, x_nat must be on one device");
  const int64_t batch = x_adv.dim() > 0 ? x_adv.size(0) : 1;
  for (const at::Tensor* t : {&step_size, &eps}) {
    const char* name = (t == &step_size) ? "step_size" : "eps";
    TORCH_CHECK(t->is_floating_point(), "pgd_step: ", name, " must be a floating tensor");
    TORCH_CHECK(t->dim() == 0 || (t->dim() == 1 && t->size(0) == batch),
                "pgd_step: ", name, " must have shape () or (B,) with B = ", batch, ", got ",
                t->sizes());
  }
}

}  // namespace cdp_fast
