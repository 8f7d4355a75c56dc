"""The heat-map toggle's memory: the last few heat maps the worker drew, and which one is on its way.

A heat map (inference.cam, Grad-CAM by default) is computed in the worker thread for the image
on screen only, on demand; the window keeps the last HEAT_MAPS_KEPT, so stepping back and forth
does not compute them again, and memory stays bounded (each is one picture of the image, at most 2048 px a side).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import numpy as np

HEAT_MAPS_KEPT = 8

HeatMapKey = tuple[str, str, int]  # checkpoint, image path, class index


class HeatMapCache:
    """Heat-map overlays by (checkpoint, path, class), the least recently used dropped first."""

    def __init__(self, size: int = HEAT_MAPS_KEPT):
        self.size = size
        self.overlays: OrderedDict[HeatMapKey, np.ndarray] = OrderedDict()
        self.waiting_for: Optional[HeatMapKey] = None  # requested from the worker, not answered yet

    def get(self, key: HeatMapKey) -> Optional[np.ndarray]:
        overlay = self.overlays.get(key)
        if overlay is not None:
            self.overlays.move_to_end(key)
        return overlay

    def put(self, key: HeatMapKey, overlay: np.ndarray) -> None:
        self.overlays[key] = overlay
        self.overlays.move_to_end(key)
        while len(self.overlays) > self.size:
            self.overlays.popitem(last=False)

    def clear(self) -> None:
        self.overlays.clear()
        self.waiting_for = None
