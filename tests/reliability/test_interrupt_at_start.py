"""Ctrl-C while a command is still importing its libraries ends it with one line and status 130, as a Ctrl-C
later in the run does, not with a traceback through importlib."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from ptune.config import asset_path


def in_its_imports(proc: subprocess.Popen) -> None:
    """Wait until torch's library is mapped into `proc`: its imports (transformers' follow) run for seconds."""
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.monotonic() + 120
    while "libtorch" not in maps.read_text():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "torch never loaded"
        time.sleep(0.02)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc to know the process is importing")
@pytest.mark.parametrize("command", ["train", "evaluate", "chat", "serve", "sweep"])
def test_ctrl_c_during_start_up_is_one_line_and_status_130(command, tmp_path):
    # Settings that pass the checks made before the imports (ptune.settings); nothing is loaded from them.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    sample = asset_path("adgen_sample.jsonl")
    args = {"train": [f"model.path={tmp_path / 'model'}", f"data.train_file={sample}"],
            "evaluate": [f"checkpoint={tmp_path / 'run'}", f"data.eval_file={sample}"],
            "chat": [f"checkpoint={tmp_path / 'run'}"], "serve": [f"checkpoint={tmp_path / 'run'}"],
            "sweep": [f"runs=[{tmp_path / 'run'}]"]}[command]
    proc = subprocess.Popen([sys.executable, "-m", f"ptune.{command}", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        in_its_imports(proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert (proc.returncode, err, out) == (130, f"{command} interrupted\n", "")


def test_importing_ptune_as_a_library_leaves_ctrl_c_alone():
    """Only `python -m ptune.<command>` takes Ctrl-C over while starting; a Ctrl-C later in a command still
    reaches the command's own handling (its interrupt tests in test_train, test_chat and the others)."""
    probe = ("import signal, ptune.errors, ptune.train; "
             "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "True", proc.stderr[-2000:]
