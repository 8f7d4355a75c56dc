"""Prediction with decoding in threads (inference.decoding, Predictor.predict_paths): the same
answers in the same order as one image at a time, unreadable files anywhere in a batch, bounded
memory, threads that end with the loop, and infer.py failing fast before torch loads.

A tiny random resnet18 at 32 px (nothing downloaded, nothing trained): the tests compare paths
through the code, not accuracy.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from conftest import REPO, run_script, write_image

from inference.decoding import ThreadedDecoder, plan_threads
from inference.predictor import PathDataset, Predictions, Predictor
from models.registry import create_model
from utils.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from utils.data import ImageDataset, jpeg_reduction, read_rgb
from utils.transforms import Preprocess, build_eval_transform, build_train_transform, scale_box

CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    torch.manual_seed(0)
    model = create_model("resnet18", len(CLASSES), (32, 32))
    path = tmp_path_factory.mktemp("ckpt") / "random.pth"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "model": "resnet18", "class_names": CLASSES,
                     "state_dict": model.state_dict(), "epoch": 0,
                     "preprocess": Preprocess(input_size=[32, 32]).to_dict()}, path)
    return Predictor.from_checkpoint(str(path), device="cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> list[str]:
    """11 images of assorted sizes, with a corrupt and an empty file in the middle of the second batch of 4."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(11):
        if i == 5:
            (root / "05_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
            paths.append(str(root / "05_broken.jpg"))
        elif i == 6:
            (root / "06_empty.png").write_bytes(b"")
            paths.append(str(root / "06_empty.png"))
        else:
            size = (int(rng.integers(20, 90)), int(rng.integers(20, 90)), 3)
            paths.append(str(write_image(root / f"{i:02d}.png", rng.integers(0, 256, size, dtype=np.uint8))))
    return paths


def test_threads_give_the_answers_of_one_image_at_a_time_in_order(predictor, folder):
    results = Predictions.collect(predictor.predict_paths(folder, batch_size=4, workers=0), CLASSES)
    assert predictor.decoding["workers"] == 0 and predictor.decoding["decode_threads"] >= 1
    assert results.paths == folder
    unreadable = [i for i, error in enumerate(results.errors) if error]
    assert unreadable == [5, 6]
    assert "05_broken.jpg" in results.errors[5] and "empty file" in results.errors[6]
    assert torch.isnan(results.probs[unreadable]).all()
    for i, path in enumerate(folder):
        if i not in unreadable:
            (one,) = predictor.predict_arrays([read_rgb(path)])  # a batch of one, read by hand
            torch.testing.assert_close(results.probs[i], one, atol=1e-5, rtol=0)


def test_threads_and_worker_processes_agree(predictor, folder):
    threaded = torch.cat([b.probs for b in predictor.predict_paths(folder, batch_size=3, workers=0)])
    processes = Predictions.collect(predictor.predict_paths(folder, batch_size=3, workers=1), CLASSES)
    assert predictor.decoding["workers"] == 1
    torch.testing.assert_close(threaded, processes.probs, atol=1e-5, rtol=0, equal_nan=True)
    assert processes.paths == folder


def test_the_decoder_holds_a_bounded_number_of_batches_and_stops_with_the_loop():
    started: list[int] = []
    lock = threading.Lock()

    def decode(index: int) -> tuple[torch.Tensor, int, str]:
        with lock:
            started.append(index)
        return torch.full((3, 2, 2), index % 256, dtype=torch.uint8), index, "" if index % 7 else f"bad {index}"

    batch, ahead = 4, 1
    decoder = ThreadedDecoder(decode, 100, batch, threads=3, ahead=ahead)
    batches = iter(decoder)
    for handed in range(1, 6):
        got = next(batches)
        assert got.indices == list(range((handed - 1) * batch, handed * batch))  # in order
        assert got.images[:, 0, 0, 0].tolist() == got.indices
        assert got.errors == ["" if i % 7 else f"bad {i}" for i in got.indices]
        # only the batches handed out and `ahead` more were ever given to the threads
        assert max(started) < (handed + ahead) * batch
    assert decoder.most_pending <= ahead + 1
    batches.close()  # the consumer stops early (the viewer's Stop)
    count = len(started)
    assert not [t for t in threading.enumerate() if t.name.startswith("decode")]
    assert len(started) == count and count <= (5 + ahead) * batch


def test_decode_threads_resize_on_one_torch_thread_and_the_model_keeps_its_own():
    before = torch.get_num_threads()
    seen: list[int] = []
    decoder = ThreadedDecoder(lambda i: (seen.append(torch.get_num_threads()) or torch.zeros(3, 1, 1, dtype=torch.uint8),
                                         i, ""), 9, 3, threads=2)
    for _ in decoder:
        assert torch.get_num_threads() == before  # the forward pass runs here with all its threads
    assert seen == [1] * 9
    assert torch.get_num_threads() == before
    started_later: list[int] = []
    thread = threading.Thread(target=lambda: started_later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert started_later == [before]  # threads started afterwards get the process default back


def test_every_image_once_whatever_the_thread_count_changes():
    decoder = ThreadedDecoder(lambda i: (torch.zeros(3, 1, 1, dtype=torch.uint8), i, ""), 23, 5, threads=1,
                              max_threads=4)
    seen = []
    for number, batch in enumerate(decoder):
        decoder.threads = [4, 2, 1, 3, 4][number]
        seen += batch.indices
    assert seen == list(range(23))


def test_plan_threads():
    assert plan_threads(decode_seconds=0.01, forward_seconds=1.0, cores=8) == 1  # cheap decoding: one thread
    assert plan_threads(decode_seconds=2.5, forward_seconds=1.0, cores=8) == 3  # keeps up with the model
    assert plan_threads(decode_seconds=50.0, forward_seconds=1.0, cores=2) == 2  # never more than the cores
    assert plan_threads(decode_seconds=1.0, forward_seconds=0.0, cores=2) == 2


def test_missing_weights_fail_before_torch_is_imported(tmp_path):
    image = write_image(tmp_path / "x.png", np.zeros((8, 8, 3), dtype=np.uint8))
    result = run_script("-X", "importtime", str(REPO / "infer.py"), "--weights", str(tmp_path / "missing.pth"),
                        "--image_path", str(image), "--save_dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert f"error: checkpoint {tmp_path / 'missing.pth'} does not exist (--weights)" in result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert imported and not imported & {"torch", "numpy", "cv2", "matplotlib", "torchmetrics", "onnxruntime"}
    assert not Path(tmp_path / "out").exists()


def test_pillow_plugins_are_loaded_before_any_decode_thread_starts():
    """The first Image.open imports Pillow's format plugins; when several decode threads made that
    first call at once they waited behind the import lock (0.2 s before infer.py's first batch).
    utils.data loads them when it is imported, on the importing thread."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, sys.argv[1]); import utils.data; "
            "print(sorted(m for m in sys.modules if m in ('PIL.JpegImagePlugin', 'PIL.PngImagePlugin')))")
    result = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['PIL.JpegImagePlugin', 'PIL.PngImagePlugin']"


# Reduced-size JPEG decoding (utils.data.read_rgb's min_size): evaluation, infer.py and the viewer
# decode JPEGs far larger than the model input at 1/2, 1/4 or 1/8 of their size.

def _photo(height: int, width: int) -> np.ndarray:
    """A natural photo (scikit-learn ships it) enlarged, with sensor-like noise: real detail at every scale."""
    from sklearn.datasets import load_sample_image  # imports scipy: only in the tests that need it

    image = cv2.resize(load_sample_image("china.jpg"), (width, height), interpolation=cv2.INTER_CUBIC)
    noise = np.random.default_rng(0).integers(-12, 13, image.shape)
    return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def _turned_jpeg(path: Path, height: int, width: int) -> Path:
    """A `_photo` stored `height` x `width` with EXIF orientation 6: shown a quarter turn round."""
    from PIL import Image

    picture = Image.fromarray(_photo(height, width))
    exif = picture.getexif()
    exif[0x0112] = 6
    picture.save(path, exif=exif.tobytes(), quality=92)
    return path


@pytest.mark.parametrize("mode", ["crop", "letterbox", "stretch"])
def test_large_jpegs_are_decoded_smaller_for_evaluation_with_the_same_model_input(tmp_path, mode):
    path = write_image(tmp_path / "photo é.jpg", _photo(1536, 2048))
    transform = build_eval_transform(Preprocess(input_size=[96, 128], resize_mode=mode))
    reduced = read_rgb(path, transform.source_min_size)
    full = read_rgb(path)
    assert full.shape == (1536, 2048, 3)
    # the largest factor that keeps twice the size the transform shrinks to, either way round
    # (EXIF may turn it): crop covers [110, 147], 1/4 keeps 384 x 512; the others fit [96, 128],
    # 1/8 would keep 192 x 256 but not 256 x 192 turned
    assert reduced.shape == (384, 512, 3)
    as_input = [transform(torch.from_numpy(a).permute(2, 0, 1)).float() for a in (full, reduced)]
    assert as_input[0].shape == as_input[1].shape == (3, 96, 128)
    assert (as_input[0] - as_input[1]).abs().mean() < 1.5  # grey levels: less than re-saving the JPEG changes


def test_reduced_decoding_only_where_it_lands_on_the_same_pixels(tmp_path):
    photo = _photo(1536, 2048)
    min_size = [64, 64]
    odd = write_image(tmp_path / "odd.jpg", photo[:1535])  # a side not divisible: the crop would move
    png = write_image(tmp_path / "large.png", photo)  # OpenCV would shrink a PNG without antialiasing
    small = write_image(tmp_path / "small.jpg", photo[:200, :256])  # under 2x min_size at every factor
    for path, shape in ((odd, (1535, 2048, 3)), (png, (1536, 2048, 3)), (small, (200, 256, 3))):
        assert read_rgb(path, min_size).shape == shape, path.name
    assert jpeg_reduction(2048, 1536, [64, 64]) == 8
    assert jpeg_reduction(2048, 1536, [97, 97]) == 4
    assert jpeg_reduction(2048, 1536, [400, 400]) == 1


def test_a_rotated_jpeg_is_reduced_only_by_what_holds_either_way_round(tmp_path):
    """EXIF orientation 6 (a quarter turn): the file is 2048 x 1024, the picture 1024 x 2048.
    OpenCV turns it while decoding; the factor is chosen so that it holds in both orientations."""
    path = _turned_jpeg(tmp_path / "rotated.jpg", 1024, 2048)
    assert read_rgb(path).shape == (2048, 1024, 3)
    # [400, 100] would allow /2 as displayed (1024 x 512) but not as stored (512 rows < 800): full
    assert read_rgb(path, [400, 100]).shape == (2048, 1024, 3)
    reduced = read_rgb(path, [100, 100])  # /4 either way round
    assert reduced.shape == (512, 256, 3)
    assert np.abs(cv2_area(read_rgb(path), reduced.shape[:2]).astype(float) - reduced).mean() < 4  # turned alike


def test_a_corrupt_exif_block_is_read_quietly_and_still_reduced(tmp_path):
    """Pillow parses the EXIF block on open and warned "Corrupt EXIF data" with its own source
    line; the pixels are fine. Checked in a fresh process, as pytest records every warning."""
    path = _turned_jpeg(tmp_path / "bad exif é.jpg", 1536, 2048)
    data = bytearray(path.read_bytes())
    start = data.find(b"Exif\x00\x00") + 6
    data[start:start + 8] = b"MM\x00\x2a\xff\xff\xff\xff"  # the first IFD's offset points past the end
    path.write_bytes(bytes(data))
    code = ("import sys; from utils.data import read_rgb; "
            "print(read_rgb(sys.argv[1]).shape, read_rgb(sys.argv[1], [64, 64]).shape)")
    result = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1536, 2048, 3) (192, 256, 3)"
    assert result.stderr == ""


def cv2_area(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)


def test_training_and_evaluation_decode_reduced(tmp_path):
    """The eval dataset, infer.py's PathDataset and the eval cache decode the same reduced image;
    training's random crop decodes as small as its box allows and gives the model input size."""
    path = str(write_image(tmp_path / "photo.jpg", _photo(1024, 1024)))
    preprocess = Preprocess(input_size=[64, 64])
    train = ImageDataset([(path, 0)], build_train_transform(preprocess))
    evaluation = ImageDataset([(path, 0)], build_eval_transform(preprocess))
    decoded = []
    assert train.transform.read(path, _recording(decoded)).shape == (3, 64, 64)
    assert decoded[0][0] in (128, 256, 512)  # /2 at least: every box keeps 2 x 64 px at 1/2
    assert train.load(0).shape == train[0][0].shape == (3, 64, 64)
    assert evaluation.load(0).shape == (3, 64, 64)
    with torch.random.fork_rng():  # the eval transform draws nothing: the source size is fixed
        assert read_rgb(path, evaluation.transform.source_min_size).shape == (256, 256, 3)  # /4: 256 >= 2 x 73
    image, _, error = PathDataset([path], preprocess)[0]
    assert error == "" and torch.equal(image, evaluation[0][0])


def _recording(shapes: list) -> Callable:
    """read_rgb, noting the shape of every image it decodes."""
    def reader(path, min_size=None):
        array = read_rgb(path, min_size)
        shapes.append(array.shape)
        return array
    return reader


def _crops(transform, path, seeds, reader=read_rgb) -> list[torch.Tensor]:
    """The training crop of `path` drawn with each seed, read by `transform.read` or in full then cropped."""
    crops = []
    for seed in seeds:
        torch.manual_seed(seed)
        if reader is None:
            crops.append(transform(torch.from_numpy(read_rgb(path)).permute(2, 0, 1)).float())
        else:
            crops.append(transform.read(path, reader).float())
    return crops


@pytest.mark.parametrize("size", [[64, 64], [96, 160]])
def test_training_crops_of_a_reduced_decode_match_the_full_decode(tmp_path, size):
    path = str(write_image(tmp_path / "photo é.jpg", _photo(1536, 2048)))
    factors = _compare_crops_with_the_full_decode(path, size)
    assert sum(factor > 1 for factor in factors) >= 10  # most boxes keep 2x the output at 1/2 or less


def _compare_crops_with_the_full_decode(path: str, size: list[int], seeds=range(12)) -> list[int]:
    """The box is drawn from the header with the random numbers torchvision would draw on the
    decoded image and scaled to the reduced image, moving by at most half of its pixels (a box as
    random). Cropped from a full decode, that same region gives the same pixels to a grey level.
    Returns the reduction factor of each seed."""
    transform = build_train_transform(Preprocess(input_size=size), hflip=0)
    full = torch.from_numpy(read_rgb(path)).permute(2, 0, 1)
    factors = []
    for seed in seeds:
        decoded: list = []
        (reduced,) = _crops(transform, path, [seed], _recording(decoded))
        factor = full.shape[1] // decoded[0][0]
        factors.append(factor)
        torch.manual_seed(seed)
        box = transform.transforms[0].draw_box(*full.shape[-2:])
        region = [side * factor for side in scale_box(box, [1 / factor] * 2, decoded[0][:2])]
        drawn = [box["top"], box["left"], box["height"], box["width"]]
        assert all(abs(a - b) <= factor / 2 for a, b in zip(region, drawn)), (region, drawn)
        expected = F.resized_crop(full, *region, size, antialias=True).float()
        assert reduced.shape == (3, *size)
        assert (reduced - expected).abs().mean() < 1.5, seed
    return factors


def test_training_crops_of_small_jpegs_and_pngs_are_torchvisions_own(tmp_path):
    """Where no reduction applies, reading first changes nothing: the same pixels as
    torchvision's RandomResizedCrop on the decoded image, seed for seed."""
    photo = _photo(150, 200)  # no box keeps 2 x 64 px at 1/2
    transform = build_train_transform(Preprocess(input_size=[64, 64]))
    for path in (write_image(tmp_path / "small.jpg", photo), write_image(tmp_path / "large.png", _photo(1536, 2048))):
        decoded: list = []
        read = _crops(transform, str(path), range(5), _recording(decoded))
        assert all(shape[:2] == cv2.imread(str(path)).shape[:2] for shape in decoded)
        assert all(torch.equal(a, b) for a, b in zip(read, _crops(transform, str(path), range(5), reader=None)))


def test_training_crops_of_a_rotated_jpeg_are_drawn_on_the_picture_as_shown(tmp_path):
    """EXIF orientation 6: the box is drawn for the turned picture (1024 wide, 2048 high), as
    torchvision draws it on OpenCV's turned decode."""
    path = _turned_jpeg(tmp_path / "rotated.jpg", 1024, 2048)
    assert read_rgb(path).shape == (2048, 1024, 3)
    factors = _compare_crops_with_the_full_decode(str(path), [96, 64], seeds=range(8))
    assert sum(factor > 1 for factor in factors) >= 6


def test_a_training_crop_survives_a_decode_turned_unlike_its_header(tmp_path):
    """Should Pillow and OpenCV ever read a broken EXIF orientation differently, the box drawn from
    the header no longer fits the decoded image: it is drawn again on the image itself."""
    path = str(write_image(tmp_path / "photo.jpg", _photo(1024, 2048)))

    def turned(path, min_size=None):
        return np.ascontiguousarray(read_rgb(path, min_size).transpose(1, 0, 2))

    transform = build_train_transform(Preprocess(input_size=[64, 64]))
    assert transform.read(path, turned).shape == (3, 64, 64)


def test_letterbox_training_decodes_large_jpegs_reduced(tmp_path):
    path = str(write_image(tmp_path / "photo.jpg", _photo(1536, 2048)))
    transform = build_train_transform(Preprocess(input_size=[64, 64], resize_mode="letterbox"))
    decoded: list = []
    assert transform.read(path, _recording(decoded)).shape == (3, 64, 64)
    assert decoded == [(192, 256, 3)]  # /8 keeps 2 x 64 either way round
