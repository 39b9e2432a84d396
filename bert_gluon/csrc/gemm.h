// A small register-blocked SGEMM for the attention kernels (csrc/attention.cc).
//
//     C (m x n) = A (m x k) * B (k x n)        [+ C when add]
//
// A is read element by element at A[i * ars + k * acs], so a transposed A costs nothing
// (ars = 1, acs = row length); B and C are row-major with leading dimensions ldb / ldc, and
// n must be a multiple of VL (callers pad their buffers to bg::VL). Written with GCC vector
// extensions, one vector per machine register: built with -march=native, 16 floats with
// AVX-512, 8 with AVX2, 4 elsewhere (SSE, NEON). The width must follow the ISA: a 16-float
// vector on an AVX2 machine is not split into registers but spilled to the stack on every
// operation (2 GFLOP/s per core instead of 58-68 for the attention shapes on a Zen core).
// The MR x 2 tile of accumulators, two B vectors and the broadcast A value stay in registers
// (15 of 16 with AVX2, of 32 with AVX-512).
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstring>

namespace bg {

#if defined(__AVX512F__)
constexpr int VL = 16;   // floats per vector
constexpr int MR = 6;    // rows per tile: 6 x 2 accumulators + 2 B vectors + 1 of 32 registers
#elif defined(__AVX__)
constexpr int VL = 8;
constexpr int MR = 6;    // 6 x 2 accumulators + 2 B vectors + 1 = 15 of 16 registers
#else
constexpr int VL = 4;
constexpr int MR = 6;
#endif
typedef float vf __attribute__((vector_size(VL * sizeof(float))));

inline int round_up(int x, int to) { return (x + to - 1) / to * to; }

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}

inline void vstore(float* p, const vf& v) { std::memcpy(p, &v, sizeof(vf)); }

template <int M, int NV>
inline void tile(int k, const float* A, std::ptrdiff_t ars, std::ptrdiff_t acs, const float* B,
                 int ldb, float* C, int ldc, bool add) {
  vf acc[M][NV];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = add ? vload(C + i * ldc + j * VL) : vf{};
  for (int p = 0; p < k; ++p) {
    vf b[NV];
    for (int j = 0; j < NV; ++j) b[j] = vload(B + static_cast<std::ptrdiff_t>(p) * ldb + j * VL);
    for (int i = 0; i < M; ++i) {
      const vf a = vf{} + A[i * ars + p * acs];
      for (int j = 0; j < NV; ++j) acc[i][j] += a * b[j];
    }
  }
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < NV; ++j) vstore(C + i * ldc + j * VL, acc[i][j]);
}

template <int NV>
inline void tile_rows(int rows, int k, const float* A, std::ptrdiff_t ars, std::ptrdiff_t acs,
                      const float* B, int ldb, float* C, int ldc, bool add) {
  switch (rows) {
    case 1: tile<1, NV>(k, A, ars, acs, B, ldb, C, ldc, add); break;
    case 2: tile<2, NV>(k, A, ars, acs, B, ldb, C, ldc, add); break;
    case 3: tile<3, NV>(k, A, ars, acs, B, ldb, C, ldc, add); break;
    case 4: tile<4, NV>(k, A, ars, acs, B, ldb, C, ldc, add); break;
    case 5: tile<5, NV>(k, A, ars, acs, B, ldb, C, ldc, add); break;
    default: tile<6, NV>(k, A, ars, acs, B, ldb, C, ldc, add); break;
  }
}

inline void gemm(int m, int n, int k, const float* A, std::ptrdiff_t ars, std::ptrdiff_t acs,
                 const float* B, int ldb, float* C, int ldc, bool add = false) {
  for (int j0 = 0; j0 < n; j0 += 2 * VL) {
    const bool two = n - j0 >= 2 * VL;
    for (int i0 = 0; i0 < m; i0 += MR) {
      const int rows = std::min(MR, m - i0);
      const float* a = A + i0 * ars;
      float* c = C + static_cast<std::ptrdiff_t>(i0) * ldc + j0;
      if (two)
        tile_rows<2>(rows, k, a, ars, acs, B + j0, ldb, c, ldc, add);
      else
        tile_rows<1>(rows, k, a, ars, acs, B + j0, ldb, c, ldc, add);
    }
  }
}

}  // namespace bg
