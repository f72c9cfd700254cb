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
                   "optimum", "transformers", "sentence_transformers", "torchao",
                   "torch.utils._pytree")


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Swallow third-party chatter (stdout/stderr, warnings, logging) and yield the captured text for errors."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n if n != "root" else None) for n in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), \
                _native_output_to(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def verbose() -> bool:
    """--verbose (EDGEEXPORT_VERBOSE=1): let third-party libraries' own logs through."""
    return bool(os.environ.get("EDGEEXPORT_VERBOSE"))


@contextlib.contextmanager
def _native_output_to(buf: io.StringIO) -> Iterator[None]:
    """What C/C++ code writes to file descriptors 1 and 2 (TensorFlow's and XLA's logs, which Python's redirects
    never see) goes into ``buf`` too, unless :func:`verbose`."""
    if verbose():
        yield
        return
    import tempfile

    for stream in (sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no real descriptors (an embedding host): nothing native to catch
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        _TERMINAL_FD.append(saved[1])
        try:
            yield
        finally:
            _TERMINAL_FD.remove(saved[1])
            for stream in (sys.__stdout__, sys.__stderr__):
                if stream is not None:
                    with contextlib.suppress(Exception):
                        stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            buf.write(sink.read()[-200_000:].decode("utf-8", "replace"))


@contextlib.contextmanager
def heartbeat(log, what: str, every_s: float = 10.0) -> Iterator[None]:
    """While a long step with no progress of its own runs (loading a model, exporting it), ``log`` a line every
    ``every_s`` seconds that says it is still going."""
    import threading
    import time

    done = threading.Event()
    t0 = time.monotonic()

    def beat() -> None:
        while not done.wait(every_s):
            log(f"    ... still {what} ({time.monotonic() - t0:.0f} s)")

    thread = threading.Thread(target=beat, name="edgeexport-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


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
    fd = _TERMINAL_FD[0] if _TERMINAL_FD else 2  # the user's terminal, also while native output is caught
    try:
        on_terminal = os.isatty(fd)
    except OSError:
        on_terminal = False
    if os.environ.get("EDGEEXPORT_NO_PROGRESS") or not on_terminal:
        yield from items
        return
    from tqdm import tqdm

    with os.fdopen(os.dup(fd), "w") as terminal:
        yield from tqdm(items, desc=desc, total=total, leave=False, file=terminal, dynamic_ncols=True)


#: the descriptors stderr had before :func:`quiet` caught native output (outermost first)
_TERMINAL_FD: list[int] = []


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


@contextlib.contextmanager
def torch_threads(threads: Optional[int] = None) -> Iterator[int]:
    """PyTorch's intra-op threads set to ``threads`` (default: the CPUs this process may use) for the block, then
    restored. torch's own default is every core of the host, which thrashes in a container or on a busy machine
    (the digits' training took 144 s instead of 3 s)."""
    import torch

    from edgeexport.bench import available_cpus

    before = torch.get_num_threads()
    n = int(threads) if threads else available_cpus()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
