"""A user model in a plain file: a 1-D conv net over sensor windows, exported with a dynamic batch.

edgeexport loads it with --model examples/custom_model/model.py:build. The factory returns the module and
declares its input, with the batch dimension named (so it stays dynamic in the exported graph).
"""

import torch
import torch.nn as nn


class SensorNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(3, 16, 5, padding=2), nn.ReLU(), nn.Conv1d(16, 32, 5, padding=2), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, window):
        return self.head(self.conv(window).mean(dim=-1))


def build():
    torch.manual_seed(0)
    return {"model": SensorNet().eval(), "inputs": ["window:batchx3x64:float32"]}
