// Attention over the paged KV cache, reading each sequence's blocks where they lie (attention.cpp).
#pragma once

#include "kv_quant.h"

#include <ATen/core/Tensor.h>

#include <optional>

namespace tokenmill {

// Attention of one step's flat batch of tokens, S sequences each owning a run of rows: sequence s's new tokens are
// rows [query_starts[s], query_starts[s + 1]) at positions context_lens[s] - (their count) onwards, and each attends
// causally over its sequence's keys (block_tables[s], context_lens[s] keys including the new ones, whose K/V are
// already in the cache). A one-token sequence (a decode) takes the decode kernel, which scores its own key from k/v
// rather than the cache as the eager decode step does; a run of 2 to 16 (a speculative verify step, a short chunk)
// gives each row bit for bit the result of that decode kernel at the row's position, the earlier rows' keys read as
// cached ones; longer runs (prefill chunks) take the tiled chunk kernel, unless `exact_rows`: then every run is
// computed row by row as that decode kernel would, so a row's result does not depend on how the rows were batched or
// chunked (or whether its prompt was cached).
// q [T, H, D], k/v [T, Hkv, D] (rows may be strided, heads contiguous); caches [Hkv, slots, D]; query_starts [S + 1],
// block_tables [S, max_blocks] (or [S, Hkv, max_blocks]: each KV head its own table, per-head H2O), context_lens [S]
// int64. Returns [T, H, D] in q's dtype (fp32 or bf16).
// attention_mass, when given (H2O, kv/h2o.py): fp32 [S, Hkv, E >= every context length]; each row's attention
// probabilities are added into it, mass[s][h][e] gaining what entry e of sequence s received from the query heads
// that share KV head h (the fp32 probabilities the value pass weighs with).
// row_visible, when given (a token tree, spec/tree.py): int64 [T], per row -1 or how many of its sequence's first
// entries the row sees besides its own (at most those before it; fewer only in runs of up to 16 rows, or with
// exact_rows): such a row is computed as the decode kernel computes a one-token sequence with that many cached keys.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& query_starts, const at::Tensor& block_tables,
                           const at::Tensor& context_lens, int64_t block_size,
                           const std::optional<at::Tensor>& attention_mass = std::nullopt, bool exact_rows = false,
                           const std::optional<at::Tensor>& row_visible = std::nullopt);

// paged_attention over one layer of a quantized cache (kv_quant.h), storing the step's K/V first: each sequence's
// open block is its residual slot residual_slots[s].
at::Tensor paged_attention_quantized(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const QuantKV& kv, int64_t layer, const at::Tensor& query_starts,
                                     const at::Tensor& block_tables, const at::Tensor& context_lens,
                                     const at::Tensor& residual_slots,
                                     const std::optional<at::Tensor>& attention_mass = std::nullopt,
                                     bool exact_rows = false,
                                     const std::optional<at::Tensor>& row_visible = std::nullopt);

}  // namespace tokenmill
