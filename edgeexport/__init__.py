"""edgeexport: PyTorch model -> validated runtime bundle for a device."""

__version__ = "0.1.0"
