// bertfast_C::attention_dropout_keep: the attention's dropout keep-mask on the CPU, the one the Triton attention
// kernels draw for the same seed (kernels/attention.py, _dropout_keep).
//
//   attention_dropout_keep(int first_token, int count, int length, int heads, float dropout_p, int seed, *,
//                          Device? device=None) -> Tensor
//     count consecutive packed sequences of `length` tokens each, the first starting at token row first_token.
//     Returns bool [count, heads, length, length]: [b, h, i, j] is True where the probability of query i
//     attending to key j (both local to sequence b) is kept, i.e. where the Philox-4x32-7 uniform of counter
//     (j, first_token + b * length + i, h, 0) under key (seed lo, seed hi) is >= dropout_p.
//     dropout_p in [0, 1], seed in [0, 2^63), first_token + count * length <= 2^31 (the kernels' int32 token
//     index), heads >= 1.
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu_kernels.h"

namespace bertfast {
namespace {

constexpr const char* kOp = "bertfast_C::attention_dropout_keep";
constexpr int kAttentionPhiloxRounds = 7;  // kernels/attention.py PHILOX_ROUNDS

}  // namespace

at::Tensor attention_dropout_keep_cpu(int64_t first_token, int64_t count, int64_t length, int64_t heads,
                                      double dropout_p, int64_t seed, std::optional<at::Device> device) {
  TORCH_CHECK(first_token >= 0 && count >= 0 && length >= 0, kOp,
              ": first_token, count and length must be >= 0, got ", first_token, ", ", count, ", ", length);
  TORCH_CHECK(heads >= 1, kOp, ": heads must be >= 1, got ", heads);
  constexpr int64_t kMaxTokens = int64_t{1} << 31;  // the attention kernels index packed tokens with int32
  TORCH_CHECK(first_token <= kMaxTokens && (length == 0 || count <= (kMaxTokens - first_token) / length), kOp,
              ": the tokens first_token + count * length (", first_token, " + ", count, " * ", length,
              ") must be <= 2^31 (the attention kernels index packed tokens with int32)");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, kOp, ": dropout_p must be in [0, 1], got ", dropout_p);
  TORCH_CHECK(seed >= 0, kOp, ": seed must be in [0, 2^63), got ", seed);
  TORCH_CHECK(!device.has_value() || device->is_cpu() || device->is_meta(), kOp,
              ": device must be the CPU (the mask is drawn there), got ", *device);
  if (device.has_value() && device->is_meta()) {  // FakeTensorMode's path for ops without tensor inputs
    return at::empty({count, heads, length, length}, at::TensorOptions().dtype(at::kBool).device(at::kMeta));
  }
  const cpu::Dropout drop(dropout_p, seed);
  auto keep = at::empty({count, heads, length, length}, at::TensorOptions().dtype(at::kBool));
  const int64_t rows = count * heads * length;  // one row of `length` keys per (sequence, head, query)
  if (rows == 0) return keep;
  if (dropout_p == 0.0) return keep.fill_(true);  // every uniform is >= 0
  uint8_t* kp = reinterpret_cast<uint8_t*>(keep.data_ptr<bool>());
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / length), [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> bits((length + 7) / 8);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (heads * length), h = (row / length) % heads, i = row % length;
      // counter (key j, query token, head): the query token is the high word of the running 64-bit counter
      const uint64_t query = static_cast<uint64_t>(first_token + b * length + i);
      drop.keep_bits<kAttentionPhiloxRounds>(query << 32, static_cast<uint32_t>(h), length, bits.data());
      cpu::bytes_from_bits(bits.data(), length, kp + row * length);
    }
  });
  return keep;
}

// No tensor argument to dispatch on: a CompositeExplicitAutograd kernel serves every call (a CPU tensor comes
// back). FakeTensorMode (torch.compile) treats an op with no tensor argument that returns one as a factory
// function: it calls the op itself with device=meta instead of the registered fake kernel, hence the
// keyword-only device (None or cpu: the CPU mask; meta: an empty meta tensor of the mask's shape).
TORCH_LIBRARY_FRAGMENT(bertfast_C, m) {
  m.def("attention_dropout_keep(int first_token, int count, int length, int heads, float dropout_p, int seed, *, "
        "Device? device=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(bertfast_C, CompositeExplicitAutograd, m) {
  m.impl("attention_dropout_keep", &attention_dropout_keep_cpu);
}

}  // namespace bertfast
