// The Python surface of fastdarts._C: each kernel file defines one bind_<name>(m) that adds
// its functions to the module; bindings.cpp calls them all (one PYBIND11_MODULE per
// extension).
#pragma once

#include <torch/extension.h>

namespace fastdarts {

void bind_recurrent_mixed(pybind11::module& m);
void bind_recurrent_cell(pybind11::module& m);
void bind_conv_mixed(pybind11::module& m);
void bind_batch_norm(pybind11::module& m);

}  // namespace fastdarts
