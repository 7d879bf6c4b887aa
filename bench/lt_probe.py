"""cuBLASLt's other algorithms for the decode step's projections: what PyTorch's F.linear leaves on
the table by taking the heuristic's first answer.

The engine's kernel profile (H100, B=256) has the four projections of a Qwen2.5-0.5B layer at 5.3
(qkv), 4.5 (o_proj), 11.4 (gate_up) and 10.1 us (down) for ~1.0 / 0.8 / 7.5 / 3.8 us of bytes;
session 21 found cuBLAS, cuBLASLt's first pick and inductor's Triton templates within a few percent
of each other. What none of them tried: the heuristic's other answers (``requestedAlgoCount`` up to
``max_algos``) and split-K versions of each (``CUBLASLT_ALGO_CONFIG_SPLITK_NUM``, checked by
``cublasLtMatmulAlgoCheck``), the search TensorRT-LLM's GEMM profiler makes at engine build. This
module compiles a small extension (``build``) that plans such a GEMM (bf16, fp32 accumulation,
F.linear's layout: out [M, N] = x [M, K] @ w [N, K]^T (+ bias, as cuBLASLt's bias epilogue)),
lists the candidate algorithms with their configuration, and runs any one of them;
``bench/linear_probe.py --libs ...,lt_all`` times them all cold beside F.linear. Session 35 (H100,
B=256): 24-56 candidates a projection, none faster than the heuristic's first by more than 3%
(bench/RESULTS.md "Session 35").
"""
from __future__ import annotations

import glob
import os

import torch

_SRC = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cublasLt.h>
#include <vector>

#define LT_CHECK(x) do { cublasStatus_t s_ = (x); TORCH_CHECK(s_ == CUBLAS_STATUS_SUCCESS, #x " failed: ", int(s_)); } while (0)

namespace {
struct Plan {
  int64_t M, N, K, ws;
  bool bias;
  cublasLtMatmulDesc_t op;
  cublasLtMatrixLayout_t a, b, c;
  std::vector<cublasLtMatmulAlgo_t> algos;
  std::vector<std::vector<int64_t>> info;   // per algo: id, tile, stages, splitk, reduction, swizzle, custom, cluster, waves x 1000, heuristic rank
};
std::vector<Plan> g_plans;
cublasLtHandle_t g_handle = nullptr;

template <typename T>
int64_t cfg(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attr) {
  T v{};
  size_t written = 0;
  if (cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &v, sizeof(v), &written) != CUBLAS_STATUS_SUCCESS) return -1;
  return static_cast<int64_t>(v);
}
}  // namespace

// One GEMM shape: out [M, N] (row-major) = x [M, K] @ w [N, K]^T (+ bias [N]). In cuBLASLt's
// column-major terms D [N, M] = op(A = w, transposed) [N, K] x B = x [K, M]. The heuristic's first
// max_algos answers, then each answer again with 2, 4, 8 and 16 K splits where cublasLtMatmulAlgoCheck
// accepts it (and its workspace fits). Returns the plan's index.
int64_t lt_plan(int64_t M, int64_t N, int64_t K, bool bias, int64_t max_algos, int64_t workspace_bytes) {
  if (g_handle == nullptr) LT_CHECK(cublasLtCreate(&g_handle));
  Plan p{M, N, K, workspace_bytes, bias};
  LT_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  if (bias) {
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
  }
  LT_CHECK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, K, N, K));
  LT_CHECK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, K, M, K));
  LT_CHECK(cublasLtMatrixLayoutCreate(&p.c, CUDA_R_16BF, N, M, N));
  cublasLtMatmulPreference_t pref;
  LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  uint64_t ws = static_cast<uint64_t>(workspace_bytes);
  LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  std::vector<cublasLtMatmulHeuristicResult_t> res(static_cast<size_t>(max_algos));
  int found = 0;
  LT_CHECK(cublasLtMatmulAlgoGetHeuristic(g_handle, p.op, p.a, p.b, p.c, p.c, pref, static_cast<int>(max_algos),
                                          res.data(), &found));
  cublasLtMatmulPreferenceDestroy(pref);
  auto add = [&](const cublasLtMatmulAlgo_t& algo, int rank, float waves) {
    p.algos.push_back(algo);
    p.info.push_back({cfg<int>(algo, CUBLASLT_ALGO_CONFIG_ID), cfg<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_TILE_ID),
                      cfg<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID), cfg<int>(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
                      cfg<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME),
                      cfg<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING), cfg<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION),
                      cfg<uint16_t>(algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID),
                      static_cast<int64_t>(waves * 1000), static_cast<int64_t>(rank)});
  };
  for (int i = 0; i < found; ++i)
    if (res[i].state == CUBLAS_STATUS_SUCCESS) add(res[i].algo, i, res[i].wavesCount);
  for (int i = 0; i < found; ++i) {
    if (res[i].state != CUBLAS_STATUS_SUCCESS) continue;
    for (int split : {2, 4, 8}) {
      for (uint32_t scheme : {uint32_t(CUBLASLT_REDUCTION_SCHEME_INPLACE), uint32_t(CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE)}) {
        cublasLtMatmulAlgo_t algo = res[i].algo;
        if (cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split, sizeof(split)) !=
                CUBLAS_STATUS_SUCCESS ||
            cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme, sizeof(scheme)) !=
                CUBLAS_STATUS_SUCCESS) continue;
        cublasLtMatmulHeuristicResult_t chk{};
        if (cublasLtMatmulAlgoCheck(g_handle, p.op, p.a, p.b, p.c, p.c, &algo, &chk) != CUBLAS_STATUS_SUCCESS) continue;
        if (chk.workspaceSize > ws) continue;
        if (cfg<int>(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM) != split) continue;   // ignored: not a new algorithm
        add(algo, 100 + i, chk.wavesCount);
        if (p.info.back() == p.info[p.info.size() - 2]) { p.algos.pop_back(); p.info.pop_back(); }
      }
    }
  }
  g_plans.push_back(std::move(p));
  return static_cast<int64_t>(g_plans.size()) - 1;
}

std::vector<std::vector<int64_t>> lt_describe(int64_t plan) {
  TORCH_CHECK(plan >= 0 && plan < static_cast<int64_t>(g_plans.size()), "lt_describe: no plan ", plan);
  return g_plans[plan].info;
}

void lt_run(int64_t plan, int64_t algo, torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias,
            torch::Tensor out, torch::Tensor workspace) {
  TORCH_CHECK(plan >= 0 && plan < static_cast<int64_t>(g_plans.size()), "lt_run: no plan ", plan);
  Plan& p = g_plans[plan];
  TORCH_CHECK(algo >= 0 && algo < static_cast<int64_t>(p.algos.size()), "lt_run: no algorithm ", algo);
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.size(0) == p.M && x.size(1) == p.K,
              "lt_run: x must be contiguous bf16 [M, K] of the plan");
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == at::kBFloat16 && w.size(0) == p.N && w.size(1) == p.K,
              "lt_run: w must be contiguous bf16 [N, K]");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kBFloat16 && out.size(0) == p.M && out.size(1) == p.N,
              "lt_run: out must be contiguous bf16 [M, N]");
  TORCH_CHECK(bias.has_value() == p.bias, "lt_run: the plan was made ", p.bias ? "with" : "without", " a bias");
  TORCH_CHECK(workspace.is_cuda() && workspace.numel() * workspace.element_size() >= p.ws, "lt_run: workspace too small");
  if (p.bias) {
    const void* bp = bias->data_ptr();
    LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, sizeof(bp)));
  }
  const float alpha = 1.f, beta = 0.f;
  LT_CHECK(cublasLtMatmul(g_handle, p.op, &alpha, w.data_ptr(), p.a, x.data_ptr(), p.b, &beta, out.data_ptr(), p.c,
                          out.data_ptr(), p.c, &p.algos[algo], workspace.data_ptr(), p.ws,
                          at::cuda::getCurrentCUDAStream()));
}
"""

INFO = ("algo_id", "tile", "stages", "splitk", "reduction", "swizzle", "custom", "cluster", "waves_x1000", "rank")


def _cublaslt() -> tuple[list[str], list[str]]:
    """(include dirs, link flags) of the cuBLASLt that torch loads (the pip wheel's, else the toolkit's)."""
    roots = []
    try:
        import nvidia
        roots += list(nvidia.__path__)
    except ImportError:
        pass
    from torch.utils.cpp_extension import CUDA_HOME
    inc, lib = [], None
    for r in roots:
        inc += sorted({os.path.dirname(h) for h in glob.glob(os.path.join(r, "**", "cublasLt.h"), recursive=True)})
        libs = sorted(glob.glob(os.path.join(r, "**", "libcublasLt.so*"), recursive=True))
        lib = lib or (libs[0] if libs else None)
    if CUDA_HOME:
        inc.append(os.path.join(CUDA_HOME, "include"))
        if lib is None:
            libs = sorted(glob.glob(os.path.join(CUDA_HOME, "lib64", "libcublasLt.so*")))
            lib = libs[0] if libs else None
    if lib is None:
        raise RuntimeError("lt_probe: no libcublasLt.so found (pip nvidia wheels or CUDA_HOME/lib64)")
    return inc, [lib]


def build():
    """The compiled probe (torch.utils.cpp_extension.load_inline)."""
    from torch.utils.cpp_extension import load_inline
    inc, ld = _cublaslt()
    # host code only (no kernel of its own): compiled by the C++ compiler, with CUDA's headers and runtime
    return load_inline("oppo_lt_probe", cpp_sources=_SRC, functions=["lt_plan", "lt_describe", "lt_run"],
                       extra_include_paths=inc, extra_ldflags=ld, extra_cflags=["-O2"], with_cuda=True, verbose=False)


def candidates(mod, M: int, N: int, K: int, bias: bool, max_algos: int = 16, workspace_bytes: int = 32 << 20):
    """(plan, [dict per candidate algorithm: INFO's fields])."""
    plan = mod.lt_plan(M, N, K, bias, max_algos, workspace_bytes)
    return plan, [dict(zip(INFO, v)) for v in mod.lt_describe(plan)]


def label(c: dict) -> str:
    return (f"id{c['algo_id']} t{c['tile']} s{c['stages']} k{c['splitk']} r{c['reduction']} c{c['cluster']}"
            f"{' h' + str(c['rank']) if c['rank'] < 100 else ' from h' + str(c['rank'] - 100)}")
