// CUDA kernel for the row pass of rlhf_fast.ppo_loss_from_logits on sm_90: one read and one write
// of the logits, the row held on chip by a thread-block cluster.
//
// The Triton kernel (kernels/ppo_from_logits.py) reads each [V] row twice: once for the softmax
// statistics, once to write the gradient, because a 128k-wide bf16 row (256 KB) does not fit one
// SM and L2 does not keep it between the passes (ANCHORS.md: 4.29 ms at 16384 x 128256, the
// 2 reads + 1 write floor). Here a row is split over a cluster of C thread blocks (C = 1, 2, 4 or
// 8, from V and the dtype only). Each block
//   1. copies its slice of the row into shared memory (cp.async, 16-byte vectors; the only read
//      of the logits),
//   2. computes the slice's (max m, sum e, sum e (x - m)) with e = exp(x - m) from shared memory
//      and publishes them in its shared memory,
//   3. after a cluster barrier, reads the C partials of its peers through distributed shared
//      memory and merges them in a fixed order (so every block, and every batch, gets the same
//      bits) into lse and the entropy H,
//   4. computes the token's dloss/dlogp and dloss/dH (PPO clip, dual clip, KL estimator; the same
//      math as kernels/_terms.py) and writes its slice of
//          grad_j = a [j == y] - p_j (a - b (log p_j + H))
//      from shared memory in the logits' dtype (the only write).
// The per-token log-prob and entropy go to fp32 [N] outputs; loss and stats are reduced by the
// Triton stats kernel afterwards, exactly as on the Triton path.
//
// Masking matches the Triton kernel: an ignore_index row is not read (log-prob 0, entropy 0,
// gradient 0); a row with weight 0 is read for its statistics but its gradient row is written as
// zeros without the per-element math; a label outside [0, V) gives NaN (never an out-of-bounds
// read). The gradient may be the logits' own storage (inplace_backward): a block overwrites only
// its own slice, after it has copied it, and block 0 reads the label's logit before the cluster
// barrier that precedes the first write.
//
// Requirements (checked on the host, the Python launcher falls back to Triton otherwise): an sm_90+
// device running code compiled for compute_90+, rows 16-byte aligned (V * element size, the row
// strides and the base pointers multiples of 16 bytes), and a slice that fits shared memory.
// Compiled for an older arch (sm_80 in the default arch list) the kernel body is empty and the
// host never launches it.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../error_format.h"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>
#include <tuple>
#include <unordered_map>

namespace rlhf_fast {

namespace {

constexpr int kThreads = 256;
// [[maybe_unused]]: only the sm_90 kernel body uses these; the sm_80 pass compiles it out.
[[maybe_unused]] constexpr int kWarps = kThreads / 32;
constexpr int kVecBytes = 16;
[[maybe_unused]] constexpr unsigned kFullMask = 0xffffffffu;
// Slice size: the smallest cluster whose slices fit kTargetSliceBytes (32 KB: up to 7 resident
// blocks per SM, ~220 KB of logits in flight per SM), else 8 blocks with slices up to
// kMaxSliceBytes (1 block per SM). Wider rows go to the Triton kernel.
constexpr int kMaxCluster = 8;
constexpr int64_t kTargetSliceBytes = 32 * 1024;
constexpr int64_t kMaxSliceBytes = 192 * 1024;

// KL estimator codes: the same numbering as kernels/_terms.py KL_CODES.
[[maybe_unused]] constexpr int kKlNone = 0, kKlK1 = 1, kKlK2 = 2, kKlK3 = 3, kKlAbs = 4;
// Straight-through kinds (k1+, k3+, abs+): code = base + kKlStOffset; the base's value, k2's
// gradient (KL_ST_OFFSET and kl_term in kernels/_terms.py).
[[maybe_unused]] constexpr int kKlStOffset = 4, kKlMaxCode = kKlAbs + kKlStOffset;

struct RowParams {
  const void* logits;
  int64_t logits_stride_b, logits_stride_t;  // elements
  void* grad;
  int64_t grad_stride_b, grad_stride_t;
  const int64_t* labels;       // [N]
  const float* old_logprobs;   // [N]
  const float* advantages;     // [N]
  const float* ref_logprobs;   // [N], read only when kl_kind != kKlNone
  const float* weights;        // [N] aggregation weights, 0 = token does not count
  float* logp_out;             // [N]
  float* entropy_out;          // [N]
  int64_t T, V;
  int64_t slice_vec;           // 16-byte vectors per block (the last block's slice may be shorter)
  int64_t ignore_index;
  float inv_temperature, eps_low, eps_high, dual_clip, kl_coef, kl_clamp, entropy_coef;
  int has_dual, kl_kind, has_kl_clamp;
};

// The device helpers exist only where the kernel has a body (host pass and sm_90+), so compiling
// for sm_80 does not warn about them.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

// ---------------------------------------------------------------------------------------------
// 16-byte vectors of each element type, as fp32

template <typename T>
struct Pair16;

template <>
struct Pair16<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  __device__ __forceinline__ static float2 to_float2(T2 h) { return __bfloat1622float2(h); }
  __device__ __forceinline__ static T2 from_floats(float a, float b) { return __floats2bfloat162_rn(a, b); }
  __device__ __forceinline__ static float to_float(__nv_bfloat16 h) { return __bfloat162float(h); }
};

template <>
struct Pair16<__half> {
  using T2 = __half2;
  __device__ __forceinline__ static float2 to_float2(T2 h) { return __half22float2(h); }
  __device__ __forceinline__ static T2 from_floats(float a, float b) { return __floats2half2_rn(a, b); }
  __device__ __forceinline__ static float to_float(__half h) { return __half2float(h); }
};

// bf16 / fp16: 8 per vector, converted in pairs.
template <typename T>
struct Vec {
  static constexpr int kN = 8;
  using P = Pair16<T>;
  __device__ __forceinline__ static void unpack(const uint4& r, float (&x)[kN]) {
    const typename P::T2* h = reinterpret_cast<const typename P::T2*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = P::to_float2(h[i]);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
  __device__ __forceinline__ static uint4 pack(const float (&x)[kN]) {
    uint4 r;
    typename P::T2* h = reinterpret_cast<typename P::T2*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = P::from_floats(x[2 * i], x[2 * i + 1]);
    return r;
  }
  __device__ __forceinline__ static float scalar(const void* p) { return P::to_float(*static_cast<const T*>(p)); }
};

template <>
struct Vec<float> {
  static constexpr int kN = 4;
  __device__ __forceinline__ static void unpack(const uint4& r, float (&x)[kN]) {
    x[0] = __uint_as_float(r.x);
    x[1] = __uint_as_float(r.y);
    x[2] = __uint_as_float(r.z);
    x[3] = __uint_as_float(r.w);
  }
  __device__ __forceinline__ static uint4 pack(const float (&x)[kN]) {
    return make_uint4(__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]), __float_as_uint(x[3]));
  }
  __device__ __forceinline__ static float scalar(const void* p) { return *static_cast<const float*>(p); }
};

// ---------------------------------------------------------------------------------------------
// Softmax statistics (m, s, t): m = max x, s = sum exp(x - m), t = sum exp(x - m) (x - m).
// An empty set (nothing read, or only -inf) is (-inf, 0, 0); merging never computes -inf - -inf
// (except for an all-NaN slice, whose s is NaN: the result is NaN either way).
// A NaN logit makes s NaN (fmaxf skips NaN in m, the sum does not); tests are "s != 0", never
// "s > 0", so that NaN reaches lse and the row, as in the reference, and is never merged away.

struct RowStats {
  float m, s, t;
};

__device__ __forceinline__ RowStats merge_stats(const RowStats& a, const RowStats& b) {
  const float m = fmaxf(a.m, b.m);
  RowStats r{m, 0.f, 0.f};
  if (a.s != 0.f) {
    const float d = a.m - m;
    const float alpha = __expf(d);
    r.s += alpha * a.s;
    r.t += alpha * (a.t + a.s * d);
  }
  if (b.s != 0.f) {
    const float d = b.m - m;
    const float alpha = __expf(d);
    r.s += alpha * b.s;
    r.t += alpha * (b.t + b.s * d);
  }
  return r;
}

// Block-wide reductions in a fixed order (deterministic): a butterfly within each warp, then the
// warp totals in warp order. `scratch` holds kWarps entries and is free again on return.
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

struct Sum2Op {
  __device__ __forceinline__ float2 operator()(float2 a, float2 b) const { return make_float2(a.x + b.x, a.y + b.y); }
};

__device__ __forceinline__ float shfl_xor(float v, int o) { return __shfl_xor_sync(kFullMask, v, o); }

__device__ __forceinline__ float2 shfl_xor(float2 v, int o) {
  return make_float2(__shfl_xor_sync(kFullMask, v.x, o), __shfl_xor_sync(kFullMask, v.y, o));
}

template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, T* scratch, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, shfl_xor(v, o));
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  T r = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, scratch[w]);
  __syncthreads();
  return r;
}

// ---------------------------------------------------------------------------------------------
// Per-token dloss/dlogp: PPO clipped surrogate (+ dual clip) and the KL estimator, as in
// kernels/_terms.py (ties take the unclipped branch; a NaN log-ratio gives NaN).

__device__ __forceinline__ float ppo_dlogp(float log_ratio, float adv, const RowParams& p) {
  const float ratio = expf(log_ratio);
  const float loss_plain = -adv * ratio;
  const float loss_clipped = -adv * fminf(fmaxf(ratio, 1.f - p.eps_low), 1.f + p.eps_high);
  const bool clipped = loss_clipped > loss_plain;
  float d = clipped ? 0.f : loss_plain;
  if (p.has_dual) {
    // NaN-propagating max, as kernels/_terms.py (tl.maximum with PropagateNan.ALL): fmaxf would
    // return the finite clipped loss for a NaN ratio, and the dual clip could then zero the NaN.
    const float loss = isnan(loss_plain) ? loss_plain : fmaxf(loss_plain, loss_clipped);
    if (adv < 0.f && loss > -p.dual_clip * adv) d = 0.f;
  }
  return d;
}

// q = (e^x - 1 - x) / x^2 by its Taylor series (|x| < 1/4): _k3_series in kernels/_terms.py.
// k3 = x^2 q and 1 - exp(-d) = -(x + x^2 q) with x = -d; the fp32 differences exp(-d) + d - 1
// and 1 - exp(-d) lose most of their digits for small |d|.
__device__ __forceinline__ float k3_series_q(float x) {
  float q = 1.f / 5040 + x * (1.f / 40320);
  q = 1.f / 720 + x * q;
  q = 1.f / 120 + x * q;
  q = 1.f / 24 + x * q;
  q = 1.f / 6 + x * q;
  return 0.5f + x * q;
}

// The KL estimator's value (needed only for the clamp test), as kl_term in kernels/_terms.py.
__device__ __forceinline__ float kl_value(float diff, int kind) {
  if (kind > kKlStOffset) kind -= kKlStOffset;  // straight-through: the base estimator's value
  switch (kind) {
    case kKlK1:
      return diff;
    case kKlK2:
      return 0.5f * diff * diff;
    case kKlK3:
      if (fabsf(diff) < 0.25f) return diff * diff * k3_series_q(-diff);
      return expf(-diff) + diff - 1.f;
    case kKlAbs:
      return fabsf(diff);
    default:
      return 0.f;
  }
}

__device__ __forceinline__ float kl_dlogp(float diff, int kind) {
  if (kind > kKlStOffset) return diff;  // straight-through: k2's derivative
  switch (kind) {
    case kKlK1:
      return 1.f;
    case kKlK2:
      return diff;
    case kKlK3:
      if (fabsf(diff) < 0.25f) return diff * (1.f - diff * k3_series_q(-diff));
      return 1.f - expf(-diff);
    case kKlAbs:
      return diff > 0.f ? 1.f : (diff < 0.f ? -1.f : 0.f);
    default:
      return 0.f;
  }
}

__device__ __forceinline__ float ex2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// cp.async (sm_80+): 16 bytes global -> shared without staging in registers, so a block has its
// whole slice in flight at once.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

// The two halves of a cluster barrier (sm_90), so a block can go on to its gradient while slower
// peers still read its partial; every thread of every block of the cluster executes both.
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

#endif  // !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

// ---------------------------------------------------------------------------------------------
// The kernel: grid = N * C blocks of kThreads, cluster (C, 1, 1); block b handles slice
// b % C of row b / C. Dynamic shared memory: slice_vec 16-byte vectors.

// Launch bounds pin 7 resident blocks per SM (ptxas: 32 registers): at 128256 x bf16 a block uses
// 32064 + ~100 bytes of shared memory plus 1 KB reserved per block by the hardware, 7 of them
// 232,960 of the SM's 233,472 bytes (carveout set to all-shared at setup), so 512 more bytes of
// shared memory per block would drop it to 6.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 7) ppo_rows_cluster_kernel(const RowParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  using V = Vec<scalar_t>;
  constexpr int kN = V::kN;

  extern __shared__ __align__(16) uint4 slice[];
  __shared__ float4 partial;  // (m, s, t, logit at the label) of this block, read by the peers
  __shared__ float2 scratch[kWarps];
  __shared__ float3 row_shared;  // (lse, entropy, logit at the label) of the whole row

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int csize = static_cast<int>(cluster.num_blocks());
  const int64_t row = static_cast<int64_t>(blockIdx.x) / csize;
  const int64_t b = row / p.T;
  const int64_t t_idx = row - b * p.T;
  const scalar_t* row_in =
      static_cast<const scalar_t*>(p.logits) + b * p.logits_stride_b + t_idx * p.logits_stride_t;
  scalar_t* row_out = static_cast<scalar_t*>(p.grad) + b * p.grad_stride_b + t_idx * p.grad_stride_t;

  const int64_t label = p.labels[row];
  const bool ignored = label == p.ignore_index;
  const bool in_range = label >= 0 && label < p.V;
  const float w = p.weights[row];
  const bool counted = w != 0.f && !ignored;  // an ignored row has no slice in shared memory

  const int64_t n_vec = p.V / kN;
  const int64_t vec_begin = static_cast<int64_t>(rank) * p.slice_vec;
  const int64_t vec_end = min(n_vec, vec_begin + p.slice_vec);
  const int n_local = static_cast<int>(max(vec_end - vec_begin, int64_t{0}));
  const uint4* src = reinterpret_cast<const uint4*>(row_in) + vec_begin;

  // 1. the slice into shared memory (an ignore_index row is never read)
  if (!ignored) {
    for (int v = threadIdx.x; v < n_local; v += kThreads) cp_async_16(&slice[v], &src[v]);
  }
  // The label's logit, read by block 0 before the cluster barrier that precedes any gradient write
  // (with inplace_backward the gradient overwrites the logits) and handed to the others in its
  // partial.
  float x_label = 0.f;
  if (threadIdx.x == 0 && rank == 0 && in_range && !ignored) x_label = V::scalar(row_in + label) * p.inv_temperature;
  cp_async_wait_all();
  __syncthreads();

  // 2. this slice's statistics: max, then the sums around it (two passes over shared memory)
  const int n_read = ignored ? 0 : n_local;
  float m_local = -INFINITY;
  for (int v = threadIdx.x; v < n_read; v += kThreads) {
    float x[kN];
    V::unpack(slice[v], x);
#pragma unroll
    for (int k = 0; k < kN; ++k) m_local = fmaxf(m_local, x[k] * p.inv_temperature);
  }
  m_local = block_reduce(m_local, reinterpret_cast<float*>(scratch), MaxOp{});
  float2 st = make_float2(0.f, 0.f);
  {
    // log2 domain: e = 2^d2, d2 = (x / tau - m) log2(e); t is rescaled by ln 2 once, below.
    // m = -inf (only -inf or NaN read) shifts by 0: -inf gives e = 0, NaN gives s = NaN.
    const float c = p.inv_temperature * 1.4426950408889634f;
    const float mc = m_local > -INFINITY ? m_local * 1.4426950408889634f : 0.f;
    for (int v = threadIdx.x; v < n_read; v += kThreads) {
      float x[kN];
      V::unpack(slice[v], x);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        const float d2 = fmaf(x[k], c, -mc);
        const float e = ex2_ftz(d2);  // NaN stays NaN, -inf -> 0
        st.x += e;
        st.y = fmaf(e, fmaxf(d2, -3.0e38f), st.y);  // x = -inf: 0 * finite, not 0 * -inf
      }
    }
    st.y *= 0.6931471805599453f;
  }
  st = block_reduce(st, scratch, Sum2Op{});
  if (threadIdx.x == 0) partial = make_float4(m_local, st.x, st.y, x_label);
  // Only warp 0 wrote (partial) or will read (peers' partials) cluster-visible data: it alone
  // needs release semantics; the MEMBAR.GPU of .release is skipped in warps 1..7.
  if (threadIdx.x < 32) cluster_arrive(); else cluster_arrive_relaxed();
  cluster_wait();

  // 3. merge the cluster's partials, in rank order, in the first warp; lanes >= csize hold the
  // empty set. The label's logit comes from block 0's partial.
  if (threadIdx.x < 32) {
    RowStats mine{-INFINITY, 0.f, 0.f};
    float xl = 0.f;
    if (static_cast<int>(threadIdx.x) < csize) {
      const float4 q = *cluster.map_shared_rank(&partial, static_cast<unsigned>(threadIdx.x));
      mine = RowStats{q.x, q.y, q.z};
      xl = q.w;
    }
    // A fixed butterfly: every lane ends with the merge of all lanes, in the same order for every
    // block of the cluster (and every batch).
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const RowStats other{__shfl_xor_sync(kFullMask, mine.m, o), __shfl_xor_sync(kFullMask, mine.s, o),
                           __shfl_xor_sync(kFullMask, mine.t, o)};
      mine = (threadIdx.x & o) ? merge_stats(other, mine) : merge_stats(mine, other);
    }
    xl = __shfl_sync(kFullMask, xl, 0);
    if (threadIdx.x == 0) {
      // lse = m + log s and H = log s - t / s; where s == 0 (nothing read or only -inf) lse = m
      // (-inf) and H = 0, as row_lse_entropy in kernels/_rows.py; s = NaN gives NaN.
      const float s_safe = mine.s != 0.f ? mine.s : 1.f;
      const float log_s = logf(s_safe);
      row_shared = make_float3(mine.m + log_s, mine.s != 0.f ? log_s - mine.t / s_safe : 0.f, xl);
    }
  }
  // The peers' partials have been read: let them go on (their shared memory must outlive our
  // reads, hence the wait at the very end).
  if (threadIdx.x < 32) { __syncwarp(); cluster_arrive(); } else { cluster_arrive_relaxed(); }
  __syncthreads();
  const float lse = row_shared.x;
  const float ent_raw = row_shared.y;
  const float logp = ignored ? 0.f : (in_range ? row_shared.z - lse : NAN);
  const float ent = ignored ? 0.f : ent_raw;
  if (rank == 0 && threadIdx.x == 0) {
    p.logp_out[row] = logp;
    p.entropy_out[row] = ent;
  }

  // 4. dloss/dlogp (a) and dloss/dH (b) of this token, then the gradient slice
  uint4* dst = reinterpret_cast<uint4*>(row_out) + vec_begin;
  if (!counted) {
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    for (int v = threadIdx.x; v < n_local; v += kThreads) dst[v] = zero;
  } else {
    const float old = p.old_logprobs[row];
    const float adv = p.advantages[row];
    float g_logp = ppo_dlogp(logp - old, adv, p);
    if (p.kl_kind != kKlNone) {
      const float diff = logp - p.ref_logprobs[row];
      float d_kl = kl_dlogp(diff, p.kl_kind);
      // torch.clamp's derivative (kernels/_terms.py clamp_kl): 0 where the KL lies outside
      // [-kl_clamp, kl_clamp] (verl's low_var_kl clamp), kept inside;
      // the straight-through kinds clamp only the value, never their k2 gradient.
      if (p.has_kl_clamp && p.kl_kind <= kKlStOffset) {
        const float kl = kl_value(diff, p.kl_kind);
        // Outside: 0; a NaN kl: 0 * d_kl, torch's chain rule (clamp_kl in kernels/_terms.py).
        if (!(kl >= -p.kl_clamp && kl <= p.kl_clamp)) d_kl = isnan(kl) ? d_kl * 0.f : 0.f;
      }
      g_logp += p.kl_coef * d_kl;
    }
    const float a = w * g_logp * p.inv_temperature;
    const float bcoef = w * p.entropy_coef * p.inv_temperature;
    // grad_j = p_j (b' x_j - K) (+ a at the label), p_j = 2^(x_j c - lse log2 e),
    // K = a - bcoef (ent - lse), b' = bcoef / tau: log p_j + H folded into one FMA.
    const float c = p.inv_temperature * 1.4426950408889634f;
    const float lse2 = lse * 1.4426950408889634f;
    const float K = a - bcoef * (ent - lse);
    const float bp = bcoef * p.inv_temperature;
    const int64_t label_rel = in_range ? label - vec_begin * kN : -1;
    // A non-finite a or K must give a non-finite row (NaN; the Triton kernel gives NaN or +-inf
    // there), never the finite values the clamp below would make: NaN from a label outside
    // [0, V) or NaN logits, inf from an exp overflow of the ratio or the k3 KL.
    const bool nan_row = !isfinite(a) || !isfinite(K);
    for (int v = threadIdx.x; nan_row && v < n_local; v += kThreads) {
      float x[kN];
#pragma unroll
      for (int k = 0; k < kN; ++k) x[k] = NAN;
      dst[v] = V::pack(x);
    }
    for (int v = threadIdx.x; !nan_row && v < n_local; v += kThreads) {
      float x[kN];
      V::unpack(slice[v], x);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        const float prob = ex2_ftz(fmaf(x[k], c, -lse2));
        const float u = fminf(fmaxf(fmaf(bp, x[k], -K), -3.0e38f), 3.0e38f);  // x = -inf: p = 0, 0 * finite
        x[k] = prob * u;
      }
      const int64_t rel = label_rel - static_cast<int64_t>(v) * kN;
      if (rel >= 0 && rel < kN) {
#pragma unroll
        for (int k = 0; k < kN; ++k)
          if (rel == k) x[k] += a;
      }
      __stcs(&dst[v], V::pack(x));  // streaming store: the gradient is not re-read soon
    }
  }
  cluster_wait();
#endif
}

// ---------------------------------------------------------------------------------------------
// Host side

template <typename Fn>
void dispatch_logits_type(at::ScalarType t, const Fn& fn) {
  switch (t) {
    case at::kFloat:
      fn(float{});
      break;
    case at::kBFloat16:
      fn(__nv_bfloat16{});
      break;
    case at::kHalf:
      fn(__half{});
      break;
    default:
      TORCH_CHECK(false, "rlhf_fast::ppo_from_logits_rows: logits must be float32, bfloat16 or float16, got ", t);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks per row for rows of `row_bytes` (0: too wide for shared memory).
int cluster_for_row_bytes(int64_t row_bytes) {
  const int64_t n_vec = row_bytes / kVecBytes;
  for (int c = 1; c <= kMaxCluster; c *= 2) {
    if (ceil_div(n_vec, c) * kVecBytes <= kTargetSliceBytes) return c;
  }
  return ceil_div(n_vec, kMaxCluster) * kVecBytes <= kMaxSliceBytes ? kMaxCluster : 0;
}

template <typename scalar_t>
cudaLaunchConfig_t launch_config(int64_t rows, int cluster, int64_t smem_bytes, cudaStream_t stream,
                                 cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(rows * cluster), 1, 1);
  config.blockDim = dim3(kThreads, 1, 1);
  config.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
  config.stream = stream;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = static_cast<unsigned>(cluster);
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return config;
}

// Whether this build's kernel for scalar_t runs on `device` with `cluster` blocks of `smem_bytes`
// (compute capability >= 9.0, code compiled from compute_90 or newer, and at least one such
// cluster fits the device). Cached: the answer cannot change within a process.
template <typename scalar_t>
bool cluster_launchable(int device, int cluster, int64_t smem_bytes) {
  static std::mutex mutex;
  static std::unordered_map<int64_t, bool> cache;
  const int64_t key = (static_cast<int64_t>(device) << 40) | (static_cast<int64_t>(cluster) << 32) | smem_bytes;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  bool ok = false;
  int major = 0, smem_optin = 0;
  const bool queried = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                       cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) ==
                           cudaSuccess;
  // (1 KB of the opt-in limit is left for the kernel's static shared memory, ~100 bytes.)
  if (queried && major >= 9 && kMaxSliceBytes <= static_cast<int64_t>(smem_optin) - 1024 && smem_bytes <= kMaxSliceBytes) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    const void* fn = reinterpret_cast<const void*>(&ppo_rows_cluster_kernel<scalar_t>);
    cudaFuncAttributes attrs;
    // The dynamic shared-memory limit is set once, to the largest slice any launch may use: a
    // per-launch setting could race between host threads launching different V.
    bool failed = cudaFuncGetAttributes(&attrs, fn) != cudaSuccess;
    if (!failed && attrs.ptxVersion >= 90) {
      failed = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(kMaxSliceBytes)) != cudaSuccess;
      // All of the unified L1/shared memory as shared: the 7 blocks per SM of the launch bounds
      // need 7 x (slice + ~100 B + 1 KB reserved) = 232,960 of 233,472 bytes at V = 128256 bf16.
      if (!failed)
        failed = cudaFuncSetAttribute(fn, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      cudaSharedmemCarveoutMaxShared) != cudaSuccess;
      if (!failed) {
        cudaLaunchAttribute attr;
        cudaLaunchConfig_t config = launch_config<scalar_t>(1, cluster, smem_bytes, nullptr, &attr);
        int n_clusters = 0;
        failed = cudaOccupancyMaxActiveClusters(&n_clusters, fn, &config) != cudaSuccess;
        ok = !failed && n_clusters > 0;
      }
    }
    // A refusal above is an answer, not a sticky error for the caller (cleared only when one of
    // these calls failed, so an unrelated pending error is left for its owner).
    if (failed) (void)cudaGetLastError();
  }
  cache.emplace(key, ok);
  return ok;
}

}  // namespace

// Blocks per row the cluster kernel would use for rows of V elements of `elem_size` bytes on CUDA
// device `device`; 0 when it cannot run there (pre-sm_90 device or build, rows not a whole number
// of 16-byte vectors, rows too wide). Exposed to Python as rlhf_fast._C.ppo_rows_cluster_size.
int64_t ppo_rows_cluster_size(int64_t V, int64_t elem_size, int64_t device) {
  if (V <= 0 || (elem_size != 4 && elem_size != 2) || (V * elem_size) % kVecBytes != 0) return 0;
  const int cluster = cluster_for_row_bytes(V * elem_size);
  if (cluster == 0) return 0;
  const int64_t smem = ceil_div(V * elem_size / kVecBytes, cluster) * kVecBytes;
  const bool ok = elem_size == 4 ? cluster_launchable<float>(static_cast<int>(device), cluster, smem)
                                 : cluster_launchable<__nv_bfloat16>(static_cast<int>(device), cluster, smem) &&
                                       cluster_launchable<__half>(static_cast<int>(device), cluster, smem);
  return ok ? cluster : 0;
}

namespace {

void check_vector(const char* name, const at::Tensor& t, int64_t n, const at::Tensor& logits, at::ScalarType dtype) {
  TORCH_CHECK(t.device() == logits.device(), "rlhf_fast::ppo_from_logits_rows: ", name, " is on ", fmt_device(t.device()),
              " but logits is on ", fmt_device(logits.device()));
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.numel() == n, "rlhf_fast::ppo_from_logits_rows: ",
              name, " must be a contiguous ", dtype, " tensor of ", fmt_int(n), " elements, got ", t.scalar_type(), " ",
              fmt_shape(t.sizes()));
}

bool aligned16(const at::Tensor& t) {
  const int64_t e = t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % kVecBytes == 0 && (t.size(-1) * e) % kVecBytes == 0 &&
         (t.stride(0) * e) % kVecBytes == 0 && (t.stride(1) * e) % kVecBytes == 0;
}

void ppo_from_logits_rows_cuda(const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& labels,
                               const at::Tensor& old_logprobs, const at::Tensor& advantages,
                               const std::optional<at::Tensor>& ref_logprobs, const at::Tensor& weights,
                               const at::Tensor& logp, const at::Tensor& entropy, double inv_temperature,
                               int64_t ignore_index, double eps_low, double eps_high, std::optional<double> dual_clip,
                               double kl_coef, int64_t kl_kind, std::optional<double> kl_clamp, double entropy_coef,
                               int64_t cluster) {
  const char* op = "rlhf_fast::ppo_from_logits_rows";
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 3, op, ": logits must be a 3-D [B, T, V] CUDA tensor, got ",
              fmt_shape(logits.sizes()), " on ", fmt_device(logits.device()));
  TORCH_CHECK(grad.device() == logits.device() && grad.sizes() == logits.sizes() &&
                  grad.scalar_type() == logits.scalar_type(),
              op, ": grad must match logits in shape, dtype and device");
  TORCH_CHECK(logits.stride(2) == 1 && grad.stride(2) == 1, op, ": logits and grad need last stride 1");
  TORCH_CHECK(aligned16(logits) && aligned16(grad), op,
              ": logits and grad rows must be 16-byte aligned (base pointer, row strides, V * element size)");
  TORCH_CHECK(kl_kind >= kKlNone && kl_kind <= kKlMaxCode && kl_kind != kKlK2 + kKlStOffset, op,
              ": kl_kind must be a code 0..5, 7 or 8, got ", fmt_int(kl_kind));
  TORCH_CHECK(kl_kind == kKlNone || ref_logprobs.has_value(), op, ": kl_kind != 0 needs ref_logprobs");
  TORCH_CHECK(cluster == 1 || cluster == 2 || cluster == 4 || cluster == 8, op, ": cluster must be 1, 2, 4 or 8, got ",
              fmt_int(cluster));
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  const int64_t N = B * T;
  check_vector("labels", labels, N, logits, at::kLong);
  check_vector("old_logprobs", old_logprobs, N, logits, at::kFloat);
  check_vector("advantages", advantages, N, logits, at::kFloat);
  check_vector("weights", weights, N, logits, at::kFloat);
  check_vector("logp", logp, N, logits, at::kFloat);
  check_vector("entropy", entropy, N, logits, at::kFloat);
  if (ref_logprobs.has_value()) check_vector("ref_logprobs", *ref_logprobs, N, logits, at::kFloat);
  if (N == 0 || V == 0) return;
  TORCH_CHECK(N * cluster <= int64_t{2147483647}, op, ": too many rows (", fmt_int(N), ") for one launch");

  const c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t elem = logits.element_size();
  const int64_t n_vec = V * elem / kVecBytes;
  const int64_t slice_vec = ceil_div(n_vec, cluster);
  const int64_t smem = slice_vec * kVecBytes;
  TORCH_CHECK(smem <= kMaxSliceBytes, op, ": a slice of ", fmt_int(smem), " bytes (V = ", fmt_int(V), ", cluster ",
              fmt_int(cluster), ") exceeds ", fmt_int(kMaxSliceBytes), " bytes of shared memory");

  RowParams p;
  p.logits = logits.data_ptr();
  p.logits_stride_b = logits.stride(0);
  p.logits_stride_t = logits.stride(1);
  p.grad = grad.data_ptr();
  p.grad_stride_b = grad.stride(0);
  p.grad_stride_t = grad.stride(1);
  p.labels = labels.data_ptr<int64_t>();
  p.old_logprobs = old_logprobs.data_ptr<float>();
  p.advantages = advantages.data_ptr<float>();
  p.ref_logprobs = ref_logprobs.has_value() ? ref_logprobs->data_ptr<float>() : nullptr;
  p.weights = weights.data_ptr<float>();
  p.logp_out = logp.data_ptr<float>();
  p.entropy_out = entropy.data_ptr<float>();
  p.T = T;
  p.V = V;
  p.slice_vec = slice_vec;
  p.ignore_index = ignore_index;
  p.inv_temperature = static_cast<float>(inv_temperature);
  p.eps_low = static_cast<float>(eps_low);
  p.eps_high = static_cast<float>(eps_high);
  p.has_dual = dual_clip.has_value() ? 1 : 0;
  p.dual_clip = dual_clip.has_value() ? static_cast<float>(*dual_clip) : 0.f;
  p.kl_coef = static_cast<float>(kl_coef);
  p.kl_kind = static_cast<int>(kl_kind);
  p.has_kl_clamp = kl_clamp.has_value() ? 1 : 0;
  p.kl_clamp = kl_clamp.has_value() ? static_cast<float>(*kl_clamp) : 0.f;
  p.entropy_coef = static_cast<float>(entropy_coef);

  const int device = logits.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_logits_type(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    TORCH_CHECK(cluster_launchable<scalar_t>(device, static_cast<int>(cluster), smem), op,
                ": the cluster kernel cannot run here (needs an sm_90+ GPU, a build with compute_90+ code, and ",
                fmt_int(cluster), " resident blocks of ", fmt_int(smem), " bytes of shared memory)");
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t config = launch_config<scalar_t>(N, static_cast<int>(cluster), smem, stream, &attr);
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, ppo_rows_cluster_kernel<scalar_t>, p));
  });
}

}  // namespace
}  // namespace rlhf_fast

TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) {
  m.impl("ppo_from_logits_rows", &rlhf_fast::ppo_from_logits_rows_cuda);
}
