// Fused token log-probabilities + entropy (forward) and their gradient (backward) over a vocabulary.
//
// Torch-free: raw pointers, sizes and strides in, cudaError_t out. The binding is csrc/cuda/logprobs.cu.
//
// Layout: logits (B, T, V) with element stride 1 along V and arbitrary int64 strides for B and T; labels (B, T)
// int64 contiguous; per-row fp32 tensors (B, T) contiguous; the gradient is a contiguous (B, T, V) tensor.
// Row r = b * T + t starts at logits + b * stride_b + t * stride_t.
//
// Forward, per row, with z_v = x_v * inv_temperature (one fp32 rounding), m = max_v z_v, d_v = z_v - m:
//   s = sum_v e^{d_v}, t = sum_v e^{d_v} d_v;  row_max = m, log_norm = log s,
//   logprob = (z_label - m) - log_norm,  entropy = log_norm - t / s.
// The log-sum-exp m + log s is never formed: rounding it to fp32 would cost ulp(|m + log s|) of absolute error
// in every log-prob and every p of the backward (large for logits of a few hundred). Every exponential is one
// ex2.approx of the small difference d * log2(e) (exp_approx), never of z and m prescaled separately.
// Special rows: label == ignore_index -> the row is not read, logprob = entropy = row_max = log_norm = 0 (the op
// table's convention, rlhf_kernels/_registry.py); label outside [0, V) -> logprob = NaN; a NaN or +-inf logit
// makes the row's entropy sum t NaN -> logprob = entropy = NaN.
//
// Backward, per element: lp_v = (z_v - m) - log_norm (in this order), p_v = e^{lp_v},
//   g_z = -p_v (g_lp + g_H (lp_v + H)) + [v == label] g_lp,  grad = g_z * inv_temperature.
//
// Work split (the "launch rule", a function of V and the element size only, see logprobs_row_launch):
//   threads_per_row (tpr) = smallest power of two in [32, 512] with tpr * 8 >= ceil(V / VEC), VEC = 16 / sizeof(T);
//   rows_per_block = max(1, 128 / tpr); block = tpr * rows_per_block; 1-D grid over row groups (grid-stride).
//
// Batch invariance of the forward: the row is cut into "slots" of VEC consecutive elements, slot j covering
// [j * VEC, min(j * VEC + VEC, V)). Slot j belongs to thread j % tpr of the row's group, and each thread folds
// its slots into its running state in increasing j, one slot at a time, with the same arithmetic whether the
// slot was fetched by one 16-byte load (row start 16-byte aligned) or by VEC scalar loads (any other
// alignment). The 32 lanes of a warp are then merged by a fixed shuffle tree, and the tpr / 32 warps of the row
// by a second fixed shuffle tree. All arithmetic uses explicitly rounded intrinsics (no contraction left to the
// compiler) and ex2.approx, so a row's outputs are bitwise functions of (its contents, V, dtype,
// inv_temperature, ignore_index) only: not of B, T, strides, alignment or neighbouring rows.
#ifndef RLHF_CUDA_LOGPROBS_CUH_
#define RLHF_CUDA_LOGPROBS_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace rlhf_cuda {

inline constexpr int kLogprobsMaxThreadsPerRow = 512;      // also the largest block
inline constexpr int kLogprobsMinBlock = 128;              // small rows are packed until a block has this many threads
inline constexpr int kLogprobsSlotsPerThread = 8;          // tpr grows until each thread has at most this many slots
inline constexpr int kLogprobsUnroll = 4;                  // 16-byte loads in flight per thread
// Caps registers at 64 so that two 512-thread blocks fit per SM (unconstrained, ptxas takes ~78 for the forward,
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

// Folds one slot (n <= VEC valid values z[0..n)) into st: slot maximum, at most one rescale, one ex2 per element.
template <int VEC>
__device__ __forceinline__ void state_add_slot(SoftmaxState& st, const float (&z)[VEC], int n) {
  float cm = neg_inf_f();
#pragma unroll
  for (int i = 0; i < VEC; ++i)
    if (i < n) cm = fmaxf(cm, z[i]);
  if (cm > st.m) {  // false when cm is NaN (all-NaN slot): the NaN then reaches s and t below
    if (!state_is_empty(st)) {
      // Re-base (s, t) from st.m to cm: t' = a (t + dm s), s' = a s with a = e^dm, dm = m - cm < 0.
      // cm = +inf gives a = 0 and dm = -inf, hence t' = 0 * (-inf) = NaN: rows with +inf stay NaN.
      const float dm = __fsub_rn(st.m, cm);
      const float a = exp_approx(dm);
      st.t = __fmul_rn(a, __fmaf_rn(dm, st.s, st.t));
      st.s = __fmul_rn(st.s, a);
    }
    st.m = cm;
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    if (i < n) {
      const float d = __fsub_rn(z[i], st.m);  // -inf for a -inf logit -> e = 0, e * d = NaN (by design)
      const float e = exp_approx(d);
      st.s = __fadd_rn(st.s, e);
      st.t = __fmaf_rn(e, d, st.t);
    }
  }
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

// Loads full slot j of row x as a 16-byte vector (element i of the slot in unpack16 order): one streaming load
// when the row start is 16-byte aligned (then every full slot is), else VEC scalar loads of the same elements.
template <typename T, bool kAligned>
__device__ __forceinline__ uint4 load_slot(const typename ElemTraits<T>::raw_t* x, int j) {
  return load16<T, kAligned>(x + j * ElemTraits<T>::kVec);
}

// z[i] = float(element i of slot v) * inv_t, the scaled logits of one full slot.
template <typename T>
__device__ __forceinline__ void slot_to_z(const uint4& v, float inv_t, float (&z)[ElemTraits<T>::kVec]) {
  using Tr = ElemTraits<T>;
  typename Tr::raw_t raw[Tr::kVec];
  unpack16(v, raw);
#pragma unroll
  for (int i = 0; i < Tr::kVec; ++i) z[i] = __fmul_rn(Tr::to_float(raw[i]), inv_t);
}

// Folds this thread's slots of row x (slots tid, tid + tpr, ... in increasing order) into st.
template <typename T, bool kAligned>
__device__ __forceinline__ void accumulate_row(const typename ElemTraits<T>::raw_t* x, int tid, int tpr, int n_v,
                                               float inv_t, SoftmaxState& st) {
  using Tr = ElemTraits<T>;
  constexpr int VEC = Tr::kVec;
  constexpr int U = kLogprobsUnroll;
  const int n_full = n_v / VEC;  // slots with VEC elements; slot n_full (if V % VEC != 0) is partial
  int j = tid;
  for (; j + (U - 1) * tpr < n_full; j += U * tpr) {  // U loads issued before any arithmetic
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = load_slot<T, kAligned>(x, j + u * tpr);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float z[VEC];
      slot_to_z<T>(v[u], inv_t, z);
      state_add_slot(st, z, VEC);
    }
  }
  for (; j < n_full; j += tpr) {
    float z[VEC];
    slot_to_z<T>(load_slot<T, kAligned>(x, j), inv_t, z);
    state_add_slot(st, z, VEC);
  }
  const int n_tail = n_v - n_full * VEC;
  if (n_tail > 0 && j == n_full) {  // this thread owns the partial last slot: scalar loads on both paths
    float z[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i)
      z[i] = i < n_tail ? __fmul_rn(Tr::to_float(ld_cached(x + n_full * VEC + i)), inv_t) : 0.f;
    state_add_slot(st, z, n_tail);
  }
}

template <typename T>
__global__ void __launch_bounds__(kLogprobsMaxThreadsPerRow, kLogprobsMinBlocksPerSm)
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
    const int64_t label = valid ? labels[row] : ignore_index;
    const bool used = label != ignore_index;
    float z_label = 0.f;
    if (used) {
      const int64_t b = row / n_t;
      const raw_t* x = base + b * stride_b + (row - b * n_t) * stride_t;
      if (tid == 0 && label >= 0 && label < n_v)  // the thread that writes the outputs reads the label's logit early
        z_label = __fmul_rn(Tr::to_float(ld_cached(x + label)), inv_temperature);
      if ((reinterpret_cast<uintptr_t>(x) & 15) == 0)
        accumulate_row<T, true>(x, tid, tpr, n_v, inv_temperature, st);
      else
        accumulate_row<T, false>(x, tid, tpr, n_v, inv_temperature, st);
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
        const bool lp_ok = used && finite && label >= 0 && label < n_v;  // else NaN, or 0 for an ignored row
        out_logprobs[row] = lp_ok ? __fsub_rn(__fsub_rn(z_label, w.m), log_norm) : used ? nan_f() : 0.f;
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
  // lp_v = (z_v - m) - log_norm: z_v rounded as in the forward, z_v - m exact near the top of the row.
  const float lp = __fsub_rn(__fsub_rn(__fmul_rn(x, g.inv_t), g.m), g.log_norm);
  const float p = exp_approx(lp);
  const float inner = __fmaf_rn(g.g_h, __fadd_rn(lp, g.h), g.g_lp);
  float gz = -__fmul_rn(p, inner);
  if (v == g.label) gz = __fadd_rn(gz, g.g_lp);
  return __fmul_rn(gz, g.inv_t);
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
  constexpr int U = kLogprobsUnroll;
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
  logprobs_fwd_kernel<T><<<logprobs_grid(n_rows, rl.rows_per_block), rl.threads_per_row * rl.rows_per_block, 0,
                           stream>>>(logits, labels, logprobs, entropy, row_max, log_norm, n_rows, n_t,
                                     static_cast<int>(n_v), stride_b, stride_t, inv_temperature, ignore_index,
                                     rl.threads_per_row, rl.rows_per_block);
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
