"""Model registry and pretrained weights."""
