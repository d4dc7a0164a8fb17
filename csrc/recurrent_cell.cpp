// The whole DARTS recurrent search cell over a sequence, CPU: forward and backward each one
// call, with the matmuls left to the BLAS behind at::mm.
//
// For inputs x (T, B, I), hidden h (B, D), W0 (I + D, 2D), W_j (D, 2D), probs P (E, 5):
//   [c0, h0] = [x_t ⊙ mx, h ⊙ mh] · W0,   s0 = BN(h + σ(c0) (tanh(h0) − h))
//   node j:   CH_j = (s_0..j ⊙ mh) · W_j,   s_{j+1} = BN(mixture(s_0..j, CH_j, P_j))
//   h_t = mean(s_1..s_S)
// BN is the shared BatchNorm (affine=False): batch statistics in training (running statistics
// updated in the same order and with the same formula as torch's BatchNorm, when asked),
// running statistics in evaluation. One at::mm per projection (the x-side of every time step
// in a single one); everything else (masks, s0, the mixture, BN, the mean, and in backward
// the BN and mixture gradients and the mask products) runs in these loops, without a
// dispatched op. Reductions run in a fixed order, so results do not depend on the thread
// count.

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "bindings.h"
#include "recurrent_mixed_kernels.h"

namespace {

using fastdarts::mixed::kOps;
constexpr int64_t kGrain = 2048;

// A tensor over raw memory (no dispatched op), for at::mm's operands.
at::Tensor wrap(const void* data, at::IntArrayRef sizes, at::IntArrayRef strides,
                const at::TensorOptions& options) {
  return at::from_blob(const_cast<void*>(data), sizes, strides, options);
}

at::Tensor matrix(const void* data, int64_t rows, int64_t cols, const at::TensorOptions& options) {
  return wrap(data, {rows, cols}, {cols, 1}, options);
}

// The transpose of a row-major (rows, cols) matrix.
at::Tensor matrix_t(const void* data, int64_t rows, int64_t cols, const at::TensorOptions& options) {
  return wrap(data, {cols, rows}, {1, cols}, options);
}

// out = a · b through the dispatcher (one counted op), into memory wrapped above.
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

template <typename scalar_t>
scalar_t sigmoid(scalar_t x) {
  return scalar_t(1) / (scalar_t(1) + std::exp(-x));
}

// out[i] = a[i] * mask[i % len(mask)] over n elements (mask == nullptr: a copy).
template <typename scalar_t>
void masked(const scalar_t* a, const scalar_t* mask, int64_t mask_len, scalar_t* out,
            int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = mask ? a[i] * mask[i % mask_len] : a[i];
  });
}

// acc[i] += a[i] (* mask[i % len(mask)]) over n elements.
template <typename scalar_t>
void accumulate(scalar_t* acc, const scalar_t* a, const scalar_t* mask, int64_t mask_len,
                int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) acc[i] += mask ? a[i] * mask[i % mask_len] : a[i];
  });
}

struct BatchNorm {
  int64_t* num_batches_tracked;
  bool training, update;
  double momentum;  // < 0: cumulative average (torch's momentum=None)
  double eps;
};

// y (B, D) = BN(x); writes invstd (D). Training: batch statistics (and the running update);
// evaluation: running statistics.
template <typename scalar_t>
void batch_norm(const scalar_t* x, scalar_t* y, scalar_t* invstd, int64_t B, int64_t D,
                BatchNorm& bn, scalar_t* rm, scalar_t* rv) {
  double factor = bn.momentum;
  if (bn.training && bn.update) {
    *bn.num_batches_tracked += 1;
    if (factor < 0) factor = 1.0 / static_cast<double>(*bn.num_batches_tracked);
  }
  at::parallel_for(0, D, 16, [&](int64_t d0, int64_t d1) {
    for (int64_t d = d0; d < d1; ++d) {
      double mean, istd;
      if (bn.training) {
        double sum = 0;
        for (int64_t b = 0; b < B; ++b) sum += x[b * D + d];
        mean = sum / B;
        double var_sum = 0;
        for (int64_t b = 0; b < B; ++b) {
          const double c = x[b * D + d] - mean;
          var_sum += c * c;
        }
        istd = 1.0 / std::sqrt(var_sum / B + bn.eps);
        if (bn.update) {
          rm[d] = static_cast<scalar_t>(factor * mean + (1 - factor) * rm[d]);
          rv[d] = static_cast<scalar_t>(factor * var_sum / (B - 1) + (1 - factor) * rv[d]);
        }
      } else {
        mean = rm[d];
        istd = 1.0 / std::sqrt(static_cast<double>(rv[d]) + bn.eps);
      }
      invstd[d] = static_cast<scalar_t>(istd);
      const scalar_t m = static_cast<scalar_t>(mean), s = static_cast<scalar_t>(istd);
      for (int64_t b = 0; b < B; ++b) y[b * D + d] = (x[b * D + d] - m) * s;
    }
  });
}

// gx (B, D) from gy and the normalised output y = x̂ (training) or the running invstd.
template <typename scalar_t>
void batch_norm_backward(const scalar_t* gy, const scalar_t* y, const scalar_t* invstd,
                         scalar_t* gx, int64_t B, int64_t D, bool training) {
  at::parallel_for(0, D, 16, [&](int64_t d0, int64_t d1) {
    for (int64_t d = d0; d < d1; ++d) {
      const scalar_t s = invstd[d];
      if (!training) {
        for (int64_t b = 0; b < B; ++b) gx[b * D + d] = gy[b * D + d] * s;
        continue;
      }
      double sum_g = 0, sum_gy = 0;
      for (int64_t b = 0; b < B; ++b) {
        sum_g += gy[b * D + d];
        sum_gy += static_cast<double>(gy[b * D + d]) * y[b * D + d];
      }
      const scalar_t mg = static_cast<scalar_t>(sum_g / B);
      const scalar_t mgy = static_cast<scalar_t>(sum_gy / B);
      for (int64_t b = 0; b < B; ++b) {
        gx[b * D + d] = (gy[b * D + d] - mg - y[b * D + d] * mgy) * s;
      }
    }
  });
}

struct Shapes {
  int64_t T, B, I, D, S, E;
};

Shapes check_cell(const at::Tensor& inputs, const at::Tensor& hidden, const at::Tensor& probs,
                  const c10::optional<at::Tensor>& x_mask, const c10::optional<at::Tensor>& h_mask,
                  const at::Tensor& W0, const std::vector<at::Tensor>& Ws) {
  TORCH_CHECK(inputs.device().is_cpu(), "recurrent_cell: the C++ kernel runs on the CPU, got ",
              inputs.device());
  TORCH_CHECK(inputs.scalar_type() == at::kFloat || inputs.scalar_type() == at::kDouble,
              "recurrent_cell: dtype must be float32 or float64, got ", inputs.scalar_type());
  TORCH_CHECK(inputs.dim() == 3, "recurrent_cell: inputs must be (T, B, I), got ",
              inputs.sizes());
  const int64_t T = inputs.size(0), B = inputs.size(1), I = inputs.size(2);
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == B, "recurrent_cell: hidden must be (",
              B, ", D), got ", hidden.sizes());
  const int64_t D = hidden.size(1), S = static_cast<int64_t>(Ws.size());
  const int64_t E = S * (S + 1) / 2;
  TORCH_CHECK(S >= 1, "recurrent_cell: needs at least one node weight");
  auto same = [&](const at::Tensor& t, at::IntArrayRef sizes, const char* name) {
    TORCH_CHECK(t.sizes() == sizes && t.scalar_type() == inputs.scalar_type() &&
                    t.device() == inputs.device() && t.is_contiguous(),
                "recurrent_cell: ", name, " must be a contiguous ", inputs.scalar_type(),
                " tensor of shape ", sizes, " on ", inputs.device(), ", got ", t.sizes(), " ",
                t.scalar_type(), " on ", t.device());
  };
  same(inputs, {T, B, I}, "inputs");
  same(hidden, {B, D}, "hidden");
  same(probs, {E, kOps}, "probs");
  same(W0, {I + D, 2 * D}, "W0");
  for (const auto& w : Ws) same(w, {D, 2 * D}, "each W_j");
  if (x_mask) same(*x_mask, {B, I}, "x_mask");
  if (h_mask) same(*h_mask, {B, D}, "h_mask");
  return {T, B, I, D, S, E};
}

template <typename scalar_t>
scalar_t* ptr(const at::Tensor& t) {
  return t.data_ptr<scalar_t>();
}

template <typename scalar_t>
const scalar_t* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t ? t->data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
void forward_impl(const Shapes& z, const at::Tensor& inputs, const at::Tensor& hidden,
                  const at::Tensor& probs, const c10::optional<at::Tensor>& x_mask,
                  const c10::optional<at::Tensor>& h_mask, const at::Tensor& W0,
                  const std::vector<at::Tensor>& Ws, BatchNorm bn, scalar_t* rm, scalar_t* rv,
                  const at::Tensor& hiddens, const at::Tensor& states, const at::Tensor& ch,
                  const at::Tensor& c0h0, const at::Tensor& invstd) {
  const int64_t T = z.T, B = z.B, I = z.I, D = z.D, S = z.S, E = z.E;
  const auto opt = inputs.options();
  const scalar_t* xmask = opt_ptr<scalar_t>(x_mask);
  const scalar_t* hmask = opt_ptr<scalar_t>(h_mask);
  const scalar_t* P = ptr<scalar_t>(probs);
  scalar_t* w0 = ptr<scalar_t>(W0);
  scalar_t* H = ptr<scalar_t>(hiddens);
  scalar_t* St = ptr<scalar_t>(states);
  scalar_t* CH = ptr<scalar_t>(ch);
  scalar_t* C0 = ptr<scalar_t>(c0h0);
  scalar_t* IS = ptr<scalar_t>(invstd);

  // The x-side of every step's projection at once: c0h0 = (x ⊙ mx) · W0[:I].
  std::vector<scalar_t> xm(T * B * I);
  masked(ptr<scalar_t>(inputs), xmask, B * I, xm.data(), T * B * I);
  mm_into(matrix(C0, T * B, 2 * D, opt), matrix(xm.data(), T * B, I, opt),
             matrix(w0, I, 2 * D, opt));
  const at::Tensor w0h = matrix(w0 + I * 2 * D, D, 2 * D, opt);

  std::vector<scalar_t> m((S + 1) * B * D), x(B * D);
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* hp = t == 0 ? ptr<scalar_t>(hidden) : H + (t - 1) * B * D;
    scalar_t* st = St + t * (S + 1) * B * D;
    scalar_t* cht = CH + t * E * B * 2 * D;
    scalar_t* c0 = C0 + t * B * 2 * D;
    scalar_t* is = IS + t * (S + 1) * D;
    masked(hp, hmask, B * D, m.data(), B * D);
    matrix(c0, B, 2 * D, opt).addmm_(matrix(m.data(), B, D, opt), w0h);
    at::parallel_for(0, B * D, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / D, d = i - b * D;
        const scalar_t sg = sigmoid(c0[b * 2 * D + d]);
        x[i] = hp[i] + sg * (std::tanh(c0[b * 2 * D + D + d]) - hp[i]);
      }
    });
    batch_norm(x.data(), st, is, B, D, bn, rm, rv);
    masked(st, hmask, B * D, m.data(), B * D);
    int64_t off = 0;
    for (int64_t j = 0; j < S; ++j) {
      const int64_t n = j + 1;
      mm_into(matrix(cht + off * B * 2 * D, n * B, 2 * D, opt),
                 matrix(m.data(), n * B, D, opt), Ws[j]);
      fastdarts::mixed::forward_kernel<scalar_t>(st, cht + off * B * 2 * D, P + off * kOps,
                                                 x.data(), n, B, D);
      scalar_t* s_new = st + n * B * D;
      batch_norm(x.data(), s_new, is + n * D, B, D, bn, rm, rv);
      masked(s_new, hmask, B * D, m.data() + n * B * D, B * D);
      off += n;
    }
    scalar_t* h = H + t * B * D;
    at::parallel_for(0, B * D, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t sum = 0;
        for (int64_t j = 1; j <= S; ++j) sum += st[j * B * D + i];
        h[i] = sum / static_cast<scalar_t>(S);
      }
    });
  }
}

template <typename scalar_t>
void backward_impl(const Shapes& z, const at::Tensor& grad, const at::Tensor& inputs,
                   const at::Tensor& hidden, const at::Tensor& probs,
                   const c10::optional<at::Tensor>& x_mask,
                   const c10::optional<at::Tensor>& h_mask, const at::Tensor& W0,
                   const std::vector<at::Tensor>& Ws, const at::Tensor& hiddens,
                   const at::Tensor& states, const at::Tensor& ch, const at::Tensor& c0h0,
                   const at::Tensor& invstd, bool training, const at::Tensor& d_inputs,
                   const at::Tensor& d_hidden, const at::Tensor& d_probs, const at::Tensor& d_W0,
                   const std::vector<at::Tensor>& d_Ws) {
  const int64_t T = z.T, B = z.B, I = z.I, D = z.D, S = z.S, E = z.E;
  const auto opt = inputs.options();
  const int64_t BD = B * D;
  const scalar_t* xmask = opt_ptr<scalar_t>(x_mask);
  const scalar_t* hmask = opt_ptr<scalar_t>(h_mask);
  const scalar_t* G = ptr<scalar_t>(grad);
  const scalar_t* P = ptr<scalar_t>(probs);
  scalar_t* w0 = ptr<scalar_t>(W0);
  const scalar_t* H = ptr<scalar_t>(hiddens);
  const scalar_t* St = ptr<scalar_t>(states);
  scalar_t* CH = ptr<scalar_t>(ch);
  const scalar_t* C0 = ptr<scalar_t>(c0h0);
  const scalar_t* IS = ptr<scalar_t>(invstd);
  scalar_t* dP = ptr<scalar_t>(d_probs);
  scalar_t* dw0 = ptr<scalar_t>(d_W0);
  std::fill(dP, dP + E * kOps, scalar_t(0));
  std::fill(dw0, dw0 + (I + D) * 2 * D, scalar_t(0));
  for (const auto& g : d_Ws) std::fill(ptr<scalar_t>(g), ptr<scalar_t>(g) + D * 2 * D, scalar_t(0));
  const at::Tensor w0h_t = matrix_t(w0 + I * 2 * D, D, 2 * D, opt);
  const at::Tensor dw0h = matrix(dw0 + I * 2 * D, D, 2 * D, opt);

  std::vector<scalar_t> carry(BD, 0), gs((S + 1) * BD), m((S + 1) * BD), gx(BD);
  std::vector<scalar_t> dS(S * BD), dCH(S * B * 2 * D), dPn(S * kOps), dm(S * BD);
  std::vector<scalar_t> gxp(T * B * 2 * D);
  for (int64_t t = T - 1; t >= 0; --t) {
    const scalar_t* hp = t == 0 ? ptr<scalar_t>(hidden) : H + (t - 1) * BD;
    const scalar_t* st = St + t * (S + 1) * BD;
    scalar_t* cht = CH + t * E * B * 2 * D;
    const scalar_t* c0 = C0 + t * B * 2 * D;
    const scalar_t* is = IS + t * (S + 1) * D;
    const scalar_t* g = G + t * BD;
    const scalar_t inv_s = scalar_t(1) / static_cast<scalar_t>(S);
    at::parallel_for(0, BD, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t gh = (g[i] + carry[i]) * inv_s;
        gs[i] = 0;
        for (int64_t j = 1; j <= S; ++j) gs[j * BD + i] = gh;
      }
    });
    masked(st, hmask, BD, m.data(), (S + 1) * BD);
    int64_t off = E;
    for (int64_t j = S - 1; j >= 0; --j) {
      const int64_t n = j + 1;
      off -= n;
      scalar_t* chj = cht + off * B * 2 * D;
      batch_norm_backward(gs.data() + n * BD, st + n * BD, is + n * D, gx.data(), B, D,
                          training);
      fastdarts::mixed::backward_kernel<scalar_t>(gx.data(), st, chj, P + off * kOps,
                                                  dS.data(), dCH.data(), dPn.data(), n, B, D);
      for (int64_t q = 0; q < n * kOps; ++q) dP[off * kOps + q] += dPn[q];
      d_Ws[j].addmm_(matrix_t(m.data(), n * B, D, opt), matrix(dCH.data(), n * B, 2 * D, opt));
      mm_into(matrix(dm.data(), n * B, D, opt), matrix(dCH.data(), n * B, 2 * D, opt),
                 matrix_t(ptr<scalar_t>(Ws[j]), D, 2 * D, opt));
      at::parallel_for(0, n * BD, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          gs[i] += dS[i] + (hmask ? dm[i] * hmask[i % BD] : dm[i]);
        }
      });
    }
    // s0 = BN(u), u = h + σ(c0) (tanh(h0) − h).
    batch_norm_backward(gs.data(), st, is, gx.data(), B, D, training);
    scalar_t* gxt = gxp.data() + t * B * 2 * D;
    at::parallel_for(0, BD, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / D, d = i - b * D;
        const scalar_t sg = sigmoid(c0[b * 2 * D + d]);
        const scalar_t th = std::tanh(c0[b * 2 * D + D + d]);
        const scalar_t gu = gx[i];
        carry[i] = gu * (1 - sg);
        gxt[b * 2 * D + d] = gu * (th - hp[i]) * sg * (1 - sg);
        gxt[b * 2 * D + D + d] = gu * sg * (1 - th * th);
      }
    });
    masked(hp, hmask, BD, m.data(), BD);
    dw0h.addmm_(matrix_t(m.data(), B, D, opt), matrix(gxt, B, 2 * D, opt));
    mm_into(matrix(dm.data(), B, D, opt), matrix(gxt, B, 2 * D, opt), w0h_t);
    accumulate(carry.data(), dm.data(), hmask, BD, BD);
  }
  std::copy(carry.begin(), carry.end(), ptr<scalar_t>(d_hidden));
  std::vector<scalar_t> xm(T * B * I);
  masked(ptr<scalar_t>(inputs), xmask, B * I, xm.data(), T * B * I);
  mm_into(matrix(dw0, I, 2 * D, opt), matrix_t(xm.data(), T * B, I, opt),
             matrix(gxp.data(), T * B, 2 * D, opt));
  scalar_t* dx = ptr<scalar_t>(d_inputs);
  mm_into(matrix(dx, T * B, I, opt), matrix(gxp.data(), T * B, 2 * D, opt),
             matrix_t(w0, I, 2 * D, opt));
  if (xmask) {
    at::parallel_for(0, T * B * I, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) dx[i] *= xmask[i % (B * I)];
    });
  }
}

void check_out(const at::Tensor& t, const at::Tensor& like, at::IntArrayRef sizes,
               const char* name) {
  TORCH_CHECK(t.sizes() == sizes && t.scalar_type() == like.scalar_type() &&
                  t.device() == like.device() && t.is_contiguous(),
              "recurrent_cell: output ", name, " must be a contiguous ", like.scalar_type(),
              " tensor of shape ", sizes, ", got ", t.sizes(), " ", t.scalar_type());
}

// Writes hiddens (T, B, D) and what backward needs: states (T, S+1, B, D) after BN,
// ch (T, E, B, 2D) the node projections, c0h0 (T, B, 2D), invstd (T, S+1, D). Updates the
// running statistics in place when training and update are set.
void cell_forward(const at::Tensor& inputs, const at::Tensor& hidden, const at::Tensor& probs,
                  const c10::optional<at::Tensor>& x_mask,
                  const c10::optional<at::Tensor>& h_mask, const at::Tensor& W0,
                  const std::vector<at::Tensor>& Ws, const at::Tensor& running_mean,
                  const at::Tensor& running_var, const at::Tensor& num_batches_tracked,
                  bool training, bool update, double momentum, double eps,
                  const at::Tensor& hiddens, const at::Tensor& states, const at::Tensor& ch,
                  const at::Tensor& c0h0, const at::Tensor& invstd) {
  const Shapes z = check_cell(inputs, hidden, probs, x_mask, h_mask, W0, Ws);
  TORCH_CHECK(!training || z.B > 1,
              "recurrent_cell: BatchNorm in training needs a batch of more than one, got ", z.B);
  check_out(hiddens, inputs, {z.T, z.B, z.D}, "hiddens");
  check_out(states, inputs, {z.T, z.S + 1, z.B, z.D}, "states");
  check_out(ch, inputs, {z.T, z.E, z.B, 2 * z.D}, "ch");
  check_out(c0h0, inputs, {z.T, z.B, 2 * z.D}, "c0h0");
  check_out(invstd, inputs, {z.T, z.S + 1, z.D}, "invstd");
  check_out(running_mean, inputs, {z.D}, "running_mean");
  check_out(running_var, inputs, {z.D}, "running_var");
  TORCH_CHECK(num_batches_tracked.scalar_type() == at::kLong && num_batches_tracked.numel() == 1,
              "recurrent_cell: num_batches_tracked must be one int64");
  BatchNorm bn{num_batches_tracked.data_ptr<int64_t>(), training, update,
               momentum, eps};
  AT_DISPATCH_FLOATING_TYPES(inputs.scalar_type(), "recurrent_cell_forward", [&] {
    forward_impl<scalar_t>(z, inputs, hidden, probs, x_mask, h_mask, W0, Ws, bn,
                           running_mean.data_ptr<scalar_t>(), running_var.data_ptr<scalar_t>(),
                           hiddens, states, ch, c0h0, invstd);
  });
}

// Writes every gradient: d_inputs (T, B, I), d_hidden (B, D), d_probs (E, 5), d_W0, d_Ws.
void cell_backward(const at::Tensor& grad, const at::Tensor& inputs, const at::Tensor& hidden,
                   const at::Tensor& probs, const c10::optional<at::Tensor>& x_mask,
                   const c10::optional<at::Tensor>& h_mask, const at::Tensor& W0,
                   const std::vector<at::Tensor>& Ws, const at::Tensor& hiddens,
                   const at::Tensor& states, const at::Tensor& ch, const at::Tensor& c0h0,
                   const at::Tensor& invstd, bool training, const at::Tensor& d_inputs,
                   const at::Tensor& d_hidden, const at::Tensor& d_probs, const at::Tensor& d_W0,
                   const std::vector<at::Tensor>& d_Ws) {
  const Shapes z = check_cell(inputs, hidden, probs, x_mask, h_mask, W0, Ws);
  check_out(grad, inputs, {z.T, z.B, z.D}, "grad");
  check_out(hiddens, inputs, {z.T, z.B, z.D}, "hiddens");
  check_out(states, inputs, {z.T, z.S + 1, z.B, z.D}, "states");
  check_out(ch, inputs, {z.T, z.E, z.B, 2 * z.D}, "ch");
  check_out(c0h0, inputs, {z.T, z.B, 2 * z.D}, "c0h0");
  check_out(invstd, inputs, {z.T, z.S + 1, z.D}, "invstd");
  check_out(d_inputs, inputs, inputs.sizes(), "d_inputs");
  check_out(d_hidden, inputs, hidden.sizes(), "d_hidden");
  check_out(d_probs, inputs, probs.sizes(), "d_probs");
  check_out(d_W0, inputs, W0.sizes(), "d_W0");
  TORCH_CHECK(d_Ws.size() == Ws.size(), "recurrent_cell: one d_W per W_j");
  for (const auto& g : d_Ws) check_out(g, inputs, {z.D, 2 * z.D}, "d_W_j");
  AT_DISPATCH_FLOATING_TYPES(inputs.scalar_type(), "recurrent_cell_backward", [&] {
    backward_impl<scalar_t>(z, grad, inputs, hidden, probs, x_mask, h_mask, W0, Ws, hiddens,
                            states, ch, c0h0, invstd, training, d_inputs, d_hidden, d_probs,
                            d_W0, d_Ws);
  });
}

}  // namespace

namespace fastdarts {

void bind_recurrent_cell(pybind11::module& m) {
  m.def("recurrent_cell_forward", &cell_forward,
        "the recurrent search cell over a sequence: writes hiddens and the saved tensors");
  m.def("recurrent_cell_backward", &cell_backward,
        "every gradient of recurrent_cell_forward from grad (T, B, D)");
}

}  // namespace fastdarts
