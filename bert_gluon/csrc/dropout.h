// Dropout masks for bert_gluon's operators, as a hash of (seed, row, position): nothing to
// store between the forward and the backward pass, and the same in both.
//
// A call draws one seed (two 24-bit integers, so it fits a float32 output exactly) from
// MXNet's CPU random states, which mx.random.seed() resets; element j of row r is kept when
// mix(row_seed(r) + j * golden) >= p * 2^32, and kept values are scaled by 1 / (1 - p).
#pragma once
#include <algorithm>
#include <cstdint>
#include "common.h"
#include "mxnet/lib_api.h"

namespace bg {

inline uint32_t mix(uint32_t x) {   // "lowbias32" integer hash (C. Wellons)
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

struct Dropout {
  bool on = false;
  uint32_t threshold = 0, s0 = 0, s1 = 0;
  float scale = 1.f;

  // mode: the operator's (1,) "mode" input, exactly 1 when predicting (see bert_gluon.ops)
  Dropout(float p, float mode, uint32_t seed0, uint32_t seed1) : s0(seed0), s1(seed1) {
    on = mode != 1.f && p > 0.f;
    if (on) {
      threshold = static_cast<uint32_t>(std::min(4294967295.0, p * 4294967296.0));
      scale = 1.f / (1.f - p);
    }
  }
  // a fresh seed for this call (forward pass), written to out[0..1]
  static Dropout draw(float p, float mode, const mxnet::ext::OpResource& res, float* out) {
    uint32_t a = 0, b = 0;
    if (mode != 1.f && p > 0.f) {
      mxnet::ext::mx_cpu_rand_t& rng = res.get_cpu_rand_states()[0];
      a = static_cast<uint32_t>(rng()) >> 8;
      b = static_cast<uint32_t>(rng()) >> 8;
    }
    out[0] = static_cast<float>(a);
    out[1] = static_cast<float>(b);
    return Dropout(p, mode, a, b);
  }
  // the seed a forward pass stored (backward pass)
  static Dropout stored(float p, float mode, const float* seed) {
    return Dropout(p, mode, static_cast<uint32_t>(seed[0]), static_cast<uint32_t>(seed[1]));
  }
  uint32_t row_seed(int64_t row) const {
    return mix(s0 * 0x01000193u ^ mix(s1 + 0x9e3779b9u * static_cast<uint32_t>(row + 1)));
  }
  // out[j] = scale where element first + j of the row is kept, 0 where dropped, j < n
  void factors(uint32_t seed, int64_t first, int64_t n, float* __restrict out) const {
    const uint32_t t = threshold, base = seed + static_cast<uint32_t>(first) * 0x9e3779b9u;
    const float kept = scale;
    for (int64_t j = 0; j < n; ++j)
      out[j] = mix(base + static_cast<uint32_t>(j) * 0x9e3779b9u) >= t ? kept : 0.f;
  }
};

}  // namespace bg
