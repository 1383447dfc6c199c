// Fused float32 CPU kernels for the adaLN transformer blocks (DiT): tanh-GELU, LayerNorm + adaLN
// modulation, and the gated residual, each forward and backward in one pass over memory.
// This file also holds the module's bindings, those of attention_cpu.cpp and mlp_cpu.cpp included.
//
// PyTorch runs these as chains of element-wise kernels (layer_norm, addcmul, mul, sum, ...), each
// reading and writing the whole activation; and its tanh-GELU calls a vectorised tanh that costs
// about three times an exp. Here tanh-GELU uses the identity 0.5 x (1 + tanh(u)) = x sigmoid(2u),
// and the norm, modulation and their gradients run row by row while the row is in cache.
//
// Built on first use by polymodal/kernels/loader.py (torch.utils.cpp_extension) with AVX2 flags,
// so at::vec::Vectorized<float> is eight lanes wide. Every function takes contiguous float32 CPU
// tensors (the Python side makes them so) and parallelises with at::parallel_for over rows.
// Reductions over rows (the gradients of scale, shift and gate) go through one partial sum per
// fixed chunk of rows, so results do not depend on thread scheduling.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_blas.h"
#include "vec_math.h"

namespace {

using Vec = at::vec::Vectorized<float>;
using namespace polymodal_vec;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kElementGrain = 32768;

void check_input(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "polymodal fused_cpu: ", name, " must be a contiguous float32 CPU tensor");
}

// x (B, N, D) and a per-sample row tensor (B, D) of the same B and D.
void check_rows(const torch::Tensor& x, const torch::Tensor& rows, const char* name) {
  TORCH_CHECK(x.dim() == 3, "polymodal fused_cpu: x must be (B, N, D), got ", x.dim(), " dimensions");
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) == x.size(0) && rows.size(1) == x.size(2),
              "polymodal fused_cpu: ", name, " must be (B, D) = (", x.size(0), ", ", x.size(2), "), got ", rows.sizes());
}

torch::Tensor gelu_tanh_forward(const torch::Tensor& x) {
  check_input(x, "x");
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) gelu_vec(Vec::loadu(xp + i)).store(yp + i);
    for (; i < end; ++i) yp[i] = gelu_scalar(xp[i]);
  });
  return y;
}

torch::Tensor gelu_tanh_backward(const torch::Tensor& grad, const torch::Tensor& x) {
  check_input(grad, "grad");
  check_input(x, "x");
  TORCH_CHECK(grad.sizes() == x.sizes(), "polymodal fused_cpu: grad must match x, got ", grad.sizes());
  auto gx = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* gp = grad.data_ptr<float>();
  float* op = gx.data_ptr<float>();
  at::parallel_for(0, x.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) (Vec::loadu(gp + i) * gelu_grad_vec(Vec::loadu(xp + i))).store(op + i);
    for (; i < end; ++i) op[i] = gp[i] * gelu_grad_scalar(xp[i]);
  });
  return gx;
}

// y = layer_norm(x) * (1 + scale[b]) + shift[b]; x (B, N, D), shift/scale (B, D).
// Returns y, and the per-row mean and 1/std (B * N) the backward needs.
std::vector<torch::Tensor> adaln_forward(const torch::Tensor& x, const torch::Tensor& shift, const torch::Tensor& scale,
                                         double eps) {
  check_input(x, "x");
  check_input(shift, "shift");
  check_input(scale, "scale");
  check_rows(x, shift, "shift");
  check_rows(x, scale, "scale");
  const int64_t n = x.size(1), d = x.size(2), rows = x.size(0) * n;
  auto y = torch::empty_like(x);
  auto mean = torch::empty({rows}, x.options());
  auto rstd = torch::empty({rows}, x.options());
  const float *xp = x.data_ptr<float>(), *shp = shift.data_ptr<float>(), *scp = scale.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / d), [&](int64_t begin, int64_t end) {
    const Vec one(1.0f);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * d;
      const float* sh = shp + (r / n) * d;
      const float* sc = scp + (r / n) * d;
      float* out = yp + r * d;
      Vec acc(0.0f);
      int64_t i = 0;
      for (; i + kLanes <= d; i += kLanes) acc = acc + Vec::loadu(row + i);
      float total = sum_lanes(acc);
      for (; i < d; ++i) total += row[i];
      const float m = total / d;
      const Vec vm(m);
      acc = Vec(0.0f);
      for (i = 0; i + kLanes <= d; i += kLanes) {
        Vec c = Vec::loadu(row + i) - vm;
        acc = at::vec::fmadd(c, c, acc);
      }
      float squares = sum_lanes(acc);
      for (; i < d; ++i) squares += (row[i] - m) * (row[i] - m);
      const float rs = 1.0f / std::sqrt(squares / d + static_cast<float>(eps));
      const Vec vr(rs);
      for (i = 0; i + kLanes <= d; i += kLanes) {
        Vec xhat = (Vec::loadu(row + i) - vm) * vr;
        at::vec::fmadd(xhat, one + Vec::loadu(sc + i), Vec::loadu(sh + i)).store(out + i);
      }
      for (; i < d; ++i) out[i] = (row[i] - m) * rs * (1.0f + sc[i]) + sh[i];
      mp[r] = m;
      rp[r] = rs;
    }
  });
  return {y, mean, rstd};
}

// Gradients of adaln_forward: (grad_x (B, N, D), grad_shift (B, D), grad_scale (B, D)).
// With g_hat = grad * (1 + scale): grad_x = rstd (g_hat - mean(g_hat) - xhat mean(g_hat xhat)),
// grad_shift = sum over rows of grad, grad_scale = sum over rows of grad * xhat.
std::vector<torch::Tensor> adaln_backward(const torch::Tensor& grad, const torch::Tensor& x, const torch::Tensor& mean,
                                          const torch::Tensor& rstd, const torch::Tensor& scale) {
  check_input(grad, "grad");
  check_input(x, "x");
  check_input(scale, "scale");
  check_rows(x, scale, "scale");
  TORCH_CHECK(grad.sizes() == x.sizes() && mean.numel() == x.size(0) * x.size(1) && rstd.numel() == mean.numel(),
              "polymodal fused_cpu: adaln_backward got mismatched grad, mean or rstd");
  const int64_t b = x.size(0), n = x.size(1), d = x.size(2), rows = b * n;
  const int64_t chunks = row_chunks(rows);
  auto gx = torch::empty_like(x);
  auto partial = torch::zeros({chunks, 2, b, d}, x.options());  // per chunk: grad_shift, grad_scale
  const float *gp = grad.data_ptr<float>(), *xp = x.data_ptr<float>(), *mp = mean.data_ptr<float>(),
              *rp = rstd.data_ptr<float>(), *scp = scale.data_ptr<float>();
  float *op = gx.data_ptr<float>(), *pp = partial.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    const Vec one(1.0f);
    for (int64_t chunk = first; chunk < last; ++chunk) {
      float* gshift = pp + chunk * 2 * b * d;
      float* gscale = gshift + b * d;
      for (int64_t r = rows * chunk / chunks; r < rows * (chunk + 1) / chunks; ++r) {
        const int64_t offset = (r / n) * d;
        const float *row = xp + r * d, *g = gp + r * d, *sc = scp + offset;
        float *gsh = gshift + offset, *gsc = gscale + offset, *out = op + r * d;
        const float m = mp[r], rs = rp[r];
        const Vec vm(m), vr(rs);
        Vec sum_gh(0.0f), sum_ghx(0.0f);
        int64_t i = 0;
        for (; i + kLanes <= d; i += kLanes) {
          Vec xhat = (Vec::loadu(row + i) - vm) * vr;
          Vec gv = Vec::loadu(g + i);
          (Vec::loadu(gsh + i) + gv).store(gsh + i);
          at::vec::fmadd(gv, xhat, Vec::loadu(gsc + i)).store(gsc + i);
          Vec gh = gv * (one + Vec::loadu(sc + i));
          sum_gh = sum_gh + gh;
          sum_ghx = at::vec::fmadd(gh, xhat, sum_ghx);
        }
        float c1 = sum_lanes(sum_gh), c2 = sum_lanes(sum_ghx);
        for (int64_t j = i; j < d; ++j) {
          float xhat = (row[j] - m) * rs, gh = g[j] * (1.0f + sc[j]);
          gsh[j] += g[j];
          gsc[j] += g[j] * xhat;
          c1 += gh;
          c2 += gh * xhat;
        }
        c1 /= d;
        c2 /= d;
        const Vec vc1(c1), vc2(c2);
        for (i = 0; i + kLanes <= d; i += kLanes) {
          Vec xhat = (Vec::loadu(row + i) - vm) * vr;
          Vec gh = Vec::loadu(g + i) * (one + Vec::loadu(sc + i));
          (vr * (gh - vc1 - xhat * vc2)).store(out + i);
        }
        for (; i < d; ++i) {
          float xhat = (row[i] - m) * rs, gh = g[i] * (1.0f + sc[i]);
          out[i] = rs * (gh - c1 - xhat * c2);
        }
      }
    }
  });
  auto sums = partial.sum(0);  // (2, B, D)
  return {gx, sums[0], sums[1]};
}

// Gradients of x + gate[b] * y (the forward is one addcmul): (grad_y (B, N, D), grad_gate (B, D)).
// grad_x is grad itself and needs no kernel.
std::vector<torch::Tensor> gated_residual_backward(const torch::Tensor& grad, const torch::Tensor& y,
                                                   const torch::Tensor& gate) {
  check_input(grad, "grad");
  check_input(y, "y");
  check_input(gate, "gate");
  check_rows(y, gate, "gate");
  TORCH_CHECK(grad.sizes() == y.sizes(), "polymodal fused_cpu: grad must match y, got ", grad.sizes());
  const int64_t b = y.size(0), n = y.size(1), d = y.size(2), rows = b * n;
  const int64_t chunks = row_chunks(rows);
  auto gy = torch::empty_like(y);
  auto partial = torch::zeros({chunks, b, d}, y.options());
  const float *gp = grad.data_ptr<float>(), *yp = y.data_ptr<float>(), *gtp = gate.data_ptr<float>();
  float *op = gy.data_ptr<float>(), *pp = partial.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      for (int64_t r = rows * chunk / chunks; r < rows * (chunk + 1) / chunks; ++r) {
        const int64_t offset = (r / n) * d;
        const float *g = gp + r * d, *row = yp + r * d, *gt = gtp + offset;
        float *out = op + r * d, *acc = pp + chunk * b * d + offset;
        int64_t i = 0;
        for (; i + kLanes <= d; i += kLanes) {
          Vec gv = Vec::loadu(g + i);
          (gv * Vec::loadu(gt + i)).store(out + i);
          at::vec::fmadd(gv, Vec::loadu(row + i), Vec::loadu(acc + i)).store(acc + i);
        }
        for (; i < d; ++i) {
          out[i] = g[i] * gt[i];
          acc[i] += g[i] * row[i];
        }
      }
    }
  });
  return {gy, partial.sum(0)};
}

}  // namespace

// attention_cpu.cpp, compiled into the same module.
namespace polymodal_attention {
std::vector<torch::Tensor> attention_forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                             double scale, bool keep_probs);
std::vector<torch::Tensor> attention_backward(const torch::Tensor& grad, const torch::Tensor& q, const torch::Tensor& k,
                                              const torch::Tensor& v, const torch::Tensor& out,
                                              const torch::Tensor& probs, double scale);
}  // namespace polymodal_attention

// mlp_cpu.cpp, compiled into the same module.
namespace polymodal_mlp {
std::vector<torch::Tensor> mlp_gelu_forward(const torch::Tensor& x, const torch::Tensor& w1,
                                            const c10::optional<torch::Tensor>& b1, const torch::Tensor& w2,
                                            const c10::optional<torch::Tensor>& b2, bool keep_hidden);
std::vector<torch::Tensor> mlp_gelu_backward(const torch::Tensor& grad_y, const torch::Tensor& x,
                                             const torch::Tensor& h, const torch::Tensor& w1,
                                             const c10::optional<torch::Tensor>& b1, const torch::Tensor& w2,
                                             const c10::optional<torch::Tensor>& b2);
}  // namespace polymodal_mlp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gelu_tanh_forward", &gelu_tanh_forward, "tanh-GELU (x (...)) -> (...)");
  m.def("gelu_tanh_backward", &gelu_tanh_backward, "tanh-GELU gradient (grad, x) -> grad_x");
  m.def("adaln_forward", &adaln_forward, "LayerNorm + modulation (x, shift, scale, eps) -> (y, mean, rstd)");
  m.def("adaln_backward", &adaln_backward, "(grad, x, mean, rstd, scale) -> (grad_x, grad_shift, grad_scale)");
  m.def("gated_residual_backward", &gated_residual_backward, "(grad, y, gate) -> (grad_y, grad_gate)");
  m.def("attention_forward", &polymodal_attention::attention_forward,
        "softmax(q k^T scale) v (q, k, v, scale, keep_probs) -> (out, probs)");
  m.def("attention_backward", &polymodal_attention::attention_backward,
        "(grad, q, k, v, out, probs, scale) -> (grad_q, grad_k, grad_v)");
  m.def("mlp_gelu_forward", &polymodal_mlp::mlp_gelu_forward,
        "fc2(gelu_tanh(fc1(x))) (x, w1, b1 | None, w2, b2 | None, keep_hidden) -> (y, h = fc1(x) | empty)");
  m.def("mlp_gelu_backward", &polymodal_mlp::mlp_gelu_backward,
        "(grad_y, x, h, w1, b1, w2, b2) -> (grad_x, grad_w1, grad_b1, grad_w2, grad_b2)");
  m.def("blas_available", &polymodal_blas::blas_available, "whether torch's BLAS exports sgemm_ (attention, MLP)");
}
