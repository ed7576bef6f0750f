// The module bertfast._C: the Python module object and the operator library `bertfast_C`.
//
// The public ops are `bertfast::<name>` custom ops defined in Python (bertfast/ops.py), which dispatch to a
// backend. The C++ kernels are registered here under their own namespace, `bertfast_C`, so that the public op
// and its C++ implementation never collide; each csrc/<op>.cpp adds its schema with TORCH_LIBRARY_FRAGMENT.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu_kernels.h"

extern "C" {
// Importing bertfast._C runs the static TORCH_LIBRARY registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "bertfast C++/CUDA kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace bertfast {

// Whether this build compiled the CUDA sources; `bertfast info` reports it.
bool built_with_cuda() {
#ifdef BERTFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The instruction set the CPU kernels run with on this machine (BERTFAST_CPU_ISA can only lower it).
std::string cpu_isa() { return cpu::isa_name(cpu::detect_isa()); }

TORCH_LIBRARY(bertfast_C, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("cpu_isa() -> str", &cpu_isa);
}

}  // namespace bertfast
