/* bench_gemm.c — GFLOP/s of td_gemm on the GEMM shapes of GPT-2 124M at B*T = 256 (forward
 * NN and NT, backward NT for dinp and TN for dW). Development tool, not part of the build:
 *   cc -O3 -fopenmp -I../include -I../src bench_gemm.c ../src/gemm.c ../src/kernels.c -lm
 */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#include "kernels.h"

int main(int argc, char **argv) {
    int BT = argc > 1 ? atoi(argv[1]) : 256;
    struct { const char *name; int M, N, K, ta, tb; } s[] = {
        {"qkv fwd", BT, 2304, 768, 0, 0},   {"qkv dinp", BT, 768, 2304, 0, 1},
        {"qkv dW", 768, 2304, BT, 1, 0},    {"fc fwd", BT, 3072, 768, 0, 0},
        {"fcproj fwd", BT, 768, 3072, 0, 0}, {"fcproj dW", 3072, 768, BT, 1, 0},
        {"lmhead fwd", BT, 50257, 768, 0, 1}, {"lmhead dinp", BT, 768, 50257, 0, 0},
        {"lmhead dW", 50257, 768, BT, 1, 0}};
    for (size_t i = 0; i < sizeof s / sizeof s[0]; i++) {
        size_t M = s[i].M, N = s[i].N, K = s[i].K;
        float *A = malloc(4 * M * K), *B = malloc(4 * K * N), *C = malloc(4 * M * N);
        for (size_t j = 0; j < M * K; j++) A[j] = (float)(j % 7) * 0.1f;
        for (size_t j = 0; j < K * N; j++) B[j] = (float)(j % 5) * 0.1f;
        td_gemm(C, A, B, M, N, K, s[i].ta, s[i].tb, 0);
        double best = 1e9;
        for (int r = 0; r < 5; r++) {
            double t = omp_get_wtime();
            td_gemm(C, A, B, M, N, K, s[i].ta, s[i].tb, 0);
            t = omp_get_wtime() - t;
            if (t < best) best = t;
        }
        printf("%-12s M=%6zu N=%6zu K=%6zu  %7.2f ms  %6.1f GFLOP/s\n", s[i].name, M, N, K,
               best * 1e3, 2.0 * M * N * K / best * 1e-9);
        free(A), free(B), free(C);
    }
    return 0;
}
