"""Tests of the pure-PyTorch reference ops (mixfast.ops.reference), CPU only."""

import math

import pytest
import torch
import torch.nn.functional as F

from mixfast.ops import make_masks, mix, rand_bbox, soft_infonce, unmix, upsample_masks
from mixfast.ops import reference as ref


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float32).to(dtype)


def _interp(masks, H, W):
    """Independent upsampling: F.interpolate nearest on a float copy."""
    return F.interpolate(masks[:, None].float(), size=(H, W), mode="nearest")[:, 0] > 0.5


# ---------------------------------------------------------------------------------------
# make_masks
# ---------------------------------------------------------------------------------------


def test_block_grid8_ratio_half_counts():
    m = make_masks(2000, 8, 0.5, "block", seed=123, step=7)
    assert m.shape == (2000, 8, 8) and m.dtype == torch.bool and m.device.type == "cpu"
    counts = m.flatten(1).sum(1)
    assert int(counts.max()) <= 32  # never overshoots the target int(0.5*64)
    assert (counts == 32).float().mean().item() >= 0.90  # SPEC: ~95% exact
    assert int(counts.min()) >= 28  # SPEC: the rest >= ~30


@pytest.mark.parametrize("grid", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("kind", ["block", "discrete"])
def test_masks_never_constant(grid, kind):
    n = 200 if grid <= 8 else 40
    for k, ratio in enumerate([0.1, 0.3, 0.5, 0.7, 0.9]):
        m = make_masks(n, grid, ratio, kind, seed=grid * 10 + k, step=k)
        c = m.flatten(1).sum(1)
        assert int(c.min()) >= 1 and int(c.max()) <= grid * grid - 1, (grid, ratio, kind)
        if kind == "block":
            target = min(max(int(ratio * grid * grid), 1), grid * grid - 1)
            assert int(c.max()) <= target


def test_block_masks_hit_target_mostly_small_grids():
    # grid 2 (CIFAR default) and 4 (Tiny): the clamped min_patches still reaches the target
    for grid in (2, 4):
        c = make_masks(500, grid, 0.5, "block", seed=5, step=1).flatten(1).sum(1)
        target = grid * grid // 2
        assert int(c.max()) <= target
        assert (c == target).float().mean().item() > 0.8


def _equal_neighbour_fraction(m):
    m = m.to(torch.int8)
    horiz = (m[:, :, 1:] == m[:, :, :-1]).float().mean()
    vert = (m[:, 1:, :] == m[:, :-1, :]).float().mean()
    return 0.5 * (horiz + vert).item()


def test_block_masks_are_clustered_vs_discrete():
    block = make_masks(500, 8, 0.5, "block", seed=1, step=0)
    disc = make_masks(500, 8, 0.5, "discrete", seed=1, step=0)
    fb = _equal_neighbour_fraction(block)
    fd = _equal_neighbour_fraction(disc)
    assert abs(fd - 0.5) < 0.03  # i.i.d. cells at p = 0.5
    assert fb > fd + 0.15, (fb, fd)


@pytest.mark.parametrize("kind", ["block", "discrete"])
def test_masks_deterministic_and_step_dependent(kind):
    a = make_masks(16, 8, 0.5, kind, seed=42, step=3)
    b = make_masks(16, 8, 0.5, kind, seed=42, step=3)
    c = make_masks(16, 8, 0.5, kind, seed=42, step=4)
    d = make_masks(16, 8, 0.5, kind, seed=43, step=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)
    # masks within one call differ from each other (own stream per index)
    assert len({tuple(x.flatten().tolist()) for x in a}) > 8


@pytest.mark.parametrize("kind", ["block", "discrete"])
def test_mask_i_independent_of_n(kind):
    a = make_masks(5, 8, 0.4, kind, seed=9, step=11)
    b = make_masks(3, 8, 0.4, kind, seed=9, step=11)
    assert torch.equal(a[2], b[2])
    assert torch.equal(a[:3], b)


def test_masks_do_not_touch_global_rng():
    torch.manual_seed(0)
    import random

    random.seed(0)
    t0 = torch.rand(3)
    r0 = random.random()
    torch.manual_seed(0)
    random.seed(0)
    make_masks(4, 8, 0.5, "block", seed=0, step=0)
    make_masks(4, 8, 0.5, "discrete", seed=0, step=0)
    assert torch.equal(torch.rand(3), t0)
    assert random.random() == r0


def test_discrete_mean_ratio():
    for ratio in (0.25, 0.5, 0.8):
        m = make_masks(400, 16, ratio, "discrete", seed=3, step=1)
        assert abs(m.float().mean().item() - ratio) < 0.01, ratio


def test_block_mean_ratio_close_to_target():
    m = make_masks(300, 16, 0.3, "block", seed=4, step=2)
    frac = m.flatten(1).float().mean(1)
    assert (frac <= int(0.3 * 256) / 256 + 1e-9).all()
    assert frac.mean().item() > 0.28


def test_mask_key_formula():
    # fixed mixing formula: pinned values catch accidental changes
    z = ref._splitmix64(ref._splitmix64(0) ^ 0)
    assert ref.mask_key(0, 0) == (z & 0xFFFFFFFF, z >> 32)
    assert ref.mask_key(1, 2) == (2524120683, 3168394164)
    assert ref.mask_key(0, 1) != ref.mask_key(1, 0)
    assert ref.mask_key(-1, 0) == ref.mask_key(2**64 - 1, 0)
    assert all(0 <= k < 2**32 for k in ref.mask_key(123, 456))


def test_philox_known_answers():
    # Random123's known-answer vectors for Philox4x32-10
    assert ref.philox4x32_10(0, 0, 0, 0, 0, 0) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert ref.philox4x32_10(*[0xFFFFFFFF] * 6) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert ref.philox4x32_10(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


PINNED_BLOCK_4 = [[0, 0, 0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1]]
PINNED_DISCRETE_4 = [[0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 0, 0, 0, 1, 0]]


def test_block_masks_pinned():
    # the generator's output is part of the spec shared by every backend: pin a few masks
    m = make_masks(2, 4, 0.5, "block", seed=0, step=0)
    assert m.flatten(1).to(torch.uint8).tolist() == PINNED_BLOCK_4
    d = make_masks(1, 4, 0.5, "discrete", seed=0, step=0)
    assert d.flatten(1).to(torch.uint8).tolist() == PINNED_DISCRETE_4


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(n=0, grid=8, ratio=0.5), "n="),
        (dict(n=2, grid=1, ratio=0.5), "grid="),
        (dict(n=2, grid=65, ratio=0.5), "grid="),
        (dict(n=2, grid=8, ratio=0.0), "ratio="),
        (dict(n=2, grid=8, ratio=1.0), "ratio="),
        (dict(n=2, grid=8, ratio=0.5, kind="random"), "kind="),
    ],
)
def test_make_masks_validation(kwargs, word):
    with pytest.raises(ValueError, match=word):
        make_masks(**kwargs, seed=0, step=0)


# ---------------------------------------------------------------------------------------
# upsample_masks
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("g, H, W", [(4, 30, 17), (8, 224, 224), (2, 32, 32), (3, 82, 7), (2, 82, 94), (8, 37, 224)])
def test_upsample_matches_interpolate(g, H, W):
    masks = torch.rand(5, g, g, generator=_gen(g * H + W)) < 0.5
    up = upsample_masks(masks, H, W)
    assert up.shape == (5, H, W) and up.dtype == torch.bool
    assert torch.equal(up, _interp(masks, H, W))


def test_upsample_divisible_is_block_repeat():
    masks = torch.rand(3, 8, 8, generator=_gen(0)) < 0.5
    up = upsample_masks(masks, 224, 224)
    expect = masks.repeat_interleave(28, 1).repeat_interleave(28, 2)
    assert torch.equal(up, expect)


# ---------------------------------------------------------------------------------------
# mix
# ---------------------------------------------------------------------------------------


def _expected_mix(x, masks, perm, filler=None):
    """Independent construction, one sample at a time."""
    B, C, H, W = x.shape
    M = _interp(masks, H, W)
    mixed, switch = [], []
    for i in range(B):
        mi = M[i if M.shape[0] == B else 0]
        fi = filler[i] if filler is not None else x[int(perm[i])]
        mixed.append(torch.where(mi[None], x[i], fi))
        switch.append(torch.where(mi[None], fi, x[i]))
    lam = M.flatten(1).double().mean(1).float()
    return torch.stack(mixed), torch.stack(switch), lam, M


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("B, C, H, W, g", [(5, 3, 32, 32, 4), (7, 3, 30, 17, 4), (4, 2, 24, 40, 8)])
def test_mix_pixel_exact(dtype, channels_last, per_sample, B, C, H, W, g):
    seed = B * 1000 + H * 10 + W
    x = _randn(B, C, H, W, seed=seed, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    masks = make_masks(B if per_sample else 1, g, 0.5, "block", seed=seed, step=1)
    perm = torch.randperm(B, generator=_gen(seed + 1))
    mixed, switch, lam = mix(x, masks, perm, want_switch=True)
    em, es, elam, M = _expected_mix(x, masks, perm)

    assert mixed.dtype == dtype and switch.dtype == dtype
    assert torch.equal(mixed, em)
    assert torch.equal(switch, es)
    # arithmetic form m*x + (1-m)*f in float64 agrees exactly (m is 0/1)
    m64 = M[:, None].double()
    f = x[perm].double()
    assert torch.equal(mixed.double(), m64 * x.double() + (1 - m64) * f)
    if channels_last:
        assert mixed.is_contiguous(memory_format=torch.channels_last)
        assert switch.is_contiguous(memory_format=torch.channels_last)
    else:
        assert mixed.is_contiguous() and switch.is_contiguous()

    assert lam.dtype == torch.float32 and lam.shape == ((B,) if per_sample else (1,))
    assert torch.equal(lam, elam)
    if H % g == 0 and W % g == 0:
        pop = masks.flatten(1).sum(1).double() / (g * g)
        assert torch.equal(lam, pop.float())
    # mixing is not the identity: masks are never constant, perm not identity in general
    assert 0 < lam.min().item() and lam.max().item() < 1


def test_mix_lambda_ragged_counts_pixels():
    g, H, W = 4, 30, 17
    masks = torch.zeros(1, g, g, dtype=torch.bool)
    masks[0, 0, :] = True  # first grid row kept
    x = _randn(2, 1, H, W, seed=0)
    _, _, lam = mix(x, masks, torch.tensor([1, 0]))
    rows = int((_interp(masks, H, W)[0, :, 0]).sum())
    assert lam.item() == torch.tensor(rows * W / (H * W), dtype=torch.float32).item()
    assert rows / H != 0.25  # ragged: differs from popcount/g^2 here
    assert lam.item() != 0.25


def test_mix_flip_switch_is_flipped_mixed():
    B = 7  # odd: middle pairs with itself
    x = _randn(B, 3, 32, 32, seed=11)
    masks = make_masks(1, 8, 0.5, seed=2, step=0)
    perm = torch.arange(B - 1, -1, -1)
    mixed, switch, _ = mix(x, masks, perm, want_switch=True)
    assert torch.equal(switch, mixed.flip(0))
    assert torch.equal(mixed[B // 2], x[B // 2])


def test_mix_random_perm_switch_identity():
    """switch_i = m*x_pi(i) + (1-m)*x_i.  On m=1, x_pi(i) = mixed_pi(i); on m=0, x_i is the
    filler part of mixed_{pi^-1(i)} (the mixture whose filler is i). Hence
    switch = where(m, mixed[pi], mixed[argsort(pi)]); for non-involutions neither half
    alone equals switch."""
    B, H, W = 6, 16, 16
    x = _randn(B, 3, H, W, seed=12)
    masks = make_masks(1, 4, 0.5, seed=3, step=0)
    perm = torch.tensor([1, 2, 3, 4, 5, 0])  # a 6-cycle, not an involution
    inv = torch.argsort(perm)
    mixed, switch, _ = mix(x, masks, perm, want_switch=True)
    m = upsample_masks(masks, H, W)[:, None]
    assert torch.equal(switch, torch.where(m, mixed[perm], mixed[inv]))
    assert torch.equal(torch.where(m, 0, switch), torch.where(m, 0, mixed[inv]))
    assert not torch.equal(switch, mixed[inv])
    assert not torch.equal(switch, mixed[perm])


def test_mix_filler_path():
    x = _randn(4, 3, 16, 16, seed=5)
    filler = torch.zeros_like(x)
    masks = make_masks(4, 4, 0.5, seed=1, step=1)
    mixed, switch, lam = mix(x, masks, None, filler=filler)
    em, _, elam, _ = _expected_mix(x, masks, None, filler=filler)
    assert switch is None
    assert torch.equal(mixed, em)
    assert torch.equal(lam, elam)
    noise = _randn(4, 3, 16, 16, seed=6)
    mixed2, _, _ = mix(x, masks, torch.arange(4), filler=noise)
    assert torch.equal(mixed2, _expected_mix(x, masks, None, filler=noise)[0])


def test_mix_without_switch_returns_none():
    x = _randn(3, 1, 8, 8, seed=1)
    mixed, switch, _ = mix(x, make_masks(1, 2, 0.5, seed=0, step=0), torch.tensor([2, 0, 1]))
    assert switch is None and mixed.shape == x.shape


def test_mix_bad_inputs():
    x = _randn(4, 3, 16, 16, seed=0)
    masks = make_masks(1, 4, 0.5, seed=0, step=0)
    perm = torch.randperm(4, generator=_gen(0))
    with pytest.raises(ValueError, match="masks"):
        mix(x, make_masks(3, 4, 0.5, seed=0, step=0), perm)  # first dim neither 1 nor B
    with pytest.raises(ValueError, match="masks"):
        mix(x, masks[0], perm)  # 2-D
    with pytest.raises(ValueError, match="masks"):
        mix(x, masks.float(), perm)  # not bool
    with pytest.raises(ValueError, match="perm"):
        mix(x, masks, perm[:3])
    with pytest.raises(ValueError, match="perm"):
        mix(x, masks, perm.int())
    with pytest.raises(ValueError, match="perm"):
        mix(x, masks, torch.tensor([0, 0, 1, 2]))  # not a permutation
    with pytest.raises(ValueError, match="perm"):
        mix(x, masks, None)
    with pytest.raises(ValueError, match="4-D"):
        mix(x[0], masks, perm)
    with pytest.raises(ValueError, match="floating"):
        mix((x * 10).long(), masks, perm)
    with pytest.raises(ValueError, match="want_switch"):
        mix(x, masks, perm, want_switch=True, filler=torch.zeros_like(x))
    with pytest.raises(ValueError, match="filler"):
        mix(x, masks, perm, filler=torch.zeros(4, 3, 8, 8))


# ---------------------------------------------------------------------------------------
# rand_bbox / unmix
# ---------------------------------------------------------------------------------------


def test_rand_bbox_matches_formula():
    for seed in range(200):
        H, W = 17 + seed % 13, 23 + seed % 7
        lam = (seed % 11) / 10.0
        y1, y2, x1, x2 = rand_bbox(H, W, lam, generator=_gen(seed))
        g = _gen(seed)
        cx = int(torch.randint(0, W, (1,), generator=g))
        cy = int(torch.randint(0, H, (1,), generator=g))
        cut = math.sqrt(1 - lam)
        cw, ch = int(W * cut), int(H * cut)
        assert (x1, x2) == (max(cx - cw // 2, 0), min(cx + cw // 2, W))
        assert (y1, y2) == (max(cy - ch // 2, 0), min(cy + ch // 2, H))
        assert 0 <= y1 <= y2 <= H and 0 <= x1 <= x2 <= W
        assert all(isinstance(v, int) for v in (y1, y2, x1, x2))


def test_rand_bbox_clipped_at_corner():
    H = W = 3
    hits = 0
    for seed in range(200):
        g = _gen(seed)
        cx = int(torch.randint(0, W, (1,), generator=g))
        cy = int(torch.randint(0, H, (1,), generator=g))
        if cx == 0 and cy == 0:
            box = rand_bbox(H, W, 0.0, generator=_gen(seed))  # cut = 1: cw = ch = 3
            assert box == (0, 1, 0, 1)  # centre +- 1, clipped at the top-left corner
            hits += 1
        if cx == W - 1 and cy == H - 1:
            assert rand_bbox(H, W, 0.0, generator=_gen(seed)) == (1, 3, 1, 3)
            hits += 1
    assert hits >= 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmix_mixup(dtype):
    B = 5
    x = _randn(B, 3, 8, 8, seed=21, dtype=dtype)
    lam = 0.3
    out, lam_eff = unmix(x, lam, True)
    xf = x.float()
    expect = (lam * xf + (1 - lam) * xf.flip(0)).to(dtype)
    assert out.dtype == dtype and lam_eff == lam
    assert torch.equal(out, expect)
    assert torch.allclose(out[B // 2].float(), x[B // 2].float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert not torch.allclose(out[0].float(), x[0].float(), atol=1e-2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_unmix_cutmix_box(channels_last):
    B, H, W = 5, 20, 24
    x = _randn(B, 3, H, W, seed=22)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    box = (3, 15, 0, 10)
    out, lam_eff = unmix(x, 0.4, False, box=box)
    inside = torch.zeros(H, W, dtype=torch.bool)
    inside[3:15, 0:10] = True
    expect = torch.where(inside, x.flip(0), x)
    assert torch.equal(out, expect)
    assert lam_eff == pytest.approx(1 - 12 * 10 / (H * W), abs=1e-15)
    assert torch.equal(out[B // 2], x[B // 2])  # middle image pairs with itself
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(out, x)


def test_unmix_cutmix_drawn_box_recomputes_lambda():
    B, H, W = 4, 16, 16
    x = _randn(B, 2, H, W, seed=23)
    torch.manual_seed(77)
    box = rand_bbox(H, W, 0.3)
    torch.manual_seed(77)
    out, lam_eff = unmix(x, 0.3, False)
    y1, y2, x1, x2 = box
    assert lam_eff == pytest.approx(1 - (y2 - y1) * (x2 - x1) / (H * W), abs=1e-15)
    changed = (out != x).any(0).any(0)
    inside = torch.zeros(H, W, dtype=torch.bool)
    inside[y1:y2, x1:x2] = True
    assert torch.equal(changed, inside)


def test_unmix_bad_inputs():
    x = _randn(4, 3, 8, 8, seed=0)
    with pytest.raises(ValueError, match="lam"):
        unmix(x, 1.5, True)
    with pytest.raises(ValueError, match="box"):
        unmix(x, 0.5, False, box=(0, 9, 0, 4))
    with pytest.raises(ValueError, match="4-D"):
        unmix(x[0], 0.5, True)


# ---------------------------------------------------------------------------------------
# soft_infonce
# ---------------------------------------------------------------------------------------


def _unit(*shape, seed, dtype=torch.float32):
    return F.normalize(_randn(*shape, seed=seed).double(), dim=-1).to(dtype)


def _explicit_moco(q, keys, queue, pos, tau):
    M, P = pos.shape
    cols = []
    for p in range(P):
        l_pos = (q * keys[pos[:, p]]).sum(1, keepdim=True)
        logits = torch.cat([l_pos, q @ queue.t()], 1) / tau
        cols.append(F.cross_entropy(logits, torch.zeros(M, dtype=torch.long), reduction="none"))
    return torch.stack(cols, 1)


def _explicit_inbatch(q, keys, pos, tau, exclude=None):
    M, P = pos.shape
    logits = q @ keys.t() / tau
    if exclude is not None:
        logits = logits.clone()
        for r in range(M):
            if int(exclude[r]) >= 0:
                logits[r, int(exclude[r])] = float("-inf")
    return torch.stack([F.cross_entropy(logits, pos[:, p], reduction="none") for p in range(P)], 1)


@pytest.mark.parametrize("P", [1, 2])
def test_soft_infonce_moco_matches_cross_entropy(P):
    M, N, K, D, tau = 6, 8, 32, 16, 0.2
    q = _unit(M, D, seed=1)
    keys = _unit(N, D, seed=2)
    queue = _unit(K, D, seed=3)
    pos = torch.stack([torch.arange(M), torch.arange(M).flip(0)], 1)[:, :P].contiguous()
    out = soft_infonce(q, keys, queue, pos, tau)
    assert out.shape == (M, P) and out.dtype == torch.float32
    expect = _explicit_moco(q, keys, queue, pos, tau)
    assert torch.allclose(out, expect, atol=1e-5, rtol=1e-5)
    # the other keys are NOT in the denominator: changing a non-positive key has no effect
    keys2 = keys.clone()
    unused = [j for j in range(N) if j not in pos.flatten().tolist()]
    assert unused
    keys2[unused[0]] = -keys2[unused[0]]
    assert torch.equal(soft_infonce(q, keys2, queue, pos, tau), out)


def test_soft_infonce_moco_gradients_match():
    M, N, K, D, tau = 5, 5, 20, 8, 0.1
    q = _unit(M, D, seed=4).requires_grad_()
    keys = _unit(N, D, seed=5).requires_grad_()
    queue = _unit(K, D, seed=6).requires_grad_()
    pos = torch.stack([torch.arange(M), torch.tensor([4, 3, 2, 1, 0])], 1)
    w = _randn(M, 2, seed=7)
    out = soft_infonce(q, keys, queue, pos, tau)
    gq, gk = torch.autograd.grad((out * w).sum(), (q, keys))
    expect = _explicit_moco(q, keys, queue.detach(), pos, tau)
    eq, ek = torch.autograd.grad((expect * w).sum(), (q, keys))
    assert torch.allclose(gq, eq, atol=1e-5)
    assert torch.allclose(gk, ek, atol=1e-5)
    # queue gets no gradient
    out2 = soft_infonce(q, keys, queue, pos, tau)
    (gqueue,) = torch.autograd.grad(out2.sum(), (queue,), allow_unused=True)
    assert gqueue is None
    out3 = soft_infonce(q, keys, queue, pos, tau)
    out3.sum().backward()
    assert queue.grad is None and q.grad is not None and keys.grad is not None


@pytest.mark.parametrize("use_exclude", [False, True])
def test_soft_infonce_inbatch_matches_cross_entropy(use_exclude):
    # SimCLR-like: 2N embeddings, each query's positive is its partner, self excluded
    n, D, tau = 4, 8, 0.5
    z = _unit(2 * n, D, seed=8).requires_grad_()
    q = _unit(2 * n, D, seed=9).requires_grad_()
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    pos = torch.stack([partner, (partner + 1) % (2 * n)], 1)
    exclude = None
    if use_exclude:
        exclude = torch.arange(2 * n)
        exclude[1] = -1  # row 1 excludes nothing
        exclude[6] = 5
    out = soft_infonce(q, z, None, pos, tau, exclude=exclude)
    expect = _explicit_inbatch(q, z, pos, tau, exclude)
    assert torch.allclose(out, expect, atol=1e-5, rtol=1e-5)
    w = _randn(2 * n, 2, seed=10)
    g1 = torch.autograd.grad((out * w).sum(), (q, z))
    g2 = torch.autograd.grad((expect * w).sum(), (q, z))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5)
    if use_exclude:
        assert not torch.allclose(out, _explicit_inbatch(q, z, pos, tau, None))


def test_soft_infonce_gradcheck_float64():
    M, N, K, D = 3, 4, 5, 6
    q = _unit(M, D, seed=11, dtype=torch.float64).requires_grad_()
    keys = _unit(N, D, seed=12, dtype=torch.float64).requires_grad_()
    queue = _unit(K, D, seed=13, dtype=torch.float64)
    pos = torch.tensor([[0, 3], [1, 2], [2, 0]])
    assert soft_infonce(q, keys, queue, pos, 0.3).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, b: soft_infonce(a, b, queue, pos, 0.3), (q, keys))
    exclude = torch.tensor([1, -1, 3])
    assert torch.autograd.gradcheck(lambda a, b: soft_infonce(a, b, None, pos, 0.3, exclude=exclude), (q, keys))


def test_soft_infonce_bf16_upcasts():
    M, N, K, D, tau = 8, 8, 64, 32, 0.2
    q = _unit(M, D, seed=14)
    keys = _unit(N, D, seed=15)
    queue = _unit(K, D, seed=16)
    pos = torch.arange(M)[:, None]
    out32 = soft_infonce(q, keys, queue, pos, tau)
    out16 = soft_infonce(q.bfloat16(), keys.bfloat16(), queue.bfloat16(), pos, tau)
    assert out16.dtype == torch.float32
    assert torch.allclose(out16, out32, atol=5e-2, rtol=2e-2)
    # equals the fp32 computation on the bf16-rounded values
    exact = soft_infonce(q.bfloat16().float(), keys.bfloat16().float(), queue.bfloat16().float(), pos, tau)
    assert torch.allclose(out16, exact, atol=1e-6)
    out_h = soft_infonce(q.half(), keys.half(), None, pos, tau)
    assert out_h.dtype == torch.float32


def test_soft_infonce_bad_inputs():
    q = _unit(4, 8, seed=0)
    keys = _unit(4, 8, seed=1)
    queue = _unit(10, 8, seed=2)
    pos = torch.arange(4)[:, None]
    with pytest.raises(ValueError, match="exclude"):
        soft_infonce(q, keys, queue, pos, 0.2, exclude=torch.full((4,), -1))
    with pytest.raises(ValueError, match="tau"):
        soft_infonce(q, keys, queue, pos, 0.0)
    with pytest.raises(ValueError, match="pos"):
        soft_infonce(q, keys, queue, pos + 4, 0.2)
    with pytest.raises(ValueError, match="pos"):
        soft_infonce(q, keys, queue, pos - 1, 0.2)
    with pytest.raises(ValueError, match="pos"):
        soft_infonce(q, keys, queue, pos.int(), 0.2)
    with pytest.raises(ValueError, match="pos"):
        soft_infonce(q, keys, queue, torch.arange(4), 0.2)  # 1-D
    with pytest.raises(ValueError, match="keys"):
        soft_infonce(q, keys[:, :5], queue, pos, 0.2)
    with pytest.raises(ValueError, match="queue"):
        soft_infonce(q, keys, queue[:, :5], pos, 0.2)
    with pytest.raises(ValueError, match="q"):
        soft_infonce(q[0], keys, queue, pos, 0.2)
    with pytest.raises(ValueError, match="exclude"):
        soft_infonce(q, keys, None, pos, 0.2, exclude=torch.full((4,), 4))
    with pytest.raises(ValueError, match="exclude"):
        soft_infonce(q, keys, None, pos, 0.2, exclude=torch.full((4,), -2))
    with pytest.raises(ValueError, match="excluded"):
        soft_infonce(q, keys, None, pos, 0.2, exclude=torch.arange(4))  # positive excluded
