// GGUF k-quant rows repacked at load for decode (gguf_x16.cpp): 16 weight rows interleaved four code
// bytes at a time, scales unpacked, so one vector holds four codes of each of 16 rows and a decode step
// streams the weights once with no per-block unpacking; the stored blocks can be restored exactly.
#pragma once

#include <cstdint>
#include <vector>

#include "gguf_blocks.h"
#include "gguf_simd.h"

namespace lmk {

// Bytes one row's super-block of `type` takes in the repacked layout; 0 where the type has no such layout.
int64_t x16_bytes(int type);

// N stored rows (row_bytes each, K weights, N a multiple of 16) -> out, [N / 16 groups][K / 256
// super-blocks][16 rows x x16_bytes].
void x16_pack(int type, const uint8_t* w, int64_t row_bytes, int64_t N, int64_t K, uint8_t* out);

// The stored bytes of the 16 rows of group g -> out [16][row_bytes] (exactly what was packed).
void x16_restore(int type, const uint8_t* packed, int64_t g, int64_t K, uint8_t* out);

// y[m, n] (row stride ldy) for the rows n of groups [g0, g1) and activation rows m0 .. m0 + rows - 1
// (rows <= 4), activations quantized to 8 + 6 bits per 256 as the decode kernels of gguf_dot.cpp read
// them (or to 8 alone, `a.rest` false: half the multiplies).
void x16_rows(int type, const uint8_t* packed, int64_t K, const QuantizedActs& a, int64_t m0, int rows, int64_t g0,
              int64_t g1, float* y, int64_t ldy);

// A thread's reader of stored rows: `row(n)` points at row n as stored, read in place or (packed)
// restored with the other 15 rows of its group into the reader's buffer. Rows are read in order.
class RowReader {
 public:
  RowReader(int type, const WeightRows& w) : type_(type), w_(w) {}
  const uint8_t* row(int64_t n);

 private:
  int type_;
  WeightRows w_;
  int64_t group_ = -1;
  std::vector<uint8_t> buf_;
};

// Whether this build runs `x16_rows` (AVX-512 with VNNI, or AVX2); where not, callers restore the stored rows.
bool x16_kernel();

// Offsets within one group's super-block (16 rows): Q4_K 2,560 bytes, Q6_K 3,360 (see gguf_x16.cpp).
// Packed layers are kept on disk between loads (lmkernel/loader/packed_cache.py): a change to this layout
// must bump its LAYOUT_VERSION.
static constexpr int64_t Q4K_D = 0, Q4K_DMIN = 32, Q4K_SC = 64, Q4K_MN = 192, Q4K_RAW = 320, Q4K_CODES = 512;
static constexpr int64_t Q6K_D = 0, Q6K_SC = 32, Q6K_QL = 288, Q6K_QH = 2336;

#ifdef LMK_K512
// Row r of the packed super-block o unpacked as `unpack_k512` unpacks a stored block (and, Q4_K, its
// minimums into mn[8]): the tile kernels read the packed layout without restoring it.
template <int TYPE>
static inline void unpack_k512_x16(const uint8_t* o, int r, const __m512i* pick, KSpans& s, uint8_t* mn) {
  const __m512i lanes = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(16));
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  alignas(16) int8_t sc[16];
  if (TYPE == GGML_Q6_K) {
    s.d = half(o + Q6K_D + 2 * r);
    s.dmin = 0.f;
    for (int i = 0; i < 16; ++i) sc[i] = static_cast<int8_t>(o[Q6K_SC + 16 * i + r]);
    s.sc16 = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(sc)));
    const __m512i scales = _mm512_castsi256_si512(s.sc16);
    for (int h = 0; h < 2; ++h)  // ql: 16 dwords of half h; qh: 8, in both halves of a vector
      q6k_half(_mm512_i32gather_epi32(lanes, o + Q6K_QL + 64 * 16 * h + 4 * r, 4),
               _mm512_broadcast_i64x4(_mm256_i32gather_epi32(reinterpret_cast<const int*>(o + Q6K_QH + 64 * 8 * h + 4 * r),
                                                             _mm512_castsi512_si256(lanes), 4)),
               s.codes + 2 * h);
    for (int j = 0; j < 4; ++j) s.scales[j] = _mm512_permutexvar_epi16(pick[j], scales);
    return;
  }
  s.d = half(o + Q4K_D + 2 * r);
  s.dmin = half(o + Q4K_DMIN + 2 * r);
  uint8_t scales[8];
  for (int i = 0; i < 8; ++i) scales[i] = o[Q4K_SC + 16 * i + r], mn[i] = o[Q4K_MN + 16 * i + r];
  k4_vectors(scales, mn, pick, s);
  for (int jj = 0; jj < 2; ++jj) {  // 16 dwords: the stored bytes of spans 2 jj and 2 jj + 1
    const __m512i both = _mm512_i32gather_epi32(lanes, o + Q4K_CODES + 64 * 16 * jj + 4 * r, 4);
    for (int k = 0; k < 2; ++k) {
      const int j = 2 * jj + k;
      const __m512i span = _mm512_broadcast_i64x4(k ? _mm512_extracti64x4_epi64(both, 1) : _mm512_castsi512_si256(both));
      s.codes[j] = _mm512_and_si512(shift_halves(span, 0, 4), low4);
    }
  }
}
#endif

}  // namespace lmk
