"""The run folder's loss plot."""

from __future__ import annotations

import json

from matplotlib.image import imread

from ptune.logs import plot_loss


def write_log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_loss_plot_is_written_from_the_log(tmp_path):
    log = tmp_path / "train_log.jsonl"
    # A NaN loss is logged as null; it is left out of the curve, not a crash.
    write_log(log, [{"step": 10, "loss": 5.5, "lr": 0.02}, {"step": 20, "loss": None, "lr": 0.015},
                    {"step": 30, "loss": 3.1, "lr": 0.01}])
    png = tmp_path / "train_loss.png"
    plot_loss(log, png)
    height, width, _ = imread(png).shape
    assert (width, height) == (800, 450)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_log.jsonl", "train_loss.png"]


def test_no_plot_without_a_logged_loss(tmp_path):
    log = tmp_path / "train_log.jsonl"
    write_log(log, [])
    plot_loss(log, tmp_path / "train_loss.png")
    assert not (tmp_path / "train_loss.png").exists()


def test_a_checkpoint_before_the_first_logged_step_draws_nothing_and_a_failed_plot_warns(tmp_path, caplog):
    """The plot is redrawn at every save; a save before the first log line (save_steps < log_steps) finds no
    log file, and a plot that cannot be written costs a warning, not the run."""
    from ptune.logs import MetricsLog

    plot_loss(tmp_path / "train_log.jsonl", tmp_path / "train_loss.png")
    assert list(tmp_path.iterdir()) == []
    metrics = MetricsLog(tmp_path, tensorboard=False)
    metrics.plot()
    metrics.write({"step": 1, "loss": 2.0, "lr": 0.1})
    (tmp_path / "train_loss.png").mkdir()  # something in the way of the picture
    metrics.plot()
    assert "could not draw" in caplog.text and str(tmp_path / "train_loss.png") in caplog.text
