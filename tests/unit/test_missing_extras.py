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

    from edgeexport.targets import tflite

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
