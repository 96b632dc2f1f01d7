// CUDA kernels for rlhf_fast::gae and rlhf_fast::discounted_returns: one launch, parallel over rows
// and along T.
//
// Both ops are reverse-time linear recurrences. Written as affine maps from the state after step
// t+1 to the state after step t, a row is the composition F_0 . F_1 . ... . F_{T-1} applied to the
// zero state, and compositions of affine maps are associative, so a row is a reverse scan:
//
//   gae        state (nv, lg) = (next value, running advantage); per step, with m = mask_t:
//                nv' = (1-m) nv + m v
//                lg' = m*gamma nv + (m*gamma*lam + 1-m) lg + m (r - v)
//              (that is delta = r + gamma nv - v, gae = delta + gamma lam lg, blended by m)
//              map = (a, g, c, b1, b2):  nv' = a nv + b1,  lg' = g nv + c lg + b2
//   returns    state x (running return):  x' = (m*gamma + 1-m) x + m r     map = (a, b)
//
// A group of GROUP_THREADS threads (1..8 warps) owns one row and walks it in tiles of
// GROUP_THREADS * kVec steps, last tile first. Each thread loads kVec consecutive steps (one vector
// load when the rows are aligned), composes their maps, and the group does a reverse scan of those
// thread maps (warp shuffles, then the warp totals through shared memory). Applying the scanned map
// to the state carried in from the tile on the right gives each thread the state entering its
// steps, from which it re-runs its kVec steps exactly like the sequential loop and writes both
// outputs. The next tile's loads are issued before the current tile's scan, to hide their latency.
//
// Every element is read once and written once; offsets are int64 (B*T may exceed 2^31).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../error_format.h"
#include "../scan_common.h"

#include <cstdint>
#include <tuple>

namespace rlhf_fast {

namespace {

constexpr int kBlockThreads = 256;
constexpr int kWarpsPerBlock = kBlockThreads / 32;
constexpr int kVec = 4;  // consecutive steps per thread per tile (a 16-byte load of fp32)
// At least 4 resident blocks (1024 threads) per SM: caps registers at 64 per thread (no spills at
// sm_80/sm_90) and keeps enough loads in flight to cover HBM latency.
constexpr int kMinBlocksPerSM = 4;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Element loads and stores

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Reads steps [t0, t0 + kVec) of a row as fp32; steps at or past `limit` read as 0 (which makes
// them identity maps: a zero mask carries the state through unchanged).
template <bool kAligned, typename T>
__device__ __forceinline__ void load_steps(const T* __restrict__ row, int64_t t0, int64_t limit,
                                           float (&out)[kVec]) {
  if (kAligned) {
    // Rows are a multiple of kVec long and start aligned, so a thread's steps are all in or all out.
    if (t0 < limit) {
      const Pack<T, kVec> p = *reinterpret_cast<const Pack<T, kVec>*>(row + t0);
#pragma unroll
      for (int j = 0; j < kVec; ++j) out[j] = to_float(p.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) out[j] = 0.f;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = (t0 + j < limit) ? to_float(row[t0 + j]) : 0.f;
  }
}

template <bool kAligned>
__device__ __forceinline__ void store_steps(float* __restrict__ row, int64_t t0, int64_t limit,
                                            const float (&x)[kVec]) {
  if (kAligned) {
    if (t0 < limit) {
      Pack<float, kVec> p;
#pragma unroll
      for (int j = 0; j < kVec; ++j) p.v[j] = x[j];
      *reinterpret_cast<Pack<float, kVec>*>(row + t0) = p;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      if (t0 + j < limit) row[t0 + j] = x[j];
  }
}

// ---------------------------------------------------------------------------------------------
// The two recurrences as affine maps. compose(L, R) = L . R: apply R (the later steps) first.

struct GaeState {
  float nv, lg;
};

struct GaeMap {
  float a, g, c, b1, b2;  // nv' = a nv + b1;  lg' = g nv + c lg + b2

  __device__ __forceinline__ static GaeMap identity() { return {1.f, 0.f, 1.f, 0.f, 0.f}; }
  __device__ __forceinline__ static GaeMap step(float r, float v, float m, float gamma, float gamma_lam) {
    return {1.f - m, m * gamma, m * gamma_lam + (1.f - m), m * v, m * (r - v)};
  }
  __device__ __forceinline__ static GaeMap compose(const GaeMap& L, const GaeMap& R) {
    return {L.a * R.a, L.g * R.a + L.c * R.g, L.c * R.c, L.a * R.b1 + L.b1, L.g * R.b1 + L.c * R.b2 + L.b2};
  }
  __device__ __forceinline__ GaeState apply(const GaeState& s) const {
    return {a * s.nv + b1, g * s.nv + c * s.lg + b2};
  }
  __device__ __forceinline__ GaeMap shfl_down(int delta) const {
    return {__shfl_down_sync(kFullMask, a, delta), __shfl_down_sync(kFullMask, g, delta),
            __shfl_down_sync(kFullMask, c, delta), __shfl_down_sync(kFullMask, b1, delta),
            __shfl_down_sync(kFullMask, b2, delta)};
  }
};

struct ReturnsState {
  float x;
};

struct ReturnsMap {
  float a, b;  // x' = a x + b

  __device__ __forceinline__ static ReturnsMap identity() { return {1.f, 0.f}; }
  __device__ __forceinline__ static ReturnsMap step(float r, float m, float gamma) {
    return {m * gamma + (1.f - m), m * r};
  }
  __device__ __forceinline__ static ReturnsMap compose(const ReturnsMap& L, const ReturnsMap& R) {
    return {L.a * R.a, L.a * R.b + L.b};
  }
  __device__ __forceinline__ ReturnsState apply(const ReturnsState& s) const { return {a * s.x + b}; }
  __device__ __forceinline__ ReturnsMap shfl_down(int delta) const {
    return {__shfl_down_sync(kFullMask, a, delta), __shfl_down_sync(kFullMask, b, delta)};
  }
};

// Shared memory of the group scan: per warp its total map and the state on its right; per group
// the state carried from one tile to the next.
template <typename Map, typename State>
struct ScanSmem {
  Map warp_total[kWarpsPerBlock];
  State warp_right[kWarpsPerBlock];
  State carry[kWarpsPerBlock];  // one per group (at most kWarpsPerBlock groups)
};

// Given this thread's composed map for its kVec steps, returns the state entering those steps
// from the right (the state after the step just past them), and advances the group's carry to the
// state on the left of the whole tile. All threads of the block must call it (it has barriers).
template <int GROUP_THREADS, typename Map, typename State>
__device__ __forceinline__ State group_scan(const Map& thread_map, ScanSmem<Map, State>& smem, int group) {
  constexpr int kWarpsPerGroup = GROUP_THREADS / 32;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;

  // Inclusive reverse scan within the warp: lane i ends with map_i . map_{i+1} . ... . map_31.
  Map suffix = thread_map;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const Map right = suffix.shfl_down(offset);
    if (lane + offset < 32) suffix = Map::compose(suffix, right);
  }
  // Exclusive: lane i needs the steps of lanes i+1..31 only.
  Map exclusive = suffix.shfl_down(1);
  if (lane == 31) exclusive = Map::identity();
  if (lane == 0) smem.warp_total[warp] = suffix;
  __syncthreads();

  // One thread per group walks its (at most 8) warps right to left from the carried state.
  if ((threadIdx.x % GROUP_THREADS) == 0) {
    State s = smem.carry[group];
#pragma unroll
    for (int w = kWarpsPerGroup - 1; w >= 0; --w) {
      const int idx = group * kWarpsPerGroup + w;
      smem.warp_right[idx] = s;
      s = smem.warp_total[idx].apply(s);
    }
    smem.carry[group] = s;
  }
  __syncthreads();
  return exclusive.apply(smem.warp_right[warp]);
}

// ---------------------------------------------------------------------------------------------
// Kernels

template <int GROUP_THREADS, bool kAligned, typename scalar_t, typename mask_t>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    gae_kernel(const scalar_t* __restrict__ rewards, const scalar_t* __restrict__ values,
               const mask_t* __restrict__ mask, float* __restrict__ adv, float* __restrict__ ret, int64_t B,
               int64_t T, float gamma, float gamma_lam) {
  constexpr int kGroups = kBlockThreads / GROUP_THREADS;
  constexpr int64_t kTile = int64_t{GROUP_THREADS} * kVec;
  __shared__ ScanSmem<GaeMap, GaeState> smem;

  const int group = threadIdx.x / GROUP_THREADS;
  const int64_t row = int64_t{blockIdx.x} * kGroups + group;
  // Threads of a row past B still take part in the barriers; they read nothing and write nothing.
  const int64_t limit = row < B ? T : 0;
  const int64_t offset = row < B ? row * T : 0;
  const scalar_t* r_row = rewards + offset;
  const scalar_t* v_row = values + offset;
  const mask_t* m_row = mask + offset;
  float* adv_row = adv + offset;
  float* ret_row = ret + offset;
  const int64_t lane_t = int64_t{threadIdx.x % GROUP_THREADS} * kVec;

  if (threadIdx.x % GROUP_THREADS == 0) smem.carry[group] = {0.f, 0.f};

  const int64_t n_tiles = (T + kTile - 1) / kTile;
  float r[kVec], v[kVec], m[kVec];
  int64_t t0 = (n_tiles - 1) * kTile + lane_t;
  load_steps<kAligned>(r_row, t0, limit, r);
  load_steps<kAligned>(v_row, t0, limit, v);
  load_steps<kAligned>(m_row, t0, limit, m);

  for (int64_t tile = n_tiles - 1; tile >= 0; --tile, t0 -= kTile) {
    // Issue the next (leftward) tile's loads now; they land while this tile is scanned.
    float r_next[kVec], v_next[kVec], m_next[kVec];
    if (tile > 0) {
      load_steps<kAligned>(r_row, t0 - kTile, limit, r_next);
      load_steps<kAligned>(v_row, t0 - kTile, limit, v_next);
      load_steps<kAligned>(m_row, t0 - kTile, limit, m_next);
    }

    GaeMap thread_map = GaeMap::step(r[kVec - 1], v[kVec - 1], m[kVec - 1], gamma, gamma_lam);
#pragma unroll
    for (int j = kVec - 2; j >= 0; --j)
      thread_map = GaeMap::compose(GaeMap::step(r[j], v[j], m[j], gamma, gamma_lam), thread_map);

    GaeState s = group_scan<GROUP_THREADS>(thread_map, smem, group);

    // Re-run this thread's steps sequentially (the CPU kernel's formulas; nvcc contracts them to
    // FMAs and the entering state comes from the scan, so results are close to the CPU's, not bitwise).
    float a_out[kVec], r_out[kVec];
#pragma unroll
    for (int j = kVec - 1; j >= 0; --j) {
      const float delta = r[j] + gamma * s.nv - v[j];
      s.lg = (m[j] * gamma_lam + (1.f - m[j])) * s.lg + m[j] * delta;
      s.nv = m[j] * v[j] + (1.f - m[j]) * s.nv;
      a_out[j] = s.lg;
      r_out[j] = s.lg + v[j];
    }
    store_steps<kAligned>(adv_row, t0, limit, a_out);
    store_steps<kAligned>(ret_row, t0, limit, r_out);

    if (tile > 0) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        r[j] = r_next[j];
        v[j] = v_next[j];
        m[j] = m_next[j];
      }
    }
  }
}

template <int GROUP_THREADS, bool kAligned, typename scalar_t, typename mask_t>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    discounted_returns_kernel(const scalar_t* __restrict__ rewards, const mask_t* __restrict__ mask,
                              float* __restrict__ ret, int64_t B, int64_t T, float gamma) {
  constexpr int kGroups = kBlockThreads / GROUP_THREADS;
  constexpr int64_t kTile = int64_t{GROUP_THREADS} * kVec;
  __shared__ ScanSmem<ReturnsMap, ReturnsState> smem;

  const int group = threadIdx.x / GROUP_THREADS;
  const int64_t row = int64_t{blockIdx.x} * kGroups + group;
  const int64_t limit = row < B ? T : 0;
  const int64_t offset = row < B ? row * T : 0;
  const scalar_t* r_row = rewards + offset;
  const mask_t* m_row = mask + offset;
  float* ret_row = ret + offset;
  const int64_t lane_t = int64_t{threadIdx.x % GROUP_THREADS} * kVec;

  if (threadIdx.x % GROUP_THREADS == 0) smem.carry[group] = {0.f};

  const int64_t n_tiles = (T + kTile - 1) / kTile;
  float r[kVec], m[kVec];
  int64_t t0 = (n_tiles - 1) * kTile + lane_t;
  load_steps<kAligned>(r_row, t0, limit, r);
  load_steps<kAligned>(m_row, t0, limit, m);

  for (int64_t tile = n_tiles - 1; tile >= 0; --tile, t0 -= kTile) {
    float r_next[kVec], m_next[kVec];
    if (tile > 0) {
      load_steps<kAligned>(r_row, t0 - kTile, limit, r_next);
      load_steps<kAligned>(m_row, t0 - kTile, limit, m_next);
    }

    ReturnsMap thread_map = ReturnsMap::step(r[kVec - 1], m[kVec - 1], gamma);
#pragma unroll
    for (int j = kVec - 2; j >= 0; --j) thread_map = ReturnsMap::compose(ReturnsMap::step(r[j], m[j], gamma), thread_map);

    ReturnsState s = group_scan<GROUP_THREADS>(thread_map, smem, group);

    float out[kVec];
#pragma unroll
    for (int j = kVec - 1; j >= 0; --j) {
      s.x = (m[j] * gamma + (1.f - m[j])) * s.x + m[j] * r[j];
      out[j] = s.x;
    }
    store_steps<kAligned>(ret_row, t0, limit, out);

    if (tile > 0) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        r[j] = r_next[j];
        m[j] = m_next[j];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch: pick the group width from T, the aligned path when every row starts on a vector boundary.

// Threads per row: enough for one tile to cover T, between one warp and the whole block.
int group_threads_for(int64_t T) {
  int threads = 32;
  while (threads < kBlockThreads && int64_t{threads} * kVec < T) threads *= 2;
  return threads;
}

bool rows_aligned(int64_t T, std::initializer_list<const at::Tensor*> tensors) {
  if (T % kVec != 0) return false;
  for (const at::Tensor* t : tensors) {
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % (t->element_size() * kVec) != 0) return false;
  }
  return true;
}

// Calls launch(std::integral_constant<int, GROUP_THREADS>, std::bool_constant<kAligned>).
template <typename Fn>
void with_launch_config(int group_threads, bool aligned, const Fn& launch) {
  auto with_aligned = [&](auto group) {
    if (aligned) {
      launch(group, std::true_type{});
    } else {
      launch(group, std::false_type{});
    }
  };
  switch (group_threads) {
    case 32:
      with_aligned(std::integral_constant<int, 32>{});
      break;
    case 64:
      with_aligned(std::integral_constant<int, 64>{});
      break;
    case 128:
      with_aligned(std::integral_constant<int, 128>{});
      break;
    default:
      with_aligned(std::integral_constant<int, 256>{});
      break;
  }
}
int64_t grid_for(int64_t B, int group_threads) {
  const int64_t groups_per_block = kBlockThreads / group_threads;
  const int64_t blocks = (B + groups_per_block - 1) / groups_per_block;
  TORCH_CHECK(blocks <= int64_t{2147483647}, "rlhf_fast: too many rows (", fmt_int(B), ") for one launch");
  return blocks;
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards_in, const at::Tensor& values_in,
                                            const at::Tensor& mask_in, double gamma, double lam) {
  check_scan_args("rlhf_fast::gae", rewards_in, values_in, mask_in, gamma, lam, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(rewards_in.device());
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
  const int group_threads = group_threads_for(T);
  const int64_t blocks = grid_for(B, group_threads);
  const bool aligned = rows_aligned(T, {&rewards, &values, &mask, &adv, &ret});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(rewards.scalar_type(), mask.scalar_type(), [&](auto data_tag, auto mask_tag) {
    using scalar_t = decltype(data_tag);
    using mask_t = decltype(mask_tag);
    with_launch_config(group_threads, aligned, [&](auto group, auto is_aligned) {
      gae_kernel<decltype(group)::value, decltype(is_aligned)::value, scalar_t, mask_t>
          <<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(
              reinterpret_cast<const scalar_t*>(rewards.data_ptr()),
              reinterpret_cast<const scalar_t*>(values.data_ptr()),
              reinterpret_cast<const mask_t*>(mask.data_ptr()), adv.data_ptr<float>(), ret.data_ptr<float>(), B,
              T, g, gl);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {adv, ret};
}

at::Tensor discounted_returns_cuda(const at::Tensor& rewards_in, const at::Tensor& mask_in, double gamma) {
  check_scan_args("rlhf_fast::discounted_returns", rewards_in, at::Tensor(), mask_in, gamma, 0.0,
                  c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(rewards_in.device());
  const at::Tensor rewards = scan_inputs(rewards_in, at::Tensor()).first;
  const at::Tensor mask = kernel_mask(mask_in);
  const int64_t B = rewards.size(0);
  const int64_t T = rewards.size(1);
  at::Tensor ret = at::empty({B, T}, rewards.options().dtype(at::kFloat));
  if (B == 0 || T == 0) return ret;

  const float g = static_cast<float>(gamma);
  const int group_threads = group_threads_for(T);
  const int64_t blocks = grid_for(B, group_threads);
  const bool aligned = rows_aligned(T, {&rewards, &mask, &ret});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(rewards.scalar_type(), mask.scalar_type(), [&](auto data_tag, auto mask_tag) {
    using scalar_t = decltype(data_tag);
    using mask_t = decltype(mask_tag);
    with_launch_config(group_threads, aligned, [&](auto group, auto is_aligned) {
      discounted_returns_kernel<decltype(group)::value, decltype(is_aligned)::value, scalar_t, mask_t>
          <<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(
              reinterpret_cast<const scalar_t*>(rewards.data_ptr()), reinterpret_cast<const mask_t*>(mask.data_ptr()),
              ret.data_ptr<float>(), B, T, g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return ret;
}

}  // namespace
}  // namespace rlhf_fast

TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) {
  m.impl("gae", &rlhf_fast::gae_cuda);
  m.impl("discounted_returns", &rlhf_fast::discounted_returns_cuda);
}
