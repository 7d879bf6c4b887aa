"""bench/ab_v6_wgmma3.sh, the next GPU session's two calls, checked without a GPU: every script it
runs exists and every plan it names is one its script accepts (a typo there costs a device call)."""
import re
from pathlib import Path

from _scripts import load_script

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPT = (BENCH / "ab_v6_wgmma3.sh").read_text()


def _plans_after(marker: str) -> list[list[str]]:
    """The comma lists that follow `marker` (e.g. 'decode_stamps.py --plans') in the script."""
    return [m.split(",") for m in re.findall(re.escape(marker) + r"\s+([\w+,]+)", SCRIPT)]


def test_every_script_the_calls_run_exists():
    names = set(re.findall(r"bench/(\w+)\.(?:py|sh)", SCRIPT))
    names |= set(re.findall(r"gpu_check\.sh ([\w ]+?)(?: >|$)", SCRIPT, flags=re.M)[0].split())
    names |= {"sampler"}
    for n in names:
        assert (BENCH / f"{n}.py").exists() or (BENCH / f"{n}.sh").exists(), n


def test_every_plan_the_calls_name_is_accepted():
    d = load_script(BENCH, "decode_attention")
    p = load_script(BENCH, "prefill_attention")
    decode = [pl for ls in re.findall(r'ARGS_decode_attention="--plans ([\w+,]+)', SCRIPT) for pl in ls.split(",")]
    decode += [pl for ls in _plans_after("decode_stamps.py --plans") for pl in ls]
    prefill = [pl for ls in re.findall(r'ARGS_prefill_attention="--shapes \d+ --plans ([\w,]+)', SCRIPT)
               for pl in ls.split(",")]
    prefill += [pl for ls in _plans_after("prefill_stamps.py --plans") for pl in ls]
    assert decode and prefill
    for pl in decode:
        assert d._SPLIT_PLAN.fullmatch(pl) or d._V5.fullmatch(pl), pl
    for pl in prefill:
        assert pl in p.WGMMA_PLANS, pl
    san = load_script(BENCH, "sanitize_attention")
    cases = re.findall(r"--decode-plans=([\w:,]+)", SCRIPT)
    src = Path(san.__file__).read_text()
    for case in (c for ls in cases for c in ls.split(",")):
        assert f'"{case}"' in src or case in ("v3", "v6", "v7"), f"no sanitizer case {case}"
