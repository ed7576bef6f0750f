// Helpers shared by the CUDA kernels of bertfast._C: 16-byte vector access, warp reductions, and the error flag
// through which kernels report bad indices.
//
// Index checking on the GPU (embed, unpad, pad) - the trade-off, decided here once:
//   * Kernels check every index they are about to use. A bad one is never dereferenced: the kernel writes NaN
//     (embed) or zeros (unpad/pad) for that row and sets a device flag (one int, zeroed with cudaMemsetAsync
//     before the launch).
//   * After the launch the host reads the flag back (4 bytes, one stream sync, ~10 us) and raises a TORCH_CHECK
//     error naming the argument, the bad value, its position and the valid range (found on the error path only,
//     by checking a CPU copy). This sync is the price of a real Python exception instead of a device-side assert,
//     which would kill the CUDA context (torch's nn.Embedding behaviour).
//   * While the stream is being captured into a CUDA graph, no sync is allowed: the read-back is skipped, the
//     kernel still never reads out of bounds, and a bad id shows as NaN rows (embed) in the output.
//   A host-side min/max before the launch was rejected: it costs the same sync plus an extra pass and kernel.
//   * A caller that has checked the values already passes check=False (bertfast's encoder: every id, position and
//     token type in one host read per batch, and indices it built from the mask): no flag (the kernels get
//     nullptr), no memset, no read-back and no sync. A bad value is still never dereferenced (NaN or zero rows).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace bertfast {
namespace cuda {

constexpr int kWarp = 32;

template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

// Map ATen's scalar types to CUDA's (same bits).
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// True when the current stream is capturing a CUDA graph (no synchronising read-back allowed then).
inline bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// The kernels' error flag: a zeroed device int, or an undefined tensor (no flag) when the caller passed check=False.
inline at::Tensor new_error_flag(const at::Tensor& like, cudaStream_t stream, bool check = true) {
  if (!check) return at::Tensor();
  auto flag = at::empty({1}, like.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(flag.data_ptr<int>(), 0, sizeof(int), stream));
  return flag;
}

// The pointer the kernels set (nullptr: no flag; they test it before writing).
inline int* error_flag_ptr(const at::Tensor& flag) { return flag.defined() ? flag.data_ptr<int>() : nullptr; }

// Reads the flag back (one sync) unless there is none or the stream is capturing; returns its value (0: no
// error). Through c10's memcpy_and_sync, so torch.cuda.set_sync_debug_mode sees the sync.
inline int read_error_flag(const at::Tensor& flag, cudaStream_t stream) {
  if (!flag.defined() || stream_is_capturing(stream)) return 0;
  int host = 0;
  c10::cuda::memcpy_and_sync(&host, flag.data_ptr<int>(), sizeof(int), cudaMemcpyDeviceToHost, stream);
  return host;
}

}  // namespace cuda
}  // namespace bertfast
