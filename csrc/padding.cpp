// bertfast_C::unpad / pad: move rows between the padded layout [N = B*S, ...] and the packed one [T, ...].
//
//   unpad(Tensor x, Tensor indices, bool check=True) -> Tensor
//     x [N, ...] any dtype, contiguous; indices int64 [T], each in [0, N). Returns x[indices] [T, ...].
//   pad(Tensor x, Tensor indices, int n_rows, bool check=True) -> Tensor
//     x [T, ...] any dtype, contiguous; indices int64 [T], each in [0, n_rows) and all distinct (checked: a
//     duplicate would make the result depend on the write order). Returns out [n_rows, ...] with
//     out[indices[t]] = x[t] and zeros in every other row (each output byte is written exactly once).
// Rows are copied as bytes, so every dtype works; indices are range-checked before any row is touched.
// check=False: the caller has checked the indices (bertfast's encoder builds them from the mask). The CUDA kernels
// then skip their error flag and its read-back, a stream sync (csrc/cuda/cuda_common.cuh); the CPU kernels check
// regardless: the check costs no sync here, and it is what keeps the memcpys in bounds.
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "checks.h"
#include "cpu_kernels.h"

namespace bertfast {
namespace {

constexpr const char* kUnpad = "bertfast_C::unpad";
constexpr const char* kPad = "bertfast_C::pad";

int64_t row_bytes_of(const at::Tensor& x) {
  return x.dim() == 0 ? 0 : (x.size(0) == 0 ? 0 : x.numel() / x.size(0)) * static_cast<int64_t>(x.element_size());
}

// Rows per parallel chunk so that a chunk copies about 64 KiB.
int64_t copy_grain(int64_t row_bytes) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(row_bytes, 1)); }

}  // namespace

at::Tensor unpad_cpu(const at::Tensor& x, const at::Tensor& indices, bool /*check: always, see above*/) {
  check_device(kUnpad, "x", x, at::Device(at::kCPU));
  TORCH_CHECK(x.dim() >= 1, kUnpad, ": x must have at least one dimension [N, ...], got a 0-d tensor");
  check_contiguous(kUnpad, "x", x);
  check_index_tensor(kUnpad, "indices", indices, x, 1, "[T]");
  const int64_t n = x.size(0), t = indices.size(0);
  const int64_t* ip = indices.data_ptr<int64_t>();
  check_index_values_cpu(kUnpad, "indices", ip, t, n, "rows of x");
  auto sizes = x.sizes().vec();
  sizes[0] = t;
  auto out = at::empty(sizes, x.options());
  const int64_t rb = row_bytes_of(x);
  if (t == 0 || rb == 0) return out;
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, t, copy_grain(rb), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) std::memcpy(dst + i * rb, src + ip[i] * rb, rb);
  });
  return out;
}

at::Tensor pad_cpu(const at::Tensor& x, const at::Tensor& indices, int64_t n_rows, bool /*check*/) {
  check_device(kPad, "x", x, at::Device(at::kCPU));
  TORCH_CHECK(x.dim() >= 1, kPad, ": x must have at least one dimension [T, ...], got a 0-d tensor");
  check_contiguous(kPad, "x", x);
  check_index_tensor(kPad, "indices", indices, x, 1, "[T]");
  TORCH_CHECK(n_rows >= 0, kPad, ": n_rows must be >= 0, got ", n_rows);
  const int64_t t = x.size(0);
  TORCH_CHECK(indices.size(0) == t, kPad, ": indices must have one entry per row of x (", t, "), got ",
              indices.size(0));
  const int64_t* ip = indices.data_ptr<int64_t>();
  const std::vector<int64_t> source = padded_sources_cpu(kPad, "indices", ip, t, n_rows);
  auto sizes = x.sizes().vec();
  sizes[0] = n_rows;
  auto out = at::empty(sizes, x.options());
  const int64_t rb = row_bytes_of(out);
  if (n_rows == 0 || rb == 0) return out;
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* sp = source.data();
  // One pass over the output rows, each written once: a copy, or zeros (consecutive zero rows as one memset).
  // Streaming stores did not pay here (NOTES change 15).
  at::parallel_for(0, n_rows, copy_grain(rb), [&](int64_t begin, int64_t end) {
    int64_t r = begin;
    while (r < end) {
      if (sp[r] >= 0) {
        std::memcpy(dst + r * rb, src + sp[r] * rb, rb);
        ++r;
        continue;
      }
      int64_t z = r + 1;
      while (z < end && sp[z] < 0) ++z;
      std::memset(dst + r * rb, 0, (z - r) * rb);
      r = z;
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(bertfast_C, m) {
  m.def("unpad(Tensor x, Tensor indices, bool check=True) -> Tensor");
  m.def("pad(Tensor x, Tensor indices, int n_rows, bool check=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(bertfast_C, CPU, m) {
  m.impl("unpad", &unpad_cpu);
  m.impl("pad", &pad_cpu);
}

}  // namespace bertfast
