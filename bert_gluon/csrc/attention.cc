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
// Outputs: context (T, B, U); probs (B*heads, T, T), the softmax weights (kept for the
//          backward pass); seed (2,), this call's dropout seed as two 24-bit integers. The
//          dropout mask is a hash of (seed, row, position): the backward pass recomputes it.
// Backward inputs (MXNet's order): d context, d probs, d seed, qkv, length, mode, context,
// probs, seed. The gradient that reaches qkv is that of context only.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>
#include "gemm.h"
#include "mxnet/lib_api.h"

using namespace mxnet::ext;
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

int parse_heads(const std::unordered_map<std::string, std::string>& attrs) {
  auto it = attrs.find("heads");
  return it == attrs.end() ? 0 : std::stoi(it->second);
}

float parse_dropout(const std::unordered_map<std::string, std::string>& attrs) {
  auto it = attrs.find("dropout");
  return it == attrs.end() ? 0.f : std::stof(it->second);
}

inline uint32_t mix(uint32_t x) {   // "lowbias32" integer hash (C. Wellons)
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Dropout of one row of attention weights: keep[j] when mix(row_seed + index * golden) >=
// threshold, with index = i * T + j, the same in the forward and the backward pass.
struct Dropout {
  bool on = false;
  uint32_t threshold = 0, s0 = 0, s1 = 0;
  float scale = 1.f;

  Dropout(float p, bool training, uint32_t seed0, uint32_t seed1) {
    on = training && p > 0.f;
    if (on) {
      threshold = static_cast<uint32_t>(std::min(4294967295.0, p * 4294967296.0));
      scale = 1.f / (1.f - p);
    }
    s0 = seed0;
    s1 = seed1;
  }
  uint32_t row_seed(int64_t task) const {
    return mix(s0 * 0x01000193u ^ mix(s1 + 0x9e3779b9u * static_cast<uint32_t>(task + 1)));
  }
  // factor[j] = scale where kept, 0 where dropped, for j < L
  void factors(uint32_t seed, int64_t first, int L, float* out) const {
    for (int j = 0; j < L; ++j) {
      const uint32_t h = mix(seed + static_cast<uint32_t>(first + j) * 0x9e3779b9u);
      out[j] = h >= threshold ? scale : 0.f;
    }
  }
};

int valid_keys(float length, int64_t T) {
  const int64_t L = static_cast<int64_t>(length);
  return static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(L, T)));
}

// per-thread scratch, grown on demand
std::vector<float>& scratch(int which) {
  static thread_local std::vector<float> bufs[8];
  return bufs[which];
}

float* buffer(int which, size_t n) {
  std::vector<float>& v = scratch(which);
  if (v.size() < n) v.resize(n);
  return v.data();
}

}  // namespace

static MXReturnValue forward(const std::unordered_map<std::string, std::string>& attrs,
                             std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                             const OpResource& res) {
  const Shape s = shape_of((*inputs)[0], parse_heads(attrs));
  const float* qkv = (*inputs)[0].data<float>();
  const float* length = (*inputs)[1].data<float>();
  const bool training = (*inputs)[2].data<float>()[0] != 1.f;
  float* context = (*outputs)[0].data<float>();
  float* probs = (*outputs)[1].data<float>();
  float* seed_out = (*outputs)[2].data<float>();
  const float p = parse_dropout(attrs);
  uint32_t seed0 = 0, seed1 = 0;
  if (training && p > 0.f) {
    mx_cpu_rand_t& rng = res.get_cpu_rand_states()[0];
    seed0 = static_cast<uint32_t>(rng()) >> 8;
    seed1 = static_cast<uint32_t>(rng()) >> 8;
  }
  seed_out[0] = static_cast<float>(seed0);
  seed_out[1] = static_cast<float>(seed1);
  const Dropout drop(p, training, seed0, seed1);
  const float scale = 1.f / std::sqrt(static_cast<float>(s.d));
  const int64_t T = s.T, d = s.d, Tp = s.Tp, dp = s.dp;
  const int64_t row = s.B * 3 * s.U;   // stride of one time step in qkv

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < s.B * s.H; ++task) {
    const int64_t b = task / s.H, h = task % s.H;
    const int L = valid_keys(length[b], T), nL = round_up(L, bg::VL);
    const float* base = qkv + b * 3 * s.U + h * 3 * d;   // q of (t=0, b, h)
    float* Q = buffer(0, T * d);      // T x d
    float* Kt = buffer(1, d * Tp);    // d x Tp: K transposed, zero beyond L
    float* V = buffer(2, T * dp);     // L x dp
    float* S = buffer(3, T * Tp);     // scores, then (dropped) weights
    float* C = buffer(4, T * dp);
    float* keep = buffer(5, Tp);
    for (int64_t t = 0; t < T; ++t) {
      const float* x = base + t * row;
      for (int64_t k = 0; k < d; ++k) Q[t * d + k] = x[k];
    }
    for (int64_t k = 0; k < d; ++k)
      for (int64_t j = 0; j < nL; ++j) Kt[k * Tp + j] = j < L ? base[j * row + d + k] : 0.f;
    for (int64_t j = 0; j < L; ++j)
      for (int64_t k = 0; k < dp; ++k) V[j * dp + k] = k < d ? base[j * row + 2 * d + k] : 0.f;

    gemm(static_cast<int>(T), nL, static_cast<int>(d), Q, d, 1, Kt, static_cast<int>(Tp), S,
         static_cast<int>(Tp));
    const uint32_t rs = drop.row_seed(task);
    for (int64_t i = 0; i < T; ++i) {
      float* r = S + i * Tp;
      float* out = probs + (task * T + i) * T;
      if (L > 0) {
        float top = r[0];
        for (int j = 0; j < L; ++j) top = std::max(top, r[j]);
        float sum = 0.f;
        for (int j = 0; j < L; ++j) {
          r[j] = std::exp((r[j] - top) * scale);
          sum += r[j];
        }
        const float inv = 1.f / sum;
        for (int j = 0; j < L; ++j) {
          r[j] *= inv;
          out[j] = r[j];
        }
        if (drop.on) {
          drop.factors(rs, i * T, L, keep);
          for (int j = 0; j < L; ++j) r[j] *= keep[j];
        }
      }
      for (int64_t j = L; j < T; ++j) out[j] = 0.f;
    }
    gemm(static_cast<int>(T), static_cast<int>(dp), L, S, Tp, 1, V, static_cast<int>(dp), C,
         static_cast<int>(dp));
    for (int64_t t = 0; t < T; ++t) {
      float* y = context + (t * s.B + b) * s.U + h * d;
      for (int64_t k = 0; k < d; ++k) y[k] = C[t * dp + k];
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
  const bool training = (*inputs)[5].data<float>()[0] != 1.f;
  const float* probs = (*inputs)[7].data<float>();
  const float* seed = (*inputs)[8].data<float>();
  float* dqkv = (*outputs)[0].data<float>();
  const Dropout drop(parse_dropout(attrs), training, static_cast<uint32_t>(seed[0]),
                     static_cast<uint32_t>(seed[1]));
  const float scale = 1.f / std::sqrt(static_cast<float>(s.d));
  const int64_t T = s.T, d = s.d, Tp = s.Tp, dp = s.dp;
  const int64_t row = s.B * 3 * s.U;

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < s.B * s.H; ++task) {
    const int64_t b = task / s.H, h = task % s.H;
    const int L = valid_keys(length[b], T), nL = round_up(L, bg::VL);
    const float* base = qkv + b * 3 * s.U + h * 3 * d;
    float* out = dqkv + b * 3 * s.U + h * 3 * d;
    float* Q = buffer(0, T * dp);     // T x dp
    float* K = buffer(1, T * dp);     // L x dp
    float* Vt = buffer(2, d * Tp);    // d x Tp: V transposed, zero beyond L
    float* dC = buffer(3, T * dp);    // T x dp
    float* Pd = buffer(4, T * Tp);    // dropped weights, zero beyond L
    float* dS = buffer(5, T * Tp);    // d weights, then d scores
    float* G = buffer(6, 2 * T * dp);  // dQ | dK, then dV
    float* keep = buffer(7, Tp);
    for (int64_t t = 0; t < T; ++t) {
      const float* x = base + t * row;
      const float* g = dcontext + (t * s.B + b) * s.U + h * d;
      for (int64_t k = 0; k < dp; ++k) {
        Q[t * dp + k] = k < d ? x[k] : 0.f;
        dC[t * dp + k] = k < d ? g[k] : 0.f;
        if (t < L) K[t * dp + k] = k < d ? x[d + k] : 0.f;
      }
    }
    for (int64_t k = 0; k < d; ++k)
      for (int64_t j = 0; j < nL; ++j) Vt[k * Tp + j] = j < L ? base[j * row + 2 * d + k] : 0.f;
    const uint32_t rs = drop.row_seed(task);
    for (int64_t i = 0; i < T; ++i) {
      const float* P = probs + (task * T + i) * T;
      float* r = Pd + i * Tp;
      if (drop.on) {
        drop.factors(rs, i * T, L, keep);
        for (int j = 0; j < L; ++j) r[j] = P[j] * keep[j];
      } else {
        for (int j = 0; j < L; ++j) r[j] = P[j];
      }
      for (int j = L; j < nL; ++j) r[j] = 0.f;
    }
    float* dQ = G;
    float* dK = G + T * dp;
    // d weights (before dropout's scaling) = dC V^T, then d scores = P * (dW - <dW, P>)
    gemm(static_cast<int>(T), nL, static_cast<int>(d), dC, dp, 1, Vt, static_cast<int>(Tp), dS,
         static_cast<int>(Tp));
    for (int64_t i = 0; i < T; ++i) {
      const float* P = probs + (task * T + i) * T;
      float* r = dS + i * Tp;
      if (drop.on) {
        drop.factors(rs, i * T, L, keep);
        for (int j = 0; j < L; ++j) r[j] *= keep[j];
      }
      float dot = 0.f;
      for (int j = 0; j < L; ++j) dot += r[j] * P[j];
      for (int j = 0; j < L; ++j) r[j] = P[j] * (r[j] - dot) * scale;
    }
    gemm(static_cast<int>(T), static_cast<int>(dp), L, dS, Tp, 1, K, static_cast<int>(dp), dQ,
         static_cast<int>(dp));                                       // dQ = dS K
    gemm(L, static_cast<int>(dp), static_cast<int>(T), dS, 1, Tp, Q, static_cast<int>(dp), dK,
         static_cast<int>(dp));                                       // dK = dS^T Q
    for (int64_t t = 0; t < T; ++t) {
      float* y = out + t * row;
      for (int64_t k = 0; k < d; ++k) {
        y[k] = dQ[t * dp + k];
        y[d + k] = t < L ? dK[t * dp + k] : 0.f;
      }
    }
    float* dV = G;                                                    // dV = Pd^T dC
    gemm(L, static_cast<int>(dp), static_cast<int>(T), Pd, 1, Tp, dC, static_cast<int>(dp), dV,
         static_cast<int>(dp));
    for (int64_t t = 0; t < T; ++t) {
      float* y = out + t * row + 2 * d;
      for (int64_t k = 0; k < d; ++k) y[k] = t < L ? dV[t * dp + k] : 0.f;
    }
  }
  for (int i = 1; i <= 2; ++i) {
    MXTensor& g = (*outputs)[i];
    if (g.data_ptr != nullptr) {
      float* x = g.data<float>();
      for (int64_t n = 0; n < g.size(); ++n) x[n] = 0.f;
    }
  }
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

static MXReturnValue infer_type(const std::unordered_map<std::string, std::string>& attrs,
                                std::vector<int>* in_types, std::vector<int>* out_types) {
  for (size_t i = 0; i < in_types->size(); ++i) {
    if ((*in_types)[i] != kFloat32) {
      MX_ERROR_MSG << "bg_self_attention: input " << i << " must be float32";
      return MX_FAIL;
    }
  }
  for (auto& t : *out_types) t = kFloat32;
  return MX_SUCCESS;
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
  (*out_shapes)[1] = {q[1] * heads, q[0], q[0]};
  (*out_shapes)[2] = {2};
  return MX_SUCCESS;
}

REGISTER_OP(bg_self_attention)
.setForward(forward, "cpu")
.setBackward(backward, "cpu")
.setParseAttrs(parse_attrs)
.setInferType(infer_type)
.setInferShape(infer_shape);
