"""Running an ONNX graph with its intermediate tensors exposed: shared by FLOP counting (shapes), the non-finite
probe before quantization (values) and the per-layer error ranking (values of two graphs)."""

from __future__ import annotations

from typing import Any, Iterable



def inferred_infos(model: Any) -> list[Any]:
    """The ValueInfos ONNX shape inference gives ``model``'s tensors (intermediate, inputs and outputs)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    return list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)


def float_tensors(model: Any) -> set[str]:
    """Node outputs that are float tensors (or whose type shape inference cannot tell: kept, filtered later)."""
    import onnx

    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    known = {vi.name: vi.type.tensor_type.elem_type for vi in inferred_infos(model)}
    return {out for n in model.graph.node for out in n.output if known.get(out, onnx.TensorProto.FLOAT) in float_types}


def attr(node: Any, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default



def exposing_session(model: Any, names: Iterable[str]) -> tuple[Any, list[str]]:
    """An onnxruntime CPU session of ``model`` (a ModelProto, extended in place) that also outputs ``names``.
    Graph optimizations are off, so every tensor exists as written and Q/DQ pairs act as fake-quantization."""
    import onnx
    import onnxruntime as ort

    present = {o.name for o in model.graph.output}
    for name in names:
        if name and name not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess, [o.name for o in sess.get_outputs()]


def output_axis(node: Any) -> int:
    """The output-channel axis of a weighted node's constant weight: Conv [O, I, ..], ConvTranspose [I, O, ..],
    Gemm [O, I] with transB=1 else [I, O], MatMul [.., I, O]."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    return -1
