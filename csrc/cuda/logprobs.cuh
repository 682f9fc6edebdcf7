// Fused token log-probabilities + entropy (forward) and their gradient (backward) over a vocabulary.
//
// Torch-free: raw pointers, sizes and strides in, cudaError_t out. The binding is csrc/cuda/logprobs.cu.
//
// Layout: logits (B, T, V) with element stride 1 along V and arbitrary int64 strides for B and T; labels (B, T)
// int64 contiguous; per-row fp32 tensors (B, T) contiguous; the gradient is a contiguous (B, T, V) tensor.
// Row r = b * T + t starts at logits + b * stride_b + t * stride_t.
//
// Forward, per row, with z_v = x_v * inv_temperature, m = max_v z_v (z_m rounded to fp32: the maximum logit times
// inv_temperature, one rounding) and d_v = x_v * inv_temperature - m rounded ONCE (an fma, exact product):
//   s = sum_v e^{d_v}, t = sum_v e^{d_v} d_v;  row_max = m, log_norm = log s,
//   logprob = d_label - log_norm,  entropy = log_norm - t / s.
// (For inv_temperature = 1 the fma equals the previous two-step (z_v - m); otherwise it is the more accurate one.)
// The log-sum-exp m + log s is never formed: rounding it to fp32 would cost ulp(|m + log s|) of absolute error
// in every log-prob and every p of the backward (large for logits of a few hundred). Every exponential is one
// ex2.approx of the small difference d * log2(e) (exp_approx), never of z and m prescaled separately.
// inv_temperature must be > 0 (the public op checks temperature > 0): the maximum is taken on the raw logits and
// scaled once, which equals the maximum of the scaled logits because rounding is monotone.
// Special rows: label == ignore_index -> the row is not read, logprob = entropy = row_max = log_norm = 0 (the op
// table's convention, rlhf_kernels/_registry.py); label outside [0, V) -> logprob = NaN; a NaN or +-inf logit
// makes the row's entropy sum t NaN -> logprob = entropy = NaN.
//
// Backward, per element: lp_v = d_v - log_norm (d_v by the same fma), p_v = e^{lp_v},
//   g_z = -p_v (g_lp + g_H (lp_v + H)) + [v == label] g_lp,  grad = g_z * inv_temperature.
//
// Work split (the "launch rule", a function of V and the element size only, see logprobs_row_launch):
//   threads_per_row (tpr) = smallest power of two in [32, 512] with tpr * 8 >= ceil(V / VEC), VEC = 16 / sizeof(T);
//   rows_per_block = max(1, 128 / tpr); block = tpr * rows_per_block; 1-D grid over row groups (grid-stride).
//
// Batch invariance of the forward. The row is cut into "slots" of VEC consecutive elements, slot j covering
// [j * VEC, min(j * VEC + VEC, V)) relative to the row start. Slot j belongs to thread j % tpr of the row's group.
// Each thread cuts its slots (increasing j) into batches of U = kLogprobsUnroll consecutive ones (row_slots.h:
// full batches of U full slots, then at most one tail batch with the rest, the row's partial slot last). A batch
// is folded as: exact maximum of its elements (packed bf16x2 / f16x2 maxima of the raw data, fp32 maxima for
// fp32), scaled once; at most one re-base of (s, t) if it exceeds m; then its elements in slot order, element
// order, one exp_approx each. The 32 lanes of a warp are merged by a fixed shuffle tree, then the tpr / 32 warps
// of the row by a second fixed tree. All arithmetic uses explicitly rounded intrinsics (no contraction left to
// the compiler) and ex2.approx, and the batches depend on (V, dtype) only, so a row's outputs are bitwise
// functions of (its contents, V, dtype, inv_temperature, ignore_index): not of B, T, strides, the row start's
// alignment or neighbouring rows.
//
// Loads. Every slot is read with aligned 16-byte loads, whatever the row start's alignment (odd V in 16-bit
// types, rows of a [:, 1:] slice, ...): a row starting `shift` bytes past a 16-byte boundary reads its slot from
// two aligned chunks and takes each element in place from their words (RowSource in common.cuh, layout and the
// no-fault argument in row_slots.h). The elements are exactly the row's, so the arithmetic, hence the result, is
// the same as for an aligned row. There is one loop body per shift (8 for 16-bit types, 4 for fp32). When all rows
// share one shift (uniform_row_shift: contiguous rows with V * sizeof(T) % 16 == 0, or a slice that moves them all
// alike) the launcher runs a kernel holding that body only; otherwise (e.g. odd V in a 16-bit type) a kernel that
// picks the body per row (its per-row code, outside the loops, then spills a few registers). While batch k is
// folded, the loads of batch k + 1 are in flight (two register buffers used in turn); the second chunk of a
// shifted slot is the next slot's first chunk,
// which its owner has just requested, so it is read when the slot is folded (normally from L1).
//
// Small batches (not implemented; the design and its price). With N < 2 x (number of SMs) rows, each row's single
// group of tpr threads leaves most SMs idle. An exact split over the vocabulary: make the single-group reduction
// itself a fixed sequence of S segments of the row (S and the segment bounds a function of V only, each segment a
// whole number of batches per thread), each reduced by the tpr threads to a state and the S states merged in
// increasing segment order (state_merge). The split launch then reduces segments in separate blocks into an
// fp32 workspace (3 floats per row and segment) and merges them in the same order (a second small kernel, or the
// last block of a row, found with an atomic counter per row); the single-block path merges the same states in
// the same order, so both are bitwise equal. Price: S - 1 extra merges and a shared-memory round per row even on
// the single-block path (a few hundred instructions per row, < 1% at V = 32k), a workspace of N x S x 12 bytes,
// and the launcher needing the SM count (cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount)) to choose.
#ifndef RLHF_CUDA_LOGPROBS_CUH_
#define RLHF_CUDA_LOGPROBS_CUH_

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace rlhf_cuda {

inline constexpr int kLogprobsMaxThreadsPerRow = 512;      // also the largest block
inline constexpr int kLogprobsMinBlock = 128;              // small rows are packed until a block has this many threads
inline constexpr int kLogprobsSlotsPerThread = 8;          // tpr grows until each thread has at most this many slots
// Slots per batch (16-byte loads in flight per thread while the previous batch is folded). Part of the reduction
// order, so the same for every row start alignment. 2 keeps the steady loops free of spills under the 64-register
// cap (two batches of load registers are live); 3 and 4 spill inside them.
inline constexpr int kLogprobsUnroll = 2;
inline constexpr int kLogprobsBwdUnroll = 4;  // backward: 16-byte slots in flight per thread
// Caps registers at 64 so that two 512-thread blocks fit per SM (unconstrained, ptxas takes more for the forward,
// which would leave one block per SM).
inline constexpr int kLogprobsMinBlocksPerSm = 2;
inline constexpr int64_t kLogprobsMaxVocab = int64_t(1) << 30;  // in-row indices are int32

// The launch rule. Depends on V and the vector width only, which fixes the forward reduction order per (V, dtype).
inline RowLaunch logprobs_row_launch(int64_t n_v, int vec) {
  return pow2_row_launch((n_v + vec - 1) / vec, kLogprobsMaxThreadsPerRow, kLogprobsSlotsPerThread,
                         kLogprobsMinBlock);
}

// ---------------------------------------------------------------------------------------------------------------
// Online softmax state: m = max z, s = sum e^(z - m), t = sum e^(z - m) (z - m) over the elements seen.
// Empty state: m = -inf, s = 0, t = 0. A non-empty state of finite values has s >= 1 (the maximum contributes
// e^0), so "s == 0 and t == 0" identifies the empty state; any NaN / inf input leaves s or t NaN, which every
// later step propagates (NaN * a, NaN + b), while fmaxf on m may drop it.
// ---------------------------------------------------------------------------------------------------------------
struct SoftmaxState {
  float m, s, t;
};

__device__ __forceinline__ SoftmaxState state_empty() { return {neg_inf_f(), 0.f, 0.f}; }
__device__ __forceinline__ bool state_is_empty(const SoftmaxState& a) { return a.s == 0.f && a.t == 0.f; }

// Raises st's reference maximum to cm (the maximum of a batch of scaled values) if cm is larger, re-basing
// (s, t) once: t' = a (t + dm s), s' = a s with a = e^dm, dm = m - cm < 0. An empty state is not re-based (its
// m = -inf would give NaN). cm = +inf gives a = 0 and dm = -inf, hence t' = 0 * (-inf) = NaN: rows with +inf stay
// NaN. A NaN cm (all-NaN batch) changes nothing here; the NaN reaches s and t through the elements.
__device__ __forceinline__ void state_raise_max(SoftmaxState& st, float cm) {
  const float nm = fmaxf(st.m, cm);  // a NaN cm leaves m
  if (nm > st.m && !state_is_empty(st)) {
    const float dm = __fsub_rn(st.m, nm);
    const float a = exp_approx(dm);
    st.t = __fmul_rn(a, __fmaf_rn(dm, st.s, st.t));
    st.s = __fmul_rn(st.s, a);
  }
  st.m = nm;
}

// Folds one logit x into st (st.m already >= x * inv_t; neg_m = -st.m): d = x inv_t - m rounded once (fma),
// s += e^d, t += e^d d. A -inf logit gives e = 0 and e * d = NaN (by design: the row becomes NaN).
__device__ __forceinline__ void state_fold(SoftmaxState& st, float x, float inv_t, float neg_m) {
  const float d = __fmaf_rn(x, inv_t, neg_m);
  const float e = exp_approx(d);
  st.s = __fadd_rn(st.s, e);
  st.t = __fmaf_rn(e, d, st.t);
}

// Merges two states (each t relative to its own m). Empty operands are skipped exactly, so they can never turn
// a finite state into NaN through -inf * 0.
__device__ __forceinline__ SoftmaxState state_merge(const SoftmaxState& a, const SoftmaxState& b) {
  if (state_is_empty(b)) return a;
  if (state_is_empty(a)) return b;
  const float m = fmaxf(a.m, b.m);
  const float da = __fsub_rn(a.m, m), db = __fsub_rn(b.m, m);
  const float ea = exp_approx(da), eb = exp_approx(db);
  SoftmaxState r;
  r.m = m;
  r.s = __fadd_rn(__fmul_rn(a.s, ea), __fmul_rn(b.s, eb));
  r.t = __fadd_rn(__fmul_rn(ea, __fmaf_rn(da, a.s, a.t)), __fmul_rn(eb, __fmaf_rn(db, b.s, b.t)));
  return r;
}

// Fixed shuffle tree over the 32 lanes of the calling warp (all lanes must call); lane 0 gets the merged state.
__device__ __forceinline__ SoftmaxState warp_reduce_state(SoftmaxState st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    SoftmaxState o;
    o.m = __shfl_down_sync(0xffffffffu, st.m, off);
    o.s = __shfl_down_sync(0xffffffffu, st.s, off);
    o.t = __shfl_down_sync(0xffffffffu, st.t, off);
    st = state_merge(st, o);
  }
  return st;
}


// Folds this thread's slots of the row at x (slots tid, tid + tpr, ... in increasing order) into st, by batches
// of U slots (row_slots.h: full batches, then at most one tail batch). Per batch: the exact maximum of its
// elements (packed 16-bit maxima on the raw data), scaled once (x -> x * inv_t is monotone for inv_t > 0, so this
// is the maximum of the scaled values), at most one re-base, then the elements folded in slot order, element
// order.
// kShift: the row start's byte offset past a 16-byte boundary (slots read from aligned chunks).
template <typename T, int kShift>
__device__ __forceinline__ SoftmaxState accumulate_row(const void* x, int tid, int tpr, int n_v, float inv_t) {
  SoftmaxState st = state_empty();
  using Src = RowSource<kShift, 1>;
  constexpr int VEC = ElemTraits<T>::kVec;
  constexpr int NC = Src::kChunks;
  constexpr int U = kLogprobsUnroll;
  const Src src(x);
  const int n_full = n_v / VEC;
  const int nbf = thread_batches(tid, tpr, n_full, n_full, U).n_full_batches;
  // The tail's parameters are computed after the steady loop (fewer live registers inside it).
  int n_tail_slots = 0, part = 0;
  auto tail_params = [&]() {
    part = n_v - n_full * VEC;  // elements of the partial last slot (0: none)
    n_tail_slots = thread_batches(tid, tpr, (n_v + VEC - 1) / VEC, n_full, U).n_tail_slots;
    return n_tail_slots > 0;
  };
  // Slot u of a batch whose first slot is j0 is j0 + u * tpr.
  auto load_full = [&](uint4 (&c)[U][NC], int j0) {
#pragma unroll
    for (int u = 0; u < U; ++u) src.load_main(src.slot_ptr(j0 + u * tpr), c[u]);
  };
  auto load_tail = [&](uint4 (&c)[U][NC]) {  // slots u < n_tail_slots of batch nbf; the last may be partial
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = tid + (nbf * U + u) * tpr;
      if (u < n_tail_slots) {
        if (j < n_full)
          src.load(src.slot_ptr(j), c[u]);
        else
          src.load_partial(src.slot_ptr(j), part * static_cast<int>(sizeof(T)), c[u]);
      }
    }
  };
  // A batch's slot views and the words of all its elements (for the packed maximum).
  using View = typename Src::View;
  auto views = [&](const uint4 (&c)[U][NC], View (&v)[U], uint32_t (&w)[4 * U]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      v[u] = src.view(c[u]);
      uint32_t ws[4];
      src.max_words_of(v[u], ws);
#pragma unroll
      for (int m = 0; m < 4; ++m) w[4 * u + m] = ws[m];
    }
  };
  auto fold_full = [&](uint4 (&c)[U][NC], int j0) {
#pragma unroll
    for (int u = 0; u < U; ++u) src.load_extra(src.slot_ptr(j0 + u * tpr), c[u]);  // shifted rows only
    View v[U];
    uint32_t w[4 * U];
    views(c, v, w);
    state_raise_max(st, __fmul_rn(max_words<T>(w), inv_t));
    const float neg_m = -st.m;
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < VEC; ++i) state_fold(st, src.template elem<T>(v[u], i), inv_t, neg_m);
  };
  auto fold_tail = [&](const uint4 (&c)[U][NC]) {  // the same on the valid elements only
    View v[U];
    uint32_t w[4 * U];
    views(c, v, w);
    const int last_n = tid + (nbf * U + n_tail_slots - 1) * tpr < n_full ? VEC : part;
    auto valid = [&](int u, int i) { return u < n_tail_slots - 1 || (u == n_tail_slots - 1 && i < last_n); };
    float xm = neg_inf_f();
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        if (valid(u, i)) xm = fmaxf(xm, src.template elem<T>(v[u], i));
    state_raise_max(st, __fmul_rn(xm, inv_t));
    const float neg_m = -st.m;
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        if (valid(u, i)) state_fold(st, src.template elem<T>(v[u], i), inv_t, neg_m);
  };

  // Buffers a and b take turns: batch k is folded while batch k + 1 is in flight; the tail batch's loads (buffer
  // tl) are in flight while the last full batch is folded. At most two of the three buffers are live at a time.
  // j: first slot of batch k, advanced by one batch (U tpr slots) at a time.
  uint4 a[U][NC], b[U][NC], tl[U][NC];
  const int step = U * tpr;
  int j = tid;
  if (nbf > 0) load_full(a, j);
  int k = 0;
  for (; k + 2 < nbf; k += 2) {  // steady state: batches k, k + 1 and k + 2 are all full
    load_full(b, j + step);
    fold_full(a, j);
    load_full(a, j + 2 * step);
    fold_full(b, j + step);
    j += 2 * step;
  }
  const bool has_tail = tail_params();
  if (k + 1 < nbf) {  // two full batches left
    load_full(b, j + step);
    fold_full(a, j);
    if (has_tail) load_tail(tl);
    fold_full(b, j + step);
  } else if (k < nbf) {  // one full batch left
    if (has_tail) load_tail(tl);
    fold_full(a, j);
  } else if (has_tail) {  // no full batch at all
    load_tail(tl);
  }
  if (has_tail) fold_tail(tl);
  return st;
}

// kShiftMode >= 0: every row starts kShiftMode bytes past a 16-byte boundary (the launcher checked it), one loop
// body; kShiftMode = -1: the shift is read per row and one of the bodies taken (rows of differing alignment, e.g.
// odd V in a 16-bit type). The bodies compute the same thing, so a row's result does not depend on the mode.
// Register budget: 64 per thread (two blocks of 512 threads per SM) for the one-shift bodies; the per-row dispatch
// inlines every shift's body and would spill (~400 B per thread per row) at 64, so it gets 128 (one block per
// SM, 24 KiB in flight per SM with 512 threads: the lower end of what the bandwidth needs, see the SASS report).
template <typename T, int kShiftMode>
__global__ void __launch_bounds__(kLogprobsMaxThreadsPerRow, kShiftMode < 0 ? 1 : kLogprobsMinBlocksPerSm)
    logprobs_fwd_kernel(const T* __restrict__ logits, const int64_t* __restrict__ labels,
                        float* __restrict__ out_logprobs, float* __restrict__ out_entropy,
                        float* __restrict__ out_row_max, float* __restrict__ out_log_norm, int64_t n_rows,
                        int64_t n_t, int n_v, int64_t stride_b, int64_t stride_t, float inv_temperature,
                        int64_t ignore_index, int tpr, int rows_per_block) {
  using Tr = ElemTraits<T>;
  using raw_t = typename Tr::raw_t;
  __shared__ SoftmaxState warp_states[kLogprobsMaxThreadsPerRow / 32];

  const int group = threadIdx.x / tpr;          // row slot of this thread within the block
  const int tid = threadIdx.x - group * tpr;    // thread index within the row
  const int lane = threadIdx.x & 31;
  const int first_warp = (group * tpr) >> 5;    // first warp of this row group
  const int warps_per_row = tpr >> 5;
  const raw_t* base = reinterpret_cast<const raw_t*>(logits);
  const int64_t n_blocks = (n_rows + rows_per_block - 1) / rows_per_block;

  // The loop bound is uniform over the block, so every thread reaches both __syncthreads.
  for (int64_t blk = blockIdx.x; blk < n_blocks; blk += gridDim.x) {
    const int64_t row = blk * rows_per_block + group;
    const bool valid = row < n_rows;
    SoftmaxState st = state_empty();
    // Every thread of the row reads its label (one cached line per row group): an ignored row is not read at all.
    // Only two small values stay live across the row: used and the label's logit x_label (NaN when the label is
    // outside [0, V), which makes the log-prob NaN).
    const int64_t label = valid ? labels[row] : ignore_index;
    const bool used = label != ignore_index;
    float x_label = 0.f;
    if (used) {
      const int64_t b = row / n_t;
      const raw_t* x = base + b * stride_b + (row - b * n_t) * stride_t;
      if (tid == 0)  // the thread that writes the outputs reads the label's logit early
        x_label = label >= 0 && label < n_v ? Tr::to_float(ld_cached(x + label)) : nan_f();
      if constexpr (kShiftMode >= 0) {
        st = accumulate_row<T, kShiftMode>(x, tid, tpr, n_v, inv_temperature);
      } else {  // logits are element-aligned (torch guarantees it): the shift is a multiple of the element size
        with_shift<sizeof(T)>(static_cast<int>(reinterpret_cast<uintptr_t>(x) & 15), [&](auto shift) {
          st = accumulate_row<T, decltype(shift)::value>(x, tid, tpr, n_v, inv_temperature);
        });
      }
    }
    st = warp_reduce_state(st);
    if (lane == 0) warp_states[threadIdx.x >> 5] = st;
    __syncthreads();
    if (valid && tid < 32) {  // the row group's first warp merges its warps' states
      SoftmaxState w = lane < warps_per_row ? warp_states[first_warp + lane] : state_empty();
      w = warp_reduce_state(w);
      if (lane == 0) {
        const bool finite = !isnan(w.t);  // ignored row: all four outputs 0 (its state stayed empty)
        const float log_norm = used ? logf(w.s) : 0.f;
        out_row_max[row] = used ? w.m : 0.f;
        out_log_norm[row] = log_norm;
        out_entropy[row] = !used ? 0.f : finite ? __fsub_rn(log_norm, __fdiv_rn(w.t, w.s)) : nan_f();
        // x_label is NaN for a label outside [0, V), and a non-finite row has w.t NaN: both give NaN.
        const float d_label = __fmaf_rn(x_label, inv_temperature, -w.m);
        out_logprobs[row] = !used ? 0.f : finite ? __fsub_rn(d_label, log_norm) : nan_f();
      }
    }
    __syncthreads();  // warp_states is rewritten by the next iteration
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward: elementwise over each row, one read of the logits and one write of the gradient.
// ---------------------------------------------------------------------------------------------------------------
struct GradRow {
  float m, log_norm, h, g_lp, g_h, inv_t;
  int label;  // -1 when the label is outside [0, V): no one-hot term
};

__device__ __forceinline__ float grad_elem(float x, int v, const GradRow& g) {
  // lp_v = (x_v inv_t - m) - log_norm, the first difference rounded once (fma) as in the forward.
  const float lp = __fsub_rn(__fmaf_rn(x, g.inv_t, -g.m), g.log_norm);
  const float p = exp_approx(lp);
  const float inner = __fmaf_rn(g.g_h, __fadd_rn(lp, g.h), g.g_lp);
  float gz = -__fmul_rn(p, inner);
  if (v == g.label) gz = __fadd_rn(gz, g.g_lp);
  return __fmul_rn(gz, g.inv_t);
}

// Loads full slot j of row x as a 16-byte vector (element i of the slot in unpack16 order): one streaming load
// when x is 16-byte aligned, else VEC scalar loads of the same elements.
template <typename T, bool kAligned>
__device__ __forceinline__ uint4 load_slot(const typename ElemTraits<T>::raw_t* x, int j) {
  return load16<T, kAligned>(x + j * ElemTraits<T>::kVec);
}

// Body of a gradient row: n_body 16-byte output slots ob[j * VEC ...], j = tid, tid + tpr, ..., with U slots in
// flight per thread. Input slots come from xb (16-byte loads when kInAligned, else scalar loads); element index
// v = v0 + j * VEC + i. kZero writes zeros without reading the input.
template <typename T, bool kZero, bool kInAligned>
__device__ __forceinline__ void grad_body(const typename ElemTraits<T>::raw_t* xb, typename ElemTraits<T>::raw_t* ob,
                                          int tid, int tpr, int n_body, int v0, const GradRow& g) {
  using Tr = ElemTraits<T>;
  using raw_t = typename Tr::raw_t;
  constexpr int VEC = Tr::kVec;
  constexpr int U = kLogprobsBwdUnroll;
  for (int j = tid; j < n_body; j += U * tpr) {
    uint4 v[U];
    if constexpr (!kZero) {
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (j + u * tpr < n_body) v[u] = load_slot<T, kInAligned>(xb, j + u * tpr);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int jj = j + u * tpr;
      if (jj < n_body) {
        raw_t r[VEC];
        if constexpr (kZero) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) r[i] = raw_t(0);
        } else {
          unpack16(v[u], r);
#pragma unroll
          for (int i = 0; i < VEC; ++i) r[i] = Tr::from_float(grad_elem(Tr::to_float(r[i]), v0 + jj * VEC + i, g));
        }
        st_stream16(ob + jj * VEC, pack16(r));
      }
    }
  }
}

// Gradient of row elements [0, V) into out (whose row start may be unaligned): scalar head up to the first
// 16-byte aligned output element, 16-byte vector stores over the body, scalar tail. Input slots use 16-byte
// loads when the input has the same alignment as the output, else scalar loads. kZero writes zeros only.
template <typename T, bool kZero>
__device__ __forceinline__ void grad_row(const typename ElemTraits<T>::raw_t* x, typename ElemTraits<T>::raw_t* out,
                                         int tid, int tpr, int n_v, const GradRow& g) {
  using Tr = ElemTraits<T>;
  using raw_t = typename Tr::raw_t;
  constexpr int VEC = Tr::kVec;
  const int mis = static_cast<int>((reinterpret_cast<uintptr_t>(out) & 15) / sizeof(raw_t));
  const int head = mis == 0 ? 0 : min(VEC - mis, n_v);
  const int n_body = (n_v - head) / VEC;
  const int tail_start = head + n_body * VEC;
  auto scalar = [&](int v) {
    out[v] = kZero ? raw_t(0) : Tr::from_float(grad_elem(Tr::to_float(ld_cached(x + v)), v, g));
  };
  if (tid < head) scalar(tid);
  if (tid < n_v - tail_start) scalar(tail_start + tid);
  if (kZero || (reinterpret_cast<uintptr_t>(x + head) & 15) == 0)
    grad_body<T, kZero, true>(x + head, out + head, tid, tpr, n_body, head, g);
  else
    grad_body<T, kZero, false>(x + head, out + head, tid, tpr, n_body, head, g);
}

template <typename T>
__global__ void __launch_bounds__(kLogprobsMaxThreadsPerRow, kLogprobsMinBlocksPerSm)
    logprobs_bwd_kernel(const T* __restrict__ logits, const int64_t* __restrict__ labels,
                        const float* __restrict__ grad_logprobs, const float* __restrict__ grad_entropy,
                        const float* __restrict__ row_max, const float* __restrict__ log_norm,
                        const float* __restrict__ entropy, T* __restrict__ grad_logits,
                        int64_t n_rows, int64_t n_t, int n_v, int64_t stride_b, int64_t stride_t,
                        float inv_temperature, int64_t ignore_index, int tpr, int rows_per_block) {
  using raw_t = typename ElemTraits<T>::raw_t;
  const int group = threadIdx.x / tpr;
  const int tid = threadIdx.x - group * tpr;
  const raw_t* base = reinterpret_cast<const raw_t*>(logits);
  raw_t* out_base = reinterpret_cast<raw_t*>(grad_logits);
  const int64_t n_blocks = (n_rows + rows_per_block - 1) / rows_per_block;

  // No block-level synchronisation here: a thread may skip rows freely.
  for (int64_t blk = blockIdx.x; blk < n_blocks; blk += gridDim.x) {
    const int64_t row = blk * rows_per_block + group;
    if (row >= n_rows) continue;
    const int64_t b = row / n_t;
    const raw_t* x = base + b * stride_b + (row - b * n_t) * stride_t;
    raw_t* out = out_base + row * n_v;
    const int64_t label = labels[row];
    GradRow g = {};
    if (label == ignore_index) {
      grad_row<T, true>(x, out, tid, tpr, n_v, g);  // ignored row: exact zeros, logits not read
      continue;
    }
    g.m = row_max[row];
    g.log_norm = log_norm[row];
    g.h = entropy[row];
    g.g_lp = grad_logprobs[row];
    g.g_h = grad_entropy[row];
    g.inv_t = inv_temperature;
    g.label = label >= 0 && label < n_v ? static_cast<int>(label) : -1;
    grad_row<T, false>(x, out, tid, tpr, n_v, g);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launchers. n_b * n_t == 0 launches nothing; V must be in [1, 2^30].
// ---------------------------------------------------------------------------------------------------------------
inline unsigned logprobs_grid(int64_t n_rows, int rows_per_block) {
  return capped_grid((n_rows + rows_per_block - 1) / rows_per_block);  // grid-stride covers the rest
}

template <typename T>
cudaError_t launch_logprobs_fwd(const T* logits, const int64_t* labels, float* logprobs, float* entropy,
                                float* row_max, float* log_norm, int64_t n_b, int64_t n_t, int64_t n_v,
                                int64_t stride_b, int64_t stride_t, float inv_temperature, int64_t ignore_index,
                                cudaStream_t stream) {
  const int64_t n_rows = n_b * n_t;
  if (n_rows <= 0) return cudaSuccess;
  if (n_v < 1 || n_v > kLogprobsMaxVocab) return cudaErrorInvalidValue;
  const RowLaunch rl = logprobs_row_launch(n_v, ElemTraits<T>::kVec);
  auto launch = [&](auto mode) {
    logprobs_fwd_kernel<T, decltype(mode)::value>
        <<<logprobs_grid(n_rows, rl.rows_per_block), rl.threads_per_row * rl.rows_per_block, 0, stream>>>(
            logits, labels, logprobs, entropy, row_max, log_norm, n_rows, n_t, static_cast<int>(n_v), stride_b,
            stride_t, inv_temperature, ignore_index, rl.threads_per_row, rl.rows_per_block);
  };
  const int shift = uniform_row_shift(logits, sizeof(T), n_b, n_t, stride_b, stride_t);
  if (shift < 0)
    launch(std::integral_constant<int, -1>{});
  else
    with_shift_host<sizeof(T)>(shift, launch);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_logprobs_bwd(const T* logits, const int64_t* labels, const float* grad_logprobs,
                                const float* grad_entropy, const float* row_max, const float* log_norm,
                                const float* entropy, T* grad_logits,
                                int64_t n_b, int64_t n_t, int64_t n_v, int64_t stride_b, int64_t stride_t,
                                float inv_temperature, int64_t ignore_index, cudaStream_t stream) {
  const int64_t n_rows = n_b * n_t;
  if (n_rows <= 0) return cudaSuccess;
  if (n_v < 1 || n_v > kLogprobsMaxVocab) return cudaErrorInvalidValue;
  const RowLaunch rl = logprobs_row_launch(n_v, ElemTraits<T>::kVec);
  logprobs_bwd_kernel<T><<<logprobs_grid(n_rows, rl.rows_per_block), rl.threads_per_row * rl.rows_per_block, 0,
                           stream>>>(logits, labels, grad_logprobs, grad_entropy, row_max, log_norm, entropy,
                                     grad_logits, n_rows, n_t, static_cast<int>(n_v), stride_b, stride_t,
                                     inv_temperature, ignore_index, rl.threads_per_row, rl.rows_per_block);
  return cudaGetLastError();
}

// Explicit instantiations for the three element types (this header is included by logprobs.cu only).
#define RLHF_LOGPROBS_INSTANTIATE(T)                                                                             \
  template cudaError_t launch_logprobs_fwd<T>(const T*, const int64_t*, float*, float*, float*, float*, int64_t, \
                                              int64_t, int64_t, int64_t, int64_t, float, int64_t, cudaStream_t); \
  template cudaError_t launch_logprobs_bwd<T>(const T*, const int64_t*, const float*, const float*, const float*, \
                                              const float*, const float*, T*, int64_t, int64_t, int64_t, int64_t, \
                                              int64_t, float, int64_t, cudaStream_t);

RLHF_LOGPROBS_INSTANTIATE(float)
RLHF_LOGPROBS_INSTANTIATE(__nv_bfloat16)
RLHF_LOGPROBS_INSTANTIATE(__half)

#undef RLHF_LOGPROBS_INSTANTIATE

}  // namespace rlhf_cuda

#endif  // RLHF_CUDA_LOGPROBS_CUH_
