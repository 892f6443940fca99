"""Command-line tools: converting published checkpoints safely, exporting models (ONNX, torch.export)."""
