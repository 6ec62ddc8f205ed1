// CUDA (dispatch key CUDA) implementation of eclip_kernels::slot_attention_fwd / slot_attention_bwd:
// the same math, outputs and saved tensors as the CPU op (csrc/cpu/slot_attention_cpu.cpp; SPEC section 2).
//
// EXPERIMENTAL: written and resource-checked (scripts/cuda_resources.py) without a GPU; `backend="auto"`
// does not pick these kernels until a GPU has verified them (eclip_kernels/backends.py).
//
// Design. One block of kThreads = 256 threads (8 warps) per (sample, token split[, Dv slice]); the block
// owns all T <= 64 queries of its sample. Tokens are walked in tiles of kTile = 32; per tile:
//
//   phase 1 (per warp, kTokensPerWarp tokens each, one token at a time): the lanes split the feature axis
//     (16-byte loads of the token's k row, and of the q rows, which stay in L1) and accumulate their shares
//     of the dot products with kGroup = 8 queries at a time; three halving shuffle steps and two more leave
//     the full sums spread over the lanes, which write them to the token's row of a (kTile x 64) shared
//     array. Lane l then takes queries l and l + 32: the softmax over the queries of the token is a warp
//     reduction (max, sum) over the lanes, and the token's weights overwrite its row. Per-lane sums over the
//     warp's tokens (S, sum m log m) stay in registers.
//   phase 2 (all threads): products of the (token x query) weights with rows of v, q, k or g_out, 16-byte
//     loads along the feature axis, float32 (float64 for float64 inputs) accumulators in registers:
//     forward out[t] += sum_i m[i,t] v[i]   (T x Dv in registers over all tiles; a Dv slice per block, grid z,
//              where T x Dv exceeds the register budget);
//     backward dv[i] = sum_t A[i,t] g[t],  dk[i] = scale sum_t dlogit[i,t] q[t]   (written per tile),
//              dq[t] += sum_i dlogit[i,t] k[i]   (registers when T x D fits, else a private global slab).
//
// Rows whose length is a multiple of the vector width (16 bytes) and whose tensors are 16-byte aligned take
// the vector path; otherwise every load is an element load with the same chunking, so both paths sum in the
// same order. When the batch alone cannot fill the GPU (B x Dv slices < 2 blocks per multiprocessor) the
// tokens are split across blocks: each split writes its partial sums, and a second kernel adds them in
// split order (deterministic; no atomics anywhere). Every result is bitwise reproducible run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace eclip_kernels {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;                        // tokens per tile
constexpr int kTokensPerWarp = kTile / kWarps;   // phase 1
constexpr int kGroup = 8;                        // queries per step of phase 1
// Per-thread register budgets of phase 2's accumulators: the (query x column) ones that persist over the
// tiles (forward out, backward dq; 48 registers) and the backward's per-tile (token x column) ones (32).
constexpr int kQueryAccBytes = 192;
constexpr int kRowAccBytes = 128;
constexpr int kMaxQueries = 64;               // columns of the shared (token x query) arrays
constexpr int kMaxSplits = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Blocks per multiprocessor the main kernels are compiled for (register cap 65536 / (256 x this)): two with
// float32 accumulators (<= 128 registers), one with float64 ones.
template <class In>
constexpr int min_blocks() {
  return sizeof(In) == 8 ? 1 : 2;
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------------------------------------
// Element types: accumulation type and vector width (elements per 16-byte load).

template <class In>
struct Traits {
  using Acc = float;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(In));
};
template <>
struct Traits<double> {
  using Acc = double;
  static constexpr int kVec = 2;
};

template <class In, int V>
struct alignas(16) Vec {
  In v[V];
};

__device__ __forceinline__ float acc_exp(float x) { return __expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return ::exp(x); }
__device__ __forceinline__ float acc_log(float x) { return __logf(x); }
__device__ __forceinline__ double acc_log(double x) { return ::log(x); }

// x[e] = row[d + e] for e < V; vec: one 16-byte load (the caller guarantees d + V <= n and alignment),
// else element loads with zeros past n.
template <class In, class Acc, int V>
__device__ __forceinline__ void load_chunk(const In* row, int64_t d, int64_t n, bool vec, Acc (&x)[V]) {
  if (vec) {
    const Vec<In, V> p = *reinterpret_cast<const Vec<In, V>*>(row + d);
#pragma unroll
    for (int e = 0; e < V; ++e) x[e] = static_cast<Acc>(p.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) x[e] = d + e < n ? static_cast<Acc>(row[d + e]) : Acc(0);
  }
}

// row[d + e] = mul * x[e] for e < V (and d + e < n on the element path).
template <class In, class Acc, int V>
__device__ __forceinline__ void store_chunk(In* row, int64_t d, int64_t n, bool vec, const Acc (&x)[V], Acc mul) {
  if (vec) {
    Vec<In, V> p;
#pragma unroll
    for (int e = 0; e < V; ++e) p.v[e] = static_cast<In>(x[e] * mul);
    *reinterpret_cast<Vec<In, V>*>(row + d) = p;
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e)
      if (d + e < n) row[d + e] = static_cast<In>(x[e] * mul);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Phase 1 helpers.

// One halving step of the transposing reduction: a[0..2H) -> a[0..H), exchanging with lane ^ O. Afterwards a
// lane with bit O set holds the sums of the upper half's entries, the others those of the lower half.
template <int O, int H, class Acc, int N>
__device__ __forceinline__ void halve(Acc (&a)[N], int lane) {
  const bool upper = (lane & O) != 0;
#pragma unroll
  for (int j = 0; j < H; ++j) {
    const Acc send = upper ? a[j] : a[j + H];
    const Acc keep = upper ? a[j + H] : a[j];
    a[j] = keep + __shfl_xor_sync(kFullMask, send, O);
  }
}

template <class Acc>
__device__ __forceinline__ Acc warp_sum(Acc x) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}
template <class Acc>
__device__ __forceinline__ Acc warp_max(Acc x) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) {
    const Acc y = __shfl_xor_sync(kFullMask, x, o);
    x = y > x ? y : x;
  }
  return x;
}

// row[t] = <x_row, y[t]> over n features for t < T, and 0 for T <= t < round_up(T, kGroup) (one warp; row in
// shared memory). Queries are taken kGroup at a time: lane l accumulates its share (the chunks starting at
// (l + 32 c) * V) of the kGroup dot products, and three halving steps and two shuffles leave lane l with the
// full sum of query g0 + (l >> 2). The caller synchronizes the warp before reading row.
template <class In, class Acc, int V>
__device__ __forceinline__ void token_dots(const In* x_row, const In* y, int64_t n, int T, bool vec, int lane,
                                           Acc* row) {
#pragma unroll 1
  for (int g0 = 0; g0 < T; g0 += kGroup) {  // warp-uniform
    Acc a[kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) a[j] = Acc(0);
    for (int64_t d = static_cast<int64_t>(lane) * V; d < n; d += 32 * V) {
      Acc x[V];
      load_chunk<In, Acc, V>(x_row, d, n, vec, x);
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        if (g0 + j < T) {
          Acc yv[V];
          load_chunk<In, Acc, V>(y + (g0 + j) * n, d, n, vec, yv);
          Acc s = a[j];
#pragma unroll
          for (int e = 0; e < V; ++e) s = fma(x[e], yv[e], s);
          a[j] = s;
        }
      }
    }
    halve<16, 4>(a, lane);
    halve<8, 2>(a, lane);
    halve<4, 1>(a, lane);
    a[0] += __shfl_xor_sync(kFullMask, a[0], 2);
    a[0] += __shfl_xor_sync(kFullMask, a[0], 1);
    if ((lane & 3) == 0) row[g0 + (lane >> 2)] = a[0];
  }
}

// Softmax over the queries of one token, lane l holding queries l and l + 32: from the logits <k_i, q_t> in
// row (shared memory, written by token_dots), M[j] of query lane + 32 j (0 for t >= T), and the token's
// log-sum-exp. The same code runs in the forward and the backward, so both get the same M bit for bit.
template <class Acc>
__device__ __forceinline__ Acc softmax_over_queries(const Acc* row, int T, Acc scale, int lane, Acc (&M)[2]) {
  Acc x[2];
  Acc mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int t = lane + 32 * j;
    x[j] = t < T ? row[t] * scale : Acc(0);
    if (t < T) mx = x[j] > mx ? x[j] : mx;
  }
  mx = warp_max(mx);  // query 0 exists: a real logit
  Acc sum = Acc(0);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int t = lane + 32 * j;
    x[j] = t < T ? acc_exp(x[j] - mx) : Acc(0);
    sum += x[j];
  }
  sum = warp_sum(sum);
  const Acc inv = Acc(1) / sum;
#pragma unroll
  for (int j = 0; j < 2; ++j) M[j] = x[j] * inv;
  return mx + acc_log(sum);
}

// The (query x column-chunk) ownership of phase 2's register accumulators (forward out, backward dq):
// thread tid < groups * col_groups owns queries [qg * per_group, (qg + 1) * per_group) ∩ [0, T) and the
// column chunk (slice * col_groups + cg) * V, with qg = tid / col_groups, cg = tid % col_groups.
struct QcMap {
  int groups;      // query groups
  int per_group;   // queries per group (<= kAccBytes / sizeof(Acc) / V)
  int col_groups;  // column chunks per slice
  int slices;      // slices needed to cover all columns
};

QcMap make_qc_map(int64_t T, int64_t cols, int V, int acc_size) {
  const int64_t max_q = kQueryAccBytes / acc_size / V;  // queries per thread that fit the budget
  const int64_t chunks = std::max<int64_t>(1, (cols + V - 1) / V);
  const int64_t min_groups = (T + max_q - 1) / max_q;
  const int64_t cg = std::min<int64_t>(chunks, kThreads / std::max<int64_t>(1, min_groups));
  QcMap m{};
  m.col_groups = static_cast<int>(cg);
  m.groups = static_cast<int>(kThreads / cg);
  m.per_group = static_cast<int>(std::max<int64_t>(1, (T + m.groups - 1) / m.groups));
  m.slices = static_cast<int>((chunks + cg - 1) / cg);
  TORCH_CHECK(m.per_group <= max_q, "slot_attention (CUDA): internal error: ", m.per_group, " queries per thread");
  return m;
}

template <class In>
constexpr int max_queries_per_thread() {
  return kQueryAccBytes / static_cast<int>(sizeof(typename Traits<In>::Acc)) / Traits<In>::kVec;
}

// Rows per thread of the backward's (token x column-chunk) products, within the same register budget.
template <class In>
constexpr int rows_per_thread() {
  return kRowAccBytes / static_cast<int>(sizeof(typename Traits<In>::Acc)) / Traits<In>::kVec;
}

// ---------------------------------------------------------------------------------------------------------
// Forward.

template <class In>
struct FwdParams {
  const In* q;           // (B,T,D)
  const In* k;           // (B,N,D)
  const In* v;           // (B,N,Dv)
  const bool* mask;      // (B,N) or nullptr
  In* out;               // (B,T,Dv)
  typename Traits<In>::Acc* ent;   // (B,T)
  typename Traits<In>::Acc* S;     // (B,T)
  typename Traits<In>::Acc* lse;   // (B,N)
  typename Traits<In>::Acc* po;    // (splits,B,T,Dv) partial out sums, splits > 1 only
  typename Traits<In>::Acc* pst;   // (splits,B,2,T) partial S and sum m log m, splits > 1 only
  int64_t B, N, D, Dv;
  int T;
  int tiles_per_split, splits;
  QcMap map;
  typename Traits<In>::Acc scale, eps;
  bool vec_d, vec_dv;
};

template <class In>
__global__ void __launch_bounds__(kThreads, min_blocks<In>()) eclip_slot_attention_fwd_kernel(const FwdParams<In> p) {
  using Acc = typename Traits<In>::Acc;
  constexpr int V = Traits<In>::kVec;
  constexpr int QPT = max_queries_per_thread<In>();
  constexpr int TQ = kMaxQueries;
  __shared__ Acc weights[kTile][TQ];      // logits, then m[i][t], of the tile's tokens
  __shared__ Acc partial[2][kWarps][TQ];  // per-warp S and sum m log m
  __shared__ Acc total[2][TQ];

  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int64_t b = blockIdx.x;
  const int split = blockIdx.y, slice = blockIdx.z;
  const int T = p.T;
  const int64_t N = p.N, D = p.D, Dv = p.Dv;
  const In* qb = p.q + b * T * D;
  const In* kb = p.k + b * N * D;
  const In* vb = p.v + b * N * Dv;
  const bool* mb = p.mask ? p.mask + b * N : nullptr;
  const bool writes_stats = slice == 0;

  // phase-2 ownership
  const int qg = tid / p.map.col_groups, cg = tid % p.map.col_groups;
  const int t0 = qg * p.map.per_group;
  const int nq = qg < p.map.groups ? min(p.map.per_group, T - t0) : 0;  // may be <= 0: no queries
  const int64_t c0 = (static_cast<int64_t>(slice) * p.map.col_groups + cg) * V;
  const bool owns = nq > 0 && c0 < Dv;

  // lane l: sums over this warp's tokens for queries l and l + 32
  Acc s_acc[2] = {Acc(0), Acc(0)}, h_acc[2] = {Acc(0), Acc(0)};
  Acc o[QPT][V];
#pragma unroll
  for (int j = 0; j < QPT; ++j)
#pragma unroll
    for (int e = 0; e < V; ++e) o[j][e] = Acc(0);

  const int64_t n_tiles = (N + kTile - 1) / kTile;
  const int64_t tile_lo = static_cast<int64_t>(split) * p.tiles_per_split;
  const int64_t tile_hi = min64(tile_lo + p.tiles_per_split, n_tiles);
  for (int64_t tile = tile_lo; tile < tile_hi; ++tile) {
    const int64_t i0 = tile * kTile;
    const int ni = static_cast<int>(min64(kTile, N - i0));
    // phase 1: weights of the tile's tokens, one warp per token
#pragma unroll 1
    for (int r = 0; r < kTokensPerWarp; ++r) {
      const int il = warp + kWarps * r;
      Acc* row = weights[il];
      Acc m[2] = {Acc(0), Acc(0)};
      if (il < ni) {  // warp-uniform
        const int64_t i = i0 + il;
        token_dots<In, Acc, V>(kb + i * D, qb, D, T, p.vec_d, lane, row);
        __syncwarp();
        Acc M[2];
        const Acc lse = softmax_over_queries(row, T, p.scale, lane, M);
        const bool valid = mb == nullptr || mb[i];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int t = lane + 32 * j;
          m[j] = (valid && t < T) ? M[j] + p.eps : Acc(0);
          s_acc[j] += m[j];
          h_acc[j] += m[j] > Acc(0) ? m[j] * acc_log(m[j]) : Acc(0);  // 0 log 0 = 0
        }
        if (writes_stats && lane == 0) p.lse[b * N + i] = valid ? lse : Acc(0);
      }
      // every column of the row, also past T and for rows past N (zeros): rows are always defined
      row[lane] = m[0];
      row[lane + 32] = m[1];
    }
    __syncthreads();
    // phase 2: out accumulator += m^T v over the tile's tokens
    if (owns) {
#pragma unroll 1
      for (int il = 0; il < ni; ++il) {
        Acc x[V];
        load_chunk<In, Acc, V>(vb + (i0 + il) * Dv, c0, Dv, p.vec_dv, x);
#pragma unroll
        for (int j = 0; j < QPT; ++j) {
          if (j < nq) {
            const Acc w = weights[il][t0 + j];
#pragma unroll
            for (int e = 0; e < V; ++e) o[j][e] = fma(w, x[e], o[j][e]);
          }
        }
      }
    }
    __syncthreads();  // the weights are overwritten by the next tile
  }

  // S and sum m log m of the block: per-warp partials added in warp order
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    partial[0][warp][lane + 32 * j] = s_acc[j];
    partial[1][warp][lane + 32 * j] = h_acc[j];
  }
  __syncthreads();
  if (tid < TQ) {
    Acc s = Acc(0), h = Acc(0);
    for (int w = 0; w < kWarps; ++w) {
      s += partial[0][w][tid];
      h += partial[1][w][tid];
    }
    total[0][tid] = s;
    total[1][tid] = h;
  }
  __syncthreads();

  if (p.splits == 1) {
    if (writes_stats && tid < T) {
      const Acc s = total[0][tid], h = total[1][tid];
      p.S[b * T + tid] = s;
      p.ent[b * T + tid] = s > Acc(0) ? acc_log(s) - h * (Acc(1) / s) : Acc(0);
    }
    if (owns) {
#pragma unroll
      for (int j = 0; j < QPT; ++j) {
        if (j < nq) {
          const Acc s = total[0][t0 + j];
          const Acc inv = s > Acc(0) ? Acc(1) / s : Acc(0);
          store_chunk<In, Acc, V>(p.out + (b * T + t0 + j) * Dv, c0, Dv, p.vec_dv, o[j], inv);
        }
      }
    }
  } else {
    const int64_t part = static_cast<int64_t>(split) * p.B + b;
    if (writes_stats && tid < T) {
      p.pst[(part * 2) * T + tid] = total[0][tid];
      p.pst[(part * 2 + 1) * T + tid] = total[1][tid];
    }
    if (owns) {
#pragma unroll
      for (int j = 0; j < QPT; ++j) {
        if (j < nq) {
          Acc* row = p.po + (part * T + t0 + j) * Dv;
#pragma unroll
          for (int e = 0; e < V; ++e)
            if (c0 + e < Dv) row[c0 + e] = o[j][e];
        }
      }
    }
  }
}

// Adds the token splits' partial sums in split order and normalizes. Grid (B, ceil(T * Dv / kThreads)).
template <class In>
__global__ void __launch_bounds__(kThreads) eclip_slot_attention_fwd_merge_kernel(const FwdParams<In> p) {
  using Acc = typename Traits<In>::Acc;
  const int64_t b = blockIdx.x;
  const int T = p.T;
  const int64_t Dv = p.Dv;
  const int64_t e = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (blockIdx.y == 0 && static_cast<int>(threadIdx.x) < T) {
    const int t = static_cast<int>(threadIdx.x);
    Acc s = Acc(0), h = Acc(0);
    for (int sp = 0; sp < p.splits; ++sp) {
      const int64_t part = static_cast<int64_t>(sp) * p.B + b;
      s += p.pst[(part * 2) * T + t];
      h += p.pst[(part * 2 + 1) * T + t];
    }
    p.S[b * T + t] = s;
    p.ent[b * T + t] = s > Acc(0) ? acc_log(s) - h * (Acc(1) / s) : Acc(0);
  }
  if (e < T * Dv) {
    const int64_t t = e / Dv, c = e % Dv;
    Acc s = Acc(0), o = Acc(0);
    for (int sp = 0; sp < p.splits; ++sp) {
      const int64_t part = static_cast<int64_t>(sp) * p.B + b;
      s += p.pst[(part * 2) * T + t];
      o += p.po[(part * T + t) * Dv + c];
    }
    const Acc inv = s > Acc(0) ? Acc(1) / s : Acc(0);
    p.out[(b * T + t) * Dv + c] = static_cast<In>(o * inv);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward.

template <class In>
struct BwdParams {
  const In* q;
  const In* k;
  const In* v;
  const bool* mask;
  const In* gout;                        // (B,T,Dv) grad of out, input dtype
  const In* out;                         // (B,T,Dv) saved out, input dtype
  const typename Traits<In>::Acc* gent;  // (B,T)
  const typename Traits<In>::Acc* ent;   // (B,T)
  const typename Traits<In>::Acc* S;     // (B,T)
  In* dq;                                // (B,T,D), written here when dq_direct
  In* dk;                                // (B,N,D)
  In* dv;                                // (B,N,Dv)
  typename Traits<In>::Acc* dq_part;     // (splits,B,T,D) unscaled sums, when !dq_direct
  int64_t B, N, D, Dv;
  int T;
  int tiles_per_split, splits;
  QcMap map;        // dq ownership over D
  bool resident;    // map.slices == 1: dq accumulates in registers over the tiles
  bool dq_direct;   // resident and one split: dq is written by this kernel
  typename Traits<In>::Acc scale, eps;
  bool vec_d, vec_dv;
};

// C[i][c] = mul * sum_{t < T} W[i][t] Y[t][c] for the tile's ni rows, c < n, written (input dtype) to rows
// C + i * n. Work items: (block of RT rows, column chunk), column chunks fastest.
template <class In, class Acc, int V, int RT>
__device__ __forceinline__ void tile_rows_times_queries(const Acc (*W)[kMaxQueries], const In* Y, int64_t n, int T, int ni,
                                                        bool vec, Acc mul, In* C, int tid) {
  const int64_t chunks = (n + V - 1) / V;
  const int64_t items = static_cast<int64_t>((ni + RT - 1) / RT) * chunks;
  for (int64_t item = tid; item < items; item += kThreads) {
    const int r0 = static_cast<int>(item / chunks) * RT;
    const int64_t c0 = (item % chunks) * V;
    Acc acc[RT][V];
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int e = 0; e < V; ++e) acc[r][e] = Acc(0);
#pragma unroll 1
    for (int t = 0; t < T; ++t) {
      Acc y[V];
      load_chunk<In, Acc, V>(Y + t * n, c0, n, vec, y);
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        const Acc w = W[r0 + r][t];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[r][e] = fma(w, y[e], acc[r][e]);
      }
    }
#pragma unroll
    for (int r = 0; r < RT; ++r)
      if (r0 + r < ni) store_chunk<In, Acc, V>(C + (r0 + r) * n, c0, n, vec, acc[r], mul);
  }
}

template <class In>
__global__ void __launch_bounds__(kThreads, min_blocks<In>()) eclip_slot_attention_bwd_kernel(const BwdParams<In> p) {
  using Acc = typename Traits<In>::Acc;
  constexpr int V = Traits<In>::kVec;
  constexpr int TQ = kMaxQueries;
  constexpr int QPT = max_queries_per_thread<In>();
  constexpr int RT = rows_per_thread<In>();
  static_assert(kTile % RT == 0, "row blocks must tile the token tile");
  __shared__ Acc wa[kTile][TQ];  // <g_out[t], v[i]>, then A[i][t] = m / S
  __shared__ Acc wd[kTile][TQ];  // logits, then dlogit[i][t] (unscaled)
  __shared__ Acc consts[4][TQ];  // 1/S, log S, g_ent, g_ent (ent - 1)
  __shared__ Acc gdot[TQ];       // <g_out[t], out[t]>

  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int64_t b = blockIdx.x;
  const int split = blockIdx.y;
  const int T = p.T;
  const int64_t N = p.N, D = p.D, Dv = p.Dv;
  const In* qb = p.q + b * T * D;
  const In* kb = p.k + b * N * D;
  const In* vb = p.v + b * N * Dv;
  const In* gb = p.gout + b * T * Dv;
  const bool* mb = p.mask ? p.mask + b * N : nullptr;

  // per-query constants; c[t] = sum_i A dA = <g_out[t], out[t]> + g_ent[t] (ent[t] - 1)
  for (int t = tid; t < TQ; t += kThreads) {
    Acc inv = Acc(0), lg = Acc(0), ge = Acc(0), ce = Acc(0);
    if (t < T) {
      const Acc s = p.S[b * T + t];
      inv = s > Acc(0) ? Acc(1) / s : Acc(0);
      lg = s > Acc(0) ? acc_log(s) : Acc(0);
      ge = p.gent[b * T + t];
      ce = ge * (p.ent[b * T + t] - Acc(1));
    }
    consts[0][t] = inv;
    consts[1][t] = lg;
    consts[2][t] = ge;
    consts[3][t] = ce;
  }
  for (int t = warp; t < T; t += kWarps) {
    Acc s = Acc(0);
    const In* g_row = gb + t * Dv;
    const In* o_row = p.out + (b * T + t) * Dv;
    for (int64_t c = static_cast<int64_t>(lane) * V; c < Dv; c += 32 * V) {
      Acc g[V], o[V];
      load_chunk<In, Acc, V>(g_row, c, Dv, p.vec_dv, g);
      load_chunk<In, Acc, V>(o_row, c, Dv, p.vec_dv, o);
#pragma unroll
      for (int e = 0; e < V; ++e) s = fma(g[e], o[e], s);
    }
    s = warp_sum(s);
    if (lane == 0) gdot[t] = s;
  }
  __syncthreads();
  Acc inv_s[2], log_s[2], g_ent[2], cc[2];  // of queries lane and lane + 32
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int t = lane + 32 * j;
    inv_s[j] = consts[0][t];
    log_s[j] = consts[1][t];
    g_ent[j] = consts[2][t];
    cc[j] = t < T ? gdot[t] + consts[3][t] : Acc(0);
  }

  // dq ownership (over D)
  const int qg = tid / p.map.col_groups, cg = tid % p.map.col_groups;
  const int t0 = qg * p.map.per_group;
  const int nq = qg < p.map.groups ? min(p.map.per_group, T - t0) : 0;
  Acc dqa[QPT][V];
#pragma unroll
  for (int j = 0; j < QPT; ++j)
#pragma unroll
    for (int e = 0; e < V; ++e) dqa[j][e] = Acc(0);
  Acc* slab = p.dq_part ? p.dq_part + (static_cast<int64_t>(split) * p.B + b) * T * D : nullptr;

  const int64_t n_tiles = (N + kTile - 1) / kTile;
  const int64_t tile_lo = static_cast<int64_t>(split) * p.tiles_per_split;
  const int64_t tile_hi = min64(tile_lo + p.tiles_per_split, n_tiles);
  for (int64_t tile = tile_lo; tile < tile_hi; ++tile) {
    const int64_t i0 = tile * kTile;
    const int ni = static_cast<int>(min64(kTile, N - i0));
    // phase 1: A and dlogit of the tile's tokens, one warp per token
#pragma unroll 1
    for (int r = 0; r < kTokensPerWarp; ++r) {
      const int il = warp + kWarps * r;
      Acc A[2] = {Acc(0), Acc(0)}, dl[2] = {Acc(0), Acc(0)};
      if (il < ni) {  // warp-uniform
        const int64_t i = i0 + il;
        token_dots<In, Acc, V>(kb + i * D, qb, D, T, p.vec_d, lane, wd[il]);    // <k[i], q[t]>
        token_dots<In, Acc, V>(vb + i * Dv, gb, Dv, T, p.vec_dv, lane, wa[il]);  // <v[i], g_out[t]>
        __syncwarp();
        Acc M[2];
        softmax_over_queries(wd[il], T, p.scale, lane, M);  // recomputed exactly as the forward did
        const bool valid = mb == nullptr || mb[i];
        Acc mdm[2];
        Acc rsum = Acc(0);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int t = lane + 32 * j;
          if (valid && t < T) {
            const Acc m = M[j] + p.eps;
            A[j] = m * inv_s[j];
            const Acc lg = m > Acc(0) ? acc_log(m) - log_s[j] : Acc(0);  // log A; its factor is 0 where m = 0
            const Acc dA = wa[il][t] - g_ent[j] * (lg + Acc(1));
            // M dm = (M / S)(dA - c): M / S <= 1, so no overflow for tiny S
            mdm[j] = (M[j] * inv_s[j]) * (dA - cc[j]);
          } else {
            M[j] = Acc(0);
            mdm[j] = Acc(0);
          }
          rsum += mdm[j];
        }
        rsum = warp_sum(rsum);  // sum_t M dm
#pragma unroll
        for (int j = 0; j < 2; ++j) dl[j] = mdm[j] - M[j] * rsum;
      }
      // lane l reads and writes only columns l and l + 32 of the rows from here on
      // every column of the rows, also past T and for rows past N (zeros): rows are always defined
      wa[il][lane] = A[0];
      wa[il][lane + 32] = A[1];
      wd[il][lane] = dl[0];
      wd[il][lane + 32] = dl[1];
    }
    __syncthreads();
    // phase 2: dv = A g_out, dk = scale dlogit q (this tile's rows), dq += dlogit^T k
    tile_rows_times_queries<In, Acc, V, RT>(wa, gb, Dv, T, ni, p.vec_dv, Acc(1), p.dv + (b * N + i0) * Dv, tid);
    tile_rows_times_queries<In, Acc, V, RT>(wd, qb, D, T, ni, p.vec_d, p.scale, p.dk + (b * N + i0) * D, tid);
    if (nq > 0) {
#pragma unroll 1
      for (int pass = 0; pass < p.map.slices; ++pass) {
        const int64_t c0 = (static_cast<int64_t>(pass) * p.map.col_groups + cg) * V;
        if (c0 >= D) break;
        if (!p.resident) {  // the slab is private to this block and each element to this thread
#pragma unroll
          for (int j = 0; j < QPT; ++j)
            if (j < nq)
#pragma unroll
              for (int e = 0; e < V; ++e) dqa[j][e] = c0 + e < D ? slab[(t0 + j) * D + c0 + e] : Acc(0);
        }
#pragma unroll 1
        for (int il = 0; il < ni; ++il) {
          Acc x[V];
          load_chunk<In, Acc, V>(kb + (i0 + il) * D, c0, D, p.vec_d, x);
#pragma unroll
          for (int j = 0; j < QPT; ++j) {
            if (j < nq) {
              const Acc w = wd[il][t0 + j];
#pragma unroll
              for (int e = 0; e < V; ++e) dqa[j][e] = fma(w, x[e], dqa[j][e]);
            }
          }
        }
        if (!p.resident) {
#pragma unroll
          for (int j = 0; j < QPT; ++j)
            if (j < nq)
#pragma unroll
              for (int e = 0; e < V; ++e)
                if (c0 + e < D) slab[(t0 + j) * D + c0 + e] = dqa[j][e];
        }
      }
    }
    __syncthreads();  // the weights are overwritten by the next tile
  }

  if (p.resident && nq > 0) {
    const int64_t c0 = static_cast<int64_t>(cg) * V;
    if (c0 < D) {
#pragma unroll
      for (int j = 0; j < QPT; ++j) {
        if (j < nq) {
          if (p.dq_direct) {
            store_chunk<In, Acc, V>(p.dq + (b * T + t0 + j) * D, c0, D, p.vec_d, dqa[j], p.scale);
          } else {
#pragma unroll
            for (int e = 0; e < V; ++e)
              if (c0 + e < D) slab[(t0 + j) * D + c0 + e] = dqa[j][e];
          }
        }
      }
    }
  }
}

// dq = scale * (sum over splits of the slabs), in split order. Grid (B, ceil(T * D / kThreads)).
template <class In>
__global__ void __launch_bounds__(kThreads) eclip_slot_attention_bwd_dq_kernel(const BwdParams<In> p) {
  using Acc = typename Traits<In>::Acc;
  const int64_t b = blockIdx.x;
  const int64_t TD = static_cast<int64_t>(p.T) * p.D;
  const int64_t e = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (e >= TD) return;
  Acc s = Acc(0);
  for (int sp = 0; sp < p.splits; ++sp) s += p.dq_part[(static_cast<int64_t>(sp) * p.B + b) * TD + e];
  p.dq[b * TD + e] = static_cast<In>(s * p.scale);
}

// ---------------------------------------------------------------------------------------------------------
// Host side: checks, allocation, launch.

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_cuda(const Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), "slot_attention (CUDA): ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, "slot_attention (CUDA): ", name, " must be on ", device, " (the device of q), got ",
              t.device());
}

// Shared checks of q, k, v and mask; returns the contiguous mask (or an undefined tensor).
Tensor check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
                    double scale, double eps) {
  check_cuda(q, "q", q.device());
  check_cuda(k, "k", q.device());
  check_cuda(v, "v", q.device());
  TORCH_CHECK(q.dim() == 3, "slot_attention: q must have shape (B, T, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 3, "slot_attention: k must have shape (B, N, D), got ", k.sizes());
  TORCH_CHECK(v.dim() == 3, "slot_attention: v must have shape (B, N, Dv), got ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "slot_attention: q, k and v must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
              ", ", v.scalar_type());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "slot_attention (CUDA): q, k and v must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0),
              "slot_attention: q, k and v must have the same batch size B, got q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK(k.size(2) == q.size(2), "slot_attention: k (B, N, D) and q (B, T, D) must have the same D, got q ",
              q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(v.size(1) == k.size(1), "slot_attention: v (B, N, Dv) and k (B, N, D) must have the same N, got k ",
              k.sizes(), " and v ", v.sizes());
  TORCH_CHECK(q.size(1) <= kMaxQueries, "slot_attention (CUDA): at most ", kMaxQueries, " queries (T), got T=",
              q.size(1), "; use the cpu or reference backend for more");
  TORCH_CHECK(scale > 0.0 && std::isfinite(scale), "slot_attention: scale must be a finite positive number, got ",
              scale);
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), "slot_attention: eps must be finite and >= 0, got ", eps);
  Tensor m;
  if (mask.has_value() && mask->defined()) {
    check_cuda(*mask, "mask", q.device());
    TORCH_CHECK(mask->scalar_type() == at::kBool,
                "slot_attention: mask must be a bool tensor (True = valid token), got ", mask->scalar_type());
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == k.size(0) && mask->size(1) == k.size(1),
                "slot_attention: mask must have shape (B, N) = (", k.size(0), ", ", k.size(1), "), got ",
                mask->sizes());
    m = mask->contiguous();
  }
  return m;
}

void check_shape(const Tensor& t, const char* name, at::IntArrayRef expected, const at::Device& device) {
  check_cuda(t, name, device);
  TORCH_CHECK(t.sizes() == expected, "slot_attention_bwd: ", name, " must have shape ", expected, ", got ",
              t.sizes());
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Rows of n elements of these contiguous tensors take the 16-byte path.
bool vector_rows(int64_t n, int vec, std::initializer_list<const Tensor*> tensors) {
  if (n % vec != 0) return false;
  for (const Tensor* t : tensors)
    if (t->numel() > 0 && !aligned16(*t)) return false;
  return true;
}

// (tiles per split, splits): every split non-empty, at most `want` splits.
std::pair<int, int> token_splits(int64_t n_tiles, int64_t want) {
  want = std::max<int64_t>(1, std::min<int64_t>({want, n_tiles, kMaxSplits}));
  const int64_t per = std::max<int64_t>(1, (n_tiles + want - 1) / want);
  const int64_t splits = std::max<int64_t>(1, (n_tiles + per - 1) / per);
  return {static_cast<int>(per), static_cast<int>(splits)};
}

// Blocks that fill the GPU: 2 per multiprocessor. ECLIP_KERNELS_CUDA_TARGET_BLOCKS overrides it (tests force
// the token-split and single-block paths at small shapes with it).
int64_t target_blocks() {
  if (const char* env = std::getenv("ECLIP_KERNELS_CUDA_TARGET_BLOCKS")) {
    const long long value = std::atoll(env);
    if (value > 0) return value;
  }
  return 2 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

unsigned grid_dim(int64_t n, const char* what) {
  TORCH_CHECK(n >= 1 && n <= 65535, "slot_attention (CUDA): ", what, " of ", n, " blocks is outside the grid limit");
  return static_cast<unsigned>(n);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> slot_attention_fwd_cuda(const Tensor& q_, const Tensor& k_,
                                                                   const Tensor& v_,
                                                                   const std::optional<Tensor>& mask_, double scale,
                                                                   double eps) {
  const Tensor mask = check_inputs(q_, k_, v_, mask_, scale, eps);
  const c10::cuda::CUDAGuard device_guard(q_.device());
  const Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const int64_t B = q.size(0), T = q.size(1), D = q.size(2), N = k.size(1), Dv = v.size(2);
  const auto acc = acc_type(q.scalar_type());
  Tensor out = at::empty({B, T, Dv}, q.options());
  Tensor ent = at::empty({B, T}, q.options().dtype(acc));
  Tensor S = at::empty({B, T}, q.options().dtype(acc));
  Tensor lse = at::empty({B, N}, q.options().dtype(acc));
  if (B == 0) return {out, ent, S, lse};
  if (T == 0) {  // no query: no softmax; lse is defined as 0
    lse.zero_();
    return {out, ent, S, lse};
  }
  TORCH_CHECK(B <= INT32_MAX, "slot_attention (CUDA): batch ", B, " too large");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "slot_attention_fwd_cuda", [&] {
    using In = scalar_t;
    using Acc = typename Traits<In>::Acc;
    constexpr int V = Traits<In>::kVec;
    FwdParams<In> p{};
    p.q = q.const_data_ptr<In>();
    p.k = k.const_data_ptr<In>();
    p.v = v.const_data_ptr<In>();
    p.mask = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
    p.out = out.data_ptr<In>();
    p.ent = ent.data_ptr<Acc>();
    p.S = S.data_ptr<Acc>();
    p.lse = lse.data_ptr<Acc>();
    p.B = B; p.N = N; p.D = D; p.Dv = Dv;
    p.T = static_cast<int>(T);
    p.scale = static_cast<Acc>(scale);
    p.eps = static_cast<Acc>(eps);
    p.vec_d = vector_rows(D, V, {&q, &k});
    p.vec_dv = vector_rows(Dv, V, {&v, &out});
    p.map = make_qc_map(T, Dv, V, sizeof(Acc));
    const int64_t n_tiles = (N + kTile - 1) / kTile;
    // split the tokens only when the batch and the Dv slices leave the GPU under-filled
    const std::pair<int, int> split_plan = token_splits(n_tiles, target_blocks() / (B * p.map.slices));
    const int splits = split_plan.second;
    p.tiles_per_split = split_plan.first;
    p.splits = splits;
    Tensor po, pst;
    if (splits > 1) {
      po = at::empty({splits, B, T, Dv}, q.options().dtype(acc));
      pst = at::empty({splits, B, 2, T}, q.options().dtype(acc));
      p.po = po.data_ptr<Acc>();
      p.pst = pst.data_ptr<Acc>();
    }
    const dim3 grid(static_cast<unsigned>(B), grid_dim(splits, "token splits"), grid_dim(p.map.slices, "Dv slices"));
    const auto stream = at::cuda::getCurrentCUDAStream();
    eclip_slot_attention_fwd_kernel<In><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (splits > 1) {
      const dim3 merge_grid(static_cast<unsigned>(B), grid_dim(std::max<int64_t>(1, (T * Dv + kThreads - 1) / kThreads),
                                                               "merge blocks"));
      eclip_slot_attention_fwd_merge_kernel<In><<<merge_grid, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, ent, S, lse};
}

std::tuple<Tensor, Tensor, Tensor> slot_attention_bwd_cuda(const Tensor& grad_out_, const Tensor& grad_ent_,
                                                           const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                                           const std::optional<Tensor>& mask_, const Tensor& out_,
                                                           const Tensor& ent_, const Tensor& S_, const Tensor& lse_,
                                                           double scale, double eps) {
  const Tensor mask = check_inputs(q_, k_, v_, mask_, scale, eps);
  const int64_t B = q_.size(0), T = q_.size(1), D = q_.size(2), N = k_.size(1), Dv = v_.size(2);
  const auto device = q_.device();
  check_shape(grad_out_, "grad_out", {B, T, Dv}, device);
  check_shape(grad_ent_, "grad_ent", {B, T}, device);
  check_shape(out_, "out", {B, T, Dv}, device);
  check_shape(ent_, "ent", {B, T}, device);
  check_shape(S_, "S", {B, T}, device);
  check_shape(lse_, "lse", {B, N}, device);
  for (const Tensor* t : {&grad_out_, &grad_ent_, &out_, &ent_, &S_, &lse_})
    TORCH_CHECK(at::isFloatingType(t->scalar_type()),
                "slot_attention_bwd: grad_out, grad_ent, out, ent, S and lse must be floating point, got ",
                t->scalar_type());
  const c10::cuda::CUDAGuard device_guard(device);
  const auto dt = q_.scalar_type();
  const auto acc = acc_type(dt);
  const Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const Tensor grad_out = grad_out_.to(dt).contiguous(), out = out_.to(dt).contiguous();
  const Tensor grad_ent = grad_ent_.to(acc).contiguous(), ent = ent_.to(acc).contiguous();
  const Tensor S = S_.to(acc).contiguous();
  Tensor grad_q = at::empty({B, T, D}, q.options());
  Tensor grad_k = at::empty({B, N, D}, q.options());
  Tensor grad_v = at::empty({B, N, Dv}, q.options());
  if (B == 0) return {grad_q, grad_k, grad_v};
  if (T == 0) {  // nothing depends on k or v
    grad_k.zero_();
    grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }
  TORCH_CHECK(B <= INT32_MAX, "slot_attention (CUDA): batch ", B, " too large");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "slot_attention_bwd_cuda", [&] {
    using In = scalar_t;
    using Acc = typename Traits<In>::Acc;
    constexpr int V = Traits<In>::kVec;
    BwdParams<In> p{};
    p.q = q.const_data_ptr<In>();
    p.k = k.const_data_ptr<In>();
    p.v = v.const_data_ptr<In>();
    p.mask = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
    p.gout = grad_out.const_data_ptr<In>();
    p.out = out.const_data_ptr<In>();
    p.gent = grad_ent.const_data_ptr<Acc>();
    p.ent = ent.const_data_ptr<Acc>();
    p.S = S.const_data_ptr<Acc>();
    p.dq = grad_q.data_ptr<In>();
    p.dk = grad_k.data_ptr<In>();
    p.dv = grad_v.data_ptr<In>();
    p.B = B; p.N = N; p.D = D; p.Dv = Dv;
    p.T = static_cast<int>(T);
    p.scale = static_cast<Acc>(scale);
    p.eps = static_cast<Acc>(eps);
    p.vec_d = vector_rows(D, V, {&q, &k, &grad_q, &grad_k});
    p.vec_dv = vector_rows(Dv, V, {&v, &grad_out, &out, &grad_v});
    p.map = make_qc_map(T, D, V, sizeof(Acc));
    p.resident = p.map.slices == 1;
    const int64_t n_tiles = (N + kTile - 1) / kTile;
    const std::pair<int, int> split_plan = token_splits(n_tiles, target_blocks() / B);
    const int splits = split_plan.second;
    p.tiles_per_split = split_plan.first;
    p.splits = splits;
    p.dq_direct = p.resident && splits == 1;
    Tensor dq_part;
    if (!p.dq_direct) {
      // read-add-write by the owning thread when not resident: starts from zeros
      dq_part = p.resident ? at::empty({splits, B, T, D}, q.options().dtype(acc))
                           : at::zeros({splits, B, T, D}, q.options().dtype(acc));
      p.dq_part = dq_part.data_ptr<Acc>();
    }
    const dim3 grid(static_cast<unsigned>(B), grid_dim(splits, "token splits"));
    const auto stream = at::cuda::getCurrentCUDAStream();
    eclip_slot_attention_bwd_kernel<In><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!p.dq_direct) {
      const dim3 dq_grid(static_cast<unsigned>(B),
                         grid_dim(std::max<int64_t>(1, (T * D + kThreads - 1) / kThreads), "dq blocks"));
      eclip_slot_attention_bwd_dq_kernel<In><<<dq_grid, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace eclip_kernels

TORCH_LIBRARY_IMPL(eclip_kernels, CUDA, m) {
  m.impl("slot_attention_fwd", &eclip_kernels::slot_attention_fwd_cuda);
  m.impl("slot_attention_bwd", &eclip_kernels::slot_attention_bwd_cuda);
}
