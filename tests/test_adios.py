"""ADIOS, ADIOS-s and sequential adversarial masking: the masker, the occlusion op, every loss and
penalty against an independent float64 computation, causality of the sequential head, and the
isolation of the two alternating steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mixfast import ops
from mixfast.config import MaskerConfig, RunConfig, load_config
from mixfast.methods import masker as mk
from mixfast.models.unet import MaskerUNet
from mixfast.ops import reference as ref

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _seed() -> int:
    return int(torch.randint(0, 10**6, (1,)))


# --- the masker -----------------------------------------------------------------------------------

# Parameters of the ADIOS U-Net at base width 32, counted layer by layer from the reference code's
# layer list (Genesis U-Net: 3x3 convs without bias + 2C norm parameters, MLP 257*F + 16640 with
# F = 2c * side^2, head 33*N); SPEC rounds them to 0.58 M / 0.93 M / 1.18 M.
@pytest.mark.parametrize("size,num_masks,norm,blocks,expected", [
    (32, 4, "gn", None, 576_548),     # 4 blocks, side 4
    (64, 4, "gn", None, 604_324),     # 5 blocks, side 4
    (96, 4, "in", None, 933_284),     # 5 blocks, side 6
    (224, 6, "gn", None, 1_174_950),  # 6 blocks, side 7
    (32, 6, "none", None, 576_198),   # convolutions with bias, no norm parameters
    (96, 4, "gn", 4, 2_681_892),      # the SimSiam scripts' 4 blocks at 96 px: side 12
])
def test_masker_parameter_counts(size, num_masks, norm, blocks, expected):
    net = MaskerUNet(size, num_masks, 32, norm, "adios", blocks=blocks)
    assert sum(p.numel() for p in net.parameters()) == expected
    rounded = {32: 0.58, 96: 0.93, 224: 1.18}
    if blocks is None and size in rounded and norm != "none":
        assert abs(expected / 1e6 - rounded[size]) < 0.0055  # SPEC: 1.17495 M printed as 1.18


def test_masker_rejects_sizes_it_cannot_halve():
    with pytest.raises(ValueError, match="data.image_size=100"):
        MaskerUNet(100, 4)
    with pytest.raises(ValueError, match="masker.blocks must be >= 3"):
        MaskerUNet(8, 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        MaskerUNet(32, 4, width=12, norm="gn")
    with pytest.raises(ValueError, match="built for 32x32"):
        MaskerUNet(32, 4, width=8)(torch.randn(1, 3, 64, 64))


def test_adios_masks_partition_every_pixel_and_occlusions_sum_to_n_minus_one_images():
    torch.manual_seed(_seed())
    net = MaskerUNet(32, 5, 8, "gn", "adios")
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    masks = net(x.float()).double()
    assert masks.shape == (3, 5, 32, 32) and masks.min() >= 0 and masks.max() <= 1
    torch.testing.assert_close(masks.sum(1), torch.ones(3, 32, 32, dtype=torch.float64), rtol=0, atol=1e-6)
    occluded = ops.occlude(x, masks)  # [N, B, C, H, W]
    torch.testing.assert_close(occluded.sum(0), 4 * x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("condition", ["features", "input"])
def test_sequential_mask_k_does_not_depend_on_later_heads(condition):
    torch.manual_seed(_seed())
    net = MaskerUNet(32, 4, 8, "gn", "sequential", condition)
    x = torch.randn(2, 3, 32, 32)
    before = net(x)
    assert before.shape == (2, 4, 32, 32) and 0 < before.min() and before.max() < 1
    with torch.no_grad():
        net.head.weight[2:] += torch.randn_like(net.head.weight[2:])  # heads 2 and 3 only
        net.head.bias[2:] += 1.0
    after = net(x)
    torch.testing.assert_close(after[:, :2], before[:, :2], rtol=0, atol=0)
    assert (after[:, 2:] - before[:, 2:]).abs().max() > 1e-3
    # and mask k does depend on the earlier masks: change head 0, mask 1 moves
    with torch.no_grad():
        net.head.bias[0] += 2.0
        if condition == "features":
            net.head.weight[1, -1] += 1.0  # head 1's weight on S_0 = m_0
    assert (net(x)[:, 1] - after[:, 1]).abs().max() > 1e-4


# --- the occlusion op -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 0.0), (torch.float64, 0.0), (torch.bfloat16, 0.0)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("with_fill", [False, True])
def test_occlude_matches_the_reference_with_gradients(dtype, tol, layout, with_fill):
    g = torch.Generator().manual_seed(_seed())
    fill = torch.randn(3, generator=g) if with_fill else None
    b, n, h, w = 3, 4, 7, 5  # ragged sizes
    x = torch.randn(b, 3, h, 2 * w, generator=g).to(dtype)
    x = x[..., ::2] if layout == "strided" else x[..., :w].contiguous()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    masks = torch.rand(b, n, h, w, generator=g)
    xa, ma = x.detach().requires_grad_(), masks.clone().requires_grad_()
    xb, mb = x.detach().requires_grad_(), masks.clone().requires_grad_()
    out, want = ops.occlude(xa, ma, fill), ref.occlude(xb, mb, fill)
    assert out.shape == (n, b, 3, h, w) and out.dtype == dtype
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    if layout == "channels_last":
        assert out[1].is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-2)
    torch.testing.assert_close(ma.grad, mb.grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-2)


def test_occlude_fill_replaces_exactly_the_removed_pixels():
    g = torch.Generator().manual_seed(_seed())
    x, fill = torch.randn(2, 3, 4, 5, generator=g), torch.tensor([-1.5, 0.25, 2.0])
    masks = torch.zeros(2, 3, 4, 5)
    masks[:, 1] = 1.0
    masks[:, 2, :, :2] = 1.0  # the left two columns removed
    out = ops.occlude(x, masks, fill)
    assert torch.equal(out[0], x)  # nothing removed
    assert torch.equal(out[1], fill.view(1, 3, 1, 1).expand_as(x))  # everything removed
    assert torch.equal(out[2][..., :2], fill.view(1, 3, 1, 1).expand(2, 3, 4, 2))
    assert torch.equal(out[2][..., 2:], x[..., 2:])


@pytest.mark.parametrize("bad,match", [
    (lambda x, m: (x[0], m), "occlude: x must be"),
    (lambda x, m: (x, m[:, 0]), r"masks must be a float tensor \[B, N, H, W\]"),
    (lambda x, m: (x, m > 0.5), "masks must be a float tensor"),
    (lambda x, m: (x, m[:2]), r"must be \[B, N, H, W\] for images"),
    (lambda x, m: (x, m[..., :3]), r"must be \[B, N, H, W\] for images"),
])
def test_occlude_bad_inputs_raise(bad, match):
    x, m = torch.randn(3, 3, 4, 4), torch.rand(3, 2, 4, 4)
    with pytest.raises(ValueError, match=match):
        ops.occlude(*bad(x, m))


@pytest.mark.parametrize("fill", [torch.zeros(2), torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), [0.0, 0.0, 0.0]])
def test_occlude_bad_fill_raises(fill):
    with pytest.raises(ValueError, match=r"occlude: fill must be a float tensor \[C\] = \[3\]"):
        ops.occlude(torch.randn(3, 3, 4, 4), torch.rand(3, 2, 4, 4), fill)


# --- penalties and the objective, from their formulas in float64 -------------------------------------

def _half_masks(h=4, w=6) -> torch.Tensor:
    left = torch.zeros(h, w, dtype=torch.float64)
    left[:, : w // 2] = 1
    return torch.stack([left, left, 1 - left])[None]  # [1, 3, H, W]: left, left again, right


def test_overlap_with_hand_made_half_masks():
    m = _half_masks()
    # mask 0 has nothing before it; mask 1 (left) lies on mask 0 (left): 12 pixels; mask 2 (right): none
    assert mk.overlap_penalty(m).tolist() == [0.0, 12.0, 0.0]


def test_smoothness_is_zero_for_a_constant_mask_and_matches_a_loop():
    assert mk.smoothness_penalty(torch.full((2, 1, 5, 7), 0.3, dtype=torch.float64)).item() == pytest.approx(0, abs=1e-12)
    g = torch.Generator().manual_seed(_seed())
    m = torch.rand(2, 1, 5, 4, generator=g, dtype=torch.float64)
    total = 0.0
    for b in range(2):
        for i in range(5):
            for j in range(4):
                nb = [m[b, 0, a, c] for a in range(i - 1, i + 2) for c in range(j - 1, j + 2) if 0 <= a < 5 and 0 <= c < 4]
                total += float((m[b, 0, i, j] - sum(nb) / len(nb)) ** 2)
    assert mk.smoothness_penalty(m).item() == pytest.approx(total / 2, rel=1e-9)


def test_sparsity_budget_and_entropy_terms_from_their_formulas():
    g = torch.Generator().manual_seed(_seed())
    m = torch.rand(3, 4, 5, 5, generator=g, dtype=torch.float64)
    s = [[float(m[b, k].mean()) for k in range(4)] for b in range(3)]
    sparsity = [sum(1 / (math.sin(math.pi * s[b][k]) + 1e-10) for b in range(3)) / 3 for k in range(4)]
    budget = [sum((s[b][k] - 0.25) ** 2 for b in range(3)) / 3 for k in range(4)]
    torch.testing.assert_close(mk.sparsity_penalty(m), torch.tensor(sparsity, dtype=torch.float64))
    torch.testing.assert_close(mk.budget_penalty(m, 0.25), torch.tensor(budget, dtype=torch.float64))
    # entropy term: sum over the batch of sum_k p log p = minus the entropy of the mask sizes (<= 0)
    neg_entropy = 0.0
    for b in range(3):
        z = sum(math.exp(v) for v in s[b])
        neg_entropy += sum(math.exp(v) / z * math.log(math.exp(v) / z) for v in s[b])
    assert mk.entropy_term(m).item() == pytest.approx(neg_entropy, rel=1e-9)
    assert neg_entropy < 0
    assert mk.entropy_term(m).item() == pytest.approx(sum(mk.entropy_term(m[b:b + 1]).item() for b in range(3)))


@pytest.mark.parametrize("kind", ["adios", "sequential"])
def test_objective_combines_losses_and_penalties_per_kind(kind):
    g = torch.Generator().manual_seed(_seed())
    st = mk.MaskerSettings.from_config(MaskerConfig(kind=kind, entropy_weight=0.5, sparsity_weight=0.3))
    n = st.num_masks
    masks = torch.rand(2, n, 6, 6, generator=g, dtype=torch.float64)
    losses = list(torch.rand(n, generator=g, dtype=torch.float64))
    total, logged = mk.objective(losses, [masks], st)
    per_mask = [losses[k] - 0.3 * mk.sparsity_penalty(masks)[k] - st.budget_weight * mk.budget_penalty(masks, 0.25)[k]
                - st.overlap * mk.overlap_penalty(masks)[k] - st.smoothness * mk.smoothness_penalty(masks)[k]
                for k in range(n)]
    reduced = sum(per_mask) if kind == "adios" else sum(per_mask) / n
    assert total.item() == pytest.approx(float(reduced) + 0.5 * mk.entropy_term(masks).item(), rel=1e-9)
    assert (st.reduction, st.num_masks) == (("sum", 4) if kind == "adios" else ("mean", 5))
    expected_terms = {"sparsity", "entropy"} | ({"budget", "overlap", "smoothness"} if kind == "sequential" else set())
    assert {k[len("masker_"):] for k in logged} - {"encoder_loss", "objective"} == expected_terms


# --- the frameworks' per-mask losses, from their formulas in float64 ----------------------------------

def _method(name: str, **masker):
    cfg = RunConfig.model_validate({
        "method": {"name": name, "temperature": 0.3, "symmetric": False},
        "mixing": {"mixmask": {"enabled": False}, "unmix": {"enabled": False}},
        "data": {"name": "synthetic", "image_size": 16}, "model": {"arch": "resnet18", "width": 4},
        "masker": {"width": 8, **masker}})
    from mixfast.methods import build_method

    return build_method(cfg)


def _ntxent64(a: torch.Tensor, b: torch.Tensor, tau: float) -> float:
    z = torch.cat([F.normalize(a.double(), dim=1), F.normalize(b.double(), dim=1)])
    n, total = a.size(0), 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        logits = [float(z[i] @ z[j]) / tau for j in range(2 * n) if j != i]
        pos = float(z[i] @ z[partner]) / tau
        total += -(pos - math.log(sum(math.exp(v) for v in logits)))
    return total / (2 * n)


def _flat_encoder(*views):
    return tuple(F.normalize(v.flatten(1)[:, :8].float(), dim=1) for v in views)


def test_simclr_mask_losses_are_ntxent_of_the_clean_and_each_occluded_view():
    _, method = _method("simclr_adios")
    g = torch.Generator().manual_seed(_seed())
    x1, x2 = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    masks = torch.rand(5, 3, 4, 4, generator=g)
    occluded = ops.occlude(x2, masks)
    losses = method.masked_losses(_flat_encoder, x1, x2, {2: occluded}, clean_grad=True)
    z1 = _flat_encoder(x1)[0]
    for k in range(3):
        assert losses[k].item() == pytest.approx(_ntxent64(z1, _flat_encoder(occluded[k])[0], 0.3), rel=1e-5)


def _pred_encoder(*views):
    out = []
    for v in views:
        z = v.flatten(1)[:, :6].float()
        out.append((z, 2 * z + 1))
    return tuple(out)


def _cos64(p, z) -> torch.Tensor:
    return F.cosine_similarity(p.double(), z.double(), dim=1)


def test_byol_mask_losses_use_the_target_on_the_occluded_view():
    _, method = _method("byol_adios")

    class Target(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :6].float() * 3 - 1

    method.target = Target()
    g = torch.Generator().manual_seed(_seed())
    x1, x2 = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    occluded = ops.occlude(x2, torch.rand(4, 2, 4, 4, generator=g))
    losses = method.masked_losses(_pred_encoder, x1, x2, {2: occluded}, clean_grad=True)
    p1 = _pred_encoder(x1)[0][1]
    for k in range(2):
        pk = _pred_encoder(occluded[k])[0][1]
        want = (2 - 2 * _cos64(p1, Target()(occluded[k]))).mean() + (2 - 2 * _cos64(pk, Target()(x1))).mean()
        assert losses[k].item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("terms", [[], ["symmetry"], ["no_mask"], ["both_mask"], ["symmetry", "no_mask", "both_mask"]])
def test_simsiam_mask_losses_follow_the_flag_set(terms):
    _, method = _method("simsiam_adios", simsiam_terms=terms)
    g = torch.Generator().manual_seed(_seed())
    x1, x2 = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    o1 = ops.occlude(x1, torch.rand(4, 2, 4, 4, generator=g))
    o2 = ops.occlude(x2, torch.rand(4, 2, 4, 4, generator=g))
    losses = method.masked_losses(_pred_encoder, x1, x2, {1: o1, 2: o2}, clean_grad=True)
    (z1, p1), (z2, p2) = _pred_encoder(x1, x2)

    def d(p, z):
        return -_cos64(p, z).mean()

    for k in range(2):
        (z1k, p1k), (z2k, p2k) = _pred_encoder(o1[k], o2[k])
        parts = [d(p1k, z2), d(p2k, z1)]
        if "symmetry" in terms:
            parts += [d(p2, z1k), d(p1, z2k)]
        if "no_mask" in terms:
            parts += [d(p1, z2), d(p2, z1)]
        if "both_mask" in terms:
            parts += [d(p1k, z2k), d(p2k, z1k)]
        assert losses[k].item() == pytest.approx(float(sum(parts) / len(parts)), rel=1e-5)


def test_adios_s_uses_one_of_the_masks_per_sample_reproducibly():
    _, method = _method("simclr_adios", kind="adios_s", num_masks=4)
    masks = torch.rand(6, 4, 5, 5)
    one = method._used(masks, step=7)
    assert one.shape == (6, 1, 5, 5)
    picked = [next(k for k in range(4) if torch.equal(one[b, 0], masks[b, k])) for b in range(6)]
    assert torch.equal(method._used(masks, step=7), one)  # a pure function of (seed, rank, step)
    others = [method._used(masks, step=s) for s in range(8, 20)]
    assert any(not torch.equal(o, one) for o in others) and all(0 <= k < 4 for k in picked)


@pytest.mark.parametrize("fill", ["mean", "black"])
def test_masker_fill_sets_the_removed_pixels_in_pixel_space(fill):
    from mixfast.data.transforms import mean_std

    _, method = _method("simclr_adios", fill=fill)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in mean_std(method.cfg.data.augmentation))
    x2 = torch.randn(2, 3, 5, 5)
    masks = torch.zeros(2, 1, 5, 5)
    masks[:, :, :2] = 1.0  # the top two rows removed
    out = method._occluded({2: x2}, {2: masks}, detach=True)[2][0]
    pixels = out * std + mean  # back to [0, 1] pixel values
    want = 0.0 if fill == "black" else mean.expand(2, 3, 2, 5)
    torch.testing.assert_close(pixels[..., :2, :], torch.zeros_like(pixels[..., :2, :]) + want, rtol=0, atol=1e-6)
    assert torch.equal(out[..., 2:, :], x2[..., 2:, :])


def test_config_rules_name_the_keys():
    from mixfast.config import ConfigError
    from mixfast.methods.base import check_config

    cfg = load_config(REPO / "configs" / "demo_adios.json", ["mixing.mixmask.enabled=true"])
    with pytest.raises(ConfigError, match="mixing.mixmask.enabled=false"):
        check_config(cfg)
    cfg = load_config(REPO / "configs" / "demo_adios.json", ["data.image_size=36"])
    with pytest.raises(ConfigError, match="data.image_size=36"):
        check_config(cfg)


# --- the alternating steps through the trainer -----------------------------------------------------

def _trainer(config: str, *overrides: str):
    from tiny_trainer import tiny_trainer

    trainer = tiny_trainer(REPO / "configs" / config, ["data.synthetic_size=32", "train.batch_size=8", "model.width=4"],
                           list(overrides))
    return trainer, next(iter(trainer.train_loader))


def _snapshot(module: torch.nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _grads(module: torch.nn.Module) -> dict:
    return {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((a[k] is None and b[k] is None) or
                                        (a[k] is not None and b[k] is not None and torch.equal(a[k], b[k])) for k in a)


@pytest.mark.parametrize("config,overrides", [
    ("demo_adios.json", ()),
    ("demo_sequential.json", ()),
    ("demo_adios.json", ("method.name=byol_adios", "model.head=mlp_bn", "method.momentum_schedule=cosine",
                         "method.momentum=0.99")),
    ("demo_adios.json", ("method.name=simsiam_adios", "model.head=simsiam", "masker.kind=adios_s")),
    ("demo_adios.json", ("method.name=moco_adios", "model.head=mlp", "method.queue_size=32", "model.bn_splits=2")),
], ids=["simclr-adios", "simclr-sequential", "byol-adios", "simsiam-adios-s", "moco-adios"])
def test_each_step_touches_only_its_own_parameters_and_the_masker_ascends(config, overrides):
    trainer, batch = _trainer(config, *overrides)
    method, engine = trainer.method, trainer.engine
    x1, x2 = batch["x1"], batch["x2"]
    masker0, encoder0 = _snapshot(method.masker), _snapshot(engine.module)

    result = method.training_step(engine, x1, x2, 0, trainer._backward)
    engine.step()
    # the first-batch grid: both views, then per masked view its N masks and the occluded copies it used
    from mixfast.engine.images import grid_rows

    n = method.settings.num_masks
    used = 1 if method.settings.kind == "adios_s" else n
    rows = grid_rows(result.images, "cifar")
    assert len(rows) == 2 + len(method.masked_views) * (n + used)
    assert all(r.shape == rows[0].shape for r in rows)
    # the encoder step: the encoder moved, the masker neither moved nor got a gradient
    assert _same(_snapshot(method.masker), masker0)
    assert all(p.grad is None for p in method.masker.parameters())
    assert not _same(_snapshot(engine.module), encoder0)

    # objective on this batch with the updated encoder, before the masker step (same as the step computes)
    encoder1, grads1 = _snapshot(engine.module), _grads(engine.module)
    before = _objective(method, engine, x1, x2)
    for group in method.masker.optimizer.param_groups:
        group["lr"] = 1e-3  # a small step (the schedule's warm-up lr would do as well)
    queue = {n: b.clone() for n, b in method.named_buffers() if n in ("queue", "queue_ptr")}
    method.after_step(result)
    for n, b in queue.items():  # MoCo enqueued this step's keys: compare the objective on the same queue
        getattr(method, n).copy_(b)
    # the masker step: encoder weights and gradients untouched, the masker moved
    assert _same(_snapshot(engine.module), encoder1)
    assert _same(_grads(engine.module), grads1)
    assert not _same(_snapshot(method.masker), masker0)
    assert "masker_objective" in result.stats and "masker_encoder_loss" in result.stats
    after = _objective(method, engine, x1, x2)
    assert after > before, (before, after)


def _objective(method, engine, x1, x2) -> float:
    """The masker objective at the current weights, as the masker step computes it (train mode: BatchNorm
    normalizes with the batch's statistics, so the value depends on the weights only)."""
    with torch.no_grad():
        views = {1: x1, 2: x2}
        masks = {v: method.masker(views[v]) for v in method.masked_views}
        used = {v: method._used(m, 0) for v, m in masks.items()}
        losses = method.masked_losses(engine.module, x1, x2, method._occluded(views, used, detach=True), True)
        total, _ = mk.objective(losses, list(masks.values()), method.settings)
    return float(total)
