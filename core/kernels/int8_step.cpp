// One decoded token through every block of a model whose linear layers all run in Sol's int8 kernel, in one
// native call (core/model/cpu_step.py builds it and falls back to its scripted loop where it cannot).
//
// Why: a GPT-2 124M token in int8 is ~4.4 ms of weight reading, and the scripted loop added ~2.5 ms around
// it on a 2-core AVX2 EPYC: ~15 tensor operations a block, each with its dispatch, an allocation and a
// thread pool wake-up (a LayerNorm of 768 numbers took 9 us, a GELU of 3072 took 16 us, attention over
// 170 cached keys ~100 us). Here they are plain loops over a token's few thousand numbers.
//
// The same arithmetic as cpu_step._layers, in the same order, to float32 rounding: norms reduce in double,
// exp() is a polynomial (relative error ~2e-7), GELU's tanh form is written as x * sigmoid(2u), which is
// the same function. Tests hold the step to the scripted loop's logits and greedy tokens.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "blocks.h"
#include "exp8.h"
#include "int8_linear.h"

namespace {

using sol_int8::exp8;

// Kinds as core/model/cpu_step.py numbers them.
enum { NORM_LAYER = 0, NORM_RMS = 1, NORM_RMS_PLUS_ONE = 2 };
enum { MLP_GELU = 0, MLP_SWIGLU = 1, MLP_GEGLU = 2 };
constexpr int64_t LINEARS = 4, NORMS = 6;   // a block's: qkv, proj, fc, proj; ln1, ln2, post x 2, q, k

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

float dot(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = hsum8(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y = x * sigmoid(c x): SiLU with c = 1; GELU's tanh form, 0.5 x (1 + tanh(u)) = x * sigmoid(2u), with
// u = sqrt(2/pi) (x + 0.044715 x^3).
void activate(const float* x, int64_t n, bool gelu, float* y) {
  const __m256 one = _mm256_set1_ps(1.f), c = _mm256_set1_ps(-2.f * 0.7978845608028654f),
               k = _mm256_set1_ps(0.044715f), minus = _mm256_set1_ps(-1.f);
  auto f = [&](__m256 v) {
    const __m256 t = gelu ? _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(k, v), _mm256_mul_ps(v, v), v))
                          : _mm256_mul_ps(minus, v);
    return _mm256_div_ps(v, _mm256_add_ps(one, exp8(t)));
  };
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, f(_mm256_loadu_ps(x + i)));
  if (i < n) {   // the tail through the same arithmetic, padded
    float in[8] = {0}, out[8];
    std::copy(x + i, x + n, in);
    _mm256_storeu_ps(out, f(_mm256_loadu_ps(in)));
    std::copy(out, out + (n - i), y + i);
  }
}

// A linear layer in Sol's int8 kernel (w, scales), or in its GGUF block kernels (parts, held in `keep`).
struct Linear {
  at::Tensor w, scales;
  c10::optional<at::Tensor> bias;
  int64_t in, out;
  const float* b;
  std::vector<sol_blocks::Part> parts;
  std::vector<at::Tensor> keep;

  void operator()(const float* x, float* y) const {
    if (!parts.empty()) {
      sol_blocks::product(x, 1, in, parts, out, b, y);
      return;
    }
    sol_int8::product(x, 1, in, w.data_ptr<int8_t>(), w.size(0), w.size(1) * sol_int8::STEP, out,
                      scales.data_ptr<float>(), b, y);
  }
};

struct Norm {
  at::Tensor w, b;   // w empty: the model has no such norm; b empty: no bias

  bool present() const { return w.numel() > 0; }

  // y = norm(x) over n numbers (y may be x): cpu_step._norm.
  void operator()(const float* x, int64_t n, int kind, double eps, float* y) const {
    const float* wp = w.data_ptr<float>();
    if (kind == NORM_LAYER) {
      double sum = 0, sq = 0;
      for (int64_t i = 0; i < n; ++i) sum += x[i];
      const double mean = sum / n;
      for (int64_t i = 0; i < n; ++i) sq += (x[i] - mean) * (x[i] - mean);
      const float m = static_cast<float>(mean), r = static_cast<float>(1.0 / std::sqrt(sq / n + eps));
      const float* bp = b.numel() ? b.data_ptr<float>() : nullptr;
      for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - m) * r * wp[i] + (bp ? bp[i] : 0.f);
      return;
    }
    double sq = 0;
    for (int64_t i = 0; i < n; ++i) sq += static_cast<double>(x[i]) * x[i];
    const float r = static_cast<float>(1.0 / std::sqrt(sq / n + eps));
    for (int64_t i = 0; i < n; ++i) y[i] = kind == NORM_RMS ? wp[i] * (x[i] * r) : (x[i] * r) * (1.f + wp[i]);
  }
};

// RoPE on one head's first d numbers (d even): cpu_step._rope, (x1, x2) -> (x1 c - x2 s, x2 c + x1 s).
void rope(float* v, const float* c, const float* s, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    v[i] = a * c[i] - b * s[i];
    v[i + half] = b * c[i + half] + a * s[i + half];
  }
}

class Step : public torch::CustomClassHolder {
 public:
  // tensors: per block, (w, scales, bias) for each of its 4 linear layers, then (w, b) for each of its 6 norm
  // slots; then the final norm's (w, b); an empty tensor stands for "none". ints: n_layer, d_model, heads,
  // kv heads, head dim, norm kind, post norms, q/k norms, MLP kind; then each block's window (-1: none) and
  // RoPE table (-1: none); then each linear layer's in and out sizes and its number of GGUF parts (0: an
  // int8 layer, w and scales). floats: norm eps, attention scale. parts, part_types: the GGUF layers' parts
  // (uint8 rows) and their GGML types, layer after layer.
  Step(std::vector<at::Tensor> tensors, std::vector<int64_t> ints, std::vector<double> floats,
       std::vector<at::Tensor> parts, std::vector<int64_t> part_types) {
    TORCH_CHECK(ints.size() >= 9 && floats.size() == 2, "sol_step.Step: wrong argument counts");
    L_ = ints[0], d_ = ints[1], H_ = ints[2], KV_ = ints[3], hd_ = ints[4], norm_kind_ = ints[5];
    post_norms_ = ints[6] != 0, qk_norm_ = ints[7] != 0, mlp_ = ints[8];
    eps_ = floats[0], scale_ = floats[1];
    TORCH_CHECK(L_ > 0 && H_ > 0 && KV_ > 0 && H_ % KV_ == 0 && (int64_t)ints.size() == 9 + 2 * L_ + 3 * LINEARS * L_,
                "sol_step.Step: ", ints.size(), " sizes do not describe ", L_, " blocks");
    TORCH_CHECK((int64_t)tensors.size() == L_ * (3 * LINEARS + 2 * NORMS) + 2, "sol_step.Step: ", tensors.size(),
                " tensors do not describe ", L_, " blocks");
    TORCH_CHECK(parts.size() == part_types.size(), "sol_step.Step: one type for each GGUF part");
    size_t t = 0, next_part = 0;
    const int64_t* sizes = ints.data() + 9 + 2 * L_;
    for (int64_t i = 0; i < L_; ++i) {
      windows_.push_back(ints[9 + 2 * i]);
      rope_of_.push_back(ints[10 + 2 * i]);
      for (int64_t j = 0; j < LINEARS; ++j, t += 3) {
        Linear l{tensors[t], tensors[t + 1], c10::nullopt, sizes[0], sizes[1], nullptr, {}, {}};
        const int64_t n_parts = sizes[2];
        sizes += 3;
        if (tensors[t + 2].numel()) l.bias = tensors[t + 2];
        if (n_parts == 0) {
          l.b = sol_int8::check_layer(l.w, l.scales, l.bias, l.in, l.out);
        } else {
          TORCH_CHECK(n_parts > 0 && next_part + n_parts <= parts.size(), "sol_step.Step: too few GGUF parts");
          l.keep.assign(parts.begin() + next_part, parts.begin() + next_part + n_parts);
          const std::vector<int64_t> types(part_types.begin() + next_part, part_types.begin() + next_part + n_parts);
          next_part += n_parts;
          l.parts = sol_blocks::check_parts(l.keep, types, l.in, l.out);
          if (l.bias.has_value()) {
            TORCH_CHECK(l.bias->scalar_type() == at::kFloat && l.bias->is_contiguous() && l.bias->numel() == l.out,
                        "sol_step.Step: a bias must be ", l.out, " contiguous float32 numbers");
            l.b = l.bias->data_ptr<float>();
          }
        }
        linears_.push_back(l);
      }
      for (int64_t j = 0; j < NORMS; ++j, t += 2) norms_.push_back(norm(tensors[t], tensors[t + 1], j));
    }
    norms_.push_back(norm(tensors[t], tensors[t + 1], 0));
    TORCH_CHECK(norms_.back().present(), "sol_step.Step: the model has no final norm");
    const int64_t qn = H_ * hd_, kn = KV_ * hd_;
    for (int64_t i = 0; i < L_; ++i) {   // the sizes run() relies on
      const Linear* l = &linears_[LINEARS * i];
      const Norm* nm = &norms_[NORMS * i];
      const int64_t hidden = mlp_ == MLP_GELU ? l[2].out : l[2].out / 2;
      TORCH_CHECK(l[0].in == d_ && l[0].out == qn + 2 * kn && l[1].in == qn && l[1].out == d_ && l[2].in == d_ &&
                  l[3].in == hidden && l[3].out == d_ && (mlp_ == MLP_GELU || l[2].out % 2 == 0),
                  "sol_step.Step: block ", i, "'s layer sizes do not fit ", d_, " wide and ", H_, " heads");
      TORCH_CHECK(nm[0].present() && nm[1].present() && (!post_norms_ || (nm[2].present() && nm[3].present())) &&
                  (!qk_norm_ || (nm[4].present() && nm[5].present())), "sol_step.Step: block ", i, " lacks a norm");
    }
  }

  // x (1, 1, d_model): the new token's embedding at position `at`. Writes its keys and values into row 0 of
  // each block's cache (1+, KV, capacity, head dim) and returns the final norm's output (1, 1, d_model).
  at::Tensor run(const at::Tensor& x, int64_t at, const std::vector<at::Tensor>& ks,
                 const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& cos,
                 const std::vector<at::Tensor>& sin) const {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() == d_,
                "sol_step.run: x must be ", d_, " contiguous float32 numbers");
    TORCH_CHECK((int64_t)ks.size() == L_ && (int64_t)vs.size() == L_, "sol_step.run: one cache tensor a block");
    for (size_t r = 0; r < cos.size(); ++r)
      TORCH_CHECK(cos[r].scalar_type() == at::kFloat && sin[r].scalar_type() == at::kFloat &&
                  cos[r].is_contiguous() && sin[r].is_contiguous() && cos[r].numel() == sin[r].numel() &&
                  cos[r].numel() % 2 == 0 && cos[r].numel() <= hd_, "sol_step.run: RoPE table ", r);
    const int64_t qn = H_ * hd_, kn = KV_ * hd_;
    int64_t widest = d_;
    for (const Linear& l : linears_) widest = std::max(widest, l.out);
    std::vector<float> h(widest), qkv(qn + 2 * kn), y(qn), f(widest), g(widest);
    at::Tensor out = at::empty({1, 1, d_}, x.options());
    float* res = out.data_ptr<float>();   // the residual stream
    std::copy(x.data_ptr<float>(), x.data_ptr<float>() + d_, res);
    for (int64_t i = 0; i < L_; ++i) {
      const Linear* lin = &linears_[LINEARS * i];
      const Norm* nm = &norms_[NORMS * i];
      const at::Tensor &kc = ks[i], &vc = vs[i];
      TORCH_CHECK(kc.scalar_type() == at::kFloat && vc.scalar_type() == at::kFloat && kc.dim() == 4 &&
                  kc.sizes() == vc.sizes() && kc.strides() == vc.strides() && kc.size(1) == KV_ &&
                  kc.size(3) == hd_ && kc.stride(3) == 1 && at >= 0 && at < kc.size(2),
                  "sol_step.run: block ", i, "'s cache does not hold position ", at);
      nm[0](res, d_, norm_kind_, eps_, h.data());
      lin[0](h.data(), qkv.data());
      float *q = qkv.data(), *k = q + qn, *v = k + kn;
      if (qk_norm_) {
        for (int64_t j = 0; j < H_; ++j) nm[4](q + j * hd_, hd_, norm_kind_, eps_, q + j * hd_);
        for (int64_t j = 0; j < KV_; ++j) nm[5](k + j * hd_, hd_, norm_kind_, eps_, k + j * hd_);
      }
      const int64_t r = rope_of_[i];
      if (r >= 0) {
        TORCH_CHECK(r < (int64_t)cos.size(), "sol_step.run: no RoPE table ", r);
        const float *c = cos[r].data_ptr<float>(), *s = sin[r].data_ptr<float>();
        for (int64_t j = 0; j < H_; ++j) rope(q + j * hd_, c, s, cos[r].numel());
        for (int64_t j = 0; j < KV_; ++j) rope(k + j * hd_, c, s, cos[r].numel());
      }
      float *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>();
      const int64_t s1 = kc.stride(1), s2 = kc.stride(2);
      for (int64_t j = 0; j < KV_; ++j) {
        std::copy(k + j * hd_, k + (j + 1) * hd_, kp + j * s1 + at * s2);
        std::copy(v + j * hd_, v + (j + 1) * hd_, vp + j * s1 + at * s2);
      }
      const int64_t start = windows_[i] < 0 ? 0 : std::max<int64_t>(0, at + 1 - windows_[i]);
      attend(q, kp, vp, s1, s2, start, at + 1, y.data());
      lin[1](y.data(), h.data());
      if (post_norms_) nm[2](h.data(), d_, norm_kind_, eps_, h.data());
      for (int64_t j = 0; j < d_; ++j) res[j] += h[j];
      nm[1](res, d_, norm_kind_, eps_, h.data());
      lin[2](h.data(), f.data());
      int64_t n = lin[2].out;
      if (mlp_ == MLP_GELU) {
        activate(f.data(), n, true, g.data());
      } else {   // gated: act(gate) * up, the fc output's two halves
        n /= 2;
        activate(f.data(), n, mlp_ == MLP_GEGLU, g.data());
        for (int64_t j = 0; j < n; ++j) g[j] *= f[n + j];
      }
      lin[3](g.data(), h.data());
      if (post_norms_) nm[3](h.data(), d_, norm_kind_, eps_, h.data());
      for (int64_t j = 0; j < d_; ++j) res[j] += h[j];
    }
    norms_.back()(res, d_, norm_kind_, eps_, res);
    return out;
  }

 private:
  // Softmax attention of each query head over cached positions [start, end) of its key/value head.
  void attend(const float* q, const float* kp, const float* vp, int64_t s1, int64_t s2, int64_t start,
              int64_t end, float* y) const {
    const int64_t T = end - start, group = H_ / KV_;
    // A task's share must outweigh waking a thread: about 16K numbers of keys and values.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, 2 * T * hd_));
    at::parallel_for(0, H_, grain, [&](int64_t h0, int64_t h1) {
      std::vector<float> p(T);
      for (int64_t hh = h0; hh < h1; ++hh) {
        const float* qh = q + hh * hd_;
        const float *kh = kp + (hh / group) * s1 + start * s2, *vh = vp + (hh / group) * s1 + start * s2;
        float top = -INFINITY;
        for (int64_t t = 0; t < T; ++t) {
          p[t] = dot(qh, kh + t * s2, hd_) * static_cast<float>(scale_);
          top = std::max(top, p[t]);
        }
        const __m256 m8 = _mm256_set1_ps(top);
        __m256 sum8 = _mm256_setzero_ps();
        int64_t t = 0;
        for (; t + 8 <= T; t += 8) {
          const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(&p[t]), m8));
          _mm256_storeu_ps(&p[t], e);
          sum8 = _mm256_add_ps(sum8, e);
        }
        float sum = hsum8(sum8);
        for (; t < T; ++t) sum += p[t] = std::exp(p[t] - top);
        float* yh = y + hh * hd_;
        std::fill(yh, yh + hd_, 0.f);
        for (t = 0; t < T; ++t) {
          const float w = p[t];
          const float* vt = vh + t * s2;
          for (int64_t j = 0; j < hd_; ++j) yh[j] += w * vt[j];
        }
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < hd_; ++j) yh[j] *= inv;
      }
    });
  }

  Norm norm(const at::Tensor& w, const at::Tensor& b, int64_t slot) const {
    const int64_t n = slot >= 4 ? hd_ : d_;   // q and k norms are over a head
    TORCH_CHECK(w.numel() == 0 || (w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == n),
                "sol_step.Step: a norm's weight must be ", n, " contiguous float32 numbers");
    TORCH_CHECK(b.numel() == 0 || (b.scalar_type() == at::kFloat && b.is_contiguous() && b.numel() == n),
                "sol_step.Step: a norm's bias must be ", n, " contiguous float32 numbers");
    return Norm{w, b};
  }

  int64_t L_, d_, H_, KV_, hd_, norm_kind_, mlp_;
  bool post_norms_, qk_norm_;
  double eps_, scale_;
  std::vector<int64_t> windows_, rope_of_;
  std::vector<Linear> linears_;
  std::vector<Norm> norms_;
};

}  // namespace

TORCH_LIBRARY(sol_step, m) {
  m.class_<Step>("Step")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>, std::vector<at::Tensor>,
                       std::vector<int64_t>>())
      .def("run", &Step::run);
}
