// Float vectors for this CPU: AVX-512 (16 lanes), AVX2 + FMA (8 lanes), or plain C++ (LMK_SIMD undefined).
// Every kernel is built with -march=native, so these choose the code path once per machine.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__SSE__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace lmk {

static inline float to_f32(float v) { return v; }
static inline float to_f32(int8_t v) { return static_cast<float>(v); }
static inline float to_f32(uint16_t b) {  // bfloat16 bits
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline float fp16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

// Within a kernel's loop body: denormal inputs read as zero and denormal results flush to zero, as
// -ffast-math programs run (a shared library does not get that mode). Activations hold denormals (SiLU
// of a very negative gate, for one), and every operation on one takes a slow microcode path: a
// prefill ran a quarter slower. The thread's mode is restored on leaving the scope.
struct FlushDenormals {
#if defined(__SSE__) || defined(__AVX2__) || defined(__AVX512F__)
  unsigned saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

#if defined(__AVX512F__)
#define LMK_SIMD 1
using vec = __m512;
constexpr int W = 16;
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vset(float a) { return _mm512_set1_ps(a); }
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vec vload(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline vec vload(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
static inline vec vload_fp16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline void vstore(float* p, vec a) { _mm512_storeu_ps(p, a); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
static inline void vload_u4(const uint8_t* p, vec& lo, vec& hi) {
  // 16 bytes: low nibbles -> lo, high nibbles -> hi
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define LMK_SIMD 1
using vec = __m256;
constexpr int W = 8;
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vset(float a) { return _mm256_set1_ps(a); }
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec vload(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline vec vload(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
static inline vec vload_fp16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline void vstore(float* p, vec a) { _mm256_storeu_ps(p, a); }
static inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline void vload_u4(const uint8_t* p, vec& lo, vec& hi) {
  // 8 bytes: low nibbles -> lo, high nibbles -> hi
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
}
#else
constexpr int W = 8;
#endif

#ifdef LMK_SIMD
constexpr bool SIMD_ON = true;
#else
constexpr bool SIMD_ON = false;
#endif

}  // namespace lmk
