"""Bundle archives: the loader's opener refuses everything but plain files and folders inside the bundle, and
fuzzing it (and the manifest parser) finds no failure other than the documented BundleError."""

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from edgeexport.bundle.loader import BundleError, open_archive, read_manifest, verify

FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))


def _tar(path, members):
    """members: (name, kind, data) with kind file | dir | symlink | hardlink | fifo."""
    with tarfile.open(path, "w:gz") as tf:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE}[kind]
            info.linkname = data.decode("latin-1") if kind in ("symlink", "hardlink") else ""
            tf.addfile(info)
    return path


def _zip(path, members):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, kind, data in members:
            info = zipfile.ZipInfo(name)
            if kind == "symlink":
                info.external_attr = (0o120777 << 16)
            elif kind == "dir":
                info = zipfile.ZipInfo(name.rstrip("/") + "/")
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data if kind != "dir" else b"")
    return path


def _inside(dest: Path, got: Path) -> bool:
    return str(got.resolve()).startswith(str(dest.resolve()))


@pytest.mark.parametrize("make", [_tar, _zip])
def test_a_plain_bundle_archive_opens_to_its_folder(tmp_path, make):
    arc = make(tmp_path / ("b.tar.gz" if make is _tar else "b.zip"),
               [("b/manifest.json", "file", b"{}"), ("b/golden/000.npz", "file", b"x")])
    root = open_archive(arc, tmp_path / "out")
    assert root == tmp_path / "out" / "b" and (root / "golden" / "000.npz").read_bytes() == b"x"


@pytest.mark.parametrize("members,why", [
    ([("../evil", "file", b"x")], "escapes"),
    ([("b/../../evil", "file", b"x")], "escapes"),
    ([("/etc/evil", "file", b"x")], "unsafe name"),
    ([("C:/evil", "file", b"x")], "unsafe name"),
    ([("b\\..\\evil", "file", b"x")], "unsafe name"),
    ([("b/link", "symlink", b"/etc/passwd")], "is a link"),
    ([("b/x", "file", b"1"), ("b/hard", "hardlink", b"b/x")], "link"),
    ([("b/pipe", "fifo", b"")], "special"),
    ([("b/x", "file", b"1"), ("b/x", "file", b"2")], "twice"),
])
def test_tar_members_that_are_not_plain_files_inside_the_folder_are_refused(tmp_path, members, why):
    arc = _tar(tmp_path / "a.tar.gz", members)
    with pytest.raises(BundleError, match=why):
        open_archive(arc, tmp_path / "out")
    assert not (tmp_path / "evil").exists() and not any(p.is_symlink() for p in (tmp_path / "out").rglob("*"))


def test_zip_symlink_and_escape_are_refused(tmp_path):
    with pytest.raises(BundleError, match="link"):
        open_archive(_zip(tmp_path / "l.zip", [("b/link", "symlink", b"/etc/passwd")]), tmp_path / "o1")
    with pytest.raises(BundleError, match="escapes"):
        open_archive(_zip(tmp_path / "e.zip", [("b/../../evil", "file", b"x")]), tmp_path / "o2")


def test_a_decompression_bomb_is_refused_while_extracting(tmp_path):
    arc = _zip(tmp_path / "bomb.zip", [("b/manifest.json", "file", b"{}"), ("b/zeros", "file", bytes(40 << 20))])
    assert arc.stat().st_size < (1 << 20)  # 40 MiB of zeros in well under 1 MiB
    with pytest.raises(BundleError, match="size limit"):
        open_archive(arc, tmp_path / "out")


def test_garbage_is_not_an_archive(tmp_path):
    for name in ("x.tar.gz", "x.zip"):
        (tmp_path / name).write_bytes(b"\x1f\x8b not really")
        with pytest.raises(BundleError, match="not a readable"):
            open_archive(tmp_path / name, tmp_path / f"out-{name}")


_names = st.lists(st.sampled_from(["b", "..", ".", "", "/", "\\", "C:", "x", "golden", "manifest.json", "é", " "]),
                  min_size=1, max_size=5).map("/".join)
_members = st.lists(st.tuples(_names, st.sampled_from(["file", "dir", "symlink", "hardlink", "fifo"]),
                              st.binary(max_size=64)), min_size=1, max_size=6)


@pytest.mark.filterwarnings("ignore:Duplicate name")  # the fuzzer asks zipfile to write duplicates: refused later
@FUZZ
@given(members=_members, as_zip=st.booleans())
def test_fuzz_archive_opener(tmp_path_factory, members, as_zip):
    tmp = tmp_path_factory.mktemp("fuzz")
    try:
        arc = (_zip if as_zip else _tar)(tmp / ("a.zip" if as_zip else "a.tar.gz"), members)
    except (ValueError, OSError, UnicodeError):
        assume(False)  # the standard library cannot even write this archive
    dest = tmp / "out"
    dest.mkdir()
    try:
        root = open_archive(arc, dest)
    except BundleError:
        pass
    else:
        assert _inside(dest, root)
        for p in dest.rglob("*"):
            assert not p.is_symlink() and (p.is_file() or p.is_dir()) and _inside(dest, p)
    assert {p.name for p in tmp.iterdir()} <= {"out", arc.name}  # nothing written outside ``out``


@FUZZ
@given(data=st.binary(max_size=512), suffix=st.sampled_from([".tar.gz", ".zip"]))
def test_fuzz_random_bytes_as_archive(tmp_path_factory, data, suffix):
    tmp = tmp_path_factory.mktemp("rand")
    (tmp / f"a{suffix}").write_bytes(data)
    try:
        open_archive(tmp / f"a{suffix}", tmp / "out")
    except BundleError:
        pass


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=20)
_REQUIRED = ["schema_version", "target", "precision", "model_file", "files", "inputs", "outputs", "runtime", "golden"]


@FUZZ
@given(manifest=st.dictionaries(st.sampled_from(_REQUIRED + ["extra"]), _json, max_size=10) | _json
       # every required field present, with schema_version 1 (or what compares equal to it), types left to chance
       | st.fixed_dictionaries({k: _json for k in _REQUIRED[1:]}).map(lambda d: {"schema_version": 1, **d})
       | st.fixed_dictionaries({k: _json for k in _REQUIRED[1:]}).map(lambda d: {"schema_version": True, **d}),
       raw=st.none() | st.binary(max_size=64))
@example(manifest={"target": None, "precision": None, "model_file": [], "files": [], "schema_version": True,
                   "inputs": None, "outputs": None, "runtime": None, "golden": None}, raw=None)  # found by this fuzzer
def test_fuzz_manifest_parser_and_checksum_verifier(tmp_path_factory, manifest, raw):
    root = tmp_path_factory.mktemp("m")
    (root / "manifest.json").write_bytes(raw if raw is not None else json.dumps(manifest).encode())
    (root / "model.onnx").write_bytes(b"model")
    try:
        m = read_manifest(root)
        verify(root, m)
    except BundleError:
        pass
