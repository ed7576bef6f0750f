// bertfast_C::bias_act / bias_act_backward: bias add + activation in one pass (the FFN up-projection epilogue).
//
//   bias_act(Tensor x, Tensor? bias, str activation) -> Tensor
//     x [..., H] float32/float16/bfloat16, contiguous; bias [H] of x's dtype or None.
//     y = act(x + bias), x's shape and dtype, computed in fp32 and rounded once.
//     activation: "gelu" (exact, through cpu::gelu_parts), "gelu_tanh", "relu", "silu", or "" (a plain bias add).
//
//   bias_act_(Tensor(a!) x, Tensor? bias, str activation) -> ()
//     x = act(x + bias) in place, for inference: the GEMM output it overwrites is dead once read, and a large new
//     output costs fresh pages (a [4000, 3072] fp32 one: 17 ms of page faults against 4 ms of work, NOTES change 23).
//
//   bias_act_backward(Tensor dy, Tensor x, Tensor? bias, str activation) -> (Tensor dx, Tensor? dbias)
//     dx = dy * act'(x + bias) (x's dtype); dbias = sum of dx over all rows [H] (None when bias is None),
//     accumulated in fp32 in fixed row blocks reduced in order: deterministic for any thread count.
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cpu_kernels.h"

namespace bertfast {
namespace {

constexpr const char* kFwd = "bertfast_C::bias_act";
constexpr const char* kBwd = "bertfast_C::bias_act_backward";
constexpr const char* kInPlace = "bertfast_C::bias_act_";

// Returns the row length H (the last dimension of x).
int64_t check_bias_act(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  check_float_dtype(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension [..., H], got a 0-d tensor");
  check_contiguous(op, "x", x);
  const int64_t h = x.size(-1);
  if (bias.has_value()) check_feature_vector(op, "bias", *bias, x, h);
  return h;
}

// The row loops, every pointer a __restrict parameter.
// y = act(x + b) over a chunk of n elements (cpu::chunked_row; N an int64_t or a compile-time constant).
template <Activation A, typename T, typename N>
BF_INLINE void act_span(const T* __restrict x, const float* __restrict b, N n, T* __restrict y) {
  for (int64_t i = 0; i < static_cast<int64_t>(n); ++i) {
    y[i] = static_cast<T>(cpu::act_f<A>(static_cast<float>(x[i]) + b[i]));
  }
}

// x = act(x + b) in place over a chunk of n elements.
template <Activation A, typename T, typename N>
BF_INLINE void act_span_inplace(T* __restrict x, const float* __restrict b, N n) {
  for (int64_t i = 0; i < static_cast<int64_t>(n); ++i) {
    x[i] = static_cast<T>(cpu::act_f<A>(static_cast<float>(x[i]) + b[i]));
  }
}

// dx = dy * act'(x + b) over a row of n elements; acc += dx (the dbias partial).
template <Activation A, typename T>
BF_INLINE void act_grad_row(const T* __restrict dy, const T* __restrict x, const float* __restrict b, int64_t n,
                            T* __restrict dx, float* __restrict acc) {
  for (int64_t i = 0; i < n; ++i) {
    const float d = static_cast<float>(dy[i]) * cpu::act_grad_f<A>(static_cast<float>(x[i]) + b[i]);
    dx[i] = static_cast<T>(d);
    acc[i] += d;
  }
}

// y = act(x + bias) into y, which is x itself for the in-place op.
void run_bias_act(const at::Tensor& x, const std::optional<at::Tensor>& bias, Activation act, int64_t h,
                  const at::Tensor& y) {
  if (x.numel() == 0) return;
  const int64_t n = x.numel() / h;
  const bool in_place = y.is_same(x);
  BERTFAST_DISPATCH_FLOAT_TYPES(x.scalar_type(), "bias_act_cpu", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
    T* yp = y.data_ptr<T>();
    cpu::dispatch_activation(act, [&](auto act_c) {
      constexpr Activation A = decltype(act_c)::value;
      cpu::parallel_rows(n, cpu::row_grain(h), [=](int64_t begin, int64_t end) {
        std::vector<float> b(h, 0.0f);
        if (bp) cpu::load_row(bp, b.data(), h);
        const float* bf = b.data();
        for (int64_t row = begin; row < end; ++row) {
          const T* xr = xp + row * h;
          T* yr = yp + row * h;
          auto prefetch = [&](int64_t c0, int64_t c1) { cpu::prefetch_ahead(xr, c0, c1); };
          if (in_place) {
            cpu::chunked_row(h, prefetch, [&](int64_t c0, auto len) { act_span_inplace<A>(yr + c0, bf + c0, len); });
          } else {
            cpu::chunked_row(h, prefetch, [&](int64_t c0, auto len) { act_span<A>(xr + c0, bf + c0, len, yr + c0); });
          }
        }
      });
    });
  });
}

}  // namespace

at::Tensor bias_act_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias, const std::string& activation) {
  check_device(kFwd, "x", x, at::Device(at::kCPU));
  const int64_t h = check_bias_act(kFwd, x, bias);
  const Activation act = parse_activation(kFwd, activation);
  auto y = at::empty_like(x);
  run_bias_act(x, bias, act, h, y);
  return y;
}

void bias_act_inplace_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias, const std::string& activation) {
  check_device(kInPlace, "x", x, at::Device(at::kCPU));
  const int64_t h = check_bias_act(kInPlace, x, bias);
  const Activation act = parse_activation(kInPlace, activation);
  // each thread copies the bias when it starts: a bias inside x could already be overwritten by then
  TORCH_CHECK(!bias.has_value() || at::get_overlap_status(x, *bias) == at::MemOverlapStatus::No, kInPlace,
              ": bias must not share memory with x, which is written in place");
  run_bias_act(x, bias, act, h, x);
}

std::tuple<at::Tensor, std::optional<at::Tensor>> bias_act_backward_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                                       const std::optional<at::Tensor>& bias,
                                                                       const std::string& activation) {
  check_device(kBwd, "x", x, at::Device(at::kCPU));
  const int64_t h = check_bias_act(kBwd, x, bias);
  check_device(kBwd, "dy", dy, x.device());
  check_dtype(kBwd, "dy", dy, x.scalar_type());
  TORCH_CHECK(dy.sizes() == x.sizes(), kBwd, ": dy must have x's shape ", x.sizes(), ", got ", dy.sizes());
  check_contiguous(kBwd, "dy", dy);
  const Activation act = parse_activation(kBwd, activation);
  auto dx = at::empty_like(x);
  std::optional<at::Tensor> dbias;
  if (bias.has_value()) dbias = at::empty({h}, bias->options());
  const int64_t n = h > 0 ? x.numel() / h : 0;
  const cpu::RowBlocks blocks = cpu::row_blocks(n);
  at::Tensor partials;
  if (bias.has_value()) partials = at::zeros({std::max<int64_t>(blocks.n_blocks, 1), h}, x.options().dtype(at::kFloat));

  BERTFAST_DISPATCH_FLOAT_TYPES(x.scalar_type(), "bias_act_backward_cpu", [&] {
    using T = scalar_t;
    const T* dyp = dy.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
    T* dxp = dx.data_ptr<T>();
    float* pp = bias.has_value() ? partials.data_ptr<float>() : nullptr;
    cpu::dispatch_activation(act, [&](auto act_c) {
      constexpr Activation A = decltype(act_c)::value;
      cpu::parallel_rows(blocks.n_blocks, 1, [=](int64_t block_begin, int64_t block_end) {
        // fp32 bias (zeros when absent); without a bias the column sums go to a scratch row nobody reads
        std::vector<float> buf(pp ? h : 2 * h, 0.0f);
        float* __restrict b = buf.data();
        if (bp) cpu::load_row(bp, b, h);
        for (int64_t blk = block_begin; blk < block_end; ++blk) {
          float* __restrict acc = pp ? pp + blk * h : b + h;
          const int64_t row_end = std::min(n, (blk + 1) * blocks.rows_per_block);
          for (int64_t row = blk * blocks.rows_per_block; row < row_end; ++row) {
            // not chunked or prefetched as the forward is: no gain here (NOTES change 22)
            act_grad_row<A>(dyp + row * h, xp + row * h, b, h, dxp + row * h, acc);
          }
        }
      });
    });
    if (dbias) cpu::reduce_partials(partials.data_ptr<float>(), blocks.n_blocks, h, 0, h, dbias->data_ptr<T>());
  });
  return {dx, dbias};
}

TORCH_LIBRARY_FRAGMENT(bertfast_C, m) {
  m.def("bias_act(Tensor x, Tensor? bias, str activation) -> Tensor");
  m.def("bias_act_(Tensor(a!) x, Tensor? bias, str activation) -> ()");
  m.def("bias_act_backward(Tensor dy, Tensor x, Tensor? bias, str activation) -> (Tensor dx, Tensor? dbias)");
}

TORCH_LIBRARY_IMPL(bertfast_C, CPU, m) {
  m.impl("bias_act", &bias_act_cpu);
  m.impl("bias_act_", &bias_act_inplace_cpu);
  m.impl("bias_act_backward", &bias_act_backward_cpu);
}

}  // namespace bertfast
