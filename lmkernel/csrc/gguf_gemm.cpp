// Prefill on GGUF blocks: y = x W^T for many rows of x (AVX-512 with VNNI).
//
// The decode kernels unpack a block for every four rows of x; with hundreds of rows that unpacking is
// most of the work. Here each thread repacks a tile of weight rows once, then runs every row of x
// against the tile, two weight rows by four activation rows at a time, from cache. The activations
// come as 8 + 6 bits (x = d (q + r / 64), gguf_blocks.h):
//   k-quants (8-bit activations per 256): the codes times int8 activations, pairs summed (`maddubs`)
//     and scaled by their sub-block scale into int32 (`dpwssd`), one float scaling per super-block (d
//     of the weights, of the activations);
//   legacy types (8 + 6 bits per 32, x = d (q + r / 64)): unsigned codes times q and times r summed in
//     fours (`dpbusd`), combined as 64 q + r, scaled per block of 32 in float.
// Each weight's offset (minimums, -8 / -16 / -128 of symmetric types) meets the sum of the activations it
// multiplies in float; Q6_K's -32 is folded into its integer sums.
#include "gguf_gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "gguf_simd.h"

namespace lmk {

#if defined(LMK_K512) && defined(__AVX512VNNI__)

static constexpr int64_t TILE = 16;  // weight rows repacked at once by one thread
// The register block: 2 weight rows by C activation rows (legacy types hold q, r and lane scales a row).
static constexpr int R = 2;
template <int TYPE> static constexpr int C = TYPE == GGML_Q4_K || TYPE == GGML_Q5_K || TYPE == GGML_Q6_K ? 5 : 4;
static constexpr int64_t MAX_K_QUANT_K = 3072;

template <int TYPE> static constexpr bool is_legacy = TYPE != GGML_Q4_K && TYPE != GGML_Q5_K && TYPE != GGML_Q6_K;

bool gemm_supports(int type, int64_t K) {
  switch (type) {
    case GGML_Q4_0: case GGML_Q4_1: case GGML_Q5_0: case GGML_Q5_1: case GGML_Q8_0: return K % 64 == 0;
    // Past MAX_K_QUANT_K, two repacked weight rows and a block of activation rows no longer fit the L1
    // cache together, and the decode kernels (which read the blocks as stored) ran faster.
    case GGML_Q4_K: case GGML_Q5_K: case GGML_Q6_K: return K % 256 == 0 && K <= MAX_K_QUANT_K;
    default: return false;
  }
}

// One thread's repacked tile, 2 bytes a weight: spans of 64 unsigned codes, each followed by 64 bytes of
// scale lanes (k-quants: the 16-bit scale of each pair of weights; legacy types: the float scale of
// each 4-weight lane).
struct Tile {
  int64_t spans = 0, sbs = 0, groups = 0;
  std::vector<uint8_t> data;
  std::vector<float> d;         // k-quants: [row][super-block]
  std::vector<float> offsets;   // [row][32-weight group] (not Q6_K)
  std::vector<int16_t> sc16;    // Q6_K: [row][super-block][16], the scales

  explicit Tile(int64_t K) : spans(K / 64), sbs(K / 256), groups(K / 32) {
    data.resize(TILE * K * 2);
    d.resize(TILE * std::max<int64_t>(sbs, 1));
    offsets.resize(TILE * groups);
    sc16.resize(TILE * std::max<int64_t>(sbs, 1) * 16);
  }
  uint8_t* span(int64_t r, int64_t s) { return data.data() + (r * spans + s) * 128; }
};

template <int TYPE>
static void repack_legacy(const uint8_t* w, int64_t K, Tile& t, int64_t r) {
  constexpr int64_t BYTES = Legacy<TYPE>::bytes;
  for (int64_t s = 0; s < K / 64; ++s) {
    float d[2], off[2];
    for (int h = 0; h < 2; ++h) {
      __m256i codes = legacy_codes<TYPE>(w + (2 * s + h) * BYTES, d + h, off + h);
      if (TYPE == GGML_Q8_0) {  // signed values -> unsigned codes: q + 128, offset -128 d
        codes = _mm256_xor_si256(codes, _mm256_set1_epi8(static_cast<char>(0x80)));
        off[h] = -128.f * d[h];
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.span(r, s) + 32 * h), codes);
      t.offsets[r * t.groups + 2 * s + h] = off[h];
    }
    _mm512_storeu_ps(t.span(r, s) + 64, _mm512_insertf32x8(_mm512_set1_ps(d[0]), _mm256_set1_ps(d[1]), 1));
  }
}

template <int TYPE>
static void repack_k(const uint8_t* w, int64_t K, Tile& t, int64_t r, const __m512i* pick) {
  constexpr int64_t BYTES = KQuant<TYPE>::bytes;
  for (int64_t b = 0; b < K / 256; ++b) {
    KSpans s;
    unpack_k512<TYPE>(w + b * BYTES, pick, s);
    for (int j = 0; j < 4; ++j) {
      _mm512_storeu_si512(t.span(r, 4 * b + j), s.codes[j]);
      _mm512_storeu_si512(t.span(r, 4 * b + j) + 64, s.scales[j]);
    }
    t.d[r * t.sbs + b] = s.d;
    if (TYPE == GGML_Q6_K) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.sc16.data() + (r * t.sbs + b) * 16), s.sc16);
    } else {
      _mm256_storeu_ps(t.offsets.data() + r * t.groups + 8 * b, s.offsets);
    }
  }
}

// Rows r0.. of the tile against activation rows c0.., over weights [k0, k1) of each row; the result is
// added to y (zeroed first).
template <int TYPE, int RR, int CC>
static void micro(Tile& t, int64_t r0, const QuantizedActs& a, int64_t c0, int64_t k0, int64_t k1, float* y,
                  int64_t ldy, int64_t n0) {
  const int64_t K = a.K, spans = K / 64;
  __m512 facc[RR][CC];
  for (int r = 0; r < RR; ++r)
    for (int c = 0; c < CC; ++c) facc[r][c] = _mm512_setzero_ps();
  if constexpr (is_legacy<TYPE>) {
    const int8_t* xq[CC];
    const int8_t* xr[CC];
    for (int c = 0; c < CC; ++c) xq[c] = a.q.data() + (c0 + c) * K, xr[c] = a.r.data() + (c0 + c) * K;
    for (int64_t s = k0 / 64; s < k1 / 64; ++s) {
      __m512i q[CC], rest[CC];
      __m512 xl[CC];
      for (int c = 0; c < CC; ++c) {
        q[c] = _mm512_loadu_si512(xq[c] + 64 * s);
        rest[c] = _mm512_loadu_si512(xr[c] + 64 * s);
        xl[c] = _mm512_loadu_ps(a.lanes.data() + ((c0 + c) * spans + s) * 16);
      }
      for (int r = 0; r < RR; ++r) {
        const __m512i codes = _mm512_loadu_si512(t.span(r0 + r, s));
        const __m512 wl = _mm512_loadu_ps(t.span(r0 + r, s) + 64);
        for (int c = 0; c < CC; ++c) {
          const __m512i sums = _mm512_dpbusd_epi32(
              _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, q[c]), 6), codes, rest[c]);
          facc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(wl, xl[c]), facc[r][c]);
        }
      }
    }
  } else {
    // Integer sums of a super-block, then one float scaling each (d of the weights times d of the
    // activations): 2 x 5 of each accumulator, 5 activation vectors, a row's codes and scales.
    const int64_t nsb = K / 256;
    const int8_t* xq[CC];
    for (int c = 0; c < CC; ++c) xq[c] = a.q.data() + (c0 + c) * K;
    for (int64_t b = k0 / 256; b < k1 / 256; ++b) {
      __m512i iacc[RR][CC];
      for (int r = 0; r < RR; ++r)
        for (int c = 0; c < CC; ++c) iacc[r][c] = _mm512_setzero_si512();
      for (int j = 0; j < 4; ++j) {
        __m512i x[CC];
        for (int c = 0; c < CC; ++c) {
          x[c] = _mm512_loadu_si512(xq[c] + 256 * b + 64 * j);
          __asm__("" : "+v"(x[c]));  // keep it in a register for every weight row (one load, not RR)
        }
        for (int r = 0; r < RR; ++r) {
          const __m512i codes = _mm512_loadu_si512(t.span(r0 + r, 4 * b + j));
          const __m512i scale = _mm512_loadu_si512(t.span(r0 + r, 4 * b + j) + 64);
          for (int c = 0; c < CC; ++c)
            iacc[r][c] = _mm512_dpwssd_epi32(iacc[r][c], _mm512_maddubs_epi16(codes, x[c]), scale);
        }
      }
      __m512 dx[CC];
      for (int c = 0; c < CC; ++c) dx[c] = _mm512_set1_ps(a.d[(c0 + c) * nsb + b]);
      for (int r = 0; r < RR; ++r) {
        const __m512 dw = _mm512_set1_ps(t.d[(r0 + r) * t.sbs + b]);
        __m256i sc16 = _mm256_setzero_si256();
        if constexpr (TYPE == GGML_Q6_K)
          sc16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.sc16.data() + ((r0 + r) * t.sbs + b) * 16));
        for (int c = 0; c < CC; ++c) {
          if constexpr (TYPE == GGML_Q6_K) {
            const __m256i qs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qsums16.data() + ((c0 + c) * K + 256 * b) / 16));
            iacc[r][c] = _mm512_sub_epi32(iacc[r][c], _mm512_zextsi256_si512(_mm256_slli_epi32(_mm256_madd_epi16(sc16, qs), 5)));
          }
          facc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][c]), _mm512_mul_ps(dw, dx[c]), facc[r][c]);
        }
      }
    }
  }

  if constexpr (TYPE != GGML_Q6_K) {  // the offsets: per output, a dot product over the 32-weight groups
    const int64_t groups = K / 32, g1 = k1 / 32;
    for (int r = 0; r < RR; ++r) {
      const float* wo = t.offsets.data() + (r0 + r) * groups;
      for (int c = 0; c < CC; ++c) {
        const float* xs = a.sums32.data() + (c0 + c) * groups;
        __m512 acc = _mm512_setzero_ps();
        int64_t g = k0 / 32;
        for (; g + 16 <= g1; g += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(wo + g), _mm512_loadu_ps(xs + g), acc);
        if (g < g1) {
          const __mmask16 tail = static_cast<__mmask16>((1u << (g1 - g)) - 1);
          acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, wo + g), _mm512_maskz_loadu_ps(tail, xs + g), acc);
        }
        facc[r][c] = _mm512_add_ps(facc[r][c], acc);
      }
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int c = 0; c < CC; ++c) y[(c0 + c) * ldy + n0 + r] += _mm512_reduce_add_ps(facc[r][c]);
}

// One or two weight rows of the tile against every activation row, C at a time: the rows' repacked
// weights stay in the L1 cache while the activations pass them.
template <int TYPE, int RR>
static void micro_rows(Tile& t, int64_t r0, const QuantizedActs& a, float* y, int64_t ldy, int64_t n0) {
  const int64_t K = a.K;
  int64_t c0 = 0;
  for (; c0 + C<TYPE> <= a.M; c0 += C<TYPE>) micro<TYPE, RR, C<TYPE>>(t, r0, a, c0, 0, K, y, ldy, n0);
  for (; c0 < a.M; ++c0) micro<TYPE, RR, 1>(t, r0, a, c0, 0, K, y, ldy, n0);
}

template <int TYPE>
static void gemm_type(const uint8_t* w, int64_t row_bytes, int64_t N, const QuantizedActs& a, float* y) {
  const int64_t K = a.K, tiles = (N + TILE - 1) / TILE;
#pragma omp parallel
  {
    FlushDenormals flush;  // once a thread, for the whole region
    Tile t(K);
    __m512i pick[4];
    for (int j = 0; j < 4; ++j) pick[j] = span_scale_index<TYPE == GGML_Q6_K ? GGML_Q6_K : GGML_Q4_K>(j);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t n0 = tile * TILE, rows = std::min(TILE, N - n0);
      for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* wr = w + (n0 + r) * row_bytes;
        if constexpr (is_legacy<TYPE>) repack_legacy<TYPE>(wr, K, t, r);
        else repack_k<TYPE>(wr, K, t, r, pick);
      }
      for (int64_t m = 0; m < a.M; ++m) std::fill_n(y + m * N + n0, rows, 0.f);
      int64_t r = 0;
      for (; r + R <= rows; r += R) micro_rows<TYPE, R>(t, r, a, y, N, n0 + r);
      for (; r < rows; ++r) micro_rows<TYPE, 1>(t, r, a, y, N, n0 + r);
    }
  }
}

bool gguf_gemm(int type, const uint8_t* w, int64_t row_bytes, int64_t N, const QuantizedActs& a, float* y) {
  if (!gemm_supports(type, a.K)) return false;
  switch (type) {
    case GGML_Q4_0: gemm_type<GGML_Q4_0>(w, row_bytes, N, a, y); return true;
    case GGML_Q4_1: gemm_type<GGML_Q4_1>(w, row_bytes, N, a, y); return true;
    case GGML_Q5_0: gemm_type<GGML_Q5_0>(w, row_bytes, N, a, y); return true;
    case GGML_Q5_1: gemm_type<GGML_Q5_1>(w, row_bytes, N, a, y); return true;
    case GGML_Q8_0: gemm_type<GGML_Q8_0>(w, row_bytes, N, a, y); return true;
    case GGML_Q4_K: gemm_type<GGML_Q4_K>(w, row_bytes, N, a, y); return true;
    case GGML_Q5_K: gemm_type<GGML_Q5_K>(w, row_bytes, N, a, y); return true;
    case GGML_Q6_K: gemm_type<GGML_Q6_K>(w, row_bytes, N, a, y); return true;
    default: return false;
  }
}

#else

bool gemm_supports(int, int64_t) { return false; }
bool gguf_gemm(int, const uint8_t*, int64_t, int64_t, const QuantizedActs&, float*) { return false; }

#endif

}  // namespace lmk
