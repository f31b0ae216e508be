// Rows of y = x W^T for a few rows of x (decode), W float32, bfloat16, int8 (per row or per group
// scales) or packed int4: each output row streams its weight row once for all rows of x.
#pragma once

#include <algorithm>

#include "simd.h"

namespace lmk {

template <int M, typename WT>
static inline void rows_kernel(const float* x, const WT* w, const float* scale, float* y, int64_t n0, int64_t n1, int64_t K,
                        int64_t N) {
  // y[m, n] = scale[n] * sum_k x[m, k] w[n, k] for n in [n0, n1) (no scale: 1), four weight rows side by side.
  int64_t n = n0;
#ifdef LMK_SIMD
  const int64_t KV = K - K % W;
  for (; n + 4 <= n1; n += 4) {
    vec acc[M][4];
    for (int m = 0; m < M; ++m) for (int j = 0; j < 4; ++j) acc[m][j] = vzero();
    const WT* wr[4] = {w + n * K, w + (n + 1) * K, w + (n + 2) * K, w + (n + 3) * K};
    // The next four rows are fetched into cache in step with these (they lie right after them): the
    // hardware prefetcher alone leaves the memory bus half idle on these short rows.
    const char* next = reinterpret_cast<const char*>(w + (n + 4) * K);
    for (int64_t k = 0; k < KV; k += W) {
      for (int64_t b = 0; b < 4 * W * int64_t(sizeof(WT)); b += 64) prefetch(next + 4 * k * sizeof(WT) + b);
      const vec w0 = vload(wr[0] + k), w1 = vload(wr[1] + k), w2 = vload(wr[2] + k), w3 = vload(wr[3] + k);
      for (int m = 0; m < M; ++m) {
        const vec xv = vload(x + m * K + k);
        acc[m][0] = vfma(xv, w0, acc[m][0]); acc[m][1] = vfma(xv, w1, acc[m][1]);
        acc[m][2] = vfma(xv, w2, acc[m][2]); acc[m][3] = vfma(xv, w3, acc[m][3]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < 4; ++j) {
        float s = vsum(acc[m][j]);
        for (int64_t k = KV; k < K; ++k) s += x[m * K + k] * to_f32(wr[j][k]);
        y[m * N + n + j] = scale ? s * scale[n + j] : s;
      }
  }
#endif
  for (; n < n1; ++n)
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * to_f32(w[n * K + k]);
      y[m * N + n] = scale ? s * scale[n] : s;
    }
}

template <typename WT>
static inline void run_rows(int64_t M, const float* x, const WT* w, const float* scale, float* y, int64_t n0, int64_t n1,
                     int64_t K, int64_t N) {
  switch (M) {
    case 1: rows_kernel<1>(x, w, scale, y, n0, n1, K, N); break;
    case 2: rows_kernel<2>(x, w, scale, y, n0, n1, K, N); break;
    case 3: rows_kernel<3>(x, w, scale, y, n0, n1, K, N); break;
    default: rows_kernel<4>(x, w, scale, y, n0, n1, K, N); break;
  }
}



template <int M>
static inline void int4_rows(const float* x, const uint8_t* w, const float* scales, const float* mins, float* y,
                      int64_t n0, int64_t n1, int64_t K, int64_t N, int64_t G) {
  // w [N, K/2] in the layout of pack_int4; scales and mins [N, K/G]; weight = code * scale + min.
  const int64_t groups = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * K / 2;
    for (int64_t b = 0; b < K / 2; b += 64) prefetch(wr + 4 * K / 2 + b);  // the row four ahead (see rows_kernel)
#ifdef LMK_SIMD
    vec acc[M];
    for (int m = 0; m < M; ++m) acc[m] = vzero();
    for (int64_t g = 0; g < groups; ++g) {
      const vec sc = vset(scales[n * groups + g]), mn = vset(mins[n * groups + g]);
      for (int64_t k = g * G; k < (g + 1) * G; k += 2 * W) {
        vec lo, hi;
        vload_u4(wr + k / 2, lo, hi);
        lo = vfma(lo, sc, mn);
        hi = vfma(hi, sc, mn);
        for (int m = 0; m < M; ++m) {
          acc[m] = vfma(vload(x + m * K + k), lo, acc[m]);
          acc[m] = vfma(vload(x + m * K + k + W), hi, acc[m]);
        }
      }
    }
    for (int m = 0; m < M; ++m) y[m * N + n] = vsum(acc[m]);
#else
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t base = k - k % (2 * W), j = k % (2 * W);
        const uint8_t byte = wr[base / 2 + j % W];
        const float code = j < W ? (byte & 15) : (byte >> 4);
        const int64_t g = k / G;
        s += x[m * K + k] * (code * scales[n * groups + g] + mins[n * groups + g]);
      }
      y[m * N + n] = s;
    }
#endif
  }
}

template <int M>
static inline void int8_group_rows(const float* x, const int8_t* w, const float* scales, float* y,
                            int64_t n0, int64_t n1, int64_t K, int64_t N, int64_t G) {
  // w int8 [N, K], scales [N, K/G]; weight = q * the scale of its group (GGUF Q8_0 with G = 32).
  const int64_t groups = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    for (int64_t b = 0; b < K; b += 64) prefetch(wr + 4 * K + b);  // the row four ahead (see rows_kernel)
#ifdef LMK_SIMD
    if (G % W == 0) {
      vec acc[M];
      for (int m = 0; m < M; ++m) acc[m] = vzero();
      for (int64_t g = 0; g < groups; ++g) {
        vec part[M];
        for (int m = 0; m < M; ++m) part[m] = vzero();
        for (int64_t k = g * G; k < (g + 1) * G; k += W) {
          const vec wv = vload(wr + k);
          for (int m = 0; m < M; ++m) part[m] = vfma(vload(x + m * K + k), wv, part[m]);
        }
        const vec sc = vset(scales[n * groups + g]);
        for (int m = 0; m < M; ++m) acc[m] = vfma(part[m], sc, acc[m]);
      }
      for (int m = 0; m < M; ++m) y[m * N + n] = vsum(acc[m]);
      continue;
    }
#endif
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        float part = 0.f;
        for (int64_t k = g * G; k < (g + 1) * G; ++k) part += x[m * K + k] * static_cast<float>(wr[k]);
        s += part * scales[n * groups + g];
      }
      y[m * N + n] = s;
    }
  }
}


}  // namespace lmk
