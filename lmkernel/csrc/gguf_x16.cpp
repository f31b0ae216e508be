// Decode on k-quant rows repacked at load: 16 rows interleaved four code bytes at a time.
//
// A stored Q4_K / Q6_K row must be unpacked before it multiplies: 6-bit scales pulled out of 12 bytes,
// nibbles spread, scale vectors permuted. One core doing that for every super-block of every row is
// slower than its share of the memory, so batch-1 decode was bound by the unpacking, not the bandwidth.
// Here each group of 16 rows holds, per super-block of 256 weights:
//
//   Q4_K (160 bytes a row): d and dmin of the 16 rows (float16), the 8 scales and 8 minimums of each
//        row as bytes, sub-block major ([8][16]), the 12 stored scale bytes (to restore the row), and
//        the 128 bytes of codes as 32 vectors: vector c holds stored bytes 4c .. 4c + 3 of each row, so
//        its low nibbles are four consecutive weights of each row (one sub-block) and its high nibbles
//        the four 32 weights on.
//   Q6_K (210 bytes a row, as stored): d of the 16 rows, the 16 scales sub-block major ([16][16]), the
//        128 bytes of low nibbles as 32 vectors and the 64 bytes of high bits as 16, four bytes a row
//        each (stored ql / qh bytes 4c .. 4c + 3).
//
// One `dpbusd` of a vector of codes against four activations broadcast to every lane then adds to the
// 16 rows' sums at once: no horizontal sums, no unpacking but a mask and a shift. Activations are
// 8 + 6 bits per 256 (x = d (q + r / 64)) as in the stored-row decode kernels, so both give the same
// integer sums; from BATCH_ACT_ROWS rows a call on, 8 bits alone, and the rest's products are skipped.
#include "gguf_x16.h"

#include <cstring>

#include "simd.h"

#include "gguf_simd.h"

namespace lmk {

static constexpr int64_t PREFETCH = 2;  // super-blocks of a group read ahead (the hardware's streamer stops at 4 KB pages)

int64_t x16_bytes(int type) {
  switch (type) {
    case GGML_Q4_K: return 160;
    case GGML_Q6_K: return 210;
    default: return 0;
  }
}

// Moves `count` (16 or 32) dwords between a stored row's bytes (consecutive) and the interleaved layout
// (dword c of row r at 64 c + 4 r): one gather or scatter of 16 a vector where the build has them.
static inline void interleave(const uint8_t* row, uint8_t* lanes, int count) {
#if defined(__AVX512F__)
  const __m512i index = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(16));
  for (int c = 0; c < count; c += 16)
    _mm512_i32scatter_epi32(lanes + 64 * c, index, _mm512_loadu_si512(row + 4 * c), 4);
#else
  for (int c = 0; c < count; ++c) std::memcpy(lanes + 64 * c, row + 4 * c, 4);
#endif
}
static inline void deinterleave(const uint8_t* lanes, uint8_t* row, int count) {
#if defined(__AVX512F__)
  const __m512i index = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(16));
  for (int c = 0; c < count; c += 16)
    _mm512_storeu_si512(row + 4 * c, _mm512_i32gather_epi32(index, lanes + 64 * c, 4));
#else
  for (int c = 0; c < count; ++c) std::memcpy(row + 4 * c, lanes + 64 * c, 4);
#endif
}

void x16_pack(int type, const uint8_t* w, int64_t row_bytes, int64_t N, int64_t K, uint8_t* out) {
  const int64_t nb = K / 256, unit = 16 * x16_bytes(type), stored = type == GGML_Q4_K ? 144 : 210;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < N / 16; ++g)
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* o = out + (g * nb + b) * unit;
      for (int r = 0; r < 16; ++r) {
        const uint8_t* blk = w + (g * 16 + r) * row_bytes + b * stored;
        if (type == GGML_Q4_K) {
          std::memcpy(o + Q4K_D + 2 * r, blk, 2);
          std::memcpy(o + Q4K_DMIN + 2 * r, blk + 2, 2);
          uint8_t sc[8], mn[8];
          k4_scales(blk + 4, sc, mn);
          for (int s = 0; s < 8; ++s) o[Q4K_SC + 16 * s + r] = sc[s], o[Q4K_MN + 16 * s + r] = mn[s];
          std::memcpy(o + Q4K_RAW + 12 * r, blk + 4, 12);
          interleave(blk + 16, o + Q4K_CODES + 4 * r, 32);
        } else {
          std::memcpy(o + Q6K_D + 2 * r, blk + 208, 2);
          for (int s = 0; s < 16; ++s) o[Q6K_SC + 16 * s + r] = blk[192 + s];
          interleave(blk, o + Q6K_QL + 4 * r, 32);
          interleave(blk + 128, o + Q6K_QH + 4 * r, 16);
        }
      }
    }
}

const uint8_t* RowReader::row(int64_t n) {
  if (!w_.packed) return w_.data + n * w_.row_bytes;
  const int64_t g = n / 16;
  if (g != group_) {
    buf_.resize(16 * w_.row_bytes);
    x16_restore(type_, w_.data, g, w_.K, buf_.data());
    group_ = g;
  }
  return buf_.data() + (n % 16) * w_.row_bytes;
}

void x16_restore(int type, const uint8_t* packed, int64_t g, int64_t K, uint8_t* out) {
  const int64_t nb = K / 256, unit = 16 * x16_bytes(type), stored = type == GGML_Q4_K ? 144 : 210;
  const int64_t row_bytes = nb * stored;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* o = packed + (g * nb + b) * unit;
    for (int r = 0; r < 16; ++r) {
      uint8_t* blk = out + r * row_bytes + b * stored;
      if (type == GGML_Q4_K) {
        std::memcpy(blk, o + Q4K_D + 2 * r, 2);
        std::memcpy(blk + 2, o + Q4K_DMIN + 2 * r, 2);
        std::memcpy(blk + 4, o + Q4K_RAW + 12 * r, 12);
        deinterleave(o + Q4K_CODES + 4 * r, blk + 16, 32);
      } else {
        std::memcpy(blk + 208, o + Q6K_D + 2 * r, 2);
        for (int s = 0; s < 16; ++s) blk[192 + s] = o[Q6K_SC + 16 * s + r];
        deinterleave(o + Q6K_QL + 4 * r, blk, 32);
        deinterleave(o + Q6K_QH + 4 * r, blk + 128, 16);
      }
    }
  }
}

#if defined(LMK_K512) && defined(__AVX512VNNI__)
#define LMK_X16 1

bool x16_kernel() { return true; }

static inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}
static inline __m512 halves16(const uint8_t* p) {  // 16 float16 -> float32
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Codes (16 rows x 4) against four activations of each row m: 64 q + r accumulates as aq, ar (q alone
// without REST, where the activations' rest is zero).
template <int M, bool REST>
static inline void dot4(__m512i codes, const QuantizedActs& a, const int64_t* at, int64_t k, __m512i* aq, __m512i* ar) {
  for (int m = 0; m < M; ++m) {
    aq[m] = _mm512_dpbusd_epi32(aq[m], codes, bcast4(a.q.data() + at[m] + k));
    if constexpr (REST) ar[m] = _mm512_dpbusd_epi32(ar[m], codes, bcast4(a.r.data() + at[m] + k));
  }
}
// The integer sum 64 q + r in steps of d / 64 (REST), or q's in steps of d.
template <bool REST>
static inline __m512i combine(__m512i aq, __m512i ar) {
  if constexpr (REST) return _mm512_add_epi32(_mm512_slli_epi32(aq, 6), ar);
  return aq;
}

template <int M, bool REST>
static void q4k_group(const uint8_t* g, int64_t nb, const QuantizedActs& a, int64_t m0, float* y, int64_t ldy) {
  const int64_t K = a.K;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* o = g + b * 16 * 160;
    int64_t at[M];
    for (int m = 0; m < M; ++m) at[m] = (m0 + m) * K + b * 256;
    __m512i isb[M];
    __m512 fmin[M];
    for (int m = 0; m < M; ++m) isb[m] = _mm512_setzero_si512(), fmin[m] = _mm512_setzero_ps();
    for (int j = 0; j < 4; ++j) {  // span j: low nibbles sub-block 2j, high nibbles 2j + 1
      __m512i ql[M], rl[M], qh[M], rh[M];
      for (int m = 0; m < M; ++m) ql[m] = rl[m] = qh[m] = rh[m] = _mm512_setzero_si512();
      for (int c = 0; c < 10; ++c)  // the super-block PREFETCH ahead, a tenth of its 40 lines a span
        _mm_prefetch(reinterpret_cast<const char*>(o + PREFETCH * 16 * 160 + 64 * (10 * j + c)), _MM_HINT_T0);
      for (int c = 0; c < 8; ++c) {
        const __m512i v = _mm512_loadu_si512(o + Q4K_CODES + 64 * (8 * j + c));
        const int64_t k = 64 * j + 4 * c;
        dot4<M, REST>(_mm512_and_si512(v, low4), a, at, k, ql, rl);
        dot4<M, REST>(_mm512_and_si512(_mm512_srli_epi16(v, 4), low4), a, at, k + 32, qh, rh);
      }
      const __m128i* sc = reinterpret_cast<const __m128i*>(o + Q4K_SC);
      const __m512i slo = _mm512_cvtepu8_epi32(_mm_loadu_si128(sc + 2 * j)), shi = _mm512_cvtepu8_epi32(_mm_loadu_si128(sc + 2 * j + 1));
      for (int m = 0; m < M; ++m) {
        isb[m] = _mm512_add_epi32(isb[m], _mm512_mullo_epi32(combine<REST>(ql[m], rl[m]), slo));
        isb[m] = _mm512_add_epi32(isb[m], _mm512_mullo_epi32(combine<REST>(qh[m], rh[m]), shi));
      }
    }
    const __m128i* mn = reinterpret_cast<const __m128i*>(o + Q4K_MN);
    for (int s = 0; s < 8; ++s) {
      const __m512 mins = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(mn + s)));
      for (int m = 0; m < M; ++m) fmin[m] = _mm512_fmadd_ps(mins, _mm512_set1_ps(a.sums32[at[m] / 32 + s]), fmin[m]);
    }
    const __m512 d = halves16(o + Q4K_D), dmin = halves16(o + Q4K_DMIN);
    for (int m = 0; m < M; ++m) {
      const float dx = a.d[(m0 + m) * (K / 256) + b] / (REST ? REST_STEPS : 1);
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isb[m]), _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc[m]);
      acc[m] = _mm512_fnmadd_ps(dmin, fmin[m], acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + m * ldy, acc[m]);
}

template <int M, bool REST>
static void q6k_group(const uint8_t* g, int64_t nb, const QuantizedActs& a, int64_t m0, float* y, int64_t ldy) {
  const int64_t K = a.K;
  const __m512i low4 = _mm512_set1_epi8(0x0F), bits45 = _mm512_set1_epi8(0x30);
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* o = g + b * 16 * 210;
    int64_t at[M];
    for (int m = 0; m < M; ++m) at[m] = (m0 + m) * K + b * 256;
    __m512 fsb[M], foff[M];
    for (int m = 0; m < M; ++m) fsb[m] = foff[m] = _mm512_setzero_ps();
    for (int h = 0; h < 2; ++h)
      for (int half = 0; half < 2; ++half) {  // weights 128 h + 32 q + 16 half .. + 15: sub-block 8 h + 2 q + half
        for (int c = 0; c < 13; ++c)  // the super-block PREFETCH ahead, a quarter of its 53 lines a step
          _mm_prefetch(reinterpret_cast<const char*>(o + PREFETCH * 16 * 210 + 64 * (13 * (2 * h + half) + c)), _MM_HINT_T0);
        __m512i aq[4][M], ar[4][M];
        for (int q = 0; q < 4; ++q)
          for (int m = 0; m < M; ++m) aq[q][m] = ar[q][m] = _mm512_setzero_si512();
        for (int c = 4 * half; c < 4 * half + 4; ++c) {
          // ql bytes 4c (A) and 32 + 4c (B) of half h: low nibbles weights 32 q + 4c for q = 0 (A), 1 (B),
          // high nibbles for q = 2 (A), 3 (B); qh bytes 4c: their top two bits, bits 2q.
          const __m512i A = _mm512_loadu_si512(o + Q6K_QL + 64 * (16 * h + c));
          const __m512i B = _mm512_loadu_si512(o + Q6K_QL + 64 * (16 * h + c + 8));
          const __m512i H = _mm512_loadu_si512(o + Q6K_QH + 64 * (8 * h + c));
          const __m512i codes[4] = {
              _mm512_or_si512(_mm512_and_si512(A, low4), _mm512_and_si512(_mm512_slli_epi16(H, 4), bits45)),
              _mm512_or_si512(_mm512_and_si512(B, low4), _mm512_and_si512(_mm512_slli_epi16(H, 2), bits45)),
              _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(A, 4), low4), _mm512_and_si512(H, bits45)),
              _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(B, 4), low4), _mm512_and_si512(_mm512_srli_epi16(H, 2), bits45))};
          for (int q = 0; q < 4; ++q) dot4<M, REST>(codes[q], a, at, 128 * h + 32 * q + 4 * c, aq[q], ar[q]);
        }
        for (int q = 0; q < 4; ++q) {
          const int s = 8 * h + 2 * q + half;
          const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(o + Q6K_SC + 16 * s))));
          for (int m = 0; m < M; ++m) {
            fsb[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(combine<REST>(aq[q][m], ar[q][m])), sc, fsb[m]);
            foff[m] = _mm512_fmadd_ps(sc, _mm512_set1_ps(a.sums16[at[m] / 16 + s]), foff[m]);
          }
        }
      }
    const __m512 d = halves16(o + Q6K_D);
    for (int m = 0; m < M; ++m) {
      const float dx = a.d[(m0 + m) * (K / 256) + b] / (REST ? REST_STEPS : 1);
      const __m512 both = _mm512_fmadd_ps(fsb[m], _mm512_set1_ps(dx), _mm512_mul_ps(foff[m], _mm512_set1_ps(-32.f)));
      acc[m] = _mm512_fmadd_ps(both, d, acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + m * ldy, acc[m]);
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

// AVX2 (no vpdpbusd): four codes (unsigned) of each row times four activations (signed) by vpmaddubsw, pairs
// into 16 bits (at most 2 x 63 x 127: no saturation), then vpmaddwd by the weight of what was multiplied (64
// for q and 1 for its rest, or 1 for q alone), so one 32-bit sum a row holds 64 q + r as the 512-bit kernel's.
// A packed 64-byte vector is two halves of 8 rows; each half is a pass of its own over the group, so every
// sum of up to four activation rows stays in the 16 registers.
#define LMK_X16 1

bool x16_kernel() { return true; }

static inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
static inline __m256i bytes8(const uint8_t* p) {  // 8 bytes, zero-extended to 32 bits
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
static inline __m256 halves8(const uint8_t* p) {  // 8 float16 -> float32
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <int M, bool REST>
static inline void dot4(__m256i codes, const QuantizedActs& a, const int64_t* at, int64_t k, __m256i* acc) {
  const __m256i ones = _mm256_set1_epi16(1), qweight = _mm256_set1_epi16(REST ? REST_STEPS : 1);
  for (int m = 0; m < M; ++m) {
    acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(_mm256_maddubs_epi16(codes, bcast4(a.q.data() + at[m] + k)), qweight));
    if constexpr (REST)
      acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(_mm256_maddubs_epi16(codes, bcast4(a.r.data() + at[m] + k)), ones));
  }
}

template <int M, bool REST>
static void q4k_group(const uint8_t* g, int64_t nb, const QuantizedActs& a, int64_t m0, float* y, int64_t ldy) {
  const int64_t K = a.K;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int h = 0; h < 2; ++h) {  // rows 8 h .. 8 h + 7: bytes 32 h .. 32 h + 31 of every packed vector
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* o = g + b * 16 * 160;
      int64_t at[M];
      for (int m = 0; m < M; ++m) at[m] = (m0 + m) * K + b * 256;
      __m256i isb[M];
      __m256 fmin[M];
      for (int m = 0; m < M; ++m) isb[m] = _mm256_setzero_si256(), fmin[m] = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {  // span j: low nibbles sub-block 2j, high nibbles 2j + 1
        if (h == 0)
          for (int c = 0; c < 10; ++c)  // the super-block PREFETCH ahead, a tenth of its 40 lines a span
            _mm_prefetch(reinterpret_cast<const char*>(o + PREFETCH * 16 * 160 + 64 * (10 * j + c)), _MM_HINT_T0);
        __m256i lo[M], hi[M];
        for (int m = 0; m < M; ++m) lo[m] = hi[m] = _mm256_setzero_si256();
        for (int c = 0; c < 8; ++c) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(o + Q4K_CODES + 64 * (8 * j + c) + 32 * h));
          const int64_t k = 64 * j + 4 * c;
          dot4<M, REST>(_mm256_and_si256(v, low4), a, at, k, lo);
          dot4<M, REST>(_mm256_and_si256(_mm256_srli_epi16(v, 4), low4), a, at, k + 32, hi);
        }
        const __m256i slo = bytes8(o + Q4K_SC + 16 * (2 * j) + 8 * h), shi = bytes8(o + Q4K_SC + 16 * (2 * j + 1) + 8 * h);
        for (int m = 0; m < M; ++m)
          isb[m] = _mm256_add_epi32(isb[m], _mm256_add_epi32(_mm256_mullo_epi32(lo[m], slo), _mm256_mullo_epi32(hi[m], shi)));
      }
      for (int s = 0; s < 8; ++s) {
        const __m256 mins = _mm256_cvtepi32_ps(bytes8(o + Q4K_MN + 16 * s + 8 * h));
        for (int m = 0; m < M; ++m) fmin[m] = _mm256_fmadd_ps(mins, _mm256_set1_ps(a.sums32[at[m] / 32 + s]), fmin[m]);
      }
      const __m256 d = halves8(o + Q4K_D + 16 * h), dmin = halves8(o + Q4K_DMIN + 16 * h);
      for (int m = 0; m < M; ++m) {
        const float dx = a.d[(m0 + m) * (K / 256) + b] / (REST ? REST_STEPS : 1);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isb[m]), _mm256_mul_ps(d, _mm256_set1_ps(dx)), acc[m]);
        acc[m] = _mm256_fnmadd_ps(dmin, fmin[m], acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) _mm256_storeu_ps(y + m * ldy + 8 * h, acc[m]);
  }
}

template <int M, bool REST>
static void q6k_group(const uint8_t* g, int64_t nb, const QuantizedActs& a, int64_t m0, float* y, int64_t ldy) {
  const int64_t K = a.K;
  const __m256i low4 = _mm256_set1_epi8(0x0F), bits45 = _mm256_set1_epi8(0x30);
  for (int rh = 0; rh < 2; ++rh) {  // rows 8 rh .. 8 rh + 7
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* o = g + b * 16 * 210;
      int64_t at[M];
      for (int m = 0; m < M; ++m) at[m] = (m0 + m) * K + b * 256;
      __m256 fsb[M], foff[M];
      for (int m = 0; m < M; ++m) fsb[m] = foff[m] = _mm256_setzero_ps();
      for (int h = 0; h < 2; ++h)
        for (int half = 0; half < 2; ++half) {  // weights 128 h + 32 q + 16 half .. + 15: sub-block 8 h + 2 q + half
          if (rh == 0)
            for (int c = 0; c < 13; ++c)  // the super-block PREFETCH ahead, a quarter of its 53 lines a step
              _mm_prefetch(reinterpret_cast<const char*>(o + PREFETCH * 16 * 210 + 64 * (13 * (2 * h + half) + c)), _MM_HINT_T0);
          __m256i aq[4][M];
          for (int q = 0; q < 4; ++q)
            for (int m = 0; m < M; ++m) aq[q][m] = _mm256_setzero_si256();
          for (int c = 4 * half; c < 4 * half + 4; ++c) {
            const __m256i A = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(o + Q6K_QL + 64 * (16 * h + c) + 32 * rh));
            const __m256i B = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(o + Q6K_QL + 64 * (16 * h + c + 8) + 32 * rh));
            const __m256i H = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(o + Q6K_QH + 64 * (8 * h + c) + 32 * rh));
            const __m256i codes[4] = {
                _mm256_or_si256(_mm256_and_si256(A, low4), _mm256_and_si256(_mm256_slli_epi16(H, 4), bits45)),
                _mm256_or_si256(_mm256_and_si256(B, low4), _mm256_and_si256(_mm256_slli_epi16(H, 2), bits45)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(A, 4), low4), _mm256_and_si256(H, bits45)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(B, 4), low4), _mm256_and_si256(_mm256_srli_epi16(H, 2), bits45))};
            for (int q = 0; q < 4; ++q) dot4<M, REST>(codes[q], a, at, 128 * h + 32 * q + 4 * c, aq[q]);
          }
          for (int q = 0; q < 4; ++q) {
            const int s = 8 * h + 2 * q + half;
            const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(o + Q6K_SC + 16 * s + 8 * rh))));
            for (int m = 0; m < M; ++m) {
              fsb[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(aq[q][m]), sc, fsb[m]);
              foff[m] = _mm256_fmadd_ps(sc, _mm256_set1_ps(a.sums16[at[m] / 16 + s]), foff[m]);
            }
          }
        }
      const __m256 d = halves8(o + Q6K_D + 16 * rh);
      for (int m = 0; m < M; ++m) {
        const float dx = a.d[(m0 + m) * (K / 256) + b] / (REST ? REST_STEPS : 1);
        const __m256 both = _mm256_fmadd_ps(fsb[m], _mm256_set1_ps(dx), _mm256_mul_ps(foff[m], _mm256_set1_ps(-32.f)));
        acc[m] = _mm256_fmadd_ps(both, d, acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) _mm256_storeu_ps(y + m * ldy + 8 * rh, acc[m]);
  }
}

#endif

#ifdef LMK_X16

template <int M, bool REST>
static void groups(int type, const uint8_t* packed, int64_t K, const QuantizedActs& a, int64_t m0, int64_t g0, int64_t g1,
                   float* y, int64_t ldy) {
  const int64_t nb = K / 256, stride = nb * 16 * x16_bytes(type);
  for (int64_t g = g0; g < g1; ++g) {
    if (type == GGML_Q4_K) q4k_group<M, REST>(packed + g * stride, nb, a, m0, y + m0 * ldy + 16 * g, ldy);
    else q6k_group<M, REST>(packed + g * stride, nb, a, m0, y + m0 * ldy + 16 * g, ldy);
  }
}

template <int M>
static void groups(int type, const uint8_t* packed, int64_t K, const QuantizedActs& a, int64_t m0, int64_t g0, int64_t g1,
                   float* y, int64_t ldy) {
  if (a.rest) groups<M, true>(type, packed, K, a, m0, g0, g1, y, ldy);
  else groups<M, false>(type, packed, K, a, m0, g0, g1, y, ldy);
}

void x16_rows(int type, const uint8_t* packed, int64_t K, const QuantizedActs& a, int64_t m0, int rows, int64_t g0,
              int64_t g1, float* y, int64_t ldy) {
  switch (rows) {
    case 1: groups<1>(type, packed, K, a, m0, g0, g1, y, ldy); break;
    case 2: groups<2>(type, packed, K, a, m0, g0, g1, y, ldy); break;
    case 3: groups<3>(type, packed, K, a, m0, g0, g1, y, ldy); break;
    default: groups<4>(type, packed, K, a, m0, g0, g1, y, ldy); break;
  }
}

#else

bool x16_kernel() { return false; }
void x16_rows(int, const uint8_t*, int64_t, const QuantizedActs&, int64_t, int, int64_t, int64_t, float*, int64_t) {}

#endif

}  // namespace lmk
