// Tiles of G rows x G time steps in G-lane vectors, for CPU kernels that run one serial recursion per row and
// put G rows side by side in the lanes of a vector (gae.cpp): a tile is loaded row by row and transposed so that
// vector j holds step j of every row (lane i = row i); results are transposed back and stored row by row.
//
// Written with GCC / clang vector extensions and __builtin_shufflevector rather than intrinsics: the helpers are
// always-inline templates over G without a target attribute, so they compile inside the ISA wrappers of
// gae.cpp (G = 16 in the AVX-512 one: zmm registers; G = 8 in the AVX2 one: ymm), whose target picks the
// instructions (an intrinsic would have to be called from a function with the target attribute itself).
// x86 only (RLHF_LANE_TILES); the shuffle builtin needs GCC >= 12 or clang.
//
// Include after the floating-point pragmas of the including file (fp-contract off), like vec_math.h.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "vec_math.h"

#if RLHF_X86_MULTIVERSION && (defined(__clang__) || __GNUC__ >= 12)
#define RLHF_LANE_TILES 1
#else
#define RLHF_LANE_TILES 0
#endif

#if RLHF_LANE_TILES
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // see Lanes
#endif
namespace rlhf_cpu {

// G lanes of fp32 / int32 / uint32, and G / 2 lanes of fp64 / int64 (fp64 values of G rows take two vectors).
// Only used inside the ISA wrappers, where the width is native and everything is inlined: GCC's notes about
// the ABI of such vectors in functions for the generic target (-Wpsabi) do not apply.
template <int G>
struct Lanes {
  static_assert(G == 8 || G == 16, "G rows per group: 8 (AVX2) or 16 (AVX-512)");
  typedef float F __attribute__((vector_size(4 * G)));
  typedef int32_t I __attribute__((vector_size(4 * G)));
  typedef uint32_t U __attribute__((vector_size(4 * G)));
  typedef double D __attribute__((vector_size(4 * G)));
  typedef int64_t L __attribute__((vector_size(4 * G)));
  typedef uint64_t UL __attribute__((vector_size(4 * G)));
};

// x[0..3] -> within every 128-bit lane, the 4x4 block of the four vectors transposed: afterwards x[c] holds,
// in each 128-bit lane, element c of that lane of x[0], x[1], x[2], x[3]. Two rounds of interleaves that
// map to unpcklps / unpckhps and shufps (one instruction each, on every ISA).
template <typename V, int... E>
RLHF_INLINE void transpose4_in_lanes(V* x, std::integer_sequence<int, E...>) {
  constexpr int G = sizeof...(E);
  const V u0 = __builtin_shufflevector(x[0], x[1], ((E & 1) ? G : 0) + (E & ~3) + ((E & 2) >> 1)...);
  const V u1 = __builtin_shufflevector(x[0], x[1], ((E & 1) ? G : 0) + (E & ~3) + 2 + ((E & 2) >> 1)...);
  const V u2 = __builtin_shufflevector(x[2], x[3], ((E & 1) ? G : 0) + (E & ~3) + ((E & 2) >> 1)...);
  const V u3 = __builtin_shufflevector(x[2], x[3], ((E & 1) ? G : 0) + (E & ~3) + 2 + ((E & 2) >> 1)...);
  x[0] = __builtin_shufflevector(u0, u2, ((E & 2) ? G : 0) + (E & ~3) + (E & 1)...);
  x[1] = __builtin_shufflevector(u0, u2, ((E & 2) ? G : 0) + (E & ~3) + 2 + (E & 1)...);
  x[2] = __builtin_shufflevector(u1, u3, ((E & 2) ? G : 0) + (E & ~3) + (E & 1)...);
  x[3] = __builtin_shufflevector(u1, u3, ((E & 2) ? G : 0) + (E & ~3) + 2 + (E & 1)...);
}

// Swaps bit H of the vector index with bit H of the element index, H a multiple of 4 (whole 128-bit lanes:
// vshuff32x4 / vperm2f128).
template <int H, typename V, int... E>
RLHF_INLINE void swap_lane_bit(V* x, std::integer_sequence<int, E...>) {
  constexpr int G = sizeof...(E);
  for (int i = 0; i < G; ++i) {
    if (i & H) continue;
    const V a = x[i], b = x[i + H];
    x[i] = __builtin_shufflevector(a, b, ((E & H) ? E - H + G : E)...);
    x[i + H] = __builtin_shufflevector(a, b, ((E & H) ? E + G : E + H)...);
  }
}

// In-register transpose of G vectors of G lanes: x[i][j] -> x[j][i]. The in-lane rounds transpose the 4x4
// blocks, the lane swaps move the blocks (G log2 G shuffles in all).
template <int G, typename V>
RLHF_INLINE void transpose(V* x) {
  using Idx = std::make_integer_sequence<int, G>;
  for (int q = 0; q < G; q += 4) transpose4_in_lanes(x + q, Idx{});
  swap_lane_bit<4>(x, Idx{});
  if constexpr (G == 16) swap_lane_bit<8>(x, Idx{});
}

// G consecutive elements as fp32, converted exactly as to_float (vec_math.h) does: fp32 as they are, bf16
// shifted into the high half, fp16 by the same integer steps as to_float(c10::Half), on whole vectors.
template <int G, typename T>
RLHF_INLINE typename Lanes<G>::F load_lanes(const T* src) {
  using F = typename Lanes<G>::F;
  using U = typename Lanes<G>::U;
  F out;
  if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    typedef uint16_t H __attribute__((vector_size(2 * G)));
    H h16;
    std::memcpy(&h16, src, sizeof(h16));
    const U h = __builtin_convertvector(h16, U);
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      out = reinterpret_cast<F>(h << 16);
    } else {
      const U em = h & 0x7fffu;
      U o = (em << 13) + (112u << 23);
      o = em >= 0x7c00u ? o + (112u << 23) : o;
      const U sub = reinterpret_cast<U>(reinterpret_cast<F>(o + (1u << 23)) - bits_to_float(113u << 23));
      o = em < 0x0400u ? sub : o;
      out = reinterpret_cast<F>(o | ((h & 0x8000u) << 16));
    }
  } else if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&out, src, sizeof(out));
  } else {
    for (int l = 0; l < G; ++l) out[l] = to_float(src[l]);
  }
  return out;
}

template <int G>
RLHF_INLINE void store_lanes(float* dst, typename Lanes<G>::F x) {
  std::memcpy(dst, &x, sizeof(x));
}

// G rows (stride ld) of G elements from src, as G vectors x[j] = element j of every row (lane i = row i).
template <int G, typename T>
RLHF_INLINE void load_tile(const T* src, int64_t ld, typename Lanes<G>::F* x) {
  for (int i = 0; i < G; ++i) x[i] = load_lanes<G>(src + i * ld);
  transpose<G>(x);
}

// G rows (stride ld) of G bool bytes, as y[c] (c < G / 4; y has 4 entries) whose lane i holds bytes
// 4c .. 4c + 3 of row i: the flag of step j is then byte j % 4 of y[j / 4] (flag_lanes). y[b] is first made of
// 128-bit pieces, piece l holding the bytes of row 4l + b (G = 16: the 16 bytes; G = 8: 8 bytes and zeros), and
// one in-lane transpose finishes it: far cheaper than widening every flag to 32 bits and transposing that like
// the data. (The pieces are joined with shuffles rather than through a buffer in memory, whose wide reload
// after narrow stores would stall on store forwarding.)
template <int G>
RLHF_INLINE void load_flag_tile(const bool* src, int64_t ld, typename Lanes<G>::U* y) {
  typedef uint32_t P __attribute__((vector_size(16)));
  typedef uint32_t P2 __attribute__((vector_size(32)));
  P piece[G / 4];
  for (int b = 0; b < 4; ++b) {
    for (int l = 0; l < G / 4; ++l) {
      piece[l] = P{};
      std::memcpy(&piece[l], src + (4 * l + b) * ld, G);
    }
    if constexpr (G == 16) {
      const P2 lo = __builtin_shufflevector(piece[0], piece[1], 0, 1, 2, 3, 4, 5, 6, 7);
      const P2 hi = __builtin_shufflevector(piece[2], piece[3], 0, 1, 2, 3, 4, 5, 6, 7);
      y[b] = __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    } else {
      y[b] = __builtin_shufflevector(piece[0], piece[1], 0, 1, 2, 3, 4, 5, 6, 7);
    }
  }
  transpose4_in_lanes(y, std::make_integer_sequence<int, G>{});
}

// All-ones lanes where the flag of step j is set, zero elsewhere (flags are 0 / 1 bytes, as torch stores bools):
// the flag's bit shifted to the sign and spread by an arithmetic shift, two cheap instructions.
template <int G>
RLHF_INLINE typename Lanes<G>::I flag_lanes(const typename Lanes<G>::U* y, int j) {
  return reinterpret_cast<typename Lanes<G>::I>(y[j / 4] << (31 - 8 * (j % 4))) >> 31;
}

// x, as a value the optimiser cannot look into. The lane-by-lane loops below are meant to become one vector
// instruction each; without this GCC traces their lanes back through the transposes to the loads and gathers
// every lane with a scalar load instead (16 loads and inserts per vector). ("v": any vector register.)
template <typename V>
RLHF_INLINE V opaque(V x) {
  __asm__("" : "+v"(x));
  return x;
}

// madd (vec_math.h) lane by lane: one vector FMA where kFma.
template <int G, bool kFma>
RLHF_INLINE typename Lanes<G>::F lanes_madd(typename Lanes<G>::F a, typename Lanes<G>::F b, typename Lanes<G>::F c) {
  a = opaque(a), b = opaque(b), c = opaque(c);
  typename Lanes<G>::F out;
  for (int l = 0; l < G; ++l) out[l] = madd<kFma>(a[l], b[l], c[l]);
  return out;
}

// Lanes [kHalf G / 2, (kHalf + 1) G / 2) of x, widened to fp64. (Lane by lane, which the vectoriser turns
// into one conversion; GCC 12 splits __builtin_convertvector of the half into two narrower ones.)
template <int kHalf, int G>
RLHF_INLINE typename Lanes<G>::D widen_half(typename Lanes<G>::F x) {
  x = opaque(x);
  typename Lanes<G>::D out;
  for (int l = 0; l < G / 2; ++l) out[l] = static_cast<double>(x[l + kHalf * G / 2]);
  return out;
}

// flag_lanes for the lanes of half kHalf, as 64-bit lanes.
template <int kHalf, int G>
RLHF_INLINE typename Lanes<G>::L flag_half_lanes(const typename Lanes<G>::U* y, int j) {
  const typename Lanes<G>::U x = opaque(y[j / 4]);
  typename Lanes<G>::UL w;
  for (int l = 0; l < G / 2; ++l) w[l] = x[l + kHalf * G / 2];
  return reinterpret_cast<typename Lanes<G>::L>(w << (63 - 8 * (j % 4))) >> 63;
}

// k ? a : b lane by lane, for k all-ones or zero in each lane, as bit operations (no mask registers needed).
template <typename M, typename V>
RLHF_INLINE V select_lanes(M k, V a, V b) {
  return reinterpret_cast<V>((k & reinterpret_cast<M>(a)) | (~k & reinterpret_cast<M>(b)));
}

}  // namespace rlhf_cpu
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif
