// Fused recurrent MixedOp for the DARTS PTB search cell, CPU kernels.
//
// For one node with n predecessors, S (n, B, D), CH = [C, H] (n, B, 2D), P (n, K = 5, `none`
// first), σ = sigmoid(C), T_i = Σ_{k≥1} P[i,k], F_i = Σ_{k≥1} P[i,k] f_k(H_i):
//   out (B, D) = Σ_i (1 − σ_i) T_i S_i + σ_i F_i
// and its gradients with respect to S, CH and P, each in one pass over the inputs.
// Work is split over B·D in fixed chunks (at::parallel_for); the dP partial sums are reduced
// per chunk in a fixed order, so results do not depend on the thread count.

#include "bindings.h"
#include "recurrent_mixed_kernels.h"

#ifdef FASTDARTS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace fastdarts {
// recurrent_mixed_cuda.cu
int64_t recurrent_mixed_cuda_blocks(int64_t B, int64_t D);
template <typename T>
cudaError_t recurrent_mixed_forward_cuda(const T* S, const T* CH, const T* P, T* out, int64_t n,
                                         int64_t B, int64_t D, cudaStream_t stream);
template <typename T>
cudaError_t recurrent_mixed_backward_cuda(const T* G, const T* S, const T* CH, const T* P, T* dS,
                                          T* dCH, T* partials, int64_t n, int64_t B, int64_t D,
                                          cudaStream_t stream);
}  // namespace fastdarts
#endif

namespace {

using fastdarts::mixed::backward_kernel;
using fastdarts::mixed::forward_kernel;
using fastdarts::mixed::kOps;

void check_inputs(const at::Tensor& states, const at::Tensor& ch, const at::Tensor& probs,
                  at::DeviceType device) {
  TORCH_CHECK(states.device().type() == device && ch.device() == states.device() &&
                  probs.device() == states.device(),
              "recurrent_mixed (", device, " kernel): all inputs must be on one ", device,
              " device, got states on ", states.device(), ", ch on ", ch.device(), ", probs on ",
              probs.device());
  TORCH_CHECK(states.scalar_type() == at::kFloat || states.scalar_type() == at::kDouble,
              "recurrent_mixed: dtype must be float32 or float64, got ", states.scalar_type());
  TORCH_CHECK(ch.scalar_type() == states.scalar_type() &&
                  probs.scalar_type() == states.scalar_type(),
              "recurrent_mixed: states, ch and probs must share a dtype, got ",
              states.scalar_type(), ", ", ch.scalar_type(), ", ", probs.scalar_type());
  TORCH_CHECK(states.dim() == 3 && states.size(0) >= 1,
              "recurrent_mixed: states must be (n, B, D) with n >= 1, got ", states.sizes());
  const auto n = states.size(0), B = states.size(1), D = states.size(2);
  TORCH_CHECK(ch.dim() == 3 && ch.size(0) == n && ch.size(1) == B && ch.size(2) == 2 * D,
              "recurrent_mixed: ch must be (n, B, 2D) = (", n, ", ", B, ", ", 2 * D, "), got ",
              ch.sizes());
  TORCH_CHECK(probs.dim() == 2 && probs.size(0) == n && probs.size(1) == kOps,
              "recurrent_mixed: probs must be (n, 5) = (", n, ", 5), got ", probs.sizes());
}

void check_output(const at::Tensor& out, const at::Tensor& like, at::IntArrayRef sizes,
                  const char* name) {
  TORCH_CHECK(out.device() == like.device() && out.scalar_type() == like.scalar_type() &&
                  out.sizes() == sizes && out.is_contiguous(),
              "recurrent_mixed: ", name, " must be a contiguous tensor on ", like.device(),
              " of shape ", sizes,
              " and dtype ", like.scalar_type(), ", got ", out.sizes(), " ", out.scalar_type(),
              " on ", out.device());
}

void check_grad(const at::Tensor& grad, const at::Tensor& states) {
  const auto B = states.size(1), D = states.size(2);
  TORCH_CHECK(grad.device() == states.device() && grad.scalar_type() == states.scalar_type() &&
                  grad.dim() == 2 && grad.size(0) == B && grad.size(1) == D,
              "recurrent_mixed backward: grad must be (", B, ", ", D, ") on ", states.device(),
              " of dtype ", states.scalar_type(), ", got ", grad.sizes(), " ",
              grad.scalar_type(), " on ", grad.device());
}

// Writes every element of out (B, D).
void forward(const at::Tensor& states, const at::Tensor& ch, const at::Tensor& probs,
             at::Tensor& out) {
  check_inputs(states, ch, probs, at::kCPU);
  const auto n = states.size(0), B = states.size(1), D = states.size(2);
  check_output(out, states, {B, D}, "out");
  const auto S = states.contiguous(), C = ch.contiguous(), P = probs.contiguous();
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "recurrent_mixed_forward", [&] {
    forward_kernel<scalar_t>(S.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(),
                             P.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, B, D);
  });
}

// Writes every element of d_states (n, B, D), d_ch (n, B, 2D) and d_probs (n, 5).
void backward(const at::Tensor& grad, const at::Tensor& states, const at::Tensor& ch,
              const at::Tensor& probs, at::Tensor& d_states, at::Tensor& d_ch,
              at::Tensor& d_probs) {
  check_inputs(states, ch, probs, at::kCPU);
  const auto n = states.size(0), B = states.size(1), D = states.size(2);
  check_grad(grad, states);
  check_output(d_states, states, states.sizes(), "d_states");
  check_output(d_ch, states, ch.sizes(), "d_ch");
  check_output(d_probs, states, probs.sizes(), "d_probs");
  const auto G = grad.contiguous(), S = states.contiguous(), C = ch.contiguous();
  const auto P = probs.contiguous();
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "recurrent_mixed_backward", [&] {
    backward_kernel<scalar_t>(G.data_ptr<scalar_t>(), S.data_ptr<scalar_t>(),
                              C.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(),
                              d_states.data_ptr<scalar_t>(), d_ch.data_ptr<scalar_t>(),
                              d_probs.data_ptr<scalar_t>(), n, B, D);
  });
}

#ifdef FASTDARTS_WITH_CUDA
void forward_cuda(const at::Tensor& states, const at::Tensor& ch, const at::Tensor& probs,
                  at::Tensor& out) {
  check_inputs(states, ch, probs, at::kCUDA);
  const auto n = states.size(0), B = states.size(1), D = states.size(2);
  check_output(out, states, {B, D}, "out");
  const c10::cuda::CUDAGuard guard(states.device());
  const auto S = states.contiguous(), C = ch.contiguous(), P = probs.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "recurrent_mixed_forward_cuda", [&] {
    C10_CUDA_CHECK(fastdarts::recurrent_mixed_forward_cuda<scalar_t>(
        S.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), n, B, D, stream));
  });
}

void backward_cuda(const at::Tensor& grad, const at::Tensor& states, const at::Tensor& ch,
                   const at::Tensor& probs, at::Tensor& d_states, at::Tensor& d_ch,
                   at::Tensor& d_probs) {
  check_inputs(states, ch, probs, at::kCUDA);
  check_grad(grad, states);
  check_output(d_states, states, states.sizes(), "d_states");
  check_output(d_ch, states, ch.sizes(), "d_ch");
  check_output(d_probs, states, probs.sizes(), "d_probs");
  const auto n = states.size(0), B = states.size(1), D = states.size(2);
  const c10::cuda::CUDAGuard guard(states.device());
  const auto G = grad.contiguous(), S = states.contiguous(), C = ch.contiguous();
  const auto P = probs.contiguous();
  auto partials = at::empty({fastdarts::recurrent_mixed_cuda_blocks(B, D), n, kOps - 1},
                            S.options());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "recurrent_mixed_backward_cuda", [&] {
    C10_CUDA_CHECK(fastdarts::recurrent_mixed_backward_cuda<scalar_t>(
        G.data_ptr<scalar_t>(), S.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(),
        P.data_ptr<scalar_t>(), d_states.data_ptr<scalar_t>(), d_ch.data_ptr<scalar_t>(),
        partials.data_ptr<scalar_t>(), n, B, D, stream));
  });
  d_probs.select(1, 0).zero_();
  d_probs.narrow(1, 1, kOps - 1).copy_(partials.sum(0));
}
#endif

}  // namespace

namespace fastdarts {

void bind_recurrent_mixed(pybind11::module& m) {
  m.def("recurrent_mixed_forward", &forward, "writes out (B, D) from states (n, B, D), ch (n, B, 2D), probs (n, 5)",
        py::arg("states"), py::arg("ch"), py::arg("probs"), py::arg("out"));
  m.def("recurrent_mixed_backward", &backward,
        "writes d_states, d_ch, d_probs from grad (B, D) and the inputs", py::arg("grad"),
        py::arg("states"), py::arg("ch"), py::arg("probs"), py::arg("d_states"),
        py::arg("d_ch"), py::arg("d_probs"));
#ifdef FASTDARTS_WITH_CUDA
  m.def("recurrent_mixed_forward_cuda", &forward_cuda, "CUDA recurrent_mixed_forward",
        py::arg("states"), py::arg("ch"), py::arg("probs"), py::arg("out"));
  m.def("recurrent_mixed_backward_cuda", &backward_cuda, "CUDA recurrent_mixed_backward",
        py::arg("grad"), py::arg("states"), py::arg("ch"), py::arg("probs"),
        py::arg("d_states"), py::arg("d_ch"), py::arg("d_probs"));
#endif
}

}  // namespace fastdarts
