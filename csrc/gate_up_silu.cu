// Launcher of gate_up_silu (kernels/gate_up_silu.cuh): checks arguments, launches on the current
// stream. sm_90a only (wgmma); the Python face (ops/fused.py) runs its reference elsewhere.
#include <cstdlib>
#include <string>
#include <type_traits>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "dispatch.h"
#include "cuda_ops.h"
#include "../kernels/gate_up_silu.cuh"

// act [M, I] (written), x [M, K], w [2I, K] (gate | up) -> act = silu(x w_gate^T) * (x w_up^T)
void gate_up_silu_cuda(at::Tensor& act, const at::Tensor& x, const at::Tensor& w) {
  constexpr const char* op = "gate_up_silu";
  using C = oppo::mlp::GateUpSilu;
  check_small_m_operands(op, "[2I, K]", x, w, C::kRows);
  OPPO_CHECK(act.is_cuda() && act.dim() == 2, op, ": act [M, I] must be a 2-D CUDA tensor");
  const int64_t M = x.size(0), K = x.size(1), I = w.size(0) / 2;
  OPPO_CHECK(w.size(0) % 2 == 0 && I % 2 == 0, op, ": w must be [2I, K] with I even, got ", w.sizes());
  OPPO_CHECK(act.size(0) == M && act.size(1) == I, op, ": act must be [", M, ", ", I, "], got ", act.sizes());
  OPPO_CHECK(act.scalar_type() == x.scalar_type(), op, ": x, w and act must share a dtype");
  OPPO_CHECK(act.stride(1) == 1 && act.stride(0) % 2 == 0 && reinterpret_cast<uintptr_t>(act.data_ptr()) % 4 == 0,
             op, ": act's rows must be contiguous, 4-byte aligned");
  OPPO_CHECK(I < (1LL << 30) && act.stride(0) < (1LL << 31), op, ": sizes beyond 32-bit indexing");
  OPPO_CHECK(sm90a_here(x), op, ": needs an sm_90 device and the extension built for 9.0a (wgmma)");
  if (M == 0 || I == 0) return;
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int grid = static_cast<int>((I + C::kBH - 1) / C::kBH);
  // OPPO_GATE_UP_SILU_LAG (read at every call, so at a graph's capture): MMA groups left in flight at
  // a K step's end, 1 (default) or 0 (an A/B: see the kernel)
  const char* lag_env = std::getenv("OPPO_GATE_UP_SILU_LAG");
  const bool lag0 = lag_env != nullptr && std::string(lag_env) == "0";
  OPPO_CHECK(lag_env == nullptr || lag0 || std::string(lag_env) == "1", op,
             ": OPPO_GATE_UP_SILU_LAG must be 0 or 1, got ", lag_env == nullptr ? "" : lag_env);
  auto launch = [&](auto tag, auto lag_tag) {
    using T = decltype(tag);
    auto kernel = oppo::mlp::gate_up_silu_kernel<T, decltype(lag_tag)::value>;
    static bool attr_set[64] = {};  // per instantiation and device
    if (!attr_set[x.get_device() & 63]) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem));
      attr_set[x.get_device() & 63] = true;
    }
    kernel<<<grid, C::kThreads, C::kSmem, stream>>>(
        reinterpret_cast<T*>(act.data_ptr()), act.stride(0), reinterpret_cast<const T*>(x.data_ptr()), x.stride(0),
        reinterpret_cast<const T*>(w.data_ptr()), static_cast<int>(M), static_cast<int>(K), static_cast<int>(I));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  using Lag0 = std::integral_constant<int, 0>;
  using Lag1 = std::integral_constant<int, 1>;
  if (x.scalar_type() == at::kBFloat16) lag0 ? launch(__nv_bfloat16{}, Lag0{}) : launch(__nv_bfloat16{}, Lag1{});
  else lag0 ? launch(__half{}, Lag0{}) : launch(__half{}, Lag1{});
}
