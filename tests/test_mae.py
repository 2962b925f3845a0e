"""MAE and MixedAE: the losses against independent float64 loops, the masking and mixing the
trainer feeds the ViT, gradient isolation of the visible patches, and the config rules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mixfast import ops
from mixfast.config import ConfigError, RunConfig
from mixfast.methods import build_method
from mixfast.methods import mae as mae_mod
from mixfast.models.vit import patchify

REPO = Path(__file__).resolve().parents[1]


def _seed() -> int:
    return int(torch.randint(0, 10**6, (1,)))


def _cfg(name: str, **sections) -> RunConfig:
    settings = {"method": {"name": name}, "model": {"arch": "vit_tiny"},
                "mixing": {"mixmask": {"enabled": False}, "unmix": {"enabled": False}},
                "data": {"name": "synthetic", "image_size": 32, "augmentation": "mae"},
                "optim": {"name": "adamw", "no_decay_1d": True}}
    for key, value in sections.items():
        settings.setdefault(key, {}).update(value)
    return RunConfig.model_validate(settings)


# --- the losses ----------------------------------------------------------------------------------------

def test_normalized_pixel_target_and_loss_follow_maes_formula():
    g = torch.Generator().manual_seed(_seed())
    imgs = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    p = 4
    pred = torch.randn(2, 4, p * p * 3, generator=g, dtype=torch.float64)
    removed = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0]], dtype=torch.float64)
    target = mae_mod.pixel_target(imgs.float(), p)
    total, count = 0.0, 0
    for b in range(2):
        for i, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            # MAE's patch order: (row, col, channel) within the patch
            patch = imgs[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).reshape(-1)
            mean = patch.sum() / patch.numel()
            var = ((patch - mean) ** 2).sum() / (patch.numel() - 1)  # unbiased
            want = (patch - mean) / math.sqrt(var + 1e-6)
            torch.testing.assert_close(target[b, i].double(), want, rtol=1e-5, atol=1e-5)
            if removed[b, i]:
                total += float(((pred[b, i] - want) ** 2).mean())
                count += 1
    loss = mae_mod.reconstruction_loss(pred.float(), target, removed.float())
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    raw = mae_mod.pixel_target(imgs.float(), p, normalize=False)
    torch.testing.assert_close(raw, patchify(imgs.float(), p))


def test_visible_patches_get_no_gradient():
    g = torch.Generator().manual_seed(_seed())
    pred = torch.randn(3, 6, 12, generator=g, requires_grad=True)
    target = torch.randn(3, 6, 12, generator=g)
    removed = (torch.rand(3, 6, generator=g) > 0.5).float()
    removed[:, 0] = 1.0
    mae_mod.reconstruction_loss(pred, target, removed).backward()
    assert torch.all(pred.grad[removed == 0] == 0)
    assert torch.all(pred.grad[removed == 1].abs().sum(-1) > 0)


def _supcon_loop(tokens: torch.Tensor, segment: torch.Tensor, tau: float) -> float:
    per_sample = []
    for g in range(tokens.size(0)):
        z = tokens[g].double()
        z = z / z.norm(dim=-1, keepdim=True)
        n = z.size(0)
        anchors = []
        for a in range(n):
            pos = [j for j in range(n) if j != a and segment[g, j] == segment[g, a]]
            if not pos:
                continue
            denom = sum(math.exp(float(z[a] @ z[j]) / tau) for j in range(n) if j != a)
            anchors.append(-sum(math.log(math.exp(float(z[a] @ z[j]) / tau) / denom) for j in pos) / len(pos))
        per_sample.append(sum(anchors) / len(anchors))
    return sum(per_sample) / len(per_sample)


def test_homocon_equals_a_naive_supcon_loop():
    g = torch.Generator().manual_seed(_seed())
    tokens = torch.randn(2, 9, 5, generator=g)
    segment = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3, 3], [0, 1, 2, 3, 0, 1, 2, 3, 1]])
    segment[1, 3] = 7  # an anchor without a positive is left out
    got = mae_mod.homocon_loss(tokens, segment, 0.5)
    assert got.item() == pytest.approx(_supcon_loop(tokens, segment, 0.5), rel=1e-5)


# --- masking and mixing through the trained module ------------------------------------------------------

def test_mae_keeps_int_l_times_one_minus_ratio_tokens_and_scores_the_rest():
    cfg = _cfg("mae", mae={"mask_ratio": 0.75})
    module, _ = build_method(cfg)
    seen = {}
    original = module.backbone.forward_features

    def spy(tokens, **kw):
        seen["tokens"] = tokens.shape
        return original(tokens, **kw)
    module.backbone.forward_features = spy
    seed = _seed()
    noise = torch.rand(3, 64, generator=torch.Generator().manual_seed(seed))  # what the masking draws
    pred, removed = module(torch.randn(3, 3, 32, 32), torch.Generator().manual_seed(seed))
    assert seen["tokens"] == (3, 16, 96)  # int(64 * 0.25) kept
    assert pred.shape == (3, 64, 4 * 4 * 3)
    assert torch.all(removed.sum(1) == 48)
    # the kept tokens are the 16 lowest noise values of each row (MAE's argsort masking)
    lowest = torch.zeros(3, 64)
    lowest.scatter_(1, noise.argsort(1)[:, :16], 1.0)
    assert torch.equal(removed, 1 - lowest)


def test_mixedae_decoder_rows_see_exactly_their_source_and_score_the_rest():
    cfg = _cfg("mixedae")
    module, method = build_method(cfg)
    g = torch.Generator().manual_seed(_seed())
    x = torch.randn(8, 3, 32, 32, generator=g)
    cell_map = ops.group_cell_map(2, 4, 4, seed=3, step=5)
    mixed, segment = ops.group_mix(x, cell_map, 4, 4)
    calls = {}
    original = module.head.forward_keep

    def spy(latent, keep, attn_fn=None):
        calls["keep"] = keep.clone()
        return original(latent, keep, attn_fn)
    module.head.forward_keep = spy
    pred, scored, latent = module(mixed, segment, None, True)
    assert pred.shape == (8, 64, 48) and latent.shape == (2, 65, 96)
    for row in range(8):
        group, source = divmod(row, 4)
        assert torch.equal(calls["keep"][row], segment[group] == source)
        assert torch.equal(scored[row].bool(), segment[group] != source)
    # every source gets its share: 4 of the 16 cells, i.e. 16 of the 64 tokens
    assert torch.all(calls["keep"].sum(1) == 16)


def test_mixedae_segment_embeddings_reach_the_encoder_only_when_enabled():
    cfg = _cfg("mixedae")
    module, _ = build_method(cfg)
    module.eval()
    g = torch.Generator().manual_seed(_seed())
    x = torch.randn(4, 3, 32, 32, generator=g)
    mixed, segment = ops.group_mix(x, ops.group_cell_map(1, 4, 4, seed=0, step=0), 4, 4)
    other = (segment + 1) % 4  # same pixels, other source ids
    with torch.no_grad():
        a = module(mixed, segment, None, True)[2]
        b = module(mixed, other, None, True)[2]
        c = module(mixed, segment, None, False)[2]
        d = module(mixed, other, None, False)[2]
    assert (a - b).abs().max() > 1e-4
    assert torch.equal(c, d)


@pytest.mark.parametrize("attention", ["topk", "global", "segment"])
def test_mixedae_training_step_losses_and_topk_accuracy(attention, tmp_path):
    """One real trainer step per attention kind: the logged losses are the method's terms, and the
    TopK accuracy is a share (chance about 1/4 at initialisation)."""
    from tiny_trainer import tiny_trainer

    trainer = tiny_trainer(REPO / "configs" / "demo_mixedae.json", ["data.synthetic_size=32", "train.batch_size=16"],
                           [f"mixedae.attention={attention}"], output_dir=str(tmp_path / "run"))
    result = trainer.train_step(next(iter(trainer.train_loader)))
    stats = {k: float(v) for k, v in result.stats.items()}
    assert stats["loss_recon"] > 0 and stats["loss_homocon"] > 0
    assert float(result.loss) == pytest.approx(stats["loss_recon"] + stats["loss_homocon"], rel=1e-5)
    if attention == "segment":
        assert "topk_accuracy" not in stats
    else:
        assert 0.0 < stats["topk_accuracy"] < 1.0


def test_homologous_attention_keeps_k_keys_in_the_encoder():
    """The attention the MixedAE encoder runs is ops.topk_attention with K = L / group_size and a global
    CLS row (checked by capturing the call)."""
    cfg = _cfg("mixedae")
    module, method = build_method(cfg)
    segment_full = torch.zeros(1, 65, dtype=torch.long)
    captured = []
    fn = method._attention(segment_full, method.topk(64), [])
    original = ops.topk_attention
    try:
        ops.topk_attention = lambda q, k, v, topk, global_rows=1, **kw: captured.append((topk, global_rows)) or \
            original(q, k, v, topk, global_rows, **kw)
        q = torch.randn(1, 4, 65, 24)
        fn(q, q, q)
    finally:
        ops.topk_attention = original
    assert captured == [(16, 1)]


# --- configuration -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sections,match", [
    ({"model": {"arch": "resnet18"}}, "model.arch to a ViT"),
    ({"mixing": {"mixmask": {"enabled": True}}}, "mixing.mixmask.enabled=false"),
    ({"mixedae": {"cell_tokens": 3}}, "mixedae.cell_tokens=3 must divide"),
    ({"mixedae": {"cell_tokens": 8}}, "mixedae.group_size=4 is more than the 1 cells"),
    ({"train": {"batch_size": 18}}, "multiple of mixedae.group_size=4"),
    ({"mixedae": {"topk": 99}}, r"mixedae.topk=99 must be in \[1, 65\]"),
    ({"mixedae": {"recon_weight": 0.0, "homocon_weight": 0.0}}, "nothing to train"),
    ({"data": {"image_size": 30}}, "data.image_size=30"),
])
def test_config_rules_name_the_keys(sections, match):
    with pytest.raises(ConfigError, match=match):
        build_method(_cfg("mixedae", **sections))


def test_optimizer_groups_exempt_1d_parameters_and_tokens():
    from mixfast.train import build_optimizer

    cfg = _cfg("mae", optim={"name": "adamw", "no_decay_1d": True, "weight_decay": 0.05, "beta2": 0.95})
    module, _ = build_method(cfg)
    opt = build_optimizer(module, cfg.optim)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
    names = {id(p): n for n, p in module.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    exempt = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | exempt == set(names.values())
    assert all(module.get_parameter(n).ndim >= 2 for n in decayed)
    assert {"backbone.cls_token", "head.mask_token"} <= exempt
    assert all(module.get_parameter(n).ndim == 1 for n in exempt - {"backbone.cls_token", "head.mask_token"})
