"""Write a bundle atomically: build it in a temporary sibling folder, then rename it into place.

A failed or interrupted build leaves either no bundle or the complete previous one at the output path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgeexport.bundle.manifest import SCHEMA_VERSION
from edgeexport.errors import BundleError
from edgeexport.util import remove_stale
from edgeexport.util import sha256_file

LOADER_CORE = Path(__file__).with_name("loader.py")
BACKEND_MARKER = "# ---- backend: appended to the loader core"


def assemble_loader(backend: Optional[Path]) -> str:
    """The bundle's one-file loader.py: the loader core, then the part of ``backend`` (a target unit's backend.py)
    below its marker line. The part above the marker is build-time only (its imports from the core)."""
    core = LOADER_CORE.read_text(encoding="utf-8")
    if backend is None:
        return core
    text = backend.read_text(encoding="utf-8")
    if BACKEND_MARKER not in text:
        raise RuntimeError(f"{backend} has no {BACKEND_MARKER!r} line")  # a bug in the target unit
    body = text.split(BACKEND_MARKER, 1)[1].split("\n", 1)[1]
    head, tail = core.split('\nif __name__ == "__main__":', 1)
    return (f"{head.rstrip()}\n\n\n# ==== backend from the {backend.parent.name} target unit ====\n" + body.rstrip()
            + '\n\n\nif __name__ == "__main__":' + tail)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(out: Path) -> None:
    """The folder that will hold ``out`` can be created and written: found before any work, not after the build."""
    parent = Path(os.path.abspath(out)).parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    why = ""
    if not existing.is_dir():
        why = f"{str(existing)!r} is a file, not a folder"
    else:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=existing))
        except OSError as e:
            why = f"cannot create files in {str(existing)!r}: {e.strerror or e}"
    if why:
        raise BundleError(f"output path {str(out)!r} cannot be written", why,
                          "choose an --out on a writable file system (and a folder you may write to)")


def check_output_path(out: Path, force: bool) -> None:
    """Refuse early (before any work) to overwrite something we should not, or to write where nothing can be."""
    check_writable(out)
    if out.exists() and not out.is_dir():
        raise BundleError(f"output path {str(out)!r} exists and is a file", "", "choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise BundleError(f"output folder {str(out)!r} already exists",
                              "a build never overwrites an existing folder unless asked",
                              "pass --force to replace it, or choose another --out")
        if not (out / "manifest.json").is_file():
            raise BundleError(f"--force will not replace {str(out)!r}: it is not an edgeexport bundle",
                              "only a folder holding a manifest.json (or an empty one) is replaced",
                              "choose another --out, or empty that folder yourself")


def write_bundle(out: Path, files: dict[str, Path], golden: list[tuple[dict, dict]], manifest: dict[str, Any],
                 texts: dict[str, str], force: bool, loader_backend: Optional[Path] = None) -> Path:
    """Create the bundle at ``out``.

    ``files``: bundle-relative path -> source file, copied byte for byte. ``texts``: path -> text content.
    ``golden``: (inputs, outputs) pairs saved as golden/NNN.npz. The manifest gets the file list with sha256.
    ``loader_backend``: the target unit's backend.py, assembled with the loader core into loader.py.
    """
    out = Path(out).absolute()
    try:  # an unwritable place fails here or in check_output_path below, each with a BundleError
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BundleError(f"cannot create the folder {str(out.parent)!r}", f"{e.strerror or e}",
                          "choose an --out on a writable file system") from None
    remove_stale(out.parent, (f".{out.name}.partial-", f".{out.name}.old-"), restore_to=out)  # killed builds
    check_output_path(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        for rel, src in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
        (tmp / "loader.py").write_text(assemble_loader(loader_backend), encoding="utf-8")
        for rel, text in texts.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text, encoding="utf-8")
        golden_files = []
        (tmp / "golden").mkdir()
        for i, (ins, outs) in enumerate(golden):
            rel = f"golden/{i:03d}.npz"
            arrays = {f"input/{k}": v for k, v in ins.items()} | {f"output/{k}": v for k, v in outs.items()}
            with open(tmp / rel, "wb") as f:
                np.savez(f, **arrays)
            golden_files.append(rel)
        manifest = dict(manifest)
        manifest["schema_version"] = SCHEMA_VERSION
        manifest["golden"] = dict(manifest.get("golden", {}), files=golden_files)
        manifest["files"] = [
            {"path": p.relative_to(tmp).as_posix(), "sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(tmp.rglob("*")) if p.is_file()
        ]
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
        _fsync_tree(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700: the bundle gets the user's usual permissions
        _swap_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise BundleError(f"writing the bundle to {str(out)!r} failed", f"{e.strerror or e}",
                              "check free disk space and permissions; nothing was left at the output path") from None
        raise
    return out


ARCHIVE_FORMATS = ("tar.gz", "zip")


def archive_path(bundle: Path, fmt: str) -> Path:
    """Where ``--archive FMT`` puts the archive of the bundle folder ``bundle``: beside it, ``<name>.<fmt>``."""
    return Path(bundle).parent / f"{Path(bundle).name}.{fmt}"


def check_archive_path(bundle: Path, fmt: str | None, force: bool) -> None:
    """Refuse, before any work, an ``--archive`` that would overwrite an existing file unasked."""
    if fmt:
        packed = archive_path(bundle, fmt)
        if packed.exists() and not force:
            raise BundleError(f"archive {str(packed)!r} already exists", "a build never overwrites a file unless asked",
                              "pass --force to replace it, or choose another --out")


def write_archive(bundle: Path, fmt: str) -> Path:
    """Pack the bundle folder into ``<bundle>.tar.gz`` or ``<bundle>.zip`` (members under ``<name>/``), atomically:
    regular files and folders only, owner 0, so the loader's archive checks accept it."""
    import tarfile
    import zipfile

    bundle = Path(bundle)
    dest = archive_path(bundle, fmt)
    remove_stale(bundle.parent, (f".{dest.name}.partial-",))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.partial-{os.getpid()}-", dir=bundle.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    try:
        if fmt == "zip":
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for p in files:
                    zf.write(p, f"{bundle.name}/{p.relative_to(bundle).as_posix()}")
        else:
            def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                return info

            with tarfile.open(tmp, "w:gz") as tf:
                for p in files:
                    tf.add(p, f"{bundle.name}/{p.relative_to(bundle).as_posix()}", recursive=False, filter=clean)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise BundleError(f"writing the archive {str(dest)!r} failed", f"{e.strerror or e}",
                              "check free disk space and permissions") from None
        raise
    return dest


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.rmdir(backup)
        os.rename(out, backup)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(backup, out)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
