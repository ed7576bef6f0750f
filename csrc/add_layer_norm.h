// Shared by the two translation units of bertfast_C::add_layer_norm: csrc/add_layer_norm.cpp (the forward, the
// schemas, the input checks) and csrc/add_layer_norm_backward.cpp (the backward). Each holds a copy of its kernel
// for every activation x dropout x dtype x ISA, so in one file they were the build's longest compile (189 s alone
// on the 2-core VM; 100 s and 134 s apart), and a parallel build now compiles them side by side (NOTES change 34).
#pragma once

#include <optional>

#include "checks.h"
#include "cpu_kernels.h"

namespace bertfast {
namespace ln {

// x [N, H] float, contiguous, H > 0; weight [H], residual [N, H] and x_bias [H] (when given) on x's device, of
// its dtype
void check_common(const char* op, const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& x_bias);
// dropout_p in [0, 1], seed in [0, 2^63) when dropout_p > 0
cpu::Dropout check_dropout(const char* op, double dropout_p, int64_t seed);

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

}  // namespace ln
}  // namespace bertfast
