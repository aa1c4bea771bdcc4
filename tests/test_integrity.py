"""Integrity checks of model files: a damaged shard is refused, naming the file and what to do."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ptune import verify_model
from ptune.chatglm import integrity
from ptune.chatglm.convert import load_chatglm
from ptune.chatglm.integrity import IntegrityError, verify_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "golden" / "chatglm" / "tiny_chatglm2"
SHARED = ROOT.parent / "shared"


def make_bin_folder(dst: Path) -> list[str]:
    """The tiny ChatGLM2 checkpoint as two .bin shards + index + config, like a real download."""
    dst.mkdir(parents=True)
    sd = load_file(str(TINY / "model.safetensors"))
    keys = list(sd)
    names, weight_map = [], {}
    for k, part_keys in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-{k + 1:05d}-of-00002.bin"
        torch.save({key: sd[key] for key in part_keys}, dst / name)
        weight_map.update(dict.fromkeys(part_keys, name))
        names.append(name)
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copyfile(TINY / "config.json", dst / "config.json")
    return names


def manifest_for(folder: Path, with_sizes: bool = True) -> dict:
    files = {}
    for f in sorted(folder.glob("*.bin")):
        entry = {"sha256": integrity.sha256_file(f)}
        if with_sizes:
            entry["size"] = f.stat().st_size
        files[f.name] = entry
    return {"name": "tiny/test", "how_to_fix": "download it again", "files": files}


def flip_byte(path: Path, offset_from_end: int = 200) -> None:
    """Corrupt one byte inside the tensor data, keeping size (and mtime, as a copy tool might)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    pos = len(data) - offset_from_end if offset_from_end else len(data) // 2
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


@pytest.fixture
def folder(tmp_path) -> tuple[Path, list[str]]:
    d = tmp_path / "model"
    names = make_bin_folder(d)
    return d, names


def test_intact_folder_passes(folder):
    d, names = folder
    m = manifest_for(d)
    checks = verify_dir(d, level="full", manifest=m, raise_on_error=True)
    assert {c.name for c in checks} == set(names)
    assert all(c.status == "ok" for c in checks)


def test_flipped_byte_is_rejected_naming_the_file(folder):
    d, names = folder
    m = manifest_for(d)
    flip_byte(d / names[1], offset_from_end=0)  # a byte in the middle: tensor data, size unchanged
    assert (d / names[1]).stat().st_size == m["files"][names[1]]["size"]
    verify_dir(d, level="size", manifest=m, raise_on_error=True)  # same size: only a hash can tell
    with pytest.raises(IntegrityError) as e:
        verify_dir(d, level="full", manifest=m, raise_on_error=True)
    msg = str(e.value)
    assert names[1] in msg and names[0] not in msg.split("What to do")[0].replace(names[1], "")
    assert m["files"][names[1]]["sha256"] in msg  # expected
    assert integrity.sha256_file(d / names[1]) in msg  # actual
    assert "download it again" in msg and "only the file(s) named above" in msg
    bad = [c for c in e.value.checks if c.failed]
    assert [c.name for c in bad] == [names[1]] and bad[0].status == "HASH MISMATCH"


def test_first_use_hashes_once_and_remembers(folder, monkeypatch):
    d, names = folder
    m = manifest_for(d, with_sizes=False)  # published hashes only, as for chatglm2-6b
    calls = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    checks = verify_dir(d, level="first-use", manifest=m, raise_on_error=True)
    assert sorted(calls) == sorted(names) and all(c.status == "ok" for c in checks)
    cache = json.loads((d / integrity.VERIFIED_CACHE).read_text())
    assert set(cache["files"]) == set(names)
    calls.clear()
    checks = verify_dir(d, level="first-use", manifest=m, raise_on_error=True)
    assert calls == [] and all(c.status == "ok" and "hash remembered" in c.notes for c in checks)
    # a changed file (new mtime) is hashed again and caught
    flip_byte(d / names[0], offset_from_end=0)
    with pytest.raises(IntegrityError, match=names[0]):
        verify_dir(d, level="first-use", manifest=m, raise_on_error=True)
    assert calls == [names[0]]


def test_truncated_shard_fails_the_cheap_check(folder):
    d, names = folder
    m = manifest_for(d, with_sizes=False)
    data = (d / names[0]).read_bytes()
    (d / names[0]).write_bytes(data[: len(data) - 1000])
    with pytest.raises(IntegrityError, match=names[0]) as e:
        verify_dir(d, level="size", manifest=m, raise_on_error=True)
    assert "DAMAGED" in str(e.value)


def test_wrong_size_fails_the_cheap_check(folder):
    d, names = folder
    m = manifest_for(d)  # with sizes
    f = d / names[1]
    f.write_bytes(f.read_bytes() + b"\0" * 10)
    with pytest.raises(IntegrityError, match=f"{names[1]}: WRONG SIZE"):
        verify_dir(d, level="size", manifest=m, raise_on_error=True)


def test_a_damaged_zip_directory_is_damaged_whatever_zipfile_raises(folder):
    """A byte changed in a shard's zip directory can make zipfile raise UnicodeDecodeError or
    NotImplementedError, which came out as a traceback."""
    d, names = folder
    f = d / names[1]
    data = bytearray(f.read_bytes())
    entry = data.find(b"PK\x01\x02")  # the first central-directory entry; its file name starts 46 bytes in
    data[entry + 46] = 0xFF
    f.write_bytes(bytes(data))
    checks = {c.name: c for c in verify_dir(d, level="size")}
    assert checks[names[1]].status == "DAMAGED"
    assert checks[names[1]].detail.startswith("the zip directory at the end of the file is unreadable "
                                              "(UnicodeDecodeError: ")


def test_a_folder_with_both_indexes_and_one_formats_shards_is_complete(tmp_path):
    """Downloaded with --include '*.safetensors' '*.json': the .bin index's shards are not there, nor needed."""
    d = tmp_path / "st"
    make_bin_folder(tmp_path / "bin")
    d.mkdir()
    shutil.copyfile(TINY / "config.json", d / "config.json")
    shutil.copyfile(tmp_path / "bin" / "pytorch_model.bin.index.json", d / "pytorch_model.bin.index.json")
    shutil.copyfile(TINY / "model.safetensors", d / "model-00001-of-00001.safetensors")
    weight_map = dict.fromkeys(load_file(str(TINY / "model.safetensors")), "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    checks = verify_dir(d, level="full")
    assert [c.name for c in checks] == ["model-00001-of-00001.safetensors"] and not any(c.failed for c in checks)
    model = load_chatglm(d, dtype=torch.float32, verify="size")
    assert model.config.num_hidden_layers == 2


def test_truncated_safetensors_is_damaged(tmp_path):
    d = tmp_path / "st"
    shutil.copytree(TINY, d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    checks = verify_dir(d, level="size")
    assert [c.status for c in checks if c.name == "model.safetensors"] == ["DAMAGED"]


def test_missing_shard_reported(folder):
    d, names = folder
    m = manifest_for(d)
    (d / names[0]).unlink()
    with pytest.raises(IntegrityError, match=f"{names[0]}: MISSING"):
        verify_dir(d, level="size", manifest=m, raise_on_error=True)


def test_load_refuses_a_corrupt_shard(folder, monkeypatch):
    d, names = folder
    m = manifest_for(d)
    (d / integrity.OWN_MANIFEST).write_text(json.dumps(m))
    assert load_chatglm(d, dtype=torch.float32) is not None  # first use: hashed, passes
    flip_byte(d / names[1], offset_from_end=0)
    with pytest.raises(IntegrityError, match=names[1]):
        load_chatglm(d, dtype=torch.float32)


def test_read_only_folder_remembers_elsewhere(folder, tmp_path, monkeypatch):
    d, names = folder
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    m = manifest_for(d)
    os.chmod(d, 0o555)
    try:
        if os.access(d, os.W_OK):  # running as root: the folder stays writable, nothing to test
            pytest.skip("folder permissions are not enforced for this user")
        verify_dir(d, level="first-use", manifest=m, raise_on_error=True)
        assert list((tmp_path / "xdg" / "ptune" / "verified").glob("*.json"))
    finally:
        os.chmod(d, 0o755)


def test_safetensors_folder_is_hashed_against_the_manifest_in_it(tmp_path):
    d = tmp_path / "st"
    shutil.copytree(TINY, d)
    f = d / "model.safetensors"
    manifest = {"name": "tiny/test", "files": {f.name: {"size": f.stat().st_size, "sha256": integrity.sha256_file(f)}}}
    (d / integrity.OWN_MANIFEST).write_text(json.dumps(manifest))
    assert all(c.status == "ok" for c in verify_dir(d, level="full", raise_on_error=True))
    flip_byte(f, offset_from_end=100)
    with pytest.raises(IntegrityError, match="model.safetensors"):
        verify_dir(d, level="full", raise_on_error=True)


def test_bundled_chatglm2_manifest_matches_by_config(tmp_path):
    manifests = {m["name"]: m for m in integrity.bundled_manifests()}
    m = manifests["THUDM/chatglm2-6b"]
    assert len(m["files"]) == 7 and all(len(f["sha256"]) == 64 for f in m["files"].values())
    d = tmp_path / "chatglm2-6b"
    d.mkdir()
    cfg = {"_name_or_path": "THUDM/chatglm2-6b", "model_type": "chatglm"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "pytorch_model-00001-of-00007.bin").write_bytes(b"not the real shard")
    assert integrity.find_manifest(d)["name"] == "THUDM/chatglm2-6b"
    checks = verify_dir(d, level="first-use")
    by_name = {c.name: c for c in checks}
    assert by_name["pytorch_model-00001-of-00007.bin"].status == "HASH MISMATCH"
    assert by_name["pytorch_model-00002-of-00007.bin"].status == "MISSING"
    # ChatGLM3-6B ships shards with the same names but other hashes: it must not match
    (d / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "THUDM/chatglm3-6b"}))
    assert integrity.find_manifest(d) is None


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED / "chatglm" / "chatglm2-6b" / "config.json").is_file(),
                    reason="needs the real chatglm2-6b config.json in ../shared")
def test_real_chatglm2_config_selects_the_manifest(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copyfile(SHARED / "chatglm" / "chatglm2-6b" / "config.json", d / "config.json")
    (d / "pytorch_model-00003-of-00007.bin").write_bytes(b"x")
    assert integrity.find_manifest(d)["name"] == "THUDM/chatglm2-6b"
    shutil.copyfile(SHARED / "chatglm" / "chatglm3-6b" / "config.json", d / "config.json")
    assert integrity.find_manifest(d) is None


def test_cli_prints_a_table_and_fails_on_damage(folder, capsys):
    d, names = folder
    (d / integrity.OWN_MANIFEST).write_text(json.dumps(manifest_for(d)))
    assert verify_model.main([str(d), "--full"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in names) and "all files passed" in out
    assert verify_model.main([str(d)]) == 0 and "all files passed" in capsys.readouterr().out  # remembered
    flip_byte(d / names[0], offset_from_end=0)
    assert verify_model.main([str(d)]) == 0  # quick check: same size, and a changed file's old hash is not trusted
    capsys.readouterr()
    assert verify_model.main([str(d), "--full"]) == 1
    out = capsys.readouterr().out
    assert "HASH MISMATCH" in out and names[0] in out and "download it again" in out.lower()


@pytest.mark.parametrize("content, fault", [
    (None, "unreadable (No such file or directory)"),
    ("[1]", 'a JSON list, expected {"files": {"<file>": {"sha256": "<hex>", "size": <bytes>}}}'),
    ("{bad", "not valid JSON"),
    # the shape of a ptune checkpoint's manifest.json, not a model folder's: checking nothing must not pass
    ('{"NAME": {"sha256": "' + "0" * 64 + '", "bytes": 1}}', 'no "files" object listing files'),
    ('{"files": {}}', 'no "files" object listing files'),
    ('{"files": {"NAME": {"sha256": "00"}}}', "files['NAME'] is {\"sha256\": \"00\"}; expected"),
    ('{"files": {"NAME": {"size": "12"}}}', "files['NAME'] is {\"size\": \"12\"}; expected"),
    ('{"files": {"NAME": {}}}', "files['NAME'] is {}; expected"),
    ('{"files": {"../NAME": {"size": 1}}}', "files['../NAME'] names a file outside the model folder"),
    ('{"files": {"/etc/passwd": {"size": 1}}}', "files['/etc/passwd'] names a file outside the model folder"),
])
def test_cli_refuses_a_manifest_it_cannot_use_in_one_line(folder, capsys, tmp_path, content, fault):
    d, names = folder
    manifest = tmp_path / "manifest.json"
    if content is not None:
        manifest.write_text(content.replace("NAME", names[0]))
    assert verify_model.main([str(d), "--manifest", str(manifest), "--full"]) == 2
    captured = capsys.readouterr()
    assert "passed" not in captured.out
    assert captured.err.startswith(f"error: {manifest}: ") and fault.replace("NAME", names[0]) in captured.err, \
        captured.err


# ----------------------------------------------------------------------------------- malformed files


def safetensors_bytes(header: bytes, data: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + data


@pytest.mark.parametrize("content, fault", [
    (b"\x10\x00\x00\x00", "the file has 4 bytes, fewer than the 8"),
    (safetensors_bytes(b'{"x": {"dtype": "F32"')[:-3], "safetensors header claims 21 bytes, the file has 26"),
    ((1 << 63).to_bytes(8, "little") + b"{}", f"safetensors header claims {1 << 63} bytes"),
    (safetensors_bytes(b"hello!!!"), "unreadable safetensors header"),
    (safetensors_bytes(b'{"\xff": 1}'), "unreadable safetensors header"),
    (safetensors_bytes(b"[1, 2]"), "the safetensors header is a JSON list, expected an object"),
    (safetensors_bytes(b'"abc"'), "the safetensors header is a JSON str, expected an object"),
    (safetensors_bytes(b'{"x": 5}'), "entry 'x' is 5; expected"),
    (safetensors_bytes(b'{"x": {"dtype": "F32", "shape": [1]}}', b"\0" * 4), "entry 'x' is "),
    (safetensors_bytes(b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": "ab"}}'), "entry 'x' is "),
    (safetensors_bytes(b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}'), "entry 'x' is "),
    (safetensors_bytes(b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}'), "entry 'x' is "),
    (safetensors_bytes(b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}'), "entry 'x' is "),
    (safetensors_bytes(b'{"x": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}'), "entry 'x' is "),
    (safetensors_bytes(b'{"__metadata__": [1]}'), "__metadata__ is [1]; expected an object of strings"),
], ids=["short", "cut-in-header", "huge-length", "not-json", "not-utf8", "list", "string", "entry-not-object",
        "no-offsets", "offsets-string", "one-offset", "offsets-strings", "offsets-reversed", "shape-string",
        "metadata-list"])
def test_malformed_safetensors_header_is_damaged_not_a_crash(tmp_path, capsys, content, fault):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copyfile(TINY / "config.json", d / "config.json")
    (d / "model.safetensors").write_bytes(content)
    (check,) = verify_dir(d, level="size")
    assert check.status == "DAMAGED" and fault in check.detail, check.detail
    with pytest.raises(IntegrityError, match="model.safetensors: DAMAGED"):
        load_chatglm(d, dtype=torch.float32, verify="size")
    assert verify_model.main([str(d)]) == 1
    assert "1 file(s) failed: model.safetensors" in capsys.readouterr().out


def index_folder(tmp_path: Path, index: str) -> Path:
    d = tmp_path / "model"
    shutil.copytree(TINY, d)
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(index)
    return d


@pytest.mark.parametrize("index, fault", [
    ("{nope", "not valid JSON"),
    ("[1]", 'no "weight_map" object'),
    ({"metadata": {}}, 'no "weight_map" object'),
    ({"weight_map": ["model-00001-of-00001.safetensors"]}, 'no "weight_map" object'),
    ({"weight_map": {"a.weight": 5}}, "weight_map['a.weight'] is 5; expected the name of a shard file in"),
    ({"weight_map": {"a.weight": ""}}, "weight_map['a.weight'] is \"\"; expected"),
    ({"weight_map": {"a.weight": "../outside.safetensors"}},
     "weight_map['a.weight'] is \"../outside.safetensors\"; expected the name of a shard file in"),
    ({"weight_map": {"a.weight": "OUTSIDE"}}, "weight_map['a.weight'] is \"OUTSIDE\"; expected"),
    ({"weight_map": {"a.weight": "sub/model.safetensors"}}, "weight_map['a.weight'] is \"sub/model.safetensors\""),
], ids=["not-json", "list", "no-weight-map", "weight-map-list", "shard-int", "shard-empty", "dot-dot", "absolute",
        "subfolder"])
def test_malformed_or_escaping_index_is_refused_naming_the_entry(tmp_path, capsys, index, fault):
    # A real shard outside the folder: following the entry would read (and hash) it.
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(TINY / "model.safetensors", outside)
    text = (index if isinstance(index, str) else json.dumps(index)).replace("OUTSIDE", str(outside))
    fault = fault.replace("OUTSIDE", str(outside))
    d = index_folder(tmp_path, text)
    where = f"{d / 'model.safetensors.index.json'}: "
    with pytest.raises(IntegrityError) as e:
        verify_dir(d, level="size")
    assert str(e.value).startswith(where) and fault in str(e.value), str(e.value)
    with pytest.raises(IntegrityError, match="weight_map|JSON"):
        load_chatglm(d, dtype=torch.float32, verify="none")  # refused when reading the index, not by the check
    assert verify_model.main([str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {where}") and fault in err and err.count("\n") == 1, err


@pytest.mark.parametrize("cache", [
    "[1]", '"files"', '{"files": [1]}', '{"files": {"model.safetensors": "0000"}}',
    '{"files": {"model.safetensors": {"size": SIZE, "mtime_ns": MTIME, "sha256": 5}}}',
    '{"files": {"model.safetensors": {"size": SIZE, "mtime_ns": MTIME, "sha256": "abc"}}}',
], ids=["list", "string", "files-list", "entry-string", "sha-int", "sha-short"])
def test_a_verified_cache_of_another_shape_is_ignored_and_rewritten(tmp_path, capsys, cache):
    d = tmp_path / "st"
    shutil.copytree(TINY, d)
    f = d / "model.safetensors"
    st = f.stat()
    (d / integrity.VERIFIED_CACHE).write_text(cache.replace("SIZE", str(st.st_size))
                                              .replace("MTIME", str(st.st_mtime_ns)))
    digest = integrity.sha256_file(f)
    manifest = {"files": {f.name: {"sha256": digest}}}
    (check,) = verify_dir(d, level="first-use", manifest=manifest, raise_on_error=True)
    assert check.status == "ok" and "hashed now" in check.notes  # nothing taken from the malformed cache
    assert json.loads((d / integrity.VERIFIED_CACHE).read_text())["files"][f.name]["sha256"] == digest
    (d / integrity.VERIFIED_CACHE).write_text(cache.replace("SIZE", str(st.st_size))
                                              .replace("MTIME", str(st.st_mtime_ns)))
    assert verify_model.main([str(d)]) == 0 and "all files passed" in capsys.readouterr().out


def test_a_config_that_is_not_an_object_matches_no_manifest(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("[1]")
    (d / "pytorch_model-00001-of-00007.bin").write_bytes(b"x")  # a name the bundled chatglm2 manifest lists
    assert integrity.find_manifest(d) is None
    assert [c.status for c in verify_dir(d, level="size")] == ["present"]
