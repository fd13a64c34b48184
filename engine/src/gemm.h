/* gemm.h — what the GEMM layer offers: C (+)= op(A) @ op(B) over td_real matrices, the fast
 * td_gemm (gemm.c) and the plain td_gemm_reference it is validated against (kernels.c, beside
 * the other reference kernels; gemm.c falls back to it). Nothing of the GEMM's packing or
 * micro-kernels is visible here; the ops (kernels.h) are built on this.
 */
#ifndef TD_GEMM_H
#define TD_GEMM_H

#include "internal.h"

/* C[M,N] (+)= op(A)[M,K] @ op(B)[K,N], row-major. op(A) = A (stored M x K) or, with transA,
 * A^T (A stored K x M); likewise B (K x N) or, with transB, B^T (B stored N x K).
 * accumulate = 0 overwrites C, 1 adds to it. */
void td_gemm(td_real *C, const td_real *A, const td_real *B, int M, int N, int K, int transA,
             int transB, int accumulate);
void td_gemm_reference(td_real *C, const td_real *A, const td_real *B, int M, int N, int K,
                       int transA, int transB, int accumulate);

#endif /* TD_GEMM_H */
