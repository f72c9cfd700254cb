"""A missing optional dependency names the pip extra that brings it."""

import builtins

import pytest

from edgeexport.errors import MissingExtraError


def _block(monkeypatch, prefix):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == prefix or name.startswith(prefix + "."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_tflite_without_tensorflow(monkeypatch):
    import importlib

    from edgeexport.targets.tflite import target as tflite

    real_import_module = importlib.import_module

    def fake(name, *a, **k):
        if name == "tensorflow":
            raise ImportError("No module named 'tensorflow'")
        return real_import_module(name, *a, **k)

    monkeypatch.setattr(tflite.importlib, "import_module", fake)
    with pytest.raises(MissingExtraError) as e:
        tflite._require()
    assert "pip install 'edgeexport[tflite]'" in e.value.fix and "tensorflow" in e.value.what


def test_hf_without_optimum(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _block(monkeypatch, "optimum")
    from edgeexport.source import load_source

    with pytest.raises(MissingExtraError) as e:
        load_source(f"hf:{tmp_path}")
    assert "pip install 'edgeexport[hf]'" in e.value.fix


def test_vision_model_without_its_packages(monkeypatch):
    _block(monkeypatch, "efficientnet_lite_pytorch")
    from edgeexport.models import efficientnet

    efficientnet._net.cache_clear()
    with pytest.raises(MissingExtraError) as e:
        efficientnet.lite0()
    assert "pip install 'edgeexport[vision]'" in e.value.fix


def test_report_without_matplotlib_fails_before_any_build(monkeypatch, cli):
    _block(monkeypatch, "matplotlib")
    r = cli("compare", "--model", "edgeexport.models.digits:model", "--calib", "synthetic:8", "--report", "r.html")
    assert r.exit_code == 1 and "pip install 'edgeexport[report]'" in r.stderr and "==> " not in r.stderr


def test_compare_plans_a_missing_extra_as_a_skipped_row(monkeypatch):
    from edgeexport import compare

    real = compare.importlib.util.find_spec
    monkeypatch.setattr(compare.importlib.util, "find_spec", lambda name: None if name == "onnx2tf" else real(name))
    rows = compare.plan(["tflite", "trt"], ["fp32", "int8-dynamic"])
    assert [(r.key, r.status) for r in rows] == [("tflite/fp32", "skipped"), ("tflite/dynamic-range", "skipped"),
                                                 ("trt/fp32", "pending"), ("trt/int8-dynamic", "skipped")]
    assert "pip install 'edgeexport[tflite]'" in rows[0].reason and "onnx2tf" in rows[0].reason


def test_structured_pruning_without_torch_pruning(monkeypatch):
    import torch

    from edgeexport.prune import _magnitude, _structured, output_layers

    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    _block(monkeypatch, "torch_pruning")
    with pytest.raises(MissingExtraError) as e:
        _structured(net, (torch.zeros(1, 4),), 0.5, [])
    assert "pip install 'edgeexport[prune]'" in e.value.fix and "--prune structured" in e.value.what
    # magnitude pruning and finding the output layers need only torch
    assert output_layers(net, (torch.zeros(1, 4),)) == [net[2]]
    _magnitude(net, 0.5, [net[2]])
    assert float((net[0].weight == 0).float().mean()) == 0.5
