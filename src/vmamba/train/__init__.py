"""Training, evaluation and prediction (``vmamba train / eval / predict``)."""

from .config import DIGITS_PRESET, TrainConfig, build_config, load_yaml, scaled_lrs
from .engine import TrainingDiverged, TrainResult, build_model, evaluate, train

__all__ = [
    "DIGITS_PRESET", "TrainConfig", "TrainResult", "TrainingDiverged", "build_config", "build_model", "evaluate",
    "load_yaml", "scaled_lrs", "train",
]
