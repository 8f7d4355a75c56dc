"""The fast path: decode-once caches, persistent workers, the benchmarks that measure them.

No timing is asserted here (speed claims live in bench/, with a baseline measured in the same
run); these tests check that the fast path changes nothing but speed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import make_class_tree, run_script, write_image

from utils.cache import DiskCache, RamCache, cache_datasets, resolve_cache_dir
from utils.data import ImageDataset, ImageReadError, create_dataloader
from utils.errors import UsageError
from utils.transforms import Preprocess, build_cache_transform, build_eval_transform, build_train_transform

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def mixed_images(tmp_path_factory) -> list[tuple[str, int]]:
    """Real files of awkward shapes: landscape and portrait JPEGs, a gray PNG smaller than the input."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    paths = []
    # 384 x 512: sides divisible by 8, so evaluation decodes it at half size (utils.data.jpeg_reduction)
    for i, (height, width) in enumerate([(375, 500), (500, 375), (120, 90), (31, 47), (384, 512)]):
        image = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 3)
        paths.append(write_image(root / f"photo é {i}.jpg", image))
    gray = write_image(root / "gray.png", rng.integers(0, 256, (20, 30), dtype=np.uint8))
    return [(str(p), i % 2) for i, p in enumerate([*paths, gray])]


def _all(dataset: ImageDataset) -> list[torch.Tensor]:
    return [dataset[i][0] for i in range(len(dataset))]


@pytest.mark.parametrize("mode", ["crop", "letterbox", "stretch"])
def test_cache_gives_the_same_eval_tensors_as_no_cache(mixed_images, tmp_path, mode):
    preprocess = Preprocess(input_size=[48, 40], resize_mode=mode)
    plain = ImageDataset(mixed_images, build_eval_transform(preprocess))
    expected = _all(plain)
    for cache_mode in ("ram", "disk"):
        train_set = ImageDataset(mixed_images, build_train_transform(preprocess))
        eval_set = ImageDataset(mixed_images, build_eval_transform(preprocess))
        cache_datasets(cache_mode, preprocess, train_set, [eval_set], tmp_path / "cache")
        first, second = _all(eval_set), _all(eval_set)  # disk: written, then read back from the .npy
        for i, image in enumerate(expected):
            assert torch.equal(first[i], image), (cache_mode, mixed_images[i][0])
            assert torch.equal(second[i], image), (cache_mode, mixed_images[i][0])
        assert [t.shape for t in _all(train_set)] == [(3, 48, 40)] * len(mixed_images)


def test_train_cache_shrinks_keeping_aspect_and_never_enlarges():
    shrink = build_cache_transform(Preprocess(input_size=[64, 64]))
    assert shrink(torch.zeros(3, 375, 500, dtype=torch.uint8)).shape == (3, 80, 107)  # short side 64 x 1.25
    assert shrink(torch.zeros(3, 500, 375, dtype=torch.uint8)).shape == (3, 107, 80)
    assert shrink(torch.zeros(3, 70, 90, dtype=torch.uint8)).shape == (3, 70, 90)  # already small: kept


def test_disk_cache_stays_outside_the_dataset_and_follows_edits(tmp_path):
    dataset_dir = tmp_path / "data"
    path = write_image(dataset_dir / "a.png", np.full((30, 30, 3), 10, np.uint8))
    before = sorted(p.name for p in dataset_dir.rglob("*"))
    cache = DiskCache([(str(path), 0)], build_eval_transform(Preprocess(input_size=[8, 8])), tmp_path / "c", "eval")
    assert int(cache.get(0).float().mean()) == 10
    assert len(list((tmp_path / "c").rglob("*.npy"))) == 1
    write_image(path, np.full((30, 30, 3), 200, np.uint8))  # the user edits the image: new size/mtime
    os.utime(path, ns=(1, 1))
    assert int(cache.get(0).float().mean()) == 200
    assert sorted(p.name for p in dataset_dir.rglob("*")) == before
    with pytest.raises(UsageError, match="--cache_dir .* inside the dataset"):
        resolve_cache_dir("disk", str(dataset_dir / "cache"), "logs", dataset_dir)
    with pytest.raises(UsageError, match="--log_dir"):
        resolve_cache_dir("disk", None, dataset_dir / "logs", dataset_dir)
    assert resolve_cache_dir("ram", None, dataset_dir, dataset_dir) is None
    assert resolve_cache_dir("disk", None, tmp_path / "logs", dataset_dir) == tmp_path / "logs" / ".cache" / "images"


def test_train_refuses_a_cache_dir_inside_the_dataset_before_writing_anything(tmp_path):
    data = make_class_tree(tmp_path / "ds", {"a": 2, "b": 2}, size=16)
    result = run_script("train.py", "--dataset_path", str(data), "--cache", "disk", "--cache_dir", str(data / "cache"),
                        "--log_dir", str(tmp_path / "logs"), "--epochs", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --cache_dir") and "inside the dataset" in result.stderr
    assert not (tmp_path / "logs").exists() and not (data / "cache").exists()


def test_ram_cache_refuses_more_than_its_budget_and_keeps_unreadable_files_out(mixed_images, tmp_path):
    prepare = build_cache_transform(Preprocess(input_size=[32, 32]))
    with pytest.raises(UsageError, match="--cache ram.*--cache disk"):
        RamCache.fill(mixed_images, prepare, budget_bytes=1000)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    cache = RamCache.fill([(str(broken), 0), *mixed_images], prepare, workers=2)
    with pytest.raises(ImageReadError, match="broken.jpg"):
        cache.get(0)
    dataset = ImageDataset([(str(broken), 0), *mixed_images], build_train_transform(Preprocess(input_size=[32, 32])),
                           cache=cache)
    with pytest.warns(UserWarning, match="broken.jpg"):
        image, label = dataset[0]  # the next readable sample stands in, as without a cache
    assert image.shape == (3, 32, 32) and label == mixed_images[0][1]


@pytest.mark.skipif(os.name != "posix", reason="needs POSIX resource limits")
def test_ram_cache_fill_does_not_keep_a_file_descriptor_per_image(tmp_path):
    """Tensors from workers each hold a shared-memory descriptor while alive; 300 images must fill
    under a 150-descriptor limit (a real dataset has 100,000 images and a 1024 limit)."""
    for i in range(300):
        write_image(tmp_path / f"{i}.png", np.full((6, 6, 3), i % 256, np.uint8))
    code = (
        "import resource, sys; from pathlib import Path\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (150, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "from utils.cache import RamCache; from utils.transforms import Preprocess, build_cache_transform\n"
        f"samples = [(str(Path(r'{tmp_path}') / f'{{i}}.png'), 0) for i in range(300)]\n"
        "cache = RamCache.fill(samples, build_cache_transform(Preprocess(input_size=[6, 6])), workers=2)\n"
        "print([int(cache.get(i)[0, 0, 0]) for i in (0, 7, 299)])\n"
    )
    result = run_script("-c", code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[0, 7, 43]"


def test_ram_cache_reaches_worker_processes_and_workers_persist_unless_deterministic(mixed_images):
    preprocess = Preprocess(input_size=[16, 16])
    train_set = ImageDataset(mixed_images, build_train_transform(preprocess))
    eval_set = ImageDataset(mixed_images, build_eval_transform(preprocess))
    expected = torch.stack(_all(ImageDataset(mixed_images, build_eval_transform(preprocess))))
    cache_datasets("ram", preprocess, train_set, [eval_set], workers=2)
    loader = create_dataloader(eval_set, 8, False, 2, torch.device("cpu"))
    assert loader.persistent_workers
    for _ in range(2):  # second epoch: the same (persistent) workers
        (images, _), = list(loader)
        assert torch.equal(images, expected)
    assert not create_dataloader(eval_set, 8, False, 0, torch.device("cpu")).persistent_workers
    torch.use_deterministic_algorithms(True)
    try:
        assert not create_dataloader(train_set, 8, True, 2, torch.device("cpu")).persistent_workers
    finally:
        torch.use_deterministic_algorithms(False)


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pth", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_resume_with_workers_is_exact_under_deterministic(tmp_path):
    """Workers (2, re-seeded from the per-epoch generator): 1 epoch + resume == 2 epochs in one go.

    A constant lr makes a 1-epoch run's state equal to epoch 1 of a 2-epoch run; its last.pth is
    then extended to 2 epochs, as if the run had been started with --epochs 2 and stopped."""
    data = make_class_tree(tmp_path / "ds", {"a": 12, "b": 12}, size=24)
    common = ["--dataset_path", str(data), "--model", "resnet18", "--input_shape", "16", "--batch_size", "8",
              "--lr_schedule_type", "constant", "--workers", "2", "--deterministic", "--device", "cpu", "--quiet"]
    for epochs in ("2", "1"):
        result = run_script("train.py", *common, "--epochs", epochs, "--log_dir", str(tmp_path / epochs))
        assert result.returncode == 0, result.stderr
    (whole,), (split,) = ([p.parent for p in (tmp_path / epochs).glob("*/last.pth")] for epochs in ("2", "1"))
    checkpoint = torch.load(split / "last.pth", weights_only=True)
    checkpoint["args"]["epochs"] = 2
    torch.save(checkpoint, split / "last.pth")
    resumed = run_script("train.py", "--resume_training", str(split / "last.pth"))
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed from" in resumed.stdout or "Resumed from" in (split / "train.log").read_text(encoding="utf-8")
    reference, continued = _weights(whole), _weights(split)
    assert all(torch.equal(reference[k], continued[k]) for k in reference)


@pytest.mark.slow
def test_digits_demo_reaches_the_same_accuracy_with_the_ram_cache(digits_root, trained_run, tmp_path):
    """'No accuracy change': trained_run (no cache, no workers) vs --cache ram with 2 persistent workers."""
    result = run_script("train.py", "--dataset_path", str(digits_root), "--model", "resnet18", "--input_shape", "32",
                        "--epochs", "2", "--hflip", "0", "--crop_scale", "0.5", "--log_dir", str(tmp_path),
                        "--workers", "2", "--cache", "ram")
    assert result.returncode == 0, result.stderr
    assert "Cache: ram" in result.stdout
    (cached_run,) = [p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]  # not .cache
    plain = json.loads((trained_run / "test_metrics.json").read_text())["top1"]
    cached = json.loads((cached_run / "test_metrics.json").read_text())["top1"]
    assert plain > 0.8 and cached > 0.8, (plain, cached)
    assert abs(plain - cached) <= 0.05, (plain, cached)


def _bench(script: str, timeout: int = 300) -> str:
    result = run_script(str(BENCH / script), "--quick", timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_bench_train_quick_prints_its_table_and_targets():
    out = _bench("bench_train.py", timeout=600)  # with the whole-run row: four short runs of train.py and the reference
    assert "| data" in out and "(b)/(c)" in out and "(b+)/(a)" in out
    assert "| photos | resnet18 | 64" in out and "| digits | resnet18 | 32" in out
    assert "Target ours >= 1.3x reference" in out and "matmul peak" in out
    assert "| 64 px JPEGs" in out and "| 500x375 photos" in out and "reference/train.py" in out
    assert "Goal train.py wall <= the reference's" in out and "lscpu model:" in out
    assert "for this job on this machine even with the epochs at the ceiling" in out


@pytest.mark.slow
def test_bench_data_quick_prints_readers_and_pipelines():
    out = _bench("bench_data.py")
    for name in ("OpenCV", "Pillow", "torchvision.io", "v1 PIL + Normalize (reference)", "ours train, --cache ram"):
        assert name in out
    assert "Fastest reader:" in out and "pipeline at 224 px" in out


@pytest.mark.slow
def test_bench_reduced_decode_quick_prints_speed_and_prediction_agreement(trained_run, digits_root):
    result = run_script(str(BENCH / "bench_reduced_decode.py"), "--quick", "--weights", str(trained_run / "best.pth"),
                        "--data", str(digits_root / "val"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "CPU:" in out and "| 12 MP (4032x3024) | " in out and "| 1/4 " in out and "| 1/2 " in out
    training = out[out.index("training input"):]  # its table: the share of each factor the boxes allowed
    assert "| 12 MP (4032x3024) | 1/" in training and "%" in training
    assert "top-1 agreement full vs reduced: 1.0000" in out  # digits are small: nothing was decoded smaller
    assert "decoded smaller: 0 " in out and "accuracy, reduced decode:" in out


@pytest.mark.slow
def test_bench_ui_prints_stalls_and_the_time_of_a_key_on_photos(trained_run):
    result = run_script(str(BENCH / "bench_ui.py"), "--weights", str(trained_run / "best.pth"), "--images", "40",
                        "--photos", "3", "--photo_size", "1536", "2048", "--rounds", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "CPU:" in out and "worker run" in out and "GUI thread (naive)" in out
    assert "Next through 3 photos (" in out and "1536" in out and "2048" in out
    rows = {line.split("  ")[0]: line.split() for line in out.splitlines() if line.startswith(("in full", "for the"))}
    assert rows["in full (before)"][3] == "4" and rows["for the screen"][3] == "4", rows  # 2 keys, 2 rounds
    assert "median key, in full / for the screen:" in out
