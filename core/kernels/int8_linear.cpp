// y = x W^T * scales + bias for int8 weights W and float32 activations x, on x86 CPUs with AVX2.
//
// Compiled on the user's machine at first use (core/kernels/int8_kernel.py); torch has no int8 x float32
// product that reads int8 weights at memory speed on CPUs without AVX-512 VNNI (see that file).
//
// The weights are "blocked": rows in tiles of 4 and inputs in steps of 16, so each 64-byte cache line holds
// 16 inputs of 4 rows, (O/4, K/16, 4, 16), zero-padded. A tile's product then reads one sequential stream,
// which the CPU's prefetchers follow; four plain rows at a stride of K bytes read at half the speed.
//
// Each activation row goes in as int16 codes, round(x / s) with s = max|x| / 32767 (15 bits, finer than the
// weights' own 8), and the weights are widened to int16: pmaddwd multiplies 16 pairs at once and sums pairs in
// int32. The int32 sums are moved to double every 2048 inputs, before they can overflow:
// 2048 / 16 = 128 products a lane, each at most 2 * 32767 * 127 = 8,322,818: 1.07e9 < 2^31 (and the 8
// lanes are added in double).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "int8_linear.h"

namespace {

using sol_int8::ROWS;
using sol_int8::STEP;
constexpr int64_t CHUNK = 2048;
constexpr int64_t PREFETCH = 1024;   // bytes ahead of the tile's stream (measured: 1 KiB beat 0 and 4 KiB)

// The 8 int32 lanes' sum, in double: each lane holds up to ~1.07e9, their sum would overflow int32.
inline double hsum(__m256i v) {
  const __m256d s = _mm256_add_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(v)),
                                  _mm256_cvtepi32_pd(_mm256_extracti128_si256(v, 1)));
  __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  t = _mm_add_sd(t, _mm_unpackhi_pd(t, t));
  return _mm_cvtsd_f64(t);
}

inline __m256i widen(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline __m256i dot(__m256i acc, const int8_t* w, __m256i x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(widen(w), x));
}

// The 4 rows of one tile against two activation rows x0, x1 (one when x1 is null): sums into r0, r1.
void tile(const int8_t* w, const int16_t* x0, const int16_t* x1, int64_t K, double* r0, double* r1) {
  for (int64_t c = 0; c < K; c += CHUNK) {
    const int64_t end = std::min(K, c + CHUNK);
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    __m256i b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t k = c; k < end; k += STEP) {
      const int8_t* p = w + k * ROWS;
      _mm_prefetch(reinterpret_cast<const char*>(p + PREFETCH), _MM_HINT_T0);
      const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x0 + k));
      a0 = dot(a0, p, u);
      a1 = dot(a1, p + 16, u);
      a2 = dot(a2, p + 32, u);
      a3 = dot(a3, p + 48, u);
      if (x1) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x1 + k));
        b0 = dot(b0, p, v);
        b1 = dot(b1, p + 16, v);
        b2 = dot(b2, p + 32, v);
        b3 = dot(b3, p + 48, v);
      }
    }
    r0[0] += hsum(a0); r0[1] += hsum(a1); r0[2] += hsum(a2); r0[3] += hsum(a3);
    if (x1) { r1[0] += hsum(b0); r1[1] += hsum(b1); r1[2] += hsum(b2); r1[3] += hsum(b3); }
  }
}

// One activation row as int16 codes, zero-padded to Kp, and its step s; s is NaN where the row holds a NaN
// or an inf (its outputs are then NaN; a float product's would be NaN or inf). Vectorised: a scalar loop
// cost 5 us for 3072 inputs, 48 times a token. A row of tiny values (largest under 1e-30: 32767 / top would
// overflow float) is scaled up by 2^100 first, exactly, and the step scaled back in double.
double quantize(const float* x, int64_t K, int64_t Kp, int16_t* q) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 top8 = _mm256_setzero_ps(), bad8 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    bad8 = _mm256_or_ps(bad8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));   // max_ps would drop a NaN
    top8 = _mm256_max_ps(top8, _mm256_and_ps(v, magnitude));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, top8);
  float top = *std::max_element(lanes, lanes + 8);
  bool bad = _mm256_movemask_ps(bad8) != 0;
  for (; k < K; ++k) {
    bad |= std::isnan(x[k]);
    top = std::max(top, std::fabs(x[k]));
  }
  std::fill(q, q + Kp, 0);
  if (bad || std::isinf(top)) return std::numeric_limits<double>::quiet_NaN();
  if (top == 0.f) return 1.0;   // all codes 0
  const float up = top < 1e-30f ? 0x1p100f : 1.f;
  const float s = top * up / 32767.f, inv = 1.f / s;
  const __m256 vup = _mm256_set1_ps(up), scale = _mm256_set1_ps(inv);
  for (k = 0; k + 16 <= K; k += 16) {
    // cvtps rounds to nearest even, as nearbyint does; packs keeps 128-bit lanes, the permute orders them.
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), vup), scale));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vup), scale));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8));
  }
  for (; k < K; ++k) q[k] = static_cast<int16_t>(std::nearbyint(x[k] * up * inv));
  return static_cast<double>(s) / up;
}

}  // namespace

namespace sol_int8 {

// y (M, O) = x (M, K) W^T * scales + bias, for blocked W (tiles, Kp/16, 4, 16); the op and the decode step.
void product(const float* xp, int64_t M, int64_t K, const int8_t* wp, int64_t tiles, int64_t Kp, int64_t O,
             const float* sp, const float* b, float* yp) {
  if (M == 0 || O == 0) return;
  std::vector<int16_t> codes(M * Kp);
  std::vector<double> steps(M);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) steps[m] = quantize(xp + m * K, K, Kp, codes.data() + m * Kp);
  });
  const int16_t* cp = codes.data();
  // Enough tiles a task that a thread's share outweighs waking it (~5 us).
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, Kp * std::min<int64_t>(M, 8)));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int8_t* wt = wp + t * ROWS * Kp;
      const int64_t o = t * ROWS, n = std::min(ROWS, O - o);
      for (int64_t m = 0; m < M; m += 2) {
        const bool pair = m + 1 < M;
        double r0[ROWS] = {0, 0, 0, 0}, r1[ROWS] = {0, 0, 0, 0};
        tile(wt, cp + m * Kp, pair ? cp + (m + 1) * Kp : nullptr, Kp, r0, r1);
        for (int64_t j = 0; j < n; ++j) {   // in double: the steps and sums span float's whole range
          const double add = b ? b[o + j] : 0.0;
          yp[m * O + o + j] = static_cast<float>(r0[j] * steps[m] * sp[o + j] + add);
          if (pair) yp[(m + 1) * O + o + j] = static_cast<float>(r1[j] * steps[m + 1] * sp[o + j] + add);
        }
      }
    }
  });
}

// The checks every caller's layer must pass: blocked int8 weights of the layer's sizes, float32 scales and bias.
const float* check_layer(const at::Tensor& w, const at::Tensor& scales, const c10::optional<at::Tensor>& bias,
                         int64_t K, int64_t O) {
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kChar && w.is_contiguous() && w.size(2) == ROWS &&
              w.size(3) == STEP, "sol_int8: w must be blocked int8 (out/4, in/16, 4, 16)");
  const int64_t Kp = w.size(1) * STEP, tiles = w.size(0);
  TORCH_CHECK(K <= Kp && Kp < K + STEP && O <= tiles * ROWS && O > (tiles - 1) * ROWS,
              "sol_int8: ", K, " inputs and ", O, " outputs; the blocked weights hold ", Kp, " and ", tiles * ROWS);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == O,
              "sol_int8: scales must be ", O, " contiguous float32 numbers");
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == O,
              "sol_int8: bias must be ", O, " contiguous float32 numbers");
  return bias->data_ptr<float>();
}

}  // namespace sol_int8

namespace {

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                  const c10::optional<at::Tensor>& bias, int64_t in_features, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "sol_int8::linear: x must be a contiguous float32 (rows, inputs) CPU tensor");
  const int64_t M = x.size(0), K = x.size(1), O = out_features;
  TORCH_CHECK(K == in_features, "sol_int8::linear: the layer takes ", in_features, " inputs, x has ", K);
  const float* b = sol_int8::check_layer(w, scales, bias, K, O);
  at::Tensor y = at::empty({M, O}, x.options());
  sol_int8::product(x.data_ptr<float>(), M, K, w.data_ptr<int8_t>(), w.size(0), w.size(1) * STEP, O,
          scales.data_ptr<float>(), b, y.data_ptr<float>());
  return y;
}

}  // namespace

// The schema is declared in core/kernels/int8_kernel.py, so TorchScript can compile calls to it before this library is
// built (or where it cannot be); this gives it its CPU implementation.
TORCH_LIBRARY_IMPL(sol_int8, CPU, m) { m.impl("linear", &linear); }
