"""Typed run configuration: one JSON file, mixfast sections plus a DeepSpeed pass-through.

Defaults are the ImageNet-1K MoCo v2 + MixMask setting unless noted: the MixMask paper
(Vishniakov et al., Table 9) and its public reference code, whose value wins where the two
disagree (e.g. pre-training weight decay 1e-4, where Table 9 prints 0).
Every model below forbids unknown keys, so a typo is an error naming its full path.
Loading, ``--set`` overrides and error formatting live at the bottom of this module.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    arch: Literal["resnet18", "resnet50", "vit_tiny", "vit_small_patch16", "vit_base_patch16",
                  "vit_large_patch16"] = Field(
        "resnet50", description="Backbone: a torchvision ResNet, or a ViT (timm key names; 'vit_tiny' = patch 4, "
                                "96-d, 4 blocks, 4 heads for the 32-px demo; the others patch 16 at data.image_size "
                                "px). The ViTs are for method.name = mae / mixedae.")
    pool: Literal["cls", "mean"] = Field(
        "cls", description="ViT only: the feature the kNN monitor, linear probe and fine-tuning read: the CLS token, "
                           "or the mean of the patch tokens.")
    width: int = Field(
        64, ge=4, description="Channels of the first stage (64 = the standard ResNet); smaller widths make CPU demos fast.")
    cifar_stem: bool = Field(
        False, description="3x3 stride-1 conv1 and no max-pool: the ResNet-18 stem for 32/64-pixel images "
                           "(CIFAR-100, Tiny-ImageNet), as in MoCo's official CIFAR-10 demo.")
    head: Literal["mlp", "linear", "mlp_bn", "simsiam"] = Field(
        "mlp", description="Projection head: 'mlp' (MoCo v2: Linear-ReLU-Linear), 'linear' (MoCo v1 / CIFAR), "
                           "'mlp_bn' (head_layers Linear layers, BN-ReLU between them: SimCLR, BYOL), 'simsiam' "
                           "(as mlp_bn plus an output BN without affine: SimSiam, MixSiam).")
    head_layers: int = Field(2, ge=2, description="Linear layers of the 'mlp_bn' and 'simsiam' heads (SimSiam ImageNet: 3).")
    head_hidden_dim: Optional[int] = Field(
        None, ge=1, description="Hidden width of the projection head; null = the backbone's feature dimension.")
    feature_dim: int = Field(128, ge=1, description="Output dimension of the projection head (the embedding).")
    predictor_hidden_dim: int = Field(
        512, ge=1, description="Bottleneck width of the predictor (BYOL, SimSiam, MixSiam): "
                               "Linear(feature_dim, this)-BN-ReLU-Linear(this, feature_dim).")
    bn_splits: int = Field(
        8, ge=1, description="MoCo only: SplitBatchNorm groups used on a single process to emulate shuffle-BN "
                             "(8, as in MoCo's official CIFAR-10 demo); 1 = plain BN.")
    shuffle_bn: bool = Field(
        True, description="MoCo only. Shuffle-BN: permute the key batch across ranks before the key encoder (world size > 1). "
                          "On one process (or with this off) the key batch is permuted within the batch and BatchNorm is SplitBatchNorm(bn_splits).")
    sync_bn: bool = Field(False, description="Convert BatchNorm to SyncBatchNorm before deepspeed.initialize.")
    channels_last: bool = Field(
        False, description="Run the encoders' activations in channels_last (NHWC) memory format: the input of every "
                           "encoder pass is converted and each convolution, BatchNorm (SplitBatchNorm included) and "
                           "pooling keeps it. The trained parameters stay NCHW, the layout DeepSpeed flattens and "
                           "reduces, so it works under every ZeRO stage (0, 1, 2) and precision; frozen copies (MoCo "
                           "key encoder, BYOL target) get channels_last weights. Off by default: not yet measured "
                           "faster on a GPU (on the CPU demo it is; benchmarks/bench_split_bn.py).")


class MixSiamConfig(Section):
    mix_lambda: float = Field(
        0.5, ge=0.0, le=1.0, description="lambda_mix of the mixture of the two views x_m = l*x1 + (1-l)*x2 "
                                         "(MixSiam paper: 0.5).")
    loss_lambda: float = Field(
        0.5, ge=0.0, le=1.0, description="L = this * L_siam + (1 - this) * L_mix.")
    aggregation: Literal["max", "mean", "none"] = Field(
        "max", description="Target of the mixed branch: element-wise max (paper) or mean of sg(z1), sg(z2); "
                           "'none' = no aggregated target, L_mix = (D(p_m, sg z1) + D(p_m, sg z2)) / 2 (ablation).")


class MAEConfig(Section):
    """Masked autoencoders (`method.name` = mae, mixedae); ignored by the other methods."""

    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0, description="mae: share of the patch tokens removed per image "
                                                                "(argsort of uniform noise; MAE keeps int(L*(1-r))).")
    norm_pix_loss: bool = Field(True, description="Reconstruction target: each patch's pixels normalized by its own "
                                                  "mean and unbiased variance (MAE's norm_pix_loss), else raw pixels.")


class MixedAEConfig(Section):
    """MixedAE (`method.name` = mixedae): groups of images mixed into one input; the switches give the
    paper's Table A4 ablations."""

    group_size: int = Field(4, ge=2, description="Images per mixed input (1/r; the paper's r = 0.25).")
    cell_tokens: int = Field(2, ge=1, description="Side of a map cell in tokens (2 = the paper's 32x32-pixel cells at "
                                                  "patch 16); each cell comes from one image, balanced over the group.")
    attention: Literal["topk", "global", "segment"] = Field(
        "topk", description="Encoder attention: 'topk' = homologous attention (each patch token keeps its TopK keys, "
                            "the CLS row is global); 'global' = dense (the naive-mixing ablation); 'segment' = "
                            "restricted to the token's true source (Table A4a's leakage check).")
    topk: Optional[int] = Field(None, ge=1, description="K of the homologous attention; null = L / group_size "
                                                        "(49 for ViT-B/16 at 224 px).")
    segment_embed: bool = Field(True, description="Add the sine-cosine embedding of each token's source index to the "
                                                  "input of every encoder block.")
    recon_weight: float = Field(1.0, ge=0.0, description="Weight of the per-source reconstruction loss (0 = HomoCon "
                                                         "alone, Table A4b).")
    homocon_weight: float = Field(1.0, ge=0.0, description="Weight of HomoCon, the SupCon loss over the encoder's "
                                                           "patch tokens with same-source positives (0 = off).")
    homocon_temperature: float = Field(0.07, gt=0.0, description="Temperature of HomoCon.")
    log_topk_accuracy: bool = Field(True, description="Log the TopK accuracy (share of kept keys from the query's "
                                                      "source, mean over blocks); costs one extra score pass per "
                                                      "block.")


class MethodConfig(Section):
    name: str = Field(
        "moco", description="Framework: a method registered in mixfast/methods (moco, simclr, byol, simsiam, mixsiam; "
                            "simclr_adios, byol_adios, simsiam_adios, moco_adios: learned masks, see masker; mae, mixedae: "
                            "ViT masked autoencoders, see mae and mixedae), "
                            "each checking its own rules on this config when the trainer starts.")
    version: Literal[1, 2] = Field(
        2, description="MoCo version. 2: MLP head (model.head='mlp'), mocov2 augmentation. 1: linear head (checked), "
                       "tau 0.07, mocov1 augmentation.")
    queue_size: int = Field(65536, ge=1, description="MoCo: number of negative keys K in the queue.")
    momentum: float = Field(
        0.999, ge=0.0, le=1.0, description="EMA momentum of the key encoder (MoCo m) or target network (BYOL base tau).")
    momentum_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="'cosine' = BYOL's schedule tau_k = 1 - (1 - momentum)(cos(pi k / K) + 1) / 2 "
                                "over the run's K steps; 'constant' = MoCo.")
    temperature: float = Field(0.2, gt=0.0, description="Softmax temperature tau (MoCo, SimCLR).")
    symmetric: bool = Field(
        False, description="MoCo: symmetric loss (both views as query and key, each mixed term scored against "
                           "both key views; Un-Mix (Shen et al.) trains CIFAR MoCo so, after MoCo's CIFAR-10 "
                           "demo); enqueues cat(k1, k2). BYOL/SimSiam/SimCLR are always symmetric in their own loss.")
    mixsiam: MixSiamConfig = Field(default_factory=MixSiamConfig)


class MixMaskConfig(Section):
    enabled: bool = Field(True, description="Add the MixMask branch.")
    kind: Literal["block", "discrete"] = Field(
        "block", description="Mask pattern (MixMask paper, Fig. 1): 'block' = BEiT block masking (rectangles of random "
                             "area and aspect added until ratio*g^2 cells are set), 'discrete' = each cell set "
                             "independently with probability ratio.")
    grid: int = Field(8, ge=2, le=64, description="Mask grid size g (g x g cells upsampled to H x W).")
    ratio: Union[float, tuple[float, float]] = Field(
        0.5, description="Fraction of cells kept from the original image, or [a, b] to draw it per step from U(a, b).")
    per_sample: bool = Field(False, description="One mask per sample (lambda per row) instead of one per batch.")
    fill: Literal["image", "zero", "noise"] = Field(
        "image", description="'image' = MixMask filling; 'zero'/'noise' = erase baselines (no switch term, lambda = 1).")
    switch: bool = Field(True, description="Use the switch (reverse) term (1-lambda)*CE(q_switch, k).")

    @field_validator("ratio")
    @classmethod
    def _ratio_in_range(cls, v):
        # A constant ratio must keep cells of both images. A range may touch 0 or 1 (paper
        # Table 1 draws U(0, 1)): the mask generator never returns an all-0 or all-1 mask.
        if isinstance(v, float):
            ok = 0.0 < v < 1.0
        else:
            lo, hi = v
            ok = 0.0 <= lo <= hi <= 1.0 and lo < 1.0 and hi > 0.0
        if not ok:
            raise ValueError(f"ratio must lie in (0, 1) (a range [a, b] needs 0 <= a <= b <= 1, not [0, 0] or [1, 1]), got {v!r}")
        return v


class UnMixConfig(Section):
    enabled: bool = Field(True, description="Add the Un-Mix branch.")
    prob_mixup: float = Field(
        0.5, ge=0.0, le=1.0, description="P: probability of global mixup (else CutMix) per step; 0.5 with MixMask "
                                         "(MixMask paper, Table 3), 0 for Un-Mix alone on ImageNet "
                                         "(Un-Mix, Shen et al.).")
    alpha: float = Field(1.0, gt=0.0, description="lambda ~ Beta(alpha, alpha).")


class MixingConfig(Section):
    mixmask: MixMaskConfig = Field(default_factory=MixMaskConfig)
    unmix: UnMixConfig = Field(default_factory=UnMixConfig)
    symmetrize: bool = Field(
        False, description="SimCLR/BYOL/SimSiam (our choice: neither paper nor public code fixes it): "
                           "mixtures are built from view 1 and scored against view 2's targets; true also "
                           "mixes view 2 and scores it against view 1's (twice the mixed branches). MoCo uses method.symmetric instead.")


class MaskerConfig(Section):
    """The learned masker of the adversarial-masking methods (`method.name` = simclr_adios, byol_adios,
    simsiam_adios, moco_adios); ignored by the other methods. A null value takes the default of `kind`."""

    kind: Literal["adios", "adios_s", "sequential"] = Field(
        "adios", description="'adios' = N masks partitioning the image (softmax head), every mask used each step; "
                             "'adios_s' = the same masker, one randomly chosen mask per sample per step (ADIOS-s); "
                             "'sequential' = sequential adversarial masking: mask k = sigmoid head conditioned on "
                             "the sum of the earlier masks, with budget, overlap and smoothness penalties.")
    num_masks: Optional[int] = Field(
        None, ge=1, description="N masks per view; null = 4 for adios/adios_s (ImageNet-100-S SimCLR setting), "
                                "5 for sequential (seed paper).")
    width: int = Field(32, ge=1, description="Base width c of the U-Net (the ADIOS code's mask_fbase).")
    blocks: Optional[int] = Field(
        None, ge=3, description="U-Net blocks; null = int(log2(data.image_size) - 1) (32 px: 4, 96 px: 5, 224 px: "
                                "6). The ADIOS SimSiam scripts force 4.")
    norm: Literal["gn", "in", "none"] = Field(
        "gn", description="Norm after each U-Net convolution: GroupNorm(8), InstanceNorm (affine), or none "
                          "(the convolution then has a bias).")
    condition: Literal["features", "input"] = Field(
        "features", description="sequential only: mask k sees S_{k-1} = sum of the earlier masks as an extra "
                                "channel of the head's input ('features', one U-Net pass) or as a 4th input channel "
                                "of the U-Net ('input', N U-Net passes).")
    fill: Literal["mean", "black"] = Field(
        "mean", description="What a removed pixel becomes: 'mean' = 0 after normalization, i.e. the data set's mean "
                            "colour (x * (1 - m), the papers'); 'black' = pixel value 0 before normalization "
                            "(x * (1 - m) + m * (-mean/std)). On images with a uniform black background (the demo "
                            "digits) the grey of 'mean' draws each mask's outline, which tells the encoder the "
                            "shape the masker chose.")
    reduction: Optional[Literal["sum", "mean"]] = Field(
        None, description="How the per-mask terms (encoder loss and masker objective) are combined over the N "
                          "masks; null = 'sum' for adios/adios_s (ADIOS code), 'mean' for sequential (seed paper).")
    lr: float = Field(0.0145, gt=0.0, description="Peak learning rate of the masker's SGD (ADIOS ImageNet-100-S "
                                                  "SimCLR value; not scaled by batch size).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum of the masker.")
    weight_decay: Optional[float] = Field(
        None, ge=0.0, description="Weight decay of the masker; null = optim.weight_decay (the ADIOS code uses the "
                                  "encoder's).")
    warmup_epochs: float = Field(10.0, ge=0.0, description="Linear warm-up of the masker's learning rate, in epochs, "
                                                           "then cosine to min_lr (stepped per iteration).")
    warmup_start_lr: float = Field(0.003, ge=0.0, description="Masker learning rate at the first warm-up step "
                                                              "(ADIOS code: 0.003).")
    min_lr: float = Field(0.0, ge=0.0, description="Floor of the masker's cosine schedule.")
    sparsity_weight: Optional[float] = Field(
        None, ge=0.0, description="alpha_s of the ADIOS sparsity penalty alpha_s * mean_b 1/(sin(pi*s_k) + 1e-10) "
                                  "per mask (s_k = the sample's mean of mask k); null = 1 for adios/adios_s, 0 for "
                                  "sequential.")
    entropy_weight: Optional[float] = Field(
        None, ge=0.0, description="alpha_e of the ADIOS term alpha_e * sum_b sum_k softmax_k(s)*log_softmax_k(s) "
                                  "added to the masker objective; null = 0.")
    budget: float = Field(0.25, gt=0.0, lt=1.0, description="b: the target mean of each mask (sequential budget "
                                                            "penalty alpha_b * (mean(m_k) - b)^2).")
    budget_weight: Optional[float] = Field(
        None, ge=0.0, description="alpha_b; null = 1 for sequential (the seed leaves it open), 0 for adios/adios_s.")
    overlap_weight: Optional[float] = Field(
        None, ge=0.0, description="alpha_o of alpha_o * sum_pixels m_k * S_{k-1} (overlap with the earlier masks); "
                                  "null = 1e-4 for sequential, 0 for adios/adios_s.")
    smoothness_weight: Optional[float] = Field(
        None, ge=0.0, description="alpha_c of alpha_c * sum_pixels (m_k - avgpool3x3(m_k))^2; null = 1e-4 for "
                                  "sequential, 0 for adios/adios_s.")
    simsiam_terms: list[Literal["symmetry", "no_mask", "both_mask"]] = Field(
        default_factory=lambda: ["symmetry", "no_mask", "both_mask"],
        description="simsiam_adios: terms added to D(p1_masked, z2) + D(p2_masked, z1) per mask (the ADIOS code's "
                    "use_symmetry_mask: D(p2, z1_masked) + D(p1, z2_masked); use_no_mask: D(p1, z2) + D(p2, z1); "
                    "use_both_mask: D(p1_masked, z2_masked) + D(p2_masked, z1_masked)); default all, the code's "
                    "argparse default.")


# Data sets read from data.root; the others are generated in memory.
DISK_DATASETS = ("imagefolder", "tinyimagenet", "imagenet100", "cifar10", "cifar100", "stl10")


class DataConfig(Section):
    name: Literal["imagefolder", "tinyimagenet", "imagenet100", "cifar10", "cifar100", "stl10", "demo", "synthetic"] = Field(
        "imagefolder", description="Data set: an ImageFolder tree (ImageNet-1K), Tiny-ImageNet as distributed, ImageNet-100 "
                                   "(an ImageNet tree restricted by data.class_list), CIFAR python pickles, STL-10 binaries "
                                   "(pre-training on train+unlabeled), the built-in demo, or random tensors. Layouts: README 'Data sets'.")
    root: Optional[str] = Field(None, description="Data set directory (required for every data set but demo/synthetic).")
    train_split: str = Field("train", description="Sub-directory (ImageFolder) used for pre-training and the kNN memory bank; "
                                                  "its sorted class folders define the class indices of every split.")
    val_split: str = Field("val", description="Sub-directory (ImageFolder) used for kNN evaluation and by the evaluation commands; "
                                              "labelled with train_split's class indices.")
    unknown_val_classes: Literal["error", "exclude"] = Field(
        "error", description="A class folder of val_split that train_split lacks: 'error' (names it), or 'exclude' "
                             "(its images are left out, with a warning). A train class missing from val_split is a warning.")
    check_cache: str = Field(
        "auto", description="Where the start-up check (every image file is decoded once) keeps its verdicts, keyed by "
                            "path, size and mtime, and the PNG copies of files DALI cannot decode itself: 'auto' = "
                            "<root>/.mixfast when the data directory is writable, else <train.output_dir>/.mixfast; "
                            "'off' = no verdict cache (every run checks every file); or a directory.")
    check_threads: Optional[int] = Field(
        None, ge=1, description="Threads per rank of the start-up check; null = the machine's CPUs / ranks per node.")
    image_size: int = Field(224, ge=8, description="Crop size of both views.")
    augmentation: Literal["mocov2", "mocov1", "cifar", "mae"] = Field(
        "mocov2", description="Two-view recipe, the same for both views: 'mocov2' (MoCo v2), 'mocov1' (MoCo v1), "
                              "'cifar' (Un-Mix's CIFAR code: crop scale 0.08-1, no blur), 'mae' (MAE: crop scale "
                              "0.2-1 with bicubic resize, flip, no colour); see mixfast.data.transforms.")
    crop_min_scale: Optional[float] = Field(
        None, gt=0.0, le=1.0, description="Lower bound of RandomResizedCrop's scale; null = the recipe's (0.2 MoCo, 0.08 CIFAR).")
    hflip: bool = Field(True, description="Random horizontal flip in both views (off for non-mirror-symmetric data such as digits).")
    num_workers: int = Field(8, ge=0, description="DataLoader worker processes per rank (torch loader and kNN loaders).")
    class_list: Optional[str] = Field(
        None, description="imagenet100: file with one ImageNet wnid per line; those class folders of train_split/val_split are used.")
    loader: Literal["auto", "dali", "torch"] = Field(
        "auto", description="Pre-training loader: 'dali' (NVIDIA DALI pipelines, image folders only), 'torch' (PIL + "
                            "DataLoader), 'auto' = dali when DALI is importable and the data set is an image folder "
                            "(imagefolder, tinyimagenet, imagenet100), else torch. Both read the same files, decode "
                            "them to the same pixels and count skipped files alike (README 'Data sets').")
    dali_device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Where the DALI pipeline decodes and augments: 'gpu' (decoders device='mixed'), 'cpu' "
                            "(device_id=None), 'auto' = gpu when the trainer runs on CUDA.")
    dali_threads: Optional[int] = Field(
        None, ge=1, description="DALI CPU threads per rank; null = data.num_workers (at least 1).")
    dali_prefetch: int = Field(2, ge=1, description="DALI prefetch queue depth (batches decoded ahead of the trainer).")
    synthetic_size: int = Field(512, ge=1, description="Number of images of the synthetic data set.")
    num_classes: int = Field(10, ge=1, description="Classes of the synthetic data set.")


class OptimConfig(Section):
    name: Literal["sgd", "adam", "adamw"] = Field(
        "sgd", description="Optimizer: SGD with momentum, Adam (SimCLR/BYOL on CIFAR and Tiny-ImageNet, paper Table 8), "
                           "or AdamW (decoupled weight decay: MAE, MixedAE).")
    lr: float = Field(0.03, gt=0.0, description="Peak learning rate for train.batch_size (no implicit scaling; the MAE "
                                                "recipes compute blr * batch / 256).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum; beta1 of Adam/AdamW.")
    beta2: float = Field(0.999, ge=0.0, lt=1.0, description="beta2 of Adam/AdamW (MAE: 0.95).")
    weight_decay: float = Field(1e-4, ge=0.0, description="Weight decay.")
    no_decay_1d: bool = Field(False, description="No weight decay on 1-D parameters (biases, norms) and on the ViT's "
                                                 "tokens and positions (MAE); false = every parameter decays, as in "
                                                 "the contrastive papers' code.")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="Learning-rate schedule, stepped per iteration.")
    warmup_epochs: float = Field(0.0, ge=0.0, description="Linear warm-up length in epochs.")
    min_lr: float = Field(0.0, ge=0.0, description="Floor of the cosine schedule.")


class TrainConfig(Section):
    epochs: int = Field(200, ge=1, description="Pre-training epochs.")
    batch_size: int = Field(256, ge=2, description="Global batch size (split evenly across ranks).")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps (smoke tests); the schedule still spans `epochs`.")
    seed: int = Field(0, description="Seed of every random choice (masks, mixing, data order, init).")
    precision: Literal["bf16", "fp32"] = Field(
        "bf16", description="bf16 = autocast with fp32 master weights (DeepSpeed torch_autocast); fp32 = no autocast.")
    output_dir: str = Field("runs/default", description="Checkpoints, logs, TensorBoard events and the exported backbone.")
    sequential_backward: Union[Literal["auto"], bool] = Field(
        "auto", description="Backpropagate each query branch (original, Un-Mix, MixMask) right after its forward: "
                            "peak activation memory of one branch instead of all, same gradients, one soft_infonce "
                            "call per branch; MoCo only (the other frameworks share features across branches and backpropagate once). 'auto' = on for CPU runs (host memory binds there), off on GPUs (one "
                            "fused soft_infonce call for all rows).")
    compile: bool = Field(
        False, description="torch.compile the encoders (backbone, projection head, predictor; query and key/target "
                           "alike), each in place (nn.Module.compile), after deepspeed.initialize: parameter names, "
                           "checkpoints and the exported backbone are unchanged. The first steps compile (minutes "
                           "on a CPU; each new batch shape or train/eval switch compiles again).")
    checkpoint_every_steps: int = Field(1000, ge=1, description="Save a checkpoint every N steps (and at the end of the run).")
    checkpoint_every_epochs: int = Field(
        1, ge=0, description="Also save at the end of every N-th epoch (0: only every checkpoint_every_steps and at "
                             "the end). Resuming is exact from any checkpoint, mid-epoch too; a save costs ~35 ms on "
                             "the demo (34 MB), so its 22-step epochs use 0.")
    keep_checkpoints: int = Field(2, ge=1, description="How many step checkpoints to keep on disk.")
    resume: str = Field("auto", description="'auto' = latest checkpoint in output_dir if any, 'none' = fresh start, or a checkpoint tag.")


class EvalConfig(Section):
    knn_every: int = Field(10, ge=0, description="Run the kNN monitor every N epochs (0 = only at the end).")
    knn_k: int = Field(200, ge=1, description="Neighbours k.")
    knn_t: float = Field(0.1, gt=0.0, description="Temperature of the neighbour weights exp(sim / t).")
    knn_at_start: bool = Field(False, description="Also evaluate the randomly initialised encoder before training.")
    knn_features: Literal["backbone", "projector"] = Field("backbone", description="Features used by the kNN monitor.")


class LogConfig(Section):
    every_steps: int = Field(10, ge=1, description=(
        "Write scalars every N steps. Also how often a step's values are read back from the device (the "
        "one host sync of the training loop) and non-finite losses are noticed."))
    tensorboard: bool = Field(True, description="Write TensorBoard events to output_dir/tb.")
    progress: bool = Field(True, description="Show a progress bar (rank 0).")
    image_grid: bool = Field(True, description="Save a PNG grid of masks and mixed/switch images for the first batch.")


DEEPSPEED_DEFAULTS: dict[str, Any] = {
    # DeepSpeed's default became 1.0; the papers (MoCo, MixMask, Un-Mix) train without clipping.
    "gradient_clipping": 0.0,
    "zero_optimization": {"stage": 0},
    # torch.optim.SGD is not on DeepSpeed's list of ZeRO-tested optimizers.
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 10**9,
    "wall_clock_breakdown": False,
}


class RunConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    mixing: MixingConfig = Field(default_factory=MixingConfig)
    masker: MaskerConfig = Field(default_factory=MaskerConfig)
    mae: MAEConfig = Field(default_factory=MAEConfig)
    mixedae: MixedAEConfig = Field(default_factory=MixedAEConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to deepspeed.initialize after mixfast fills train_batch_size, micro batch and precision.")

    @model_validator(mode="after")
    def _check_data_root(self):
        if self.data.name in DISK_DATASETS and not self.data.root:
            raise ValueError(f"data.root is required for data.name={self.data.name!r}")
        if self.data.name == "imagenet100" and not self.data.class_list:
            raise ValueError("data.class_list is required for data.name='imagenet100' (one wnid per line)")
        if self.data.loader == "dali" and self.data.name not in ("imagefolder", "tinyimagenet", "imagenet100"):
            raise ValueError(f"data.loader='dali' reads JPEG trees (imagefolder, tinyimagenet, imagenet100); "
                             f"use 'torch' or 'auto' for data.name={self.data.name!r}")
        return self


# ---------------------------------------------------------------------------------------------
# Loading, overrides, errors
# ---------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config problem, worded for the person editing the config: it names the dotted key."""


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a JSON config, apply ``a.b.c=value`` overrides in order, validate, check the data path."""
    cfg = config_from_dict(_read_json(Path(path)), overrides, source=str(path))
    # Fail at load time rather than after the model is built in to_deepspeed_config.
    _reject_deepspeed_precision(cfg.deepspeed)
    return cfg


def config_from_dict(raw: dict[str, Any], overrides: Sequence[str] = (), *, source: str) -> RunConfig:
    """Apply ``a.b.c=value`` overrides to a raw config dict (in place, in order), validate it and check
    that data.root exists; errors are ConfigErrors naming the key and ``source``."""
    for override in overrides:
        _apply_override(raw, override)
    cfg = _validate(raw, source=source)
    _check_data_root_exists(cfg)
    return cfg


def dump_config(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain JSON types (tuples become lists); load_config reads it back unchanged."""
    return cfg.model_dump(mode="json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object, got {type(data).__name__}")
    return data


def _check_data_root_exists(cfg: RunConfig) -> None:
    if cfg.data.name in DISK_DATASETS and not Path(cfg.data.root).exists():
        raise ConfigError(
            f"data.root: {cfg.data.root} does not exist (data.name={cfg.data.name!r} reads from it); "
            f"fix the path in the config or pass --set data.root=PATH")


# --- walking the schema -----------------------------------------------------------------------


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_free_form(annotation: Any) -> bool:
    """The `deepspeed` pass-through: any key below it is accepted and left to DeepSpeed."""
    return annotation is dict or get_origin(annotation) is dict


def _unknown_key_message(path: Sequence[str], model: type[BaseModel]) -> str:
    allowed = list(model.model_fields)
    message = f"{'.'.join(path)}: unknown key; allowed keys: {', '.join(allowed)}"
    close = difflib.get_close_matches(path[-1], allowed, n=1)
    if close:
        message += f" (did you mean {'.'.join([*path[:-1], close[0]])}?)"
    return message


def _split_loc(loc: Sequence[Any]) -> tuple[list[str], tuple[Any, ...], Optional[type[BaseModel]]]:
    """Split a pydantic error location into the schema key path and what lies below it.

    Below a leaf field pydantic adds union-member names and tuple indices
    (``ratio, 'tuple[float, float]', 1``); those are detail, not keys. Also returns the
    section the path ends in (None when it ends in a leaf), whose keys are the allowed ones.
    """
    model: Optional[type[BaseModel]] = RunConfig
    path: list[str] = []
    for i, part in enumerate(loc):
        if model is None or part not in model.model_fields:
            return path, tuple(loc[i:]), model
        path.append(part)
        annotation = model.model_fields[part].annotation
        model = annotation if _is_section(annotation) else None
    return path, (), model


# --- pydantic errors -> ConfigError ---------------------------------------------------------------


def _validate(raw: dict[str, Any], source: str) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = "\n".join(f"  {_describe_error(err)}" for err in e.errors())
        raise ConfigError(f"invalid config {source}:\n{lines}") from None


def _describe_error(err: dict[str, Any]) -> str:
    path, below, model = _split_loc(err["loc"])
    if err["type"] == "extra_forbidden":
        return _unknown_key_message([*path, str(below[0])], model)
    reason = err["msg"].removeprefix("Value error, ")
    if below:
        reason += f" (as {', '.join(str(p) if isinstance(p, str) else f'item {p}' for p in below)})"
    if not path:  # a whole-config check (RunConfig validator): its message names the keys
        return reason
    return f"{'.'.join(path)} = {_show_value(err['input'])}: {reason}"


def _show_value(value: Any) -> str:
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


# --- --set overrides --------------------------------------------------------------------------


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in the raw config dict, creating missing sections on the way."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE with a dotted key, e.g. mixing.mixmask.grid=4")
    parts = key.strip().split(".")
    annotation = _override_target(parts, override)
    node = raw
    for depth, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override}: {'.'.join(parts[:depth + 1])} is {_show_value(node)} in the config file, not an object")
    node[parts[-1]] = _parse_override_value(text, annotation)


def _override_target(parts: list[str], override: str) -> Any:
    """Annotation of the schema entry at `parts` (Any inside the deepspeed dict); unknown paths raise."""
    model = RunConfig
    for depth, part in enumerate(parts):
        if part not in model.model_fields:
            raise ConfigError(f"--set {override}: {_unknown_key_message(parts[:depth + 1], model)}")
        annotation = model.model_fields[part].annotation
        if _is_free_form(annotation):
            return Any
        if depth == len(parts) - 1:
            return annotation
        if not _is_section(annotation):
            raise ConfigError(f"--set {override}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        model = annotation


def _parse_override_value(text: str, annotation: Any) -> Any:
    """JSON when the text parses as JSON, else the text itself (so data.name=synthetic works)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    # A string field keeps the text as typed: train.resume=1000 is checkpoint tag "1000", not
    # an int that pydantic would reject. null still clears an optional string.
    if annotation in (str, Optional[str]) and value is not None and not isinstance(value, str):
        return text
    return value


# --- DeepSpeed ------------------------------------------------------------------------------


# Keys mixfast derives from its own sections; a second, conflicting source would be ignored silently.
_DERIVED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.batch_size (split evenly across ranks)",
    "gradient_accumulation_steps": "nothing: mixfast steps once per batch, as the queue and EMA updates assume",
    "torch_autocast": "train.precision",
}


def to_deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The dict for ``deepspeed.initialize(config=...)``: defaults, the user's section, then derived keys."""
    _reject_derived_keys(cfg.deepspeed)
    _reject_deepspeed_precision(cfg.deepspeed)
    ds = deep_merge(DEEPSPEED_DEFAULTS, cfg.deepspeed)
    ds.update(_batch_keys(cfg.train.batch_size, world_size))
    _set_precision(ds, cfg.train.precision)
    return ds


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A copy of base with override merged in: nested dicts merge key by key, other values replace."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _reject_derived_keys(user: dict[str, Any]) -> None:
    for key, source in _DERIVED_DEEPSPEED_KEYS.items():
        if key in user:
            raise ConfigError(f"deepspeed.{key}: set by mixfast from {source}; remove it from the deepspeed section")


def _reject_deepspeed_precision(user: dict[str, Any]) -> None:
    for block in ("bf16", "fp16"):
        value = user.get(block)
        enabled = value.get("enabled", False) if isinstance(value, dict) else value
        if enabled:
            raise ConfigError(
                f"deepspeed.{block}.enabled: DeepSpeed's {block} mode casts the model weights to {block}, and the "
                f"momentum key encoder then stops moving (an m=0.999 EMA update is below {block} resolution, "
                f"so its weights must stay fp32). Remove deepspeed.{block} and set train.precision=\"bf16\" instead: "
                "autocast with fp32 weights.")


def _batch_keys(batch_size: int, world_size: int) -> dict[str, int]:
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={batch_size} is not divisible by the world size {world_size}; "
            f"every rank gets the same micro-batch, so pick a multiple of {world_size}")
    return {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": batch_size // world_size,
        "gradient_accumulation_steps": 1,
    }


def _set_precision(ds: dict[str, Any], precision: str) -> None:
    # DeepSpeed's bf16/fp16 blocks would cast the weights (see _reject_deepspeed_precision): keep
    # them off explicitly and get mixed precision from autocast around fp32 weights instead.
    for block in ("bf16", "fp16"):
        existing = ds.get(block)
        ds[block] = {**(existing if isinstance(existing, dict) else {}), "enabled": False}
    if precision == "bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}


# --- reference documentation --------------------------------------------------------------------


_BOUND_SYMBOLS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}


def config_reference_markdown() -> str:
    """Markdown tables of every config key (dotted path, type, default, description)."""
    lines = [
        "## Configuration reference",
        "",
        "One JSON file holds every section; any key left out takes the default below. "
        "Override any key from the command line with `--set a.b.c=value` (JSON values; "
        "anything that is not JSON is a string). Unknown keys are errors.",
    ]
    for prefix, model in _sections(RunConfig, ""):
        leaves = {name: f for name, f in model.model_fields.items() if not _is_section(f.annotation)}
        if not leaves:
            continue
        lines += ["", f"### `{prefix}`" if prefix else "### Top-level keys", "",
                  "| key | type | default | description |", "|---|---|---|---|"]
        lines += [_markdown_row(f"{prefix}.{name}" if prefix else name, f) for name, f in leaves.items()]
    lines += [
        "",
        "### DeepSpeed section",
        "",
        "`deepspeed` is merged over these defaults, then mixfast sets `train_batch_size`, "
        "`train_micro_batch_size_per_gpu` (= `train.batch_size` / world size), "
        "`gradient_accumulation_steps` = 1 and, for `train.precision` = `bf16`, "
        "`torch_autocast` = bfloat16. DeepSpeed's own `bf16`/`fp16` blocks are refused: they cast "
        "the weights, which stalls the momentum encoder.",
        "",
        "```json",
        json.dumps(DEEPSPEED_DEFAULTS, indent=2),
        "```",
    ]
    return "\n".join(lines) + "\n"


def _sections(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, type[BaseModel]]]:
    """Every section below `model` depth-first, then `model` itself (so top-level keys come last)."""
    for name, field in model.model_fields.items():
        if _is_section(field.annotation):
            yield from _sections(field.annotation, f"{prefix}.{name}" if prefix else name)
    yield prefix, model


def _markdown_row(path: str, field: FieldInfo) -> str:
    default = _show_value(field.get_default(call_default_factory=True))
    cells = [f"`{path}`", _type_label(field.annotation) + _bounds_label(field), f"`{default}`", field.description or ""]
    # A literal | would end the table cell.
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _type_label(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is Union:
        return " | ".join(_type_label(a) for a in args)
    if origin is tuple:
        return "[" + ", ".join(_type_label(a) for a in args) + "]"
    if _is_free_form(annotation):
        return "object"
    if annotation is type(None):
        return "null"
    return annotation.__name__


def _bounds_label(field: FieldInfo) -> str:
    bounds = [f"{symbol} {getattr(m, attr)}" for m in field.metadata
              for attr, symbol in _BOUND_SYMBOLS.items() if hasattr(m, attr)]
    return f" ({', '.join(bounds)})" if bounds else ""


# --- command line ---------------------------------------------------------------------------------


README_BEGIN, README_END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def replace_marked_block(text: str, begin: str, end: str, content: str) -> str:
    """`text` with the part between the `begin` and `end` marker lines replaced by `content`."""
    if begin not in text or end not in text:
        raise ValueError(f"markers {begin} / {end} not found")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{content.strip()}\n{end}{tail}"


def replace_reference_block(text: str) -> str:
    """`text` with the part between the README markers replaced by the current reference."""
    return replace_marked_block(text, README_BEGIN, README_END, config_reference_markdown())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mixfast.config",
        description="Print the config reference, or check a config and print it fully resolved.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--markdown", action="store_true", help="print the markdown reference of every key")
    action.add_argument("--config", help="JSON config to load, validate and print resolved")
    action.add_argument("--readme", metavar="PATH",
                        help="rewrite the reference between the config-reference markers of a markdown file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key, e.g. --set mixing.mixmask.grid=4 (repeatable)")
    args = parser.parse_args(argv)
    if args.markdown:
        if args.overrides:
            parser.error("--set applies to --config only")
        print(config_reference_markdown(), end="")
        return 0
    if args.readme:
        with open(args.readme, encoding="utf-8") as f:
            text = f.read()
        with open(args.readme, "w", encoding="utf-8") as f:
            f.write(replace_reference_block(text))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(dump_config(cfg), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
