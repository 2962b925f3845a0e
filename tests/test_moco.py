"""MoCo + MixMask + Un-Mix loss against the SPEC §1-§2 formulas written out term by term.

The method stacks every query row into one soft_infonce call with a table of positives and
weights; here each paper term is recomputed independently with F.cross_entropy over
concatenated logits [q·k+, q·queue]/τ, from the very query features the method produced.
"""

import pytest
import torch
import torch.nn.functional as F

from mixfast import ops
from mixfast.config import RunConfig
from mixfast.methods import build_moco
from mixfast.mixing.rng import STREAM_MIXMASK, step_generator

B, SIZE = 6, 16


def _cfg(mixmask: bool, unmix: bool, symmetric: bool = False, **mm) -> RunConfig:
    cfg = RunConfig.model_validate({
        "model": {"arch": "resnet18", "width": 4, "cifar_stem": True, "head": "linear", "feature_dim": 8,
                  "bn_splits": 1},
        "method": {"queue_size": 32, "temperature": 0.2, "symmetric": symmetric},
        "mixing": {"mixmask": {"enabled": mixmask, "grid": 4, **mm}, "unmix": {"enabled": unmix, "prob_mixup": 0.5}},
        "data": {"name": "synthetic", "image_size": SIZE},
        "train": {"precision": "fp32", "seed": 3},
    })
    return cfg


class RecordingEngine:
    """Stands in for the DeepSpeed engine: runs the module and keeps its outputs."""

    def __init__(self, module):
        self.module, self.outputs = module, None

    def __call__(self, *views):
        self.outputs = self.module(*views)
        return self.outputs


def _ce(q, k, queue, tau):
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / tau
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))


def _no_backward(loss, is_last):
    pass


def _run(cfg, step=5, backward=_no_backward, sequential=False):
    torch.manual_seed(0)
    query, moco = build_moco(cfg, rank=0, world_size=1)
    engine = RecordingEngine(query)
    x1, x2 = torch.randn(B, 3, SIZE, SIZE), torch.randn(B, 3, SIZE, SIZE)
    queue = moco.queue.clone()
    result = moco.training_step(engine, x1, x2, step, backward, sequential)
    with torch.no_grad():
        k2 = moco.key_encoder.encode(x2)
        k1 = moco.key_encoder.encode(x1)
    return result, engine.outputs, queue, k1, k2, moco


def _flip(t):
    return t.flip(0)


def test_mixmask_alone_matches_paper_formula():
    cfg = _cfg(mixmask=True, unmix=False)
    result, (q, q_mix), queue, _, k, moco = _run(cfg)
    lam = result.stats["lam_mixmask"]
    tau = cfg.method.temperature
    expected = _ce(q, k, queue, tau) + lam * _ce(q_mix, k, queue, tau) + (1 - lam) * _ce(_flip(q_mix), k, queue, tau)
    torch.testing.assert_close(result.loss, expected, rtol=1e-5, atol=1e-5)
    assert 0 < lam < 1


def test_unmix_alone_matches_paper_formula():
    cfg = _cfg(mixmask=False, unmix=True)
    result, (q, q_um), queue, _, k, _ = _run(cfg)
    lam, tau = result.stats["lam_unmix"], cfg.method.temperature
    expected = _ce(q, k, queue, tau) + lam * _ce(q_um, k, queue, tau) + (1 - lam) * _ce(_flip(q_um), k, queue, tau)
    torch.testing.assert_close(result.loss, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step", [0, 7])
def test_mixmask_plus_unmix_uses_random_permutation_and_argsort(step):
    cfg = _cfg(mixmask=True, unmix=True)
    result, (q, q_um, q_mm), queue, _, k, _ = _run(cfg, step)
    lu, lm, tau = result.stats["lam_unmix"], result.stats["lam_mixmask"], cfg.method.temperature
    perm = torch.randperm(B, generator=step_generator(cfg.train.seed, 0, STREAM_MIXMASK, step))
    assert not torch.equal(perm, torch.arange(B - 1, -1, -1)), "pick a step whose permutation is not flip"
    expected = (_ce(q, k, queue, tau)
                + lu * _ce(q_um, k, queue, tau) + (1 - lu) * _ce(_flip(q_um), k, queue, tau)
                + lm * _ce(q_mm, k, queue, tau) + (1 - lm) * _ce(q_mm[torch.argsort(perm)], k, queue, tau))
    torch.testing.assert_close(result.loss, expected, rtol=1e-5, atol=1e-5)
    # The grid's switch row is drawn with this permutation and the logged mask.
    view1 = result.images["view1"]
    assert torch.equal(result.images["switch"](), ops.mix(view1, result.images["mask"], perm, want_switch=True)[1])


def test_symmetric_variant_matches_spec():
    cfg = _cfg(mixmask=False, unmix=True, symmetric=True)
    result, (q1, q2, q_m), queue, k1, k2, moco = _run(cfg)
    lam, tau = result.stats["lam_unmix"], cfg.method.temperature
    expected = (_ce(q1, k2, queue, tau) + _ce(q2, k1, queue, tau)
                + lam * _ce(q_m, k2, queue, tau) + (1 - lam) * _ce(_flip(q_m), k2, queue, tau)
                + lam * _ce(q_m, k1, queue, tau) + (1 - lam) * _ce(_flip(q_m), k1, queue, tau))
    torch.testing.assert_close(result.loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moco.pending_keys, torch.cat([k1, k2]))  # both key views wait for the queue


def test_per_sample_masks_weight_each_row_by_its_own_lambda():
    cfg = _cfg(mixmask=True, unmix=False, per_sample=True)
    result, (q, q_mix), queue, _, k, _ = _run(cfg)
    masks = result.images["mask"]
    assert masks.shape == (B, 4, 4)
    lam = masks.flatten(1).float().mean(1)  # grid 4 divides 16: λ = popcount / g²
    tau = cfg.method.temperature
    logits = lambda qq, kk: torch.cat([(qq * kk).sum(1, keepdim=True), qq @ queue.T], 1) / tau  # noqa: E731
    zeros = torch.zeros(B, dtype=torch.long)
    own = F.cross_entropy(logits(q_mix, k), zeros, reduction="none")
    partner = F.cross_entropy(logits(q_mix, _flip(k)), zeros, reduction="none")  # row i's filler is B-1-i
    expected = _ce(q, k, queue, tau) + (lam * own + (1 - lam) * partner).mean()
    torch.testing.assert_close(result.loss, expected, rtol=1e-5, atol=1e-5)


def test_erase_baseline_has_no_switch_term_and_unit_weight():
    cfg = _cfg(mixmask=True, unmix=False, fill="zero")
    result, (q, q_mix), queue, _, k, _ = _run(cfg)
    tau = cfg.method.temperature
    torch.testing.assert_close(result.loss, _ce(q, k, queue, tau) + _ce(q_mix, k, queue, tau), rtol=1e-5, atol=1e-5)
    mask = ops.upsample_masks(result.images["mask"], SIZE, SIZE)[:, None]
    assert torch.all(result.images["mixmask"][~mask.expand_as(result.images["mixmask"])] == 0)


def test_enqueue_wraps_and_gradients_reach_only_the_query_encoder():
    cfg = _cfg(mixmask=True, unmix=True)
    result, _, _, _, k, moco = _run(cfg, backward=lambda loss, is_last: loss.backward())
    assert all(p.grad is None for p in moco.key_encoder.parameters())
    moco.queue_ptr.fill_(30)  # 32 slots: 2 left before the wrap
    moco.enqueue(k)
    torch.testing.assert_close(moco.queue[30:], k[:2])
    torch.testing.assert_close(moco.queue[:4], k[2:])
    assert int(moco.queue_ptr) == 4


def test_momentum_update_moves_key_towards_query():
    cfg = _cfg(mixmask=False, unmix=False)
    torch.manual_seed(0)
    query, moco = build_moco(cfg, 0, 1)
    with torch.no_grad():
        for p in query.parameters():
            p.add_(1.0)
    before = [p.clone() for p in moco.key_encoder.parameters()]
    moco.momentum_update(query, step=0)
    m = cfg.method.momentum
    for pk, pk0, pq in zip(moco.key_encoder.parameters(), before, query.parameters()):
        torch.testing.assert_close(pk, m * pk0 + (1 - m) * pq)


def _grads_after_step(sequential: bool):
    cfg = _cfg(mixmask=True, unmix=True)
    calls = []

    def backward(loss, is_last):
        calls.append(is_last)
        loss.backward()

    torch.manual_seed(0)
    query, moco = build_moco(cfg, rank=0, world_size=1)
    x1, x2 = torch.randn(B, 3, SIZE, SIZE), torch.randn(B, 3, SIZE, SIZE)
    result = moco.training_step(RecordingEngine(query), x1, x2, 3, backward, sequential)
    return result.loss, [p.grad.clone() for p in query.parameters()], calls


def test_sequential_backward_gives_the_fused_loss_and_gradients():
    fused_loss, fused_grads, fused_calls = _grads_after_step(sequential=False)
    seq_loss, seq_grads, seq_calls = _grads_after_step(sequential=True)
    assert fused_calls == [True] and seq_calls == [False, False, True]  # one backward per branch
    torch.testing.assert_close(seq_loss, fused_loss, rtol=1e-6, atol=1e-6)
    for g_seq, g_fused in zip(seq_grads, fused_grads):
        torch.testing.assert_close(g_seq, g_fused, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("step", [0, 6, 7])  # step 0 draws mixup, 6 and 7 CutMix (seed 3)
def test_one_pass_mixmask_and_unmix_equals_the_two_mixers(step):
    from mixfast.mixing import MixMaskMixer, UnMixer

    cfg = _cfg(mixmask=True, unmix=True)
    mixmask, unmix = MixMaskMixer(cfg.mixing.mixmask, 3, 0), UnMixer(cfg.mixing.unmix, 3, 0)
    x = torch.randn(B + 1, 3, SIZE, SIZE)  # odd batch: the middle image pairs with itself under flip
    assert unmix.plan(SIZE, SIZE, step)[1] == (step == 0)  # keep the mixup/CutMix coverage honest
    mm, um = mixmask.with_unmix(x, step, unmix)
    mm_ref, um_ref = mixmask(x, step, random_partner=True), unmix(x, step)
    assert torch.equal(mm.mixed, mm_ref.mixed) and torch.equal(mm.perm, mm_ref.perm)
    assert torch.equal(mm.masks.cpu(), mm_ref.masks.cpu()) and torch.equal(mm.pixel_lam, mm_ref.pixel_lam)
    assert torch.equal(um.mixed, um_ref.mixed) and um.lam == um_ref.lam and um.use_mixup == um_ref.use_mixup


def test_image_grid_rows_come_from_the_method_in_display_order():
    """The engine draws the labelled rows it is handed (views, mask, MixMask mixture, switch, Un-Mix) in order,
    without knowing their names: a renamed row still draws, a non-image value is skipped."""
    from mixfast.engine.images import grid_rows

    result, *_ = _run(_cfg(mixmask=True, unmix=True))
    assert list(result.images) == ["view1", "view2", "mask", "mixmask", "switch", "unmix"]
    rows = grid_rows(result.images, "cifar")
    assert len(rows) == 6 and all(r.shape == (min(B, 8), 3, SIZE, SIZE) for r in rows)
    mask_row = rows[2]
    assert set(mask_row.unique().tolist()) <= {0.0, 1.0}  # white = kept, black = filled
    renamed = {f"row{i}": v for i, v in enumerate(result.images.values())}
    renamed["not_an_image"] = torch.arange(3)
    assert all(torch.equal(a, b) for a, b in zip(grid_rows(renamed, "cifar"), rows))
