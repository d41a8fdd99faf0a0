// Sampling rows of logits on the CPU, a few passes over a row (kiln.runtime.sampler's filters and draw, fused):
// temperature, then top-k, top-p and min-p as ``filter_logits`` keeps tokens, then an inverse-CDF draw with the
// row's uniform u. Top-k selects with a heap of k values; without it, tokens more than kCut below the row's
// best (a probability ratio of e^-30, 1e-13) are never top-p candidates, and a row whose nucleus lies past them
// gets -1 (the caller samples that row through the torch filters; it needs a top-p closer to 1 than float32
// holds below it, for vocabularies under 600,000). Probability sums are in double.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "vector_math.h"

namespace {

constexpr float kCut = -30.f;  // tempered logit below the row's best: past this, never a top-k/top-p candidate

struct Candidate {
  float y;  // tempered logit minus the row's best (<= 0)
  int64_t index;
};

// e^y of a tempered logit below the row's best (y <= 0), 0 below e^-87 (and for -inf).
inline float weight(float y) { return y > -87.f ? kiln_cpu::exp_clamped(y, -87.f) : 0.f; }

// One row: its token, or -1 where the candidates do not settle top-p.
int64_t sample_row(const float* x, int64_t vocab, float temperature, int64_t top_k, float top_p, float min_p,
                   double u, std::vector<float>& e, std::vector<Candidate>& cand) {
  const float inv_t = 1.f / temperature;
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < vocab; ++i) best = std::max(best, x[i]);
  if (!(best > -std::numeric_limits<float>::infinity())) return -1;  // nothing allowed, or nan: the caller decides
  const bool filtered = (top_k > 0 && top_k < vocab) || top_p < 1.f;
  // min-p keeps p_i >= min_p * p_best, i.e. y_i >= log(min_p); the best token always stays.
  const float floor_y = min_p > 0.f ? std::log(min_p) : -std::numeric_limits<float>::infinity();
  if (!filtered) {
    // Every token with y >= floor_y, drawn in vocabulary order.
    e.resize(vocab);
    double total = 0.0;
    for (int64_t i = 0; i < vocab; ++i) {
      const float y = (x[i] - best) * inv_t;
      const float w = y >= floor_y ? weight(y) : 0.f;
      e[i] = w;
      total += w;
    }
    const double target = u * total;
    double run = 0.0;
    int64_t last = 0;
    for (int64_t i = 0; i < vocab; ++i) {
      if (e[i] <= 0.f) continue;
      run += e[i];
      last = i;
      if (run > target) return i;
    }
    return last;
  }
  const auto before = [](const Candidate& a, const Candidate& b) {
    return a.y > b.y || (a.y == b.y && a.index < b.index);
  };
  cand.clear();
  double total = 0.0;  // the kept set's mass
  // cand[0, keep) is the kept set once in order, cand[0, in_order) is in order.
  size_t keep = 0, in_order = 0;
  if (top_k > 0 && top_k < vocab) {
    // The k-th largest tempered logit (a min-heap of the k largest seen, in e), then every token at or above
    // it (the k-th token's ties stay too), in order.
    e.clear();
    const auto greater = std::greater<float>();
    for (int64_t i = 0; i < vocab; ++i) {
      const float y = (x[i] - best) * inv_t;
      if (static_cast<int64_t>(e.size()) < top_k) {
        e.push_back(y);
        std::push_heap(e.begin(), e.end(), greater);
      } else if (y > e.front()) {
        std::pop_heap(e.begin(), e.end(), greater);
        e.back() = y;
        std::push_heap(e.begin(), e.end(), greater);
      }
    }
    const float kth = e.front();
    for (int64_t i = 0; i < vocab; ++i) {
      const float y = (x[i] - best) * inv_t;
      if (y >= kth) cand.push_back({y, i});
    }
    std::sort(cand.begin(), cand.end(), before);
    keep = in_order = cand.size();
    for (size_t j = 0; j < keep; ++j) total += std::exp(static_cast<double>(cand[j].y));
  } else {
    for (int64_t i = 0; i < vocab; ++i) {
      const float y = (x[i] - best) * inv_t;
      if (y > kCut) cand.push_back({y, i});
      total += weight(y);
    }
    keep = cand.size();
  }
  if (top_p < 1.f) {
    // The nucleus: in order, each token while the mass before it is under p (the first always), looked for
    // among the 256, then 4,096, ... most likely candidates (a partial sort each), not the whole row.
    double mass = 0.0;
    size_t j = 0;
    for (size_t width = 256;; width *= 16) {
      const size_t limit = std::min(keep, width);
      if (limit > in_order) {
        if (limit == keep)
          std::sort(cand.begin(), cand.begin() + keep, before);
        else
          std::partial_sort(cand.begin(), cand.begin() + limit, cand.begin() + keep, before);
        in_order = limit;
      }
      bool stopped = false;
      for (; j < limit; ++j) {
        if (j > 0 && mass >= top_p) {
          stopped = true;
          break;
        }
        mass += std::exp(static_cast<double>(cand[j].y)) / total;
      }
      if (stopped) break;
      if (limit == keep) {
        // Every candidate is in: tokens past the cut may be too (without top-k), unless the mass is reached.
        if (!(top_k > 0 && top_k < vocab) && mass < top_p && cand.size() < static_cast<size_t>(vocab)) return -1;
        break;
      }
    }
    keep = j;
  }
  while (keep > 1 && cand[keep - 1].y < floor_y) --keep;  // min-p, on what is left (sorted, so from the end)
  double kept = 0.0;
  for (size_t j = 0; j < keep; ++j) kept += std::exp(static_cast<double>(cand[j].y));
  const double target = u * kept;
  double run = 0.0;
  for (size_t j = 0; j < keep; ++j) {
    run += std::exp(static_cast<double>(cand[j].y));
    if (run > target) return cand[j].index;
  }
  return cand[keep - 1].index;
}

at::Tensor sample_rows(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                       const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& uniform) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.scalar_type() == at::kFloat &&
                  logits.is_contiguous(),
              "kiln_cpu::sample_rows: logits must be a contiguous float32 [rows, vocab] CPU tensor");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const auto check = [&](const at::Tensor& t, at::ScalarType type, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == rows && t.scalar_type() == type &&
                    t.is_contiguous(),
                "kiln_cpu::sample_rows: ", name, " must be a contiguous 1-D CPU tensor of one value a row");
  };
  check(temperature, at::kFloat, "temperature");
  check(top_k, at::kLong, "top_k");
  check(top_p, at::kFloat, "top_p");
  check(min_p, at::kFloat, "min_p");
  check(uniform, at::kDouble, "uniform");
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* x = logits.data_ptr<float>();
  const float* t = temperature.data_ptr<float>();
  const int64_t* k = top_k.data_ptr<int64_t>();
  const float* p = top_p.data_ptr<float>();
  const float* mp = min_p.data_ptr<float>();
  const double* u = uniform.data_ptr<double>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> e;
    std::vector<Candidate> cand;
    for (int64_t r = begin; r < end; ++r) {
      TORCH_CHECK(t[r] > 0.f, "kiln_cpu::sample_rows: a sampled row's temperature must be positive");
      o[r] = sample_row(x + r * vocab, vocab, t[r], k[r], p[r], mp[r], u[r], e, cand);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln_cpu, m) {
  m.def("sample_rows(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor uniform) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(kiln_cpu, CPU, m) { m.impl("sample_rows", &sample_rows); }
