// advcam fused ops: bindings + CPU kernels (CUDA kernels in advcam_ops_cuda.cu, linked when WITH_CUDA).
//
// Tensors are viewed as n segments ("classes") of m contiguous elements each.
//
// masked_l1_forward(a, a0, acc, tau) -> (loss (n,), amax (n,))
//     amax_i = max_j a_ij;  M_ij = (a_ij / amax_i > tau);  loss_i = sum_j |a_ij - a0_ij| * M_ij
//     and, when acc is defined, acc_ij += a_ij (the AdvCAM accumulation), all in one pass per segment.
// masked_l1_backward(grad (n,), a, a0, amax, tau) -> grad_a = grad_i * sgn(a_ij - a0_ij) * M_ij
// ascent_step_(x, g, xi) -> gmax (n,), x updated in place:
//     gmax_i = max_j |g_ij|, lo_i = min_j x_ij, hi_i = max_j x_ij (before the update),
//     x_ij = clamp(x_ij + xi * (g_ij / (gmax_i + 1e-12)), lo_i, hi_i)
// NaN propagates as in the eager PyTorch composition (max/min keep NaN, a NaN ratio is not > tau,
// clamp keeps NaN), so callers can detect non-finite values from the returned vectors.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <tuple>

#ifdef WITH_CUDA
namespace advcam_cuda {
int64_t num_blocks(int64_t m);
template <typename T>
void masked_l1_forward(const T* a, const T* a0, T* acc, T* loss, T* amax, T* work, int64_t n, int64_t m,
                       double tau, int device);
template <typename T>
void masked_l1_backward(const T* grad, const T* a, const T* a0, const T* amax, T* out, int64_t n, int64_t m,
                        double tau, int device);
template <typename T>
void ascent_step(T* x, const T* g, T* gmax, T* work, int64_t n, int64_t m, double xi, int device);
}  // namespace advcam_cuda
#endif

namespace {

constexpr int64_t kGrain = 4096;

template <typename T>
inline T nan_max(T a, T b) { return (b > a || std::isnan(b)) ? b : a; }
template <typename T>
inline T nan_min(T a, T b) { return (b < a || std::isnan(b)) ? b : a; }
template <typename T>
inline T sgn(T v) { return static_cast<T>((v > T(0)) - (v < T(0))); }

template <typename T>
void masked_l1_forward_cpu(const T* a, const T* a0, T* acc, T* loss, T* amax, int64_t n, int64_t m, double tau) {
  const T t = static_cast<T>(tau);
  for (int64_t i = 0; i < n; ++i) {
    const T* ai = a + i * m;
    const T* bi = a0 + i * m;
    T* ci = acc ? acc + i * m : nullptr;
    const T mx = at::parallel_reduce(
        0, m, kGrain, -std::numeric_limits<T>::infinity(),
        [&](int64_t b, int64_t e, T r) {
          for (int64_t j = b; j < e; ++j) r = nan_max(r, ai[j]);
          return r;
        },
        [](T x, T y) { return nan_max(x, y); });
    const double s = at::parallel_reduce(
        0, m, kGrain, 0.0,
        [&](int64_t b, int64_t e, double r) {
          for (int64_t j = b; j < e; ++j) {
            // |a - a0| * M as in the eager composition (a NaN difference stays NaN even where M = 0)
            r += static_cast<double>(std::abs(ai[j] - bi[j]) * static_cast<T>(ai[j] / mx > t));
            if (ci) ci[j] += ai[j];
          }
          return r;
        },
        [](double x, double y) { return x + y; });
    amax[i] = mx;
    loss[i] = static_cast<T>(s);
  }
}

template <typename T>
void masked_l1_backward_cpu(const T* grad, const T* a, const T* a0, const T* amax, T* out, int64_t n, int64_t m,
                            double tau) {
  const T t = static_cast<T>(tau);
  at::parallel_for(0, n * m, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const int64_t i = k / m;
      out[k] = (a[k] / amax[i] > t) ? grad[i] * sgn(a[k] - a0[k]) : T(0);
    }
  });
}

template <typename T>
struct Stats {
  T gmax, lo, hi;
};

template <typename T>
void ascent_step_cpu(T* x, const T* g, T* gmax, int64_t n, int64_t m, double xi) {
  using Vec = at::vec::Vectorized<T>;
  const T step = static_cast<T>(xi);
  const T tiny = static_cast<T>(1e-12);
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    T* xi_ = x + i * m;
    const T* gi = g + i * m;
    // vectorised chunk reductions (Vectorized maximum/minimum propagate NaN), combined NaN-aware
    const Stats<T> st = at::parallel_reduce(
        0, m, kGrain, Stats<T>{T(0), inf, -inf},
        [&](int64_t b, int64_t e, Stats<T> r) {
          const T gm = at::vec::map_reduce_all<T>([](Vec v) { return v.abs(); },
                                                  [](Vec p, Vec q) { return at::vec::maximum(p, q); }, gi + b, e - b);
          const T lo = at::vec::reduce_all<T>([](Vec p, Vec q) { return at::vec::minimum(p, q); }, xi_ + b, e - b);
          const T hi = at::vec::reduce_all<T>([](Vec p, Vec q) { return at::vec::maximum(p, q); }, xi_ + b, e - b);
          return Stats<T>{nan_max(r.gmax, gm), nan_min(r.lo, lo), nan_max(r.hi, hi)};
        },
        [](Stats<T> p, Stats<T> q) {
          return Stats<T>{nan_max(p.gmax, q.gmax), nan_min(p.lo, q.lo), nan_max(p.hi, q.hi)};
        });
    const Vec d(st.gmax + tiny), sv(step), lov(st.lo), hiv(st.hi);
    at::parallel_for(0, m, kGrain, [&](int64_t b, int64_t e) {
      at::vec::map2<T>([&](Vec xv, Vec gv) { return at::vec::clamp(xv + sv * (gv / d), lov, hiv); },
                       xi_ + b, xi_ + b, gi + b, e - b);
    });
    gmax[i] = st.gmax;
  }
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.dim() >= 1 && a.numel() > 0, what, ": expected a non-empty tensor with a leading class dim");
  TORCH_CHECK(a.sizes() == b.sizes(), what, ": shape mismatch ", a.sizes(), " vs ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), what, ": dtype mismatch");
  TORCH_CHECK(a.device() == b.device(), what, ": device mismatch");
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, what, ": float32/float64 only");
}

std::tuple<at::Tensor, at::Tensor> masked_l1_forward(const at::Tensor& a_, const at::Tensor& a0_,
                                                     c10::optional<at::Tensor> acc, double tau) {
  check_pair(a_, a0_, "masked_l1_forward");
  const at::Tensor a = a_.contiguous(), a0 = a0_.contiguous();
  const int64_t n = a.size(0), m = a.numel() / n;
  const bool has_acc = acc.has_value() && acc->defined();
  if (has_acc) {
    check_pair(a, *acc, "masked_l1_forward(acc)");
    TORCH_CHECK(acc->is_contiguous(), "masked_l1_forward: acc must be contiguous");
  }
  at::Tensor loss = at::empty({n}, a.options());
  at::Tensor amax = at::empty({n}, a.options());
  if (a.is_cuda()) {
#ifdef WITH_CUDA
    at::Tensor work = at::empty({2 * n * advcam_cuda::num_blocks(m)}, a.options());
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "masked_l1_forward_cuda", [&] {
      advcam_cuda::masked_l1_forward<scalar_t>(a.data_ptr<scalar_t>(), a0.data_ptr<scalar_t>(),
                                               has_acc ? acc->data_ptr<scalar_t>() : nullptr,
                                               loss.data_ptr<scalar_t>(), amax.data_ptr<scalar_t>(),
                                               work.data_ptr<scalar_t>(), n, m, tau, a.get_device());
    });
    return {loss, amax};
#else
    TORCH_CHECK(false, "advcam ops were built without CUDA");
#endif
  }
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "masked_l1_forward_cpu", [&] {
    masked_l1_forward_cpu<scalar_t>(a.data_ptr<scalar_t>(), a0.data_ptr<scalar_t>(),
                                    has_acc ? acc->data_ptr<scalar_t>() : nullptr, loss.data_ptr<scalar_t>(),
                                    amax.data_ptr<scalar_t>(), n, m, tau);
  });
  return {loss, amax};
}

at::Tensor masked_l1_backward(const at::Tensor& grad_, const at::Tensor& a_, const at::Tensor& a0_,
                              const at::Tensor& amax_, double tau) {
  check_pair(a_, a0_, "masked_l1_backward");
  const at::Tensor a = a_.contiguous(), a0 = a0_.contiguous();
  const int64_t n = a.size(0), m = a.numel() / n;
  const at::Tensor grad = grad_.to(a.scalar_type()).contiguous(), amax = amax_.contiguous();
  TORCH_CHECK(grad.numel() == n && amax.numel() == n, "masked_l1_backward: expected (n,) grad and amax");
  at::Tensor out = at::empty_like(a);
  if (a.is_cuda()) {
#ifdef WITH_CUDA
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "masked_l1_backward_cuda", [&] {
      advcam_cuda::masked_l1_backward<scalar_t>(grad.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
                                                a0.data_ptr<scalar_t>(), amax.data_ptr<scalar_t>(),
                                                out.data_ptr<scalar_t>(), n, m, tau, a.get_device());
    });
    return out;
#else
    TORCH_CHECK(false, "advcam ops were built without CUDA");
#endif
  }
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "masked_l1_backward_cpu", [&] {
    masked_l1_backward_cpu<scalar_t>(grad.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), a0.data_ptr<scalar_t>(),
                                     amax.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, m, tau);
  });
  return out;
}

at::Tensor ascent_step_(at::Tensor x, const at::Tensor& g_, double xi) {
  check_pair(x, g_, "ascent_step_");
  TORCH_CHECK(x.is_contiguous(), "ascent_step_: x must be contiguous (it is updated in place)");
  const at::Tensor g = g_.contiguous();
  const int64_t n = x.size(0), m = x.numel() / n;
  at::Tensor gmax = at::empty({n}, x.options());
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    at::Tensor work = at::empty({3 * n * advcam_cuda::num_blocks(m)}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ascent_step_cuda", [&] {
      advcam_cuda::ascent_step<scalar_t>(x.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), gmax.data_ptr<scalar_t>(),
                                         work.data_ptr<scalar_t>(), n, m, xi, x.get_device());
    });
    return gmax;
#else
    TORCH_CHECK(false, "advcam ops were built without CUDA");
#endif
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ascent_step_cpu", [&] {
    ascent_step_cpu<scalar_t>(x.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), gmax.data_ptr<scalar_t>(), n, m, xi);
  });
  return gmax;
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("masked_l1_forward", &masked_l1_forward, "masked |a - a0| L1 per class (+ acc += a)",
          py::arg("a"), py::arg("a0"), py::arg("acc"), py::arg("tau"));
  mod.def("masked_l1_backward", &masked_l1_backward, "gradient of masked_l1_forward w.r.t. a",
          py::arg("grad"), py::arg("a"), py::arg("a0"), py::arg("amax"), py::arg("tau"));
  mod.def("ascent_step_", &ascent_step_, "in-place normalised ascent step with clamp; returns max|g| per class",
          py::arg("x"), py::arg("g"), py::arg("xi"));
  mod.def("has_cuda", &has_cuda, "whether the CUDA kernels were compiled in");
}
