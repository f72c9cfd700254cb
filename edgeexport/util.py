"""Small shared helpers: quieting chatty libraries, hashing files, progress bars, atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

_CHATTY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "root", "onnxruntime",
                   "optimum", "transformers", "sentence_transformers")


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Swallow third-party chatter (stdout/stderr, warnings, logging) and yield the captured text for errors."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n if n != "root" else None) for n in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def strip_ansi(text: str) -> str:
    """Drop terminal colour codes that exporters and converters put in their messages."""
    return _ANSI.sub("", text)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def progress(items: Iterable[T], desc: str, total: Optional[int] = None) -> Iterator[T]:
    """A progress bar on a terminal (stderr), nothing when not on one. Honors EDGEEXPORT_NO_PROGRESS=1."""
    if os.environ.get("EDGEEXPORT_NO_PROGRESS") or sys.__stderr__ is None or not sys.__stderr__.isatty():
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, total=total, leave=False, file=sys.__stderr__, dynamic_ncols=True)


def tmp_prefix(kind: str = "") -> str:
    """Prefix of this process's temporary folders: ``edgeexport-<pid>-<kind>``, so that a later run can tell the
    leftovers of a killed process (SIGKILL skips every cleanup) from the folders of one still running."""
    return f"edgeexport-{os.getpid()}-{kind}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(folder: Path, stems: tuple[str, ...], restore_to: Optional[Path] = None) -> list[Path]:
    """Remove ``<stem><pid>-...`` entries in ``folder`` whose process is gone. A stale backup of a bundle (stem
    ending in ``.old-``) is moved back to ``restore_to`` instead when that path is missing: the process died between
    moving the old bundle aside and moving the new one in."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        stem = next((s for s in stems if entry.name.startswith(s)), None)
        pid = entry.name[len(stem):].split("-", 1)[0] if stem else ""
        if stem is None or not pid.isdigit() or _alive(int(pid)):
            continue
        if stem.endswith(".old-") and restore_to is not None and not restore_to.exists():
            os.rename(entry, restore_to)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
