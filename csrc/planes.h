// Layout helpers shared by the CPU kernels: a (B, C, H, W) tensor whose (b, c) planes are
// contiguous and one plane apart, with any batch stride (a channel block of a larger tensor,
// as autograd hands the gradient of a concatenation's block), is read in place.
#pragma once

#include <torch/extension.h>

namespace fastdarts {

// t itself when its planes are laid out as above, else a contiguous copy.
inline at::Tensor dense_planes(const at::Tensor& t) {
  int64_t dense = 1;
  for (int64_t d = 3; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != dense) return t.contiguous();
    dense *= t.size(d);
  }
  return t;
}

// The batch stride of a tensor from dense_planes().
inline int64_t batch_stride(const at::Tensor& t) {
  return t.size(0) == 1 ? 0 : t.stride(0);
}

}  // namespace fastdarts
