// CPU implementation of gae_fwd (contract in the op table, rlhf_kernels/_registry.py): masked generalised
// advantage estimation.
//
// Per row, backwards over t with next_value = acc = 0 (fp32):
//   mask[t]:  acc = (r_t + gamma next_value - V_t) + gamma lam acc,  next_value = V_t
//   else:     both carry;      advantages[t] = acc,  returns[t] = acc + V_t
// and, in the same pass, the row's count, mean and M2 (sum of squared deviations from the row mean) of the
// advantages at masked positions, from shifted sums. Whitening over the batch merges these.
//
// Each row is one serial chain (a multiply-add and a select per step), and one row at a time leaves a core
// waiting on that chain's latency. So on AVX-512 / AVX2 machines G rows run side by side, one per vector lane
// (G = 16 / 8 fp32 lanes), in tiles of G steps transposed in registers (lane_tile.h). Every lane performs the
// operations of the one-row kernel GaeKernel in its order (FMA where that uses madd<true>, the same selects,
// the same fp64 statistics), so each row's results are bitwise the same whichever path, group, batch size or
// thread count handles it; the rows left over (B % G) and the generic build run GaeKernel itself. Threads take
// whole groups of rows (at::parallel_for). A parallel scan along t would do more arithmetic for no gain.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off", "no-trapping-math")
#pragma GCC diagnostic ignored "-Wpsabi"  // the lane vectors only pass between inlined functions (lane_tile.h)
#endif

#include "lane_tile.h"
#include "row_kernel.h"

namespace rlhf_cpu {
namespace {

template <typename T>
struct GaeArgs {
  const T* rewards;
  const T* values;
  const bool* mask;
  float* adv;
  float* ret;
  float* stats;
  int64_t T_;
  float gamma, gamma_lam;
};

// A row's (count, mean, M2) from its count and the fp64 sums of (adv - shift) and their squares.
// (m2 > 0 ? m2 : 0 is std::max(0.0, m2), NaN included, written out: GCC outlines std::max into a function
// compiled for the generic target, and calling that from AVX-512 code costs a state transition per row.)
RLHF_INLINE void store_row_stats(float* out, int64_t count, double shift, double s1, double s2) {
  const double mean_shifted = count > 0 ? s1 / static_cast<double>(count) : 0.0;
  const double m2 = s2 - s1 * mean_shifted;
  out[0] = static_cast<float>(count);
  out[1] = count > 0 ? static_cast<float>(shift + mean_shifted) : 0.0f;
  out[2] = count > 0 ? static_cast<float>(m2 > 0.0 ? m2 : 0.0) : 0.0f;
}

// One row at a time: the reference order of operations, which the lane-parallel path below repeats per lane.
template <typename T>
struct GaeKernel {
  template <bool kFma>
  static RLHF_INLINE void rows(const GaeArgs<T>& p, int64_t r0, int64_t r1) {
    const int64_t T_ = p.T_;
    for (int64_t row = r0; row < r1; ++row) {
      const T* r = p.rewards + row * T_;
      const T* v = p.values + row * T_;
      const bool* m = p.mask + row * T_;
      float* a = p.adv + row * T_;
      float* rt = p.ret + row * T_;
      float acc = 0.0f, next_value = 0.0f;
      // Count, and fp64 sums of (adv - shift) and its square with shift = the row's first advantage: shifted
      // fp64 sums keep mean and M2 accurate to fp32 rounding, in the same pass and off the recursion's chain.
      float shift = 0.0f;
      double s1 = 0.0, s2 = 0.0;
      int64_t count = 0;
      for (int64_t t = T_ - 1; t >= 0; --t) {  // the serial chain is one multiply-add and one select per step
        const float vt = to_float(v[t]);
        const float delta = madd<kFma>(p.gamma, next_value, to_float(r[t])) - vt;
        const float cand = madd<kFma>(p.gamma_lam, acc, delta);
        const bool keep = m[t];
        acc = keep ? cand : acc;
        next_value = keep ? vt : next_value;
        a[t] = acc;
        rt[t] = acc + vt;
        shift = count == 0 ? acc : shift;
        const double d = keep ? static_cast<double>(acc) - shift : 0.0;
        s1 += d;
        s2 += d * d;
        count += keep;
      }
      store_row_stats(p.stats + row * 3, count, shift, s1, s2);
    }
  }
};

#if RLHF_LANE_TILES
// The G rows of a group are walked backwards in tiles of G steps: load G x G of rewards, values and mask,
// transpose, run the G steps lane-parallel, transpose the advantages back and store them with the returns.
template <int G>
struct LaneState {
  using D = typename Lanes<G>::D;
  typename Lanes<G>::F acc, next_value;
  typename Lanes<G>::I count;  // masked steps so far (the dispatcher keeps T below 2^31)
  // fp64 statistics for lanes [0, G / 2) and [G / 2, G); shift widened to fp64 as GaeKernel does when it
  // forms acc - shift.
  D shift[2], s1[2], s2[2];
};

// The statistics of step j for the lanes of half kHalf, with shift as it was at the start of the tile. That is
// exact for lanes with a masked step before the tile (GaeKernel's shift only changes up to a row's first
// masked step); lanes whose first masked step falls in this tile are redone by replay_first_steps.
template <int kHalf, int j, int G>
RLHF_INLINE void stats_step(LaneState<G>& s, const typename Lanes<G>::U* flags, typename Lanes<G>::F acc) {
  using D = typename Lanes<G>::D;
  using L = typename Lanes<G>::L;
  const D d = reinterpret_cast<D>(reinterpret_cast<L>(widen_half<kHalf, G>(acc) - s.shift[kHalf]) &
                                  flag_half_lanes<kHalf, G>(flags, j));
  s.s1[kHalf] += d;
  s.s2[kHalf] += d * d;
}

// Step j of a tile, for every lane.
template <int j, int G, bool kFma>
RLHF_INLINE void lane_step(LaneState<G>& s, const typename Lanes<G>::F* rt, const typename Lanes<G>::F* vt,
                           const typename Lanes<G>::U* flags, typename Lanes<G>::F g, typename Lanes<G>::F gl,
                           typename Lanes<G>::F* at) {
  using F = typename Lanes<G>::F;
  const auto keep = flag_lanes<G>(flags, j);
  const F delta = lanes_madd<G, kFma>(g, s.next_value, rt[j]) - vt[j];
  const F cand = lanes_madd<G, kFma>(gl, s.acc, delta);
  s.acc = select_lanes(keep, cand, s.acc);
  s.next_value = select_lanes(keep, vt[j], s.next_value);
  at[j] = s.acc;
  stats_step<0, j>(s, flags, s.acc);
  stats_step<1, j>(s, flags, s.acc);
  s.count -= keep;  // keep is -1 in the masked lanes
}

// Lanes without a masked step before this tile (count 0: s1 = s2 = +0.0, shift +0.0) that have one in it:
// their statistics for the tile again, in GaeKernel's scalar order, where shift is set at the first one.
template <int G>
RLHF_INLINE void replay_first_steps(LaneState<G>& s, const typename Lanes<G>::I& count0,
                                    const typename Lanes<G>::F* at, const typename Lanes<G>::U* flags) {
  for (int i = 0; i < G; ++i) {
    if (count0[i] != 0 || s.count[i] == 0) continue;
    float shift = 0.0f;
    double s1 = 0.0, s2 = 0.0;
    int64_t count = 0;
    for (int j = G - 1; j >= 0; --j) {
      const float acc = at[j][i];
      const bool keep = (flags[j / 4][i] >> (8 * (j % 4))) & 1u;
      shift = count == 0 ? acc : shift;
      const double d = keep ? static_cast<double>(acc) - shift : 0.0;
      s1 += d;
      s2 += d * d;
      count += keep;
    }
    const int h = i / (G / 2), l = i % (G / 2);
    s.shift[h][l] = shift;
    s.s1[h][l] = s1;
    s.s2[h][l] = s2;
  }
}

// Steps G - 1, ..., 0 of a tile, unrolled (j a constant in each: the flag tests fold).
template <int G, bool kFma, int... J>
RLHF_INLINE void lane_steps(LaneState<G>& s, const typename Lanes<G>::F* rt, const typename Lanes<G>::F* vt,
                            const typename Lanes<G>::U* flags, typename Lanes<G>::F g, typename Lanes<G>::F gl,
                            typename Lanes<G>::F* at, std::integer_sequence<int, J...>) {
  (lane_step<G - 1 - J, G, kFma>(s, rt, vt, flags, g, gl, at), ...);
}

// A tile's inputs, transposed: r[j], v[j] and the flags of step j for every lane.
template <int G>
struct TileIn {
  typename Lanes<G>::F r[G], v[G];
  typename Lanes<G>::U flags[4];  // [G / 4, 4): padding of load_flag_tile for G = 8
};

// Steps [0, rem) of a group's rows (rem = T % G, done last), copied into a G x G tile whose steps [rem, G) are
// unmasked zeros. Those come first in the backward walk and change nothing: acc and next_value carry, s1 and
// s2 add +0.0 (they are never -0.0), count stays, and a lane with no masked step yet still has shift = +0.0.
template <int G, typename T>
struct TileTail {
  T r[G * G] = {}, v[G * G] = {};
  bool m[G * G] = {};
  float adv[G * G], ret[G * G];
};

// Tile k of the group at row0: steps [T - (k + 1) G, T - k G) for k < T / G, then the tail.
template <int G, typename T>
RLHF_INLINE void load_tile_in(TileIn<G>& x, const GaeArgs<T>& p, int64_t row0, const TileTail<G, T>& tail,
                              int64_t k) {
  if (k < p.T_ / G) {
    const int64_t o = row0 * p.T_ + p.T_ - (k + 1) * G;
    load_tile<G>(p.rewards + o, p.T_, x.r);
    load_tile<G>(p.values + o, p.T_, x.v);
    load_flag_tile<G>(p.mask + o, p.T_, x.flags);
  } else {
    load_tile<G>(tail.r, G, x.r);
    load_tile<G>(tail.v, G, x.v);
    load_flag_tile<G>(tail.m, G, x.flags);
  }
}

// Runs tile k, stores its advantages and returns (returns from values reloaded row by row).
template <int G, bool kFma, typename T>
RLHF_INLINE void run_tile(LaneState<G>& s, const TileIn<G>& x, const GaeArgs<T>& p, int64_t row0,
                          TileTail<G, T>& tail, int64_t k) {
  using F = typename Lanes<G>::F;
  const bool full = k < p.T_ / G;
  const int64_t o = row0 * p.T_ + p.T_ - (k + 1) * G;
  const T* v = full ? p.values + o : tail.v;
  float* adv = full ? p.adv + o : tail.adv;
  float* ret = full ? p.ret + o : tail.ret;
  const int64_t ld = full ? p.T_ : G;
  const F g = F{} + p.gamma, gl = F{} + p.gamma_lam;
  const typename Lanes<G>::I count0 = s.count;
  F at[G];
  lane_steps<G, kFma>(s, x.r, x.v, x.flags, g, gl, at, std::make_integer_sequence<int, G>{});
  replay_first_steps(s, count0, at, x.flags);
  transpose<G>(at);
  for (int i = 0; i < G; ++i) {
    store_lanes<G>(adv + i * ld, at[i]);
    store_lanes<G>(ret + i * ld, at[i] + load_lanes<G>(v + i * ld));
  }
}

// Rows [row0, row0 + G). The loads and transposes of tile k + 1 are issued before the steps of tile k, so that
// their cache misses overlap with its arithmetic.
template <int G, bool kFma, typename T>
RLHF_INLINE void lane_group(const GaeArgs<T>& p, int64_t row0) {
  const int64_t T_ = p.T_, rem = T_ % G, tiles = T_ / G + (rem > 0);
  TileTail<G, T> tail;
  for (int i = 0; i < G && rem > 0; ++i) {
    std::memcpy(tail.r + i * G, p.rewards + (row0 + i) * T_, rem * sizeof(T));
    std::memcpy(tail.v + i * G, p.values + (row0 + i) * T_, rem * sizeof(T));
    std::memcpy(tail.m + i * G, p.mask + (row0 + i) * T_, rem * sizeof(bool));
  }
  LaneState<G> s = {};
  TileIn<G> in[2];
  load_tile_in(in[0], p, row0, tail, 0);
  for (int64_t k = 0; k < tiles; ++k) {
    if (k + 1 < tiles) load_tile_in(in[(k + 1) & 1], p, row0, tail, k + 1);
    run_tile<G, kFma>(s, in[k & 1], p, row0, tail, k);
  }
  for (int i = 0; i < G && rem > 0; ++i) {
    std::memcpy(p.adv + (row0 + i) * T_, tail.adv + i * G, rem * sizeof(float));
    std::memcpy(p.ret + (row0 + i) * T_, tail.ret + i * G, rem * sizeof(float));
  }
  for (int i = 0; i < G; ++i) {
    const int h = i / (G / 2), l = i % (G / 2);
    store_row_stats(p.stats + (row0 + i) * 3, s.count[i], s.shift[h][l], s.s1[h][l], s.s2[h][l]);
  }
}

// Rows [r0, r1): groups of G rows lane-parallel, the rest one at a time.
template <int G, bool kFma, typename T>
RLHF_INLINE void gae_rows(const GaeArgs<T>& p, int64_t r0, int64_t r1) {
  for (; r0 + G <= r1; r0 += G) lane_group<G, kFma>(p, r0);
  GaeKernel<T>::template rows<kFma>(p, r0, r1);
}

// The ISA variants, as run_rows (row_kernel.h) makes them but with the lane count: 16 fp32 lanes in AVX-512,
// 8 in AVX2.
template <typename T>
RLHF_TARGET_AVX512 void gae_rows_avx512(const GaeArgs<T>& p, int64_t r0, int64_t r1) {
  gae_rows<16, true>(p, r0, r1);
}
template <typename T>
RLHF_TARGET_AVX2 void gae_rows_avx2(const GaeArgs<T>& p, int64_t r0, int64_t r1) {
  gae_rows<8, true>(p, r0, r1);
}
#endif

template <typename T>
void gae_fwd_rows(const GaeArgs<T>& p, int64_t B) {
  using Fn = void (*)(const GaeArgs<T>&, int64_t, int64_t);
  Fn fn = run_rows<GaeKernel<T>, GaeArgs<T>>;
  int64_t lanes = 1;
#if RLHF_LANE_TILES
  if (p.T_ < (int64_t{1} << 31)) {  // the lanes count masked steps in int32
    if (cpu_isa() == CpuIsa::kAvx512) fn = gae_rows_avx512<T>, lanes = 16;
    if (cpu_isa() == CpuIsa::kAvx2) fn = gae_rows_avx2<T>, lanes = 8;
  }
#endif
  // Units of work: the groups of `lanes` rows, then each row left over (so that a few long rows still spread
  // over the threads). Tasks get at least ~32k elements' worth of units: small batches stay on one thread.
  const int64_t groups = B / lanes, units = groups + B % lanes;
  const auto first_row = [&](int64_t u) { return u < groups ? u * lanes : groups * lanes + (u - groups); };
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (lanes * p.T_));
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) { fn(p, first_row(u0), first_row(u1)); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gae_fwd_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                                           const at::Tensor& mask, double gamma, double lam) {
  constexpr const char* op = "gae_fwd";
  TORCH_CHECK(rewards.device().is_cpu() && values.device().is_cpu() && mask.device().is_cpu(), op,
              ": rewards, values and mask must be CPU tensors, got ", rewards.device(), ", ", values.device(), ", ",
              mask.device());
  TORCH_CHECK(rewards.dim() == 2, op, ": rewards must be 2-D (B, T), got shape ", rewards.sizes());
  TORCH_CHECK(values.sizes() == rewards.sizes() && mask.sizes() == rewards.sizes(), op,
              ": rewards, values and mask must have the same shape, got ", rewards.sizes(), ", ", values.sizes(),
              " and ", mask.sizes());
  const auto dt = rewards.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": rewards must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(values.scalar_type() == dt, op, ": values must have the dtype of rewards (", dt, "), got ",
              values.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(rewards.is_contiguous() && values.is_contiguous() && mask.is_contiguous(), op,
              ": rewards, values and mask must be contiguous (call .contiguous())");
  const int64_t B = rewards.size(0), T = rewards.size(1);
  const auto opts = rewards.options().dtype(at::kFloat);
  at::Tensor adv = at::empty({B, T}, opts), ret = at::empty({B, T}, opts), stats = at::zeros({B, 3}, opts);
  if (B == 0 || T == 0) return {adv, ret, stats};
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "gae_fwd_cpu", [&] {
    const GaeArgs<scalar_t> args{rewards.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), mask.data_ptr<bool>(),
                                 adv.data_ptr<float>(),        ret.data_ptr<float>(),        stats.data_ptr<float>(),
                                 T,                            g,                            gl};
    gae_fwd_rows(args, B);
  });
  return {adv, ret, stats};
}

}  // namespace
}  // namespace rlhf_cpu

TORCH_LIBRARY_IMPL(rlhf_kernels_C, CPU, m) { m.impl("gae_fwd", &rlhf_cpu::gae_fwd_cpu); }
