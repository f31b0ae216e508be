// Dot products of GGUF blocks, as stored, with activations quantized to 8 + 6 bits (gguf_blocks.h).
//
// Each kernel takes one weight row and up to four activation rows, unpacks every block of the weight
// row once for all of them, and keeps the arithmetic in integers within a block: codes (unsigned)
// times the int8 activations q and their rests r (combined as 64 q + r), summed in pairs (`maddubs`) and in fours (`madd` with ones, or with the
// sub-block scales); VNNI (`dpbusd`, `dpwssd`) fuses those steps where the CPU has it. Per block, the integer sum is scaled by the
// weight's and the activation's scales, and each weight's offset (the minimum, or the -8 / -16 / -32
// of the symmetric types) meets the activation block's sum.
//
// Legacy types and AVX2 machines run 256-bit vectors (one block of 32 a vector); k-quants on
// AVX-512 machines run 512-bit ones (64 weights a vector). Without AVX2, rows are dequantized and
// multiplied in float.
#include <algorithm>
#include <cstring>

#include "dense_rows.h"
#include "gguf_blocks.h"
#include "gguf_simd.h"
#include "simd.h"

namespace lmk {

#ifdef LMK_INT_SIMD

template <int TYPE, int M>
static void dot_legacy(const uint8_t* w, const QuantizedActs& a, int64_t m0, float* y, int64_t ldy) {
  constexpr int64_t BYTES = Legacy<TYPE>::bytes;
  const int64_t K = a.K, nb = K / 32;
  __m256 acc[M];
  float offsets[M];
  for (int m = 0; m < M; ++m) { acc[m] = _mm256_setzero_ps(); offsets[m] = 0.f; }
  const int8_t* xq = a.q.data() + m0 * K;
  const int8_t* xr = a.r.data() + m0 * K;
  const float* xd = a.d.data() + m0 * nb;
  const float* xs = a.sums32.data() + m0 * nb;
  for (int64_t b = 0; b < nb; ++b) {
    float d, offset;
    const __m256i codes = legacy_codes<TYPE>(w + b * BYTES, &d, &offset);
    const __m256i u = TYPE == GGML_Q8_0 ? _mm256_sign_epi8(codes, codes) : codes;
    for (int m = 0; m < M; ++m) {
      __m256i q = load32(xq + m * K + b * 32), r = load32(xr + m * K + b * 32);
      if (TYPE == GGML_Q8_0) {  // signed weights: their magnitudes against the activations' signs flipped to match
        q = _mm256_sign_epi8(q, codes);
        r = _mm256_sign_epi8(r, codes);
      }
      const __m256i sums = dot_us8(_mm256_slli_epi32(dot_us8(_mm256_setzero_si256(), u, q), 6), u, r);  // 64 q + r
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(d * xd[m * nb + b] / REST_STEPS), acc[m]);
      if (TYPE != GGML_Q8_0) offsets[m] += offset * xs[m * nb + b];
    }
  }
  for (int m = 0; m < M; ++m) y[m * ldy] = hsum8(acc[m]) + offsets[m];
}

#if defined(LMK_K512) && defined(__AVX512VNNI__)
#define LMK_LEGACY512 1
// Two blocks of 32 a vector, their codes in weight order: low then high nibbles of one block, then of
// the next (Q8_0: their signed values). Sets each block's scale and offset.
template <int TYPE>
static inline __m512i legacy_codes512(const uint8_t* b0, const uint8_t* b1, float* d, float* offset) {
  d[0] = half(b0);
  d[1] = half(b1);
  if (TYPE == GGML_Q8_0) {
    offset[0] = offset[1] = 0.f;
    return _mm512_inserti64x4(_mm512_castsi256_si512(load32(b0 + 2)), load32(b1 + 2), 1);
  }
  constexpr int QS = TYPE == GGML_Q4_0 ? 2 : TYPE == GGML_Q4_1 ? 4 : TYPE == GGML_Q5_0 ? 6 : 8;
  constexpr bool MIN = TYPE == GGML_Q4_1 || TYPE == GGML_Q5_1, FIVE = TYPE == GGML_Q5_0 || TYPE == GGML_Q5_1;
  for (int h = 0; h < 2; ++h) offset[h] = MIN ? half((h ? b1 : b0) + 2) : (FIVE ? -16.f : -8.f) * d[h];
  const __m128i t0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b0 + QS));
  const __m128i t1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b1 + QS));
  __m512i v = _mm512_castsi128_si512(t0);
  v = _mm512_inserti32x4(v, _mm_srli_epi16(t0, 4), 1);
  v = _mm512_inserti32x4(v, t1, 2);
  v = _mm512_inserti32x4(v, _mm_srli_epi16(t1, 4), 3);
  __m512i codes = _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
  if (FIVE) {  // the fifth bits: bit j of a block's 32-bit word is weight j's
    uint32_t h0, h1;
    std::memcpy(&h0, b0 + (MIN ? 4 : 2), 4);
    std::memcpy(&h1, b1 + (MIN ? 4 : 2), 4);
    const __mmask64 high = _cvtu64_mask64(static_cast<uint64_t>(h0) | static_cast<uint64_t>(h1) << 32);
    codes = _mm512_or_si512(codes, _mm512_maskz_mov_epi8(high, _mm512_set1_epi8(0x10)));
  }
  return codes;
}

// 64 weights (two blocks) a vector: codes against q and r (`dpbusd`, 64 q + r), each block's 8 lanes
// scaled by its d times the activations' per-lane scale.
template <int TYPE, int M>
static void dot_legacy512(const uint8_t* w, const QuantizedActs& a, int64_t m0, float* y, int64_t ldy) {
  constexpr int64_t BYTES = Legacy<TYPE>::bytes;
  const int64_t K = a.K, spans = K / 64;
  __m512 acc[M];
  __m128 offsets[M];  // lanes 0 and 1: each block's offset against its activations' sum (vectors, so that a row's
                      // float sums are the same whether 1 or 4 rows run: scalar ones get vectorized across rows)
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps(), offsets[m] = _mm_setzero_ps();
  for (int64_t s = 0; s < spans; ++s) {
    float d[2], offset[2];
    const __m512i codes = legacy_codes512<TYPE>(w + 2 * s * BYTES, w + (2 * s + 1) * BYTES, d, offset);
    const __m512i u = TYPE == GGML_Q8_0 ? _mm512_abs_epi8(codes) : codes;
    const __mmask64 negative = TYPE == GGML_Q8_0 ? _mm512_movepi8_mask(codes) : 0;
    const __m512 dl = _mm512_insertf32x8(_mm512_set1_ps(d[0]), _mm256_set1_ps(d[1]), 1);
    const __m128 off = _mm_setr_ps(offset[0], offset[1], 0.f, 0.f);
    for (int m = 0; m < M; ++m) {
      const int64_t at = (m0 + m) * K + 64 * s;
      __m512i q = _mm512_loadu_si512(a.q.data() + at), r = _mm512_loadu_si512(a.r.data() + at);
      if (TYPE == GGML_Q8_0) {  // signed weights: their magnitudes against the activations' signs flipped to match
        q = _mm512_mask_sub_epi8(q, negative, _mm512_setzero_si512(), q);
        r = _mm512_mask_sub_epi8(r, negative, _mm512_setzero_si512(), r);
      }
      const __m512i sums = _mm512_dpbusd_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, q), 6), u, r);
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(dl, _mm512_loadu_ps(a.lanes.data() + at / 4)), acc[m]);
      if (TYPE != GGML_Q8_0)
        offsets[m] = _mm_fmadd_ps(off, _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(a.sums32.data() + at / 32))),
                                  offsets[m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    alignas(16) float o[4];
    _mm_store_ps(o, offsets[m]);
    y[m * ldy] = _mm512_reduce_add_ps(acc[m]) + (o[0] + o[1]);
  }
}
#endif

#ifdef LMK_K512
// 64 weights a vector: per span, the codes against q and against r, pairs scaled by their sub-block
// scales into int32 accumulators per super-block, combined as 64 q + r. Each weight's offset (the
// minimums, Q6_K's -32) meets the activations' sums in float.
template <int TYPE, int M>
static void dot_k(const uint8_t* w, const QuantizedActs& a, int64_t m0, float* y, int64_t ldy) {
  constexpr int64_t BYTES = KQuant<TYPE>::bytes;
  const int64_t K = a.K, nb = K / 256;
  __m512 acc[M];
  __m512 offsets[M];  // the weights' offsets against the activations' sums: per 32 (Q4_K / Q5_K), per 16 (Q6_K)
  for (int m = 0; m < M; ++m) acc[m] = offsets[m] = _mm512_setzero_ps();
  __m512i pick[4];
  for (int j = 0; j < 4; ++j) pick[j] = span_scale_index<TYPE>(j);
  for (int64_t b = 0; b < nb; ++b) {
    KSpans s;
    unpack_k512<TYPE>(w + b * BYTES, pick, s);
    __m512 off16;
    if constexpr (TYPE == GGML_Q6_K) off16 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(s.sc16)), _mm512_set1_ps(-32.f * s.d));
    for (int m = 0; m < M; ++m) {
      const int64_t at = (m0 + m) * K + b * 256;
      __m512i iq = _mm512_setzero_si512(), ir = _mm512_setzero_si512();
      for (int j = 0; j < 4; ++j) {
        iq = dot_scaled512(iq, s.codes[j], _mm512_loadu_si512(a.q.data() + at + 64 * j), s.scales[j]);
        ir = dot_scaled512(ir, s.codes[j], _mm512_loadu_si512(a.r.data() + at + 64 * j), s.scales[j]);
      }
      if constexpr (TYPE == GGML_Q6_K) {
        offsets[m] = _mm512_fmadd_ps(off16, _mm512_loadu_ps(a.sums16.data() + at / 16), offsets[m]);
      } else {
        offsets[m] = _mm512_fmadd_ps(_mm512_zextps256_ps512(s.offsets), _mm512_zextps256_ps512(_mm256_loadu_ps(a.sums32.data() + at / 32)),
                                     offsets[m]);
      }
      const __m512i sums = _mm512_add_epi32(_mm512_slli_epi32(iq, 6), ir);  // 64 q + r
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(s.d * a.d[(m0 + m) * nb + b] / REST_STEPS), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) y[m * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m], offsets[m]));
}
#else
// 32 weights a vector.
template <int TYPE, int M>
static void dot_k(const uint8_t* w, const QuantizedActs& a, int64_t m0, float* y, int64_t ldy) {
  constexpr int64_t BYTES = KQuant<TYPE>::bytes;
  const int64_t K = a.K, nb = K / 256;
  const __m256i low4 = _mm256_set1_epi8(0x0F), low2 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
  __m256 acc[M];
  __m256 offsets[M];  // vectors, so that a row's float sums are the same whether 1 or 4 rows run
  for (int m = 0; m < M; ++m) acc[m] = offsets[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * BYTES;
    // The super-block as 8 groups of 32 codes, each with its 16-bit scales (one per 16 weights) and
    // the offset of each of its weights, per 16.
    __m256i codes[8], scales[8];
    float offset16[16];
    float d;
    if (TYPE == GGML_Q6_K) {
      d = half(blk + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
      for (int i = 0; i < 16; ++i) offset16[i] = -32.f * d * sc[i];
      for (int h = 0; h < 2; ++h) {
        const uint8_t* ql = blk + 64 * h;
        const __m256i qa = load32(ql), qb = load32(ql + 32), q2 = load32(blk + 128 + 32 * h);
        codes[4 * h] = _mm256_or_si256(_mm256_and_si256(qa, low4), _mm256_slli_epi16(_mm256_and_si256(q2, low2), 4));
        codes[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(qb, low4),
                                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q2, 2), low2), 4));
        codes[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qa, 4), low4),
                                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q2, 4), low2), 4));
        codes[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qb, 4), low4),
                                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q2, 6), low2), 4));
        for (int g = 0; g < 4; ++g)
          scales[4 * h + g] = _mm256_set_m128i(_mm_set1_epi16(sc[8 * h + 2 * g + 1]), _mm_set1_epi16(sc[8 * h + 2 * g]));
      }
    } else {
      d = half(blk);
      const float dmin = half(blk + 2);
      alignas(8) uint8_t sc[8], mn[8];
      k4_scales(blk + 4, sc, mn);
      for (int i = 0; i < 16; ++i) offset16[i] = -dmin * mn[i / 2];
      const uint8_t* qs = blk + (TYPE == GGML_Q5_K ? 48 : 16);
      const __m256i hbits = TYPE == GGML_Q5_K ? load32(blk + 16) : _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        const __m256i q = load32(qs + 32 * j);
        codes[2 * j] = _mm256_and_si256(q, low4);
        codes[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
        if (TYPE == GGML_Q5_K) {
          codes[2 * j] = _mm256_or_si256(codes[2 * j], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * j), one), 4));
          codes[2 * j + 1] =
              _mm256_or_si256(codes[2 * j + 1], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * j + 1), one), 4));
        }
        scales[2 * j] = _mm256_set1_epi16(sc[2 * j]);
        scales[2 * j + 1] = _mm256_set1_epi16(sc[2 * j + 1]);
      }
    }
    for (int m = 0; m < M; ++m) {
      const int64_t at = (m0 + m) * K + b * 256;
      __m256i iq = _mm256_setzero_si256(), ir = _mm256_setzero_si256();
      for (int g = 0; g < 8; ++g) {
        iq = dot_scaled(iq, codes[g], load32(a.q.data() + at + 32 * g), scales[g]);
        ir = dot_scaled(ir, codes[g], load32(a.r.data() + at + 32 * g), scales[g]);
      }
      const __m256i sums = _mm256_add_epi32(_mm256_slli_epi32(iq, 6), ir);  // 64 q + r
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(d * a.d[(m0 + m) * nb + b] / REST_STEPS), acc[m]);
      const float* sums16 = a.sums16.data() + at / 16;
      offsets[m] = _mm256_fmadd_ps(_mm256_loadu_ps(offset16), _mm256_loadu_ps(sums16), offsets[m]);
      offsets[m] = _mm256_fmadd_ps(_mm256_loadu_ps(offset16 + 8), _mm256_loadu_ps(sums16 + 8), offsets[m]);
    }
  }
  for (int m = 0; m < M; ++m) y[m * ldy] = hsum8(acc[m]) + hsum8(offsets[m]);
}
#endif  // AVX-512
#endif  // AVX2

// Portable path: each weight row dequantized, then float dot products with the float activations.
static void dot_portable(int type, const uint8_t* w, const QuantizedActs& a, int64_t m0, int rows, float* y, int64_t ldy) {
  std::vector<float> row(a.K);
  dequantize_rows(type, w, 0, 1, a.K, row.data());
  for (int m = 0; m < rows; ++m) {
    const float* x = a.x + (m0 + m) * a.K;
    float s = 0.f;
    for (int64_t k = 0; k < a.K; ++k) s += x[k] * row[k];
    y[m * ldy] = s;
  }
}

// A weight row against M activation rows; false where no kernel runs `type`.
template <int M>
static bool run(int type, const uint8_t* w, const QuantizedActs& a, int64_t m0, float* y, int64_t ldy) {
#ifdef LMK_INT_SIMD
#ifdef LMK_LEGACY512
  if (a.K % 64 == 0) {
    switch (type) {
      case GGML_Q4_0: dot_legacy512<GGML_Q4_0, M>(w, a, m0, y, ldy); return true;
      case GGML_Q4_1: dot_legacy512<GGML_Q4_1, M>(w, a, m0, y, ldy); return true;
      case GGML_Q5_0: dot_legacy512<GGML_Q5_0, M>(w, a, m0, y, ldy); return true;
      case GGML_Q5_1: dot_legacy512<GGML_Q5_1, M>(w, a, m0, y, ldy); return true;
      case GGML_Q8_0: dot_legacy512<GGML_Q8_0, M>(w, a, m0, y, ldy); return true;
      default: break;
    }
  }
#endif
  switch (type) {
    case GGML_Q4_0: dot_legacy<GGML_Q4_0, M>(w, a, m0, y, ldy); return true;
    case GGML_Q4_1: dot_legacy<GGML_Q4_1, M>(w, a, m0, y, ldy); return true;
    case GGML_Q5_0: dot_legacy<GGML_Q5_0, M>(w, a, m0, y, ldy); return true;
    case GGML_Q5_1: dot_legacy<GGML_Q5_1, M>(w, a, m0, y, ldy); return true;
    case GGML_Q8_0: dot_legacy<GGML_Q8_0, M>(w, a, m0, y, ldy); return true;
    case GGML_Q4_K: dot_k<GGML_Q4_K, M>(w, a, m0, y, ldy); return true;
    case GGML_Q5_K: dot_k<GGML_Q5_K, M>(w, a, m0, y, ldy); return true;
    case GGML_Q6_K: dot_k<GGML_Q6_K, M>(w, a, m0, y, ldy); return true;
    default: break;
  }
#endif
  return false;
}

// Rows [n0, n1) against M activation rows, one weight row at a time: each thread then reads one
// sequential stream, which the hardware prefetcher follows (several rows interleaved ran slower,
// and needed software prefetches to run at all).
template <int M>
static void rows_for(int type, const uint8_t* w, int64_t row_bytes, const QuantizedActs& a, int64_t m0, int64_t n0,
                     int64_t n1, float* y, int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * row_bytes;
    float* out = y + m0 * ldy + n;
    if (!run<M>(type, wr, a, m0, out, ldy)) dot_portable(type, wr, a, m0, M, out, ldy);
  }
}

static void float_rows(int type, const uint8_t* w, const QuantizedActs& a, int64_t m0, int rows, int64_t n0,
                       int64_t n1, float* y, int64_t ldy) {
  // F32 / BF16 rows through the dense streaming kernel; F16 converted a row at a time.
  const int64_t K = a.K;
  const float* x = a.x + m0 * K;
  float* ym = y + m0 * ldy;  // row m, column n at ym[m * ldy + n]
  if (type == GGML_F32 || type == GGML_BF16) {
    if (type == GGML_F32) run_rows(rows, x, reinterpret_cast<const float*>(w), nullptr, ym, n0, n1, K, ldy);
    else run_rows(rows, x, reinterpret_cast<const uint16_t*>(w), nullptr, ym, n0, n1, K, ldy);
    return;
  }
  std::vector<float> row(K);
  for (int64_t n = n0; n < n1; ++n) {
    dequantize_rows(type, w + n * K * 2, 0, 1, K, row.data());
    for (int m = 0; m < rows; ++m) {
      float s = 0.f;
#ifdef LMK_SIMD
      vec acc = vzero();
      int64_t k = 0;
      for (; k + W <= K; k += W) acc = vfma(vload(x + m * K + k), vload(row.data() + k), acc);
      s = vsum(acc);
      for (; k < K; ++k) s += x[m * K + k] * row[k];
#else
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * row[k];
#endif
      ym[m * ldy + n] = s;
    }
  }
}

void gguf_rows(int type, const uint8_t* w, int64_t row_bytes, const QuantizedActs& a, int64_t m0, int rows,
               int64_t n0, int64_t n1, float* y, int64_t ldy) {
  if (a.family == ACT_FLOAT) return float_rows(type, w, a, m0, rows, n0, n1, y, ldy);
  switch (rows) {
    case 1: rows_for<1>(type, w, row_bytes, a, m0, n0, n1, y, ldy); break;
    case 2: rows_for<2>(type, w, row_bytes, a, m0, n0, n1, y, ldy); break;
    case 3: rows_for<3>(type, w, row_bytes, a, m0, n0, n1, y, ldy); break;
    default: rows_for<4>(type, w, row_bytes, a, m0, n0, n1, y, ldy); break;
  }
}

}  // namespace lmk
