"""MixedAE group mixing: the balanced cell map (mixfast.ops.group_mix.group_cell_map against its reference) and the
mixed image / segment ids (group_mix against independent per-pixel and per-token loops)."""

from __future__ import annotations

import pytest
import torch

from mixfast.ops import reference as ref
from mixfast.ops.group_mix import group_cell_map, group_mix

HAS_GPU = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])


def _images(b, c, h, w, *, dtype=torch.float32, channels_last=False, device="cpu", seed=0):
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _counts(cmap, group_size):
    return torch.stack([(cmap == i).flatten(1).sum(1) for i in range(group_size)], 1)  # [G, group_size]


# ---------------------------------------------------------------------------------------------------------------
# cell map
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups,group_size,side", [(9, 4, 7), (5, 2, 2), (7, 3, 5), (3, 1, 3), (4, 16, 4)])
@pytest.mark.parametrize("seed,step", [(0, 0), (1234, 17), (-3, 2**40 + 1)])
def test_fast_cell_map_equals_reference(groups, group_size, side, seed, step):
    fast = group_cell_map(groups, group_size, side, seed=seed, step=step)
    slow = ref.group_cell_map(groups, group_size, side, seed=seed, step=step)
    assert fast.dtype == slow.dtype == torch.int64 and fast.device.type == "cpu"
    assert fast.shape == (groups, side, side)
    assert torch.equal(fast, slow)


def test_mixedae_cell_counts_are_balanced_with_random_extra_cells():
    """49 cells over 4 images: 12/12/12/13 in every group, the 13 on a randomly chosen image."""
    cmap = group_cell_map(400, 4, 7, seed=7, step=3)
    counts = _counts(cmap, 4)
    assert torch.equal(counts.sort(1).values, torch.tensor([12, 12, 12, 13]).expand(400, 4))
    extra = counts.argmax(1)
    seen = torch.bincount(extra, minlength=4)
    assert int(seen.min()) > 60, seen  # each image gets the extra cell about a quarter of the time


@pytest.mark.parametrize("group_size,side", [(3, 5), (2, 3), (5, 4), (4, 4)])
def test_counts_differ_by_at_most_one(group_size, side):
    counts = _counts(group_cell_map(50, group_size, side, seed=1, step=2), group_size)
    assert int((counts.max(1).values - counts.min(1).values).max()) <= 1
    assert torch.equal(counts.sum(1), torch.full((50,), side * side))
    assert int(counts.min()) >= 1


def test_cell_map_reproducible_and_varies_with_step_and_seed():
    a = group_cell_map(32, 4, 7, seed=5, step=10)
    assert torch.equal(a, group_cell_map(32, 4, 7, seed=5, step=10))
    assert not torch.equal(a, group_cell_map(32, 4, 7, seed=5, step=11))
    assert not torch.equal(a, group_cell_map(32, 4, 7, seed=6, step=10))
    # group g does not depend on how many groups are drawn (every rank can draw its own slice)
    assert torch.equal(a[:5], group_cell_map(5, 4, 7, seed=5, step=10))
    # groups differ from one another
    assert len({tuple(m.flatten().tolist()) for m in a}) == 32


def test_cell_map_is_not_the_mixmask_stream():
    """The cell map draws from Philox stream 2; the words of a MixMask mask (streams 0, 1) of the same (seed, step)
    are different ones."""
    key = ref.mask_key(3, 4)
    words = ref._group_words(key, 0, 8)
    assert words[:4] == list(ref.philox4x32_10(0, 0, ref.GROUP_MAP_STREAM, 0, *key))
    assert words[:4] != list(ref.philox4x32_10(0, 0, 0, 0, *key))


def test_cell_map_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="num_groups"):
        group_cell_map(0, 4, 7, seed=0, step=0)
    with pytest.raises(ValueError, match="group_size"):
        group_cell_map(2, 0, 7, seed=0, step=0)
    with pytest.raises(ValueError, match="group_size"):
        group_cell_map(2, 50, 7, seed=0, step=0)  # more images than cells
    with pytest.raises(ValueError, match="cells_side"):
        group_cell_map(2, 4, 0, seed=0, step=0)
    with pytest.raises(TypeError, match="seed"):
        group_cell_map(2, 4, 7, seed=1.5, step=0)
    with pytest.raises(TypeError, match="step"):
        ref.group_cell_map(2, 4, 7, seed=1, step="3")


# ---------------------------------------------------------------------------------------------------------------
# group_mix
# ---------------------------------------------------------------------------------------------------------------


def _pixel_loop_check(x, mixed, cmap, group_size):
    """Every output pixel equals the same pixel of the chosen source image (an independent per-pixel loop)."""
    G, C, H, W = mixed.shape
    side = cmap.shape[1]
    ch, cw = H // side, W // side
    xc, mc = x.cpu(), mixed.cpu()
    for g in range(G):
        for y in range(H):
            for xx in range(W):
                src = g * group_size + int(cmap[g, y // ch, xx // cw])
                assert torch.equal(mc[g, :, y, xx], xc[src, :, y, xx]), (g, y, xx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_every_mixed_pixel_is_its_source_pixel(device, dtype, channels_last):
    G, gs, side, H, W = 2, 3, 3, 12, 18  # cells of 4 x 6 pixels
    x = _images(G * gs, 3, H, W, dtype=dtype, channels_last=channels_last, device=device)
    cmap = group_cell_map(G, gs, side, seed=2, step=5)
    mixed, seg = group_mix(x, cmap, token_patch=2)
    assert mixed.shape == (G, 3, H, W) and mixed.dtype == dtype and mixed.device == x.device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert mixed.is_contiguous(memory_format=fmt)
    _pixel_loop_check(x, mixed, cmap, gs)
    want, want_seg = ref.group_mix(x, cmap, 2)
    assert torch.equal(mixed, want) and torch.equal(seg, want_seg)
    assert want.is_contiguous(memory_format=fmt)


def test_reference_group_mix_passes_the_pixel_loop():
    x = _images(8, 2, 8, 8)
    cmap = ref.group_cell_map(2, 4, 4, seed=0, step=1)
    mixed, _ = ref.group_mix(x, cmap, 1)
    _pixel_loop_check(x, mixed, cmap, 4)


@pytest.mark.parametrize("side,patch,size", [(7, 16, 224), (7, 8, 112), (3, 2, 12), (2, 3, 12)])
def test_segment_ids_are_the_cell_map_at_token_resolution(side, patch, size):
    G, gs = 3, 4
    x = _images(G * gs, 1, size, size)
    cmap = group_cell_map(G, gs, side, seed=9, step=1)
    _, seg = group_mix(x, cmap, patch)
    ht = size // patch
    assert seg.shape == (G, ht * ht) and seg.dtype == torch.int64
    cell = size // side
    for g in range(G):
        for ty in range(ht):
            for tx in range(ht):
                assert int(seg[g, ty * ht + tx]) == int(cmap[g, ty * patch // cell, tx * patch // cell])
    if (side, patch, size) == (7, 16, 224):  # MixedAE: 196 tokens, each cell 2 x 2 tokens, 12/12/12/13 cells
        assert torch.equal(_counts(seg, gs).sort(1).values, torch.tensor([48, 48, 48, 52]).expand(G, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gradient_to_x_is_the_indicator(device, channels_last):
    G, gs, side, H = 2, 4, 4, 8
    x = _images(G * gs, 3, H, H, channels_last=channels_last, device=device).requires_grad_()
    cmap = group_cell_map(G, gs, side, seed=4, step=4)
    mixed, _ = group_mix(x, cmap, 1)
    gout = torch.randn(mixed.shape, generator=torch.Generator().manual_seed(1)).to(device)
    mixed.backward(gout)
    up = cmap.repeat_interleave(H // side, 1).repeat_interleave(H // side, 2)  # [G, H, W] source per pixel
    ind = torch.stack([(up == i) for i in range(gs)], 1).reshape(G * gs, 1, H, H).float().to(device)
    want = ind * gout.repeat_interleave(gs, 0)
    assert torch.equal(x.grad, want)


def test_group_size_argument_and_non_square_images():
    x = _images(6, 3, 8, 16)
    cmap = group_cell_map(2, 3, 4, seed=0, step=0)
    a, sa = group_mix(x, cmap, 2, group_size=3)
    b, sb = ref.group_mix(x, cmap, 2)
    assert torch.equal(a, b) and torch.equal(sa, sb) and sa.shape == (2, 4 * 8)
    _pixel_loop_check(x, a, cmap, 3)


def test_strided_input_and_validate_false():
    big = _images(8, 5, 8, 8)
    x = big[:, 1:4]  # neither NCHW- nor channels_last-contiguous
    cmap = group_cell_map(2, 4, 2, seed=1, step=1)
    a, _ = group_mix(x, cmap, 2)
    b, _ = group_mix(x, cmap, 2, validate=False)
    assert torch.equal(a, b) and torch.equal(a, ref.group_mix(x, cmap, 2)[0])


def test_group_mix_bad_arguments_name_the_argument():
    x = _images(8, 3, 14, 14)
    cmap = group_cell_map(2, 4, 7, seed=0, step=0)
    with pytest.raises(ValueError, match="height and width"):
        group_mix(_images(8, 3, 15, 14), cmap, 1)  # H not divisible by cells_side
    with pytest.raises(ValueError, match="batch of x"):
        group_mix(_images(7, 3, 14, 14), cmap, 1)  # batch not a multiple of the groups
    with pytest.raises(ValueError, match="group_size"):
        group_mix(x, cmap, 1, group_size=3)
    with pytest.raises(ValueError, match="cell_map entries"):
        group_mix(x, torch.full((2, 7, 7), 4, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="cell_map entries"):
        group_mix(x, torch.full((2, 7, 7), -1, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="cell_map must be"):
        group_mix(x, cmap.int(), 1)
    with pytest.raises(ValueError, match="cell_map must be"):
        group_mix(x, cmap[:, :, :3], 1)
    with pytest.raises(ValueError, match="token_patch"):
        group_mix(x, cmap, 3)  # cells are 2 x 2 pixels
    with pytest.raises(ValueError, match="token_patch"):
        group_mix(x, cmap, 0)
    with pytest.raises(ValueError, match="x must be"):
        group_mix(x[0], cmap, 1)
    with pytest.raises(ValueError, match="x must be floating"):
        group_mix(x.long(), cmap, 1)
    # validate=False skips only the value check (shapes are still checked)
    with pytest.raises(ValueError, match="batch of x"):
        group_mix(_images(7, 3, 14, 14), cmap, 1, validate=False)
    for fn in (ref.group_mix, group_mix):
        with pytest.raises(ValueError, match="height and width"):
            fn(_images(8, 3, 14, 20), cmap, 1)
