"""Floor 3 of the house (see /work/shared/DESIGN.md): running trained models.

    inference/export.py        the export wrapper (uint8 image -> probabilities), ONNX and
                               TorchScript exporters, their metadata and the parity check
    inference/check_images.py  the real (or generated) images an export is checked on
    inference/quantize.py      optional int8 ONNX model (onnxruntime static quantisation)
    inference/onnx_model.py    an exported .onnx run by onnxruntime, read through its metadata

Imports only from utils/ and models/; scripts (export.py) and ui_classification/ import it.
"""
