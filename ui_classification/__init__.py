"""The PyQt5 desktop viewer behind runui.py.

strings.py  every text, English and Chinese
results.py  per-image predictions, live metrics, predictions.csv (no Qt)
annotate.py the prediction drawn on an image (QImage, any thread)
worker.py   the QThread worker that owns the model
window.py   the window
app.py      command line and start-up
"""
