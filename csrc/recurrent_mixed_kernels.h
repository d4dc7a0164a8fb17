// The fused recurrent MixedOp's CPU kernels (see recurrent_mixed.cpp), shared by the node op
// and the whole-cell op (recurrent_cell.cpp).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastdarts {
namespace mixed {

constexpr int64_t kOps = 5;  // none, tanh, relu, sigmoid, identity
constexpr int64_t kChunk = 4096;

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

}  // namespace mixed
}  // namespace fastdarts
