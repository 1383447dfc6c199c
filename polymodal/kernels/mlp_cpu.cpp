// The two-layer tanh-GELU MLP, y = fc2(gelu_tanh(fc1(x))), forward and backward, one block of rows
// at a time on the CPU.
//
// Run layer by layer, the MLP moves its (rows x hidden) activations through memory many times: fc1
// writes its output over a broadcast bias, GELU reads it and writes its own, fc2 reads that; the
// backward writes and rereads the hidden gradient twice more. Here each thread takes a block of
// rows and runs the whole chain on it while the block's hidden activations sit in cache: sgemm for
// the products (single-threaded inside the parallel loop), the bias and GELU on the block in
// between. Only the pre-activation h = fc1(x) is stored for the backward, which recomputes
// gelu(h) from it; the weight and bias gradients are summed per fixed chunk of rows, so results do
// not depend on thread scheduling.
//
// x (R, D), w1 (H, D), b1 (H) | None, w2 (O, H), b2 (O) | None: contiguous float32 CPU tensors.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "cpu_blas.h"
#include "vec_math.h"

namespace polymodal_mlp {
namespace {

using Vec = at::vec::Vectorized<float>;
using polymodal_blas::gemm;
using namespace polymodal_vec;
constexpr int64_t kLanes = Vec::size();
// Rows per block: a block's hidden activations (128 x 768 floats for a DiT-S MLP) stay in L2/L3.
constexpr int64_t kBlockRows = 128;

void check_dense(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dim,
              "polymodal mlp_cpu: ", name, " must be a contiguous ", dim, "-D float32 CPU tensor");
}

void check_bias(const c10::optional<torch::Tensor>& bias, int64_t size, const char* name) {
  if (!bias) return;
  check_dense(*bias, name, 1);
  TORCH_CHECK(bias->size(0) == size, "polymodal mlp_cpu: ", name, " must have ", size, " entries, got ",
              bias->size(0));
}

void check_weights(const torch::Tensor& x, const torch::Tensor& w1, const c10::optional<torch::Tensor>& b1,
                   const torch::Tensor& w2, const c10::optional<torch::Tensor>& b2) {
  TORCH_CHECK(polymodal_blas::blas_available(), "polymodal mlp_cpu: torch's BLAS exports no sgemm_");
  check_dense(x, "x", 2);
  check_dense(w1, "w1", 2);
  check_dense(w2, "w2", 2);
  TORCH_CHECK(w1.size(1) == x.size(1) && w2.size(1) == w1.size(0),
              "polymodal mlp_cpu: w1 must be (H, D) and w2 (O, H) for x (R, D) = ", x.sizes(), ", got ",
              w1.sizes(), " and ", w2.sizes());
  check_bias(b1, w1.size(0), "b1");
  check_bias(b2, w2.size(0), "b2");
}

// row[i] += other[i] for one row of n (a bias added, or a row summed into a gradient).
void add_row(float* row, const float* other, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) (Vec::loadu(row + i) + Vec::loadu(other + i)).store(row + i);
  for (; i < n; ++i) row[i] += other[i];
}

// Per-chunk gradient sums may take this much memory in all (a wide MLP on many threads would
// otherwise hold threads x its weights).
constexpr int64_t kPartialBudgetBytes = int64_t{64} << 20;

// Row chunks for the gradient sums: one per thread (`row_chunks`), fewer when the rows make fewer
// blocks or the chunks' sums (floats_per_chunk each) would pass the budget.
int64_t chunk_count(int64_t rows, int64_t floats_per_chunk) {
  const int64_t affordable = kPartialBudgetBytes / std::max<int64_t>(1, 4 * floats_per_chunk);
  return std::max<int64_t>(1, std::min(row_chunks((rows + kBlockRows - 1) / kBlockRows), affordable));
}

}  // namespace

// Returns (y (R, O), h (R, H) = x w1^T + b1, the pre-activation the backward reads; with
// keep_hidden false, h stays in per-thread scratch and an empty tensor comes back).
std::vector<torch::Tensor> mlp_gelu_forward(const torch::Tensor& x, const torch::Tensor& w1,
                                            const c10::optional<torch::Tensor>& b1, const torch::Tensor& w2,
                                            const c10::optional<torch::Tensor>& b2, bool keep_hidden) {
  check_weights(x, w1, b1, w2, b2);
  const int64_t rows = x.size(0), d = x.size(1), hidden = w1.size(0), out_dim = w2.size(0);
  auto h = torch::empty({keep_hidden ? rows : 0, hidden}, x.options());
  auto y = torch::empty({rows, out_dim}, x.options());
  const float *xp = x.data_ptr<float>(), *w1p = w1.data_ptr<float>(), *w2p = w2.data_ptr<float>();
  const float* b1p = b1 ? b1->data_ptr<float>() : nullptr;
  const float* b2p = b2 ? b2->data_ptr<float>() : nullptr;
  float *hp = h.data_ptr<float>(), *yp = y.data_ptr<float>();
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> g(kBlockRows * hidden), scratch(keep_hidden ? 0 : kBlockRows * hidden);
    for (int64_t block = first; block < last; ++block) {
      const int64_t r0 = block * kBlockRows, n = std::min(kBlockRows, rows - r0);
      float* hb = keep_hidden ? hp + r0 * hidden : scratch.data();
      gemm(false, true, n, hidden, d, 1.0f, xp + r0 * d, d, w1p, d, 0.0f, hb, hidden);
      for (int64_t r = 0; r < n; ++r) {
        float *hr = hb + r * hidden, *gr = g.data() + r * hidden;
        if (b1p) add_row(hr, b1p, hidden);
        int64_t i = 0;
        for (; i + kLanes <= hidden; i += kLanes) gelu_vec(Vec::loadu(hr + i)).store(gr + i);
        for (; i < hidden; ++i) gr[i] = gelu_scalar(hr[i]);
      }
      float* yb = yp + r0 * out_dim;
      gemm(false, true, n, out_dim, hidden, 1.0f, g.data(), hidden, w2p, hidden, 0.0f, yb, out_dim);
      if (b2p) {
        for (int64_t r = 0; r < n; ++r) add_row(yb + r * out_dim, b2p, out_dim);
      }
    }
  });
  return {y, h};
}

// Gradients of mlp_gelu_forward from grad_y (R, O) and the saved x and h: (grad_x, grad_w1,
// grad_b1, grad_w2, grad_b2); the bias gradients are empty tensors for a missing bias.
std::vector<torch::Tensor> mlp_gelu_backward(const torch::Tensor& grad_y, const torch::Tensor& x,
                                             const torch::Tensor& h, const torch::Tensor& w1,
                                             const c10::optional<torch::Tensor>& b1, const torch::Tensor& w2,
                                             const c10::optional<torch::Tensor>& b2) {
  check_weights(x, w1, b1, w2, b2);
  check_dense(grad_y, "grad_y", 2);
  check_dense(h, "h", 2);
  const int64_t rows = x.size(0), d = x.size(1), hidden = w1.size(0), out_dim = w2.size(0);
  TORCH_CHECK(grad_y.size(0) == rows && grad_y.size(1) == out_dim && h.size(0) == rows && h.size(1) == hidden,
              "polymodal mlp_cpu: grad_y must be (R, O) and h (R, H), got ", grad_y.sizes(), " and ", h.sizes());
  auto grad_x = torch::empty_like(x);
  // Per chunk: grad_w1 (H x D), grad_w2 (O x H), grad_b1 (H), grad_b2 (O), summed after the loop.
  const int64_t per_chunk = hidden * d + out_dim * hidden + hidden + out_dim;
  const int64_t chunks = chunk_count(rows, per_chunk);
  auto partial = torch::zeros({chunks, per_chunk}, x.options());
  const float *gyp = grad_y.data_ptr<float>(), *xp = x.data_ptr<float>(), *hp = h.data_ptr<float>(),
              *w1p = w1.data_ptr<float>(), *w2p = w2.data_ptr<float>();
  float *gxp = grad_x.data_ptr<float>(), *pp = partial.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> g(kBlockRows * hidden), gh(kBlockRows * hidden);
    for (int64_t chunk = first; chunk < last; ++chunk) {
      float* gw1 = pp + chunk * per_chunk;
      float* gw2 = gw1 + hidden * d;
      float* gb1 = gw2 + out_dim * hidden;
      float* gb2 = gb1 + hidden;
      const int64_t end = rows * (chunk + 1) / chunks;
      for (int64_t r0 = rows * chunk / chunks; r0 < end; r0 += kBlockRows) {
        const int64_t n = std::min(kBlockRows, end - r0);
        const float *gyb = gyp + r0 * out_dim, *hb = hp + r0 * hidden, *xb = xp + r0 * d;
        // grad_h = (grad_y w2) * gelu'(h), with gelu(h) recomputed for fc2's weight gradient.
        gemm(false, false, n, hidden, out_dim, 1.0f, gyb, out_dim, w2p, hidden, 0.0f, gh.data(), hidden);
        for (int64_t r = 0; r < n; ++r) {
          const float* hr = hb + r * hidden;
          float *gr = g.data() + r * hidden, *ghr = gh.data() + r * hidden;
          int64_t i = 0;
          for (; i + kLanes <= hidden; i += kLanes) {
            const Vec v = Vec::loadu(hr + i);
            gelu_vec(v).store(gr + i);
            (Vec::loadu(ghr + i) * gelu_grad_vec(v)).store(ghr + i);
          }
          for (; i < hidden; ++i) {
            gr[i] = gelu_scalar(hr[i]);
            ghr[i] *= gelu_grad_scalar(hr[i]);
          }
          add_row(gb1, ghr, hidden);
          add_row(gb2, gyb + r * out_dim, out_dim);
        }
        gemm(true, false, out_dim, hidden, n, 1.0f, gyb, out_dim, g.data(), hidden, 1.0f, gw2, hidden);
        gemm(true, false, hidden, d, n, 1.0f, gh.data(), hidden, xb, d, 1.0f, gw1, d);
        gemm(false, false, n, d, hidden, 1.0f, gh.data(), hidden, w1p, d, 0.0f, gxp + r0 * d, d);
      }
    }
  });
  auto sums = partial.sum(0);
  auto grad_w1 = sums.narrow(0, 0, hidden * d).view({hidden, d});
  auto grad_w2 = sums.narrow(0, hidden * d, out_dim * hidden).view({out_dim, hidden});
  auto empty = torch::empty({0}, x.options());
  auto grad_b1 = b1 ? sums.narrow(0, hidden * d + out_dim * hidden, hidden) : empty;
  auto grad_b2 = b2 ? sums.narrow(0, hidden * d + out_dim * hidden + hidden, out_dim) : empty;
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace polymodal_mlp
