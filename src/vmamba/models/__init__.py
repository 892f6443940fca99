"""VMamba models, the registry and checkpoint loading."""

from .checkpoint import CheckpointError, load_checkpoint, read_state_dict_file, remap_keys, unwrap_state_dict
from .registry import create_model, get_config, list_models, register_config
from .vssm import VSSM, VSSMBackbone, VSSMConfig, apply_overrides

__all__ = [
    "VSSM", "CheckpointError", "VSSMBackbone", "VSSMConfig", "apply_overrides", "create_model", "get_config",
    "list_models", "load_checkpoint", "read_state_dict_file", "register_config", "remap_keys",
    "unwrap_state_dict",
]
