/* gemm.c — the GEMM every linear layer and the LM head go through.
 *
 * td_gemm picks the implementation: today the reference loop in kernels.c. A packed,
 * cache-blocked kernel slots in here with the same signature and is validated against
 * td_gemm_reference by the C unit tests and `tandem parity`'s op tier.
 */
#include "kernels.h"

void td_gemm(td_real *C, const td_real *A, const td_real *B, int M, int N, int K, int transA,
             int transB, int accumulate) {
    td_gemm_reference(C, A, B, M, N, K, transA, transB, accumulate);
}
