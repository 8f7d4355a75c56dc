"""Model registry (registry.py) and pretrained weights (pretrained.py)."""

from models.registry import MODEL_CLASSES, create_model

__all__ = ["MODEL_CLASSES", "create_model"]
