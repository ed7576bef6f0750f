// bertfast_C::add_layer_norm_backward on the CPU (schema and semantics: csrc/add_layer_norm.cpp). A translation
// unit of its own so that the build compiles it beside the forward (csrc/add_layer_norm.h, NOTES change 34).
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "add_layer_norm.h"

namespace bertfast {
namespace {

using ln::check_common;
using ln::check_dropout;
using ln::opt_ptr;

constexpr const char* kBwd = "bertfast_C::add_layer_norm_backward";

// a row statistic (mean / rstd): float32 [N] on x's device, contiguous
void check_stats(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  check_device(op, name, t, x.device());
  check_dtype(op, name, t, at::kFloat);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0), op, ": ", name, " must have shape [", x.size(0),
              "] (one per row of x), got ", t.sizes());
  check_contiguous(op, name, t);
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
            const float s2 = cpu::ln_backward_factor(s, h);
            T* __restrict dxr = dxp + row * h;
            if (drp) {
              backward_pass2<true, true>(dyr, w, xhat, ag, s2, mg, mgx, h, dxr, drp + row * h, dxb_acc);
            } else if (scaled) {
              backward_pass2<false, true>(dyr, w, xhat, ag, s2, mg, mgx, h, dxr, drp, dxb_acc);
            } else {
              backward_pass2<false, false>(dyr, w, xhat, ag, s2, mg, mgx, h, dxr, drp, dxb_acc);
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

TORCH_LIBRARY_IMPL(bertfast_C, CPU, m) {
  m.impl("add_layer_norm_backward", &add_layer_norm_backward_cpu);
}

}  // namespace bertfast
