"""Each command's --help says what the command does and how to call it, and points at the file whose comments
explain every setting (Hydra prints the config without them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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
