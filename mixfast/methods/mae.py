"""MAE (He et al., 2022) and MixedAE (Chen et al., 2023): ViT masked autoencoders.

MAE: the encoder sees a random 25% of the patch tokens (`mae.mask_ratio` 0.75, argsort of
uniform noise drawn from (seed, rank, step)), the decoder fills the rest with a mask token and
predicts every patch's pixels; the loss is the MSE on the removed patches against per-patch
normalized pixels, (x - mean) / sqrt(var + 1e-6) with the unbiased variance (`mae.norm_pix_loss`).

MixedAE: the batch is cut into groups of `mixedae.group_size` images (r = 1 / group_size); each
group becomes ONE mixed image, every cell of `mixedae.cell_tokens`² tokens taken from one image
of the group, the cells balanced over the images (`ops.group_mix`, the map drawn from
(seed, step) with Philox like MixMask's masks). The encoder reads every token of the mixed image:
* segment embeddings: the sine-cosine code of each token's source index, added to the input of
  every encoder block (`mixedae.segment_embed`);
* homologous attention (`mixedae.attention="topk"`): each patch token attends only to the TopK
  keys it scores highest (`ops.topk_attention`, K = L / group_size by default), the CLS row
  attends to all; "global" = dense attention (the paper's naive mixing), "segment" = attention
  restricted to the token's own source by the true segment ids (the paper's Table A4a check);
* HomoCon (`mixedae.homocon_weight`): SupCon over the L2-normalized encoder patch tokens of one
  mixed image, positives = the tokens of the same source, self excluded, tau 0.07;
* reconstruction (`mixedae.recon_weight`), MAE's convention per source: for source i the
  decoder sees the encoder tokens where the map says i and the mask token elsewhere, and is
  scored on those other positions against image i's normalized pixels. All sources of all
  groups go through the decoder in one call.
The encoder thus processes B / group_size images of L tokens: the same token count as MAE's
B images of L / 4 visible tokens at ratio 0.75.

TopK accuracy (the share of the kept keys that come from the query's own source, averaged over
the encoder's blocks) is logged; chance is about 1 / group_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixfast import ops
from mixfast.config import ConfigError, RunConfig
from mixfast.methods.base import Backward, Method, StepResult, register
from mixfast.mixing.rng import step_generator
from mixfast.models import is_vit
from mixfast.models.vit import MAEDecoder, VisionTransformer, build_mae_decoder, build_vit, patchify, unpatchify

STREAM_MAE_MASK = 6  # mixing.rng streams 1-4 are the mixers', 5 ADIOS-s
PIX_EPS = 1e-6  # MAE's norm_pix_loss guard


# --- losses (each checked against an independent computation in tests/test_mae.py) ----------------

def pixel_target(imgs: torch.Tensor, patch: int, normalize: bool = True) -> torch.Tensor:
    """[B, L, p*p*C] float32 patches of `imgs`, each normalized by its own mean and unbiased variance."""
    target = patchify(imgs.float(), patch)
    if normalize:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as torch's default in MAE's code
        target = (target - mean) / (var + PIX_EPS) ** 0.5
    return target


def predicted_pixels(pred: torch.Tensor, imgs: torch.Tensor, patch: int, normalized: bool) -> torch.Tensor:
    """A prediction back in the input's (normalized) pixel space, for the image grid: a normalized-pixel
    prediction takes each true patch's mean and spread."""
    pred = pred.float()
    if normalized:
        raw = patchify(imgs.float(), patch)
        pred = pred * (raw.var(-1, keepdim=True) + PIX_EPS) ** 0.5 + raw.mean(-1, keepdim=True)
    return unpatchify(pred, patch)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """MSE per patch, averaged over the removed patches (`removed` [B, L], 1 = scored)."""
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    removed = removed.to(per_patch.dtype)
    return (per_patch * removed).sum() / removed.sum()


def homocon_loss(tokens: torch.Tensor, segment: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """SupCon within each sample: tokens [G, L, D], segment ids [G, L]. For anchor a with positives
    P(a) (same id, a excluded): -1/|P(a)| sum_p log(exp(s_ap) / sum_{j != a} exp(s_aj)), s = cos / tau;
    the mean over the anchors that have a positive, then over the samples."""
    z = F.normalize(tokens.float(), dim=-1)
    logits = torch.einsum("gid,gjd->gij", z, z) / temperature
    n = logits.size(-1)
    self_mask = torch.eye(n, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    positive = (segment[:, :, None] == segment[:, None, :]) & ~self_mask
    count = positive.sum(-1)
    per_anchor = -(log_prob.masked_fill(~positive, 0.0)).sum(-1) / count.clamp(min=1)
    has = (count > 0).to(per_anchor.dtype)
    return ((per_anchor * has).sum(-1) / has.sum(-1).clamp(min=1)).mean()


# --- the trained module -----------------------------------------------------------------------------

class MaskedAutoencoder(nn.Module):
    """What DeepSpeed trains: the ViT encoder (`backbone`, read by the kNN monitor and exported) and
    the MAE decoder (`head`). `forward(img, generator)` is MAE's; `forward(mixed, segment, attn_fn)` MixedAE's
    (dispatched on `mixed`, fixed at construction)."""

    def __init__(self, backbone: VisionTransformer, decoder: MAEDecoder, mixed: bool = False,
                 mask_ratio: float = 0.75, group_size: int = 4):
        super().__init__()
        self.backbone, self.head, self.mixed = backbone, decoder, mixed
        self.mask_ratio, self.group_size = mask_ratio, group_size  # MAE's share of removed tokens; MixedAE's sources

    def forward(self, img: torch.Tensor, aux, attn_fn=None, segment_embed: bool = True):
        if self.mixed:
            return self._forward_mixed(img, aux, attn_fn, segment_embed)
        return self._forward_mae(img, aux)

    def _forward_mae(self, img: torch.Tensor, generator: torch.Generator):
        """MAE's argsort masking with noise from `generator` (kept: the int(L * (1 - ratio)) lowest).
        Returns (pred [B, L, p*p*C], removed [B, L], 1 = removed)."""
        latent, removed, ids_restore = self.backbone.forward_masked(img, self.mask_ratio, generator)
        return self.head(latent, ids_restore), removed

    def _forward_mixed(self, mixed: torch.Tensor, segment: torch.Tensor, attn_fn, segment_embed: bool):
        """mixed [G, C, H, W], segment [G, L] (source index per token). Returns (pred [G*gs, L, p*p*C]
        for source rows g*gs + i, scored [G*gs, L] = where the source is not i, encoder tokens [G, 1+L, D])."""
        tokens = self.backbone.patch_tokens(mixed)
        latent = self.backbone.forward_features(tokens, segment=segment if segment_embed else None, attn_fn=attn_fn)
        gs = self.group_size
        source = torch.arange(gs, device=segment.device).repeat(segment.size(0))[:, None]  # [G*gs, 1]
        visible = segment.repeat_interleave(gs, dim=0) == source  # [G*gs, L]
        pred = self.head.forward_keep(latent.repeat_interleave(gs, dim=0), visible)
        return pred, (~visible).to(torch.float32), latent


def build_autoencoder(cfg: RunConfig) -> MaskedAutoencoder:
    mc, size = cfg.model, cfg.data.image_size
    backbone = build_vit(mc.arch, img_size=size, pool=mc.pool)
    decoder = build_mae_decoder(mc.arch, img_size=size)
    return MaskedAutoencoder(backbone, decoder, cfg.method.name == "mixedae", cfg.mae.mask_ratio,
                             cfg.mixedae.group_size)


# --- the methods ------------------------------------------------------------------------------------

class MAE(Method):
    """One view (x1; the loader's second view is not used), masked at `mae.mask_ratio`."""

    def training_step(self, engine, x1, x2, step, backward: Backward, sequential: bool = False) -> StepResult:
        module = engine.module
        p = module.backbone.patch_size
        gen = step_generator(self.cfg.train.seed, self.rank, STREAM_MAE_MASK, step, device=x1.device)
        with self.autocast(x1.device.type):
            pred, removed = engine(x1, gen)
        target = pixel_target(x1, p, self.cfg.mae.norm_pix_loss)
        loss = reconstruction_loss(pred, target, removed)
        backward(loss, True)
        images = {"input": x1,
                  "visible": lambda: x1 * unpatchify((1 - removed)[..., None].expand(-1, -1, p * p * 3), p),
                  "reconstruction": lambda: predicted_pixels(pred.detach(), x1, p, self.cfg.mae.norm_pix_loss)}
        return StepResult(loss.detach(), {"loss_recon": loss.detach()}, images)


class MixedAE(Method):
    """Groups of `mixedae.group_size` images mixed into one (see the module docstring)."""

    def __init__(self, cfg: RunConfig, rank: int = 0, world_size: int = 1):
        super().__init__(cfg, rank, world_size)
        self.mc = cfg.mixedae
        # the cell maps differ per rank: (seed, rank) folded into the Philox seed
        self.map_seed = (cfg.train.seed * 1_000_003 + rank) & 0x7FFFFFFF

    def topk(self, num_tokens: int) -> int:
        return self.mc.topk or max(1, round(num_tokens / self.mc.group_size))

    def _attention(self, segment_full: torch.Tensor, topk: int, stats: list):
        """The encoder's attention per `mixedae.attention`; collects each block's TopK accuracy."""
        how = self.mc.attention
        if how == "global":
            if not self.mc.log_topk_accuracy:
                return None

            def dense(q, k, v):
                stats.append(ops.topk_accuracy(q, k, segment_full, topk, 1, validate=False))
                return F.scaled_dot_product_attention(q, k, v)
            return dense
        if how == "segment":
            same = segment_full[:, None, :, None] == segment_full[:, None, None, :]
            same[:, :, 0, :] = True  # the CLS row is global
            same[:, :, :, 0] = True  # every token sees the CLS token

            def within(q, k, v):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=same)
            return within

        def homologous(q, k, v):
            if self.mc.log_topk_accuracy:
                stats.append(ops.topk_accuracy(q, k, segment_full, topk, 1, validate=False))
            return ops.topk_attention(q, k, v, topk, 1, validate=False)
        return homologous

    def training_step(self, engine, x1, x2, step, backward: Backward, sequential: bool = False) -> StepResult:
        module = engine.module
        vit = module.backbone
        p, gs = vit.patch_size, self.mc.group_size
        if x1.size(0) % gs:
            raise ValueError(f"mixedae: the per-rank batch ({x1.size(0)}) must be a multiple of "
                             f"mixedae.group_size={gs}")
        cells = vit.grid_size[0] // self.mc.cell_tokens
        cell_map = ops.group_cell_map(x1.size(0) // gs, gs, cells, seed=self.map_seed, step=step)
        if x1.device.type == "cuda":
            cell_map = cell_map.pin_memory()  # the copy in group_mix is then asynchronous (no host sync)
        mixed, segment = ops.group_mix(x1, cell_map, p, gs, validate=False)
        segment_full = F.pad(segment, (1, 0), value=-1)  # the CLS token belongs to no source
        accuracies: list = []
        attn_fn = self._attention(segment_full, self.topk(segment.size(1)), accuracies)
        with self.autocast(x1.device.type):
            pred, scored, latent = engine(mixed, segment, attn_fn, self.mc.segment_embed)
        stats: dict = {}
        loss = torch.zeros((), device=x1.device)
        if self.mc.recon_weight:
            recon = reconstruction_loss(pred, pixel_target(x1, p, self.cfg.mae.norm_pix_loss), scored)
            stats["loss_recon"] = recon.detach()
            loss = loss + self.mc.recon_weight * recon
        if self.mc.homocon_weight:
            homocon = homocon_loss(latent[:, 1:], segment, self.mc.homocon_temperature)
            stats["loss_homocon"] = homocon.detach()
            loss = loss + self.mc.homocon_weight * homocon
        if accuracies:
            stats["topk_accuracy"] = torch.stack(accuracies).mean()
        backward(loss, True)
        images = {"group": x1[:gs], "mixed": mixed[:1].detach(),
                  "reconstruction": lambda: predicted_pixels(pred[:gs].detach(), x1[:gs], p,
                                                             self.cfg.mae.norm_pix_loss)}
        return StepResult(loss.detach(), stats, images)


# --- registration -----------------------------------------------------------------------------------

def check_autoencoder_config(cfg: RunConfig) -> None:
    name, mc = cfg.method.name, cfg.model
    if not is_vit(mc.arch):
        raise ConfigError(f"method.name={name!r} trains a ViT: set model.arch to a ViT (vit_tiny, vit_small_patch16, "
                          f"vit_base_patch16, vit_large_patch16), not {mc.arch!r}")
    on = [k for k, enabled in (("mixing.mixmask.enabled", cfg.mixing.mixmask.enabled),
                               ("mixing.unmix.enabled", cfg.mixing.unmix.enabled)) if enabled]
    if on:
        raise ConfigError(f"method.name={name!r} does not use the MixMask / Un-Mix branches: set "
                          + " and ".join(f"{k}=false" for k in on))
    if cfg.eval.knn_features != "backbone":
        raise ConfigError(f"method.name={name!r}: eval.knn_features must be 'backbone' (its head is the decoder)")
    try:
        with torch.device("meta"):
            vit = build_vit(mc.arch, img_size=cfg.data.image_size)
    except ValueError as err:
        raise ConfigError(f"model.arch={mc.arch!r} with data.image_size={cfg.data.image_size}: {err}") from None
    if name == "mixedae":
        x = cfg.mixedae
        side = vit.grid_size[0]
        if side % x.cell_tokens:
            raise ConfigError(f"mixedae.cell_tokens={x.cell_tokens} must divide the {side}x{side} token grid of "
                              f"model.arch={mc.arch!r} at data.image_size={cfg.data.image_size}")
        if (side // x.cell_tokens) ** 2 < x.group_size:
            raise ConfigError(f"mixedae.group_size={x.group_size} is more than the {(side // x.cell_tokens) ** 2} "
                              f"cells of the map (mixedae.cell_tokens={x.cell_tokens})")
        per_rank = cfg.train.batch_size  # divided by the world size later; checked again per rank at the step
        if per_rank % x.group_size:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be a multiple of "
                              f"mixedae.group_size={x.group_size} (per rank)")
        if x.topk is not None and not 1 <= x.topk <= vit.num_patches + 1:
            raise ConfigError(f"mixedae.topk={x.topk} must be in [1, {vit.num_patches + 1}] (the tokens of an image)")
        if not (x.recon_weight or x.homocon_weight):
            raise ConfigError("mixedae.recon_weight and mixedae.homocon_weight are both 0: nothing to train")


@register("mae", check=check_autoencoder_config)
def build_mae(cfg: RunConfig, rank: int, world_size: int):
    return build_autoencoder(cfg), MAE(cfg, rank, world_size)


@register("mixedae", check=check_autoencoder_config)
def build_mixedae(cfg: RunConfig, rank: int, world_size: int):
    return build_autoencoder(cfg), MixedAE(cfg, rank, world_size)


__all__ = ["MAE", "MixedAE", "MaskedAutoencoder", "pixel_target", "reconstruction_loss", "homocon_loss",
           "predicted_pixels"]
