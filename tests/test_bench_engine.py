"""bench/engine.py's parts that run without a GPU: the --decode-env variants' parser."""
from pathlib import Path

import pytest

from _scripts import load_script

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_decode_env_variants_parse_and_refuse_non_runtime_variables():
    e = load_script(BENCH, "engine")
    assert e.parse_decode_env(["pdl:OPPO_DECODE_PDL=1", "l2x2:OPPO_DECODE_PREFETCH=2,OPPO_DECODE_PLAN=v6"]) == {
        "pdl": {"OPPO_DECODE_PDL": "1"}, "l2x2": {"OPPO_DECODE_PREFETCH": "2", "OPPO_DECODE_PLAN": "v6"}}
    assert e.parse_decode_env([]) == {}
    for bad in ("pdl", "pdl:", ":OPPO_DECODE_PDL=1", "x:PATH=/tmp"):
        with pytest.raises(AssertionError, match="bad variant"):
            e.parse_decode_env([bad])
