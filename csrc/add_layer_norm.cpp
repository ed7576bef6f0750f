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
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu_kernels.h"

namespace bertfast {
namespace {

constexpr const char* kFwd = "bertfast_C::add_layer_norm";
constexpr const char* kBwd = "bertfast_C::add_layer_norm_backward";

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

void check_stats(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  check_device(op, name, t, x.device());
  check_dtype(op, name, t, at::kFloat);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0), op, ": ", name, " must have shape [", x.size(0),
              "] (one per row of x), got ", t.sizes());
  check_contiguous(op, name, t);
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

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

// Backward pass 1 over a row: recompute h = dropout(act(x + x_bias)) + residual and xhat; the two row sums of
// the LayerNorm backward (sg = sum g, sgx = sum g xhat, g = dy w); the dweight / dbias partials; xhat and
// ag = dropout factor * act'(x + x_bias) for pass 2.
template <Activation A, bool kDropout, typename T>
BF_INLINE void backward_pass1(const T* __restrict x, const T* __restrict r, const T* __restrict dy,
                              const float* __restrict xb, const float* __restrict w, float m, float s,
                              const float* __restrict f, int64_t n, float* __restrict dw_acc, float* __restrict db_acc,
                              float* __restrict xhat, float* __restrict ag, float& sg_out, float& sgx_out) {
  float sg = 0.0f, sgx = 0.0f;
#pragma omp simd reduction(+ : sg, sgx)
  for (int64_t i = 0; i < n; ++i) {
    const float a = static_cast<float>(x[i]) + xb[i];
    const float fi = kDropout ? f[i] : 1.0f;
    const float xh = (cpu::act_f<A>(a) * fi + static_cast<float>(r[i]) - m) * s;
    const float d = static_cast<float>(dy[i]);
    const float g = d * w[i];
    sg += g;
    sgx += g * xh;
    dw_acc[i] += d * xh;
    db_acc[i] += d;
    xhat[i] = xh;
    if constexpr (kDropout || A != Activation::kNone) ag[i] = fi * cpu::act_grad_f<A>(a);
  }
  sg_out = sg;
  sgx_out = sgx;
}

// Backward pass 2 over one row: dh = rstd (g - mean(g) - xhat mean(g xhat)); dresidual = dh (kResidualGrad);
// dx = dh * ag (kScaled: an activation or dropout; else dx = dh); the dx_bias partial.
template <bool kResidualGrad, bool kScaled, typename T>
BF_INLINE void backward_pass2(const T* __restrict dyr, const float* __restrict w, const float* __restrict xhat,
                              const float* __restrict ag, float s, float mg, float mgx, int64_t h,
                              T* __restrict dxr, T* __restrict drr, float* __restrict dxb_acc) {
  for (int64_t i = 0; i < h; ++i) {
    const float dh = s * (static_cast<float>(dyr[i]) * w[i] - mg - xhat[i] * mgx);
    const float dxv = kScaled ? dh * ag[i] : dh;
    if constexpr (kResidualGrad) drr[i] = static_cast<T>(dh);
    dxr[i] = static_cast<T>(dxv);
    dxb_acc[i] += dxv;
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

std::tuple<at::Tensor, std::optional<at::Tensor>, at::Tensor, at::Tensor, std::optional<at::Tensor>>
add_layer_norm_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& mean, const at::Tensor& rstd,
                            const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& x_bias,
                            const std::string& activation, double dropout_p, int64_t seed,
                            const std::optional<at::Tensor>& keep) {
  check_device(kBwd, "x", x, at::Device(at::kCPU));
  check_common(kBwd, x, weight, residual, x_bias);
  check_device(kBwd, "dy", dy, x.device());
  check_dtype(kBwd, "dy", dy, x.scalar_type());
  TORCH_CHECK(dy.sizes() == x.sizes(), kBwd, ": dy must have x's shape ", x.sizes(), ", got ", dy.sizes());
  check_contiguous(kBwd, "dy", dy);
  check_stats(kBwd, "mean", mean, x);
  check_stats(kBwd, "rstd", rstd, x);
  const Activation act = parse_activation(kBwd, activation);
  const cpu::Dropout drop = check_dropout(kBwd, dropout_p, seed);
  const int64_t n = x.size(0), h = x.size(1);
  const int64_t keep_row = (h + 7) / 8;
  const uint8_t* kp = nullptr;  // the forward's keep bits, when given
  if (keep.has_value() && keep->numel() > 0) {
    TORCH_CHECK(drop.on, kBwd, ": keep (the forward's dropout keep bits) must be None or empty when dropout_p is 0");
    check_device(kBwd, "keep", *keep, x.device());
    check_dtype(kBwd, "keep", *keep, at::kByte);
    TORCH_CHECK(keep->dim() == 2 && keep->size(0) == n && keep->size(1) == keep_row, kBwd,
                ": keep must be the forward's keep bits, shape [", n, ", ", keep_row, "] (ceil(H / 8) bytes a row), got ",
                keep->sizes());
    check_contiguous(kBwd, "keep", *keep);
    kp = keep->data_ptr<uint8_t>();
  }

  auto dx = at::empty_like(x);
  // dx = dh * g with g = dropout factor * act'(a); dresidual = dh differs from dx only where g is not 1
  const bool scaled = act != Activation::kNone || drop.on;
  const bool want_dres = residual.has_value() && scaled;
  std::optional<at::Tensor> dres;
  if (want_dres) dres = at::empty_like(x);
  auto dweight = at::empty({h}, weight.options());
  auto dbias = at::empty({h}, weight.options());
  std::optional<at::Tensor> dxb;
  if (x_bias.has_value()) dxb = at::empty({h}, x_bias->options());

  const cpu::RowBlocks blocks = cpu::row_blocks(n);
  const int64_t stride = 3 * h;  // per block: dweight, dbias, dx_bias partials
  auto partials = at::zeros({std::max<int64_t>(blocks.n_blocks, 1), stride}, x.options().dtype(at::kFloat));

  BERTFAST_DISPATCH_FLOAT_TYPES(x.scalar_type(), "add_layer_norm_backward_cpu", [&] {
    using T = scalar_t;
    const T* dyp = dy.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    const T* rp = opt_ptr<T>(residual);
    const T* xbp = opt_ptr<T>(x_bias);
    const T* wp = weight.data_ptr<T>();
    const float* mp = mean.data_ptr<float>();
    const float* sp = rstd.data_ptr<float>();
    T* dxp = dx.data_ptr<T>();
    T* drp = want_dres ? dres->data_ptr<T>() : nullptr;
    float* pp = partials.data_ptr<float>();
    const float inv_h = 1.0f / static_cast<float>(h);
    cpu::dispatch_activation(act, [&](auto act_c) {
      constexpr Activation A = decltype(act_c)::value;
      cpu::parallel_rows(blocks.n_blocks, 1, [=](int64_t block_begin, int64_t block_end) {
        // fp32 weight and x_bias (zeros when absent); per row: xhat and g = dropout factor * act'(x + x_bias).
        // A missing residual reads a row of zeros, so one loop serves both cases.
        std::vector<float> buf(5 * h, 0.0f);
        float* __restrict w = buf.data();
        float* __restrict xb = w + h;
        float* __restrict xhat = xb + h;
        float* __restrict ag = xhat + h;
        float* __restrict fr = ag + h;  // the row's dropout factors
        std::vector<T> zero_row(rp ? 0 : h, T(0));
        std::vector<uint8_t> row_bits(kp ? 0 : keep_row);  // the row's keep bits, when drawn here
        cpu::load_row(wp, w, h);
        if (xbp) cpu::load_row(xbp, xb, h);
        for (int64_t blk = block_begin; blk < block_end; ++blk) {
          float* __restrict dw_acc = pp + blk * stride;
          float* __restrict db_acc = dw_acc + h;
          float* __restrict dxb_acc = db_acc + h;
          const int64_t row_end = std::min(n, (blk + 1) * blocks.rows_per_block);
          for (int64_t row = blk * blocks.rows_per_block; row < row_end; ++row) {
            const T* __restrict xr = xp + row * h;
            const T* __restrict rr = rp ? rp + row * h : zero_row.data();
            const T* __restrict dyr = dyp + row * h;
            const float m = mp[row], s = sp[row];
            // pass 1 (not chunked or prefetched as the forward is: that was slower here, NOTES change 22):
            // recompute h = dropout(act(x + x_bias)) + residual, xhat; the two row sums of the
            // LayerNorm backward; the dweight / dbias partials
            float sg = 0.0f, sgx = 0.0f;
            const uint64_t base = static_cast<uint64_t>(row) * static_cast<uint64_t>(h);
            if (drop.on) {
              if (kp) {
                drop.fill_from_bits(kp + row * keep_row, h, fr);
              } else {
                drop.fill(base, h, fr, row_bits.data());
              }
              backward_pass1<A, true>(xr, rr, dyr, xb, w, m, s, fr, h, dw_acc, db_acc, xhat, ag, sg, sgx);
            } else {
              backward_pass1<A, false>(xr, rr, dyr, xb, w, m, s, fr, h, dw_acc, db_acc, xhat, ag, sg, sgx);
            }
            // pass 2 (dresidual is only written where it differs from dx, i.e. when scaled)
            const float mg = sg * inv_h, mgx = sgx * inv_h;
            T* __restrict dxr = dxp + row * h;
            if (drp) {
              backward_pass2<true, true>(dyr, w, xhat, ag, s, mg, mgx, h, dxr, drp + row * h, dxb_acc);
            } else if (scaled) {
              backward_pass2<false, true>(dyr, w, xhat, ag, s, mg, mgx, h, dxr, drp, dxb_acc);
            } else {
              backward_pass2<false, false>(dyr, w, xhat, ag, s, mg, mgx, h, dxr, drp, dxb_acc);
            }
          }
        }
      });
    });
    const float* cp = partials.data_ptr<float>();
    cpu::reduce_partials(cp, blocks.n_blocks, stride, 0, h, dweight.data_ptr<T>());
    cpu::reduce_partials(cp, blocks.n_blocks, stride, h, h, dbias.data_ptr<T>());
    if (dxb) cpu::reduce_partials(cp, blocks.n_blocks, stride, 2 * h, h, dxb->data_ptr<T>());
  });
  return {dx, dres, dweight, dbias, dxb};
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
  m.impl("add_layer_norm_backward", &add_layer_norm_backward_cpu);
}

}  // namespace bertfast
