"""The Runner contract: every way of running a model (the PyTorch reference, each target's runtime) is a context
manager with ``infer(feeds) -> outputs`` and input/output metadata, so validation and benchmarking treat them alike.
The public methods check inputs; the ``_impl`` methods do the work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from edgeexport.errors import CalibrationError


ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


@dataclass
class TensorInfo:
    name: str
    shape: list  # ints, or str for named dynamic dims, or None for unknown
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def ort_io(session: Any) -> tuple[list["TensorInfo"], list["TensorInfo"]]:
    """Inputs and outputs of an onnxruntime InferenceSession as TensorInfo lists."""
    def info(args: Any) -> list[TensorInfo]:
        return [TensorInfo(a.name, list(a.shape), ORT_TYPES.get(a.type, a.type)) for a in args]

    return info(session.get_inputs()), info(session.get_outputs())


class Runner:
    """Runs a model. Use as a context manager; call :meth:`infer` with a dict of numpy arrays."""

    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release runtime resources."""

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.inputs, feeds)
        return self._infer_impl(feeds)

    def _infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover
        raise NotImplementedError


def check_feeds(inputs: list[TensorInfo], feeds: Mapping[str, np.ndarray]) -> None:
    """Raise a CalibrationError naming exactly which input has the wrong name, rank, shape or dtype."""
    expected = {i.name: i for i in inputs}
    missing = sorted(set(expected) - set(feeds))
    extra = sorted(set(feeds) - set(expected))
    if missing or extra:
        raise CalibrationError(
            "input names do not match the model",
            f"model inputs are {sorted(expected)}; got {sorted(feeds)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unexpected {extra})" if extra else ""),
            "name the arrays after the model's inputs (see 'edgeexport inspect' or --input)",
        )
    for name, info in expected.items():
        arr = feeds[name]
        if not isinstance(arr, np.ndarray):
            raise CalibrationError(f"input {name!r} is a {type(arr).__name__}, not a numpy array", "", "pass numpy arrays")
        if str(arr.dtype) != info.dtype:
            raise CalibrationError(
                f"input {name!r} has dtype {arr.dtype}, the model expects {info.dtype}",
                "dtypes are not converted silently",
                f"cast it with arr.astype(np.{info.dtype})",
            )
        if len(arr.shape) != len(info.shape) or any(
            isinstance(d, int) and d != s for d, s in zip(info.shape, arr.shape)
        ):
            raise CalibrationError(
                f"input {name!r} has shape {list(arr.shape)}, the model expects {info.shape}",
                "named dimensions may vary; numbered ones must match",
                "reshape the data, or declare the input with --input NAME:SHAPE:DTYPE",
            )
