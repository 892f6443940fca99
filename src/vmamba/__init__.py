"""VMamba: Visual State Space Model backbones."""
