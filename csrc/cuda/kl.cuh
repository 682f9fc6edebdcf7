// Exact per-token KL divergence between the softmax distributions of two logit rows (forward) and its gradient
// with respect to the policy logits (backward).
//
// Torch-free: raw pointers, sizes and strides in, cudaError_t out. The binding is csrc/cuda/kl.cu; this header
// holds the shared pieces, the forward kernel and its launcher, kl_bwd.cuh the backward.
//
// Layout: two row sources of N rows each with V elements, element stride 1 along V: logits (B, T, V) of element
// type TL and ref_logits (B2, T2, V) of type TR, B * T == B2 * T2 == N, each with its own (T, stride_b, stride_t):
// row r of a source starts at data + (r / T) * stride_b + (r % T) * stride_t (64-bit offsets). mask: null or N
// bytes, 0 = row masked out (never read; all its outputs 0, its gradient row 0). Per-row fp32 outputs (N,)
// contiguous; the gradient is a contiguous (N, V) array of type TL.
//
// Forward, per row, all in fp32: z_v = x_v * inv_t, w_v = y_v * inv_t (one rounded product each); the weighting
// distribution a and the other one b are (a, b) = (z, w) for reverse = KL(p || q), (w, z) for KL(q || p). With
// m_a = max a, s_a = sum e^(a_v - m_a), m_b, s_b likewise and t = sum e^(a_v - m_a) ((a_v - m_a) - (b_v - m_b)):
//   kl = max(0, t / s_a + (log s_b - log s_a)) (NaN kept), row statistics (m, log s) of z and of w.
// Everything is gathered in ONE pass with online maxima: when (m_a, m_b) grow to (m_a', m_b'), da = m_a - m_a',
// db = m_b - m_b': s_a <- e^da s_a, s_b <- e^db s_b, t <- e^da (t + (da - db) s_a). The empty state (m = -inf,
// s = t = 0) is never rescaled, so no 0 * inf appears for finite rows. The roles are fixed by the launcher: the
// kernel always computes KL(a || b) of its (first, second) source, and the launcher passes (logits, ref) or
// (ref, logits) with the output pointers mapped back to (policy, ref) order. Both operands go through identical
// arithmetic, so identical rows give m_a == m_b, s_a == s_b, every difference 0, hence kl == 0 exactly.
// Non-finite rule: every scaled value is tested (!(|z| < inf), which also catches NaN and inf logits and products
// that overflow); a row with any such element in either source gets kl = NaN (its statistics are unspecified).
//
// Backward, per element of an unmasked row (stats and kl from the forward, g = grad_kl[r]):
//   lp = (z - row_max) - log_norm, lq = (w - ref_row_max) - ref_log_norm, p = e^lp,
//   reverse: g_z = (g p) ((lp - lq) - kl);  else: g_z = g (p - e^lq);  grad = g_z * inv_t in type TL.
//
// Work split (the launch rule, a function of V only; see kl_row_launch): the row is cut into slots of kKlSlot = 8
// consecutive elements, slot j covering [8 j, min(8 j + 8, V)), i.e. one 16-byte vector of a 16-bit source or two
// of an fp32 one. threads_per_row (tpr) = smallest power of two in [32, 512] with tpr * 8 >= ceil(V / 8);
// rows_per_block = max(1, 128 / tpr). Forward: 1-D grid over row groups (grid-stride), each thread with U slots
// of both sources in flight (kKlUnroll). Backward: grid x = chunk of tpr * U * kKlBwdBatches slots of the row,
// y = row group (grid-stride); its slots are counted from the first 16-byte aligned element of the gradient row,
// and chunk 0 also writes the scalar head (the elements before it) and tail (after the last full slot).
//
// Batch invariance of the forward: slot j belongs to thread j % tpr of the row's group, which folds its slots in
// increasing j, one slot at a time, with the same arithmetic whether a source's slot came from 16-byte loads (that
// source's row start is 16-byte aligned) or from scalar loads (any other alignment); the alignment is decided per
// source and per row. The 32 lanes of a warp are merged by a fixed shuffle tree, then the tpr / 32 warps of the row
// by a second fixed tree. All arithmetic uses explicitly rounded intrinsics and ex2.approx (exp_approx), so a
// row's outputs are bitwise functions of its two rows, V, the two dtypes, inv_t and reverse only: not of B / T
// splits, strides, alignment, neighbouring rows or the grid. The backward is elementwise.
#ifndef RLHF_CUDA_KL_CUH_
#define RLHF_CUDA_KL_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace rlhf_cuda {

inline constexpr int kKlSlot = 8;                 // elements per slot, for every dtype pair
inline constexpr int kKlMaxThreadsPerRow = 512;   // also the largest block
inline constexpr int kKlMinBlock = 128;           // small rows are packed until a block has this many threads
inline constexpr int kKlSlotsPerThread = 8;       // tpr grows until each thread has at most this many slots
// 16-byte loads issued per thread before any arithmetic (64 bytes; 1024 threads per SM then request 64 KiB).
// 8 would need ~120 registers for two 16-bit sources (the scaled values of every slot in flight are live).
inline constexpr int kKlLoadsInFlight = 4;
inline constexpr int kKlMinBlocksPerSm = 2;       // caps registers at 64: two 512-thread blocks per SM
inline constexpr int kKlBwdBatches = 4;           // backward: batches of U slots per thread and chunk
inline constexpr int64_t kKlMaxVocab = int64_t(1) << 30;  // in-row indices are int32

// 16-byte vectors per slot of a source of type T (2 for fp32, 1 for 16-bit types).
template <typename T>
inline constexpr int kKlVecsPerSlot = kKlSlot / ElemTraits<T>::kVec;

// Slots per thread in flight (U): as many as fit in kKlLoadsInFlight 16-byte loads of the two sources, at least
// one (2 for two 16-bit sources, 1 otherwise). U only groups loads: it never changes the order of the arithmetic.
template <typename TA, typename TB>
inline constexpr int kKlUnroll =
    kKlLoadsInFlight / (kKlVecsPerSlot<TA> + kKlVecsPerSlot<TB>) > 0
        ? kKlLoadsInFlight / (kKlVecsPerSlot<TA> + kKlVecsPerSlot<TB>)
        : 1;

// The launch rule. Depends on V only (the slot width is the same for every dtype pair), which fixes the forward
// reduction order per V.
inline RowLaunch kl_row_launch(int64_t n_v) {
  return pow2_row_launch((n_v + kKlSlot - 1) / kKlSlot, kKlMaxThreadsPerRow, kKlSlotsPerThread, kKlMinBlock);
}

// One row source: rows of V elements of type T, row r at data + (r / n_t) * stride_b + (r % n_t) * stride_t.
template <typename T>
struct KlInput {
  const T* data;
  int64_t n_t;       // size of the second dimension of this source's (B, T) split; > 0
  int64_t stride_b;  // element strides of the two leading dimensions
  int64_t stride_t;
};

template <typename T>
__device__ __forceinline__ const typename ElemTraits<T>::raw_t* kl_row_ptr(const KlInput<T>& in, int64_t r) {
  const int64_t b = r / in.n_t;
  return reinterpret_cast<const typename ElemTraits<T>::raw_t*>(in.data) + b * in.stride_b +
         (r - b * in.n_t) * in.stride_t;
}

// Loads full slot j of row x as kKlVecsPerSlot<T> vectors: 16-byte streaming loads when kAligned (the row start
// is 16-byte aligned, hence so is every full slot), else scalar loads of the same elements.
template <typename T, bool kAligned>
__device__ __forceinline__ void kl_load_slot(const typename ElemTraits<T>::raw_t* x, int j,
                                             uint4 (&v)[kKlVecsPerSlot<T>]) {
#pragma unroll
  for (int k = 0; k < kKlVecsPerSlot<T>; ++k) v[k] = load16<T, kAligned>(x + j * kKlSlot + k * ElemTraits<T>::kVec);
}

// z[i] = float(element i of the slot) * inv_t.
template <typename T>
__device__ __forceinline__ void kl_slot_scaled(const uint4 (&v)[kKlVecsPerSlot<T>], float inv_t,
                                               float (&z)[kKlSlot]) {
  using Tr = ElemTraits<T>;
  constexpr int VEC = Tr::kVec;
#pragma unroll
  for (int k = 0; k < kKlVecsPerSlot<T>; ++k) {
    typename Tr::raw_t raw[VEC];
    unpack16(v[k], raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) z[k * VEC + i] = __fmul_rn(Tr::to_float(raw[i]), inv_t);
  }
}

// The partial last slot (n < kKlSlot elements at x) by scalar loads, on every path; z[i] = 0 for i >= n.
template <typename T>
__device__ __forceinline__ void kl_tail_scaled(const typename ElemTraits<T>::raw_t* x, int n, float inv_t,
                                               float (&z)[kKlSlot]) {
#pragma unroll
  for (int i = 0; i < kKlSlot; ++i) z[i] = i < n ? __fmul_rn(ElemTraits<T>::to_float(ld_cached(x + i)), inv_t) : 0.f;
}

// ---------------------------------------------------------------------------------------------------------------
// Online state of one (part of a) row: maxima m_a, m_b, sums s_a = sum e^(a - m_a), s_b = sum e^(b - m_b),
// t = sum e^(a - m_a) ((a - m_a) - (b - m_b)), and bad != 0 once a non-finite scaled value was seen.
// Empty state: m = -inf, s = t = 0, bad = 0. A state that has seen a finite element has s_a >= 1 (its maximum
// contributes e^0 = 1, and a rescale is always followed by the slot holding the new maximum), so for finite rows
// s_a == 0 identifies the empty state. In rows with a non-finite value the statistics are unspecified anyway;
// only bad matters there, and it is OR-ed in every merge, empty operand or not.
// ---------------------------------------------------------------------------------------------------------------
struct KlState {
  float m_a, s_a, m_b, s_b, t;
  unsigned bad;
};

__device__ __forceinline__ KlState kl_state_empty() { return {neg_inf_f(), 0.f, neg_inf_f(), 0.f, 0.f, 0u}; }
__device__ __forceinline__ bool kl_state_is_empty(const KlState& st) { return st.s_a == 0.f; }

// Folds one slot (n <= kKlSlot valid pairs a[0..n), b[0..n)) into st: slot maxima, at most one rescale, then
// one exp_approx per value, elements in increasing order.
__device__ __forceinline__ void kl_add_slot(KlState& st, const float (&a)[kKlSlot], const float (&b)[kKlSlot],
                                            int n) {
  float ca = neg_inf_f(), cb = neg_inf_f();
  bool finite = true;
#pragma unroll
  for (int i = 0; i < kKlSlot; ++i) {
    if (i < n) {
      ca = fmaxf(ca, a[i]);
      cb = fmaxf(cb, b[i]);
      finite = finite & (fabsf(a[i]) < inf_f()) & (fabsf(b[i]) < inf_f());  // false for NaN and +-inf
    }
  }
  st.bad |= finite ? 0u : 1u;
  if (ca > st.m_a || cb > st.m_b) {
    const float na = fmaxf(st.m_a, ca), nb = fmaxf(st.m_b, cb);
    if (!kl_state_is_empty(st)) {  // the empty state has nothing to rescale (and m = -inf would give NaN)
      const float da = __fsub_rn(st.m_a, na), db = __fsub_rn(st.m_b, nb);
      const float ea = exp_approx(da), eb = exp_approx(db);
      st.t = __fmul_rn(ea, __fmaf_rn(__fsub_rn(da, db), st.s_a, st.t));
      st.s_a = __fmul_rn(st.s_a, ea);
      st.s_b = __fmul_rn(st.s_b, eb);
    }
    st.m_a = na;
    st.m_b = nb;
  }
#pragma unroll
  for (int i = 0; i < kKlSlot; ++i) {
    if (i < n) {
      const float da = __fsub_rn(a[i], st.m_a), db = __fsub_rn(b[i], st.m_b);
      const float ea = exp_approx(da), eb = exp_approx(db);
      st.s_a = __fadd_rn(st.s_a, ea);
      st.s_b = __fadd_rn(st.s_b, eb);
      st.t = __fmaf_rn(ea, __fsub_rn(da, db), st.t);
    }
  }
}

// Merges two states, each rescaled to the common maxima by the rule above. An empty operand is skipped exactly.
__device__ __forceinline__ KlState kl_state_merge(const KlState& x, const KlState& y) {
  KlState r;
  if (kl_state_is_empty(y)) {
    r = x;
  } else if (kl_state_is_empty(x)) {
    r = y;
  } else {
    r.m_a = fmaxf(x.m_a, y.m_a);
    r.m_b = fmaxf(x.m_b, y.m_b);
    const float dxa = __fsub_rn(x.m_a, r.m_a), dxb = __fsub_rn(x.m_b, r.m_b);
    const float dya = __fsub_rn(y.m_a, r.m_a), dyb = __fsub_rn(y.m_b, r.m_b);
    const float exa = exp_approx(dxa), exb = exp_approx(dxb);
    const float eya = exp_approx(dya), eyb = exp_approx(dyb);
    r.s_a = __fadd_rn(__fmul_rn(x.s_a, exa), __fmul_rn(y.s_a, eya));
    r.s_b = __fadd_rn(__fmul_rn(x.s_b, exb), __fmul_rn(y.s_b, eyb));
    r.t = __fadd_rn(__fmul_rn(exa, __fmaf_rn(__fsub_rn(dxa, dxb), x.s_a, x.t)),
                    __fmul_rn(eya, __fmaf_rn(__fsub_rn(dya, dyb), y.s_a, y.t)));
  }
  r.bad = x.bad | y.bad;
  return r;
}

// Fixed shuffle tree over the 32 lanes of the calling warp (all lanes must call); lane 0 gets the merged state.
__device__ __forceinline__ KlState kl_warp_reduce(KlState st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    KlState o;
    o.m_a = __shfl_down_sync(0xffffffffu, st.m_a, off);
    o.s_a = __shfl_down_sync(0xffffffffu, st.s_a, off);
    o.m_b = __shfl_down_sync(0xffffffffu, st.m_b, off);
    o.s_b = __shfl_down_sync(0xffffffffu, st.s_b, off);
    o.t = __shfl_down_sync(0xffffffffu, st.t, off);
    o.bad = __shfl_down_sync(0xffffffffu, st.bad, off);
    st = kl_state_merge(st, o);
  }
  return st;
}

// Folds this thread's slots of the row pair (slots tid, tid + tpr, ... in increasing order) into st. kAlA / kAlB:
// the row start of source a / b is 16-byte aligned (vector loads) or not (scalar loads, identical values).
template <typename TA, typename TB, bool kAlA, bool kAlB>
__device__ __forceinline__ void kl_accumulate_row(const typename ElemTraits<TA>::raw_t* xa,
                                                  const typename ElemTraits<TB>::raw_t* xb, int tid, int tpr,
                                                  int n_v, float inv_t, KlState& st) {
  constexpr int U = kKlUnroll<TA, TB>;
  const int n_full = n_v / kKlSlot;  // slots with kKlSlot elements; slot n_full (if V % kKlSlot != 0) is partial
  int j = tid;
  for (; j + (U - 1) * tpr < n_full; j += U * tpr) {  // U slots of both sources loaded before any arithmetic
    uint4 va[U][kKlVecsPerSlot<TA>], vb[U][kKlVecsPerSlot<TB>];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      kl_load_slot<TA, kAlA>(xa, j + u * tpr, va[u]);
      kl_load_slot<TB, kAlB>(xb, j + u * tpr, vb[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float a[kKlSlot], b[kKlSlot];
      kl_slot_scaled<TA>(va[u], inv_t, a);
      kl_slot_scaled<TB>(vb[u], inv_t, b);
      kl_add_slot(st, a, b, kKlSlot);
    }
  }
  for (; j < n_full; j += tpr) {
    uint4 va[kKlVecsPerSlot<TA>], vb[kKlVecsPerSlot<TB>];
    kl_load_slot<TA, kAlA>(xa, j, va);
    kl_load_slot<TB, kAlB>(xb, j, vb);
    float a[kKlSlot], b[kKlSlot];
    kl_slot_scaled<TA>(va, inv_t, a);
    kl_slot_scaled<TB>(vb, inv_t, b);
    kl_add_slot(st, a, b, kKlSlot);
  }
  const int n_tail = n_v - n_full * kKlSlot;
  if (n_tail > 0 && j == n_full) {  // this thread owns the partial last slot: scalar loads on every path
    float a[kKlSlot], b[kKlSlot];
    kl_tail_scaled<TA>(xa + n_full * kKlSlot, n_tail, inv_t, a);
    kl_tail_scaled<TB>(xb + n_full * kKlSlot, n_tail, inv_t, b);
    kl_add_slot(st, a, b, n_tail);
  }
}

// KL(a || b) per row pair. Outputs: kl, and (max, log-normaliser) of source a and of source b.
template <typename TA, typename TB>
__global__ void __launch_bounds__(kKlMaxThreadsPerRow, kKlMinBlocksPerSm)
    kl_fwd_kernel(KlInput<TA> src_a, KlInput<TB> src_b, const uint8_t* __restrict__ mask, float* __restrict__ out_kl,
                  float* __restrict__ out_max_a, float* __restrict__ out_log_norm_a, float* __restrict__ out_max_b,
                  float* __restrict__ out_log_norm_b, int64_t n_rows, int n_v, float inv_t, int tpr,
                  int rows_per_block) {
  __shared__ KlState warp_states[kKlMaxThreadsPerRow / 32];

  const int group = threadIdx.x / tpr;        // row slot of this thread within the block
  const int tid = threadIdx.x - group * tpr;  // thread index within the row
  const int lane = threadIdx.x & 31;
  const int first_warp = (group * tpr) >> 5;  // first warp of this row group
  const int warps_per_row = tpr >> 5;
  const int64_t n_blocks = (n_rows + rows_per_block - 1) / rows_per_block;

  // The loop bound is uniform over the block, so every thread reaches both __syncthreads.
  for (int64_t blk = blockIdx.x; blk < n_blocks; blk += gridDim.x) {
    const int64_t row = blk * rows_per_block + group;
    const bool valid = row < n_rows;
    const bool used = valid && (mask == nullptr || mask[row] != 0);  // masked rows are not read
    KlState st = kl_state_empty();
    if (used) {
      const auto* xa = kl_row_ptr(src_a, row);
      const auto* xb = kl_row_ptr(src_b, row);
      const bool al_a = is_aligned16(xa), al_b = is_aligned16(xb);
      if (al_a && al_b)
        kl_accumulate_row<TA, TB, true, true>(xa, xb, tid, tpr, n_v, inv_t, st);
      else if (al_a)
        kl_accumulate_row<TA, TB, true, false>(xa, xb, tid, tpr, n_v, inv_t, st);
      else if (al_b)
        kl_accumulate_row<TA, TB, false, true>(xa, xb, tid, tpr, n_v, inv_t, st);
      else
        kl_accumulate_row<TA, TB, false, false>(xa, xb, tid, tpr, n_v, inv_t, st);
    }
    st = kl_warp_reduce(st);
    if (lane == 0) warp_states[threadIdx.x >> 5] = st;
    __syncthreads();
    if (valid && tid < 32) {  // the row group's first warp merges its warps' states
      KlState w = lane < warps_per_row ? warp_states[first_warp + lane] : kl_state_empty();
      w = kl_warp_reduce(w);
      if (lane == 0) {
        float kl = 0.f, max_a = 0.f, log_norm_a = 0.f, max_b = 0.f, log_norm_b = 0.f;  // masked row: all 0
        if (used) {
          max_a = w.m_a;
          max_b = w.m_b;
          log_norm_a = logf(w.s_a);
          log_norm_b = logf(w.s_b);
          const float raw = __fadd_rn(__fdiv_rn(w.t, w.s_a), __fsub_rn(log_norm_b, log_norm_a));
          kl = w.bad ? nan_f() : raw < 0.f ? 0.f : raw;  // clamps rounding negatives, keeps NaN
        }
        out_kl[row] = kl;
        out_max_a[row] = max_a;
        out_log_norm_a[row] = log_norm_a;
        out_max_b[row] = max_b;
        out_log_norm_b[row] = log_norm_b;
      }
    }
    __syncthreads();  // warp_states is rewritten by the next iteration
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Forward launcher. n_rows == 0 launches nothing; V must be in [1, 2^30]. Every n_t must be > 0 when n_rows > 0.
// ---------------------------------------------------------------------------------------------------------------

// kl: KL(p || q) if reverse else KL(q || p); (row_max, log_norm) of z = logits * inv_t, (ref_row_max,
// ref_log_norm) of w = ref_logits * inv_t. All outputs fp32 (n_rows,).
template <typename TL, typename TR>
cudaError_t launch_kl_fwd(KlInput<TL> logits, KlInput<TR> ref, const uint8_t* mask, float* kl, float* row_max,
                          float* log_norm, float* ref_row_max, float* ref_log_norm, int64_t n_rows, int64_t n_v,
                          float inv_t, bool reverse, cudaStream_t stream) {
  if (n_rows <= 0) return cudaSuccess;
  if (n_v < 1 || n_v > kKlMaxVocab) return cudaErrorInvalidValue;
  const RowLaunch rl = kl_row_launch(n_v);
  const unsigned grid = capped_grid((n_rows + rl.rows_per_block - 1) / rl.rows_per_block);
  const unsigned block = rl.threads_per_row * rl.rows_per_block;
  if (reverse)  // a = policy, b = reference
    kl_fwd_kernel<TL, TR><<<grid, block, 0, stream>>>(logits, ref, mask, kl, row_max, log_norm, ref_row_max,
                                                      ref_log_norm, n_rows, static_cast<int>(n_v), inv_t,
                                                      rl.threads_per_row, rl.rows_per_block);
  else  // a = reference, b = policy: the statistics come back in (reference, policy) order
    kl_fwd_kernel<TR, TL><<<grid, block, 0, stream>>>(ref, logits, mask, kl, ref_row_max, ref_log_norm, row_max,
                                                      log_norm, n_rows, static_cast<int>(n_v), inv_t,
                                                      rl.threads_per_row, rl.rows_per_block);
  return cudaGetLastError();
}

// Applies X(TL, TR) to the 3 x 3 element-type pairs (explicit instantiations of the launchers).
#define RLHF_KL_FOR_EACH_PAIR(X)                                                                   \
  X(float, float) X(float, __nv_bfloat16) X(float, __half) X(__nv_bfloat16, float)                 \
  X(__nv_bfloat16, __nv_bfloat16) X(__nv_bfloat16, __half) X(__half, float) X(__half, __nv_bfloat16) \
  X(__half, __half)

// Explicit instantiations for the 3 x 3 element-type pairs (this header is included through kl.cu only).
#define RLHF_KL_FWD_INSTANTIATE(TL, TR)                                                                         \
  template cudaError_t launch_kl_fwd<TL, TR>(KlInput<TL>, KlInput<TR>, const uint8_t*, float*, float*, float*, \
                                             float*, float*, int64_t, int64_t, float, bool, cudaStream_t);
RLHF_KL_FOR_EACH_PAIR(RLHF_KL_FWD_INSTANTIATE)
#undef RLHF_KL_FWD_INSTANTIATE

}  // namespace rlhf_cuda

#endif  // RLHF_CUDA_KL_CUH_
