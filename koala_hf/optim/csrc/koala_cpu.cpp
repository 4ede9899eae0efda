// Multi-tensor CPU kernels of the fused KOALA steps (koala_hf/optim/cpu_kernels.py builds and loads them).
//
// One call per pass covers every layer of a (dtype) bucket, as torch's fused CPU AdamW does: the work is
// cut into fixed blocks of BLOCK elements over all layers and spread over ATen's intra-op threads, so
// the number of calls per step does not grow with the number of layers. H = g + wd * theta (spec E3) is
// recomputed where it is needed, never stored.
//
//   KOALA++ products: [H.H, H.H_prev, H.v_prev, theta.theta] per layer                   (E11-E13)
//   KOALA++ update:   v <- C_V v + C_H H + C_HP H_prev; theta <- theta + STEP_V v + STEP_H H;
//                     H_prev <- KEEP_HP H_prev + TAKE_H H                                (E14, E16, E17)
//   KOALA-V/M sums:   [H.H, theta.theta] per layer, and for KOALA-M [d.d, d.H], d = w_avg - theta
//   KOALA-V update:   theta <- theta + step H                                            (E21)
//   KOALA-M update:   theta <- theta + K_THETA H; u <- u + K_U H; w_avg <- KEEP_AVG w_avg + TAKE_THETA theta,
//                     then the predict theta <- theta + u, u <- a u                      (E31, E33, E34)
//
// Arithmetic runs in at::opmath_type (float32 for float16/bfloat16/float32, float64 for float64). Each
// block sums into vector lanes, the block sums are added per layer in double, in block order: results
// do not depend on the number of threads. A layer whose tensors do not share one dense layout (same
// sizes and strides, no gaps or overlaps) runs on contiguous copies that the update writes back.
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
// Columns of the KOALA++ coefficients (koala_plus_plus.py: C_V ... TAKE_H).
enum { C_V, C_H, C_HP, STEP_V, STEP_H, KEEP_HP, TAKE_H, N_COEFFICIENTS };
// Columns of the KOALA-M coefficients (koala_m.py: STEP_THETA ... TAKE_THETA).
enum { M_STEP_THETA, M_STEP_U, M_KEEP_AVG, M_TAKE_THETA, M_COEFFICIENTS };

struct Block {
  int64_t layer, begin, end;
};

// Parallel lists of per-layer tensors (list 0: the parameters) as the kernels read them: the originals
// when a layer's tensors share one dense layout (same sizes and strides, no gaps or overlaps), else
// contiguous copies, which write_back stores into the originals.
struct Layers {
  std::vector<at::TensorList> originals;
  std::vector<std::vector<at::Tensor>> tensors;
  std::vector<bool> copied;
  std::vector<Block> blocks;

  explicit Layers(std::vector<at::TensorList> lists) : originals(std::move(lists)), tensors(originals.size()) {
    const at::TensorList params = originals[0];
    const size_t n = params.size();
    for (const auto& list : originals)
      TORCH_CHECK(list.size() == n, "koala_hf fused CPU step: the tensor lists differ in length");
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& t = params[i];
      bool dense = t.is_non_overlapping_and_dense();
      for (const auto& list : originals) {
        TORCH_CHECK(list[i].device().is_cpu() && list[i].scalar_type() == t.scalar_type(),
                    "koala_hf fused CPU step: a layer mixes dtypes or devices, or is not on the CPU");
        dense = dense && list[i].sizes() == t.sizes() && list[i].strides() == t.strides();
      }
      copied.push_back(!dense);
      for (size_t k = 0; k < originals.size(); ++k)
        tensors[k].push_back(dense ? originals[k][i] : originals[k][i].contiguous());
      const int64_t numel = t.numel();
      for (int64_t b = 0; b < numel; b += BLOCK) blocks.push_back({(int64_t)i, b, std::min(numel, b + BLOCK)});
    }
  }

  template <typename T>
  T* ptr(size_t list, const Block& b) {
    return tensors[list][b.layer].data_ptr<T>() + b.begin;
  }

  // The results of the lists written (by index) into originals that were copied.
  void write_back(std::initializer_list<size_t> written) {
    for (size_t i = 0; i < copied.size(); ++i)
      if (copied[i])
        for (size_t k : written) originals[k][i].copy_(tensors[k][i]);
  }
};

// Per-layer sums of a pass that only reads: ``block(b, out)`` writes a block's WIDTH sums; the block sums
// are added per layer in double, in block order, so the result does not depend on the number of threads.
template <int WIDTH, typename F>
at::Tensor layer_sums(Layers& layers, at::ScalarType acc_type, F block) {
  const size_t n = layers.copied.size();
  std::vector<double> partial(WIDTH * layers.blocks.size());
  std::vector<double> sums(WIDTH * n, 0.0);
  at::parallel_for(0, layers.blocks.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) block(layers.blocks[b], partial.data() + WIDTH * b);
  });
  for (size_t b = 0; b < layers.blocks.size(); ++b)
    for (int k = 0; k < WIDTH; ++k) sums[WIDTH * layers.blocks[b].layer + k] += partial[WIDTH * b + k];
  return at::tensor(sums, at::kDouble).view({(int64_t)n, WIDTH}).to(acc_type);
}

// A pass that writes: the last block first, so that the blocks a reduction pass read last, still in the
// cache, are updated first.
template <typename F>
void for_each_block_backwards(Layers& layers, F block) {
  const int64_t last = (int64_t)layers.blocks.size() - 1;
  at::parallel_for(0, layers.blocks.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) block(layers.blocks[last - b]);
  });
}

// Per-layer coefficients as a contiguous CPU table in the math type, checked to be [rows, columns].
at::Tensor coefficient_table(const at::Tensor& coefficients, int64_t rows, int64_t columns, at::ScalarType acc_type) {
  TORCH_CHECK(coefficients.dim() == 2 && coefficients.size(0) == rows && coefficients.size(1) == columns,
              "koala_hf fused CPU step: coefficients must be [n_layers, ", columns, "]");
  return coefficients.to(at::kCPU, acc_type).contiguous();
}

// ``sums[k] += x[i] * y[i]`` for PAIRS pairs over one block, in vector lanes where T is its own math type.
template <typename Acc, int PAIRS, typename Load>
void dot_block(int64_t n, Load load, double* out) {
  using Vec = at::vec::Vectorized<Acc>;
  Vec lanes[PAIRS];
  for (int k = 0; k < PAIRS; ++k) lanes[k] = Vec(Acc(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec x[PAIRS], y[PAIRS];
    load.vector(i, x, y);
    for (int k = 0; k < PAIRS; ++k) lanes[k] = at::vec::fmadd(x[k], y[k], lanes[k]);
  }
  Acc tail[PAIRS] = {};
  for (; i < n; ++i) {
    Acc x[PAIRS], y[PAIRS];
    load.scalar(i, x, y);
    for (int k = 0; k < PAIRS; ++k) tail[k] += x[k] * y[k];
  }
  for (int k = 0; k < PAIRS; ++k) out[k] = at::vec::vec_reduce_all<Acc>(std::plus<Vec>(), lanes[k]) + tail[k];
}

// Loads T as its math type Acc: whole vectors where T is Acc, else (16-bit types) element by element.
template <typename T, typename Acc>
struct Loader {
  using Vec = at::vec::Vectorized<Acc>;
  static constexpr bool vectorised = std::is_same_v<T, Acc>;
  static Vec vec(const T* x, int64_t i) {
    if constexpr (vectorised) {
      return Vec::loadu(x + i);
    } else {
      Acc buffer[Vec::size()];
      for (int j = 0; j < Vec::size(); ++j) buffer[j] = static_cast<Acc>(x[i + j]);
      return Vec::loadu(buffer);
    }
  }
};

// ------------------------------------------------------------------ KOALA++
at::Tensor koala_plus_plus_products(at::TensorList params, at::TensorList grads, at::TensorList h_prevs,
                                    at::TensorList vs, double weight_decay) {
  Layers layers({params, grads, h_prevs, vs});
  const auto acc_type = params.empty() ? at::kFloat : at::toOpMathType(params[0].scalar_type());
  if (params.empty()) return at::empty({0, 4}, acc_type);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "koala_plus_plus_products", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using L = Loader<scalar_t, acc_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const acc_t wd = static_cast<acc_t>(weight_decay);
    out = layer_sums<4>(layers, acc_type, [&](const Block& k, double* sums) {
      const scalar_t *p = layers.ptr<scalar_t>(0, k), *g = layers.ptr<scalar_t>(1, k);
      const scalar_t *hp = layers.ptr<scalar_t>(2, k), *v = layers.ptr<scalar_t>(3, k);
      struct {
        const scalar_t *p, *g, *hp, *v;
        acc_t wd;
        void vector(int64_t i, Vec* x, Vec* y) const {
          Vec th = L::vec(p, i), h = at::vec::fmadd(Vec(wd), th, L::vec(g, i));
          x[0] = h, y[0] = h, x[1] = h, y[1] = L::vec(hp, i), x[2] = h, y[2] = L::vec(v, i), x[3] = th, y[3] = th;
        }
        void scalar(int64_t i, acc_t* x, acc_t* y) const {
          acc_t th = static_cast<acc_t>(p[i]), h = static_cast<acc_t>(g[i]) + wd * th;
          x[0] = h, y[0] = h, x[1] = h, y[1] = static_cast<acc_t>(hp[i]), x[2] = h, y[2] = static_cast<acc_t>(v[i]);
          x[3] = th, y[3] = th;
        }
      } load{p, g, hp, v, wd};
      dot_block<acc_t, 4>(k.end - k.begin, load, sums);
    });
  });
  return out;
}

// ``ok`` false (a non-finite loss or gradient): nothing is written, as the masked coefficients would keep
// every tensor as it is, and the gradient, which may hold NaN, is never read. So in every update below.
void koala_plus_plus_update(at::TensorList params, at::TensorList grads, at::TensorList vs, at::TensorList h_prevs,
                            const at::Tensor& coefficients, const at::Tensor& ok, double weight_decay) {
  if (params.empty() || !ok.item<bool>()) return;
  Layers layers({params, grads, vs, h_prevs});
  const auto acc_type = at::toOpMathType(params[0].scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "koala_plus_plus_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor table = coefficient_table(coefficients, params.size(), N_COEFFICIENTS, acc_type);
    const acc_t* coefficient = table.const_data_ptr<acc_t>();
    const acc_t wd = static_cast<acc_t>(weight_decay);
    for_each_block_backwards(layers, [&](const Block& k) {
      scalar_t *p = layers.ptr<scalar_t>(0, k), *v = layers.ptr<scalar_t>(2, k), *hp = layers.ptr<scalar_t>(3, k);
      const scalar_t* g = layers.ptr<scalar_t>(1, k);
      const acc_t* c = coefficient + N_COEFFICIENTS * k.layer;
      const acc_t cv = c[C_V], ch = c[C_H], chp = c[C_HP], sv = c[STEP_V], sh = c[STEP_H], khp = c[KEEP_HP], take = c[TAKE_H];
      _Pragma("omp simd")
      for (int64_t i = 0; i < k.end - k.begin; ++i) {
        acc_t th = static_cast<acc_t>(p[i]);
        acc_t h = static_cast<acc_t>(g[i]) + wd * th;
        acc_t h_prev = static_cast<acc_t>(hp[i]);
        acc_t v_new = cv * static_cast<acc_t>(v[i]) + ch * h + chp * h_prev;
        p[i] = static_cast<scalar_t>(th + sv * v_new + sh * h);
        hp[i] = static_cast<scalar_t>(khp * h_prev + take * h);
        v[i] = static_cast<scalar_t>(v_new);
      }
    });
  });
  layers.write_back({0, 2, 3});
}

// ---------------------------------------------------------------- KOALA-V/M
// [H.H, theta.theta] per layer, with ``averages`` (KOALA-M's w_avg, or empty) also [d.d, d.H], d = w_avg - theta.
at::Tensor koala_jacobian_sums(at::TensorList params, at::TensorList grads, at::TensorList averages, double weight_decay) {
  const bool distances = !averages.empty();
  std::vector<at::TensorList> lists{params, grads};
  if (distances) lists.push_back(averages);
  Layers layers(lists);
  const int64_t width = distances ? 4 : 2;
  const auto acc_type = params.empty() ? at::kFloat : at::toOpMathType(params[0].scalar_type());
  if (params.empty()) return at::empty({0, width}, acc_type);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "koala_jacobian_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using L = Loader<scalar_t, acc_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const acc_t wd = static_cast<acc_t>(weight_decay);
    struct Load {  // pairs 2 and 3 only with w (dot_block<4>); without it dot_block<2> reads pairs 0 and 1
      const scalar_t *p, *g, *w;
      acc_t wd;
      void vector(int64_t i, Vec* x, Vec* y) const {
        Vec th = L::vec(p, i), h = at::vec::fmadd(Vec(wd), th, L::vec(g, i));
        x[0] = h, y[0] = h, x[1] = th, y[1] = th;
        if (w != nullptr) {
          Vec d = L::vec(w, i) - th;
          x[2] = d, y[2] = d, x[3] = d, y[3] = h;
        }
      }
      void scalar(int64_t i, acc_t* x, acc_t* y) const {
        acc_t th = static_cast<acc_t>(p[i]), h = static_cast<acc_t>(g[i]) + wd * th;
        x[0] = h, y[0] = h, x[1] = th, y[1] = th;
        if (w != nullptr) {
          acc_t d = static_cast<acc_t>(w[i]) - th;
          x[2] = d, y[2] = d, x[3] = d, y[3] = h;
        }
      }
    };
    if (distances) {
      out = layer_sums<4>(layers, acc_type, [&](const Block& k, double* sums) {
        Load load{layers.ptr<scalar_t>(0, k), layers.ptr<scalar_t>(1, k), layers.ptr<scalar_t>(2, k), wd};
        dot_block<acc_t, 4>(k.end - k.begin, load, sums);
      });
    } else {
      out = layer_sums<2>(layers, acc_type, [&](const Block& k, double* sums) {
        Load load{layers.ptr<scalar_t>(0, k), layers.ptr<scalar_t>(1, k), nullptr, wd};
        dot_block<acc_t, 2>(k.end - k.begin, load, sums);
      });
    }
  });
  return out;
}

void koala_v_update(at::TensorList params, at::TensorList grads, const at::Tensor& steps, const at::Tensor& ok,
                    double weight_decay) {
  if (params.empty() || !ok.item<bool>()) return;
  Layers layers({params, grads});
  const auto acc_type = at::toOpMathType(params[0].scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "koala_v_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor table = coefficient_table(steps.reshape({-1, 1}), params.size(), 1, acc_type);
    const acc_t* step = table.const_data_ptr<acc_t>();
    const acc_t wd = static_cast<acc_t>(weight_decay);
    for_each_block_backwards(layers, [&](const Block& k) {
      scalar_t* p = layers.ptr<scalar_t>(0, k);
      const scalar_t* g = layers.ptr<scalar_t>(1, k);
      const acc_t s = step[k.layer];
      _Pragma("omp simd")
      for (int64_t i = 0; i < k.end - k.begin; ++i) {
        acc_t th = static_cast<acc_t>(p[i]);
        p[i] = static_cast<scalar_t>(th + s * (static_cast<acc_t>(g[i]) + wd * th));
      }
    });
  });
  layers.write_back({0});
}

void koala_m_update(at::TensorList params, at::TensorList grads, at::TensorList us, at::TensorList averages,
                    const at::Tensor& coefficients, const at::Tensor& ok, double decay, double weight_decay) {
  if (params.empty() || !ok.item<bool>()) return;
  Layers layers({params, grads, us, averages});
  const auto acc_type = at::toOpMathType(params[0].scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "koala_m_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor table = coefficient_table(coefficients, params.size(), M_COEFFICIENTS, acc_type);
    const acc_t* coefficient = table.const_data_ptr<acc_t>();
    const acc_t wd = static_cast<acc_t>(weight_decay), a = static_cast<acc_t>(decay);
    for_each_block_backwards(layers, [&](const Block& k) {
      scalar_t *p = layers.ptr<scalar_t>(0, k), *u = layers.ptr<scalar_t>(2, k), *w = layers.ptr<scalar_t>(3, k);
      const scalar_t* g = layers.ptr<scalar_t>(1, k);
      const acc_t* c = coefficient + M_COEFFICIENTS * k.layer;
      const acc_t k_theta = c[M_STEP_THETA], k_u = c[M_STEP_U], keep = c[M_KEEP_AVG], take = c[M_TAKE_THETA];
      _Pragma("omp simd")
      for (int64_t i = 0; i < k.end - k.begin; ++i) {
        acc_t th = static_cast<acc_t>(p[i]);
        acc_t h = static_cast<acc_t>(g[i]) + wd * th;
        // E33-E34; E31 then starts from theta and u as stored (rounded to 16 bits where they are), as in the
        // eager paths.
        acc_t th_post = th + k_theta * h;
        acc_t u_post = static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(u[i]) + k_u * h));
        w[i] = static_cast<scalar_t>(keep * static_cast<acc_t>(w[i]) + take * th_post);
        p[i] = static_cast<scalar_t>(static_cast<acc_t>(static_cast<scalar_t>(th_post)) + u_post);
        u[i] = static_cast<scalar_t>(a * u_post);
      }
    });
  });
  layers.write_back({0, 2, 3});
}

}  // namespace

TORCH_LIBRARY(koala_hf, m) {
  m.def("koala_plus_plus_products(Tensor[] params, Tensor[] grads, Tensor[] h_prevs, Tensor[] vs, float weight_decay) -> Tensor");
  m.def("koala_plus_plus_update(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] vs, Tensor(c!)[] h_prevs, "
        "Tensor coefficients, Tensor ok, float weight_decay) -> ()");
  m.def("koala_jacobian_sums(Tensor[] params, Tensor[] grads, Tensor[] averages, float weight_decay) -> Tensor");
  m.def("koala_v_update(Tensor(a!)[] params, Tensor[] grads, Tensor steps, Tensor ok, float weight_decay) -> ()");
  m.def("koala_m_update(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] us, Tensor(c!)[] averages, "
        "Tensor coefficients, Tensor ok, float decay, float weight_decay) -> ()");
}

TORCH_LIBRARY_IMPL(koala_hf, CPU, m) {
  m.impl("koala_plus_plus_products", &koala_plus_plus_products);
  m.impl("koala_plus_plus_update", &koala_plus_plus_update);
  m.impl("koala_jacobian_sums", &koala_jacobian_sums);
  m.impl("koala_v_update", &koala_v_update);
  m.impl("koala_m_update", &koala_m_update);
}
