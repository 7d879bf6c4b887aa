"""The wgmma prefill kernel's machine code (sm_90a SASS), checked without a GPU.

What ptxas does with the kernel decides whether its design holds at all, and two of its choices
have bitten: it serializes every wgmma of the kernel when any path reads an accumulator before the
matching wait (warning C7514/C7519-style "Potential Performance Loss"), and it hoists a bare
``wgmma.wait_group 0`` up to the ``wait_group 1`` before it, which undoes the intra-warpgroup
overlap (the softmax of tile t while tile t-1's P V runs). This test compiles the kernel for
sm_90a with nvcc (bf16, head dims 64 and 128; and head dim 64 with three consumer warpgroups,
"64x3", the wgmma3 plans), reads ptxas's report and the SASS, and checks:
no performance-loss warning, no spills, HGMMAs issued in batches, the overlap's shape (a
DEPBAR 1, then the tile's exponentials, then the DEPBAR 0), and the producer's tile loop (no
integer division in it, a bounded issue, the next tile's block-table load before this tile's
cp.async commit and used only after it).
"""
import functools
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from _scripts import cuobjdump_path, nvcc_sm90a
from test_prefill_kernel_ptxas import SIG

SOURCE = """
#include <cuda_bf16.h>
#include "paged_prefill_wgmma.cuh"
using T = __nv_bfloat16;
template __global__ void oppo::attn::wgp::paged_prefill_wgmma_kernel<T, {D}, {NC}>(""" + SIG + """);
"""


def _tools():
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc):
        pytest.skip("needs nvcc")
    return nvcc, cuobjdump_path()


VARIANTS = ["64", "128", "64x3"]   # head dim, and "x3": three consumer warpgroups (the wgmma3 plans)


def _dims(variant) -> tuple[int, int]:
    """(head dim, consumer warpgroups) of a variant: 64, 128 or "64x3"."""
    d, _, nc = str(variant).partition("x")
    return int(d), int(nc or 2)


@functools.lru_cache(maxsize=None)
def _build(variant) -> tuple[str, str]:
    """ptxas's report and the SASS of the bf16 kernel of a variant (compiled once per session)."""
    _, cuobjdump = _tools()
    D, NC = _dims(variant)
    tmp_path = Path(tempfile.mkdtemp(prefix=f"wgmma_sass_{D}x{NC}_"))
    try:
        return nvcc_sm90a(SOURCE.replace("{D}", str(D)).replace("{NC}", str(NC)), tmp_path, sass_with=cuobjdump)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _compile(variant, tmp_path: Path) -> tuple[str, list[str]]:
    report, sass = _build(variant)
    events = []
    for line in sass.splitlines():
        if "WARPGROUP.DEPBAR" in line:
            events.append("DEPBAR" + re.search(r"gsb0,\s*(0x[0-9a-f]+)", line).group(1))
        elif "MUFU.EX2" in line:
            events.append("EX2")
        elif "HGMMA" in line:
            events.append("HGMMA")
        elif re.search(r"\bDEPBAR\.LE SB0", line):      # cp.async.wait_group N (the producer's)
            events.append("CPWAIT" + re.search(r"SB0,\s*(0x[0-9a-f]+)", line).group(1))
    return report, events


@pytest.mark.parametrize("variant", VARIANTS)
def test_wgmma_prefill_sass_keeps_its_batches_and_its_overlap(variant, tmp_path):
    report, ev = _compile(variant, tmp_path)
    assert "Potential Performance Loss" not in report, report      # no serialized wgmma (C75xx)
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", report), report
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    if _dims(variant)[1] == 3:   # 512 threads: the 32 / 160 split takes all 65536, 128 each at launch
        assert regs == 128, f"{regs} registers: setmaxnreg's split (128 x 32 + 384 x 160) needs 128 at launch"
    else:
        assert regs <= 168, f"{regs} registers: setmaxnreg's split (128 x 56 + 256 x 224) needs <= 168 at launch"
    runs, n = [], 0                                # HGMMAs issued back to back, not one per wait
    for e in ev + ["END"]:
        if e == "HGMMA":
            n += 1
        elif n:
            runs.append(n)
            n = 0
    assert max(runs) >= 8, runs
    # the overlap: after a "DEPBAR 0x1", the tile's exponentials come before the next "DEPBAR 0x0"
    i = ev.index("DEPBAR0x1")
    j = ev.index("DEPBAR0x0", i)
    assert ev[i + 1:j].count("EX2") >= 64, ev[i:j + 1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_wgmma_prefill_producer_keeps_its_copies_in_flight(variant, tmp_path):
    """With 4 stages (D=64) the producer publishes the previous tile after cp.async.wait_group 1
    (two tiles' copies in flight); with 3 (D=128) after wait_group 0, before the next stage wait.
    (The kernel's other producer loop, kFlagSplitKV's, waits with wait_group 2 at both head dims:
    test_wgmma_prefill_split_kv_loop_publishes_each_group_as_it_lands.)"""
    _tools()
    D = _dims(variant)[0]
    body = producer_loop(_build(variant)[1])["body"]
    waits = {re.search(r"SB0,\s*(0x[0-9a-f]+)", x).group(1) for x in body if re.search(r"\bDEPBAR\.LE SB0", x)}
    assert waits == ({"0x1"} if D == 64 else {"0x0"}), waits


# ------------------------------------------------------------------ the producer's tile loop
def _instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text with its predicate guard, without the ';') of every SASS line."""
    out = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def _regs(operand: str) -> set[str]:
    """General registers an operand names (R4.64: R4 and R5)."""
    regs = set()
    for m in re.finditer(r"\bR(\d+)(\.64)?\b", operand):
        regs.add(f"R{m.group(1)}")
        if m.group(2):
            regs.add(f"R{int(m.group(1)) + 1}")
    return regs


def innermost_loop(sass: str, keep) -> list[str] | None:
    """The shortest loop body (the instructions from a predicated backward branch's target to the
    branch) for which ``keep(body)`` holds, or None."""
    ins = _instructions(sass)
    addr = [a for a, _ in ins]
    best = None
    for k, (a, t) in enumerate(ins):
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)$", t)
        if not (m and t.startswith("@")) or int(m.group(1), 16) >= a:
            continue
        body = [x for _, x in ins[addr.index(int(m.group(1), 16)):k + 1]]
        if keep(body) and (best is None or len(body) < len(best)):
            best = body
    return best


def producer_loop(sass: str, commits: int = 1) -> dict:
    """The producer's steady-state tile loop: the innermost loop (a predicated backward branch)
    holding the cp.async copies (LDGSTS), an mbarrier wait and ``commits`` commits (LDGDEPBAR: one
    per tile in the stage ring, two, K's and V's, with kFlagSplitKV). Returns its instructions and
    the indices (into them) of the stage wait before the first copy and of the commit after it."""
    best = innermost_loop(sass, lambda body: any(_opcode(x).startswith("LDGSTS") for x in body)
                          and any("TRYWAIT" in x for x in body)
                          and sum(_opcode(x) == "LDGDEPBAR" for x in body) == commits)
    assert best is not None, "no producer loop (LDGSTS and an mbarrier wait under a backward branch)"
    ops = [_opcode(x) for x in best]
    first = ops.index(next(o for o in ops if o.startswith("LDGSTS")))
    wait = max(i for i in range(first) if "TRYWAIT" in best[i])
    commit = next(i for i in range(first, len(ops)) if ops[i] == "LDGDEPBAR")
    return dict(body=best, ops=ops, wait=wait, commit=commit)


def _sources_and_dests(text: str) -> tuple[set[str], set[str]]:
    """General registers an instruction reads and writes (stores, copies and barriers only read;
    otherwise the first register operand after any predicate outputs is the destination)."""
    op = _opcode(text)
    operands = [x.strip() for x in re.sub(r"^@!?U?P\w+\s+", "", text).split(None, 1)[1:][0].split(",")] \
        if len(text.split()) > 1 else []
    if re.match(r"^(LDGSTS|STS|STG|ST\.|SYNCS|RED|BAR|BRA)", op):
        return set().union(set(), *(_regs(x) for x in operands)), set()
    k = 0
    while k < len(operands) and re.fullmatch(r"U?P(T|\d+)", operands[k]):
        k += 1
    dests = _regs(operands[k]) if k < len(operands) and not operands[k].startswith("[") else set()
    if ".WIDE" in op and dests:                                 # a 64-bit result: the pair
        dests |= {f"R{int(r[1:]) + 1}" for r in dests if r != "RZ"}
    return set().union(set(), *(_regs(x) for x in operands[k + 1:])), dests


_DIVISION = re.compile(r"^(I2F|F2I|MUFU\.RCP|IMAD\.HI)")   # the integer division sequence's pieces


@pytest.mark.parametrize("variant", VARIANTS)
def test_wgmma_prefill_producer_loop_has_no_division_and_prefetches_the_table(variant):
    """The producer's per-tile work (session 8). Before: a runtime division and modulo by
    block_size per 16-byte chunk (I2F/MUFU.RCP/IMAD.HI in the loop: 80 of them at D=64, 160 at
    D=128), 446 / 1248 instructions from the stage wait to the commit, and the table loads on the
    copies' path (D=128: 8 of them between the wait and the commit). Now: no division anywhere in
    the loop, ~6 instructions per copy at most, and the next tile's table load (a tile ahead)
    issued before this tile's commit and read only after it."""
    _tools()
    D = _dims(variant)[0]
    L = producer_loop(_build(variant)[1])
    body, ops, wait, commit = L["body"], L["ops"], L["wait"], L["commit"]
    div = [body[i] for i, o in enumerate(ops) if _DIVISION.match(o)]
    assert not div, f"integer division in the producer's tile loop: {div[:6]}"
    copies = sum(o.startswith("LDGSTS") for o in ops)
    assert copies == 2 * (128 * D // 8) // 128, copies          # K and V: kPer chunks each per thread
    issue = commit - wait + 1
    assert issue <= 6 * copies + 24, f"{issue} instructions from the stage wait to the commit for {copies} copies"
    ldg = [i for i, o in enumerate(ops) if o.startswith("LDG.")]
    assert ldg, "no block-table load in the producer's tile loop"
    for i in ldg:
        assert i < commit, f"block-table load after the commit: {body[i]}"
        dest = _sources_and_dests(body[i])[1]
        assert dest, body[i]
        # the loaded page id is first read after this tile's copies are committed: the next tile's
        for j in range(i + 1, len(ops)):
            reads, writes = _sources_and_dests(body[j])
            if dest & reads:
                assert j > commit, f"the table load {body[i]!r} is used before the commit by {body[j]!r}"
                break
            assert not dest & writes, f"the table load {body[i]!r} is overwritten unread by {body[j]!r}"
        else:
            raise AssertionError(f"the table load {body[i]!r} is not read in the loop")


@pytest.mark.parametrize("variant", VARIANTS)
def test_wgmma_prefill_split_kv_loop_publishes_each_group_as_it_lands(variant):
    """kFlagSplitKV's producer loop (a second instantiation of the tile loop, in the same kernel):
    per tile the K slot wait, K's copies and commit, wait_group 2 and the publish of K(g-1), the
    next tile's table load, the V slot wait, V's copies and commit, wait_group 2 and the publish of
    V(g-1). Only wait_group 2 (two groups always in flight: waiting for the newest would land one
    group at a time), no division, a bounded issue per group, and the table load read only after
    V's commit and before V(g-1)'s publish (a proxy fence after the load, before its use, would
    wait for it)."""
    _tools()
    D = _dims(variant)[0]
    L = producer_loop(_build(variant)[1], commits=2)
    body, ops = L["body"], L["ops"]
    div = [body[i] for i, o in enumerate(ops) if _DIVISION.match(o)]
    assert not div, f"integer division in the split-ring producer loop: {div[:6]}"

    def kind(i):
        x, o = body[i], ops[i]
        if "TRYWAIT" in x:
            return "WAIT"
        if o == "LDGDEPBAR":
            return "COMMIT"
        if re.search(r"\bDEPBAR\.LE SB0", x):
            return "CPWAIT" + re.search(r"SB0,\s*(0x[0-9a-f]+)", x).group(1)
        if o == "MEMBAR.ALL.CTA":
            return "FENCE"
        if "SYNCS.ARRIVE" in x:
            return "ARRIVE"
        if o.startswith("LDG."):
            return "LDG"
        if o.startswith("LDGSTS"):
            return "COPY"
        return None
    seq = []
    for i in range(len(ops)):
        k = kind(i)
        if k and not (k == "COPY" and seq and seq[-1][0] == "COPY"):
            seq.append((k, i))
    names = [k for k, _ in seq]
    start = names.index("WAIT")                   # the loop may be rotated: read it from K's slot wait
    names = names[start:] + names[:start]
    assert names == ["WAIT", "COPY", "COMMIT", "CPWAIT0x2", "FENCE", "ARRIVE", "LDG", "WAIT", "COPY", "COMMIT",
                     "CPWAIT0x2", "FENCE", "ARRIVE"], names
    copies = sum(o.startswith("LDGSTS") for o in ops)
    assert copies == 2 * (128 * D // 8) // 128, copies
    waits = [i for k, i in seq if k == "WAIT"]
    commits = [i for k, i in seq if k == "COMMIT"]
    for w, c in zip(waits, commits):   # each group shuffles its 64-bit row offsets itself: ~2 SHFL more per copy
        assert c - w + 1 <= 9 * copies // 2 + 24, f"{c - w + 1} instructions from a slot wait to its commit"
    ldg = next(i for k, i in seq if k == "LDG")
    dest = _sources_and_dests(body[ldg])[1]
    fence_k = [i for k, i in seq if k == "FENCE"][-1]
    for j in range(ldg + 1, len(ops)):
        reads, writes = _sources_and_dests(body[j])
        if dest & reads:
            assert commits[1] < j < fence_k, f"the table load {body[ldg]!r} is read at {body[j]!r}"
            break
        assert not dest & writes, f"the table load {body[ldg]!r} is overwritten unread by {body[j]!r}"
    else:
        raise AssertionError(f"the table load {body[ldg]!r} is not read in the loop")
