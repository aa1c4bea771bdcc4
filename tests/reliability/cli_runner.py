"""Runs ptune's command lines in forked children of one warm interpreter, optionally with a fault injected.

`python -m ptune.train ...` spends ~8 s of its life importing torch and transformers; the reliability
suite runs dozens of command lines. This helper imports those once, then for each request forks a
child that does exactly what `python -m <module> <args>` does after start-up: `runpy.run_module(module,
run_name="__main__")` with that argv, its stdout/stderr in files, an uncaught exception printed as a
traceback with exit code 1, SystemExit handled as the interpreter handles it. So exit codes, messages
and tracebacks (or their absence) are those of the real command line. A fault, when asked for, is
patched into the child before the module runs (e.g. SIGKILL in the middle of writing a checkpoint).

Protocol: one JSON object per line on stdin, one JSON reply per line on stdout.
  {"op": "start", "module": ..., "argv": [...], "cwd": ..., "env": {...}, "log": <path prefix>,
   "fault": null | {"fault": <name in FAULTS>, ...its arguments}}                    -> {"pid": N}
  {"op": "wait", "pid": N, "timeout": seconds}                  -> {"rc": int | null}  (-9: killed by SIGKILL)
"""

from __future__ import annotations

import json
import logging
import os
import re
import runpy
import signal
import sys
import time
import traceback
from pathlib import Path

# ----------------------------------------------------------------------------------------- faults


def _die() -> None:
    """What `kill -9` does to a process: no handler, no flush, no cleanup."""
    os.kill(os.getpid(), signal.SIGKILL)


def _in_save_of(path: Path, step: int) -> bool:
    """True for a file inside the temporary folder of the save of checkpoint-<step>."""
    return re.fullmatch(rf"\.checkpoint-{step}\.tmp-\d+", Path(path).parent.name) is not None


def fault_kill_in_save_file(file: str, step: int, truncate: bool = False) -> None:
    """SIGKILL while checkpoint-<step> is being written: just before `file` (or, with truncate, after
    half of it has reached the disk)."""
    import ptune.checkpoint as ck

    real = ck.save_tensors

    def save_file(tensors, path, *args, **kwargs):
        if Path(path).name == file and _in_save_of(path, step):
            if truncate:
                real(tensors, path, *args, **kwargs)
                size = os.path.getsize(path)
                os.truncate(path, size // 2)
            _die()
        return real(tensors, path, *args, **kwargs)

    ck.save_tensors = save_file


def fault_kill_at_fsync(file: str, step: int) -> None:
    """SIGKILL when the save of checkpoint-<step> flushes `file`: a file of its temporary folder
    (`manifest.json`: every file written, the folder not yet renamed into place), or `<run>` for the
    run folder itself, flushed right after the rename."""
    import ptune.checkpoint as ck

    real = ck._fsync

    def fsync(path):
        path = Path(path)
        if file == "<run>":
            hit = path.is_dir() and (path / f"checkpoint-{step}").is_dir()
        else:
            hit = path.name == file and _in_save_of(path, step)
        if hit:
            _die()
        return real(path)

    ck._fsync = fsync


def fault_kill_between_renames(step: int) -> None:
    """SIGKILL while checkpoint-<step> is re-saved over an existing one: the old folder has been moved
    aside, the new one not yet moved in."""
    import pathlib

    real = pathlib.Path.rename

    def rename(self, target):
        target = pathlib.Path(target)
        if target.name == f"checkpoint-{step}" and re.fullmatch(rf"\.checkpoint-{step}\.tmp-\d+", self.name) \
                and any(p.name.startswith(f".checkpoint-{step}.old-") for p in self.parent.iterdir()):
            _die()
        return real(self, target)

    pathlib.Path.rename = rename


def fault_overflow_in_step(step: int) -> None:
    """The update of optimizer step <step> leaves inf in the prefix although its loss and gradient were
    finite (what a learning rate near float32's limit or a half-precision overflow in the update does)."""
    import torch

    import ptune.train as train_module  # the command's module, which ptune.command imports: it holds the name

    real = train_module.optimizer_step
    calls = []

    def optimizer_step(loss_fn, params, *args, **kwargs):
        result = real(loss_fn, params, *args, **kwargs)
        calls.append(None)
        if len(calls) == step:
            with torch.no_grad():
                params[0].view(-1)[0] = float("inf")
        return result

    train_module.optimizer_step = optimizer_step


def fault_oom_in_step(step: int) -> None:
    """Optimizer step <step> runs out of device memory: what the CUDA caching allocator raises, message and all."""
    import torch

    import ptune.train as train_module

    real = train_module.optimizer_step
    calls = []

    def optimizer_step(*args, **kwargs):
        calls.append(None)
        if len(calls) == step:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.55 GiB of which "
                "1.06 GiB is free.\nOf the allocated memory 20.93 GiB is allocated by PyTorch.")
        return real(*args, **kwargs)

    train_module.optimizer_step = optimizer_step


def fault_sigterm_reading_data() -> None:
    """SIGTERM arrives while the trainer reads and tokenizes its data, before the first step."""
    import ptune.train as train_module

    real = train_module.training_rows

    def training_rows(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    train_module.training_rows = training_rows


def fault_device_memory_cap(mib: int) -> None:
    """The CUDA allocator refuses to hold more than <mib> MiB: its own out-of-memory error, nothing injected."""
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.set_per_process_memory_fraction(mib * 2**20 / total)


FAULTS = {"kill_in_save_file": fault_kill_in_save_file, "kill_at_fsync": fault_kill_at_fsync,
          "kill_between_renames": fault_kill_between_renames, "overflow_in_step": fault_overflow_in_step,
          "oom_in_step": fault_oom_in_step,
          "sigterm_reading_data": fault_sigterm_reading_data, "device_memory_cap": fault_device_memory_cap}

# ----------------------------------------------------------------------------------------- the child


def _child(req: dict) -> None:
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, suffix in ((1, ".stdout"), (2, ".stderr")):
            f = os.open(req["log"] + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.stdout = sys.__stdout__  # the warm parent points print() at stderr to keep its protocol stream clean
        for key, value in (req.get("env") or {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.chdir(req["cwd"])
        # A fresh interpreter's signal dispositions, whatever the parent did.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        fault = req.get("fault")
        if fault:
            fault = dict(fault)
            FAULTS[fault.pop("fault")](**fault)
        import importlib.util
        import warnings

        # The module is already imported in this warm interpreter (a fresh one has not); runpy warns.
        warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package",
                                category=RuntimeWarning)

        spec = importlib.util.find_spec(req["module"])
        sys.argv = [spec.origin, *req["argv"]]
        try:
            runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - the interpreter's own behaviour for an uncaught exception
            traceback.print_exc()
            code = 1
    finally:
        try:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _wait(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.01)


def main() -> None:
    import torch

    torch.set_num_threads(1)
    # Everything the command lines import, loaded once here and shared by every forked child.
    import datasets  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401
    import ptune.evaluate  # noqa: F401
    import ptune.train  # noqa: F401

    proto = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies on the protocol stream
    print(json.dumps({"ready": True}), file=proto, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "start":
            pid = os.fork()
            if pid == 0:
                _child(req)
            print(json.dumps({"pid": pid}), file=proto, flush=True)
        elif req["op"] == "wait":
            print(json.dumps({"rc": _wait(req["pid"], req.get("timeout", 300))}), file=proto, flush=True)


if __name__ == "__main__":
    main()
