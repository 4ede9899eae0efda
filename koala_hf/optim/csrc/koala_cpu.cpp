// Multi-tensor CPU kernels of the fused KOALA++ step (koala_hf/optim/cpu_kernels.py builds and loads them).
//
// One call per pass covers every layer of a (dtype) bucket, as torch's fused CPU AdamW does: the work is
// cut into fixed blocks of BLOCK elements over all layers and spread over ATen's intra-op threads, so
// the number of calls per step does not grow with the number of layers.
//
//   products: [H.H, H.H_prev, H.v_prev, theta.theta] per layer, H = g + wd * theta   (spec E3, E11-E13)
//   update:   v <- C_V v + C_H H + C_HP H_prev; theta <- theta + STEP_V v + STEP_H H;
//             H_prev <- KEEP_HP H_prev + TAKE_H H                                       (E14, E16, E17)
//
// Arithmetic runs in at::opmath_type (float32 for float16/bfloat16/float32, float64 for float64). Each
// block sums into vector lanes, the block sums are added per layer in double, in block order: results
// do not depend on the number of threads. A layer whose four tensors do not share one dense layout
// (same sizes and strides, no gaps or overlaps) runs on contiguous copies that the update writes back.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t BLOCK = 16384;
// Columns of the coefficients (koala_plus_plus.py: C_V ... TAKE_H).
enum { C_V, C_H, C_HP, STEP_V, STEP_H, KEEP_HP, TAKE_H, N_COEFFICIENTS };

struct Block {
  int64_t layer, begin, end;
};

bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.strides() == b.strides();
}

// The layers' tensors as the kernels read them: the originals when they share one dense layout, else
// contiguous copies (``copied[i]``).
struct Layers {
  std::vector<at::Tensor> p, g, v, hp;
  std::vector<bool> copied;
  std::vector<Block> blocks;

  Layers(at::TensorList params, at::TensorList grads, at::TensorList vs, at::TensorList h_prevs) {
    const int64_t n = params.size();
    TORCH_CHECK(grads.size() == params.size() && vs.size() == params.size() && h_prevs.size() == params.size(),
                "koala_hf fused step: the tensor lists differ in length");
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor& t = params[i];
      TORCH_CHECK(t.device().is_cpu(), "koala_hf fused CPU step: a tensor is not on the CPU");
      for (const at::Tensor* other : {&grads[i], &vs[i], &h_prevs[i]}) {
        TORCH_CHECK(other->scalar_type() == t.scalar_type() && other->device().is_cpu(),
                    "koala_hf fused CPU step: a layer mixes dtypes or devices");
      }
      bool dense = t.is_non_overlapping_and_dense() && same_dense_layout(t, grads[i]) &&
                   same_dense_layout(t, vs[i]) && same_dense_layout(t, h_prevs[i]);
      copied.push_back(!dense);
      p.push_back(dense ? t : t.contiguous());
      g.push_back(dense ? grads[i] : grads[i].contiguous());
      v.push_back(dense ? vs[i] : vs[i].contiguous());
      hp.push_back(dense ? h_prevs[i] : h_prevs[i].contiguous());
      const int64_t numel = t.numel();
      for (int64_t b = 0; b < numel; b += BLOCK) blocks.push_back({i, b, std::min(numel, b + BLOCK)});
    }
  }
};

template <typename T, typename Acc>
void block_products(const T* p, const T* g, const T* hp, const T* v, int64_t n, Acc wd, double* out) {
  using Vec = at::vec::Vectorized<Acc>;
  Acc r[4] = {0, 0, 0, 0};
  int64_t i = 0;
  if constexpr (std::is_same_v<T, Acc>) {
    Vec s0(0), s1(0), s2(0), s3(0), wdv(wd);
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec th = Vec::loadu(p + i);
      Vec h = at::vec::fmadd(wdv, th, Vec::loadu(g + i));
      s0 = at::vec::fmadd(h, h, s0);
      s1 = at::vec::fmadd(h, Vec::loadu(hp + i), s1);
      s2 = at::vec::fmadd(h, Vec::loadu(v + i), s2);
      s3 = at::vec::fmadd(th, th, s3);
    }
    r[0] = at::vec::vec_reduce_all<Acc>(std::plus<Vec>(), s0);
    r[1] = at::vec::vec_reduce_all<Acc>(std::plus<Vec>(), s1);
    r[2] = at::vec::vec_reduce_all<Acc>(std::plus<Vec>(), s2);
    r[3] = at::vec::vec_reduce_all<Acc>(std::plus<Vec>(), s3);
  }
  for (; i < n; ++i) {
    Acc th = static_cast<Acc>(p[i]);
    Acc h = static_cast<Acc>(g[i]) + wd * th;
    r[0] += h * h;
    r[1] += h * static_cast<Acc>(hp[i]);
    r[2] += h * static_cast<Acc>(v[i]);
    r[3] += th * th;
  }
  for (int k = 0; k < 4; ++k) out[k] = r[k];
}

at::Tensor products(at::TensorList params, at::TensorList grads, at::TensorList h_prevs, at::TensorList vs,
                    double weight_decay) {
  const int64_t n = params.size();
  if (n == 0) return at::empty({0, 4}, at::kFloat);
  Layers layers(params, grads, vs, h_prevs);
  const auto acc_type = at::toOpMathType(params[0].scalar_type());
  std::vector<double> partial(4 * layers.blocks.size());
  std::vector<double> sums(4 * n, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "koala_products", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::parallel_for(0, layers.blocks.size(), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const Block& k = layers.blocks[b];
        block_products<scalar_t, acc_t>(
            layers.p[k.layer].const_data_ptr<scalar_t>() + k.begin, layers.g[k.layer].const_data_ptr<scalar_t>() + k.begin,
            layers.hp[k.layer].const_data_ptr<scalar_t>() + k.begin, layers.v[k.layer].const_data_ptr<scalar_t>() + k.begin,
            k.end - k.begin, static_cast<acc_t>(weight_decay), partial.data() + 4 * b);
      }
    });
  });
  for (size_t b = 0; b < layers.blocks.size(); ++b)
    for (int k = 0; k < 4; ++k) sums[4 * layers.blocks[b].layer + k] += partial[4 * b + k];
  return at::tensor(sums, at::kDouble).view({n, 4}).to(acc_type);
}

template <typename T, typename Acc>
void block_update(T* p, const T* g, T* v, T* hp, int64_t n, const Acc* c, Acc wd) {
  const Acc cv = c[C_V], ch = c[C_H], chp = c[C_HP], sv = c[STEP_V], sh = c[STEP_H], khp = c[KEEP_HP], take = c[TAKE_H];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    Acc th = static_cast<Acc>(p[i]);
    Acc h = static_cast<Acc>(g[i]) + wd * th;
    Acc h_prev = static_cast<Acc>(hp[i]);
    Acc v_new = cv * static_cast<Acc>(v[i]) + ch * h + chp * h_prev;
    p[i] = static_cast<T>(th + sv * v_new + sh * h);
    hp[i] = static_cast<T>(khp * h_prev + take * h);
    v[i] = static_cast<T>(v_new);
  }
}

// ``ok`` false (a non-finite loss or gradient): nothing is written, as the masked coefficients would keep
// every tensor as it is; the gradient, which may hold NaN, is never read.
void update(at::TensorList params, at::TensorList grads, at::TensorList vs, at::TensorList h_prevs,
            const at::Tensor& coefficients, const at::Tensor& ok, double weight_decay) {
  const int64_t n = params.size();
  if (n == 0 || !ok.item<bool>()) return;
  Layers layers(params, grads, vs, h_prevs);
  const auto acc_type = at::toOpMathType(params[0].scalar_type());
  TORCH_CHECK(coefficients.dim() == 2 && coefficients.size(0) == n && coefficients.size(1) == N_COEFFICIENTS,
              "koala_hf fused CPU step: coefficients must be [n_layers, 7]");
  const at::Tensor c = coefficients.to(at::kCPU, acc_type).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "koala_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* coef = c.const_data_ptr<acc_t>();
    // Last block first: the blocks the reduction pass read last are still in the cache.
    const int64_t last = layers.blocks.size() - 1;
    at::parallel_for(0, layers.blocks.size(), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const Block& k = layers.blocks[last - b];
        block_update<scalar_t, acc_t>(
            layers.p[k.layer].data_ptr<scalar_t>() + k.begin, layers.g[k.layer].const_data_ptr<scalar_t>() + k.begin,
            layers.v[k.layer].data_ptr<scalar_t>() + k.begin, layers.hp[k.layer].data_ptr<scalar_t>() + k.begin,
            k.end - k.begin, coef + N_COEFFICIENTS * k.layer, static_cast<acc_t>(weight_decay));
      }
    });
  });
  for (int64_t i = 0; i < n; ++i) {
    if (!layers.copied[i]) continue;
    params[i].copy_(layers.p[i]);
    vs[i].copy_(layers.v[i]);
    h_prevs[i].copy_(layers.hp[i]);
  }
}

}  // namespace

TORCH_LIBRARY(koala_hf, m) {
  m.def("koala_plus_plus_products(Tensor[] params, Tensor[] grads, Tensor[] h_prevs, Tensor[] vs, float weight_decay) -> Tensor");
  m.def("koala_plus_plus_update(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] vs, Tensor(c!)[] h_prevs, "
        "Tensor coefficients, Tensor ok, float weight_decay) -> ()");
}

TORCH_LIBRARY_IMPL(koala_hf, CPU, m) {
  m.impl("koala_plus_plus_products", &products);
  m.impl("koala_plus_plus_update", &update);
}
