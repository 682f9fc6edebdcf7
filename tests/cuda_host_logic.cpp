// Host check of the slot layout of the CUDA row kernels (csrc/cuda/row_slots.h), run by
// tests/test_cuda_host_logic.py. For every element size, row start shift and V in a list, it replays what the
// forward kernels do for one row: which aligned 16-byte chunks are read, how each slot is assembled from them,
// and how each thread's slots are cut into batches. It checks that
//   * every chunk read contains at least one byte of the row (no read outside the row's aligned chunks),
//   * every assembled slot equals the row's elements exactly (bytes outside the row never reach a used element),
//   * the compile-time and run-time assemblies agree,
//   * each element read in place from the chunk words (compile-time shifts) is the row's element, and the words
//     given to the packed maximum hold exactly the slot's elements,
//   * the batches of all threads cover every slot exactly once, each thread in increasing slot order, with full
//     batches of U full slots and at most one tail batch last.
// Prints "ok" and exits 0, else prints the first failure and exits 1.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <utility>
#include <vector>

#include "cuda/row_slots.h"

using namespace rlhf_cuda;

namespace {

int g_fail = 0;

void fail(const char* what, int es, int shift, int v, int j) {
  if (g_fail++ == 0) std::printf("FAIL %s: elem %d B, shift %d, V %d, slot %d\n", what, es, shift, v, j);
}

// The kernels' chunk choice for slot j (kVecs vectors per slot): full slots read chunks 0 .. kVecs - 1 and, when
// shifted, the extra chunk kVecs; the partial last slot reads the chunks that hold row bytes.
template <int kShift, int kVecs>
void check_shift(int es, int v) {
  constexpr int S = 16 * kVecs;                 // bytes per slot
  const int row_bytes = v * es;
  const int n_chunks = (kShift + row_bytes + 15) / 16;  // chunks holding at least one row byte
  // Memory: the row's aligned chunks with recognisable bytes outside the row.
  std::vector<uint8_t> mem(16 * (n_chunks + kVecs + 2), 0xEE);
  for (int b = 0; b < row_bytes; ++b) mem[kShift + b] = static_cast<uint8_t>(b * 7 + 3);
  const int n_full = row_bytes / S;
  const int n_slots = (row_bytes + S - 1) / S;
  for (int j = 0; j < n_slots; ++j) {
    const int n_bytes = j < n_full ? S : row_bytes - j * S;
    constexpr int kChunks = kVecs + (kShift != 0 ? 1 : 0);
    uint32_t cw[4 * kChunks + 4] = {};  // + 4: room for the run-time variant's extra chunk
    for (int k = 0; k < kChunks; ++k) {
      const bool read = j < n_full ? (k < kVecs || kShift != 0) : chunk_has_row_byte(k, kShift, n_bytes);
      if (j < n_full && read != chunk_has_row_byte(k, kShift, n_bytes)) fail("full-slot chunk rule", es, kShift, v, j);
      if (!read) continue;
      const int c = j * kVecs + k;
      if (c < 0 || c >= n_chunks) fail("chunk outside the row", es, kShift, v, j);
      std::memcpy(&cw[4 * k], &mem[16 * c], 16);
    }
    uint32_t w[4 * kVecs];
    if constexpr (kShift == 0) {
      std::memcpy(w, cw, sizeof(w));
    } else {
      uint32_t in[4 * kChunks];
      std::memcpy(in, cw, sizeof(in));
      assemble_words<kShift>(in, w);
      uint32_t w_rt[4 * kVecs];
      assemble_words_rt(in, kShift, w_rt);
      if (std::memcmp(w, w_rt, sizeof(w)) != 0) fail("run-time assembly differs", es, kShift, v, j);
    }
    uint8_t got[S];
    std::memcpy(got, w, S);
    for (int b = 0; b < n_bytes; ++b)
      if (got[b] != mem[kShift + j * S + b]) fail("assembled slot differs from the row", es, kShift, v, j);
    // Elements read in place (compile-time shifts): word elem_word, byte elem_byte of the chunk words.
    for (int i = 0; i * es < n_bytes; ++i) {
      const int wi = elem_word(kShift, i, es), bi = elem_byte(kShift, i, es);
      if (wi >= 4 * kChunks || bi + es > 4) { fail("element outside its word", es, kShift, v, j); continue; }
      uint8_t word[4];
      std::memcpy(word, &cw[wi], 4);
      if (std::memcmp(word + bi, &mem[kShift + j * S + i * es], es) != 0) fail("element in place", es, kShift, v, j);
    }
    // Words for the packed maximum of a full slot: exactly the slot's elements (as a multiset).
    if (j < n_full) {
      uint32_t in[4 * kChunks], mw[4 * kVecs];
      std::memcpy(in, cw, sizeof(in));
      slot_max_words<kShift>(in, mw);
      std::vector<std::vector<uint8_t>> want, have;
      for (int i = 0; i < S / es; ++i) {
        const uint8_t* e = &mem[kShift + j * S + i * es];
        want.emplace_back(e, e + es);
      }
      const uint8_t* mb = reinterpret_cast<const uint8_t*>(mw);
      for (int i = 0; i < S / es; ++i) have.emplace_back(mb + i * es, mb + i * es + es);
      std::sort(want.begin(), want.end());
      std::sort(have.begin(), have.end());
      if (want != have) fail("max words differ from the slot's elements", es, kShift, v, j);
    }
  }
}

// Every element-aligned shift of a row of kEs-byte elements.
template <int kEs, int kVecs, int kS = 0>
void check_all_shifts(int v) {
  if constexpr (kS < 16) {
    check_shift<kS, kVecs>(kEs, v);
    check_all_shifts<kEs, kVecs, kS + kEs>(v);
  }
}

void check_batches(int n_slots, int n_full, int tpr, int unroll) {
  std::vector<int> seen(n_slots, 0);
  for (int tid = 0; tid < tpr; ++tid) {
    const ThreadBatches tb = thread_batches(tid, tpr, n_slots, n_full, unroll);
    if (tb.n_tail_slots < 0 || tb.n_tail_slots > unroll) fail("tail size", 0, 0, n_slots, tid);
    int last = -1;
    for (int k = 0; k <= tb.n_full_batches; ++k) {
      const int n = k < tb.n_full_batches ? unroll : tb.n_tail_slots;
      for (int u = 0; u < n; ++u) {
        const int j = tid + (k * unroll + u) * tpr;
        if (j >= n_slots || j <= last) { fail("batch slot order / range", 0, 0, n_slots, j); continue; }
        if (k < tb.n_full_batches && j >= n_full) fail("partial slot in a full batch", 0, 0, n_slots, j);
        last = j;
        ++seen[j];
      }
    }
  }
  for (int j = 0; j < n_slots; ++j)
    if (seen[j] != 1) fail("slot not covered exactly once", 0, 0, n_slots, j);
}

}  // namespace

int main() {
  const int vs[] = {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 100, 1000, 4097, 32000, 50257, 151936};
  for (int v : vs) {
    check_all_shifts<2, 1>(v);  // 16-bit elements, logprobs and KL slot (8 elements, one vector)
    check_all_shifts<4, 1>(v);  // fp32, logprobs slot (4 elements)
    check_all_shifts<4, 2>(v);  // fp32, KL slot of 8 elements (two vectors)
    for (int es : {2, 4}) {
      const int vec = 16 / es;
      for (int tpr : {32, 64, 512})
        for (int unroll : {1, 2, 3, 4}) check_batches((v + vec - 1) / vec, v / vec, tpr, unroll);
    }
  }
  // byte_perm against its definition (the selector used for odd-element shifts and a few others)
  for (uint32_t sel : {0x5432u, 0x3210u, 0x7654u, 0x1076u})
    for (uint32_t a : {0x03020100u, 0xdeadbeefu})
      for (uint32_t b : {0x07060504u, 0x12345678u}) {
        const uint64_t ab = (uint64_t(b) << 32) | a;
        uint32_t want = 0;
        for (int k = 0; k < 4; ++k) want |= uint32_t((ab >> (8 * ((sel >> (4 * k)) & 7))) & 0xff) << (8 * k);
        if (byte_perm(a, b, sel) != want || byte_perm(0x03020100u, 0x07060504u, 0x5432u) != 0x05040302u)
          fail("byte_perm", 0, int(sel), 0, 0);
      }
  // funnel_shr against its definition
  const uint32_t lo = 0x89abcdefu, hi = 0x01234567u;
  for (int n = 0; n < 32; ++n)
    if (funnel_shr(lo, hi, n) != static_cast<uint32_t>(((uint64_t(hi) << 32) | lo) >> n))
      fail("funnel_shr", 0, n, 0, 0);
  if (g_fail) {
    std::printf("%d failures\n", g_fail);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
