"""Resumable distributed sampling and the train / kNN DataLoaders.

Train batches are dicts ``{"x1", "x2", "label", "index", "skipped"}``. ``"skipped"`` counts
the unreadable files the same way on both loaders (this one and ``mixfast.data.dali``): the
files the start-up check removed (``mixfast.data.check``), each charged to one rank in the first
batch of every epoch, so each is counted once per epoch; plus any file that passed the check
but fails to decode when drawn (changed on disk since, say), counted in the batch that drew it.
Such an item (``Unreadable`` from the data set) is dropped by the collate function and the
batch is refilled from its own good items so that every batch has exactly
``batch_size_per_rank`` rows. A constant batch size is what MoCo's all-gathers (shuffle-BN,
enqueue) need across ranks, and what a queue sized in whole batches expects.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

# Stream tags, so the data order and the augmentations never share a random stream.
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1


def _seed_sequence(seed: int, stream: int, key: int) -> np.random.SeedSequence:
    """Independent stream per (seed, stream, key); SeedSequence needs non-negative entropy, so wrap."""
    return np.random.SeedSequence([seed % 2**63, stream, key])


class ResumableDistributedSampler(Sampler[int]):
    """Shards one per-epoch permutation across ranks and can resume mid-epoch.

    Every rank draws the same permutation from ``(seed, epoch)``, drops the tail that
    does not divide evenly (so all ranks have the same number of steps per epoch) and
    takes every ``num_replicas``-th index starting at ``rank``. ``set_epoch(epoch, start)``
    skips the first ``start`` indices of this rank's shard: the samples a checkpointed run
    had already drawn in that epoch (``steps_in_epoch * batch_size_per_rank``, including
    any that were skipped as unreadable).
    """

    def __init__(self, dataset_len: int, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must lie in [0, {num_replicas}), got {rank}")
        if dataset_len < num_replicas:
            raise ValueError(f"data set of {dataset_len} items cannot feed {num_replicas} ranks")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.samples_per_rank = dataset_len // num_replicas
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.samples_per_rank:
            raise ValueError(f"start must lie in [0, {self.samples_per_rank}], got {start}")
        self.epoch = epoch
        self.start = start

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's full index list for ``epoch`` (before skipping ``start``)."""
        if self.shuffle:
            order = np.random.default_rng(_seed_sequence(self.seed, _ORDER_STREAM, epoch)).permutation(self.dataset_len)
        else:
            order = np.arange(self.dataset_len)
        used = order[: self.samples_per_rank * self.num_replicas]
        return used[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard(self.epoch)[self.start :].tolist())

    def __len__(self) -> int:
        return self.samples_per_rank - self.start


class SeededSampler(ResumableDistributedSampler):
    """Yields ``(index, augmentation_seed)`` keys, the seed a pure function of
    ``(seed, epoch, index)``. A data set that seeds its random transforms from the key
    (``TwoViewDataset``) then produces the same views whichever worker, rank count or
    resume point serves the sample, so a resumed run sees exactly the views it would
    have seen (and the losses match an uninterrupted run)."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch_seq = _seed_sequence(self.seed, _AUGMENT_STREAM, self.epoch)
        seeds = epoch_seq.generate_state(self.dataset_len, np.uint64) >> np.uint64(1)
        return ((i, int(seeds[i])) for i in self.shard(self.epoch)[self.start:].tolist())


def _drop_failed(batch: Sequence) -> tuple[list, list[tuple[str, str]]]:
    """The items that loaded, and ``(path, reason)`` of those that did not."""
    from mixfast.data.datasets import is_unreadable

    good = [item for item in batch if not is_unreadable(item)]
    failed = [(item.path, item.reason) if item is not None else ("(unknown file)", "failed to load")
              for item in batch if is_unreadable(item)]
    return good, failed


def collate_two_views(batch: Sequence) -> dict:
    """Collate ``(x1, x2, label, index)`` items; failed items are counted and named, then refilled."""
    good, failed = _drop_failed(batch)
    if not good:
        names = ", ".join(p for p, _ in failed[:3])
        raise RuntimeError(f"all {len(batch)} images of a batch failed to load ({names} ...); check the data set")
    # Repeat good items cyclically to restore the batch size (see the module docstring).
    full = [good[i % len(good)] for i in range(len(batch))]
    x1, x2, label, index = default_collate(full)
    return {"x1": x1, "x2": x2, "label": label, "index": index, "skipped": len(failed), "unreadable": failed}


def collate_eval(batch: Sequence) -> tuple:
    """Collate ``(x, label)`` items, dropping failed ones: ``(x, label, [(path, reason)])``; x and
    label are None when no item of the batch loaded."""
    good, failed = _drop_failed(batch)
    if not good:
        return None, None, failed
    x, label = default_collate(good)
    return x, label, failed


def bad_files_of_rank(num_bad_files: int, rank: int, world_size: int) -> int:
    """How many of the files removed by the start-up check this rank counts in the first batch
    of each epoch: file j is charged to rank j % world_size, so over all ranks each is counted
    once per epoch (the same rule on both loaders)."""
    return len(range(rank, num_bad_files, world_size))


class TwoViewLoader:
    """The torch pre-training loader: a DataLoader over ``TwoViewDataset`` whose batches count,
    in ``"skipped"``, the files removed by the start-up check (this rank's share, in the first
    batch of each epoch) plus the items that failed to decode in this batch; a failed file is
    named once, when the trainer takes its batch (not when a worker prefetches it)."""

    def __init__(self, dataloader: DataLoader, num_bad_files: int = 0, rank: int = 0, world_size: int = 1,
                 report=None):
        self.dataloader = dataloader
        self.sampler = dataloader.sampler
        self.skipped_per_epoch = bad_files_of_rank(num_bad_files, rank, world_size)
        self.report = report

    def __len__(self) -> int:
        return len(self.dataloader)

    def __iter__(self) -> Iterator[dict]:
        first = self.sampler.start == 0  # a resumed epoch was charged before the checkpoint
        for batch in self.dataloader:
            failed = batch.pop("unreadable", [])
            if failed:
                name_files(self.report, failed, "while training")
            if first:
                batch["skipped"] += self.skipped_per_epoch
                first = False
            yield batch


def name_files(report, failed: Sequence[tuple[str, str]], when: str) -> None:
    """Name files that failed to decode at run time (once each; by the rank that met them)."""
    if report is None:
        from mixfast.data.check import SkipReport

        report = _DEFAULT_REPORT.setdefault("report", SkipReport())
    report.name(list(dict.fromkeys(failed)), when, all_ranks_know=False)


_DEFAULT_REPORT: dict = {}


class EvalLoader:
    """A sequential DataLoader of ``(x, label)`` batches that drops the items that failed to
    load (a batch may be short; one with no image left is left out) and remembers them:
    ``unreadable`` maps each file that failed, during any pass, to its reason."""

    def __init__(self, dataloader: DataLoader, report=None):
        self.dataloader = dataloader
        self.unreadable: dict[str, str] = {}
        self.report = report

    def __len__(self) -> int:
        return len(self.dataloader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, label, failed in self.dataloader:
            if failed:
                self.unreadable.update(failed)
                name_files(self.report, failed, "while evaluating")
            if x is not None:
                yield x, label


def _worker_options(num_workers: int) -> dict:
    return {
        "num_workers": num_workers,
        "persistent_workers": num_workers > 0,  # avoid re-forking workers every epoch
        "pin_memory": torch.cuda.is_available(),
    }


def _base_of(dataset):
    """The SafeImageList below wrappers and subsets, or None."""
    while dataset is not None and not hasattr(dataset, "read_paths"):
        inner = getattr(dataset, "base", None)
        dataset = inner if inner is not None else getattr(dataset, "dataset", None)
    return dataset


def build_train_loader(dataset: Dataset, batch_size_per_rank: int, rank: int, world_size: int,
                       seed: int, num_workers: int) -> TwoViewLoader:
    """Pre-training loader; call ``loader.sampler.set_epoch(epoch, start)`` before each epoch."""
    # Augmentations are seeded per sample from the sampler's keys, not per worker.
    sampler = SeededSampler(len(dataset), world_size, rank, seed)
    loader = DataLoader(dataset, batch_size=batch_size_per_rank, sampler=sampler, drop_last=True,
                        collate_fn=collate_two_views, **_worker_options(num_workers))
    base = _base_of(dataset)
    return TwoViewLoader(loader, len(base.skipped) if base is not None else 0, rank, world_size,
                         base.report if base is not None else None)


def build_eval_loader(dataset: Dataset, batch_size: int, num_workers: int, sampler=None) -> EvalLoader:
    """Sequential kNN loader yielding ``(x, label)`` (over ``sampler``'s indices when given);
    keeps the last partial batch; ``loader.unreadable`` names the files that failed."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, drop_last=False,
                        collate_fn=collate_eval, **_worker_options(num_workers))
    base = _base_of(dataset)
    return EvalLoader(loader, base.report if base is not None else None)


def choose_loader(data_cfg) -> str:
    """'dali' or 'torch' for ``data.loader`` (see its description in mixfast.config)."""
    from mixfast.data.dali import dali_available
    from mixfast.data.files import JPEG_TREES

    if data_cfg.loader == "auto":
        return "dali" if data_cfg.name in JPEG_TREES and dali_available() else "torch"
    if data_cfg.loader == "dali" and not dali_available():
        raise RuntimeError("data.loader='dali' but NVIDIA DALI cannot be imported (pip install nvidia-dali-cuda130)")
    return data_cfg.loader


def build_pretrain_loader(cfg, datasets, batch_size_per_rank: int, rank: int, world_size: int, device: torch.device):
    """The trainer's loader for ``cfg.data.loader``: a DataLoader over ``datasets.train`` or a
    ``DaliTwoViewLoader`` over the same files. Both yield the same batch dicts and both are
    positioned with ``loader.sampler.set_epoch(epoch, start)``; the DALI loader also has
    ``state_dict()`` / ``load_state_dict()`` for the checkpoint."""
    if choose_loader(cfg.data) == "torch":
        return build_train_loader(datasets.train, batch_size_per_rank, rank, world_size, cfg.train.seed,
                                  cfg.data.num_workers)
    from mixfast.data.dali import build_dali_loader

    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    return build_dali_loader(cfg.data, datasets.train.base, batch_size=batch_size_per_rank, rank=rank,
                             world_size=world_size, seed=cfg.train.seed, device=device, dtype=dtype,
                             channels_last=cfg.model.channels_last)
