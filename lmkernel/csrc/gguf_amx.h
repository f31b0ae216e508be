// AMX tiles (Intel Sapphire Rapids and later) for many rows of x on GGUF blocks (gguf_amx.cpp).
#pragma once

#include <cstdint>
#include <string>

#include "gguf_blocks.h"

namespace lmk {

// From this many activation rows on, a product runs on the tiles (prefill and batched decode steps); on
// rows packed for decode (gguf_x16.h) from PACKED_AMX_ROWS on: below, the packed rows' own kernel, which
// reads the weights once a step from memory and from L2 for each further four rows, is faster than
// unpacking every weight into tiles (lmk bench decode-steps).
static constexpr int64_t AMX_ROWS = 8;
static constexpr int64_t PACKED_AMX_ROWS = 16;

// Whether this process may run tile instructions: the build has them, the CPU reports them, the
// kernel granted the tile data permission (asked once) and a probe product in a child process came
// out right. Decided on the first call; `amx_status` says why not.
bool amx_usable();
std::string amx_status();

// The caller's switch (on by default where usable): off runs the VNNI / AVX2 kernels instead.
void amx_enable(bool on);
bool amx_active();

// Whether the tiles run `type` with rows of K weights.
bool amx_supports(int type, int64_t K);

// y [M, N] (row stride N) = x W^T for the quantized rows `a` and the N weight rows `w`; false (nothing
// written) where the tiles are not active or do not run `type`.
bool amx_gemm(int type, const WeightRows& w, const QuantizedActs& a, float* y);

// The machine's int8 multiply-add rate (per second, all threads) measured by `reps` rounds of
// independent products that touch no memory: on tiles (tdpbusd; 0 where they are not usable) or on
// 512-bit vectors (vpdpbusd; 0 in a build without AVX-512 VNNI). The compute limit `lmk bench` prints.
double int8_peak(bool tiles, int64_t reps);

}  // namespace lmk
