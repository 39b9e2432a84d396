// Helpers shared by bert_gluon's MXNet extension operators.
#pragma once
#include <string>
#include <unordered_map>
#include <vector>
#include "mxnet/lib_api.h"

namespace bg {

typedef std::unordered_map<std::string, std::string> Attrs;

inline float parse_float(const Attrs& attrs, const char* name, float fallback) {
  auto it = attrs.find(name);
  return it == attrs.end() ? fallback : std::stof(it->second);
}

inline int parse_int(const Attrs& attrs, const char* name, int fallback) {
  auto it = attrs.find(name);
  return it == attrs.end() ? fallback : std::stoi(it->second);
}

// every input float32 (else an error naming the operator and the input), outputs float32
inline mxnet::ext::MXReturnValue all_float32(const char* op, std::vector<int>* in_types,
                                             std::vector<int>* out_types) {
  for (size_t i = 0; i < in_types->size(); ++i) {
    if ((*in_types)[i] != mxnet::ext::kFloat32) {
      MX_ERROR_MSG << op << ": input " << i << " must be float32";
      return mxnet::ext::MX_FAIL;
    }
  }
  for (auto& t : *out_types) t = mxnet::ext::kFloat32;
  return mxnet::ext::MX_SUCCESS;
}

// zero a gradient MXNet asked for (the inputs that get none: lengths, labels, modes)
inline void zero(mxnet::ext::MXTensor& t) {
  if (t.data_ptr == nullptr) return;
  float* x = t.data<float>();
  for (int64_t n = 0; n < t.size(); ++n) x[n] = 0.f;
}

}  // namespace bg
