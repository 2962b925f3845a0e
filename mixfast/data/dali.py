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

- The file list (already checked: files that do not decode were removed and are counted, see
  ``mixfast.data.check``; files in formats DALI does not decode to the same pixels are read
  from their converted PNG copies) is permuted once with ``train.seed`` and cut to a multiple of the
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

Run-time guard: a file that passed the start-up check but that DALI still cannot read or decode
(Pillow and DALI's decoders disagree on a few damaged files, e.g. a PNG whose IDAT checksum is
wrong: Pillow does not verify it, libpng refuses it) makes ``pipe.run()`` raise and leaves the
pipeline unusable. The loader then finds the file in the error message (DALI names it), marks
its list position failed, and rebuilds the pipeline with that slot reading a substitute (the
next position that has not failed, whose label and index its rows carry, like the torch
loader's refill), restored from the state of the last batch consumed (``pipe.checkpoint()``
after every batch: a few KB, well under a millisecond), and runs the batch again. Nothing else
is lost: every other sample, augmentation and position is what it would have been. The
failed positions travel in the checkpoint, so a resumed run rebuilds the same list; as every
random operator draws per sample slot and the failing file was never decoded before it
failed, the result is the same whichever saved state the pipeline is rebuilt from, and a run
killed and restarted logs the uninterrupted run's losses. The file is named once and counted
in ``skipped`` in every batch that draws its slot.
"""

from __future__ import annotations

import math
import re
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
    # MAE: crop (bicubic resize) and flip only
    "mae": dict(min_scale=0.2, jitter=(0.0, 0.0, 0.0, 0.0), p_jitter=0.0, p_gray=0.0, p_blur=0.0,
                interp="INTERP_CUBIC"),
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


def _decode(fn, types, encoded, decoder_device: str, area: list, aspect: list):
    """Decode a random-resized-crop window (only that region is decoded) as 8-bit RGB, EXIF
    orientation applied (DALI's decoders apply it; so does the torch path's loader)."""
    return fn.decoders.image_random_crop(encoded, device=decoder_device, output_type=types.RGB, random_area=area,
                                         random_aspect_ratio=aspect, num_attempts=10, **_DECODE_KW)


def decode_full(paths: Sequence[str], device: str = "cpu", device_id: Optional[int] = None,
                num_threads: int = 1) -> list[np.ndarray]:
    """The whole images as the training pipeline's decoder gives them ([H, W, 3] uint8 each):
    its ``_decode`` with the window forced to the full image (area 1; an aspect ratio range
    so wide that the drawn windows never fit and the decoder falls back to the whole image)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(paths), num_threads=num_threads, device_id=device_id if device == "gpu" else None,
                  seed=1)
    def decode():
        encoded, _ = fn.readers.file(files=list(paths), labels=list(range(len(paths))))
        return _decode(fn, types, encoded, "mixed" if device == "gpu" else "cpu", [1.0, 1.0], [1e-3, 1e3])

    pipe = decode()
    pipe.build()
    (out,) = pipe.run()
    if device == "gpu":
        out = out.as_cpu()
    return [np.asarray(out[i]) for i in range(len(paths))]


def _view(fn, types, jpegs, *, size, recipe, min_scale, hflip, decoder_device, blur_window, layout):
    """One augmented view of the encoded JPEGs (DALI graph code, runs inside a pipeline_def)."""
    p = RECIPE_PARAMS[recipe]
    img = _decode(fn, types, jpegs, decoder_device, [min_scale, 1.0], list(_ASPECT))
    resize_kw = {**_RESIZE_KW, "interp_type": getattr(types, p.get("interp", _RESIZE_KW["interp_type"]))}
    img = fn.resize(img, resize_x=size, resize_y=size, **resize_kw)
    if p["p_jitter"] > 0 or p["p_gray"] > 0:
        img = _colour(fn, types, img, p)
    if p["p_blur"] > 0:
        img = _blur(fn, types, img, p, blur_window)
    mean, std = mean_std(recipe)
    mirror = fn.random.coin_flip(probability=0.5) if hflip else 0
    return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout=layout, mirror=mirror,
                                    mean=[255.0 * m for m in mean], std=[255.0 * v for v in std])


def _colour(fn, types, img, p):
    """Colour jitter with probability p_jitter, then grayscale with probability p_gray."""
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
    return fn.hsv(img, hue=hue, saturation=sat * keep_colour)


def _blur(fn, types, img, p, blur_window):
    """Gaussian blur with probability p_blur, sigma uniform in _BLUR_SIGMA."""
    from nvidia.dali import math as dmath

    sigma = fn.random.uniform(range=list(_BLUR_SIGMA))
    # Kernel radius ceil(3 sigma) (99.7% of the mass), capped at the torch path's fixed
    # kernel (23 px at 224): a sigma-0.3 blur then costs a 3-tap kernel instead of 23.
    window = dmath.min(fn.cast(2.0 * dmath.ceil(3.0 * sigma) + 1.0, dtype=types.INT32), blur_window)
    if fn.random.coin_flip(probability=p["p_blur"], dtype=types.BOOL):
        img = fn.gaussian_blur(img, sigma=sigma, window_size=window)
    return img


def _reader_args(files: Sequence[str], shard_id: int, num_shards: int, seed: int) -> dict:
    """The file reader's arguments: its "label" is the sample's position in ``files``."""
    return dict(files=list(files), labels=list(range(len(files))), name="reader", shard_id=shard_id,
                num_shards=num_shards, shuffle_after_epoch=True, shuffle_after_epoch_seed=seed % _SEED_MOD,
                pad_last_batch=True)


def reader_positions(n: int, *, batch_size: int, shard_id: int, num_shards: int, seed: int, batches: int) -> list:
    """The list positions the training pipeline's reader hands out in its first ``batches``
    batches, without reading the data: the same reader over ``n`` copies of one small file (its
    order depends on the list's length, the shard and the seed, not on the files)."""
    import os
    import tempfile

    from nvidia.dali import fn, pipeline_def

    with tempfile.TemporaryDirectory() as tmp:
        dummy = os.path.join(tmp, "sample")
        with open(dummy, "wb") as f:
            f.write(b"x")

        @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1)
        def positions():
            _, index = fn.readers.file(**_reader_args([dummy] * n, shard_id, num_shards, seed))
            return index

        pipe = positions()
        pipe.build()
        return [np.asarray(pipe.run()[0].as_tensor()).reshape(-1).tolist() for _ in range(batches)]


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
        jpegs, index = fn.readers.file(**_reader_args(files, shard_id, num_shards, seed))
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

    ``samples`` are the files that passed the start-up check (``indices``: their indices in the
    data set, default 0..n-1; ``read_paths``: the file DALI reads for each, the file itself or
    its converted copy, default the sample's path); ``num_bad_files`` how many the check removed.
    ``skipped`` counts them as the torch loader does: bad file ``j`` is charged to rank
    ``j % world`` in the first batch of every epoch, so over all ranks each is counted once per
    epoch. A file that fails to decode inside the pipeline is handled by the run-time guard
    (module docstring) and counted in every batch that draws its slot.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], num_bad_files: int = 0, *, batch_size: int, rank: int,
                 world_size: int, seed: int, recipe: str, image_size: int, min_scale: Optional[float] = None,
                 hflip: bool = True, num_threads: int = 2, device: str = "cpu", device_id: Optional[int] = None,
                 prefetch: int = 2, dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 indices: Optional[Sequence[int]] = None, read_paths: Optional[Sequence[str]] = None, report=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        n = len(samples) // world_size * world_size
        if n == 0:
            raise ValueError(f"{len(samples)} readable images cannot feed {world_size} ranks")
        order = np.random.default_rng(np.random.SeedSequence([seed % 2**63, 2])).permutation(len(samples))[:n]
        reads = [p for p, _ in samples] if read_paths is None else list(read_paths)
        # The reader's list, position -> file; the names the user knows (``sample_paths``) and
        # the files DALI reads (``read_paths``: a converted copy for some) in the same order.
        self.sample_paths = [samples[i][0] for i in order]
        self.read_paths = [reads[i] for i in order]
        # file-list position -> data set index (``indices``: the data set index of each sample)
        self._index0 = torch.as_tensor(order if indices is None else np.asarray(indices)[order], dtype=torch.int64)
        self._labels0 = torch.as_tensor([samples[i][1] for i in order], dtype=torch.int64)
        self._position_of = {path: k for k, path in enumerate(self.read_paths)}
        self.failed: dict[int, str] = {}  # list position -> why DALI could not decode it
        self._apply_failed()
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.samples_per_rank = n // world_size
        self.steps_per_epoch = self.samples_per_rank // batch_size
        self.reader_batches_per_epoch = math.ceil(self.samples_per_rank / batch_size)
        self.skipped_per_epoch = len(range(rank, num_bad_files, world_size))
        self.report = report
        self.dtype, self.channels_last, self.device = dtype, channels_last, device
        self.out_device = torch.device("cuda", device_id if device_id is not None else 0) if device == "gpu" else torch.device("cpu")
        self._pipe_args = dict(batch_size=batch_size, shard_id=rank, num_shards=world_size, seed=seed, recipe=recipe,
                               image_size=image_size, min_scale=min_scale, hflip=hflip, num_threads=num_threads,
                               device=device, device_id=device_id, prefetch=prefetch, channels_last=channels_last)
        self.sampler = _EpochPosition(self)
        self._pipe = None
        self._pos = (0, 0)  # (epoch, reader batches consumed in it) of the built pipeline
        self._saved: Optional[dict] = None  # from load_state_dict
        self._snapshot: Optional[dict] = None  # the built pipeline's state at its last consumed batch
        self.epoch, self.start_batch = 0, 0

    # --- the run-time guard ---------------------------------------------------------------
    def _apply_failed(self) -> None:
        """The reader's list with every failed position read as its substitute (the next position
        that has not failed), whose label and index its rows then carry."""
        n = len(self.read_paths)
        if len(self.failed) >= n:
            raise RuntimeError(f"DALI could not decode any of the {n} files of its list; check the data set")
        self._substitute = {}
        for k in self.failed:
            j = (k + 1) % n
            while j in self.failed:
                j = (j + 1) % n
            self._substitute[k] = j
        self.paths = [self.read_paths[self._substitute.get(k, k)] for k in range(n)]
        take = torch.as_tensor([self._substitute.get(k, k) for k in range(n)], dtype=torch.int64)
        self.labels, self.dataset_index = self._labels0[take], self._index0[take]
        self._is_substitute = torch.zeros(n, dtype=torch.bool)
        self._is_substitute[list(self.failed)] = True

    def _failed_files(self, err: Exception) -> dict[int, str]:
        """List position -> reason of the files behind a DALI error: the file the message names
        ('Failed to decode sample #3 : PATH', 'File mapping failed: PATH'); when it names none
        (nvImageCodec's parser says only 'nvImageCodec failure'), each file of the failing batch
        decoded alone, and those that fail."""
        for line in str(err).splitlines():
            for sep in (" : ", ": "):
                path = line.rsplit(sep, 1)[-1].strip()
                k = self._position_of.get(path)
                if k is not None and k not in self.failed:
                    reason = re.sub(r"\s*sample #\d+", "", line.replace(path, "")).strip(" :")
                    return {k: f"DALI: {reason or 'could not decode it'}"}
        batch = reader_positions(len(self.paths), batch_size=self.batch_size, shard_id=self.rank,
                                 num_shards=self.world_size, seed=self.seed,
                                 batches=self._absolute(self._pos) + 1)[-1]
        found = {}
        for k in dict.fromkeys(batch):
            if k in self.failed:
                continue
            try:
                decode_full([self.paths[k]], self.device, self._pipe_args["device_id"])
            except RuntimeError as alone:
                why = next((x.strip() for x in str(alone).splitlines() if "failure" in x or "Failed" in x),
                           "could not decode it")
                found[k] = f"DALI: {why.replace(self.paths[k], '').strip(' :')}"
        return found

    def _run(self):
        """The next reader batch, through the guard: a file the pipeline cannot read or decode is
        marked failed, the pipeline rebuilt at the same position (from the state of the last
        batch consumed) with the file's slot read as its substitute, and the batch run again."""
        for _ in range(self.batch_size + 1):
            try:
                outputs = self._pipe.run()
                break
            except RuntimeError as err:
                found = self._failed_files(err)
                if not found:
                    raise RuntimeError(f"DALI pipeline of rank {self.rank} failed at epoch {self._pos[0]}, batch "
                                       f"{self._pos[1]}, and no file of that batch fails alone:\n{err}") from err
                self.failed.update(found)
                self._apply_failed()
                for k in found:
                    note = f"its slot now reads {self.sample_paths[self._substitute[k]]}"
                    _name_failed(self.report, self.sample_paths[k], self.failed[k], f"by DALI's decoder ({note})")
                self._pipe = None
                self._seek(*self._pos, quiet=True)
        else:
            raise RuntimeError(f"DALI pipeline of rank {self.rank} kept failing at epoch {self._pos[0]}, batch "
                               f"{self._pos[1]}")
        e, b = self._pos
        self._pos = (e, b + 1) if b + 1 < self.reader_batches_per_epoch else (e + 1, 0)
        # A few KB and well under a millisecond (the reader's position and the random operators'
        # state); it lets the guard rebuild the pipeline right here instead of replaying the epoch.
        self._snapshot = {"position": list(self._pos), "dali": self._pipe.checkpoint()}
        return outputs

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

    def _seek(self, epoch: int, batch: int, quiet: bool = False) -> None:
        """Bring the pipeline to ``(epoch, batch)``: reuse it, or rebuild it from the newest saved
        state at or before the target (the checkpoint's, or the guard's snapshot), else from
        scratch, then run and discard batches up to the target."""
        target = self._absolute((epoch, batch))
        if self._pipe is None or self._absolute(self._pos) > target:
            self._pipe, self._pos = None, (0, 0)
            states = [s for s in (self._saved, self._snapshot)
                      if s is not None and s.get("dali") is not None and self._absolute(s["position"]) <= target]
            best = max(states, key=lambda s: self._absolute(s["position"]), default=None)
            checkpoint = None
            if best is not None:
                checkpoint, self._pos = best["dali"], tuple(best["position"])
            self._pipe = build_two_view_pipeline(self.paths, checkpoint=checkpoint, **self._pipe_args)
        behind = target - self._absolute(self._pos)
        tail_only = batch == 0 and self._pos == (epoch - 1, self.steps_per_epoch) and \
            behind == self.reader_batches_per_epoch - self.steps_per_epoch
        if behind > 0 and not tail_only and not quiet:
            warnings.warn(f"DALI loader: fast-forwarding {behind} batches to epoch {epoch}, batch {batch} (no saved "
                          f"pipeline state for this position: the skipped batches are decoded and dropped)",
                          stacklevel=3)
        while self._absolute(self._pos) < target:
            self._run()

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
            skipped = int(self._is_substitute[pos].sum()) + (self.skipped_per_epoch if b == 0 else 0)
            yield {"x1": self._to_torch(x1), "x2": self._to_torch(x2), "label": self.labels[pos],
                   "index": self.dataset_index[pos], "skipped": skipped}
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
        own = {"position": list(self._pos), "dali": self._pipe.checkpoint() if self._pipe is not None else None,
               "failed": {self.read_paths[k]: why for k, why in sorted(self.failed.items())}}
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
        # Files the guard found before the checkpoint: their slots read their substitutes again,
        # as in the run that saved it (a file no longer listed is ignored).
        failed = {self._position_of[p]: why for p, why in own.get("failed", {}).items() if p in self._position_of}
        if failed != self.failed:
            self.failed = failed
            self._apply_failed()
        self._pipe, self._pos, self._snapshot = None, (0, 0), None
        self._saved = own if own.get("dali") is not None else None


def _name_failed(report, path: str, reason: str, when: str) -> None:
    from mixfast.data.loader import name_files

    name_files(report, [(path, reason)], when)


def build_dali_loader(data_cfg, base, *, batch_size: int, rank: int, world_size: int, seed: int,
                      device: torch.device, dtype: torch.dtype, channels_last: bool) -> DaliTwoViewLoader:
    """The DALI loader of ``data_cfg`` over ``base`` (the training split's ``SafeImageList``: its
    checked samples, the file DALI reads for each, and the files the check removed)."""
    where = data_cfg.dali_device
    if where == "auto":
        where = "gpu" if device.type == "cuda" else "cpu"
    if where == "gpu" and device.type != "cuda":
        raise ValueError("data.dali_device='gpu' needs the trainer on a CUDA device")
    return DaliTwoViewLoader(
        base.samples, len(base.skipped), read_paths=base.read_paths, report=base.report, batch_size=batch_size,
        rank=rank, world_size=world_size, seed=seed, recipe=data_cfg.augmentation, image_size=data_cfg.image_size,
        min_scale=data_cfg.crop_min_scale, hflip=data_cfg.hflip,
        num_threads=data_cfg.dali_threads or max(1, data_cfg.num_workers), device=where,
        device_id=(torch.cuda.current_device() if device.index is None else device.index) if where == "gpu" else None,
        prefetch=data_cfg.dali_prefetch, dtype=dtype, channels_last=channels_last)
