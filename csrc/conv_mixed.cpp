// Fused convolutional MixedOp (DARTS CIFAR search cell): the mixture kernel, on the CPU.
//
// With src (B, S, P) the concatenated op outputs of a group of edges (P = H·W pixels) and
// routes r = (source channel s_r, output channel o_r, alpha_r, shift_r), one per (edge, op,
// channel), sorted by o_r (CSR out_ptr):
//   out[b, o] = acc[b, o] + Σ_{r: o_r = o} alpha_r · (src[b, s_r] − shift_r)
// which is the BatchNorm of the pools, sep convs and FactorizedReduce (alpha = α-weight ·
// invstd, shift = mean), skip_connect, `none` (no route) and the α-weighted sum into each
// node, in one pass. The backward writes d_src (routes by source channel: src_perm,
// src_ptr), d_alpha and d_shift, each reduction done by one thread in a fixed order, so
// results do not depend on the thread count.
//
// Bound as fastdarts._C.conv_mix_forward / conv_mix_backward (and the convolutions' kernels
// below); fastdarts/ops/conv_mixed.py makes them the CPU implementations of the custom ops
// fastdarts::conv_mix, depthwise, pointwise and their _backward. Each function allocates its
// outputs itself, as ATen's own CPU kernels do (at::detail::empty_cpu: no dispatcher round
// trip per output), or writes the `out` tensors it is given (checked; the tests pass
// NaN-filled ones to see every element written).

#include <torch/extension.h>

#include "bindings.h"
#include "planes.h"

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kGrain = 16384;  // elements per parallel task, at least

// A new contiguous cpu tensor of `like`'s dtype, or `out` when one is given.
at::Tensor output(const std::optional<at::Tensor>& out, const at::Tensor& like,
                  at::IntArrayRef sizes) {
  return out.has_value() ? *out : at::Tensor(at::detail::empty_cpu(sizes, like.scalar_type()));
}

// One output per entry of `sizes`: the given ones (their count checked here, each tensor by
// the caller) or new ones.
std::vector<at::Tensor> outputs(const std::optional<std::vector<at::Tensor>>& out,
                                const at::Tensor& like,
                                const std::vector<std::vector<int64_t>>& sizes, const char* op) {
  if (out.has_value()) {
    TORCH_CHECK(out->size() == sizes.size(), op, ": out must hold ", sizes.size(),
                " tensors, got ", out->size());
    return *out;
  }
  std::vector<at::Tensor> made;
  for (const auto& size : sizes) made.push_back(output({}, like, size));
  return made;
}

void check_same(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device() == like.device() && t.scalar_type() == like.scalar_type(),
              name, " must be ", like.scalar_type(), " on ", like.device(),
              ", got ", t.scalar_type(), " on ", t.device());
}

void check_index(const at::Tensor& t, int64_t size, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 &&
                  t.size(0) == size && t.is_contiguous(),
              name, " must be a contiguous int64 cpu tensor of size ", size,
              ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

void check_out(const at::Tensor& t, const at::Tensor& like, at::IntArrayRef sizes,
               const char* name) {
  TORCH_CHECK(t.device() == like.device() && t.scalar_type() == like.scalar_type() &&
                  t.sizes() == sizes && t.is_contiguous(),
              name, " must be a contiguous tensor on ", like.device(), " of shape ",
              sizes, " and dtype ", like.scalar_type(), ", got ", t.sizes(), " ",
              t.scalar_type(), " on ", t.device());
}

// A (B, C, H, W) input of `like`'s dtype and device whose (b, c) planes are laid out
// contiguously, with any batch stride: a channel block of a larger tensor (a gradient slice
// of a concatenation, a node's channels of the mixture's output) is read in place; any
// other layout is copied first.
at::Tensor planes(const at::Tensor& t, const at::Tensor& like, at::IntArrayRef sizes,
                  const char* name) {
  TORCH_CHECK(t.device() == like.device() && t.scalar_type() == like.scalar_type() &&
                  t.sizes() == sizes,
              name, " must be a tensor on ", like.device(), " of shape ", sizes, " and dtype ",
              like.scalar_type(), ", got ", t.sizes(), " ", t.scalar_type(), " on ",
              t.device());
  return fastdarts::dense_planes(t);
}

using fastdarts::batch_stride;

void check_common(const at::Tensor& src, const at::Tensor& alpha, const at::Tensor& shift) {
  TORCH_CHECK(src.device().is_cpu(), "conv_mix (cpu kernel): src must be on the cpu, got ",
              src.device());
  TORCH_CHECK(src.scalar_type() == at::kFloat || src.scalar_type() == at::kDouble,
              "conv_mix: dtype must be float32 or float64, got ", src.scalar_type());
  TORCH_CHECK(src.dim() == 4 && src.is_contiguous(),
              "conv_mix: src must be a contiguous (B, S, H, W) tensor, got ", src.sizes());
  TORCH_CHECK(alpha.dim() == 1 && shift.sizes() == alpha.sizes() && alpha.is_contiguous() &&
                  shift.is_contiguous(),
              "conv_mix: alpha and shift must be contiguous (R,) tensors, got ", alpha.sizes(),
              " and ", shift.sizes());
  check_same(alpha, src, "conv_mix: alpha");
  check_same(shift, src, "conv_mix: shift");
}

// Checks that every route reads a source channel in [0, S) and ptr is a valid CSR over R.
void check_routes(const int64_t* route, int64_t R, int64_t S, const int64_t* ptr, int64_t n) {
  TORCH_CHECK(ptr[0] == 0 && ptr[n] == R, "conv_mix: the CSR pointers must run from 0 to ", R);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(ptr[i] <= ptr[i + 1], "conv_mix: the CSR pointers must not decrease");
  }
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(route[r] >= 0 && route[r] < S, "conv_mix: route ", r, " has channel ",
                route[r], ", outside [0, ", S, ")");
  }
}

// y[p] += a · (x[p] − h) over one row of P pixels.
template <typename T>
inline void axpy_shifted(T* y, const T* x, T a, T h, int64_t P) {
  using Vec = at::vec::Vectorized<T>;
  const Vec va(a), vh(h);
  int64_t p = 0;
  for (; p + Vec::size() <= P; p += Vec::size()) {
    (Vec::loadu(y + p) + va * (Vec::loadu(x + p) - vh)).store(y + p);
  }
  if (p < P) {
    const int64_t m = P - p;
    (Vec::loadu(y + p, m) + va * (Vec::loadu(x + p, m) - vh)).store(y + p, m);
  }
}

template <typename T>
void forward_kernel(const T* src, const T* alpha, const T* shift, const T* acc, int64_t acc_b,
                    const int64_t* rsrc, const int64_t* optr, T* out, int64_t B, int64_t S,
                    int64_t N, int64_t P) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(P, 1));
  at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t bo = begin; bo < end; ++bo) {
      const int64_t b = bo / N, o = bo - b * N;
      T* y = out + bo * P;
      if (acc != nullptr) {
        const T* a = acc + b * acc_b + o * P;
        std::copy(a, a + P, y);
      } else {
        std::fill(y, y + P, T(0));
      }
      for (int64_t r = optr[o]; r < optr[o + 1]; ++r) {
        axpy_shifted(y, src + (b * S + rsrc[r]) * P, alpha[r], shift[r], P);
      }
    }
  });
}

// (Σ_p g[p]·(x[p] − h), Σ_p g[p]) over one row, summed in double.
template <typename T>
inline std::pair<double, double> row_sums(const T* g, const T* x, T h, int64_t P) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vh(h);
  Vec sgx(0), sg(0);
  int64_t p = 0;
  for (; p + Vec::size() <= P; p += Vec::size()) {
    const Vec vg = Vec::loadu(g + p);
    sgx = sgx + vg * (Vec::loadu(x + p) - vh);
    sg = sg + vg;
  }
  if (p < P) {
    // Lanes past m load as zero: g = 0 there, so they add nothing.
    const int64_t m = P - p;
    const Vec vg = Vec::loadu(g + p, m);
    sgx = sgx + vg * (Vec::loadu(x + p, m) - vh);
    sg = sg + vg;
  }
  T a[Vec::size()], b[Vec::size()];
  sgx.store(a);
  sg.store(b);
  double s1 = 0, s2 = 0;
  for (int64_t l = 0; l < Vec::size(); ++l) {
    s1 += a[l];
    s2 += b[l];
  }
  return {s1, s2};
}

template <typename T>
void backward_kernel(const T* grad, const T* src, const T* alpha, const T* shift,
                     const int64_t* rsrc, const int64_t* rout, const int64_t* perm,
                     const int64_t* sptr, T* d_src, T* d_alpha, T* d_shift, int64_t B,
                     int64_t S, int64_t N, int64_t R, int64_t P) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(P, 1));
  at::parallel_for(0, B * S, grain, [&](int64_t begin, int64_t end) {
    for (int64_t bs = begin; bs < end; ++bs) {
      const int64_t b = bs / S, s = bs - b * S;
      T* y = d_src + bs * P;
      std::fill(y, y + P, T(0));
      for (int64_t j = sptr[s]; j < sptr[s + 1]; ++j) {
        const int64_t r = perm[j];
        axpy_shifted(y, grad + (b * N + rout[r]) * P, alpha[r], T(0), P);
      }
    }
  });
  const int64_t rgrain = std::max<int64_t>(1, kGrain / std::max<int64_t>(B * P, 1));
  at::parallel_for(0, R, rgrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      double sgx = 0, sg = 0;
      for (int64_t b = 0; b < B; ++b) {
        const auto [a, c] = row_sums(grad + (b * N + rout[r]) * P, src + (b * S + rsrc[r]) * P,
                                     shift[r], P);
        sgx += a;
        sg += c;
      }
      d_alpha[r] = static_cast<T>(sgx);
      d_shift[r] = static_cast<T>(-static_cast<double>(alpha[r]) * sg);
    }
  });
}

// out (B, N, H, W), every element written; acc may be a channel block of a larger tensor.
at::Tensor forward(const at::Tensor& src, const at::Tensor& alpha, const at::Tensor& shift,
                   const std::optional<at::Tensor>& acc_arg, const at::Tensor& route_src,
                   const at::Tensor& out_ptr, const std::optional<at::Tensor>& out_arg) {
  check_common(src, alpha, shift);
  const int64_t B = src.size(0), S = src.size(1), P = src.size(2) * src.size(3);
  TORCH_CHECK(out_ptr.dim() == 1 && out_ptr.size(0) >= 1,
              "conv_mix: out_ptr must have n_out + 1 entries");
  const int64_t R = alpha.size(0), N = out_ptr.size(0) - 1;
  check_index(route_src, R, "conv_mix: route_src");
  check_index(out_ptr, N + 1, "conv_mix: out_ptr");
  const at::Tensor out = output(out_arg, src, {B, N, src.size(2), src.size(3)});
  check_out(out, src, {B, N, src.size(2), src.size(3)}, "conv_mix: out");
  std::optional<at::Tensor> acc;
  if (acc_arg.has_value()) {
    acc = planes(*acc_arg, src, {B, N, src.size(2), src.size(3)}, "conv_mix: acc");
  }
  check_routes(route_src.data_ptr<int64_t>(), R, S, out_ptr.data_ptr<int64_t>(), N);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "conv_mix_forward", [&] {
    forward_kernel<scalar_t>(src.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
                             shift.data_ptr<scalar_t>(),
                             acc.has_value() ? acc->data_ptr<scalar_t>() : nullptr,
                             acc.has_value() ? batch_stride(*acc) : 0,
                             route_src.data_ptr<int64_t>(), out_ptr.data_ptr<int64_t>(),
                             out.data_ptr<scalar_t>(), B, S, N, P);
  });
  return out;
}

// [d_src (B, S, H, W), d_alpha, d_shift (R,)], every element written.
std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& src,
                                 const at::Tensor& alpha, const at::Tensor& shift,
                                 const at::Tensor& route_src, const at::Tensor& route_out,
                                 const at::Tensor& src_perm, const at::Tensor& src_ptr,
                                 const std::optional<std::vector<at::Tensor>>& out) {
  check_common(src, alpha, shift);
  const auto grads = outputs(
      out, src, {src.sizes().vec(), alpha.sizes().vec(), alpha.sizes().vec()}, "conv_mix backward");
  const at::Tensor &d_src = grads[0], &d_alpha = grads[1], &d_shift = grads[2];
  const int64_t B = src.size(0), S = src.size(1), P = src.size(2) * src.size(3);
  const int64_t R = alpha.size(0);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == B && grad.size(2) == src.size(2) &&
                  grad.size(3) == src.size(3) && grad.is_contiguous(),
              "conv_mix backward: grad must be a contiguous (", B, ", n_out, ", src.size(2), ", ",
              src.size(3), ") tensor, got ", grad.sizes());
  check_same(grad, src, "conv_mix: grad");
  const int64_t N = grad.size(1);
  check_index(route_src, R, "conv_mix: route_src");
  check_index(route_out, R, "conv_mix: route_out");
  check_index(src_perm, R, "conv_mix: src_perm");
  check_index(src_ptr, S + 1, "conv_mix: src_ptr");
  check_out(d_src, src, src.sizes(), "conv_mix: d_src");
  check_out(d_alpha, src, alpha.sizes(), "conv_mix: d_alpha");
  check_out(d_shift, src, alpha.sizes(), "conv_mix: d_shift");
  check_routes(route_src.data_ptr<int64_t>(), R, S, src_ptr.data_ptr<int64_t>(), S);
  check_routes(route_out.data_ptr<int64_t>(), R, N, src_ptr.data_ptr<int64_t>(), S);
  check_routes(src_perm.data_ptr<int64_t>(), R, R, src_ptr.data_ptr<int64_t>(), S);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "conv_mix_backward", [&] {
    backward_kernel<scalar_t>(
        grad.data_ptr<scalar_t>(), src.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
        shift.data_ptr<scalar_t>(), route_src.data_ptr<int64_t>(),
        route_out.data_ptr<int64_t>(), src_perm.data_ptr<int64_t>(),
        src_ptr.data_ptr<int64_t>(), d_src.data_ptr<scalar_t>(), d_alpha.data_ptr<scalar_t>(),
        d_shift.data_ptr<scalar_t>(), B, S, N, R, P);
  });
  return grads;
}

}  // namespace

// -- depthwise convolutions of several shapes in one call --------------------------------
//
// Shape t (weight w_t (Ch_t, 1, k_t, k_t), padding p_t, dilation d_t, one stride s) reads
// input channels in_off_t .. in_off_t + Ch_t of x (B, Cin, H, W) and writes output channels
// out_off_t .. out_off_t + Ch_t (out_off_t = Σ_{u<t} Ch_u) of out (B, Σ Ch_t, Ho, Wo); every
// shape gives the same Ho, Wo. The forward runs one task per (b, output channel), d_x one per
// (b, input channel) over every shape that reads it (no atomics), d_w one per output
// channel, each reduction in a fixed order.

namespace {

struct Shape {
  int64_t ch, k, pad, dil, in_off, out_off;
};

std::vector<Shape> shapes_of(at::TensorList weights, at::IntArrayRef pads, at::IntArrayRef dils,
                             at::IntArrayRef in_offsets, int64_t Cin) {
  const auto n = static_cast<int64_t>(weights.size());
  TORCH_CHECK(n >= 1 && static_cast<int64_t>(pads.size()) == n &&
                  static_cast<int64_t>(dils.size()) == n &&
                  static_cast<int64_t>(in_offsets.size()) == n,
              "depthwise: weights, pads, dils and in_offsets must have one entry per shape");
  std::vector<Shape> shapes;
  int64_t out_off = 0;
  for (int64_t t = 0; t < n; ++t) {
    const auto& w = weights[t];
    TORCH_CHECK(w.dim() == 4 && w.size(1) == 1 && w.size(2) == w.size(3) && w.size(2) >= 1 &&
                    w.is_contiguous(),
                "depthwise: weight ", t, " must be a contiguous (Ch, 1, k, k) tensor, k >= 1, got ",
                w.sizes());
    TORCH_CHECK(in_offsets[t] >= 0 && in_offsets[t] + w.size(0) <= Cin, "depthwise: shape ", t,
                " reads channels [", in_offsets[t], ", ", in_offsets[t] + w.size(0),
                ") of an input with ", Cin);
    TORCH_CHECK(pads[t] >= 0 && dils[t] >= 1, "depthwise: bad padding or dilation of shape ", t);
    shapes.push_back({w.size(0), w.size(2), pads[t], dils[t], in_offsets[t], out_off});
    out_off += w.size(0);
  }
  return shapes;
}

int64_t out_size(int64_t n, const Shape& s, int64_t stride) {
  return (n + 2 * s.pad - s.dil * (s.k - 1) - 1) / stride + 1;
}

// The largest padding of the shapes reading input channel ci; −1 if none reads it.
inline int64_t reading_pad(const std::vector<Shape>& shapes, int64_t ci) {
  int64_t q = -1;
  for (const auto& s : shapes) {
    if (ci >= s.in_off && ci < s.in_off + s.ch) q = std::max(q, s.pad);
  }
  return q;
}

// fn(t, shapes[t], c) for every shape t that reads input channel ci (as its channel c), in
// shape order.
template <typename F>
inline void each_reader(const std::vector<Shape>& shapes, int64_t ci, F&& fn) {
  for (size_t t = 0; t < shapes.size(); ++t) {
    const int64_t c = ci - shapes[t].in_off;
    if (c >= 0 && c < shapes[t].ch) fn(t, shapes[t], c);
  }
}

// -- stride 1: direct convolution over a zero-padded copy of each plane ------------------
//
// Why (profile of the small CNN step, first order, one thread, before this path): the
// depthwise backward was 31 % of the fused step (2.0 s of 6.5 s profiled), and on the 8×8
// and 16×16 planes of the deeper cells its input gradient took 1.3–2.3× oneDNN's. The row
// loops above pay a bounds computation and a short, unaligned loop per (tap, row): with 8 or
// 16 columns that overhead is most of the work, and their weight-gradient dot products
// accumulate in one scalar (not vectorised without -ffast-math). Here every plane is first
// copied into a zero-padded buffer (L1-resident: 36×36 floats at most in the search), so each
// output row is Σ_taps w·(a shifted row of the buffer) with no bounds at all, computed on
// whole vectors over W with a block of rows × vectors held in registers. The input gradient
// at stride 1 is the same correlation of the padded output gradient with the flipped kernel
// (padding (k−1)·d − p), so all three passes share one routine.

// Accumulators held in registers: NC vectors per row (NC·lanes ≥ the row's columns) and RB
// rows, NC·RB ≤ 8, so that independent FMA chains hide the FMA latency.
template <int NC>
constexpr int kRowBlock = NC == 1 ? 8 : NC == 2 ? 4 : 2;

// dst[r][x] (+)= Σ_{i,j} w[i, j] · src[r + i·d][x + j·d] for rows [0, RB) and columns
// [0, ncols), ncols in ((NC−1)·lanes, NC·lanes], w a kh × kw kernel, flipped
// (w[kh−1−i, kw−1−j]) if `flip`. Reads up to lanes − 1 elements past a row's last column (the
// buffer has that slack); those lanes are not stored.
template <typename T, int NC, int RB>
inline void corr_block(const T* src, int64_t sW, const T* w, int64_t kh, int64_t kw, int64_t d,
                       bool flip, T* dst, int64_t dW, int64_t ncols, bool accumulate) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const int64_t last = ncols - (NC - 1) * L;
  Vec acc[RB][NC];
  for (int r = 0; r < RB; ++r) {
    for (int c = 0; c < NC; ++c) {
      const int64_t n = c == NC - 1 ? last : L;
      acc[r][c] = accumulate ? Vec::loadu(dst + r * dW + c * L, n) : Vec(T(0));
    }
  }
  const int64_t kk = kh * kw;
  for (int64_t i = 0; i < kh; ++i) {
    for (int64_t j = 0; j < kw; ++j) {
      const int64_t t = i * kw + j;
      const Vec wv(w[flip ? kk - 1 - t : t]);
      const T* s = src + i * d * sW + j * d;
      for (int r = 0; r < RB; ++r) {
        for (int c = 0; c < NC; ++c) {
          acc[r][c] = at::vec::fmadd(wv, Vec::loadu(s + r * sW + c * L), acc[r][c]);
        }
      }
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int c = 0; c < NC; ++c) {
      acc[r][c].store(dst + r * dW + c * L, c == NC - 1 ? last : L);
    }
  }
}

template <typename T, int NC>
inline void corr_rows(const T* src, int64_t sW, const T* w, int64_t kh, int64_t kw, int64_t d,
                      bool flip, T* dst, int64_t dW, int64_t rows, int64_t ncols,
                      bool accumulate) {
  constexpr int RB = kRowBlock<NC>;
  int64_t r = 0;
  for (; r + RB <= rows; r += RB) {
    corr_block<T, NC, RB>(src + r * sW, sW, w, kh, kw, d, flip, dst + r * dW, dW, ncols,
                          accumulate);
  }
  for (; r < rows; ++r) {
    corr_block<T, NC, 1>(src + r * sW, sW, w, kh, kw, d, flip, dst + r * dW, dW, ncols,
                         accumulate);
  }
}

// dst (rows × cols, row stride dW) (+)= the kh × kw correlation (dilation d) of the padded
// plane src (row stride sW), in column segments of at most 4 vectors.
template <typename T>
void corr_plane(const T* src, int64_t sW, const T* w, int64_t kh, int64_t kw, int64_t d,
                bool flip, T* dst, int64_t dW, int64_t rows, int64_t cols, bool accumulate) {
  constexpr int64_t L = at::vec::Vectorized<T>::size();
  for (int64_t x0 = 0; x0 < cols; x0 += 4 * L) {
    const int64_t n = std::min<int64_t>(4 * L, cols - x0);
    const T* s = src + x0;
    T* o = dst + x0;
    switch ((n + L - 1) / L) {
      case 1:
        corr_rows<T, 1>(s, sW, w, kh, kw, d, flip, o, dW, rows, n, accumulate);
        break;
      case 2:
        corr_rows<T, 2>(s, sW, w, kh, kw, d, flip, o, dW, rows, n, accumulate);
        break;
      case 3:
        corr_rows<T, 3>(s, sW, w, kh, kw, d, flip, o, dW, rows, n, accumulate);
        break;
      default:
        corr_rows<T, 4>(s, sW, w, kh, kw, d, flip, o, dW, rows, n, accumulate);
    }
  }
}

// max(v, 0) (NaN stays NaN, as torch's), and the input gradient's mask: the depthwise
// convolutions can read relu(x) instead of x (the ReLU of ReLU-Conv-BN folded into their
// input copies).
template <typename T>
inline T relu_of(T v) {
  return v < T(0) ? T(0) : v;
}

// d_x[i] = 0 where x[i] ≤ 0 (the ReLU's gradient), for n elements.
template <typename T>
inline void relu_mask(T* d_x, const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (!(x[i] > T(0))) d_x[i] = T(0);
  }
}

// Zero-padded copies of n planes (pad on every side; plane i read at src + i·src_stride),
// one after the other, with a vector of zero slack after the last; relu(src) if relu.
template <typename T>
struct Padded {
  std::vector<T> buf;
  int64_t W = 0, plane = 0;  // row stride, plane stride

  const T* fill(const T* src, int64_t H, int64_t Wd, int64_t pad, int64_t n = 1,
                int64_t src_stride = 0, bool relu = false) {
    W = Wd + 2 * pad;
    plane = (H + 2 * pad) * W;
    buf.assign(n * plane + at::vec::Vectorized<T>::size(), T(0));
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t y = 0; y < H; ++y) {
        const T* row = src + i * src_stride + y * Wd;
        T* dst = buf.data() + i * plane + (y + pad) * W + pad;
        if (relu) {
          for (int64_t x = 0; x < Wd; ++x) dst[x] = relu_of(row[x]);
        } else {
          std::copy(row, row + Wd, dst);
        }
      }
    }
    return buf.data();
  }
};

// out[j] = Σ_{b<n, y<rows, x<cols} g_b[y][x] · s_b[y][x + j·d] for the K taps j of one
// kernel row (g_b = g + b·g_plane, row stride cols; s_b = s + b·s_plane, row stride sW): each
// g vector is loaded once for K FMAs, into two alternating sets of K vector accumulators (a
// fixed order); the partial last vector of a row loads only its columns.
template <typename T, int K>
void dot_taps(const T* g, int64_t g_plane, const T* s, int64_t s_plane, int64_t sW, int64_t n,
              int64_t rows, int64_t cols, int64_t d, double* out) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t L = Vec::size();
  Vec acc[2][K];
  for (int u = 0; u < 2; ++u) {
    for (int j = 0; j < K; ++j) acc[u][j] = Vec(T(0));
  }
  int u = 0;
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t y = 0; y < rows; ++y) {
      const T* gr = g + b * g_plane + y * cols;
      const T* sr = s + b * s_plane + y * sW;
      int64_t x = 0;
      for (; x + L <= cols; x += L, u ^= 1) {
        const Vec gv = Vec::loadu(gr + x);
        for (int j = 0; j < K; ++j) {
          acc[u][j] = at::vec::fmadd(gv, Vec::loadu(sr + x + j * d), acc[u][j]);
        }
      }
      if (x < cols) {
        const int64_t m = cols - x;
        const Vec gv = Vec::loadu(gr + x, m);
        for (int j = 0; j < K; ++j) {
          acc[u][j] = at::vec::fmadd(gv, Vec::loadu(sr + x + j * d, m), acc[u][j]);
        }
        u ^= 1;
      }
    }
  }
  T lanes[L];
  for (int j = 0; j < K; ++j) {
    (acc[0][j] + acc[1][j]).store(lanes);
    double sum = 0;
    for (int64_t l = 0; l < L; ++l) sum += lanes[l];
    out[j] = sum;
  }
}

// Stride 1. One task per (b, input channel): its plane is padded once (by the largest
// padding of the shapes reading it) and every shape reading it writes its output channel.
template <typename T>
void dw1_forward(const T* x, const std::vector<const T*>& w, const std::vector<Shape>& shapes,
                 T* out, int64_t B, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t Ho,
                 int64_t Wo, bool relu) {
  at::parallel_for(0, B * Cin, 1, [&](int64_t begin, int64_t end) {
    Padded<T> pad;
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / Cin, ci = bc - b * Cin;
      const int64_t q = reading_pad(shapes, ci);
      if (q < 0) continue;  // no shape reads this channel
      const T* xp = pad.fill(x + bc * H * W, H, W, q, 1, 0, relu);
      each_reader(shapes, ci, [&](size_t t, const Shape& s, int64_t c) {
        const T* origin = xp + (q - s.pad) * (pad.W + 1);
        corr_plane(origin, pad.W, w[t] + c * s.k * s.k, s.k, s.k, s.dil, false,
                   out + (b * Cout + s.out_off + c) * Ho * Wo, Wo, Ho, Wo, false);
      });
    }
  });
}

// Stride 1. d_x: one task per (b, input channel), the correlation of each reading shape's
// output gradient, padded by (k−1)·d − p (none if p is larger: the correlation then starts
// inside it), with its flipped kernel, summed in shape order; d_w: one task per output
// channel, its B input planes padded once, each tap the dot product of the output gradient
// with the padded input shifted by the tap, over (b, y, x) (see dot_taps).
template <typename T>
void dw1_backward(const T* g, const T* x, const std::vector<const T*>& w,
                  const std::vector<Shape>& shapes, T* d_x, const std::vector<T*>& d_w,
                  int64_t B, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t Ho,
                  int64_t Wo, bool relu) {
  at::parallel_for(0, B * Cin, 1, [&](int64_t begin, int64_t end) {
    Padded<T> pad;
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / Cin, ci = bc - b * Cin;
      T* dx = d_x + bc * H * W;
      bool written = false;
      each_reader(shapes, ci, [&](size_t t, const Shape& s, int64_t c) {
        const int64_t reach = (s.k - 1) * s.dil, q = std::max<int64_t>(reach - s.pad, 0);
        const T* gp = pad.fill(g + (b * Cout + s.out_off + c) * Ho * Wo, Ho, Wo, q);
        corr_plane(gp + (q + s.pad - reach) * (pad.W + 1), pad.W, w[t] + c * s.k * s.k, s.k,
                   s.k, s.dil, true, dx, W, H, W, written);
        written = true;
      });
      if (!written) {
        std::fill(dx, dx + H * W, T(0));
      } else if (relu) {
        relu_mask(dx, x + bc * H * W, H * W);
      }
    }
  });
  if (d_w.empty()) return;  // the weights' gradient is not wanted (an α-only pass)
  at::parallel_for(0, Cout, 1, [&](int64_t begin, int64_t end) {
    Padded<T> pad;
    std::vector<double> acc;
    for (int64_t o = begin; o < end; ++o) {
      size_t t = 0;
      while (o >= shapes[t].out_off + shapes[t].ch) ++t;
      const Shape& s = shapes[t];
      const int64_t c = o - s.out_off, k = s.k, d = s.dil;
      const T* xp = pad.fill(x + (s.in_off + c) * H * W, H, W, s.pad, B, Cin * H * W, relu);
      const T* gy = g + o * Ho * Wo;
      acc.assign(k * k, 0.0);
      for (int64_t i = 0; i < k; ++i) {
        const T* row = xp + i * d * pad.W;
        const int64_t gs = Cout * Ho * Wo;
        double* out = acc.data() + i * k;
        if (k == 3) {
          dot_taps<T, 3>(gy, gs, row, pad.plane, pad.W, B, Ho, Wo, d, out);
        } else if (k == 5) {
          dot_taps<T, 5>(gy, gs, row, pad.plane, pad.W, B, Ho, Wo, d, out);
        } else {
          for (int64_t j = 0; j < k; ++j) {
            dot_taps<T, 1>(gy, gs, row + j * d, pad.plane, pad.W, B, Ho, Wo, d, out + j);
          }
        }
      }
      T* dwk = d_w[t] + c * k * k;
      for (int64_t r = 0; r < k * k; ++r) dwk[r] = static_cast<T>(acc[r]);
    }
  });
}

// -- stride 2: the stride-1 routines on the planes' four phases ---------------------------
//
// Why (profile of the small CNN's second-order step, one thread): the stride-2 depthwise
// convolutions of the reduction cells ran on per-row loops (a bounds computation and a short
// strided loop per tap and row) and took 57 ms per backward call at B 8, 256 channels,
// 32×32 → 16×16, where a stride-1 call of the same output size took 8 ms; on the phases
// below, 16 ms (the same profile).
//
// A stride-2 correlation reads the padded input xp[2·yo + i·d][2·xo + j·d]. Split xp into
// its phases P_ab[u][v] = xp[2u + a][2v + b]: the taps whose row and column offsets have
// parities (a, b) read P_ab at stride 1, a sub-kernel of the taps i = i0, i0 + step, … at
// offsets step·d / 2 apart (step 2 for odd d, 1 for even d). So the forward is four
// stride-1 correlations (corr_plane) summed; d_x's phase (a, b) is the stride-1
// correlation of the padded output gradient with the flipped sub-kernel of the taps that
// land on it; each tap of d_w is a dot product of the output gradient with one phase,
// shifted (dot_taps), the phases built once per input channel for every shape reading it.

// The taps i in [0, k) whose offset i·d + r is ≡ a (mod 2): i0, i0 + step, … (n of them).
struct PhaseTaps {
  int64_t i0, n, step;

  int64_t last() const { return i0 + (n - 1) * step; }
};

inline PhaseTaps phase_taps(int64_t k, int64_t d, int64_t r, int64_t a) {
  const int64_t step = d % 2 ? 2 : 1;
  for (int64_t i = 0; i < std::min<int64_t>(k, 2); ++i) {
    if (((i * d + r) % 2 + 2) % 2 == a) return {i, (k - 1 - i) / step + 1, step};
  }
  return {0, 0, step};
}

// The sub-kernel w[ti × tj] of a k × k kernel, rows then columns, into sub.
template <typename T>
inline const T* sub_kernel(const T* w, int64_t k, const PhaseTaps& ti, const PhaseTaps& tj,
                           T* sub) {
  for (int64_t m = 0; m < ti.n; ++m) {
    for (int64_t n = 0; n < tj.n; ++n) {
      sub[m * tj.n + n] = w[(ti.i0 + m * ti.step) * k + tj.i0 + n * tj.step];
    }
  }
  return sub;
}

// The four phases of n zero-padded planes: phase (a, b) of plane i at at(a, b) + i·plane,
// rows of W elements; a vector of zero slack after the last; relu(src) if relu.
template <typename T>
struct Phases {
  std::vector<T> buf;
  int64_t H = 0, W = 0, plane = 0, n = 0;

  void fill(const T* src, int64_t Hs, int64_t Ws, int64_t pad, int64_t count = 1,
            int64_t src_stride = 0, bool relu = false) {
    H = (Hs + 2 * pad + 1) / 2;
    W = (Ws + 2 * pad + 1) / 2;
    plane = H * W;
    n = count;
    buf.assign(4 * n * plane + at::vec::Vectorized<T>::size(), T(0));
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t y = 0; y < Hs; ++y) {
        const int64_t Y = y + pad;
        const T* row = src + i * src_stride + y * Ws;
        for (int64_t b = 0; b < 2; ++b) {
          const int64_t x0 = ((pad + b) % 2 == 0) ? 0 : 1;  // first x with x + pad ≡ b
          T* dst = at(Y % 2, (x0 + pad) % 2) + i * plane + (Y / 2) * W + (x0 + pad) / 2;
          for (int64_t x = x0; x < Ws; x += 2) *dst++ = relu ? relu_of(row[x]) : row[x];
        }
      }
    }
  }

  T* at(int64_t a, int64_t b) { return buf.data() + (2 * a + b) * n * plane; }
};

template <typename T>
void dw2_forward(const T* x, const std::vector<const T*>& w, const std::vector<Shape>& shapes,
                 T* out, int64_t B, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t Ho,
                 int64_t Wo, bool relu) {
  at::parallel_for(0, B * Cin, 1, [&](int64_t begin, int64_t end) {
    Phases<T> ph;
    std::vector<T> sub;
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / Cin, ci = bc - b * Cin;
      const int64_t q = reading_pad(shapes, ci);
      if (q < 0) continue;  // no shape reads this channel
      ph.fill(x + bc * H * W, H, W, q, 1, 0, relu);
      each_reader(shapes, ci, [&](size_t t, const Shape& s, int64_t c) {
        const T* wk = w[t] + c * s.k * s.k;
        sub.resize(s.k * s.k);
        T* y = out + (b * Cout + s.out_off + c) * Ho * Wo;
        const int64_t r = q - s.pad;  // the shape's padded plane starts r rows and columns in
        bool written = false;
        for (int64_t a = 0; a < 2; ++a) {
          const PhaseTaps ti = phase_taps(s.k, s.dil, r, a);
          for (int64_t bb = 0; bb < 2 && ti.n > 0; ++bb) {
            const PhaseTaps tj = phase_taps(s.k, s.dil, r, bb);
            if (tj.n == 0) continue;
            const T* origin = ph.at(a, bb) + (ti.i0 * s.dil + r - a) / 2 * ph.W +
                              (tj.i0 * s.dil + r - bb) / 2;
            corr_plane(origin, ph.W, sub_kernel(wk, s.k, ti, tj, sub.data()), ti.n, tj.n,
                       ti.step * s.dil / 2, false, y, Wo, Ho, Wo, written);
            written = true;
          }
        }
      });
    }
  });
}

// d_x: one task per (b, input channel). Its phase (a, b) (rows 2u + a, columns 2v + b) gets,
// from each shape reading the channel, Σ over the taps i ≡ the phase of
// w[i][j] · g[u + (a + p − i·d) / 2][v + (b + p − j·d) / 2]: a flipped correlation of the
// output gradient, zero-padded by as much as the offsets reach, summed in shape order into a
// phase buffer, then interleaved into d_x. d_w: one task per input channel, its B planes
// split into phases once (padded by the largest padding q of the shapes reading it); tap
// (i, j) of a shape with padding p (r = q − p) is Σ_{b, yo, xo} g · P_{(i·d + r)%2, (j·d +
// r)%2} at ((i·d + r) / 2 + yo, (j·d + r) / 2 + xo), a kernel row's taps of one column phase
// at a time.
template <typename T>
void dw2_backward(const T* g, const T* x, const std::vector<const T*>& w,
                  const std::vector<Shape>& shapes, T* d_x, const std::vector<T*>& d_w,
                  int64_t B, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t Ho,
                  int64_t Wo, bool relu) {
  const int64_t Hh = (H + 1) / 2, Wh = (W + 1) / 2;  // the largest phase of d_x
  at::parallel_for(0, B * Cin, 1, [&](int64_t begin, int64_t end) {
    Padded<T> pad;
    std::vector<T> phase(4 * Hh * Wh), sub;
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / Cin, ci = bc - b * Cin;
      bool written[4] = {false, false, false, false};
      each_reader(shapes, ci, [&](size_t t, const Shape& s, int64_t c) {
        const T* wk = w[t] + c * s.k * s.k;
        sub.resize(s.k * s.k);
        // Padding so that every offset (a + p − i·d) / 2 reads inside the buffer: q ≥ −offset
        // for the first row and q ≥ rows + offset − Ho for the last (columns alike).
        int64_t q = 0;
        for (int64_t a = 0; a < 2; ++a) {
          const PhaseTaps ti = phase_taps(s.k, s.dil, -s.pad, a);
          for (int64_t m = 0; m < ti.n; ++m) {
            const int64_t off = (a + s.pad - (ti.i0 + m * ti.step) * s.dil) / 2;
            q = std::max({q, -off, (H - a + 1) / 2 + off - Ho, (W - a + 1) / 2 + off - Wo});
          }
        }
        const T* gp = pad.fill(g + (b * Cout + s.out_off + c) * Ho * Wo, Ho, Wo, q);
        for (int64_t a = 0; a < 2; ++a) {
          const PhaseTaps ti = phase_taps(s.k, s.dil, -s.pad, a);
          for (int64_t bb = 0; bb < 2 && ti.n > 0; ++bb) {
            const PhaseTaps tj = phase_taps(s.k, s.dil, -s.pad, bb);
            if (tj.n == 0) continue;
            // The correlation starts at the last tap's offset (flipped: taps by rising offset).
            const int64_t y0 = q + (a + s.pad - ti.last() * s.dil) / 2;
            const int64_t x0 = q + (bb + s.pad - tj.last() * s.dil) / 2;
            bool& done = written[2 * a + bb];
            corr_plane(gp + y0 * pad.W + x0, pad.W, sub_kernel(wk, s.k, ti, tj, sub.data()), ti.n,
                       tj.n, ti.step * s.dil / 2, true, phase.data() + (2 * a + bb) * Hh * Wh, Wh,
                       (H - a + 1) / 2, (W - bb + 1) / 2, done);
            done = true;
          }
        }
      });
      T* dx = d_x + bc * H * W;
      for (int64_t y = 0; y < H; ++y) {
        for (int64_t bb = 0; bb < 2; ++bb) {
          const int64_t ph = 2 * (y % 2) + bb;
          const T* src = phase.data() + ph * Hh * Wh + (y / 2) * Wh;
          T* row = dx + y * W;
          for (int64_t xx = bb, v = 0; xx < W; xx += 2, ++v) row[xx] = written[ph] ? src[v] : T(0);
        }
      }
      if (relu) relu_mask(dx, x + bc * H * W, H * W);
    }
  });
  if (d_w.empty()) return;  // the weights' gradient is not wanted (an α-only pass)
  at::parallel_for(0, Cin, 1, [&](int64_t begin, int64_t end) {
    Phases<T> ph;
    std::vector<double> taps;
    for (int64_t ci = begin; ci < end; ++ci) {
      const int64_t q = reading_pad(shapes, ci);
      if (q < 0) continue;  // no shape reads this channel
      ph.fill(x + ci * H * W, H, W, q, B, Cin * H * W, relu);
      each_reader(shapes, ci, [&](size_t t, const Shape& s, int64_t c) {
        const int64_t k = s.k, d = s.dil, r = q - s.pad;
        const T* gy = g + (s.out_off + c) * Ho * Wo;
        const int64_t gs = Cout * Ho * Wo;
        T* dwk = d_w[t] + c * k * k;
        taps.resize(k);
        for (int64_t i = 0; i < k; ++i) {
          const int64_t a = (i * d + r) % 2;
          for (int64_t bb = 0; bb < 2; ++bb) {
            const PhaseTaps tj = phase_taps(k, d, r, bb);
            if (tj.n == 0) continue;
            const T* row = ph.at(a, bb) + (i * d + r) / 2 * ph.W + (tj.i0 * d + r - bb) / 2;
            const int64_t dd = tj.step * d / 2;
            switch (tj.n) {
              case 1:
                dot_taps<T, 1>(gy, gs, row, ph.plane, ph.W, B, Ho, Wo, dd, taps.data());
                break;
              case 2:
                dot_taps<T, 2>(gy, gs, row, ph.plane, ph.W, B, Ho, Wo, dd, taps.data());
                break;
              case 3:
                dot_taps<T, 3>(gy, gs, row, ph.plane, ph.W, B, Ho, Wo, dd, taps.data());
                break;
              case 5:
                dot_taps<T, 5>(gy, gs, row, ph.plane, ph.W, B, Ho, Wo, dd, taps.data());
                break;
              default:
                for (int64_t n = 0; n < tj.n; ++n) {
                  dot_taps<T, 1>(gy, gs, row + n * dd, ph.plane, ph.W, B, Ho, Wo, dd, &taps[n]);
                }
            }
            for (int64_t n = 0; n < tj.n; ++n) {
              dwk[i * k + tj.i0 + n * tj.step] = static_cast<T>(taps[n]);
            }
          }
        }
      });
    }
  });
}

struct DwGeometry {
  std::vector<Shape> shapes;
  int64_t B, Cin, H, W, Cout, Ho, Wo;
};

DwGeometry dw_check(const at::Tensor& x, at::TensorList weights, int64_t stride,
                    at::IntArrayRef pads, at::IntArrayRef dils, at::IntArrayRef in_offsets) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.is_contiguous(),
              "depthwise (cpu kernel): x must be a contiguous (B, C, H, W) cpu tensor, got ",
              x.sizes(), " on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "depthwise: dtype must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(stride == 1 || stride == 2, "depthwise: stride must be 1 or 2, got ", stride);
  DwGeometry geo;
  geo.B = x.size(0), geo.Cin = x.size(1), geo.H = x.size(2), geo.W = x.size(3);
  geo.shapes = shapes_of(weights, pads, dils, in_offsets, geo.Cin);
  for (const auto& w : weights) check_same(w, x, "depthwise: each weight");
  const Shape& last = geo.shapes.back();
  geo.Cout = last.out_off + last.ch;
  geo.Ho = out_size(geo.H, geo.shapes[0], stride);
  geo.Wo = out_size(geo.W, geo.shapes[0], stride);
  for (const auto& s : geo.shapes) {
    TORCH_CHECK(out_size(geo.H, s, stride) == geo.Ho && out_size(geo.W, s, stride) == geo.Wo,
                "depthwise: every shape must give the same output size");
  }
  TORCH_CHECK(geo.Ho >= 1 && geo.Wo >= 1, "depthwise: empty output");
  return geo;
}

// out (B, Σ Ch_t, Ho, Wo), every element written; of relu(x) if relu.
at::Tensor depthwise_forward(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                             int64_t stride, const std::vector<int64_t>& pads,
                             const std::vector<int64_t>& dils,
                             const std::vector<int64_t>& in_offsets, bool relu,
                             const std::optional<at::Tensor>& out_arg) {
  const auto geo = dw_check(x, weights, stride, pads, dils, in_offsets);
  const at::Tensor out = output(out_arg, x, {geo.B, geo.Cout, geo.Ho, geo.Wo});
  check_out(out, x, {geo.B, geo.Cout, geo.Ho, geo.Wo}, "depthwise: out");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_forward", [&] {
    std::vector<const scalar_t*> w;
    for (const auto& t : weights) w.push_back(t.data_ptr<scalar_t>());
    auto fn = stride == 1 ? dw1_forward<scalar_t> : dw2_forward<scalar_t>;
    fn(x.data_ptr<scalar_t>(), w, geo.shapes, out.data_ptr<scalar_t>(), geo.B, geo.Cin, geo.H,
       geo.W, geo.Cout, geo.Ho, geo.Wo, relu);
  });
  return out;
}

// [d_x (B, Cin, H, W), d_weights[t] (Ch_t, 1, k_t, k_t) when grad_weights], every element
// written; input channels no shape reads get zero. Without grad_weights (an α-only pass) the
// weights' gradient is not computed. With relu, the gradients of the convolutions of
// relu(x): d_x zero where x ≤ 0 (as torch's ReLU), d_w from relu(x).
std::vector<at::Tensor> depthwise_backward(const at::Tensor& grad, const at::Tensor& x,
                                           const std::vector<at::Tensor>& weights,
                                           int64_t stride, const std::vector<int64_t>& pads,
                                           const std::vector<int64_t>& dils,
                                           const std::vector<int64_t>& in_offsets,
                                           bool grad_weights, bool relu,
                                           const std::optional<std::vector<at::Tensor>>& out) {
  const auto geo = dw_check(x, weights, stride, pads, dils, in_offsets);
  check_out(grad, x, {geo.B, geo.Cout, geo.Ho, geo.Wo}, "depthwise: grad");
  std::vector<std::vector<int64_t>> sizes{x.sizes().vec()};
  for (const auto& w : weights) {
    if (grad_weights) sizes.push_back(w.sizes().vec());
  }
  const auto grads = outputs(out, x, sizes, "depthwise backward");
  const at::Tensor& d_x = grads[0];
  const at::TensorList d_weights = at::TensorList(grads).slice(1);
  check_out(d_x, x, x.sizes(), "depthwise: d_x");
  for (size_t t = 0; t < d_weights.size(); ++t) {
    check_out(d_weights[t], x, weights[t].sizes(), "depthwise: d_weight");
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_backward", [&] {
    std::vector<const scalar_t*> w;
    std::vector<scalar_t*> dw;
    for (const auto& t : weights) w.push_back(t.data_ptr<scalar_t>());
    for (const auto& t : d_weights) dw.push_back(t.data_ptr<scalar_t>());
    auto fn = stride == 1 ? dw1_backward<scalar_t> : dw2_backward<scalar_t>;
    fn(grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w, geo.shapes,
       d_x.data_ptr<scalar_t>(), dw, geo.B, geo.Cin, geo.H, geo.W, geo.Cout, geo.Ho, geo.Wo,
       relu);
  });
  return grads;
}

// -- grouped pointwise (1×1) convolutions ------------------------------------------------
//
// x (B, G·Ci, H, W), weight (G·Co, Ci, 1, 1) → out (B, G·Co, H, W): per (b, g) the product
// W_g (Co × Ci) · x_bg (Ci × P), P = H·W. Why not torch's: at one thread and a batch under 16
// a 1×1 convolution takes THNN's path, which runs a grouped one as a loop over groups, each
// with a copy of its input slice, a matrix product per sample and a final cat (profiled, small
// CNN step, both passes: about 1.4 s of the fused step's 6.8 s with the copies and cats). The
// matrices are tiny (Ci, Co ≤ 64; ATen's cpublas::gemm is not exported to extensions), so
// this is a register-blocked loop: forward + both gradients at the search's seven group
// shapes took 0.09 s against 0.15 s for torch's (one AVX2 core, loaded machine). No atomics:
// the forward and d_x run one task per (b, g), d_w one per group with the batch summed in a
// fixed order.

// c[m][p] = Σ_k a[m·a_rs + k·a_cs] · x[k·P + p] for MB rows m and the columns [p0, p0 + n),
// n in ((NV−1)·lanes, NV·lanes] (the last vector loads and stores only its columns).
template <typename T, int MB, int NV>
inline void mm_block(const T* a, int64_t a_rs, int64_t a_cs, const T* x, int64_t K, int64_t P,
                     T* c, int64_t p0, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const int64_t last = n - (NV - 1) * L;
  Vec acc[MB][NV];
  for (int r = 0; r < MB; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec(T(0));
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec xv[NV];
    for (int v = 0; v < NV; ++v) {
      const T* src = x + k * P + p0 + v * L;
      xv[v] = v == NV - 1 ? Vec::loadu(src, last) : Vec::loadu(src);
    }
    for (int r = 0; r < MB; ++r) {
      const Vec wv(a[r * a_rs + k * a_cs]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(wv, xv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MB; ++r) {
    for (int v = 0; v < NV; ++v) {
      acc[r][v].store(c + r * P + p0 + v * L, v == NV - 1 ? last : L);
    }
  }
}

// c (M × P) = A · x, A (M × K) read at a[m·a_rs + k·a_cs], x (K × P): column strips of 2
// vectors (the last one narrower) in the outer loop, so that the strip of x (K × 2 vectors,
// ≤ 4 KiB) is read from L1 by every block of 4 rows (8 accumulators), then each remaining
// row; with the rows outer, each row block would stream all of x (64 KiB at C = 16, 32×32).
template <typename T, int NV>
void mm_strip(const T* a, int64_t a_rs, int64_t a_cs, const T* x, int64_t M, int64_t K,
              int64_t P, T* c, int64_t p, int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    mm_block<T, 4, NV>(a + m * a_rs, a_rs, a_cs, x, K, P, c + m * P, p, n);
  }
  for (; m < M; ++m) mm_block<T, 1, NV>(a + m * a_rs, a_rs, a_cs, x, K, P, c + m * P, p, n);
}

template <typename T>
void mm(const T* a, int64_t a_rs, int64_t a_cs, const T* x, int64_t M, int64_t K, int64_t P,
        T* c) {
  constexpr int64_t L = at::vec::Vectorized<T>::size();
  for (int64_t p = 0; p < P; p += 2 * L) {
    const int64_t n = std::min<int64_t>(2 * L, P - p);
    if (n > L) {
      mm_strip<T, 2>(a, a_rs, a_cs, x, M, K, P, c, p, n);
    } else {
      mm_strip<T, 1>(a, a_rs, a_cs, x, M, K, P, c, p, n);
    }
  }
}

// d_w[o][i] = Σ_b Σ_p g_b[o][p] · x_b[i][p] for OB rows o and IB columns i: OB·IB vector
// accumulators over (b, p), summed over lanes in double.
template <typename T, int OB, int IB>
inline void dw_block(const T* g, const T* x, int64_t g_stride, int64_t x_stride, int64_t B,
                     int64_t P, T* out, int64_t Ci) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t L = Vec::size();
  Vec acc[OB][IB];
  for (int r = 0; r < OB; ++r) {
    for (int c = 0; c < IB; ++c) acc[r][c] = Vec(T(0));
  }
  for (int64_t b = 0; b < B; ++b) {
    const T* gb = g + b * g_stride;
    const T* xb = x + b * x_stride;
    for (int64_t p = 0; p < P; p += L) {
      const int64_t n = std::min<int64_t>(L, P - p);
      Vec gv[OB], xv[IB];
      for (int r = 0; r < OB; ++r) gv[r] = Vec::loadu(gb + r * P + p, n);
      for (int c = 0; c < IB; ++c) xv[c] = Vec::loadu(xb + c * P + p, n);
      for (int r = 0; r < OB; ++r) {
        for (int c = 0; c < IB; ++c) acc[r][c] = at::vec::fmadd(gv[r], xv[c], acc[r][c]);
      }
    }
  }
  T lanes[L];
  for (int r = 0; r < OB; ++r) {
    for (int c = 0; c < IB; ++c) {
      acc[r][c].store(lanes);
      double sum = 0;
      for (int64_t l = 0; l < L; ++l) sum += lanes[l];
      out[r * Ci + c] = static_cast<T>(sum);
    }
  }
}

template <typename T, int OB>
inline void dw_rows(const T* g, const T* x, int64_t g_stride, int64_t x_stride, int64_t B,
                    int64_t P, T* out, int64_t Ci) {
  int64_t i = 0;
  for (; i + 2 <= Ci; i += 2) {
    dw_block<T, OB, 2>(g, x + i * P, g_stride, x_stride, B, P, out + i, Ci);
  }
  for (; i < Ci; ++i) dw_block<T, OB, 1>(g, x + i * P, g_stride, x_stride, B, P, out + i, Ci);
}

struct PwGeometry {
  int64_t B, G, Ci, Co, P;
};

PwGeometry pw_check(const at::Tensor& x, const at::Tensor& weight, int64_t groups) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.is_contiguous(),
              "pointwise (cpu kernel): x must be a contiguous (B, C, H, W) cpu tensor, got ",
              x.sizes(), " on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "pointwise: dtype must be float32 or float64, got ", x.scalar_type());
  check_same(weight, x, "pointwise: weight");
  TORCH_CHECK(groups >= 1 && weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1 &&
                  weight.size(0) % groups == 0 && weight.size(1) * groups == x.size(1) &&
                  weight.is_contiguous(),
              "pointwise: weight must be a contiguous (groups·Co, C / groups, 1, 1) tensor for ",
              groups, " groups of an input with ", x.size(1), " channels, got ",
              weight.sizes());
  return {x.size(0), groups, weight.size(1), weight.size(0) / groups, x.size(2) * x.size(3)};
}

// out (B, G·Co, H, W), every element written.
at::Tensor pointwise_forward(const at::Tensor& x, const at::Tensor& weight, int64_t groups,
                             const std::optional<at::Tensor>& out_arg) {
  const auto s = pw_check(x, weight, groups);
  const at::Tensor out = output(out_arg, x, {s.B, s.G * s.Co, x.size(2), x.size(3)});
  check_out(out, x, {s.B, s.G * s.Co, x.size(2), x.size(3)}, "pointwise: out");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pointwise_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, s.B * s.G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bg = begin; bg < end; ++bg) {
        const int64_t g = bg % s.G;
        mm(wp + g * s.Co * s.Ci, s.Ci, 1, xp + bg * s.Ci * s.P, s.Co, s.Ci, s.P,
           op + bg * s.Co * s.P);
      }
    });
  });
  return out;
}

// [d_x, d_weight when grad_weight], every element written.
std::vector<at::Tensor> pointwise_backward(const at::Tensor& grad_arg, const at::Tensor& x,
                                           const at::Tensor& weight, int64_t groups,
                                           bool grad_weight,
                                           const std::optional<std::vector<at::Tensor>>& out) {
  const auto s = pw_check(x, weight, groups);
  const at::Tensor grad =
      planes(grad_arg, x, {s.B, s.G * s.Co, x.size(2), x.size(3)}, "pointwise: grad");
  const int64_t g_batch = batch_stride(grad);
  std::vector<std::vector<int64_t>> sizes{x.sizes().vec()};
  if (grad_weight) sizes.push_back(weight.sizes().vec());
  const auto grads = outputs(out, x, sizes, "pointwise backward");
  const at::Tensor& d_x = grads[0];
  const at::TensorList d_weight = at::TensorList(grads).slice(1);
  check_out(d_x, x, x.sizes(), "pointwise: d_x");
  if (!d_weight.empty()) check_out(d_weight[0], x, weight.sizes(), "pointwise: d_weight");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pointwise_backward", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* dxp = d_x.data_ptr<scalar_t>();
    at::parallel_for(0, s.B * s.G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bg = begin; bg < end; ++bg) {
        const int64_t b = bg / s.G, g = bg % s.G;
        // d_x_bg (Ci × P) = W_gᵀ · grad_bg: W_g read transposed (row stride 1, column Ci).
        mm(wp + g * s.Co * s.Ci, 1, s.Ci, gp + b * g_batch + g * s.Co * s.P, s.Ci, s.Co, s.P,
           dxp + bg * s.Ci * s.P);
      }
    });
    if (d_weight.empty()) return;  // the weight's gradient is not wanted (an α-only pass)
    scalar_t* dwp = d_weight[0].data_ptr<scalar_t>();
    const int64_t g_stride = g_batch, x_stride = s.G * s.Ci * s.P;
    at::parallel_for(0, s.G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const scalar_t* gg = gp + g * s.Co * s.P;
        const scalar_t* xg = xp + g * s.Ci * s.P;
        scalar_t* dwg = dwp + g * s.Co * s.Ci;
        int64_t o = 0;
        for (; o + 4 <= s.Co; o += 4) {
          dw_rows<scalar_t, 4>(gg + o * s.P, xg, g_stride, x_stride, s.B, s.P, dwg + o * s.Ci,
                               s.Ci);
        }
        for (; o < s.Co; ++o) {
          dw_rows<scalar_t, 1>(gg + o * s.P, xg, g_stride, x_stride, s.B, s.P, dwg + o * s.Ci,
                               s.Ci);
        }
      }
    });
  });
  return grads;
}

}  // namespace

// -- max_pool_3x3 and avg_pool_3x3 of the same input in one call ------------------------
//
// x (B, C, H, W) → out (B, 2C, Ho, Wo) = [max pool | avg pool], each 3×3 with padding 1 at
// stride 1 or 2 (Ho = (H − 1) / stride + 1), the average over the window's pixels inside the
// image (count_include_pad=False), the maximum as torch's CPU kernel takes it (the first
// maximum in row-major order; a NaN wins, the last one if several); x may be a channel block
// of a larger tensor (its planes are read in place). One task per (b, c) plane each way; the
// backward finds each window's maximum again (nothing saved) and adds into d_x in a fixed
// order (no atomics).
//
// Both directions are separable: a pass along each row at the output columns (max, argmax
// or sum of the row's 3 window pixels), then one combining the window's rows, with
// branch-free inner loops over whole rows. At B 64, C 32, 32×32, stride 1 (one thread) the
// per-window loops this replaced took 95 ms forward and 91 ms backward, torch's two pools
// 149 and 37 ms; benchmarks/results/cpu-kernels-conv.json has the figures of this code.

namespace {

struct PoolGeometry {
  int64_t B, C, H, W, Ho, Wo, stride;

  // The image rows (or columns) [lo, hi) of output row (column) o's window.
  int64_t lo(int64_t o) const { return std::max<int64_t>(o * stride - 1, 0); }
  int64_t hi(int64_t o, int64_t n) const { return std::min<int64_t>(o * stride + 2, n); }
  // Output rows (columns) whose window holds every pixel of theirs: [1, inner_end(n)).
  int64_t inner_end(int64_t n, int64_t n_out) const {
    return std::max<int64_t>(std::min<int64_t>((n - 2) / stride + 1, n_out), 1);
  }
};

PoolGeometry pool_check(const at::Tensor& x, int64_t stride) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4,
              "pools (cpu kernel): x must be a (B, C, H, W) cpu tensor, got ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "pools: dtype must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(stride == 1 || stride == 2, "pools: stride must be 1 or 2, got ", stride);
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, "pools: empty input");
  return {x.size(0),
          x.size(1),
          x.size(2),
          x.size(3),
          (x.size(2) - 1) / stride + 1,
          (x.size(3) - 1) / stride + 1,
          stride};
}

// fn(b, c, scratch) for every (b, c) plane, one task each, with a task's scratch of n
// elements of T.
template <typename T, typename F>
void each_plane(const PoolGeometry& g, int64_t n, F&& fn) {
  at::parallel_for(0, g.B * g.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(n);
    for (int64_t bc = begin; bc < end; ++bc) fn(bc / g.C, bc % g.C, scratch.data());
  });
}

// Whether torch's max pool moves its maximum from m to v (a NaN always takes it). Callers
// select on it rather than branch: which element wins is data (a branch on it mispredicts).
template <typename T>
inline bool takes(T v, T m) {
  return (v > m) | (v != v);
}

// Output column ox's share of one image row, for every ox: its maximum, with ARG its first
// argmax as an offset from the window's first column (0, 1 or 2, held in a T; the last NaN
// if any), with SUM its sum. The inner columns (whole windows) are one branch-free loop.
template <typename T, bool ARG, bool SUM>
void row_pass(const PoolGeometry& g, const T* row, T* mx, T* arg, T* sum) {
  const int64_t s = g.stride, inner = g.inner_end(g.W, g.Wo);
  auto edge = [&](int64_t ox) {
    const int64_t x0 = g.lo(ox), x1 = g.hi(ox, g.W);
    T m = row[x0], total = row[x0], a = 0;
    for (int64_t x = x0 + 1; x < x1; ++x) {
      const bool moves = takes(row[x], m);
      m = moves ? row[x] : m;
      a = moves ? T(x - x0) : a;
      total += row[x];
    }
    mx[ox] = m;
    if (ARG) arg[ox] = a;
    if (SUM) sum[ox] = total;
  };
  edge(0);
  int64_t ox = 1;
  if (s == 1) {
    // Whole vectors of output columns; GCC leaves the scalar loop below unvectorised (perf
    // showed it as compares and branches, ~40% of pools_backward at B 8, C 32, 32×32).
    using Vec = at::vec::Vectorized<T>;
    const Vec zero(T(0)), one(T(1)), two(T(2));
    for (; ox + Vec::size() <= inner; ox += Vec::size()) {
      const Vec w0 = Vec::loadu(row + ox - 1), w1 = Vec::loadu(row + ox);
      const Vec w2 = Vec::loadu(row + ox + 1);
      const Vec t1 = (w1 > w0) | w1.isnan();
      const Vec m1 = Vec::blendv(w0, w1, t1);
      const Vec t2 = (w2 > m1) | w2.isnan();
      Vec::blendv(m1, w2, t2).store(mx + ox);
      if (ARG) Vec::blendv(Vec::blendv(zero, one, t1), two, t2).store(arg + ox);
      if (SUM) (w0 + w1 + w2).store(sum + ox);
    }
  }
  for (; ox < inner; ++ox) {
    const T w0 = row[ox * s - 1], w1 = row[ox * s], w2 = row[ox * s + 1];
    const bool t1 = takes(w1, w0);
    const T m1 = t1 ? w1 : w0;
    const bool t2 = takes(w2, m1);
    mx[ox] = t2 ? w2 : m1;
    if (ARG) arg[ox] = t2 ? T(2) : (t1 ? T(1) : T(0));
    if (SUM) sum[ox] = w0 + w1 + w2;
  }
  for (int64_t ox = inner; ox < g.Wo; ++ox) edge(ox);
}

// out (B, 2C, Ho, Wo), every element written.
at::Tensor pools_forward(const at::Tensor& x_arg, int64_t stride,
                         const std::optional<at::Tensor>& out_arg) {
  const auto g = pool_check(x_arg, stride);
  const at::Tensor x = planes(x_arg, x_arg, x_arg.sizes(), "pools: x");
  const int64_t x_batch = batch_stride(x);
  const at::Tensor out = output(out_arg, x, {g.B, 2 * g.C, g.Ho, g.Wo});
  check_out(out, x, {g.B, 2 * g.C, g.Ho, g.Wo}, "pools: out");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pools_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    std::vector<scalar_t> cols(g.Wo);  // pixels per window column span
    for (int64_t ox = 0; ox < g.Wo; ++ox) cols[ox] = g.hi(ox, g.W) - g.lo(ox);
    // scratch: every row's [max | sum] at the output columns.
    each_plane<scalar_t>(g, 2 * g.H * g.Wo, [&](int64_t b, int64_t c, scalar_t* rows) {
      const scalar_t* plane = xp + b * x_batch + c * g.H * g.W;
      for (int64_t y = 0; y < g.H; ++y) {
        scalar_t* r = rows + 2 * y * g.Wo;
        row_pass<scalar_t, false, true>(g, plane + y * g.W, r, nullptr, r + g.Wo);
      }
      scalar_t* maxp = op + (b * 2 * g.C + c) * g.Ho * g.Wo;
      scalar_t* avgp = maxp + g.C * g.Ho * g.Wo;
      for (int64_t oy = 0; oy < g.Ho; ++oy) {
        const int64_t y0 = g.lo(oy), y1 = g.hi(oy, g.H);
        scalar_t* m = maxp + oy * g.Wo;
        scalar_t* a = avgp + oy * g.Wo;
        std::copy(rows + (2 * y0 + 1) * g.Wo, rows + (2 * y0 + 2) * g.Wo, a);
        std::copy(rows + 2 * y0 * g.Wo, rows + (2 * y0 + 1) * g.Wo, m);
        for (int64_t y = y0 + 1; y < y1; ++y) {
          const scalar_t* rm = rows + 2 * y * g.Wo;
          const scalar_t* rs = rm + g.Wo;
          for (int64_t ox = 0; ox < g.Wo; ++ox) {
            m[ox] = takes(rm[ox], m[ox]) ? rm[ox] : m[ox];
            a[ox] += rs[ox];
          }
        }
        const scalar_t height = static_cast<scalar_t>(y1 - y0);
        for (int64_t ox = 0; ox < g.Wo; ++ox) a[ox] /= height * cols[ox];
      }
    });
  });
  return out;
}

// d_x (B, C, H, W) from grad (B, 2C, Ho, Wo), every element written.
at::Tensor pools_backward(const at::Tensor& grad_arg, const at::Tensor& x_arg, int64_t stride,
                          const std::optional<at::Tensor>& out_arg) {
  const auto g = pool_check(x_arg, stride);
  const at::Tensor x = planes(x_arg, x_arg, x_arg.sizes(), "pools: x");
  const int64_t x_batch = batch_stride(x);
  const at::Tensor grad = planes(grad_arg, x, {g.B, 2 * g.C, g.Ho, g.Wo}, "pools: grad");
  const int64_t g_batch = batch_stride(grad);
  const at::Tensor d_x = output(out_arg, x, x.sizes());
  check_out(d_x, x, x.sizes(), "pools: d_x");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pools_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* dp = d_x.data_ptr<scalar_t>();
    std::vector<scalar_t> cols(g.Wo);
    for (int64_t ox = 0; ox < g.Wo; ++ox) cols[ox] = g.hi(ox, g.W) - g.lo(ox);
    // scratch: every row's max and argmax offset at the output columns; one row of the
    // average's gradient summed over the output rows covering an image row; a window row's
    // running maximum, its argmax offset and the image row it is in.
    const int64_t n_rows = g.H * g.Wo;
    each_plane<scalar_t>(g, 2 * n_rows + 4 * g.Wo, [&](int64_t b, int64_t c, scalar_t* rows) {
      const scalar_t* plane = xp + b * x_batch + c * g.H * g.W;
      const scalar_t* g_max = gp + b * g_batch + c * g.Ho * g.Wo;
      const scalar_t* g_avg = g_max + g.C * g.Ho * g.Wo;
      scalar_t* d = dp + (b * g.C + c) * g.H * g.W;
      scalar_t* args = rows + n_rows;
      scalar_t* v = args + n_rows;
      scalar_t* best = v + g.Wo;
      scalar_t* col = best + g.Wo;
      scalar_t* row_of = col + g.Wo;
      // The average: each image row y gets sum over covering output rows oy and columns ox
      // of g_avg / window size, spread over the columns each window covers.
      for (int64_t y = 0; y < g.H; ++y) {
        const int64_t oy0 = y == 0 ? 0 : (y + g.stride - 2) / g.stride;
        const int64_t oy1 = std::min<int64_t>((y + 1) / g.stride + 1, g.Ho);
        std::fill(v, v + g.Wo, scalar_t(0));
        for (int64_t oy = oy0; oy < oy1; ++oy) {
          const scalar_t height = static_cast<scalar_t>(g.hi(oy, g.H) - g.lo(oy));
          const scalar_t* ga = g_avg + oy * g.Wo;
          for (int64_t ox = 0; ox < g.Wo; ++ox) v[ox] += ga[ox] / (height * cols[ox]);
        }
        // Column x gets v of the windows covering it, in window order: x − 1, x, x + 1 at
        // stride 1; at stride 2, m for x = 2m and m, m + 1 for x = 2m + 1.
        scalar_t* dr = d + y * g.W;
        if (g.stride == 1) {
          const int64_t W = g.W;
          dr[0] = W > 1 ? v[0] + v[1] : v[0];
          for (int64_t xx = 1; xx + 1 < W; ++xx) dr[xx] = v[xx - 1] + v[xx] + v[xx + 1];
          if (W > 1) dr[W - 1] = v[W - 2] + v[W - 1];
        } else {
          for (int64_t m = 0; m < g.Wo; ++m) {
            dr[2 * m] = v[m];
            if (2 * m + 1 < g.W) dr[2 * m + 1] = m + 1 < g.Wo ? v[m] + v[m + 1] : v[m];
          }
        }
        row_pass<scalar_t, true, false>(g, plane + y * g.W, rows + y * g.Wo, args + y * g.Wo,
                                        nullptr);
      }
      // The maximum: each window's argmax (its rows' in order, as torch scans them), then
      // its gradient added there.
      for (int64_t oy = 0; oy < g.Ho; ++oy) {
        const int64_t y0 = g.lo(oy), y1 = g.hi(oy, g.H);
        std::copy(rows + y0 * g.Wo, rows + (y0 + 1) * g.Wo, best);
        std::copy(args + y0 * g.Wo, args + (y0 + 1) * g.Wo, col);
        std::fill(row_of, row_of + g.Wo, static_cast<scalar_t>(y0));
        for (int64_t y = y0 + 1; y < y1; ++y) {
          const scalar_t* r = rows + y * g.Wo;
          const scalar_t* a = args + y * g.Wo;
          const scalar_t yy = static_cast<scalar_t>(y);
          for (int64_t ox = 0; ox < g.Wo; ++ox) {
            const bool moves = takes(r[ox], best[ox]);
            best[ox] = moves ? r[ox] : best[ox];
            col[ox] = moves ? a[ox] : col[ox];
            row_of[ox] = moves ? yy : row_of[ox];
          }
        }
        const scalar_t* gm = g_max + oy * g.Wo;
        for (int64_t ox = 0; ox < g.Wo; ++ox) {
          const auto y = static_cast<int64_t>(row_of[ox]), x = static_cast<int64_t>(col[ox]);
          d[y * g.W + g.lo(ox) + x] += gm[ox];
        }
      }
    });
  });
  return d_x;
}

}  // namespace

namespace fastdarts {

void bind_conv_mixed(pybind11::module& m) {
  namespace py = pybind11;
  m.def("conv_mix_forward", &forward, "out (B, n_out, H, W) of the mixture", py::arg("src"),
        py::arg("alpha"), py::arg("shift"), py::arg("acc"), py::arg("route_src"),
        py::arg("out_ptr"), py::arg("out") = py::none());
  m.def("conv_mix_backward", &backward, "[d_src, d_alpha, d_shift] of the mixture",
        py::arg("grad"), py::arg("src"), py::arg("alpha"), py::arg("shift"),
        py::arg("route_src"), py::arg("route_out"), py::arg("src_perm"), py::arg("src_ptr"),
        py::arg("out") = py::none());
  m.def("depthwise_forward", &depthwise_forward, "depthwise convolutions of several shapes",
        py::arg("x"), py::arg("weights"), py::arg("stride"), py::arg("pads"), py::arg("dils"),
        py::arg("in_offsets"), py::arg("relu") = false, py::arg("out") = py::none());
  m.def("depthwise_backward", &depthwise_backward, "[d_x, *d_weights] of depthwise_forward",
        py::arg("grad"), py::arg("x"), py::arg("weights"), py::arg("stride"), py::arg("pads"),
        py::arg("dils"), py::arg("in_offsets"), py::arg("grad_weights"),
        py::arg("relu") = false, py::arg("out") = py::none());
  m.def("pointwise_forward", &pointwise_forward, "a grouped 1x1 convolution", py::arg("x"),
        py::arg("weight"), py::arg("groups"), py::arg("out") = py::none());
  m.def("pointwise_backward", &pointwise_backward, "[d_x, d_weight] of pointwise_forward",
        py::arg("grad"), py::arg("x"), py::arg("weight"), py::arg("groups"),
        py::arg("grad_weight"), py::arg("out") = py::none());
  m.def("pools_forward", &pools_forward, "[max pool | avg pool] (3x3, padding 1)",
        py::arg("x"), py::arg("stride"), py::arg("out") = py::none());
  m.def("pools_backward", &pools_backward, "d_x of pools_forward", py::arg("grad"),
        py::arg("x"), py::arg("stride"), py::arg("out") = py::none());
}

}  // namespace fastdarts
