// Compiled CPU kernels for two memory-bound steps of the cross-layer models, loaded by
// crosslayer/ops/cpu_kernels.py; each Python caller checks that a kernel implements its case and
// otherwise runs its PyTorch operators.
//
// 1. DenseNet: a bottleneck's first half, BN-ReLU-Conv1x1 over a prefix of the dense block's feature
// buffer (Huang et al., CVPR 2017, Sec. 3), forward and backward, one row tile at a time
// (called by crosslayer/ops/dense_block.py).
//
// The buffer is a (P, C_total) row-major matrix, one row per pixel; a consumer reads its first c
// columns. Per tile of rows the kernel forms z = relu(x * w + b) (the consumer's BatchNorm affine
// + ReLU; x is the batch-normalised feature in training, the raw one in eval with w, b folded from
// the running statistics) in a scratch that stays in cache, and multiplies it by the 1x1
// convolution's weight. Backward recomputes z per tile instead of saving it (nothing per
// consumer is kept, as in Pleiss et al.'s memory-efficient DenseNet) and adds the consumer's
// dL/dx into the shared gradient buffer in place. Each feature-map pixel is read once per
// consumer per pass, instead of the ~15 passes of the equivalent PyTorch operators.
//
// 2. DelugeNet: the cross-layer depthwise convolution's weighted sum over a stage's normalised
// outputs (Kuen et al., arXiv 1611.05552, Sec. 3) and its backward (called by
// crosslayer/ops/deluge.py), one pass over the inputs per chunk of pixels instead of one pass per
// input over the whole running sum.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

using torch::Tensor;

namespace {

// z[p, j] = max(x[p, j] * w[j] + b[j], 0) for n rows; the one expression forward and backward share,
// so the backward's recomputed z (and ReLU mask) is bit-identical to the forward's.
template <typename T>
inline void affine_relu_rows(const T* x, int64_t ldx, const T* w, const T* b, T* z, int64_t n, int64_t c) {
  for (int64_t p = 0; p < n; ++p) {
    const T* xp = x + p * ldx;
    T* zp = z + p * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const T v = xp[j] * w[j] + b[j];
      zp[j] = v > T(0) ? v : T(0);
    }
  }
}

void check(const Tensor& buf, int64_t c, const Tensor& w, const Tensor& b, const Tensor& wt) {
  TORCH_CHECK(buf.device().is_cpu() && buf.dim() == 2 && buf.stride(1) == 1, "buf: a CPU (P, C) matrix with unit column stride");
  TORCH_CHECK(c > 0 && c <= buf.size(1), "c out of range");
  for (const Tensor* t : {&w, &b, &wt}) {
    TORCH_CHECK(t->scalar_type() == buf.scalar_type() && t->is_contiguous(), "w, b, wt: contiguous, the buffer's dtype");
  }
  TORCH_CHECK(w.numel() == c && b.numel() == c && wt.dim() == 2 && wt.size(0) == c, "w, b: (c,), wt: (c, m)");
}

// Row tiles are processed one after the other; within a tile the affine + ReLU runs in parallel over
// rows and the matrix products use every thread.
template <typename T>
void affine_relu_tile(const T* x, int64_t ldx, const T* w, const T* b, T* z, int64_t n, int64_t c) {
  at::parallel_for(0, n, 64, [&](int64_t p0, int64_t p1) {
    affine_relu_rows<T>(x + p0 * ldx, ldx, w, b, z + p0 * c, p1 - p0, c);
  });
}

template <typename T>
Tensor forward_impl(const Tensor& buf, int64_t c, const Tensor& w, const Tensor& b, const Tensor& wt, int64_t rows) {
  const int64_t P = buf.size(0), ld = buf.stride(0), m = wt.size(1);
  Tensor out = torch::empty({P, m}, buf.options());
  Tensor z = torch::empty({std::min(rows, P), c}, buf.options());
  const T *X = buf.data_ptr<T>(), *W = w.data_ptr<T>(), *B = b.data_ptr<T>();
  for (int64_t p0 = 0; p0 < P; p0 += rows) {
    const int64_t n = std::min(rows, P - p0);
    affine_relu_tile<T>(X + p0 * ld, ld, W, B, z.data_ptr<T>(), n, c);
    Tensor o = out.narrow(0, p0, n);
    at::mm_out(o, z.narrow(0, 0, n), wt);
  }
  return out;
}

// The per-channel sums (dL/dw, dL/db) are taken over fixed chunks of CHUNK rows, then added in
// chunk order: the result does not depend on the number of threads.
constexpr int64_t CHUNK = 256;

template <typename T>
std::vector<Tensor> backward_impl(const Tensor& gout, const Tensor& buf, int64_t c, const Tensor& w, const Tensor& b,
                                  const Tensor& wt, Tensor& ghat, int64_t rows) {
  const int64_t P = buf.size(0), ld = buf.stride(0), m = wt.size(1), ldh = ghat.stride(0);
  rows = (rows + CHUNK - 1) / CHUNK * CHUNK;
  Tensor gwt = torch::zeros({c, m}, buf.options());
  Tensor affine = torch::zeros({(P + CHUNK - 1) / CHUNK, 2, c}, buf.options());  // [dL/dw, dL/db] per chunk
  Tensor z = torch::empty({std::min(rows, P), c}, buf.options());
  Tensor gz = torch::empty_like(z);
  const Tensor wmat = wt.t();  // (m, c)
  const T *X = buf.data_ptr<T>(), *W = w.data_ptr<T>(), *B = b.data_ptr<T>();
  T* H = ghat.data_ptr<T>();
  T* S = affine.data_ptr<T>();
  for (int64_t p0 = 0; p0 < P; p0 += rows) {
    const int64_t n = std::min(rows, P - p0);
    const T* x = X + p0 * ld;
    affine_relu_tile<T>(x, ld, W, B, z.data_ptr<T>(), n, c);
    Tensor zt = z.narrow(0, 0, n), gzt = gz.narrow(0, 0, n), go = gout.narrow(0, p0, n);
    gwt.addmm_(zt.t(), go);     // dL/dWt += z^T gout
    at::mm_out(gzt, go, wmat);  // dL/dz = gout Wt^T
    const T *Z = z.data_ptr<T>(), *GZ = gz.data_ptr<T>();
    at::parallel_for(0, (n + CHUNK - 1) / CHUNK, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        T* sw = S + ((p0 / CHUNK) + k) * 2 * c;
        T* sb = sw + c;
        for (int64_t p = k * CHUNK; p < std::min(n, (k + 1) * CHUNK); ++p) {
          const T *xp = x + p * ld, *zp = Z + p * c, *gp = GZ + p * c;
          T* hp = H + (p0 + p) * ldh;
#pragma omp simd
          for (int64_t j = 0; j < c; ++j) {
            const T gpre = zp[j] > T(0) ? gp[j] : T(0);  // through the ReLU
            sb[j] += gpre;
            sw[j] += gpre * xp[j];
            hp[j] += gpre * W[j];
          }
        }
      }
    });
  }
  Tensor sums = affine.to(torch::kDouble).sum(0).to(buf.scalar_type());
  return {gwt, sums[0], sums[1]};
}

}  // namespace

// (P, m): relu(buf[:, :c] * w + b) @ wt
Tensor consume_conv1x1(const Tensor& buf, int64_t c, const Tensor& w, const Tensor& b, const Tensor& wt, int64_t rows) {
  check(buf, c, w, b, wt);
  TORCH_CHECK(rows > 0, "rows > 0");
  if (buf.scalar_type() == torch::kFloat) return forward_impl<float>(buf, c, w, b, wt, rows);
  TORCH_CHECK(buf.scalar_type() == torch::kDouble, "float32 or float64 only");
  return forward_impl<double>(buf, c, w, b, wt, rows);
}

// Backward of consume_conv1x1 given dL/d out (P, m): adds dL/dx into ghat[:, :c] in place and
// returns [dL/d wt (c, m), dL/d w (c,), dL/d b (c,)].
std::vector<Tensor> consume_conv1x1_backward(const Tensor& gout, const Tensor& buf, int64_t c, const Tensor& w,
                                             const Tensor& b, const Tensor& wt, Tensor ghat, int64_t rows) {
  check(buf, c, w, b, wt);
  TORCH_CHECK(gout.scalar_type() == buf.scalar_type() && gout.is_contiguous() && gout.dim() == 2 &&
              gout.size(0) == buf.size(0) && gout.size(1) == wt.size(1), "gout: contiguous (P, m)");
  TORCH_CHECK(ghat.scalar_type() == buf.scalar_type() && ghat.dim() == 2 && ghat.stride(1) == 1 &&
              ghat.size(0) == buf.size(0) && ghat.size(1) >= c, "ghat: (P, >= c) with unit column stride");
  TORCH_CHECK(rows > 0, "rows > 0");
  if (buf.scalar_type() == torch::kFloat) return backward_impl<float>(gout, buf, c, w, b, wt, ghat, rows);
  TORCH_CHECK(buf.scalar_type() == torch::kDouble, "float32 or float64 only");
  return backward_impl<double>(gout, buf, c, w, b, wt, ghat, rows);
}

// ------------------------------------------------------------------------------------------ CLDC
// Tensors are (N, C, H, W) in channels_last memory, i.e. (P, C) rows; the caller checks the layout.

namespace {

constexpr int64_t CLDC_ROWS = 256;    // rows of the output kept in cache while the inputs stream by
constexpr int64_t CLDC_GROUP = 1024;  // rows per partial weight-gradient sum (thread-count independent)

template <typename T>
void cldc_forward_impl(const std::vector<Tensor>& xs, const T* wt, const T* bias, T* out, int64_t P, int64_t C) {
  const int64_t L = xs.size();
  std::vector<const T*> X(L);
  for (int64_t i = 0; i < L; ++i) X[i] = xs[i].data_ptr<T>();
  at::parallel_for(0, (P + CLDC_ROWS - 1) / CLDC_ROWS, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t a = k * CLDC_ROWS * C, n = (std::min(P, (k + 1) * CLDC_ROWS) - k * CLDC_ROWS) * C;
      T* o = out + a;
      // the operator path's order: x_0 w_0, then + x_i w_i for i = 1..L-1, then + the summed bias
      for (int64_t e = 0; e < n; e += C) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[e + c] = X[0][a + e + c] * wt[c];
      }
      for (int64_t i = 1; i < L; ++i) {
        const T* x = X[i] + a;
        const T* w = wt + i * C;
        for (int64_t e = 0; e < n; e += C) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[e + c] += x[e + c] * w[c];
        }
      }
      for (int64_t e = 0; e < n; e += C) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[e + c] += bias[c];
      }
    }
  });
}

// banks[i] (+)= grad * w_i; partial[g, i, :] = sum over group g's rows of grad * x_i; partial[g, L, :] = sum of grad
template <typename T>
void cldc_backward_impl(const T* G, const std::vector<Tensor>& xs, const T* wt, const std::vector<Tensor>& banks,
                        const std::vector<bool>& assign, T* partial, int64_t P, int64_t C) {
  const int64_t L = xs.size(), groups = (P + CLDC_GROUP - 1) / CLDC_GROUP;
  std::vector<const T*> X(L);
  std::vector<T*> Bk(L);
  for (int64_t i = 0; i < L; ++i) { X[i] = xs[i].data_ptr<T>(); Bk[i] = banks[i].data_ptr<T>(); }
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      T* part = partial + g * (L + 1) * C;
      for (int64_t e = 0; e < (L + 1) * C; ++e) part[e] = T(0);
      const int64_t end = std::min(P, (g + 1) * CLDC_GROUP);
      for (int64_t r0 = g * CLDC_GROUP; r0 < end; r0 += CLDC_ROWS) {
        const int64_t a = r0 * C, n = (std::min(end, r0 + CLDC_ROWS) - r0) * C;
        const T* gr = G + a;
        T* gb = part + L * C;
        for (int64_t e = 0; e < n; e += C) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) gb[c] += gr[e + c];
        }
        for (int64_t i = 0; i < L; ++i) {
          const T* x = X[i] + a;
          const T* w = wt + i * C;
          T* bk = Bk[i] + a;
          T* gw = part + i * C;
          if (assign[i]) {
            for (int64_t e = 0; e < n; e += C) {
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) { bk[e + c] = gr[e + c] * w[c]; gw[c] += gr[e + c] * x[e + c]; }
            }
          } else {
            for (int64_t e = 0; e < n; e += C) {
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) { bk[e + c] += gr[e + c] * w[c]; gw[c] += gr[e + c] * x[e + c]; }
            }
          }
        }
      }
    }
  });
}

void cldc_check(const Tensor& ref, const std::vector<Tensor>& ts) {
  TORCH_CHECK(ref.device().is_cpu() && ref.dim() == 4 && ref.is_contiguous(at::MemoryFormat::ChannelsLast),
              "CLDC tensors: CPU, 4-d, channels_last");
  for (const auto& t : ts) {
    TORCH_CHECK(t.sizes() == ref.sizes() && t.scalar_type() == ref.scalar_type() &&
                t.is_contiguous(at::MemoryFormat::ChannelsLast), "CLDC tensors: one shape, dtype and layout");
  }
}

}  // namespace

// out = sum_i weight[:, i] * xs[i] + bias_sum (per channel); weight (C, L), bias_sum (C,)
Tensor cldc_forward(const std::vector<Tensor>& xs, const Tensor& weight, const Tensor& bias_sum) {
  TORCH_CHECK(!xs.empty(), "CLDC: no inputs");
  cldc_check(xs[0], xs);
  const int64_t C = xs[0].size(1), P = xs[0].numel() / C, L = xs.size();
  TORCH_CHECK(weight.sizes() == at::IntArrayRef({C, L}) && bias_sum.numel() == C &&
              weight.scalar_type() == xs[0].scalar_type() && bias_sum.scalar_type() == xs[0].scalar_type(),
              "CLDC: weight (C, L), bias_sum (C,), the inputs' dtype");
  Tensor wt = weight.t().contiguous(), bias = bias_sum.contiguous();
  Tensor out = torch::empty(xs[0].sizes(), xs[0].options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.scalar_type() == torch::kFloat)
    cldc_forward_impl<float>(xs, wt.data_ptr<float>(), bias.data_ptr<float>(), out.data_ptr<float>(), P, C);
  else {
    TORCH_CHECK(out.scalar_type() == torch::kDouble, "float32 or float64 only");
    cldc_forward_impl<double>(xs, wt.data_ptr<double>(), bias.data_ptr<double>(), out.data_ptr<double>(), P, C);
  }
  return out;
}

// Backward: banks[i] = grad * weight[:, i] where assign[i], else += (in place); returns
// [dL/d weight (C, L), dL/d (per-channel) bias sum (C,)].
std::vector<Tensor> cldc_backward(const Tensor& grad, const std::vector<Tensor>& xs, const Tensor& weight,
                                  std::vector<Tensor> banks, const std::vector<bool>& assign) {
  cldc_check(grad, xs);
  cldc_check(grad, banks);
  const int64_t C = grad.size(1), P = grad.numel() / C, L = xs.size();
  TORCH_CHECK((int64_t)banks.size() == L && (int64_t)assign.size() == L && weight.sizes() == at::IntArrayRef({C, L}) &&
              weight.scalar_type() == grad.scalar_type(), "CLDC backward: one bank and flag per input, weight (C, L)");
  Tensor wt = weight.t().contiguous();
  const int64_t groups = (P + CLDC_GROUP - 1) / CLDC_GROUP;
  Tensor partial = torch::empty({groups, L + 1, C}, grad.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad.scalar_type() == torch::kFloat)
    cldc_backward_impl<float>(grad.data_ptr<float>(), xs, wt.data_ptr<float>(), banks, assign, partial.data_ptr<float>(), P, C);
  else {
    TORCH_CHECK(grad.scalar_type() == torch::kDouble, "float32 or float64 only");
    cldc_backward_impl<double>(grad.data_ptr<double>(), xs, wt.data_ptr<double>(), banks, assign, partial.data_ptr<double>(), P, C);
  }
  Tensor sums = partial.to(torch::kDouble).sum(0).to(grad.scalar_type());  // (L + 1, C)
  return {sums.narrow(0, 0, L).t().contiguous(), sums[L].contiguous()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("consume_conv1x1", &consume_conv1x1, "relu(buf[:, :c] * w + b) @ wt, tile by tile");
  m.def("consume_conv1x1_backward", &consume_conv1x1_backward, "its backward; adds dL/dx into ghat");
  m.def("cldc_forward", &cldc_forward, "sum_i weight[:, i] * xs[i] + bias_sum, channels_last");
  m.def("cldc_backward", &cldc_backward, "its backward; input gradients into the bank tensors");
}
