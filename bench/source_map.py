"""Read an ncu source page exported per SASS instruction (`ncu --import R --page source --csv
--print-source sass`, as bench/prefill_source_map.sh writes it): where a kernel's warps stall.

Prints the total of the stall samples, the opcodes by their share of the samples (with each one's
leading stall reasons and executed count), and the instructions with the most samples, each with
the instructions just before it (a TRYWAIT's loop branch, a store waiting on its load).

    python3 bench/source_map.py bench/results/prefill_wgmma3_d64_source_map_h100.csv.gz [--top 20] [--context 3]
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def _num(x: str) -> float:
    try:
        return float(x.replace(",", "")) if x else 0.0
    except ValueError:
        return 0.0


def load(path: str | Path) -> tuple[str, list[dict[str, str]]]:
    """(kernel name, one dict per instruction) from the CSV: its first row names the kernel, its
    second the columns (Address, Source, the sample and stall_* columns)."""
    raw = Path(path).read_bytes()
    text = gzip.decompress(raw).decode() if raw[:2] == b"\x1f\x8b" else raw.decode()
    rows = list(csv.reader(io.StringIO(text)))
    kernel = rows[0][1] if len(rows[0]) > 1 else rows[0][0]
    head = rows[1]
    assert "Address" in head and "Source" in head and SAMPLES in head, f"not an ncu source page: {head[:6]}"
    return kernel, [dict(zip(head, r)) for r in rows[2:] if len(r) == len(head)]


def opcode(source: str) -> str:
    """The instruction's opcode without its predicate and modifiers ('@!P1 BRA 0x..' -> 'BRA')."""
    words = [w for w in source.split() if not w.startswith("@")]
    return words[0].split(".")[0] if words else ""


def summarize(rows: list[dict[str, str]]) -> dict:
    reasons = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k] if rows else []
    total = sum(_num(r[SAMPLES]) for r in rows)
    by_op: dict[str, dict] = collections.defaultdict(lambda: {"samples": 0.0, "executed": 0.0,
                                                              "stalls": collections.Counter()})
    for r in rows:
        o = by_op[opcode(r["Source"])]
        o["samples"] += _num(r[SAMPLES])
        o["executed"] += _num(r.get(EXECUTED, ""))
        for k in reasons:
            o["stalls"][k[len("stall_"):]] += _num(r[k])
    return {"total_samples": total, "reasons": reasons, "by_opcode": dict(by_op)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="the exported source page (.csv or .csv.gz)")
    ap.add_argument("--top", type=int, default=15, help="instructions with the most samples")
    ap.add_argument("--context", type=int, default=3, help="instructions shown before each of them")
    args = ap.parse_args()
    kernel, rows = load(args.csv)
    s = summarize(rows)
    total = s["total_samples"] or 1.0
    print(f"{kernel[:160]}\n{len(rows)} instructions, {s['total_samples']:.0f} stall samples\n")
    print(f"{'opcode':<12} {'samples':>8} {'share':>6} {'executed':>12}  leading stall reasons")
    for op, o in sorted(s["by_opcode"].items(), key=lambda kv: -kv[1]["samples"])[:15]:
        lead = ", ".join(f"{k} {v:.0f}" for k, v in o["stalls"].most_common(3) if v)
        print(f"{op:<12} {o['samples']:8.0f} {100 * o['samples'] / total:5.1f}% {o['executed']:12.0f}  {lead}")
    print(f"\nthe {args.top} instructions with the most samples (each after the {args.context} before it):")
    order = sorted(range(len(rows)), key=lambda i: -_num(rows[i][SAMPLES]))[:args.top]
    for i in order:
        r = rows[i]
        lead = sorted(((_num(r[k]), k[len("stall_"):]) for k in s["reasons"]), reverse=True)[:3]
        print(f"-- {100 * _num(r[SAMPLES]) / total:4.1f}%  {', '.join(f'{n} {v:.0f}' for v, n in lead if v)}")
        for j in range(max(0, i - args.context), i + 1):
            mark = ">>" if j == i else "  "
            print(f"   {mark} {rows[j]['Address'][-6:]} {_num(rows[j][SAMPLES]):6.0f} "
                  f"{_num(rows[j].get(EXECUTED, '')):10.0f}  {rows[j]['Source'][:90]}")


if __name__ == "__main__":
    main()
