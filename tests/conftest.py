"""Shared fixtures: real data (scikit-learn digits) and small real models, built in code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("EDGEEXPORT_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory) -> Path:
    from edgeexport.models.digits import write_calibration

    return write_calibration(tmp_path_factory.mktemp("data") / "digits.npz")


@pytest.fixture(scope="session")
def rows_npz(tmp_path_factory) -> Path:
    from edgeexport.models.digit_rows import write_calibration

    return write_calibration(tmp_path_factory.mktemp("data") / "rows.npz")


def save_tiny_bert(out: Path, layers: int, intermediate: int, seed: int = 0) -> Path:
    """A small BERT (hidden 64, 4 heads, random weights) saved with save_pretrained into ``out``, with MiniLM's
    tokenizer: a transformer of the shape real encoders have, built here rather than the one things were tuned on."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from edgeexport.models.sentences import minilm_path

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=intermediate, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(Path(minilm_path()) / name, out / name)
    return out


def make_cfg(**kw: Any):
    from edgeexport.config import make_config

    data: dict[str, Any] = {"target": "ort", "precision": "fp32", "bench": {"runs": 5, "warmup": 1}}
    for key, value in kw.items():
        if key in ("calibration", "bench") and isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return make_config(data)


def quiet_build(cfg):
    from edgeexport import pipeline

    return pipeline.build(cfg, log=lambda _msg: None)


@pytest.fixture
def cli():
    """Invoke the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from edgeexport.cli import main

    def run(*args: str):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return run


TINY_MODEL = '''
import torch
import torch.nn as nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def build():
    return Tiny(), (torch.zeros(1, 6),)


def dynamic():
    return {"model": Tiny(), "inputs": ["x:batchx6:float32"]}


def raises():
    raise RuntimeError("weights file missing")


def not_a_module():
    return 42


class Bad(nn.Module):
    def forward(self, x):
        raise ValueError("forward exploded")


def bad_forward():
    return Bad(), (torch.zeros(1, 6),)
'''


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny_model.py"
    path.write_text(TINY_MODEL)
    return path


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x=rng.standard_normal((60, 6)).astype(np.float32))
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_model, tiny_npz) -> Path:
    """A real ORT fp32 bundle of a tiny MLP, shared by loader tests (they copy it before tampering)."""
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    quiet_build(make_cfg(model=f"{tiny_model}:build", calibration={"path": str(tiny_npz)}, out=str(out)))
    return out
