// fastdarts._C: the extension module. Kernel files register their functions through
// bind_<name> (declared in bindings.h); the ops themselves are registered from Python as
// torch.library custom ops (fastdarts::*).
#include "bindings.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdarts CPU (and optional CUDA) kernels behind the fastdarts::* custom ops";
  fastdarts::bind_recurrent_mixed(m);
  fastdarts::bind_recurrent_cell(m);
  fastdarts::bind_conv_mixed(m);
  fastdarts::bind_batch_norm(m);
}
