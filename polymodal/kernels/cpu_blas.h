// Row-major single-precision GEMM through the Fortran BLAS that torch links (MKL on x86), for
// kernels that multiply one cache-sized block at a time inside their own parallel loop (BLAS
// then runs single-threaded in each thread).
#pragma once

// Weak, so the module still loads where the symbol is missing; `blas_available` then says so.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace polymodal_blas {

// Row-major C (m x n) = alpha op(A) op(B) + beta C with op(A) (m x k) and op(B) (k x n); lda, ldb
// and ldc are row strides. A row-major matrix is its transpose in column-major terms, so this is
// the column-major product C^T = op(B)^T op(A)^T.
inline void gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  const char op_b = trans_b ? 'T' : 'N', op_a = trans_a ? 'T' : 'N';
  sgemm_(&op_b, &op_a, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

inline bool blas_available() { return sgemm_ != nullptr; }

}  // namespace polymodal_blas
