"""The run folder's loss plot, and the sums behind each line of train_log.jsonl."""

from __future__ import annotations

import json
import logging
import math
import warnings

import pytest
import torch
from matplotlib.image import imread

from ptune.logs import LogWindow, plot_loss


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


def test_a_torn_last_line_is_left_out_of_the_plot_with_a_warning(tmp_path, caplog):
    """A kill during an append leaves half a line; the plot of the lines before it is still drawn."""
    log = tmp_path / "train_log.jsonl"
    write_log(log, [{"step": 10, "loss": 5.5}, {"step": 20, "loss": 4.0}])
    with open(log, "a", encoding="utf-8") as f:
        f.write('{"step": 30, "lo')
    plot_loss(log, tmp_path / "train_loss.png")
    assert imread(tmp_path / "train_loss.png").shape[:2] == (450, 800)
    assert f"{log}:3: not a whole log record" in caplog.text


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


def test_a_run_folder_named_in_chinese_is_plotted_without_missing_glyph_warnings(tmp_path, caplog):
    """The run folder's name is the plot's title, and the default font has no CJK glyphs: the title is drawn
    with an installed font that has them, or on a machine with none with the characters written as escapes."""
    run = tmp_path / "训练-运行\U0010fffd"  # and a private-use character that no font holds
    run.mkdir()
    write_log(run / "train_log.jsonl", [{"step": 1, "loss": 2.0, "lr": 0.1}, {"step": 2, "loss": 1.5, "lr": 0.1}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_loss(run / "train_log.jsonl", run / "train_loss.png")
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []  # matplotlib's findfont
    assert imread(run / "train_loss.png").shape[:2] == (450, 800)


def test_a_title_character_no_font_holds_is_written_as_its_escape():
    from ptune.logs import plot_title

    title, font_file = plot_title("训练-运行\U0010fffd")
    if font_file is None:  # no installed font has CJK glyphs
        assert title == "\\u8bad\\u7ec3-\\u8fd0\\u884c\\U0010fffd"
    else:
        assert title == "训练-运行\\U0010fffd"
    assert plot_title("run 7") == ("run 7", None)


def test_dollar_signs_in_a_run_folder_name_are_plain_text_not_a_lost_plot(tmp_path, caplog):
    """Matplotlib reads text between two $ as math, and a name that is not valid math stopped the drawing."""
    from ptune.logs import MetricsLog

    run = tmp_path / "lr$2^$"
    run.mkdir()
    metrics = MetricsLog(run, tensorboard=False)
    metrics.write({"step": 1, "loss": 2.0, "lr": 0.1})
    metrics.plot()
    assert "could not draw" not in caplog.text
    assert imread(run / "train_loss.png").shape[:2] == (450, 800)


def test_a_log_window_averages_finite_norms_only_and_a_kept_window_goes_on_where_it_was():
    window = LogWindow()
    window.add(2.0, 1.0, 10)
    window.add(4.0, math.inf, 10)  # an fp16 overflow step: its loss counts, its norm does not
    assert window.means() == (3.0, 1.0)
    resumed = LogWindow(window.kept())  # as a checkpoint saved between two log lines hands it back
    resumed.add(6.0, 3.0, 5)
    record = resumed.record(3, 0.01, 1, torch.device("cpu"))
    assert (record["step"], record["loss"], record["grad_norm"], record["lr"], record["skipped_steps"]) == \
        (3, 4.0, 2.0, 0.01, 1)
    assert record["tokens_per_s"] > 0  # tokens since the resume only: 5, over the resumed window's time


def test_a_window_of_overflow_steps_logs_null_norms_and_a_kept_window_takes_only_its_own_sums():
    window = LogWindow({"loss": 1.0, "steps": 1, "grad_norm": 0.0, "norms": 0, "add": None})
    window.add(math.inf, math.inf, 4)
    record = window.record(2, 0.01, 2, torch.device("cpu"))
    assert record["loss"] is None and record["grad_norm"] is None  # strict JSON holds no inf or NaN
    assert callable(window.add)


def test_a_resume_that_fails_while_rewriting_the_log_leaves_the_history_whole(tmp_path, monkeypatch):
    """The resume drops lines past its checkpoint by replacing the file whole: a write stopped part-way (here
    the rename fails, as a kill or a full disk would stop it) leaves every line that was there, and no
    temporary file."""
    import os

    from ptune.logs import MetricsLog

    metrics = MetricsLog(tmp_path, tensorboard=False)
    for step in range(1, 7):
        metrics.write({"step": step, "loss": 1.0 / step})
    before = (tmp_path / "train_log.jsonl").read_text(encoding="utf-8")

    def stopped(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", stopped)
    with pytest.raises(OSError):
        MetricsLog(tmp_path, tensorboard=False, resume_step=2)
    assert (tmp_path / "train_log.jsonl").read_text(encoding="utf-8") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_log.jsonl"]
    monkeypatch.undo()
    MetricsLog(tmp_path, tensorboard=False, resume_step=2)
    assert [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    mtime = (tmp_path / "train_log.jsonl").stat().st_mtime_ns
    MetricsLog(tmp_path, tensorboard=False, resume_step=2)  # nothing to drop: the file is left as it is
    assert (tmp_path / "train_log.jsonl").stat().st_mtime_ns == mtime


def test_a_tensorboard_event_file_that_cannot_be_written_costs_tensorboard_not_the_run(tmp_path, caplog):
    """A full disk on the event file was reported as train_log.jsonl failing, and stopped the run."""
    from ptune.logs import MetricsLog

    pytest.importorskip("torch.utils.tensorboard")
    metrics = MetricsLog(tmp_path, tensorboard=True)

    def full(*args, **kwargs):
        raise OSError(27, "File too large")
    metrics.writer.add_scalar = full
    metrics.write({"step": 1, "loss": 2.5})
    metrics.write({"step": 2, "loss": 2.0})
    assert [json.loads(line)["step"] for line in metrics.path.read_text().splitlines()] == [1, 2]
    assert caplog.text.count("could not write TensorBoard events") == 1 and "File too large" in caplog.text
    metrics.close()


def test_a_log_file_that_can_no_longer_be_written_is_said_once_and_left_off(tmp_path, capsys):
    """A full disk made logging print a traceback for every line from then on, and the run ended 0 regardless."""
    from ptune.logs import setup_logging

    setup_logging(tmp_path / "train.log")
    log = logging.getLogger("ptune.train")
    log.info("first")
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "baseFilename", None))

    class Full:  # the file's stream once the disk is full
        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass
    handler.stream.close()
    handler.stream = Full()
    for i in range(5):
        log.info("line %d", i)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--- Logging error ---" not in err
    assert err.count("could not write") == 1 and "No space left on device" in err and "line 4" in err
    assert (tmp_path / "train.log").read_text().splitlines()[-1].endswith("first")
    setup_logging()


def test_a_tensorboard_failure_that_shows_only_at_close_costs_tensorboard_not_the_finished_run(tmp_path, caplog):
    """Its writer thread writes behind add_scalar: a disk that fills in the last interval showed at close()."""
    from ptune.logs import MetricsLog

    pytest.importorskip("torch.utils.tensorboard")
    metrics = MetricsLog(tmp_path, tensorboard=True)
    metrics.write({"step": 1, "loss": 2.5})

    def full():
        raise OSError(28, "No space left on device")
    metrics.writer.close = full
    metrics.close()
    assert "could not write TensorBoard events" in caplog.text and (tmp_path / "train_loss.png").is_file()
