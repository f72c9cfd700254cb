"""Sample stores: the calibration data's arrays, read a sample or a block at a time, never whole.

A build reads each sample it uses (at most ``--calib-samples`` + ``--holdout``, 456 by default) and scans the whole
data once, block by block, to check it and hash it. So its memory is bounded by a block, not by the data set:

- ``.npy`` files and the members of an ``.npz`` written by ``np.savez`` (stored, not compressed) are read in place
  with positioned reads (``os.pread``) at their offset in the file. Reads go through the page cache, which the
  kernel may drop, rather than a memory map, whose touched pages would count as the process's own memory.
- members of an ``np.savez_compressed`` archive are inflated once, a block at a time, into an unlinked temporary
  file, then read like an ``.npy``. The disk space is freed when the build ends, however it ends.
- images are decoded one by one; decoded samples are cached up to :data:`DECODED_CACHE_BYTES`.
- casts (float64 -> float32, ...) are applied per block.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from abc import ABC, abstractmethod
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator, Optional, Sequence

import numpy as np

from edgeexport.errors import CalibrationError

#: a sequential scan (checks, hash) reads about this many bytes at a time
BLOCK_BYTES = 8 << 20
#: decoded images kept for the next pass over the same samples (calibration runs several passes)
DECODED_CACHE_BYTES = 256 << 20


class Samples(ABC):
    """An array whose first axis counts samples, read on demand. ``shape`` and ``dtype`` are those of the rows it
    returns."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    @abstractmethod
    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a fresh C-contiguous array."""

    def row(self, i: int) -> np.ndarray:
        return np.asarray(self.rows(i, i + 1)[0])  # a 1-D store's row is a 0-d array (a scalar input), not a np.int64

    def blocks(self, nbytes: int = BLOCK_BYTES) -> Iterator[np.ndarray]:
        """The whole array, in order, about ``nbytes`` at a time."""
        step = max(1, nbytes // max(1, self.row_bytes))
        for start in range(0, len(self), step):
            yield self.rows(start, min(len(self), start + step))

    def astype(self, dtype: str) -> "Samples":
        return _Cast(self, np.dtype(dtype))

    def __getitem__(self, i: int) -> np.ndarray:
        return self.row(i)


class InMemory(Samples):
    """Data that exists only in memory anyway (synthetic, tokenized text)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape, self.dtype = array.shape, array.dtype

    def rows(self, start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(self.array[start:stop]).copy()


class Broadcast(Samples):
    """One value given once (a 0-d array: a sample rate, a threshold) that every sample shares. Its sample count
    follows the other arrays' (:meth:`resize`, set when the data is checked)."""

    def __init__(self, value: np.ndarray, count: int = 1) -> None:
        self.value = np.asarray(value)
        self.shape, self.dtype = (count, *self.value.shape), self.value.dtype

    def resize(self, count: int) -> None:
        self.shape = (count, *self.value.shape)

    def rows(self, start: int, stop: int) -> np.ndarray:
        n = max(0, min(stop, len(self)) - start)
        return np.broadcast_to(self.value, (n, *self.value.shape)).copy()

    def astype(self, dtype: str) -> "Samples":
        return Broadcast(self.value.astype(dtype), len(self))


class FileRows(Samples):
    """A C-ordered array stored at ``offset`` of an open file."""

    def __init__(self, file: BinaryIO, offset: int, shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
        self.file, self.offset, self.shape, self.dtype, self.where = file, offset, tuple(shape), dtype, where

    def rows(self, start: int, stop: int) -> np.ndarray:
        n = max(0, stop - start)
        want = n * self.row_bytes
        data = _pread(self.file, want, self.offset + start * self.row_bytes)
        if len(data) != want:
            raise CalibrationError(f"cannot read {self.where!r}", "the file is shorter than its header says (truncated?)",
                                   "re-save it with np.save / np.savez")
        return np.frombuffer(data, dtype=self.dtype).reshape((n, *self.shape[1:])).copy()


def _pread(file: BinaryIO, n: int, offset: int) -> bytes:
    chunks, done = [], 0
    while done < n:  # pread may return less than asked for large reads
        chunk = os.pread(file.fileno(), min(n - done, 1 << 30), offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


class Decoded(Samples):
    """One sample per file, decoded by ``decode`` when read (images)."""

    def __init__(self, files: Sequence[Path], decode: Callable[[Path], np.ndarray]) -> None:
        self.files, self.decode = list(files), decode
        first = np.asarray(decode(self.files[0]))
        self.shape, self.dtype = (len(self.files), *first.shape), first.dtype
        self._cache: dict[int, np.ndarray] = {0: first}
        self._cached_bytes = first.nbytes

    def row(self, i: int) -> np.ndarray:
        hit = self._cache.get(i)
        if hit is not None:
            return hit.copy()
        value = np.asarray(self.decode(self.files[i]), dtype=self.dtype)
        if self._cached_bytes + value.nbytes <= DECODED_CACHE_BYTES:
            self._cache[i] = value
            self._cached_bytes += value.nbytes
        return value.copy()

    def rows(self, start: int, stop: int) -> np.ndarray:
        return np.stack([self.row(i) for i in range(start, stop)]) if stop > start else \
            np.empty((0, *self.shape[1:]), self.dtype)


class _Cast(Samples):
    def __init__(self, base: Samples, dtype: np.dtype) -> None:
        self.base, self.shape, self.dtype = base, base.shape, dtype

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.base.rows(start, stop).astype(self.dtype)


class Concat(Samples):
    """Two stores of the same row shape and dtype, one after the other (calibration data, then validation data)."""

    def __init__(self, first: Samples, second: Samples) -> None:
        self.first, self.second = first, second
        self.shape, self.dtype = (len(first) + len(second), *first.shape[1:]), first.dtype

    def rows(self, start: int, stop: int) -> np.ndarray:
        n = len(self.first)
        parts = []
        if start < n:
            parts.append(self.first.rows(start, min(stop, n)))
        if stop > n:
            parts.append(self.second.rows(max(start, n) - n, stop - n))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


# --- numpy files -------------------------------------------------------------------------------------------------

def _header(f: BinaryIO, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Parse an .npy header at the file's position; leaves it at the first data byte."""
    from numpy.lib import format as npformat

    try:
        version = npformat.read_magic(f)
        read = {(1, 0): npformat.read_array_header_1_0, (2, 0): npformat.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f".npy format version {version} is not supported")
        shape, fortran, dtype = read(f)
    except (ValueError, OSError, EOFError) as e:
        raise CalibrationError(f"cannot read {where!r}", str(e) or "the header is damaged", "re-save it with numpy") from None
    if dtype.hasobject:
        raise pickled(where)
    return tuple(shape), fortran, dtype


def pickled(where: str) -> CalibrationError:
    return CalibrationError(f"{where!r} holds pickled Python objects",
                            "edgeexport never unpickles data files (it could run arbitrary code)",
                            "save plain numeric arrays with np.savez / np.save")


def _rows_at(f: BinaryIO, start: int, size: int, where: str) -> Samples:
    """The .npy stored in ``f`` from ``start`` (``size`` bytes) as a store."""
    f.seek(start)
    shape, fortran, dtype = _header(f, where)
    data_at = f.tell()
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if data_at - start + need > size:
        raise CalibrationError(f"cannot read {where!r}", "the file is shorter than its header says (truncated?)",
                               "re-save it with np.save / np.savez")
    if not shape:  # a single number shared by every sample (np.savez(..., sr=np.int64(16000)))
        return Broadcast(np.frombuffer(_pread(f, need, data_at), dtype=dtype).reshape(()).copy())
    if fortran:  # column-major: a row is scattered over the file; rare enough to read it through a memory map
        return InMemory(np.memmap(f, dtype=dtype, mode="r", offset=data_at, shape=shape, order="F"))
    return FileRows(f, data_at, shape, dtype, where)


def check_magic(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(6)
    if not (magic.startswith(b"PK\x03\x04") or magic == b"\x93NUMPY"):
        raise CalibrationError(f"{str(path)!r} is not a numpy .npy/.npz file", "its first bytes are not numpy's",
                               "save the data with np.savez / np.save")


def open_npy(path: Path) -> Samples:
    check_magic(path)
    f = open(path, "rb")  # noqa: SIM115 - the store keeps it open for the build's lifetime
    return _rows_at(f, 0, os.fstat(f.fileno()).st_size, str(path))


def open_npz(path: Path) -> dict[str, Samples]:
    """Each ``NAME.npy`` member of an .npz as a store: stored members in place, compressed ones inflated to an
    unlinked temporary file."""
    check_magic(path)
    try:
        zf = zipfile.ZipFile(path)
        members = [i for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CalibrationError(f"cannot read {str(path)!r}", str(e) or "the file is truncated or not numpy data",
                               "re-save it with np.savez / np.save") from None
    out: dict[str, Samples] = {}
    f = open(path, "rb")  # noqa: SIM115 - shared by the stored members, open for the build's lifetime
    with zf:
        for info in members:
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            where = f"{path}:{info.filename}"
            try:
                if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
                    out[name] = _rows_at(f, _data_offset(f, info), info.file_size, where)
                else:
                    out[name] = _inflated(zf, info, where)
            except CalibrationError:
                raise
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
                raise CalibrationError(f"cannot read {where!r}", str(e) or "the member is damaged",
                                       "re-save it with np.savez") from None
    return out


def _data_offset(f: BinaryIO, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header, whose name and extra field lengths can differ
    from the central directory's."""
    header = _pread(f, 30, info.header_offset)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename!r}")
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len


def _inflated(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> Samples:
    from edgeexport.util import tmp_prefix

    tmp = tempfile.TemporaryFile(prefix=tmp_prefix("calib-"))  # unlinked at once on POSIX: nothing to clean up
    with zf.open(info) as src:
        while chunk := src.read(BLOCK_BYTES):
            tmp.write(chunk)
    tmp.flush()
    return _rows_at(tmp, 0, tmp.tell(), where)


@dataclass
class RawData:
    """Sample stores keyed by input name, first axis = samples, as read from a source."""

    arrays: dict[str, Samples]
    labels: Optional[np.ndarray]
    kind: str  # npz | npy | images | synthetic
    description: str
    synthetic: bool = False
    notes: list[str] = field(default_factory=list)
    preprocess: Optional[dict[str, Any]] = None
    files: Optional[list[str]] = None  # image files, in sample order
    text: Optional[dict[str, Any]] = None  # tokenization settings when the source was text
    stream_start: Optional[np.ndarray] = None  # stateful models: True where a stream starts (the 'stream_start' array)
