// Small device helpers shared by the CUDA kernels of rlhf-kernels.
//
// Torch-free: only the CUDA toolkit headers are used, so every kernel header can be compiled on its own.
//
// Contents
//   ex2_approx            2^x with the hardware MUFU.EX2 unit (no range reduction, deterministic).
//   exp_approx            e^x as ex2_approx(x * log2(e)).
//   ElemTraits<T>         float / __nv_bfloat16 / __half: raw bit type, elements per 16-byte vector, exact
//                         conversion to float and round-to-nearest conversion from float.
//   unpack16 / pack16     16-byte vector <-> VEC raw elements (little-endian lane order: element 0 first).
//   ld_stream16 / st_stream16 / ld_cached
//                         global loads and stores with cache hints.
//   load16<T, kAligned>   VEC elements at p as one 16-byte vector: a streaming load when p is 16-byte aligned,
//                         else VEC scalar loads (identical values either way).
//   neg_inf_f / inf_f / nan_f
//                         float constants from their bit patterns.
//   RowLaunch / pow2_row_launch / capped_grid
//                         the shared launch rule of row-wise kernels and grid sizing for grid-stride loops.
#ifndef RLHF_CUDA_COMMON_CUH_
#define RLHF_CUDA_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace rlhf_cuda {

inline constexpr float kLog2e = 1.4426950408889634f;  // log2(e)

// 2^x via ex2.approx.ftz.f32: relative error about 2^-22, results below 2^-126 flush to +0,
// 2^-inf = +0, 2^+inf = +inf, 2^NaN = NaN. It is a single hardware instruction, so the value of a given input
// never depends on the surrounding code (unlike library calls whose expansion the compiler may schedule or
// contract differently).
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// e^x = 2^(x * log2(e)) with one rounded product and one ex2.approx: relative error about 2^-22 + |x| 2^-23, so
// x should be a small difference (e.g. z - max z), never a large value to be offset after scaling. -inf -> +0,
// +inf -> +inf, NaN -> NaN.
__device__ __forceinline__ float exp_approx(float x) { return ex2_approx(__fmul_rn(x, kLog2e)); }

template <typename T>
struct ElemTraits;

template <>
struct ElemTraits<float> {
  using raw_t = uint32_t;
  static constexpr int kVec = 4;  // elements per 16-byte vector
  __device__ __forceinline__ static float to_float(raw_t r) { return __uint_as_float(r); }
  __device__ __forceinline__ static raw_t from_float(float f) { return __float_as_uint(f); }
};

template <>
struct ElemTraits<__nv_bfloat16> {
  using raw_t = uint16_t;
  static constexpr int kVec = 8;
  // bf16 is the upper half of an fp32: the conversion is an exact shift.
  __device__ __forceinline__ static float to_float(raw_t r) { return __uint_as_float(static_cast<uint32_t>(r) << 16); }
  __device__ __forceinline__ static raw_t from_float(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

template <>
struct ElemTraits<__half> {
  using raw_t = uint16_t;
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(raw_t r) { return __half2float(__ushort_as_half(r)); }
  __device__ __forceinline__ static raw_t from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

// Splits a 16-byte vector into its raw elements, element 0 being the lowest address.
template <typename Raw, int VEC>
__device__ __forceinline__ void unpack16(const uint4& v, Raw (&r)[VEC]) {
  static_assert(sizeof(Raw) * VEC == 16, "a vector is 16 bytes");
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  if constexpr (sizeof(Raw) == 4) {
#pragma unroll
    for (int k = 0; k < 4; ++k) r[k] = static_cast<Raw>(w[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      r[2 * k] = static_cast<Raw>(w[k] & 0xffffu);
      r[2 * k + 1] = static_cast<Raw>(w[k] >> 16);
    }
  }
}

// Inverse of unpack16.
template <typename Raw, int VEC>
__device__ __forceinline__ uint4 pack16(const Raw (&r)[VEC]) {
  static_assert(sizeof(Raw) * VEC == 16, "a vector is 16 bytes");
  uint32_t w[4];
  if constexpr (sizeof(Raw) == 4) {
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = static_cast<uint32_t>(r[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = static_cast<uint32_t>(r[2 * k]) | (static_cast<uint32_t>(r[2 * k + 1]) << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// 16-byte load of data read once (evict-first / streaming). p must be 16-byte aligned.
__device__ __forceinline__ uint4 ld_stream16(const void* p) { return __ldcs(reinterpret_cast<const uint4*>(p)); }

// 16-byte store of data not read again by this kernel (streaming). p must be 16-byte aligned.
__device__ __forceinline__ void st_stream16(void* p, const uint4& v) { __stcs(reinterpret_cast<uint4*>(p), v); }

// Scalar read-only load through the L1 / texture path (neighbouring scalar loads reuse the cached line).
__device__ __forceinline__ uint16_t ld_cached(const uint16_t* p) { return __ldg(reinterpret_cast<const unsigned short*>(p)); }
__device__ __forceinline__ uint32_t ld_cached(const uint32_t* p) { return __ldg(reinterpret_cast<const unsigned int*>(p)); }

// VEC = ElemTraits<T>::kVec consecutive elements starting at p, as one 16-byte vector in unpack16 order: one
// streaming load when kAligned (p must then be 16-byte aligned), else VEC scalar loads of the same elements.
template <typename T, bool kAligned>
__device__ __forceinline__ uint4 load16(const typename ElemTraits<T>::raw_t* p) {
  using raw_t = typename ElemTraits<T>::raw_t;
  constexpr int VEC = ElemTraits<T>::kVec;
  if constexpr (kAligned) {
    return ld_stream16(p);
  } else {
    raw_t raw[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) raw[i] = ld_cached(p + i);
    return pack16(raw);
  }
}

__device__ __forceinline__ bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

__device__ __forceinline__ float neg_inf_f() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float inf_f() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fffffff); }

// Launch settings of a row-wise kernel: rows are processed by groups of threads_per_row threads (a power of two,
// at least a warp), rows_per_block groups per block.
struct RowLaunch {
  int threads_per_row;
  int rows_per_block;
};

// The shared launch rule: threads_per_row = smallest power of two in [32, max_tpr] with
// threads_per_row * slots_per_thread >= n_slots; small rows are packed until a block has min_block threads.
inline RowLaunch pow2_row_launch(int64_t n_slots, int max_tpr, int slots_per_thread, int min_block) {
  int tpr = 32;
  while (tpr < max_tpr && int64_t(tpr) * slots_per_thread < n_slots) tpr *= 2;
  return {tpr, tpr >= min_block ? 1 : min_block / tpr};
}

// Grid size for n_blocks blocks of work, capped at the largest grid x dimension (a grid-stride loop covers the rest).
inline unsigned capped_grid(int64_t n_blocks) {
  return static_cast<unsigned>(n_blocks < 0x7fffffff ? n_blocks : 0x7fffffff);
}

}  // namespace rlhf_cuda

#endif  // RLHF_CUDA_COMMON_CUH_
