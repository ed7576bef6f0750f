// CUDA kernel of bertfast_C::embed (schema and semantics: csrc/embed.cpp).
//
// One warp per packed token, 4 tokens per 128-thread block. Each lane gathers its slice of the word, type and
// position rows with 16-byte loads (when E is a multiple of the vector width; 1 element otherwise), sums them in
// fp32 registers, and the warp computes the LayerNorm statistics with shuffles (two passes over registers: mean,
// then the centred second moment). Rows up to kMaxItems * 32 * VEC elements stay in registers (E <= 1024 for
// every dtype); longer rows take the re-gathering variant (kMaxItems == 0), which reads the rows three times.
// Index checking: see cuda_common.cuh (a bad id is never dereferenced; the host raises a named error).
#include <torch/library.h>

#include <array>

#include "../embed.h"
#include "cuda_common.cuh"

namespace bertfast {
namespace cuda {
namespace {

constexpr int kTokensPerBlock = 4;

template <typename T, int VEC>
struct Loader {
  // Loads VEC consecutive elements at p (aligned to VEC * sizeof(T) when VEC > 1) into v as fp32.
  __device__ __forceinline__ static void load(const T* __restrict__ p, float* v) {
    if constexpr (VEC == 1) {
      v[0] = to_f(p[0]);
    } else {
      Vec16<T> raw = *reinterpret_cast<const Vec16<T>*>(p);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = to_f(raw.v[j]);
    }
  }
  __device__ __forceinline__ static void store(T* __restrict__ p, const float* v) {
    if constexpr (VEC == 1) {
      p[0] = from_f<T>(v[0]);
    } else {
      Vec16<T> raw;
#pragma unroll
      for (int j = 0; j < VEC; ++j) raw.v[j] = from_f<T>(v[j]);
      *reinterpret_cast<Vec16<T>*>(p) = raw;
    }
  }
};

// h[0..VEC) = (word + type) + pos at column c (fp32, transformers' order).
template <typename T, int VEC>
__device__ __forceinline__ void gather(const T* __restrict__ wr, const T* __restrict__ tr, const T* __restrict__ pr,
                                       int64_t c, float* h) {
  float a[VEC], b[VEC];
  Loader<T, VEC>::load(wr + c, h);
  if (tr != nullptr) {
    Loader<T, VEC>::load(tr + c, a);
#pragma unroll
    for (int j = 0; j < VEC; ++j) h[j] += a[j];
  }
  Loader<T, VEC>::load(pr + c, b);
#pragma unroll
  for (int j = 0; j < VEC; ++j) h[j] += b[j];
}

// word [V, E], pos [P, E], type [TT, E] or null; ids/pos_ids/type_ids [N] (type_ids may be null: type 0);
// indices [T]; out [T, E]; mean, rstd [T]; err: set to 1 on any out-of-range index (null: no flag, check=False).
template <typename T, int VEC, int kMaxItems>
__global__ void __launch_bounds__(kWarp * kTokensPerBlock)
    embed_kernel(const int64_t* __restrict__ input_ids, const int64_t* __restrict__ indices,
                 const int64_t* __restrict__ position_ids, const int64_t* __restrict__ token_type_ids,
                 const T* __restrict__ word, const T* __restrict__ pos, const T* __restrict__ type,
                 const T* __restrict__ ln_w, const T* __restrict__ ln_b, T* __restrict__ out,
                 float* __restrict__ mean_out, float* __restrict__ rstd_out, int* __restrict__ err, int64_t n,
                 int64_t t_total, int64_t e, int64_t vocab, int64_t n_pos, int64_t n_types, float eps) {
  const int lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock + threadIdx.x / kWarp;
  if (t >= t_total) return;
  T* orow = out + t * e;

  // Resolve and check the ids (every lane reads the same words: one broadcast transaction each).
  const int64_t i = indices[t];
  bool ok = i >= 0 && i < n;
  int64_t wid = 0, pid = 0, tid = 0;
  if (ok) {
    wid = input_ids[i];
    pid = position_ids[i];
    tid = token_type_ids != nullptr ? token_type_ids[i] : 0;
    ok = wid >= 0 && wid < vocab && pid >= 0 && pid < n_pos && (type == nullptr || (tid >= 0 && tid < n_types));
  }
  if (!ok) {
    if (lane == 0) {
      if (err != nullptr) *err = 1;
      mean_out[t] = NAN;
      rstd_out[t] = NAN;
    }
    for (int64_t c = lane; c < e; c += kWarp) orow[c] = from_f<T>(NAN);
    return;
  }
  const T* wr = word + wid * e;
  const T* pr = pos + pid * e;
  const T* tr = type != nullptr ? type + tid * e : nullptr;
  const float inv_e = 1.0f / static_cast<float>(e);
  constexpr int kStride = kWarp * VEC;

  if constexpr (kMaxItems > 0) {
    float h[kMaxItems][VEC];
    float s = 0.0f;
#pragma unroll
    for (int it = 0; it < kMaxItems; ++it) {
      const int64_t c = static_cast<int64_t>(it) * kStride + lane * VEC;
      if (c < e) {
        gather<T, VEC>(wr, tr, pr, c, h[it]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) s += h[it][j];
      }
    }
    const float mean = warp_sum(s) * inv_e;
    float ss = 0.0f;
#pragma unroll
    for (int it = 0; it < kMaxItems; ++it) {
      const int64_t c = static_cast<int64_t>(it) * kStride + lane * VEC;
      if (c < e) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = h[it][j] - mean;
          ss += d * d;
        }
      }
    }
    const float rstd = rsqrtf(warp_sum(ss) * inv_e + eps);
#pragma unroll
    for (int it = 0; it < kMaxItems; ++it) {
      const int64_t c = static_cast<int64_t>(it) * kStride + lane * VEC;
      if (c < e) {
        float w[VEC], b[VEC], y[VEC];
        Loader<T, VEC>::load(ln_w + c, w);
        Loader<T, VEC>::load(ln_b + c, b);
#pragma unroll
        for (int j = 0; j < VEC; ++j) y[j] = (h[it][j] - mean) * rstd * w[j] + b[j];
        Loader<T, VEC>::store(orow + c, y);
      }
    }
    if (lane == 0) {
      mean_out[t] = mean;
      rstd_out[t] = rstd;
    }
  } else {
    float h[VEC];
    float s = 0.0f;
    for (int64_t c = lane * VEC; c < e; c += kStride) {
      gather<T, VEC>(wr, tr, pr, c, h);
#pragma unroll
      for (int j = 0; j < VEC; ++j) s += h[j];
    }
    const float mean = warp_sum(s) * inv_e;
    float ss = 0.0f;
    for (int64_t c = lane * VEC; c < e; c += kStride) {
      gather<T, VEC>(wr, tr, pr, c, h);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = h[j] - mean;
        ss += d * d;
      }
    }
    const float rstd = rsqrtf(warp_sum(ss) * inv_e + eps);
    for (int64_t c = lane * VEC; c < e; c += kStride) {
      float w[VEC], b[VEC], y[VEC];
      gather<T, VEC>(wr, tr, pr, c, h);
      Loader<T, VEC>::load(ln_w + c, w);
      Loader<T, VEC>::load(ln_b + c, b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) y[j] = (h[j] - mean) * rstd * w[j] + b[j];
      Loader<T, VEC>::store(orow + c, y);
    }
    if (lane == 0) {
      mean_out[t] = mean;
      rstd_out[t] = rstd;
    }
  }
}

template <typename T, int VEC, int kMaxItems>
void launch(const at::Tensor& input_ids, const at::Tensor& indices, const at::Tensor& position_ids,
            const std::optional<at::Tensor>& token_type_ids, const at::Tensor& word_emb, const at::Tensor& pos_emb,
            const std::optional<at::Tensor>& type_emb, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
            at::Tensor& out, at::Tensor& mean, at::Tensor& rstd, at::Tensor& err, const EmbedShapes& s, float eps,
            cudaStream_t stream) {
  using AT = typename std::conditional<std::is_same<T, float>::value, float,
                                       typename std::conditional<std::is_same<T, __half>::value, at::Half,
                                                                 at::BFloat16>::type>::type;
  auto ptr = [](const at::Tensor& x) { return reinterpret_cast<const T*>(x.data_ptr<AT>()); };
  const dim3 grid(static_cast<unsigned>((s.t + kTokensPerBlock - 1) / kTokensPerBlock));
  embed_kernel<T, VEC, kMaxItems><<<grid, kWarp * kTokensPerBlock, 0, stream>>>(
      input_ids.data_ptr<int64_t>(), indices.data_ptr<int64_t>(), position_ids.data_ptr<int64_t>(),
      token_type_ids.has_value() ? token_type_ids->data_ptr<int64_t>() : nullptr, ptr(word_emb), ptr(pos_emb),
      type_emb.has_value() ? ptr(*type_emb) : nullptr, ptr(ln_weight), ptr(ln_bias),
      reinterpret_cast<T*>(out.data_ptr<AT>()), mean.data_ptr<float>(), rstd.data_ptr<float>(), error_flag_ptr(err),
      s.n, s.t, s.e, word_emb.size(0), pos_emb.size(0), type_emb.has_value() ? type_emb->size(0) : 0, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch_shape(const at::Tensor& input_ids, const at::Tensor& indices, const at::Tensor& position_ids,
                    const std::optional<at::Tensor>& token_type_ids, const at::Tensor& word_emb,
                    const at::Tensor& pos_emb, const std::optional<at::Tensor>& type_emb, const at::Tensor& ln_weight,
                    const at::Tensor& ln_bias, at::Tensor& out, at::Tensor& mean, at::Tensor& rstd, at::Tensor& err,
                    const EmbedShapes& s, float eps, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  // 16-byte loads need every row start aligned: E a multiple of the vector width and aligned base pointers.
  bool aligned = s.e % kVec == 0;
  const std::array<const at::Tensor*, 5> tensors{&word_emb, &pos_emb, &ln_weight, &ln_bias, &out};
  for (const at::Tensor* p : tensors) aligned = aligned && reinterpret_cast<uintptr_t>(p->data_ptr()) % 16 == 0;
  if (type_emb.has_value()) aligned = aligned && reinterpret_cast<uintptr_t>(type_emb->data_ptr()) % 16 == 0;
#define BERTFAST_EMBED_LAUNCH(V, M)                                                                          \
  launch<T, V, M>(input_ids, indices, position_ids, token_type_ids, word_emb, pos_emb, type_emb, ln_weight, \
                  ln_bias, out, mean, rstd, err, s, eps, stream)
  if (aligned) {
    // kMaxItems * 32 * kVec elements per row in registers: 1024 with 8 items for fp32, 4 items for 16-bit types.
    constexpr int kItems = 1024 / (kWarp * kVec);
    if (s.e <= kItems * kWarp * kVec) {
      BERTFAST_EMBED_LAUNCH(kVec, kItems);
    } else {
      BERTFAST_EMBED_LAUNCH(kVec, 0);
    }
  } else if (s.e <= 1024) {
    BERTFAST_EMBED_LAUNCH(1, 32);
  } else {
    BERTFAST_EMBED_LAUNCH(1, 0);
  }
#undef BERTFAST_EMBED_LAUNCH
}

constexpr const char* kFwd = "bertfast_C::embed";

std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_cuda(
    const at::Tensor& input_ids, const at::Tensor& indices, const at::Tensor& position_ids,
    const std::optional<at::Tensor>& token_type_ids, const at::Tensor& word_emb, const at::Tensor& pos_emb,
    const std::optional<at::Tensor>& type_emb, const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps,
    bool check) {
  TORCH_CHECK(word_emb.is_cuda(), kFwd, ": word_emb must be a CUDA tensor, got ", word_emb.device());
  const EmbedShapes s = check_embed_args(kFwd, input_ids, indices, position_ids, token_type_ids, word_emb, pos_emb,
                                         type_emb, ln_weight);
  check_feature_vector(kFwd, "ln_bias", ln_bias, word_emb, s.e);
  TORCH_CHECK(eps >= 0.0, kFwd, ": eps must be >= 0, got ", eps);
  c10::cuda::CUDAGuard device_guard(word_emb.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto out = at::empty({s.t, s.e}, word_emb.options());
  auto mean = at::empty({s.t}, word_emb.options().dtype(at::kFloat));
  auto rstd = at::empty({s.t}, word_emb.options().dtype(at::kFloat));
  if (s.t == 0) return {out, mean, rstd};
  auto err = new_error_flag(word_emb, stream, check);
  const float feps = static_cast<float>(eps);
  switch (word_emb.scalar_type()) {
    case at::kFloat:
      dispatch_shape<float>(input_ids, indices, position_ids, token_type_ids, word_emb, pos_emb, type_emb, ln_weight,
                            ln_bias, out, mean, rstd, err, s, feps, stream);
      break;
    case at::kHalf:
      dispatch_shape<__half>(input_ids, indices, position_ids, token_type_ids, word_emb, pos_emb, type_emb,
                             ln_weight, ln_bias, out, mean, rstd, err, s, feps, stream);
      break;
    default:
      dispatch_shape<__nv_bfloat16>(input_ids, indices, position_ids, token_type_ids, word_emb, pos_emb, type_emb,
                                    ln_weight, ln_bias, out, mean, rstd, err, s, feps, stream);
      break;
  }
  if (read_error_flag(err, stream) != 0) {
    // Error path only: name the bad value from CPU copies (raises), or report what the kernel saw.
    embed_check_ids_on_cpu(kFwd, input_ids, indices, position_ids, token_type_ids, word_emb.size(0),
                           pos_emb.size(0), type_emb.has_value() ? type_emb->size(0) : 0);
    TORCH_CHECK(false, kFwd, ": an id was out of range on the device (changed since the launch?)");
  }
  return {out, mean, rstd};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(bertfast_C, CUDA, m) { m.impl("embed", &cuda::embed_cuda); }

}  // namespace bertfast
