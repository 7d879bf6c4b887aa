// Device helpers shared by the paged attention kernels: cp.async, ldmatrix, mma.sync m16n8k16,
// and the loader of a tile of K or V rows out of the page pool. Header-only, raw pointers.
//
// Fragment layouts of mma.m16n8k16 (lane = threadIdx.x % 32, quad row qr = lane / 4, quad
// column qc = lane % 4), used throughout:
//   A 16x16 (row-major): a[0] (qr, 2qc..+1)  a[1] (qr+8, 2qc..)  a[2] (qr, 8+2qc..)  a[3] (qr+8, 8+2qc..)
//   B 16x8  (k x n):     b[0] (k=2qc..+1, n=qr)  b[1] (k=8+2qc.., n=qr)
//   C 16x8  (float):     c[0..1] (qr, 2qc..+1)  c[2..3] (qr+8, 2qc..+1)
#pragma once
#include "common.cuh"

namespace oppo {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
// flags word of the prefill kernels (both take it): bit 0, out is float32 (else the input type)
constexpr int kPrefillOutF32 = 1;

// Rows of every shared-memory tile are padded by 16 bytes, so that the 8 rows an ldmatrix
// reads (or 8 threads' 16-byte cp.async writes) fall in 8 different 4-bank groups.
template <int D> struct SmemRow { static constexpr int kElems = D + 8; };

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy; src_bytes 0 fills the destination with zeros (src not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes));
}
// 16-byte global->shared copy, or 16 zero bytes when `sign` < 0 (src then not read: cp.async's
// ignore-src predicate, which leaves SASS no src-size arithmetic to do)
__device__ __forceinline__ void cp_async_16_unless_negative(void* dst, const void* src, int sign) {
  asm volatile("{\n .reg .pred z;\n setp.lt.s32 z, %2, 0;\n cp.async.cg.shared.global [%0], [%1], 16, z;\n}\n"
               ::"r"(smem_u32(dst)), "l"(src), "r"(sign));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}

// The online softmax's running max (log2 domain) after a tile whose max is mx: m becomes max(m, mx);
// m_use is what the tile's scores are shifted by (0 while everything so far is masked, so that exp2
// gives 0, not NaN); returns the factor that rescales the sums and outputs accumulated so far.
__device__ __forceinline__ float online_max_step(float& m, float mx, float& m_use) {
  const float m_new = fmaxf(m, mx);
  m_use = m_new == -INFINITY ? 0.f : m_new;
  const float corr = exp2f(m - m_use);
  m = m_new;
  return corr;
}

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // Two floats -> a packed pair (low half = x), and the pair back to floats.
  __device__ __forceinline__ static uint32_t pack(float x, float y) {
    __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float2 unpack(uint32_t u) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
  }
};
template <> struct Mma<__half> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float x, float y) {
    __half2 h = __floats2half2_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float2 unpack(uint32_t u) {
    return __half22float2(*reinterpret_cast<__half2*>(&u));
  }
};

// Element offset of each row of a KV tile within the cache (page, slot, head), computed once per
// tile by kRows threads and shared through smem: the loader then issues its cp.async without a
// division or a dependent block-table load per 16-byte chunk. -1 marks rows at or past `end`.
//   block_table  [max_blocks] of this sequence;  cache rows: page * page_stride + slot * row_stride
template <int kRows>
__device__ __forceinline__ void tile_row_offsets(int64_t* __restrict__ off_s, const int* __restrict__ block_table,
                                                 int64_t page_stride, int block_size, int row_stride,
                                                 int head_offset, int pos0, int end, int tid, int nthreads) {
  for (int r = tid; r < kRows; r += nthreads) {
    const int pos = pos0 + r;
    int64_t off = -1;
    if (pos < end) {
      const int page = __ldg(block_table + pos / block_size);
      off = static_cast<int64_t>(page) * page_stride + static_cast<int64_t>(pos % block_size) * row_stride +
            head_offset;
    }
    off_s[r] = off;
  }
}

// The same, split in two so that the block-table load can be issued an iteration ahead of its
// use (its latency then hides behind a tile's compute): thread `r` < kRows owns row r.
__device__ __forceinline__ int tile_row_page(const int* __restrict__ block_table, int block_size, int pos0,
                                             int end, int r) {
  const int pos = pos0 + r;
  return pos < end ? __ldg(block_table + pos / block_size) : -1;
}
__device__ __forceinline__ void tile_row_offset_store(int64_t* __restrict__ off_s, int page, int64_t page_stride,
                                                      int block_size, int row_stride, int head_offset, int pos0,
                                                      int r) {
  off_s[r] = page >= 0 ? static_cast<int64_t>(page) * page_stride +
                             static_cast<int64_t>((pos0 + r) % block_size) * row_stride + head_offset
                       : -1;
}

// Loads the K and V tiles [kRows][D] of the same rows (offsets from tile_row_offsets, shared by the
// two caches) into padded smem tiles [kRows][D + 8]; rows marked -1 are zero-filled (never read: the
// slots past a sequence's length may hold anything, NaN included, and a zero V row keeps P*V
// finite). Each row's offset is read and tested once for both copies (session 31: the two separate
// loads of a tile read and tested it twice, ~6 instructions a 16-byte copy in decode's loop).
template <typename T, int D, int kRows, int kThreads>
__device__ __forceinline__ void load_kv_tiles(T* __restrict__ k_smem, T* __restrict__ v_smem,
                                              const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                              const int64_t* __restrict__ off_s, int tid) {
  constexpr int kVec = 16 / int(sizeof(T));
  constexpr int kChunks = D / kVec;                           // 16-byte chunks per row
  constexpr int kRowsPerPass = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kRows % kRowsPerPass == 0, "tile/threads mismatch");
  const int chunk = tid % kChunks;
  const int row0 = tid / kChunks;
  const T* k_src = k_cache + chunk * kVec;
  const T* v_src = v_cache + chunk * kVec;
#pragma unroll
  for (int i = 0; i < kRows / kRowsPerPass; ++i) {
    const int r = row0 + i * kRowsPerPass;
    const int64_t off = off_s[r];
    const int hi = static_cast<int>(off >> 32);                 // < 0: a row not to be read (-1)
    const int64_t row = hi < 0 ? 0 : off;
    const int dst = r * SmemRow<D>::kElems + chunk * kVec;
    cp_async_16_unless_negative(k_smem + dst, k_src + row, hi);
    cp_async_16_unless_negative(v_smem + dst, v_src + row, hi);
  }
}

// kBytes from p (16-byte aligned) into L2, fire and forget: one prefetch per 128-byte line. (Not
// cp.async.bulk.prefetch: its address is a uniform register, so per-thread addresses became a
// loop over the warp's lanes in SASS.)
template <int kBytes>
__device__ __forceinline__ void prefetch_l2(const void* p) {
#pragma unroll
  for (int b = 0; b < kBytes; b += 128)
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(static_cast<const char*>(p) + b));
}

// Programmatic dependent launch (sm_90+; no-ops elsewhere and in a kernel launched without the
// attribute). pdl_wait: blocks until the previous kernel in the stream has completed and its memory
// is visible; a kernel launched with the attribute reads no input before it. pdl_launch_dependents:
// this CTA no longer holds the next kernel back (it may be scheduled once every CTA has called it or
// exited; it still waits in its own pdl_wait for this kernel's completion).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Timestamps, for finding where a kernel's time goes (bench/decode_stamps.py, bench/prefill_stamps.py):
// row r of a [capacity, 3] int64 buffer = (start ns, end ns, SM id | tag << 32) of a CTA (tag: its
// SM cycles, cta_stamp_*; row = its
// linear id blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z)) or of a work item
// (row = the item; tag e.g. its tile count); rows past capacity are not written. Off (rows ==
// nullptr) unless a launcher's host side sets its kernel's copy (a __constant__: no register).
struct CtaStamps {
  int64_t* rows;
  int64_t capacity;
};
__device__ __forceinline__ long long global_ns() {
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}
__device__ __forceinline__ int64_t cta_linear_id() {
  return blockIdx.x + static_cast<int64_t>(gridDim.x) * (blockIdx.y + static_cast<int64_t>(gridDim.y) * blockIdx.z);
}
__device__ __forceinline__ unsigned sm_id() {
  unsigned sm;
  asm volatile("mov.u32 %0, %%smid;\n" : "=r"(sm));
  return sm;
}
// The calling thread writes row's start time and SM (nothing stays live in registers after).
__device__ __forceinline__ void stamp_start(const CtaStamps& st, int64_t row) {
  if (st.rows != nullptr && row < st.capacity) {
    st.rows[3 * row] = global_ns();
    st.rows[3 * row + 2] = sm_id();
  }
}
// The calling thread writes row's end time, and its SM with `tag` in the upper half.
__device__ __forceinline__ void stamp_end(const CtaStamps& st, int64_t row, int64_t tag = 0) {
  if (st.rows != nullptr && row < st.capacity) {
    st.rows[3 * row + 1] = global_ns();
    st.rows[3 * row + 2] = static_cast<int64_t>(sm_id()) | (tag << 32);
  }
}
__device__ __forceinline__ long long sm_clock() {  // the SM's cycle counter
  long long c;
  asm volatile("mov.u64 %0, %%clock64;\n" : "=l"(c));
  return c;
}
// A CTA's row: thread 0 at the kernel's start, and after thread 0's last store at its end (that
// marks the CTA's end when the threads' last work is equal; a barrier costs the lean decode
// kernels a spill). The tag is the CTA's SM cycles from start to end (the SM clock it ran at =
// cycles / ns): the start's clock waits in the row's third slot, so no register holds it across
// the kernel. (Written as stamp_start/stamp_end are: a first form, the row computed before the
// thread test and the clock read with a "memory" clobber, spilled 24 bytes in decode plan v6's
// kernel; tests/test_decode_kernel_ptxas.py fails on it.)
__device__ __forceinline__ void cta_clock_start(const CtaStamps& st, int64_t row) {
  if (st.rows != nullptr && row < st.capacity) {
    st.rows[3 * row] = global_ns();
    st.rows[3 * row + 2] = sm_clock();
  }
}
__device__ __forceinline__ void cta_clock_end(const CtaStamps& st, int64_t row) {
  if (st.rows != nullptr && row < st.capacity) {
    const long long t = global_ns();
    const long long c = sm_clock();  // neither waits for the load below (only the subtraction does)
    st.rows[3 * row + 1] = t;
    st.rows[3 * row + 2] = static_cast<int64_t>(sm_id()) | ((c - st.rows[3 * row + 2]) << 32);
  }
}
__device__ __forceinline__ void cta_stamp_start(const CtaStamps& st) {
  if (threadIdx.x == 0) cta_clock_start(st, cta_linear_id());
}
__device__ __forceinline__ void cta_stamp_end(const CtaStamps& st) {
  if (threadIdx.x == 0) cta_clock_end(st, cta_linear_id());
}

}  // namespace attn
}  // namespace oppo
