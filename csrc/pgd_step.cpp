// Schema of the cdp_fast operator library (TORCH_LIBRARY); the kernels are registered per
// device in pgd_step_cpu.cpp (CPU) and pgd_step_cuda.cu (CUDA, CUDAExtension builds only).
// The fake (meta) implementation that torch.compile traces with is registered in Python:
// cdp_fast/ops/pgd_step.py, torch.library.register_fake("cdp_fast::pgd_step").
//
// No autograd kernel is registered: PGD steps take the gradient as an input and run under
// torch.no_grad().
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Lets `import cdp_fast._C` load the library (registering the op) when it is built by
// setup.py as a Python extension module; the JIT build loads it with torch.ops.load_library.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "cdp_fast C++/CUDA ops (registered in torch.ops.cdp_fast)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(cdp_fast, m) {
  // Where the fake implementation lives, so torch can import it when it needs it.
  m.set_python_module("cdp_fast.ops.pgd_step");
  // step_size, eps: shape () (one value) or (B,) (per sample, broadcast over dims 1..);
  // any floating dtype, rounded to x_adv's opmath type. Returns a new contiguous tensor.
  m.def("pgd_step(Tensor x_adv, Tensor grad, Tensor x_nat, Tensor step_size, Tensor eps) -> Tensor");
}
