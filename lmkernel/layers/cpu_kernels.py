"""The CPU kernels PyTorch lacks, compiled together on first use (about a minute, once).

- `paged_decode`: single-token attention that reads K/V through the block tables in one pass. PyTorch
  has no paged attention: the portable path gathers each context out of the cache and attention then
  reads it again. This kernel reads every key and value once, for all the query heads that share it
  (grouped-query attention), one OpenMP task per sequence.
- `small_linear`, `int8_linear`, `int8_group_linear`, `int4_linear`: y = x W^T for one to four rows,
  W in float32/bfloat16, int8 or packed int4. PyTorch's matrix-vector product streams weights on one
  core at about a third of the memory bandwidth; these split the output rows over every thread,
  stream the weight rows (float and per-row int8 four side by side) with AVX-512 or AVX2 and FMA
  (plain C++ elsewhere), and prefetch the rows that come next. Batch-1 decode is mostly these weight reads.
- `rms_norm`, `rotary`: a decode step's few rows in one call each, where PyTorch spends 25-45 us in
  four or five small operations.

Each process builds in a private directory and publishes the library with one atomic rename, so a
build killed half way never leaves a lock that later processes wait on.

When the compiler or ninja is missing, callers keep using the portable PyTorch paths.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#include <omp.h>

static inline float to_f32(float v) { return v; }
static inline float to_f32(int8_t v) { return static_cast<float>(v); }
static inline float to_f32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define LMK_SIMD 1
using vec = __m512;
constexpr int W = 16;
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vec vload(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline vec vload(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
static inline vec _lmk_vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec _lmk_vset(float a) { return _mm512_set1_ps(a); }
static inline void _lmk_vstore(float* p, vec a) { _mm512_storeu_ps(p, a); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LMK_SIMD 1
using vec = __m256;
constexpr int W = 8;
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec vload(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline vec vload(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec _lmk_vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec _lmk_vset(float a) { return _mm256_set1_ps(a); }
static inline void _lmk_vstore(float* p, vec a) { _mm256_storeu_ps(p, a); }
static inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#ifdef LMK_SIMD
constexpr bool LMK_SIMD_ON = true;
#else
constexpr bool LMK_SIMD_ON = false;
constexpr int W = 8;
#endif

static inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

template <int M, typename WT>
static void rows_kernel(const float* x, const WT* w, const float* scale, float* y, int64_t n0, int64_t n1, int64_t K,
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
static void run_rows(int64_t M, const float* x, const WT* w, const float* scale, float* y, int64_t n0, int64_t n1,
                     int64_t K, int64_t N) {
  switch (M) {
    case 1: rows_kernel<1>(x, w, scale, y, n0, n1, K, N); break;
    case 2: rows_kernel<2>(x, w, scale, y, n0, n1, K, N); break;
    case 3: rows_kernel<3>(x, w, scale, y, n0, n1, K, N); break;
    default: rows_kernel<4>(x, w, scale, y, n0, n1, K, N); break;
  }
}

torch::Tensor small_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  // x [M, K] with M <= 4, w [N, K] float32 or bfloat16 -> [M, N] in x's dtype, accumulated in float32.
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto xf = x.to(torch::kFloat32).contiguous();
  auto yf = torch::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* yp = yf.data_ptr<float>();
  const bool is_bf16 = w.scalar_type() == torch::kBFloat16;
  const void* wp = w.data_ptr();
  const int64_t chunk = 64, nchunks = (N + chunk - 1) / chunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
    if (is_bf16) run_rows(M, xp, static_cast<const uint16_t*>(wp), nullptr, yp, n0, n1, K, N);
    else run_rows(M, xp, static_cast<const float*>(wp), nullptr, yp, n0, n1, K, N);
  }
  if (bias.has_value()) yf.add_(bias->to(torch::kFloat32));
  return yf.to(x.scalar_type());
}

static inline float dot(const float* a, const float* b, int64_t D, bool simd) {
  float s = 0.f;
#ifdef LMK_SIMD
  if (simd) {
    vec a0 = vzero(), a1 = vzero();
    int64_t d = 0;
    for (; d + 2 * W <= D; d += 2 * W) {
      a0 = vfma(vload(a + d), vload(b + d), a0);
      a1 = vfma(vload(a + d + W), vload(b + d + W), a1);
    }
    for (; d < D; d += W) a0 = vfma(vload(a + d), vload(b + d), a0);
    return vsum(_lmk_vadd(a0, a1));
  }
#endif
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

static inline void axpy(float a, const float* x, float* y, int64_t D, bool simd) {
#ifdef LMK_SIMD
  if (simd) {
    const vec av = _lmk_vset(a);
    for (int64_t d = 0; d < D; d += W) _lmk_vstore(y + d, vfma(av, vload(x + d), vload(y + d)));
    return;
  }
#endif
  for (int64_t d = 0; d < D; ++d) y[d] += a * x[d];
}

static void attend_span(const float* qb, const float* kp, const float* vp, const int64_t* table, int64_t j_begin,
                        int64_t j_end, int64_t block_size, int64_t Hkv, int64_t G, int64_t D, int64_t hkv, float sc,
                        float* o, float* mx, float* sum) {
  // The G query heads that share KV head hkv, over cached tokens [j_begin, j_end) of one sequence: each
  // key and value row of that head is read once for all G. Leaves, per head, the running maximum score,
  // the sum of exp(score - maximum) and the value rows weighted by those terms (not yet divided), so
  // that spans of one sequence can be merged (flash-decoding).
  const int64_t n = j_end - j_begin;
  const bool simd = LMK_SIMD_ON && D % W == 0;
  const float* q0 = qb + hkv * G * D;
  std::vector<float> scores(G * std::max<int64_t>(n, 1));
  // Cached token j sits in row slot(j) = table[j / block_size] * block_size + j % block_size, taken a block at a time.
  for (int64_t j = j_begin; j < j_end;) {
    const int64_t blk = j / block_size, end = std::min(j_end, (blk + 1) * block_size);
    const int64_t shift = (table[blk] - blk) * block_size;  // token j of this block is cache row j + shift
    for (; j < end; ++j) {
      const float* kh = kp + ((j + shift) * Hkv + hkv) * D;
      for (int64_t g = 0; g < G; ++g) scores[g * n + j - j_begin] = dot(q0 + g * D, kh, D, simd) * sc;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sh = scores.data() + g * n;
    float m = -INFINITY, total = 0.f;
    for (int64_t j = 0; j < n; ++j) m = sh[j] > m ? sh[j] : m;
    for (int64_t j = 0; j < n; ++j) { sh[j] = std::exp(sh[j] - m); total += sh[j]; }
    mx[g] = m;
    sum[g] = total;
  }
  for (int64_t i = 0; i < G * D; ++i) o[i] = 0.f;
  for (int64_t j = j_begin; j < j_end;) {
    const int64_t blk = j / block_size, end = std::min(j_end, (blk + 1) * block_size);
    const int64_t shift = (table[blk] - blk) * block_size;
    for (; j < end; ++j) {
      const float* vh = vp + ((j + shift) * Hkv + hkv) * D;
      for (int64_t g = 0; g < G; ++g) axpy(scores[g * n + j - j_begin], vh, o + g * D, D, simd);
    }
  }
}

static void attend_all(const float* qp, const float* kp, const float* vp, const int64_t* tp, const int64_t* lp,
                       int64_t B, int64_t nb, int64_t block_size, int64_t Hq, int64_t Hkv, int64_t D, float sc,
                       float* op) {
  // One task per (sequence, KV head, span of the context). With fewer (sequence, KV head) pairs than
  // twice the threads (batch-1 decode), each context is cut into spans so that every thread has work
  // while each cached row is still read once; the spans' partial results are then merged.
  const int64_t G = Hq / Hkv, pairs = B * Hkv, threads = omp_get_max_threads();
  const int64_t spans = pairs >= 2 * threads ? 1 : (2 * threads + pairs - 1) / pairs;
  std::vector<float> part_o(pairs * spans * G * D), part_m(pairs * spans * G), part_l(pairs * spans * G);
#pragma omp parallel for schedule(dynamic)
  for (int64_t t = 0; t < pairs * spans; ++t) {
    const int64_t b = t / (Hkv * spans), hkv = t / spans % Hkv, c = t % spans, L = lp[b];
    attend_span(qp + b * Hq * D, kp, vp, tp + b * nb, c * L / spans, (c + 1) * L / spans, block_size, Hkv, G, D, hkv,
                sc, part_o.data() + t * G * D, part_m.data() + t * G, part_l.data() + t * G);
  }
  for (int64_t pr = 0; pr < pairs; ++pr) {
    const int64_t b = pr / Hkv, hkv = pr % Hkv;
    for (int64_t g = 0; g < G; ++g) {
      float m = -INFINITY, total = 0.f;
      for (int64_t c = 0; c < spans; ++c) m = std::max(m, part_m[(pr * spans + c) * G + g]);
      float* out = op + b * Hq * D + (hkv * G + g) * D;
      for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
      for (int64_t c = 0; c < spans; ++c) {
        const int64_t at = (pr * spans + c) * G + g;
        if (part_l[at] == 0.f) continue;  // an empty span
        const float w = std::exp(part_m[at] - m);
        total += w * part_l[at];
        for (int64_t d = 0; d < D; ++d) out[d] += w * part_o[at * D + d];
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < D; ++d) out[d] *= inv;
    }
  }
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor tables, torch::Tensor lens, int64_t block_size, double scale) {
  // q [B, Hq, D]; caches [slots, Hkv, D]; tables [B, max_blocks] (int64); lens [B] (int64)
  auto out = torch::empty_like(q);
  attend_all(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), tables.data_ptr<int64_t>(),
             lens.data_ptr<int64_t>(), q.size(0), tables.size(1), block_size, q.size(1), k_cache.size(1), q.size(2),
             static_cast<float>(scale), out.data_ptr<float>());
  return out;
}

// ---- weight-only int8 and int4, one to four rows ------------------------------------------------
#if defined(__AVX512F__)
static inline void vload_u4(const uint8_t* p, vec& lo, vec& hi) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}
static inline vec vset(float a) { return _mm512_set1_ps(a); }
#elif defined(LMK_SIMD)
static inline void vload_u4(const uint8_t* p, vec& lo, vec& hi) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
}
static inline vec vset(float a) { return _mm256_set1_ps(a); }
#endif

int64_t int4_chunk() { return 2 * W; }  // codes per chunk of the kernel's nibble layout

torch::Tensor pack_int4(torch::Tensor codes) {
  // codes [N, K] (values 0..15, K a multiple of 2W) -> [N, K/2] bytes; in each chunk of 2W codes,
  // byte j holds code j in its low nibble and code j + W in its high nibble.
  auto c = codes.to(torch::kUInt8).contiguous();
  const int64_t N = c.size(0), K = c.size(1);
  auto out = torch::empty({N, K / 2}, c.options());
  const uint8_t* cp = c.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k0 = 0; k0 < K; k0 += 2 * W)
      for (int64_t j = 0; j < W; ++j)
        op[n * K / 2 + k0 / 2 + j] = cp[n * K + k0 + j] | (cp[n * K + k0 + W + j] << 4);
  return out;
}

template <int M>
static void int4_rows(const float* x, const uint8_t* w, const float* scales, const float* mins, float* y,
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
static void int8_group_rows(const float* x, const int8_t* w, const float* scales, float* y,
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

torch::Tensor int8_group_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scales) {
  // x [M, K] (M <= 4), w int8 [N, K], scales [N, K/G] -> [M, N] float32.
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / scales.size(1);
  auto xf = x.to(torch::kFloat32).contiguous();
  auto sf = scales.to(torch::kFloat32).contiguous();
  auto y = torch::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>(); const float* sp = sf.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>(); float* yp = y.data_ptr<float>();
  const int64_t chunk = 32, nchunks = (N + chunk - 1) / chunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
    switch (M) {
      case 1: int8_group_rows<1>(xp, wp, sp, yp, n0, n1, K, N, G); break;
      case 2: int8_group_rows<2>(xp, wp, sp, yp, n0, n1, K, N, G); break;
      case 3: int8_group_rows<3>(xp, wp, sp, yp, n0, n1, K, N, G); break;
      default: int8_group_rows<4>(xp, wp, sp, yp, n0, n1, K, N, G); break;
    }
  }
  return y;
}

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  // x [M, K] (M <= 4), w int8 [N, K], scale [N] -> [M, N] float32.
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto xf = x.to(torch::kFloat32).contiguous();
  auto sf = scale.to(torch::kFloat32).contiguous();
  auto y = torch::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>(); const float* sp = sf.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>(); float* yp = y.data_ptr<float>();
  const int64_t chunk = 64, nchunks = (N + chunk - 1) / chunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
    run_rows(M, xp, wp, sp, yp, n0, n1, K, N);
  }
  return y;
}

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor mins, int64_t G) {
  // x [M, K] (M <= 4, K a multiple of G), w [N, K/2] from pack_int4, scales/mins [N, K/G] -> [M, N] float32.
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto xf = x.to(torch::kFloat32).contiguous();
  auto sf = scales.to(torch::kFloat32).contiguous();
  auto mf = mins.to(torch::kFloat32).contiguous();
  auto y = torch::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>(); const float* sp = sf.data_ptr<float>(); const float* mp = mf.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>(); float* yp = y.data_ptr<float>();
  const int64_t chunk = 32, nchunks = (N + chunk - 1) / chunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
    switch (M) {
      case 1: int4_rows<1>(xp, wp, sp, mp, yp, n0, n1, K, N, G); break;
      case 2: int4_rows<2>(xp, wp, sp, mp, yp, n0, n1, K, N, G); break;
      case 3: int4_rows<3>(xp, wp, sp, mp, yp, n0, n1, K, N, G); break;
      default: int4_rows<4>(xp, wp, sp, mp, yp, n0, n1, K, N, G); break;
    }
  }
  return y;
}

// ---- decode-sized elementwise steps: one call where PyTorch makes five ---------------------------
static void rms_rows(const float* xp, const float* wp, float* yp, int64_t N, int64_t D, float eps) {
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = xp + n * D; float* yr = yp + n * D;
    float ss = 0.f;
    for (int64_t d = 0; d < D; ++d) ss += xr[d] * xr[d];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t d = 0; d < D; ++d) yr[d] = xr[d] * inv * wp[d];
  }
}

static void rotate_rows(const float* xp, const float* cp, const float* sp, float* yp, int64_t N, int64_t H, int64_t D) {
  // x [N, H, D], cos/sin [N, D]; y may be x itself.
  const int64_t half = D / 2;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h) {
      const float* xr = xp + (n * H + h) * D; float* yr = yp + (n * H + h) * D;
      const float* c = cp + n * D; const float* sn = sp + n * D;
      for (int64_t d = 0; d < half; ++d) {
        const float x1 = xr[d], x2 = xr[d + half];
        yr[d] = x1 * c[d] - x2 * sn[d];
        yr[d + half] = x2 * c[d + half] + x1 * sn[d + half];
      }
    }
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  // x [N, D] float32 contiguous, w [D] float32 -> x / rms(x) * w, row by row.
  auto y = torch::empty_like(x);
  rms_rows(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), x.size(0), x.size(1), static_cast<float>(eps));
  return y;
}

torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  // x [N, H, D] float32 contiguous, cos/sin [N, D] float32 -> x rotated (halves: x1 cos - x2 sin, x2 cos + x1 sin).
  auto y = torch::empty_like(x);
  rotate_rows(x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), y.data_ptr<float>(), x.size(0),
              x.size(1), x.size(2));
  return y;
}

// ---- a whole Llama decoder for a decode step of one to four sequences, in one call ---------------
enum WeightKind { FLOAT32 = 0, INT8_ROW = 1, INT8_GROUP = 2, INT4 = 3 };

struct Projection {
  // y [M, N] = x W^T (+ bias); W float32, int8 with per-row or per-group scales, or int4 in the layout
  // of pack_int4 (scales and mins per group, input padded with zeros to Kw = a multiple of the group).
  int kind; const void* w; const float* scale; const float* mins; int64_t Kw, G; const float* bias; float* y; int64_t N;
};

static Projection projection(const torch::Tensor& w, const torch::Tensor& scale, const torch::Tensor& mins,
                             const torch::Tensor& bias, float* y) {
  Projection p{FLOAT32, w.data_ptr(), nullptr, nullptr, w.size(1), 0, bias.defined() && bias.numel() ? bias.data_ptr<float>() : nullptr,
               y, w.size(0)};
  if (w.scalar_type() == torch::kChar) {
    p.scale = scale.data_ptr<float>();
    p.kind = scale.dim() == 1 ? INT8_ROW : INT8_GROUP;
    p.G = scale.dim() == 1 ? 0 : p.Kw / scale.size(1);
  } else if (w.scalar_type() == torch::kByte) {
    p.kind = INT4; p.Kw = 2 * w.size(1); p.G = p.Kw / scale.size(1);
    p.scale = scale.data_ptr<float>(); p.mins = mins.data_ptr<float>();
  }
  return p;
}

template <int M>
static void project_rows(const Projection& p, const float* x, int64_t n0, int64_t n1) {
  switch (p.kind) {
    case FLOAT32: rows_kernel<M>(x, static_cast<const float*>(p.w), nullptr, p.y, n0, n1, p.Kw, p.N); break;
    case INT8_ROW: rows_kernel<M>(x, static_cast<const int8_t*>(p.w), p.scale, p.y, n0, n1, p.Kw, p.N); break;
    case INT8_GROUP: int8_group_rows<M>(x, static_cast<const int8_t*>(p.w), p.scale, p.y, n0, n1, p.Kw, p.N, p.G); break;
    default: int4_rows<M>(x, static_cast<const uint8_t*>(p.w), p.scale, p.mins, p.y, n0, n1, p.Kw, p.N, p.G); break;
  }
}

static void project(int64_t M, const float* x, int64_t K, const Projection* ps, int count) {
  // y_p = x W_p^T (+ b_p) for projections that read the same input, their output rows in one parallel loop.
  // Small chunks so that each thread's contiguous share is even to within a few rows.
  const int64_t chunk = 16;
  int64_t first[5] = {0, 0, 0, 0, 0};
  const float* xs[4];
  std::vector<float> padded[4];
  for (int p = 0; p < count; ++p) {
    first[p + 1] = first[p] + (ps[p].N + chunk - 1) / chunk;
    xs[p] = x;
    if (ps[p].Kw != K) {  // int4 with the input padded to whole groups
      padded[p].assign(M * ps[p].Kw, 0.f);
      for (int64_t m = 0; m < M; ++m) std::memcpy(padded[p].data() + m * ps[p].Kw, x + m * K, K * sizeof(float));
      xs[p] = padded[p].data();
    }
  }
  const int64_t total = first[count];
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < total; ++c) {
    int p = 0;
    while (c >= first[p + 1]) ++p;
    const Projection& pr = ps[p];
    const int64_t n0 = (c - first[p]) * chunk, n1 = std::min(pr.N, n0 + chunk);
    switch (M) {
      case 1: project_rows<1>(pr, xs[p], n0, n1); break;
      case 2: project_rows<2>(pr, xs[p], n0, n1); break;
      case 3: project_rows<3>(pr, xs[p], n0, n1); break;
      default: project_rows<4>(pr, xs[p], n0, n1); break;
    }
    if (pr.bias)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) pr.y[m * pr.N + n] += pr.bias[n];
  }
}

torch::Tensor llama_decode(torch::Tensor h, std::vector<torch::Tensor> weights, std::vector<torch::Tensor> k_caches,
                           std::vector<torch::Tensor> v_caches, torch::Tensor cos, torch::Tensor sin,
                           torch::Tensor slots, torch::Tensor tables, torch::Tensor lens, int64_t block_size,
                           int64_t num_heads, int64_t num_kv_heads, double eps, double scale) {
  // h [B <= 4, hidden] float32: the step's embedded tokens, one per sequence -> hidden states after the
  // last layer (before the final norm). weights: per layer, in order, the input and post-attention
  // norms, then (weight, scale, mins) for each of q, k, v, o, gate, up, down (see `projection`; an
  // empty tensor where a kind has none), then the q, k, v biases (empty: none). Every layer writes its
  // new K/V at `slots` and attends through the block tables, as `paged_decode`.
  const int64_t B = h.size(0), Dm = h.size(1), D = cos.size(1), Hq = num_heads, Hkv = num_kv_heads;
  const int64_t I = weights[14].size(0), layers = static_cast<int64_t>(k_caches.size());
  auto out = h.to(torch::kFloat32).clone().contiguous();
  auto buf = torch::empty({B * (Dm + (Hq + 2 * Hkv) * D + Hq * D + 2 * I)}, out.options());
  float* hp = out.data_ptr<float>();
  float* xn = buf.data_ptr<float>();
  float* q = xn + B * Dm;
  float* k = q + B * Hq * D;
  float* v = k + B * Hkv * D;
  float* att = v + B * Hkv * D;
  float* gate = att + B * Hq * D;
  float* up = gate + B * I;
  const float* cp = cos.data_ptr<float>(); const float* sp = sin.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const float e = static_cast<float>(eps), sc = static_cast<float>(scale);
  const torch::Tensor none;
  for (int64_t l = 0; l < layers; ++l) {
    const torch::Tensor* w = weights.data() + l * 26;
    const torch::Tensor* lin = w + 2;  // (weight, scale, mins) x 7
    const torch::Tensor* bias = w + 23;
    auto proj = [&](int i, const torch::Tensor& b, float* y) { return projection(lin[3 * i], lin[3 * i + 1], lin[3 * i + 2], b, y); };
    rms_rows(hp, w[0].data_ptr<float>(), xn, B, Dm, e);
    const Projection qkv[3] = {proj(0, bias[0], q), proj(1, bias[1], k), proj(2, bias[2], v)};
    project(B, xn, Dm, qkv, 3);
    rotate_rows(q, cp, sp, q, B, Hq, D);
    rotate_rows(k, cp, sp, k, B, Hkv, D);
    float* kc = k_caches[l].data_ptr<float>();
    float* vc = v_caches[l].data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(kc + slot[b] * Hkv * D, k + b * Hkv * D, Hkv * D * sizeof(float));
      std::memcpy(vc + slot[b] * Hkv * D, v + b * Hkv * D, Hkv * D * sizeof(float));
    }
    attend_all(q, kc, vc, tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), B, tables.size(1), block_size, Hq, Hkv,
               D, sc, att);
    const Projection o[1] = {proj(3, none, xn)};
    project(B, att, Hq * D, o, 1);
    for (int64_t i = 0; i < B * Dm; ++i) hp[i] += xn[i];
    rms_rows(hp, w[1].data_ptr<float>(), xn, B, Dm, e);
    const Projection gu[2] = {proj(4, none, gate), proj(5, none, up)};
    project(B, xn, Dm, gu, 2);
    for (int64_t i = 0; i < B * I; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    const Projection down[1] = {proj(6, none, xn)};
    project(B, gate, I, down, 1);
    for (int64_t i = 0; i < B * Dm; ++i) hp[i] += xn[i];
  }
  return out;
}
"""


def _cpu_flags() -> str:
    """The CPU's feature flags: `-march=native` code built on one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


_FUNCTIONS = ["paged_decode", "small_linear", "int4_chunk", "pack_int4", "int8_linear", "int8_group_linear",
              "int4_linear", "rms_norm", "rotary", "llama_decode"]
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]


def _module_name() -> str:
    """The library's name: a hash of everything that makes one build differ from another."""
    key = "\n".join([_SOURCE, _cpu_flags(), torch.__version__, sys.version, " ".join(_FUNCTIONS + _CFLAGS)])
    return f"lmkernel_cpu_{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def _import(name: str, path: Path) -> object:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(name: str, root: Path) -> object:
    """Build in a directory of this process's own, then publish the library with one atomic rename.

    torch's own cache shares one build directory guarded by a lock file; a build killed half way leaves
    that file behind and every later process waits on it forever. Here a killed build leaves only a
    private directory, and a finished library is either published whole or not at all.
    """
    from torch.utils.cpp_extension import load_inline

    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{name}.build.", dir=root) as build_dir:
        module = load_inline(name=name, cpp_sources=_SOURCE, functions=_FUNCTIONS, extra_cflags=_CFLAGS,
                             extra_ldflags=["-fopenmp"], build_directory=build_dir, verbose=False)
        built = Path(build_dir) / f"{name}.so"
        staged = root / f".{name}.{os.getpid()}.so"
        shutil.copyfile(built, staged)
        os.replace(staged, root / f"{name}.so")
    return module


def _build_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / "lmkernel"


@lru_cache(maxsize=1)
def _kernel() -> object | None:
    try:
        name, root = _module_name(), _build_root()
        library = root / f"{name}.so"
        return _import(name, library) if library.exists() else _compile(name, root)
    except Exception as exc:  # no compiler, no ninja: the portable paths still work
        log.warning("CPU kernels unavailable, using the portable PyTorch paths: %s", exc)
        return None


def build() -> bool:
    """Compile the kernels now (an engine does this at start, so no request waits for the compiler)."""
    return _kernel() is not None


def paged_decode_available(q: torch.Tensor) -> bool:
    """Whether the paged decode kernel can serve this query (float32 on CPU) and has been built."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and _kernel() is not None


def paged_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
    block_size: int, scale: float,
) -> torch.Tensor:
    """Attention of one query per sequence over its whole cached context: q [B, Hq, D] -> [B, Hq, D]."""
    return _kernel().paged_decode(q.contiguous(), k_cache, v_cache, tables, lens, block_size, scale)


SMALL_LINEAR_MAX_ROWS = 4


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x [M, K] @ weight[N, K]^T (+ bias) with the streaming kernel, or None where PyTorch does as well.

    Measured in `lmk bench latency`: float32 weights gain at 1 to 4 rows; bfloat16 weights only from
    2 rows (PyTorch's bfloat16 matrix-vector product is already as fast at one row).
    """
    rows = x.shape[0]
    if (
        x.device.type != "cpu"
        or x.dim() != 2
        or rows > SMALL_LINEAR_MAX_ROWS
        or weight.dtype != x.dtype
        or not (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and rows >= 2))
        or not weight.is_contiguous()
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return None
    kernel = _kernel()
    return None if kernel is None else kernel.small_linear(x, weight, bias)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """x [M <= 4, K] times an int8 weight [N, K] with per-row scales [N], or per-group scales
    [N, K/G] -> float32 [M, N]; None without the kernels."""
    kernel = _kernel() if x.device.type == "cpu" and x.shape[0] <= SMALL_LINEAR_MAX_ROWS else None
    if kernel is None:
        return None
    return kernel.int8_linear(x, weight, scale) if scale.dim() == 1 else kernel.int8_group_linear(x, weight, scale)


def int4_chunk() -> int | None:
    """How many codes one chunk of the int4 kernel's nibble layout holds (None without the kernels)."""
    kernel = _kernel()
    return None if kernel is None else kernel.int4_chunk()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] -> the int4 kernel's layout [N, K/2]."""
    return _kernel().pack_int4(codes)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int) -> torch.Tensor:
    """x [M <= 4, K] times a `pack_int4` weight -> float32 [M, N]."""
    return _kernel().int4_linear(x, packed, scales, mins, group)


SMALL_ROWS = 16  # up to this many rows (a decode step) the fused elementwise kernels beat PyTorch's ops


def _small_float_rows(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] <= SMALL_ROWS and x.is_contiguous()
            and not (torch.is_grad_enabled() and x.requires_grad))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMS norm of the rows of x [N, D] (a decode step's few rows) in one call; None where PyTorch's runs."""
    if x.dim() != 2 or not _small_float_rows(x) or weight.dtype != torch.float32 or (torch.is_grad_enabled() and weight.requires_grad):
        return None
    kernel = _kernel()
    return None if kernel is None else kernel.rms_norm(x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """Rotary embedding of x [N, heads, D] by cos/sin [N, D] in one call; None where PyTorch's ops run."""
    if x.dim() != 3 or not _small_float_rows(x) or cos.dtype != torch.float32 or not (cos.is_contiguous() and sin.is_contiguous()):
        return None
    kernel = _kernel()
    return None if kernel is None else kernel.rotary(x, cos, sin)


def llama_decode_available() -> bool:
    """Whether the whole-decoder kernel has been built (CPU)."""
    return _kernel() is not None


def llama_decode(
    h: torch.Tensor, weights: list[torch.Tensor], k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
    cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
    block_size: int, num_heads: int, num_kv_heads: int, eps: float, scale: float,
) -> torch.Tensor:
    """Every Llama decoder layer for one new token of each of B <= 4 sequences, in one call.

    weights: twelve per layer (input norm, q, k, v, o, post-attention norm, gate, up, down, and the
    q/k/v biases, an empty tensor where there is none), float32 and contiguous. New K/V go to `slots`;
    attention reads each sequence's context through `tables` and `lens` as `paged_decode` does.
    """
    return _kernel().llama_decode(h, weights, k_caches, v_caches, cos.contiguous(), sin.contiguous(), slots, tables,
                                  lens, block_size, num_heads, num_kv_heads, eps, scale)
