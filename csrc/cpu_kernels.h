// Building blocks of the CPU kernels of bertfast._C: ISA dispatch, vectorisable fp32 math, row helpers.
//
// Why not at::vec::Vectorized: an extension is compiled once, for the baseline x86-64 ISA (SSE2), and ATen's
// Vectorized<float> only uses AVX2/AVX-512 inside ATen's own per-ISA translation units. So every kernel here is
// written as plain loops over fp32 row buffers that GCC/clang vectorise at -O3, and `run_isa` compiles the
// caller's loop body three times - for AVX-512, AVX2+FMA and the baseline - through the `target` and `flatten`
// function attributes (flatten inlines the body and all it calls, so the whole body is compiled for that ISA).
// The ISA is picked once at run time from the CPU (BERTFAST_CPU_ISA=base|avx2|avx512 overrides it, for tests).
//
// All arithmetic is fp32 (half and bfloat16 are converted on load and rounded once on store); the math
// functions below avoid libm so that they vectorise: exp of a non-positive argument (Cody-Waite + degree-5
// minimax, <= 3 ulp) and GELU's normal CDF (one exp and one fitted polynomial, gelu_parts), all branch-free.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "checks.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif
#if defined(__linux__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#define BF_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BERTFAST_X86_MULTIVERSION 1
#define BF_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2"), flatten))
#define BF_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2"), flatten))
#else
#define BERTFAST_X86_MULTIVERSION 0
#endif

// AT_DISPATCH over the three float types the kernels take (float32, float16, bfloat16); no float64 instantiation,
// which the input checks reject anyway.
#define BERTFAST_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                               \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                            \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace bertfast {
namespace cpu {

enum class Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa detect_isa() {
  static const Isa isa = [] {
    // BERTFAST_CPU_ISA can only lower the ISA, never ask for one the CPU lacks. Any other value is an error on
    // every build (a misspelt override must not silently test the default path); a throw here leaves the static
    // unset, so every later call says it again.
    Isa asked = Isa::kAvx512;
    if (const char* env = std::getenv("BERTFAST_CPU_ISA")) {
      std::string want(env);
      for (char& c : want) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      TORCH_CHECK(want.empty() || want == "base" || want == "avx2" || want == "avx512",
                  "bertfast_C: BERTFAST_CPU_ISA must be base, avx2 or avx512 (it can only lower the ISA), got \"",
                  env, "\"");
      asked = want == "base" ? Isa::kBase : want == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
    }
#if BERTFAST_X86_MULTIVERSION
    __builtin_cpu_init();
    Isa best = Isa::kBase;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2")) {
      best = Isa::kAvx2;
    }
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      best = Isa::kAvx512;
    }
    return static_cast<int>(asked) < static_cast<int>(best) ? asked : best;
#else
    (void)asked;
    return Isa::kBase;
#endif
  }();
  return isa;
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "base";
}

#if BERTFAST_X86_MULTIVERSION
template <typename F>
BF_TARGET_AVX512 void run_avx512(const F& f, int64_t begin, int64_t end) { f(begin, end); }
template <typename F>
BF_TARGET_AVX2 void run_avx2(const F& f, int64_t begin, int64_t end) { f(begin, end); }
#endif
template <typename F>
__attribute__((flatten)) void run_base(const F& f, int64_t begin, int64_t end) { f(begin, end); }

// f(begin, end) compiled for the best ISA of this CPU. `f` must only touch raw pointers (no ATen calls).
template <typename F>
inline void run_isa(const F& f, int64_t begin, int64_t end) {
#if BERTFAST_X86_MULTIVERSION
  switch (detect_isa()) {
    case Isa::kAvx512: run_avx512(f, begin, end); return;
    case Isa::kAvx2: run_avx2(f, begin, end); return;
    default: break;
  }
#endif
  run_base(f, begin, end);
}

// at::parallel_for over [0, n) with each chunk run by run_isa.
template <typename F>
inline void parallel_rows(int64_t n, int64_t grain, const F& f) {
  at::parallel_for(0, n, std::max<int64_t>(grain, 1), [&](int64_t begin, int64_t end) { run_isa(f, begin, end); });
}

// Rows per parallel chunk so that a chunk moves about 64 KiB of fp32.
inline int64_t row_grain(int64_t row_len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1)); }

// Zeroes n bytes at p with streaming (non-temporal) stores where the CPU has them (SSE2 on x86-64: every x86-64
// CPU): a large buffer is written without first reading each cache line for ownership (NOTES change 14). The
// unaligned head and tail go through memset. Call stream_fence() at the end of each thread's writes.
inline void stream_zero(void* p, size_t n) {
#if BERTFAST_X86_MULTIVERSION
  char* c = static_cast<char*>(p);
  const size_t head = std::min(n, (16 - reinterpret_cast<uintptr_t>(c) % 16) % 16);
  std::memset(c, 0, head);
  c += head;
  n -= head;
  const __m128i zero = _mm_setzero_si128();
  for (; n >= 16; n -= 16, c += 16) _mm_stream_si128(reinterpret_cast<__m128i*>(c), zero);
  std::memset(c, 0, n);
#else
  std::memset(p, 0, n);
#endif
}
// Whether the memory page holding p is resident. A block fresh from mmap (glibc serves blocks over 32 MiB so,
// every time) is not: its first write faults, and the kernel zeroes the page with ordinary stores, so it is then
// in the cache, where streaming stores cost more than ordinary ones (embed_backward on a fresh 94 MB table:
// 26 -> 35 ms streamed against 29 ms with memset; on reused memory 9.4 ms with memset, 7 ms streamed: NOTES
// change 14). Without mincore (not Linux / macOS): treated as resident.
inline bool page_resident(const void* p) {
#if defined(__linux__) || defined(__APPLE__)
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  void* start = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(p) & ~(page - 1));
#if defined(__APPLE__)
  char v = 0;
#else
  unsigned char v = 0;
#endif
  return mincore(start, page, &v) != 0 || (v & 1);
#else
  (void)p;
  return true;
#endif
}

// Software prefetch (NOTES change 22). A streaming loop with an activation consumes a cache line of each input
// every ~20 cycles, and the hardware prefetchers (of the VMs measured, at least) do not run far enough ahead for
// the loads to overlap the arithmetic: the time was compute plus memory instead of the larger of the two. So the
// row loops run in chunks of kChunk elements and, before each chunk, prefetch each input stream kPrefetchBytes
// past it (prefetch_ahead). Prefetching a whole row at once was slower (it fills the miss buffers in a burst).
// The addresses are formed as integers: past the end of an array is fine, a prefetch never faults.
constexpr int64_t kChunk = 64;
constexpr uintptr_t kPrefetchBytes = 2048;

template <typename T>
BF_INLINE void prefetch_ahead(const T* p, int64_t begin, int64_t end) {
  const uintptr_t last = reinterpret_cast<uintptr_t>(p + end) + kPrefetchBytes;
  for (uintptr_t a = reinterpret_cast<uintptr_t>(p + begin) + kPrefetchBytes; a < last; a += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 3);
  }
}

// A row of h elements in chunks: prefetch(c0, c0 + kChunk) then span(c0, kChunk as a compile-time constant) for
// each full chunk, then span(c0, h - c0) for the rest. `span` runs its loop in a function whose row pointers are
// __restrict parameters (a loop reading them through a lambda's closure is vectorised behind alias checks), and
// the constant trip count of the full chunks spares each one the vector loop's peeling and remainder: with a
// run-time chunk length the in-cache LayerNorm backward was ~45% slower.
template <typename Prefetch, typename Span>
BF_INLINE void chunked_row(int64_t h, const Prefetch& prefetch, const Span& span) {
  int64_t c0 = 0;
  for (; c0 + kChunk <= h; c0 += kChunk) {
    prefetch(c0, c0 + kChunk);
    span(c0, std::integral_constant<int64_t, kChunk>());
  }
  if (c0 < h) span(c0, h - c0);
}

inline void stream_fence() {
#if BERTFAST_X86_MULTIVERSION
  _mm_sfence();
#endif
}

// ----------------------------------------------------------------------------------------------------------
// scalar <-> fp32 conversion of rows. c10's Half/BFloat16 conversions are branch-free bit manipulation, which
// vectorises once inlined.
template <typename T>
BF_INLINE void load_row(const T* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename T>
BF_INLINE void store_row(const float* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

BF_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

BF_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// e^x for x in [-87, 0] (the caller keeps it there: no clamps, NOTES change 21); the result is a normal float.
// n = round(x / ln2) by adding and subtracting 1.5 * 2^23; r = x - n ln2 (ln2 split in two, Cody-Waite: the
// high part has 16 bits) in [-ln2/2, ln2/2]; e^r by a degree-5 minimax polynomial (relative error 7.6e-8, 1.8e-7
// = 3 ulp evaluated in fp32); 2^n built from the bits of the rounding sum, which are those of 1.5 * 2^23 plus n.
BF_INLINE float exp_nonpos_f(float x) {
  const float kMagic = 12582912.0f;  // 1.5 * 2^23
  const float shifted = x * 1.44269504088896341f + kMagic;
  const float n = shifted - kMagic;
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 8.2946875299e-03f;
  p = p * r + 4.1915222377e-02f;
  p = p * r + 1.6667618864e-01f;
  p = p * r + 4.9998896803e-01f;
  p = p * r + 9.9999967902e-01f;
  p = p * r + 1.0000000714e+00f;
  return p * bits_to_float((float_to_bits(shifted) - 0x4B400000u + 127u) << 23);
}

// Dropout's random numbers: Philox-4x32-R uniform in [0, 1), bit for bit what Triton's tl.philox / tl.rand
// return: counter (c0, c1, c2, 0), key (seed lo, seed hi), the first output word as int32 folded to
// non-negative, times 2^-31. The Triton LayerNorm kernels draw element (row, col) of an [N, H] tensor with
// tl.rand(seed, row * H + col): R = 10, (c0, c1) the offset's low and high words, c2 = 0. The Triton attention
// draws key k of query token q (packed index) in head h with R = 7 on (k, q, h, 0). The CPU kernels draw the
// same, so CPU and GPU keep the same elements for the same seed.
BF_INLINE uint32_t mulhi_u32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

template <int R>
BF_INLINE float philox_uniform(uint32_t seed_lo, uint32_t seed_hi, uint32_t c0, uint32_t c1, uint32_t c2) {
  uint32_t c3 = 0, k0 = seed_lo, k1 = seed_hi;
#pragma GCC unroll 10
  for (int round = 0; round < R; ++round) {  // unrolled: a loop left inside the caller's loop blocks vectorising it
    const uint32_t a = c0, c = c2;
    c0 = mulhi_u32(0xCD9E8D57u, c) ^ c1 ^ k0;
    c2 = mulhi_u32(0xD2511F53u, a) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * c;
    c3 = 0xD2511F53u * a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const int32_t v = static_cast<int32_t>(c0);
  return static_cast<float>(v < 0 ? ~v : v) * 4.6566127342e-10f;  // ~v = -v - 1 without overflow
}

// Dropout with probability p and a seed: an element is kept (scaled by 1 / (1 - p)) when its uniform is >= p.
struct Dropout {
  float p = 0.0f, scale = 1.0f;
  uint32_t seed_lo = 0, seed_hi = 0;
  bool on = false;
  Dropout(double p_, int64_t seed) {
    on = p_ > 0.0;
    p = static_cast<float>(p_);
    scale = p_ < 1.0 ? static_cast<float>(1.0 / (1.0 - p_)) : 0.0f;
    seed_lo = static_cast<uint32_t>(static_cast<uint64_t>(seed));
    seed_hi = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  }
  // The keep-mask of n consecutive counters packed in bits: bit i % 8 of keep_bits[i / 8] set where the
  // element at counter (c0, c1) = the low and high words of base + i, c2 = c2 is kept; all ceil(n / 8) bytes
  // written, the bits past n 0. R = 10 for the LayerNorm draw, 7 for the attention's.
  template <int R>
  inline void keep_bits(uint64_t base, uint32_t c2, int64_t n, uint8_t* keep_bits) const;
  // out[i] = scale where bit i of keep_bits is set, else 0 (the factors that multiply the elements)
  inline void fill_from_bits(const uint8_t* keep_bits, int64_t n, float* out) const;
  // The LayerNorm draw of elements base .. base + n - 1: their keep bits into keep_bits (ceil(n / 8) bytes) and
  // their factors into out.
  void fill(uint64_t base, int64_t n, float* out, uint8_t* keep_bits) const {
    this->keep_bits<10>(base, 0, n, keep_bits);
    fill_from_bits(keep_bits, n, out);
  }
};

// The keep bits of elements [i, i + count) (count <= 32, i a multiple of 8) from their mask word: ceil(count / 8)
// bytes, the bits past count cleared.
BF_INLINE void store_keep_bits(uint32_t mask, int64_t i, int64_t count, uint8_t* keep_bits) {
  if (count < 32) mask &= (1u << count) - 1u;
  for (int64_t b = 0; b * 8 < count; ++b) keep_bits[i / 8 + b] = static_cast<uint8_t>(mask >> (8 * b));
}

// Philox-4x32-R on 16 / 8 consecutive counters at once, lane for lane what philox_uniform computes. Each round
// needs the high and the low 32 bits of two 32x32-bit products per lane: (v)pmuludq multiplies the even lanes,
// and the odd lanes shifted down, into 64-bit products whose halves are put back into 32-bit lanes.
// (Written with intrinsics: GCC builds these products from shuffles, or from the slow 64x64 vpmullq.)
#if BERTFAST_X86_MULTIVERSION
// AVX-512, per round and 16 lanes: 2 shifts, 4 vpmuludq, 4 masked vpshufd (each moves the wanted halves of one
// product pair into place in one instruction: the high words of the even products down into the even lanes
// under the odd products, the low words of the odd products up into the odd lanes over the even products) and
// 2 vpternlogd (the three-way xor with the key): 12 instructions, plus 2 register copies (a merge-masked vpshufd
// overwrites its merge source, which the other shuffle of the pair still reads; copies are usually eliminated
// at rename), where shift + blend + two xors took 18 on ports 0 and 5 (NOTES change 17). Unused results of the
// last two rounds are dropped by the compiler.
#define BF_TARGET_PHILOX512 __attribute__((target("avx512f"), always_inline))
template <int R>
BF_TARGET_PHILOX512 inline __m512i philox_word0_avx512(__m512i c0, __m512i c1, __m512i c2, const __m512i* k0,
                                                       const __m512i* k1) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  constexpr __mmask16 kOdd = 0xAAAA, kEven = 0x5555;
  __m512i c3 = _mm512_setzero_si512();
#pragma GCC unroll 10
  for (int round = 0; round < R; ++round) {
    const __m512i pe0 = _mm512_mul_epu32(c2, m0), po0 = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), m0);
    const __m512i pe1 = _mm512_mul_epu32(c0, m1), po1 = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), m1);
    const __m512i hi0 = _mm512_mask_shuffle_epi32(po0, kEven, pe0, _MM_PERM_DDBB);
    const __m512i hi1 = _mm512_mask_shuffle_epi32(po1, kEven, pe1, _MM_PERM_DDBB);
    const __m512i lo0 = _mm512_mask_shuffle_epi32(pe0, kOdd, po0, _MM_PERM_CCAA);
    const __m512i lo1 = _mm512_mask_shuffle_epi32(pe1, kOdd, po1, _MM_PERM_CCAA);
    c0 = _mm512_ternarylogic_epi32(hi0, c1, k0[round], 0x96);  // hi0 ^ c1 ^ k0
    c2 = _mm512_ternarylogic_epi32(hi1, c3, k1[round], 0x96);
    c1 = lo0;
    c3 = lo1;
  }
  return c0;
}

template <int R>
__attribute__((target("avx512f"), noinline)) void keep_bits_avx512(const Dropout& d, uint64_t base, uint32_t c2,
                                                                  int64_t n, uint8_t* keep_bits) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 p = _mm512_set1_ps(d.p), unit = _mm512_set1_ps(4.6566127342e-10f);
  const __m512i third = _mm512_set1_epi32(static_cast<int>(c2));
  __m512i k0[R], k1[R];  // the round keys
  uint32_t key0 = d.seed_lo, key1 = d.seed_hi;
  for (int round = 0; round < R; ++round, key0 += 0x9E3779B9u, key1 += 0xBB67AE85u) {
    k0[round] = _mm512_set1_epi32(static_cast<int>(key0));
    k1[round] = _mm512_set1_epi32(static_cast<int>(key1));
  }
  // the lanes kept among the 16 consecutive counters from off (the carry into the high word where the low wraps)
  auto kept = [&](uint64_t off) BF_TARGET_PHILOX512 {
    const __m512i lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(off)));
    const __m512i c0 = _mm512_add_epi32(lo, iota);
    const __m512i hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(off >> 32)));
    const __m512i c1 = _mm512_mask_add_epi32(hi, _mm512_cmplt_epu32_mask(c0, lo), hi, _mm512_set1_epi32(1));
    const __m512i w = philox_word0_avx512<R>(c0, c1, third, k0, k1);
    const __m512i v = _mm512_xor_si512(w, _mm512_srai_epi32(w, 31));  // v < 0 ? ~v : v
    return _mm512_cmp_ps_mask(_mm512_mul_ps(_mm512_cvtepi32_ps(v), unit), p, _CMP_GE_OQ);
  };
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {  // two independent vectors per step: each round's chain is ~8 cycles long
    const __mmask16 ka = kept(base + static_cast<uint64_t>(i)), kb = kept(base + static_cast<uint64_t>(i + 16));
    store_keep_bits(static_cast<uint32_t>(ka) | (static_cast<uint32_t>(kb) << 16), i, 32, keep_bits);
  }
  for (; i < n; i += 16) {
    store_keep_bits(kept(base + static_cast<uint64_t>(i)), i, std::min<int64_t>(n - i, 16), keep_bits);
  }
}

// out[i] = scale where bit i of keep_bits is set, 16 lanes at a time straight from the mask bits
__attribute__((target("avx512f"), noinline)) inline void fill_from_bits_avx512(const Dropout& d,
                                                                              const uint8_t* keep_bits, int64_t n,
                                                                              float* out) {
  const __m512 scale = _mm512_set1_ps(d.scale);
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t count = std::min<int64_t>(n - i, 16);
    uint16_t k = keep_bits[i / 8];
    if (count > 8) k |= static_cast<uint16_t>(keep_bits[i / 8 + 1] << 8);
    _mm512_mask_storeu_ps(out + i, static_cast<__mmask16>((1u << count) - 1u),
                          _mm512_maskz_mov_ps(static_cast<__mmask16>(k), scale));
  }
}
#undef BF_TARGET_PHILOX512

// AVX2, per round and 8 lanes: 2 shifts, 4 vpmuludq, 4 shifts and 4 blends to put the product halves in place,
// 4 xors. Four independent vectors (32 counters) a loop step: one vector's round is a chain of ~8 cycles
// (vpmuludq -> blend -> xor) that the next step overlapped only partly; with four, the vpmuludq (40 per 8 lanes,
// one pipe on Zen 2) are the bound (NOTES change 32). The round keys are broadcast once per call.
#define BF_TARGET_PHILOX256 __attribute__((target("avx2"), always_inline))
template <int R>
__attribute__((target("avx2"), noinline)) void keep_bits_avx2(const Dropout& d, uint64_t base, uint32_t c2,
                                                              int64_t n, uint8_t* keep_bits) {
  constexpr int V = 4;  // vectors of 8 counters a step
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256 p = _mm256_set1_ps(d.p), unit = _mm256_set1_ps(4.6566127342e-10f);
  const __m256i third = _mm256_set1_epi32(static_cast<int>(c2));
  __m256i k0[R], k1[R];  // the round keys
  uint32_t key0 = d.seed_lo, key1 = d.seed_hi;
  for (int round = 0; round < R; ++round, key0 += 0x9E3779B9u, key1 += 0xBB67AE85u) {
    k0[round] = _mm256_set1_epi32(static_cast<int>(key0));
    k1[round] = _mm256_set1_epi32(static_cast<int>(key1));
  }
  // the keep mask of the 32 consecutive counters from off, bit i for counter off + i
  auto kept = [&](uint64_t off) BF_TARGET_PHILOX256 {
    __m256i c0[V], c1[V], c2v[V], c3[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const uint64_t o = off + 8 * static_cast<uint64_t>(v);
      const __m256i lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(o)));
      c0[v] = _mm256_add_epi32(lo, iota);
      // carry into the high word where the low word wrapped (unsigned c0 < lo, a signed compare of flipped signs)
      const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(lo, sign), _mm256_xor_si256(c0[v], sign));
      c1[v] = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(o >> 32))), wrapped);
      c2v[v] = third;
      c3[v] = _mm256_setzero_si256();
    }
    const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
    const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
#pragma GCC unroll 10
    for (int round = 0; round < R; ++round) {
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        const __m256i pe0 = _mm256_mul_epu32(c2v[v], m0), po0 = _mm256_mul_epu32(_mm256_srli_epi64(c2v[v], 32), m0);
        const __m256i pe1 = _mm256_mul_epu32(c0[v], m1), po1 = _mm256_mul_epu32(_mm256_srli_epi64(c0[v], 32), m1);
        const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(pe0, 32), po0, 0xAA);
        const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(pe1, 32), po1, 0xAA);
        const __m256i lo0 = _mm256_blend_epi32(pe0, _mm256_slli_epi64(po0, 32), 0xAA);
        const __m256i lo1 = _mm256_blend_epi32(pe1, _mm256_slli_epi64(po1, 32), 0xAA);
        c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c1[v]), k0[round]);
        c2v[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c3[v]), k1[round]);
        c1[v] = lo0;
        c3[v] = lo1;
      }
    }
    uint32_t mask = 0;
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const __m256i w = _mm256_xor_si256(c0[v], _mm256_srai_epi32(c0[v], 31));  // w < 0 ? ~w : w
      const __m256 keep = _mm256_cmp_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(w), unit), p, _CMP_GE_OQ);
      mask |= static_cast<uint32_t>(_mm256_movemask_ps(keep)) << (8 * v);
    }
    return mask;
  };
  for (int64_t i = 0; i < n; i += 8 * V) {  // the last step's lanes past n are drawn and dropped
    store_keep_bits(kept(base + static_cast<uint64_t>(i)), i, std::min<int64_t>(n - i, 8 * V), keep_bits);
  }
}
#undef BF_TARGET_PHILOX256

// out[i] = scale where bit i of keep_bits is set: one byte broadcast to 8 lanes, each lane testing its own bit
__attribute__((target("avx2"), noinline)) inline void fill_from_bits_avx2(const Dropout& d, const uint8_t* keep_bits,
                                                                        int64_t n, float* out) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 scale = _mm256_set1_ps(d.scale);
  for (int64_t i = 0; i < n; i += 8) {
    const __m256i b = _mm256_and_si256(_mm256_set1_epi32(keep_bits[i / 8]), bit);
    const __m256 f = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(b, bit)), scale);
    if (n - i >= 8) {
      _mm256_storeu_ps(out + i, f);
    } else {
      alignas(32) float tail[8];
      _mm256_store_ps(tail, f);
      std::memcpy(out + i, tail, static_cast<size_t>(n - i) * sizeof(float));
    }
  }
}
#endif

template <int R>
inline void Dropout::keep_bits(uint64_t base, uint32_t c2, int64_t n, uint8_t* bits) const {
#if BERTFAST_X86_MULTIVERSION
  switch (detect_isa()) {
    case Isa::kAvx512: keep_bits_avx512<R>(*this, base, c2, n, bits); return;
    case Isa::kAvx2: keep_bits_avx2<R>(*this, base, c2, n, bits); return;
    default: break;
  }
#endif
  for (int64_t i = 0; i < n; i += 8) {
    uint32_t byte = 0;
    for (int64_t j = i; j < std::min(n, i + 8); ++j) {
      const uint64_t off = base + static_cast<uint64_t>(j);
      const float u =
          philox_uniform<R>(seed_lo, seed_hi, static_cast<uint32_t>(off), static_cast<uint32_t>(off >> 32), c2);
      byte |= static_cast<uint32_t>(u >= p) << (j - i);
    }
    bits[i / 8] = static_cast<uint8_t>(byte);
  }
}

inline void Dropout::fill_from_bits(const uint8_t* keep_bits, int64_t n, float* out) const {
#if BERTFAST_X86_MULTIVERSION
  switch (detect_isa()) {
    case Isa::kAvx512: fill_from_bits_avx512(*this, keep_bits, n, out); return;
    case Isa::kAvx2: fill_from_bits_avx2(*this, keep_bits, n, out); return;
    default: break;
  }
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = (keep_bits[i / 8] >> (i % 8)) & 1 ? scale : 0.0f;
}

// keep[i] = bit i of keep_bits (0 / 1 bytes: a bool tensor's storage), 8 at a time through a table
inline void bytes_from_bits(const uint8_t* keep_bits, int64_t n, uint8_t* keep) {
  static const auto table = [] {
    std::array<uint64_t, 256> t{};
    for (int b = 0; b < 256; ++b) {
      for (int k = 0; k < 8; ++k) t[b] |= static_cast<uint64_t>((b >> k) & 1) << (8 * k);  // little-endian bytes
    }
    return t;
  }();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) std::memcpy(keep + i, &table[keep_bits[i / 8]], 8);
  for (; i < n; ++i) keep[i] = (keep_bits[i / 8] >> (i % 8)) & 1;
}

// Activations and their derivatives, on fp32.
//   gelu(x)      = x/2 (1 + erf(x/sqrt2))                   gelu'(x) = Phi(x) + x phi(x)
//   gelu_tanh(x) = x/2 (1 + tanh(u)) = x sigmoid(2u),  u = sqrt(2/pi) (x + 0.044715 x^3)
//   relu(x) = max(x, 0), NaN kept (derivative 0 where x <= 0, else 1: a NaN passes the gradient through, as
//   torch's threshold_backward)
//   silu(x) = x sigmoid(x)
constexpr float kSqrt1_2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kSqrt2OverPi = 0.79788456080286535588f;
constexpr float kGeluTanhC = 0.044715f;

// sigmoid(z) and 1 - sigmoid(z) from e = exp(-|z|) in [0, 1]: neither overflows nor cancels. Below -87, -|z| is
// floored for exp_nonpos_f and e set to 0 (e^-87 = 1.6e-38): the tiny side is then 0, so that x * sigmoid(-x)
// for a huge x is 0, not x * 1.6e-38 (silu(-1e38) was -1.65).
BF_INLINE void sigmoid_pair(float z, float& s, float& one_minus_s) {
  const float nz = -std::fabs(z);
  float e = nz > -87.0f ? exp_nonpos_f(nz > -87.0f ? nz : -87.0f) : 0.0f;
  float inv = 1.0f / (1.0f + e);
  float small = e * inv;
  s = z >= 0.0f ? inv : small;
  one_minus_s = z >= 0.0f ? small : inv;
}

// GELU's two parts at x: phi_cdf = Phi(x), the standard normal CDF, and e = exp(-x^2 / 2).
// With a = |x| / sqrt2: erfc(a) = G(a) exp(-a^2), where G, the scaled complementary error function, is a
// degree-14 polynomial in (a - 2) fitted on [0, 4] (relative error 1.2e-7; ~3e-7 evaluated in fp32) and held at
// G(4) beyond: there Phi(x) rounds to 1 for x > 0, and for x < -5.66, where |GELU(x)| < 4.4e-8, the result is
// up to 2.2x too large in magnitude, an absolute error below 4.7e-10 (torch's fp32 GELU returns 0 there: error
// up to 4.4e-8; its float64 one returns 0 below x = -8.4). Phi(x) = 1 -
// erfc(a) / 2 for x >= 0 and erfc(a) / 2 for x < 0: no cancellation in the negative tail (1 + erf would cancel).
// One exp and one polynomial serve the forward and the backward (phi(x) = e / sqrt(2 pi)).
BF_INLINE void gelu_parts(float x, float& phi_cdf, float& e) {
  const float a_full = std::fabs(x) * kSqrt1_2;
  const float a = a_full < 9.0f ? a_full : 9.0f;  // -a^2 >= -81: within exp_nonpos_f's range
  const float s = (a < 4.0f ? a : 4.0f) - 2.0f;
  float g = 5.1408721359e-08f;
  g = g * s - 2.4355631978e-07f;
  g = g * s + 2.1720384682e-07f;
  g = g * s - 2.4687051121e-07f;
  g = g * s + 4.7598611382e-06f;
  g = g * s - 1.9533738397e-05f;
  g = g * s + 5.6187003216e-05f;
  g = g * s - 1.7956636716e-04f;
  g = g * s + 5.9116290435e-04f;
  g = g * s - 1.8358367131e-03f;
  g = g * s + 5.4418684877e-03f;
  g = g * s - 1.5459207846e-02f;
  g = g * s + 4.1802436561e-02f;
  g = g * s - 1.0679659884e-01f;
  g = g * s + 2.5539568961e-01f;
  e = a_full < 9.0f ? exp_nonpos_f(-a * a) : 0.0f;  // below e^-81 both parts are 0
  const float half_erfc = 0.5f * g * e;
  phi_cdf = x >= 0.0f ? 1.0f - half_erfc : half_erfc;
}

template <Activation A>
BF_INLINE float act_f(float x) {
  if constexpr (A == Activation::kGelu) {
    float phi_cdf, e;
    gelu_parts(x, phi_cdf, e);
    return x * phi_cdf;
  } else if constexpr (A == Activation::kGeluTanh) {
    float s, one_minus_s;
    sigmoid_pair(2.0f * kSqrt2OverPi * (x + kGeluTanhC * x * x * x), s, one_minus_s);
    return x * s;
  } else if constexpr (A == Activation::kRelu) {
    return x < 0.0f ? 0.0f : x;  // not x > 0 ? x : 0, which turned NaN into 0 (torch's relu keeps it)
  } else if constexpr (A == Activation::kSilu) {
    float s, one_minus_s;
    sigmoid_pair(x, s, one_minus_s);
    return x * s;
  } else {
    return x;
  }
}

// d act / dx at x.
template <Activation A>
BF_INLINE float act_grad_f(float x) {
  if constexpr (A == Activation::kGelu) {
    float phi_cdf, e;
    gelu_parts(x, phi_cdf, e);
    return phi_cdf + x * kInvSqrt2Pi * e;
  } else if constexpr (A == Activation::kGeluTanh) {
    // 1 - s from sigmoid_pair, not by subtraction: no cancellation where s -> 1. Where s (1 - s) is 0 (|x| beyond
    // ~25) the second term is 0: computed, it is 0 * inf = NaN once x^2 overflows (|x| > 1.8e19).
    float s, one_minus_s;
    sigmoid_pair(2.0f * kSqrt2OverPi * (x + kGeluTanhC * x * x * x), s, one_minus_s);
    const float s_one_minus_s = s * one_minus_s;
    const float slope = 2.0f * x * s_one_minus_s * kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhC * x * x);
    return s + (s_one_minus_s != 0.0f || x != x ? slope : 0.0f);  // a NaN x gives a NaN slope, as in torch
  } else if constexpr (A == Activation::kRelu) {
    return x <= 0.0f ? 0.0f : 1.0f;
  } else if constexpr (A == Activation::kSilu) {
    float s, one_minus_s;
    sigmoid_pair(x, s, one_minus_s);
    return s * (1.0f + x * one_minus_s);
  } else {
    return 1.0f;
  }
}

// Calls f.template operator()<A>() with the activation as a compile-time constant.
template <typename F>
inline void dispatch_activation(Activation a, const F& f) {
  switch (a) {
    case Activation::kGelu: f(std::integral_constant<Activation, Activation::kGelu>()); break;
    case Activation::kGeluTanh: f(std::integral_constant<Activation, Activation::kGeluTanh>()); break;
    case Activation::kRelu: f(std::integral_constant<Activation, Activation::kRelu>()); break;
    case Activation::kSilu: f(std::integral_constant<Activation, Activation::kSilu>()); break;
    default: f(std::integral_constant<Activation, Activation::kNone>()); break;
  }
}

// ----------------------------------------------------------------------------------------------------------
// Row reductions (fp32). `omp simd reduction` lets the compiler reorder the sum into vector lanes; the order is
// fixed at compile time, so results are deterministic.
BF_INLINE float row_sum(const float* __restrict v, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += v[i];
  return s;
}

// LayerNorm statistics of the fp32 row h: two passes, the second corrected (the mean, then the sums of the
// deviations d = h - m and of their squares; the mean is m + mean(d) and the variance mean(d^2) - mean(d)^2).
// The first pass's sum rounds at the row's magnitude: for a row far from zero (1e3 +- 0.01) its mean was off by
// several times torch's error, which went straight into y; mean(d) recovers it at the deviations' magnitude.
BF_INLINE void row_moments(const float* __restrict h, int64_t n, float eps, float& mean, float& rstd) {
  const float inv_n = 1.0f / static_cast<float>(n);
  const float m = row_sum(h, n) * inv_n;
  float s1 = 0.0f, ss = 0.0f;
#pragma omp simd reduction(+ : s1, ss)
  for (int64_t i = 0; i < n; ++i) {
    float d = h[i] - m;
    s1 += d;
    ss += d * d;
  }
  const float c = s1 * inv_n;
  const float var = ss * inv_n - c * c;
  mean = m + c;
  rstd = 1.0f / std::sqrt((var > 0.0f ? var : 0.0f) + eps);
}

// y = (h - mean) * rstd * w + b, rounded to T.
template <typename T>
BF_INLINE void row_normalize(const float* __restrict h, float mean, float rstd, const float* __restrict w,
                             const float* __restrict b, T* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<T>((h[i] - mean) * rstd * w[i] + b[i]);
}

// The factor of the LayerNorm backward's last pass, dh = factor (dy w - mean(dy w) - xhat mean(dy w xhat)): rstd,
// except for a one-element row, which normalises to its bias, so its dh is exactly 0 (x NaN / inf kept by 0 * rstd).
// Computed as written, (dy w - mean(dy w)) is dy w's rounding error when the product is contracted into an FMA, not
// 0, times rstd (1e6 at eps 1e-12).
BF_INLINE float ln_backward_factor(float rstd, int64_t n) { return n == 1 ? 0.0f * rstd : rstd; }

// LayerNorm backward of one row given the recomputed pre-LN row h (overwritten with dh):
//   xhat = (h - mean) rstd,  g = dy * w,  dh = rstd (g - mean(g) - xhat mean(g xhat)).
// Also accumulates dw += dy xhat and db += dy into the fp32 partial sums.
BF_INLINE void row_layer_norm_backward(float* __restrict h, const float* __restrict dy, const float* __restrict w,
                                       float mean, float rstd, float* __restrict dw_acc, float* __restrict db_acc,
                                       int64_t n) {
  float sg = 0.0f, sgx = 0.0f;
#pragma omp simd reduction(+ : sg, sgx)
  for (int64_t i = 0; i < n; ++i) {
    float xhat = (h[i] - mean) * rstd;
    float g = dy[i] * w[i];
    sg += g;
    sgx += g * xhat;
    dw_acc[i] += dy[i] * xhat;
    db_acc[i] += dy[i];
    h[i] = xhat;
  }
  float inv_n = 1.0f / static_cast<float>(n);
  float mg = sg * inv_n, mgx = sgx * inv_n;
  const float r = ln_backward_factor(rstd, n);
  for (int64_t i = 0; i < n; ++i) h[i] = r * (dy[i] * w[i] - mg - h[i] * mgx);
}

// ----------------------------------------------------------------------------------------------------------
// Deterministic column sums over rows (dbias, dweight): rows are cut into blocks that depend only on the row
// count (never on the thread count); each block sums its rows in order into its own fp32 partial, then the
// partials are added in block order. Same result for any number of threads.
struct RowBlocks {
  int64_t rows_per_block;
  int64_t n_blocks;
};

inline RowBlocks row_blocks(int64_t n_rows) {
  int64_t per = std::max<int64_t>(32, (n_rows + 255) / 256);
  return {per, n_rows == 0 ? 0 : (n_rows + per - 1) / per};
}

// partials: [n_blocks, n_partials * width] fp32; reduce partial p (width floats) of every block into out_p.
template <typename T>
inline void reduce_partials(const float* partials, int64_t n_blocks, int64_t stride, int64_t offset, int64_t width,
                            T* out) {
  parallel_rows(width, 256, [=](int64_t begin, int64_t end) {
    float acc[256];
    for (int64_t c0 = begin; c0 < end; c0 += 256) {
      int64_t c1 = std::min(end, c0 + 256);
      int64_t w = c1 - c0;
      for (int64_t c = 0; c < w; ++c) acc[c] = 0.0f;
      for (int64_t b = 0; b < n_blocks; ++b) {
        const float* p = partials + b * stride + offset + c0;
        for (int64_t c = 0; c < w; ++c) acc[c] += p[c];
      }
      for (int64_t c = 0; c < w; ++c) out[c0 + c] = static_cast<T>(acc[c]);
    }
  });
}

}  // namespace cpu
}  // namespace bertfast
