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
// Forward, per row, all in fp32: z_v = x_v * inv_t, w_v = y_v * inv_t; the weighting distribution a and the other
// one b are (a, b) = (z, w) for reverse = KL(p || q), (w, z) for KL(q || p). With m_a = max a (the maximum raw
// logit times inv_t, one rounding; inv_t > 0), da_v = a_v - m_a rounded once (an fma of the raw logit), s_a =
// sum e^(da_v), m_b, db_v, s_b likewise and t = sum e^(da_v) (da_v - db_v):
//   kl = max(0, t / s_a + (log s_b - log s_a)) (NaN kept), row statistics (m, log s) of z and of w.
// Everything is gathered in ONE pass with online maxima: when (m_a, m_b) grow to (m_a', m_b'), da = m_a - m_a',
// db = m_b - m_b': s_a <- e^da s_a, s_b <- e^db s_b, t <- e^da (t + (da - db) s_a). The empty state (m = -inf,
// s = t = 0) is never rescaled, so no 0 * inf appears for finite rows. The roles are fixed by the launcher: the
// kernel always computes KL(a || b) of its (first, second) source, and the launcher passes (logits, ref) or
// (ref, logits) with the output pointers mapped back to (policy, ref) order. Both operands go through identical
// arithmetic, so identical rows give m_a == m_b, s_a == s_b, every difference 0, hence kl == 0 exactly.
// Non-finite rule: a NaN or +-inf logit in either source, or a scaled value that overflows, leaves t, s_a or s_b
// non-finite (see KlState); such a row gets kl = NaN (its statistics are unspecified).
//
// Backward, per element of an unmasked row (stats and kl from the forward, g = grad_kl[r]; z and w rounded to fp32
// here, which differs from the forward's fma differences by at most half an ulp of z):
//   lp = (z - row_max) - log_norm, lq = (w - ref_row_max) - ref_log_norm, p = e^lp,
//   reverse: g_z = (g p) ((lp - lq) - kl);  else: g_z = g (p - e^lq);  grad = g_z * inv_t in type TL.
//
// Work split (the launch rule, a function of V only; see kl_row_launch): the row is cut into slots of kKlSlot = 8
// consecutive elements, slot j covering [8 j, min(8 j + 8, V)), i.e. one 16-byte vector of a 16-bit source or two
// of an fp32 one. threads_per_row (tpr) = smallest power of two in [32, 512] with tpr * 8 >= ceil(V / 8);
// rows_per_block = max(1, 128 / tpr). Forward: 1-D grid over row groups (grid-stride). Backward: grid x = chunk
// of tpr * U * kKlBwdBatches slots of the row, y = row group (grid-stride); its slots are counted from the first
// 16-byte aligned element of the gradient row, and chunk 0 also writes the scalar head (the elements before it)
// and tail (after the last full slot).
//
// Batch invariance of the forward: slot j belongs to thread j % tpr of the row's group, which cuts its slots
// (increasing j) into batches of kKlFwdUnroll (row_slots.h) and folds each batch as: exact maxima of its a and b
// elements (packed 16-bit maxima of the raw data), scaled once, at most one re-base, then the pairs in slot order,
// element order. The 32 lanes of a warp are merged by a fixed shuffle tree, then the tpr / 32 warps of the row by
// a second fixed tree. All arithmetic uses explicitly rounded intrinsics and ex2.approx (exp_approx), so a row's
// outputs are bitwise functions of its two rows, V, the two dtypes, inv_t and reverse only: not of B / T splits,
// strides, alignment, neighbouring rows or the grid. The backward is elementwise.
//
// Loads: every slot of both sources is read with aligned 16-byte loads whatever the row starts' alignment
// (RowSource, row_slots.h). Rows whose two starts are 16-byte aligned use a body with the alignment known at
// compile time; any other pair of alignments one body with the shift of each source read at run time (word
// selects + funnel shifts), which assembles the same slot values, hence bitwise the same results. When every row
// of both sources is aligned (uniform_row_shift) the launcher runs a kernel holding the aligned body only. The loads of
// batch k + 1 are in flight while batch k is folded.
#ifndef RLHF_CUDA_KL_CUH_
#define RLHF_CUDA_KL_CUH_

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace rlhf_cuda {

inline constexpr int kKlSlot = 8;                 // elements per slot, for every dtype pair
inline constexpr int kKlMaxThreadsPerRow = 512;   // also the largest block
inline constexpr int kKlMinBlock = 128;           // small rows are packed until a block has this many threads
inline constexpr int kKlSlotsPerThread = 8;       // tpr grows until each thread has at most this many slots
// Backward: 16-byte loads issued per thread before any arithmetic (64 bytes).
inline constexpr int kKlLoadsInFlight = 4;
// Forward: slots per batch (part of the reduction order, the same for every dtype pair and alignment). One slot of
// both sources is 2 (16-bit) to 4 (fp32) 16-byte loads, and two batches of load registers are live.
inline constexpr int kKlFwdUnroll = 1;
inline constexpr int kKlMinBlocksPerSm = 2;       // caps registers at 64: two 512-thread blocks per SM
inline constexpr int kKlBwdBatches = 4;           // backward: batches of U slots per thread and chunk
inline constexpr int64_t kKlMaxVocab = int64_t(1) << 30;  // in-row indices are int32

// 16-byte vectors per slot of a source of type T (2 for fp32, 1 for 16-bit types).
template <typename T>
inline constexpr int kKlVecsPerSlot = kKlSlot / ElemTraits<T>::kVec;

// Backward: slots per thread in flight (U), as many as fit in kKlLoadsInFlight 16-byte loads of the two sources,
// at least one (2 for two 16-bit sources, 1 otherwise).
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

// ---------------------------------------------------------------------------------------------------------------
// Online state of one (part of a) row: maxima m_a, m_b, sums s_a = sum e^(a - m_a), s_b = sum e^(b - m_b),
// t = sum e^(a - m_a) ((a - m_a) - (b - m_b)). Empty state: m = -inf, s = t = 0. A state that has seen a finite
// element has s_a >= 1 (its maximum contributes e^0 = 1 up to rounding of the fma-based difference, and a re-base
// is always followed by the batch holding the new maximum), so for finite rows s_a == 0 identifies the empty
// state. Non-finite inputs need no flag: NaN reaches s_a or t; +inf becomes a maximum and then gives inf - inf =
// NaN; -inf in a gives e = 0 and 0 * -inf = NaN in t; -inf in b gives t = +inf (or NaN). Every later step keeps a
// non-finite t / s non-finite (inf times a positive factor, or NaN), so the row's kl is NaN iff t, s_a or s_b is
// not finite at the end.
// ---------------------------------------------------------------------------------------------------------------
struct KlState {
  float m_a, s_a, m_b, s_b, t;
};

__device__ __forceinline__ KlState kl_state_empty() { return {neg_inf_f(), 0.f, neg_inf_f(), 0.f, 0.f}; }
__device__ __forceinline__ bool kl_state_is_empty(const KlState& st) { return st.s_a == 0.f; }

// Raises the reference maxima to the batch maxima (ca, cb) where larger, re-basing once:
// da = m_a - m_a', db = m_b - m_b': s_a <- e^da s_a, s_b <- e^db s_b, t <- e^da (t + (da - db) s_a).
__device__ __forceinline__ void kl_raise_max(KlState& st, float ca, float cb) {
  const float na = fmaxf(st.m_a, ca), nb = fmaxf(st.m_b, cb);  // a NaN maximum leaves m (the NaN reaches the sums)
  // The empty state has nothing to re-base (and m = -inf would give NaN).
  if ((na > st.m_a || nb > st.m_b) && !kl_state_is_empty(st)) {
    const float da = __fsub_rn(st.m_a, na), db = __fsub_rn(st.m_b, nb);
    const float ea = exp_approx(da), eb = exp_approx(db);
    st.t = __fmul_rn(ea, __fmaf_rn(__fsub_rn(da, db), st.s_a, st.t));
    st.s_a = __fmul_rn(st.s_a, ea);
    st.s_b = __fmul_rn(st.s_b, eb);
  }
  st.m_a = na;
  st.m_b = nb;
}

// Folds one pair of logits (xa, xb) into st (maxima already raised; neg_a = -m_a, neg_b = -m_b): the differences
// x inv_t - m rounded once (fma), one exp_approx each.
__device__ __forceinline__ void kl_fold(KlState& st, float xa, float xb, float inv_t, float neg_a, float neg_b) {
  const float da = __fmaf_rn(xa, inv_t, neg_a), db = __fmaf_rn(xb, inv_t, neg_b);
  const float ea = exp_approx(da), eb = exp_approx(db);
  st.s_a = __fadd_rn(st.s_a, ea);
  st.s_b = __fadd_rn(st.s_b, eb);
  st.t = __fmaf_rn(ea, __fsub_rn(da, db), st.t);
}

// Merges two states, each re-based to the common maxima by the rule above. An empty operand is skipped exactly.
__device__ __forceinline__ KlState kl_state_merge(const KlState& x, const KlState& y) {
  if (kl_state_is_empty(y)) return x;
  if (kl_state_is_empty(x)) return y;
  KlState r;
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
    st = kl_state_merge(st, o);
  }
  return st;
}

// Folds this thread's slots of the row pair (slots tid, tid + tpr, ... in increasing order) into a state, by
// batches of kKlFwdUnroll slots (row_slots.h): per batch the exact maxima of its a and b elements (packed 16-bit
// maxima on the raw data), scaled once (monotone for inv_t > 0), at most one re-base, then the pairs folded in
// slot order, element order. The loads of batch k + 1 are in flight while batch k is folded. kShA / kShB: byte
// offset of the row start past a 16-byte boundary (0), or -1: any offset, read at run time (RowSource).
template <typename TA, typename TB, int kShA, int kShB>
__device__ __forceinline__ KlState kl_accumulate_row(const void* xa, const void* xb, int tid, int tpr, int n_v,
                                                     float inv_t) {
  using SrcA = RowSource<kShA, kKlVecsPerSlot<TA>>;
  using SrcB = RowSource<kShB, kKlVecsPerSlot<TB>>;
  constexpr int U = kKlFwdUnroll;
  constexpr int NA = SrcA::kChunks, NB = SrcB::kChunks;
  struct Buf {
    uint4 a[U][NA], b[U][NB];
  };
  KlState st = kl_state_empty();
  const SrcA src_a(xa);
  const SrcB src_b(xb);
  const int n_full = n_v / kKlSlot;
  const int nbf = thread_batches(tid, tpr, n_full, n_full, U).n_full_batches;
  int n_tail_slots = 0, part = 0;
  auto tail_params = [&]() {  // computed after the steady loop (fewer live registers inside it)
    part = n_v - n_full * kKlSlot;
    n_tail_slots = thread_batches(tid, tpr, (n_v + kKlSlot - 1) / kKlSlot, n_full, U).n_tail_slots;
    return n_tail_slots > 0;
  };
  auto load_full = [&](Buf& c, int j0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      src_a.load_main(src_a.slot_ptr(j0 + u * tpr), c.a[u]);
      src_b.load_main(src_b.slot_ptr(j0 + u * tpr), c.b[u]);
    }
  };
  auto load_tail = [&](Buf& c) {  // slots u < n_tail_slots of batch nbf; the last may be partial
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = tid + (nbf * U + u) * tpr;
      if (u < n_tail_slots) {
        if (j < n_full) {
          src_a.load(src_a.slot_ptr(j), c.a[u]);
          src_b.load(src_b.slot_ptr(j), c.b[u]);
        } else {
          src_a.load_partial(src_a.slot_ptr(j), part * static_cast<int>(sizeof(TA)), c.a[u]);
          src_b.load_partial(src_b.slot_ptr(j), part * static_cast<int>(sizeof(TB)), c.b[u]);
        }
      }
    }
  };
  // A batch's slot views and the words of all its elements (for the packed maxima).
  using ViewA = typename SrcA::View;
  using ViewB = typename SrcB::View;
  constexpr int WA = SrcA::kWords, WB = SrcB::kWords;
  auto views = [&](const Buf& c, ViewA (&va)[U], ViewB (&vb)[U], uint32_t (&wa)[U * WA], uint32_t (&wb)[U * WB]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      va[u] = src_a.view(c.a[u]);
      vb[u] = src_b.view(c.b[u]);
      uint32_t ta[WA], tb[WB];
      src_a.max_words_of(va[u], ta);
      src_b.max_words_of(vb[u], tb);
#pragma unroll
      for (int m = 0; m < WA; ++m) wa[u * WA + m] = ta[m];
#pragma unroll
      for (int m = 0; m < WB; ++m) wb[u * WB + m] = tb[m];
    }
  };
  auto fold_full = [&](Buf& c, int j0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {  // shifted rows only
      src_a.load_extra(src_a.slot_ptr(j0 + u * tpr), c.a[u]);
      src_b.load_extra(src_b.slot_ptr(j0 + u * tpr), c.b[u]);
    }
    ViewA va[U];
    ViewB vb[U];
    uint32_t wa[U * WA], wb[U * WB];
    views(c, va, vb, wa, wb);
    kl_raise_max(st, __fmul_rn(max_words<TA>(wa), inv_t), __fmul_rn(max_words<TB>(wb), inv_t));
    const float neg_a = -st.m_a, neg_b = -st.m_b;
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < kKlSlot; ++i)
        kl_fold(st, src_a.template elem<TA>(va[u], i), src_b.template elem<TB>(vb[u], i), inv_t, neg_a, neg_b);
  };
  auto fold_tail = [&](const Buf& c) {  // the same on the valid pairs only
    ViewA va[U];
    ViewB vb[U];
    uint32_t wa[U * WA], wb[U * WB];
    views(c, va, vb, wa, wb);
    const int last_n = tid + (nbf * U + n_tail_slots - 1) * tpr < n_full ? kKlSlot : part;
    auto valid = [&](int u, int i) { return u < n_tail_slots - 1 || (u == n_tail_slots - 1 && i < last_n); };
    float ma = neg_inf_f(), mb = neg_inf_f();
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < kKlSlot; ++i)
        if (valid(u, i)) {
          ma = fmaxf(ma, src_a.template elem<TA>(va[u], i));
          mb = fmaxf(mb, src_b.template elem<TB>(vb[u], i));
        }
    kl_raise_max(st, __fmul_rn(ma, inv_t), __fmul_rn(mb, inv_t));
    const float neg_a = -st.m_a, neg_b = -st.m_b;
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < kKlSlot; ++i)
        if (valid(u, i))
          kl_fold(st, src_a.template elem<TA>(va[u], i), src_b.template elem<TB>(vb[u], i), inv_t, neg_a, neg_b);
  };

  // Buffers p and q take turns (batch k folded while batch k + 1 is in flight); the tail batch's loads (buffer tl)
  // are in flight while the last full batch is folded. At most two of the three buffers are live at a time.
  Buf p, q, tl;
  const int step = U * tpr;
  int j = tid;
  if (nbf > 0) load_full(p, j);
  int k = 0;
  for (; k + 2 < nbf; k += 2) {  // steady state: batches k, k + 1 and k + 2 are all full
    load_full(q, j + step);
    fold_full(p, j);
    load_full(p, j + 2 * step);
    fold_full(q, j + step);
    j += 2 * step;
  }
  const bool has_tail = tail_params();
  if (k + 1 < nbf) {  // two full batches left
    load_full(q, j + step);
    fold_full(p, j);
    if (has_tail) load_tail(tl);
    fold_full(q, j + step);
  } else if (k < nbf) {  // one full batch left
    if (has_tail) load_tail(tl);
    fold_full(p, j);
  } else if (has_tail) {  // no full batch at all
    load_tail(tl);
  }
  if (has_tail) fold_tail(tl);
  return st;
}

// KL(a || b) per row pair. Outputs: kl, and (max, log-normaliser) of source a and of source b.
// kAllAligned: every row start of both sources is 16-byte aligned (the launcher checked it), one loop body; else
// each row takes the aligned body or the run-time shifted one (same results for the same row either way).
// Register budget: 64 per thread (two blocks of 512 threads per SM) for the aligned body of rows with a 16-bit
// input; the per-row-dispatch body (both alignments of each input inlined) and two fp32 rows (twice the bytes per
// slot in flight) need more than 64 and would spill, so they get 128 (one block per SM; with 512 threads still
// 32-64 KiB in flight per SM).
template <typename TA, typename TB, bool kAllAligned>
inline constexpr int kKlFwdMinBlocks =
    kAllAligned && (sizeof(TA) < 4 || sizeof(TB) < 4) ? kKlMinBlocksPerSm : 1;

template <typename TA, typename TB, bool kAllAligned>
__global__ void __launch_bounds__(kKlMaxThreadsPerRow, (kKlFwdMinBlocks<TA, TB, kAllAligned>))
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
      // Rows with both starts 16-byte aligned take the compile-time path; any other alignment the run-time
      // shifted path (same slots, same arithmetic: bitwise equal results).
      if (kAllAligned || (is_aligned16(xa) && is_aligned16(xb)))
        st = kl_accumulate_row<TA, TB, 0, 0>(xa, xb, tid, tpr, n_v, inv_t);
      else
        st = kl_accumulate_row<TA, TB, -1, -1>(xa, xb, tid, tpr, n_v, inv_t);
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
          const bool finite = fabsf(w.t) < inf_f() && fabsf(w.s_a) < inf_f() && fabsf(w.s_b) < inf_f();
          kl = !finite ? nan_f() : raw < 0.f ? 0.f : raw;  // clamps rounding negatives
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
  auto all_aligned = [&](const auto& in) {
    return uniform_row_shift(in.data, static_cast<int>(sizeof(*in.data)), n_rows / in.n_t, in.n_t, in.stride_b,
                             in.stride_t) == 0;
  };
  const bool aligned = all_aligned(logits) && all_aligned(ref);
  auto launch = [&](auto a, auto b, float* max_a, float* ln_a, float* max_b, float* ln_b) {
    using TA = typename std::remove_pointer_t<decltype(a.data)>;
    using TB = typename std::remove_pointer_t<decltype(b.data)>;
    const int tpr = rl.threads_per_row, rpb = rl.rows_per_block, nv = static_cast<int>(n_v);
    if (aligned)
      kl_fwd_kernel<std::remove_const_t<TA>, std::remove_const_t<TB>, true><<<grid, block, 0, stream>>>(
          a, b, mask, kl, max_a, ln_a, max_b, ln_b, n_rows, nv, inv_t, tpr, rpb);
    else
      kl_fwd_kernel<std::remove_const_t<TA>, std::remove_const_t<TB>, false><<<grid, block, 0, stream>>>(
          a, b, mask, kl, max_a, ln_a, max_b, ln_b, n_rows, nv, inv_t, tpr, rpb);
  };
  if (reverse)  // a = policy, b = reference
    launch(logits, ref, row_max, log_norm, ref_row_max, ref_log_norm);
  else  // a = reference, b = policy: the statistics come back in (reference, policy) order
    launch(ref, logits, ref_row_max, ref_log_norm, row_max, log_norm);
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
