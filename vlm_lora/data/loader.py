"""The run's data order and the DataLoader that feeds the training loop.

* ``BatchStream``: micro-batch ``k`` of the run is a pure function of (seed, epoch) - a seeded permutation
  cut every ``batch_size``, or with ``group_by_length`` its megabatches sorted by text length - so a
  resumed run continues exactly where the killed one left off.
* ``TrainLoader``: a torch ``DataLoader`` over this process's micro-batches (``k = start + rank``, then
  every ``world``-th); workers load the images and run the collator, and the DataLoader keeps the order,
  so batches equal the in-process ones (``num_workers=0``) exactly.
* ``StreamBatches``: WebDataset shards streamed; each epoch's shard order is a pure function of
  (seed, epoch), shards are dealt to (rank, worker) consumers without overlap, each consumer batches its
  own samples. Resume skips each worker's consumed batches (same ranks and workers), or says it restarts.

Bad samples met in a worker come back with the batch (``LoadedBatch.problems``) and are counted in
``TrainLoader.skipped`` (each bad sample once, however many epochs meet it); a ``DataError`` in a worker comes
back as text and is raised in the main process.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlm_lora.data.datasets import ConversationDataset, ShardStream, load_sample_image
from vlm_lora.data.formats import DataError, Problem

log = logging.getLogger("vlm_lora")
MEGABATCHES = 50  # group_by_length sorts windows of 50 steps' samples (HF LengthGroupedSampler's multiplier)


def default_workers(processes_per_node: int = 1) -> int:
    """Loader workers per process: the CPUs this process may use, shared by the node's processes, minus
    one for the training loop itself; at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // max(1, processes_per_node) - 1))


# ---------------------------------------------------------------- map-style order

def text_lengths(dataset) -> list[int]:
    """Words in each sample's conversation (every sample has one image, so text length orders them)."""
    return [sum(len(user.split()) + len(answer.split()) for user, answer in getattr(e, "turns", None) or
                [("", " ".join(getattr(e, "captions", [])[:1]))]) for e in dataset.examples]


def micro_batches(n_items: int, batch_size: int, seed: int, epoch: int, lengths: list[int] | None = None,
                  group: int = 1) -> list[list[int]]:
    """Index lists of one epoch's micro-batches: a seeded permutation, cut every ``batch_size``.

    With ``lengths``: LLaVA's length grouping - windows of ``MEGABATCHES * group`` micro-batches of the
    permutation are sorted longest first and cut in order, so the ``group`` micro-batches of one
    optimizer step (``world x grad_accum``) hold samples of similar length (less padding, even ranks).
    """
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    if lengths is not None:
        window = batch_size * group * MEGABATCHES
        order = [i for start in range(0, n_items, window)
                 for i in sorted(order[start:start + window], key=lambda i: -lengths[i])]
    return [order[i:i + batch_size] for i in range(0, n_items, batch_size)]


class BatchStream:
    """The run's micro-batches in order, across epochs; ``take(k)`` returns the next k, ``batch(k)`` the k-th."""

    def __init__(self, n_items: int, batch_size: int, seed: int, start: int = 0, lengths: list[int] | None = None,
                 group: int = 1):
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.lengths, self.group = lengths, group
        self.per_epoch = math.ceil(n_items / batch_size)
        self.position = start  # micro-batches consumed so far
        self._epoch: tuple[int, list] = (-1, [])

    def batch(self, k: int) -> list[int]:
        epoch, index = divmod(k, self.per_epoch)
        if self._epoch[0] != epoch:
            self._epoch = (epoch, micro_batches(self.n_items, self.batch_size, self.seed, epoch, self.lengths,
                                                self.group))
        return self._epoch[1][index]

    def take(self, count: int) -> list[list[int]]:
        out = [self.batch(k) for k in range(self.position, self.position + count)]
        self.position += count
        return out


class LoadedBatch(NamedTuple):
    """A collated batch (None if it failed), the bad samples dropped from it, the error, its sample count."""

    batch: Any
    problems: list
    error: str | None
    samples: int


def _collate_loaded(collate, items: list, samples: int, problems: list) -> LoadedBatch:
    """Run the task's collate; the problems it adds to ``collate.skipped`` travel with the batch."""
    skipped = getattr(collate, "skipped", [])
    before = len(skipped)
    try:
        batch = collate(items)
    except DataError as error:
        return LoadedBatch(None, problems, str(error), samples)
    return LoadedBatch(batch, problems + list(getattr(collate, "skipped", [])[before:]), None, samples)


class MapBatches:
    """Dataset whose item ``indices`` is the collated micro-batch of those samples (runs in a worker)."""

    def __init__(self, dataset: ConversationDataset, collate):
        self.dataset, self.collate = dataset, collate

    def __getitem__(self, indices: list[int]) -> LoadedBatch:
        try:
            items = [self.dataset[i] for i in indices]
        except DataError as error:
            return LoadedBatch(None, [], str(error), len(indices))
        return _collate_loaded(self.collate, items, len(indices), [])


class RankIndices:
    """This process's micro-batches of the run, endless: ``start + rank``, then every ``world``-th."""

    def __init__(self, stream: BatchStream, start: int, rank: int, world: int):
        self.stream, self.start, self.rank, self.world = stream, start, rank, world

    def __iter__(self):
        k = self.start + self.rank
        while True:
            yield self.stream.batch(k)
            k += self.world


# ---------------------------------------------------------------- streaming

def shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n_shards, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


class StreamBatches(IterableDataset):
    """Collated micro-batches of streamed shards for one rank; each worker reads its own shards.

    Consumer ``c = rank * workers + worker`` of ``C = world * workers`` reads shards ``order[c::C]`` of
    each epoch (``shard_order(seed, epoch)``) and batches them; epochs follow one another without a break
    (a batch may hold the end of one and the start of the next). ``skip``: the rank's batches already
    consumed (the loader delivers the workers' batches in turn); they are read, not decoded.
    ``epochs``: stop after that many (None: endless).
    """

    def __init__(self, source: ShardStream, collate, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 workers: int = 0, skip: int = 0, epochs: int | None = None):
        consumers = world * max(1, workers)
        if len(source.shards) < consumers:
            raise DataError(f"{source.path}: {len(source.shards)} tar shard(s) cannot feed {world} process(es) x "
                            f"{max(1, workers)} loader worker(s) without repeats; write at least {consumers} shards "
                            f"or lower data.num_workers")
        self.source, self.collate, self.batch_size, self.seed = source, collate, batch_size, seed
        self.rank, self.world, self.workers, self.skip, self.epochs = rank, world, workers, skip, epochs

    def consumer_samples(self, role: int):
        """(epoch, Sample | Problem) of worker ``role`` of this rank, in order; endless unless ``epochs``."""
        n = max(1, self.workers)
        consumer, consumers = self.rank * n + role, self.world * n
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            order = shard_order(len(self.source.shards), self.seed, epoch)
            mine = [self.source.shards[i] for i in order[consumer::consumers]]
            for item in self.source.samples(mine):
                yield epoch, item
            epoch += 1

    def __iter__(self):
        info = get_worker_info()
        n = max(1, self.workers)
        # the DataLoader takes worker 0's batch first, so after ``skip`` batches worker 0 plays role skip % n
        role = ((info.id if info is not None else 0) + self.skip) % n
        skip = len(range(role, self.skip, n))
        batch, problems = [], []
        for _, item in self.consumer_samples(role):
            if isinstance(item, Problem):
                if self.source.on_bad_sample != "skip":
                    yield LoadedBatch(None, [], f"{item} (or set data.on_bad_sample: skip)", 0)
                    return
                problems.append(item)
                continue
            batch.append(item)
            if len(batch) < self.batch_size:
                continue
            if skip:
                skip -= 1
                batch, problems = [], []
                continue
            yield self._collate(batch, problems)
            batch, problems = [], []
        if batch and not skip:
            yield self._collate(batch, problems)

    def _collate(self, samples: list, problems: list) -> LoadedBatch:
        try:
            items = [(load_sample_image(s, self.source.path, self.source.on_bad_sample), s) for s in samples]
        except DataError as error:
            return LoadedBatch(None, problems, str(error), len(samples))
        return _collate_loaded(self.collate, items, len(samples), problems)


# ---------------------------------------------------------------- the loader of a run

def _identity(batch):
    return batch


class TrainLoader:
    """This process's training micro-batches, loaded by ``num_workers`` DataLoader workers.

    ``start(position, saved)`` opens the loader at ``position`` (micro-batches consumed by all processes);
    ``next(count, device)`` returns the next ``count`` batches on ``device``; ``state()`` is what a
    checkpoint stores next to the position; ``skipped`` counts the bad samples dropped so far.
    """

    def __init__(self, dataset, collate, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 num_workers: int | None = None, group_by_length: bool = False, group: int = 1,
                 pin_memory: bool = False, prefetch_factor: int = 2):
        self.dataset, self.collate, self.batch_size, self.seed = dataset, collate, batch_size, seed
        self.rank, self.world = rank, world
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.streaming = isinstance(dataset, ShardStream)
        if self.streaming and group_by_length:
            raise DataError(f"{dataset.path}: data.group_by_length needs a map-style source (set data.streaming: "
                            "false to index the shards)")
        lengths = text_lengths(dataset) if group_by_length else None
        self.stream = None if self.streaming else BatchStream(len(dataset), batch_size, seed, lengths=lengths,
                                                              group=group)
        self.per_epoch = None if self.streaming else self.stream.per_epoch
        self.position, self.skipped, self._batches, self._counted = 0, [], None, set()
        self._waited = 0.0  # seconds the loop spent blocked on the loader since ``waited()`` was last read

    def total_steps(self, epochs: int, per_step: int, max_steps: int | None) -> int:
        if max_steps:
            return max_steps
        if self.streaming:
            raise DataError(f"{self.dataset.path}: a streamed source has no length, so train.epochs cannot end it; "
                            "set train.max_steps (or data.streaming: false to index the shards)")
        return max(1, epochs * self.per_epoch // per_step)

    def epoch(self) -> float | None:
        return None if self.streaming else round(self.position / self.per_epoch, 3)

    def state(self) -> dict:
        return {"workers": self.num_workers, "world": self.world} if self.streaming else {}

    def start(self, position: int, saved: dict | None = None) -> None:
        self.position = position
        if self.streaming:
            consumed = position // self.world  # this rank's batches
            if position and saved is not None and saved != self.state():
                log.warning("%s: the stream position was saved with %s and this run has %s: restarting the stream "
                            "at epoch 0 (a streamed position maps to samples only for the same ranks and workers)",
                            self.dataset.path, saved, self.state())
                consumed = 0
            data = StreamBatches(self.dataset, self.collate, self.batch_size, self.seed, self.rank, self.world,
                                 self.num_workers, skip=consumed)
            options = {"batch_size": None}
        else:
            data = MapBatches(self.dataset, self.collate)
            options = {"batch_size": None, "sampler": RankIndices(self.stream, position, self.rank, self.world)}
        if self.num_workers:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers and a used fast tokenizer
            options.update(prefetch_factor=self.prefetch_factor, persistent_workers=True)
        # its own generator: the workers' base seed is not drawn from the global RNG that dropout and a resume use
        generator = torch.Generator().manual_seed(self.seed)
        loader = DataLoader(data, num_workers=self.num_workers, collate_fn=_identity, pin_memory=self.pin_memory,
                            generator=generator, **options)
        self._batches = iter(loader)

    def waited(self) -> float:
        """Seconds the loop waited for batches since the last call (starvation: a large share of the step time)."""
        waited, self._waited = self._waited, 0.0
        return waited

    def close(self) -> None:
        """Stop the workers."""
        self._batches = None

    def next(self, count: int, device) -> tuple[list[dict], int]:
        """(``count`` batches on ``device``, samples in them before any was skipped)."""
        out, samples = [], 0
        for _ in range(count):
            start = time.perf_counter()
            loaded = next(self._batches)
            self._waited += time.perf_counter() - start
            if loaded.error:
                raise DataError(loaded.error)
            for problem in loaded.problems:  # a sample met again in a later epoch is counted once
                if (key := (str(problem.id), problem.where, problem.reason)) not in self._counted:
                    self._counted.add(key)
                    self.skipped.append(problem)
            out.append({k: v.to(device, non_blocking=self.pin_memory) if torch.is_tensor(v) else v
                        for k, v in loaded.batch.items()})
            samples += loaded.samples
        self.position += count * self.world
        return out, samples
