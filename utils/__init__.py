"""Helpers shared by train.py, infer.py, split_dataset.py and the UI (see ../README.md)."""
