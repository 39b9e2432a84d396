// bert_gluon's MXNet extension library: one shared object built from every file in csrc/
// (see bert_gluon/ops.py). MXNet calls initialize() when it loads the library.
#include "mxnet/lib_api.h"

mxnet::ext::MXReturnValue initialize(int version) {
  return version >= 10900 ? mxnet::ext::MX_SUCCESS : mxnet::ext::MX_FAIL;
}
