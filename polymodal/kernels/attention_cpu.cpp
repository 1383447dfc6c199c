// Exact unmasked attention for short sequences on the CPU, one (batch, head) at a time.
//
// PyTorch's CPU SDPA is a flash kernel: it walks the keys in small blocks with an online softmax
// and recomputes the probabilities in its backward. Up to a few hundred tokens the whole score
// tile of one head (T x S floats) fits in the core's L2 cache, so here each head is three or four
// BLAS calls at full size (sgemm from the BLAS torch links, MKL on x86) with the softmax and its
// gradient done on the tile while it is in cache. Training keeps the probabilities for the
// backward, which then needs no QK^T product again.
//
// Inputs are float32 CPU tensors q (B, H, T, D), k (B, H, S, D), v (B, H, S, Dv) with a unit
// stride on the last dimension and rows that do not overlap, any batch and head strides (views of
// one fused q/k/v projection are taken as they are). Outputs and input gradients are laid out (B, T, H, D) and returned as (B, H, T, D)
// views, the layout the output projection reads without a copy.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_blas.h"
#include "vec_math.h"

namespace polymodal_attention {
namespace {

using Vec = at::vec::Vectorized<float>;
using polymodal_blas::gemm;
using polymodal_vec::sum_lanes;
constexpr int64_t kLanes = Vec::size();

// Softmax of one row of n scores, in place.
void softmax_row(float* row, int64_t n) {
  Vec vmax(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) vmax = at::vec::maximum(vmax, Vec::loadu(row + i));
  float top = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  for (; i < n; ++i) top = std::max(top, row[i]);
  const Vec vtop(top);
  Vec acc(0.0f);
  for (i = 0; i + kLanes <= n; i += kLanes) {
    Vec e = (Vec::loadu(row + i) - vtop).exp_u20();
    e.store(row + i);
    acc = acc + e;
  }
  float total = sum_lanes(acc);
  for (; i < n; ++i) {
    row[i] = std::exp(row[i] - top);
    total += row[i];
  }
  const float inv = 1.0f / total;
  const Vec vinv(inv);
  for (i = 0; i + kLanes <= n; i += kLanes) (Vec::loadu(row + i) * vinv).store(row + i);
  for (; i < n; ++i) row[i] *= inv;
}

// dS = P * (dP - rowsum(dO * O)) * scale for one row, written over dP.
void softmax_grad_row(float* dp, const float* p, const float* grad_out, const float* out, int64_t n, int64_t dv,
                      float scale) {
  Vec acc(0.0f);
  int64_t i = 0;
  for (; i + kLanes <= dv; i += kLanes) acc = at::vec::fmadd(Vec::loadu(grad_out + i), Vec::loadu(out + i), acc);
  float delta = sum_lanes(acc);
  for (; i < dv; ++i) delta += grad_out[i] * out[i];
  const Vec vdelta(delta), vscale(scale);
  for (i = 0; i + kLanes <= n; i += kLanes) {
    (Vec::loadu(p + i) * (Vec::loadu(dp + i) - vdelta) * vscale).store(dp + i);
  }
  for (; i < n; ++i) dp[i] = p[i] * (dp[i] - delta) * scale;
}

void check_operand(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4,
              "polymodal attention_cpu: ", name, " must be a 4-D float32 CPU tensor (B, H, L, D)");
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, "polymodal attention_cpu: ", name,
              " must have a unit stride on its last dimension");
  // BLAS reads each head as a matrix of L rows: they must not overlap (an expanded view would).
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) >= t.size(3), "polymodal attention_cpu: ", name,
              " rows overlap (row stride ", t.stride(2), " < ", t.size(3), "); pass a contiguous copy");
  TORCH_CHECK(t.stride(2) <= std::numeric_limits<int>::max(), "polymodal attention_cpu: ", name, " rows are too far apart");
}

// The BLAS leading dimension of a (B, H, L, D) tensor's heads: its row stride, or D for one row
// (whose stride PyTorch leaves arbitrary, while BLAS wants at least the row length).
int rows_apart(const torch::Tensor& t) {
  return static_cast<int>(t.size(2) <= 1 ? std::max<int64_t>(1, t.size(3)) : t.stride(2));
}

void check_operands(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  TORCH_CHECK(polymodal_blas::blas_available(), "polymodal attention_cpu: torch's BLAS exports no sgemm_");
  check_operand(q, "q");
  check_operand(k, "k");
  check_operand(v, "v");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) && v.size(1) == q.size(1),
              "polymodal attention_cpu: q, k and v must share batch and heads, got ", q.sizes(), ", ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(k.size(3) == q.size(3) && v.size(2) == k.size(2),
              "polymodal attention_cpu: k must match q's head size and v k's length, got ", q.sizes(), ", ",
              k.sizes(), " and ", v.sizes());
}

// Pointer to head (b, h) of a (B, H, L, D) tensor.
const float* head(const torch::Tensor& t, int64_t b, int64_t h) {
  return t.data_ptr<float>() + b * t.stride(0) + h * t.stride(1);
}

float* head_mut(torch::Tensor& t, int64_t b, int64_t h) { return t.data_ptr<float>() + b * t.stride(0) + h * t.stride(1); }

// A (B, H, L, D) tensor stored as (B, L, H, D).
torch::Tensor empty_heads_last(int64_t b, int64_t h, int64_t l, int64_t d, const torch::TensorOptions& options) {
  return torch::empty({b, l, h, d}, options).transpose(1, 2);
}

}  // namespace

// softmax(q k^T * scale) v. Returns (out (B, H, T, Dv), probs (B, H, T, S) when keep_probs, else
// an empty tensor).
std::vector<torch::Tensor> attention_forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                             double scale, bool keep_probs) {
  check_operands(q, k, v);
  const int64_t batch = q.size(0), heads = q.size(1), t_len = q.size(2), s_len = k.size(2);
  const int d = static_cast<int>(q.size(3)), dv = static_cast<int>(v.size(3));
  const int t = static_cast<int>(t_len), s = static_cast<int>(s_len);
  auto out = empty_heads_last(batch, heads, t_len, dv, q.options());
  auto probs = keep_probs ? torch::empty({batch, heads, t_len, s_len}, q.options()) : torch::empty({0}, q.options());
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(keep_probs ? 0 : t_len * s_len);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      float* p = keep_probs ? probs.data_ptr<float>() + bh * t_len * s_len : scratch.data();
      gemm(false, true, t, s, d, static_cast<float>(scale), head(q, b, h), rows_apart(q), head(k, b, h), rows_apart(k),
           0.0f, p, s);
      for (int64_t row = 0; row < t_len; ++row) softmax_row(p + row * s_len, s_len);
      gemm(false, false, t, dv, s, 1.0f, p, s, head(v, b, h), rows_apart(v), 0.0f, head_mut(out, b, h), rows_apart(out));
    }
  });
  return {out, probs};
}

// Gradients of attention_forward from its saved out and probs: (grad_q, grad_k, grad_v).
std::vector<torch::Tensor> attention_backward(const torch::Tensor& grad, const torch::Tensor& q, const torch::Tensor& k,
                                              const torch::Tensor& v, const torch::Tensor& out,
                                              const torch::Tensor& probs, double scale) {
  check_operands(q, k, v);
  check_operand(grad, "grad");
  check_operand(out, "out");
  const int64_t batch = q.size(0), heads = q.size(1), t_len = q.size(2), s_len = k.size(2);
  TORCH_CHECK(grad.sizes() == out.sizes() && out.size(2) == t_len && out.size(3) == v.size(3),
              "polymodal attention_cpu: grad and out must be (B, H, T, Dv), got ", grad.sizes(), " and ", out.sizes());
  TORCH_CHECK(probs.is_contiguous() && probs.sizes() == torch::IntArrayRef({batch, heads, t_len, s_len}),
              "polymodal attention_cpu: probs must be a contiguous (B, H, T, S) tensor, got ", probs.sizes());
  const int d = static_cast<int>(q.size(3)), dv = static_cast<int>(v.size(3));
  const int t = static_cast<int>(t_len), s = static_cast<int>(s_len);
  auto grad_q = empty_heads_last(batch, heads, t_len, d, q.options());
  auto grad_k = empty_heads_last(batch, heads, s_len, d, q.options());
  auto grad_v = empty_heads_last(batch, heads, s_len, dv, q.options());
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> dp(t_len * s_len);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const float* p = probs.data_ptr<float>() + bh * t_len * s_len;
      const float *g = head(grad, b, h), *o = head(out, b, h);
      gemm(true, false, s, dv, t, 1.0f, p, s, g, rows_apart(grad), 0.0f, head_mut(grad_v, b, h), rows_apart(grad_v));
      gemm(false, true, t, s, dv, 1.0f, g, rows_apart(grad), head(v, b, h), rows_apart(v), 0.0f, dp.data(), s);
      for (int64_t row = 0; row < t_len; ++row) {
        softmax_grad_row(dp.data() + row * s_len, p + row * s_len, g + row * rows_apart(grad),
                         o + row * rows_apart(out), s_len, dv, fscale);
      }
      gemm(false, false, t, d, s, 1.0f, dp.data(), s, head(k, b, h), rows_apart(k), 0.0f, head_mut(grad_q, b, h),
           rows_apart(grad_q));
      gemm(true, false, s, d, t, 1.0f, dp.data(), s, head(q, b, h), rows_apart(q), 0.0f, head_mut(grad_k, b, h),
           rows_apart(grad_k));
    }
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace polymodal_attention
