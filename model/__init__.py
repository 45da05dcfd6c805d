"""The SAM inference engine: plain PyTorch, numerically faithful to Meta's ``segment_anything``.

Names are imported on first use (PEP 562), so ``import model.download`` or ``from model import
download`` (the CLI's checkpoint download) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.checkpoint import CheckpointError, load
    from model.embedding import Embedding
    from model.fast_paths import FAST, REFERENCE, FastPaths
    from model.mask_generator import MaskGenerator
    from model.predictor import Prediction, Predictor
    from model.sam import Sam

# Public name -> the submodule that defines it.
_EXPORTS = {
    "CheckpointError": "checkpoint", "load": "checkpoint", "Embedding": "embedding", "FAST": "fast_paths",
    "REFERENCE": "fast_paths", "FastPaths": "fast_paths", "MaskGenerator": "mask_generator",
    "Prediction": "predictor", "Predictor": "predictor", "Sam": "sam",
}
__all__ = ["FAST", "REFERENCE", "CheckpointError", "Embedding", "FastPaths", "MaskGenerator", "Prediction",
           "Predictor", "Sam", "load"]


def __getattr__(name: str) -> Any:
    """A public name, imported from its submodule on first use; or a submodule (``model.runtime``)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"model.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"model.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"model.{name}":
            raise
        raise AttributeError(f"module 'model' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
