// Prefill (many rows of x) on GGUF blocks: tiles of weight rows repacked once per call (gguf_gemm.cpp).
#pragma once

#include <cstdint>

#include "gguf_blocks.h"

namespace lmk {

// Whether this build has the prefill kernel for `type` with rows of K weights (AVX-512 with VNNI).
bool gemm_supports(int type, int64_t K);

// y [M, N] = x W^T for the quantized rows `a` (a.M rows of a.K) and the N weight rows `w`; false
// (nothing written) where `gemm_supports` is false.
bool gguf_gemm(int type, const WeightRows& w, const QuantizedActs& a, float* y);

}  // namespace lmk
