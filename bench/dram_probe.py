"""A DRAM latency probe that runs beside a kernel: one thread chases pointers through a buffer far
larger than the L2, stamping each load's issue time and its round trip by %globaltimer (the clock
the decode kernel's stamps use), so the memory system's queue can be read over another kernel's
life: at an idle DRAM a chase load takes its unloaded latency, behind a full queue it waits in it.

Used by ``bench/decode_tiles.py --probe`` (session 34: is the end of a 135 MB decode call still
DRAM-bound, or is the DRAM idle before the kernel ends?). The kernel is one warp of one CTA, no
shared memory, few registers: it fits beside the decode kernel's CTAs on an SM. Its loads bypass L1
(ld.global.cg) and every node is a distinct 128-byte line of a buffer of ``mb`` MiB written once
before, in a random cycle, so each one misses the L2 (the buffer is ~10x the L2 and the other
kernel's traffic evicts it). ``read`` returns (issue us, latency us) pairs; the reading against the
other kernel's stamps is the caller's.
"""
from __future__ import annotations

import torch

_DECL = "void chase(torch::Tensor next, torch::Tensor out, int64_t start, int64_t n, int64_t stride);"

_CUDA = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

__device__ __forceinline__ long long probe_ns() {
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t) : : "memory");
  return t;
}

// next[p * stride] is the node after p (a cycle); out[2 i] the issue ns of load i, out[2 i + 1] its
// round trip in ns (the value is stored to shared memory before the second timer read: in-order
// issue makes that read wait for the load).
__global__ void chase_kernel(const long long* __restrict__ next, long long* __restrict__ out, long long p, int n,
                             int stride) {
  __shared__ volatile long long sink;
  if (threadIdx.x != 0) return;
  for (int i = 0; i < n; ++i) {
    const long long t0 = probe_ns();
    long long q;
    asm volatile("ld.global.cg.u64 %0, [%1];" : "=l"(q) : "l"(next + p * stride) : "memory");
    sink = q;  // issues only once q has landed; the timer read below comes after it in order
    const long long t1 = probe_ns();
    out[2 * i] = t0;
    out[2 * i + 1] = t1 - t0;
    p = q;
  }
}

void chase(torch::Tensor next, torch::Tensor out, int64_t start, int64_t n, int64_t stride) {
  TORCH_CHECK(next.is_cuda() && next.scalar_type() == at::kLong && out.is_cuda() && out.scalar_type() == at::kLong,
              "chase: int64 CUDA tensors");
  TORCH_CHECK(out.numel() >= 2 * n, "chase: out holds 2 n stamps");
  chase_kernel<<<1, 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const long long*>(next.data_ptr<int64_t>()), reinterpret_cast<long long*>(out.data_ptr<int64_t>()),
      start, static_cast<int>(n), static_cast<int>(stride));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
"""

LINE = 16  # int64 per 128-byte line: one node per line


def build():
    """The compiled probe (torch.utils.cpp_extension.load_inline, sm_90a)."""
    from torch.utils.cpp_extension import load_inline
    return load_inline("oppo_dram_probe", cpp_sources=_DECL, cuda_sources=_CUDA, functions=["chase"],
                       extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a"], verbose=False)


def chase_buffer(mb: int = 512, seed: int = 0) -> torch.Tensor:
    """``mb`` MiB of int64 on the GPU holding one random cycle through all of its 128-byte lines."""
    nodes = mb * 2**20 // 128
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    perm = torch.randperm(nodes, device="cuda", generator=g)
    nxt = torch.zeros(nodes * LINE, dtype=torch.int64, device="cuda")
    nxt[perm * LINE] = torch.roll(perm, -1)
    return nxt


def launch(mod, nxt: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """Start a chase of ``n`` loads on the current stream; returns its stamps buffer (read after a sync)."""
    out = torch.zeros(2 * n, dtype=torch.int64, device="cuda")
    mod.chase(nxt, out, start, n, LINE)
    return out


def read(out: torch.Tensor, t0_ns: int) -> list[tuple[float, float]]:
    """(issue us after t0_ns, latency us) of each load the chase made (unwritten stamps dropped)."""
    v = out.view(-1, 2).cpu().tolist()
    return [((t - t0_ns) / 1e3, lat / 1e3) for t, lat in v if t > 0]


def by_bin(samples: list[tuple[float, float]], lo: float, hi: float, bin_us: float) -> list[float | None]:
    """The median latency (us) of the samples issued in each ``bin_us`` bin of [lo, hi)."""
    nb = max(1, int((hi - lo) / bin_us + 0.999))
    bins: list[list[float]] = [[] for _ in range(nb)]
    for at, lat in samples:
        if lo <= at < hi:
            bins[min(nb - 1, int((at - lo) / bin_us))].append(lat)
    return [sorted(b)[len(b) // 2] if b else None for b in bins]
