"""Static opcode counts per kernel from `cuobjdump -sass` text: which instructions a source form
compiles to (e.g. the prefill softmax's ex2 -> MUFU.EX2, its bf16 packing -> F2FP or PRMT), without
ncu. Counts are of the code, not of executed instructions: a runtime flag's two paths both count.

    cuobjdump -sass oppo_runtime/_C*.so | python bench/sass_counts.py --match paged_prefill_wgmma \\
        --ops MUFU.EX2,F2FP,PRMT,HGMMA
"""
import argparse
import re
import sys

_FUNC = re.compile(r"^\s*Function : (\S+)")
# an instruction line: /*0c50*/  [@!P0] OPCODE.MODIFIERS operands ;
_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def count(lines, match: str, ops: list[str]) -> dict[str, dict[str, int]]:
    """{function: {op: count}} for the functions whose (mangled) name contains ``match``; an op
    counts every opcode equal to it or starting with it and a dot (F2FP counts F2FP.BF16.F32.PACK_AB)."""
    out: dict[str, dict[str, int]] = {}
    cur = None
    for line in lines:
        m = _FUNC.match(line)
        if m:
            cur = m.group(1) if match in m.group(1) else None
            if cur is not None:
                out.setdefault(cur, {op: 0 for op in ops + ["total"]})
            continue
        if cur is None:
            continue
        m = _INSN.search(line)
        if not m:
            continue
        opcode = m.group(1)
        out[cur]["total"] += 1
        for op in ops:
            if opcode == op or opcode.startswith(op + "."):
                out[cur][op] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--match", required=True, help="substring of the kernels' mangled names")
    ap.add_argument("--ops", default="MUFU.EX2,F2FP,PRMT,HGMMA", help="comma list of opcodes (prefixes at a dot)")
    args = ap.parse_args()
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    res = count(sys.stdin, args.match, ops)
    if not res:
        print(f"no function matching {args.match!r} in the input")
        sys.exit(1)
    print("  ".join(f"{o:>9}" for o in ops + ["total"]) + "  function")
    for name, c in res.items():
        print("  ".join(f"{c[o]:>9d}" for o in ops + ["total"]) + f"  {name[:120]}")


if __name__ == "__main__":
    main()
