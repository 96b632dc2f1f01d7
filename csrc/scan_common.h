// Shared by the CPU (gae_cpu.cpp) and CUDA (cuda/gae_cuda.cu) scan kernels: argument checks,
// input normalisation and the dtype dispatch, so both devices accept exactly the same inputs.
#pragma once

#include <ATen/ATen.h>

namespace rlhf_fast {

// Defined in ops.cpp.
void check_scan_args(const char* op, const at::Tensor& rewards, const at::Tensor& values,
                     const at::Tensor& mask, double gamma, double lam, c10::DeviceType device_type);
at::Tensor kernel_mask(const at::Tensor& mask);

// Rewards and values contiguous and of one dtype (both read as fp32 when they differ: mixed
// precision); pass an undefined `values` for discounted returns.
inline std::pair<at::Tensor, at::Tensor> scan_inputs(const at::Tensor& rewards_in, const at::Tensor& values_in) {
  at::Tensor rewards = rewards_in;
  at::Tensor values = values_in;
  if (values.defined() && rewards.scalar_type() != values.scalar_type()) {
    rewards = rewards.to(at::kFloat);
    values = values.to(at::kFloat);
  }
  return {rewards.contiguous(), values.defined() ? values.contiguous() : values};
}

// Calls fn(scalar_t{}, mask_t{}) with the C++ types of the (already normalised) inputs.
template <typename Fn>
void dispatch_types(at::ScalarType data, at::ScalarType mask, const Fn& fn) {
  auto with_mask = [&](auto data_tag) {
    if (mask == at::kFloat) {
      fn(data_tag, float{});
    } else {
      fn(data_tag, uint8_t{});  // bool and uint8 are one byte; bool is 0/1
    }
  };
  switch (data) {
    case at::kFloat:
      with_mask(float{});
      break;
    case at::kBFloat16:
      with_mask(c10::BFloat16{});
      break;
    case at::kHalf:
      with_mask(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "rlhf_fast: unsupported dtype ", data);
  }
}

}  // namespace rlhf_fast
