/* test_gemm.c — the packed GEMM against the reference loop: every transpose combination, odd
 * and edge shapes, overwrite and accumulate. Built from the engine sources (td_gemm is not part
 * of the public ABI); CTest runs it once per micro-kernel via TANDEM_GEMM_KERNEL.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

const char *td_gemm_kernel_name(void);

static float frand(unsigned *s) {
    *s = *s * 1664525u + 1013904223u;
    return (float)((*s >> 8) & 0xffff) / 32768.0f - 1.0f;
}

int main(void) {
    static const int shapes[][3] = {{1, 1, 1},   {5, 7, 3},    {13, 33, 17}, {64, 64, 64},
                                    {100, 129, 257}, {256, 768, 64}, {37, 3100, 300},
                                    {300, 31, 600}, {24, 48, 1}};
    unsigned seed = 1;
    int failures = 0;
    printf("gemm micro-kernel: %s\n", td_gemm_kernel_name());
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        float *A = malloc(sizeof(float) * M * K), *B = malloc(sizeof(float) * K * N);
        float *C1 = malloc(sizeof(float) * M * N), *C2 = malloc(sizeof(float) * M * N);
        for (int i = 0; i < M * K; i++) A[i] = frand(&seed);
        for (int i = 0; i < K * N; i++) B[i] = frand(&seed);
        for (int t = 0; t < 8; t++) {
            int ta = t & 1, tb = (t >> 1) & 1, acc = (t >> 2) & 1;
            for (int i = 0; i < M * N; i++) C1[i] = C2[i] = frand(&seed);
            td_gemm_reference(C1, A, B, M, N, K, ta, tb, acc);
            td_gemm(C2, A, B, M, N, K, ta, tb, acc);
            double err = 0, ref = 0;
            for (int i = 0; i < M * N; i++) {
                err += (double)(C1[i] - C2[i]) * (C1[i] - C2[i]);
                ref += (double)C1[i] * C1[i];
            }
            double rel = sqrt(err / (ref + 1e-30));
            if (!(rel < 1e-6)) {
                printf("FAIL M=%d N=%d K=%d transA=%d transB=%d acc=%d: rel L2 %.3g\n", M, N, K, ta, tb, acc, rel);
                failures++;
            }
        }
        free(A), free(B), free(C1), free(C2);
    }
    printf(failures ? "%d gemm cases failed\n" : "all gemm cases passed\n", failures);
    return failures != 0;
}
