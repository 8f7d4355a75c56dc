"""A whole training run written the way torchvision's reference scripts do it, for bench_train.py's
whole-run row: ImageFolder + Pillow + transforms v1 (normalised float tensors made in the workers),
NCHW, AdamW with a per-iteration cosine schedule (train.py's defaults), validation after every
epoch, best and last weights saved with torch.save, as a user would run it:

    python bench/reference_train.py DATASET --model resnet18 --size 64 --epochs 15 --batch 32 --workers 2

Prints one line per epoch, "epoch N val_acc A", as soon as the epoch ends (the benchmark times
these lines), and writes nothing but OUT/best.pth and OUT/last.pth. The model comes from this
repository's registry so that it is the same network as train.py's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
import torchvision.transforms as T1

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.registry import create_model  # noqa: E402  (after the path is set)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def loaders(root: Path, size: int, batch: int, workers: int) -> tuple:
    normalize = T1.Normalize(MEAN, STD)
    train_transform = T1.Compose([T1.RandomResizedCrop(size, scale=(0.08, 1.0)), T1.RandomHorizontalFlip(),
                                  T1.ToTensor(), normalize])
    val_transform = T1.Compose([T1.Resize(int(size / 0.875)), T1.CenterCrop(size), T1.ToTensor(), normalize])
    train_set = torchvision.datasets.ImageFolder(str(root / "train"), train_transform)
    val_set = torchvision.datasets.ImageFolder(str(root / "val"), val_transform)
    train = torch.utils.data.DataLoader(train_set, batch_size=batch, shuffle=True, num_workers=workers)
    val = torch.utils.data.DataLoader(val_set, batch_size=batch, shuffle=False, num_workers=workers)
    return train, val, len(train_set.classes)


def evaluate(model: nn.Module, loader) -> float:
    model.eval()
    correct = seen = 0
    with torch.inference_mode():
        for images, targets in loader:
            correct += int((model(images).argmax(1) == targets).sum())
            seen += targets.numel()
    return correct / max(1, seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    train, val, classes = loaders(args.dataset, args.size, args.batch, args.workers)
    model = create_model(args.model, classes, (args.size, args.size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(train))
    criterion = nn.CrossEntropyLoss()
    args.out.mkdir(parents=True, exist_ok=True)
    best = -1.0
    for epoch in range(1, args.epochs + 1):
        model.train()
        for images, targets in train:
            loss = criterion(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        accuracy = evaluate(model, val)
        if accuracy > best:
            best = accuracy
            torch.save(model.state_dict(), args.out / "best.pth")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
                   args.out / "last.pth")
        print(f"epoch {epoch} val_acc {accuracy:.6f}", flush=True)


if __name__ == "__main__":
    main()
