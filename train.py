"""Train an image classifier on a class-folder dataset.

    python train.py                                   # the built-in demo (handwritten digits)
    python train.py --model resnet18 --dataset_path data/flowers --epochs 30
    python train.py --resume_training logs/<run>/last.pth

Read top to bottom: arguments -> data -> model -> optimiser -> the epoch loop -> final report.
Everything a run produces goes to logs/<YYYYmmdd-HHMMSS>_<model>/ (see README).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import random
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from models.finetune import (
    format_load_report,
    head_parameter_names,
    load_matching_weights,
    set_backbone_trainable,
    train_mode,
)
from models.pretrained import (
    DEFAULT_WEIGHTS_DIR,
    MIRROR_ENV,
    resolve_pretrained,
    weights_build_kwargs,
)
from models.registry import check_input_size, check_model_name, create_model, format_model_list
from utils.cache import CACHE_MODES, cache_datasets, resolve_cache_dir
from utils.calibration import fit_temperature, suggested_min_confidence
from utils.checkpoint import (
    BEST_METRICS,
    CheckpointSaver,
    capture_rng_state,
    load_checkpoint,
    remove_stale_temp_files,
    restore_rng_state,
    unwrap_model,
)
from utils.cli import run_cli
from utils.data import DatasetScan, ImageDataset, create_dataloader, default_workers, scan_dataset
from utils.demo import use_digits_demo
from utils.device import amp_dtype, default_channels_last, describe_device
from utils.distributed import (
    RESUME_OVERRIDABLE_FLAGS,
    add_distributed_args,
    begin_epoch,
    check_same_on_all_ranks,
    describe_peer_failure,
    describe_scale,
    eval_sampler,
    follow_unfreeze,
    init_distributed,
    is_main_process,
    on_main_process,
    scaled_lr,
    train_sampler,
    wrap_for_training,
)
from utils.ema import DEFAULT_EMA_DECAY, ModelEma
from utils.engine import NonFiniteLossError, StepSettings, evaluate, train_one_epoch
from utils.errors import UsageError
from utils.files import check_output_dir
from utils.leakage import check_leakage, hash_cache_path
from utils.logger import (
    History,
    TensorBoard,
    discard_unfinished_run,
    new_run_dir,
    newest_run_checkpoint,
    setup_logging,
    write_json,
)
from utils.losses import LOSSES, create_criterion
from utils.memory import keep_freed_memory
from utils.metrics import (
    calibration_error,
    format_metrics,
    format_per_class,
    per_class_rows,
    plot_confusion_matrix,
    plot_curves,
    write_per_class_csv,
)
from utils.optim import OPTIMIZERS, SCHEDULES, create_optimizer, create_scheduler, restore_schedule
from utils.transforms import (
    AUGMENTS,
    DEFAULT_INPUT_SIDE,
    RESIZE_MODES,
    Preprocess,
    build_batch_mix,
    build_eval_transform,
    build_train_transform,
    parse_input_shape,
)

# Flags a resumed run may change; everything else comes from the checkpoint so the run continues exactly.
RESUME_OVERRIDABLE = ("device", "workers", "log_dir", "tensorboard", "quiet", "resume_training", "resume", "no_audit")
RESUME_OVERRIDABLE += RESUME_OVERRIDABLE_FLAGS
EVAL_CRITERION = nn.CrossEntropyLoss()  # validation loss: plain, whatever weights or smoothing training uses


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train an image classifier on DATASET/{train,val[,test]}/<class>/ images.",
                                     add_help=add_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(parser.add_argument_group("data"))
    add_model_args(parser.add_argument_group("model"))
    add_optimisation_args(parser.add_argument_group("optimisation"))
    add_run_args(parser.add_argument_group("speed"), parser.add_argument_group("run, checkpoints and logs"))
    add_distributed_args(parser)
    return parser


def add_data_args(data: argparse._ArgumentGroup) -> None:
    data.add_argument("--dataset_path", "--dataset-path", "--data", default=None,
                      help="dataset folder; without it, the built-in digits demo in data/digits is built and used")
    data.add_argument("--val_ratio", "--val-ratio", type=float, default=0.0,
                      help="split an unsplit DATASET/<class>/ tree in memory: this share goes to validation")
    data.add_argument("--test_ratio", "--test-ratio", type=float, default=0.0,
                      help="with --val_ratio: this share goes to a test split")
    data.add_argument("--input_shape", "--input-shape", type=int, nargs="+", default=None, metavar="SIZE",
                      help=f"model input H [W]; default {DEFAULT_INPUT_SIDE} (32 for the digits demo)")
    data.add_argument("--resize_mode", "--resize-mode", choices=RESIZE_MODES, default="crop",
                      help="crop: resize + centre crop; letterbox: keep aspect ratio and pad; stretch: resize to shape")
    data.add_argument("--augment", choices=AUGMENTS, default="basic",
                      help="training augmentation: none, basic (random resized crop + flip), or basic + a policy")
    data.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability (0 for text or digits)")
    data.add_argument("--color_jitter", "--color-jitter", type=float, default=0.0,
                      help="brightness/contrast/saturation jitter strength, e.g. 0.2")
    data.add_argument("--crop_scale", "--crop-scale", type=float, default=0.08,
                      help="smallest area share a random resized crop may keep")
    data.add_argument("--random_erase", "--random-erase", type=float, default=0.0, metavar="P",
                      help="erase a random rectangle of a training image with this probability, e.g. 0.25")
    data.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                      help="MixUp training batches with this Beta alpha, e.g. 0.2 (0: off)")
    data.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA",
                      help="CutMix training batches with this Beta alpha, e.g. 1.0 (0: off; with --mixup: one or "
                           "the other per batch)")
    data.add_argument("--sampler", choices=("shuffle", "balanced"), default="shuffle",
                      help="balanced: draw each class equally often (imbalanced data), with replacement")
    data.add_argument("--num_classes", "--num-classes", type=int, default=None,
                      help="optional check: the dataset decides the classes; a different value is an error")
    data.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default: by data size and cores)")
    data.add_argument("--cache", choices=CACHE_MODES, default="none",
                      help="decode and resize each image once: ram (the decoded dataset must fit in half the free "
                           "memory) or disk (.npy files under --cache_dir); see README 'Speed'")
    data.add_argument("--cache_dir", "--cache-dir", default=None,
                      help="folder for --cache disk (default: LOG_DIR/.cache/images; never inside the dataset)")
    data.add_argument("--no_audit", "--no-audit", action="store_true",
                      help="skip the leakage check (the same picture in two splits: exact and near copies) of "
                           "the dataset report; its hashes are cached in LOG_DIR/.cache")


def add_model_args(model: argparse._ArgumentGroup) -> None:
    model.add_argument("--model", default="resnet18", help="registry name (see --list_models)")
    model.add_argument("--list_models", "--list-models", action="store_true", help="print the available models and exit")
    model.add_argument("--pretrained", nargs="?", const="DEFAULT", default=None, metavar="WEIGHTS",
                       help="start from ImageNet weights (torchvision's DEFAULT, a variant such as IMAGENET1K_V1, "
                            "or a .pth file); the head is re-created for the dataset's classes")
    model.add_argument("--weights", default=None,
                       help="start from this checkpoint or bare state_dict (fine-tuning); layers that do not fit are reported")
    model.add_argument("--weights_dir", "--weights-dir", default=str(DEFAULT_WEIGHTS_DIR),
                       help="where downloaded ImageNet weights are cached")
    model.add_argument("--weights_mirror", "--weights-mirror", default=None,
                       help=f"base URL of a mirror of download.pytorch.org (or env {MIRROR_ENV})")
    model.add_argument("--freeze_backbone", "--freeze-backbone", action="store_true",
                       help="train only the classifier head (linear probe)")
    model.add_argument("--unfreeze_epoch", "--unfreeze-epoch", type=int, default=0,
                       help="with --freeze_backbone: train the whole model from this epoch on (0: never)")


def add_optimisation_args(optim: argparse._ArgumentGroup) -> None:
    optim.add_argument("--epochs", type=int, default=None, help="default 30 (10 for the digits demo)")
    optim.add_argument("--batch_size", "--batch-size", type=int, default=32, help="images per batch")
    optim.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    optim.add_argument("--optimizer_type", "--optimizer-type", choices=OPTIMIZERS, default="adamw",
                       help="sgd (Nesterov momentum), adam or adamw")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (Nesterov)")
    optim.add_argument("--weight_decay", "--weight-decay", type=float, default=0.01,
                       help="weight decay (not applied to norm layers and biases)")
    optim.add_argument("--lr_schedule_type", "--lr-schedule-type", choices=SCHEDULES, default="cos",
                       help="per-iteration schedule; warmup = linear warmup then cosine")
    optim.add_argument("--warmup_epochs", "--warmup-epochs", type=float, default=0.0,
                       help="linear warmup length in epochs (any schedule; 'warmup' uses 1 when 0)")
    optim.add_argument("--step_size", "--step-size", type=int, default=30, help="step schedule: epochs between decays")
    optim.add_argument("--milestones", type=int, nargs="+", default=[], help="multistep schedule: epochs to decay at")
    optim.add_argument("--gamma", type=float, default=0.1, help="step/multistep decay factor")
    optim.add_argument("--label_smoothing", "--label-smoothing", type=float, default=0.0,
                       help="cross-entropy label smoothing, e.g. 0.1")
    optim.add_argument("--class_weights", "--class-weights", choices=("none", "auto"), default="none",
                       help="auto: weight the loss by inverse class frequency (imbalanced data)")
    optim.add_argument("--loss", choices=LOSSES, default="ce", help="ce: cross-entropy; focal: focal loss")
    optim.add_argument("--focal_gamma", "--focal-gamma", type=float, default=2.0,
                       help="--loss focal: how much less easy examples weigh (0 = cross-entropy)")
    optim.add_argument("--ema", type=float, nargs="?", const=DEFAULT_EMA_DECAY, default=None, metavar="DECAY",
                       help=f"keep an EMA of the weights (decay {DEFAULT_EMA_DECAY} when given without a value); "
                            "validation, best.pth and the final report use it")
    optim.add_argument("--grad_clip", "--grad-clip", type=float, default=0.0, help="clip gradient norm (0: off)")
    optim.add_argument("--accum_steps", "--accum-steps", type=int, default=1,
                       help="accumulate gradients over this many batches per optimizer step")


def add_run_args(speed: argparse._ArgumentGroup, run: argparse._ArgumentGroup) -> None:
    speed.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    speed.add_argument("--amp", action="store_true", help="mixed precision (fp16/bf16 on GPU; bf16 only on CPUs that have it)")
    speed.add_argument("--channels_last", "--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="NHWC memory layout (default: on for the CPU at 64 px and up, where it is faster; off elsewhere)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model (about a minute of compiling)")
    run.add_argument("--log_dir", "--log-dir", default="logs", help="runs go to LOG_DIR/<time>_<model>/")
    run.add_argument("--freq", type=int, default=0, help="also save epoch_<N>.pth every FREQ epochs (0: never)")
    run.add_argument("--best_metric", "--best-metric", choices=BEST_METRICS, default="top1",
                     help="validation metric that picks best.pth (ties broken by lower loss)")
    run.add_argument("--patience", type=int, default=0, metavar="N",
                     help="stop early when --best_metric has not improved for N epochs (0: never)")
    run.add_argument("--resume_training", "--resume-training", default=None,
                     help="continue a run from its last.pth (same run folder); 'auto' = newest run in --log_dir")
    run.add_argument("--resume", dest="resume_training", help="alias of --resume_training")
    run.add_argument("--seed", type=int, default=0, help="seeds shuffling, augmentation and initialisation")
    run.add_argument("--deterministic", action="store_true", help="deterministic kernels (exact resume; slower)")
    run.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (needs tensorboard)")
    run.add_argument("--quiet", action="store_true", help="no console output (train.log still written)")


def main(argv: list[str] | None = None) -> dict:
    """Train (see the module docstring); a new run that stops before its first epoch ends leaves
    no half-made run folder behind (utils.logger.discard_unfinished_run)."""
    new_run_folders: list[Path] = []  # run_training adds the run folder it creates (rank 0, new runs only)
    try:
        with stop_on_sigterm():
            return run_training(argv, new_run_folders)
    except BaseException as error:
        for run_dir in new_run_folders:
            note = discard_unfinished_run(run_dir, f"{type(error).__name__}: {error}",
                                          interrupted=isinstance(error, KeyboardInterrupt))
            if note:
                print(note, file=sys.stderr)
        raise


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (`kill`, a job scheduler, torchrun stopping the other ranks of a failed job) stops the
    run as Ctrl-C does instead of ending the process on the spot: the checkpoint being written in
    the background is finished, the resume command printed, a run without a finished epoch removed."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_training(argv: list[str] | None, new_run_folders: list[Path]) -> dict:
    """Everything from the flags to the final report; returns the final metrics per split."""
    args = get_args_parser().parse_args(argv)
    if args.list_models:
        print(format_model_list())
        return {}
    check_args(args)
    resume = resolve_resume(args, argv)  # a resumed run takes the checkpoint's settings, in one step
    seed_everything(args.seed, args.deterministic)
    device = init_distributed(args.device, args.dist_backend, args.dist_timeout, args.sync_bn)  # torchrun: join (left at exit)
    main_process = is_main_process()  # under torchrun only rank 0 writes files and prints
    on_main_process(check_run_folder_writable, args, resume is not None)  # in seconds, not after the data scan

    # ---- data and where the run starts from -------------------------------------------------
    if args.dataset_path is None:
        use_digits_demo(args, announce=main_process and not args.quiet)
    args.epochs = args.epochs or 30
    cache_dir = resolve_cache_dir(args.cache, args.cache_dir, args.log_dir, args.dataset_path)  # before any write
    scan = scan_dataset(args.dataset_path, args.val_ratio, args.test_ratio, args.seed,  # header checks cached
                        check_cache=hash_cache_path(args.log_dir, args.dataset_path) if main_process else None)
    class_names = check_dataset(args, scan)  # the same on every rank; two classes or more; --num_classes agrees
    check_model_name(args.model)
    start = starting_point(args, resume, class_names)  # preprocessing and weights: the checkpoint's when resuming
    check_input_size(args.model, start.preprocess.input_size)
    run_dir, log = open_run_folder(args, resume, scan, main_process, new_run_folders)
    train_loader, eval_loaders = make_loaders(args, scan, start.preprocess, device, cache_dir, log, main_process)

    # ---- model, loss, optimiser, schedule --------------------------------------------------------
    model = build_model(args, start, len(class_names), device, run_dir if main_process else None, log)
    train_model, eval_model = wrap_for_training(model, device, args.compile, args.sync_bn)  # DDP under torchrun
    criterion, optimizer, scheduler, scaler, settings = make_optimisation(args, model, scan, train_loader,
                                                                          start.preprocess, device, log)
    ema = make_ema(args, model, log)  # --ema: validation, best.pth and the final report use its weights

    # ---- checkpoints and history ------------------------------------------------------------
    # checkpoints are written in a background thread; leaving the `with` (at the end, on Ctrl-C or an
    # error) waits until the last one is on disk
    with CheckpointSaver(run_dir if main_process else None, run_record(args, class_names, start),
                         args.best_metric, args.freq) as saver:
        start_epoch, saver.best, history_rows = restore_training_state(
            resume, model, ema, optimizer, scheduler, scaler, scheduler_steps(args, train_loader), args, log) \
            if resume else (0, None, [])
        history = History(run_dir if main_process else None, history_rows)
        run = TrainingRun(args, run_dir, log, model, train_model, eval_model, ema, train_loader, eval_loaders,
                          criterion, optimizer, scheduler, scaler, settings, saver, history, class_names, device,
                          sys.stderr.isatty() and not args.quiet and main_process)
        if not resume:
            saver.save_start(model, run.training_state())  # Ctrl-C in epoch 1 is resumable too

        # ---- the epoch loop, then the best epoch on val and test --------------------------------
        stop_note = train_epochs(run, start_epoch)
        return final_report(run, stop_note)


@dataclass
class TrainingRun:
    """What the epoch loop works with, built by run_training."""

    args: argparse.Namespace
    run_dir: Path
    log: logging.Logger
    model: nn.Module  # the plain model: its weights are the ones trained and saved
    train_model: nn.Module  # `model`, or DDP / torch.compile around it
    eval_model: nn.Module
    ema: ModelEma | None
    train_loader: DataLoader
    eval_loaders: dict
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    settings: StepSettings
    saver: CheckpointSaver
    history: History
    class_names: list[str]
    device: torch.device
    show_progress: bool
    saved_epoch: int = 0  # the epoch last.pth holds (what a Ctrl-C message names)

    def training_state(self) -> dict:
        """What last.pth adds to a checkpoint so that the run can resume."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None, "rng": capture_rng_state(),
                "history": self.history.rows, "ema": self.ema.state_dict() if self.ema else None}

    def validated_model(self) -> nn.Module:
        """The weights validation judges and best.pth keeps: the EMA's under --ema."""
        return self.ema.module if self.ema else self.eval_model


def train_epochs(run: TrainingRun, start_epoch: int) -> str:
    """The epochs after `start_epoch`; returns the early-stop note ("" when the run went to the end)."""
    args, log = run.args, run.log
    stop_note = early_stop_note(args, run.saver.best, start_epoch)  # a resumed run that had stopped already
    if stop_note:
        log.info(f"Early stopping: the run {stop_note}; nothing left to train")
        return stop_note
    board = TensorBoard(run.run_dir) if args.tensorboard and is_main_process() else None
    run.saved_epoch = start_epoch
    try:
        for epoch in range(start_epoch + 1, args.epochs + 1):
            stop_note = train_epoch(run, epoch, board)
            if stop_note:
                log.info(f"Early stopping (--patience {args.patience}): {stop_note}")
                break
    except KeyboardInterrupt:
        log.info(f"\nInterrupted. {run.run_dir / 'last.pth'} holds epoch {run.saved_epoch}; continue with:\n"
                 f"  python train.py --resume_training {run.run_dir / 'last.pth'}")
        raise
    finally:
        if board:
            board.close()
        run.history.plot_if_due(run.run_dir / "plots", final=True)  # the curves of every epoch, however it ended
    return stop_note


def train_epoch(run: TrainingRun, epoch: int, board: TensorBoard | None) -> str:
    """Train and validate one epoch, save its checkpoints and history row; returns the early-stop note."""
    args = run.args
    begin_epoch(run.train_loader, args.seed, epoch)  # seeds shuffling/augmentation (per rank under torchrun)
    if args.freeze_backbone and args.unfreeze_epoch and epoch >= args.unfreeze_epoch:
        set_backbone_trainable(run.model, True, [])  # the optimizer already holds every parameter
        run.train_model = follow_unfreeze(run.train_model, run.model, run.device, args.compile)  # DDP: sync those too
    with explain_training_errors(args):  # a diverged loss or a batch BatchNorm cannot take: one line
        train_stats = train_one_epoch(run.train_model, run.train_loader, run.criterion, run.optimizer, run.scheduler,
                                      run.settings, run.scaler, args.accum_steps, args.grad_clip,
                                      f"epoch {epoch}/{args.epochs}", run.show_progress, run.ema)
    val = evaluate(run.validated_model(), run.eval_loaders["val"], EVAL_CRITERION, run.settings, len(run.class_names),
                   "val", run.show_progress)
    metrics = {k: v for k, v in val.items() if k != "confusion"}
    best = {"epoch": epoch} if run.saver.improves(metrics) else run.saver.best
    stop_note = early_stop_note(args, best, epoch)
    row = run.history.add_epoch(epoch, train_stats, val, stop_note)  # in memory: last.pth carries it, then history.csv
    rows = list(run.history.rows)  # history.csv is written once last.pth is on disk, by the writer thread
    improved = run.saver.save_epoch(run.model, epoch, metrics, run.training_state,  # best.pth, last.pth, epoch_N.pth
                                    run.ema.module if run.ema else None, then=lambda: run.history.write(rows))
    run.saved_epoch = epoch
    run.history.plot_if_due(run.run_dir / "plots")  # at most every PLOT_INTERVAL_S seconds
    if board:
        board.log(row, epoch)
    run.log.info(epoch_summary(epoch, args.epochs, train_stats, metrics, improved, run.ema is not None))
    return stop_note


def early_stop_note(args: argparse.Namespace, best: dict | None, epoch: int) -> str:
    """--patience: after `epoch`, with the best epoch so far `best`, why the run stops now; "" to go on."""
    if not args.patience or best is None or epoch - best["epoch"] < args.patience:
        return ""
    waited = epoch - best["epoch"]
    return (f"stopped early after epoch {epoch}: val {args.best_metric} has not improved in the {waited} "
            f"epoch{'s' if waited > 1 else ''} since its best, epoch {best['epoch']}")


def make_ema(args: argparse.Namespace, model: nn.Module, log: logging.Logger) -> ModelEma | None:
    """--ema: the averaged copy of the plain model (never of DDP or torch.compile around it)."""
    if args.ema is None:
        return None
    log.info(f"EMA of the weights (--ema {args.ema}, warmed up): validation, best.pth and the final report "
             "use the EMA weights; last.pth keeps both")
    return ModelEma(model, args.ema)


def check_args(args: argparse.Namespace) -> None:
    """Numbers out of range are user errors, named by their flag."""
    positive = {"--batch_size": args.batch_size, "--lr": args.lr, "--accum_steps": args.accum_steps}
    if args.epochs is not None:
        positive["--epochs"] = args.epochs
    for flag, value in positive.items():
        if value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    for flag, value in {"--val_ratio": args.val_ratio, "--test_ratio": args.test_ratio, "--hflip": args.hflip,
                        "--label_smoothing": args.label_smoothing}.items():
        if not 0 <= value < 1 and not (flag == "--hflip" and value == 1):
            raise UsageError(f"{flag} must be between 0 and 1, got {value}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {args.workers}")
    if not 0 < args.crop_scale <= 1:
        raise UsageError(f"--crop_scale must be in (0, 1], got {args.crop_scale}")
    if not 0 <= args.random_erase <= 1:
        raise UsageError(f"--random_erase must be between 0 and 1, got {args.random_erase}")
    if args.ema is not None and not 0 < args.ema < 1:
        raise UsageError(f"--ema must be a decay between 0 and 1 (exclusive), e.g. 0.9998, got {args.ema}")
    for flag, value in {"--mixup": args.mixup, "--cutmix": args.cutmix, "--focal_gamma": args.focal_gamma,
                        "--patience": args.patience}.items():
        if value < 0:
            raise UsageError(f"{flag} must be 0 or more, got {value}")


def epoch_summary(epoch: int, epochs: int, train_stats: dict, metrics: dict, improved: bool, ema: bool = False) -> str:
    """The console line of one epoch."""
    return (f"epoch {epoch}/{epochs}  lr {train_stats['lr']:.2e}  train loss {train_stats['loss']:.4f} "
            f"acc {train_stats['acc']:.2%}  |  val{' (EMA)' if ema else ''} {format_metrics(metrics)}  |  "
            f"{train_stats['time']:.1f}s {train_stats['images_per_s']:.0f} img/s{'  *best' if improved else ''}")


def check_run_folder_writable(args: argparse.Namespace, resume: bool) -> None:
    """A UsageError now when the run folder cannot be written to (a new run's --log_dir, a resumed run's folder)."""
    if resume:
        check_output_dir(Path(args.resume_training).parent, "--resume_training's run folder")
    else:
        check_output_dir(args.log_dir, "--log_dir")


def check_dataset(args: argparse.Namespace, scan: DatasetScan) -> list[str]:
    """The class names, after refusing, before any training, a dataset that differs between
    torchrun ranks or a class list no classifier can be trained or checked on."""
    class_names = scan.class_names
    check_same_on_all_ranks((class_names, {split: len(samples) for split, samples in scan.splits.items()}),
                            f"the dataset at {args.dataset_path}")
    if len(class_names) < 2:
        raise UsageError(f"the dataset {args.dataset_path} has only one class ({class_names[0]}): a classifier "
                         "needs at least two classes (class folders); add another class")
    if args.num_classes is not None and args.num_classes != len(class_names):
        raise UsageError(f"--num_classes {args.num_classes} disagrees with the dataset, which has "
                         f"{len(class_names)} classes ({', '.join(class_names[:10])}...); drop the flag or fix the data")
    return class_names


def open_run_folder(args: argparse.Namespace, resume: ResumeState | None, scan: DatasetScan, main_process: bool,
                    new_run_folders: list[Path]) -> tuple[Path, logging.Logger]:
    """The run folder (a new one, or the resumed run's), its log, and the files that describe the run."""
    if resume:
        run_dir = Path(args.resume_training).parent
    else:
        run_dir = on_main_process(new_run_dir, args.log_dir, args.model)
        if main_process:
            new_run_folders.append(run_dir)
    log = setup_logging(run_dir if main_process else None, quiet=args.quiet or not main_process)
    log.info(f"Run folder: {run_dir}")
    stale = remove_stale_temp_files(run_dir) if resume and main_process else []
    if stale:
        log.info(f"Removed {len(stale)} temporary file(s) of a checkpoint save that was cut short: "
                 + ", ".join(path.name for path in stale))
    for note in resume.notes if resume else []:
        log.info(note)
    report = scan.report() + on_main_process(leakage_report, args, scan)
    log.info(report)
    if main_process:
        (run_dir / "dataset_report.txt").write_text(report + "\n", encoding="utf-8")
        write_json(vars(args), run_dir / "args.json")
    return run_dir, log


def leakage_report(args: argparse.Namespace, scan: DatasetScan) -> str:
    """The dataset report's leakage section (utils.leakage; only rank 0 runs this), "" with --no_audit."""
    if args.no_audit:
        return ""
    check = check_leakage(scan, hash_cache_path(args.log_dir, args.dataset_path),
                          progress=sys.stderr.isatty() and not args.quiet)
    return "\n" + check.report()


@dataclass
class StartingPoint:
    """What a run starts from: its preprocessing, model build arguments and starting weights.

    A resumed run takes all of it from its checkpoint (the weights come with the training state);
    a new run from the flags and --pretrained / --weights."""

    preprocess: Preprocess
    model_kwargs: dict = field(default_factory=dict)
    pretrained_info: dict | None = None  # where --pretrained weights came from (kept in every checkpoint)
    weights: list[tuple[str, dict]] = field(default_factory=list)  # (source, state_dict) to load, in order


def starting_point(args: argparse.Namespace, resume: ResumeState | None, class_names: list[str]) -> StartingPoint:
    if resume:
        checkpoint = resume.checkpoint
        if checkpoint["class_names"] != class_names:
            raise UsageError(f"the classes in {args.dataset_path} differ from those of the checkpoint being resumed")
        return StartingPoint(Preprocess.from_dict(checkpoint["preprocess"]), checkpoint.get("model_kwargs") or {},
                             checkpoint.get("pretrained"))
    start = StartingPoint(make_preprocess(args, None))
    if args.pretrained is not None:
        # rank 0 fetches (one download), every rank gets the weights
        state, info = on_main_process(resolve_pretrained, args.pretrained, args.model, args.weights_dir,
                                      args.weights_mirror)
        start = StartingPoint(make_preprocess(args, info), weights_build_kwargs(args.model) if info["recipe"] else {},
                              info, [(info["file"], state)])
    if args.weights:
        checkpoint = load_checkpoint(args.weights)
        made_for = f" (a {checkpoint['model']} checkpoint)" if isinstance(checkpoint.get("model"), str) else ""
        start.weights.append((args.weights + made_for, checkpoint["state_dict"]))
    return start


def run_record(args: argparse.Namespace, class_names: list[str], start: StartingPoint) -> dict:
    """What every checkpoint of the run says about it (utils/checkpoint.py lists the whole format)."""
    return {"model": args.model, "class_names": class_names, "preprocess": start.preprocess.to_dict(),
            "args": plain_args(args), "pretrained": start.pretrained_info, "model_kwargs": start.model_kwargs}


def make_loaders(args: argparse.Namespace, scan: DatasetScan, preprocess: Preprocess, device: torch.device,
                 cache_dir: Path | None, log: logging.Logger, main_process: bool) -> tuple[DataLoader, dict]:
    """The training loader and one evaluation loader per other split (val, test), cached if asked."""
    workers = default_workers(len(scan.splits["train"])) if args.workers is None else args.workers
    generator = torch.Generator().manual_seed(args.seed)  # reseeded each epoch: exact resume
    train_set = ImageDataset(scan.splits["train"], build_train_transform(
        preprocess, args.augment, args.hflip, args.color_jitter, args.crop_scale, args.random_erase))
    eval_transform = build_eval_transform(preprocess)
    balanced_labels = [label for _, label in scan.splits["train"]] if args.sampler == "balanced" else None
    train_loader = create_dataloader(train_set, args.batch_size, True, workers, device, generator,
                                     sampler=train_sampler(train_set, args.seed, balanced_labels))
    eval_sets = {split: ImageDataset(samples, eval_transform, eval_size=preprocess.input_size)  # unreadable: left out
                 for split, samples in scan.splits.items() if split != "train"}
    eval_loaders = {split: create_dataloader(dataset, args.batch_size, False, workers, device,  # no random augmentation:
                                             sampler=eval_sampler(dataset), persistent=True)  # workers kept, any mode
                    for split, dataset in eval_sets.items()}
    log.info(cache_datasets(args.cache, preprocess, train_set, list(eval_sets.values()), cache_dir, workers,
                            show_progress=sys.stderr.isatty() and not args.quiet and main_process))
    return train_loader, eval_loaders


def load_starting_weights(model: nn.Module, args: argparse.Namespace, start: StartingPoint, log: logging.Logger) -> None:
    """--pretrained, then --weights on top (each reported); then --freeze_backbone."""
    head_names: list[str] = []  # what did not fit (the new head) stays trainable under --freeze_backbone
    for source, state in start.weights:
        report = load_matching_weights(model, state, source, args.model)
        log.info(f"{source}: {format_load_report(report)}")
        head_names = head_parameter_names(model, report["reinitialised"])
    if args.freeze_backbone:
        trainable, total = set_backbone_trainable(model, False, head_names or head_parameter_names(model))
        log.info(f"--freeze_backbone: training {trainable:,} of {total:,} parameters (the head)"
                 + (f" until epoch {args.unfreeze_epoch}" if args.unfreeze_epoch else ""))


def build_model(args: argparse.Namespace, start: StartingPoint, num_classes: int, device: torch.device,
                run_dir: Path | None, log: logging.Logger) -> nn.Module:
    """The registry model with its starting weights, on the device, in the memory layout that suits it."""
    model = create_model(args.model, num_classes, tuple(start.preprocess.input_size), **start.model_kwargs)
    if run_dir is not None:
        log.info(describe_model(model, args.model, start.preprocess, run_dir))
    load_starting_weights(model, args, start, log)
    model.to(device)
    if args.channels_last is None:
        args.channels_last = default_channels_last(device, start.preprocess.input_size)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def scheduler_steps(args: argparse.Namespace, train_loader: DataLoader) -> int:
    """Optimizer steps per epoch: the schedules count these, not batches (--accum_steps)."""
    return math.ceil(len(train_loader) / args.accum_steps)


def make_optimisation(args: argparse.Namespace, model: nn.Module, scan: DatasetScan, train_loader: DataLoader,
                      preprocess: Preprocess, device: torch.device, log: logging.Logger) -> tuple:
    """(criterion, optimizer, per-iteration scheduler, fp16 grad scaler or None, StepSettings)."""
    class_weight = inverse_frequency_weights(scan.counts("train")).to(device) if args.class_weights == "auto" else None
    criterion = create_criterion(args.loss, class_weight, args.label_smoothing, args.focal_gamma).to(device)
    lr = scaled_lr(args.lr, args.lr_scale)
    optimizer = create_optimizer(model, args.optimizer_type, lr, args.momentum, args.weight_decay)
    steps_per_epoch = scheduler_steps(args, train_loader)
    scheduler = create_scheduler(optimizer, args.lr_schedule_type, args.epochs, steps_per_epoch,
                                 args.warmup_epochs, args.step_size, args.milestones, args.gamma)
    dtype = amp_dtype(device, args.amp)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    settings = StepSettings(device, preprocess, dtype, args.channels_last, train_mode=train_mode,
                            batch_mix=build_batch_mix(args.mixup, args.cutmix, len(scan.class_names)))
    log.info(f"Device: {describe_device(device)}; precision: {dtype or torch.float32}; "
             f"workers: {train_loader.num_workers}; layout: {'channels_last' if args.channels_last else 'NCHW'}; "
             f"batch {args.batch_size} x accum {args.accum_steps}; {steps_per_epoch} steps/epoch")
    log.info(describe_scale(args.batch_size, args.accum_steps, args.lr, lr))
    return criterion, optimizer, scheduler, scaler, settings


@contextlib.contextmanager
def explain_training_errors(args: argparse.Namespace) -> Iterator[None]:
    """Training failures a user can fix become one line naming the flag to change."""
    try:
        yield
    except NonFiniteLossError as error:
        raise UsageError(f"{error}: training diverged; try a lower --lr (now {args.lr}) or --grad_clip 1.0") from None
    except ValueError as error:  # BatchNorm in training mode, on a batch of one image at a small input size
        if "Expected more than 1 value per channel" not in str(error):
            raise
        raise UsageError(f"--batch_size {args.batch_size}: BatchNorm needs batches of 2 or more images at this "
                         "input size; use a larger --batch_size") from None


def make_preprocess(args: argparse.Namespace, pretrained_info: dict | None) -> Preprocess:
    """Input size and resize from the flags; with ImageNet weights, their own recipe where not given."""
    recipe = (pretrained_info or {}).get("recipe")
    if not recipe:
        input_size = parse_input_shape(args.input_shape) if args.input_shape else Preprocess().input_size
        return Preprocess(input_size=input_size, resize_mode=args.resize_mode)
    input_size = parse_input_shape(args.input_shape) if args.input_shape else recipe["input_size"]
    return Preprocess(input_size=input_size, resize_mode=args.resize_mode, crop_pct=recipe["crop_pct"],
                      mean=list(recipe["mean"]), std=list(recipe["std"]), interpolation=recipe["interpolation"])


@dataclass
class ResumeState:
    """The checkpoint a run resumes from, and log lines on the flags given with --resume."""

    checkpoint: dict
    notes: list[str]


def resolve_resume(args: argparse.Namespace, argv: list[str] | None) -> ResumeState | None:
    """Load the checkpoint to resume from and take its settings into `args`.

    The flags given on the command line that a resumed run may change (RESUME_OVERRIDABLE, and
    --epochs above the epochs already done) are applied; every other given flag is ignored, and
    the notes say which, so the run continues exactly as it began.
    """
    if not args.resume_training:
        return None
    if args.resume_training == "auto":
        found = newest_run_checkpoint(args.log_dir)
        if found is None:
            raise UsageError(f"--resume auto: no run with a last.pth under {args.log_dir}")
        args.resume_training = str(found)
    checkpoint = load_checkpoint(args.resume_training)
    if "optimizer" not in checkpoint or "args" not in checkpoint:
        raise UsageError(f"{args.resume_training} is not resumable (only last.pth keeps the optimizer state); "
                         "use --weights to start a new run from it")
    given = given_flags(argv)
    applied, ignored = [], []
    for key, saved in checkpoint["args"].items():
        if key == "resume_training":
            continue
        if key in given and (key in RESUME_OVERRIDABLE or key == "epochs"):
            applied.append(format_flag(key, given[key]))
        elif key in given and given[key] != saved:
            ignored.append(f"{format_flag(key, given[key])} (the run keeps {saved})")
            setattr(args, key, saved)
        elif key not in given:
            setattr(args, key, saved)
    notes = [f"Resume: applied {', '.join(applied)}"] if applied else []
    if ignored:
        notes.append(f"Resume: ignored {', '.join(ignored)}: a resumed run keeps its settings; to change "
                     "them, start a new run from this one with --weights")
    if "epochs" in given and given["epochs"] != checkpoint["args"].get("epochs"):
        if given["epochs"] <= checkpoint["epoch"]:
            raise UsageError(f"--epochs {given['epochs']}: {args.resume_training} has finished "
                             f"{checkpoint['epoch']} epochs already; give more to continue it")
        notes.append(f"Resume: the run now ends after epoch {args.epochs} (it was set for "
                     f"{checkpoint['args'].get('epochs')}); the lr schedule is recomputed for {args.epochs} "
                     "epochs and continues from the step the run has reached")
    return ResumeState(checkpoint, notes)


def given_flags(argv: list[str] | None) -> dict:
    """The flags actually on the command line (`argv`, or sys.argv), as {dest: value}; defaults left out."""
    parser = get_args_parser()
    for action in parser._actions:  # argparse has no public way to tell a given flag from a default
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def format_flag(key: str, value: object) -> str:
    """A flag and its value as a user would type them, for the resume notes."""
    if isinstance(value, bool):
        return f"--{key}" if value else f"--no-{key}"
    if isinstance(value, list):
        return f"--{key} {' '.join(map(str, value))}"
    return f"--{key} {value}"


def restore_training_state(resume: ResumeState, model: nn.Module, ema: ModelEma | None, optimizer, scheduler, scaler,
                           steps_per_epoch: int, args: argparse.Namespace, log: logging.Logger) -> tuple[int, dict | None, list]:
    """Weights (and EMA), optimizer, schedule, scaler and RNG as last.pth left them; (epoch, best, history rows)."""
    checkpoint, epochs = resume.checkpoint, args.epochs
    log.info(f"Resumed from {args.resume_training} after epoch {checkpoint['epoch']}")
    model.load_state_dict(checkpoint["state_dict"])
    if ema is not None:
        ema.load_state_dict(checkpoint["ema"])
    restore_schedule(optimizer, scheduler, checkpoint["optimizer"], checkpoint["scheduler"],
                     checkpoint["epoch"] * steps_per_epoch, new_length=epochs != checkpoint["args"].get("epochs"))
    if scaler and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    restore_rng_state(checkpoint["rng"])
    return checkpoint["epoch"], checkpoint.get("best_metric"), checkpoint.get("history", [])


def inverse_frequency_weights(counts: list[int]) -> torch.Tensor:
    """w_c = N / (C * n_c): each class contributes equally to the loss."""
    counts_t = torch.tensor(counts, dtype=torch.float32).clamp(min=1)
    return counts_t.sum() / (len(counts) * counts_t)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def plain_args(args: argparse.Namespace) -> dict:
    """args as plain values only, so the checkpoint stays weights_only-loadable."""
    return {k: v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v) for k, v in vars(args).items()}


def describe_model(model: nn.Module, name: str, preprocess: Preprocess, run_dir: Path) -> str:
    """One line of size and cost; the full torchinfo table goes to model_summary.txt."""
    from torchinfo import summary

    height, width = preprocess.input_size
    stats = summary(model, input_size=(1, 3, height, width), verbose=0, mode="eval", device="cpu",
                    col_names=("output_size", "num_params"))
    (run_dir / "model_summary.txt").write_text(str(stats) + "\n", encoding="utf-8")
    return (f"Model: {name}, {stats.total_params / 1e6:.2f}M parameters, "
            f"{stats.total_mult_adds / 1e9:.3f} GMACs per {height}x{width} image")


def final_report(run: TrainingRun, stop_note: str) -> dict:
    """Evaluate best.pth (the EMA weights under --ema) on val (per-class table, confusion matrix, ROC/PR
    curves, reliability), fit its temperature on val (saved into best.pth), then evaluate on test if
    there is one; say whether the run stopped early."""
    run_dir, model, class_names, log = run.run_dir, run.model, run.class_names, run.log
    run.saver.flush()  # best.pth of the last epochs is on disk
    best = on_main_process(load_checkpoint, run_dir / "best.pth")  # rank 0 wrote it; other machines may not see it
    unwrap_model(model).load_state_dict(best["state_dict"])
    log.info(f"\nBest model: epoch {best['epoch']} ({run_dir / 'best.pth'}{', EMA weights' if run.ema else ''})")
    if stop_note:
        log.info(f"The run {stop_note}")
    results, temperature = {}, 1.0
    for split, loader in sorted(run.eval_loaders.items(), key=lambda item: item[0] != "val"):  # val first
        metrics = evaluate(model, loader, EVAL_CRITERION, run.settings, len(class_names), split, run.show_progress,
                           keep_outputs=True)
        log_probs, targets = metrics.pop("outputs")
        if split == "val":
            temperature = calibrate(run.saver, log_probs, targets, log)
        metrics["ece_calibrated"] = calibration_error(log_probs, targets, temperature) if len(targets) else None
        rows = per_class_rows(metrics["confusion"], class_names)
        results[split] = {k: v for k, v in metrics.items() if k != "confusion"}
        if not is_main_process():
            continue
        suffix = "" if split == "val" else f"_{split}"
        plot_confusion_matrix(metrics["confusion"], class_names, run_dir / "plots" / f"confusion_matrix{suffix}.png",
                              title=f"{split} confusion matrix")
        if len(targets):
            plot_curves(log_probs, targets, class_names, run_dir / "plots", suffix, split, temperature)
        write_per_class_csv(rows, run_dir / f"per_class{suffix}.csv")
        log.info(f"{split}: {format_metrics(metrics)}  ece_calibrated {metrics['ece_calibrated'] or 0:.4f}\n"
                 f"{format_per_class(rows)}")
        if split == "test":
            write_json({"checkpoint": str(run_dir / "best.pth"), "epoch": best["epoch"], "ema": run.ema is not None,
                        "early_stop": stop_note or None, **results[split], "temperature": temperature,
                        "suggested_min_confidence": run.saver.record.get("suggested_min_confidence"),
                        "per_class": rows, "confusion_matrix": metrics["confusion"].tolist()},
                       run_dir / "test_metrics.json")
    log.info(f"Run folder: {run_dir}")
    return results


def calibrate(saver: CheckpointSaver, log_probs: torch.Tensor, targets: torch.Tensor, log: logging.Logger) -> float:
    """Temperature scaling and the suggested --min_confidence, fitted on val's outputs of best.pth
    and written into it (utils.calibration); returns the temperature."""
    temperature = fit_temperature(log_probs, targets)
    threshold = suggested_min_confidence((log_probs / temperature).softmax(1), targets)
    rewritten = saver.add_fields({"temperature": temperature, "suggested_min_confidence": threshold})
    if len(targets):
        log.info(f"Temperature scaling on val: T = {temperature:.4f}, expected calibration error "
                 f"{calibration_error(log_probs, targets):.4f} -> {calibration_error(log_probs, targets, temperature):.4f}; "
                 + (f"--min_confidence auto = {threshold:.4f} (99% of val's answers above it are right)"
                    if threshold is not None else "no confidence threshold keeps 99% of val's answers right")
                 + (f"; saved in {', '.join(rewritten)}" if rewritten else ""))
    return temperature


if __name__ == "__main__":
    keep_freed_memory()  # glibc keeps the memory a batch frees for the next one (utils/memory.py)
    run_cli(main, describe_peer_failure, skip_teardown=True)
