// Input checks shared by the CPU (csrc/<op>.cpp) and CUDA (csrc/cuda/<op>.cu) entry points of bertfast._C.
//
// Every check names the op and the argument, so an error reads like
//   "bertfast_C::embed: input_ids must be int64, got Int".
// Only ATen is included: the .cu files include this header too and must stay cheap to compile.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace bertfast {

// Tensor `t` (called `name` in `op`'s schema) lies on `device`.
inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " like the other inputs, got ",
              t.device());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", s);
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous() first), got strides ",
              t.strides(), " for shape ", t.sizes());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout, ", got shape ", t.sizes());
}

// The usual bundle: same device as `like`, contiguous.
inline void check_on_and_contiguous(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  check_device(op, name, t, like.device());
  check_contiguous(op, name, t);
}

// An int64 index tensor of `dim` dimensions on `like`'s device, contiguous.
inline void check_index_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                               int64_t dim, const char* layout) {
  check_device(op, name, t, like.device());
  check_dtype(op, name, t, at::kLong);
  check_dim(op, name, t, dim, layout);
  check_contiguous(op, name, t);
}

// Range check of the values of a CPU index array. Reports the first bad value with its position.
inline void check_index_values_cpu(const char* op, const char* name, const int64_t* v, int64_t n, int64_t limit,
                                   const char* what) {
  for (int64_t i = 0; i < n; ++i) {
    if (C10_UNLIKELY(v[i] < 0 || v[i] >= limit)) {
      TORCH_CHECK(false, op, ": ", name, " holds ", v[i], " at position ", i, ", outside the valid range [0, ",
                  limit, ") (", what, ")");
    }
  }
}

// pad's index checks on the host, and its inverse: the packed row each of the n_rows output rows receives (-1:
// none, a zero row). Every index in range first (the first bad one reported), then no row twice (both positions).
inline std::vector<int64_t> padded_sources_cpu(const char* op, const char* name, const int64_t* v, int64_t n,
                                               int64_t n_rows) {
  check_index_values_cpu(op, name, v, n, n_rows, "rows of the padded output, n_rows");
  std::vector<int64_t> source;
  try {
    source.assign(static_cast<size_t>(n_rows), -1);
  } catch (const std::exception&) {  // std::length_error / std::bad_alloc: name the argument, not the container
    TORCH_CHECK(false, op, ": n_rows (", n_rows, ") is too large: its row map of ", n_rows,
                " int64 entries cannot be allocated");
  }
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(source[v[i]] < 0, op, ": ", name, " holds row ", v[i], " twice (at positions ", source[v[i]],
                " and ", i, "); the rows of a padded layout are distinct");
    source[v[i]] = i;
  }
  return source;
}

// Activations shared by add_layer_norm and bias_act (CPU and CUDA).
enum class Activation : int { kNone = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3, kSilu = 4 };

inline Activation parse_activation(const char* op, const std::string& name) {
  if (name.empty() || name == "none") return Activation::kNone;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "relu") return Activation::kRelu;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK(false, op, ": activation must be one of \"\" (none), \"gelu\" (exact erf), \"gelu_tanh\", \"relu\", "
              "\"silu\"; got \"", name, "\"");
}

// Checks of an optional per-feature vector (bias, x_bias): 1-D [n], same dtype and device as `like`, contiguous.
inline void check_feature_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                                 int64_t n) {
  check_device(op, name, t, like.device());
  check_dtype(op, name, t, like.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n,
              "] (the last dimension of the input), got ", t.sizes());
  check_contiguous(op, name, t);
}

}  // namespace bertfast
