"""Files written whole: the old content survives a writer that fails part-way, and nothing is left beside it."""

from __future__ import annotations

import os
import stat

import pytest

from ptune.files import replacing, sha256_file, write_text_atomic


def test_write_replaces_in_one_rename_and_keeps_newlines(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old\n", encoding="utf-8")
    write_text_atomic(path, "一\r\n二\n")
    assert path.read_bytes() == "一\r\n二\n".encode("utf-8")  # no newline translation
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "loss.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with replacing(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["loss.png"]
    with pytest.raises(RuntimeError):  # failing before the file exists is no second error
        with replacing(tmp_path / "new.png"):
            raise RuntimeError("before writing")
    assert os.listdir(tmp_path) == ["loss.png"]


def test_written_files_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644  # readable by the group, like open()


def test_sha256_of_a_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_saved_tensors_are_as_readable_as_any_new_file(tmp_path):
    """safetensors makes its files owner-only: a shared run folder's prefix was unreadable to the colleague who
    evaluates or resumes it, beside readable JSON files."""
    import torch

    from ptune import checkpoint as ck
    from ptune.files import NEW_FILE_MODE, save_tensors

    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    save_tensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) \
        == NEW_FILE_MODE
    out = ck.save_checkpoint(tmp_path / "run", 1, {"w": torch.zeros(2)}, {"prefix": {}}, {"seed": 0},
                             torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1).state_dict())
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        p.name: NEW_FILE_MODE for p in out.iterdir()}


@pytest.mark.parametrize("content, said", [
    (None, "unreadable (No such file or directory); the run is damaged"),
    ("{cut", "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)), "
             "expected an object of steps; the run is damaged"),
    ("[1, 2]", "a JSON list, expected an object of steps; the run is damaged"),
    ("denied", "unreadable (Permission denied); give this user read access to it and its folders"),
])
def test_a_json_file_that_is_not_an_object_is_one_line_naming_it_and_the_fault(tmp_path, monkeypatch, content, said):
    from pathlib import Path

    from ptune.files import read_json_object

    path = tmp_path / "state.json"
    if content == "denied":  # root reads whatever the mode bits say, so the refusal is what the kernel raises
        def read_text(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "read_text", read_text)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as e:
        read_json_object(path, ValueError, "; the run is damaged", "an object of steps")
    assert str(e.value) == f"{path}: {said}"


def test_a_json_object_is_read_as_it_is(tmp_path):
    from ptune.files import read_json_object

    (tmp_path / "s.json").write_text('{"step": 3, "name": "二"}', encoding="utf-8")
    assert read_json_object(tmp_path / "s.json", ValueError) == {"step": 3, "name": "二"}
