"""Shared helpers of the reliability suite: running ptune's command lines, and what to check afterwards.

Two ways to run a command line:
* `python_m(...)` / `popen_m(...)`: a real `python -m ptune.<module>` subprocess (the headline tests);
* `cli(...)` / `cli_start(...)`: the same entry point in a forked child of a warm interpreter
  (cli_runner.py), ~1 s instead of ~10 s, optionally with a fault patched in. One test runs a hostile
  input both ways and checks they agree.
Module-level state (the warm runner, reference runs) is shared by every test module of the session.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("cli_runner.py")
LOGS = Path(tempfile.mkdtemp(prefix="ptune-reliability-logs-"))  # stdout/stderr of every command line
atexit.register(shutil.rmtree, LOGS, ignore_errors=True)


@dataclass
class Result:
    rc: int | None
    stdout: str
    stderr: str
    argv: list[str]

    def __str__(self) -> str:
        return f"{' '.join(self.argv)}\nrc={self.rc}\n--- stderr (tail) ---\n{self.stderr[-3000:]}"


# ---------------------------------------------------------------------------------------- command lines


def _read_logs(prefix: str) -> tuple[str, str]:
    out = Path(prefix + ".stdout")
    err = Path(prefix + ".stderr")
    return (out.read_text(encoding="utf-8", errors="replace") if out.exists() else "",
            err.read_text(encoding="utf-8", errors="replace") if err.exists() else "")


_counter = iter(range(10**9))


def _log_prefix(module: str) -> str:
    return str(LOGS / f"{next(_counter):04d}-{module.rsplit('.', 1)[-1]}")


class Proc:
    """A command line in flight (either kind): pid, signals, wait -> Result."""

    def __init__(self, argv, log, pid, waiter):
        self.argv, self.log, self.pid, self._waiter = argv, log, pid, waiter
        self._result: Result | None = None

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 300) -> Result:
        if self._result is None:
            rc = self._waiter(timeout)
            self._result = Result(rc, *_read_logs(self.log), self.argv)
        return self._result

    def stderr_so_far(self) -> str:
        return _read_logs(self.log)[1]


def popen_m(module: str, *argv: str, env: dict | None = None) -> Proc:
    """A real `python -m module argv...` subprocess in the repository root."""
    cmd = [sys.executable, "-m", module, *map(str, argv)]
    log = _log_prefix(module)
    with open(log + ".stdout", "wb") as out, open(log + ".stderr", "wb") as err:
        p = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                             env={**os.environ, **(env or {})})

    def waiter(timeout):
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            return None

    return Proc(cmd, log, p.pid, waiter)


def python_m(module: str, *argv: str, timeout: float = 300, env: dict | None = None) -> Result:
    return popen_m(module, *argv, env=env).wait(timeout)


class _Runner:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(RUNNER)], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ})
        self.lock = threading.Lock()
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError("the warm command-line runner did not start")

    def ask(self, req: dict) -> dict:
        with self.lock:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError("the warm command-line runner died")
        return json.loads(reply)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_runner: _Runner | None = None


def runner() -> _Runner:
    global _runner
    if _runner is None:
        _runner = _Runner()
        atexit.register(_runner.close)
    return _runner


def cli_start(module: str, *argv: str, fault: dict | None = None, env: dict | None = None) -> Proc:
    """`python -m module argv...` as a forked child of the warm runner (see cli_runner.py)."""
    argv = [str(a) for a in argv]
    log = _log_prefix(module)
    pid = runner().ask({"op": "start", "module": module, "argv": argv, "cwd": str(REPO), "env": env or {},
                        "log": log, "fault": fault})["pid"]
    return Proc(["python", "-m", module, *argv] + ([f"  [fault: {fault}]"] if fault else []), log, pid,
                lambda timeout: runner().ask({"op": "wait", "pid": pid, "timeout": timeout})["rc"])


def cli(module: str, *argv: str, fault: dict | None = None, env: dict | None = None, timeout: float = 300) -> Result:
    return cli_start(module, *argv, fault=fault, env=env).wait(timeout)


# ---------------------------------------------------------------------------------------- training runs


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """The suite's standard run: tiny llama, prefix 4, 2 x 2 rows per step, 8 steps, a checkpoint every 2."""
    return [f"model.path={model}", f"data.train_file={data}", f"output_dir={out}", "prefix.length=4",
            "prefix.dropout=0.2", "trainer.per_device_batch_size=2", "trainer.gradient_accumulation_steps=2",
            "trainer.max_steps=8", "trainer.save_steps=2", "trainer.log_steps=1", "trainer.progress_bar=false",
            "trainer.tensorboard=false", "optim.lr=0.05", *extra]


def write_long_rows(path: Path, n: int = 48) -> Path:
    """Rows of a few hundred characters each, so one optimizer step takes long enough on a tiny model to
    signal a run in the middle of it (each row joins several rows of the built-in sample)."""
    from conftest import sample_rows

    rows = sample_rows()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            chunk = [rows[(i * 7 + j) % len(rows)] for j in range(6)]
            f.write(json.dumps({"content": "，".join(r["content"] for r in chunk),
                                "summary": "".join(r["summary"] for r in chunk[:4])}, ensure_ascii=False) + "\n")
    return path


LONG = ["data.max_source_length=192", "data.max_target_length=384"]


def logged(run: Path) -> list[dict]:
    path = run / "train_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def last_logged_step(run: Path) -> int:
    try:
        entries = logged(run)
    except ValueError:  # a line being written right now
        return 0
    return entries[-1]["step"] if entries else 0


def prefix_of(ckpt: Path) -> torch.Tensor:
    return load_file(ckpt / "prefix.safetensors")["embedding.weight"]


def wait_for(condition, proc: Proc, what: str, timeout: float = 120, poll: float = 0.005) -> None:
    """Poll `condition` until true; fail early (with the process's stderr) if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{proc.stderr_so_far()[-3000:]}")
        try:
            os.kill(proc.pid, 0)
            exited = _is_zombie(proc.pid)
        except ProcessLookupError:
            exited = True
        if exited and not condition():
            raise AssertionError(f"the run ended before {what}\n{proc.stderr_so_far()[-3000:]}")
        time.sleep(poll)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


class Background:
    """A run started now and collected later (lets two command lines share the two cores)."""

    def __init__(self, proc: Proc, out: Path):
        self.proc, self.out = proc, out

    def result(self) -> Path:
        res = self.proc.wait(600)
        assert res.rc == 0, str(res)
        return self.out


def train_in_background(model: Path, data: Path, out: Path, *extra: str) -> Background:
    """The suite's standard run (train_args) into `out`, started now; a reference for the runs a test breaks."""
    return Background(cli_start("ptune.train", *train_args(model, data, out, *extra)), out)


# ---------------------------------------------------------------------------------------- checks


def snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """relative path -> SHA-256 of every file under `folder` (to prove nothing was changed)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in skip:
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_clean_error(res: Result, *fragments: str, rc: tuple[int, ...] = (1,)) -> str:
    """Exit code in `rc`, no Python traceback, and one stderr line holding every fragment; returns it.
    An "error: ..." line's message is on the console once (not also as a log line)."""
    assert res.rc in rc, str(res)
    assert "Traceback" not in res.stderr, str(res)
    lines = [line for line in res.stderr.splitlines() if all(f in line for f in fragments)]
    assert lines, f"no stderr line contains all of {fragments}\n{res}"
    if lines[0].startswith("error: "):
        message = lines[0][len("error: "):]
        assert sum(message in line for line in res.stderr.splitlines()) == 1, f"the error is shown twice\n{res}"
    return lines[0]


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    pos = len(data) - 5 if offset is None else offset
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


def kill_quietly(proc: Proc) -> None:
    try:
        proc.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass
