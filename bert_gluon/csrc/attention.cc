// Multi-head self-attention core for CPU, as an MXNet 1.9 extension operator
// ("bg_self_attention"): scores, masked softmax, dropout and the weighted sum of values in one
// operator, forward and backward.
//
// Why: on CPU, MXNet 1.9.1 runs this part of a Transformer far below the machine's matmul
// speed. interleaved_matmul_selfatt_qk / _valatt call OpenBLAS one (batch, head) at a time
// (20-60 GFLOP/s where FullyConnected reaches 300), softmax with a length runs at ~0.2 G
// elements/s, and Dropout draws its mask at ~0.3 G elements/s: together about 45 % of a
// MiniLM inference pass and 35 % of a training step. Here each (batch, head) is one task for
// one thread, its Q, K, V packed into cache-resident buffers and multiplied by the vectorized
// kernel of gemm.h.
//
// Inputs:  qkv (T, B, 3U): time-major; for head h the last axis holds [q_h; k_h; v_h], each
//          of head size d = U / heads (the layout of MXNet's interleaved_matmul_selfatt_*);
//          length (B,): valid keys per sequence (keys >= length get weight 0);
//          mode (1,): 1 in inference; any other value means training (bert_gluon passes the
//          output of Dropout(p=0.5) on a one, so MXNet's own train/predict mode decides).
// Attributes: heads; dropout (probability, on the attention weights, in training only).
// Outputs: context (T, B, U); lse (B*heads, T), each query row's log-sum-exp of its scaled
//          scores; seed (2,), this call's dropout seed as two 24-bit integers (the mask is a
//          hash of seed, row and position, see dropout.h). Nothing of size T x T is kept:
//          the backward pass recomputes the weights from Q, K and lse, as FlashAttention does,
//          so inference writes no weights and training stores 1/T of them.
// Backward inputs (MXNet's order): d context, d lse, d seed, qkv, length, mode, context,
// lse, seed. The gradient that reaches qkv is that of context only.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>
#include "dropout.h"
#include "gemm.h"
#include "mxnet/lib_api.h"

using namespace mxnet::ext;
using bg::Dropout;
using bg::gemm;
using bg::round_up;

namespace {

struct Shape {
  int64_t T, B, U, H, d;
  int Tp, dp;   // T and d rounded up to whole vectors
};

Shape shape_of(const MXTensor& qkv, int heads) {
  Shape s;
  s.T = qkv.shape[0];
  s.B = qkv.shape[1];
  s.U = qkv.shape[2] / 3;
  s.H = heads;
  s.d = s.U / heads;
  s.Tp = round_up(static_cast<int>(s.T), bg::VL);
  s.dp = round_up(static_cast<int>(s.d), bg::VL);
  return s;
}

int parse_heads(const bg::Attrs& attrs) { return bg::parse_int(attrs, "heads", 0); }

float parse_dropout(const bg::Attrs& attrs) { return bg::parse_float(attrs, "dropout", 0.f); }

int valid_keys(float length, int64_t T) {
  const int64_t L = static_cast<int64_t>(length);
  return static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(L, T)));
}

// per-thread scratch, grown on demand
std::vector<float>& scratch(int which) {
  static thread_local std::vector<float> bufs[10];
  return bufs[which];
}

float* buffer(int which, size_t n) {
  std::vector<float>& v = scratch(which);
  if (v.size() < n) v.resize(n);
  return v.data();
}

inline float row_max(const float* r, int n) {
  float m = -3.402823e38f;
  for (int j = 0; j < n; ++j) m = r[j] > m ? r[j] : m;
  return m;
}

// One (batch, head): pointers into qkv and the packed copies both passes need.
struct Task {
  const float* base;   // q of (t = 0, b, h); k at +d, v at +2d; one time step is `row` floats
  int64_t row;
  int T, d, Tp, dp, L, nL;

  const float* at(int t) const { return base + static_cast<int64_t>(t) * row; }
  // dst (rows x dp) = one of q (0), k (1), v (2) for time steps < rows, zero-padded to dp
  void pack_rows(int which, int rows, int ld, float* dst) const {
    for (int t = 0; t < rows; ++t) {
      const float* x = at(t) + which * d;
      float* y = dst + t * ld;
      for (int k = 0; k < d; ++k) y[k] = x[k];
      for (int k = d; k < ld; ++k) y[k] = 0.f;
    }
  }
  // dst (d x Tp) = k (1) or v (2) transposed, keys >= L zero up to nL
  void pack_transposed(int which, float* dst) const {
    for (int j = 0; j < L; ++j) {
      const float* x = at(j) + which * d;
      for (int k = 0; k < d; ++k) dst[k * Tp + j] = x[k];
    }
    for (int k = 0; k < d; ++k)
      for (int j = L; j < nL; ++j) dst[k * Tp + j] = 0.f;
  }
  // S (T x nL) = Q K^T, unscaled
  void scores(const float* Q, int ldq, const float* Kt, float* S) const {
    gemm(T, nL, d, Q, ldq, 1, Kt, Tp, S, Tp);
  }
};

Task make_task(const Shape& s, const float* qkv, const float* length, int64_t task) {
  const int64_t b = task / s.H, h = task % s.H;
  const int L = valid_keys(length[b], s.T);
  return Task{qkv + b * 3 * s.U + h * 3 * s.d, s.B * 3 * s.U, static_cast<int>(s.T),
              static_cast<int>(s.d), s.Tp, s.dp, L, round_up(L, bg::VL)};
}


}  // namespace

static MXReturnValue forward(const std::unordered_map<std::string, std::string>& attrs,
                             std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                             const OpResource& res) {
  const Shape s = shape_of((*inputs)[0], parse_heads(attrs));
  const float* qkv = (*inputs)[0].data<float>();
  const float* length = (*inputs)[1].data<float>();
  const float mode = (*inputs)[2].data<float>()[0];
  float* context = (*outputs)[0].data<float>();
  float* lse = (*outputs)[1].data<float>();
  const Dropout drop = Dropout::draw(parse_dropout(attrs), mode, res, (*outputs)[2].data<float>());
  const float scale = 1.f / std::sqrt(static_cast<float>(s.d));

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < s.B * s.H; ++task) {
    const int64_t b = task / s.H, h = task % s.H;
    const Task t = make_task(s, qkv, length, task);
    const int L = t.L;
    float* Q = buffer(0, t.T * t.d);       // T x d
    float* Kt = buffer(1, t.d * t.Tp);     // d x Tp
    float* V = buffer(2, t.T * t.dp);      // L x dp
    float* S = buffer(3, t.T * t.Tp);      // scores, then (dropped) weights
    float* C = buffer(4, t.T * t.dp);
    float* keep = buffer(5, t.Tp);
    t.pack_rows(0, t.T, t.d, Q);
    t.pack_transposed(1, Kt);
    t.pack_rows(2, L, t.dp, V);
    t.scores(Q, t.d, Kt, S);
    const uint32_t rs = drop.row_seed(task);
    for (int i = 0; i < t.T; ++i) {
      float* r = S + i * t.Tp;
      float sum = 0.f;
      const float top = row_max(r, L);
      for (int j = 0; j < L; ++j) {
        r[j] = std::exp((r[j] - top) * scale);
        sum += r[j];
      }
      lse[task * t.T + i] = L ? top * scale + std::log(sum) : 0.f;
      const float inv = 1.f / sum;
      if (drop.on) {
        drop.factors(rs, static_cast<int64_t>(i) * t.T, L, keep);
        for (int j = 0; j < L; ++j) r[j] *= inv * keep[j];
      } else {
        for (int j = 0; j < L; ++j) r[j] *= inv;
      }
    }
    gemm(t.T, t.dp, L, S, t.Tp, 1, V, t.dp, C, t.dp);                 // C = W V
    for (int i = 0; i < t.T; ++i) {
      float* y = context + (i * s.B + b) * s.U + h * s.d;
      for (int k = 0; k < t.d; ++k) y[k] = C[i * t.dp + k];
    }
  }
  return MX_SUCCESS;
}

static MXReturnValue backward(const std::unordered_map<std::string, std::string>& attrs,
                              std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                              const OpResource& res) {
  const Shape s = shape_of((*inputs)[3], parse_heads(attrs));
  const float* dcontext = (*inputs)[0].data<float>();
  const float* qkv = (*inputs)[3].data<float>();
  const float* length = (*inputs)[4].data<float>();
  const float mode = (*inputs)[5].data<float>()[0];
  const float* lse = (*inputs)[7].data<float>();
  const Dropout drop = Dropout::stored(parse_dropout(attrs), mode, (*inputs)[8].data<float>());
  float* dqkv = (*outputs)[0].data<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(s.d));

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < s.B * s.H; ++task) {
    const int64_t b = task / s.H, h = task % s.H;
    const Task t = make_task(s, qkv, length, task);
    const int L = t.L;
    const int T = t.T, Tp = t.Tp, dp = t.dp, d = t.d;
    float* Q = buffer(0, T * dp);       // T x dp
    float* K = buffer(1, T * dp);       // L x dp
    float* Kt = buffer(2, d * Tp);      // d x Tp
    float* Vt = buffer(3, d * Tp);      // d x Tp
    float* dC = buffer(4, T * dp);      // T x dp
    float* P = buffer(5, T * Tp);       // weights, recomputed
    float* Pd = buffer(6, T * Tp);      // weights after dropout (= P without it)
    float* dS = buffer(7, T * Tp);      // d weights, then d scores
    float* G = buffer(8, 2 * T * dp);   // dQ | dK, then dV
    float* keep = buffer(9, Tp);
    t.pack_rows(0, T, dp, Q);
    t.pack_rows(1, L, dp, K);
    t.pack_transposed(1, Kt);
    t.pack_transposed(2, Vt);
    for (int i = 0; i < T; ++i) {
      const float* g = dcontext + (i * s.B + b) * s.U + h * d;
      for (int k = 0; k < dp; ++k) dC[i * dp + k] = k < d ? g[k] : 0.f;
    }
    t.scores(Q, dp, Kt, P);
    const uint32_t rs = drop.row_seed(task);
    float* W = drop.on ? Pd : P;
    for (int i = 0; i < T; ++i) {
      float* r = P + i * Tp;
      const float m = lse[task * T + i];
      for (int j = 0; j < L; ++j) r[j] = std::exp(r[j] * scale - m);
      if (drop.on) {
        drop.factors(rs, static_cast<int64_t>(i) * T, L, keep);
        for (int j = 0; j < L; ++j) Pd[i * Tp + j] = r[j] * keep[j];
        for (int j = L; j < t.nL; ++j) Pd[i * Tp + j] = 0.f;
      }
      for (int j = L; j < t.nL; ++j) r[j] = 0.f;
    }
    // d weights = dC V^T (times the dropout factors), d scores = P * (dW - <dW, P>) * scale
    gemm(T, t.nL, d, dC, dp, 1, Vt, Tp, dS, Tp);
    for (int i = 0; i < T; ++i) {
      const float* p = P + i * Tp;
      float* r = dS + i * Tp;
      if (drop.on) {
        drop.factors(rs, static_cast<int64_t>(i) * T, L, keep);
        for (int j = 0; j < L; ++j) r[j] *= keep[j];
      }
      float dot = 0.f;
      for (int j = 0; j < L; ++j) dot += r[j] * p[j];
      for (int j = 0; j < L; ++j) r[j] = p[j] * (r[j] - dot) * scale;
    }
    float* dQ = G;
    float* dK = G + T * dp;
    gemm(T, dp, L, dS, Tp, 1, K, dp, dQ, dp);                         // dQ = dS K
    gemm(L, dp, T, dS, 1, Tp, Q, dp, dK, dp);                         // dK = dS^T Q
    float* out = dqkv + b * 3 * s.U + h * 3 * d;
    const int64_t row = t.row;
    for (int i = 0; i < T; ++i) {
      float* y = out + i * row;
      for (int k = 0; k < d; ++k) {
        y[k] = dQ[i * dp + k];
        y[d + k] = i < L ? dK[i * dp + k] : 0.f;
      }
    }
    float* dV = G;                                                    // dV = W^T dC
    gemm(L, dp, T, W, 1, Tp, dC, dp, dV, dp);
    for (int i = 0; i < T; ++i) {
      float* y = out + i * row + 2 * d;
      for (int k = 0; k < d; ++k) y[k] = i < L ? dV[i * dp + k] : 0.f;
    }
  }
  bg::zero((*outputs)[1]);
  bg::zero((*outputs)[2]);
  return MX_SUCCESS;
}

static MXReturnValue parse_attrs(const std::unordered_map<std::string, std::string>& attrs,
                                 int* num_in, int* num_out) {
  *num_in = 3;
  *num_out = 3;
  if (parse_heads(attrs) < 1) {
    MX_ERROR_MSG << "bg_self_attention: attribute heads must be a positive integer";
    return MX_FAIL;
  }
  const float p = parse_dropout(attrs);
  if (!(p >= 0.f && p < 1.f)) {
    MX_ERROR_MSG << "bg_self_attention: dropout must be in [0, 1), got " << p;
    return MX_FAIL;
  }
  return MX_SUCCESS;
}

static MXReturnValue infer_type(const bg::Attrs& attrs, std::vector<int>* in_types,
                                std::vector<int>* out_types) {
  return bg::all_float32("bg_self_attention", in_types, out_types);
}

static MXReturnValue infer_shape(const std::unordered_map<std::string, std::string>& attrs,
                                 std::vector<std::vector<unsigned int>>* in_shapes,
                                 std::vector<std::vector<unsigned int>>* out_shapes) {
  const std::vector<unsigned int>& q = (*in_shapes)[0];
  const unsigned int heads = static_cast<unsigned int>(parse_heads(attrs));
  if (q.size() != 3 || q[2] % 3 || (q[2] / 3) % heads) {
    MX_ERROR_MSG << "bg_self_attention: qkv must be (T, B, 3 * units) with units divisible "
                    "by heads";
    return MX_FAIL;
  }
  if ((*in_shapes)[1] != std::vector<unsigned int>{q[1]} ||
      (*in_shapes)[2] != std::vector<unsigned int>{1}) {
    MX_ERROR_MSG << "bg_self_attention: length must be (B,) and mode (1,)";
    return MX_FAIL;
  }
  (*out_shapes)[0] = {q[0], q[1], q[2] / 3};
  (*out_shapes)[1] = {q[1] * heads, q[0]};
  (*out_shapes)[2] = {2};
  return MX_SUCCESS;
}

REGISTER_OP(bg_self_attention)
.setForward(forward, "cpu")
.setBackward(backward, "cpu")
.setParseAttrs(parse_attrs)
.setInferType(infer_type)
.setInferShape(infer_shape);
