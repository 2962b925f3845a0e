"""NVIDIA DALI two-view pre-training pipelines for JPEG trees, sharded and resumable mid-epoch.

One pipeline per rank reads its shard of the file list with ``fn.readers.file``, decodes
each JPEG twice with ``fn.decoders.image_random_crop`` (the random-resized-crop window is
chosen from the header and only that region is decoded), then per view: resize to
``image_size``, colour jitter + grayscale as ``fn.brightness_contrast`` + ``fn.hsv``, Gaussian blur (MoCo v2,
through a DALI conditional so only the drawn half pays for it), and one
``fn.crop_mirror_normalize`` for flip + mean/std + layout. Every random choice is drawn per
sample by DALI's seeded random operators, so a run is reproducible and, with
``enable_checkpointing``, resumable.

Recipes (MoCo v2 / v1 as in MoCo's official code, CIFAR as in Un-Mix's), as in
``mixfast.data.transforms``:

- ``mocov2``: crop scale [0.2, 1], jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2,
  blur sigma U(0.1, 2) p 0.5 (window = the torch path's kernel size), flip, ImageNet mean/std;
- ``mocov1``: crop scale [0.2, 1], grayscale p 0.2, jitter (0.4, 0.4, 0.4, 0.4) always, flip;
- ``cifar``: crop scale [0.08, 1], flip, jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2,
  CIFAR mean/std (used for Tiny-ImageNet).

Jitter factors are U(0.6, 1.4) for brightness/contrast/saturation and U(-h, h) turns of hue
(DALI takes degrees), applied in the fixed order brightness, contrast (about mid-grey, where
torchvision uses the image's mean grey), saturation + hue rather than in torchvision's
random order; grayscale is saturation 0, and DALI's hue change
is a linear rotation of the colour about the grey axis where torchvision shifts the HSV hue
(the latter moves saturated colours further: on the reddish test images the views' blue mean
is -0.48 vs -0.63 and the green std 0.67 vs 0.92, in normalized units). The views match the
torch path in distribution within that (tested: value range and per-channel means), not bit
for bit. The blur kernel spans ceil(3 sigma) pixels each side (99.7% of the Gaussian's mass),
capped at the torch path's fixed kernel (23 px at 224).

Sharding, epochs and resume:

- The file list (already scanned: files failing ``mixfast.data.files.image_problem`` are
  dropped and counted) is permuted once with ``train.seed`` and cut to a multiple of the
  number of ranks, so every shard holds the same ``M`` files and every rank runs the same
  ``M // batch`` steps per epoch (the last ``M % batch`` are dropped, as ``drop_last`` does).
- The reader reshuffles the whole list after every epoch (``shuffle_after_epoch``, seeded
  identically on all ranks, so shards stay disjoint) and pads each shard to whole batches
  (``pad_last_batch``); this loader discards that padded tail batch, so no batch straddles
  two epochs.
- The reader's "label" is the sample's index in the file list; labels are looked up here,
  so batches carry both ``index`` and ``label``.
- ``state_dict()`` holds ``pipe.checkpoint()`` (reader position and the RNG state of every
  random operator) taken right after the trainer consumed its last batch: DALI checkpoints
  the state of the iteration the consumer reached, not of the prefetched ones, and the
  generator below only calls ``pipe.run()`` when the trainer asks for the next batch.
  ``load_state_dict()`` rebuilds the pipeline from it. Without a saved state (or for a
  position other than the saved one) the loader rebuilds and fast-forwards, which is exact
  too (the pipeline is deterministic), only slower.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from mixfast.data.transforms import blur_kernel_size, mean_std

RECIPE_PARAMS = {
    # min_scale, jitter (b, c, s, h), jitter probability, grayscale probability, blur probability;
    # the mean/std is transforms.mean_std(recipe), as on the torch path
    "mocov2": dict(min_scale=0.2, jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=0.5),
    "mocov1": dict(min_scale=0.2, jitter=(0.4, 0.4, 0.4, 0.4), p_jitter=1.0, p_gray=0.2, p_blur=0.0),
    "cifar": dict(min_scale=0.08, jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=0.0),
}
_BLUR_SIGMA = (0.1, 2.0)
_ASPECT = (3.0 / 4.0, 4.0 / 3.0)
_SEED_MOD = 2**31 - 1
# Resize of the crop to image_size: bilinear with antialiasing when shrinking, as PIL's
# resize in the torch path. Decoder options: libjpeg-turbo's accurate IDCT.
_RESIZE_KW = dict(interp_type="INTERP_LINEAR", antialias=True)
_DECODE_KW: dict = {}


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali.plugin.pytorch import feed_ndarray  # noqa: F401
    except Exception:  # noqa: BLE001 - missing wheel or a wheel whose native part cannot load
        return False
    return True


def _view(fn, types, jpegs, *, size, recipe, min_scale, hflip, decoder_device, blur_window, layout):
    """One augmented view of the encoded JPEGs (DALI graph code, runs inside a pipeline_def)."""
    p = RECIPE_PARAMS[recipe]
    img = fn.decoders.image_random_crop(jpegs, device=decoder_device, output_type=types.RGB,
                                        random_area=[min_scale, 1.0], random_aspect_ratio=list(_ASPECT),
                                        num_attempts=10, **_DECODE_KW)
    resize_kw = {**_RESIZE_KW, "interp_type": getattr(types, _RESIZE_KW["interp_type"])}
    img = fn.resize(img, resize_x=size, resize_y=size, **resize_kw)
    b, c, s, h = p["jitter"]
    coin = lambda prob: fn.cast(fn.random.coin_flip(probability=prob), dtype=types.FLOAT)  # noqa: E731
    apply = coin(p["p_jitter"]) if p["p_jitter"] < 1 else 1.0
    bright = 1.0 + apply * (fn.random.uniform(range=[1.0 - b, 1.0 + b]) - 1.0)
    contrast = 1.0 + apply * (fn.random.uniform(range=[1.0 - c, 1.0 + c]) - 1.0)
    sat = 1.0 + apply * (fn.random.uniform(range=[1.0 - s, 1.0 + s]) - 1.0)
    hue = apply * fn.random.uniform(range=[-360.0 * h, 360.0 * h])
    keep_colour = 1.0 - coin(p["p_gray"])
    # Two ops, each clamping to uint8 like torchvision's per-op clamps; measured here the pair
    # costs about half of one fn.color_twist.
    img = fn.brightness_contrast(img, brightness=bright, contrast=contrast)
    img = fn.hsv(img, hue=hue, saturation=sat * keep_colour)
    if p["p_blur"] > 0:
        from nvidia.dali import math as dmath

        sigma = fn.random.uniform(range=list(_BLUR_SIGMA))
        # Kernel radius ceil(3 sigma) (99.7% of the mass), capped at the torch path's fixed
        # kernel (23 px at 224): a sigma-0.3 blur then costs a 3-tap kernel instead of 23.
        window = dmath.min(fn.cast(2.0 * dmath.ceil(3.0 * sigma) + 1.0, dtype=types.INT32), blur_window)
        if fn.random.coin_flip(probability=p["p_blur"], dtype=types.BOOL):
            img = fn.gaussian_blur(img, sigma=sigma, window_size=window)
    mean, std = mean_std(recipe)
    mirror = fn.random.coin_flip(probability=0.5) if hflip else 0
    return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout=layout, mirror=mirror,
                                    mean=[255.0 * m for m in mean], std=[255.0 * v for v in std])


def build_two_view_pipeline(files: Sequence[str], *, batch_size: int, shard_id: int, num_shards: int, seed: int,
                            recipe: str, image_size: int, min_scale: Optional[float], hflip: bool, num_threads: int,
                            device: str, device_id: Optional[int], prefetch: int, channels_last: bool = False,
                            checkpoint: Optional[bytes] = None):
    """The DALI pipeline (built) yielding ``(view1, view2, index)``; ``device`` 'cpu' or 'gpu';
    views are float32 HWC (``channels_last``) or CHW, normalized."""
    from nvidia.dali import fn, pipeline_def, types

    if recipe not in RECIPE_PARAMS:
        raise ValueError(f"unknown augmentation recipe {recipe!r}; allowed: {', '.join(RECIPE_PARAMS)}")
    min_scale = RECIPE_PARAMS[recipe]["min_scale"] if min_scale is None else min_scale
    decoder_device = "mixed" if device == "gpu" else "cpu"

    @pipeline_def(enable_conditionals=True, enable_checkpointing=True)
    def two_views():
        jpegs, index = fn.readers.file(files=list(files), labels=list(range(len(files))), name="reader",
                                       shard_id=shard_id, num_shards=num_shards, shuffle_after_epoch=True,
                                       shuffle_after_epoch_seed=seed % _SEED_MOD, pad_last_batch=True)
        kw = dict(size=image_size, recipe=recipe, min_scale=min_scale, hflip=hflip, decoder_device=decoder_device,
                  blur_window=blur_kernel_size(image_size), layout="HWC" if channels_last else "CHW")
        return _view(fn, types, jpegs, **kw), _view(fn, types, jpegs, **kw), index

    # Seeds differ per rank (independent augmentations), the reader's shuffle seed does not.
    pipe = two_views(batch_size=batch_size, num_threads=num_threads, device_id=device_id if device == "gpu" else None,
                     seed=(seed * 1_000_003 + shard_id * 7919 + 1) % _SEED_MOD, prefetch_queue_depth=prefetch,
                     checkpoint=checkpoint)
    pipe.build()
    return pipe


class _no_context:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _EpochPosition:
    """Compatibility with the torch loader's ``loader.sampler.set_epoch(epoch, start)`` / ``len``."""

    def __init__(self, loader: "DaliTwoViewLoader"):
        self._loader = loader

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self._loader.set_epoch(epoch, start)

    def __len__(self) -> int:
        return self._loader.samples_per_rank - self._loader.start_sample


class DaliTwoViewLoader:
    """Pre-training loader with the torch loader's batch contract:
    ``{"x1", "x2", "label", "index", "skipped"}``, ``batch_size`` rows per rank, views as
    ``dtype`` (fp32 or bf16) ``[B, 3, S, S]`` tensors, channels_last or contiguous NCHW (the
    pipeline writes the layout asked for, HWC or CHW, so no transposition is needed).

    ``samples`` are the readable files (``indices``: their indices in the data set, default
    0..n-1); ``num_bad_files`` how many were dropped. ``skipped`` counts the files dropped by the integrity scan: bad file ``j`` is charged to
    rank ``j % world`` in the first batch of every epoch, so over all ranks each bad file is
    counted once per epoch, as the torch loader counts the items it fails to decode.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], num_bad_files: int = 0, *, batch_size: int, rank: int,
                 world_size: int, seed: int, recipe: str, image_size: int, min_scale: Optional[float] = None,
                 hflip: bool = True, num_threads: int = 2, device: str = "cpu", device_id: Optional[int] = None,
                 prefetch: int = 2, dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 indices: Optional[Sequence[int]] = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        n = len(samples) // world_size * world_size
        if n == 0:
            raise ValueError(f"{len(samples)} readable images cannot feed {world_size} ranks")
        order = np.random.default_rng(np.random.SeedSequence([seed % 2**63, 2])).permutation(len(samples))[:n]
        self.paths = [samples[i][0] for i in order]
        # file-list position -> data set index (``indices``: the data set index of each sample)
        self.dataset_index = torch.as_tensor(order if indices is None else np.asarray(indices)[order], dtype=torch.int64)
        self.labels = torch.as_tensor([samples[i][1] for i in order], dtype=torch.int64)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.samples_per_rank = n // world_size
        self.steps_per_epoch = self.samples_per_rank // batch_size
        self.reader_batches_per_epoch = math.ceil(self.samples_per_rank / batch_size)
        self.skipped_per_epoch = len(range(rank, num_bad_files, world_size))
        self.dtype, self.channels_last, self.device = dtype, channels_last, device
        self.out_device = torch.device("cuda", device_id if device_id is not None else 0) if device == "gpu" else torch.device("cpu")
        self._pipe_args = dict(batch_size=batch_size, shard_id=rank, num_shards=world_size, seed=seed, recipe=recipe,
                               image_size=image_size, min_scale=min_scale, hflip=hflip, num_threads=num_threads,
                               device=device, device_id=device_id, prefetch=prefetch, channels_last=channels_last)
        self.sampler = _EpochPosition(self)
        self._pipe = None
        self._pos = (0, 0)  # (epoch, reader batches consumed in it) of the built pipeline
        self._saved: Optional[dict] = None
        self.epoch, self.start_batch = 0, 0

    # --- position ---------------------------------------------------------------------------
    @property
    def start_sample(self) -> int:
        return self.start_batch * self.batch_size

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_batch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate ``epoch`` from sample ``start`` (a whole number of batches, as the trainer resumes)."""
        if start % self.batch_size or not 0 <= start <= self.samples_per_rank:
            raise ValueError(f"start must be a multiple of {self.batch_size} in [0, {self.samples_per_rank}], got {start}")
        self.epoch, self.start_batch = epoch, start // self.batch_size

    def _absolute(self, pos: tuple[int, int]) -> int:
        return pos[0] * self.reader_batches_per_epoch + pos[1]

    def _seek(self, epoch: int, batch: int) -> None:
        """Bring the pipeline to ``(epoch, batch)``: reuse it, restore the saved checkpoint, or
        rebuild from scratch, then run and discard batches up to the target."""
        target = self._absolute((epoch, batch))
        if self._pipe is None or self._absolute(self._pos) > target:
            self._pipe, self._pos = None, (0, 0)
            checkpoint = None
            if self._saved is not None and self._absolute(self._saved["position"]) <= target:
                checkpoint, self._pos = self._saved["dali"], tuple(self._saved["position"])
            self._pipe = build_two_view_pipeline(self.paths, checkpoint=checkpoint, **self._pipe_args)
        behind = target - self._absolute(self._pos)
        tail_only = batch == 0 and self._pos == (epoch - 1, self.steps_per_epoch) and \
            behind == self.reader_batches_per_epoch - self.steps_per_epoch
        if behind > 0 and not tail_only:
            warnings.warn(f"DALI loader: fast-forwarding {behind} batches to epoch {epoch}, batch {batch} (no saved "
                          f"pipeline state for this position: the skipped batches are decoded and dropped)",
                          stacklevel=3)
        while self._absolute(self._pos) < target:
            self._run()

    def _run(self):
        outputs = self._pipe.run()
        e, b = self._pos
        self._pos = (e, b + 1) if b + 1 < self.reader_batches_per_epoch else (e + 1, 0)
        return outputs

    # --- iteration --------------------------------------------------------------------------
    def _to_torch(self, tensor_list) -> torch.Tensor:
        """A DALI output batch as a torch tensor of ``dtype`` (a cast is one pass that also
        copies); NHWC buffers become channels_last NCHW tensors."""
        dense = tensor_list.as_tensor()
        with torch.cuda.device(self.out_device) if self.out_device.type == "cuda" else _no_context():
            view = torch.from_dlpack(dense)
        if self.channels_last:
            view = view.permute(0, 3, 1, 2)
        if self.dtype != view.dtype:
            return view.to(self.dtype)  # new tensor, strides preserved
        # DALI's dynamic executor (the default) does not reuse an output buffer that is still
        # referenced, so the tensor may be handed out as it is (DALI's own torch iterator
        # does the same); the legacy executor recycles its buffers: copy.
        return view if self._pipe.exec_dynamic else view.clone()

    def __iter__(self) -> Iterator[dict]:
        epoch, first = self.epoch, self.start_batch
        self._seek(epoch, first)
        for b in range(first, self.steps_per_epoch):
            x1, x2, index = self._run()
            pos = torch.from_numpy(np.asarray(index.as_tensor()).reshape(-1).astype(np.int64))
            yield {"x1": self._to_torch(x1), "x2": self._to_torch(x2), "label": self.labels[pos],
                   "index": self.dataset_index[pos], "skipped": self.skipped_per_epoch if b == 0 else 0}
        # The padded tail batch of the shard (if any) belongs to this epoch: discard it now so
        # the next epoch starts at its first batch.
        while self._pos[0] == epoch:
            self._run()
        self.epoch, self.start_batch = epoch + 1, 0

    # --- checkpoint -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Every rank's DALI checkpoint at the batches consumed so far, with its position.

        A collective when torch.distributed is initialised (every rank calls it, as every
        rank calls ``checkpoint.save``): DeepSpeed writes the client state of data-parallel
        rank 0 only, so that state must hold all ranks' pipelines."""
        own = {"position": list(self._pos), "dali": self._pipe.checkpoint() if self._pipe is not None else None}
        ranks = [own]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.world_size > 1:
            ranks = [None] * self.world_size
            torch.distributed.all_gather_object(ranks, own)
        return {"kind": "dali", "world_size": self.world_size, "ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "dali" or state.get("world_size") != self.world_size:
            warnings.warn("loader state from another loader or rank count: ignored (the DALI loader fast-forwards "
                          "to the checkpoint's position instead)", stacklevel=2)
            return
        own = state["ranks"][self.rank if len(state["ranks"]) > 1 else 0]
        self._pipe, self._pos = None, (0, 0)
        self._saved = own if own.get("dali") is not None else None


def build_dali_loader(data_cfg, samples: Sequence[tuple[str, int]], *, batch_size: int, rank: int, world_size: int,
                      seed: int, device: torch.device, dtype: torch.dtype, channels_last: bool) -> DaliTwoViewLoader:
    """Scan ``samples`` (the torch data set's ``(path, label)`` list), then the loader of ``data_cfg``."""
    from mixfast.data.files import image_problems

    # Each rank checks every world_size-th file and the verdicts are exchanged, so a node of
    # 8 ranks reads each header once, not 8 times.
    mine = range(rank, len(samples), world_size)
    found = [(i, problem) for i, problem in zip(mine, image_problems([samples[i][0] for i in mine])) if problem]
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone = [None] * world_size
        torch.distributed.all_gather_object(everyone, found)
        found = sorted(item for part in everyone for item in part)
    elif world_size > 1:  # no process group (tests, tools): check the other ranks' files here
        others = [i for i in range(len(samples)) if i % world_size != rank]
        found = sorted(found + [(i, pr) for i, pr in zip(others, image_problems([samples[i][0] for i in others])) if pr])
    bad_index = {i for i, _ in found}
    good = [i for i in range(len(samples)) if i not in bad_index]
    bad = [(samples[i][0], problem) for i, problem in found]
    if bad and rank == 0:
        shown = "; ".join(f"{p}: {why}" for p, why in bad[:10])
        warnings.warn(f"skipping {len(bad)} unreadable images{' (first 10)' if len(bad) > 10 else ''}: {shown}",
                      stacklevel=2)
    where = data_cfg.dali_device
    if where == "auto":
        where = "gpu" if device.type == "cuda" else "cpu"
    if where == "gpu" and device.type != "cuda":
        raise ValueError("data.dali_device='gpu' needs the trainer on a CUDA device")
    return DaliTwoViewLoader(
        [samples[i] for i in good], len(bad), indices=good, batch_size=batch_size, rank=rank, world_size=world_size,
        seed=seed, recipe=data_cfg.augmentation, image_size=data_cfg.image_size, min_scale=data_cfg.crop_min_scale,
        hflip=data_cfg.hflip, num_threads=data_cfg.dali_threads or max(1, data_cfg.num_workers), device=where,
        device_id=(torch.cuda.current_device() if device.index is None else device.index) if where == "gpu" else None, prefetch=data_cfg.dali_prefetch, dtype=dtype,
        channels_last=channels_last)
