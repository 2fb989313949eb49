// One model step of a Llama-family model as a single C++ call: any flat batch of new tokens — decodes (one per
// sequence), prefill chunks, or both mixed in one step, as the scheduler hands them out.
//
// Why: a single-stream decode step of the 135M default model does ~2 ms of weight-bound matmuls but, driven op by op
// from Python, spent ~5 ms more in ~2,500 small operators (norms, RoPE, KV writes, gathers, softmax, SwiGLU) and their
// dispatch; prefill chunks spent more time in the eager path's padded, masked attention than in their matmuls. Here
// the layer loop runs in C++: the matmuls are PyTorch's own kernels (dense, int8 and int4 weight-only), the GGUF
// block kernel (gguf_matmul.cpp), the row-exact bf16 kernel on packed weights (bf16_gemm.cpp) or, for fp32 steps of
// a few rows (of any size with `batch_invariant`), the row-exact fp32 kernel (small_gemm.cpp), and the
// small operators are fused loops — RMSNorm, RoPE rotating q and k in place, the KV write, attention reading each
// sequence's blocks where they lie (attention.cpp), SwiGLU, residual adds.
//
// Rounding follows the eager path (tokenmill/model/llama.py, tokenmill/attention/eager.py) at every point where it
// rounds to the model dtype: RMSNorm normalises in fp32 and rounds before the weight multiply, RoPE rounds each
// product and the sum, attention rounds the scaled query, scores, probabilities and its output, SwiGLU rounds silu
// before the multiply.
// Sums still accumulate in another order than PyTorch's kernels, so bf16 results can differ in the last bit; fp32
// ones differ by float rounding only.
// Built with -ffp-contract=off so that fp32 products and sums are not fused into FMAs the eager path does not use.

// Not <torch/extension.h>: it pulls in the whole C++ frontend, about half of this file's build time at every ISA level.
#include <ATen/ATen.h>
#include <pybind11/functional.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "attention.h"
#include "check.h"
#include "bf16_gemm.h"
#include "gguf_matmul.h"
#include "kv_rotate.h"
#include "shm_all_reduce.h"
#include "simd.h"
#include "small_gemm.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <optional>
#include <vector>

namespace tokenmill {
namespace {

enum class WeightKind : int64_t {
  Float = 0, Int8 = 1, Int4 = 2, GgufQ4 = 3, GgufQ8 = 4, FloatPacked = 5, Bf16Packed = 6, Stacked = 7
};

// A linear layer in one of the weight formats of tokenmill/model/linear.py.
struct LinearWeights {
  WeightKind kind;
  at::Tensor weight;        // Float: [N, K]; FloatPacked: oneDNN's blocked copy; Bf16Packed: pack_bf16's (both
                            // FloatLinear.prepack); Int8: qweight [N, K]; Int4: the int4pack-packed codes; GgufQ4:
                            // nibbles; GgufQ8: codes [N, K]
  at::Tensor scales;        // Int8: [N]; Int4: scales_and_zeros [K / group, N, 2]; Gguf: d [N, K / 32]; Float: unused
  at::Tensor minimums;      // GgufQ4: m [N, K / 32]; others: unused
  std::optional<at::Tensor> bias;
  int64_t group_size;
  int64_t out_features;
  bool int8_activations;    // Gguf: activations rounded to int8 per block of 32 (gguf_matmul.h)
  std::vector<LinearWeights> parts;  // Stacked: layers whose outputs sit side by side (linear.py's StackedLinear)

  // `exact_rows`: every row rounds as it would alone at any row count (batch_invariant), not only in small steps.
  at::Tensor apply(const at::Tensor& x, bool exact_rows) const {
    at::Tensor y;
    switch (kind) {
      case WeightKind::Float:
        // fp32 up to kSmallRows rows (decodes, speculative verify steps), where it is as fast as MKL, or at every
        // size when asked: then each row rounds the same in any batch.
        if ((exact_rows || x.size(0) <= kSmallRows) && x.scalar_type() == at::kFloat &&
            weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
            (!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous())))
          return linear_rows(x.contiguous(), weight, bias);
        return at::linear(x, weight, bias);
      case WeightKind::Bf16Packed:
        return linear_packed(x, weight, bias, out_features);
      case WeightKind::FloatPacked:
        return packed_linear(x);
      case WeightKind::Int8:
        y = at::_weight_int8pack_mm(x, weight, scales);
        break;
      case WeightKind::Int4:
        y = at::_weight_int4pack_mm_for_cpu(x, weight, group_size, scales);
        break;
      case WeightKind::GgufQ4:
        y = tokenmill::q4_matmul(x, weight, scales, minimums, out_features, false, int8_activations);
        break;
      case WeightKind::GgufQ8:
        y = tokenmill::q8_matmul(x, weight, scales, out_features, false, int8_activations);
        break;
      case WeightKind::Stacked: {
        std::vector<at::Tensor> outputs;
        outputs.reserve(parts.size());
        for (const LinearWeights& part : parts) outputs.push_back(part.apply(x, exact_rows));
        y = at::cat(outputs, 1);
        break;
      }
    }
    return bias ? y + *bias : y;
  }

  // PyTorch's oneDNN linear on a prepacked weight, through the dispatcher: the op has no C++ API of its own.
  at::Tensor packed_linear(const at::Tensor& x) const {
    static const c10::OperatorHandle op =
        c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    torch::jit::Stack stack{x, weight, bias ? c10::IValue(*bias) : c10::IValue(), c10::IValue("none"),
                            c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue("")};
    op.callBoxed(&stack);
    return stack[0].toTensor();
  }
};

struct LayerWeights {
  LinearWeights qkv, o, gate_up, down;
  at::Tensor attn_norm, ffn_norm;
};


// weight * rms_norm(x in fp32) rounded to the model dtype, as llama.py's rms_norm; with a `residual`, x += residual
// (rounded as `x + residual` would be) first, in the same pass over the rows, which the norm then reads from cache.
template <typename T>
at::Tensor rms_norm(at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor* residual = nullptr) {
  const int64_t rows = x.size(0), dim = x.size(1);
  at::Tensor out = at::empty_like(x);
  T* xs = x.data_ptr<T>();
  const T* adds = residual ? residual->data_ptr<T>() : nullptr;
  const T* w = weight.data_ptr<T>();
  T* ys = out.data_ptr<T>();
  parallel_rows(rows, dim, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* xr = xs + r * dim;
      T* yr = ys + r * dim;
      if (adds) {
        const T* ar = adds + r * dim;
        int64_t i = 0;
        for (; i + 16 <= dim; i += 16) store16(xr + i, load16(xr + i) + load16(ar + i));
        for (; i < dim; ++i) xr[i] = store<T>(to_f(xr[i]) + to_f(ar[i]));
      }
      // 16 independent partial sums, added up lane by lane at the end.
      f32x16 partial = {};
      int64_t i = 0;
      for (; i + 16 <= dim; i += 16) {
        const f32x16 v = load16(xr + i);
        partial += v * v;
      }
      float sum = 0.f;
      for (int j = 0; j < 16; ++j) sum += partial[j];
      for (; i < dim; ++i) sum += to_f(xr[i]) * to_f(xr[i]);
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + static_cast<float>(eps));
      int64_t k = 0;
      for (; k + 16 <= dim; k += 16) store16(yr + k, load16(w + k) * round16<T>(load16(xr + k) * inv));
      for (; k < dim; ++k) yr[k] = store<T>(to_f(w[k]) * rounded<T>(to_f(xr[k]) * inv));
    }
  });
  return out;
}

// Half-split RoPE on the query and key heads of each row of qkv [rows, (heads + 2 · kv_heads) · D], in place:
// x·cos + roll(x, D/2)·[-sin, sin], each product and the sum rounded. Then the row's rotated key heads and its value
// heads are stored at its slot of this layer's head-major cache [kv_heads, slots, D], while the row is in cache
// (unless the cache is quantized: attention stores those, kv_quant.h).
// head_dim is a multiple of 32 (FusedStep checks), so each half is whole 16-lane chunks.
template <typename T>
void rope_and_store_kv(at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                       const at::Tensor& signed_sin, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots,
                       int64_t heads, int64_t kv_heads, int64_t head_dim, bool store = true) {
  const int64_t rows = qkv.size(0), stride = qkv.size(1), half = head_dim / 2;
  const int64_t num_slots = store ? k_cache.size(1) : 0;
  T* data = qkv.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = store ? slots.data_ptr<int64_t>() : nullptr;
  const T* cos_table = cos.data_ptr<T>();
  const T* sin_table = signed_sin.data_ptr<T>();
  T* kc = store ? k_cache.data_ptr<T>() : nullptr;
  T* vc = store ? v_cache.data_ptr<T>() : nullptr;
  parallel_rows(rows, stride, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* c = cos_table + pos[r] * head_dim;
      const T* s = sin_table + pos[r] * head_dim;
      for (int64_t h = 0; h < heads + kv_heads; ++h) {
        T* x = data + r * stride + h * head_dim;
        for (int64_t d = 0; d < half; d += 16) {
          const f32x16 low = load16(x + d), high = load16(x + half + d);
          const f32x16 new_low = round16<T>(low * load16(c + d)) + round16<T>(high * load16(s + d));
          const f32x16 new_high = round16<T>(high * load16(c + half + d)) + round16<T>(low * load16(s + half + d));
          store16(x + d, new_low);
          store16(x + half + d, new_high);
        }
      }
      const T* k = data + r * stride + heads * head_dim;
      const T* v = k + kv_heads * head_dim;
      for (int64_t h = 0; h < kv_heads && store; ++h) {
        const int64_t at_slot = (h * num_slots + slot[r]) * head_dim;
        std::copy(k + h * head_dim, k + (h + 1) * head_dim, kc + at_slot);
        std::copy(v + h * head_dim, v + (h + 1) * head_dim, vc + at_slot);
      }
    }
  });
}

// silu(gate) · up for gate_up = [gate | up] per row; silu rounded to the model dtype first, as F.silu would.
template <typename T>
at::Tensor silu_mul(const at::Tensor& gate_up) {
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, width}, gate_up.options());
  const T* gu = gate_up.data_ptr<T>();
  T* ys = out.data_ptr<T>();
  parallel_rows(rows, width, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = gu + r * 2 * width;
      const T* up = gate + width;
      T* y = ys + r * width;
      int64_t i = 0;
      for (; i + 16 <= width; i += 16) {
        const f32x16 g = load16(gate + i);
        store16(y + i, round16<T>(g * reciprocal16(1.f + exp16(-g))) * load16(up + i));
      }
      for (; i < width; ++i) {
        const float g = to_f(gate[i]);
        y[i] = store<T>(rounded<T>(g * reciprocal_approx(1.f + exp_approx(-g))) * to_f(up[i]));
      }
    }
  });
  return out;
}

// Index of each row's largest value (the first one among equals, as torch's max and argmax pick): greedy sampling
// straight from bf16 logits, which torch reduces at ~7 GB/s here (3.4 ms for 256 rows × 49,152) where this reads at
// memory speed. NaNs are never picked (torch's max would pick one).
template <typename T>
at::Tensor greedy_tokens(const at::Tensor& logits) {
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const T* data = logits.data_ptr<T>();
  int64_t* tokens = out.data_ptr<int64_t>();
  parallel_rows(rows, vocab, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = data + r * vocab;
      f32x16 best = f32x16{} - std::numeric_limits<float>::infinity();
      i32x16 where = i32x16{} - 1;
      const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
      int64_t i = 0;
      for (; i + 16 <= vocab; i += 16) {
        const f32x16 v = load16(row + i);
        const i32x16 higher = v > best;  // strict: an equal later value keeps the earlier index
        best = higher ? v : best;
        where = higher ? lane + static_cast<int32_t>(i) : where;
      }
      float top = -std::numeric_limits<float>::infinity();
      int64_t token = 0;
      for (int j = 0; j < 16; ++j)
        if (where[j] >= 0 && (best[j] > top || (best[j] == top && where[j] < token))) top = best[j], token = where[j];
      for (; i < vocab; ++i)
        if (to_f(row[i]) > top) top = to_f(row[i]), token = i;
      tokens[r] = token;
    }
  });
  return out;
}

at::Tensor greedy(const at::Tensor& logits) {
  TM_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.size(1) > 0 && logits.size(1) < (1LL << 31),
           "logits must be a contiguous [rows, vocab] tensor");
  if (logits.scalar_type() == at::kFloat) return greedy_tokens<float>(logits);
  TM_CHECK(logits.scalar_type() == at::kBFloat16, "greedy supports float32 and bfloat16 logits");
  return greedy_tokens<c10::BFloat16>(logits);
}

class FusedStep {
 public:
  // all_reduce: tensor parallelism (tokenmill/parallel/tensor.py). The layers hold one rank's heads and MLP columns,
  // so the attention and MLP outputs are partial sums; this Python callable returns their sum over the ranks. It is
  // called twice per layer, with the GIL taken back for the call, and every rank calls it in the same order.
  FusedStep(std::vector<LayerWeights> layers, at::Tensor final_norm, at::Tensor rope_cos, at::Tensor rope_signed_sin,
            double eps, int64_t num_heads, int64_t kv_heads, int64_t head_dim, bool exact_rows, bool exact_attention,
            std::optional<py::function> all_reduce)
      : layers_(std::move(layers)), final_norm_(std::move(final_norm)), cos_(std::move(rope_cos)),
        sin_(std::move(rope_signed_sin)), eps_(eps), num_heads_(num_heads), kv_heads_(kv_heads),
        head_dim_(head_dim), exact_rows_(exact_rows), exact_attention_(exact_rows || exact_attention),
        all_reduce_(std::move(all_reduce)) {
    TM_CHECK(num_heads % kv_heads == 0, "num_heads must be a multiple of kv_heads");
    TM_CHECK(head_dim == 64 || head_dim == 128, "the fused step is built for head sizes 64 and 128");
  }

  // x: [T, hidden] embeddings of the step's new tokens, at `positions`, their K/V stored at `slots` of k_cache/v_cache
  // [layers, kv_heads, slots, D]. The tokens are grouped by sequence as paged_attention (attention.h) describes:
  // query_starts [S + 1], block_tables [S, max_blocks], context_lens [S] (keys including the new tokens).
  // Per-head H2O: block_tables [layers, S, kv_heads, max_blocks] and attention_mass [layers, S, kv_heads, E], each
  // layer reading and adding to its own.
  // Returns the final-norm hidden states of every token.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& slots,
                     const at::Tensor& query_starts, const at::Tensor& block_tables, const at::Tensor& context_lens,
                     at::Tensor k_cache, at::Tensor v_cache, int64_t block_size,
                     const std::optional<at::Tensor>& attention_mass,
                     const std::optional<at::Tensor>& row_visible) const {
    TM_CHECK(x.device().is_cpu() && x.dim() == 2, "x must be a [tokens, hidden] CPU tensor");
    TM_CHECK(k_cache.size(0) == static_cast<int64_t>(layers_.size()), "cache has the wrong number of layers");
    for (const at::Tensor* t : {&positions, &slots})
      TM_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->size(0) == x.size(0),
               "positions and slots must be contiguous int64, one per token");
    TM_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV caches must be contiguous");
    const Sequences seqs{query_starts, block_tables, context_lens, block_size, attention_mass, nullptr, nullptr,
                         row_visible};
    if (x.scalar_type() == at::kFloat) return run<float>(x, positions, slots, seqs, k_cache, v_cache);
    TM_CHECK(x.scalar_type() == at::kBFloat16, "the fused step supports float32 and bfloat16");
    return run<c10::BFloat16>(x, positions, slots, seqs, k_cache, v_cache);
  }

  // forward over a quantized cache (kv_quant.h): sequence s's open block lives in residual slot residual_slots[s].
  at::Tensor forward_quantized(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& query_starts,
                               const at::Tensor& block_tables, const at::Tensor& context_lens, const QuantKV& kv,
                               const at::Tensor& residual_slots,
                               const std::optional<at::Tensor>& attention_mass,
                               const std::optional<at::Tensor>& row_visible) const {
    TM_CHECK(x.device().is_cpu() && x.dim() == 2, "x must be a [tokens, hidden] CPU tensor");
    TM_CHECK(kv.k_data.size(0) == static_cast<int64_t>(layers_.size()), "cache has the wrong number of layers");
    TM_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.size(0) == x.size(0),
             "positions must be contiguous int64, one per token");
    const Sequences seqs{query_starts, block_tables, context_lens, kv.block_size, attention_mass, &kv,
                         &residual_slots, row_visible};
    at::Tensor unused;
    if (x.scalar_type() == at::kFloat) return run<float>(x, positions, unused, seqs, unused, unused);
    TM_CHECK(x.scalar_type() == at::kBFloat16, "the fused step supports float32 and bfloat16");
    return run<c10::BFloat16>(x, positions, unused, seqs, unused, unused);
  }

 private:
  struct Sequences {
    const at::Tensor& query_starts;
    const at::Tensor& block_tables;
    const at::Tensor& context_lens;
    int64_t block_size;
    const std::optional<at::Tensor>& mass;  // H2O's side output, summed over the layers (attention.h)
    const QuantKV* quant = nullptr;  // set: the cache is quantized, k_cache and v_cache unused
    const at::Tensor* residual_slots = nullptr;
    std::optional<at::Tensor> row_visible;  // a token tree's rows (attention.h)
  };

  template <typename T>
  at::Tensor run(const at::Tensor& embeddings, const at::Tensor& positions, const at::Tensor& slots,
                 const Sequences& seqs, at::Tensor& k_cache, at::Tensor& v_cache) const {
    at::Tensor x = embeddings.contiguous().clone();  // the residual stream, updated in place
    const int64_t q_size = num_heads_ * head_dim_, kv_size = kv_heads_ * head_dim_;
    at::Tensor normed = rms_norm<T>(x, layers_[0].attn_norm, eps_);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const LayerWeights& layer = layers_[i];
      at::Tensor k_layer = seqs.quant ? k_cache : k_cache.select(0, i);
      at::Tensor v_layer = seqs.quant ? v_cache : v_cache.select(0, i);
      at::Tensor qkv = layer.qkv.apply(normed, exact_rows_).contiguous();
      rope_and_store_kv<T>(qkv, positions, cos_, sin_, k_layer, v_layer, slots, num_heads_, kv_heads_, head_dim_,
                           seqs.quant == nullptr);
      const int64_t rows = qkv.size(0);
      const at::Tensor q = qkv.narrow(1, 0, q_size).view({rows, num_heads_, head_dim_});
      const at::Tensor k = qkv.narrow(1, q_size, kv_size).view({rows, kv_heads_, head_dim_});
      const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({rows, kv_heads_, head_dim_});
      const bool per_layer = seqs.block_tables.dim() == 4;
      const at::Tensor tables = per_layer ? seqs.block_tables.select(0, i) : seqs.block_tables;
      std::optional<at::Tensor> mass = seqs.mass;
      if (mass && mass->dim() == 4) mass = mass->select(0, i);
      at::Tensor attn = seqs.quant ? paged_attention_quantized(q, k, v, *seqs.quant, static_cast<int64_t>(i),
                                                               seqs.query_starts, tables, seqs.context_lens,
                                                               *seqs.residual_slots, mass, exact_attention_,
                                                               seqs.row_visible)
                                   : paged_attention(q, k, v, k_layer, v_layer, seqs.query_starts, tables,
                                                     seqs.context_lens, seqs.block_size, mass, exact_attention_,
                                                     seqs.row_visible);
      const at::Tensor attn_out = summed(layer.o.apply(attn.view({rows, q_size}), exact_rows_).contiguous());
      normed = rms_norm<T>(x, layer.ffn_norm, eps_, &attn_out);
      const at::Tensor gate_up = layer.gate_up.apply(normed, exact_rows_).contiguous();
      const at::Tensor mlp_out = summed(layer.down.apply(silu_mul<T>(gate_up), exact_rows_).contiguous());
      // The residual add closing this layer, fused with the norm opening the next one (or the final norm).
      normed = rms_norm<T>(x, i + 1 < layers_.size() ? layers_[i + 1].attn_norm : final_norm_, eps_, &mlp_out);
    }
    return normed;
  }

  // A layer's output summed over the tensor-parallel ranks (the partial sum itself without tensor parallelism).
  at::Tensor summed(const at::Tensor& partial) const {
    if (!all_reduce_) return partial;
    py::gil_scoped_acquire gil;
    at::Tensor total = (*all_reduce_)(partial).cast<at::Tensor>();
    TM_CHECK(total.sizes() == partial.sizes() && total.scalar_type() == partial.scalar_type(),
             "all_reduce must return a tensor of its argument's shape and dtype");
    return total.contiguous();
  }

  std::vector<LayerWeights> layers_;
  at::Tensor final_norm_, cos_, sin_;
  double eps_;
  int64_t num_heads_, kv_heads_, head_dim_;
  bool exact_rows_;       // matmul rows as each row alone computes it, at every row count (batch_invariant)
  bool exact_attention_;  // attention rows as one-token decodes compute them (attention.h)
  std::optional<py::function> all_reduce_;
};

LinearWeights make_linear(int64_t kind, at::Tensor weight, at::Tensor scales, at::Tensor minimums,
                          std::optional<at::Tensor> bias, int64_t group_size, int64_t out_features,
                          bool int8_activations) {
  TM_CHECK(kind >= 0 && kind <= 6, "unknown weight kind ", kind);
  return LinearWeights{static_cast<WeightKind>(kind), std::move(weight), std::move(scales), std::move(minimums),
                       std::move(bias), group_size, out_features, int8_activations, {}};
}

LinearWeights make_stacked(std::vector<LinearWeights> parts, std::optional<at::Tensor> bias) {
  TM_CHECK(parts.size() >= 2, "a stacked layer needs two or more parts, got ", parts.size());
  int64_t out_features = 0;
  for (const LinearWeights& part : parts) out_features += part.out_features;
  return LinearWeights{WeightKind::Stacked, at::Tensor(), at::Tensor(), at::Tensor(), std::move(bias), 0,
                       out_features, false, std::move(parts)};
}

}  // namespace
}  // namespace tokenmill

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tokenmill's CPU kernels: the fused model step, paged attention, GGUF block matmuls, row-exact matmuls";
  py::class_<tokenmill::LinearWeights>(m, "LinearWeights");
  m.def("paged_attention", &tokenmill::paged_attention, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("query_starts"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("block_size"), py::arg("attention_mass") = py::none(),
        py::arg("exact_rows") = false, py::arg("row_visible") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_rows", &tokenmill::linear_rows, py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("pack_bf16", &tokenmill::pack_bf16, py::arg("weight"), py::call_guard<py::gil_scoped_release>());
  m.def("linear_packed", &tokenmill::linear_packed, py::arg("x"), py::arg("packed"), py::arg("bias") = py::none(),
        py::arg("out_features"), py::arg("fp32_out") = false, py::call_guard<py::gil_scoped_release>());
  m.attr("SMALL_ROWS") = tokenmill::kSmallRows;
  m.def("greedy", &tokenmill::greedy, py::arg("logits"), py::call_guard<py::gil_scoped_release>());
  m.def("make_stacked", &tokenmill::make_stacked, py::arg("parts"), py::arg("bias"));
  m.def("make_linear", &tokenmill::make_linear, py::arg("kind"), py::arg("weight"), py::arg("scales"),
        py::arg("minimums"), py::arg("bias"), py::arg("group_size"), py::arg("out_features"),
        py::arg("int8_activations") = false);
  m.def("q4_matmul", &tokenmill::q4_matmul, py::arg("x"), py::arg("packed"), py::arg("d"), py::arg("m"),
        py::arg("out_features"), py::arg("fp32_output") = false, py::arg("int8_activations") = false,
        py::call_guard<py::gil_scoped_release>());
  m.def("gguf_isa", &tokenmill::gguf_isa);
  m.def("gguf_int8_isa", &tokenmill::gguf_int8_isa);
  m.def("gguf_prefetch_rows", &tokenmill::gguf_prefetch_rows, py::arg("rows") = -1);
  m.def("q8_matmul", &tokenmill::q8_matmul, py::arg("x"), py::arg("packed"), py::arg("d"), py::arg("out_features"),
        py::arg("fp32_output") = false, py::arg("int8_activations") = false,
        py::call_guard<py::gil_scoped_release>());
  py::class_<tokenmill::LayerWeights>(m, "LayerWeights")
      .def(py::init<tokenmill::LinearWeights, tokenmill::LinearWeights, tokenmill::LinearWeights,
                    tokenmill::LinearWeights, at::Tensor, at::Tensor>(),
           py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"), py::arg("attn_norm"),
           py::arg("ffn_norm"));
  py::class_<tokenmill::FusedStep>(m, "FusedStep")
      .def(py::init<std::vector<tokenmill::LayerWeights>, at::Tensor, at::Tensor, at::Tensor, double, int64_t, int64_t,
                    int64_t, bool, bool, std::optional<py::function>>(),
           py::arg("layers"), py::arg("final_norm"), py::arg("rope_cos"), py::arg("rope_signed_sin"), py::arg("eps"),
           py::arg("num_heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("exact_rows") = false,
           py::arg("exact_attention") = false, py::arg("all_reduce") = py::none())
      .def("forward", &tokenmill::FusedStep::forward, py::arg("x"), py::arg("positions"), py::arg("slots"),
           py::arg("query_starts"), py::arg("block_tables"), py::arg("context_lens"), py::arg("k_cache"),
           py::arg("v_cache"), py::arg("block_size"), py::arg("attention_mass") = py::none(),
           py::arg("row_visible") = py::none(), py::call_guard<py::gil_scoped_release>())
      .def("forward_quantized", &tokenmill::FusedStep::forward_quantized, py::arg("x"), py::arg("positions"),
           py::arg("query_starts"), py::arg("block_tables"), py::arg("context_lens"), py::arg("kv"),
           py::arg("residual_slots"), py::arg("attention_mass") = py::none(), py::arg("row_visible") = py::none(),
           py::call_guard<py::gil_scoped_release>());
  py::class_<tokenmill::QuantKV>(m, "QuantKV", py::module_local())  // one per ISA build, loaded side by side
      .def(py::init([](int64_t bits, int64_t block_size, at::Tensor k_data, at::Tensor k_params, at::Tensor v_data,
                       at::Tensor v_params, at::Tensor k_residual, at::Tensor v_residual) {
             return tokenmill::QuantKV{bits, block_size, k_data, v_data, k_params, v_params, k_residual, v_residual};
           }),
           py::arg("bits"), py::arg("block_size"), py::arg("k_data"), py::arg("k_params"), py::arg("v_data"),
           py::arg("v_params"), py::arg("k_residual"), py::arg("v_residual"));
  m.def("shm_all_reduce_bytes", &tokenmill::shm_all_reduce_bytes, py::arg("world"), py::arg("capacity"));
  m.def("shm_all_reduce", &tokenmill::shm_all_reduce, py::arg("shared"), py::arg("x"), py::arg("rank"),
        py::arg("world"), py::arg("seq"), py::arg("capacity"), py::arg("timeout_s"),
        py::call_guard<py::gil_scoped_release>());
  m.def("rotate_key_blocks", &tokenmill::rotate_key_blocks, py::arg("k_cache"), py::arg("blocks"), py::arg("cos"),
        py::arg("sin"), py::arg("block_size"), py::call_guard<py::gil_scoped_release>());
  m.def("kv_quant_folded", &tokenmill::kv_quant_folded, py::arg("on") = -1);
  m.def("paged_attention_quantized", &tokenmill::paged_attention_quantized, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("kv"), py::arg("layer"), py::arg("query_starts"), py::arg("block_tables"), py::arg("context_lens"),
        py::arg("residual_slots"), py::arg("attention_mass") = py::none(), py::arg("exact_rows") = false,
        py::arg("row_visible") = py::none(), py::call_guard<py::gil_scoped_release>());
}
