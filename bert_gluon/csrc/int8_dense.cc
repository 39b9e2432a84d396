// INT8 dense layer for CPU inference, as an MXNet 1.9 extension operator:
//
//   bg_int8_dense(data, weight, weight_scale, bias)     out = act(data W^T + bias)
//
// data (..., K) float32; weight int8, pre-packed by bert_gluon.quantization.pack_int8_weight
// (the layout below); weight_scale (N,) float32, one per output unit (W ~ weight * scale);
// bias (N,) float32. Attributes: num_hidden (N), in_units (K), act ("none" or "gelu": erf
// GELU fused into the output pass). Output (..., N) float32.
//
// Each row of data is quantized on the fly to int8 with its own scale (max |x| / 127), the
// int32 products are summed with AMX (Intel's tile instructions: one TDPBSSD multiplies a
// 16 x 64 int8 tile by a 64 x 16 one) where the CPU has them, and the output pass turns the
// sums back to float32 with row scale x unit scale, adds the bias and applies GELU -- so one
// operator replaces MXNet's quantize, INT8 FullyConnected, requantize/dequantize and GELU
// nodes. Why: MXNet 1.9.1's oneDNN never reaches AMX for BERT's layer sizes (it hands oneDNN
// plain row-major weights), and its INT8 graph spends as long converting between int8 and
// float32 as multiplying. Without AMX (or when Linux refuses to grant tile state) AVX-512 VNNI
// (VPDPBUSD, on activations packed in panels) computes the same int32 sums, exactly, and
// without either a plain loop does, slowly.
// BERT_GLUON_INT8_KERNEL=vnni or =plain picks a slower kernel than the best one.
//
// Packed weight layout, for Np = N rounded up to 32 and Kp = K rounded up to 64 (zeros pad):
//   [Np / 16][Kp / 64][16 rows: k / 4][16 units][4: k % 4]
// i.e. for each block of 16 output units, the 1 KiB B-tiles of TDPBSSD (K in groups of four
// bytes per unit, "VNNI" order), one per 64 values of K, contiguous.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include <omp.h>
#include "common.h"
#include "mxnet/lib_api.h"
#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>
#define BG_HAVE_AMX 1
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#define BG_HAVE_VNNI 1
#endif
#if defined(BG_HAVE_AMX) || defined(BG_HAVE_VNNI)
#include <immintrin.h>
#endif

using namespace mxnet::ext;

namespace {

constexpr int MBLK = 32, NBLK = 32, KBLK = 64;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// erf GELU, x * Phi(x), through erfc's Chebyshev fit (Numerical Recipes' erfcc, relative error
// < 1.2e-7): branch-free, so GCC vectorizes it over a row (expf from libmvec).
inline float gelu(float x) {
  const float z = std::fabs(x) * 0.70710678118654752f;
  const float t = 1.f / (1.f + 0.5f * z);
  const float e = t * std::exp(-z * z - 1.26551223f + t * (1.00002368f + t * (0.37409196f +
                  t * (0.09678418f + t * (-0.18628806f + t * (0.27886807f + t * (-1.13520398f +
                  t * (1.48851587f + t * (-0.82215223f + t * 0.17087277f)))))))));   // erfc(z)
  const float phi = x >= 0.f ? 1.f - 0.5f * e : 0.5f * e;
  return x * phi;
}

// one row of K floats -> Kp int8 (zero padded); returns the scale (x ~ q * scale)
inline float quantize_row(const float* x, int64_t K, int64_t Kp, int8_t* q) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::fmax(amax, std::fabs(x[k]));
  const float scale = amax > 0.f ? amax / 127.f : 1.f;
  const float inv = 1.f / scale;
  for (int64_t k = 0; k < K; ++k) q[k] = static_cast<int8_t>(std::nearbyint(x[k] * inv));
  for (int64_t k = K; k < Kp; ++k) q[k] = 0;
  return scale;
}

// int32 sums of a 32-row block of A (stride Kp) with the 32 units of packed blocks nb, nb+1
inline void block_plain(const int8_t* a, const int8_t* bp, int64_t Kp, int32_t* c /*32x32*/) {
  const int64_t KB = Kp / KBLK;
  std::memset(c, 0, sizeof(int32_t) * MBLK * NBLK);
  for (int half = 0; half < 2; ++half) {
    const int8_t* b = bp + half * KB * 1024;
    for (int64_t kb = 0; kb < KB; ++kb) {
      const int8_t* tile = b + kb * 1024;
      for (int m = 0; m < MBLK; ++m) {
        const int8_t* ar = a + m * Kp + kb * KBLK;
        int32_t* cr = c + m * NBLK + half * 16;
        for (int r = 0; r < 16; ++r) {
          const int8_t* br = tile + r * 64;
          for (int n = 0; n < 16; ++n) {
            int32_t s = 0;
            for (int j = 0; j < 4; ++j) s += int32_t(ar[4 * r + j]) * int32_t(br[4 * n + j]);
            cr[n] += s;
          }
        }
      }
    }
  }
}

#ifdef BG_HAVE_AMX
// Linux hands out AMX tile state only on request (once per process)
bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /*ARCH_REQ_XCOMP_PERM*/,
                                 18 /*XFEATURE_XTILEDATA*/) == 0;
  return ok;
}

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// tiles 0-3: the 2 x 2 int32 accumulators (16 x 16); 4-5: A rows; 6-7: B units
void configure_tiles() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

inline void block_amx(const int8_t* a, const int8_t* bp, int64_t Kp, int32_t* c /*32x32*/) {
  const int64_t KB = Kp / KBLK;
  const int8_t* b0 = bp;
  const int8_t* b1 = bp + KB * 1024;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kb = 0; kb < KB; ++kb) {
    _tile_loadd(4, a + kb * KBLK, Kp);
    _tile_loadd(5, a + 16 * Kp + kb * KBLK, Kp);
    _tile_loadd(6, b0 + kb * 1024, 64);
    _tile_loadd(7, b1 + kb * 1024, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  _tile_stored(0, c, NBLK * 4);
  _tile_stored(1, c + 16, NBLK * 4);
  _tile_stored(2, c + 16 * NBLK, NBLK * 4);
  _tile_stored(3, c + 16 * NBLK + 16, NBLK * 4);
}
#endif

#ifdef BG_HAVE_VNNI
// acc += u8 x s8, four products per int32 lane. In asm: with the intrinsic GCC 12 copies every
// accumulator after each VPDPBUSD and spills some of them to the stack inside the loop.
inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}

// AVX-512 VNNI: VPDPBUSD multiplies unsigned bytes by signed ones, so the rows come as
// u = q + 128 and 128 * (sum of each unit's weights) is taken off after. The packed B-tile
// rows are VNNI's layout already (64 bytes = 16 units x 4 values of K); the activations are
// packed too, per 32-row block as [Kp / 4][32 rows][4] (pack_row_vnni), so that every
// broadcast of a row's four bytes is at a constant offset from one pointer and the 16
// accumulators (8 rows x 2 x 16 units) stay in registers.
__attribute__((noinline)) void block_vnni(const uint8_t* a /*[Kp/4][32][4]*/, const int8_t* bp,
                                          int64_t Kp, const int32_t* wsum128,
                                          int32_t* c /*32x32*/) {
  const int64_t KG = Kp / 4;
  const int8_t* b0 = bp;
  const int8_t* b1 = bp + KG * 64;
  const __m512i s0 = _mm512_loadu_si512(wsum128), s1 = _mm512_loadu_si512(wsum128 + 16);
  for (int m0 = 0; m0 < MBLK; m0 += 8) {                 // 8 rows x 32 units per pass
    __m512i c00 = _mm512_setzero_si512(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
            c21 = c00, c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00,
            c60 = c00, c61 = c00, c70 = c00, c71 = c00;
    const uint8_t* p = a + m0 * 4;
    for (int64_t g = 0; g < KG; ++g, p += MBLK * 4) {
      const __m512i w0 = _mm512_loadu_si512(b0 + g * 64);
      const __m512i w1 = _mm512_loadu_si512(b1 + g * 64);
#define BG_VNNI_ROW(i)                                                              \
      {                                                                             \
        int32_t four;                                                               \
        std::memcpy(&four, p + 4 * i, 4);                                           \
        const __m512i x = _mm512_set1_epi32(four);                                  \
        c##i##0 = dpbusd(c##i##0, x, w0);                                            \
        c##i##1 = dpbusd(c##i##1, x, w1);                                            \
      }
      BG_VNNI_ROW(0) BG_VNNI_ROW(1) BG_VNNI_ROW(2) BG_VNNI_ROW(3)
      BG_VNNI_ROW(4) BG_VNNI_ROW(5) BG_VNNI_ROW(6) BG_VNNI_ROW(7)
#undef BG_VNNI_ROW
    }
    int32_t* cr = c + m0 * NBLK;
#define BG_VNNI_STORE(i)                                                            \
    _mm512_storeu_si512(cr + i * NBLK, _mm512_sub_epi32(c##i##0, s0));              \
    _mm512_storeu_si512(cr + i * NBLK + 16, _mm512_sub_epi32(c##i##1, s1));
    BG_VNNI_STORE(0) BG_VNNI_STORE(1) BG_VNNI_STORE(2) BG_VNNI_STORE(3)
    BG_VNNI_STORE(4) BG_VNNI_STORE(5) BG_VNNI_STORE(6) BG_VNNI_STORE(7)
#undef BG_VNNI_STORE
  }
}

// 128 x the sum of each unit's int8 weights, 16 units at a time: VPDPBUSD with bytes of 1.
// Per call rather than stored with the packed weight: Np * Kp / 64 instructions, 1 / M of the
// product's, and the weight format stays one array for all three kernels.
inline void weight_sums_vnni(const int8_t* w, int64_t Kp, int64_t Np, int32_t* wsum128) {
  const int64_t KG = Kp / 4;
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t nb = 0; nb < Np / 16; ++nb) {
    __m512i s = _mm512_setzero_si512();
    for (int64_t g = 0; g < KG; ++g)
      s = _mm512_dpbusd_epi32(s, ones, _mm512_loadu_si512(w + (nb * KG + g) * 64));
    _mm512_storeu_si512(wsum128 + nb * 16, _mm512_slli_epi32(s, 7));
  }
}

// row m's u = q + 128 into its 32-row block's [Kp / 4][32][4] panel
inline void pack_row_vnni(const int8_t* q, int64_t Kp, int64_t m, uint8_t* panels) {
  uint8_t* dst = panels + (m / MBLK) * MBLK * Kp + (m % MBLK) * 4;
  for (int64_t g = 0; g < Kp / 4; ++g) {
    uint32_t four;
    std::memcpy(&four, q + 4 * g, 4);
    four ^= 0x80808080u;                               // + 128 in each byte
    std::memcpy(dst + g * (MBLK * 4), &four, 4);
  }
}
#endif

enum Kernel { kPlain = 0, kVnni = 1, kAmx = 2 };

// The fastest this CPU and build have; BERT_GLUON_INT8_KERNEL=vnni or =plain asks for a slower
// one (tests compare them; benchmarks time them).
Kernel choose_kernel() {
  const char* env = std::getenv("BERT_GLUON_INT8_KERNEL");
  const std::string want = env ? env : "";
  Kernel best = kPlain;
#ifdef BG_HAVE_VNNI
  best = kVnni;
#endif
#ifdef BG_HAVE_AMX
  if (amx_permitted()) best = kAmx;
#endif
  if (want == "plain") return kPlain;
  if (want == "vnni" && best >= kVnni) return kVnni;
  return best;
}

struct Shape {
  int64_t M, K, N, Kp, Np;
};

Shape shape_of(const bg::Attrs& attrs, int64_t data_size) {
  Shape s;
  s.K = bg::parse_int(attrs, "in_units", 0);
  s.N = bg::parse_int(attrs, "num_hidden", 0);
  s.M = s.K > 0 ? data_size / s.K : 0;
  s.Kp = round_up(s.K, KBLK);
  s.Np = round_up(s.N, NBLK);
  return s;
}

MXReturnValue forward(const bg::Attrs& attrs, std::vector<MXTensor>* inputs,
                      std::vector<MXTensor>* outputs, const OpResource& res) {
  const Shape s = shape_of(attrs, (*inputs)[0].size());
  const bool gelu_out = attrs.count("act") && attrs.at("act") == "gelu";
  const float* x = (*inputs)[0].data<float>();
  const int8_t* w = (*inputs)[1].data<int8_t>();
  const float* wscale = (*inputs)[2].data<float>();
  const float* bias = (*inputs)[3].data<float>();
  float* y = (*outputs)[0].data<float>();
  const int64_t Mp = round_up(s.M, MBLK), MB = Mp / MBLK, NB = s.Np / NBLK;
  const Kernel kernel = choose_kernel();
  // one request: MXNet's temporary space is a single buffer, a second alloc_cpu reuses it
  int32_t* wsum128 = static_cast<int32_t*>(res.alloc_cpu(
      static_cast<int>(s.Np * sizeof(int32_t) + Mp * sizeof(float) + Mp * s.Kp)));
  float* xscale = reinterpret_cast<float*>(wsum128 + s.Np);
  int8_t* q = reinterpret_cast<int8_t*>(xscale + Mp);
  const int64_t KB = s.Kp / KBLK;
#pragma omp parallel
  {
    std::vector<int8_t> scratch(kernel == kVnni ? s.Kp : 0);   // one row before packing
#pragma omp for schedule(static)
    for (int64_t m = 0; m < Mp; ++m) {
      int8_t* dst = kernel == kVnni ? scratch.data() : q + m * s.Kp;
      if (m < s.M) {
        xscale[m] = quantize_row(x + m * s.K, s.K, s.Kp, dst);
      } else {
        std::memset(dst, 0, s.Kp);
        xscale[m] = 0.f;
      }
#ifdef BG_HAVE_VNNI
      if (kernel == kVnni) pack_row_vnni(dst, s.Kp, m, reinterpret_cast<uint8_t*>(q));
#endif
    }
#ifdef BG_HAVE_VNNI
    if (kernel == kVnni) {
#pragma omp single
      weight_sums_vnni(w, s.Kp, s.Np, wsum128);
    }
#endif
#ifdef BG_HAVE_AMX
    if (kernel == kAmx) configure_tiles();
#endif
    alignas(64) int32_t acc[MBLK * NBLK];
    alignas(64) float row[NBLK];
#pragma omp for collapse(2) schedule(static)
    for (int64_t mb = 0; mb < MB; ++mb) {
      for (int64_t nb = 0; nb < NB; ++nb) {
        const int8_t* a = q + mb * MBLK * s.Kp;
        const int8_t* b = w + nb * 2 * KB * 1024;
        switch (kernel) {
#ifdef BG_HAVE_AMX
          case kAmx: block_amx(a, b, s.Kp, acc); break;
#endif
#ifdef BG_HAVE_VNNI
          case kVnni:
            block_vnni(reinterpret_cast<const uint8_t*>(a), b, s.Kp, wsum128 + nb * NBLK, acc);
            break;
#endif
          default: block_plain(a, b, s.Kp, acc);
        }
        const int64_t n0 = nb * NBLK, nn = std::min<int64_t>(NBLK, s.N - n0);
        const int64_t m1 = std::min<int64_t>(MBLK, s.M - mb * MBLK);
        for (int64_t i = 0; i < m1; ++i) {
          const int64_t m = mb * MBLK + i;
          const float sx = xscale[m];
          const int32_t* ar = acc + i * NBLK;
          const float* ws = wscale + n0;
          const float* bs = bias + n0;
          for (int64_t j = 0; j < nn; ++j) row[j] = float(ar[j]) * sx * ws[j] + bs[j];
          if (gelu_out) {
            for (int64_t j = 0; j < nn; ++j) row[j] = gelu(row[j]);
          }
          std::memcpy(y + m * s.N + n0, row, nn * sizeof(float));
        }
      }
    }
#ifdef BG_HAVE_AMX
    if (kernel == kAmx) _tile_release();
#endif
  }
  return MX_SUCCESS;
}

// Registered only so MXNet's CachedOp, which builds a gradient graph for every hybridized
// block, accepts the operator: INT8 inference is not differentiable.
MXReturnValue backward(const bg::Attrs&, std::vector<MXTensor>*, std::vector<MXTensor>*,
                       const OpResource&) {
  MX_ERROR_MSG << "bg_int8_dense is for inference only: it has no gradient";
  return MX_FAIL;
}

MXReturnValue parse_attrs(const bg::Attrs& attrs, int* num_in, int* num_out) {
  *num_in = 4;
  *num_out = 1;
  if (bg::parse_int(attrs, "in_units", 0) <= 0 || bg::parse_int(attrs, "num_hidden", 0) <= 0) {
    MX_ERROR_MSG << "bg_int8_dense: in_units and num_hidden must be positive";
    return MX_FAIL;
  }
  auto it = attrs.find("act");
  if (it != attrs.end() && it->second != "none" && it->second != "gelu") {
    MX_ERROR_MSG << "bg_int8_dense: act must be 'none' or 'gelu', got '" << it->second << "'";
    return MX_FAIL;
  }
  return MX_SUCCESS;
}

MXReturnValue infer_type(const bg::Attrs& attrs, std::vector<int>* in_types,
                         std::vector<int>* out_types) {
  const int want[4] = {kFloat32, kInt8, kFloat32, kFloat32};
  const char* names[4] = {"data", "weight", "weight_scale", "bias"};
  for (int i = 0; i < 4; ++i) {
    int& t = (*in_types)[i];
    if (t == -1) t = want[i];          // parameters not yet typed (SymbolBlock inference)
    if (t != want[i]) {
      MX_ERROR_MSG << "bg_int8_dense: " << names[i] << " must be "
                   << (want[i] == kInt8 ? "int8" : "float32");
      return MX_FAIL;
    }
  }
  (*out_types)[0] = kFloat32;
  return MX_SUCCESS;
}

MXReturnValue infer_shape(const bg::Attrs& attrs, std::vector<std::vector<unsigned int>>* in_shapes,
                          std::vector<std::vector<unsigned int>>* out_shapes) {
  const std::vector<unsigned int>& d = (*in_shapes)[0];
  const int64_t K = bg::parse_int(attrs, "in_units", 0), N = bg::parse_int(attrs, "num_hidden", 0);
  if (d.empty() || d.back() != K) {
    MX_ERROR_MSG << "bg_int8_dense: data's last axis must be in_units = " << K;
    return MX_FAIL;
  }
  const unsigned int packed = static_cast<unsigned int>(round_up(N, NBLK) * round_up(K, KBLK));
  (*in_shapes)[1] = {packed};
  (*in_shapes)[2] = {static_cast<unsigned int>(N)};
  (*in_shapes)[3] = {static_cast<unsigned int>(N)};
  std::vector<unsigned int> out(d.begin(), d.end() - 1);
  out.push_back(static_cast<unsigned int>(N));
  (*out_shapes)[0] = out;
  return MX_SUCCESS;
}

}  // namespace

REGISTER_OP(bg_int8_dense)
.setForward(forward, "cpu")
.setBackward(backward, "cpu")
.setParseAttrs(parse_attrs)
.setInferType(infer_type)
.setInferShape(infer_shape);
