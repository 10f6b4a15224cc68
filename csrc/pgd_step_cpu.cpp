// CPU kernel of cdp_fast::pgd_step: one pass over x_adv, grad, x_nat (read) and y (write),
// at::parallel_for over the flattened tensor, at::vec::Vectorized in the inner loop.
//
// Memory traffic is 4 * numel * sizeof(T); the eager composite (sign, mul, add, sub, add,
// maximum, minimum, clamp) makes ~8 kernels and ~7 full-size temporaries.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "pgd_step.h"

namespace cdp_fast {
namespace {

using at::vec::Vectorized;

// Vector form of pgd_step_one (pgd_step.h), same semantics lane by lane.
template <typename T>
inline Vectorized<T> pgd_step_vec(const Vectorized<T>& xa, const Vectorized<T>& g,
                                  const Vectorized<T>& x, const Vectorized<T>& a,
                                  const Vectorized<T>& neg_a, const Vectorized<T>& e) {
  using Vec = Vectorized<T>;
  const Vec zero(T(0)), one(T(1));
  Vec s = Vec::blendv(zero, a, g > zero);
  s = Vec::blendv(s, neg_a, g < zero);
  auto max_nan = [](const Vec& p, const Vec& q) {
    return Vec::blendv(q, p, (p > q) | (p != p));
  };
  auto min_nan = [](const Vec& p, const Vec& q) {
    return Vec::blendv(q, p, (p < q) | (p != p));
  };
  Vec y = xa + s;
  y = min_nan(max_nan(y, x - e), x + e);
  const Vec t = Vec::blendv(y, zero, zero > y);  // clamp01 (pgd_step.h)
  return Vec::blendv(t, one, one < t);
}

// y[i0:i1] for one sample's scalars (a, e); float / double.
template <typename scalar_t>
inline void run_segment(const scalar_t* xa, const scalar_t* g, const scalar_t* x, scalar_t* y,
                        int64_t i0, int64_t i1, scalar_t a, scalar_t e) {
  using Vec = Vectorized<scalar_t>;
  const Vec va(a), vna(-a), ve(e);
  int64_t i = i0;
  for (; i + Vec::size() <= i1; i += Vec::size()) {
    pgd_step_vec<scalar_t>(Vec::loadu(xa + i), Vec::loadu(g + i), Vec::loadu(x + i), va, vna, ve)
        .store(y + i);
  }
  for (; i < i1; ++i) y[i] = pgd_step_one<scalar_t>(xa[i], g[i], x[i], a, e);
}

// Half / BFloat16: load, widen to two float vectors, compute, narrow once.
template <typename scalar_t>
inline void run_segment_reduced(const scalar_t* xa, const scalar_t* g, const scalar_t* x,
                                scalar_t* y, int64_t i0, int64_t i1, float a, float e) {
  using Vec = Vectorized<scalar_t>;
  using FVec = Vectorized<float>;
  const FVec va(a), vna(-a), ve(e);
  int64_t i = i0;
  for (; i + Vec::size() <= i1; i += Vec::size()) {
    auto [xa0, xa1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(xa + i));
    auto [g0, g1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(g + i));
    auto [x0, x1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(x + i));
    at::vec::convert_from_float<scalar_t>(pgd_step_vec<float>(xa0, g0, x0, va, vna, ve),
                                          pgd_step_vec<float>(xa1, g1, x1, va, vna, ve))
        .store(y + i);
  }
  for (; i < i1; ++i) {
    y[i] = static_cast<scalar_t>(pgd_step_one<float>(
        static_cast<float>(xa[i]), static_cast<float>(g[i]), static_cast<float>(x[i]), a, e));
  }
}

at::Tensor pgd_step_cpu(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                        const at::Tensor& step_size, const at::Tensor& eps) {
  check_pgd_step_args(x_adv, grad, x_nat, step_size, eps);
  TORCH_CHECK(x_adv.device().is_cpu(), "pgd_step_cpu: expected CPU tensors");
  const at::Tensor xa = x_adv.contiguous(), g = grad.contiguous(), x = x_nat.contiguous();
  at::Tensor y = at::empty(xa.sizes(), xa.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = xa.numel();
  if (n == 0) return y;
  const int64_t batch = xa.dim() > 0 ? xa.size(0) : 1;
  const int64_t inner = n / batch;  // elements per sample

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xa.scalar_type(), "pgd_step_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto op_dtype = c10::CppTypeToScalarType<opmath_t>::value;
    // alpha / eps rounded to opmath like the composite's Python-scalar arithmetic.
    const at::Tensor a_t = step_size.to(at::kCPU, op_dtype).contiguous();
    const at::Tensor e_t = eps.to(at::kCPU, op_dtype).contiguous();
    const opmath_t* a_p = a_t.data_ptr<opmath_t>();
    const opmath_t* e_p = e_t.data_ptr<opmath_t>();
    const int64_t a_stride = a_t.dim() == 0 ? 0 : 1, e_stride = e_t.dim() == 0 ? 0 : 1;
    const scalar_t* xa_p = xa.const_data_ptr<scalar_t>();
    const scalar_t* g_p = g.const_data_ptr<scalar_t>();
    const scalar_t* x_p = x.const_data_ptr<scalar_t>();
    scalar_t* y_p = y.mutable_data_ptr<scalar_t>();
    // 32k elements per task: ~0.5 MB of traffic, well above the thread hand-off cost.
    at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      while (i < end) {
        const int64_t b = i / inner;
        const int64_t seg_end = std::min(end, (b + 1) * inner);
        const opmath_t a = a_p[b * a_stride], e = e_p[b * e_stride];
        if constexpr (std::is_same_v<scalar_t, opmath_t>) {
          run_segment<scalar_t>(xa_p, g_p, x_p, y_p, i, seg_end, a, e);
        } else {
          run_segment_reduced<scalar_t>(xa_p, g_p, x_p, y_p, i, seg_end, a, e);
        }
        i = seg_end;
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(cdp_fast, CPU, m) {
  m.impl("pgd_step", &pgd_step_cpu);
}

}  // namespace cdp_fast
