"""Which load engine reaches the copy wall on decode's paged reads: a CUDA probe of loads alone.

    python bench/decode_loads_probe.py [--out PATH] [--modes cta,cta_epi,ldg,ldg_epi,warp,ldg4]
                                       [--shapes tokens:Hkv:D:splits:group:rows,...]

Session 24 measured, on an H100, decode's split kernel with its arithmetic skipped (`+lo`) at
0.79-0.84 of copy on (1, 32768, 32, 8, 128), while the Triton read probe (bench/sm_balance_probe.py)
with the same CTA shape (4 warps, 64-token tiles, the next tile in flight, 256 programs) read the
same paged bytes at 0.94. The probe loads into registers and its warps never wait for each other;
the kernel copies tiles into shared memory with cp.async and every tile ends at a CTA barrier.
This probe separates the two on the same reads (decode's pool: each 16-token page holds K then V,
shuffled pages), timed like the bench (graph replays of 10 calls), beside the copy bandwidth:

- cta:   the kernel's loader: 3 stages of 64-token K and V tiles, row offsets staged in shared
         memory by threads 0-63, cp.async.cg 16 B, wait_group + __syncthreads per tile.
- warp:  each warp its own 3-stage pipeline of its 16-token K and V tiles (the rows decode's warps
         compute anyway): row offsets by shuffle from lanes 0-15, wait_group + __syncwarp, no CTA
         barrier in the loop. Same shared memory, same bytes in flight.
- warp4: warp with 4 stages.
- ldg:   each warp's 16-row tiles loaded into registers (ld.global.cg 16 B), the next tile issued
         before the current one is used (the Triton probe's 4:64:1).
- ldgst: the kernel's CTA tiles and 3 smem stages (cta's), each tile loaded by 16-byte ld.global.cg
         into one tile of registers per thread and stored to its stage (st.shared) an iteration later:
         a loader the decode kernel can take (ldmatrix stays), one tile of loads in flight per CTA.
- cta_epi, ldg_epi, ldgst_epi: cta, ldg and ldgst, then decode v7's epilogue: each CTA's partial (query rows x D
         floats) to a workspace with its lse, a ticket per group, and the group's last CTA merges the
         group's partials into the output (32 splits at D=128); no split at D=64 (straight to out).
  Their bisection (MODE+BITS, e.g. cta_epi+nomerge): +nofence (no __threadfence), +nomerge (the
  ticket drawn, no merge), +acqrel (one atom.acq_rel.gpu for fence + atomicAdd + fence), +mb32 (the
  merge's loads in batches of 32, not 16), +acqrel_mb32, +writeonly (the partials written only),
  +dsm (session 25: the grid split-fastest in clusters of 8 CTAs, each cluster's 8 partials merged
  through distributed shared memory, every CTA one eighth of them, then the acq_rel ticket and the
  last CTA merging gsplit / 8 partials: 8 KiB read by one SM at (1, 32768) instead of 64).
  Without a split (group 1): +nostore (the partial computed, not stored), +st1 (one 16-byte store
  per CTA): session 25 measured the unsplit epilogue at 2.7-4.5 us of the D=64 bytes' ~48.
- ldg4:  ldg with 4-byte loads (a warp load covers half a row). Triton compiles the probe's loads,
         whose row offsets come from the block table and so are of unknown alignment, to 2-byte
         ld.global.cg (Triton 3.8's PTX, session 24): many small requests, not 16-byte ones.
No timing assertion: a measurement for bench/NOTES.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, device_info, results_path, time_ms, write_json  # noqa: E402

_MODES = {"cta": 0, "warp": 1, "warp4": 2, "ldg": 3, "ldg4": 4, "cta_epi": 5, "ldg_epi": 6, "ldgst": 7, "ldgst_epi": 8}
# the bisection bits of cta_epi / ldg_epi's epilogue (MODE+NAME; see the kernel's `epi`): name -> bits
_EPI = {"nofence": 1, "nomerge": 2, "acqrel": 4, "mb32": 8, "writeonly": 16, "acqrel_mb32": 12, "dsm": 36,
        "nostore": 64, "st1": 128}

_CUDA = r"""
#include <torch/extension.h>
#include <cuda_bf16.h>
#include <c10/cuda/CUDAStream.h>
#include <cstdint>
#include <type_traits>
#include <algorithm>
#include <cooperative_groups.h>

using T = __nv_bfloat16;
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void wait_g() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
__device__ __forceinline__ uint4 ldcg(const T* p) {
  uint4 r;
  asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

// cache: pages of [2][bs][hkv][D] (K then V); grid = splits * hkv (head fastest); block 128.
template <int D, int MODE>
__global__ void __launch_bounds__(128) probe(const T* __restrict__ cache, const int* __restrict__ bt,
                                             unsigned* __restrict__ out, int tokens, int hkv,
                                             long long page_stride, int row_stride, long long v_off, int bs,
                                             float* __restrict__ ws, unsigned* __restrict__ tickets,
                                             float* __restrict__ outf, int gsplit, int rows, int epi) {
  // the loader; 5, 6, 8: cta, ldg, ldgst with decode v7's epilogue
  constexpr int L = MODE == 5 ? 0 : MODE == 6 ? 3 : MODE == 8 ? 7 : MODE;
  constexpr int kRow = D + 8;
  constexpr int CH = D / 8;         // 16-byte chunks per row
  extern __shared__ uint4 smem_u4[];
  T* smem = reinterpret_cast<T*>(smem_u4);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // epi & 32 (dsm): the split fastest in the grid, so that a cluster of 8 CTAs is 8 splits of a head
  const int nsp = gridDim.x / hkv;
  const bool split_fast = (epi & 32) != 0;
  const int head = split_fast ? blockIdx.x / nsp : blockIdx.x % hkv;
  const int split_id = split_fast ? blockIdx.x % nsp : blockIdx.x / hkv;
  const int t0 = split_id * tokens;
  unsigned acc = 0;
  // element offset of token pos's row of this head (its page from the block table)
  auto row_at = [&](int pos) -> long long {
    return (long long)__ldg(bt + pos / bs) * page_stride + (pos % bs) * row_stride + head * D;
  };
  // warp, warp4, ldg, ldg4: lane l's row of warp w's 16 tokens of 64-token tile t (l < 16; 0 past the end)
  auto row_off = [&](int t) -> long long {
    return t < tokens / 64 ? row_at(t0 + t * 64 + warp * 16 + (lane & 15)) : 0;
  };
  // cta and ldgst: the kernel's CTA tiles, 3 smem stages, the row offsets of tile t in slot t % ST
  constexpr int TILE = 64, ST = 3, TE = TILE * kRow, RPP = 128 / CH;
  long long* off_s = reinterpret_cast<long long*>(smem + ST * 2 * TE);
  auto set_off = [&](int t) {
    if (tid < TILE && t < tokens / TILE) off_s[(t % ST) * TILE + tid] = row_at(t0 + t * TILE + tid);
  };
  if constexpr (L == 0) {
    const int ntiles = tokens / TILE;
    auto load = [&](int t) {
      T* ks = smem + (t % ST) * 2 * TE;
      const long long* off = off_s + (t % ST) * TILE;
      for (int i = 0; i < TILE / RPP; ++i) {
        const int r = tid / CH + i * RPP, c = (tid % CH) * 8;
        const long long o = off[r];
        cp16(ks + r * kRow + c, cache + o + c, 16);
        cp16(ks + TE + r * kRow + c, cache + v_off + o + c, 16);
      }
    };
    for (int s = 0; s < ST; ++s) set_off(s);
    __syncthreads();
    for (int s = 0; s < ST - 1; ++s) { if (s < ntiles) load(s); commit(); }
    for (int t = 0; t < ntiles; ++t) {
      wait_g<ST - 2>();
      __syncthreads();
      if (t + ST - 1 < ntiles) load(t + ST - 1);
      commit();
      set_off(t + ST);
      const T* ks = smem + (t % ST) * 2 * TE;
      acc += reinterpret_cast<const unsigned*>(ks)[tid];
    }
  } else if constexpr (L == 7) {
    // ldgst: the kernel's CTA tiles and smem stages, each tile loaded by ld.global.cg (16 B) into one
    // tile of registers per thread (K and V: 16 uint4 at D=128, 8 at D=64), stored to its stage with
    // st.shared an iteration later. Iteration t: barrier (tile t visible; slot (t-1) % ST free), tile
    // t+ST-1's registers to that slot, tile t+ST's loads issued, tile t+ST+1's row offsets written
    // (slot of tile t+1, long read), tile t consumed.
    constexpr int NP = TILE / RPP;
    const int ntiles = tokens / TILE;
    uint4 rk[NP], rv[NP];
    auto ld = [&](int t) {
      const long long* off = off_s + (t % ST) * TILE;
#pragma unroll
      for (int i = 0; i < NP; ++i) {
        const int r = tid / CH + i * RPP, c = (tid % CH) * 8;
        const long long o = off[r];
        rk[i] = ldcg(cache + o + c);
        rv[i] = ldcg(cache + v_off + o + c);
      }
    };
    auto st = [&](int t) {
      T* ks = smem + (t % ST) * 2 * TE;
#pragma unroll
      for (int i = 0; i < NP; ++i) {
        const int r = tid / CH + i * RPP, c = (tid % CH) * 8;
        *reinterpret_cast<uint4*>(ks + r * kRow + c) = rk[i];
        *reinterpret_cast<uint4*>(ks + TE + r * kRow + c) = rv[i];
      }
    };
    for (int s = 0; s < ST; ++s) set_off(s);
    __syncthreads();
    for (int s = 0; s < ST - 1; ++s) if (s < ntiles) { ld(s); st(s); }
    if (ST - 1 < ntiles) ld(ST - 1);
    __syncthreads();          // every thread's reads of tile 0's offsets are done: its slot takes tile ST's
    set_off(ST);
    for (int t = 0; t < ntiles; ++t) {
      __syncthreads();
      if (t + ST - 1 < ntiles) st(t + ST - 1);
      if (t + ST < ntiles) ld(t + ST);
      set_off(t + ST + 1);
      const T* ks = smem + (t % ST) * 2 * TE;
      acc += reinterpret_cast<const unsigned*>(ks)[tid];
    }
  } else if constexpr (L == 1 || L == 2) {
    constexpr int ST = L == 1 ? 3 : 4, TILE = 16, TE = TILE * kRow, RPP = 32 / CH;
    T* base = smem + warp * ST * 2 * TE;
    const int ntiles = tokens / 64;  // tiles of 64 tokens, warp w reads rows 16w..16w+15 of each
    auto load = [&](int t, long long my_off) {
      T* ks = base + (t % ST) * 2 * TE;
      for (int i = 0; i < TILE / RPP; ++i) {
        const int r = lane / CH + i * RPP, c = (lane % CH) * 8;
        const long long o = __shfl_sync(0xffffffffu, my_off, r);
        cp16(ks + r * kRow + c, cache + o + c, 16);
        cp16(ks + TE + r * kRow + c, cache + v_off + o + c, 16);
      }
    };
    long long nxt = row_off(0);
    for (int s = 0; s < ST - 1; ++s) {
      const long long cur = nxt;
      nxt = row_off(s + 1);
      if (s < ntiles) load(s, cur);
      commit();
    }
    for (int t = 0; t < ntiles; ++t) {
      wait_g<ST - 2>();
      __syncwarp();
      if (t + ST - 1 < ntiles) {
        const long long cur = nxt;
        nxt = row_off(t + ST);
        load(t + ST - 1, cur);
      }
      commit();
      const T* ks = base + (t % ST) * 2 * TE;
      acc += reinterpret_cast<const unsigned*>(ks)[lane];
    }
  } else {
    // each warp's 16 K rows then V rows, lane l's load i at byte (i * 32 + l) * W of the 16-row block
    // (W = 16: two rows per warp load, the cp.async modes' pattern; W = 4: half a row)
    constexpr int W = L == 3 ? 16 : 4, RB = D * 2, N = 16 * RB / (32 * W);
    using V = typename std::conditional<W == 16, uint4, unsigned>::type;
    const int ntiles = tokens / 64;
    auto ld = [&](const T* p) -> V {
      if constexpr (W == 16) {
        return ldcg(p);
      } else {
        unsigned r;
        asm volatile("ld.global.cg.u32 %0, [%1];\n" : "=r"(r) : "l"(p));
        return r;
      }
    };
    auto fold = [](const V& x) -> unsigned {
      if constexpr (W == 16) return x.x ^ x.y ^ x.z ^ x.w; else return x;
    };
    V k[N], v[N], k2[N], v2[N];
    auto issue = [&](long long my_off, V (&kk)[N], V (&vv)[N]) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int f = (i * 32 + lane) * W, r = f / RB, c = (f % RB) / 2;
        const long long o = __shfl_sync(0xffffffffu, my_off, r);
        kk[i] = ld(cache + o + c);
        vv[i] = ld(cache + v_off + o + c);
      }
    };
    // two register buffers, unrolled by two (no moves that would wait on a pending load)
    auto eat = [&](const V (&kk)[N], const V (&vv)[N]) {
#pragma unroll
      for (int i = 0; i < N; ++i) acc += fold(kk[i]) ^ fold(vv[i]);
    };
    long long nxt = row_off(1);
    issue(row_off(0), k, v);
    for (int t = 0; t < ntiles; t += 2) {
      const long long o2 = row_off(t + 2);
      if (t + 1 < ntiles) issue(nxt, k2, v2);
      eat(k, v);
      nxt = row_off(t + 3);
      if (t + 2 < ntiles) issue(o2, k, v);
      if (t + 1 < ntiles) eat(k2, v2);
    }
  }
  wait_g<0>();
  if constexpr (MODE == 5 || MODE == 6 || MODE == 8) {
    // decode v7's epilogue (the kernel's, minus its warp merge in shared memory): rows x D floats
    // of this CTA's partial; with gsplit > 1 (blockIdx.x = split * hkv + head, one group per head)
    // into the workspace with its lse, a ticket, and the group's last CTA merges the gsplit
    // partials (16 L2 loads in flight per batch, as merge_split_partials); else straight to out.
    __syncthreads();
    const float a = __uint_as_float((acc & 0x007fffffu) | 0x3f800000u);   // in [1, 2): not NaN
    const int split = split_id;
    float* ws_lse = ws + (long long)gridDim.x * 16 * D;
    // the partials the group's last CTA merges: gsplit, or with dsm one per cluster
    const int np = (epi & 32) ? gsplit / 8 : gsplit;
    if (gsplit == 1) {
      // the unsplit epilogue's bisection: 64 (nostore) no store (a is in [1, 2), never 0: the
      // loads are still consumed), 128 (st1) one float4 per CTA by thread 0
      if (epi & 64) {
        if (a == 0.f) outf[blockIdx.x] = a;
      } else if (epi & 128) {
        if (tid == 0) reinterpret_cast<float4*>(outf)[(long long)blockIdx.x * 16 * (D / 4)] = make_float4(a, a, a, a);
      } else {
        for (int idx = tid; idx < rows * (D / 4); idx += 128)
          reinterpret_cast<float4*>(outf)[(long long)blockIdx.x * 16 * (D / 4) + idx] = make_float4(a, a, a, a);
      }
    } else if (epi & 32) {
      // dsm: the cluster's 8 splits merged through distributed shared memory first. Each CTA's
      // partial (rows x D floats, then rows lse) in its own shared memory; after the cluster's
      // barrier CTA rank k merges the k-th eighth of the rows x D/4 float4 items over the 8 CTAs
      // and writes it as the cluster's partial; a second barrier keeps every CTA's shared memory
      // until the reads are done. The group's last CTA (the ticket below) then merges gsplit / 8
      // partials instead of gsplit.
      namespace cg = cooperative_groups;
      cg::cluster_group cl = cg::this_cluster();
      const int C = static_cast<int>(cl.num_blocks()), rank = static_cast<int>(cl.block_rank());
      float* part = reinterpret_cast<float*>(smem_u4);   // the loader's buffers: free after the barrier above
      for (int idx = tid; idx < rows * (D / 4); idx += 128) {
        reinterpret_cast<float4*>(part)[idx] = make_float4(a, a, a, a);
        if (idx % (D / 4) == 0) part[rows * D + idx / (D / 4)] = a;
      }
      cl.sync();
      const int n = rows * (D / 4), per = (n + C - 1) / C, idx = rank * per + tid;
      if (tid < per && idx < n) {
        const int r = idx / (D / 4), d = (idx % (D / 4)) * 4;
        float M = -INFINITY, W = 0.f;
        float lse[8];
        float4 v[8];
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          const float* p = cl.map_shared_rank(part, c);
          lse[c] = p[rows * D + r];
          v[c] = *reinterpret_cast<const float4*>(p + r * D + d);
          M = fmaxf(M, lse[c]);
        }
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          const float w = exp2f(lse[c] - M);
          W += w; o.x += v[c].x * w; o.y += v[c].y * w; o.z += v[c].z * w; o.w += v[c].w * w;
        }
        const float inv = 1.f / W;
        const long long slot = (long long)(head * 16 + r) * np + split / C;
        *reinterpret_cast<float4*>(ws + slot * D + d) = make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
        if (d == 0) ws_lse[slot] = M + log2f(W);
      }
      cl.sync();
    } else {
      for (int idx = tid; idx < rows * (D / 4); idx += 128) {
        const int r = idx / (D / 4), d = (idx % (D / 4)) * 4;
        const long long slot = (long long)(head * 16 + r) * gsplit + split;
        *reinterpret_cast<float4*>(ws + slot * D + d) = make_float4(a, a, a, a);
        if (d == 0) ws_lse[slot] = a;
      }
    }
    if (gsplit > 1) {
      // epi (bits, a bisection of the epilogue's cost; 0 = the kernel's): 1 no __threadfence,
      // 2 no merge (the ticket still drawn), 4 one atom.acq_rel.gpu instead of fence + atomicAdd +
      // fence, 8 the merge's loads in batches of 32 (one L2 round trip for 32 splits), 16 neither
      // ticket nor merge (the partials written only), 32 (dsm, above) clusters of 8 splits merged
      // through distributed shared memory first
      __shared__ int last_s;
      __syncthreads();
      if (tid == 0) {
        int last = 0;
        if (!(epi & 16)) {
          unsigned prev;
          if (epi & 4) {
            asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;\n" : "=r"(prev) : "l"(tickets + head) : "memory");
          } else {
            if (!(epi & 1)) __threadfence();
            prev = atomicAdd(tickets + head, 1u);
          }
          last = prev == (unsigned)(gsplit - 1);
          if (last) atomicExch(tickets + head, 0u);
          if (!(epi & 5)) __threadfence();
        }
        last_s = last && !(epi & 2);
      }
      __syncthreads();
      auto merge = [&](auto mb) {
        constexpr int MB = decltype(mb)::value;
        for (int idx = tid; idx < rows * (D / 4); idx += 128) {
          const int r = idx / (D / 4), d = (idx % (D / 4)) * 4;
          const long long slot0 = (long long)(head * 16 + r) * np;
          float M = -INFINITY, W = 0.f;
          float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
          for (int s0 = 0; s0 < np; s0 += MB) {
            float lse[MB];
            float4 v[MB];
#pragma unroll
            for (int u = 0; u < MB; ++u) {
              lse[u] = -INFINITY;
              v[u] = make_float4(0.f, 0.f, 0.f, 0.f);
              if (s0 + u < np) {
                lse[u] = __ldcg(ws_lse + slot0 + s0 + u);
                v[u] = __ldcg(reinterpret_cast<const float4*>(ws + (slot0 + s0 + u) * D + d));
              }
            }
            float bm = M;
#pragma unroll
            for (int u = 0; u < MB; ++u) bm = fmaxf(bm, lse[u]);
            const float c = exp2f(M - bm);
            W *= c; o.x *= c; o.y *= c; o.z *= c; o.w *= c;
#pragma unroll
            for (int u = 0; u < MB; ++u) {
              const float w = exp2f(lse[u] - bm);
              W += w; o.x += v[u].x * w; o.y += v[u].y * w; o.z += v[u].z * w; o.w += v[u].w * w;
            }
            M = bm;
          }
          const float inv = 1.f / W;
          reinterpret_cast<float4*>(outf)[((long long)head * 16 + r) * (D / 4) + d / 4] =
              make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
        }
      };
      if (last_s) {
        if (epi & 8)
          merge(std::integral_constant<int, 32>{});
        else
          merge(std::integral_constant<int, 16>{});
      }
    }
  }
  if (acc == 0x9e3779b9u) out[blockIdx.x * 128 + tid] = acc;   // keeps the loads; never true in practice
}

int smem_bytes(int D, int mode) {
  const int kRow = D + 8;
  if (mode == 0 || mode == 5 || mode == 7 || mode == 8) return 3 * 2 * 64 * kRow * 2 + 3 * 64 * 8;
  if (mode == 1) return 4 * 3 * 2 * 16 * kRow * 2;
  if (mode == 2) return 4 * 4 * 2 * 16 * kRow * 2;
  return 0;
}

void run(torch::Tensor cache, torch::Tensor bt, torch::Tensor out, int64_t tokens, int64_t hkv, int64_t D,
         int64_t page_stride, int64_t row_stride, int64_t v_off, int64_t bs, int64_t mode, int64_t splits,
         torch::Tensor ws, torch::Tensor tickets, torch::Tensor outf, int64_t gsplit, int64_t rows, int64_t epi) {
  // dsm (epi & 32): clusters of 8 CTAs, and room for a CTA's partial in shared memory
  const int smem = (epi & 32) ? std::max<int>(smem_bytes(D, mode), 16 * D * 4 + 16 * 4) : smem_bytes(D, mode);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(splits * hkv);
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute cluster[1];
  cluster[0].id = cudaLaunchAttributeClusterDimension;
  cluster[0].val.clusterDim.x = 8;
  cluster[0].val.clusterDim.y = 1;
  cluster[0].val.clusterDim.z = 1;
  cfg.gridDim = grid;
  cfg.blockDim = dim3(128);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = cluster;
  cfg.numAttrs = (epi & 32) ? 1 : 0;
#define LAUNCH(DD, MM)                                                                                       \
  do {                                                                                                        \
    auto k = probe<DD, MM>;                                                                                   \
    cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);                              \
    TORCH_CHECK(cudaLaunchKernelEx(&cfg, k, reinterpret_cast<const T*>(cache.data_ptr()), bt.data_ptr<int>(), \
                                   reinterpret_cast<unsigned*>(out.data_ptr()), tokens, hkv, page_stride,    \
                                   row_stride, v_off, bs, ws.data_ptr<float>(),                              \
                                   reinterpret_cast<unsigned*>(tickets.data_ptr()), outf.data_ptr<float>(),  \
                                   gsplit, rows, epi) == cudaSuccess, "probe launch failed");                \
  } while (0)
  if (D == 128) {
    if (mode == 0) LAUNCH(128, 0); else if (mode == 1) LAUNCH(128, 1); else if (mode == 2) LAUNCH(128, 2);
    else if (mode == 3) LAUNCH(128, 3); else if (mode == 4) LAUNCH(128, 4); else if (mode == 5) LAUNCH(128, 5);
    else if (mode == 6) LAUNCH(128, 6); else if (mode == 7) LAUNCH(128, 7); else LAUNCH(128, 8);
  } else {
    if (mode == 0) LAUNCH(64, 0); else if (mode == 1) LAUNCH(64, 1); else if (mode == 2) LAUNCH(64, 2);
    else if (mode == 3) LAUNCH(64, 3); else if (mode == 4) LAUNCH(64, 4); else if (mode == 5) LAUNCH(64, 5);
    else if (mode == 6) LAUNCH(64, 6); else if (mode == 7) LAUNCH(64, 7); else LAUNCH(64, 8);
  }
  TORCH_CHECK(cudaGetLastError() == cudaSuccess, "probe launch failed");
}
"""

_DECL = ("void run(torch::Tensor cache, torch::Tensor bt, torch::Tensor out, int64_t tokens, int64_t hkv, int64_t D, "
         "int64_t page_stride, int64_t row_stride, int64_t v_off, int64_t bs, int64_t mode, int64_t splits, "
         "torch::Tensor ws, torch::Tensor tickets, torch::Tensor outf, int64_t gsplit, int64_t rows, int64_t epi);")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--modes", default="cta,cta_epi,ldg,ldg_epi,warp,ldg4")
    ap.add_argument("--shapes", default="32768:8:128:32:32:4,262144:2:64:256:1:7",
                    help="tokens:Hkv:D:splits:group:rows (decode's (1, 32768, 32, 8, 128): 32 splits of a group of "
                         "4 query rows per kv head; the bytes of (256, 1024, 14, 2, 64): 512 CTAs, no split, 7 rows)")
    args = ap.parse_args()
    from torch.utils.cpp_extension import load_inline
    mod = load_inline("decode_loads_probe", cpp_sources=_DECL, cuda_sources=_CUDA, functions=["run"],
                      extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a"], verbose=False)
    info = device_info()
    bw = copy_bandwidth()
    print(f"{info['card']}  copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    for shape in args.shapes.split(","):
        ctx, hkv, d, splits, gsplit, qrows = (int(v) for v in shape.split(":"))
        assert gsplit in (1, splits), "group: 1 (each CTA its own group) or the split count (one group per head)"
        bs = 16
        pages = ctx // bs
        one = bs * hkv * d
        cache = torch.randn(pages * 2 * one, device="cuda").to(torch.bfloat16)
        bt = torch.randperm(pages, device="cuda").to(torch.int32)
        nbytes = 2 * ctx * hkv * d * 2
        out = torch.zeros(splits * hkv * 128, dtype=torch.int32, device="cuda")
        ws = torch.empty(splits * hkv * 16 * (d + 1), device="cuda")
        tickets = torch.zeros(hkv, dtype=torch.int32, device="cuda")
        outf = torch.empty(splits * hkv * 16 * d, device="cuda")
        for name in args.modes.split(","):
            base, _, bits = name.partition("+")
            mode, epi = _MODES[base], _EPI[bits] if bits else 0
            if epi & 32:
                assert mode in (5, 6, 8) and gsplit == splits and splits % 8 == 0, \
                    "+dsm: an epilogue mode, one group per head, splits in clusters of 8"
            fn = lambda: mod.run(cache, bt, out, ctx // splits, hkv, d, 2 * one, hkv * d, one, bs, mode, splits,  # noqa: E731
                                 ws, tickets, outf, gsplit, qrows, epi)
            ms = min(time_ms(fn), time_ms(fn))
            row = {"shape": shape, "mode": name, "us": ms * 1e3, "frac_copy_bw": nbytes / (ms * 1e-3) / bw}
            rows.append(row)
            print(f"{shape:>22} {name:>6}: {row['us']:.1f} us, {row['frac_copy_bw']:.3f} of copy")
        del cache
    path = results_path("decode_loads_probe", args.out)
    write_json(path, {**info, "copy_bandwidth_Bps": bw, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
