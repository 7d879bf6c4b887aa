"""How fast bytes stream into the SMs' shared memory, alone and all at once, and how much a cluster's
TMA multicast multiplies it: the numbers a persistent decode layer (NOTES "On paper: where a GEMM at
M = 256 spends its time") is designed from, measured before any such kernel is written.

    python bench/ingest_probe.py [--out bench/results/ingest_probe.json] [--quick]

The kernel: one CTA per SM (its shared memory requested whole), thread 0 streaming a slice of a
buffer into a ring of ``stages`` tiles of ``tile`` bytes by cp.async.bulk (TMA's 1-D form), one
mbarrier per slot; a tile is consumed (its slot released) as soon as it has landed, so the time is
the ingest alone. "split roles": thread 0 only issues and thread 32 (another warp) only waits and
releases, as a warp-specialised kernel does (session 40: one thread doing both read ~0.5 us a copy
whatever its size or the ring's depth). "plain loads": the same slices by ``ld.global.cg`` from
1024 threads, 8 x 16 bytes in flight each (the SMs' load path beside the TMA's). In a cluster of CS CTAs that multicast, CTA rank r fetches the r-th CS-th of each
tile and multicasts it to all CS CTAs: every CTA receives the cluster's whole slice while the L2
serves each byte once (a GEMM's weight tile sent to the CTAs that hold different rows of the
activations). ``mc 0`` with CS > 1 is the same slice fetched by each CTA itself (CS reads of each
byte from the L2). A slot is refilled only once every CTA of the cluster has released it (remote
mbarrier arrives). Cluster launches get only as many clusters as can be resident at once
(``cudaOccupancyMaxActiveClusters``, reported: clusters stay inside a GPC, so CS x clusters may be
fewer than the SMs).

Each CTA stamps its start (after the cluster's barrier) and the landing of its last tile by
%globaltimer; a row reports the last rep's kernel time (events; the stamps are that rep's) and the
least over the reps, the per-CTA ingest rate (bytes received / its own span: median, p10, p90), the
SMs' aggregate receive rate and the rate the L2 served (multicast bytes counted once per cluster).
``warm``: each cluster streams 2 MiB of a 16 MiB buffer (wrapping), read once before the timing,
well inside the 50 MB L2; ``dram``: 8 MiB a cluster of a 1 GiB buffer (132-264 MB a rep, far over
the L2). One CTA alone: 16 MiB (warm) or 64 MiB (dram). A thread that waits on a barrier for 2 s traps (a hang would
otherwise hold the device call): the probe then fails loudly, run it in its own process.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

_DECL = ("std::vector<int64_t> ingest(torch::Tensor src, torch::Tensor stamps, int64_t cluster, int64_t flags, "
         "int64_t tile, int64_t stages, int64_t slice, int64_t grid, int64_t reps, torch::Tensor ms);\n"
         "int64_t max_clusters(int64_t cluster);\n"
         "void plain_loads(torch::Tensor src, torch::Tensor stamps, int64_t slice, int64_t grid, int64_t reps, "
         "torch::Tensor ms);")

_CUDA = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <vector>

constexpr int kSmem = 200 * 1024;   // requested whole: one CTA per SM

__device__ __forceinline__ unsigned su32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ long long now_ns() {
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t) : : "memory");
  return t;
}
__device__ __forceinline__ bool try_wait_parity(unsigned bar, unsigned parity) {
  unsigned done = 0;
  asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
               : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  return done != 0;
}
// Waits for the phase; traps after 2 s (a hang). timer_first (flags & 4, session 40's form): the
// timer read before the first try, at every wait; else only once a first try has failed (a suspect
// for session 40's ~0.5 us a copy: %globaltimer read at every wait).
__device__ __forceinline__ void wait_parity(unsigned bar, unsigned parity, bool timer_first = false) {
  long long t0 = timer_first ? now_ns() : 0;
  if (try_wait_parity(bar, parity)) return;
  if (!timer_first) t0 = now_ns();
  for (unsigned tries = 1;; ++tries) {
    if (try_wait_parity(bar, parity)) break;
    if ((tries & 1023u) == 0 && now_ns() - t0 > 2000000000ll) asm volatile("trap;");   // 2 s: a hang
  }
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// src: the buffer; cluster c (of gridDim.x / CS) streams bytes [c * slice, (c + 1) * slice) of it
// (mod its size), tile by tile. stamps[2 * blockIdx.x + {0, 1}]: the CTA's start, last landing (ns).
// flags: 1 multicast (CS > 1); 2 roles split: thread 0 (warp 0) only issues, thread 32 (warp 1) only
// waits for the landings and releases the slots (the form of a warp-specialised kernel), else
// thread 0 does both in one loop; 4 the timer read at every wait (wait_parity's timer_first).
__global__ void __launch_bounds__(64) ingest_kernel(const char* __restrict__ src, long long src_bytes,
                                                    long long* __restrict__ stamps, int flags, int tile,
                                                    int stages, long long slice) {
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned long long* full = reinterpret_cast<unsigned long long*>(smem);            // [stages]
  unsigned long long* empty = full + stages;                                           // [stages]
  unsigned char* ring = smem + 1024;
  unsigned cs, rank;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(cs));
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  const bool mc = (flags & 1) && cs > 1;
  const bool split = (flags & 2) != 0;
  const bool timer_first = (flags & 4) != 0;
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(su32(full + s)));
      // a slot is free again once every CTA it is written into has released it
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(su32(empty + s)), "r"(mc ? cs : 1u));
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  cluster_sync();
  const long long base = (static_cast<long long>(blockIdx.x / cs) * slice) % src_bytes;
  const int ntiles = static_cast<int>(slice / tile);
  const int part = mc ? tile / static_cast<int>(cs) : tile;   // bytes this CTA fetches of each tile
  const int poff = mc ? static_cast<int>(rank) * part : 0;
  const unsigned short mask = static_cast<unsigned short>((1u << cs) - 1u);
  auto consume = [&](int c) {                   // wait for tile c, release its slot everywhere
    const int s = c % stages;
    wait_parity(su32(full + s), (c / stages) & 1, timer_first);
    if (mc) {
      for (unsigned r = 0; r < cs; ++r) {
        unsigned remote;
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(su32(empty + s)), "r"(r));
        asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(remote) : "memory");
      }
    } else {
      asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(su32(empty + s)) : "memory");
    }
  };
  auto issue = [&](int t) {                     // tile t into slot t % stages, once the slot is free
    const int s = t % stages;
    if (t >= stages) wait_parity(su32(empty + s), ((t / stages) - 1) & 1, timer_first);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(su32(full + s)), "r"(tile)
                 : "memory");
    const long long at = (base + static_cast<long long>(t) * tile) % src_bytes + poff;   // src_bytes % tile == 0
    const unsigned dst = su32(ring + static_cast<size_t>(s) * tile + poff);
    if (mc) {
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1], %2, [%3], %4;"
          ::"r"(dst), "l"(src + at), "r"(part), "r"(su32(full + s)), "h"(mask) : "memory");
    } else {
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                   ::"r"(dst), "l"(src + at), "r"(part), "r"(su32(full + s)) : "memory");
    }
  };
  if (!split) {
    if (threadIdx.x == 0) {
      const long long t0 = now_ns();
      for (int t = 0; t < ntiles + stages - 1; ++t) {
        if (t >= stages - 1) consume(t - (stages - 1));
        if (t < ntiles) issue(t);
      }
      stamps[2 * blockIdx.x] = t0;
      stamps[2 * blockIdx.x + 1] = now_ns();
    }
  } else if (threadIdx.x == 0) {
    stamps[2 * blockIdx.x] = now_ns();
    for (int t = 0; t < ntiles; ++t) issue(t);
  } else if (threadIdx.x == 32) {
    for (int c = 0; c < ntiles; ++c) consume(c);
    stamps[2 * blockIdx.x + 1] = now_ns();
  }
  cluster_sync();   // no CTA leaves while a peer may still write into it or arrive on its barriers
}

static cudaLaunchConfig_t config(int grid, int cluster, cudaLaunchAttribute* attr, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(64);
  cfg.dynamicSmemBytes = kSmem;
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

static void set_attributes(int64_t cluster) {  // the whole shared memory; clusters over 8 where asked
  C10_CUDA_CHECK(cudaFuncSetAttribute(ingest_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  if (cluster > 8)
    C10_CUDA_CHECK(cudaFuncSetAttribute(ingest_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
}

int64_t max_clusters(int64_t cluster) {
  set_attributes(cluster);
  cudaLaunchAttribute attr[1];
  cudaLaunchConfig_t cfg = config(static_cast<int>(cluster), static_cast<int>(cluster), attr, 0);
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&n, ingest_kernel, &cfg));
  return n;
}

// reps launches of `launch()` back to back on `stream`; ms[i] the i-th launch's time (events).
template <typename Launch>
void time_launches(int64_t reps, torch::Tensor ms, cudaStream_t stream, Launch launch) {
  TORCH_CHECK(ms.numel() >= reps && ms.scalar_type() == at::kFloat && !ms.is_cuda(), "probe: ms on the host");
  cudaEvent_t a, b;
  C10_CUDA_CHECK(cudaEventCreate(&a));
  C10_CUDA_CHECK(cudaEventCreate(&b));
  for (int64_t i = 0; i < reps; ++i) {
    C10_CUDA_CHECK(cudaEventRecord(a, stream));
    launch();
    C10_CUDA_CHECK(cudaEventRecord(b, stream));
    C10_CUDA_CHECK(cudaEventSynchronize(b));
    float t = 0.f;
    C10_CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
    ms.data_ptr<float>()[i] = t;
  }
  C10_CUDA_CHECK(cudaEventDestroy(a));
  C10_CUDA_CHECK(cudaEventDestroy(b));
}

// reps launches back to back; ms[i] the i-th launch's time (events). Returns the launch's shape.
std::vector<int64_t> ingest(torch::Tensor src, torch::Tensor stamps, int64_t cluster, int64_t flags, int64_t tile,
                            int64_t stages, int64_t slice, int64_t grid, int64_t reps, torch::Tensor ms) {
  TORCH_CHECK(src.is_cuda() && stamps.is_cuda() && stamps.scalar_type() == at::kLong, "ingest: CUDA tensors");
  TORCH_CHECK(stamps.numel() >= 2 * grid, "ingest: stamps holds 2 per CTA");
  TORCH_CHECK(grid % cluster == 0 && cluster >= 1 && cluster <= 16, "ingest: grid a multiple of the cluster");
  TORCH_CHECK(tile % (16 * cluster) == 0 && slice % tile == 0 && slice >= tile, "ingest: tile / slice shapes");
  TORCH_CHECK(1024 + stages * tile <= kSmem && stages >= 2 && stages <= 64, "ingest: the ring exceeds the smem");
  TORCH_CHECK(src.nbytes() % tile == 0, "ingest: the buffer holds whole tiles");
  set_attributes(cluster);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  cudaLaunchConfig_t cfg = config(static_cast<int>(grid), static_cast<int>(cluster), attr, stream);
  time_launches(reps, ms, stream, [&] {
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, ingest_kernel, static_cast<const char*>(src.data_ptr()),
                                      static_cast<long long>(src.nbytes()), reinterpret_cast<long long*>(stamps.data_ptr<int64_t>()),
                                      static_cast<int>(flags), static_cast<int>(tile), static_cast<int>(stages),
                                      static_cast<long long>(slice)));
  });
  return {grid, cluster, tile, stages, slice};
}

// The same slices read by ordinary loads (ld.global.cg: from the L2, past the L1) into registers:
// 1024 threads a CTA, 8 loads of 16 bytes each in flight per thread (128 KiB a CTA), the bytes
// xor-folded so nothing is dead. The rate of the SMs' load path, beside the TMA's.
__global__ void __launch_bounds__(1024) plain_load_kernel(const int4* __restrict__ src, long long mask16,
                                                          long long* __restrict__ stamps, long long slice16,
                                                          int* __restrict__ sink) {
  __shared__ long long t0;
  if (threadIdx.x == 0) t0 = now_ns();
  __syncthreads();
  const long long base = static_cast<long long>(blockIdx.x) * slice16;
  int acc = 0;
  for (long long i = threadIdx.x; i < slice16; i += 8ll * blockDim.x) {
    int4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const long long j = i + static_cast<long long>(u) * blockDim.x;
      const int4* p = src + ((base + j) & mask16);
      if (j < slice16)
        asm volatile("ld.global.cg.v4.s32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w) : "l"(p));
      else
        v[u] = make_int4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x7531bdf9) sink[0] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    stamps[2 * blockIdx.x] = t0;
    stamps[2 * blockIdx.x + 1] = now_ns();
  }
}

void plain_loads(torch::Tensor src, torch::Tensor stamps, int64_t slice, int64_t grid, int64_t reps,
                 torch::Tensor ms) {
  const int64_t n16 = src.nbytes() / 16;
  TORCH_CHECK(src.is_cuda() && stamps.is_cuda() && stamps.numel() >= 2 * grid, "plain_loads: CUDA tensors, 2 stamps a CTA");
  TORCH_CHECK(n16 > 0 && (n16 & (n16 - 1)) == 0 && slice % 16 == 0, "plain_loads: a power-of-two buffer, 16-byte slices");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto sink = torch::zeros({1}, src.options().dtype(torch::kInt));
  time_launches(reps, ms, stream, [&] {
    plain_load_kernel<<<static_cast<unsigned>(grid), 1024, 0, stream>>>(
        static_cast<const int4*>(src.data_ptr()), n16 - 1, reinterpret_cast<long long*>(stamps.data_ptr<int64_t>()),
        slice / 16, sink.data_ptr<int>());
    C10_CUDA_CHECK(cudaGetLastError());
  });
}
"""


def build():
    """The compiled probe (torch.utils.cpp_extension.load_inline, sm_90a)."""
    from torch.utils.cpp_extension import load_inline
    return load_inline("oppo_ingest_probe", cpp_sources=_DECL, cuda_sources=_CUDA,
                       functions=["ingest", "max_clusters", "plain_loads"],
                       extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a"], verbose=False)


def quantile(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def read_row(stamps: list[int], grid: int, cluster: int, multicast: bool, slice_bytes: int, kernel_ms: float) -> dict:
    """One configuration's reading from its CTAs' (start, end) ns and the kernel's time: what each CTA
    received (the cluster's slice), its own rate, the aggregate receive rate and the L2's serve rate."""
    spans = [(stamps[2 * i + 1] - stamps[2 * i]) * 1e-9 for i in range(grid)]
    if min(spans) <= 0:
        raise ValueError("ingest_probe: a CTA's stamps are missing or out of order")
    rates = [slice_bytes / s / 1e9 for s in spans]               # GB/s received, per CTA
    received = grid * slice_bytes
    served = (grid // cluster if (multicast and cluster > 1) else grid) * slice_bytes
    t = kernel_ms * 1e-3
    first = min(stamps[0::2][:grid])
    last = max(stamps[1::2][:grid])
    return {"per_cta_GBps_median": quantile(rates, 0.5), "per_cta_GBps_p10": quantile(rates, 0.1),
            "per_cta_GBps_p90": quantile(rates, 0.9), "cta_span_us_max": max(spans) * 1e6,
            "stamped_span_us": (last - first) / 1e3, "kernel_us": kernel_ms * 1e3,
            "received_TBps": received / t / 1e12, "l2_served_TBps": served / t / 1e12,
            "received_MB": received / 1e6, "served_MB": served / 1e6}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer configurations (a smoke run)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    from common import copy_bandwidth, device_info, print_table, results_path, write_json

    mod = build()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = copy_bandwidth()
    bufs = {"warm": torch.ones(16 << 20, dtype=torch.uint8, device="cuda"),
            "dram": torch.ones(1 << 30, dtype=torch.uint8, device="cuda")}
    stamps = torch.zeros(2 * sms, dtype=torch.int64, device="cuda")
    ms = torch.zeros(args.reps, dtype=torch.float32)
    tile = 16384
    fits = {c: int(mod.max_clusters(c)) for c in (1, 2, 4, 8)}
    print(f"{sms} SMs, copy {bw / 1e12:.2f} TB/s; clusters resident at once (1 CTA per SM): "
          + ", ".join(f"size {c}: {n} ({c * n} SMs)" for c, n in fits.items()), flush=True)
    # (name, source, grid: 'one' or 'all', cluster, multicast, stages, tile bytes, roles split;
    # stages 0: plain loads)
    # flags 4 (the timer read at every wait, session 40's form) where the name says "timer each wait"
    configs = [("one SM, timer each wait", "warm", "one", 1, False, 12, tile, False),
               ("one SM", "warm", "one", 1, False, 12, tile, False),
               ("one SM", "dram", "one", 1, False, 12, tile, False),
               # the bytes a bulk copy carries: 4 KiB x 48 and 64 KiB x 3 (the same 192 KiB in flight)
               ("one SM, 4 KiB copies", "warm", "one", 1, False, 48, 4096, False),
               ("one SM, 64 KiB copies", "warm", "one", 1, False, 3, 65536, False),
               # a producer warp and a consumer warp (session 40: one thread doing both read ~0.5 us
               # a copy, whatever its size or the depth)
               ("one SM, split roles", "warm", "one", 1, False, 12, tile, True),
               ("one SM, split, 4 KiB", "warm", "one", 1, False, 48, 4096, True),
               ("one SM, plain loads", "warm", "one", 1, False, 0, 0, False),
               ("one SM, plain loads", "dram", "one", 1, False, 0, 0, False)]
    stage_sets = (4, 12) if args.quick else (4, 8, 12)
    for src in ("warm", "dram"):
        configs.append(("all, CS 1, timer each wait", src, "all", 1, False, 12, tile, False))
        for st in stage_sets:
            configs.append(("all, CS 1", src, "all", 1, False, st, tile, False))
        configs.append(("all, split roles", src, "all", 1, False, 12, tile, True))
        for cs in (2, 4) if args.quick else (2, 4, 8):
            configs.append((f"CS {cs} multicast", src, "all", cs, True, 12, tile, False))
        configs.append(("CS 4 multicast, split", src, "all", 4, True, 12, tile, True))
        configs.append(("CS 4, each its own", src, "all", 4, False, 12, tile, False))
        configs.append(("all, plain loads", src, "all", 1, False, 0, 0, False))
    rows = []
    for name, src, which, cs, mc, st, tl, split in configs:
        buf = bufs[src]
        grid = (cs if which == "one" else cs * min(fits[cs], sms // cs)) if st else (1 if which == "one" else sms)
        # each cluster's slice: 2 MiB from the 16 MiB buffer, wrapping (warm: all of it in the L2),
        # 8 MiB of the 1 GiB one (dram: 132-264 MB a rep, far over the L2); one CTA alone: 16 / 64 MiB
        slice_bytes = {("warm", "all"): 2 << 20, ("dram", "all"): 8 << 20,
                       ("warm", "one"): 16 << 20, ("dram", "one"): 64 << 20}[(src, which)]
        if st:
            flags = (1 if mc else 0) | (2 if split else 0) | (4 if "timer each wait" in name else 0)
            run = lambda reps: mod.ingest(buf, stamps, cs, flags, tl, st, slice_bytes, grid, reps, ms)  # noqa: E731
        else:
            run = lambda reps: mod.plain_loads(buf, stamps, slice_bytes, grid, reps, ms)  # noqa: E731
        if src == "warm":                 # the bytes into the L2 first
            run(1)
        run(args.reps)
        k = min(ms.tolist()[:args.reps])
        # the stamps are the last rep's; its kernel time beside them
        r = {"config": name, "source": src, "grid": grid, "cluster": cs, "multicast": mc, "split_roles": split, "stages": st,
             "tile": tl, "slice_bytes": slice_bytes,
             **read_row(stamps.cpu().tolist(), grid, cs, mc, slice_bytes, ms.tolist()[args.reps - 1]),
             "kernel_us_min": k * 1e3}
        rows.append(r)
        print(f"{name:>26} {src:>5} grid {grid:3d} stages {st:2d} tile {tl:5d}: per CTA {r['per_cta_GBps_median']:.0f} GB/s "
              f"(p10 {r['per_cta_GBps_p10']:.0f}, p90 {r['per_cta_GBps_p90']:.0f}), received "
              f"{r['received_TBps']:.2f} TB/s, L2 served {r['l2_served_TBps']:.2f} TB/s", flush=True)
    print_table(rows, [("config", "config", ""), ("source", "src", ""), ("grid", "CTAs", "d"),
                       ("stages", "stages", "d"), ("tile", "tile", "d"), ("per_cta_GBps_median", "GB/s per CTA", ".0f"),
                       ("per_cta_GBps_p10", "p10", ".0f"), ("received_TBps", "received TB/s", ".2f"),
                       ("l2_served_TBps", "L2 served TB/s", ".2f"), ("kernel_us", "us", ".1f")])
    write_json(results_path("ingest_probe", args.out),
               {**device_info(), "copy_bandwidth_Bps": bw, "clusters_resident": fits, "rows": rows,
                "command": "python3 " + " ".join(sys.argv)})


if __name__ == "__main__":
    main()
