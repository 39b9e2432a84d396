// A small register-blocked SGEMM for the attention kernels (csrc/attention.cc).
//
//     C (m x n) = A (m x k) * B (k x n)        [+ C when add]
//
// A is read element by element at A[i * ars + k * acs], so a transposed A costs nothing
// (ars = 1, acs = row length); B and C are row-major with leading dimensions ldb / ldc, and
// n must be a multiple of 16 (callers pad their buffers). Written with GCC vector extensions:
// built with -march=native, a 16-float vector is one AVX-512 register (two AVX2 registers
// elsewhere), and the m x 32 tile of accumulators stays in registers.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstring>

namespace bg {

typedef float vf __attribute__((vector_size(64)));
constexpr int VL = 16;   // floats per vector
#if defined(__AVX512F__)
constexpr int MR = 6;    // rows per tile: 6 x 2 accumulators + 2 B vectors fit 32 registers
#else
constexpr int MR = 3;    // AVX2: 16 registers of 8 floats
#endif

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
