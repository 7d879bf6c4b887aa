"""The committed device-call scripts (bench/ab_*.sh: a GPU session's calls), checked without a GPU:
every script they run exists, every plan they name is one its script accepts and every flag they
pass a bench script (directly or through gpu_check.sh's ARGS_<bench>) is one it takes (a typo there
costs a device call)."""
import re
from pathlib import Path

import pytest
from _scripts import load_script

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = ["ab_v6_wgmma3.sh", "ab_ks_caps.sh", "ab_clock_gemm.sh", "prefill_source_map.sh", "prefill_engine_check.sh",
           "heads_as_n_check.sh", "reg_stage_check.sh", "epilogue_check.sh", "hn_default_check.sh", "suite_stress_check.sh", "turns_check.sh", "tiles_check.sh",
           "s36_check.sh", "s39_check.sh", "s40_check.sh", "s42_check.sh"]


@pytest.fixture(params=SCRIPTS)
def script(request) -> str:
    return (BENCH / request.param).read_text()


def _plans_after(script: str, marker: str) -> list[list[str]]:
    """The comma lists that follow `marker` (e.g. 'decode_stamps.py --plans') in the script."""
    return [m.split(",") for m in re.findall(re.escape(marker) + r"\s+([\w+,]+)", script)]


def test_every_script_the_calls_run_exists(script):
    SCRIPT = script
    names = set(re.findall(r"bench/(\w+)\.(?:py|sh)", SCRIPT))
    for benches in re.findall(r"gpu_check\.sh ([\w ]+?)(?: >|$)", SCRIPT, flags=re.M):
        names |= set(benches.split()) - {"none"}   # gpu_check.sh none: no benchmark
    names |= {"sampler"}
    for n in names:
        assert (BENCH / f"{n}.py").exists() or (BENCH / f"{n}.sh").exists(), n


def test_every_plan_the_calls_name_is_accepted(script):
    SCRIPT = script
    d = load_script(BENCH, "decode_attention")
    p = load_script(BENCH, "prefill_attention")
    decode = [pl for ls in re.findall(r'ARGS_decode_attention="[^"]*?--plans ([\w+,]+)', SCRIPT) for pl in ls.split(",")]
    decode += [pl for ls in _plans_after(SCRIPT, "decode_stamps.py --plans") for pl in ls]
    decode += [pl for ls in _plans_after(SCRIPT, "decode_tiles.py --plans") for pl in ls]
    decode += [pl for ls in re.findall(r"decode_attention\.py[^\n]*?--plans\s+([\w+,]+)", SCRIPT) for pl in ls.split(",")]
    decode += [pl for ls in re.findall(r'ARGS_decode_stamps="--plans ([\w+,]+)', SCRIPT) for pl in ls.split(",")]
    decode += [pl for ls in re.findall(r"^P=([\w+,]+)", SCRIPT, flags=re.M) for pl in ls.split(",")]   # a plan list
    prefill = [pl for ls in re.findall(r'ARGS_prefill_attention="(?:--shapes [\d,]+ )?--plans ([\w,]+)', SCRIPT)
               for pl in ls.split(",")]
    prefill += [pl for ls in _plans_after(SCRIPT, "prefill_stamps.py --plans") for pl in ls]
    prefill += [pl for ls in re.findall(r"prefill_attention\.py (?:--shapes [\d,]+ )?--plans ([\w,]+)", SCRIPT)
                for pl in ls.split(",")]
    prefill += [pl for ls in re.findall(r"--prefill-plans=([\w,]+)", SCRIPT) for pl in ls.split(",")]
    prefill += [pl for ls in re.findall(r"^PLANS=([\w,]+)", SCRIPT, flags=re.M) for pl in ls.split(",")]   # a prefill plan list
    if re.search(r"(decode|prefill)_(attention|stamps|tiles)\.py|ARGS_(decode|prefill)_", SCRIPT):
        assert decode or prefill            # a script that runs an attention bench names its plans
    for shapes in re.findall(r"^S=([\w,]+)", SCRIPT, flags=re.M):    # a decode shape list (indices or BxCTXxHQxHKVxD)
        for spec in shapes.split(","):
            d.parse_shape(spec)
    for pl in decode:
        assert d._SPLIT_PLAN.fullmatch(pl) or d._V5.fullmatch(pl), pl
    for pl in prefill:
        assert pl in p.WGMMA_PLANS, pl
    san = load_script(BENCH, "sanitize_attention")
    cases = re.findall(r"--decode-plans=([\w:,]+)", SCRIPT)
    src = Path(san.__file__).read_text()
    for case in (c for ls in cases for c in ls.split(",")):
        assert f'"{case}"' in src or case in ("v3", "v6", "v7"), f"no sanitizer case {case}"


def test_every_flag_a_call_passes_a_bench_script_is_one_it_takes(script):
    """Each `python3 bench/NAME.py ...` command of the script (continuation lines joined): every
    --flag on it appears in that script's --help."""
    import subprocess
    import sys
    joined = re.sub(r"\\\n\s*", " ", script)
    helps: dict[str, str] = {}
    commands = re.findall(r"python3 bench/(\w+)\.py([^\n|>;]*)", joined)
    commands += re.findall(r'ARGS_(\w+)="([^"]*)"', joined)      # gpu_check.sh passes these to bench/NAME.py
    assert commands
    for name, rest in commands:
        if name not in helps:
            src = (BENCH / f"{name}.py").read_text()
            if "argparse" not in src:      # (sanitize_attention.py reads sys.argv: its flags are in its text)
                helps[name] = src
            else:
                r = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--help"], capture_output=True, text=True,
                                   timeout=120)
                assert r.returncode == 0, (name, r.stderr[-1000:])
                helps[name] = r.stdout
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
            assert flag in helps[name], f"bench/{name}.py takes no {flag}"
    san = (BENCH / "sanitize_attention.py").read_text()
    for pl in (p for ls in re.findall(r"--prefill-plans=([\w,]+)", script) for p in ls.split(",")):
        assert f'"{pl}"' in san, f"no sanitizer case for {pl}"


def test_sass_counts_reads_cuobjdump_text():
    """bench/sass_counts.py (static opcode counts of a kernel): functions picked by name,
    predicated instructions counted, an op counting its dotted variants only."""
    sc = load_script(BENCH, "sass_counts")
    text = """
        Function : _ZN4oppo4attn3wgp26paged_prefill_wgmma_kernelI13__nv_bfloat16Li64ELi3ELb0ELb0EEEvPv
        .headerflags    @"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   MUFU.EX2 R12, R12 ;                        /* 0x0000000c000c7308 */
        /*0010*/              @!P0 MUFU.EX2 R13, R13 ;                        /* 0x0000000d000d8308 */
        /*0020*/                   F2FP.BF16.F32.PACK_AB R4, R5, R4 ;         /* 0x000000050404723e */
        /*0030*/                   F2FPX R4, R5 ;                             /* 0x000000050404723e */
        /*0040*/                   PRMT R6, R7, 0x7632, R6 ;                  /* 0x0000763207067816 */
        Function : _ZN4oppo4attn25paged_decode_kernelEv
        /*0000*/                   MUFU.EX2 R1, R1 ;                          /* 0x0000000c000c7308 */
    """
    res = sc.count(text.splitlines(), "paged_prefill_wgmma", ["MUFU.EX2", "F2FP", "PRMT"])
    assert list(res) == ["_ZN4oppo4attn3wgp26paged_prefill_wgmma_kernelI13__nv_bfloat16Li64ELi3ELb0ELb0EEEvPv"]
    (c,) = res.values()
    assert c == {"MUFU.EX2": 2, "F2FP": 1, "PRMT": 1, "total": 5}


def test_every_call_that_runs_a_bench_script_itself_records_the_carried_commit(script):
    """A device call's copy of the tree keeps a stale .git: a step outside gpu_check.sh (which reads
    the carried .commit) records the wrong commit in its JSON unless the script exports OPPO_COMMIT
    from .commit (session 21's calls 3-4 did not: their order and stamps JSONs were fixed by hand)."""
    helper = (BENCH / "device_commit.sh").read_text()
    assert "export OPPO_COMMIT=$(head -c 40 .commit" in helper
    if re.search(r"python3 bench/\w+\.py", script):
        assert re.search(r"^\. bench/device_commit\.sh", script, flags=re.M)


def test_source_map_reads_an_ncu_source_page(tmp_path):
    """bench/source_map.py (the per-instruction stall map): the kernel row, opcodes without their
    predicates and modifiers, samples and stall reasons summed per opcode, gzip or plain."""
    import gzip
    sm = load_script(BENCH, "source_map")
    text = ('"Kernel Name","void k(int)",\n'
            '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","stall_wait",'
            '"stall_long_sb","stall_wait (Not Issued)"\n'
            '"0x10","MUFU.EX2 R1, R1","1,200","64","1,000","0","7"\n'
            '"0x20","@!P1 BRA 0x40","300","8","0","290","0"\n'
            '"0x30","MUFU.EX2 R2, R2","100","64","50","0","0"\n')
    for name, data in (("p.csv", text.encode()), ("p.csv.gz", gzip.compress(text.encode()))):
        (tmp_path / name).write_bytes(data)
        kernel, rows = sm.load(tmp_path / name)
        assert kernel == "void k(int)" and len(rows) == 3
        s = sm.summarize(rows)
        assert s["total_samples"] == 1600
        assert s["by_opcode"]["MUFU"]["samples"] == 1300 and s["by_opcode"]["MUFU"]["executed"] == 128
        assert s["by_opcode"]["MUFU"]["stalls"]["wait"] == 1050
        assert s["by_opcode"]["BRA"]["stalls"]["long_sb"] == 290
        assert "wait (Not Issued)" not in s["by_opcode"]["MUFU"]["stalls"]
