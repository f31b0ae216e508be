// Prefill on GGUF blocks: y = x W^T for many rows of x (AVX-512 with VNNI).
//
// The decode kernels unpack a block for every four rows of x; with hundreds of rows that unpacking is
// most of the work. Here each thread repacks a tile of weight rows once into spans of 64 unsigned
// codes with their scale lanes, then runs every row of x against the tile, two weight rows by four
// activation rows at a time, from cache:
//   k-quants: the codes times int8 activations, pairs summed (`maddubs`) and scaled by their sub-block
//     scale into int32 (`dpwssd`), one float scaling per super-block (d of the weights, of the
//     activations);
//   legacy types: codes times activations summed in fours (`dpbusd`), scaled per block of 32 in float.
// The offset of each 32 weights (minimums, or -8 / -16 / -128 of symmetric types) meets the sum of
// the activations it multiplies in a short float dot product per output; Q6_K's -32 is folded into
// its integer sums.
#include "gguf_gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "gguf_simd.h"

namespace lmk {

#if defined(LMK_K512) && defined(__AVX512VNNI__) && !defined(LMK_NOGEMM)

static constexpr int64_t TILE = 16;  // weight rows repacked at once by one thread
static constexpr int R = 2, C = 6;   // the register block: weight rows x activation rows
static constexpr int64_t MAX_K_QUANT_K = 3072;

bool gemm_supports(int type, int64_t K) {
  switch (type) {
    case GGML_Q4_0: case GGML_Q4_1: case GGML_Q5_0: case GGML_Q5_1: case GGML_Q8_0: return K % 64 == 0;
    // Past MAX_K_QUANT_K, a register block's activation rows and repacked weight rows no longer fit
    // the L1 cache together, and the decode kernels (which read the blocks as stored) run faster.
    case GGML_Q4_K: case GGML_Q5_K: case GGML_Q6_K: return K % 256 == 0 && K <= MAX_K_QUANT_K;
    default: return false;
  }
}

// One thread's repacked tile: for each row, spans of 64 codes and 64 bytes of scale lanes (16-bit
// scales of weight pairs for k-quants, float scales of 4-weight lanes for legacy types).
struct Tile {
  int64_t spans = 0, sbs = 0, groups = 0;
  std::vector<uint8_t> codes, lanes;
  std::vector<float> d;        // k-quants: [row][super-block]
  std::vector<float> offsets;  // [row][32-weight group] (not Q6_K)
  std::vector<int16_t> sc16;   // Q6_K: [row][super-block][16]

  Tile(int64_t K) : spans(K / 64), sbs(K / 256), groups(K / 32) {
    codes.resize(TILE * K);
    lanes.resize(TILE * K);
    d.resize(TILE * std::max<int64_t>(sbs, 1));
    offsets.resize(TILE * groups);
    sc16.resize(TILE * std::max<int64_t>(sbs, 1) * 16);
  }
  uint8_t* code(int64_t r, int64_t span) { return codes.data() + (r * spans + span) * 64; }
  uint8_t* lane(int64_t r, int64_t span) { return lanes.data() + (r * spans + span) * 64; }
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
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.code(r, s) + 32 * h), codes);
      t.offsets[r * t.groups + 2 * s + h] = off[h];
    }
    _mm512_storeu_ps(t.lane(r, s), _mm512_insertf32x8(_mm512_set1_ps(d[0]), _mm256_set1_ps(d[1]), 1));
  }
}

template <int TYPE>
static void repack_k(const uint8_t* w, int64_t K, Tile& t, int64_t r, const __m512i* pick) {
  constexpr int64_t BYTES = KQuant<TYPE>::bytes;
  for (int64_t b = 0; b < K / 256; ++b) {
    KSpans s;
    unpack_k512<TYPE>(w + b * BYTES, pick, s);
    for (int j = 0; j < 4; ++j) {
      _mm512_storeu_si512(t.code(r, 4 * b + j), s.codes[j]);
      _mm512_storeu_si512(t.lane(r, 4 * b + j), s.scales[j]);
    }
    t.d[r * t.sbs + b] = s.d;
    if (TYPE == GGML_Q6_K) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.sc16.data() + (r * t.sbs + b) * 16), s.sc16);
    } else {
      alignas(16) int16_t mins[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(mins), s.mins);
      for (int j = 0; j < 8; ++j) t.offsets[r * t.groups + 8 * b + j] = -s.dmin * mins[j];
    }
  }
}

// Activation-side values the microkernels read besides the int8 rows.
struct ActExtras {
  std::vector<float> sums;   // [row][32-group]: scale times the sum of the group's int8 values
  std::vector<float> lanes;  // legacy: [row][span][16] the scale of each 4-value lane
};

static void act_extras(const QuantizedActs& a, bool legacy, ActExtras& e) {
  const int64_t M = a.M, K = a.K, groups = K / 32;
  e.sums.resize(M * groups);
  if (legacy) e.lanes.resize(M * K / 4);
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      if (legacy) {
        e.sums[m * groups + g] = a.s[m * groups + g];
        const float dx = a.d[m * groups + g];
        std::fill_n(e.lanes.data() + (m * groups + g) * 8, 8, dx);
      } else {
        e.sums[m * groups + g] = a.d[m * (K / 256) + g / 8] * static_cast<float>(a.bsums32[m * groups + g]);
      }
    }
  }
}

template <int TYPE, int RR, int CC>
static void micro(Tile& t, int64_t r0, const QuantizedActs& a, const ActExtras& e, int64_t c0, float* y, int64_t ldy,
                  int64_t n0) {
  constexpr bool LEGACY = TYPE != GGML_Q4_K && TYPE != GGML_Q5_K && TYPE != GGML_Q6_K;
  const int64_t K = a.K, spans = K / 64;
  const int8_t* xq[CC];
  for (int c = 0; c < CC; ++c) xq[c] = a.q.data() + (c0 + c) * K;
  __m512 facc[RR][CC];
  for (int r = 0; r < RR; ++r)
    for (int c = 0; c < CC; ++c) facc[r][c] = _mm512_setzero_ps();
  if (LEGACY) {
    for (int64_t s = 0; s < spans; ++s) {
      __m512i x[CC];
      __m512 xl[CC];
      for (int c = 0; c < CC; ++c) {
        x[c] = _mm512_loadu_si512(xq[c] + 64 * s);
        xl[c] = _mm512_loadu_ps(e.lanes.data() + ((c0 + c) * spans + s) * 16);
      }
      for (int r = 0; r < RR; ++r) {
        const __m512i codes = _mm512_loadu_si512(t.code(r0 + r, s));
        const __m512 wl = _mm512_loadu_ps(t.lane(r0 + r, s));
        for (int c = 0; c < CC; ++c) {
          const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, x[c]);
          facc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(wl, xl[c]), facc[r][c]);
        }
      }
    }
  } else {
    // Integer sums of a super-block in registers; the float accumulators, touched once a super-block,
    // stay in memory (registers go to the activation rows).
    const int64_t nsb = K / 256;
    alignas(64) float fmem[RR][CC][16] = {};
    for (int64_t b = 0; b < nsb; ++b) {
      __m512i iacc[RR][CC];
      for (int r = 0; r < RR; ++r)
        for (int c = 0; c < CC; ++c) iacc[r][c] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        __m512i x[CC];
        for (int c = 0; c < CC; ++c) {
          x[c] = _mm512_loadu_si512(xq[c] + 256 * b + 64 * j);
          __asm__("" : "+v"(x[c]));  // keep it in a register for every weight row (one load, not RR)
        }
        for (int r = 0; r < RR; ++r) {
          const __m512i codes = _mm512_loadu_si512(t.code(r0 + r, 4 * b + j));
          const __m512i scale = _mm512_loadu_si512(t.lane(r0 + r, 4 * b + j));
          for (int c = 0; c < CC; ++c)
            iacc[r][c] = _mm512_dpwssd_epi32(iacc[r][c], _mm512_maddubs_epi16(codes, x[c]), scale);
        }
      }
      for (int r = 0; r < RR; ++r) {
        const float dw = t.d[(r0 + r) * t.sbs + b];
        __m256i sc16 = _mm256_setzero_si256();
        if (TYPE == GGML_Q6_K)
          sc16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.sc16.data() + ((r0 + r) * t.sbs + b) * 16));
        for (int c = 0; c < CC; ++c) {
          if (TYPE == GGML_Q6_K) {
            const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.bsums.data() + ((c0 + c) * K + 256 * b) / 16));
            iacc[r][c] = _mm512_sub_epi32(iacc[r][c], _mm512_zextsi256_si512(_mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5)));
          }
          const float dx = a.d[(c0 + c) * nsb + b];
          _mm512_store_ps(fmem[r][c], _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][c]), _mm512_set1_ps(dw * dx),
                                                      _mm512_load_ps(fmem[r][c])));
        }
      }
    }
    for (int r = 0; r < RR; ++r)
      for (int c = 0; c < CC; ++c) facc[r][c] = _mm512_load_ps(fmem[r][c]);
  }
  if (TYPE != GGML_Q6_K) {  // the offsets: per output, a dot product over the 32-weight groups
    const int64_t groups = K / 32;
    for (int r = 0; r < RR; ++r) {
      const float* wo = t.offsets.data() + (r0 + r) * groups;
      for (int c = 0; c < CC; ++c) {
        const float* xs = e.sums.data() + (c0 + c) * groups;
        __m512 acc = _mm512_setzero_ps();
        int64_t g = 0;
        for (; g + 16 <= groups; g += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(wo + g), _mm512_loadu_ps(xs + g), acc);
        if (g < groups) {
          const __mmask16 tail = static_cast<__mmask16>((1u << (groups - g)) - 1);
          acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, wo + g), _mm512_maskz_loadu_ps(tail, xs + g), acc);
        }
        facc[r][c] = _mm512_add_ps(facc[r][c], acc);
      }
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int c = 0; c < CC; ++c) y[(c0 + c) * ldy + n0 + r] = _mm512_reduce_add_ps(facc[r][c]);
}

template <int TYPE, int RR>
static void micro_rows(Tile& t, int64_t r0, const QuantizedActs& a, const ActExtras& e, float* y, int64_t ldy, int64_t n0) {
  int64_t c0 = 0;
  for (; c0 + C <= a.M; c0 += C) micro<TYPE, RR, C>(t, r0, a, e, c0, y, ldy, n0);
  for (; c0 < a.M; ++c0) micro<TYPE, RR, 1>(t, r0, a, e, c0, y, ldy, n0);
}

template <int TYPE>
static void gemm_type(const uint8_t* w, int64_t row_bytes, int64_t N, const QuantizedActs& a, float* y) {
  constexpr bool LEGACY = TYPE != GGML_Q4_K && TYPE != GGML_Q5_K && TYPE != GGML_Q6_K;
  const int64_t K = a.K, tiles = (N + TILE - 1) / TILE;
  ActExtras e;
  act_extras(a, LEGACY, e);
#pragma omp parallel
  {
    Tile t(K);
    __m512i pick[4];
    for (int j = 0; j < 4; ++j) pick[j] = span_scale_index<TYPE == GGML_Q6_K ? GGML_Q6_K : GGML_Q4_K>(j);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t n0 = tile * TILE, rows = std::min(TILE, N - n0);
      for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* wr = w + (n0 + r) * row_bytes;
        if constexpr (LEGACY) repack_legacy<TYPE>(wr, K, t, r);
        else repack_k<TYPE>(wr, K, t, r, pick);
      }
      int64_t r = 0;
      for (; r + R <= rows; r += R) micro_rows<TYPE, R>(t, r, a, e, y, N, n0 + r);
      for (; r < rows; ++r) micro_rows<TYPE, 1>(t, r, a, e, y, N, n0 + r);
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
