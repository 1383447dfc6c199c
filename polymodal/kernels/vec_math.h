// Helpers the kernels share: the sum of a vector's lanes, the fixed split of rows into one chunk
// per thread, and tanh-GELU with its derivative, vectorised (at::vec, eight float lanes under
// AVX2) and scalar.
//
// gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x sigmoid(2u), 2u = x (kLinear + kCubic x^2): PyTorch's CPU
// tanh costs about three exps, the sigmoid one.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>

namespace polymodal_vec {

using Vec = at::vec::Vectorized<float>;

inline float sum_lanes(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// Chunks for reductions over rows: a fixed split of [0, rows) into one range per thread, so a sum
// does not depend on thread scheduling.
inline int64_t row_chunks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads()));
}

constexpr float kLinear = 1.5957691216057308f;  // 2 sqrt(2 / pi)
constexpr float kCubic = 0.044715f * 1.5957691216057308f;

inline float sigmoid(float z) { return 1.0f / (1.0f + std::exp(-z)); }

inline Vec gelu_vec(const Vec& v) {
  const Vec z = v * at::vec::fmadd(Vec(kCubic), v * v, Vec(kLinear));
  return v / (Vec(1.0f) + z.neg().exp_u20());
}

inline float gelu_scalar(float v) { return v * sigmoid(v * (kLinear + kCubic * v * v)); }

// d/dx [x s(z)] = s + x s (1 - s) z'(x), z'(x) = kLinear + 3 kCubic x^2.
inline Vec gelu_grad_vec(const Vec& v) {
  const Vec one(1.0f), v2 = v * v;
  const Vec s = one / (one + (v * at::vec::fmadd(Vec(kCubic), v2, Vec(kLinear))).neg().exp_u20());
  const Vec dz = at::vec::fmadd(Vec(3.0f * kCubic), v2, Vec(kLinear));
  // s + (x s)(1 - s) z': x s stays finite where s underflows to 0, so huge negative x gives 0, not NaN.
  return at::vec::fmadd((v * s) * (one - s), dz, s);
}

inline float gelu_grad_scalar(float v) {
  const float s = sigmoid(v * (kLinear + kCubic * v * v));
  return s + (v * s) * (1.0f - s) * (kLinear + 3.0f * kCubic * v * v);
}

}  // namespace polymodal_vec
