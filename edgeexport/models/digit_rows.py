"""A second real architecture: a small transformer encoder that reads each 8x8 digit as 8 row tokens.

Trained in a few seconds on scikit-learn's digits (same split as ``digits``), with a named dynamic ``batch``
dimension. It exercises MatMul/Gemm, LayerNorm, Softmax and GELU, the ops of transformer models.

    --model edgeexport.models.digit_rows:model    with data from  python -m edgeexport.models.digit_rows OUT.npz
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from typing import Any

import numpy as np

from edgeexport.models.digits import SEED, fit, load_data

INPUT_NAME = "rows"


def make_net(dim: int = 32, heads: int = 4, layers: int = 2):
    import torch
    import torch.nn as nn

    class RowTransformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, dim)
            self.pos = nn.Parameter(torch.zeros(1, 8, dim))
            layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                               activation="gelu", batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, 10)

        def forward(self, rows):
            h = self.encoder(self.embed(rows) + self.pos)
            return self.head(self.norm(h.mean(dim=1)))

    return RowTransformer()


def _rows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x[:, 0, :, :])  # [N, 8 rows, 8 pixels]


@functools.lru_cache(maxsize=2)
def train(epochs: int = 25, seed: int = SEED):
    """The trained transformer (cached: repeated factory calls in one process reuse it)."""
    import torch

    torch.manual_seed(seed)
    x_train, y_train, _, _ = load_data()
    return fit(make_net(), _rows(x_train), y_train, epochs, 3e-3, seed)


def model():
    """Factory: the trained transformer, input ``rows`` with a dynamic batch dimension."""
    import torch

    return {"model": train(), "example_inputs": {INPUT_NAME: torch.zeros(2, 8, 8)},
            "inputs": [f"{INPUT_NAME}:batchx8x8:float32"]}


def write_calibration(path: str | Path) -> Path:
    _, _, x_test, y_test = load_data()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {INPUT_NAME: _rows(x_test), "labels": y_test}
    np.savez(path, **arrays)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write the digit-rows calibration data (held-out test split)")
    parser.add_argument("out")
    print(f"wrote {write_calibration(parser.parse_args().out)}")
