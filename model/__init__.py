"""The SAM inference engine: plain PyTorch, numerically faithful to Meta's ``segment_anything``."""

from model.checkpoint import CheckpointError, load
from model.embedding import Embedding
from model.mask_generator import MaskGenerator
from model.predictor import Prediction, Predictor
from model.sam import Sam

__all__ = ["CheckpointError", "Embedding", "MaskGenerator", "Prediction", "Predictor", "Sam", "load"]
