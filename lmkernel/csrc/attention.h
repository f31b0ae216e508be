#pragma once

#include <cstdint>

namespace lmk {

// Attention of B queries (one new token per sequence, q [B, Hq, D]) over their cached contexts:
// caches [slots, Hkv, D] float32, tables [B, nb] block ids, lens [B] context lengths (the new token
// included). Writes out [B, Hq, D]. Contexts are cut into spans when there are fewer (sequence, KV
// head) pairs than twice the threads, so that batch-1 decode uses every thread (flash-decoding).
// window > 0: each query reads only its last `window` tokens (sliding-window attention); 0: all of them.
void attend_all(const float* q, const float* k_cache, const float* v_cache, const int64_t* tables, const int64_t* lens,
                int64_t B, int64_t nb, int64_t block_size, int64_t Hq, int64_t Hkv, int64_t D, float scale,
                int64_t window, float* out);

}  // namespace lmk
