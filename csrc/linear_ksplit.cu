// Launcher of linear_ksplit (kernels/linear_ksplit.cuh): checks arguments, launches clusters of 8 CTAs
// on the current stream. sm_90a only (wgmma, clusters); the Python face (ops/fused.py) runs its
// reference elsewhere.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "dispatch.h"
#include "cuda_ops.h"
#include "../kernels/linear_ksplit.cuh"

// out [M, N] (written), x [M, K], w [N, K] -> out = x w^T
void linear_ksplit_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& w) {
  constexpr const char* op = "linear_ksplit";
  using C = oppo::mlp::LinearKSplit;
  check_small_m_operands(op, "[N, K]", x, w, C::kRows);
  OPPO_CHECK(out.is_cuda() && out.dim() == 2, op, ": out [M, N] must be a 2-D CUDA tensor");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  OPPO_CHECK(N % 8 == 0 && N < (1LL << 24), op, ": N must be a multiple of 8 within 2^24, got ", N);
  OPPO_CHECK(out.size(0) == M && out.size(1) == N, op, ": out must be [", M, ", ", N, "], got ", out.sizes());
  OPPO_CHECK(out.scalar_type() == x.scalar_type(), op, ": x, w and out must share a dtype");
  OPPO_CHECK(out.stride(1) == 1 && out.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0,
             op, ": out's rows must be contiguous, 16-byte aligned");
  OPPO_CHECK(out.stride(0) < (1LL << 31), op, ": sizes beyond 32-bit indexing");
  OPPO_CHECK(sm90a_here(x), op, ": needs an sm_90 device and the extension built for 9.0a (wgmma, clusters)");
  if (M == 0 || N == 0) return;
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    auto kernel = oppo::mlp::linear_ksplit_kernel<T>;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(C::kSplit * ((N + C::kBN - 1) / C::kBN)));
    cfg.blockDim = dim3(C::kThreads);
    cfg.dynamicSmemBytes = C::kSmem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = C::kSplit;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    static bool attr_set[64] = {};  // per instantiation and device
    if (!attr_set[x.get_device() & 63]) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem));
      // a cluster of 8 CTAs of kSmem bytes each must fit one GPC: say so once, not as a launch failure
      int clusters = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg));
      OPPO_CHECK(clusters > 0, op, ": this device cannot co-schedule a cluster of ", C::kSplit, " CTAs with ",
                 C::kSmem, " bytes of shared memory each");
      attr_set[x.get_device() & 63] = true;
    }
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, reinterpret_cast<T*>(out.data_ptr()),
                                      static_cast<int64_t>(out.stride(0)), reinterpret_cast<const T*>(x.data_ptr()),
                                      static_cast<int64_t>(x.stride(0)), reinterpret_cast<const T*>(w.data_ptr()),
                                      static_cast<int>(M), static_cast<int>(K), static_cast<int>(N)));
  };
  if (x.scalar_type() == at::kBFloat16) launch(__nv_bfloat16{});
  else launch(__half{});
}
