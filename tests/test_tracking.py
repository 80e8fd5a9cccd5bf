"""MetricsLogger: metrics.jsonl as before, wandb (offline without a key) and tensorboard get the
same numbers, progress bars only on terminals / rank 0, echo lines thinned under a bar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.tracking import MetricsLogger, finish_loggers, progress_enabled, read_metrics, wandb_mode


def _log_some(logger: MetricsLogger, steps: int = 6) -> None:
    logger.log(0, "eval", loss=2.0)
    logger.begin(steps, 0)
    for step in range(1, steps + 1):
        logger.log(step, "train", loss=1.0 / step, lr=1e-3)
    logger.log(steps, "eval", loss=0.5)


def test_metrics_jsonl_echo_and_truncate(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("PIPELINE_PROGRESS", "0")
    logger = MetricsLogger(tmp_path, "sft", True, log_interval=3)
    _log_some(logger)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6, 6]
    assert rows[1] == {"step": 1, "split": "train", "loss": 1.0, "lr": 1e-3}
    out = capsys.readouterr().out
    assert "[sft] train step 3" in out and "[sft] train step 6" in out and "[sft] train step 2" not in out
    assert out.count("[sft] eval") == 2
    logger.truncate_after(3)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    # Non-zero ranks write nothing.
    other = tmp_path / "rank1"
    other.mkdir()
    MetricsLogger(other, "sft", False).log(1, "train", loss=1.0)
    assert not (other / "metrics.jsonl").exists()


def test_progress_bar_only_when_asked_and_thins_echo(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("PIPELINE_PROGRESS", raising=False)
    assert not progress_enabled(True)  # pytest's stderr is not a terminal
    assert not progress_enabled(False)
    monkeypatch.setenv("PIPELINE_PROGRESS", "1")
    assert progress_enabled(True) and not progress_enabled(False)
    logger = MetricsLogger(tmp_path, "rm", True, log_interval=4)
    logger.log(0, "eval", accuracy=0.5)
    logger.begin(8, 0)
    assert logger.bar is not None
    for step in range(1, 9):
        logger.log(step, "train", echo=True, loss=0.1, accuracy=0.9)  # echo=True is thinned under a bar
        if step == 5:
            assert logger.bar.n == 5
    assert logger.bar is None  # closed at the last step
    logger.log(8, "eval", accuracy=0.9)
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("[rm]")]
    assert [line.split()[1:4] for line in lines] == [["eval", "step", "0"], ["train", "step", "4"],
                                                     ["train", "step", "8"], ["eval", "step", "8"]]
    assert "8/8" in captured.err  # the bar went to stderr, with its count
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 10


def test_wandb_offline_without_key_and_tensorboard(tmp_path: Path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("PIPELINE_PROGRESS", "0")
    assert wandb_mode() == "offline"
    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    # The loggers come from the run's config.yaml, as the runner writes it.
    (run / "config.yaml").write_text("run:\n  name: t\n  loggers: [wandb, tensorboard]\n")
    logger = MetricsLogger(run / "sft", "sft", True, log_interval=2)
    assert logger.loggers == ["wandb", "tensorboard"]
    _log_some(logger, steps=4)
    finish_loggers()
    assert not tracking._SINKS
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline and offline[0].stat().st_size > 0
    events = list((run / "tensorboard" / "sft").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard" / "sft"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert [e.step for e in acc.Scalars("eval/loss")] == [0, 4]
    # metrics.jsonl is still the full record.
    assert len(read_metrics(run / "sft" / "metrics.jsonl")) == 6


def test_unknown_or_broken_logger_never_stops_training(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_PROGRESS", "0")

    def broken(*args, **kwargs):
        raise RuntimeError("no tensorboard here")

    monkeypatch.setattr(tracking, "_TensorBoardSink", broken)
    with pytest.warns(UserWarning, match="unknown logger"):
        logger = MetricsLogger(tmp_path, "ppo", True, loggers=["tensorboard", "mlflow"])
    logger.log(1, "train", reward=1.0)
    finish_loggers()
    assert "tensorboard is off" in capsys.readouterr().err
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["reward"] == 1.0
