"""The embedded default: a small CNN trained in ~2 s on scikit-learn's bundled digits (1797 real 8x8 images).

``model()`` is a model factory for ``--model edgeexport.models.digits:model``. The data split is fixed: the
training part trains the CNN; the test part (never trained on) is what ``write_calibration`` saves, with its
labels, for calibration and held-out validation.

    python -m edgeexport.models.digits build/digits.npz    # writes image + labels arrays
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import numpy as np

INPUT_NAME = "image"
SEED = 0


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test); images as float32 [N, 1, 8, 8] scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        from edgeexport.errors import missing_extra

        raise missing_extra("scikit-learn", "examples", "the digits example") from None
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng(SEED).permutation(len(x))
    cut = int(len(x) * 0.7)
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def make_net():
    import torch.nn as nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            )
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, image):
            return self.head(self.features(image))

    return DigitsCNN()


def fit(net, x_train: np.ndarray, y_train: np.ndarray, epochs: int, lr: float, seed: int = SEED,
        one_cycle: bool = False):
    """Minibatch AdamW on cross-entropy, seeded (``one_cycle``: the learning rate rises to ``lr`` and anneals, which
    deeper nets need to converge in a few epochs); returns the net in eval mode."""
    import torch
    import torch.nn.functional as F

    from edgeexport.util import torch_threads

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(xt) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps) if one_cycle else None
    net.train()
    with torch_threads():
        for _ in range(epochs):
            perm = torch.randperm(len(xt), generator=gen)
            for i in range(0, len(xt), 64):
                idx = perm[i : i + 64]
                opt.zero_grad()
                F.cross_entropy(net(xt[idx]), yt[idx]).backward()
                opt.step()
                if sched is not None:
                    sched.step()
    return net.eval()


@functools.lru_cache(maxsize=2)
def train(epochs: int = 12, seed: int = SEED):
    """The trained CNN (cached: repeated factory calls in one process reuse it)."""
    import torch

    torch.manual_seed(seed)
    x_train, y_train, _, _ = load_data()
    return fit(make_net(), x_train, y_train, epochs, 3e-3, seed)


def model():
    """Factory: the trained CNN plus an example input (static batch of 1)."""
    import torch

    net = train()
    return {"model": net, "example_inputs": {INPUT_NAME: torch.zeros(1, 1, 8, 8)}}


def model_dynamic_batch():
    """Factory: the same CNN with a named dynamic batch dimension."""
    import torch

    return {"model": train(), "example_inputs": {INPUT_NAME: torch.zeros(2, 1, 8, 8)},
            "inputs": [f"{INPUT_NAME}:batchx1x8x8:float32"]}


def save_labelled(path: str | Path, x: np.ndarray, y: np.ndarray) -> Path:
    """``x`` as the ``image`` input and ``y`` as ``labels`` in one .npz (the layout ``--calib`` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {INPUT_NAME: x, "labels": y}
    np.savez(path, **arrays)
    return path


def write_calibration(path: str | Path) -> Path:
    """Save the held-out test split (images never trained on) with labels as an .npz."""
    _, _, x_test, y_test = load_data()
    return save_labelled(path, x_test, y_test)


def cli(description: str, write: Any, what: str, argv: list[str] | None = None) -> None:
    """``python -m edgeexport.models.<name> OUT.npz``: write the model's labelled build data."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("out", help="where to write the .npz (image + labels)")
    args = parser.parse_args(argv)
    print(f"wrote {write(args.out)} ({what})")


def main(argv: list[str] | None = None) -> None:
    cli(__doc__.splitlines()[0], write_calibration,
        f"{len(load_data()[2])} real digit images with labels, never seen in training", argv)


if __name__ == "__main__":
    main()
