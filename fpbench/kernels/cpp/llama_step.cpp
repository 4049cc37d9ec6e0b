// One batch-1 decode step of a Llama decoder stack without a Python call per operation.
//
// A small model's decode step is some fifty tensor operations per layer; from Python each
// costs several microseconds of interpreter, binding and dispatch, more than its
// arithmetic. LlamaStep computes what fpbench/eval/lean_decode.py's Python step computes
// (that is, transformers' LlamaForCausalLM: RMSNorm, rotary embedding, SDPA, SiLU MLP,
// residuals) with the same bits:
//
// - elementwise operations as plain loops over one token's vectors, each the operation
//   torch performs: in fp32, or for bf16/fp16 tensors widened to fp32, one fp32 operation
//   and one round-to-nearest-even back (c10's conversions, as torch's CPU kernels do);
//   the build disables floating-point contraction, so a*b + c stays two roundings;
// - reductions and transcendental functions, whose summation order or polynomial is
//   torch's own, as the same ATen calls: RMSNorm's pow + mean, SiLU,
//   scaled_dot_product_attention; dense layers through at::linear (what nn.Linear calls),
//   torch's INT8 weight-only layers through the calls of their forward;
// - kernel layers through KernelLinear::forward_row (what LutLinear.forward computes).
//
// tests/test_lean_decode.py checks the logits against the transformers forward bit for bit.
// The embedding lookup and the rotary cos/sin stay in Python: one module call each per step.

#include "kernel_linear.h"

#include <cmath>
#include <cstring>
#include <type_traits>

namespace fpbench {
namespace {

template <class T>
inline float wide(T v) { return static_cast<float>(v); }

template <class T>
inline T narrow(float v) { return static_cast<T>(v); }  // c10: round to nearest even

template <class T>
at::ScalarType type_of() {
  if constexpr (std::is_same_v<T, float>) return at::kFloat;
  else if constexpr (std::is_same_v<T, c10::BFloat16>) return at::kBFloat16;
  else return at::kHalf;
}

template <class T>
at::Tensor wrap(T* data, at::IntArrayRef shape) {  // a view of a step buffer, for an ATen call
  return at::from_blob(data, shape, at::TensorOptions().dtype(type_of<T>()));
}

// One linear layer: a kernel layer; a dense weight (and bias) for torch's own kernel; or
// int8 codes [N, K] with bf16 scales per row for torch's weight-only INT8 kernel
// (fpbench/eval/latency.py's TorchInt8Linear, whose forward this repeats).
struct Projection {
  std::shared_ptr<KernelLinear> kernel;
  at::Tensor weight;  // dense weight, or int8 codes
  std::optional<at::Tensor> bias;
  at::Tensor int8_scales;  // defined for the INT8 kernel

  int64_t out_features() const { return kernel ? kernel->out_features() : weight.size(0); }

  // y [N] = layer(x [K]) in T, as the module's forward on a [1, 1, K] tensor.
  template <class T>
  void apply(T* x, int64_t K, T* y, std::vector<float>& x32, std::vector<float>& y32) const {
    const int64_t N = out_features();
    if (!kernel) {
      at::Tensor out;
      if (int8_scales.defined()) {
        // A fresh (64-byte aligned) copy, zero-padded to the codes' width: torch's AVX-512
        // INT8 kernel faults on a step buffer's row and needs K % 16 == 0 (see
        // fpbench/kernels/torch_int8.py, which padded the codes).
        at::Tensor x16 = wrap(x, {1, K}).to(at::kBFloat16, false, /*copy=*/true);
        if (weight.size(1) > K) x16 = at::constant_pad_nd(x16, {0, weight.size(1) - K});
        out = at::_weight_int8pack_mm(x16, weight, int8_scales);
        if (bias) out = out + *bias;
        out = out.to(type_of<T>());
      } else {
        out = at::linear(wrap(x, {1, 1, K}), weight, bias);
      }
      out = out.contiguous();
      std::memcpy(y, out.data_ptr(), N * sizeof(T));
      return;
    }
    if constexpr (std::is_same_v<T, float>) {
      kernel->forward_row(x, y);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      y32.resize(N);
      kernel->forward_row(x, y32.data(), x32);
      for (int64_t n = 0; n < N; ++n) y[n] = narrow<T>(y32[n]);
    } else {
      x32.resize(K), y32.resize(N);
      for (int64_t k = 0; k < K; ++k) x32[k] = wide(x[k]);  // exact
      kernel->forward_row(x32.data(), y32.data());
      for (int64_t n = 0; n < N; ++n) y[n] = narrow<T>(y32[n]);
    }
  }
};

// Layers fed the same input, their outputs side by side: one stacked kernel layer (q, k, v
// in one), or one layer per part.
struct Group {
  std::vector<Projection> layers;

  int64_t out_features() const {
    int64_t total = 0;
    for (const Projection& layer : layers) total += layer.out_features();
    return total;
  }

  template <class T>
  void apply(T* x, int64_t K, T* y, std::vector<float>& x32, std::vector<float>& y32) const {
    for (const Projection& layer : layers) {
      layer.apply(x, K, y, x32, y32);
      y += layer.out_features();
    }
  }
};

// LlamaRMSNorm.forward: weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype).
struct Norm {
  at::Tensor weight;
  double eps = 0.0;

  template <class T>
  void apply(T* h, int64_t H, T* out) const {
    const at::Tensor x = wrap(h, {1, 1, H}).to(at::kFloat);
    const float variance = x.pow(2).mean({-1}, true).item<float>();
    // variance + eps: an fp32 tensor plus a double scalar adds the scalar as fp32
    const float inverse = 1.0f / std::sqrt(variance + static_cast<float>(eps));  // torch's rsqrt, both paths
    const T* w = weight.data_ptr<T>();
    for (int64_t i = 0; i < H; ++i) out[i] = narrow<T>(wide(w[i]) * wide(narrow<T>(wide(h[i]) * inverse)));
  }
};

struct Block {
  Norm norm1, norm2;
  Group qkv, gate_up;
  Projection o_proj, down_proj;
  int64_t head_dim = 0;
  double scaling = 1.0;
  bool gqa = false;
  at::Tensor keys, values;  // [1, kv heads, max length, head_dim], filled up to the position
};

class LlamaStep {
 public:
  void add_block(const at::Tensor& norm1, double eps1, const std::vector<Projection>& qkv,
                 const Projection& o_proj, const at::Tensor& norm2, double eps2,
                 const std::vector<Projection>& gate_up, const Projection& down_proj, int64_t head_dim,
                 double scaling, bool gqa) {
    TORCH_CHECK(!qkv.empty() && !gate_up.empty(), "q, k, v and gate, up need their layers");
    Block b;
    b.norm1 = {norm1.contiguous(), eps1};
    b.norm2 = {norm2.contiguous(), eps2};
    b.qkv.layers = qkv;
    b.gate_up.layers = gate_up;
    b.o_proj = o_proj;
    b.down_proj = down_proj;
    b.head_dim = head_dim;
    b.scaling = scaling;
    b.gqa = gqa;
    blocks_.push_back(std::move(b));
  }

  void set_output(const at::Tensor& norm, double eps, const Projection& head) {
    norm_ = {norm.contiguous(), eps};
    head_ = head;
  }

  void set_cache(const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values) {
    TORCH_CHECK(keys.size() == blocks_.size() && values.size() == blocks_.size(), "one key and value buffer per layer");
    for (size_t i = 0; i < blocks_.size(); ++i) {
      TORCH_CHECK(keys[i].is_contiguous() && values[i].is_contiguous(), "key/value buffers must be contiguous");
      blocks_[i].keys = keys[i], blocks_[i].values = values[i];
    }
  }

  // h: the token's embedding [1, 1, hidden]; cos, sin: [1, 1, 1, head_dim] at `position`.
  // Returns the next token's logits [1, vocab].
  at::Tensor step(const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin, int64_t position) {
    const at::NoGradGuard no_grad;
    switch (h.scalar_type()) {
      case at::kFloat: return run<float>(h, cos, sin, position);
      case at::kBFloat16: return run<c10::BFloat16>(h, cos, sin, position);
      case at::kHalf: return run<c10::Half>(h, cos, sin, position);
      default: TORCH_CHECK(false, "the compiled decode step runs fp32, bf16 or fp16 models, not ", h.scalar_type());
    }
  }

 private:
  template <class T>
  at::Tensor run(const at::Tensor& h_in, const at::Tensor& cos_in, const at::Tensor& sin_in, int64_t position) {
    const int64_t H = h_in.size(-1), end = position + 1;
    std::vector<T> h(H), x(H), y(H);
    std::memcpy(h.data(), h_in.contiguous().data_ptr(), H * sizeof(T));
    const at::Tensor cos_t = cos_in.contiguous(), sin_t = sin_in.contiguous();
    const T* cos = cos_t.data_ptr<T>();
    const T* sin = sin_t.data_ptr<T>();
    std::vector<T> qkv, q, attn, gate_up, act;
    for (Block& b : blocks_) {
      const int64_t hd = b.head_dim, half = hd / 2, kv_heads = b.keys.size(1), max_len = b.keys.size(2);
      TORCH_CHECK(end <= max_len && b.keys.scalar_type() == type_of<T>(),
                  "the key/value buffers hold no room for position ", position, " or differ in dtype");
      const int64_t width = b.qkv.out_features();
      const int64_t kv_width = kv_heads * hd, q_width = width - 2 * kv_width, heads = q_width / hd;
      qkv.resize(width), q.resize(q_width), attn.resize(q_width);

      b.norm1.apply(h.data(), H, x.data());
      b.qkv.apply(x.data(), H, qkv.data(), x32_, y32_);
      // rotary embedding of q and k (q * cos + rotate_half(q) * sin); k and v into the cache
      T* keys = b.keys.data_ptr<T>() + position * hd;
      T* values = b.values.data_ptr<T>() + position * hd;
      auto rotate = [&](const T* src, T* dst) {
        for (int64_t d = 0; d < hd; ++d) {
          const T rotated = d < half ? narrow<T>(-wide(src[d + half])) : src[d - half];
          dst[d] = narrow<T>(wide(narrow<T>(wide(src[d]) * wide(cos[d]))) +
                             wide(narrow<T>(wide(rotated) * wide(sin[d]))));
        }
      };
      for (int64_t head = 0; head < heads; ++head) rotate(&qkv[head * hd], &q[head * hd]);
      for (int64_t head = 0; head < kv_heads; ++head) {
        rotate(&qkv[q_width + head * hd], keys + head * max_len * hd);
        std::memcpy(values + head * max_len * hd, &qkv[q_width + kv_width + head * hd], hd * sizeof(T));
      }
      // transformers' SDPA path for one query token without a mask
      const at::Tensor out = at::scaled_dot_product_attention(wrap(q.data(), {1, heads, 1, hd}),
                                                              b.keys.slice(2, 0, end), b.values.slice(2, 0, end),
                                                              std::nullopt, 0.0, false, b.scaling, b.gqa);
      const T* o = out.data_ptr<T>();  // [1, heads, 1, hd] -> [heads * hd], heads outer
      for (int64_t head = 0; head < heads; ++head)
        for (int64_t d = 0; d < hd; ++d) attn[head * hd + d] = o[head * out.stride(1) + d * out.stride(3)];
      b.o_proj.apply(attn.data(), q_width, y.data(), x32_, y32_);
      for (int64_t i = 0; i < H; ++i) h[i] = narrow<T>(wide(h[i]) + wide(y[i]));

      b.norm2.apply(h.data(), H, x.data());
      const int64_t inner = b.gate_up.out_features() / 2;
      gate_up.resize(2 * inner), act.resize(inner);
      b.gate_up.apply(x.data(), H, gate_up.data(), x32_, y32_);
      const at::Tensor silu = at::silu(wrap(gate_up.data(), {1, 1, inner}));
      const T* s = silu.data_ptr<T>();
      for (int64_t i = 0; i < inner; ++i) act[i] = narrow<T>(wide(s[i]) * wide(gate_up[inner + i]));
      b.down_proj.apply(act.data(), inner, y.data(), x32_, y32_);
      for (int64_t i = 0; i < H; ++i) h[i] = narrow<T>(wide(h[i]) + wide(y[i]));
    }
    norm_.apply(h.data(), H, x.data());
    at::Tensor logits = at::empty({1, head_.out_features()}, at::TensorOptions().dtype(type_of<T>()));
    head_.apply(x.data(), H, logits.data_ptr<T>(), x32_, y32_);
    return logits;
  }

  std::vector<Block> blocks_;
  Norm norm_;
  Projection head_;
  std::vector<float> x32_, y32_;  // fp32 copies of a bf16/fp16 row around a kernel layer
};

}  // namespace

void bind_llama_step(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<Projection>(m, "Projection", "a linear layer for LlamaStep: a KernelLinear, or a dense weight and bias")
      .def(py::init([](std::shared_ptr<KernelLinear> kernel) { return Projection{std::move(kernel), {}, {}, {}}; }),
           py::arg("kernel"))
      .def(py::init([](const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
             return Projection{nullptr, weight, bias, {}};
           }),
           py::arg("weight"), py::arg("bias"))
      .def_static(
          "int8_weight_only",
          [](const at::Tensor& codes, const at::Tensor& scales, const std::optional<at::Tensor>& bias) {
            return Projection{nullptr, codes, bias, scales};
          },
          py::arg("codes"), py::arg("scales"), py::arg("bias"), "torch's weight-only INT8 kernel (bf16 activations)");
  py::class_<LlamaStep>(m, "LlamaStep", "a Llama decode step at batch 1 (see llama_step.cpp)")
      .def(py::init<>())
      .def("add_block", &LlamaStep::add_block, py::arg("norm1"), py::arg("eps1"), py::arg("qkv"), py::arg("o_proj"),
           py::arg("norm2"), py::arg("eps2"), py::arg("gate_up"), py::arg("down_proj"), py::arg("head_dim"),
           py::arg("scaling"), py::arg("gqa"))
      .def("set_output", &LlamaStep::set_output, py::arg("norm"), py::arg("eps"), py::arg("head"))
      .def("set_cache", &LlamaStep::set_cache, py::arg("keys"), py::arg("values"))
      .def("step", &LlamaStep::step, py::arg("h"), py::arg("cos"), py::arg("sin"), py::arg("position"));
}

}  // namespace fpbench
