"""Each command's --help says what the command does and how to call it, and points at the file whose comments
explain every setting (Hydra prints the config without them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from reliability_harness import cli

COMMANDS = ["train", "evaluate", "sweep", "chat", "serve", "bench", "quant_check"]
GROUPS = {"train": ["model", "data", "experiment"], "quant_check": ["model", "data"], "evaluate": ["generation"],
          "sweep": ["generation"], "chat": ["generation"], "serve": [], "bench": []}  # what each command composes


@pytest.mark.parametrize("command", COMMANDS)
def test_help_says_what_the_command_does_and_where_each_setting_is_explained(command):
    res = cli(f"ptune.{command}", "--help", timeout=120)
    assert res.rc == 0, res
    out = res.stdout
    assert out.startswith(f"ptune.{command}: "), out[:300]
    assert "powered by Hydra" not in out
    conf = re.search(r"^What each setting does: the comments in (.+)$", out, re.M)
    assert conf and Path(conf.group(1)).is_file(), out[-500:]
    assert f"python -m ptune.{command} " in out  # a usage line
    # The header, then the groups this command takes (only those) with their options, then the config itself.
    groups = out[out.index("python -m"):out.index("== Config ==")]
    listed = re.findall(r"^(\w+): (.+)$", groups, re.M)
    assert [g for g, _ in listed] == GROUPS[command], groups
    assert ("== Configuration groups ==" in groups) == bool(GROUPS[command])
    for group, options in listed:
        assert options.split(", ") == sorted(p.stem for p in (Path(conf.group(1)).parent / group).glob("*.yaml"))
    assert Path(conf.group(1)).name == f"{command}.yaml"
    assert "# " in Path(conf.group(1)).read_text(encoding="utf-8")  # it holds the comments it is cited for


# Runs a command as `python -m` would, and says at exit whether torch was imported.
_TORCH_AT_EXIT = """
import atexit, runpy, sys
atexit.register(lambda: print("torch imported:", "torch" in sys.modules, file=sys.stderr))
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("command, args, status", [
    ("train", ["--help"], 0), ("serve", ["--help"], 0), ("evaluate", ["generation.max_new_token=5"], 1),
    ("train", ["trainer.max_stepz=5"], 1), ("chat", ["generation=nosuch"], 1),
])
def test_help_and_settings_hydra_refuses_are_answered_before_torch_loads(command, args, status):
    """Composing the config comes first (ptune/command.py): --help, and a value of the wrong type, a misspelt key
    or a missing config option, are answered without the seconds that importing torch and transformers take."""
    proc = subprocess.run([sys.executable, "-c", _TORCH_AT_EXIT, f"ptune.{command}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == status, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == "torch imported: False", proc.stderr[-2000:]
    if status:
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 2, proc.stderr


@pytest.mark.parametrize("command, args, message", [
    ("train", [], "error: model.path=outputs/models/smollm2-135m-instruct: no such folder"),
    ("train", ["model.path=null"], "error: model.path is not set"),
    ("train", ["model.path=/m", "data.train_file=/d", "optim.lr=-1"], "error: optim.lr=-1.0: expected a finite number"),
    ("train", ["+trainer.max_step=3"], "error: unknown setting trainer.max_step:"),
    ("evaluate", ["device=gpu"], "error: device='gpu': expected auto, cpu, cuda or cuda:N"),
    ("sweep", ["runs=[x]", "force=maybe"], "error: force='maybe': expected true or false"),
    ("serve", ["checkpoint=/c", "port=70000"], "error: port=70000: expected a TCP port"),
    ("chat", [], "error: pass checkpoint=<run>/checkpoint-N"),
    ("bench", ["decode_steady_tokens=[144,16]"], "error: decode_steady_tokens=[144, 16]: expected more"),
    ("quant_check", ["model.path=/m", "data.train_file=/d", "modes=[]"], "error: modes=[]: expected a list"),
])
def test_values_ptune_rules_out_are_refused_before_torch_loads(command, args, message, tmp_path):
    """ptune.settings' checks run before the command's module is imported: a value out of range, a setting the
    command does not have or a required one left unset costs no imports, and leaves no run folder."""
    proc = subprocess.run([sys.executable, "-c", _TORCH_AT_EXIT, f"ptune.{command}", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == "torch imported: False", proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # train's outputs/<experiment>/<time> is made, then removed


def test_an_interpolation_that_fails_is_named_by_its_setting(tmp_path):
    """An override's own ${...} used to be resolved where ptune listed the overrides, with no setting named."""
    proc = subprocess.run([sys.executable, "-m", "ptune.train", "data.train_file=${oc.env:PTUNE_TEST_UNSET}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PTUNE_TEST_UNSET"})
    assert proc.returncode == 1
    assert proc.stderr == ("error: data.train_file: KeyError raised while resolving interpolation: \"Environment "
                           "variable 'PTUNE_TEST_UNSET' not found\"\n")
    assert list(tmp_path.iterdir()) == []
