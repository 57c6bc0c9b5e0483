// y = x W^T + bias for weights kept in the GGUF file's own blocks (llama.cpp's types), on x86 CPUs with AVX2.
//
// Why: a Q4_K_M file expanded to float32 is 7x its size and reads 7x the bytes a token; requantized to Sol's
// int8 rows it is still ~2x. Here each type is multiplied from its own blocks, read straight from the mapped
// file where a layer is one tensor of it.
//
// The arithmetic is llama.cpp's, so results agree with it: each activation row is quantized to int8, in
// blocks of 32 with a float step each (for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) or of 256 with sums of every 16
// (for the K-quants, whose 256-number super-blocks carry 6- or 8-bit scales of their 16- or 32-number
// sub-blocks); the weights' 4-, 5- or 6-bit codes are unpacked to bytes and multiplied with pmaddubsw
// (unsigned codes x signed activations, pairs summed in int16: at most 2 x 63 x 127 = 16,002, no saturation).
// A type whose numbers carry an offset (q - 8, q - 16, q - 32, or a min) subtracts offset x sum(x codes) per
// block. F16 and BF16 rows are widened to float32 and multiplied with the float activations (FMA).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "blocks.h"

namespace sol_blocks {

namespace {

// ---- sizes ---------------------------------------------------------------------------------------------
struct Shape {
  int64_t numbers, bytes;   // a block's
};

Shape shape_of(int64_t t) {
  if (t > GROUPED && t != GROUPED + F16 && t != GROUPED + BF16) t -= GROUPED;   // Sol's interleaved layouts: the same sizes
  switch (t) {
    case F16: case BF16: return {1, 2};
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q5_0: return {32, 22};
    case Q5_1: return {32, 24};
    case Q8_0: return {32, 34};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
    default: return {0, 0};
  }
}

bool k_quant(int64_t t) { return t == Q4_K || t == Q5_K || t == Q6_K; }
bool plain(int64_t t) { return t == F16 || t == BF16; }

inline float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256i load(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// ---- the activations as int8 -----------------------------------------------------------------------------
// A row of activations in blocks of 32 (llama.cpp's Q8_1, laid out as arrays): block b ~ d[b] * q[32b..],
// and s[b] = d[b] * sum(q) for the weights' offsets.
struct Row32 {
  const float *d, *s, *s1;   // s1: d * sum(q) as llama.cpp's Q8_1 keeps it (float16), for Q4_1 and Q5_1
  const int8_t* q;
};

// A block of 256 (llama.cpp's Q8_K): one step, and the codes' sum over every 16.
struct A256 {
  float d;
  int16_t sums[16];
  int8_t q[256];
};

// max |x| over n (a multiple of 8) numbers; NaN where one is NaN.
float amax(const float* x, int64_t n) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 top = _mm256_setzero_ps(), bad = top;
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    top = _mm256_max_ps(top, _mm256_and_ps(v, magnitude));
  }
  if (_mm256_movemask_ps(bad)) return std::numeric_limits<float>::quiet_NaN();
  float lanes[8];
  _mm256_storeu_ps(lanes, top);
  return *std::max_element(lanes, lanes + 8);
}

// round(x * inv) for 32 numbers into q (int8), returning their sum.
int32_t codes(const float* x, float inv, int8_t* q) {
  const __m256 s = _mm256_set1_ps(inv);
  __m256i v[4];
  for (int j = 0; j < 4; ++j) v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * j), s));
  // packs keeps 128-bit lanes: the permute puts the 32 codes back in order.
  const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
  const __m256i ordered = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), ordered);
  int32_t sum = 0;
  for (int j = 0; j < 32; ++j) sum += q[j];
  return sum;
}

// One row into blocks of 32; false where it holds a NaN or an infinity (its outputs are then NaN).
// Rows whose largest number is under 1e-30 go in as zeros (1 / d would overflow float).
// llama.cpp's roundings, so that results agree with its own: q = round(x * 127 / max), the step d kept as
// float16 (Q8_0, Q8_1), and for Q8_1 d * sum(q) as float16 as well.
inline float as_half(float v) { return _cvtsh_ss(_cvtss_sh(v, 0)); }

bool quantize32(const float* x, int64_t K, float* d, float* s, float* s1, int8_t* q) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const float top = amax(x + 32 * b, 32);
    if (!std::isfinite(top)) return false;
    const float step = top / 127.f;
    const int32_t sum = codes(x + 32 * b, top > 1e-30f ? 127.f / top : 0.f, q + 32 * b);
    d[b] = as_half(step);
    s[b] = d[b] * sum;             // exact: what llama.cpp's integer offsets (q - 8, q - 16) come to
    s1[b] = as_half(step * sum);
  }
  return true;
}

bool quantize256(const float* x, int64_t K, A256* a) {
  for (int64_t b = 0; b < K / 256; ++b) {
    const float* xb = x + 256 * b;
    const float top = amax(xb, 256);
    if (!std::isfinite(top)) return false;
    const float inv = top > 1e-30f ? 127.f / top : 0.f;   // llama.cpp's Q8_K: iscale 127 / max, d = 1 / iscale
    a[b].d = inv > 0.f ? 1.f / inv : 0.f;
    for (int j = 0; j < 8; ++j) {
      codes(xb + 32 * j, inv, a[b].q + 32 * j);
      for (int h = 0; h < 2; ++h) {
        int32_t s = 0;
        for (int i = 0; i < 16; ++i) s += a[b].q[32 * j + 16 * h + i];
        a[b].sums[2 * j + h] = static_cast<int16_t>(s);
      }
    }
  }
  return true;
}

// ---- unpacking codes ---------------------------------------------------------------------------------------
// 16 bytes of nibbles as 32 codes: the low nibbles first, then the high ones (Q4_0's, Q4_1's, Q5's order).
inline __m256i nibbles(const uint8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

// 32 bits (little-endian) as 32 bytes: 0x10 where the bit is set (the fifth bit of Q5_0's and Q5_1's codes).
inline __m256i fifth_bits(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int32_t>(bits)),
      _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
}

// The int32 lanes of sum(codes * x) over 32 numbers, for unsigned codes (0..63) and int8 activations.
inline __m256i dot32(__m256i codes, const int8_t* x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, load(x)), _mm256_set1_epi16(1));
}

// The same, each pair sum weighed by `scales` (int16 lanes) before the int32 sums.
inline __m256i dot32(__m256i codes, const int8_t* x, __m256i scales) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, load(x)), scales);
}

// A K-quant's six-bit scales and mins, 8 of each in 12 bytes (llama.cpp's get_scale_min_k4, four at a time).
inline void scales_and_mins(const uint8_t* packed, uint8_t* scales, uint8_t* mins) {
  uint32_t u[3], out[4];
  std::memcpy(u, packed, 12);
  constexpr uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, top2 = 0x03030303;
  out[0] = u[0] & low6;
  out[1] = (u[2] & low4) | (((u[0] >> 6) & top2) << 4);
  out[2] = u[1] & low6;
  out[3] = ((u[2] >> 4) & low4) | (((u[1] >> 6) & top2) << 4);
  std::memcpy(scales, out, 8);
  std::memcpy(mins, out + 2, 8);
}

// ---- one row of weights . R rows of activations, per type -------------------------------------------------
// Each block is unpacked once and multiplied with up to 4 activation rows (a prompt's tokens), so a prefill
// pays the unpacking once per 4 tokens, not per token.
constexpr int MAX_R = 4;

// A block of 32 codes: w = d * q + coef (per number), q unsigned, or signed for Q8_0 (coef 0).
struct Codes32 {
  __m256i q;
  float d, coef;
};

template <int64_t T>
inline Codes32 unpack32(const uint8_t* w) {
  if constexpr (T == Q4_0) return {nibbles(w + 2), half(w), -8.f * half(w)};
  if constexpr (T == Q4_1) return {nibbles(w + 4), half(w), half(w + 2)};
  if constexpr (T == Q5_0) return {_mm256_or_si256(nibbles(w + 6), fifth_bits(w + 2)), half(w), -16.f * half(w)};
  if constexpr (T == Q5_1) return {_mm256_or_si256(nibbles(w + 8), fifth_bits(w + 4)), half(w), half(w + 2)};
  return {load(w + 2), half(w), 0.f};   // Q8_0
}

template <int64_t T>
constexpr int64_t bytes32() { return T == Q4_0 ? 18 : T == Q4_1 ? 20 : T == Q5_0 ? 22 : T == Q5_1 ? 24 : 34; }

// sum(codes * x) in int32 lanes, for unsigned codes, or signed ones (Q8_0: |q| times x with q's sign, as
// maddubs takes one unsigned operand).
template <int64_t T>
inline __m256i products(__m256i q, __m256i magnitude, const int8_t* x) {
  if constexpr (T == Q8_0)
    return _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(load(x), q)), _mm256_set1_epi16(1));
  return dot32(q, x);
}

// Blocks [b0, b1) of a row in the file's own layout, into acc and offset.
template <int64_t T, int R>
inline void plain32(const uint8_t* w, const Row32* a, int64_t b0, int64_t b1, __m256* acc, float* offset) {
  for (int64_t b = b0; b < b1; ++b) {
    const Codes32 c = unpack32<T>(w + (b - b0) * bytes32<T>());
    const __m256i magnitude = T == Q8_0 ? _mm256_sign_epi8(c.q, c.q) : c.q;
    for (int r = 0; r < R; ++r) {
      const __m256i p = products<T>(c.q, magnitude, a[r].q + 32 * b);
      if constexpr (T == Q4_1 || T == Q5_1) offset[r] += c.coef * a[r].s1[b];
      else if constexpr (T != Q8_0) offset[r] += c.coef * a[r].s[b];
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(c.d * a[r].d[b]), _mm256_cvtepi32_ps(p), acc[r]);
    }
  }
}

// Sol's interleaved layout (group() makes it at load; the same bytes as the file's): rows in groups of 8,
// and for each block of 32 inputs the 8 rows' float16 scales side by side (then their mins, for Q4_1 and
// Q5_1), then for Q5 their fifth bits (bit p of byte k: the fifth bit of code vector p's byte k), then their
// codes in vectors of 32 bytes: vector c holds 4 consecutive codes of each of the 8 rows (row r in bytes 4r..4r+3),
// nibbles packed two vectors to 32 bytes (low: inputs 4c.., high: 16 + 4c..; Q8_0: 8 vectors of int8).
// Each lane of a product is then a row: 4 activation bytes broadcast meet 8 rows' codes, and the float work
// (8 scales converted, multiplied and added) is done once per 8 rows, where one row at a time it is per row.
// The kernel's work per 32 weights halves (llama.cpp repacks its Q4_0 as 8 rows for the same reason).
constexpr int LANES = 8;

template <int64_t T>
constexpr int64_t codes_at() { return 16 + (T == Q4_1 || T == Q5_1 ? 16 : 0) + (T == Q5_0 || T == Q5_1 ? 32 : 0); }

inline __m256i broadcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
}

template <int P>
inline __m256i fifth_of(__m256i bits) {   // 0x10 where bit P of each byte is set
  const __m256i moved = P <= 4 ? _mm256_slli_epi16(bits, 4 - P) : _mm256_srli_epi16(bits, P - 4);
  return _mm256_and_si256(moved, _mm256_set1_epi8(0x10));
}

// Codes of 8 rows x 32 inputs: 8 vectors, vector p holding inputs 4p..4p+3 of each row (see above).
template <int64_t T>
inline void unpack8(const uint8_t* blk, __m256i* q) {
  const uint8_t* codes = blk + codes_at<T>();
  if constexpr (T == Q8_0) {
    for (int p = 0; p < 8; ++p) q[p] = load(codes + 32 * p);
    return;
  }
  const __m256i low = _mm256_set1_epi8(0x0f);
  for (int c = 0; c < 4; ++c) {
    const __m256i raw = load(codes + 32 * c);
    q[c] = _mm256_and_si256(raw, low);
    q[c + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
  }
  if constexpr (T == Q5_0 || T == Q5_1) {
    const __m256i bits = load(blk + codes_at<T>() - 32);
    q[0] = _mm256_or_si256(q[0], fifth_of<0>(bits));
    q[1] = _mm256_or_si256(q[1], fifth_of<1>(bits));
    q[2] = _mm256_or_si256(q[2], fifth_of<2>(bits));
    q[3] = _mm256_or_si256(q[3], fifth_of<3>(bits));
    q[4] = _mm256_or_si256(q[4], fifth_of<4>(bits));
    q[5] = _mm256_or_si256(q[5], fifth_of<5>(bits));
    q[6] = _mm256_or_si256(q[6], fifth_of<6>(bits));
    q[7] = _mm256_or_si256(q[7], fifth_of<7>(bits));
  }
}

// The 8 rows' int32 sums of codes x activations over one block (lane r: row r). Input j of the block is
// code vector j / 4 for j < 16 and 4 + (j - 16) / 4 above: vector p covers inputs 4p.. (p < 4) or 16 + 4(p - 4)..
template <int64_t T>
inline __m256i sums8(const __m256i* q, const int8_t* x) {
  const __m256i ones = _mm256_set1_epi16(1);
  auto at = [](int p) { return p < 4 ? 4 * p : 16 + 4 * (p - 4); };
  if constexpr (T == Q8_0) {   // signed x signed: |q| times x with q's sign; each pair sum can reach 32,258
    __m256i s = _mm256_setzero_si256();
    for (int p = 0; p < 8; ++p) {
      const __m256i v = T == Q8_0 ? broadcast4(x + 4 * p) : broadcast4(x + at(p));
      s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q[p], q[p]),
                                                                     _mm256_sign_epi8(v, q[p])), ones));
    }
    return s;
  }
  // unsigned codes: pair sums at most 2 x 31 x 127 = 7,874; four of them added stay under 32,767
  __m256i h0 = _mm256_maddubs_epi16(q[0], broadcast4(x + at(0)));
  __m256i h1 = _mm256_maddubs_epi16(q[4], broadcast4(x + at(4)));
  for (int p = 1; p < 4; ++p) {
    h0 = _mm256_add_epi16(h0, _mm256_maddubs_epi16(q[p], broadcast4(x + at(p))));
    h1 = _mm256_add_epi16(h1, _mm256_maddubs_epi16(q[p + 4], broadcast4(x + at(p + 4))));
  }
  return _mm256_add_epi32(_mm256_madd_epi16(h0, ones), _mm256_madd_epi16(h1, ones));
}

// 8 interleaved rows of n blocks against R activation rows: out[r * 8 + lane].
template <int64_t T, int R>
void rows8(const uint8_t* w, const Row32* a, int64_t n, float* out) {
  constexpr int64_t bytes = 8 * bytes32<T>();
  constexpr bool min = T == Q4_1 || T == Q5_1;
  __m256 acc[R], offset[R];
  for (int r = 0; r < R; ++r) acc[r] = offset[r] = _mm256_setzero_ps();
  __m256i q[8];
  for (int64_t b = 0; b < n; ++b, w += bytes) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    const __m256 m = min ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16))) : d;
    unpack8<T>(w, q);
    for (int r = 0; r < R; ++r) {
      const __m256i s = sums8<T>(q, a[r].q + 32 * b);
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(a[r].d[b])), _mm256_cvtepi32_ps(s), acc[r]);
      if constexpr (T != Q8_0) offset[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(min ? a[r].s1[b] : a[r].s[b]), offset[r]);
    }
  }
  // the offsets: - 8 d or - 16 d (Q4_0, Q5_0), + m (Q4_1, Q5_1) times each block's activation sum
  const __m256 scale = _mm256_set1_ps(T == Q4_0 ? -8.f : T == Q5_0 ? -16.f : T == Q8_0 ? 0.f : 1.f);
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + LANES * r, _mm256_fmadd_ps(scale, offset[r], acc[r]));
}

// One row of n blocks (the file's layout) against R activation rows.
template <int64_t T, int R>
void rows32(const uint8_t* w, const Row32* a, int64_t n, float* out) {
  __m256 acc[R];
  float offset[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), offset[r] = 0.f;
  plain32<T, R>(w, a, 0, n, acc, offset);
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) + offset[r];
}

// A K-quant super-block of 256: 8 vectors of 32 codes with the scale (int16 lanes) of each, and the int32
// offset per activation-sum of 16: sum_j (min_j or 32 * scale_j) * sums_j, subtracted in d's or dmin's units.
struct CodesK {
  __m256i q[8], scale[8];
  float d, dmin;
  int16_t mins[16];   // per 16 numbers: what multiplies that group's activation sum (subtracted)
};

template <int64_t T>
inline void unpack_k(const uint8_t* w, CodesK& c) {
  const __m256i low = _mm256_set1_epi8(0x0f);
  if constexpr (T == Q6_K) {
    const __m256i two = _mm256_set1_epi8(3);
    const int8_t* sc = reinterpret_cast<const int8_t*>(w + 192);
    c.d = half(w + 208);
    c.dmin = c.d;   // the codes are stored + 32: 32 * scale per group, in d's units
    for (int h = 0; h < 2; ++h) {   // two halves of 128 numbers: 64 bytes of low nibbles, 32 of high pairs
      const __m256i la = load(w + 64 * h), lb = load(w + 64 * h + 32), hi = load(w + 128 + 32 * h);
      c.q[4 * h] = _mm256_or_si256(_mm256_and_si256(la, low), _mm256_slli_epi16(_mm256_and_si256(hi, two), 4));
      c.q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(lb, low),
                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hi, 2), two), 4));
      c.q[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(la, 4), low),
                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hi, 4), two), 4));
      c.q[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lb, 4), low),
                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hi, 6), two), 4));
    }
    for (int j = 0; j < 8; ++j)   // 32 numbers: two sub-blocks of 16, each with its own scale
      c.scale[j] = _mm256_set_m128i(_mm_set1_epi16(sc[2 * j + 1]), _mm_set1_epi16(sc[2 * j]));
    for (int j = 0; j < 16; ++j) c.mins[j] = static_cast<int16_t>(32 * sc[j]);
    return;
  }
  uint8_t sc[8], mn[8];
  scales_and_mins(w + 4, sc, mn);
  c.d = half(w);
  c.dmin = half(w + 2);
  const uint8_t* qs = w + (T == Q5_K ? 48 : 16);
  const __m256i high = T == Q5_K ? load(w + 16) : _mm256_setzero_si256(), one = _mm256_set1_epi8(1);
  for (int k = 0; k < 4; ++k) {   // 64 numbers: 32 low nibbles (sub-block 2k), 32 high (2k + 1)
    const __m256i raw = load(qs + 32 * k);
    c.q[2 * k] = _mm256_and_si256(raw, low);
    c.q[2 * k + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
    if constexpr (T == Q5_K) {   // bit j of byte l: the fifth bit of number l of sub-block j
      c.q[2 * k] = _mm256_or_si256(c.q[2 * k],
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high, 2 * k), one), 4));
      c.q[2 * k + 1] = _mm256_or_si256(
          c.q[2 * k + 1], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high, 2 * k + 1), one), 4));
    }
  }
  for (int j = 0; j < 8; ++j) {
    c.scale[j] = _mm256_set1_epi16(sc[j]);
    c.mins[2 * j] = c.mins[2 * j + 1] = mn[j];
  }
}

template <int64_t T, int R>
void rows_k(const uint8_t* w, const A256* const* a, int64_t n, float* out) {
  constexpr int64_t bytes = T == Q4_K ? 144 : T == Q5_K ? 176 : 210;
  __m256 acc[R];
  float offset[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), offset[r] = 0.f;
  CodesK c;
  for (int64_t b = 0; b < n; ++b, w += bytes) {
    unpack_k<T>(w, c);
    for (int r = 0; r < R; ++r) {
      const A256& x = a[r][b];
      __m256i sum = _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) sum = _mm256_add_epi32(sum, dot32(c.q[j], x.q + 32 * j, c.scale[j]));
      // sum_j mins_j * sums_j: 16 int16 products in pairs (at most 2 x 4096 x 32767, no overflow)
      const __m256i mins = _mm256_madd_epi16(load(c.mins), load(x.sums));
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(c.d * x.d), _mm256_cvtepi32_ps(sum), acc[r]);
      offset[r] -= c.dmin * x.d * hsum(_mm256_cvtepi32_ps(mins));
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) + offset[r];
}

inline __m256 widen_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// F16 and BF16 rows: widened to float32, multiplied with the float activations (no int8 codes).
template <int64_t T, int R>
void rows_half(const uint8_t* w, const float* const* x, int64_t n, float* out) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(w);
  auto widen = [h](int64_t i) {
    return T == F16 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))) : widen_bf16(h + i);
  };
  // Four sums a row for one activation row (an FMA's latency is four of its issue slots); two for more.
  constexpr int S = R == 1 ? 4 : 2;
  __m256 acc[R][S];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < S; ++k) acc[r][k] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 * S <= n; i += 8 * S)
    for (int k = 0; k < S; ++k) {
      const __m256 v = widen(i + 8 * k);
      for (int r = 0; r < R; ++r) acc[r][k] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x[r] + i + 8 * k), acc[r][k]);
    }
  for (; i + 8 <= n; i += 8) {
    const __m256 v = widen(i);
    for (int r = 0; r < R; ++r) acc[r][0] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x[r] + i), acc[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    __m256 t = acc[r][0];
    for (int k = 1; k < S; ++k) t = _mm256_add_ps(t, acc[r][k]);
    float s = hsum(t);
    for (int64_t k = i; k < n; ++k) s += (T == F16 ? _cvtsh_ss(h[k]) : bf16_to_float(h[k])) * x[r][k];
    out[r] = s;
  }
}


// ---- K-quants in Sol's interleaved layout ----------------------------------------------------------------------
// The same idea for super-blocks of 256: 8 rows side by side, each byte of each row's super-block moved to
// where a lane-per-row product wants it (k_place below): d and dmin of the 8 rows together; the 12 bytes of
// 6-bit scales and mins as three 32-byte vectors, word w of row r in lane r (decoded for 8 rows at once,
// as llama.cpp's get_scale_min_k4 does for one); the codes as vectors of 4 bytes a row (like rows8).
inline __m256i bytes_as_pairs(__m256i v, int byte) {   // byte `byte` of each int32 lane, as two int16 copies
  const char b = static_cast<char>(byte);
  const __m256i control = _mm256_setr_epi8(b, -1, b, -1, b + 4, -1, b + 4, -1, b + 8, -1, b + 8, -1, b + 12, -1, b + 12, -1,
                                           b, -1, b, -1, b + 4, -1, b + 4, -1, b + 8, -1, b + 8, -1, b + 12, -1, b + 12, -1);
  return _mm256_shuffle_epi8(v, control);
}

inline __m256i signed_pairs(__m256i v, int byte) {   // the same, sign-extended (Q6_K's int8 scales)
  const char b = static_cast<char>(byte);
  const __m256i control = _mm256_setr_epi8(-1, b, -1, b, -1, b + 4, -1, b + 4, -1, b + 8, -1, b + 8, -1, b + 12, -1, b + 12,
                                           -1, b, -1, b, -1, b + 4, -1, b + 4, -1, b + 8, -1, b + 8, -1, b + 12, -1, b + 12);
  return _mm256_srai_epi16(_mm256_shuffle_epi8(v, control), 8);
}

inline __m256i pair_of(const int16_t* sums, int j) {   // activation sums j and j + 1 as one int32, broadcast
  int32_t v;
  std::memcpy(&v, sums + j, 4);
  return _mm256_set1_epi32(v);
}

template <int P>
inline __m256i bit_to_4(__m256i bits) {   // 0x10 where bit P of each byte is set
  const __m256i moved = P <= 4 ? _mm256_slli_epi16(bits, 4 - P) : _mm256_srli_epi16(bits, P - 4);
  return _mm256_and_si256(moved, _mm256_set1_epi8(0x10));
}

template <int64_t T, int K4>
inline void sub_pair(const uint8_t* codes, const uint8_t* qh, __m256i sc_lo, __m256i sc_hi, const A256* const* a,
                     int R, __m256i* sum) {
  // sub-blocks 2 K4 (low nibbles) and 2 K4 + 1 (high nibbles): 8 vectors of 4 bytes a row each
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i s0 = bytes_as_pairs(2 * K4 < 4 ? sc_lo : sc_hi, (2 * K4) % 4);
  const __m256i s1 = bytes_as_pairs(2 * K4 + 1 < 4 ? sc_lo : sc_hi, (2 * K4 + 1) % 4);
  __m256i h0[MAX_R], h1[MAX_R], g0[MAX_R], g1[MAX_R];
  for (int r = 0; r < R; ++r) h0[r] = h1[r] = g0[r] = g1[r] = _mm256_setzero_si256();
  for (int c = 0; c < 8; ++c) {
    const __m256i raw = load(codes + 32 * (8 * K4 + c));
    __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
    if constexpr (T == Q5_K) {
      const __m256i bits = load(qh + 32 * c);
      lo = _mm256_or_si256(lo, bit_to_4<2 * K4>(bits));
      hi = _mm256_or_si256(hi, bit_to_4<2 * K4 + 1>(bits));
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* x = a[r]->q + 64 * K4 + 4 * c;
      const __m256i p0 = _mm256_maddubs_epi16(lo, broadcast4(x)), p1 = _mm256_maddubs_epi16(hi, broadcast4(x + 32));
      // pair sums at most 2 x 31 x 127 = 7,874: four added stay in int16
      if (c < 4) h0[r] = _mm256_add_epi16(h0[r], p0), h1[r] = _mm256_add_epi16(h1[r], p1);
      else g0[r] = _mm256_add_epi16(g0[r], p0), g1[r] = _mm256_add_epi16(g1[r], p1);
    }
  }
  for (int r = 0; r < R; ++r)
    sum[r] = _mm256_add_epi32(sum[r], _mm256_add_epi32(
        _mm256_add_epi32(_mm256_madd_epi16(h0[r], s0), _mm256_madd_epi16(g0[r], s0)),
        _mm256_add_epi32(_mm256_madd_epi16(h1[r], s1), _mm256_madd_epi16(g1[r], s1))));
}

template <int64_t T, int R>
void rows8_k(const uint8_t* w, const A256* const* a, int64_t n, float* out) {
  constexpr int64_t bytes = 8 * (T == Q4_K ? 144 : 176);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i low6 = _mm256_set1_epi32(0x3f3f3f3f), low4 = _mm256_set1_epi32(0x0f0f0f0f),
                top2 = _mm256_set1_epi32(0x03030303);
  for (int64_t b = 0; b < n; ++b, w += bytes) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)));
    const __m256i u0 = load(w + 32), u1 = load(w + 64), u2 = load(w + 96);
    const __m256i sc_lo = _mm256_and_si256(u0, low6);
    const __m256i sc_hi = _mm256_or_si256(_mm256_and_si256(u2, low4),
                                          _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u0, 6), top2), 4));
    const __m256i mn_lo = _mm256_and_si256(u1, low6);
    const __m256i mn_hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u2, 4), low4),
                                          _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u1, 6), top2), 4));
    const uint8_t* codes = w + (T == Q5_K ? 384 : 128);
    const uint8_t* qh = w + 128;
    const A256* blk[MAX_R];
    __m256i sum[MAX_R], mins[MAX_R];
    for (int r = 0; r < R; ++r) {
      blk[r] = &a[r][b];
      sum[r] = _mm256_setzero_si256();
      // sum_j min_j * (sums_2j + sums_2j+1), two sub-blocks a madd: lanes (min_j, min_j) x (s_2j, s_2j+1)
      mins[r] = _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j)
        mins[r] = _mm256_add_epi32(mins[r], _mm256_madd_epi16(bytes_as_pairs(j < 4 ? mn_lo : mn_hi, j % 4),
                                                              pair_of(blk[r]->sums, 2 * j)));
    }
    sub_pair<T, 0>(codes, qh, sc_lo, sc_hi, blk, R, sum);
    sub_pair<T, 1>(codes, qh, sc_lo, sc_hi, blk, R, sum);
    sub_pair<T, 2>(codes, qh, sc_lo, sc_hi, blk, R, sum);
    sub_pair<T, 3>(codes, qh, sc_lo, sc_hi, blk, R, sum);
    for (int r = 0; r < R; ++r) {
      const __m256 dx = _mm256_set1_ps(blk[r]->d);
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(sum[r]), acc[r]);
      acc[r] = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, dx), _mm256_cvtepi32_ps(mins[r]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + LANES * r, acc[r]);
}

template <int H, int A>
inline void q6_quarter(const uint8_t* ql, const uint8_t* qh, const __m256i* scv, const A256* const* a, int R,
                       __m256i* sum) {
  // values 128 H + 32 A + (0..31) (low nibbles) and 128 H + 64 + 32 A + (0..31) (high): sub-blocks of 16
  const __m256i low = _mm256_set1_epi8(0x0f), two = _mm256_set1_epi8(3);
  for (int half16 = 0; half16 < 2; ++half16) {   // c in 0..3, then 4..7: one sub-block of 16 each
    const int slo = 8 * H + 2 * A + half16, shi = slo + 4;
    const __m256i sc_lo = signed_pairs(scv[slo / 4], slo % 4), sc_hi = signed_pairs(scv[shi / 4], shi % 4);
    __m256i p_lo[MAX_R], p_hi[MAX_R];
    for (int r = 0; r < R; ++r) p_lo[r] = p_hi[r] = _mm256_setzero_si256();
    for (int cc = 0; cc < 4; ++cc) {
      const int c = 4 * half16 + cc;
      const __m256i raw = load(ql + 32 * (16 * H + 8 * A + c)), bits = load(qh + 32 * (8 * H + c));
      const __m256i lo = _mm256_or_si256(_mm256_and_si256(raw, low),
                                         _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bits, 2 * A), two), 4));
      const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low),
                                         _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bits, 4 + 2 * A), two), 4));
      for (int r = 0; r < R; ++r) {
        const int8_t* x = a[r]->q + 128 * H + 32 * A + 4 * c;
        // pair sums at most 2 x 63 x 127 = 16,002: two added stay in int16, then weighed by the scale
        const __m256i l = _mm256_maddubs_epi16(lo, broadcast4(x)), h = _mm256_maddubs_epi16(hi, broadcast4(x + 64));
        if (cc % 2 == 0) {
          p_lo[r] = l, p_hi[r] = h;
        } else {
          sum[r] = _mm256_add_epi32(sum[r], _mm256_add_epi32(_mm256_madd_epi16(_mm256_add_epi16(p_lo[r], l), sc_lo),
                                                             _mm256_madd_epi16(_mm256_add_epi16(p_hi[r], h), sc_hi)));
        }
      }
    }
  }
}

template <int R>
void rows8_q6k(const uint8_t* w, const A256* const* a, int64_t n, float* out) {
  constexpr int64_t bytes = 8 * 210;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < n; ++b, w += bytes) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    const __m256i scv[4] = {load(w + 16), load(w + 48), load(w + 80), load(w + 112)};
    const uint8_t *ql = w + 144, *qh = w + 1168;
    const A256* blk[MAX_R];
    __m256i sum[MAX_R], offset[MAX_R];
    for (int r = 0; r < R; ++r) {
      blk[r] = &a[r][b];
      sum[r] = offset[r] = _mm256_setzero_si256();
      for (int j = 0; j < 16; j += 2)   // the codes are stored + 32: 32 x sum_j scale_j x sums_j, subtracted
        offset[r] = _mm256_add_epi32(offset[r], _mm256_madd_epi16(
            _mm256_blend_epi16(signed_pairs(scv[j / 4], j % 4), signed_pairs(scv[(j + 1) / 4], (j + 1) % 4), 0xAA),
            pair_of(blk[r]->sums, j)));
    }
    q6_quarter<0, 0>(ql, qh, scv, blk, R, sum);
    q6_quarter<0, 1>(ql, qh, scv, blk, R, sum);
    q6_quarter<1, 0>(ql, qh, scv, blk, R, sum);
    q6_quarter<1, 1>(ql, qh, scv, blk, R, sum);
    for (int r = 0; r < R; ++r) {
      const __m256i total = _mm256_sub_epi32(sum[r], _mm256_slli_epi32(offset[r], 5));
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(blk[r]->d)), _mm256_cvtepi32_ps(total), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + LANES * r, acc[r]);
}

// One weight row against R (1..4) activation rows, in the form its type takes them.
template <int R>
void dot_rows(int64_t type, const uint8_t* w, int64_t K, const float* const* x, const Row32* a32,
              const A256* const* a256, float* out) {
  switch (type) {
    case Q4_0: return rows32<Q4_0, R>(w, a32, K / 32, out);
    case Q4_1: return rows32<Q4_1, R>(w, a32, K / 32, out);
    case Q5_0: return rows32<Q5_0, R>(w, a32, K / 32, out);
    case Q5_1: return rows32<Q5_1, R>(w, a32, K / 32, out);
    case Q8_0: return rows32<Q8_0, R>(w, a32, K / 32, out);
    // Sol's interleaved layout: w is a group of 8 rows, out 8 numbers per activation row
    case GROUPED + Q4_0: return rows8<Q4_0, R>(w, a32, K / 32, out);
    case GROUPED + Q4_1: return rows8<Q4_1, R>(w, a32, K / 32, out);
    case GROUPED + Q5_0: return rows8<Q5_0, R>(w, a32, K / 32, out);
    case GROUPED + Q5_1: return rows8<Q5_1, R>(w, a32, K / 32, out);
    case GROUPED + Q8_0: return rows8<Q8_0, R>(w, a32, K / 32, out);
    case GROUPED + Q4_K: return rows8_k<Q4_K, R>(w, a256, K / 256, out);
    case GROUPED + Q5_K: return rows8_k<Q5_K, R>(w, a256, K / 256, out);
    case GROUPED + Q6_K: return rows8_q6k<R>(w, a256, K / 256, out);
    case Q4_K: return rows_k<Q4_K, R>(w, a256, K / 256, out);
    case Q5_K: return rows_k<Q5_K, R>(w, a256, K / 256, out);
    case Q6_K: return rows_k<Q6_K, R>(w, a256, K / 256, out);
    case F16: return rows_half<F16, R>(w, x, K, out);
    default: return rows_half<BF16, R>(w, x, K, out);
  }
}

void dot(int64_t type, const uint8_t* w, int64_t K, int R, const float* const* x, const Row32* a32,
         const A256* const* a256, float* out) {
  switch (R) {
    case 1: return dot_rows<1>(type, w, K, x, a32, a256, out);
    case 2: return dot_rows<2>(type, w, K, x, a32, a256, out);
    case 3: return dot_rows<3>(type, w, K, x, a32, a256, out);
    default: return dot_rows<4>(type, w, K, x, a32, a256, out);
  }
}

// ---- Sol's interleaved layout (see rows8) -------------------------------------------------------------------
// Where byte i (0..31 of the block's codes) of row r goes: (vector, byte in it, high nibble?) for 4-bit codes
// (i < 16: inputs i and 16 + i), and the interleaved block's byte for Q8_0's code i.
struct Place {
  int vector, byte;
};

inline Place place4(int r, int input) {   // input 0..31 of row r: which nibble vector and byte
  const int p = input < 16 ? input / 4 : 4 + (input - 16) / 4;
  return {p, 4 * r + input % 4};
}

// Where byte i of row r's K-quant super-block lies in the interleaved group (rows8_k, rows8_q6k).
int64_t k_place(int64_t T, int r, int64_t i) {
  auto lanes4 = [r](int64_t vector, int64_t byte) { return 32 * vector + 4 * r + byte; };
  if (T == Q6_K) {
    if (i >= 208) return 2 * r + (i - 208);                                  // d
    if (i >= 192) return 16 + lanes4((i - 192) / 4, i % 4);                  // 16 int8 scales
    if (i >= 128) return 1168 + lanes4((i - 128) / 4, i % 4);                // qh: 32 h + 4 c + byte
    return 144 + lanes4(i / 4, i % 4);                                       // ql: 64 h + 32 a + 4 c + byte
  }
  if (i < 4) return 16 * (i / 2) + 2 * r + i % 2;                            // d, dmin
  if (i < 16) return 32 + lanes4((i - 4) / 4, i % 4);                        // the 3 words of scales and mins
  if (T == Q5_K && i < 48) return 128 + lanes4((i - 16) / 4, i % 4);         // qh
  const int64_t q = i - (T == Q5_K ? 48 : 16);
  return (T == Q5_K ? 384 : 128) + lanes4(q / 4, q % 4);                     // qs: 32 k + 4 c + byte
}

// 8 rows of n blocks each (the file's layout, `stride` bytes a row) into one interleaved group. Everything
// moves in runs of 4 bytes (a nibble byte holds inputs j and 16 + j of one row, as the interleaved vectors
// want them) but the float16 scales and Q5's fifth bits.
void group8(int64_t T, const uint8_t* in, int64_t stride, int64_t n, uint8_t* out) {
  const int64_t bytes = shape_of(T).bytes;
  if (k_quant(T)) {
    const int64_t halves = T == Q6_K ? 208 : 0, words = T == Q6_K ? 0 : 4;   // d (and dmin): 2-byte moves
    for (int64_t b = 0; b < n; ++b)
      for (int r = 0; r < 8; ++r) {
        const uint8_t* blk = in + r * stride + b * bytes;
        uint8_t* g = out + b * 8 * bytes;
        for (int64_t i = halves; i < halves + 4 && i < bytes; i += 2) std::memcpy(g + k_place(T, r, i), blk + i, 2);
        const int64_t end = T == Q6_K ? 208 : bytes;
        for (int64_t i = words; i < end; i += 4) std::memcpy(g + k_place(T, r, i), blk + i, 4);
      }
    return;
  }
  const bool min = T == Q4_1 || T == Q5_1, five = T == Q5_0 || T == Q5_1;
  const int64_t head = 2 + (min ? 2 : 0), at = 16 + (min ? 16 : 0) + (five ? 32 : 0);
  for (int64_t b = 0; b < n; ++b) {
    uint8_t* g = out + b * 8 * bytes;
    if (five) std::memset(g + at - 32, 0, 32);
    for (int r = 0; r < 8; ++r) {
      const uint8_t* blk = in + r * stride + b * bytes;
      std::memcpy(g + 2 * r, blk, 2);
      if (min) std::memcpy(g + 16 + 2 * r, blk + 2, 2);
      const uint8_t* qs = blk + head + (five ? 4 : 0);
      for (int c = 0; c < (T == Q8_0 ? 8 : 4); ++c) std::memcpy(g + at + 32 * c + 4 * r, qs + 4 * c, 4);
      if (five) {
        uint32_t high;
        std::memcpy(&high, blk + head, 4);
        for (int v = 0; v < 8; ++v)
          for (int i = 0; i < 4; ++i) {
            const int input = (v < 4 ? 4 * v : 16 + 4 * (v - 4)) + i;
            g[at - 32 + 4 * r + i] |= static_cast<uint8_t>(((high >> input) & 1) << v);
          }
      }
    }
  }
}

// Row r (0..7) of an interleaved group back in the file's layout (a token table's lookup).
void ungroup_row(int64_t T, const uint8_t* in, int64_t n, int r, uint8_t* out) {
  if (k_quant(T)) {
    const int64_t bytes = shape_of(T).bytes;
    for (int64_t b = 0; b < n; ++b)
      for (int64_t i = 0; i < bytes; ++i) out[b * bytes + i] = in[b * 8 * bytes + k_place(T, r, i)];
    return;
  }
  const int64_t bytes = shape_of(T).bytes;
  const bool min = T == Q4_1 || T == Q5_1, five = T == Q5_0 || T == Q5_1;
  const int64_t head = 2 + (min ? 2 : 0), at = 16 + (min ? 16 : 0) + (five ? 32 : 0);
  for (int64_t b = 0; b < n; ++b) {
    const uint8_t* g = in + b * 8 * bytes;
    uint8_t* blk = out + b * bytes;
    std::memcpy(blk, g + 2 * r, 2);
    if (min) std::memcpy(blk + 2, g + 16 + 2 * r, 2);
    if (T == Q8_0) {
      for (int i = 0; i < 32; ++i) blk[2 + i] = g[at + 32 * (i / 4) + 4 * r + i % 4];
      continue;
    }
    uint32_t high = 0;
    uint8_t* qs = blk + head + (five ? 4 : 0);
    std::memset(qs, 0, 16);
    for (int input = 0; input < 32; ++input) {
      const Place pl = place4(r, input);
      const int code = (g[at + 32 * (pl.vector % 4) + pl.byte] >> (pl.vector < 4 ? 0 : 4)) & 15;
      qs[input % 16] |= static_cast<uint8_t>(code << (input < 16 ? 0 : 4));
      if (five && ((g[at - 32 + pl.byte] >> pl.vector) & 1)) high |= 1u << input;
    }
    if (five) std::memcpy(blk + head, &high, 4);
  }
}

// ---- dequantizing rows (the token table's lookups) ----------------------------------------------------------
void row_to_float(int64_t type, const uint8_t* w, int64_t K, float* y) {
  const Shape s = shape_of(type);
  TORCH_CHECK(type < GROUPED, "sol_blocks: interleaved rows are looked up through their group");
  for (int64_t b = 0; b < K / s.numbers; ++b, w += s.bytes, y += s.numbers) {
    switch (type) {
      case F16: y[0] = half(w); break;
      case BF16: {
        const uint32_t bits = static_cast<uint32_t>(w[0] | (w[1] << 8)) << 16;
        std::memcpy(y, &bits, 4);
        break;
      }
      case Q8_0:
        for (int j = 0; j < 32; ++j) y[j] = half(w) * static_cast<int8_t>(w[2 + j]);
        break;
      case Q4_0: case Q4_1: case Q5_0: case Q5_1: {
        const bool five = type == Q5_0 || type == Q5_1, min = type == Q4_1 || type == Q5_1;
        const float d = half(w), m = min ? half(w + 2) : 0.f;
        const uint8_t* qs = w + (min ? 4 : 2) + (five ? 4 : 0);
        uint32_t high = 0;
        if (five) std::memcpy(&high, w + (min ? 4 : 2), 4);
        const int offset = min ? 0 : five ? 16 : 8;
        for (int j = 0; j < 16; ++j) {
          const int lo = (qs[j] & 15) | (((high >> j) & 1) << 4), hi = (qs[j] >> 4) | (((high >> (j + 16)) & 1) << 4);
          y[j] = d * (lo - offset) + m;
          y[j + 16] = d * (hi - offset) + m;
        }
        break;
      }
      case Q4_K: case Q5_K: {
        uint8_t sc[8], mn[8];
        scales_and_mins(w + 4, sc, mn);
        const float d = half(w), dmin = half(w + 2);
        const bool five = type == Q5_K;
        const uint8_t *qh = w + 16, *qs = w + (five ? 48 : 16);
        for (int j = 0; j < 8; ++j)
          for (int l = 0; l < 32; ++l) {
            const int nib = (j % 2 ? qs[32 * (j / 2) + l] >> 4 : qs[32 * (j / 2) + l] & 15);
            const int q = nib | (five ? ((qh[l] >> j) & 1) << 4 : 0);
            y[32 * j + l] = d * sc[j] * q - dmin * mn[j];
          }
        break;
      }
      case Q6_K: {
        const int8_t* sc = reinterpret_cast<const int8_t*>(w + 192);
        const float d = half(w + 208);
        for (int i = 0; i < 256; ++i) {
          const int h = i / 128, c = (i % 128) / 32, l = i % 32;
          const uint8_t lb = w[64 * h + 32 * (c % 2) + l], hb = w[128 + 32 * h + l];
          const int q = ((c < 2 ? lb & 15 : lb >> 4) | (((hb >> (2 * c)) & 3) << 4)) - 32;
          y[i] = d * sc[i / 16] * q;
        }
        break;
      }
    }
  }
}

}  // namespace

std::vector<Part> check_parts(const std::vector<at::Tensor>& parts, const std::vector<int64_t>& types, int64_t K,
                              int64_t O) {
  TORCH_CHECK(!parts.empty() && parts.size() == types.size(), "sol_blocks: one type for each of the parts");
  std::vector<Part> out;
  int64_t rows = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    const at::Tensor& p = parts[i];
    const Shape s = shape_of(types[i]);
    TORCH_CHECK(s.numbers > 0, "sol_blocks: part ", i, " has GGML type ", types[i], ", which these kernels do not read");
    TORCH_CHECK(K % s.numbers == 0, "sol_blocks: ", K, " inputs are not whole blocks of ", s.numbers);
    TORCH_CHECK(p.dim() == 2 && p.scalar_type() == at::kByte && p.is_contiguous() && p.device().is_cpu() &&
                p.size(1) == K / s.numbers * s.bytes, "sol_blocks: part ", i, " must be contiguous uint8 rows of ",
                K / s.numbers * s.bytes, " bytes");
    out.push_back({p.data_ptr<uint8_t>(), types[i], p.size(0), p.size(1)});
    rows += p.size(0);
  }
  TORCH_CHECK(rows == O, "sol_blocks: the parts hold ", rows, " rows; the layer has ", O, " outputs");
  return out;
}

void product(const float* x, int64_t M, int64_t K, const std::vector<Part>& parts, int64_t O, const float* b,
             float* y) {
  if (M == 0 || O == 0) return;
  bool want32 = false, want256 = false;
  for (const Part& p : parts) {
    const int64_t base = p.type > GROUPED ? p.type - GROUPED : p.type;
    want32 |= !plain(base) && !k_quant(base);
    want256 |= k_quant(base);
  }
  std::vector<float> d32(want32 ? M * (K / 32) : 0), s32(d32.size()), s1_32(d32.size());
  std::vector<int8_t> q32(want32 ? M * K : 0);
  std::vector<A256> a256(want256 ? M * (K / 256) : 0);
  std::vector<char> finite(M, 1);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      bool ok = true;
      if (want32)
        ok &= quantize32(x + m * K, K, d32.data() + m * (K / 32), s32.data() + m * (K / 32), s1_32.data() + m * (K / 32),
                         q32.data() + m * K);
      if (want256) ok &= quantize256(x + m * K, K, a256.data() + m * (K / 256));
      if (!want32 && !want256)
        for (int64_t k = 0; k < K && ok; ++k) ok = std::isfinite(x[m * K + k]);
      finite[m] = ok;
    }
  });
  // Units of work: a row, or a group of 8 interleaved rows; first[i], unit0[i]: part i's first row and unit.
  std::vector<int64_t> first(parts.size() + 1, 0), unit0(parts.size() + 1, 0);
  for (size_t i = 0; i < parts.size(); ++i) {
    first[i + 1] = first[i] + parts[i].rows;
    unit0[i + 1] = unit0[i] + (parts[i].type > GROUPED ? parts[i].rows / LANES : parts[i].rows);
  }
  // Enough rows a task that a thread's share outweighs waking it (~5 us): about 64 KB of weights.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, parts[0].stride * std::min<int64_t>(M, 8)));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  at::parallel_for(0, unit0.back(), grain, [&](int64_t u0, int64_t u1) {
    size_t i = 0;
    const float* xs[MAX_R];
    Row32 a32s[MAX_R];
    const A256* a256s[MAX_R];
    float got[MAX_R * LANES];
    for (int64_t u = u0; u < u1; ++u) {
      while (u >= unit0[i + 1]) ++i;
      const Part& p = parts[i];
      const int lanes = p.type > GROUPED ? LANES : 1;
      const int64_t o = first[i] + (u - unit0[i]) * lanes;   // the unit's first output row
      const uint8_t* row = p.w + (o - first[i]) * p.stride;
      for (int64_t m = 0; m < M; m += MAX_R) {
        const int R = static_cast<int>(std::min<int64_t>(MAX_R, M - m));
        for (int r = 0; r < R; ++r) {
          xs[r] = x + (m + r) * K;
          const int64_t at = (m + r) * (K / 32);
          if (want32) a32s[r] = {d32.data() + at, s32.data() + at, s1_32.data() + at, q32.data() + (m + r) * K};
          a256s[r] = want256 ? a256.data() + (m + r) * (K / 256) : nullptr;
        }
        dot(p.type, row, K, R, xs, a32s, a256s, got);
        for (int r = 0; r < R; ++r)
          for (int l = 0; l < lanes; ++l)
            y[(m + r) * O + o + l] = finite[m + r] ? got[r * lanes + l] + (b ? b[o + l] : 0.f) : nan;
      }
    }
  });
}

}  // namespace sol_blocks

namespace {

at::Tensor linear(const at::Tensor& x, std::vector<at::Tensor> parts, std::vector<int64_t> types,
                  const c10::optional<at::Tensor>& bias, int64_t in_features, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "sol_blocks::linear: x must be a contiguous float32 (rows, inputs) CPU tensor");
  const int64_t M = x.size(0), K = x.size(1), O = out_features;
  TORCH_CHECK(K == in_features, "sol_blocks::linear: the layer takes ", in_features, " inputs, x has ", K);
  const std::vector<sol_blocks::Part> ps = sol_blocks::check_parts(parts, types, K, O);
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == O,
                "sol_blocks::linear: bias must be ", O, " contiguous float32 numbers");
    b = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({M, O}, x.options());
  sol_blocks::product(x.data_ptr<float>(), M, K, ps, O, b, y.data_ptr<float>());
  return y;
}

// The rows `ids` of one part as float32 (n, width): a token table's lookups.
at::Tensor rows(const at::Tensor& blocks, int64_t type, const at::Tensor& ids, int64_t width) {
  const std::vector<sol_blocks::Part> ps = sol_blocks::check_parts({blocks}, {type}, width, blocks.size(0));
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.device().is_cpu(), "sol_blocks::rows: ids must be int64");
  const at::Tensor flat = ids.contiguous().view(-1);
  const int64_t n = flat.numel(), R = blocks.size(0);
  const int64_t* ip = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < R, "sol_blocks::rows: index ", ip[i], " is out of range for ", R, " rows");
  at::Tensor y = at::empty({n, width}, blocks.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const int64_t stride = ps[0].stride;
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    std::vector<uint8_t> plain_row(type > sol_blocks::GROUPED ? stride : 0);
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* w = ps[0].w + ip[i] * stride;
      int64_t t = type;
      if (type > sol_blocks::GROUPED) {   // the row's bytes are spread over its group of 8: gather them
        t = type - sol_blocks::GROUPED;
        const int64_t group = ip[i] / sol_blocks::LANES * sol_blocks::LANES;
        sol_blocks::ungroup_row(t, ps[0].w + group * stride, width / sol_blocks::shape_of(t).numbers,
                                static_cast<int>(ip[i] - group), plain_row.data());
        w = plain_row.data();
      }
      sol_blocks::row_to_float(t, w, width, yp + i * width);
    }
  });
  return y;
}

// A part of Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 rows (a multiple of 8 of them) in Sol's interleaved layout (type
// GROUPED + type; see rows8): the same bytes.
// Written into `out` (its own memory: a slice of a region the caller holds, so a model's copies do not
// scatter over the allocator's heap).
at::Tensor group(const at::Tensor& blocks, int64_t type, at::Tensor out) {
  const sol_blocks::Shape s = sol_blocks::shape_of(type);
  TORCH_CHECK(s.numbers > 1 && blocks.dim() == 2 &&
              blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.size(1) % s.bytes == 0 &&
              blocks.size(0) % sol_blocks::LANES == 0,
              "sol_blocks::group: contiguous uint8 rows (a multiple of 8) of a quantized type's blocks");
  TORCH_CHECK(out.sizes() == blocks.sizes() && out.scalar_type() == at::kByte && out.is_contiguous() &&
              out.data_ptr() != blocks.data_ptr(), "sol_blocks::group: out must be other contiguous uint8 rows of the same shape");
  const int64_t groups = blocks.size(0) / sol_blocks::LANES, stride = blocks.size(1), n = stride / s.bytes;
  const uint8_t* in = blocks.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      sol_blocks::group8(type, in + g * sol_blocks::LANES * stride, stride, n, op + g * sol_blocks::LANES * stride);
  });
  return out;
}

// The first block (counting along the rows) whose float16 scale is NaN or infinite, or -1: a damaged file is
// refused at load rather than giving NaN at some token. F16 and BF16: the first such number.
int64_t bad_scale(const at::Tensor& blocks, int64_t type) {
  const sol_blocks::Shape s = sol_blocks::shape_of(type);
  TORCH_CHECK(s.numbers > 0 && blocks.scalar_type() == at::kByte && blocks.is_contiguous() &&
              blocks.numel() % s.bytes == 0, "sol_blocks::bad_scale: contiguous uint8 blocks of a known type");
  const uint8_t* p = blocks.data_ptr<uint8_t>();
  const int64_t n = blocks.numel() / s.bytes;
  auto all_ones = [](const uint8_t* q, uint16_t mask) {
    uint16_t h;
    std::memcpy(&h, q, 2);
    return (h & mask) == mask;   // the exponent all ones: an infinity or a NaN
  };
  using namespace sol_blocks;
  if (type == F16 || type == BF16) {
    const uint16_t mask = type == F16 ? 0x7c00 : 0x7f80;
    for (int64_t i = 0; i < n; ++i)
      if (all_ones(p + 2 * i, mask)) return i;
    return -1;
  }
  const int at = type == Q6_K ? 208 : 0;
  const bool two = type == Q4_1 || type == Q5_1 || type == Q4_K || type == Q5_K;   // d and a min (or dmin)
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* b = p + i * s.bytes + at;
    if (all_ones(b, 0x7c00) || (two && all_ones(b + 2, 0x7c00))) return i;
  }
  return -1;
}

}  // namespace

// The schemas are declared in core/kernels/blocks.py, so TorchScript can compile calls to them before this
// library is built; this gives them their CPU implementations.
TORCH_LIBRARY_IMPL(sol_blocks, CPU, m) {
  m.impl("linear", &linear);
  m.impl("rows", &rows);
  m.impl("bad_scale", &bad_scale);
  m.impl("group", &group);
}
