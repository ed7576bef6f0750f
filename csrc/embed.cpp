// bertfast_C::embed / embed_backward: gather word + token-type + position rows for the packed tokens, sum,
// LayerNorm; all in one pass per token.
//
//   embed(Tensor input_ids, Tensor indices, Tensor position_ids, Tensor? token_type_ids, Tensor word_emb,
//         Tensor pos_emb, Tensor? type_emb, Tensor ln_weight, Tensor ln_bias, float eps, bool check=True)
//       -> (Tensor out, Tensor mean, Tensor rstd)
//     input_ids, position_ids, token_type_ids: int64 [N] (the flattened [B, S] layout, N = B*S), contiguous.
//     indices: int64 [T], the padded positions of the real tokens (bertfast.padding), each in [0, N).
//     word_emb [V, E], pos_emb [P, E], type_emb [TT, E], ln_weight, ln_bias [E]: one float dtype, contiguous.
//     For t in [0, T), i = indices[t]:
//       h = (word_emb[input_ids[i]] + type_emb[token_type_ids[i]]) + pos_emb[position_ids[i]]   (fp32, the
//           order transformers adds them in)
//       out[t] = LayerNorm(h) * ln_weight + ln_bias, out [T, E] in word_emb's dtype; mean, rstd [T] fp32.
//     type_emb None: no token-type part (DistilBERT); token_type_ids None with type_emb given: type 0 for every
//     token (what transformers does); token_type_ids given with type_emb None: error.
//     Every id that is read is checked first: a bad one raises an error naming the argument, the value, its
//     position and the valid range; nothing is read out of bounds. check=False: the caller has checked the ids
//     (bertfast's encoder, once per batch); the CUDA kernel then skips its error flag and the flag's read-back (a
//     stream sync) and writes NaN rows for a bad id instead of raising; the CPU kernel checks regardless (no sync
//     to save; its checks keep the gathers in bounds). RoBERTa's padding-offset positions are just
//     position_ids computed by the caller; ALBERT/ELECTRA's E < hidden is just E.
//
//   embed_backward(Tensor grad_out, Tensor input_ids, Tensor indices, Tensor position_ids, Tensor? token_type_ids,
//                  Tensor word_emb, Tensor pos_emb, Tensor? type_emb, Tensor ln_weight, Tensor mean, Tensor rstd)
//       -> (Tensor d_word_emb, Tensor d_pos_emb, Tensor? d_type_emb, Tensor d_ln_weight, Tensor d_ln_bias)
//     grad_out [T, E] word_emb's dtype; mean, rstd [T] fp32 from embed; the other arguments as given to embed
//     (ln_bias is not needed). h is recomputed from the tables. Dense gradients of the tables' shapes and dtype
//     (rows no token uses are zero); d_type_emb is None when type_emb is None. Deterministic: each table row sums
//     its tokens' gradients in token order in fp32, the LayerNorm parameter gradients are summed in fixed token
//     blocks reduced in order - the same bits for any thread count.
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu_kernels.h"
#include "embed.h"

namespace bertfast {
namespace {

constexpr const char* kFwd = "bertfast_C::embed";
constexpr const char* kBwd = "bertfast_C::embed_backward";

// The ids of the T packed tokens, resolved through indices and range-checked.
struct TokenIds {
  std::vector<int64_t> word, pos, type;  // type empty when there is no type_emb
};

// n_types == 0: no type table.
TokenIds gather_and_check_ids(const char* op, const at::Tensor& input_ids, const at::Tensor& indices,
                              const at::Tensor& position_ids, const std::optional<at::Tensor>& token_type_ids,
                              int64_t vocab, int64_t n_pos, int64_t n_types, int64_t n, int64_t t) {
  const int64_t* ip = indices.data_ptr<int64_t>();
  check_index_values_cpu(op, "indices", ip, t, n, "positions of input_ids, N");
  TokenIds ids;
  ids.word.resize(t);
  ids.pos.resize(t);
  const int64_t* wp = input_ids.data_ptr<int64_t>();
  const int64_t* pp = position_ids.data_ptr<int64_t>();
  for (int64_t k = 0; k < t; ++k) {
    ids.word[k] = wp[ip[k]];
    ids.pos[k] = pp[ip[k]];
  }
  check_index_values_cpu(op, "input_ids (at the positions in indices)", ids.word.data(), t, vocab,
                         "rows of word_emb, the vocabulary size");
  check_index_values_cpu(op, "position_ids (at the positions in indices)", ids.pos.data(), t, n_pos,
                         "rows of pos_emb, max_position_embeddings");
  if (n_types > 0) {
    ids.type.assign(t, 0);
    if (token_type_ids.has_value()) {
      const int64_t* tp = token_type_ids->data_ptr<int64_t>();
      for (int64_t k = 0; k < t; ++k) ids.type[k] = tp[ip[k]];
      check_index_values_cpu(op, "token_type_ids (at the positions in indices)", ids.type.data(), t, n_types,
                             "rows of type_emb, type_vocab_size");
    }
  }
  return ids;
}

int64_t type_rows(const std::optional<at::Tensor>& type_emb) { return type_emb.has_value() ? type_emb->size(0) : 0; }

}  // namespace

void embed_check_ids_on_cpu(const char* op, const at::Tensor& input_ids, const at::Tensor& indices,
                            const at::Tensor& position_ids, const std::optional<at::Tensor>& token_type_ids,
                            int64_t vocab, int64_t n_pos, int64_t n_types) {
  auto cpu = [](const at::Tensor& t) { return t.to(at::kCPU).contiguous(); };
  std::optional<at::Tensor> tt;
  if (token_type_ids.has_value()) tt = cpu(*token_type_ids);
  gather_and_check_ids(op, cpu(input_ids), cpu(indices), cpu(position_ids), tt, vocab, n_pos, n_types,
                       input_ids.size(0), indices.size(0));
}

namespace {

// h row (fp32) of packed token k.
template <typename T>
BF_INLINE void embed_row(const T* word, const T* pos, const T* type, const int64_t* wid, const int64_t* pid,
                         const int64_t* tid, int64_t k, int64_t e, float* __restrict h) {
  const T* wr = word + wid[k] * e;
  const T* pr = pos + pid[k] * e;
  if (type) {
    const T* tr = type + tid[k] * e;
    for (int64_t i = 0; i < e; ++i) {
      h[i] = (static_cast<float>(wr[i]) + static_cast<float>(tr[i])) + static_cast<float>(pr[i]);
    }
  } else {
    for (int64_t i = 0; i < e; ++i) h[i] = static_cast<float>(wr[i]) + static_cast<float>(pr[i]);
  }
}

// out[u] = sum, in token order, of the rows dh[k] of the tokens k with ids[k] == u, for every row u of a table
// of n_rows rows; rows no token uses are zeroed (out need not be initialised). Parallel over (row, 256-column
// chunk) work items, deterministic (each element sums its tokens in token order, whatever the split). Each
// thread zeroes its consecutive unused rows as one range, with streaming stores where that pays: a
// [30522, 768] fp32 word table is 94 MB, and zeroing it first with ordinary stores and then overwriting the used
// rows cost twice the traffic (NOTES change 14).
template <typename T>
void scatter_rows(const std::vector<int64_t>& ids, int64_t n_rows, const float* dh, int64_t e, T* out) {
  const int64_t t = static_cast<int64_t>(ids.size());
  std::vector<int64_t> start(n_rows + 1, 0);
  for (int64_t k = 0; k < t; ++k) ++start[ids[k] + 1];
  for (int64_t u = 0; u < n_rows; ++u) start[u + 1] += start[u];
  std::vector<int64_t> order(t), fill(start.begin(), start.end() - 1);
  for (int64_t k = 0; k < t; ++k) order[fill[ids[k]]++] = k;  // stable: tokens of one id stay in token order
  constexpr int64_t kChunk = 256;
  const int64_t chunks = (e + kChunk - 1) / kChunk;
  const int64_t* sp = start.data();
  const int64_t* op = order.data();
  // Work items split into parts of equal cost (an item costs 1 + its row's tokens), not equal counts: the used
  // rows of a position table are its first rows, and a static split of rows gave them all to one thread.
  const int64_t items = n_rows * chunks;
  const auto cost_before = [=](int64_t item) {  // strictly increasing in item
    const int64_t u = item / chunks;
    return item + chunks * sp[u] + (item % chunks) * (sp[std::min(u + 1, n_rows)] - sp[u]);
  };
  const int64_t total = cost_before(items);
  const int64_t parts = std::min<int64_t>(std::max<int64_t>(items, 1), 4 * at::get_num_threads());
  const auto part_start = [=](int64_t p) {  // first item whose cost_before reaches p / parts of the total
    const int64_t target = total * p / parts;
    int64_t lo = 0, hi = items;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (cost_before(mid) < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  // Streaming stores only where the table's memory is already resident (page_resident: on fresh pages the
  // kernel's own zeroing leaves them in the cache, and ordinary stores are faster).
  // (Its middle: the allocator writes its bookkeeping just before the block, on the first page.)
  const bool stream = n_rows > 0 && cpu::page_resident(out + n_rows * e / 2);
  const auto zero = [stream](T* from, T* to) {
    if (stream) {
      cpu::stream_zero(from, (to - from) * sizeof(T));
    } else {
      std::memset(from, 0, (to - from) * sizeof(T));
    }
  };
  cpu::parallel_rows(parts, 1, [=](int64_t part_begin, int64_t part_end) {
    T* zero_from = nullptr;  // start of the pending run of unused rows' chunks
    T* zero_to = nullptr;
    const int64_t begin = part_start(part_begin), end = part_start(part_end);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t u = item / chunks;
      const int64_t c0 = (item % chunks) * kChunk;
      const int64_t w = std::min(kChunk, e - c0);
      T* dst = out + u * e + c0;
      if (sp[u] == sp[u + 1]) {
        if (dst != zero_to) {
          if (zero_from) zero(zero_from, zero_to);
          zero_from = dst;
        }
        zero_to = dst + w;
        continue;
      }
      // 16 columns at a time summed over the row's tokens in a register (a loop over whole rows into a memory
      // accumulator is unrolled-and-jammed by GCC into scalar code).
      const int64_t j0 = sp[u], j1 = sp[u + 1];
      int64_t c = 0;
      for (; c + 16 <= w; c += 16) {
        float v[16] = {};
        for (int64_t j = j0; j < j1; ++j) {
          const float* row = dh + op[j] * e + c0 + c;
          for (int i = 0; i < 16; ++i) v[i] += row[i];
        }
        cpu::store_row(v, dst + c, 16);
      }
      for (; c < w; ++c) {
        float v = 0.0f;
        for (int64_t j = j0; j < j1; ++j) v += dh[op[j] * e + c0 + c];
        dst[c] = static_cast<T>(v);
      }
    }
    if (zero_from) zero(zero_from, zero_to);
    if (stream) cpu::stream_fence();
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_cpu(
    const at::Tensor& input_ids, const at::Tensor& indices, const at::Tensor& position_ids,
    const std::optional<at::Tensor>& token_type_ids, const at::Tensor& word_emb, const at::Tensor& pos_emb,
    const std::optional<at::Tensor>& type_emb, const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps,
    bool /*check: always on the CPU, see above*/) {
  check_device(kFwd, "word_emb", word_emb, at::Device(at::kCPU));
  const EmbedShapes s = check_embed_args(kFwd, input_ids, indices, position_ids, token_type_ids, word_emb, pos_emb,
                                         type_emb, ln_weight);
  check_feature_vector(kFwd, "ln_bias", ln_bias, word_emb, s.e);
  TORCH_CHECK(eps >= 0.0, kFwd, ": eps must be >= 0, got ", eps);
  const TokenIds ids = gather_and_check_ids(kFwd, input_ids, indices, position_ids, token_type_ids,
                                            word_emb.size(0), pos_emb.size(0), type_rows(type_emb), s.n, s.t);
  auto out = at::empty({s.t, s.e}, word_emb.options());
  auto mean = at::empty({s.t}, word_emb.options().dtype(at::kFloat));
  auto rstd = at::empty({s.t}, word_emb.options().dtype(at::kFloat));
  if (s.t == 0) return {out, mean, rstd};
  const float feps = static_cast<float>(eps);
  const int64_t e = s.e;
  BERTFAST_DISPATCH_FLOAT_TYPES(word_emb.scalar_type(), "embed_cpu", [&] {
    using T = scalar_t;
    const T* word = word_emb.data_ptr<T>();
    const T* pos = pos_emb.data_ptr<T>();
    const T* type = type_emb.has_value() ? type_emb->data_ptr<T>() : nullptr;
    const T* lw = ln_weight.data_ptr<T>();
    const T* lb = ln_bias.data_ptr<T>();
    const int64_t* wid = ids.word.data();
    const int64_t* pid = ids.pos.data();
    const int64_t* tid = ids.type.data();
    T* op = out.data_ptr<T>();
    float* mp = mean.data_ptr<float>();
    float* sp = rstd.data_ptr<float>();
    cpu::parallel_rows(s.t, cpu::row_grain(e), [=](int64_t begin, int64_t end) {
      std::vector<float> buf(3 * e);
      float* w = buf.data();
      float* b = w + e;
      float* h = b + e;
      cpu::load_row(lw, w, e);
      cpu::load_row(lb, b, e);
      for (int64_t k = begin; k < end; ++k) {
        embed_row(word, pos, type, wid, pid, tid, k, e, h);
        float m, r;
        cpu::row_moments(h, e, feps, m, r);
        mp[k] = m;
        sp[k] = r;
        cpu::row_normalize(h, m, r, w, b, op + k * e, e);
      }
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, at::Tensor, at::Tensor> embed_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input_ids, const at::Tensor& indices,
    const at::Tensor& position_ids, const std::optional<at::Tensor>& token_type_ids, const at::Tensor& word_emb,
    const at::Tensor& pos_emb, const std::optional<at::Tensor>& type_emb, const at::Tensor& ln_weight,
    const at::Tensor& mean, const at::Tensor& rstd) {
  check_device(kBwd, "word_emb", word_emb, at::Device(at::kCPU));
  const EmbedShapes s = check_embed_args(kBwd, input_ids, indices, position_ids, token_type_ids, word_emb, pos_emb,
                                         type_emb, ln_weight);
  check_device(kBwd, "grad_out", grad_out, word_emb.device());
  check_dtype(kBwd, "grad_out", grad_out, word_emb.scalar_type());
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == s.t && grad_out.size(1) == s.e, kBwd,
              ": grad_out must have shape [", s.t, ", ", s.e, "] (tokens in indices, E), got ", grad_out.sizes());
  check_contiguous(kBwd, "grad_out", grad_out);
  for (auto [name, st] : {std::pair<const char*, const at::Tensor*>{"mean", &mean}, {"rstd", &rstd}}) {
    check_device(kBwd, name, *st, word_emb.device());
    check_dtype(kBwd, name, *st, at::kFloat);
    TORCH_CHECK(st->dim() == 1 && st->size(0) == s.t, kBwd, ": ", name, " must have shape [", s.t,
                "] (one per token), got ", st->sizes());
    check_contiguous(kBwd, name, *st);
  }
  const TokenIds ids = gather_and_check_ids(kBwd, input_ids, indices, position_ids, token_type_ids,
                                            word_emb.size(0), pos_emb.size(0), type_rows(type_emb), s.n, s.t);
  const int64_t e = s.e, t = s.t;
  // Uninitialised: scatter_rows writes every row.
  auto d_word = at::empty_like(word_emb);
  auto d_pos = at::empty_like(pos_emb);
  std::optional<at::Tensor> d_type;
  if (type_emb.has_value()) d_type = at::empty_like(*type_emb);
  auto d_lw = at::empty({e}, ln_weight.options());
  auto d_lb = at::empty({e}, ln_weight.options());
  auto dh = at::empty({t, e}, word_emb.options().dtype(at::kFloat));
  const cpu::RowBlocks blocks = cpu::row_blocks(t);
  auto partials = at::zeros({std::max<int64_t>(blocks.n_blocks, 1), 2 * e}, word_emb.options().dtype(at::kFloat));

  BERTFAST_DISPATCH_FLOAT_TYPES(word_emb.scalar_type(), "embed_backward_cpu", [&] {
    using T = scalar_t;
    const T* word = word_emb.data_ptr<T>();
    const T* pos = pos_emb.data_ptr<T>();
    const T* type = type_emb.has_value() ? type_emb->data_ptr<T>() : nullptr;
    const T* lw = ln_weight.data_ptr<T>();
    const T* gp = grad_out.data_ptr<T>();
    const float* mp = mean.data_ptr<float>();
    const float* sp = rstd.data_ptr<float>();
    const int64_t* wid = ids.word.data();
    const int64_t* pid = ids.pos.data();
    const int64_t* tid = ids.type.data();
    float* dhp = dh.data_ptr<float>();
    float* pp = partials.data_ptr<float>();
    cpu::parallel_rows(blocks.n_blocks, 1, [=](int64_t block_begin, int64_t block_end) {
      std::vector<float> buf(2 * e);
      float* w = buf.data();
      float* g = w + e;
      cpu::load_row(lw, w, e);
      for (int64_t blk = block_begin; blk < block_end; ++blk) {
        float* dw_acc = pp + blk * 2 * e;
        float* db_acc = dw_acc + e;
        const int64_t k_end = std::min(t, (blk + 1) * blocks.rows_per_block);
        for (int64_t k = blk * blocks.rows_per_block; k < k_end; ++k) {
          float* h = dhp + k * e;
          embed_row(word, pos, type, wid, pid, tid, k, e, h);
          cpu::load_row(gp + k * e, g, e);
          cpu::row_layer_norm_backward(h, g, w, mp[k], sp[k], dw_acc, db_acc, e);
        }
      }
    });
    const float* cp = partials.data_ptr<float>();
    cpu::reduce_partials(cp, blocks.n_blocks, 2 * e, 0, e, d_lw.data_ptr<T>());
    cpu::reduce_partials(cp, blocks.n_blocks, 2 * e, e, e, d_lb.data_ptr<T>());
    scatter_rows(ids.word, word_emb.size(0), dhp, e, d_word.data_ptr<T>());
    scatter_rows(ids.pos, pos_emb.size(0), dhp, e, d_pos.data_ptr<T>());
    if (d_type) scatter_rows(ids.type, type_emb->size(0), dhp, e, d_type->data_ptr<T>());
  });
  return {d_word, d_pos, d_type, d_lw, d_lb};
}

TORCH_LIBRARY_FRAGMENT(bertfast_C, m) {
  m.def(
      "embed(Tensor input_ids, Tensor indices, Tensor position_ids, Tensor? token_type_ids, Tensor word_emb, "
      "Tensor pos_emb, Tensor? type_emb, Tensor ln_weight, Tensor ln_bias, float eps, bool check=True) "
      "-> (Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "embed_backward(Tensor grad_out, Tensor input_ids, Tensor indices, Tensor position_ids, "
      "Tensor? token_type_ids, Tensor word_emb, Tensor pos_emb, Tensor? type_emb, Tensor ln_weight, Tensor mean, "
      "Tensor rstd) -> (Tensor d_word_emb, Tensor d_pos_emb, Tensor? d_type_emb, Tensor d_ln_weight, "
      "Tensor d_ln_bias)");
}

TORCH_LIBRARY_IMPL(bertfast_C, CPU, m) {
  m.impl("embed", &embed_cpu);
  m.impl("embed_backward", &embed_backward_cpu);
}

}  // namespace bertfast
