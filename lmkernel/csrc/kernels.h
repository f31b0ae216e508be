// The entry points Python calls (bound in bindings.cpp); each checks its tensors before reading them.
#pragma once

#include <torch/extension.h>

#include "gguf_blocks.h"

#include <string>
#include <vector>

namespace lmk {

// dense_linear.cpp: one to four rows (a decode step) against float, int8 or packed int4 weights.
torch::Tensor small_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
int64_t int4_chunk();
torch::Tensor pack_int4(torch::Tensor codes);
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale);
torch::Tensor int8_group_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scales);
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor mins, int64_t G);

// gguf_linear.cpp: GGUF blocks as stored.
std::vector<int64_t> gguf_block_layout(int64_t type);
torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor w, int64_t type, c10::optional<torch::Tensor> bias, bool packed,
                          bool invariant);
torch::Tensor gguf_dequantize(torch::Tensor w, int64_t type, int64_t K, bool packed);
torch::Tensor gguf_pack(torch::Tensor w, int64_t type, int64_t K);
void release_pages(torch::Tensor t);
torch::Tensor gguf_embedding(torch::Tensor ids, torch::Tensor w, int64_t type, int64_t K);

// attention.cpp
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor tables,
                           torch::Tensor lens, int64_t block_size, double scale, int64_t window);
void check_block_tables(const torch::Tensor& tables, const torch::Tensor& lens, int64_t block_size, int64_t slots);

// elementwise.cpp
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up);

// llama_decode.cpp: a whole Llama decoder for a decode step, its weights held by name.
struct Projection {
  // One linear layer as the fused decode reads it. kind: "float32" (weight [N, K]), "int8" (int8
  // weight, scale [N]), "int8_group" (int8 weight, scale [N, K/G]), "int4" (pack_int4 layout, scale
  // and mins [N, Kw/G], input padded with zeros to Kw), "gguf" (uint8 blocks of `gguf_type`),
  // "gguf_packed" (`gguf_pack`'s groups of 16 rows).
  Projection(std::string kind, torch::Tensor weight, c10::optional<torch::Tensor> scale,
             c10::optional<torch::Tensor> mins, c10::optional<torch::Tensor> bias, int64_t gguf_type,
             int64_t in_features);
  int kind;
  torch::Tensor weight, scale, mins, bias;
  int64_t gguf_type, in_features, out_features, padded_in, group, family;
  bool packed;  // "gguf_packed": groups of 16 rows in the decode layout of gguf_x16.h
  WeightRows rows() const;  // GGUF: the rows as the block kernels read them
};

struct DecoderLayer {
  DecoderLayer(torch::Tensor input_norm, torch::Tensor post_norm, Projection q, Projection k, Projection v,
               Projection o, Projection gate, Projection up, Projection down, int64_t window);
  torch::Tensor input_norm, post_norm;
  Projection q, k, v, o, gate, up, down;
  int64_t window;  // sliding-window attention: the last `window` tokens; 0: the whole context
};

class LlamaDecoder {
 public:
  LlamaDecoder(std::vector<DecoderLayer> layers, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
               double eps);
  // h [B, hidden] float32, one new token per sequence -> hidden states after the last layer (before
  // the final norm). Every layer writes its K/V at `slots` and attends through the block tables.
  torch::Tensor forward(torch::Tensor h, std::vector<torch::Tensor> k_caches, std::vector<torch::Tensor> v_caches,
                        torch::Tensor cos, torch::Tensor sin, torch::Tensor slots, torch::Tensor tables,
                        torch::Tensor lens, int64_t block_size, bool invariant) const;
  static constexpr int64_t MAX_SEQUENCES = 64;

 private:
  std::vector<DecoderLayer> layers_;
  int64_t num_heads_, num_kv_heads_, head_dim_, hidden_, intermediate_;
  float eps_;
};

}  // namespace lmk
