// rlhf_fast._C: operator schemas (the rlhf_fast:: namespace), shared argument checks, and the
// Python module (build information only: the ops are reached through torch.ops.rlhf_fast.*).
//
// Kernels register themselves per device: csrc/gae_cpu.cpp (CPU), csrc/cuda/gae_cuda.cu (CUDA).

#include <torch/extension.h>
#include <torch/library.h>

#include "error_format.h"
#include "scan_common.h"

#include <cmath>

#ifndef RLHF_FAST_CUDA_TARGETS
#define RLHF_FAST_CUDA_TARGETS ""
#endif

namespace rlhf_fast {

namespace {

bool is_value_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_data(const char* op, const char* name, const at::Tensor& t, const at::Tensor& rewards,
                c10::DeviceType device_type) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D [B, T], got shape ", fmt_shape(t.sizes()));
  TORCH_CHECK(t.device().type() == device_type, op, ": ", name, " must be a ",
              c10::DeviceTypeName(device_type), " tensor, got one on ", fmt_device(t.device()));
  TORCH_CHECK(t.device() == rewards.device(), op, ": ", name, " is on ", fmt_device(t.device()),
              " but rewards is on ", fmt_device(rewards.device()));
  TORCH_CHECK(t.sizes() == rewards.sizes(), op, ": ", name, " shape ", fmt_shape(t.sizes()),
              " does not match rewards shape ", fmt_shape(rewards.sizes()));
}

}  // namespace

// Shared by the CPU and CUDA kernels (declared again there): validates the [B, T] arguments of
// gae / discounted_returns and names the argument at fault. `values` may be undefined.
void check_scan_args(const char* op, const at::Tensor& rewards, const at::Tensor& values,
                     const at::Tensor& mask, double gamma, double lam, c10::DeviceType device_type) {
  check_data(op, "rewards", rewards, rewards, device_type);
  TORCH_CHECK(is_value_dtype(rewards.scalar_type()), op,
              ": rewards must be float32, bfloat16 or float16, got ", rewards.scalar_type());
  if (values.defined()) {
    check_data(op, "values", values, rewards, device_type);
    TORCH_CHECK(is_value_dtype(values.scalar_type()), op,
                ": values must be float32, bfloat16 or float16, got ", values.scalar_type());
  }
  check_data(op, "mask", mask, rewards, device_type);
  TORCH_CHECK(!at::isComplexType(mask.scalar_type()), op, ": mask must be bool, integer or float, got ",
              mask.scalar_type());
  TORCH_CHECK(std::isfinite(gamma) && gamma >= 0.0 && gamma <= 1.0, op,
              ": gamma must be a finite number in [0, 1], got ", fmt_float(gamma));
  TORCH_CHECK(std::isfinite(lam) && lam >= 0.0 && lam <= 1.0, op,
              ": lam must be a finite number in [0, 1], got ", fmt_float(lam));
}

// Mask as one of the dtypes the kernels read directly: bool/uint8 (one byte) or float32.
at::Tensor kernel_mask(const at::Tensor& mask) {
  const auto t = mask.scalar_type();
  if (t == at::kBool || t == at::kByte || t == at::kFloat) return mask.contiguous();
  return mask.to(at::kFloat).contiguous();
}

#ifdef RLHF_FAST_WITH_CUDA
// csrc/cuda/ppo_from_logits_cuda.cu
int64_t ppo_rows_cluster_size(int64_t V, int64_t elem_size, int64_t device);
#endif

}  // namespace rlhf_fast

TORCH_LIBRARY(rlhf_fast, m) {
  // The fake (meta) implementations live in Python; torch imports this module when it needs them.
  m.set_python_module("rlhf_fast.advantages");
  // Generalised advantage estimation with a multi-turn mask (masked steps carry the next value
  // and the running advantage through unchanged). Inputs [B, T]; outputs fp32 (advantages, returns).
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // Discounted reward-to-go over counted steps; masked steps carry the running return through.
  m.def("discounted_returns(Tensor rewards, Tensor mask, float gamma) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Row pass of ppo_loss_from_logits on sm_90 (CUDA only; csrc/cuda/ppo_from_logits_cuda.cu):
  // writes grad [B, T, V] (may be logits itself: inplace_backward), logp [N] and entropy [N].
  // Called by the Triton launcher inside the opaque rlhf_fast::ppo_loss_from_logits_fwd custom
  // op, never traced, so it has no fake implementation.
  m.def(
      "ppo_from_logits_rows(Tensor logits, Tensor(a!) grad, Tensor labels, Tensor old_logprobs, "
      "Tensor advantages, Tensor? ref_logprobs, Tensor weights, Tensor(b!) logp, Tensor(c!) entropy, "
      "float inv_temperature, int ignore_index, float eps_low, float eps_high, float? dual_clip, "
      "float kl_coef, int kl_kind, float? kl_clamp, float entropy_coef, int cluster) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "rlhf_fast compiled kernels; the ops live in torch.ops.rlhf_fast";
  module.def(
      "with_cuda",
      []() {
#ifdef RLHF_FAST_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether this build contains the CUDA kernels.");
  module.def(
      "cuda_archs", []() { return std::string(RLHF_FAST_CUDA_TARGETS); },
      "TORCH_CUDA_ARCH_LIST this build was compiled for ('' without CUDA).");
  module.def(
      "ppo_rows_cluster_size",
      [](int64_t V, int64_t elem_size, int64_t device) -> int64_t {
#ifdef RLHF_FAST_WITH_CUDA
        return rlhf_fast::ppo_rows_cluster_size(V, elem_size, device);
#else
        (void)V;
        (void)elem_size;
        (void)device;
        return 0;
#endif
      },
      "Blocks per row of the sm_90 cluster kernel for ppo_loss_from_logits on rows of V elements of "
      "elem_size bytes on CUDA device `device`; 0 when it cannot run there (then Triton runs).");
}
