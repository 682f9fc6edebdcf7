// Gradient of the exact per-token KL with respect to the policy logits (the math, layout and launch rule are
// described in kl.cuh, which also holds the forward). Torch-free; the binding is csrc/cuda/kl.cu.
#ifndef RLHF_CUDA_KL_BWD_CUH_
#define RLHF_CUDA_KL_BWD_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "kl.cuh"

namespace rlhf_cuda {

// ---------------------------------------------------------------------------------------------------------------
// Backward: elementwise, one read of each source row and one write of the gradient row.
// ---------------------------------------------------------------------------------------------------------------
struct KlGradRow {
  float m_p, log_norm_p;  // statistics of z (policy)
  float m_q, log_norm_q;  // statistics of w (reference)
  float g, kl, inv_t;
};

// Gradient element from the scaled logits z (policy) and w (reference), both rounded as in the forward.
template <bool kReverse>
__device__ __forceinline__ float kl_grad_elem(float z, float w, const KlGradRow& r) {
  const float lp = __fsub_rn(__fsub_rn(z, r.m_p), r.log_norm_p);
  const float lq = __fsub_rn(__fsub_rn(w, r.m_q), r.log_norm_q);
  const float p = exp_approx(lp);
  float gz;
  if constexpr (kReverse)  // d KL(p || q) / dz = p ((lp - lq) - KL)
    gz = __fmul_rn(__fmul_rn(r.g, p), __fsub_rn(__fsub_rn(lp, lq), r.kl));
  else  // d KL(q || p) / dz = p - q
    gz = __fmul_rn(r.g, __fsub_rn(p, exp_approx(lq)));
  return __fmul_rn(gz, r.inv_t);
}

// Gradient of body slots j = j_begin + tid + k * tpr < j_end of one row, U slots in flight. x, y, out point at
// the first body element; out is 16-byte aligned (vector stores), x / y are read by vector loads when kAlX /
// kAlY, else scalar loads. kZero writes zeros without reading x or y.
template <typename TL, typename TR, bool kReverse, bool kZero, bool kAlX, bool kAlY>
__device__ __forceinline__ void kl_grad_slots(const typename ElemTraits<TL>::raw_t* x,
                                              const typename ElemTraits<TR>::raw_t* y,
                                              typename ElemTraits<TL>::raw_t* out, int j_begin, int j_end, int tid,
                                              int tpr, const KlGradRow& g) {
  using Tr = ElemTraits<TL>;
  constexpr int VEC = Tr::kVec;
  constexpr int NX = kKlVecsPerSlot<TL>;
  constexpr int U = kKlUnroll<TL, TR>;
  for (int j0 = j_begin + tid; j0 < j_end; j0 += U * tpr) {
    uint4 vx[U][NX], vy[U][kKlVecsPerSlot<TR>];
    if constexpr (!kZero) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = j0 + u * tpr;
        if (j < j_end) {
          kl_load_slot<TL, kAlX>(x, j, vx[u]);
          kl_load_slot<TR, kAlY>(y, j, vy[u]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * tpr;
      if (j >= j_end) continue;
      uint4 o[NX];
      if constexpr (kZero) {
#pragma unroll
        for (int k = 0; k < NX; ++k) o[k] = make_uint4(0u, 0u, 0u, 0u);
      } else {
        float z[kKlSlot], w[kKlSlot];
        kl_slot_scaled<TL>(vx[u], g.inv_t, z);
        kl_slot_scaled<TR>(vy[u], g.inv_t, w);
#pragma unroll
        for (int k = 0; k < NX; ++k) {
          typename Tr::raw_t r[VEC];
#pragma unroll
          for (int i = 0; i < VEC; ++i)
            r[i] = Tr::from_float(kl_grad_elem<kReverse>(z[k * VEC + i], w[k * VEC + i], g));
          o[k] = pack16(r);
        }
      }
#pragma unroll
      for (int k = 0; k < NX; ++k) st_stream16(out + j * kKlSlot + k * VEC, o[k]);
    }
  }
}

// Body slots per chunk (the backward's grid x unit): kKlBwdBatches batches of U slots for each of tpr threads.
template <typename TL, typename TR>
__host__ __device__ __forceinline__ int kl_bwd_chunk_slots(int tpr) {
  return tpr * kKlUnroll<TL, TR> * kKlBwdBatches;
}

template <typename TL, typename TR, bool kReverse>
__global__ void __launch_bounds__(kKlMaxThreadsPerRow, kKlMinBlocksPerSm)
    kl_bwd_kernel(KlInput<TL> logits, KlInput<TR> ref, const uint8_t* __restrict__ mask,
                  const float* __restrict__ grad_kl, const float* __restrict__ row_max,
                  const float* __restrict__ log_norm, const float* __restrict__ ref_row_max,
                  const float* __restrict__ ref_log_norm, const float* __restrict__ kl, TL* __restrict__ grad_logits,
                  int64_t n_rows, int n_v, float inv_t, int tpr, int rows_per_block) {
  using TrL = ElemTraits<TL>;
  using raw_l = typename TrL::raw_t;
  using raw_r = typename ElemTraits<TR>::raw_t;
  constexpr int VEC = TrL::kVec;
  const int group = threadIdx.x / tpr;
  const int tid = threadIdx.x - group * tpr;
  const int chunk_slots = kl_bwd_chunk_slots<TL, TR>(tpr);
  const int j_begin = static_cast<int>(blockIdx.x) * chunk_slots;  // this block's body slots: [j_begin, +chunk_slots)
  const bool first_chunk = blockIdx.x == 0;                         // also writes the scalar head and tail
  raw_l* out_base = reinterpret_cast<raw_l*>(grad_logits);
  const int64_t n_groups = (n_rows + rows_per_block - 1) / rows_per_block;

  // No block-level synchronisation here: a thread may skip rows freely.
  for (int64_t grp = blockIdx.y; grp < n_groups; grp += gridDim.y) {
    const int64_t row = grp * rows_per_block + group;
    if (row >= n_rows) continue;
    raw_l* out = out_base + row * n_v;
    // Head: elements before the first 16-byte aligned output element; body: n_body full slots; tail: the rest.
    const int mis = static_cast<int>((reinterpret_cast<uintptr_t>(out) & 15) / sizeof(raw_l));
    const int head = mis == 0 ? 0 : min(VEC - mis, n_v);
    const int n_body = (n_v - head) / kKlSlot;
    const int tail_start = head + n_body * kKlSlot;
    const int n_tail = n_v - tail_start;
    const int j_end = min(n_body, j_begin + chunk_slots);
    if (mask != nullptr && mask[row] == 0) {  // masked row: zeros, inputs not read
      if (first_chunk) {
        if (tid < head) out[tid] = raw_l(0);
        if (tid < n_tail) out[tail_start + tid] = raw_l(0);
      }
      kl_grad_slots<TL, TR, kReverse, true, true, true>(nullptr, nullptr, out + head, j_begin, j_end, tid, tpr,
                                                        KlGradRow{});
      continue;
    }
    const raw_l* x = kl_row_ptr(logits, row);
    const raw_r* y = kl_row_ptr(ref, row);
    const KlGradRow g = {row_max[row], log_norm[row], ref_row_max[row], ref_log_norm[row], grad_kl[row], kl[row],
                         inv_t};
    if (first_chunk) {
      auto scalar = [&](int v) {
        const float z = __fmul_rn(TrL::to_float(ld_cached(x + v)), inv_t);
        const float w = __fmul_rn(ElemTraits<TR>::to_float(ld_cached(y + v)), inv_t);
        out[v] = TrL::from_float(kl_grad_elem<kReverse>(z, w, g));
      };
      if (tid < head) scalar(tid);
      if (tid < n_tail) scalar(tail_start + tid);
    }
    x += head;
    y += head;
    out += head;
    const bool al_x = is_aligned16(x), al_y = is_aligned16(y);
    if (al_x && al_y)
      kl_grad_slots<TL, TR, kReverse, false, true, true>(x, y, out, j_begin, j_end, tid, tpr, g);
    else if (al_x)
      kl_grad_slots<TL, TR, kReverse, false, true, false>(x, y, out, j_begin, j_end, tid, tpr, g);
    else if (al_y)
      kl_grad_slots<TL, TR, kReverse, false, false, true>(x, y, out, j_begin, j_end, tid, tpr, g);
    else
      kl_grad_slots<TL, TR, kReverse, false, false, false>(x, y, out, j_begin, j_end, tid, tpr, g);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward launcher. n_rows == 0 launches nothing; V must be in [1, 2^30].
// ---------------------------------------------------------------------------------------------------------------

// grad_logits: contiguous (n_rows, V) of type TL. The per-row inputs are fp32 (n_rows,) as returned by kl_fwd.
template <typename TL, typename TR>
cudaError_t launch_kl_bwd(KlInput<TL> logits, KlInput<TR> ref, const uint8_t* mask, const float* grad_kl,
                          const float* row_max, const float* log_norm, const float* ref_row_max,
                          const float* ref_log_norm, const float* kl, TL* grad_logits, int64_t n_rows, int64_t n_v,
                          float inv_t, bool reverse, cudaStream_t stream) {
  if (n_rows <= 0) return cudaSuccess;
  if (n_v < 1 || n_v > kKlMaxVocab) return cudaErrorInvalidValue;
  const RowLaunch rl = kl_row_launch(n_v);
  const int64_t chunk_slots = kl_bwd_chunk_slots<TL, TR>(rl.threads_per_row);
  const int64_t max_body = n_v / kKlSlot;  // body slots of a row with an aligned output start (the most)
  const int64_t n_chunks = max_body > 0 ? (max_body + chunk_slots - 1) / chunk_slots : 1;
  const int64_t n_groups = (n_rows + rl.rows_per_block - 1) / rl.rows_per_block;
  const dim3 grid(static_cast<unsigned>(n_chunks), static_cast<unsigned>(n_groups < 65535 ? n_groups : 65535));
  const unsigned block = rl.threads_per_row * rl.rows_per_block;
  if (reverse)
    kl_bwd_kernel<TL, TR, true><<<grid, block, 0, stream>>>(logits, ref, mask, grad_kl, row_max, log_norm,
                                                            ref_row_max, ref_log_norm, kl, grad_logits, n_rows,
                                                            static_cast<int>(n_v), inv_t, rl.threads_per_row,
                                                            rl.rows_per_block);
  else
    kl_bwd_kernel<TL, TR, false><<<grid, block, 0, stream>>>(logits, ref, mask, grad_kl, row_max, log_norm,
                                                             ref_row_max, ref_log_norm, kl, grad_logits, n_rows,
                                                             static_cast<int>(n_v), inv_t, rl.threads_per_row,
                                                             rl.rows_per_block);
  return cudaGetLastError();
}

// Explicit instantiations for the 3 x 3 element-type pairs (this header is included by kl.cu only).
#define RLHF_KL_BWD_INSTANTIATE(TL, TR)                                                                              \
  template cudaError_t launch_kl_bwd<TL, TR>(KlInput<TL>, KlInput<TR>, const uint8_t*, const float*, const float*, \
                                             const float*, const float*, const float*, const float*, TL*, int64_t,  \
                                             int64_t, float, bool, cudaStream_t);
RLHF_KL_FOR_EACH_PAIR(RLHF_KL_BWD_INSTANTIATE)
#undef RLHF_KL_BWD_INSTANTIATE

}  // namespace rlhf_cuda

#endif  // RLHF_CUDA_KL_BWD_CUH_
