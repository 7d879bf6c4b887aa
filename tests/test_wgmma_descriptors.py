"""The prefill wgmma kernel's batches (kernels/paged_prefill_wgmma.cuh, session 22's `_dh`, made
unconditional): a wgmma descriptor stepped by a
k-step's offset (desc_step) is the descriptor built whole at that address (desc128), for every
16-byte-aligned shared address and every offset the kernel steps by, as long as the address stays in
the shared window (below 228 KB). Replayed from the kernel's source text (its field masks and
shifts), so an edit to either function that breaks the identity fails here before a GPU sees it."""
import re
from pathlib import Path

import numpy as np

SRC = (Path(__file__).resolve().parents[1] / "kernels" / "paged_prefill_wgmma.cuh").read_text()


def _body(name: str) -> str:
    start = SRC.index(f"__device__ __forceinline__ uint64_t {name}(")
    return SRC[start:SRC.index("\n}\n", start)]


def test_desc_step_is_desc128_at_the_stepped_address():
    d128, step = _body("desc128"), _body("desc_step")
    # the forms this replay mirrors: the start address / 16 in bits 0-13, LBO and SBO / 16 in
    # bits 16-29 and 32-45, the 128-byte swizzle at bit 62; the step adds off / 16 to the low word
    assert "(saddr >> 4) & 0x3FFF" in d128 and "((lbo_bytes >> 4) & 0x3FFF) << 16" in d128
    assert "((sbo_bytes >> 4) & 0x3FFF) << 32" in d128 and "1ull << 62" in d128
    assert re.search(r"desc & 0xFFFFFFFF00000000ull\) \| static_cast<uint32_t>\(static_cast<uint32_t>\(desc\) \+ "
                     r"\(off >> 4\)\)", step)

    def desc128(saddr, lbo, sbo):
        return ((saddr >> 4) & 0x3FFF) | (((lbo >> 4) & 0x3FFF) << 16) | (((sbo >> 4) & 0x3FFF) << 32) | (1 << 62)

    def desc_step(desc, off):
        return (desc & 0xFFFFFFFF00000000) | (((desc & 0xFFFFFFFF) + (off >> 4)) & 0xFFFFFFFF)

    smem = 228 * 1024
    # every offset the kernel steps by: Q K^T (kBM 128 or 192 rows, kBN 128; D 64 or 128) and P V
    offs = {(kk >> 2) * (rows * 128) + (kk & 3) * 32 for rows in (128, 192) for kk in range(128 // 16)}
    offs |= {kk * 16 * 128 for kk in range(128 // 16)}
    for lbo, sbo in ((16, 1024), (128 * 128, 1024)):
        for saddr in np.arange(0, smem, 16 * 37, dtype=np.int64).tolist() + [smem - 16 * 512]:
            base = desc128(saddr, lbo, sbo)
            for off in offs:
                if saddr + off < smem:
                    assert desc_step(base, off) == desc128(saddr + off, lbo, sbo), (saddr, off, lbo)
