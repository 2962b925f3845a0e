"""Adversarial masking: ADIOS (Shi et al., 2022), ADIOS-s and sequential adversarial masking, on
SimCLR, BYOL, SimSiam and (an extension without a reference) MoCo.

A U-Net masker (`methods.masker`) makes N masks of a view; the encoder learns to match the
clean view with each occluded copy x * (1 - m_k) while the masker learns to make that hard.
Per batch, in the reference code's order:

1. encoder step (`training_step`): masks computed once, detached, the encoder loss
   reduce_k L(view, occluded view_k) backpropagated, then the trainer's `engine.step()`;
2. masker step (`after_step`, so after the encoder's optimizer step): the same batch through the
   updated encoder (BatchNorm in train mode), the masker objective (`masker.objective`)
   ascended with gradients w.r.t. the masker only (no encoder `.grad` is written).

The masker has no running statistics, so its masks are the same in both steps as long as its
weights are: the masks of step 1 are computed with their graph and step 2 reuses them (one
masker forward per batch). ADIOS-s (`masker.kind="adios_s"`) uses one mask per sample, drawn
from (seed, rank, step) and shared by both steps.

Which view is occluded: SimCLR and BYOL view 2 (the masker reads view 2); SimSiam both views,
each with its own masks; MoCo view 1 (the queries), the clean keys of view 2 are enqueued.
Mixing branches (MixMask, Un-Mix) do not apply: the masks are learned.
"""

from __future__ import annotations

import torch
from torch import nn

from mixfast import ops
from mixfast.config import ConfigError, RunConfig
from mixfast.data.transforms import mean_std
from mixfast.methods.base import Backward, Method, StepResult, register
from mixfast.methods.byol import BYOL
from mixfast.methods.encoders import build_predictor_encoder, build_query_encoder, finalize
from mixfast.methods.masker import AdversarialMasker, MaskerSettings, mask_stats, objective, reduce_masks
from mixfast.methods.moco import MoCo
from mixfast.methods.simclr import SimCLR
from mixfast.methods.simsiam import SimSiam
from mixfast.mixing.rng import step_generator
from mixfast.models import convert_to_split_bn
from mixfast.models.unet import MaskerUNet
from mixfast.ops.mix import to_device

STREAM_ADIOS_S = 5  # mixing.rng streams 1-4 are the mixers'


class AdversarialStep(Method):
    """The alternating encoder / masker step. Listed before the framework's Method class in the
    bases; the framework supplies `masked_losses` (one encoder loss per mask) and `masked_views`."""

    masked_views: tuple[int, ...] = (2,)  # the views (1, 2) the masker occludes

    def init_masker(self) -> None:
        self.masker = AdversarialMasker(self.cfg)
        self.settings = self.masker.settings
        self._pending: tuple | None = None  # what the masker step needs from the encoder step
        self._fill: dict[torch.device, torch.Tensor] = {}  # masker.fill per device, copied there once

    def fill(self, device: torch.device) -> torch.Tensor | None:
        """The value of removed pixels per channel in normalized space (None = 0, `masker.fill=mean`)."""
        if self.cfg.masker.fill == "mean":
            return None
        if device not in self._fill:
            mean, std = mean_std(self.cfg.data.augmentation)
            self._fill[device] = (-torch.tensor(mean) / torch.tensor(std)).to(device)
        return self._fill[device]

    def set_total_steps(self, total_steps: int) -> None:
        super().set_total_steps(total_steps)
        self.masker.set_total_steps(total_steps)

    def masked_losses(self, encode, x1: torch.Tensor, x2: torch.Tensor, occluded: dict[int, torch.Tensor],
                      clean_grad: bool) -> list[torch.Tensor]:
        """One encoder loss per mask. `encode` is the engine (encoder step) or its module (masker step);
        `occluded[v]` [N, B, C, H, W] the occluded copies of view v; `clean_grad=False` (masker step) runs
        the clean views without a graph (the masker's gradient reaches only the occluded views)."""
        raise NotImplementedError

    def prepare(self, x1: torch.Tensor, x2: torch.Tensor, step: int) -> None:
        """Work of the encoder step before the masks (MoCo: the keys); nothing by default."""

    # --- masks ---------------------------------------------------------------------------------
    def _used(self, masks: torch.Tensor, step: int) -> torch.Tensor:
        """ADIOS-s: one of the N masks per sample, a pure function of (seed, rank, step); else all."""
        if self.settings.kind != "adios_s":
            return masks
        gen = step_generator(self.cfg.train.seed, self.rank, STREAM_ADIOS_S, step)
        choice = to_device(torch.randint(0, masks.size(1), (masks.size(0),), generator=gen), masks.device)
        return masks.gather(1, choice.view(-1, 1, 1, 1).expand(-1, 1, *masks.shape[-2:]))

    def _occluded(self, views: dict[int, torch.Tensor], used: dict[int, torch.Tensor],
                  detach: bool) -> dict[int, torch.Tensor]:
        return {v: ops.occlude(views[v], used[v].detach() if detach else used[v], self.fill(views[v].device),
                               validate=False) for v in used}

    @staticmethod
    def _encode(encode, clean: list[torch.Tensor], masked: list[torch.Tensor], clean_grad: bool) -> tuple[list, list]:
        """Outputs for the clean and the masked views: one engine call when all need a graph."""
        if clean_grad:
            out = encode(*clean, *masked)
            return list(out[:len(clean)]), list(out[len(clean):])
        with torch.no_grad():
            clean_out = list(encode(*clean))
        return clean_out, list(encode(*masked))

    # --- the two steps ---------------------------------------------------------------------------
    def training_step(self, engine, x1: torch.Tensor, x2: torch.Tensor, step: int, backward: Backward,
                      sequential: bool = False) -> StepResult:
        self.momentum_update(engine.module, step)  # MoCo's key encoder, BYOL's target (none for the others)
        views = {1: x1, 2: x2}
        with self.autocast(x1.device.type):
            self.prepare(x1, x2, step)
            masks = {v: self.masker(views[v]) for v in self.masked_views}  # with graph: reused by the masker step
            used = {v: self._used(m, step) for v, m in masks.items()}
            losses = self.masked_losses(engine, x1, x2, self._occluded(views, used, detach=True), clean_grad=True)
        loss = reduce_masks(losses, self.settings.reduction)
        backward(loss, True)
        self._pending = (engine, x1, x2, step, masks, used)
        stats: dict = {"loss_encoder": loss.detach()}
        for v, m in masks.items():
            stats.update(mask_stats(m, prefix=f"v{v}_" if len(masks) > 1 else ""))
        return StepResult(loss.detach(), stats, self._grid(views, masks, used))

    def after_step(self, result: StepResult) -> None:
        """The masker step, on the same batch through the encoder the optimizer just updated."""
        engine, x1, x2, step, masks, used = self._pending
        self._pending = None
        views = {1: x1, 2: x2}
        with self.autocast(x1.device.type):
            losses = self.masked_losses(engine.module, x1, x2, self._occluded(views, used, detach=False),
                                        clean_grad=False)
        total, logged = objective(losses, list(masks.values()), self.settings)
        self.masker.step(total)
        result.stats.update(logged)
        result.stats["masker_lr"] = self.masker.lr()
        super().after_step(result)

    def _grid(self, views, masks, used) -> dict:
        """First-batch grid rows: each view, then per masked view its N masks (white = kept) and the
        occluded copies the encoder sees. Callables: computed only when the grid is drawn (step 0)."""
        rows: dict = {"view1": views[1], "view2": views[2]}
        for v, m in masks.items():
            for k in range(m.size(1)):
                rows[f"view{v}_mask{k}"] = lambda m=m, k=k: (1 - m[:, k]).detach().float()
            shown = used[v]
            for k in range(shown.size(1)):
                rows[f"view{v}_occluded{k}"] = lambda x=views[v], s=shown, k=k: ops.occlude(
                    x, s[:, k:k + 1].detach(), self.fill(x.device), validate=False)[0].detach()
        return rows

    @torch.no_grad()
    def adversary_check(self, module: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> tuple[float, float]:
        """Encoder loss (reduced over masks) with each image's own masks, and with the masks of another
        image of the batch (rolled by one): an adversarial masker makes the first larger."""
        views = {1: x1, 2: x2}
        masks = {v: self.masker(views[v]) for v in self.masked_views}
        borrowed = {v: m.roll(1, dims=0) for v, m in masks.items()}
        out = []
        for chosen in (masks, borrowed):
            losses = self.masked_losses(module, x1, x2, self._occluded(views, chosen, detach=True), clean_grad=True)
            out.append(float(reduce_masks(losses, self.settings.reduction)))
        return out[0], out[1]


# --- the frameworks -------------------------------------------------------------------------------

class SimCLRAdversarial(AdversarialStep, SimCLR):
    """L_k = NT-Xent(z(x1), z(x2 * (1 - m_k))) over the 2B rows (gathered over ranks); x1 encoded once."""

    def __init__(self, cfg: RunConfig, rank: int = 0, world_size: int = 1):
        SimCLR.__init__(self, cfg, rank, world_size)
        self.init_masker()

    def masked_losses(self, encode, x1, x2, occluded, clean_grad):
        (z1,), masked = self._encode(encode, [x1], list(occluded[2].unbind(0)), clean_grad)
        return [self._ntxent(z1, zk) for zk in masked]


class BYOLAdversarial(AdversarialStep, BYOL):
    """L_k = D(p1, t(x2_k)) + D(p_k, t(x1)), D = 2 - 2 cos; the target network also sees the occluded view."""

    def __init__(self, online, cfg: RunConfig, rank: int = 0, world_size: int = 1):
        BYOL.__init__(self, online, cfg, rank, world_size)
        self.init_masker()

    def masked_losses(self, encode, x1, x2, occluded, clean_grad):
        masked_views = list(occluded[2].unbind(0))
        ((_, p1),), masked = self._encode(encode, [x1], masked_views, clean_grad)
        with torch.no_grad():
            t1 = self.target(x1)
            t_masked = [self.target(v) for v in masked_views]
        return [self.distance(p1, tk).mean() + self.distance(pk, t1).mean()
                for (_, pk), tk in zip(masked, t_masked)]

    def training_step(self, engine, x1, x2, step, backward, sequential=False):
        result = AdversarialStep.training_step(self, engine, x1, x2, step, backward, sequential)
        result.stats["target_momentum"] = self.momentum_at(step)
        return result


class SimSiamAdversarial(AdversarialStep, SimSiam):
    """Both views occluded, each with its own masks. Per mask the mean of D(p1_k, z2) and D(p2_k, z1) plus
    the terms of `masker.simsiam_terms` (the ADIOS code's use_symmetry_mask / use_no_mask /
    use_both_mask), D = -cos with stop-gradient on z."""

    masked_views = (1, 2)

    def __init__(self, cfg: RunConfig, rank: int = 0, world_size: int = 1):
        SimSiam.__init__(self, cfg, rank, world_size)
        self.init_masker()
        self.terms = set(cfg.masker.simsiam_terms)

    def masked_losses(self, encode, x1, x2, occluded, clean_grad):
        n = occluded[1].size(0)
        clean, masked = self._encode(encode, [x1, x2], [*occluded[1].unbind(0), *occluded[2].unbind(0)], clean_grad)
        (z1, p1), (z2, p2) = clean
        d = lambda p, z: self.distance(p, z).mean()  # noqa: E731
        losses = []
        for k in range(n):
            (z1k, p1k), (z2k, p2k) = masked[k], masked[n + k]
            terms = [d(p1k, z2), d(p2k, z1)]
            if "symmetry" in self.terms:
                terms += [d(p2, z1k), d(p1, z2k)]
            if "no_mask" in self.terms:
                terms += [d(p1, z2), d(p2, z1)]
            if "both_mask" in self.terms:
                terms += [d(p1k, z2k), d(p2k, z1k)]
            losses.append(torch.stack(terms).mean())
        return losses


class MoCoAdversarial(AdversarialStep, MoCo):
    """Extension without a reference: the queries are the occluded copies of view 1, the keys the key
    encoder's clean view 2 (enqueued after the step). L_k = InfoNCE(q(x1_k), k(x2), queue); all N query
    sets in one `soft_infonce` call (the queue is read once)."""

    masked_views = (1,)

    def __init__(self, query, cfg: RunConfig, rank: int = 0, world_size: int = 1):
        MoCo.__init__(self, query, cfg, rank, world_size)
        self.init_masker()
        self._keys: torch.Tensor | None = None

    def prepare(self, x1, x2, step):
        self._keys = self.encode_keys(x2, step)  # no graph; reused by the masker step
        self.pending_keys = self._keys  # enqueued by MoCo.after_step, after the masker step

    def masked_losses(self, encode, x1, x2, occluded, clean_grad):
        queries = list(encode(*occluded[1].unbind(0)))
        b = x1.size(0)
        pos = torch.arange(b, device=x1.device).repeat(len(queries))[:, None]
        terms = ops.soft_infonce(torch.cat(queries).to(self.queue.dtype), self._keys.to(self.queue.dtype), self.queue,
                                 pos, self.temperature, validate=False)
        return list(terms.view(len(queries), b).mean(1).unbind(0))


# --- registration ---------------------------------------------------------------------------------

def check_adversarial_config(cfg: RunConfig) -> None:
    name = cfg.method.name
    on = [k for k, enabled in (("mixing.mixmask.enabled", cfg.mixing.mixmask.enabled),
                               ("mixing.unmix.enabled", cfg.mixing.unmix.enabled)) if enabled]
    if on:
        raise ConfigError(f"method.name={name!r} learns its masks; the mixing branches do not apply: set "
                          + " and ".join(f"{k}=false" for k in on))
    if name == "moco_adios" and cfg.method.symmetric:
        raise ConfigError("method.name='moco_adios' scores the occluded view-1 queries against view-2 keys: "
                          "set method.symmetric=false")
    mc = cfg.masker
    try:
        with torch.device("meta"):
            MaskerUNet(cfg.data.image_size, MaskerSettings.from_config(mc).num_masks, mc.width, mc.norm,
                       "sequential" if mc.kind == "sequential" else "adios", mc.condition, mc.blocks)
    except ValueError as err:
        raise ConfigError(f"masker: {err}") from None


@register("simclr_adios", check=check_adversarial_config)
def build_simclr_adios(cfg: RunConfig, rank: int, world_size: int):
    return finalize(build_query_encoder(cfg), cfg), SimCLRAdversarial(cfg, rank, world_size)


@register("byol_adios", check=check_adversarial_config)
def build_byol_adios(cfg: RunConfig, rank: int, world_size: int):
    online = finalize(build_predictor_encoder(cfg), cfg)
    return online, BYOLAdversarial(online, cfg, rank, world_size)


@register("simsiam_adios", check=check_adversarial_config)
def build_simsiam_adios(cfg: RunConfig, rank: int, world_size: int):
    return finalize(build_predictor_encoder(cfg), cfg), SimSiamAdversarial(cfg, rank, world_size)


@register("moco_adios", check=check_adversarial_config)
def build_moco_adios(cfg: RunConfig, rank: int, world_size: int):
    query = build_query_encoder(cfg)
    if world_size == 1 or not cfg.model.shuffle_bn:
        convert_to_split_bn(query, cfg.model.bn_splits)
    query = finalize(query, cfg)
    return query, MoCoAdversarial(query, cfg, rank, world_size)
