// Argument checks of bertfast_C::embed / embed_backward shared by the CPU and CUDA entry points (shapes, dtypes,
// devices, contiguity). Value (id range) checks are done by each backend: see embed.cpp and cuda/embed.cu.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "checks.h"

namespace bertfast {

struct EmbedShapes {
  int64_t n;  // padded positions N = B*S (length of input_ids / position_ids / token_type_ids)
  int64_t t;  // packed tokens T (length of indices)
  int64_t e;  // embedding size E
};

inline EmbedShapes check_embed_args(const char* op, const at::Tensor& input_ids, const at::Tensor& indices,
                                    const at::Tensor& position_ids,
                                    const std::optional<at::Tensor>& token_type_ids, const at::Tensor& word_emb,
                                    const at::Tensor& pos_emb, const std::optional<at::Tensor>& type_emb,
                                    const at::Tensor& ln_weight) {
  check_float_dtype(op, "word_emb", word_emb);
  check_dim(op, "word_emb", word_emb, 2, "[vocab, E]");
  check_contiguous(op, "word_emb", word_emb);
  const at::Device dev = word_emb.device();
  const int64_t e = word_emb.size(1);
  TORCH_CHECK(e > 0, op, ": word_emb must have a non-empty embedding dimension, got shape ", word_emb.sizes());
  check_index_tensor(op, "input_ids", input_ids, word_emb, 1, "[N] (the flattened [B, S] ids)");
  const int64_t n = input_ids.size(0);
  check_index_tensor(op, "indices", indices, word_emb, 1, "[T]");
  check_index_tensor(op, "position_ids", position_ids, word_emb, 1, "[N] (the flattened [B, S] positions)");
  TORCH_CHECK(position_ids.size(0) == n, op, ": position_ids must have input_ids' length ", n, ", got ",
              position_ids.size(0));
  auto check_table = [&](const char* name, const at::Tensor& t, const char* layout) {
    check_device(op, name, t, dev);
    check_dtype(op, name, t, word_emb.scalar_type());
    check_dim(op, name, t, 2, layout);
    TORCH_CHECK(t.size(1) == e, op, ": ", name, " must have word_emb's embedding size ", e, ", got shape ",
                t.sizes());
    check_contiguous(op, name, t);
  };
  check_table("pos_emb", pos_emb, "[max_positions, E]");
  if (token_type_ids.has_value()) {
    TORCH_CHECK(type_emb.has_value(), op, ": token_type_ids given but type_emb is None (a model without token "
                "type embeddings takes no token_type_ids)");
    check_index_tensor(op, "token_type_ids", *token_type_ids, word_emb, 1, "[N] (the flattened [B, S] types)");
    TORCH_CHECK(token_type_ids->size(0) == n, op, ": token_type_ids must have input_ids' length ", n, ", got ",
                token_type_ids->size(0));
  }
  if (type_emb.has_value()) {
    check_table("type_emb", *type_emb, "[type_vocab, E]");
    TORCH_CHECK(type_emb->size(0) > 0, op, ": type_emb must have at least one row (token type 0 is used when "
                "token_type_ids is None), got shape ", type_emb->sizes());
  }
  check_feature_vector(op, "ln_weight", ln_weight, word_emb, e);
  return {n, indices.size(0), e};
}

// Range check of the ids embed reads, on CPU copies (the CUDA kernel's error path uses it to name the bad value):
// raises the same error as the CPU op. n_types == 0: no type table.
void embed_check_ids_on_cpu(const char* op, const at::Tensor& input_ids, const at::Tensor& indices,
                            const at::Tensor& position_ids, const std::optional<at::Tensor>& token_type_ids,
                            int64_t vocab, int64_t n_pos, int64_t n_types);

}  // namespace bertfast
