"""Int8 kernels that saturate: x86 CPUs with AVX2 but no VNNI add pairs of uint8 x int8 products into int16 with
saturation, so onnxruntime's int8 kernels there do not compute what a Q/DQ graph with full 8-bit weights says.
The loader (and the build's validation) run such a graph exactly instead; these tests pin that down on a Q/DQ
MatMul built here whose products overflow int16, on whatever CPU runs them."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeexport.bundle.loader import BundleError, int8_saturation
from edgeexport.targets.ort.backend import INT8_FIX, OrtBackend, int8_kernel_choice

K, N = 64, 16
NO_VNNI = "fpu sse4_2 avx avx2 fma"  # an AVX2 CPU without VNNI (e.g. AMD Zen 3, Intel before Ice Lake)
VNNI = NO_VNNI + " avx512f avx512_vnni"


def _qdq_matmul(path):
    """x [1, K] (uint8 activations, full range) @ w [K, N] (int8 weights near +127): each int16 pair sum would be
    about 2 x 255 x 127, twice what int16 holds. Returns (x, the exact result of the Q/DQ arithmetic)."""
    rng = np.random.default_rng(0)
    w = rng.uniform(0.9, 1.0, (K, N)).astype(np.float32)
    ws = (np.abs(w).max(0) / 127).astype(np.float32)
    wq = np.round(w / ws).astype(np.int8)
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(ws, "ws"),
             numpy_helper.from_array(np.zeros(N, np.int8), "wz"),
             numpy_helper.from_array(np.array(1 / 255, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, np.uint8), "xz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    path.write_bytes(model.SerializeToString())
    x = np.ones((1, K), np.float32)
    return x, (np.round(x * 255) / 255) @ (wq.astype(np.float64) * ws)


def _manifest(weight_bits=8, qdq=True, precision="int8"):
    return {"precision": precision, "runtime": {}, "runtime_config": {"int8": {"weight_bits": weight_bits, "qdq": qdq}}}


@pytest.mark.parametrize("flags, saturates", [(NO_VNNI, True), (VNNI, False), (NO_VNNI + " avx_vnni", False),
                                              (NO_VNNI + " amx_int8", False), ("fpu sse4_2", False), ("", False)])
def test_which_cpus_saturate(monkeypatch, flags, saturates):
    monkeypatch.setenv("EDGEEXPORT_CPU_FLAGS", flags)
    assert bool(int8_saturation()) is saturates


def test_the_choice_follows_the_bundle_and_the_cpu(monkeypatch):
    monkeypatch.setenv("EDGEEXPORT_CPU_FLAGS", NO_VNNI)
    exact, warning = int8_kernel_choice(_manifest(), None, INT8_FIX)
    assert exact and "VNNI" in warning and "device=x86-avx2" in warning
    assert int8_kernel_choice(_manifest(weight_bits=7)) == (False, "")  # 7-bit weights cannot saturate
    assert int8_kernel_choice(_manifest(), "native") == (False, "")
    exact, warning = int8_kernel_choice(_manifest(qdq=False, precision="int8-dynamic"))
    assert not exact and "may differ" in warning  # dynamic int8 ops have no exact mode: said, not hidden
    assert int8_kernel_choice({"precision": "fp32", "runtime": {}}) == (False, "")
    monkeypatch.setenv("EDGEEXPORT_CPU_FLAGS", VNNI)
    assert int8_kernel_choice(_manifest()) == (False, "")
    assert int8_kernel_choice(_manifest(), "exact") == (True, "")
    with pytest.raises(BundleError, match="no.*Q/DQ|has none"):
        int8_kernel_choice(_manifest(qdq=False, precision="int8-dynamic"), "exact")
    with pytest.raises(BundleError, match="int8_kernels must be"):
        int8_kernel_choice(_manifest(), "fast")


def test_the_loader_computes_the_qdq_graph_on_a_cpu_whose_kernels_saturate(monkeypatch, tmp_path, capsys):
    path = tmp_path / "m.onnx"
    x, exact = _qdq_matmul(path)
    monkeypatch.setenv("EDGEEXPORT_CPU_FLAGS", NO_VNNI)
    auto = OrtBackend(path, _manifest())
    assert auto.int8_kernels == "exact" and "VNNI" in capsys.readouterr().err
    np.testing.assert_allclose(auto.run({"x": x})["y"], exact, rtol=1e-4)
    native = OrtBackend(path, _manifest(), int8_kernels="native").run({"x": x})["y"]
    so = ort.SessionOptions()
    plain = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(native, plain)  # native is onnxruntime as it comes
    monkeypatch.delenv("EDGEEXPORT_CPU_FLAGS")
    if int8_saturation():  # this machine's own kernels saturate: the case the loader exists for
        assert np.max(np.abs(native - exact) / np.abs(exact)) > 0.1
    else:
        np.testing.assert_allclose(native, exact, rtol=1e-3)
        assert OrtBackend(path, _manifest()).int8_kernels == "native"
