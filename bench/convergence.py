"""Reward curves of two overlap modes on the embedded default task: reward vs step and vs
wall-clock, in one PNG, and whether they agree within noise.

    python bench/convergence.py --modes none full --steps 200 [--device cpu] [--out bench/results/convergence.json]

Agreement is judged on the last 50 steps: the difference of the two mean rewards against its
standard error (Welch), |t| < 3 counts as "within noise"; the first-10 vs last-50 rise of each
run is reported beside it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from oppo_runtime.ppo.config import load_config  # noqa: E402
from oppo_runtime.ppo.metrics import read_metrics  # noqa: E402
from oppo_runtime.ppo.trainer import PPOTrainer  # noqa: E402


def mean_sem(xs):
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs=2, default=["none", "full"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default="runs/convergence")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "convergence.json"))
    args = ap.parse_args()
    curves = {}
    for mode in args.modes:
        out = Path(args.workdir) / mode
        cfg = load_config(None, [f"run.out_dir={out}", f"run.overlap={mode}", f"run.total_steps={args.steps}",
                                 f"run.device={args.device}", "run.progress=false", "run.tensorboard=false",
                                 "run.timeline_every=100000", f"run.save_every={args.steps}"])
        if (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()
        PPOTrainer(cfg).train()
        rows = read_metrics(out / "metrics.jsonl")
        t0 = rows[0]["wall_time"] - rows[0]["timing_s/step"]
        curves[mode] = {"step": [r["step"] for r in rows], "reward": [r["objective/scores"] for r in rows],
                        "time": [r["wall_time"] - t0 for r in rows]}
    a, b = (curves[m]["reward"][-50:] for m in args.modes)
    (ma, sa), (mb, sb) = mean_sem(a), mean_sem(b)
    t = (ma - mb) / math.sqrt(sa ** 2 + sb ** 2 + 1e-12)
    summary = {m: {"first10": sum(curves[m]["reward"][:10]) / 10, "last50": mean_sem(curves[m]["reward"][-50:])[0],
                   "seconds": curves[m]["time"][-1]} for m in args.modes}
    summary.update(welch_t_last50=t, within_noise=abs(t) < 3)
    print(json.dumps(summary, indent=2))
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4))
    for i, x in enumerate(("step", "time")):
        ax = fig.add_subplot(1, 2, i + 1)
        for m in args.modes:
            ax.plot(curves[m][x], curves[m]["reward"], label=f"--overlap {m}", lw=1)
        ax.set_xlabel("step" if x == "step" else "wall-clock (s)")
        ax.set_ylabel("objective/scores")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"embedded default task, {args.modes[0]} vs {args.modes[1]}: last-50 means "
                 f"{summary[args.modes[0]]['last50']:.3f} vs {summary[args.modes[1]]['last50']:.3f} (Welch t={t:.2f})")
    png = Path(args.out).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    Path(args.out).write_text(json.dumps({"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                          "command": " ".join(["python", *sys.argv]), "device": args.device,
                                          "summary": summary, "curves": curves}, indent=1))
    print("wrote", args.out, png)


if __name__ == "__main__":
    main()
