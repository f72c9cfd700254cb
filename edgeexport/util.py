"""Small shared helpers: quieting chatty libraries, hashing files, progress bars, atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
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
    if os.environ.get("EDGEEXPORT_NO_PROGRESS") or not sys.__stderr__.isatty():
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, total=total, leave=False, file=sys.__stderr__, dynamic_ncols=True)
