// GGUF (llama.cpp) weight blocks, kept as stored: their layouts, activations quantized to 8 bits to
// meet them, and y = x W^T computed on the blocks in integers.
//
// Legacy types hold 32 weights a block: Q4_0 (d, 16 bytes of nibbles: w = d (q - 8)), Q4_1 (d, m:
// w = d q + m), Q5_0 / Q5_1 (a fifth bit per weight in 4 more bytes), Q8_0 (d, 32 int8). Their
// activations are quantized per 32 (Q8_0-like: int8, a scale, and the scaled sum of the block).
// K-quants hold 256 weights a super-block in sub-blocks with 6- or 8-bit scales: Q4_K, Q5_K (d,
// dmin, 8 scale/min pairs of 6 bits: w = d sc q - dmin m), Q6_K (16 int8 scales: w = d sc (q - 32)).
// Their activations are quantized per 256 (int8 and a scale as Q8_K, the rest, and the sums of each 16).
// F32, F16 and BF16 rows multiply in float32.
#pragma once

#include <cstdint>
#include <vector>

#include "simd.h"

namespace lmk {

// ggml's type ids.
enum GGMLType : int {
  GGML_F32 = 0, GGML_F16 = 1, GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q5_0 = 6, GGML_Q5_1 = 7, GGML_Q8_0 = 8,
  GGML_Q2_K = 10, GGML_Q3_K = 11, GGML_Q4_K = 12, GGML_Q5_K = 13, GGML_Q6_K = 14, GGML_BF16 = 30,
};

enum ActFamily : int { ACT_FLOAT = 0, ACT_Q8_32 = 1, ACT_Q8_256 = 2 };

struct BlockInfo {
  int64_t elements;  // weights a block
  int64_t bytes;     // bytes a block
  ActFamily family;  // how activations meet it
};

// Layout of a supported type; `known` false for any other id.
BlockInfo block_info(int type, bool* known);

// Activation rows [M, K] quantized for one family: q (|q| <= 127) the nearest step of d = max|x| / 127
// over each block (32 or 256), and r (|r| <= 32) the rest in steps of d / 64, so that x = d (q + r / 64).
// Decode kernels (and legacy prefill) multiply both in integers and combine them as 64 q + r: the
// products carry 14 bits of each activation. With 8 alone (llama.cpp's choice), a kept model's greedy
// text departs from the float model's at near ties of two tokens. In decode the rest did not change the
// measured speed (BENCHMARKS.md); k-quant prefill, bound by integer multiplies, reads q alone (8 bits per
// 256, as llama.cpp).
static constexpr int REST_STEPS = 64;

// From this many rows on (batched decode steps, prompts), k-quant activations carry their 8 bits alone
// (the rest is zero): the tile and prefill kernels read q alone anyway, so every product of that many
// rows gets the same integer sums whichever kernel runs it, and a decode step of 8-15 rows on the packed
// rows' vector kernel, bound by its multiplies, does half of them.
static constexpr int64_t BATCH_ACT_ROWS = 8;

// Whether rows of `family` quantized M at a time keep the 6-bit rest (see BATCH_ACT_ROWS).
static inline bool keeps_rest(int family, int64_t M) { return family != ACT_Q8_256 || M < BATCH_ACT_ROWS; }

struct QuantizedActs {
  ActFamily family = ACT_FLOAT;
  int64_t M = 0, K = 0;
  bool rest = true;                // false: r is all zeros and every sum is of q alone
  const float* x = nullptr;        // the float rows (ACT_FLOAT reads these)
  std::vector<int8_t> q, r;        // [M, K]
  std::vector<float> d;            // [M, K / block]: the scale of q (r's is d / 64)
  std::vector<float> sums32;       // [M, K / 32]: the sum of each 32 activations, as quantized
  std::vector<float> sums16;       // ACT_Q8_256: [M, K / 16], the sum of each 16
  std::vector<int16_t> qsums16;    // ACT_Q8_256: [M, K / 16], the sum of each 16 values of q
  std::vector<float> lanes;        // ACT_Q8_32: [M, K / 4], d / 64 for each 4 activations (512-bit kernels'
                                   // per-lane scales: lanes 0-7 of a 64-weight span are its first block)
};

// The halves of GGUF blocks (IEEE float16).
static inline float half(const uint8_t* p) {
  uint16_t h;
  __builtin_memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return fp16_to_f32(h);
#endif
}

// The eight 6-bit scales and minimums of a Q4_K / Q5_K super-block, from its 12 packed bytes: bytes
// 0-3 hold scales 0-3 (and the top bits of scales 4-7), 4-7 minimums 0-3 (and the top bits of
// minimums 4-7), 8-11 the low four bits of scales and minimums 4-7.
static inline void k4_scales(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  uint32_t a, b, c;
  __builtin_memcpy(&a, s, 4);
  __builtin_memcpy(&b, s + 4, 4);
  __builtin_memcpy(&c, s + 8, 4);
  const uint32_t scales[2] = {a & 0x3f3f3f3fu, (c & 0x0f0f0f0fu) | (((a >> 6) & 0x03030303u) << 4)};
  const uint32_t mins[2] = {b & 0x3f3f3f3fu, ((c >> 4) & 0x0f0f0f0fu) | (((b >> 6) & 0x03030303u) << 4)};
  __builtin_memcpy(sc, scales, 8);
  __builtin_memcpy(mn, mins, 8);
}

// A weight matrix of N rows of K weights: `data` holds the rows as stored (row_bytes each) or, when
// `packed`, in the decode layout of gguf_x16.h (groups of 16 rows).
struct WeightRows {
  const uint8_t* data = nullptr;
  int64_t row_bytes = 0, N = 0, K = 0;
  bool packed = false;
};

// Quantize float rows x [M, K] for `family` (K a multiple of the family's block); without `rest`, to the
// 8 bits of q alone.
void quantize_acts(const float* x, int64_t M, int64_t K, ActFamily family, QuantizedActs& out, bool rest = true);

// y[m, n] (row stride ldy) = sum_k x[m, k] w[n, k] for rows n in [n0, n1) and activation rows
// m in [m0, m0 + rows), rows <= 4; w holds N rows of `row_bytes` bytes of `type` blocks (gguf_dot.cpp).
void gguf_rows(int type, const uint8_t* w, int64_t row_bytes, const QuantizedActs& a, int64_t m0, int rows,
               int64_t n0, int64_t n1, float* y, int64_t ldy);

// Dequantize `rows` rows of K weights (each row_bytes long) into y [rows, K] float32.
void dequantize_rows(int type, const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t K, float* y);

}  // namespace lmk
