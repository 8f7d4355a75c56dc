"""Optional int8 ONNX model: onnxruntime static quantisation, kept only where it is faster.

Weights per channel and activations are quantised (QDQ format, int8 weights, uint8 activations),
calibrated on real images (min/max of each activation). The uint8 input, the normalisation and
softmax stay in float, so the int8 file takes and returns exactly what the fp32 one does. Both
run on the same batch in the same process; the int8 file is saved only when it is clearly faster
(int8 on a CPU without VNNI/AMX instructions can be slower than fp32).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from inference.export import CHUNK, Parity, compare, publish, temp_path
from inference.onnx_model import OnnxModel

CALIBRATION_BATCH = 16
TIMING_BATCH = 32  # images per timed run
TIMING_REPEATS = 5  # the fastest of these counts: the run least disturbed by other processes
FASTER_BY = 0.05  # int8 must take at least 5% less time per image, so timing noise keeps nothing


@dataclass
class Int8Report:
    fp32_ms: float  # milliseconds per image, fastest of TIMING_REPEATS runs of one batch
    int8_ms: float
    timing_batch: int
    parity: Parity  # int8 against fp32
    accuracy: Optional[tuple[float, float]]  # (fp32, int8) top-1 accuracy on a labelled folder
    path: Optional[Path] = None  # where the int8 model was saved; None when not kept

    @property
    def faster(self) -> bool:
        return self.int8_ms <= self.fp32_ms * (1 - FASTER_BY)

    def describe_speed(self) -> str:
        return (f"int8 {self.int8_ms:.2f} ms/image vs fp32 {self.fp32_ms:.2f} ms/image "
                f"({self.fp32_ms / self.int8_ms:.2f}x) on a batch of {self.timing_batch}, onnxruntime CPU")

    def describe_accuracy(self) -> str:
        text = f"against fp32: {self.parity.describe()}"
        if self.accuracy is None:
            return text + " (no labelled folder: accuracy not measured)"
        before, after = self.accuracy
        return (f"{text}; accuracy {before:.2%} -> {after:.2%} ({(after - before) * 100:+.2f} points) "
                f"on {self.parity.count} labelled images")


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs advice on the root logger; the report says what matters."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class _Calibration(CalibrationDataReader):
    """Our uint8 images, batch by batch, as onnxruntime's calibrator asks for them."""

    def __init__(self, images: np.ndarray, input_name: str, fixed_batch: Optional[int]):
        step = fixed_batch or CALIBRATION_BATCH
        # A fixed-batch model takes only full batches: the last one is filled up from the start.
        pieces = [images[np.arange(start, start + step) % len(images)] if fixed_batch else images[start:start + step]
                  for start in range(0, len(images), step)]
        self._feeds = iter([{input_name: np.ascontiguousarray(p)} for p in pieces])

    def get_next(self) -> Optional[dict]:
        return next(self._feeds, None)


def quantize_int8(fp32: OnnxModel, target: Path, calibration: np.ndarray, origin: str) -> None:
    """Write the int8 version of `fp32` to `target`, with fp32's metadata and how it was calibrated."""
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=target.parent) as work, _quiet_root_logger():
        prepared = Path(work) / "prepared.onnx"  # shapes inferred and graph fused: what the quantiser expects
        quant_pre_process(str(fp32.path), str(prepared))
        quantize_static(str(prepared), str(target), _Calibration(calibration, fp32.input_name, fp32.batch_size),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    model = onnx.load(str(target))
    metadata = {**fp32.metadata, "quantization": f"onnxruntime static int8 (QDQ, per channel), calibrated on "
                                                 f"{len(calibration)} images from {origin}"}
    del model.metadata_props[:]
    model.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in metadata.items())
    onnx.save(model, str(target))


def milliseconds_per_image(models: Sequence[OnnxModel], images: np.ndarray) -> list[float]:
    """Time the models on the same batch, alternating runs so a busy moment hits both alike."""
    batch = images[:TIMING_BATCH]
    best = [float("inf")] * len(models)
    for model in models:
        model.predict_uint8(batch)  # warm-up: the first run allocates its buffers
    for _ in range(TIMING_REPEATS):
        for index, model in enumerate(models):
            started = time.perf_counter()
            model.predict_uint8(batch)
            best[index] = min(best[index], time.perf_counter() - started)
    return [seconds * 1000 / len(batch) for seconds in best]


def export_int8(fp32_path: Path, images: np.ndarray, labels: Optional[Sequence[int]], origin: str) -> Int8Report:
    """Quantise, compare with fp32 and time both; save <name>.int8.onnx beside fp32 only if faster."""
    fp32 = OnnxModel(fp32_path, device="cpu")
    final_name = fp32_path.name[: -len(".onnx")] + ".int8.onnx"
    temp = temp_path(fp32_path.parent, final_name)
    try:
        quantize_int8(fp32, temp, images, origin)
        int8 = OnnxModel(temp, device="cpu")
        fp32_probs = fp32.predict_uint8(images, max_batch=CHUNK)
        int8_probs = int8.predict_uint8(images, max_batch=CHUNK)
        accuracy = None
        if labels is not None:
            truth = np.asarray(labels)
            accuracy = (float((fp32_probs.argmax(1) == truth).mean()), float((int8_probs.argmax(1) == truth).mean()))
        fp32_ms, int8_ms = milliseconds_per_image([fp32, int8], images)
        report = Int8Report(fp32_ms, int8_ms, min(len(images), TIMING_BATCH), compare(fp32_probs, int8_probs), accuracy)
        if report.faster:
            report.path = publish(temp, fp32_path.parent, final_name)
        return report
    finally:
        temp.unlink(missing_ok=True)
