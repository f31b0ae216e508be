// SIMD pieces shared by the GGUF block kernels (gguf_dot.cpp: decode rows; gguf_gemm.cpp: prefill):
// unpacking blocks into unsigned codes, and integer dot products of codes with int8 activations.
#pragma once

#include <cstring>

#include "gguf_blocks.h"

namespace lmk {

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LMK_INT_SIMD 1

#include <immintrin.h>

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LMK_VNNI256(a, b, c) _mm256_dpbusd_epi32(a, b, c)
#define LMK_VNNI256W(a, b, c) _mm256_dpwssd_epi32(a, b, c)
#elif defined(__AVXVNNI__)
#define LMK_VNNI256(a, b, c) _mm256_dpbusd_avx_epi32(a, b, c)
#define LMK_VNNI256W(a, b, c) _mm256_dpwssd_avx_epi32(a, b, c)
#endif

static inline float hsum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float hsum4(__m128 s) {
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline __m256i load32(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// 16 bytes of nibbles -> 32 codes: low nibbles first, then high ones.
static inline __m256i nibbles32(const uint8_t* p) {
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
}

// Bit j of the 32-bit word at p -> 0x10 in byte j (the fifth bit of Q5_0 / Q5_1 codes).
static inline __m256i fifth_bits32(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0));
  const __m256i select = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

// acc + the sums of four products of unsigned codes u and signed values s (without VNNI, pairs of
// products must fit 16 bits: codes <= 128 against |s| <= 127).
static inline __m256i dot_us8(__m256i acc, __m256i u, __m256i s) {
#ifdef LMK_VNNI256
  return LMK_VNNI256(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// acc + the pairwise products of u and s, each pair times its 16-bit scale (one per 16 weights).
static inline __m256i dot_scaled(__m256i acc, __m256i u, __m256i s, __m256i scale16) {
  const __m256i p = _mm256_maddubs_epi16(u, s);
#ifdef LMK_VNNI256W
  return LMK_VNNI256W(acc, p, scale16);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, scale16));
#endif
}

// ---- legacy types: blocks of 32 ------------------------------------------------------------------
template <int TYPE> struct Legacy;
template <> struct Legacy<GGML_Q4_0> { static constexpr int64_t bytes = 18; };
template <> struct Legacy<GGML_Q4_1> { static constexpr int64_t bytes = 20; };
template <> struct Legacy<GGML_Q5_0> { static constexpr int64_t bytes = 22; };
template <> struct Legacy<GGML_Q5_1> { static constexpr int64_t bytes = 24; };
template <> struct Legacy<GGML_Q8_0> { static constexpr int64_t bytes = 34; };

// The 32 codes of a block as unsigned bytes (Q8_0: its signed values), its scale d, and the offset
// each weight carries: w = d code + offset.
template <int TYPE>
static inline __m256i legacy_codes(const uint8_t* b, float* d, float* offset) {
  *d = half(b);
  if (TYPE == GGML_Q4_0) { *offset = -8.f * *d; return nibbles32(b + 2); }
  if (TYPE == GGML_Q4_1) { *offset = half(b + 2); return nibbles32(b + 4); }
  if (TYPE == GGML_Q5_0) { *offset = -16.f * *d; return _mm256_or_si256(nibbles32(b + 6), fifth_bits32(b + 2)); }
  if (TYPE == GGML_Q5_1) { *offset = half(b + 2); return _mm256_or_si256(nibbles32(b + 8), fifth_bits32(b + 4)); }
  *offset = 0.f;
  return load32(b + 2);
}

// ---- k-quants: super-blocks of 256 ---------------------------------------------------------------
template <int TYPE> struct KQuant;
template <> struct KQuant<GGML_Q4_K> { static constexpr int64_t bytes = 144; };
template <> struct KQuant<GGML_Q5_K> { static constexpr int64_t bytes = 176; };
template <> struct KQuant<GGML_Q6_K> { static constexpr int64_t bytes = 210; };

#if defined(__AVX512BW__) && defined(__AVX512VL__)
#define LMK_K512 1
// 64 weights a vector. Codes of Q4_K / Q5_K: the 32 bytes of one 64-weight span hold weights l (low
// nibble) and l + 32 (high nibble); loaded into both halves of a vector and shifted by 0 or 4.
static inline __m512i both_halves(const uint8_t* p) {
  return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
static inline __m512i shift_halves(__m512i v, int lo, int hi) {  // 16-bit lanes 0-15 by lo, 16-31 by hi
  return _mm512_srlv_epi16(v, _mm512_inserti64x4(_mm512_set1_epi16(static_cast<short>(lo)),
                                                 _mm256_set1_epi16(static_cast<short>(hi)), 1));
}
static inline __m512i dot_scaled512(__m512i acc, __m512i u, __m512i s, __m512i scale16) {
  const __m512i p = _mm512_maddubs_epi16(u, s);
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, p, scale16);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(p, scale16));
#endif
}


// Which 16-bit scale each pair of weights of a 64-weight span takes: Q4_K / Q5_K have one scale per
// 32 weights (span j: scales 2j, 2j + 1), Q6_K one per 16 (span j: scales 4j ... 4j + 3).
template <int TYPE>
static inline __m512i span_scale_index(int j) {
  struct Table {
    alignas(64) int16_t idx[4][32];
    Table() {
      for (int s = 0; s < 4; ++s)
        for (int i = 0; i < 32; ++i) idx[s][i] = static_cast<int16_t>(TYPE == GGML_Q6_K ? 4 * s + i / 8 : 2 * s + i / 16);
    }
  };
  static const Table table;  // built once
  return _mm512_load_si512(table.idx[j]);
}

// A k-quant super-block unpacked into four spans of 64 weights: unsigned codes (0-15, 0-31 or 0-63)
// and the 16-bit scale of each pair of weights, for `dot_scaled512`.
struct KSpans {
  __m512i codes[4], scales[4];
  float d, dmin;  // Q4_K / Q5_K: w = d sc q - dmin m; Q6_K: w = d sc (q - 32)
  __m256 offsets; // Q4_K / Q5_K: the eight -dmin m (a weight's offset, per 32); Q6_K: unused
  __m256i sc16;   // Q6_K: the sixteen scales, 16-bit
};

// A Q6_K half's 128 codes as two spans of 64: ql its 64 bytes of low nibbles, qh its 32 bytes of high
// bits in both halves of a vector.
static inline void q6k_half(__m512i ql, __m512i qh, __m512i* codes) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), low2 = _mm512_set1_epi8(3);
  codes[0] = _mm512_or_si512(_mm512_and_si512(ql, low4), _mm512_slli_epi16(_mm512_and_si512(shift_halves(qh, 0, 2), low2), 4));
  codes[1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low4),
                             _mm512_slli_epi16(_mm512_and_si512(shift_halves(qh, 4, 6), low2), 4));
}

// A Q4_K / Q5_K super-block's eight scales and minimums (s.dmin set) as `KSpans` holds them: the 16-bit
// scale of each pair of weights of each span, and each 32 weights' offset -dmin m.
static inline void k4_vectors(const uint8_t* sc, const uint8_t* mn, const __m512i* pick, KSpans& s) {
  uint64_t sc64, mn64;
  std::memcpy(&sc64, sc, 8);
  std::memcpy(&mn64, mn, 8);
  const __m512i scales = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(static_cast<long long>(sc64))));
  s.offsets = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(mn64)))),
                            _mm256_set1_ps(-s.dmin));
  for (int j = 0; j < 4; ++j) s.scales[j] = _mm512_permutexvar_epi16(pick[j], scales);
}

template <int TYPE>
static inline void unpack_k512(const uint8_t* blk, const __m512i* pick, KSpans& s) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), one = _mm512_set1_epi8(1);
  if (TYPE == GGML_Q6_K) {
    // ql[l] holds weights l (low nibble) and 64 + l (high) of each half, ql[32 + l] weights 32 + l and
    // 96 + l; qh[l] their top two bits, in pairs from bit 0.
    s.d = half(blk + 208);
    s.dmin = 0.f;
    s.sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192)));
    const __m512i scales = _mm512_castsi256_si512(s.sc16);
    for (int h = 0; h < 2; ++h) q6k_half(_mm512_loadu_si512(blk + 64 * h), both_halves(blk + 128 + 32 * h), s.codes + 2 * h);
    for (int j = 0; j < 4; ++j) s.scales[j] = _mm512_permutexvar_epi16(pick[j], scales);
    return;
  }
  // Q4_K / Q5_K: qs[32 j + l] holds weights 64 j + l (low nibble) and 64 j + 32 + l (high); Q5_K's
  // qh[l] their fifth bits, bit 2 j and 2 j + 1.
  s.d = half(blk);
  s.dmin = half(blk + 2);
  alignas(8) uint8_t sc[8], mn[8];
  k4_scales(blk + 4, sc, mn);
  k4_vectors(sc, mn, pick, s);
  const uint8_t* qs = blk + (TYPE == GGML_Q5_K ? 48 : 16);
  __m512i qh = _mm512_setzero_si512();
  if (TYPE == GGML_Q5_K) qh = both_halves(blk + 16);
  for (int j = 0; j < 4; ++j) {
    s.codes[j] = _mm512_and_si512(shift_halves(both_halves(qs + 32 * j), 0, 4), low4);
    if (TYPE == GGML_Q5_K)
      s.codes[j] = _mm512_or_si512(s.codes[j], _mm512_slli_epi16(_mm512_and_si512(shift_halves(qh, 2 * j, 2 * j + 1), one), 4));
  }
}
#endif  // AVX-512
#endif  // AVX2

}  // namespace lmk
