// Host side of the kernels' timestamp buffers (CtaStamps, kernels/attention_common.cuh): the switch
// that points a kernel's __constant__ copy at a caller's buffer (bench/decode_stamps.py,
// bench/prefill_stamps.py). Include after the kernel header that defines the constant, in the
// launcher's translation unit (the copy needs the symbol).
#pragma once
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <atomic>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include "dispatch.h"

// From the next launch on, the kernel writes rows of `stamps` (int64 [n, 3] contiguous, on the
// device); n == 0 turns them off. The switch is ordered on the current stream (a copy into the
// constant), refused under graph capture (the copy would become a graph node reading this call's
// host memory at every replay), and `stamps`
// is held here while on, so a buffer its caller frees is never written; when it is switched off or
// replaced, the allocator reuses it only after the launches queued on this stream before the
// switch (the switch is meant for one stream's launches). `on`, when given, is the launcher's switch
// to the kernel instantiation that writes these stamps (a kernel whose stamps cost registers has its
// own): true from here while stamps are on, read at each launch.
template <typename Symbol>
void set_stamps(const char* op, const Symbol& symbol, at::Tensor& stamps, std::atomic<bool>* on = nullptr) {
  OPPO_CHECK(stamps.is_cuda(), op, ": stamps must be a CUDA tensor");
  OPPO_CHECK(stamps.scalar_type() == at::kLong && stamps.dim() == 2 && stamps.size(1) == 3 && stamps.is_contiguous(),
             op, ": stamps must be int64 [n, 3] contiguous (n = 0: off)");
  const at::cuda::OptionalCUDAGuard guard(stamps.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  OPPO_CHECK(capture == cudaStreamCaptureStatusNone, op, ": not under CUDA-graph capture");
  static std::mutex mu;
  // per (op, device): the buffer the kernel writes while on (never destroyed: no tensor freed at exit)
  static auto* held = new std::map<std::pair<std::string, int>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mu);
  const oppo::attn::CtaStamps h{stamps.numel() > 0 ? stamps.data_ptr<int64_t>() : nullptr, stamps.size(0)};
  // from pageable memory: staged before the call returns, so `h` may go out of scope
  C10_CUDA_CHECK(cudaMemcpyToSymbolAsync(symbol, &h, sizeof(h), 0, cudaMemcpyHostToDevice, stream));
  const auto key = std::make_pair(std::string(op), stamps.get_device());
  const auto it = held->find(key);
  if (it != held->end()) {
    it->second.record_stream(at::cuda::getCurrentCUDAStream());
    held->erase(it);
  }
  if (h.rows != nullptr) (*held)[key] = stamps;
  if (on != nullptr) on->store(h.rows != nullptr);
}
