// CUDA kernel of cdp_fast::pgd_step (compiled only by CUDAExtension builds: setup.py and
// cdp_fast/ops/pgd_step.py add *.cu sources only when torch.version.cuda and CUDA_HOME are set).
//
// Grid-stride elementwise loop, one read of x_adv, grad, x_nat and one write of y per
// element, math in opmath (float for half/bfloat16). alpha / eps are either kernel arguments
// (0-dim CPU tensors: no device sync, no H2D copy) or device arrays indexed per sample
// (stride 0 for a 0-dim device tensor, 1 for shape (B,)).
//
// Only the CUDA runtime and c10's stream/guard headers: ATen/cuda/CUDAContext.h would pull in
// cublas_v2.h, cusparse.h and cusolverDn.h, which a minimal toolkit (nvcc + cudart, as on a
// build machine without the math libraries) lacks; the kernel needs only the current stream
// and the SM count. scripts/build_csrc_sm90.sh compiles this file for sm_90 without a GPU.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>

#include "pgd_step.h"

namespace cdp_fast {
namespace {

template <typename opmath_t>
struct PerSample {
  const opmath_t* ptr;  // nullptr: use value
  int64_t stride;       // 0 (one value) or 1 (per sample)
  opmath_t value;
  __device__ __forceinline__ opmath_t at(int64_t b) const {
    return ptr == nullptr ? value : ptr[b * stride];
  }
};

template <typename scalar_t, typename opmath_t>
__global__ void pgd_step_kernel(const scalar_t* __restrict__ xa, const scalar_t* __restrict__ g,
                                const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                int64_t n, int64_t inner, PerSample<opmath_t> alpha,
                                PerSample<opmath_t> eps) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const int64_t b = i / inner;
    y[i] = static_cast<scalar_t>(pgd_step_one<opmath_t>(
        static_cast<opmath_t>(xa[i]), static_cast<opmath_t>(g[i]), static_cast<opmath_t>(x[i]),
        alpha.at(b), eps.at(b)));
  }
}

// Keeps the tensor holding a device copy alive while the kernel is enqueued.
template <typename opmath_t>
PerSample<opmath_t> per_sample_arg(const at::Tensor& t, const at::Tensor& like, at::Tensor& keep) {
  const auto op_dtype = c10::CppTypeToScalarType<opmath_t>::value;
  if (t.dim() == 0 && t.device().is_cpu()) {
    return {nullptr, 0, static_cast<opmath_t>(t.item<double>())};
  }
  keep = t.to(like.device(), op_dtype).contiguous();
  return {keep.const_data_ptr<opmath_t>(), keep.dim() == 0 ? 0 : 1, opmath_t(0)};
}

at::Tensor pgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                         const at::Tensor& step_size, const at::Tensor& eps) {
  check_pgd_step_args(x_adv, grad, x_nat, step_size, eps);
  TORCH_CHECK(x_adv.is_cuda(), "pgd_step_cuda: expected CUDA tensors");
  const c10::cuda::CUDAGuard device_guard(x_adv.device());
  const at::Tensor xa = x_adv.contiguous(), g = grad.contiguous(), x = x_nat.contiguous();
  at::Tensor y = at::empty(xa.sizes(), xa.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = xa.numel();
  if (n == 0) return y;
  const int64_t batch = xa.dim() > 0 ? xa.size(0) : 1;
  const int64_t inner = n / batch;
  const int threads = 256;
  int sms = 0;  // an attribute query: no sync, legal during CUDA graph capture
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x_adv.get_device()));
  const int64_t max_blocks = static_cast<int64_t>(sms) * 8;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, max_blocks));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x_adv.get_device()).stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xa.scalar_type(), "pgd_step_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    at::Tensor keep_a, keep_e;
    const auto a = per_sample_arg<opmath_t>(step_size, xa, keep_a);
    const auto e = per_sample_arg<opmath_t>(eps, xa, keep_e);
    pgd_step_kernel<scalar_t, opmath_t><<<blocks, threads, 0, stream>>>(
        xa.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        y.mutable_data_ptr<scalar_t>(), n, inner, a, e);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(cdp_fast, CUDA, m) {
  m.impl("pgd_step", &pgd_step_cuda);
}

}  // namespace cdp_fast
