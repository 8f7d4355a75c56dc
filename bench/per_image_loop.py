"""The baseline bench_infer.py times infer.py against: the plain loop a first script would be.

    python bench/per_image_loop.py WEIGHTS FOLDER

Loads the checkpoint once (the same Predictor, reader and preprocessing as infer.py), then for
each image: read, preprocess, forward a batch of one with torch's default threads, print the
answer. No batching, no decoding in parallel, no files written.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.predictor import Predictor  # noqa: E402
from utils.data import read_rgb  # noqa: E402
from utils.files import list_images  # noqa: E402


def main(weights: str, folder: str) -> None:
    predictor = Predictor.from_file(weights, device="cpu")
    for path in list_images(folder):
        (probs,) = predictor.predict_arrays([read_rgb(path)])
        print(f"{path}\t{predictor.class_names[int(probs.argmax())]}\t{float(probs.max()):.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
