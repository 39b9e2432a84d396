// LayerNorm over the last axis for CPU, as MXNet 1.9 extension operators:
//
//   bg_layer_norm(data, gamma, beta)            out = LayerNorm(data)
//   bg_add_norm(x, y, gamma, beta, mode)        out = LayerNorm(x + dropout(y))   (AddNorm)
//
// Why: MXNet 1.9.1's built-in LayerNorm backward on CPU goes through generic broadcast
// reductions and costs ~12x its forward (47 ms per 32x128x384 activation on 2 cores), a
// quarter of a MiniLM training step; and a Transformer's residual branch runs Dropout (slow
// per-element RNG), the addition and LayerNorm as three passes over memory, each with its
// backward. Here one pass over each row does the sum, the dropout (a hash mask, dropout.h)
// and the normalization; the backward pass recomputes the sum and does the input gradient in
// one pass per row, with per-thread partial sums for gamma/beta.
//
// Attributes: eps; for bg_add_norm also dropout (probability, on y, in training only).
// bg_add_norm's mode input (1,) is exactly 1 when predicting (see bert_gluon.ops).
// Outputs: out (..., C), mean (...), rstd (...) = 1 / sqrt(var + eps), kept for the backward
// pass like the built-in op's mean/std; bg_add_norm also seed (2,), its dropout seed.
// Backward inputs (MXNet's convention for extension ops): the gradients of the outputs, the
// inputs, the outputs. Backward outputs: the gradients of the inputs.
#include <cmath>
#include <string>
#include <vector>
#include <omp.h>
#include "dropout.h"
#include "mxnet/lib_api.h"

using namespace mxnet::ext;

namespace {

float parse_eps(const bg::Attrs& attrs) { return bg::parse_float(attrs, "eps", 1e-5f); }

// s = x + dropout(y) for one row of C (factor: scratch for the dropout factors)
inline void residual_row(const bg::Dropout& drop, int64_t i, const float* x, const float* y,
                         int64_t C, float* s, float* factor) {
  if (drop.on) {
    drop.factors(drop.row_seed(i), 0, C, factor);
    for (int64_t c = 0; c < C; ++c) s[c] = x[c] + y[c] * factor[c];
  } else {
    for (int64_t c = 0; c < C; ++c) s[c] = x[c] + y[c];
  }
}

// y = (s - mean) * rstd * g + b over one row of C values
inline void normalize_row(const float* s, const float* g, const float* b, float eps, int64_t C,
                          float* y, float* mean_out, float* rstd_out) {
  float sum = 0.f;
  for (int64_t c = 0; c < C; ++c) sum += s[c];
  const float mean = sum / C;
  float sq = 0.f;
  for (int64_t c = 0; c < C; ++c) {
    const float d = s[c] - mean;
    sq += d * d;
  }
  const float rstd = 1.f / std::sqrt(sq / C + eps);
  for (int64_t c = 0; c < C; ++c) y[c] = (s[c] - mean) * rstd * g[c] + b[c];
  *mean_out = mean;
  *rstd_out = rstd;
}

// ds = d LayerNorm / d s for one row; adds the row's d gamma / d beta terms to pg / pb
inline void normalize_row_backward(const float* s, const float* dy, const float* g, float m,
                                   float r, int64_t C, float* ds, float* pg, float* pb) {
  float s1 = 0.f, s2 = 0.f;   // sum(dy*g), sum(dy*g*xhat)
  for (int64_t c = 0; c < C; ++c) {
    const float xhat = (s[c] - m) * r;
    const float dxhat = dy[c] * g[c];
    s1 += dxhat;
    s2 += dxhat * xhat;
    pg[c] += dy[c] * xhat;
    pb[c] += dy[c];
  }
  s1 /= C;
  s2 /= C;
  for (int64_t c = 0; c < C; ++c) {
    const float xhat = (s[c] - m) * r;
    ds[c] = r * (dy[c] * g[c] - s1 - xhat * s2);
  }
}

std::vector<float>& scratch(size_t n) {
  static thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf;
}

// Backward over N rows of C: row(i, s, factor) fills the sum s (and, for AddNorm, the dropout
// factors) of row i; emit(i, ds, factor) writes the input gradients from ds.
template <typename Row, typename Emit>
void backward_rows(int64_t N, int64_t C, const float* dy, const float* g, const float* mean,
                   const float* rstd, float* dg, float* db, Row row, Emit emit) {
  const int T = omp_get_max_threads();
  std::vector<float> part(static_cast<size_t>(T) * 2 * C, 0.f);
#pragma omp parallel num_threads(T)
  {
    float* pg = part.data() + static_cast<size_t>(omp_get_thread_num()) * 2 * C;
    float* pb = pg + C;
    std::vector<float>& buf = scratch(3 * C);
    float *s = buf.data(), *ds = s + C, *factor = ds + C;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N; ++i) {
      const float* sr = row(i, s, factor);
      normalize_row_backward(sr, dy + i * C, g, mean[i], rstd[i], C, ds, pg, pb);
      emit(i, ds, factor);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    float sg = 0.f, sb = 0.f;
    for (int t = 0; t < T; ++t) {
      sg += part[static_cast<size_t>(t) * 2 * C + c];
      sb += part[static_cast<size_t>(t) * 2 * C + C + c];
    }
    dg[c] = sg;
    db[c] = sb;
  }
}

}  // namespace

// ---------------------------------------------------------------- bg_layer_norm
// inputs data, gamma, beta; outputs out, mean, rstd
static MXReturnValue ln_forward(const std::unordered_map<std::string, std::string>& attrs,
                                std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                const OpResource& res) {
  const float eps = parse_eps(attrs);
  MXTensor& x_t = (*inputs)[0];
  const int64_t C = x_t.shape.back();
  const int64_t N = C ? x_t.size() / C : 0;
  const float* x = x_t.data<float>();
  const float* g = (*inputs)[1].data<float>();
  const float* b = (*inputs)[2].data<float>();
  float* y = (*outputs)[0].data<float>();
  float* mean = (*outputs)[1].data<float>();
  float* rstd = (*outputs)[2].data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; ++i)
    normalize_row(x + i * C, g, b, eps, C, y + i * C, mean + i, rstd + i);
  return MX_SUCCESS;
}

// inputs: d out, d mean, d rstd, data, gamma, beta, out, mean, rstd
static MXReturnValue ln_backward(const std::unordered_map<std::string, std::string>& attrs,
                                 std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                 const OpResource& res) {
  MXTensor& x_t = (*inputs)[3];
  const int64_t C = x_t.shape.back();
  const int64_t N = C ? x_t.size() / C : 0;
  const float* x = x_t.data<float>();
  float* dx = (*outputs)[0].data<float>();
  backward_rows(N, C, (*inputs)[0].data<float>(), (*inputs)[4].data<float>(),
                (*inputs)[7].data<float>(), (*inputs)[8].data<float>(),
                (*outputs)[1].data<float>(), (*outputs)[2].data<float>(),
                [&](int64_t i, float*, float*) { return x + i * C; },
                [&](int64_t i, const float* ds, const float*) {
                  std::copy(ds, ds + C, dx + i * C);
                });
  return MX_SUCCESS;
}

// ---------------------------------------------------------------- bg_add_norm
// inputs x, y, gamma, beta, mode; outputs out, mean, rstd, seed
static MXReturnValue an_forward(const std::unordered_map<std::string, std::string>& attrs,
                                std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                const OpResource& res) {
  const float eps = parse_eps(attrs);
  MXTensor& x_t = (*inputs)[0];
  const int64_t C = x_t.shape.back();
  const int64_t N = C ? x_t.size() / C : 0;
  const float* x = x_t.data<float>();
  const float* yin = (*inputs)[1].data<float>();
  const float* g = (*inputs)[2].data<float>();
  const float* b = (*inputs)[3].data<float>();
  const float mode = (*inputs)[4].data<float>()[0];
  float* out = (*outputs)[0].data<float>();
  float* mean = (*outputs)[1].data<float>();
  float* rstd = (*outputs)[2].data<float>();
  const bg::Dropout drop = bg::Dropout::draw(bg::parse_float(attrs, "dropout", 0.f), mode, res,
                                             (*outputs)[3].data<float>());
#pragma omp parallel
  {
    std::vector<float>& buf = scratch(2 * C);
    float *s = buf.data(), *factor = s + C;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N; ++i) {
      residual_row(drop, i, x + i * C, yin + i * C, C, s, factor);
      normalize_row(s, g, b, eps, C, out + i * C, mean + i, rstd + i);
    }
  }
  return MX_SUCCESS;
}

// inputs: d out, d mean, d rstd, d seed, x, y, gamma, beta, mode, out, mean, rstd, seed
static MXReturnValue an_backward(const std::unordered_map<std::string, std::string>& attrs,
                                 std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                                 const OpResource& res) {
  MXTensor& x_t = (*inputs)[4];
  const int64_t C = x_t.shape.back();
  const int64_t N = C ? x_t.size() / C : 0;
  const float* x = x_t.data<float>();
  const float* yin = (*inputs)[5].data<float>();
  const bg::Dropout drop = bg::Dropout::stored(bg::parse_float(attrs, "dropout", 0.f),
                                               (*inputs)[8].data<float>()[0],
                                               (*inputs)[12].data<float>());
  float* dx = (*outputs)[0].data<float>();
  float* dy = (*outputs)[1].data<float>();
  backward_rows(N, C, (*inputs)[0].data<float>(), (*inputs)[6].data<float>(),
                (*inputs)[10].data<float>(), (*inputs)[11].data<float>(),
                (*outputs)[2].data<float>(), (*outputs)[3].data<float>(),
                [&](int64_t i, float* s, float* factor) {
                  residual_row(drop, i, x + i * C, yin + i * C, C, s, factor);
                  return static_cast<const float*>(s);
                },
                [&](int64_t i, const float* ds, const float* factor) {
                  float *dxr = dx + i * C, *dyr = dy + i * C;
                  for (int64_t c = 0; c < C; ++c) dxr[c] = ds[c];
                  if (drop.on) {
                    for (int64_t c = 0; c < C; ++c) dyr[c] = ds[c] * factor[c];
                  } else {
                    for (int64_t c = 0; c < C; ++c) dyr[c] = ds[c];
                  }
                });
  bg::zero((*outputs)[4]);
  return MX_SUCCESS;
}

// ---------------------------------------------------------------- shared set-up
template <int IN>
static MXReturnValue parse_attrs(const std::unordered_map<std::string, std::string>& attrs,
                                 int* num_in, int* num_out) {
  *num_in = IN;
  *num_out = IN == 3 ? 3 : 4;
  const float p = bg::parse_float(attrs, "dropout", 0.f);
  if (!(p >= 0.f && p < 1.f)) {
    MX_ERROR_MSG << "bg_add_norm: dropout must be in [0, 1), got " << p;
    return MX_FAIL;
  }
  return MX_SUCCESS;
}

static MXReturnValue infer_type(const bg::Attrs& attrs, std::vector<int>* in_types,
                                std::vector<int>* out_types) {
  return bg::all_float32("bg_layer_norm / bg_add_norm", in_types, out_types);
}

// data inputs first (1 for LayerNorm, 2 for AddNorm), then gamma and beta
template <int DATA>
static MXReturnValue infer_shape(const std::unordered_map<std::string, std::string>& attrs,
                                 std::vector<std::vector<unsigned int>>* in_shapes,
                                 std::vector<std::vector<unsigned int>>* out_shapes) {
  const std::vector<unsigned int>& s = (*in_shapes)[0];
  if (s.empty()) {
    MX_ERROR_MSG << "bg_layer_norm: data must have at least one axis";
    return MX_FAIL;
  }
  if (DATA == 2 && (*in_shapes)[1] != s) {
    MX_ERROR_MSG << "bg_add_norm: x and y must have the same shape";
    return MX_FAIL;
  }
  const unsigned int C = s.back();
  for (int k = DATA; k <= DATA + 1; ++k) {
    const std::vector<unsigned int>& p = (*in_shapes)[k];
    if (p.size() != 1 || p[0] != C) {
      MX_ERROR_MSG << "bg_layer_norm: gamma and beta must have shape (" << C << ",)";
      return MX_FAIL;
    }
  }
  std::vector<unsigned int> rows(s.begin(), s.end() - 1);
  if (rows.empty()) rows.push_back(1);
  (*out_shapes)[0] = s;
  (*out_shapes)[1] = rows;
  (*out_shapes)[2] = rows;
  if (DATA == 2) (*out_shapes)[3] = {2};
  return MX_SUCCESS;
}

REGISTER_OP(bg_layer_norm)
.setForward(ln_forward, "cpu")
.setBackward(ln_backward, "cpu")
.setParseAttrs(parse_attrs<3>)
.setInferType(infer_type)
.setInferShape(infer_shape<1>);

REGISTER_OP(bg_add_norm)
.setForward(an_forward, "cpu")
.setBackward(an_backward, "cpu")
.setParseAttrs(parse_attrs<5>)
.setInferType(infer_type)
.setInferShape(infer_shape<2>);
