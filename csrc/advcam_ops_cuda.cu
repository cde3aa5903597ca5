// advcam fused ops: CUDA kernels (see advcam_ops.cpp for the maths and the bindings).
//
// Minimal headers on purpose (no ATen/cuda/CUDAContext.h, which needs cuSPARSE headers): raw pointers in,
// the current stream and device guard from c10/cuda. Each of the n segments ("classes") of m elements is
// covered by a 2-D grid (blocks_x, n); per-segment reductions go through per-block partials in a
// workspace the caller allocates (num_blocks(m) entries per segment and statistic), reduced again by every
// block that needs the result (at most kMaxBlocks values), so no atomics and deterministic results.
#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace advcam_cuda {

constexpr int kThreads = 256;
// Up to 1024 blocks per segment: with 2 segments of a 750x1000 image pair that is about two waves of 8 blocks
// per multiprocessor on an H100/H200 (128 blocks left 3/4 of the threads idle and the loads latency-bound).
constexpr int64_t kMaxBlocks = 1024;
constexpr int64_t kPerThread = 8;

int64_t num_blocks(int64_t m) {
  int64_t b = (m + kThreads * kPerThread - 1) / (kThreads * kPerThread);
  return b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b);
}

namespace {

template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) { return (b > a || b != b) ? b : a; }
template <typename T>
__device__ __forceinline__ T nan_min(T a, T b) { return (b < a || b != b) ? b : a; }
template <typename T>
__device__ __forceinline__ T inf_val() { return static_cast<T>(INFINITY); }

enum Op { kMax = 0, kMin = 1, kSum = 2 };

template <typename T, int OP>
__device__ __forceinline__ T combine(T a, T b) {
  if (OP == kMax) return nan_max(a, b);
  if (OP == kMin) return nan_min(a, b);
  return a + b;
}

// Block-wide reduction through shared memory; every thread gets the result.
template <typename T, int OP>
__device__ T block_reduce(T v, T* smem) {
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) smem[threadIdx.x] = combine<T, OP>(smem[threadIdx.x], smem[threadIdx.x + s]);
    __syncthreads();
  }
  T r = smem[0];
  __syncthreads();
  return r;
}

// Reduce the nb partials of segment i (at part + i * nb) inside one block.
template <typename T, int OP>
__device__ T reduce_partials(const T* part, int64_t nb, T ident, T* smem) {
  T v = ident;
  for (int64_t k = threadIdx.x; k < nb; k += blockDim.x) v = combine<T, OP>(v, part[k]);
  return block_reduce<T, OP>(v, smem);
}

template <typename T>
__global__ void max_partial_kernel(const T* a, T* part, int64_t m) {
  __shared__ T smem[kThreads];
  const int64_t i = blockIdx.y, nb = gridDim.x;
  const T* ai = a + i * m;
  T v = -inf_val<T>();
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < m; j += nb * blockDim.x) v = nan_max(v, ai[j]);
  v = block_reduce<T, kMax>(v, smem);
  if (threadIdx.x == 0) part[i * nb + blockIdx.x] = v;
}

template <typename T>
__global__ void masked_l1_partial_kernel(const T* a, const T* a0, T* acc, const T* max_part, T* sum_part,
                                         T* amax, int64_t m, T tau) {
  __shared__ T smem[kThreads];
  const int64_t i = blockIdx.y, nb = gridDim.x;
  const T mx = reduce_partials<T, kMax>(max_part + i * nb, nb, -inf_val<T>(), smem);
  if (blockIdx.x == 0 && threadIdx.x == 0) amax[i] = mx;
  const T* ai = a + i * m;
  const T* bi = a0 + i * m;
  T* ci = acc ? acc + i * m : nullptr;
  T s = T(0);
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < m; j += nb * blockDim.x) {
    const T v = ai[j];
    s += fabs(v - bi[j]) * static_cast<T>(v / mx > tau);
    if (ci) ci[j] += v;
  }
  s = block_reduce<T, kSum>(s, smem);
  if (threadIdx.x == 0) sum_part[i * nb + blockIdx.x] = s;
}

template <typename T>
__global__ void sum_final_kernel(const T* part, T* out, int64_t nb) {
  __shared__ T smem[kThreads];
  const int64_t i = blockIdx.x;
  const T s = reduce_partials<T, kSum>(part + i * nb, nb, T(0), smem);
  if (threadIdx.x == 0) out[i] = s;
}

template <typename T>
__global__ void masked_l1_backward_kernel(const T* grad, const T* a, const T* a0, const T* amax, T* out, int64_t m,
                                          T tau) {
  const int64_t i = blockIdx.y, nb = gridDim.x;
  const T mx = amax[i], gi = grad[i];
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < m; j += nb * blockDim.x) {
    const int64_t k = i * m + j;
    const T d = a[k] - a0[k];
    const T sg = static_cast<T>((d > T(0)) - (d < T(0)));
    out[k] = (a[k] / mx > tau) ? gi * sg : T(0);
  }
}

template <typename T>
__global__ void step_partial_kernel(const T* __restrict__ x, const T* __restrict__ g, T* __restrict__ part,
                                    int64_t n, int64_t m) {
  __shared__ T smem[kThreads];
  const int64_t i = blockIdx.y, nb = gridDim.x;
  const T* __restrict__ xi = x + i * m;
  const T* __restrict__ gi = g + i * m;
  T gm = T(0), lo = inf_val<T>(), hi = -inf_val<T>();
#pragma unroll 4
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < m; j += nb * blockDim.x) {
    gm = nan_max(gm, static_cast<T>(fabs(gi[j])));
    lo = nan_min(lo, xi[j]);
    hi = nan_max(hi, xi[j]);
  }
  gm = block_reduce<T, kMax>(gm, smem);
  lo = block_reduce<T, kMin>(lo, smem);
  hi = block_reduce<T, kMax>(hi, smem);
  if (threadIdx.x == 0) {
    part[(0 * n + i) * nb + blockIdx.x] = gm;
    part[(1 * n + i) * nb + blockIdx.x] = lo;
    part[(2 * n + i) * nb + blockIdx.x] = hi;
  }
}

// Every block re-reduces the (few) partials of its segment before updating its share of the elements;
// the partials were written by the previous launch, so the in-place update cannot race with them.
template <typename T>
__global__ void step_update_kernel(T* __restrict__ x, const T* __restrict__ g, const T* __restrict__ part,
                                   T* __restrict__ gmax, int64_t n, int64_t m, T step) {
  __shared__ T smem[kThreads];
  const int64_t i = blockIdx.y, nb = gridDim.x;
  const T gm = reduce_partials<T, kMax>(part + (0 * n + i) * nb, nb, T(0), smem);
  const T lo = reduce_partials<T, kMin>(part + (1 * n + i) * nb, nb, inf_val<T>(), smem);
  const T hi = reduce_partials<T, kMax>(part + (2 * n + i) * nb, nb, -inf_val<T>(), smem);
  if (blockIdx.x == 0 && threadIdx.x == 0) gmax[i] = gm;
  const T d = gm + static_cast<T>(1e-12);
  T* __restrict__ xi = x + i * m;
  const T* __restrict__ gi = g + i * m;
#pragma unroll 4
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < m; j += nb * blockDim.x) {
    T v = xi[j] + step * (gi[j] / d);
    v = v < lo ? lo : (v > hi ? hi : v);
    xi[j] = v;
  }
}

}  // namespace

template <typename T>
void masked_l1_forward(const T* a, const T* a0, T* acc, T* loss, T* amax, T* work, int64_t n, int64_t m,
                       double tau, int device) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t nb = num_blocks(m);
  const dim3 grid(static_cast<unsigned>(nb), static_cast<unsigned>(n));
  // work holds 2 * n * nb partials: the maxima, then the masked sums
  max_partial_kernel<T><<<grid, kThreads, 0, stream>>>(a, work, m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  masked_l1_partial_kernel<T><<<grid, kThreads, 0, stream>>>(a, a0, acc, work, work + n * nb, amax, m,
                                                            static_cast<T>(tau));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_final_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(work + n * nb, loss, nb);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void masked_l1_backward(const T* grad, const T* a, const T* a0, const T* amax, T* out, int64_t n, int64_t m,
                        double tau, int device) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(num_blocks(m)), static_cast<unsigned>(n));
  masked_l1_backward_kernel<T><<<grid, kThreads, 0, stream>>>(grad, a, a0, amax, out, m, static_cast<T>(tau));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void ascent_step(T* x, const T* g, T* gmax, T* work, int64_t n, int64_t m, double xi, int device) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(num_blocks(m)), static_cast<unsigned>(n));
  step_partial_kernel<T><<<grid, kThreads, 0, stream>>>(x, g, work, n, m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  step_update_kernel<T><<<grid, kThreads, 0, stream>>>(x, g, work, gmax, n, m, static_cast<T>(xi));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define ADVCAM_INSTANTIATE(T)                                                                                   \
  template void masked_l1_forward<T>(const T*, const T*, T*, T*, T*, T*, int64_t, int64_t, double, int);      \
  template void masked_l1_backward<T>(const T*, const T*, const T*, const T*, T*, int64_t, int64_t, double, \
                                      int);                                                                    \
  template void ascent_step<T>(T*, const T*, T*, T*, int64_t, int64_t, double, int);
ADVCAM_INSTANTIATE(float)
ADVCAM_INSTANTIATE(double)

}  // namespace advcam_cuda
