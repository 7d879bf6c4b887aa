"""Where the D=64 wgmma prefill's per-item cost sits: each consumer warpgroup's tile chain, turn by
turn (``ops.attention.prefill_turn_stamps``), on persistent CTAs 0 and 1.

    python bench/prefill_turns.py [--plan wgmma3_pp_ov_qp_xc_ps] [--shapes 1] [--out PATH]

Session 28 fitted issue 8's D=64 kernel as time = items per CTA x (a + b x key tiles), a = 4.9 us
per item and b = 1.65 us per 128-key tile, and found that the tensor cores need only ~1.12 us of a
tile's b: each warpgroup's chain (its turn, its MMAs, S, the softmax, P V, the tile's end) sets
the pace, and the item boundary adds ~3 tiles' worth. These stamps split both. Each consumer
warpgroup's thread 0 writes SM cycles at every event of its chain (kernels/paged_prefill_wgmma.cuh
kTs*): an item's start and its Q staged; per batch the request for its turn, the turn taken, the
MMAs issued, S done, the scores done, the batch's P V done, the tile's end; the item's rows stored.

Per warpgroup the turns are classed by their place in the item: ``first`` (tile 0's Q K^T alone),
``steady`` (tiles 1 .. n-1: Q K^T of tile t with P V of t-1), ``last_pv`` (the final P V alone),
and the phases timed as medians over the CTAs' items (us at the SM clock measured in the run from
the same CTAs' item stamps): ``wait_turn`` (request to turn), ``issue``, ``s_wait`` (issued to S),
``softmax``, ``pv_wait`` (scores to P V done), ``finish`` (the later of those to the tile's end) and
``to_next`` (tile's end to the next request: the stage wait and the loop). ``period`` is the time
from one request to the next. Per item: ``boundary_us`` = the time from the last steady turn's
request to the second tile's request (the item change: last P V, epilogue, Q staging, tile 0 alone)
minus two steady periods, ``epilogue`` (last P V done to rows stored), ``q_stage`` (item start to Q
staged). No timing assertion: a measurement for bench/NOTES.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_info, env_var, paged_pool, results_path, time_ms, write_json  # noqa: E402
from prefill_attention import SHAPES  # noqa: E402

# event codes (kernels/paged_prefill_wgmma.cuh kTs*)
ITEM, Q, REQ, GRANT, ISSUED, S, SOFT, PV, FIN, STORED = range(10)
PHASES = ("wait_turn", "issue", "s_wait", "softmax", "pv_wait", "finish", "to_next", "period")
NC = 3                                  # consumer warpgroups of the wgmma3 plans
CAPACITY = 2 * NC * 4096                # rows: CTAs 0 and 1, a slice of 4096 per warpgroup


def slices(rows: torch.Tensor, nc: int = NC) -> list[list[tuple[int, int, int, int]]]:
    """The stamp buffer's 2 nc slices as lists of (cycles, event, tile, item), written rows only."""
    per = rows.shape[0] // (2 * nc)
    out = []
    for k in range(2 * nc):
        sl = rows[k * per:(k + 1) * per].tolist()
        out.append([(c, e & 0xFF, e >> 8, w) for c, e, w in sl if c != 0 or e != 0 or w != 0])
    return out


def turns(events: list[tuple[int, int, int, int]]) -> list[dict]:
    """One warpgroup's events grouped into batches (REQ ... the next REQ or item start), each with
    its tile, item, class and the cycles of each event it holds."""
    out, cur, item_tiles = [], None, {}
    for c, e, t, w in events:
        if e == ITEM:
            item_tiles[w] = t
            cur = None
            continue
        if e == REQ:
            cur = {"tile": t, "item": w, "at": {}}
            out.append(cur)
        if cur is not None and e in (REQ, GRANT, ISSUED, S, SOFT, PV, FIN):
            cur["at"].setdefault(e, c)
    for b in out:
        n = item_tiles.get(b["item"], -1)
        b["n_tiles"] = n
        b["kind"] = "first" if b["tile"] == 0 else "last_pv" if b["tile"] == n else "steady"
    return out


def phases(batches: list[dict]) -> list[dict]:
    """Each batch's phase durations in cycles (None where its events do not hold them)."""
    out = []
    for i, b in enumerate(batches):
        a = b["at"]
        nxt = batches[i + 1]["at"].get(REQ) if i + 1 < len(batches) else None

        def d(x, y):
            return a[y] - a[x] if x in a and y in a else None
        done = max((a[e], e) for e in (S, SOFT, PV) if e in a)[1] if any(e in a for e in (S, SOFT, PV)) else None
        out.append({"kind": b["kind"], "tile": b["tile"], "item": b["item"], "n_tiles": b["n_tiles"],
                    "wait_turn": d(REQ, GRANT), "issue": d(GRANT, ISSUED), "s_wait": d(ISSUED, S),
                    "softmax": d(S, SOFT), "pv_wait": d(SOFT, PV), "finish": d(done, FIN) if done is not None else None,
                    "to_next": nxt - a[FIN] if nxt is not None and FIN in a else None,
                    "period": nxt - a[REQ] if nxt is not None and REQ in a else None})
    return out


def item_costs(events: list[tuple[int, int, int, int]], ph: list[dict]) -> list[dict]:
    """Per item boundary of one warpgroup: the cycles from the last steady turn's request of item
    w to the second turn's (tile 1) request of the next item, less two median steady periods
    (what the boundary costs beyond two ordinary turns); the epilogue (last P V done to stored)
    and the Q staging of the next item."""
    steady = [p["period"] for p in ph if p["kind"] == "steady" and p["period"] is not None]
    if not steady:
        return []
    per = statistics.median(steady)
    at = {}
    for c, e, t, w in events:
        at.setdefault((w, e, t), c)
    items = [w for c, e, t, w in events if e == ITEM]
    tiles = {w: t for c, e, t, w in events if e == ITEM}
    out = []
    for w, w2 in zip(items, items[1:]):
        n = tiles[w]
        a = at.get((w, REQ, n - 1))
        b = at.get((w2, REQ, 1))
        if a is None or b is None or n < 2:
            continue
        out.append({"item": w, "next": w2, "n_tiles": n, "boundary": b - a - 2 * per,
                    "epilogue": at.get((w, STORED, n), 0) - at.get((w, PV, n), 0),
                    "q_stage": at.get((w2, Q, 0), 0) - at.get((w2, ITEM, tiles[w2]), 0)})
    return out


def summarize(rows: torch.Tensor, mhz: float, nc: int = NC) -> dict:
    """Medians (us) of each phase by turn class and warpgroup, and of the item costs."""
    out = {"by_warpgroup": [], "mhz": mhz}
    us = 1.0 / mhz
    for k, ev in enumerate(slices(rows, nc)):
        ph = phases(turns(ev))
        row = {"cta": k // nc, "warpgroup": k % nc, "turns": len(ph)}
        for kind in ("first", "steady", "last_pv"):
            sel = [p for p in ph if p["kind"] == kind]
            row[kind] = {f: (statistics.median([p[f] for p in sel if p[f] is not None]) * us
                             if any(p[f] is not None for p in sel) else None) for f in PHASES}
            row[kind]["count"] = len(sel)
        ic = item_costs(ev, ph)
        for f in ("boundary", "epilogue", "q_stage"):
            row[f + "_us"] = statistics.median([x[f] for x in ic]) * us if ic else None
        row["items"] = len(ic) + 1 if ic else 0
        out["by_warpgroup"].append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default="wgmma3_pp_ov_qp_xc_ps")
    ap.add_argument("--shapes", default="1", help="comma-separated indices into prefill_attention.SHAPES (D=64)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    assert args.plan.startswith("wgmma3") and "_mi" not in args.plan and "_ks" not in args.plan, \
        "the turn stamps are in the wgmma3 kernel without _mi and _ks"

    import oppo_runtime.ops  # noqa: F401  (loads torch.ops.oppo)
    from oppo_runtime.ops.attention import prefill_item_stamps, prefill_turn_stamps, prefill_wgmma_available
    assert prefill_wgmma_available(plan=args.plan), "the wgmma prefill kernel needs an sm_90a build on an sm_90 GPU"
    info = device_info()
    print(f"{info['card']}  torch {info['torch']}")
    results = []
    dtype = torch.bfloat16
    for i in args.shapes.split(","):
        B, prefix, n, Hq, Hkv, D = SHAPES[int(i)]
        assert D == 64, "the wgmma3 plans are head dim 64"
        G = Hq // Hkv
        k_cache, v_cache, bt = paged_pool(B, prefix + n, Hkv, D, args.block_size, dtype)
        ctx = torch.full((B,), prefix + n, dtype=torch.int32, device="cuda")
        cu = torch.arange(0, (B + 1) * n, n, dtype=torch.int32, device="cuda")
        q = torch.randn(B * n, Hq, D, device="cuda", dtype=dtype)
        out = torch.empty_like(q)

        def run():
            with env_var("OPPO_PREFILL_PLAN", args.plan):
                torch.ops.oppo.paged_prefill_attention(out, q, k_cache, v_cache, cu, ctx, bt, D ** -0.5, n)

        ms = time_ms(run)
        run()
        plain = out.clone()
        items = B * Hkv * -(-(n * G) // 192)
        with prefill_item_stamps(items) as istamps, prefill_turn_stamps(CAPACITY) as tstamps:
            run()
            run()                                     # the second launch's stamps (warm)
            torch.cuda.synchronize()
            rows, irows = tstamps.cpu(), istamps.cpu()
        same = bool(torch.equal(out, plain))
        # the SM clock from CTA 0's items: warpgroup 0's ITEM and STORED cycles against the item
        # stamps' ns (taken by the same thread right beside them)
        ev0 = slices(rows)[0]
        first = next(((c, w) for c, e, t, w in ev0 if e == ITEM), None)
        last = next(((c, w) for c, e, t, w in reversed(ev0) if e == STORED), None)
        ns = int(irows[last[1], 1]) - int(irows[first[1], 0]) if first and last else 0
        assert ns > 0, "CTA 0's item stamps hold no span: the SM clock cannot be measured, so no us"
        mhz = (last[0] - first[0]) / ns * 1e3
        summary = summarize(rows, mhz)
        res = {"B": B, "prefix": prefix, "chunk": n, "Hq": Hq, "Hkv": Hkv, "D": D, "plan": args.plan,
               "us": ms * 1e3, "output_unchanged_by_stamps": same, **summary,
               "raw_rows": [r for r in rows.tolist() if any(r)]}
        results.append(res)
        print(f"B={B} prefix {prefix} chunk {n} {Hq}/{Hkv}/{D} {args.plan}: {ms * 1e3:.1f} us, SM {mhz:.0f} MHz, "
              f"output unchanged by the stamps: {same}")
        for wg in summary["by_warpgroup"]:
            print(f"  CTA {wg['cta']} wg {wg['warpgroup']}: {wg['items']} items, boundary {wg['boundary_us']} us, "
                  f"epilogue {wg['epilogue_us']} us, Q staging {wg['q_stage_us']} us")
            for kind in ("first", "steady", "last_pv"):
                ph = wg[kind]
                print(f"    {kind:8s} x{ph['count']:3d}: " + "  ".join(
                    f"{f} {ph[f]:.3f}" if ph[f] is not None else f"{f} -" for f in PHASES))
        del k_cache, v_cache
        torch.cuda.empty_cache()
    path = results_path("prefill_turns", args.out)
    write_json(path, {**info, "rows": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
