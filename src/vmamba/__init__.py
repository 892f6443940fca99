"""VMamba: Visual State Space Model backbones that install with pip and run anywhere."""

from .models import (
    VSSM,
    CheckpointError,
    VSSMBackbone,
    VSSMConfig,
    create_model,
    get_config,
    list_models,
    load_checkpoint,
)

__version__ = "0.1.0"

__all__ = [
    "VSSM", "CheckpointError", "VSSMBackbone", "VSSMConfig", "__version__", "create_model", "get_config",
    "list_models", "load_checkpoint",
]
from . import timm_registry  # noqa: E402,F401  (registers every model with timm)
