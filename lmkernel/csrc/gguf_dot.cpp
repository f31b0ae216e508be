// Dot products of GGUF blocks, as stored, with activations quantized to 8 bits (gguf_blocks.h).
//
// Each kernel takes one weight row and up to four activation rows, unpacks every block of the weight
// row once for all of them, and keeps the arithmetic in integers within a block: codes (unsigned)
// times int8 activations, summed in pairs (`maddubs`) and in fours (`madd` with ones, or with the
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
  const float* xd = a.d.data() + m0 * nb;
  const float* xs = a.s.data() + m0 * nb;
  for (int64_t b = 0; b < nb; ++b) {
    float d, offset;
    const __m256i codes = legacy_codes<TYPE>(w + b * BYTES, &d, &offset);
    for (int m = 0; m < M; ++m) {
      const __m256i x = load32(xq + m * K + b * 32);
      __m256i sums;
      if (TYPE == GGML_Q8_0) sums = dot_us8(_mm256_sign_epi8(codes, codes), _mm256_sign_epi8(x, codes));
      else sums = dot_us8(codes, x);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(d * xd[m * nb + b]), acc[m]);
      if (TYPE != GGML_Q8_0) offsets[m] += offset * xs[m * nb + b];
    }
  }
  for (int m = 0; m < M; ++m) y[m * ldy] = hsum8(acc[m]) + offsets[m];
}

#ifdef LMK_K512
// 64 weights a vector.
template <int TYPE, int M>
static void dot_k(const uint8_t* w, const QuantizedActs& a, int64_t m0, float* y, int64_t ldy) {
  constexpr int64_t BYTES = KQuant<TYPE>::bytes;
  const int64_t K = a.K, nb = K / 256;
  __m512 acc[M];
  __m128 offsets[M];
  for (int m = 0; m < M; ++m) { acc[m] = _mm512_setzero_ps(); offsets[m] = _mm_setzero_ps(); }
  __m512i pick[4];
  for (int j = 0; j < 4; ++j) pick[j] = span_scale_index<TYPE>(j);
  for (int64_t b = 0; b < nb; ++b) {
    KSpans s;
    unpack_k512<TYPE>(w + b * BYTES, pick, s);
    for (int m = 0; m < M; ++m) {
      const int8_t* xq = a.q.data() + (m0 + m) * K + b * 256;
      const float dx = a.d[(m0 + m) * nb + b];
      __m512i iacc = _mm512_setzero_si512();
      for (int j = 0; j < 4; ++j) iacc = dot_scaled512(iacc, s.codes[j], _mm512_loadu_si512(xq + 64 * j), s.scales[j]);
      if (TYPE == GGML_Q6_K) {
        // Each weight's -32, times its scale, meets the sums of 16 activations: the same factor d dx.
        const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.bsums.data() + ((m0 + m) * K + b * 256) / 16));
        iacc = _mm512_sub_epi32(iacc, _mm512_zextsi256_si512(_mm256_slli_epi32(_mm256_madd_epi16(s.sc16, bs), 5)));
      } else {
        const __m128i bs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.bsums32.data() + ((m0 + m) * K + b * 256) / 32));
        offsets[m] = _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_madd_epi16(s.mins, bs)), _mm_set1_ps(-s.dmin * dx), offsets[m]);
      }
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc), _mm512_set1_ps(s.d * dx), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) y[m * ldy] = _mm512_reduce_add_ps(acc[m]) + hsum4(offsets[m]);
}
#else
// 32 weights a vector.
template <int TYPE, int M>
static void dot_k(const uint8_t* w, const QuantizedActs& a, int64_t m0, float* y, int64_t ldy) {
  constexpr int64_t BYTES = KQuant<TYPE>::bytes;
  const int64_t K = a.K, nb = K / 256;
  const __m256i low4 = _mm256_set1_epi8(0x0F), low2 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
  __m256 acc[M];
  float offsets[M];
  for (int m = 0; m < M; ++m) { acc[m] = _mm256_setzero_ps(); offsets[m] = 0.f; }
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* xq[M];
    const int16_t* bs[M];
    float dx[M];
    for (int m = 0; m < M; ++m) {
      xq[m] = a.q.data() + (m0 + m) * K + b * 256;
      bs[m] = a.bsums.data() + ((m0 + m) * K + b * 256) / 16;
      dx[m] = a.d[(m0 + m) * nb + b];
    }
    {
      const uint8_t* blk = w + b * BYTES;
      __m256i iacc[M];
      for (int m = 0; m < M; ++m) iacc[m] = _mm256_setzero_si256();
      float d, offset_scale;
      int isum_off[M];
      if (TYPE == GGML_Q6_K) {
        d = half(blk + 208);
        offset_scale = -32.f * d;
        const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)));
        for (int m = 0; m < M; ++m) {
          const __m256i prod = _mm256_madd_epi16(sc16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bs[m])));
          const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(prod), _mm256_extracti128_si256(prod, 1));
          const __m128i s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
          isum_off[m] = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)));
        }
        for (int h = 0; h < 2; ++h) {
          const uint8_t* ql = blk + 64 * h;
          const int8_t* s8 = sc + 8 * h;
          const __m256i qa = load32(ql), qb = load32(ql + 32), q2 = load32(blk + 128 + 32 * h);
          const __m256i c[4] = {
              _mm256_or_si256(_mm256_and_si256(qa, low4), _mm256_slli_epi16(_mm256_and_si256(q2, low2), 4)),
              _mm256_or_si256(_mm256_and_si256(qb, low4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q2, 2), low2), 4)),
              _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qa, 4), low4),
                              _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q2, 4), low2), 4)),
              _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qb, 4), low4),
                              _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q2, 6), low2), 4)),
          };
          for (int g = 0; g < 4; ++g) {
            const __m256i scale = _mm256_set_m128i(_mm_set1_epi16(s8[2 * g + 1]), _mm_set1_epi16(s8[2 * g]));
            for (int m = 0; m < M; ++m) iacc[m] = dot_scaled(iacc[m], c[g], load32(xq[m] + 128 * h + 32 * g), scale);
          }
        }
      } else {
        d = half(blk);
        offset_scale = -half(blk + 2);
        alignas(8) uint8_t sc[8], mn[8];
        k4_scales(blk + 4, sc, mn);
        uint64_t mn64;
        std::memcpy(&mn64, mn, 8);
        const __m128i mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(static_cast<long long>(mn64)));
        for (int m = 0; m < M; ++m) {
          const __m128i prod = _mm_madd_epi16(mins, _mm_loadu_si128(reinterpret_cast<const __m128i*>(
                                                        a.bsums32.data() + ((m0 + m) * K + b * 256) / 32)));
          const __m128i s2 = _mm_add_epi32(prod, _mm_unpackhi_epi64(prod, prod));
          isum_off[m] = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)));
        }
        const uint8_t* qs = blk + (TYPE == GGML_Q5_K ? 48 : 16);
        const __m256i hbits = TYPE == GGML_Q5_K ? load32(blk + 16) : _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j) {
          const __m256i q = load32(qs + 32 * j);
          __m256i lo = _mm256_and_si256(q, low4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
          if (TYPE == GGML_Q5_K) {
            lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * j), one), 4));
            hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * j + 1), one), 4));
          }
          const __m256i s_lo = _mm256_set1_epi16(sc[2 * j]), s_hi = _mm256_set1_epi16(sc[2 * j + 1]);
          for (int m = 0; m < M; ++m) {
            iacc[m] = dot_scaled(iacc[m], lo, load32(xq[m] + 64 * j), s_lo);
            iacc[m] = dot_scaled(iacc[m], hi, load32(xq[m] + 64 * j + 32), s_hi);
          }
        }
      }
      for (int m = 0; m < M; ++m) {
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m]), _mm256_set1_ps(d * dx[m]), acc[m]);
        offsets[m] += offset_scale * dx[m] * static_cast<float>(isum_off[m]);
      }
    }
  }
  for (int m = 0; m < M; ++m) y[m * ldy] = hsum8(acc[m]) + offsets[m];
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
