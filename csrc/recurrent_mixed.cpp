// Fused recurrent MixedOp for the DARTS PTB search cell, CPU kernels.
//
// For one node with n predecessors, S (n, B, D), CH = [C, H] (n, B, 2D), P (n, K = 5, `none`
// first), σ = sigmoid(C), T_i = Σ_{k≥1} P[i,k], F_i = Σ_{k≥1} P[i,k] f_k(H_i):
//   out (B, D) = Σ_i (1 − σ_i) T_i S_i + σ_i F_i
// and its gradients with respect to S, CH and P, each in one pass over the inputs.
// Work is split over B·D in fixed chunks (at::parallel_for); the dP partial sums are reduced
// per chunk in a fixed order, so results do not depend on the thread count.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <vector>

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

constexpr int64_t kOps = 5;  // none, tanh, relu, sigmoid, identity
constexpr int64_t kChunk = 4096;

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

// Calls fn(row, d0, d1) for the row segments of the flat range [begin, end) of a (B, D) grid.
template <typename Fn>
void for_segments(int64_t begin, int64_t end, int64_t D, const Fn& fn) {
  for (int64_t j = begin; j < end;) {
    const int64_t b = j / D, d0 = j - b * D;
    const int64_t d1 = std::min(D, d0 + (end - j));
    fn(b, d0, d1);
    j += d1 - d0;
  }
}

template <typename scalar_t>
void forward_kernel(const scalar_t* S, const scalar_t* CH, const scalar_t* P, scalar_t* out,
                    int64_t n, int64_t B, int64_t D) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec one(1), zero(0);
  std::vector<scalar_t> T(n);
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* p = P + i * kOps;
    T[i] = p[1] + p[2] + p[3] + p[4];
  }
  at::parallel_for(0, B * D, kChunk, [&](int64_t begin, int64_t end) {
    for_segments(begin, end, D, [&](int64_t b, int64_t d0, int64_t d1) {
      for (int64_t d = d0; d < d1; d += Vec::size()) {
        const int64_t m = std::min<int64_t>(Vec::size(), d1 - d);
        Vec acc(0);
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* p = P + i * kOps;
          const Vec s = Vec::loadu(S + (i * B + b) * D + d, m);
          const Vec c = Vec::loadu(CH + (i * B + b) * 2 * D + d, m);
          const Vec h = Vec::loadu(CH + (i * B + b) * 2 * D + D + d, m);
          const Vec sg = one / (one + c.neg().exp());
          const Vec sh = one / (one + h.neg().exp());
          const Vec F = Vec(p[1]) * h.tanh() + Vec(p[2]) * at::vec::maximum(h, zero) +
                        Vec(p[3]) * sh + Vec(p[4]) * h;
          acc = acc + (one - sg) * Vec(T[i]) * s + sg * F;
        }
        acc.store(out + b * D + d, m);
      }
    });
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* G, const scalar_t* S, const scalar_t* CH, const scalar_t* P,
                     scalar_t* dS, scalar_t* dCH, scalar_t* dP, int64_t n, int64_t B,
                     int64_t D) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec one(1), zero(0);
  const int64_t total = B * D;
  const int64_t chunks = (total + kChunk - 1) / kChunk;
  // partials[c][i][k-1]: chunk c's Σ g·(s + σ(f_k(h) − s)), reduced below in chunk order.
  std::vector<double> partials(chunks * n * (kOps - 1), 0.0);
  std::vector<scalar_t> T(n);
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* p = P + i * kOps;
    T[i] = p[1] + p[2] + p[3] + p[4];
  }
  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    std::vector<Vec> acc(n * (kOps - 1));
    for (int64_t chunk = cbegin; chunk < cend; ++chunk) {
      std::fill(acc.begin(), acc.end(), Vec(0));
      const int64_t begin = chunk * kChunk, end = std::min(total, begin + kChunk);
      for_segments(begin, end, D, [&](int64_t b, int64_t d0, int64_t d1) {
        for (int64_t d = d0; d < d1; d += Vec::size()) {
          // Lanes past m load as zero, so g = 0 there and they add nothing to dP.
          const int64_t m = std::min<int64_t>(Vec::size(), d1 - d);
          const Vec g = Vec::loadu(G + b * D + d, m);
          for (int64_t i = 0; i < n; ++i) {
            const scalar_t* p = P + i * kOps;
            const int64_t so = (i * B + b) * D + d, co = (i * B + b) * 2 * D + d;
            const Vec s = Vec::loadu(S + so, m);
            const Vec c = Vec::loadu(CH + co, m);
            const Vec h = Vec::loadu(CH + co + D, m);
            const Vec sg = one / (one + c.neg().exp());
            const Vec sh = one / (one + h.neg().exp());
            const Vec th = h.tanh();
            const Vec rl = at::vec::maximum(h, zero);
            const Vec F = Vec(p[1]) * th + Vec(p[2]) * rl + Vec(p[3]) * sh + Vec(p[4]) * h;
            const Vec Ts = Vec(T[i]) * s;
            (g * Vec(T[i]) * (one - sg)).store(dS + so, m);
            (g * sg * (one - sg) * (F - Ts)).store(dCH + co, m);
            const Vec df = Vec(p[1]) * (one - th * th) + Vec(p[2]) * h.gt(zero) +
                           Vec(p[3]) * sh * (one - sh) + Vec(p[4]);
            (g * sg * df).store(dCH + co + D, m);
            const Vec gs = g * s, gsg = g * sg;
            Vec* a = acc.data() + i * (kOps - 1);
            a[0] = a[0] + gs + gsg * (th - s);
            a[1] = a[1] + gs + gsg * (rl - s);
            a[2] = a[2] + gs + gsg * (sh - s);
            a[3] = a[3] + gs + gsg * (h - s);
          }
        }
      });
      double* out = partials.data() + chunk * n * (kOps - 1);
      for (int64_t q = 0; q < n * (kOps - 1); ++q) {
        scalar_t lanes[Vec::size()];
        acc[q].store(lanes);
        double sum = 0;
        for (int64_t l = 0; l < Vec::size(); ++l) sum += lanes[l];
        out[q] = sum;
      }
    }
  });
  for (int64_t i = 0; i < n; ++i) {
    dP[i * kOps] = 0;
    for (int64_t k = 1; k < kOps; ++k) {
      double sum = 0;
      for (int64_t c = 0; c < chunks; ++c) sum += partials[(c * n + i) * (kOps - 1) + k - 1];
      dP[i * kOps + k] = static_cast<scalar_t>(sum);
    }
  }
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdarts CPU kernels (the ops are registered from Python as fastdarts::*)";
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
