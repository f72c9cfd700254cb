"""A stateful streaming model on real data: a GRU that reads scikit-learn's digits one pixel row at a time.

Each call takes one 8-pixel row, the GRU state the previous call returned and the pixel scale (an int64 scalar,
like a voice detector's sample rate), and returns the probability that the digit being read is 5 or more, plus the
next state. On a device it runs row after row, fed its own state, as a voice detector runs chunk after chunk; its
state is reset to zeros at the start of each image. ``write_calibration`` saves the held-out images (never
trained on) as such a stream:

- ``row`` [N*8, 1, 8] float32: the rows in reading order (raw pixel values 0..16);
- ``h`` [N*8, 1, 1, 32] float32: zeros (the build replaces them with the state the float model carries);
- ``scale``: a single int64 (16), shared by every sample;
- ``stream_start`` [N*8] bool: True at the first row of each image.

    python -m edgeexport.models.streaming build/stream.npz
    edgeexport build --model edgeexport.models.streaming:model --calib build/stream.npz --precision int8
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np

HIDDEN = 32
ROWS = 8
SEED = 0


def make_net():
    import torch
    import torch.nn as nn

    class RowGRU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(ROWS, 32)
            self.gru = nn.GRU(32, HIDDEN, batch_first=True)
            self.head = nn.Linear(HIDDEN, 1)

        def forward(self, row, h, scale):
            x = torch.relu(self.embed(row / scale.to(row.dtype)))  # row [1, 8] -> [1, 32]
            y, hn = self.gru(x[:, None, :], h)
            return {"prob": torch.sigmoid(self.head(y[:, 0])), "hn": hn}

    return RowGRU()


@functools.lru_cache(maxsize=1)
def train(epochs: int = 25):
    """Trained on the digits' training part, every row's output against the digit's label (>= 5)."""
    import torch
    import torch.nn.functional as F

    from edgeexport.models.digits import load_data
    from edgeexport.util import torch_threads

    torch.manual_seed(SEED)
    x_train, y_train, _, _ = load_data()
    rows = torch.from_numpy(x_train[:, 0] * 16.0)  # [N, 8, 8], raw pixel values
    target = torch.from_numpy((y_train >= 5).astype(np.float32))
    net = make_net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(SEED)
    with torch_threads():
        for _ in range(epochs):
            perm = torch.randperm(len(rows), generator=gen)
            for i in range(0, len(rows), 64):
                idx = perm[i:i + 64]
                x = torch.relu(net.embed(rows[idx] / 16.0))
                y, _ = net.gru(x)
                logits = net.head(y)[..., 0]  # [batch, rows]: judged after every row, most after the last
                weight = torch.linspace(0.2, 1.0, ROWS)
                loss = F.binary_cross_entropy_with_logits(logits, target[idx, None].expand_as(logits), weight=weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
    return net.eval()


def model():
    """Factory: the trained GRU and one step's example inputs."""
    import torch

    return {"model": train(),
            "example_inputs": {"row": torch.zeros(1, ROWS), "h": torch.zeros(1, 1, HIDDEN),
                               "scale": torch.tensor(16, dtype=torch.int64)}}


def write_calibration(path: str | Path, images: int = 250) -> Path:
    """The first ``images`` held-out digits as one stream of rows (see the module docstring)."""
    from edgeexport.models.digits import load_data

    _, _, x_test, _ = load_data()
    x = x_test[:images, 0] * 16.0  # [images, 8, 8]
    n = len(x) * ROWS
    starts = np.zeros(n, bool)
    starts[::ROWS] = True
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, row=x.reshape(n, 1, ROWS).astype(np.float32), h=np.zeros((n, 1, 1, HIDDEN), np.float32),
             scale=np.int64(16), stream_start=starts)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the streaming digits model's calibration data.")
    parser.add_argument("out", help="output .npz")
    parser.add_argument("--images", type=int, default=250)
    args = parser.parse_args()
    print(write_calibration(args.out, args.images))


if __name__ == "__main__":
    main()
