"""Vision Transformer encoder and MAE decoder: the MAE baseline and the MixedAE backbone.

The architecture and init follow MAE (facebookresearch/mae `models_mae.py`): patch embedding
by a stride-p convolution, a CLS token, fixed 2-D sine-cosine positions, pre-norm blocks
(LayerNorm eps 1e-6, qkv bias, GELU MLP x4), a final LayerNorm; the decoder embeds the
encoder tokens to its own width, fills the removed positions with a learnable mask token and
predicts p*p*3 pixels per patch. Parameter names are timm's (`blocks.{i}.attn.qkv`, ...) for
the encoder and MAE's (`decoder_embed`, `decoder_blocks.{i}`, ...) for the decoder, so
`timm_state_dict` is a copy, and MAE checkpoints map key for key.

MixedAE needs two things MAE does not, both per call so one module serves MAE, MixedAE and
fine-tuning: `forward_features(..., segment=ids)` adds a sine-cosine segment embedding to the
input of every block (x <- x + SE before each block; the CLS token gets a zero vector unless
`segment` covers it), and `attn_fn(q, k, v)` replaces the dense attention (MixedAE's TopK
homologous attention). Dense attention is `F.scaled_dot_product_attention`, so flash /
memory-efficient kernels run where the device has them.

Positions are buffers, not parameters: they are never trained (MAE keeps them as frozen
parameters), but they are saved under timm's `pos_embed` key. A ViT-B/16 therefore has
85,647,360 trainable parameters; with the 151,296 position entries it is timm's 85,798,656.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6
POOLS = ("cls", "mean")
# names (last dotted component) that never get weight decay besides 1-D tensors
NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token", "decoder_pos_embed")
AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


# ----------------------------------------------------------------------------- sin-cos tables


def sincos_1d(dim: int, ids: torch.Tensor) -> torch.Tensor:
    """Sine-cosine encoding of positions or segment ids: [...] -> [..., dim].

    omega_k = 1 / 10000^(k / (dim/2)), k < dim/2; the output is [sin(ids*omega), cos(ids*omega)]
    (all sines, then all cosines, as MAE's 1-D table). Computed in float64 when `ids` is float64
    (the one-off position tables), else float32 (segment ids at every step: small integers, so
    float32 is exact enough and stays on the accelerator).
    """
    if dim % 2:
        raise ValueError(f"sincos_1d: dim must be even, got {dim}")
    dtype = torch.float64 if ids.dtype == torch.float64 else torch.float32
    omega = torch.arange(dim // 2, dtype=dtype, device=ids.device) / (dim / 2.0)
    omega = 1.0 / 10000.0 ** omega
    angles = ids.to(dtype).unsqueeze(-1) * omega
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def get_2d_sincos_pos_embed(dim: int, grid: int | tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """MAE's fixed 2-D position table: [h*w, dim], or [1 + h*w, dim] with a zero CLS row first.

    Half the channels encode one coordinate with `sincos_1d(dim/2, .)`, half the other. As in
    MAE's `get_2d_sincos_pos_embed` (which builds `np.meshgrid(grid_w, grid_h)` and feeds its
    first plane to the "h" half), the FIRST half encodes the column index and the second the
    row index, so a table built here equals MAE's and pretrained checkpoints load unchanged.
    Tokens are in row-major order (row * w + col), the order of `conv(x).flatten(2)`.
    Float64 arithmetic, float32 result (MAE computes in numpy float64 and copies to float32).
    """
    h, w = _pair(grid)
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos table splits dim into 4 (sin/cos of row and column): dim must be "
                         f"divisible by 4, got {dim}")
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64).repeat(h)
    table = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float()


# ----------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class ViTConfig:
    """One encoder/decoder size. The MAE decoder is 512-d, 8 blocks, 16 heads at every size."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16


_SIZES = {
    # 32-px demo images: 8x8 tokens of 4x4 px; ~0.45 M encoder + ~0.11 M decoder parameters
    "vit_tiny": ViTConfig(32, 4, 96, 4, 4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4),
    "vit_small_patch16": ViTConfig(224, 16, 384, 12, 6),
    "vit_base_patch16": ViTConfig(224, 16, 768, 12, 12),
    "vit_large_patch16": ViTConfig(224, 16, 1024, 24, 16),
}


def vit_sizes() -> dict[str, ViTConfig]:
    """The named sizes (a copy: the table itself is not mutable from outside)."""
    return dict(_SIZES)


def _config(size: str | ViTConfig) -> ViTConfig:
    if isinstance(size, ViTConfig):
        return size
    if size not in _SIZES:
        raise ValueError(f"model.arch must be one of {sorted(_SIZES)}, got {size!r}")
    return _SIZES[size]


# ----------------------------------------------------------------------------- blocks


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones by 1/(1-rate)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm's layout: [3, heads, head_dim])."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_fn: AttnFn | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        # looked up at call time (not bound at import) so a test or profiler can wrap it
        out = F.scaled_dot_product_attention(q, k, v) if attn_fn is None else attn_fn(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (timm's default GELU, as MAE)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = float(drop_path_rate)

    def forward(self, x: torch.Tensor, attn_fn: AttnFn | None = None) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x), attn_fn), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D by a stride-p convolution (a Linear on each flattened patch)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.proj(img).flatten(2).transpose(1, 2)  # [B, h*w, D], row-major tokens


def init_mae_(module: nn.Module) -> None:
    """MAE's `_init_weights`: xavier_uniform Linear weights with zero bias, LayerNorm weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- encoder


class VisionTransformer(nn.Module):
    """ViT encoder (timm parameter names). `forward(img)` classifies; the MAE/MixedAE paths use the parts.

    * `patch_tokens(img)` -> [B, L, D]: patch embedding + positions, no CLS.
    * `random_masking(tokens, ratio, generator)` -> kept tokens, mask (1 = removed), ids_restore.
    * `forward_features(tokens, segment=None, attn_fn=None)` -> [B, 1 + L', D] after the final norm,
      for any subset of L' tokens (kept, mixed or all).
    * `forward(img)` -> pooled feature [B, D] (`pool` "cls" or "mean" over the normed patch tokens),
      through `head` when `num_classes` > 0.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0, num_classes: int = 0, pool: str = "cls"):
        super().__init__()
        self.img_size = _pair(img_size)
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(f"img_size={img_size} must be divisible by patch_size={patch_size}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if embed_dim % num_heads or embed_dim % 4:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads} and by 4 "
                             f"(the 2-D sin-cos positions)")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.patch_size, self.in_chans, self.embed_dim, self.pool = patch_size, in_chans, embed_dim, pool
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(embed_dim, self.grid_size, True).unsqueeze(0))
        # linear over depth, 0 for block 0 (timm's linspace; plain floats so a meta-device build works)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE: xavier everywhere, the patch conv as a Linear on [D, C*p*p], CLS ~ N(0, 0.02).

        The patch conv's bias keeps PyTorch's default init (MAE does not touch it). The head gets
        MAE fine-tuning's trunc_normal(std=2e-5) and a zero bias: near-zero logits at the start.
        """
        init_mae_(self)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)

    @property
    def feature_dim(self) -> int:
        """Size of `forward`'s pooled feature without a head (what the kNN monitor and probes read)."""
        return self.embed_dim

    def no_weight_decay(self) -> set[str]:
        """timm's hook: tokens and the position table take no weight decay."""
        return {"cls_token", "pos_embed"}

    def _check_img(self, img: torch.Tensor) -> None:
        if img.ndim != 4:
            raise ValueError(f"img must be [B, C, H, W], got shape {tuple(img.shape)}")
        if img.shape[1] != self.in_chans:
            raise ValueError(f"img has {img.shape[1]} channels, the model was built with in_chans={self.in_chans}")
        if tuple(img.shape[-2:]) != self.img_size:
            raise ValueError(f"img is {tuple(img.shape[-2:])}, the model was built for img_size={self.img_size} "
                             f"(the position table is fixed)")

    def patch_tokens(self, img: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus the fixed positions: [B, L, D], no CLS."""
        self._check_img(img)
        x = self.patch_embed(img)
        return x + self.pos_embed[:, 1:].to(x.dtype)

    def random_masking(self, tokens: torch.Tensor, ratio: float,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MAE's per-sample random masking; see `random_masking`."""
        return random_masking(tokens, ratio, generator)

    def _segment_embed(self, segment: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[B, L] or [B, 1+L] ids -> [B, 1+L, D]; a [B, L] segment gives the CLS row a zero vector."""
        b, n = x.shape[:2]
        if segment.ndim != 2 or segment.shape[0] != b or segment.shape[1] not in (n - 1, n):
            raise ValueError(f"segment must be [B, L] or [B, 1+L] = [{b}, {n - 1}] or [{b}, {n}] for these tokens, "
                             f"got {tuple(segment.shape)}")
        se = sincos_1d(self.embed_dim, segment.to(x.device))
        if segment.shape[1] == n - 1:
            se = torch.cat([se.new_zeros(b, 1, self.embed_dim), se], dim=1)
        return se.to(x.dtype)

    def forward_features(self, tokens: torch.Tensor, *, segment: torch.Tensor | None = None,
                         attn_fn: AttnFn | None = None) -> torch.Tensor:
        """CLS + tokens through every block and the final norm: [B, L', D] -> [B, 1 + L', D].

        `tokens` already carry their positions (`patch_tokens`, possibly masked or mixed).
        `segment` (ids, [B, L'] or [B, 1 + L']): its sine-cosine embedding is added to the input
        of EVERY block (MixedAE, "x <- x + SE before each block"); with [B, L'] the CLS token
        gets a zero vector (no segment), with [B, 1 + L'] column 0 is the CLS token's id.
        `attn_fn(q, k, v)` (each [B, heads, 1 + L', head_dim]) replaces the dense attention in
        every block.
        """
        if tokens.ndim != 3 or tokens.shape[-1] != self.embed_dim:
            raise ValueError(f"tokens must be [B, L, {self.embed_dim}], got {tuple(tokens.shape)}")
        cls = (self.cls_token + self.pos_embed[:, :1]).to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        se = None if segment is None else self._segment_embed(segment, x)
        for block in self.blocks:
            if se is not None:
                x = x + se
            x = block(x, attn_fn)
        return self.norm(x)

    def forward_masked(self, img: torch.Tensor, ratio: float, generator: torch.Generator | None = None,
                       attn_fn: AttnFn | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MAE's `forward_encoder`: latent [B, 1 + L_keep, D], mask [B, L] (1 = removed), ids_restore."""
        kept, mask, ids_restore = random_masking(self.patch_tokens(img), ratio, generator)
        return self.forward_features(kept, attn_fn=attn_fn), mask, ids_restore

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Classification: pooled feature (CLS, or the mean of the normed patch tokens), then `head`."""
        x = self.forward_features(self.patch_tokens(img))
        feat = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)
        return self.head(feat)


def random_masking(tokens: torch.Tensor, ratio: float,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample masking by argsort of uniform noise; keeps the first int(L * (1 - ratio)).

    Returns the kept tokens [B, L_keep, D] (in shuffled order), the binary mask [B, L] in the
    original order (1 = removed, float like MAE's), and ids_restore [B, L], which undoes the
    shuffle: gathering cat(kept, removed) by ids_restore gives the original order back.
    The noise is drawn on the generator's device (CPU by default) and moved to the tokens'.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio (the share of removed tokens) must be in [0, 1), got {ratio}")
    b, n, d = tokens.shape
    keep = int(n * (1 - ratio))
    gen_device = generator.device if generator is not None else tokens.device
    noise = torch.rand(b, n, generator=generator, device=gen_device).to(tokens.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(tokens, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=tokens.device, dtype=tokens.dtype)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


# ----------------------------------------------------------------------------- decoder


class MAEDecoder(nn.Module):
    """MAE's decoder (MAE's key names): embed -> fill with the mask token -> positions -> blocks -> norm -> pixels.

    `forward(latent, ids_restore)` is MAE's `forward_decoder` (latent from `forward_masked`);
    `forward_keep(latent_full, keep)` is the same with the removed positions given as a boolean
    map over ALL L tokens (MixedAE: the decoder for source i sees the encoder tokens where M = i
    and the mask token elsewhere). Both return [B, L, p*p*in_chans] in `patchify` order.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        img_size = _pair(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size={img_size} must be divisible by patch_size={patch_size}")
        if decoder_embed_dim % decoder_num_heads or decoder_embed_dim % 4:
            raise ValueError(f"decoder_embed_dim={decoder_embed_dim} must be divisible by decoder_num_heads="
                             f"{decoder_num_heads} and by 4 (the 2-D sin-cos positions)")
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        table = get_2d_sincos_pos_embed(decoder_embed_dim, self.grid_size, True).unsqueeze(0)
        self.register_buffer("decoder_pos_embed", table)
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=LN_EPS)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        init_mae_(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token", "decoder_pos_embed"}

    def _check_latent(self, latent: torch.Tensor) -> None:
        if latent.ndim != 3 or latent.shape[-1] != self.decoder_embed.in_features:
            raise ValueError(f"latent must be [B, 1 + L, {self.decoder_embed.in_features}] (CLS first), "
                             f"got {tuple(latent.shape)}")

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor,
                attn_fn: AttnFn | None = None) -> torch.Tensor:
        """[B, 1 + L_keep, D_enc] (shuffled order, CLS first) + ids_restore [B, L] -> [B, L, p*p*C]."""
        self._check_latent(latent)
        if ids_restore.shape != (latent.shape[0], self.num_patches):
            raise ValueError(f"ids_restore must be [B, L] = [{latent.shape[0]}, {self.num_patches}], "
                             f"got {tuple(ids_restore.shape)}")
        x = self.decoder_embed(latent)
        b, n, d = x.shape
        fill = self.mask_token.to(x.dtype).expand(b, self.num_patches + 1 - n, d)
        patches = torch.cat([x[:, 1:], fill], dim=1)
        patches = torch.gather(patches, 1, ids_restore[:, :, None].expand(-1, -1, d))
        return self._decode(torch.cat([x[:, :1], patches], dim=1), attn_fn)

    def forward_keep(self, latent: torch.Tensor, keep: torch.Tensor, attn_fn: AttnFn | None = None) -> torch.Tensor:
        """[B, 1 + L, D_enc] (all tokens, CLS first) + keep [B, L] (True = visible) -> [B, L, p*p*C]."""
        self._check_latent(latent)
        if keep.shape != (latent.shape[0], self.num_patches) or latent.shape[1] != self.num_patches + 1:
            raise ValueError(f"keep must be [B, L] and latent [B, 1 + L] with L = {self.num_patches}, got "
                             f"{tuple(keep.shape)} and {tuple(latent.shape)}")
        x = self.decoder_embed(latent)
        patches = torch.where(keep[:, :, None].to(torch.bool), x[:, 1:], self.mask_token.to(x.dtype))
        return self._decode(torch.cat([x[:, :1], patches], dim=1), attn_fn)

    def _decode(self, x: torch.Tensor, attn_fn: AttnFn | None) -> torch.Tensor:
        x = x + self.decoder_pos_embed.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x, attn_fn)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C], each patch flattened as (row, col, channel) like MAE."""
    if imgs.ndim != 4 or imgs.shape[2] % p or imgs.shape[3] % p:
        raise ValueError(f"imgs must be [B, C, H, W] with H and W divisible by p={p}, got {tuple(imgs.shape)}")
    b, c, hh, ww = imgs.shape
    h, w = hh // p, ww // p
    x = imgs.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, h * w, p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of `patchify`; the grid (h, w) defaults to square, C = last dim / p^2."""
    if x.ndim != 3 or x.shape[-1] % (p * p):
        raise ValueError(f"x must be [B, L, p*p*C] with p={p}, got {tuple(x.shape)}")
    b, n, last = x.shape
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"x has {n} patches, not a square grid: pass grid=(h, w)")
        grid = side
    h, w = _pair(grid)
    if h * w != n:
        raise ValueError(f"grid={grid} does not hold the {n} patches of x")
    c = last // (p * p)
    return x.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)


# ----------------------------------------------------------------------------- builders, export


def build_vit(size: str | ViTConfig = "vit_base_patch16", *, num_classes: int = 0, drop_path_rate: float = 0.0,
              pool: str = "cls", in_chans: int = 3, img_size: int | None = None) -> VisionTransformer:
    """Encoder of a named size (`vit_sizes()`), e.g. a fine-tuning model with drop_path_rate=0.1;
    `img_size` replaces the size's own (the position table follows the grid)."""
    cfg = _config(size)
    return VisionTransformer(img_size or cfg.img_size, cfg.patch_size, in_chans, cfg.embed_dim, cfg.depth, cfg.num_heads,
                             cfg.mlp_ratio, drop_path_rate=drop_path_rate, num_classes=num_classes, pool=pool)


def build_mae_decoder(size: str | ViTConfig = "vit_base_patch16", *, in_chans: int = 3,
                      img_size: int | None = None) -> MAEDecoder:
    """The MAE decoder that goes with the encoder of the same size (and `img_size`)."""
    cfg = _config(size)
    return MAEDecoder(img_size or cfg.img_size, cfg.patch_size, in_chans, cfg.embed_dim, cfg.decoder_embed_dim,
                      cfg.decoder_depth, cfg.decoder_num_heads, cfg.mlp_ratio)


def timm_state_dict(encoder: VisionTransformer) -> dict[str, torch.Tensor]:
    """Encoder weights under timm's `vit_*_patch16_224` keys, on CPU (a copy: the names already match).

    `pos_embed` ([1, 1 + L, D], zero CLS row) and `cls_token` ([1, 1, D]) as timm stores them;
    `head.*` only when the encoder has a classification head.
    """
    return {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}


def _is_no_decay(name: str, param: torch.Tensor, skip: set[str]) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or name.rsplit(".", 1)[-1] in skip


def _skip_names(model: nn.Module) -> set[str]:
    skip = set(NO_DECAY_NAMES)
    for m in model.modules():
        if hasattr(m, "no_weight_decay"):
            skip |= set(m.no_weight_decay())
    return skip


def param_groups_no_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for weight matrices, none for 1-D params (biases, norms) and tokens/positions.

    Frozen parameters (requires_grad False) are left out, as MAE's optim_factory does.
    """
    skip = _skip_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _is_no_decay(name, p, skip) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _layer_id(name: str, num_layers: int) -> int:
    """BEiT/MAE: 0 for the embeddings, i + 1 for block i, num_layers (= depth + 1) for the rest."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_layer_decay(model: VisionTransformer, weight_decay: float, layer_decay: float) -> list[dict]:
    """Fine-tuning groups with layer-wise lr decay: `lr_scale` = layer_decay^(depth + 1 - layer_id).

    The schedule multiplies each group's lr by its `lr_scale`. Groups are split by layer and by
    decay / no decay (as `param_groups_no_decay`), sorted by layer id; empty groups are left out.
    """
    if not hasattr(model, "blocks"):
        raise ValueError("param_groups_layer_decay needs the encoder itself (a module with .blocks)")
    num_layers = len(model.blocks) + 1
    skip = _skip_names(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, no_decay = _layer_id(name, num_layers), _is_no_decay(name, p, skip)
        group = groups.setdefault((layer, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                      "lr_scale": layer_decay ** (num_layers - layer),
                                                      "layer_id": layer})
        group["params"].append(p)
    return [groups[key] for key in sorted(groups)]
