// One kernel layer's packed weights, checked and laid out once, then called per token
// (lut_linear.cpp holds the kernels; llama_step.cpp calls layers from C++ without Python).
#pragma once

#include <torch/extension.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace fpbench {

class KernelLinear {
 public:
  // The arguments of lut_linear (see lut_linear.cpp and fpbench/kernels/linear.py) and the
  // layer's fp32 bias, if any.
  KernelLinear(const at::Tensor& plane_a, const at::Tensor& plane_b, const at::Tensor& table,
               const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t K, int64_t G,
               const std::vector<int64_t>& decode, const std::string& isa,
               const std::optional<at::Tensor>& scale_table, const std::optional<at::Tensor>& zero_table,
               const std::optional<at::Tensor>& bias);

  // fp32 [M, N] = x [M, K] (any float dtype) times the weights transposed; no bias.
  at::Tensor product(const at::Tensor& x) const;
  // LutLinear.forward: x [..., K] -> [..., N] in x's dtype, the bias added in fp32 first.
  at::Tensor forward(const at::Tensor& x) const;
  // fp32 [N, K]: the weights as the kernels of this layer's ISA decode them.
  at::Tensor dequantize() const;
  // One row, no tensors: y [N] = W x [K] + bias in fp32, the same bits as forward on fp32 x.
  void forward_row(const float* x, float* y) const;
  // The same for bf16 x: the same bits as forward on bf16 x (x widened into `wide` where
  // the layer's ISA has no bf16 GEMV).
  void forward_row(const c10::BFloat16* x, float* y, std::vector<float>& wide) const;
  int64_t out_features() const;
  // The decoder this layer's codes take (lut_pack.h: pick_decoder, then the layer's codes).
  std::string decoder() const;

  struct Impl;

 private:
  void add_bias(float* y) const;
  std::shared_ptr<const Impl> impl_;
};

// Registers llama_step.cpp's classes on the extension module.
void bind_llama_step(pybind11::module_& m);

}  // namespace fpbench
