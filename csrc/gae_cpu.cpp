// CPU kernels for rlhf_fast::gae and rlhf_fast::discounted_returns.
//
// Rows are independent: at::parallel_for splits them across threads. Within a row the recurrence
// runs backwards over T one step at a time in fp32; with a 0/1 mask the results are bitwise those
// of the reference loop. One row alone is bound by the latency of its loop-carried chain, so each
// thread advances kRows rows together.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "scan_common.h"

#include <algorithm>
#include <tuple>
#include <type_traits>

namespace rlhf_fast {

namespace {

// Rows scanned side by side by one thread. Measured at 256 x {1000, 1024, 4096}: two rows ran
// fastest (about 1.25x one row); four or more stall on 4K aliasing when rows are a multiple of
// 1024 fp32 long (a page apart), and staging rows through a transposed [step][row] buffer, which
// would let the compiler vectorise across rows, costs more stores than it saves.
constexpr int kRows = 2;

template <int N, typename scalar_t, typename mask_t>
void gae_rows(const scalar_t* __restrict__ rewards, const scalar_t* __restrict__ values,
              const mask_t* __restrict__ mask, float* __restrict__ adv, float* __restrict__ ret, int64_t row0,
              int64_t T, float gamma, float gamma_lam) {
  float next_value[N] = {};
  float last_gae[N] = {};
  for (int64_t t = T - 1; t >= 0; --t) {
    for (int k = 0; k < N; ++k) {
      const int64_t i = (row0 + k) * T + t;
      const float r = static_cast<float>(rewards[i]);
      const float v = static_cast<float>(values[i]);
      const float m = static_cast<float>(mask[i]);
      const float delta = r + gamma * next_value[k] - v;
      // The reference's  lastgae = m (delta + gamma lam lastgae) + (1 - m) lastgae  written as
      // lastgae = keep * lastgae + m delta: one multiply-add on the loop-carried chain instead of
      // four dependent operations. For a 0/1 mask both forms give the same bits.
      last_gae[k] = (m * gamma_lam + (1.f - m)) * last_gae[k] + m * delta;
      next_value[k] = m * v + (1.f - m) * next_value[k];
      adv[i] = last_gae[k];
      ret[i] = last_gae[k] + v;
    }
  }
}

template <int N, typename scalar_t, typename mask_t>
void returns_rows(const scalar_t* __restrict__ rewards, const mask_t* __restrict__ mask, float* __restrict__ ret,
                  int64_t row0, int64_t T, float gamma) {
  float running[N] = {};
  for (int64_t t = T - 1; t >= 0; --t) {
    for (int k = 0; k < N; ++k) {
      const int64_t i = (row0 + k) * T + t;
      const float m = static_cast<float>(mask[i]);
      // m (r + gamma running) + (1 - m) running  as  keep * running + m r  (same bits for 0/1 masks).
      running[k] = (m * gamma + (1.f - m)) * running[k] + m * static_cast<float>(rewards[i]);
      ret[i] = running[k];
    }
  }
}

// Calls fn(row0, std::integral_constant<int, n>) for groups of n == kRows rows (n == 1 for a last
// odd row), split across threads; the grain keeps about 64K elements per task.
template <typename Fn>
void for_each_row_group(int64_t B, int64_t T, const Fn& fn) {
  const int64_t groups = (B + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, T * kRows));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t grp = begin; grp < end; ++grp) {
      const int64_t row0 = grp * kRows;
      if (row0 + kRows <= B) {
        fn(row0, std::integral_constant<int, kRows>{});
      } else {
        for (int64_t row = row0; row < B; ++row) fn(row, std::integral_constant<int, 1>{});
      }
    }
  });
}
std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards_in, const at::Tensor& values_in,
                                           const at::Tensor& mask_in, double gamma, double lam) {
  check_scan_args("rlhf_fast::gae", rewards_in, values_in, mask_in, gamma, lam, c10::DeviceType::CPU);
  const auto inputs = scan_inputs(rewards_in, values_in);
  const at::Tensor& rewards = inputs.first;
  const at::Tensor& values = inputs.second;
  const at::Tensor mask = kernel_mask(mask_in);
  const int64_t B = rewards.size(0);
  const int64_t T = rewards.size(1);
  auto opts = rewards.options().dtype(at::kFloat);
  at::Tensor adv = at::empty({B, T}, opts);
  at::Tensor ret = at::empty({B, T}, opts);
  if (B == 0 || T == 0) return {adv, ret};

  const float g = static_cast<float>(gamma);
  const float gl = static_cast<float>(gamma * lam);
  dispatch_types(rewards.scalar_type(), mask.scalar_type(), [&](auto data_tag, auto mask_tag) {
    using scalar_t = decltype(data_tag);
    using mask_t = decltype(mask_tag);
    const auto* r = reinterpret_cast<const scalar_t*>(rewards.data_ptr());
    const auto* v = reinterpret_cast<const scalar_t*>(values.data_ptr());
    const auto* m = reinterpret_cast<const mask_t*>(mask.data_ptr());
    float* a = adv.data_ptr<float>();
    float* o = ret.data_ptr<float>();
    for_each_row_group(B, T, [&](int64_t row0, auto n) { gae_rows<decltype(n)::value>(r, v, m, a, o, row0, T, g, gl); });
  });
  return {adv, ret};
}

at::Tensor discounted_returns_cpu(const at::Tensor& rewards_in, const at::Tensor& mask_in, double gamma) {
  check_scan_args("rlhf_fast::discounted_returns", rewards_in, at::Tensor(), mask_in, gamma, 0.0,
                  c10::DeviceType::CPU);
  const at::Tensor rewards = scan_inputs(rewards_in, at::Tensor()).first;
  const at::Tensor mask = kernel_mask(mask_in);
  const int64_t B = rewards.size(0);
  const int64_t T = rewards.size(1);
  at::Tensor ret = at::empty({B, T}, rewards.options().dtype(at::kFloat));
  if (B == 0 || T == 0) return ret;

  const float g = static_cast<float>(gamma);
  dispatch_types(rewards.scalar_type(), mask.scalar_type(), [&](auto data_tag, auto mask_tag) {
    using scalar_t = decltype(data_tag);
    using mask_t = decltype(mask_tag);
    const auto* r = reinterpret_cast<const scalar_t*>(rewards.data_ptr());
    const auto* m = reinterpret_cast<const mask_t*>(mask.data_ptr());
    float* o = ret.data_ptr<float>();
    for_each_row_group(B, T, [&](int64_t row0, auto n) { returns_rows<decltype(n)::value>(r, m, o, row0, T, g); });
  });
  return ret;
}

}  // namespace
}  // namespace rlhf_fast

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("gae", &rlhf_fast::gae_cpu);
  m.impl("discounted_returns", &rlhf_fast::discounted_returns_cpu);
}
