"""FLOPs of recurrent layers: counted from the graph, against the multiply-adds written out by hand."""

import numpy as np
import pytest


def _recurrent_graph(op: str, gates: int, seq: int, batch: int, inp: int, hidden: int, directions: int,
                     r_from_node: bool):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((directions, gates * hidden, inp)).astype(np.float32), "W")
    r = rng.standard_normal((directions, gates * hidden, hidden)).astype(np.float32)
    nodes, inits = [], [w]
    if r_from_node:  # as torch.onnx writes them: the weight comes out of a node, not an initializer
        nodes.append(helper.make_node("Constant", [], ["R"], value=numpy_helper.from_array(r, "Rc")))
    else:
        inits.append(numpy_helper.from_array(r, "R"))
    attrs = {"hidden_size": hidden, "direction": "bidirectional" if directions == 2 else "forward"}
    nodes.append(helper.make_node(op, ["X", "W", "R"], ["Y"], name=op.lower(), **attrs))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [seq, batch, inp])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op,gates,directions,r_from_node", [("LSTM", 4, 1, False), ("LSTM", 4, 2, True),
                                                              ("GRU", 3, 1, True), ("RNN", 1, 2, False)])
def test_recurrent_layers_count_every_step_gate_and_direction(tmp_path, op, gates, directions, r_from_node):
    import onnx

    from edgeexport.flops import count_flops

    seq, batch, inp, hidden = 7, 2, 5, 6
    path = tmp_path / "m.onnx"
    onnx.save(_recurrent_graph(op, gates, seq, batch, inp, hidden, directions, r_from_node), str(path))
    stats = count_flops(path, {"X": np.zeros((seq, batch, inp), np.float32)})
    # per step, per direction: gates x hidden outputs, each a dot product over the input and the hidden state
    want = 2 * seq * batch * directions * gates * hidden * (inp + hidden)
    assert stats["flops"] == stats["by_op"][op] == want
    assert op in stats["counted"]


def test_a_torch_lstm_encoder_is_counted(tmp_path):
    """An LSTM speaker-encoder-like model exported by torch: its LSTM work dominates, and is counted."""
    import torch

    from edgeexport.flops import count_flops

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(40, 64, num_layers=2, batch_first=True)
            self.proj = torch.nn.Linear(64, 32)

        def forward(self, x):
            y, _ = self.lstm(x)
            return self.proj(y[:, -1])

    path = tmp_path / "enc.onnx"
    x = torch.zeros(1, 50, 40)
    torch.onnx.export(Encoder().eval(), (x,), str(path), input_names=["x"], output_names=["e"], dynamo=True,
                      external_data=False)
    stats = count_flops(path, {"x": x.numpy()})
    lstm = 2 * 50 * 4 * 64 * ((40 + 64) + (64 + 64))  # two layers, 50 steps
    assert stats["by_op"].get("LSTM", 0) == lstm
    assert stats["flops"] == lstm + 2 * 64 * 32


@pytest.mark.parametrize("layout", ["mha", "onnx"])
def test_fused_attention_counts_scores_and_the_weighted_sum(tmp_path, layout):
    """A graph that arrives already fused (onnxruntime's MultiHeadAttention, ONNX's opset-23 Attention): Q.K^T
    is B x heads x Sq x Skv x D multiply-adds, and so is the weighted sum of V."""
    import onnx
    from onnx import TensorProto, helper

    from edgeexport.flops import count_flops

    b, heads, sq, skv, d = 2, 4, 5, 7, 8
    if layout == "mha":
        shapes = {"Q": [b, sq, heads * d], "K": [b, skv, heads * d], "V": [b, skv, heads * d]}
        node = helper.make_node("MultiHeadAttention", ["Q", "K", "V"], ["O"], domain="com.microsoft", num_heads=heads)
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    else:
        shapes = {"Q": [b, heads, sq, d], "K": [b, heads, skv, d], "V": [b, heads, skv, d]}
        node = helper.make_node("Attention", ["Q", "K", "V"], ["O"])
        opsets = [helper.make_opsetid("", 23)]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                                            for n, s in shapes.items()],
                              [helper.make_tensor_value_info("O", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(tmp_path / "a.onnx"))
    rng = np.random.default_rng(0)
    stats = count_flops(tmp_path / "a.onnx", {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()})
    want = 2 * 2 * b * heads * sq * skv * d
    assert stats["flops"] == want and "MultiHeadAttention" in stats["counted"]
