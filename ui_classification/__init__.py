"""The PyQt5 desktop viewer behind runui.py.

strings.py  every text, English and Chinese
results.py  per-image predictions, live metrics, predictions.csv (no Qt)
annotate.py the prediction drawn on an image (QImage, any thread)
image_view.py the picture widget: zoom, pan, fit, nearest-neighbour pixels and their grid
heat_maps.py the last few heat maps (drawn by the worker with inference.cam)
worker.py   the QThread worker that owns the model
window.py   the window
app.py      command line and start-up
"""
