"""--prune: structured and magnitude pruning before export, recovery, and the gate against the unpruned model."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeexport.bundle import loader

MODEL = "edgeexport.models.digits:model"
pytestmark = pytest.mark.slow


def _weights(path) -> dict[str, np.ndarray]:
    """Conv and Gemm/MatMul weight initializers of an ONNX file."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[1]: inits[n.input[1]] for n in model.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in inits}


def _holdout_accuracy(bundle, digits_npz) -> tuple[float, float]:
    """Accuracy of the bundle (through its own loader) and of the unpruned PyTorch model on the held-out split."""
    import torch

    from edgeexport.models.digits import train

    manifest = json.loads((bundle / "manifest.json").read_text())
    data = np.load(digits_npz)
    x, y = data["image"], data["labels"]
    cal = manifest["calibration"]
    perm = np.random.default_rng(cal["split_seed"]).permutation(len(x))
    hold = perm[: cal["holdout_samples"]]
    model = loader.load(bundle)
    built = np.array([model({"image": x[i : i + 1]})["output"].argmax() for i in hold])
    with torch.no_grad():
        ref = train()(torch.from_numpy(x[hold])).argmax(1).numpy()
    return float((built == y[hold]).mean()), float((ref == y[hold]).mean())


def test_structured_pruning_with_recovery_keeps_digits_accuracy(cli, digits_npz, tmp_path):
    out = tmp_path / "s"
    r = cli("build", "--model", MODEL, "--calib", digits_npz, "--precision", "fp32", "--holdout", "200",
            "--prune", "structured:0.3", "--finetune-steps", "150", "--out", out, "--no-bench")
    assert r.exit_code == 0, r.stderr
    assert "==> pruning: structured 0.3" in r.stderr and "recovery: 150 steps" in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    p = m["pruning"]
    assert p["method"] == "structured" and p["protected_layers"] == ["head.3"]  # the classifier keeps its 10 outputs
    assert p["channels_after"] < 0.75 * p["channels_before"] and p["params_after"] < 0.6 * p["params_before"]
    assert p["layers_changed"]["features.0"] == [16, 11]
    assert p["recovery"]["objective"].startswith("labels") and p["recovery"]["loss_last10"] < p["recovery"]["loss_first10"]
    assert m["config"]["prune"]["finetune_steps"] == 150
    # recovery trains on every sample that is not held out (540 digits - 200 held out - 64 set aside), not on the
    # 256 that calibration is capped at; BatchNorm statistics are re-estimated; held-out accuracy is recorded per
    # checkpoint (for the record only)
    rec = p["recovery"]
    assert rec["pool"] == 540 - 200 - rec["aside_samples"] and rec["aside_samples"] == 64
    assert rec["batchnorm_reestimated"]["samples"] > 0 and "used" in rec["batchnorm_reestimated"]
    assert rec["checkpoints"][0]["step"] == 0 and rec["checkpoints"][-1]["step"] == 150 and len(rec["checkpoints"]) >= 9
    assert all(0.0 <= c["holdout_accuracy"] <= 1.0 for c in rec["checkpoints"])
    assert "held-out accuracy by checkpoint" in r.stderr
    # a genuinely smaller dense model: every Conv/Gemm weight in the ONNX file is narrower
    w = _weights(out / m["model_file"])
    assert sorted(a.shape[0] for a in w.values()) == [10, 11, 22, 44]
    assert m["model_stats"]["params"] == sum(a.size for a in w.values()) + sum(  # biases
        a.shape[0] for a in w.values())
    # the gate compared with the unpruned model, with the pruned limits, and so does an independent check
    v = m["validation"]
    assert v["passed"] and v["tolerance"]["cosine"] == 0.95 and v["task"]["drop_points"] <= 1.0
    built, reference = _holdout_accuracy(out, digits_npz)
    assert reference - built <= 0.01, (built, reference)  # real held-out accuracy within 1 point after recovery
    report = (out / "report.md").read_text()
    assert "## Pruned before export: structured 0.3" in report and "the unpruned model" in report
    assert loader.load(out).selftest(verbose=False)


def test_magnitude_pruning_zeroes_weights_shrinks_the_compressed_file_not_the_shapes(cli, digits_npz, tmp_path):
    plain, pruned = tmp_path / "plain", tmp_path / "m"
    assert cli("build", "--model", MODEL, "--calib", digits_npz, "--precision", "fp32", "--out", plain,
               "--no-bench").exit_code == 0
    r = cli("build", "--model", MODEL, "--calib", digits_npz, "--precision", "fp32", "--prune", "magnitude:0.5",
            "--finetune-steps", "60", "--out", pruned, "--no-bench")
    assert r.exit_code == 0, r.stderr
    m = json.loads((pruned / "manifest.json").read_text())
    p = m["pruning"]
    before, after = _weights(plain / "model.onnx"), _weights(pruned / "model.onnx")
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}  # shapes unchanged
    pruned_layers = [a for a in after.values() if a.shape[0] != 10]  # all but the protected classifier
    assert all(abs((a == 0).mean() - 0.5) < 0.01 for a in pruned_layers)  # zeros survived recovery and export
    assert (after[max(after, key=lambda k: -after[k].shape[0])] != 0).all()  # the classifier was not pruned
    assert 0.4 < p["weight_sparsity"] < 0.5 and p["channels_after"] == p["channels_before"]
    from edgeexport.pipeline import deflated_size

    assert p["model_file_deflated_bytes"] < 0.75 * deflated_size(plain / "model.onnx")
    assert "latency and the uncompressed size do not change" in (pruned / "report.md").read_text()
    assert m["validation"]["passed"]


def test_heavy_pruning_without_recovery_is_refused_by_the_gate(cli, digits_npz, tmp_path):
    out = tmp_path / "h"
    r = cli("build", "--model", MODEL, "--calib", digits_npz, "--precision", "fp32", "--prune", "structured:0.7",
            "--out", out, "--no-bench")
    assert r.exit_code == 1 and "validation failed" in r.stderr and "prune less" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_one_pruned_export_for_every_target_in_compare(cli, digits_npz, tmp_path):
    """compare prunes and recovers once, then ort, tflite and trt build from the same pruned export."""
    pytest.importorskip("onnx2tf")
    r = cli("compare", "--model", MODEL, "--calib", digits_npz, "--targets", "ort,tflite,trt",
            "--precisions", "fp32,int8", "--prune", "structured:0.3", "--finetune-steps", "100", "--runs", "20",
            "--rounds", "1", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.stderr.count("==> pruning") == 1
    c = json.loads(r.stdout)
    assert c["pruning"]["method"] == "structured" and c["pruning"]["recovery"]["steps"] == 100
    rows = {f"{x['target']}/{x['precision']}": x for x in c["rows"]}
    assert set(rows) == {"ort/fp32", "ort/int8", "tflite/fp32", "tflite/int8", "trt/fp32", "trt/int8"}
    for key, row in rows.items():
        assert row["status"] == "passed", (key, row["reason"])
        assert row["metrics"]["task_drop_points"] <= 1.0 and row["deflated_bytes"] < row["size_bytes"]


def test_output_layers_are_protected_whatever_the_model_returns():
    import torch
    import torch.nn as nn

    from edgeexport.prune import output_layers

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 8)
            self.a = nn.Linear(8, 3)
            self.b = nn.Conv1d(1, 2, 3)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return {"a": torch.softmax(self.a(h), -1), "b": self.b(h[:, None, :]).flatten(1)}

    net = TwoHeads()
    example = (torch.zeros(2, 4),)
    found = output_layers(net, example)
    assert net.b in found  # its output is a model output (through a flattening view)
    assert net.a in found  # behind a softmax: found through torch-pruning's dependency graph
    assert net.body not in found
    from edgeexport.prune import _structured

    _structured(net, example, 0.5, found)
    out = net(*example)
    assert out["a"].shape == (2, 3) and out["b"].shape == (2, 12)  # the outputs keep their shapes


BATCH_OF_ONE = '''
import torch
import torch.nn as nn


class OnlyOne(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x.reshape(1, 6))))


def build():
    return OnlyOne(), (torch.zeros(1, 6),)
'''


def test_recovery_on_a_model_that_takes_one_sample_fails_clearly(cli, tiny_npz, tmp_path):
    (tmp_path / "one.py").write_text(BATCH_OF_ONE)
    out = tmp_path / "o"
    r = cli("build", "--model", f"{tmp_path / 'one.py'}:build", "--calib", tiny_npz, "--precision", "fp32",
            "--prune", "magnitude:0.5", "--finetune-steps", "5", "--out", out, "--no-bench")
    assert r.exit_code == 1 and "recovery failed: the model's forward raised RuntimeError" in r.stderr
    assert "finetune_batch: 1" in r.stderr and "Traceback" not in r.stderr and not out.exists()
