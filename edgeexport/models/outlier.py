"""A digits MLP with one layer that quantizes badly: the test case for per-layer error ranking and float fallback.

The MLP (64 -> 64 -> 64 -> 64 -> 64 -> 32 -> 10, ReLU; the third layer is ``spike``) is trained on scikit-learn's
digits like ``digits``. Then one output channel of ``spike`` is scaled up 400x and the matching input weights of
the next layer are scaled down 400x. In float the function is unchanged (ReLU commutes with a positive scale), but ``spike``'s output now has one
channel 400x larger than the rest: a per-tensor 8-bit range spanning it leaves the other 63 channels a step or two,
the "activation outlier" of large transformers in miniature. Quantizing everything to int8 fails; keeping ``spike``'s
output in float fixes it, and everything else can stay int8.

Data: ``edgeexport.models.digits.write_calibration`` (the same held-out digits, with labels).
"""

from __future__ import annotations

import functools

INPUT_NAME = "image"
OUTLIER_SCALE = 400.0


def make_net():
    import torch.nn as nn

    class OutlierMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.flat = nn.Flatten()
            self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 64)
            self.spike = nn.Linear(64, 64)
            self.fc4, self.fc5, self.fc6 = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 10)
            self.act = nn.ReLU()

        def forward(self, image):
            x = self.flat(image)
            for layer in (self.fc1, self.fc2, self.spike, self.fc4, self.fc5):
                x = self.act(layer(x))
            return self.fc6(x)

    return OutlierMLP()


@functools.lru_cache(maxsize=1)
def train():
    import torch

    from edgeexport.models.digits import fit, load_data

    torch.manual_seed(0)
    x_train, y_train, _, _ = load_data()
    net = fit(make_net(), x_train, y_train, epochs=30, lr=3e-3)
    with torch.no_grad():  # one outlier channel; the float function stays the same
        ch = int(net.spike.weight.abs().sum(1).argmax())
        net.spike.weight[ch] *= OUTLIER_SCALE
        net.spike.bias[ch] *= OUTLIER_SCALE
        net.fc4.weight[:, ch] /= OUTLIER_SCALE
    return net.eval()


def model():
    """Factory: the trained MLP with its outlier channel, example input a batch of one 8x8 digit."""
    import torch

    return {"model": train(), "example_inputs": {INPUT_NAME: torch.zeros(1, 1, 8, 8)}}
