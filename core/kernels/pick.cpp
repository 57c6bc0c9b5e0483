// The greedy token and the log-sum-exp of one row of logits, for the CPU engine's every token.
//
// Why: over GPT-2's 50,257 logits torch's argmax took 126 us and logsumexp 140 us on a 2-core AVX2 EPYC
// (torch 2.13; max() alone took 8 us): ~0.45 ms of a 6.5 ms int8 token. Here each is one vectorised pass.
// Both keep torch's answers: argmax is the first index of the largest value, a NaN counting as the largest;
// logsumexp is NaN with a NaN, +inf with a +inf, -inf when all are -inf.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "exp8.h"

namespace {

using sol_int8::exp8;

const float* row(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu() &&
              x.numel() > 0, "sol_pick::", what, ": x must be a non-empty contiguous float32 CPU vector");
  return x.data_ptr<float>();
}

// The largest value, or NaN if there is one (and where the first NaN is, in *nan_at).
float top(const float* x, int64_t n, int64_t* nan_at) {
  __m256 m8 = _mm256_set1_ps(-INFINITY), bad8 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    bad8 = _mm256_or_ps(bad8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    m8 = _mm256_max_ps(m8, v);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, m8);
  float m = -INFINITY;
  for (float v : lanes) m = std::max(m, v);
  bool bad = _mm256_movemask_ps(bad8) != 0;
  for (; i < n; ++i) {
    bad |= std::isnan(x[i]);
    m = std::max(m, x[i]);
  }
  *nan_at = -1;
  if (bad) {
    for (i = 0; i < n && !std::isnan(x[i]); ++i) {}
    *nan_at = i;
    return std::numeric_limits<float>::quiet_NaN();
  }
  return m;
}

int64_t argmax(const at::Tensor& t) {
  const float* x = row(t, "argmax");
  const int64_t n = t.numel();
  int64_t nan_at;
  const float m = top(x, n, &nan_at);
  if (nan_at >= 0) return nan_at;
  const __m256 m8 = _mm256_set1_ps(m);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), m8, _CMP_EQ_OQ));
    if (hit) return i + __builtin_ctz(hit);
  }
  for (; i < n; ++i)
    if (x[i] == m) return i;
  return 0;   // not reached: m is one of the values
}

double logsumexp(const at::Tensor& t) {
  const float* x = row(t, "logsumexp");
  const int64_t n = t.numel();
  int64_t nan_at;
  const float m = top(x, n, &nan_at);
  if (nan_at >= 0 || std::isinf(m)) return m;   // NaN, +inf, or all -inf
  // exp8 floors at e^-87.3 (~1e-38) where a term underflows (a padded -inf logit): nothing beside the top's 1.
  const __m256 m8 = _mm256_set1_ps(m);
  __m256d s0 = _mm256_setzero_pd(), s1 = s0;   // in double: 50,000 terms
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), m8));
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  double lanes[4];
  _mm256_storeu_pd(lanes, _mm256_add_pd(s0, s1));
  double s = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (; i < n; ++i) s += std::exp(static_cast<double>(x[i]) - m);
  return m + std::log(s);
}

}  // namespace

TORCH_LIBRARY(sol_pick, m) {
  m.def("argmax(Tensor x) -> int", &argmax);
  m.def("logsumexp(Tensor x) -> float", &logsumexp);
}
