"""ModelSource: load the user's model from a spec, know its inputs, export ONNX once, act as the reference.

Specs: ``pkg.module:factory``, ``path/to/file.py:factory``, TorchScript ``.pt``, ``torch.export`` ``.pt2`` or a
ready ``.onnx``. A factory returns an ``nn.Module``, a ``(module, example_inputs)`` tuple, or a dict with keys
``model``, ``example_inputs`` and ``inputs`` (a list of ``NAME:SHAPE:DTYPE`` strings).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Optional


from edgeexport.config import InputSpec, parse_input_spec
from edgeexport.errors import ExportError, ModelLoadError
from edgeexport.runner import Runner, TensorInfo
from edgeexport.source_base import ModelSource, _short  # noqa: F401 (ModelSource: the sources' base, imported from here)
from edgeexport.util import quiet as torch_quiet
from edgeexport.util import strip_ansi

_TORCH_DTYPES = {"float32", "float16", "int64", "int32", "int8", "uint8", "bool"}


def _existing_file(spec: str) -> None:
    if not Path(spec).is_file():
        raise ModelLoadError(f"model file {spec!r} not found", "", "check the --model path")


def _spec_from_tensor(name: str, t: Any) -> InputSpec:
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _TORCH_DTYPES:
        raise ModelLoadError(f"example input {name!r} has dtype {dtype}", "it is not supported for export", "")
    return InputSpec(name=name, shape=list(t.shape), dtype=dtype)


def sniff_model_file(path: Path) -> Optional[str]:
    """What a model file holds, from its content, not its name: 'torchscript', 'exported_program', 'torch_pickle'
    (torch.save of a state_dict or module), 'onnx', or None (unknown). Reads zip member names and a few bytes."""
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                parts = {n.split("/")[1] for n in zf.namelist() if n.count("/") >= 1}
            if "archive_format" in parts or "models" in parts:
                return "exported_program"
            if "code" in parts or "constants.pkl" in parts:
                return "torchscript"
            return "torch_pickle" if "data.pkl" in parts else None
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return None
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # a pickle (torch.save, legacy)
        return "torch_pickle"
    if head[:1] == b"\x08":  # an ONNX ModelProto starts with its ir_version (field 1, varint)
        return "onnx"
    return None


def load_source(spec: str, task: Optional[str] = None) -> ModelSource:
    if spec.startswith("hf:"):
        from edgeexport.source_hf import HFModelSource

        return HFModelSource(spec, task)
    if Path(spec).is_file():  # a file is what it holds, whatever its name (.jit, .bin, a .pt that is a .pt2)
        kind = sniff_model_file(Path(spec))
        if kind == "torch_pickle":
            raise ModelLoadError(f"{spec!r} is a torch.save pickle (a state_dict or a whole pickled module)",
                                 "edgeexport never unpickles a model file: unpickling runs whatever code it names",
                                 "save the model with torch.jit.save or torch.export.save, or write a factory "
                                 "(file.py:make_model) that builds the module and loads the state_dict into it")
        by_content = {"onnx": OnnxModelSource, "torchscript": TorchScriptSource,
                      "exported_program": ExportedProgramSource}
        if kind in by_content:
            return by_content[kind](spec)
    if spec.endswith(".onnx"):
        return OnnxModelSource(spec)
    if spec.endswith((".pt", ".pth", ".torchscript")):
        return TorchScriptSource(spec)
    if spec.endswith(".pt2"):
        return ExportedProgramSource(spec)
    if ":" in spec:
        return FactorySource(spec)
    raise ModelLoadError(
        f"cannot understand model spec {spec!r}",
        "a spec is pkg.module:factory, path/to/file.py:factory, a TorchScript .pt, a torch.export .pt2, an .onnx, "
        "or hf:PATH (a Hugging Face model folder)",
        "for example --model mypkg.models:build or --model model.py:make_model",
    )


class TorchModelSource(ModelSource):
    module: Any
    example_inputs: Optional[tuple] = None

    def reference_bytes(self) -> Optional[int]:
        """The module's weights as torch saves them."""
        if not hasattr(self.module, "state_dict"):
            return super().reference_bytes()
        import io

        import torch

        buf = io.BytesIO()
        torch.save(self.module.state_dict(), buf)
        return buf.tell()

    def reference(self, specs: list[InputSpec], output_names: list[str]) -> Runner:
        from edgeexport.reference import TorchRunner

        return TorchRunner(self.module, [TensorInfo(s.name, s.shape, s.dtype) for s in specs], output_names)

    def export_args(self, specs: list[InputSpec]) -> tuple:
        """Example tensors for export: named dynamic dims of size 1 are widened to 2 so they stay dynamic."""
        import torch

        args = []
        examples = list(self.example_inputs) if self.example_inputs is not None else [None] * len(specs)
        for spec, ex in zip(specs, examples):
            if ex is not None and (ex.ndim != len(spec.shape) or any(
                    isinstance(d, int) and d != n for d, n in zip(spec.shape, ex.shape))):
                ex = None  # the declared shape wins over the factory's example (e.g. a fixed batch of 1)
            if ex is None:
                shape = [d if isinstance(d, int) else 2 for d in spec.shape]
                ex = torch.zeros(shape, dtype=getattr(torch, spec.dtype))
            for axis in spec.dynamic_dims:
                if ex.shape[axis] == 1:
                    ex = torch.cat([ex, ex], dim=axis)
            args.append(ex)
        return tuple(args)

    def output_names(self, specs: list[InputSpec]) -> list[str]:
        from edgeexport.reference import output_names_for

        with torch_quiet():
            import torch

            with torch.inference_mode():
                try:
                    out = self.module(*self.export_args(specs))
                except Exception as e:
                    raise ModelLoadError(
                        f"the model's forward raised {type(e).__name__} on example inputs "
                        f"{[s.describe() for s in specs]}",
                        _short(e),
                        "check the input shapes/dtypes (--input NAME:SHAPE:DTYPE) or the model code",
                    ) from None
        return output_names_for(out)

    def export_onnx(self, path: Path, specs: list[InputSpec], opset: int) -> list[str]:
        import torch

        names = self.output_names(specs)
        with torch_quiet() as log:
            try:
                torch.onnx.export(self._exportable(), self.export_args(specs), str(path),
                                  input_names=[s.name for s in specs], output_names=names, opset_version=opset,
                                  **self._export_options(specs))
            except Exception as e:
                if _interrupted(e):  # the exporter wrapped Ctrl-C in its own error
                    raise KeyboardInterrupt from None
                raise export_error(e, log.getvalue()) from None
        return names

    def _exportable(self) -> Any:
        return self.module

    def runs_with(self, specs: list[InputSpec]) -> Optional[bool]:
        return _runs_with(self.module, specs)

    def torch_module(self, specs: list[InputSpec], output_names: list[str]) -> Any:
        from edgeexport.reference import positional_module

        return positional_module(self.module, [s.name for s in specs], output_names)

    def _export_options(self, specs: list[InputSpec]) -> dict[str, Any]:
        """torch.onnx.export options: the dynamo exporter, weights inside the file, the declared dynamic dims."""
        dynamic = tuple(spec.dynamic_dims or None for spec in specs)
        return {"dynamo": True, "external_data": False, "verbose": False,
                "dynamic_shapes": dynamic if any(dynamic) else None}


def _interrupted(e: BaseException) -> bool:
    """Whether ``e`` wraps a KeyboardInterrupt (exporters catch everything and re-raise their own error)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt) or "KeyboardInterrupt" in type(e).__name__:
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


def export_error(e: Exception, log: str) -> ExportError:
    """Turn an exporter exception into an error that names the operator and the node that failed."""
    text = strip_ansi(f"{e}\n{e.__cause__ or ''}\n{log}")
    ops = re.findall(r"OpOverload\(op='([\w.]+)', overload='(\w+)'\)", text)
    op_names = sorted({f"{a}.{b}" for a, b in ops}) or sorted(set(re.findall(r"\b(aten::\w+|prim::\w+)", text)))
    nodes = sorted(set(re.findall(r"translating node %(\w+)", text)))
    summary = text.split("## Exception summary", 1)[-1] if "## Exception summary" in text else str(e)
    if op_names:
        why = f"no ONNX translation for operator {', '.join(op_names[:3])}"
        if nodes:
            why += f" (graph node {', '.join('%' + n for n in nodes[:3])})"
    else:
        why = _short(Exception(summary))
    if "Constraints violated" in text or "specialized" in text.lower():
        fix = ("the model fixes a dimension you declared dynamic; declare it with a number in --input, "
               "or make the code shape-agnostic")
    else:
        fix = ("rewrite that part of the model with standard ops, register an ONNX translation for it "
               "(torch.onnx.export custom_translation_table), or try another --opset")
    return ExportError("PyTorch -> ONNX export failed", why, fix)


def _runs_with(module: Any, specs: list[InputSpec]) -> bool:
    import torch

    from edgeexport.util import quiet

    args = [torch.zeros([d if isinstance(d, int) else 1 for d in s.shape], dtype=getattr(torch, s.dtype))
            for s in specs]
    try:
        with torch.no_grad(), quiet():
            module(*args)
    except Exception:
        return False
    return True


class FactorySource(TorchModelSource):
    kind = "factory"

    def __init__(self, spec: str) -> None:
        self.spec = spec
        target, _, attr = spec.rpartition(":")
        if not target or not attr:
            raise ModelLoadError(f"model spec {spec!r} has no factory name", "", "use module:function or file.py:function")
        fn = _resolve_callable(target, attr, spec)
        try:
            with torch_quiet():
                result = fn()
        except Exception as e:
            raise ModelLoadError(f"the model factory {spec!r} raised {type(e).__name__}", _short(e),
                                 "fix the factory; it must return an nn.Module") from None
        self._take(result, spec)

    def _take(self, result: Any, spec: str) -> None:
        import torch

        example = None
        declared = None
        if isinstance(result, dict):
            if "model" not in result:
                raise ModelLoadError(f"factory {spec!r} returned a dict without a 'model' key", "", "return {'model': m, ...}")
            module, example, declared = result["model"], result.get("example_inputs"), result.get("inputs")
        elif isinstance(result, tuple) and len(result) == 2:
            module, example = result
        else:
            module = result
        if not isinstance(module, torch.nn.Module):
            raise ModelLoadError(
                f"factory {spec!r} returned {type(module).__name__}, not a torch.nn.Module",
                "",
                "return an nn.Module, (module, example_inputs) or {'model': module, 'example_inputs': ...}",
            )
        self.module = module.eval()
        signature = []
        if isinstance(module, torch.jit.ScriptModule):  # a factory that loads or scripts a TorchScript model
            self.generic_names = True
            self.reference_kind = TorchScriptSource.reference_kind.replace("the archive as given", "as the factory "
                                                                           "returned it")
            names = script_input_names(module)
            if names is not None:
                signature = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
        else:
            try:
                signature = list(inspect.signature(module.forward).parameters.values())
            except (TypeError, ValueError):  # pragma: no cover - a forward with no Python signature
                signature = []
        keyword_only = [p.name for p in signature if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
        if keyword_only:
            raise ModelLoadError(
                f"the model's forward() takes keyword-only argument(s) {', '.join(keyword_only)}",
                "edgeexport (like torch.onnx and every runtime) feeds inputs by position",
                "make them positional (def forward(self, " + ", ".join(keyword_only) + ")), or return a wrapper "
                "module whose forward(" + ", ".join(keyword_only) + ") calls the model with keywords")
        params = [p for p in signature if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.input_names = [p.name for p in params]
        if isinstance(example, dict):
            self.input_names = list(example)
            example = tuple(example.values())
        elif isinstance(example, torch.Tensor):
            example = (example,)
        if example is not None:
            example = tuple(example)
            if self.input_names and len(self.input_names) >= len(example):
                self.input_names = self.input_names[: len(example)]
            else:
                self.input_names = [f"input_{i}" for i in range(len(example))]
            self.example_inputs = example
            self.declared_inputs = [_spec_from_tensor(n, t) for n, t in zip(self.input_names, example)]
        if declared:
            self.declared_inputs = [parse_input_spec(s) if isinstance(s, str) else InputSpec(**s) for s in declared]
            self.input_names = [s.name for s in self.declared_inputs]


    def _export_options(self, specs: list[InputSpec]) -> dict[str, Any]:
        import torch

        if isinstance(self.module, torch.jit.ScriptModule):  # the dynamo exporter cannot trace a ScriptModule
            return TorchScriptSource._export_options(self, specs)  # type: ignore[arg-type]
        return super()._export_options(specs)


def _resolve_callable(target: str, attr: str, spec: str):
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelLoadError(f"model file {target!r} not found", "", "check the path before ':'")
        mod_name = f"_edgeexport_user_{abs(hash(str(path.resolve())))}"
        sys.path.insert(0, str(path.resolve().parent))
        try:
            modspec = importlib.util.spec_from_file_location(mod_name, path)
            assert modspec and modspec.loader
            module = importlib.util.module_from_spec(modspec)
            sys.modules[mod_name] = module
            with torch_quiet():
                modspec.loader.exec_module(module)
        except Exception as e:
            raise ModelLoadError(f"importing {target!r} raised {type(e).__name__}", _short(e), "fix the file") from None
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        try:
            with torch_quiet():
                module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise ModelLoadError(f"cannot import module {target!r} for model spec {spec!r}", str(e),
                                 "install the package, or use path/to/file.py:factory") from None
        except Exception as e:
            raise ModelLoadError(f"importing {target!r} raised {type(e).__name__}", _short(e), "fix the module") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        available = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:10]
        raise ModelLoadError(f"{target!r} has no callable {attr!r}", f"callables there: {', '.join(available) or 'none'}",
                             "name the factory function after ':'")
    return fn


def script_input_names(module: Any) -> Optional[list[str]]:
    """A TorchScript module's forward arguments, from its schema; a non-tensor one is refused with the fix."""
    try:
        args = module.forward.schema.arguments[1:]
    except Exception:  # pragma: no cover - scripted modules always carry a schema
        return None
    other = [f"{a.name}: {a.type}" for a in args if str(a.type) not in ("Tensor", "Optional[Tensor]")]
    if other:  # e.g. a voice detector's forward(x, sr: int): the export would fail deep inside TorchScript
        raise ModelLoadError(
            f"the TorchScript model's forward takes non-tensor argument(s) {', '.join(other)}",
            "edgeexport feeds tensors, as every runtime does; a Python value is fixed when the graph is exported",
            "write a factory (file.py:make_model) that loads the archive and returns a wrapper whose "
            "forward takes the tensors only and passes the value, e.g. forward(self, x): return self.m(x, 16000)")
    return [a.name for a in args]


class TorchScriptSource(TorchModelSource):
    kind = "torchscript"
    generic_names = True
    reference_kind = "TorchScript (the archive as given, run by PyTorch)"

    def __init__(self, spec: str) -> None:
        import torch

        self.spec = spec
        _existing_file(spec)
        try:
            self.module = torch.jit.load(spec, map_location="cpu").eval()
        except Exception as e:
            raise ModelLoadError(
                f"{spec!r} is not a TorchScript archive", _short(e, 200),
                "a .pt must be saved with torch.jit.save; for a state_dict, use a factory (file.py:factory) that loads it",
            ) from None
        self.input_names = script_input_names(self.module)

    def _export_options(self, specs: list[InputSpec]) -> dict[str, Any]:
        """TorchScript needs the TorchScript-based exporter (the dynamo one cannot trace a ScriptModule)."""
        axes = {s.name: dict(s.dynamic_dims) for s in specs if s.dynamic_dims}
        return {"dynamo": False, "dynamic_axes": axes or None}


class ExportedProgramSource(TorchModelSource):
    kind = "exported_program"
    generic_names = True
    reference_kind = ("the torch.export program's module() (the .pt2 as given; it can run slower than the nn.Module "
                      "it was exported from, which makes speed-ups against it larger)")

    def __init__(self, spec: str) -> None:
        import torch

        self.spec = spec
        _existing_file(spec)
        try:
            with torch_quiet(), open(spec, "rb") as f:  # a file object: the name need not end in .pt2
                self.program = torch.export.load(f)
        except Exception as e:
            raise ModelLoadError(f"{spec!r} is not a torch.export archive", _short(e, 200),
                                 "save it with torch.export.save(torch.export.export(model, args), path)") from None
        self.module = self.program.module()
        self.input_names = list(self.program.graph_signature.user_inputs)
        ex = getattr(self.program, "example_inputs", None)
        if ex and ex[0] and not ex[1]:
            self.example_inputs = tuple(ex[0])
            dims = program_dims(self.program)
            self.declared_inputs = [_spec_from_tensor(n, t).model_copy(update={"shape": dims[n]}) if n in dims
                                    else _spec_from_tensor(n, t) for n, t in zip(self.input_names, ex[0])]

    def _exportable(self) -> Any:
        return self.program

    def _export_options(self, specs: list[InputSpec]) -> dict[str, Any]:
        return {"dynamo": True, "external_data": False, "verbose": False}  # the program carries its own dims


def program_dims(program: Any) -> dict[str, list]:
    """Each user input's shape as the program constrains it: sizes, and a name for every dimension the program
    keeps dynamic ('batch' for axis 0, else INPUT_dimN; one symbol shared by several inputs keeps one name). The
    example inputs' sizes (often batch 2, for export) are not the program's shape."""
    import torch

    names: dict[str, str] = {}
    out: dict[str, list] = {}
    user = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" and node.name in user else None
        if val is None or not hasattr(val, "shape"):
            continue
        shape: list = []
        for axis, d in enumerate(val.shape):
            if isinstance(d, torch.SymInt) and not d.node.is_constant():
                key = str(d.node.expr)
                names.setdefault(key, "batch" if axis == 0 and "batch" not in names.values() else f"{node.name}_dim{axis}")
                shape.append(names[key])
            else:
                shape.append(int(d))
        out[node.name] = shape
    return out


class OnnxModelSource(ModelSource):
    kind = "onnx"
    reference_kind = "onnxruntime running the ONNX as given (float, default graph optimizations)"

    def __init__(self, spec: str) -> None:
        import onnx

        self.spec = spec
        _existing_file(spec)
        try:
            self.model = onnx.load(spec, load_external_data=True)
            onnx.checker.check_model(self.model)
        except Exception as e:
            raise ModelLoadError(f"{spec!r} is not a valid ONNX model", _short(e, 300),
                                 "re-export it, or pass the PyTorch model instead") from None
        inits = {i.name for i in self.model.graph.initializer}
        self.declared_inputs = []
        for vi in self.model.graph.input:
            if vi.name in inits:
                continue
            self.declared_inputs.append(onnx_input_spec(vi))
        self.input_names = [s.name for s in self.declared_inputs]
        self._outputs = [o.name for o in self.model.graph.output]

    def export_onnx(self, path: Path, specs: list[InputSpec], opset: int) -> list[str]:
        import shutil

        shutil.copyfile(self.spec, path)
        return list(self._outputs)

    def reference(self, specs: list[InputSpec], output_names: list[str]) -> Runner:
        from edgeexport.reference import OnnxRunner

        return OnnxRunner(self.spec)


def onnx_input_spec(vi) -> InputSpec:
    from onnx import helper

    t = vi.type.tensor_type
    dtype = str(helper.tensor_dtype_to_np_dtype(t.elem_type))
    shape: list[Any] = []
    for i, d in enumerate(t.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(int(d.dim_value))
        else:
            name = re.sub(r"[^A-Za-z0-9_]", "_", d.dim_param) if d.dim_param else f"{vi.name}_dim{i}"
            shape.append(name if re.match(r"^[A-Za-z_]", name) else f"d_{name}")
    return InputSpec(name=vi.name, shape=shape, dtype=dtype)

