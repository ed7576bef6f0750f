// bertfast_C::add_layer_norm / add_layer_norm_backward: bias + activation + residual + LayerNorm in one pass.
//
//   add_layer_norm(Tensor x, Tensor weight, Tensor bias, float eps, Tensor? residual, Tensor? x_bias,
//                  str activation, float dropout_p=0., int seed=0)
//       -> (Tensor y, Tensor mean, Tensor rstd, Tensor keep)
//     x [N, H] float32/float16/bfloat16, contiguous; weight, bias, x_bias [H] and residual [N, H] of x's dtype.
//     h = dropout(act(x + x_bias)) + residual   (x_bias / residual skipped when None)
//     dropout (training): element (r, c) is kept, times 1 / (1 - dropout_p), when Philox-uniform(seed, r * H + c)
//     >= dropout_p (cpu_kernels.h: the same draw as the Triton kernels, so the same elements are kept on the
//     CPU and the GPU); dropout_p in [0, 1], seed in [0, 2^63).
//     y = (h - mean) * rstd * weight + bias   [N, H] x's dtype;  mean, rstd [N] float32 (statistics in fp32,
//     rstd = 1 / sqrt(var + eps), biased variance). activation: "" (none), "gelu" (exact erf), "gelu_tanh",
//     "relu", "silu".
//     keep: the dropout keep-mask packed in bits, uint8 [N, ceil(H / 8)], bit c % 8 of byte (r, c / 8) set where
//     element (r, c) is kept (the bits past H zero), for the backward to read instead of running Philox again
//     (~2 ms of 3 for a 4096 x 768 backward; 1/32 of an fp32 x's bytes); uint8 [0] without dropout.
//
//   add_layer_norm_backward(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd, Tensor? residual,
//                           Tensor? x_bias, str activation, float dropout_p=0., int seed=0, Tensor? keep=None)
//       -> (Tensor dx, Tensor? dresidual, Tensor dweight, Tensor dbias, Tensor? dx_bias)
//     h is recomputed from x, x_bias, residual and the dropout mask: keep, the forward's keep output for this
//     seed, when given (with dropout on), else regenerated from the seed (the same factors either way).
//     dh = dL/dh (the LayerNorm backward).
//     dx = dh * dropout factor * act'(x + x_bias)   [N, H] x's dtype
//     dresidual = dh (the gradient of the pre-LN sum) [N, H] x's dtype when residual is given and there is an
//                 activation or dropout; else None. Without either dh equals dx, and outputs of an op must not
//                 alias: the caller uses dx for both (bertfast/ops.py) instead of paying for a second store.
//     dweight, dbias [H] weight's dtype; dx_bias = sum over rows of dx [H] (None when x_bias is None).
//     The column sums are deterministic: fixed row blocks (depending on N only) reduced in order.
//
// The backward's kernel is in csrc/add_layer_norm_backward.cpp (csrc/add_layer_norm.h: why two files).
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "add_layer_norm.h"

namespace bertfast {
namespace ln {

void check_common(const char* op, const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& x_bias) {
  check_float_dtype(op, "x", x);
  check_dim(op, "x", x, 2, "[N, H]");
  check_contiguous(op, "x", x);
  const int64_t n = x.size(0), h = x.size(1);
  TORCH_CHECK(h > 0, op, ": x must have a non-empty last dimension, got shape ", x.sizes());
  check_feature_vector(op, "weight", weight, x, h);
  if (residual.has_value()) {
    check_device(op, "residual", *residual, x.device());
    check_dtype(op, "residual", *residual, x.scalar_type());
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == n && residual->size(1) == h, op,
                ": residual must have x's shape ", x.sizes(), ", got ", residual->sizes());
    check_contiguous(op, "residual", *residual);
  }
  if (x_bias.has_value()) check_feature_vector(op, "x_bias", *x_bias, x, h);
}

cpu::Dropout check_dropout(const char* op, double dropout_p, int64_t seed) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, op, ": dropout_p must be in [0, 1], got ", dropout_p);
  TORCH_CHECK(dropout_p == 0.0 || seed >= 0, op, ": seed must be in [0, 2^63) when dropout_p > 0, got ", seed);
  return cpu::Dropout(dropout_p, seed);
}

}  // namespace ln

namespace {

using ln::check_common;
using ln::check_dropout;
using ln::opt_ptr;

constexpr const char* kFwd = "bertfast_C::add_layer_norm";

// The helpers below take every input as a __restrict parameter: nothing is read through a closure that the row
// stores might alias (GCC then reloads it per element and does not vectorise the loop).

// Forward, over a chunk of n elements (cpu::chunked_row; N an int64_t or a compile-time constant): the
// pre-LayerNorm h = dropout(act(x + x_bias)) + residual (r: the residual, a row of zeros when absent; f: the
// dropout factors, Dropout::fill, read only when kDropout).
template <Activation A, bool kDropout, typename T, typename N>
BF_INLINE void pre_norm_span(const T* __restrict x, const float* __restrict xb, const T* __restrict r,
                             const float* __restrict f, N n, float* __restrict hr) {
#pragma omp simd
  for (int64_t i = 0; i < static_cast<int64_t>(n); ++i) {
    const float fi = kDropout ? f[i] : 1.0f;
    hr[i] = cpu::act_f<A>(static_cast<float>(x[i]) + xb[i]) * fi + static_cast<float>(r[i]);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& x_bias,
    const std::string& activation, double dropout_p, int64_t seed) {
  check_device(kFwd, "x", x, at::Device(at::kCPU));
  check_common(kFwd, x, weight, residual, x_bias);
  check_feature_vector(kFwd, "bias", bias, x, x.size(1));
  TORCH_CHECK(eps >= 0.0, kFwd, ": eps must be >= 0, got ", eps);
  const Activation act = parse_activation(kFwd, activation);
  const cpu::Dropout drop = check_dropout(kFwd, dropout_p, seed);
  const int64_t n = x.size(0), h = x.size(1);
  auto y = at::empty_like(x);
  auto mean = at::empty({n}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({n}, x.options().dtype(at::kFloat));
  const int64_t keep_row = (h + 7) / 8;  // bytes of keep bits a row
  const std::vector<int64_t> keep_shape = drop.on ? std::vector<int64_t>{n, keep_row} : std::vector<int64_t>{0};
  auto keep = at::empty(keep_shape, x.options().dtype(at::kByte));
  if (n == 0) return {y, mean, rstd, keep};
  const float feps = static_cast<float>(eps);

  BERTFAST_DISPATCH_FLOAT_TYPES(x.scalar_type(), "add_layer_norm_cpu", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    const T* rp = opt_ptr<T>(residual);
    const T* xbp = opt_ptr<T>(x_bias);
    const T* wp = weight.data_ptr<T>();
    const T* bp = bias.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    float* mp = mean.data_ptr<float>();
    float* sp = rstd.data_ptr<float>();
    uint8_t* kp = drop.on ? keep.data_ptr<uint8_t>() : nullptr;
    cpu::dispatch_activation(act, [&](auto act_c) {
      constexpr Activation A = decltype(act_c)::value;
      cpu::parallel_rows(n, cpu::row_grain(h), [=](int64_t begin, int64_t end) {
        // fp32 copies of weight, bias, x_bias (zeros when absent), h row, the row's dropout factors; a row of
        // zeros for a missing residual.
        std::vector<float> buf(5 * h, 0.0f);
        float* w = buf.data();
        float* b = w + h;
        float* xb = b + h;
        float* hr = xb + h;
        float* fr = hr + h;
        std::vector<T> zero_row(rp ? 0 : h, T(0));
        cpu::load_row(wp, w, h);
        cpu::load_row(bp, b, h);
        if (xbp) cpu::load_row(xbp, xb, h);
        for (int64_t row = begin; row < end; ++row) {
          const T* xr = xp + row * h;
          const T* rr = rp ? rp + row * h : zero_row.data();
          const uint64_t base = static_cast<uint64_t>(row) * static_cast<uint64_t>(h);
          // x and the residual (not the zero row standing in for a missing one) prefetched ahead
          auto prefetch = [&](int64_t c0, int64_t c1) {
            cpu::prefetch_ahead(xr, c0, c1);
            if (rp) cpu::prefetch_ahead(rr, c0, c1);
          };
          if (drop.on) {
            drop.fill(base, h, fr, kp + row * keep_row);
            cpu::chunked_row(h, prefetch, [&](int64_t c0, auto len) {
              pre_norm_span<A, true>(xr + c0, xb + c0, rr + c0, fr + c0, len, hr + c0);
            });
          } else {
            cpu::chunked_row(h, prefetch, [&](int64_t c0, auto len) {
              pre_norm_span<A, false>(xr + c0, xb + c0, rr + c0, fr + c0, len, hr + c0);
            });
          }
          float m, s;
          cpu::row_moments(hr, h, feps, m, s);
          mp[row] = m;
          sp[row] = s;
          cpu::row_normalize(hr, m, s, w, b, yp + row * h, h);
        }
      });
    });
  });
  return {y, mean, rstd, keep};
}

// For tests: the dropout factors (0 or 1 / (1 - p)) of the n elements at flat offsets base, base + 1, ... as the
// kernels above draw them, through the vectorised Philox of this CPU's ISA (BERTFAST_CPU_ISA lowers it).
at::Tensor dropout_factors(double dropout_p, int64_t seed, int64_t base, int64_t n) {
  const cpu::Dropout drop = check_dropout("bertfast_C::_dropout_factors", dropout_p, seed);
  TORCH_CHECK(base >= 0 && n >= 0, "bertfast_C::_dropout_factors: base and n must be >= 0, got ", base, ", ", n);
  auto out = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  std::vector<uint8_t> bits((n + 7) / 8);
  drop.fill(static_cast<uint64_t>(base), n, out.data_ptr<float>(), bits.data());
  return out;
}

TORCH_LIBRARY_FRAGMENT(bertfast_C, m) {
  m.def("_dropout_factors(float dropout_p, int seed, int base, int n) -> Tensor", &dropout_factors);
  m.def(
      "add_layer_norm(Tensor x, Tensor weight, Tensor bias, float eps, Tensor? residual, Tensor? x_bias, "
      "str activation, float dropout_p=0., int seed=0) -> (Tensor y, Tensor mean, Tensor rstd, Tensor keep)");
  m.def(
      "add_layer_norm_backward(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd, Tensor? residual, "
      "Tensor? x_bias, str activation, float dropout_p=0., int seed=0, Tensor? keep=None) -> (Tensor dx, "
      "Tensor? dresidual, "
      "Tensor dweight, Tensor dbias, Tensor? dx_bias)");
}
TORCH_LIBRARY_IMPL(bertfast_C, CPU, m) {
  m.impl("add_layer_norm", &add_layer_norm_cpu);
}

}  // namespace bertfast
