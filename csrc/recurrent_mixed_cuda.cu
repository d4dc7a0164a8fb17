// Fused recurrent MixedOp, CUDA kernels on raw pointers (no torch headers, so the file also
// compiles on its own with `nvcc -c`). The tensor checks and allocation are in
// recurrent_mixed.cpp; see there for the maths.

#include <cuda_runtime.h>

#include <cstdint>

namespace fastdarts {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;

template <typename T>
__device__ T sigmoid(T x) {
  // exp of a non-positive argument only: no overflow in either tail.
  const T e = exp(-fabs(x));
  return x >= 0 ? T(1) / (T(1) + e) : e / (T(1) + e);
}

template <typename T>
__global__ void forward_kernel(const T* S, const T* CH, const T* P, T* out, int64_t n, int64_t B,
                               int64_t D) {
  const int64_t total = B * D;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < total;
       j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = j / D, d = j - b * D;
    T acc = 0;
    for (int64_t i = 0; i < n; ++i) {
      const T* p = P + i * 5;
      const T s = S[i * total + j];
      const T c = CH[(i * B + b) * 2 * D + d], h = CH[(i * B + b) * 2 * D + D + d];
      const T sg = sigmoid(c);
      const T f = p[1] * tanh(h) + p[2] * (h > 0 ? h : T(0)) + p[3] * sigmoid(h) + p[4] * h;
      acc += (T(1) - sg) * (p[1] + p[2] + p[3] + p[4]) * s + sg * f;
    }
    out[j] = acc;
  }
}

// blockIdx.y is the predecessor i; each block writes its 4 partial dP sums for that i to
// partials[(blockIdx.x * n + i) * 4 + k - 1] (reduced by the caller in a fixed order).
template <typename T>
__global__ void backward_kernel(const T* G, const T* S, const T* CH, const T* P, T* dS, T* dCH,
                                T* partials, int64_t n, int64_t B, int64_t D) {
  __shared__ T buf[4][kThreads];
  const int64_t total = B * D, i = blockIdx.y;
  const T* p = P + i * 5;
  const T t = p[1] + p[2] + p[3] + p[4];
  T acc[4] = {0, 0, 0, 0};
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < total;
       j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = j / D, d = j - b * D;
    const int64_t so = i * total + j, co = (i * B + b) * 2 * D + d;
    const T g = G[j], s = S[so], c = CH[co], h = CH[co + D];
    const T sg = sigmoid(c), sh = sigmoid(h), th = tanh(h), rl = h > 0 ? h : T(0);
    const T f = p[1] * th + p[2] * rl + p[3] * sh + p[4] * h;
    dS[so] = g * t * (T(1) - sg);
    dCH[co] = g * sg * (T(1) - sg) * (f - t * s);
    const T df = p[1] * (T(1) - th * th) + p[2] * (h > 0 ? T(1) : T(0)) +
                 p[3] * sh * (T(1) - sh) + p[4];
    dCH[co + D] = g * sg * df;
    const T gs = g * s, gsg = g * sg;
    acc[0] += gs + gsg * (th - s);
    acc[1] += gs + gsg * (rl - s);
    acc[2] += gs + gsg * (sh - s);
    acc[3] += gs + gsg * (h - s);
  }
  for (int k = 0; k < 4; ++k) buf[k][threadIdx.x] = acc[k];
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      for (int k = 0; k < 4; ++k) buf[k][threadIdx.x] += buf[k][threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x < 4) {
    partials[(blockIdx.x * n + i) * 4 + threadIdx.x] = buf[threadIdx.x][0];
  }
}

int64_t blocks_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return blocks < kMaxBlocks ? (blocks > 0 ? blocks : 1) : kMaxBlocks;
}

}  // namespace

int64_t recurrent_mixed_cuda_blocks(int64_t B, int64_t D) { return blocks_for(B * D); }

template <typename T>
cudaError_t recurrent_mixed_forward_cuda(const T* S, const T* CH, const T* P, T* out, int64_t n,
                                         int64_t B, int64_t D, cudaStream_t stream) {
  forward_kernel<T><<<blocks_for(B * D), kThreads, 0, stream>>>(S, CH, P, out, n, B, D);
  return cudaGetLastError();
}

template <typename T>
cudaError_t recurrent_mixed_backward_cuda(const T* G, const T* S, const T* CH, const T* P, T* dS,
                                          T* dCH, T* partials, int64_t n, int64_t B, int64_t D,
                                          cudaStream_t stream) {
  const dim3 grid(blocks_for(B * D), n);
  backward_kernel<T><<<grid, kThreads, 0, stream>>>(G, S, CH, P, dS, dCH, partials, n, B, D);
  return cudaGetLastError();
}

template cudaError_t recurrent_mixed_forward_cuda<float>(const float*, const float*, const float*,
                                                         float*, int64_t, int64_t, int64_t,
                                                         cudaStream_t);
template cudaError_t recurrent_mixed_forward_cuda<double>(const double*, const double*,
                                                          const double*, double*, int64_t,
                                                          int64_t, int64_t, cudaStream_t);
template cudaError_t recurrent_mixed_backward_cuda<float>(const float*, const float*,
                                                          const float*, const float*, float*,
                                                          float*, float*, int64_t, int64_t,
                                                          int64_t, cudaStream_t);
template cudaError_t recurrent_mixed_backward_cuda<double>(const double*, const double*,
                                                           const double*, const double*,
                                                           double*, double*, double*, int64_t,
                                                           int64_t, int64_t, cudaStream_t);

}  // namespace fastdarts
