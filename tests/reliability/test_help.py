"""Each command's --help says what the command does and how to call it, and points at the file whose comments
explain every setting (Hydra prints the config without them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from reliability_harness import cli

COMMANDS = ["train", "evaluate", "sweep", "chat", "serve", "bench", "quant_check"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_says_what_the_command_does_and_where_each_setting_is_explained(command):
    res = cli(f"ptune.{command}", "--help", timeout=120)
    assert res.rc == 0, res
    out = res.stdout
    assert out.startswith(f"ptune.{command}: "), out[:300]
    assert "powered by Hydra" not in out
    assert f"python -m ptune.{command} " in out  # a usage line
    # The header, then Hydra's groups and the config itself, as before.
    assert out.index("python -m") < out.index("== Configuration groups ==") < out.index("== Config ==")
    conf = re.search(r"^What each setting does: the comments in (.+)$", out, re.M)
    assert conf and Path(conf.group(1)).is_file(), out[-500:]
    assert Path(conf.group(1)).name == f"{command}.yaml"
    assert "# " in Path(conf.group(1)).read_text(encoding="utf-8")  # it holds the comments it is cited for
