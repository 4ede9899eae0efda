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
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t BLOCK = 16384;
// Every tensor list's position, and every column of the sums and coefficients, comes from
// koala_hf/optim/layouts.py as a compiler flag (cpu_kernels.py passes them): KPP_ for KOALA++, KV_ for
// KOALA-V, KM_ for KOALA-M; e.g. KPP_LIST_H_PREV, KPP_SUM_H_V, KPP_COEF_STEP_V, KPP_N_LIST, and KPP_WRITTEN,
// the lists an update writes (bit k: list k).
static_assert(KPP_N_LIST == 4 && KPP_N_SUM == 4 && KPP_N_COEF == 7, "layouts.py: KOALA++'s lists or columns changed in number");
static_assert(KV_N_LIST == 2 && KV_N_SUM == 2 && KV_N_COEF == 1, "layouts.py: KOALA-V's lists or columns changed in number");
static_assert(KM_N_LIST == 4 && KM_N_SUM == 4 && KM_N_COEF == 4, "layouts.py: KOALA-M's lists or columns changed in number");

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

  // The results of the lists written (bit k of ``written``: list k) into originals that were copied.
  void write_back(unsigned written) {
    for (size_t i = 0; i < copied.size(); ++i)
      if (copied[i])
        for (size_t k = 0; k < tensors.size(); ++k)
          if (written >> k & 1u) originals[k][i].copy_(tensors[k][i]);
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
// The tensor lists of every op below arrive in layouts.py's order: list0 ... list3.
at::Tensor koala_plus_plus_products(at::TensorList list0, at::TensorList list1, at::TensorList list2,
                                    at::TensorList list3, double weight_decay) {
  Layers layers({list0, list1, list2, list3});
  const at::TensorList params = layers.originals[KPP_LIST_PARAM];
  const auto acc_type = params.empty() ? at::kFloat : at::toOpMathType(params[0].scalar_type());
  if (params.empty()) return at::empty({0, KPP_N_SUM}, acc_type);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "koala_plus_plus_products", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using L = Loader<scalar_t, acc_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const acc_t wd = static_cast<acc_t>(weight_decay);
    out = layer_sums<KPP_N_SUM>(layers, acc_type, [&](const Block& k, double* sums) {
      struct {
        const scalar_t *p, *g, *hp, *v;
        acc_t wd;
        void vector(int64_t i, Vec* x, Vec* y) const {
          Vec th = L::vec(p, i), h = at::vec::fmadd(Vec(wd), th, L::vec(g, i));
          x[KPP_SUM_HH] = h, y[KPP_SUM_HH] = h, x[KPP_SUM_H_HPREV] = h, y[KPP_SUM_H_HPREV] = L::vec(hp, i);
          x[KPP_SUM_H_V] = h, y[KPP_SUM_H_V] = L::vec(v, i), x[KPP_SUM_THETA_THETA] = th, y[KPP_SUM_THETA_THETA] = th;
        }
        void scalar(int64_t i, acc_t* x, acc_t* y) const {
          acc_t th = static_cast<acc_t>(p[i]), h = static_cast<acc_t>(g[i]) + wd * th;
          x[KPP_SUM_HH] = h, y[KPP_SUM_HH] = h, x[KPP_SUM_H_HPREV] = h, y[KPP_SUM_H_HPREV] = static_cast<acc_t>(hp[i]);
          x[KPP_SUM_H_V] = h, y[KPP_SUM_H_V] = static_cast<acc_t>(v[i]), x[KPP_SUM_THETA_THETA] = th, y[KPP_SUM_THETA_THETA] = th;
        }
      } load{layers.ptr<scalar_t>(KPP_LIST_PARAM, k), layers.ptr<scalar_t>(KPP_LIST_GRAD, k),
             layers.ptr<scalar_t>(KPP_LIST_H_PREV, k), layers.ptr<scalar_t>(KPP_LIST_V, k), wd};
      dot_block<acc_t, KPP_N_SUM>(k.end - k.begin, load, sums);
    });
  });
  return out;
}

// ``ok`` false (a non-finite loss or gradient): nothing is written, as the masked coefficients would keep
// every tensor as it is, and the gradient, which may hold NaN, is never read. So in every update below.
void koala_plus_plus_update(at::TensorList list0, at::TensorList list1, at::TensorList list2, at::TensorList list3,
                            const at::Tensor& coefficients, const at::Tensor& ok, double weight_decay) {
  Layers layers({list0, list1, list2, list3});
  const at::TensorList params = layers.originals[KPP_LIST_PARAM];
  if (params.empty() || !ok.item<bool>()) return;
  const auto acc_type = at::toOpMathType(params[0].scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "koala_plus_plus_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor table = coefficient_table(coefficients, params.size(), KPP_N_COEF, acc_type);
    const acc_t* coefficient = table.const_data_ptr<acc_t>();
    const acc_t wd = static_cast<acc_t>(weight_decay);
    for_each_block_backwards(layers, [&](const Block& k) {
      scalar_t *p = layers.ptr<scalar_t>(KPP_LIST_PARAM, k), *v = layers.ptr<scalar_t>(KPP_LIST_V, k);
      scalar_t* hp = layers.ptr<scalar_t>(KPP_LIST_H_PREV, k);
      const scalar_t* g = layers.ptr<scalar_t>(KPP_LIST_GRAD, k);
      const acc_t* c = coefficient + KPP_N_COEF * k.layer;
      const acc_t cv = c[KPP_COEF_C_V], ch = c[KPP_COEF_C_H], chp = c[KPP_COEF_C_HP], sv = c[KPP_COEF_STEP_V];
      const acc_t sh = c[KPP_COEF_STEP_H], khp = c[KPP_COEF_KEEP_HP], take = c[KPP_COEF_TAKE_H];
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
  layers.write_back(KPP_WRITTEN);
}

// ---------------------------------------------------------------- KOALA-V/M
// The positions of a variant's [H.H, theta.theta] sums and, for KOALA-M, [d.d, d.H] with d = w_avg - theta.
struct KoalaVSums {
  static constexpr int PARAM = KV_LIST_PARAM, GRAD = KV_LIST_GRAD, AVERAGE = -1, WIDTH = KV_N_SUM;
  static constexpr int HH = KV_SUM_HH, THETA_THETA = KV_SUM_THETA_THETA, DD = -1, DH = -1;
};
struct KoalaMSums {
  static constexpr int PARAM = KM_LIST_PARAM, GRAD = KM_LIST_GRAD, AVERAGE = KM_LIST_W_AVG, WIDTH = KM_N_SUM;
  static constexpr int HH = KM_SUM_HH, THETA_THETA = KM_SUM_THETA_THETA, DD = KM_SUM_DD, DH = KM_SUM_DH;
};

template <typename S>
at::Tensor jacobian_sums(Layers& layers, double weight_decay) {
  const at::TensorList params = layers.originals[S::PARAM];
  const auto acc_type = params.empty() ? at::kFloat : at::toOpMathType(params[0].scalar_type());
  if (params.empty()) return at::empty({0, S::WIDTH}, acc_type);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "koala_jacobian_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using L = Loader<scalar_t, acc_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const acc_t wd = static_cast<acc_t>(weight_decay);
    struct Load {
      const scalar_t *p, *g, *w;
      acc_t wd;
      void vector(int64_t i, Vec* x, Vec* y) const {
        Vec th = L::vec(p, i), h = at::vec::fmadd(Vec(wd), th, L::vec(g, i));
        x[S::HH] = h, y[S::HH] = h, x[S::THETA_THETA] = th, y[S::THETA_THETA] = th;
        if constexpr (S::AVERAGE >= 0) {
          Vec d = L::vec(w, i) - th;
          x[S::DD] = d, y[S::DD] = d, x[S::DH] = d, y[S::DH] = h;
        }
      }
      void scalar(int64_t i, acc_t* x, acc_t* y) const {
        acc_t th = static_cast<acc_t>(p[i]), h = static_cast<acc_t>(g[i]) + wd * th;
        x[S::HH] = h, y[S::HH] = h, x[S::THETA_THETA] = th, y[S::THETA_THETA] = th;
        if constexpr (S::AVERAGE >= 0) {
          acc_t d = static_cast<acc_t>(w[i]) - th;
          x[S::DD] = d, y[S::DD] = d, x[S::DH] = d, y[S::DH] = h;
        }
      }
    };
    out = layer_sums<S::WIDTH>(layers, acc_type, [&](const Block& k, double* sums) {
      const scalar_t* w = S::AVERAGE >= 0 ? layers.ptr<scalar_t>(S::AVERAGE, k) : nullptr;
      Load load{layers.ptr<scalar_t>(S::PARAM, k), layers.ptr<scalar_t>(S::GRAD, k), w, wd};
      dot_block<acc_t, S::WIDTH>(k.end - k.begin, load, sums);
    });
  });
  return out;
}

at::Tensor koala_v_sums(at::TensorList list0, at::TensorList list1, double weight_decay) {
  Layers layers({list0, list1});
  return jacobian_sums<KoalaVSums>(layers, weight_decay);
}

at::Tensor koala_m_sums(at::TensorList list0, at::TensorList list1, at::TensorList list2, at::TensorList list3,
                        double weight_decay) {
  Layers layers({list0, list1, list2, list3});
  return jacobian_sums<KoalaMSums>(layers, weight_decay);
}

void koala_v_update(at::TensorList list0, at::TensorList list1, const at::Tensor& coefficients, const at::Tensor& ok,
                    double weight_decay) {
  Layers layers({list0, list1});
  const at::TensorList params = layers.originals[KV_LIST_PARAM];
  if (params.empty() || !ok.item<bool>()) return;
  const auto acc_type = at::toOpMathType(params[0].scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "koala_v_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor table = coefficient_table(coefficients, params.size(), KV_N_COEF, acc_type);
    const acc_t* coefficient = table.const_data_ptr<acc_t>();
    const acc_t wd = static_cast<acc_t>(weight_decay);
    for_each_block_backwards(layers, [&](const Block& k) {
      scalar_t* p = layers.ptr<scalar_t>(KV_LIST_PARAM, k);
      const scalar_t* g = layers.ptr<scalar_t>(KV_LIST_GRAD, k);
      const acc_t s = coefficient[KV_N_COEF * k.layer + KV_COEF_STEP];
      _Pragma("omp simd")
      for (int64_t i = 0; i < k.end - k.begin; ++i) {
        acc_t th = static_cast<acc_t>(p[i]);
        p[i] = static_cast<scalar_t>(th + s * (static_cast<acc_t>(g[i]) + wd * th));
      }
    });
  });
  layers.write_back(KV_WRITTEN);
}

void koala_m_update(at::TensorList list0, at::TensorList list1, at::TensorList list2, at::TensorList list3,
                    const at::Tensor& coefficients, const at::Tensor& ok, double decay, double weight_decay) {
  Layers layers({list0, list1, list2, list3});
  const at::TensorList params = layers.originals[KM_LIST_PARAM];
  if (params.empty() || !ok.item<bool>()) return;
  const auto acc_type = at::toOpMathType(params[0].scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "koala_m_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor table = coefficient_table(coefficients, params.size(), KM_N_COEF, acc_type);
    const acc_t* coefficient = table.const_data_ptr<acc_t>();
    const acc_t wd = static_cast<acc_t>(weight_decay), a = static_cast<acc_t>(decay);
    for_each_block_backwards(layers, [&](const Block& k) {
      scalar_t *p = layers.ptr<scalar_t>(KM_LIST_PARAM, k), *u = layers.ptr<scalar_t>(KM_LIST_U, k);
      scalar_t* w = layers.ptr<scalar_t>(KM_LIST_W_AVG, k);
      const scalar_t* g = layers.ptr<scalar_t>(KM_LIST_GRAD, k);
      const acc_t* c = coefficient + KM_N_COEF * k.layer;
      const acc_t k_theta = c[KM_COEF_STEP_THETA], k_u = c[KM_COEF_STEP_U], keep = c[KM_COEF_KEEP_AVG];
      const acc_t take = c[KM_COEF_TAKE_THETA];
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
  layers.write_back(KM_WRITTEN);
}

}  // namespace

// A pass's tensor lists in layouts.py's order, ``list0 ... listN-1``, those it writes (bit k of ``written``:
// list k) marked (a!), (b!) ...
std::string lists(int n, unsigned written = 0) {
  std::string out;
  char alias = 'a';
  for (int k = 0; k < n; ++k)
    out += (written >> k & 1u ? std::string("Tensor(") + alias++ + "!)[]" : std::string("Tensor[]")) + " list" +
           std::to_string(k) + ", ";
  return out;
}

TORCH_LIBRARY(koala_hf, m) {
  m.def(("koala_plus_plus_products(" + lists(KPP_N_LIST) + "float weight_decay) -> Tensor").c_str());
  m.def(("koala_plus_plus_update(" + lists(KPP_N_LIST, KPP_WRITTEN) +
         "Tensor coefficients, Tensor ok, float weight_decay) -> ()").c_str());
  m.def(("koala_v_sums(" + lists(KV_N_LIST) + "float weight_decay) -> Tensor").c_str());
  m.def(("koala_v_update(" + lists(KV_N_LIST, KV_WRITTEN) + "Tensor coefficients, Tensor ok, float weight_decay) -> ()").c_str());
  m.def(("koala_m_sums(" + lists(KM_N_LIST) + "float weight_decay) -> Tensor").c_str());
  m.def(("koala_m_update(" + lists(KM_N_LIST, KM_WRITTEN) +
         "Tensor coefficients, Tensor ok, float decay, float weight_decay) -> ()").c_str());
}

TORCH_LIBRARY_IMPL(koala_hf, CPU, m) {
  m.impl("koala_plus_plus_products", &koala_plus_plus_products);
  m.impl("koala_plus_plus_update", &koala_plus_plus_update);
  m.impl("koala_v_sums", &koala_v_sums);
  m.impl("koala_v_update", &koala_v_update);
  m.impl("koala_m_sums", &koala_m_sums);
  m.impl("koala_m_update", &koala_m_update);
}
