"""ViT encoder / MAE decoder against independent computations.

Oracles: parameter counts from the closed-form count of a pre-norm ViT block (12 D^2 + 13 D
at MLP ratio 4) and the published timm totals; the sin-cos tables from a numpy loop over the
formula (MAE's layout: first half of the channels = column, second half = row); attention from
an explicit softmax(QK^T / sqrt(d)) V in float64; masking and decoding from the argsort of the
same noise, re-derived here. Big models are built on the meta device (shapes only, no memory).

Tolerances: float64 paths at 1e-10; float32 paths (full forward passes, different summation
orders) at 1e-5; init statistics on thousands of draws from a fixed seed at ~10%.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixfast.models import vit as V
from mixfast.models.vit import (MAEDecoder, VisionTransformer, build_mae_decoder, build_vit, get_2d_sincos_pos_embed,
                                param_groups_layer_decay, param_groups_no_decay, patchify, random_masking,
                                sincos_1d, timm_state_dict, unpatchify, vit_sizes)

TIMM_VIT_B16 = 85_798_656  # timm vit_base_patch16_224, num_classes=0 (pos_embed counted)
TIMM_VIT_B16_HEAD = 86_567_656  # with the 1000-class head


def tiny(depth=2, dim=32, heads=4, img=16, patch=4, **kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img, patch, 3, dim, depth, heads, **kw)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- parameter counts


def block_params(d: int, mlp: int = 4) -> int:
    """norm1 + qkv + proj + norm2 + fc1 + fc2 of one pre-norm block."""
    return 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * mlp * d + mlp * d) + (mlp * d * d + d)


def encoder_params(d, depth, patch, tokens, chans=3, classes=0) -> int:
    """timm's count: patch conv + cls + pos table + blocks + final norm (+ head)."""
    head = d * classes + classes if classes else 0
    return (d * chans * patch * patch + d) + d + (tokens + 1) * d + depth * block_params(d) + 2 * d + head


def decoder_params(d_enc, d, depth, patch, chans=3) -> int:
    """MAE decoder, trainable only: embed + mask token + blocks + norm + pred (the position table is fixed)."""
    return (d_enc * d + d) + d + depth * block_params(d) + 2 * d + (d * patch * patch * chans + patch * patch * chans)


def test_block_formula_is_12d2_13d():
    assert all(block_params(d) == 12 * d * d + 13 * d for d in (8, 96, 768))


def test_vit_base_matches_timm_count():
    assert encoder_params(768, 12, 16, 196) == TIMM_VIT_B16
    assert encoder_params(768, 12, 16, 196, classes=1000) == TIMM_VIT_B16_HEAD
    with torch.device("meta"):
        enc, head = build_vit("vit_base_patch16"), build_vit("vit_base_patch16", num_classes=1000)
    pos = enc.pos_embed.numel()
    assert pos == 197 * 768
    assert n_params(enc) + pos == TIMM_VIT_B16
    assert n_params(enc) == TIMM_VIT_B16 - 151_296  # trainable: the positions are a buffer
    assert n_params(head) + head.pos_embed.numel() == TIMM_VIT_B16_HEAD


def test_mae_base_decoder_count():
    with torch.device("meta"):
        dec = build_mae_decoder("vit_base_patch16")
    assert n_params(dec) == decoder_params(768, 512, 8, 16) == 26_008_320
    assert dec.decoder_pos_embed.numel() == 197 * 512


@pytest.mark.parametrize("name", sorted(vit_sizes()))
def test_every_size_matches_formula(name):
    cfg = vit_sizes()[name]
    tokens = (cfg.img_size // cfg.patch_size) ** 2
    with torch.device("meta"):
        enc, dec = build_vit(name), build_mae_decoder(name)
    assert n_params(enc) + enc.pos_embed.numel() == encoder_params(cfg.embed_dim, cfg.depth, cfg.patch_size, tokens)
    assert n_params(dec) == decoder_params(cfg.embed_dim, cfg.decoder_embed_dim, cfg.decoder_depth, cfg.patch_size)


def test_size_table():
    sizes = vit_sizes()
    b = sizes["vit_base_patch16"]
    assert (b.embed_dim, b.depth, b.num_heads, b.mlp_ratio) == (768, 12, 12, 4.0)
    assert (b.decoder_embed_dim, b.decoder_depth, b.decoder_num_heads) == (512, 8, 16)
    assert (sizes["vit_large_patch16"].embed_dim, sizes["vit_large_patch16"].depth) == (1024, 24)
    t = sizes["vit_tiny"]
    assert t.img_size == 32 and t.img_size % t.patch_size == 0
    with torch.device("meta"):
        total = n_params(build_vit("vit_tiny")) + n_params(build_mae_decoder("vit_tiny"))
    assert total < 1_000_000
    sizes.clear()
    assert "vit_tiny" in vit_sizes()  # a copy


# ----------------------------------------------------------------------------- sin-cos tables


def np_sincos(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    out = np.outer(np.asarray(pos, dtype=np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def np_table(dim, h, w, cls):
    rows = []
    for i in range(h):
        for j in range(w):
            q = dim // 4
            om = [1.0 / 10000 ** (k / q) for k in range(q)]
            rows.append([math.sin(j * o) for o in om] + [math.cos(j * o) for o in om]
                        + [math.sin(i * o) for o in om] + [math.cos(i * o) for o in om])
    table = np.array(rows)
    return np.concatenate([np.zeros((1, dim)), table]) if cls else table


@pytest.mark.parametrize("dim,grid,cls", [(16, 4, True), (16, (3, 5), False), (768, 14, True)])
def test_2d_table_matches_formula(dim, grid, cls):
    h, w = (grid, grid) if isinstance(grid, int) else grid
    got = get_2d_sincos_pos_embed(dim, grid, cls)
    assert got.dtype == torch.float32 and got.shape == (h * w + cls, dim)
    np.testing.assert_allclose(got.numpy(), np_table(dim, h, w, cls), atol=1e-6)


def test_2d_table_layout():
    t = get_2d_sincos_pos_embed(8, (2, 3))  # token 1 = row 0, col 1: the first half encodes the column
    assert t[1, 0].item() == pytest.approx(math.sin(1.0))
    assert t[1, 4].item() == pytest.approx(0.0) and t[1, 6].item() == pytest.approx(1.0)
    assert t[3, 4].item() == pytest.approx(math.sin(1.0))  # token 3 = row 1, col 0


def test_sincos_1d_matches_formula():
    ids = torch.tensor([[0, 1, 3], [2, 2, 7]])
    got = sincos_1d(12, ids)
    assert got.shape == (2, 3, 12)
    np.testing.assert_allclose(got.reshape(-1, 12).numpy(), np_sincos(12, ids.numpy()), atol=1e-6)


def test_positions_are_fixed_buffers():
    m = tiny()
    dec = MAEDecoder(16, 4, 3, 32, 16, 1, 2)
    names = {n for n, _ in m.named_parameters()} | {n for n, _ in dec.named_parameters()}
    assert "pos_embed" not in names and "decoder_pos_embed" not in names
    assert not m.pos_embed.requires_grad and "pos_embed" in m.state_dict()
    torch.testing.assert_close(m.pos_embed[0], get_2d_sincos_pos_embed(32, 4, True))
    torch.testing.assert_close(dec.decoder_pos_embed[0], get_2d_sincos_pos_embed(16, 4, True))


def test_bad_table_dims():
    with pytest.raises(ValueError, match="dim"):
        get_2d_sincos_pos_embed(30, 4)
    with pytest.raises(ValueError, match="dim"):
        sincos_1d(7, torch.arange(3))


# ----------------------------------------------------------------------------- attention


def manual_attention(q, k, v):
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v


def test_attention_is_softmax_qk_v_float64():
    m = tiny().double()
    attn = m.blocks[0].attn
    x = torch.randn(2, 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w, b = attn.qkv.weight, attn.qkv.bias
    heads, hd = 4, 8
    out = []
    for h in range(heads):  # qkv rows: [q heads..., k heads..., v heads...], head_dim each
        q = x @ w[h * hd:(h + 1) * hd].T + b[h * hd:(h + 1) * hd]
        k = x @ w[32 + h * hd:32 + (h + 1) * hd].T + b[32 + h * hd:32 + (h + 1) * hd]
        v = x @ w[64 + h * hd:64 + (h + 1) * hd].T + b[64 + h * hd:64 + (h + 1) * hd]
        out.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), -1) @ v)
    expected = attn.proj(torch.cat(out, dim=-1))
    torch.testing.assert_close(attn(x), expected, atol=1e-10, rtol=1e-10)


def test_dense_attention_goes_through_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        calls.append(q.shape)
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    m = tiny(depth=3)
    m(torch.randn(2, 3, 16, 16))
    assert calls == [torch.Size([2, 4, 17, 8])] * 3
    calls.clear()
    m.forward_features(m.patch_tokens(torch.randn(2, 3, 16, 16)), attn_fn=manual_attention)
    assert calls == []


def test_attn_fn_replaces_attention():
    m = tiny().double().eval()
    tokens = m.patch_tokens(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    seen = []

    def fn(q, k, v):
        seen.append(q.shape)
        return manual_attention(q, k, v)

    torch.testing.assert_close(m.forward_features(tokens, attn_fn=fn), m.forward_features(tokens),
                               atol=1e-10, rtol=1e-10)
    assert seen == [torch.Size([2, 4, 17, 8])] * 2


# ----------------------------------------------------------------------------- segment embedding


def segment_vectors(dim, ids):
    return torch.from_numpy(np_sincos(dim, ids.numpy())).float().reshape(*ids.shape, dim)


def test_no_segment_is_plain_vit():
    m = tiny().eval()
    tokens = m.patch_tokens(torch.randn(2, 3, 16, 16))
    x = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(2, -1, -1), tokens], dim=1)
    for block in m.blocks:
        x = block(x)
    torch.testing.assert_close(m.forward_features(tokens, segment=None), m.norm(x))


@pytest.mark.parametrize("with_cls", [False, True])
def test_segment_added_before_every_block(with_cls):
    m = tiny(depth=3).eval()
    tokens = m.patch_tokens(torch.randn(2, 3, 16, 16))
    ids = torch.randint(0, 4, (2, 16 + with_cls), generator=torch.Generator().manual_seed(2))
    se = segment_vectors(32, ids)
    if not with_cls:
        se = torch.cat([torch.zeros(2, 1, 32), se], dim=1)  # CLS: no segment
    ins, outs = [], []
    hooks = [b.register_forward_pre_hook(lambda mod, a: ins.append(a[0].detach())) for b in m.blocks]
    hooks += [b.register_forward_hook(lambda mod, a, o: outs.append(o.detach())) for b in m.blocks]
    m.forward_features(tokens, segment=ids)
    for h in hooks:
        h.remove()
    first = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(2, -1, -1), tokens], dim=1)
    torch.testing.assert_close(ins[0], first + se)
    for i in range(1, 3):
        torch.testing.assert_close(ins[i], outs[i - 1] + se)


def test_segment_ids_change_outputs():
    m = tiny().eval()
    tokens = m.patch_tokens(torch.randn(2, 3, 16, 16))
    ids = torch.zeros(2, 16, dtype=torch.long)
    ids2 = ids.clone()
    ids2[:, 8:] = 1
    a, b, c = (m.forward_features(tokens, segment=s) for s in (None, ids, ids2))
    assert not torch.allclose(a, b, atol=1e-4) and not torch.allclose(b, c, atol=1e-4)
    with pytest.raises(ValueError, match="segment"):
        m.forward_features(tokens, segment=torch.zeros(2, 5, dtype=torch.long))


# ----------------------------------------------------------------------------- masking, patches, decoder


@pytest.mark.parametrize("ratio", [0.75, 0.6, 0.0])
def test_random_masking(ratio):
    b, n, d = 3, 64, 5
    tokens = torch.randn(b, n, d)
    kept, mask, ids_restore = random_masking(tokens, ratio, torch.Generator().manual_seed(3))
    keep = int(n * (1 - ratio))
    assert kept.shape == (b, keep, d)
    assert mask.shape == (b, n) and torch.equal(mask.sum(1), torch.full((b,), float(n - keep)))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    shuffle = torch.argsort(torch.rand(b, n, generator=torch.Generator().manual_seed(3)), dim=1)  # same noise
    torch.testing.assert_close(kept, torch.stack([tokens[i, shuffle[i, :keep]] for i in range(b)]))
    for i in range(b):
        assert mask[i, shuffle[i, :keep]].sum() == 0 and mask[i, shuffle[i, keep:]].sum() == n - keep
        assert torch.equal(shuffle[i][ids_restore[i]], torch.arange(n))  # ids_restore inverts the shuffle
    removed = torch.stack([tokens[i, shuffle[i, keep:]] for i in range(b)])
    restored = torch.gather(torch.cat([kept, removed], 1), 1, ids_restore[..., None].expand(-1, -1, d))
    torch.testing.assert_close(restored, tokens)


def test_random_masking_bad_ratio():
    with pytest.raises(ValueError, match="ratio"):
        random_masking(torch.randn(1, 4, 2), 1.0)


@pytest.mark.parametrize("shape,p", [((2, 3, 8, 8), 4), ((1, 3, 8, 12), 4), ((2, 1, 6, 6), 3)])
def test_patchify_layout_and_round_trip(shape, p):
    x = torch.randn(shape)
    b, c, hh, ww = shape
    y = patchify(x, p)
    h, w = hh // p, ww // p
    assert y.shape == (b, h * w, p * p * c)
    for i in range(h):
        for j in range(w):
            patch = x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(0, 2, 3, 1).reshape(b, -1)
            torch.testing.assert_close(y[:, i * w + j], patch)
    torch.testing.assert_close(unpatchify(y, p, (h, w)), x)
    with pytest.raises(ValueError, match="imgs"):
        patchify(torch.randn(1, 3, 7, 8), 4)


def test_decoder_keep_map_equals_ids_restore():
    torch.manual_seed(0)
    enc, dec = tiny(), MAEDecoder(16, 4, 3, 32, 16, 2, 2)
    img = torch.randn(2, 3, 16, 16)
    latent, mask, ids_restore = enc.forward_masked(img, 0.75, torch.Generator().manual_seed(4))
    out = dec(latent, ids_restore)
    assert out.shape == (2, 16, 48)
    full = torch.randn(2, 17, 32) * 100  # garbage at the removed positions: must not matter
    full[:, 0] = latent[:, 0]
    shuffle = torch.argsort(ids_restore, dim=1)
    for i in range(2):
        full[i, 1 + shuffle[i, :4]] = latent[i, 1:]
    torch.testing.assert_close(dec.forward_keep(full, mask == 0), out, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- export, optimizer groups


def expected_timm_keys(depth, head):
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"]
    for i in range(depth):
        keys += [f"blocks.{i}.{k}" for k in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
                                             "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                                             "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
    return set(keys) | ({"head.weight", "head.bias"} if head else set())


@pytest.mark.parametrize("classes", [0, 5])
def test_timm_state_dict(classes):
    m = tiny(num_classes=classes)
    sd = timm_state_dict(m)
    assert set(sd) == expected_timm_keys(2, classes)
    d = 32
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 17, d), "patch_embed.proj.weight": (d, 3, 4, 4),
              "blocks.1.attn.qkv.weight": (3 * d, d), "blocks.1.attn.qkv.bias": (3 * d,),
              "blocks.0.attn.proj.weight": (d, d), "blocks.0.mlp.fc1.weight": (4 * d, d),
              "blocks.0.mlp.fc2.weight": (d, 4 * d), "norm.weight": (d,)}
    if classes:
        shapes["head.weight"] = (classes, d)
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    sd["norm.weight"].add_(1)  # a copy, not a view of the module
    assert torch.equal(m.norm.weight, torch.ones(d))


def test_no_decay_groups():
    model = nn.ModuleDict({"encoder": tiny(num_classes=3), "decoder": MAEDecoder(16, 4, 3, 32, 16, 1, 2)})
    model["encoder"].blocks[0].norm1.weight.requires_grad_(False)  # frozen: in no group
    decay, no_decay = param_groups_no_decay(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    want_none = {n for n, p in named.items() if p.ndim == 1} | {"encoder.cls_token", "decoder.mask_token"}
    ids = {id(p): n for n, p in named.items()}
    assert {ids[id(p)] for p in no_decay["params"]} == want_none
    assert {ids[id(p)] for p in decay["params"]} == set(named) - want_none
    assert all(p.ndim >= 2 for p in decay["params"])


def test_layer_decay_groups():
    m = tiny(depth=2, num_classes=3)
    groups = param_groups_layer_decay(m, 0.05, 0.75)

    def layer(name):
        if name == "cls_token" or name.startswith("patch_embed."):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return 3

    owner = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in owner
            owner[id(p)] = g
    for name, p in m.named_parameters():
        g = owner[id(p)]
        assert g["lr_scale"] == pytest.approx(0.75 ** (3 - layer(name))), name
        assert g["weight_decay"] == (0.0 if p.ndim == 1 or name == "cls_token" else 0.05), name
    assert len(owner) == len(list(m.parameters()))
    assert sorted({g["lr_scale"] for g in groups}) == pytest.approx([0.75 ** 3, 0.75 ** 2, 0.75, 1.0])
    torch.optim.AdamW(groups, lr=1e-3)  # the groups are valid optimizer input


# ----------------------------------------------------------------------------- init, training mechanics


def test_mae_init():
    m = VisionTransformer(32, 4, 3, 96, 2, 4, num_classes=10)  # seeded by the autouse _seed fixture
    xavier_std = lambda fan_in, fan_out: math.sqrt(2.0 / (fan_in + fan_out))  # noqa: E731
    w = m.patch_embed.proj.weight
    bound = math.sqrt(6.0 / (96 + 48))
    assert w.abs().max() <= bound and w.std().item() == pytest.approx(xavier_std(48, 96), rel=0.1)
    qkv = m.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= math.sqrt(6.0 / (96 + 288))
    assert qkv.std().item() == pytest.approx(xavier_std(96, 288), rel=0.05)
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear):
            assert torch.count_nonzero(mod.bias) == 0, name
        if isinstance(mod, nn.LayerNorm):
            assert torch.equal(mod.weight, torch.ones(96)) and torch.count_nonzero(mod.bias) == 0
            assert mod.eps == 1e-6
    assert m.cls_token.std().item() == pytest.approx(0.02, rel=0.25)
    assert m.head.weight.std().item() < 1e-4
    dec = MAEDecoder(32, 4, 3, 96, 64, 1, 4)
    assert dec.mask_token.std().item() == pytest.approx(0.02, rel=0.3)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def test_gradients_reach_every_parameter():
    m, dec = tiny(num_classes=4), MAEDecoder(16, 4, 3, 32, 16, 1, 2)
    img = torch.randn(2, 3, 16, 16)
    latent, _, ids = m.forward_masked(img, 0.5)
    loss = m(img).square().sum() * 1e4 + dec(latent, ids).square().mean()
    loss.backward()
    for name, p in list(m.named_parameters()) + list(dec.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_memory_formats_and_strides():
    m = tiny().eval()
    x = torch.randn(2, 3, 16, 16)
    ref = m(x)
    cl = x.contiguous(memory_format=torch.channels_last)
    strided = torch.randn(2, 3, 16, 32)[..., ::2]
    strided.copy_(x)
    assert not strided.is_contiguous() and not cl.is_contiguous()
    torch.testing.assert_close(m(cl), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(strided), ref, atol=1e-5, rtol=1e-5)


def test_pool_and_head():
    m = tiny(pool="mean").eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(m(x), m.forward_features(m.patch_tokens(x))[:, 1:].mean(1))
    c = tiny(num_classes=7).eval()
    assert c(x).shape == (2, 7)
    torch.testing.assert_close(c(x), c.head(c.forward_features(c.patch_tokens(x))[:, 0]))


def test_drop_path():
    m = tiny(depth=4, drop_path_rate=0.3)
    assert [b.drop_path_rate for b in m.blocks] == pytest.approx(torch.linspace(0, 0.3, 4).tolist())
    x = torch.randn(8, 3, 16, 16)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    assert not torch.allclose(m(x), m(x))
    branch = torch.ones(1000, 2, 3)
    out = V.drop_path(branch, 0.25, True)
    assert set(out.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}  # float32 1/keep
    assert torch.equal(V.drop_path(branch, 0.25, False), branch)


def test_bf16_autocast_smoke():
    m, dec = tiny(), MAEDecoder(16, 4, 3, 32, 16, 1, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = m.patch_tokens(torch.randn(2, 3, 16, 16))
        out = m.forward_features(tokens, segment=torch.zeros(2, 16, dtype=torch.long))
        pred = dec.forward_keep(out, torch.ones(2, 16, dtype=torch.bool))
    assert torch.isfinite(pred.float()).all() and pred.shape == (2, 16, 48)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="img_size"):
        VisionTransformer(30, 4, 3, 32, 1, 4)
    with pytest.raises(ValueError, match="img_size"):
        MAEDecoder(30, 4)
    with pytest.raises(ValueError, match="num_heads"):
        VisionTransformer(16, 4, 3, 36, 1, 5)
    with pytest.raises(ValueError, match="embed_dim"):
        VisionTransformer(16, 4, 3, 30, 1, 5)
    with pytest.raises(ValueError, match="decoder_num_heads"):
        MAEDecoder(16, 4, 3, 32, 36, 1, 5)
    with pytest.raises(ValueError, match="pool"):
        VisionTransformer(16, 4, 3, 32, 1, 4, pool="max")
    with pytest.raises(ValueError, match="model.arch"):
        build_vit("vit_huge")
    m = tiny()
    with pytest.raises(ValueError, match="in_chans"):
        m(torch.randn(2, 4, 16, 16))
    with pytest.raises(ValueError, match="img_size"):
        m(torch.randn(2, 3, 20, 20))
    with pytest.raises(ValueError, match="img"):
        m(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="tokens"):
        m.forward_features(torch.randn(2, 16, 31))
