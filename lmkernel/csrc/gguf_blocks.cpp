// GGUF blocks: their layouts, dequantization (the reference; rows for embeddings and float tiles) and
// the quantization of activations that meet them (the dot products are in gguf_dot.cpp).
#include "gguf_blocks.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "simd.h"

namespace lmk {

BlockInfo block_info(int type, bool* known) {
  *known = true;
  switch (type) {
    case GGML_F32: return {1, 4, ACT_FLOAT};
    case GGML_F16: return {1, 2, ACT_FLOAT};
    case GGML_BF16: return {1, 2, ACT_FLOAT};
    case GGML_Q4_0: return {32, 18, ACT_Q8_32};
    case GGML_Q4_1: return {32, 20, ACT_Q8_32};
    case GGML_Q5_0: return {32, 22, ACT_Q8_32};
    case GGML_Q5_1: return {32, 24, ACT_Q8_32};
    case GGML_Q8_0: return {32, 34, ACT_Q8_32};
    case GGML_Q4_K: return {256, 144, ACT_Q8_256};
    case GGML_Q5_K: return {256, 176, ACT_Q8_256};
    case GGML_Q6_K: return {256, 210, ACT_Q8_256};
    default: *known = false; return {1, 1, ACT_FLOAT};
  }
}


// ---- dequantization: one block of each type into float32 ----------------------------------------
static void dequant_block(int type, const uint8_t* b, float* y) {
  switch (type) {
    case GGML_Q4_0: case GGML_Q4_1: {
      const float d = half(b), m = type == GGML_Q4_1 ? half(b + 2) : -8.f * d;
      const uint8_t* qs = b + (type == GGML_Q4_1 ? 4 : 2);
      for (int j = 0; j < 16; ++j) {
        y[j] = d * (qs[j] & 0xF) + m;
        y[j + 16] = d * (qs[j] >> 4) + m;
      }
      break;
    }
    case GGML_Q5_0: case GGML_Q5_1: {
      const bool one = type == GGML_Q5_1;
      const float d = half(b), m = one ? half(b + 2) : -16.f * d;
      uint32_t qh;
      std::memcpy(&qh, b + (one ? 4 : 2), 4);
      const uint8_t* qs = b + (one ? 8 : 6);
      for (int j = 0; j < 16; ++j) {
        y[j] = d * ((qs[j] & 0xF) | (((qh >> j) & 1) << 4)) + m;
        y[j + 16] = d * ((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) + m;
      }
      break;
    }
    case GGML_Q8_0: {
      const float d = half(b);
      const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
      for (int j = 0; j < 32; ++j) y[j] = d * qs[j];
      break;
    }
    case GGML_Q4_K: case GGML_Q5_K: {
      const bool five = type == GGML_Q5_K;
      const float d = half(b), dmin = half(b + 2);
      const uint8_t* scales = b + 4;
      const uint8_t* qh = b + 16;
      const uint8_t* qs = b + (five ? 48 : 16);
      uint8_t sc[8], mn[8];
      k4_scales(scales, sc, mn);
      for (int j = 0; j < 4; ++j) {
        const int sc0 = sc[2 * j], m0 = mn[2 * j], sc1 = sc[2 * j + 1], m1 = mn[2 * j + 1];
        for (int l = 0; l < 32; ++l) {
          const int lo = (qs[32 * j + l] & 0xF) + (five && (qh[l] >> (2 * j) & 1) ? 16 : 0);
          const int hi = (qs[32 * j + l] >> 4) + (five && (qh[l] >> (2 * j + 1) & 1) ? 16 : 0);
          y[64 * j + l] = d * sc0 * lo - dmin * m0;
          y[64 * j + 32 + l] = d * sc1 * hi - dmin * m1;
        }
      }
      break;
    }
    case GGML_Q6_K: {
      const float d = half(b + 208);
      for (int h = 0; h < 2; ++h) {
        const uint8_t* ql = b + 64 * h;
        const uint8_t* qh = b + 128 + 32 * h;
        const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192 + 8 * h);
        float* yh = y + 128 * h;
        for (int l = 0; l < 32; ++l) {
          const int is = l / 16;
          const int q1 = ((ql[l] & 0xF) | ((qh[l] >> 0 & 3) << 4)) - 32;
          const int q2 = ((ql[l + 32] & 0xF) | ((qh[l] >> 2 & 3) << 4)) - 32;
          const int q3 = ((ql[l] >> 4) | ((qh[l] >> 4 & 3) << 4)) - 32;
          const int q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6 & 3) << 4)) - 32;
          yh[l] = d * sc[is] * q1;
          yh[l + 32] = d * sc[is + 2] * q2;
          yh[l + 64] = d * sc[is + 4] * q3;
          yh[l + 96] = d * sc[is + 6] * q4;
        }
      }
      break;
    }
    default: break;
  }
}

void dequantize_rows(int type, const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t K, float* y) {
  bool known;
  const BlockInfo info = block_info(type, &known);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = w + r * row_bytes;
    float* yr = y + r * K;
    if (type == GGML_F32) {
      std::memcpy(yr, row, K * sizeof(float));
    } else if (type == GGML_F16 || type == GGML_BF16) {
      const uint16_t* h = reinterpret_cast<const uint16_t*>(row);
      for (int64_t k = 0; k < K; ++k) yr[k] = type == GGML_F16 ? fp16_to_f32(h[k]) : to_f32(h[k]);
    } else {
      for (int64_t b = 0; b < K / info.elements; ++b) dequant_block(type, row + b * info.bytes, yr + b * info.elements);
    }
  }
}

// ---- activations: 8 + 6 bits with a scale per block ---------------------------------------------
// The sums of group g (16 activations, the g-th of the whole matrix) as quantized: of q and r in steps of
// d, recorded per 16 (k-quants) and per 32 (every family; the odd group of a pair completes it).
static inline void record_sums(QuantizedActs& out, int64_t g, float d, int qsum, int rsum) {
  const float value = d / REST_STEPS * static_cast<float>(REST_STEPS * qsum + rsum);
  if (out.family == ACT_Q8_256) {
    out.sums16[g] = value;
    out.qsums16[g] = static_cast<int16_t>(qsum);
  }
  float& s32 = out.sums32[g / 2];
  s32 = g % 2 ? s32 + value : value;
}

void quantize_acts(const float* x, int64_t M, int64_t K, ActFamily family, QuantizedActs& out, bool rest) {
  out.family = family;
  out.M = M;
  out.K = K;
  out.x = x;
  out.rest = rest;
  if (family == ACT_FLOAT) return;
  const int64_t B = family == ACT_Q8_32 ? 32 : 256, nb = K / B;
  out.q.resize(M * K);
  out.r.resize(M * K);
  out.d.resize(M * nb);
  out.sums32.resize(M * K / 32);
  if (family == ACT_Q8_256) out.sums16.resize(M * K / 16), out.qsums16.resize(M * K / 16);
  if (family == ACT_Q8_32) out.lanes.resize(M * K / 4);
#pragma omp parallel if (M >= 8)
  {
    FlushDenormals flush;  // once a thread, for the whole loop
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t b = 0; b < nb; ++b) {
        const float* xb = x + m * K + b * B;
        int8_t* qb = out.q.data() + m * K + b * B;
        int8_t* rb = out.r.data() + m * K + b * B;
        float amax = 0.f;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        // The same arithmetic 16 at a time (prefill quantizes millions of activations a layer).
        __m512 vmax = _mm512_setzero_ps();
        for (int64_t i = 0; i < B; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xb + i)));
        amax = _mm512_reduce_max_ps(vmax);
#else
        for (int64_t i = 0; i < B; ++i) amax = std::max(amax, std::fabs(xb[i]));
#endif
        const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        out.d[m * nb + b] = d;
        if (family == ACT_Q8_32) std::fill_n(out.lanes.data() + (m * K + b * B) / 4, B / 4, d / REST_STEPS);
#if defined(__AVX512F__) && defined(__AVX512BW__)
        for (int64_t g = 0; g < B / 16; ++g) {
          constexpr int NEAREST = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
          const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(xb + 16 * g), _mm512_set1_ps(id));
          const __m512 q = _mm512_min_ps(_mm512_set1_ps(127.f), _mm512_max_ps(_mm512_set1_ps(-127.f), _mm512_roundscale_ps(v, NEAREST)));
          const __m512 r = !rest ? _mm512_setzero_ps() : _mm512_min_ps(_mm512_set1_ps(32.f), _mm512_max_ps(_mm512_set1_ps(-32.f),
              _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(v, q), _mm512_set1_ps(REST_STEPS)), NEAREST)));
          const __m512i qi = _mm512_cvtps_epi32(q), ri = _mm512_cvtps_epi32(r);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16 * g), _mm512_cvtepi32_epi8(qi));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(rb + 16 * g), _mm512_cvtepi32_epi8(ri));
          record_sums(out, (m * K + b * B) / 16 + g, d, _mm512_reduce_add_epi32(qi), _mm512_reduce_add_epi32(ri));
        }
        continue;
#endif
        for (int64_t i = 0; i < B; ++i) {
          const float v = xb[i] * id;  // in steps of d
          const float q = std::min(127.f, std::max(-127.f, std::nearbyint(v)));
          qb[i] = static_cast<int8_t>(q);
          rb[i] = !rest ? 0 : static_cast<int8_t>(std::min(32.f, std::max(-32.f, std::nearbyint((v - q) * REST_STEPS))));
        }
        for (int64_t g = 0; g < B / 16; ++g) {
          int qsum = 0, rsum = 0;
          for (int i = 0; i < 16; ++i) qsum += qb[16 * g + i], rsum += rb[16 * g + i];
          record_sums(out, (m * K + b * B) / 16 + g, d, qsum, rsum);
        }
      }
    }
  }
}

}  // namespace lmk
