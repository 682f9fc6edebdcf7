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
//   RowSource<kShift, kVecs>
//                         slots of a row read by aligned 16-byte loads whatever the row's alignment (slot layout
//                         and the safety argument in row_slots.h).
//   elem_f / max_words    element i of slot words as float; exact maximum of slot words (packed bf16x2 / f16x2
//                         maxima for 16-bit types).
//   with_shift / with_shift_host / uniform_row_shift
//                         compile-time dispatch over the row start's byte shift; the shift shared by all rows of a
//                         strided source (or -1), used by the launchers to pick a kernel with a single loop body.
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
#include <type_traits>

#include "row_slots.h"

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

// 16-byte load through the read-only path, cached in L1: the shifted slot reader reads each chunk twice (as the
// first chunk of one slot and the last of the previous one), the second time from L1. p must be 16-byte aligned.
// Inline assembly: when only some words of the chunk are used, the compiler narrows it to one load of the used
// half at most, where __ldg was split into one 4-byte load per used word.
__device__ __forceinline__ uint4 ld_nc16(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// Reads the slots (row_slots.h) of one row with aligned 16-byte loads only. A slot is kVecs 16-byte vectors; the
// row starts kShift bytes past a 16-byte boundary (0: aligned), or kShift = -1: the shift is read at run time.
// view() gives the slot's raw words and elem<T>(view, i) its element i exactly as in the row, whatever the shift:
// read in place from the chunk words for a compile-time shift (no data movement; an odd-element shift of a 16-bit
// row only joins the two end halves by one byte permute for the packed maximum, max_words_of), from the slot
// assembled by selects and funnel shifts for a run-time shift.
template <int kShift, int kVecs>
struct RowSource {
  static constexpr int kChunks = kVecs + (kShift != 0 ? 1 : 0);  // aligned chunks read per slot
  static constexpr int kWords = 4 * kVecs;                         // 32-bit words per slot
  const uint4* chunks;  // chunk 0: the aligned 16 bytes holding the row's first byte
  int shift;            // row start - chunks, in bytes

  __device__ __forceinline__ explicit RowSource(const void* row) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(row);
    shift = kShift >= 0 ? kShift : static_cast<int>(p & 15);
    chunks = reinterpret_cast<const uint4*>(p - static_cast<uintptr_t>(shift));
  }

  // First chunk of slot j.
  __device__ __forceinline__ const uint4* slot_ptr(int j) const { return chunks + j * kVecs; }

  // Full slot whose first chunk is p (all 16 kVecs bytes in the row): every chunk holds row bytes, except the
  // extra chunk of the run-time variant when the row happens to be aligned (not read then). load_main reads chunks
  // 0 .. kVecs - 1, load_extra the extra chunk of a shifted row (the first chunk of the next slot, which its owner
  // has just loaded: usually an L1 hit, so it is read late, when the slot is folded, and needs no register while
  // in flight).
  __device__ __forceinline__ void load_main(const uint4* p, uint4 (&c)[kChunks]) const {
#pragma unroll
    for (int k = 0; k < kVecs; ++k) c[k] = kShift == 0 ? ld_stream16(p + k) : ld_nc16(p + k);
  }
  __device__ __forceinline__ void load_extra(const uint4* p, uint4 (&c)[kChunks]) const {
    if constexpr (kShift > 0) c[kVecs] = ld_nc16(p + kVecs);
    if constexpr (kShift < 0) c[kVecs] = shift != 0 ? ld_nc16(p + kVecs) : make_uint4(0u, 0u, 0u, 0u);
  }
  __device__ __forceinline__ void load(const uint4* p, uint4 (&c)[kChunks]) const {
    load_main(p, c);
    load_extra(p, c);
  }

  // Slot j holding only n_bytes < 16 kVecs bytes of the row (the row's partial last slot): only the chunks that
  // hold row bytes are read, the others are zero (their bytes are never used).
  __device__ __forceinline__ void load_partial(const uint4* p, int n_bytes, uint4 (&c)[kChunks]) const {
#pragma unroll
    for (int k = 0; k < kChunks; ++k)
      c[k] = chunk_has_row_byte(k, shift, n_bytes) ? ld_nc16(p + k) : make_uint4(0u, 0u, 0u, 0u);
  }

  // The slot's raw words: the chunk words as loaded for a compile-time shift (elements are read in place), the
  // assembled slot (word m = bytes [4 m, 4 m + 4) of the slot) for a run-time shift.
  struct View {
    uint32_t w[kShift < 0 ? kWords : 4 * kChunks];
  };
  __device__ __forceinline__ View view(const uint4 (&c)[kChunks]) const {
    uint32_t cw[4 * kChunks];
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      cw[4 * k] = c[k].x;
      cw[4 * k + 1] = c[k].y;
      cw[4 * k + 2] = c[k].z;
      cw[4 * k + 3] = c[k].w;
    }
    View v;
    if constexpr (kShift < 0) {
      assemble_words_rt(cw, shift, v.w);
    } else {
#pragma unroll
      for (int m = 0; m < 4 * kChunks; ++m) v.w[m] = cw[m];
    }
    return v;
  }

  // Element i of the slot as float, exactly.
  template <typename T>
  __device__ __forceinline__ float elem(const View& v, int i) const {
    constexpr int E = sizeof(T);
    const int s = kShift < 0 ? 0 : kShift;  // the run-time view is assembled already
    const uint32_t word = v.w[elem_word(s, i, E)];
    if constexpr (E == 4) {
      return __uint_as_float(word);
    } else {
      const bool upper = elem_byte(s, i, E) == 2;
      if constexpr (std::is_same_v<T, __nv_bfloat16>)
        return __uint_as_float(upper ? (word & 0xffff0000u) : (word << 16));
      else
        return __half2float(__ushort_as_half(static_cast<unsigned short>(upper ? (word >> 16) : word)));
    }
  }

  // kWords words holding exactly the slot's elements (for the packed maximum).
  __device__ __forceinline__ void max_words_of(const View& v, uint32_t (&w)[kWords]) const {
    if constexpr (kShift < 0) {
#pragma unroll
      for (int m = 0; m < kWords; ++m) w[m] = v.w[m];
    } else {
      slot_max_words<kShift>(v.w, w);
    }
  }
};

// Element i of slot words w (16-bit types: low half first) as float, exactly.
template <typename T, int N>
__device__ __forceinline__ float elem_f(const uint32_t (&w)[N], int i) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(w[i]);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __uint_as_float((i & 1) ? (w[i >> 1] & 0xffff0000u) : (w[i >> 1] << 16));
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>((i & 1) ? (w[i >> 1] >> 16) : w[i >> 1])));
  }
}

// Elementwise maximum of two words: packed bf16x2 / f16x2 (one instruction for two elements) or fp32. Exact; a
// NaN operand yields the other one (both NaN: NaN), like fmaxf.
template <typename T>
__device__ __forceinline__ uint32_t max_word(uint32_t a, uint32_t b) {
  uint32_t r;
  if constexpr (sizeof(T) == 4) {
    r = __float_as_uint(fmaxf(__uint_as_float(a), __uint_as_float(b)));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("max.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  } else {
    asm("max.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  }
  return r;
}

// Exact maximum of the words a[0..N) by a fixed pairwise tree (a is overwritten).
template <typename T, int N>
__device__ __forceinline__ uint32_t max_tree(uint32_t* a) {
  if constexpr (N == 1) {
    return a[0];
  } else {
    constexpr int H = N / 2;
#pragma unroll
    for (int m = 0; m < H; ++m) a[m] = max_word<T>(a[m], a[N - H + m]);
    return max_tree<T, N - H>(a);
  }
}

// Maximum of all elements of the words w[0..N) as float. All-NaN input gives NaN.
template <typename T, int N>
__device__ __forceinline__ float max_words(const uint32_t (&w)[N]) {
  uint32_t a[N];
#pragma unroll
  for (int m = 0; m < N; ++m) a[m] = w[m];
  const uint32_t r[1] = {max_tree<T, N>(a)};
  if constexpr (sizeof(T) == 4) return __uint_as_float(r[0]);
  else return fmaxf(elem_f<T>(r, 0), elem_f<T>(r, 1));
}

// Calls f(std::integral_constant<int, s>) for the byte shift s = shift (a multiple of kStep in [0, 16)).
template <int kStep, int kS = 0, typename F>
__device__ __forceinline__ void with_shift(int shift, F&& f) {
  if constexpr (kS < 16) {
    if (shift == kS)
      f(std::integral_constant<int, kS>{});
    else
      with_shift<kStep, kS + kStep>(shift, f);
  }
}

// The same on the host (kernel selection in the launchers).
template <int kStep, int kS = 0, typename F>
inline void with_shift_host(int shift, F&& f) {
  if constexpr (kS < 16) {
    if (shift == kS)
      f(std::integral_constant<int, kS>{});
    else
      with_shift_host<kStep, kS + kStep>(shift, f);
  }
}

// Byte offset past a 16-byte boundary shared by the starts of all rows of a (n_b, n_t) source with element
// strides (stride_b, stride_t), or -1 when rows differ (then each row's shift is read in the kernel). A dimension
// of size 1 does not move the start. A function of the layout only; the kernels compute the same per-row result
// either way.
inline int uniform_row_shift(const void* data, int elem_bytes, int64_t n_b, int64_t n_t, int64_t stride_b,
                             int64_t stride_t) {
  const bool b_ok = n_b <= 1 || (stride_b * elem_bytes) % 16 == 0;
  const bool t_ok = n_t <= 1 || (stride_t * elem_bytes) % 16 == 0;
  return b_ok && t_ok ? static_cast<int>(reinterpret_cast<uintptr_t>(data) & 15) : -1;
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
