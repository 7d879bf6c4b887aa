"""Metrics logging: JSONL lines, console line, resume truncation, stage timer, reward curve."""
import json
import math
import time

import pytest
import torch

from oppo_runtime.ppo.metrics import MetricsLogger, StageTimer, plot_reward_curve, read_metrics


def test_log_appends_one_flushed_json_line_per_step(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False, console=False)
    logger.log(0, {"objective/scores": torch.tensor(0.5), "response_length/max": 12})
    logger.log(1, {"objective/scores": 0.75})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()   # readable before close
    assert [json.loads(l)["step"] for l in lines] == [0, 1]
    assert json.loads(lines[0])["objective/scores"] == 0.5
    assert json.loads(lines[0])["response_length/max"] == 12.0
    logger.close()


def test_non_finite_values_are_written_as_null(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, console=False) as logger:
        logger.log(0, {"loss/value_avg": float("nan")})
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["loss/value_avg"] is None


def test_non_scalar_metric_is_rejected_by_name(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, console=False) as logger:
        with pytest.raises(TypeError, match="objective/kl"):
            logger.log(0, {"objective/kl": torch.zeros(3)})


def test_console_line_shows_selected_keys_compactly(tmp_path):
    lines = []
    with MetricsLogger(tmp_path, tensorboard=False, print_fn=lines.append) as logger:
        logger.log(5, {"objective/scores": 0.25, "objective/kl": 0.0123, "not/shown": 1.0})
    assert lines == ["step 5 | score 0.25 | kl 0.0123"]


def test_resume_truncates_lines_of_later_steps(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, console=False) as logger:
        for step in range(5):
            logger.log(step, {"objective/scores": step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "objective/sc')                  # torn line from a kill -9
    with MetricsLogger(tmp_path, tensorboard=False, console=False, truncate_after=2) as logger:
        logger.log(3, {"objective/scores": 30})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]


def test_tensorboard_event_file_is_written(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path, console=False) as logger:
        logger.log(0, {"objective/scores": 1.0})
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_stage_timer_accumulates_repeated_stages():
    timer = StageTimer()
    for _ in range(2):
        with timer("gen"):
            time.sleep(0.01)
    with timer("update_actor"):
        pass
    m = timer.metrics()
    assert set(m) == {"timing_s/gen", "timing_s/update_actor"}
    assert 0.019 < m["timing_s/gen"] < 1.0
    timer.reset()
    assert timer.metrics() == {}


def test_reward_curve_png_is_written_by_step_and_by_time(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, console=False) as logger:
        for step in range(20):
            logger.log(step, {"objective/scores": math.tanh(step / 5), "objective/scores_std": 0.1})
    for x in ("step", "time"):
        png = plot_reward_curve(tmp_path / "metrics.jsonl", tmp_path / f"curve_{x}.png", x=x, smooth=5)
        assert png.read_bytes()[:4] == b"\x89PNG"
