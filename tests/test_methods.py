"""SimCLR, BYOL, SimSiam and MixSiam losses against independent computations.

Each framework's `training_step` runs on small random images with a recording stand-in for
the DeepSpeed engine; the expected loss is then recomputed here from the very features the
framework produced, with the textbook formula written out (NT-Xent as a loop over rows,
BYOL's normalized MSE, SimSiam's negative cosine, MixSiam's max aggregation), and the
mixed branches from the soft pairing of SPEC §1 (λ to the own target, 1-λ to the filler's).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from mixfast.config import RunConfig
from mixfast.methods import build_method, registered
from mixfast.methods.base import ema_update
from mixfast.methods.losses import negative_cosine, normalized_mse, soft_pair_loss
from mixfast.mixing.branches import MixedBranch
from mixfast.mixing.rng import STREAM_MIXMASK, step_generator

B, SIZE = 6, 16


def _cfg(name: str, mixmask=False, unmix=False, mm=None, **extra) -> RunConfig:
    head = {"simclr": "mlp_bn", "byol": "mlp_bn"}.get(name, "simsiam")
    raw = {
        "model": {"arch": "resnet18", "width": 4, "cifar_stem": True, "head": head, "head_hidden_dim": 16,
                  "feature_dim": 8, "predictor_hidden_dim": 4},
        "method": {"name": name, "temperature": 0.3, "momentum": 0.9, **extra.pop("method", {})},
        "mixing": {"mixmask": {"enabled": mixmask, "grid": 4, **(mm or {})},
                   "unmix": {"enabled": unmix, "prob_mixup": 0.5}, **extra.pop("mixing", {})},
        "data": {"name": "synthetic", "image_size": SIZE},
        "train": {"precision": "fp32", "seed": 3},
    }
    return RunConfig.model_validate(raw)


class RecordingEngine:
    def __init__(self, module):
        self.module, self.inputs, self.outputs = module, None, None

    def __call__(self, *views):
        self.inputs = views
        self.outputs = self.module(*views)
        return self.outputs


def _run(cfg, step=5):
    torch.manual_seed(0)
    trained, method = build_method(cfg, 0, 1)
    method.set_total_steps(100)
    engine = RecordingEngine(trained)
    x1, x2 = torch.randn(B, 3, SIZE, SIZE), torch.randn(B, 3, SIZE, SIZE)
    grads = []
    result = method.training_step(engine, x1, x2, step, lambda loss, last: grads.append((loss, last)))
    assert len(grads) == 1 and grads[0][1] is True, "one backward, marked last"
    torch.testing.assert_close(grads[0][0].detach(), result.loss)
    return result, engine, method, x1, x2


# --- independent formulas ------------------------------------------------------------------------


def ntxent_loop(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent written from its definition: 2n rows, positive = the pair, the
    denominator over the other 2n-1 embeddings, mean over rows."""
    z = torch.cat([a, b])
    n = a.size(0)
    total = 0.0
    for i in range(2 * n):
        j = i + n if i < n else i - n
        sims = torch.stack([z[i] @ z[k] / tau for k in range(2 * n) if k != i])
        total = total + (torch.logsumexp(sims, 0) - z[i] @ z[j] / tau)
    return total / (2 * n)


def cos_rows(p, z):
    return torch.stack([(p[i] @ z[i]) / (p[i].norm() * z[i].norm()) for i in range(p.size(0))])


def _mixmask_perm(cfg, step):
    return torch.randperm(B, generator=step_generator(cfg.train.seed, 0, STREAM_MIXMASK, step))


# --- SimCLR -----------------------------------------------------------------------------------


def test_simclr_plain_is_ntxent():
    cfg = _cfg("simclr")
    result, engine, *_ = _run(cfg)
    z1, z2 = engine.outputs
    torch.testing.assert_close(result.loss, ntxent_loop(z1, z2, 0.3), rtol=1e-5, atol=1e-5)


def test_simclr_mixmask_flip_is_unmix_authors_recipe():
    cfg = _cfg("simclr", mixmask=True)
    result, engine, *_ = _run(cfg)
    z1, z2, zm = engine.outputs
    lam = result.stats["lam_mixmask"]
    expected = ntxent_loop(z1, z2, 0.3) + lam * ntxent_loop(z2, zm, 0.3) + (1 - lam) * ntxent_loop(z2, zm.flip(0), 0.3)
    torch.testing.assert_close(result.loss, expected, rtol=1e-5, atol=1e-5)
    assert 0 < lam < 1


@pytest.mark.parametrize("step", [0, 7])
def test_simclr_mixmask_unmix_random_permutation_pairs_through_argsort(step):
    cfg = _cfg("simclr", mixmask=True, unmix=True)
    result, engine, *_ = _run(cfg, step)
    z1, z2, z_um, z_mm = engine.outputs
    lu, lm = result.stats["lam_unmix"], result.stats["lam_mixmask"]
    perm = _mixmask_perm(cfg, step)
    assert not torch.equal(perm, torch.arange(B - 1, -1, -1))
    nt = lambda a, b: ntxent_loop(a, b, 0.3)  # noqa: E731
    expected = (nt(z1, z2) + lu * nt(z2, z_um) + (1 - lu) * nt(z2, z_um.flip(0))
                + lm * nt(z2, z_mm) + (1 - lm) * nt(z2, z_mm[torch.argsort(perm)]))
    torch.testing.assert_close(result.loss, expected, rtol=1e-5, atol=1e-5)


def test_simclr_symmetrize_adds_view2_mixtures_against_view1():
    cfg = _cfg("simclr", mixmask=True, mixing={"symmetrize": True})
    result, engine, *_ = _run(cfg)
    z1, z2, zm1, zm2 = engine.outputs
    lam = result.stats["lam_mixmask"]
    nt = lambda a, b: ntxent_loop(a, b, 0.3)  # noqa: E731
    expected = (nt(z1, z2) + lam * nt(z2, zm1) + (1 - lam) * nt(z2, zm1.flip(0))
                + lam * nt(z1, zm2) + (1 - lam) * nt(z1, zm2.flip(0)))
    torch.testing.assert_close(result.loss, expected, rtol=1e-5, atol=1e-5)
    # view 2's mixture uses the same mask on x2
    x1, x2 = engine.inputs[:2]
    assert not torch.equal(engine.inputs[3], engine.inputs[2])


# --- BYOL ---------------------------------------------------------------------------------------


def test_byol_loss_is_normalized_mse_against_the_target_network():
    cfg = _cfg("byol", mixmask=True)
    result, engine, method, x1, x2 = _run(cfg)
    (_, p1), (_, p2), (_, pm) = engine.outputs
    with torch.no_grad():
        t1, t2 = method.target(x1), method.target(x2)
    lam = result.stats["lam_mixmask"]
    mse = lambda p, t: ((F.normalize(p, dim=1) - F.normalize(t, dim=1)) ** 2).sum(1)  # noqa: E731
    expected = (mse(p1, t2).mean() + mse(p2, t1).mean()
                + lam * mse(pm, t2).mean() + (1 - lam) * mse(pm, t2.flip(0)).mean())
    torch.testing.assert_close(result.loss, expected, rtol=1e-5, atol=1e-5)


def test_byol_target_is_an_ema_with_cosine_tau_schedule():
    cfg = _cfg("byol", method={"momentum_schedule": "cosine", "momentum": 0.99})
    torch.manual_seed(0)
    online, method = build_method(cfg, 0, 1)
    method.set_total_steps(100)
    assert method.momentum_at(0) == pytest.approx(0.99)
    assert method.momentum_at(50) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 2) + 1) / 2)
    assert method.momentum_at(100) == pytest.approx(1.0)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in method.target.parameters()]
    online_params = [p.clone() for p in list(online.backbone.parameters()) + list(online.head.parameters())]
    method.momentum_update(online, 50)
    m = method.momentum_at(50)
    for t_old, o, t_new in zip(before, online_params, method.target.parameters()):
        torch.testing.assert_close(t_new, m * t_old + (1 - m) * o)
    assert all(not p.requires_grad for p in method.target.parameters())


def test_byol_target_travels_in_the_method_state_dict():
    _, method = build_method(_cfg("byol"), 0, 1)
    keys = method.state_dict().keys()
    assert any(k.startswith("target.backbone.") for k in keys) and any(k.startswith("target.head.") for k in keys)


def _is_channels_last(t):
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@pytest.mark.parametrize("name", ["byol", "moco"])
def test_channels_last_frozen_copy_has_channels_last_weights_and_the_same_loss(name):
    """model.channels_last: the trained module keeps contiguous parameters (DeepSpeed's
    layout); the frozen copy (BYOL target, MoCo key encoder) takes channels_last 3x3 conv
    weights, its EMA update still follows t <- m t + (1 - m) o across the two layouts, and
    the step's loss equals the NCHW one up to float32 round-off (other conv kernels)."""
    extra = {"model": {"head": "linear", "bn_splits": 2}} if name == "moco" else {}
    losses = {}
    for cl in (False, True):
        cfg = _cfg(name, mixmask=True)
        raw = cfg.model_dump()
        raw["model"].update(channels_last=cl, **extra.get("model", {}))
        cfg = RunConfig.model_validate(raw)
        result, engine, method, _, _ = _run(cfg)
        losses[cl] = result.loss.item()
        frozen = method.target.backbone if name == "byol" else method.key_encoder.backbone
        convs = [m.weight for m in frozen.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        assert convs and all(_is_channels_last(w) == cl for w in convs)
        assert all(p.is_contiguous() for p in engine.module.parameters())
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    online = engine.module.backbone
    target_before = [p.clone() for p in frozen.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    ema_update(frozen, online, 0.9)
    for t_old, o, t_new in zip(target_before, online.parameters(), frozen.parameters()):
        torch.testing.assert_close(t_new, 0.9 * t_old + 0.1 * o)
    assert all(_is_channels_last(w) for w in convs)


# --- SimSiam --------------------------------------------------------------------------------------


def test_simsiam_loss_is_symmetric_negative_cosine_with_soft_pairing():
    cfg = _cfg("simsiam", mixmask=True)
    result, engine, *_ = _run(cfg)
    (z1, p1), (z2, p2), (_, pm) = engine.outputs
    lam = result.stats["lam_mixmask"]
    expected = (-0.5 * cos_rows(p1, z2).mean() - 0.5 * cos_rows(p2, z1).mean()
                - lam * cos_rows(pm, z2).mean() - (1 - lam) * cos_rows(pm, z2.flip(0)).mean())
    torch.testing.assert_close(result.loss, expected, rtol=1e-5, atol=1e-5)


def test_simsiam_stops_the_gradient_at_the_target():
    p = torch.randn(4, 8, requires_grad=True)
    z = torch.randn(4, 8, requires_grad=True)
    negative_cosine(p, z).sum().backward()
    assert z.grad is None and p.grad is not None


def test_simsiam_per_sample_lambda_weights_each_row():
    cfg = _cfg("simsiam", mixmask=True, mm={"per_sample": True, "kind": "discrete"})
    result, engine, *_ = _run(cfg)
    (z1, p1), (z2, p2), (_, pm) = engine.outputs
    lam = result.images["mask"].flatten(1).float().mean(1)  # grid 4 divides 16
    assert lam.unique().numel() > 1
    expected = (-0.5 * cos_rows(p1, z2).mean() - 0.5 * cos_rows(p2, z1).mean()
                - (lam * cos_rows(pm, z2) + (1 - lam) * cos_rows(pm, z2.flip(0))).mean())
    torch.testing.assert_close(result.loss, expected, rtol=1e-5, atol=1e-5)


# --- MixSiam --------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["max", "mean", "none"])
def test_mixsiam_loss(aggregation):
    cfg = _cfg("mixsiam", method={"mixsiam": {"aggregation": aggregation, "loss_lambda": 0.3, "mix_lambda": 0.4}})
    result, engine, _, x1, x2 = _run(cfg)
    torch.testing.assert_close(engine.inputs[2], 0.4 * x1 + 0.6 * x2)
    (z1, p1), (z2, p2), (_, pm) = engine.outputs
    siam = -0.5 * cos_rows(p1, z2).mean() - 0.5 * cos_rows(p2, z1).mean()
    if aggregation == "none":
        mix = -0.5 * cos_rows(pm, z1).mean() - 0.5 * cos_rows(pm, z2).mean()
    else:
        target = torch.stack([torch.tensor([max(a, b) for a, b in zip(r1.tolist(), r2.tolist())]) for r1, r2 in zip(z1, z2)]) \
            if aggregation == "max" else (z1 + z2) / 2
        mix = -cos_rows(pm, target).mean()
    torch.testing.assert_close(result.loss, 0.3 * siam + 0.7 * mix, rtol=1e-5, atol=1e-5)


def test_each_method_checks_its_own_config_rules():
    """The rules live with the methods (check_config, also run by build_method), not in the schema."""
    from mixfast.config import ConfigError
    from mixfast.methods.base import check_config

    cfg = _cfg("mixsiam", mixmask=True)  # the schema alone accepts it
    with pytest.raises(ConfigError, match="mixing.mixmask.enabled=false"):
        check_config(cfg)
    with pytest.raises(ConfigError, match="mixing.mixmask.enabled=false"):
        build_method(cfg, 0, 1)
    with pytest.raises(ConfigError, match=r"model.head='linear'"):
        check_config(_cfg("moco", method={"version": 1}))
    linear = _cfg("moco", method={"version": 1})
    linear.model.head = "linear"
    check_config(linear)  # the same config with the head MoCo v1 needs passes
    with pytest.raises(ConfigError, match=r"method.name='nope'.*registered: byol, byol_adios, mae, mixedae, mixsiam, moco"):
        check_config(_cfg("nope"))


# --- soft pairing, shared pieces --------------------------------------------------------------------


@pytest.mark.parametrize("perm", [torch.arange(5).flip(0), torch.tensor([2, 0, 4, 1, 3])], ids=["flip", "random"])
def test_soft_pair_loss_weights_own_and_filler_targets(perm):
    torch.manual_seed(1)
    p, t = torch.randn(5, 6), torch.randn(5, 6)
    lam = torch.rand(5)
    branch = MixedBranch("x", torch.empty(0), perm, lam, 1 - lam)
    expected = sum(lam[i] * (2 - 2 * F.cosine_similarity(p[i], t[i], 0))
                   + (1 - lam[i]) * (2 - 2 * F.cosine_similarity(p[i], t[perm[i]], 0)) for i in range(5)) / 5
    torch.testing.assert_close(soft_pair_loss(normalized_mse, p, t, branch), expected)


def test_ema_update_formula():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    old = [p.clone() for p in a.parameters()]
    ema_update(a, b, 0.7)
    for o, n, q in zip(old, a.parameters(), b.parameters()):
        torch.testing.assert_close(n, 0.7 * o + 0.3 * q)


def test_every_framework_is_registered():
    assert registered() == ["byol", "byol_adios", "mae", "mixedae", "mixsiam", "moco", "moco_adios", "simclr", "simclr_adios", "simsiam",
                            "simsiam_adios"]


def test_every_framework_trains_the_backbone():
    """A gradient reaches every trained parameter of the backbone from each loss."""
    for name, mm in [("simclr", True), ("byol", True), ("simsiam", True), ("mixsiam", False)]:
        cfg = _cfg(name, mixmask=mm)
        torch.manual_seed(0)
        trained, method = build_method(cfg, 0, 1)
        engine = RecordingEngine(trained)
        x1, x2 = torch.randn(B, 3, SIZE, SIZE), torch.randn(B, 3, SIZE, SIZE)
        method.training_step(engine, x1, x2, 3, lambda loss, last: loss.backward())
        missing = [n for n, p in trained.backbone.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert missing == [], f"{name}: no gradient for {missing[:3]}"
