"""Downstream tasks on VMamba backbones: semantic segmentation (segmentation_models_pytorch) and
detection / instance segmentation (torchvision). Each module imports its framework lazily."""
