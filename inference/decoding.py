"""Decoding for prediction in threads: image files -> batches of model-sized uint8 images, in order.

Why threads and not DataLoader processes on the CPU: OpenCV decodes and torch resizes with the
GIL released, so a few threads of the predicting process decode in parallel with no start-up
cost and no copies between processes. They decode at most `ahead` batches beyond the one the
model is on, and only then, so the forward pass can keep every core (see `plan_threads`):
decoding a 64 px JPEG costs a few hundredths of a millisecond, a forward pass milliseconds.

    decoder = ThreadedDecoder(dataset.__getitem__, len(dataset), batch_size=64, threads=2)
    for batch in decoder:             # DecodedBatch: images (N, 3, H, W) uint8, indices, errors
        ...
        decoder.threads = 1           # may change between batches (takes effect on the next one)
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

Decode = Callable[[int], "tuple[torch.Tensor, int, str]"]  # index -> (uint8 CHW image, index, error or "")
MAX_DECODE_THREADS = 8  # beyond this the GIL-held parts (header check, transform dispatch) serialise anyway


@dataclass
class DecodedBatch:
    images: torch.Tensor  # (N, 3, H, W) uint8
    indices: list[int]
    errors: list[str]  # "" where the image was read, else the reason
    decode_seconds: float  # CPU seconds the decode threads spent on this batch (for `plan_threads`)


def _one_torch_thread() -> None:
    """Each decode thread runs torch's resize on one intra-op thread. Otherwise every decode
    thread starts its own OpenMP team as large as the model's, and the teams fight for the cores
    (measured: prediction at 0.46-0.6 of the forward-only rate on 500x375 photos). Sets the
    calling thread's OpenMP count; the thread iterating the decoder restores the process default
    for threads started later (`ThreadedDecoder.__iter__`)."""
    torch.set_num_threads(1)


def _decode_chunk(decode: Decode, indices: range) -> tuple[list[tuple[torch.Tensor, int, str]], float]:
    started = time.thread_time()
    items = [decode(index) for index in indices]
    return items, time.thread_time() - started


class ThreadedDecoder:
    """Batches of `decode(i)` for i in 0..count-1, in order, decoded by `threads` threads.

    Memory stays bounded: at most `ahead` + 1 batches are submitted and not yet handed out
    (`most_pending` records the peak), whatever the number of files.
    """

    def __init__(self, decode: Decode, count: int, batch_size: int, threads: int, ahead: int = 1,
                 max_threads: int = 0):
        self.decode, self.count, self.batch_size, self.ahead = decode, count, batch_size, ahead
        self.threads = threads  # chunks per batch = threads working on it at once
        self.max_threads = min(MAX_DECODE_THREADS, max(1, threads, max_threads))  # the pool's size
        self.most_pending = 0  # the most batches submitted but not yet handed out, for tests

    def __iter__(self) -> Iterator[DecodedBatch]:
        starts = iter(range(0, self.count, self.batch_size))
        pending: deque[list[Future]] = deque()
        model_threads = torch.get_num_threads()  # this thread's: the forward pass keeps them
        pool = ThreadPoolExecutor(self.max_threads, thread_name_prefix="decode", initializer=_one_torch_thread)
        try:
            while True:
                while len(pending) <= self.ahead:  # refill before waiting: decoding overlaps the model
                    start = next(starts, None)
                    if start is None:
                        break
                    pending.append(self._submit(pool, start))
                self.most_pending = max(self.most_pending, len(pending))
                if not pending:
                    return
                yield self._collect(pending.popleft())
        finally:  # also when the consumer stops early (the viewer's Stop): no thread outlives the loop
            for futures in pending:
                for future in futures:
                    future.cancel()
            pool.shutdown(wait=True)
            torch.set_num_threads(model_threads)  # the default that threads started later begin with

    def _submit(self, pool: ThreadPoolExecutor, start: int) -> list[Future]:
        stop = min(start + self.batch_size, self.count)
        chunks = max(1, min(self.threads, self.max_threads, stop - start))
        size = math.ceil((stop - start) / chunks)
        return [pool.submit(_decode_chunk, self.decode, range(first, min(first + size, stop)))
                for first in range(start, stop, size)]

    @staticmethod
    def _collect(futures: list[Future]) -> DecodedBatch:
        items, seconds = [], 0.0
        for future in futures:
            chunk, chunk_seconds = future.result()
            items += chunk
            seconds += chunk_seconds
        images, indices, errors = zip(*items)
        return DecodedBatch(torch.stack(images), list(indices), list(errors), seconds)


def plan_threads(decode_seconds: float, forward_seconds: float, cores: int) -> int:
    """Decode threads for the rest of a run, from one batch's decode CPU seconds and forward wall seconds.

    Enough threads that the next batch is decoded while the model runs on this one (decode CPU
    time / forward time, rounded up), at least one and at most the cores. The forward pass keeps
    all its intra-op threads: decoding runs only for the next batch and then stops, so when it is
    cheap (small JPEGs, a heavy model) it takes a small share of the cores for a short time.
    """
    if forward_seconds <= 0:
        return max(1, min(cores, MAX_DECODE_THREADS))
    return max(1, min(cores, MAX_DECODE_THREADS, math.ceil(decode_seconds / forward_seconds)))
