// Slot layout of the row-reduction kernels (log-probs + entropy, KL): which aligned 16-byte chunks a slot is read
// from, how the slot is assembled from them, and how a thread's slots are grouped into batches.
//
// Plain C++ usable from host and device code (no CUDA headers needed), so that tests/test_cuda_host_logic.py can
// compile it with a host compiler and check the index logic exhaustively without a GPU.
//
// Terms. A row is V elements of E bytes starting at byte address x. A slot is S = 16 * kVecs consecutive bytes of
// the row (kVecs 16-byte vectors), slot j covering row bytes [j S, j S + S) clipped to the row: the slot
// definition is relative to the row start, whatever x is. Let shift = x mod 16 and A = x - shift (16-byte
// aligned). Chunk c is the aligned 16-byte word at A + 16 c. Slot j lies in chunks j kVecs .. j kVecs + kVecs
// (kVecs + 1 chunks when shift > 0, kVecs when shift == 0), and output word m of the slot is bytes
// [shift + 4 m, shift + 4 m + 4) of the concatenation of those chunks.
//
// Why reading whole aligned chunks is safe. A chunk is read only if it contains at least one byte of the row
// (chunk_has_row_byte below). Device memory is mapped in pages whose size and alignment are multiples of 16
// bytes, so an aligned 16-byte word never straddles two pages: if one of its bytes belongs to a live tensor, the
// whole word is mapped and the load cannot fault. (The PyTorch caching allocator also rounds blocks to 512 bytes,
// so the word stays inside the same allocation.) The bytes of such a word outside the row are discarded by the
// assembly and never influence a result.
#ifndef RLHF_CUDA_ROW_SLOTS_H_
#define RLHF_CUDA_ROW_SLOTS_H_

#include <cstdint>

#if defined(__CUDACC__)
#define RLHF_HD __host__ __device__ __forceinline__
#else
#define RLHF_HD inline
#endif

namespace rlhf_cuda {

// (hi:lo) >> n for n in [0, 32): the low 32 bits of the 64-bit funnel shift (SHF.R on the device).
RLHF_HD uint32_t funnel_shr(uint32_t lo, uint32_t hi, int n) {
#if defined(__CUDA_ARCH__)
  return __funnelshift_r(lo, hi, n);
#else
  return static_cast<uint32_t>(((static_cast<uint64_t>(hi) << 32) | lo) >> (n & 31));
#endif
}

// Byte permute of two words (PRMT on the device): byte k of the result is byte (sel >> 4k) & 7 of the 8-byte value
// (b:a), a's bytes numbered 0-3 and b's 4-7 (the sign-replicating mode bit 3 is not used here).
RLHF_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, sel);
#else
  const uint64_t v = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int k = 0; k < 4; ++k) r |= static_cast<uint32_t>((v >> (8 * ((sel >> (4 * k)) & 7))) & 0xff) << (8 * k);
  return r;
#endif
}

// Where element i (of es bytes) of a slot lies in the concatenated words cw[] of its chunks when the row starts
// shift bytes past its first chunk: word elem_word, byte offset elem_byte (0 or 2 for 16-bit elements, 0 for fp32,
// given element-aligned rows). The kernels read elements there directly: no slot assembly is needed when the
// shift is known at compile time.
RLHF_HD int elem_word(int shift, int i, int es) { return (shift + i * es) / 4; }
RLHF_HD int elem_byte(int shift, int i, int es) { return (shift + i * es) % 4; }

// Words holding exactly the elements of a slot (kWords words of 16-bit pairs or fp32 values, in any order), for
// the packed maximum, read from the concatenated chunk words cw[] for a compile-time shift. Word-aligned shift: the
// slot's words as they are. Shift of an odd number of 16-bit elements: word q + m (m >= 1) holds elements
// (2m - 1, 2m); the two halves at the slot's ends (element 0, the upper half of word q, and element 2 kWords - 1,
// the lower half of word q + kWords) are joined by one byte permute into the first word.
template <int kShift, int kWords, int kInWords>
RLHF_HD void slot_max_words(const uint32_t (&cw)[kInWords], uint32_t (&w)[kWords]) {
  constexpr int q = kShift / 4, r = kShift % 4;
  static_assert(r == 0 || r == 2, "element-aligned rows");
  static_assert(kInWords == kWords + (kShift != 0 ? 4 : 0), "one extra chunk when shifted");
  if constexpr (r == 0) {
    for (int m = 0; m < kWords; ++m) w[m] = cw[q + m];
  } else {
    w[0] = byte_perm(cw[q], cw[q + kWords], 0x5432);
    for (int m = 1; m < kWords; ++m) w[m] = cw[q + m];
  }
}

// Output word m of a slot from the concatenated words cw[] of its chunks, for a compile-time shift (bytes): a
// plain register choice when shift is a multiple of 4, else one funnel shift.
template <int kShift, int kWords, int kInWords>
RLHF_HD void assemble_words(const uint32_t (&cw)[kInWords], uint32_t (&w)[kWords]) {
  static_assert(kShift >= 0 && kShift < 16, "shift is a byte offset inside a 16-byte chunk");
  static_assert(kInWords == kWords + (kShift != 0 ? 4 : 0), "one extra chunk when shifted");
  constexpr int q = kShift / 4, r = kShift % 4;
  for (int m = 0; m < kWords; ++m) w[m] = r == 0 ? cw[q + m] : funnel_shr(cw[q + m], cw[q + m + 1], 8 * r);
}

// The same with the shift known at run time only (shift in [1, 16)): the word offset q = shift / 4 is applied by
// two levels of selects, then a funnel shift by 8 (shift % 4) bits (0 leaves the word as it is).
template <int kWords, int kInWords>
RLHF_HD void assemble_words_rt(const uint32_t (&cw)[kInWords], int shift, uint32_t (&w)[kWords]) {
  static_assert(kInWords == kWords + 4, "one extra chunk when shifted");
  const int q = shift >> 2, rbits = 8 * (shift & 3);
  uint32_t a[kWords + 2];  // cw shifted down by 2 (q & 2) words
  for (int m = 0; m < kWords + 2; ++m) a[m] = (q & 2) ? cw[m + 2] : cw[m];
  uint32_t b[kWords + 1];  // then by 1 (q & 1) word
  for (int m = 0; m < kWords + 1; ++m) b[m] = (q & 1) ? a[m + 1] : a[m];
  for (int m = 0; m < kWords; ++m) w[m] = funnel_shr(b[m], b[m + 1], rbits);
}

// Chunk k (k = 0 .. kVecs) of a slot whose first byte is at shift bytes past its first chunk and that holds
// n_bytes bytes of the row: it may be read iff it contains at least one of them.
RLHF_HD bool chunk_has_row_byte(int k, int shift, int n_bytes) { return 16 * k < shift + n_bytes; }

// A thread's slots j = tid, tid + tpr, tid + 2 tpr, ... (increasing) are cut into batches of U consecutive ones
// (in this order). Full batches hold U full slots; at most one tail batch follows with the n_tail_slots <= U
// remaining slots, the last of which may be the row's partial slot. n_slots = ceil(V E / S), n_full = floor(V E /
// S) (n_slots - n_full is 0 or 1). A function of (tid, tpr, V, E, S, U) only.
struct ThreadBatches {
  int n_full_batches;
  int n_tail_slots;
};

RLHF_HD ThreadBatches thread_batches(int tid, int tpr, int n_slots, int n_full, int unroll) {
  const int mine = tid < n_slots ? (n_slots - 1 - tid) / tpr + 1 : 0;      // slots of this thread
  const int mine_full = tid < n_full ? (n_full - 1 - tid) / tpr + 1 : 0;  // of which full
  const int nb = mine_full / unroll;
  return {nb, mine - nb * unroll};
}

}  // namespace rlhf_cuda

#endif  // RLHF_CUDA_ROW_SLOTS_H_
