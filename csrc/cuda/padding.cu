// CUDA kernels of bertfast_C::unpad / pad (schemas and semantics: csrc/padding.cpp).
//
// Both are one row gather: dst[r] = src[map[r]] (zeros where map[r] == -1 for pad). One warp per destination row,
// 8 rows per 256-thread block, the row copied in the widest unit (16, 8, 4, 2 or 1 bytes) that divides the row
// size and the base pointers' alignment. pad first inverts indices into map [n_rows] (int32, -1 = padding row),
// so every output byte is written exactly once and a duplicate index is detected (atomicExch) instead of racing.
// Index checking: see cuda_common.cuh (bad indices are never dereferenced; the host raises a named error).
#include <torch/library.h>

#include "../checks.h"
#include "cuda_common.cuh"

namespace bertfast {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 8;

// dst [n_dst, units] <- src [n_src, units]; map [n_dst] (int64 indices for unpad, int32 inverse map for pad).
// kPadding: map[r] == -1 means a zero row; any other value outside [0, n_src) sets *err (err null: no flag).
template <typename U, typename I, bool kPadding>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock)
    gather_rows_kernel(const U* __restrict__ src, U* __restrict__ dst, const I* __restrict__ map,
                       int64_t n_dst, int64_t n_src, int64_t units, int* __restrict__ err) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= n_dst) return;
  const int64_t s = static_cast<int64_t>(map[r]);
  U* d = dst + r * units;
  const bool ok = s >= 0 && s < n_src;
  if (!ok) {
    if (!(kPadding && s == -1) && lane == 0 && err != nullptr) *err = 1;
    const U zero{};
    for (int64_t c = lane; c < units; c += kWarp) d[c] = zero;
    return;
  }
  const U* sr = src + s * units;
  for (int64_t c = lane; c < units; c += kWarp) d[c] = sr[c];
}

// inverse[indices[t]] = t; an index outside [0, n_rows) or seen twice sets *err (err null: no flag; a duplicate
// then leaves one of its tokens' rows, whichever wrote last).
__global__ void invert_indices_kernel(const int64_t* __restrict__ indices, int32_t* __restrict__ inverse, int64_t t,
                                      int64_t n_rows, int* __restrict__ err) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= t) return;
  const int64_t i = indices[k];
  if (i < 0 || i >= n_rows) {
    if (err != nullptr) *err = 1;
    return;
  }
  if (atomicExch(inverse + i, static_cast<int32_t>(k)) != -1 && err != nullptr) *err = 2;
}

struct Bytes2 { uint16_t v; };
struct Bytes1 { uint8_t v; };

template <typename I, bool kPadding>
void launch_gather(const void* src, void* dst, const I* map, int64_t n_dst, int64_t n_src, int64_t row_bytes,
                   int* err, cudaStream_t stream) {
  if (n_dst == 0 || row_bytes == 0) return;
  const uintptr_t align = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst);
  const dim3 grid(static_cast<unsigned>((n_dst + kRowsPerBlock - 1) / kRowsPerBlock));
  const dim3 block(kWarp * kRowsPerBlock);
#define BERTFAST_GATHER(U)                                                                                    \
  gather_rows_kernel<U, I, kPadding><<<grid, block, 0, stream>>>(                                            \
      static_cast<const U*>(src), static_cast<U*>(dst), map, n_dst, n_src, row_bytes / int64_t(sizeof(U)), err); \
  C10_CUDA_KERNEL_LAUNCH_CHECK()
  if (row_bytes % 16 == 0 && align % 16 == 0) {
    BERTFAST_GATHER(uint4);
  } else if (row_bytes % 8 == 0 && align % 8 == 0) {
    BERTFAST_GATHER(uint2);
  } else if (row_bytes % 4 == 0 && align % 4 == 0) {
    BERTFAST_GATHER(uint32_t);
  } else if (row_bytes % 2 == 0 && align % 2 == 0) {
    BERTFAST_GATHER(Bytes2);
  } else {
    BERTFAST_GATHER(Bytes1);
  }
#undef BERTFAST_GATHER
}

// Bytes of one row of a tensor with at least one row and no zero-size dimension.
int64_t row_bytes_of(const at::Tensor& x) { return x.numel() / x.size(0) * static_cast<int64_t>(x.element_size()); }

constexpr const char* kUnpad = "bertfast_C::unpad";
constexpr const char* kPad = "bertfast_C::pad";

// The CPU ops' index checks, with their named errors, on a host copy of the indices (one read-back): where the
// kernels only flagged a bad index, and where there is nothing to launch.
void check_unpad_indices_on_host(const at::Tensor& indices, int64_t n) {
  auto cpu = indices.to(at::kCPU);
  check_index_values_cpu(kUnpad, "indices", cpu.data_ptr<int64_t>(), cpu.numel(), n, "rows of x");
}

void check_pad_indices_on_host(const at::Tensor& indices, int64_t n_rows) {
  auto cpu = indices.to(at::kCPU);
  padded_sources_cpu(kPad, "indices", cpu.data_ptr<int64_t>(), cpu.numel(), n_rows);
}

at::Tensor unpad_cuda(const at::Tensor& x, const at::Tensor& indices, bool check) {
  TORCH_CHECK(x.is_cuda(), kUnpad, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 1, kUnpad, ": x must have at least one dimension [N, ...], got a 0-d tensor");
  check_contiguous(kUnpad, "x", x);
  check_index_tensor(kUnpad, "indices", indices, x, 1, "[T]");
  c10::cuda::CUDAGuard device_guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = x.size(0), t = indices.size(0);
  auto sizes = x.sizes().vec();
  sizes[0] = t;
  auto out = at::empty(sizes, x.options());
  if (t == 0) return out;
  if (out.numel() == 0) {  // rows of zero width: nothing to copy; the indices are still checked, on the host
    if (check && !stream_is_capturing(stream)) check_unpad_indices_on_host(indices, n);  // (none in a capture)
    return out;
  }
  // the row size from out, which has rows: x may have none (then every index is out of range and flagged)
  auto err = new_error_flag(x, stream, check);
  launch_gather<int64_t, false>(x.data_ptr(), out.data_ptr(), indices.data_ptr<int64_t>(), t, n,
                                row_bytes_of(out), error_flag_ptr(err), stream);
  if (read_error_flag(err, stream) != 0) {
    check_unpad_indices_on_host(indices, n);
    TORCH_CHECK(false, kUnpad, ": indices held a value out of range on the device (changed since the launch?)");
  }
  return out;
}

at::Tensor pad_cuda(const at::Tensor& x, const at::Tensor& indices, int64_t n_rows, bool check) {
  TORCH_CHECK(x.is_cuda(), kPad, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 1, kPad, ": x must have at least one dimension [T, ...], got a 0-d tensor");
  check_contiguous(kPad, "x", x);
  check_index_tensor(kPad, "indices", indices, x, 1, "[T]");
  TORCH_CHECK(n_rows >= 0, kPad, ": n_rows must be >= 0, got ", n_rows);
  TORCH_CHECK(n_rows < (int64_t{1} << 31), kPad, ": n_rows must be < 2^31 on CUDA, got ", n_rows);
  const int64_t t = x.size(0);
  TORCH_CHECK(indices.size(0) == t, kPad, ": indices must have one entry per row of x (", t, "), got ",
              indices.size(0));
  c10::cuda::CUDAGuard device_guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto sizes = x.sizes().vec();
  sizes[0] = n_rows;
  auto out = at::empty(sizes, x.options());
  if (out.numel() == 0) {  // no rows or rows of zero width: nothing to write; the indices are still checked
    if (check && t > 0 && !stream_is_capturing(stream)) check_pad_indices_on_host(indices, n_rows);
    return out;
  }
  auto err = new_error_flag(x, stream, check);
  auto inverse = at::empty({n_rows}, x.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(inverse.data_ptr<int32_t>(), 0xff, n_rows * sizeof(int32_t), stream));  // -1
  if (t > 0) {
    invert_indices_kernel<<<static_cast<unsigned>((t + 255) / 256), 256, 0, stream>>>(
        indices.data_ptr<int64_t>(), inverse.data_ptr<int32_t>(), t, n_rows, error_flag_ptr(err));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch_gather<int32_t, true>(x.data_ptr(), out.data_ptr(), inverse.data_ptr<int32_t>(), n_rows, t,
                               row_bytes_of(out), error_flag_ptr(err), stream);
  if (read_error_flag(err, stream) != 0) {
    check_pad_indices_on_host(indices, n_rows);  // names the bad value, or the duplicate and its two positions
    TORCH_CHECK(false, kPad, ": indices held a bad value on the device (changed since the launch?)");
  }
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(bertfast_C, CUDA, m) {
  m.impl("unpad", &cuda::unpad_cuda);
  m.impl("pad", &cuda::pad_cuda);
}

}  // namespace bertfast
