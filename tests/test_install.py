"""ptune installed from its wheel (`pip install .`, not the editable install): the commands find their configs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="building the wheel needs setuptools")
def test_the_wheel_carries_the_configs_and_its_commands_run_from_anywhere(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                    str(tmp_path / "wheel"), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("ptune-*.whl")
    packed = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("ptune/conf/")}
    assert packed == {"ptune/conf/" + str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    # ahead of the editable install, and of a checkout on the path
    paths = (str(tmp_path / "site"), os.environ.get("PYTHONPATH"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)

    where = run("-c", "import ptune.config as c; print(c.__file__); print(c.conf_dir())")
    installed = tmp_path / "site" / "ptune"
    assert where.stdout.split() == [str(installed / "config.py"), str(installed / "conf")]
    help_text = run("-m", "ptune.train", "--help")
    assert help_text.returncode == 0 and "experiment: adgen_3000steps, adgen_60steps" in help_text.stdout, help_text
    refused = run("-m", "ptune.evaluate", "checkpoint=nope")
    assert refused.returncode == 1 and refused.stderr.strip() == (
        "error: data.eval_file is not set; pass data.eval_file=... on the command line"), refused.stderr
