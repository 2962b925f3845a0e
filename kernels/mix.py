"""Triton kernels of the mix ops: mask generation, fused mask + MixMask mixing + switch + λ,
Un-Mix (mixup / CutMix) and MixMask + Un-Mix from one pass.

Mirrors the CUDA kernels (csrc/cuda/mix_cuda.cu) and, step for step, the mask generator of
csrc/include/mixfast/block_mask.h and mixfast/ops/reference.py: Philox4x32-10 keyed by
(seed, step), float32 operations in the same order with correctly rounded division and
square root (``div_rn`` / ``sqrt_rn``) and no FMA contraction (kernels are launched with
``enable_fp_fusion=False``), so every backend draws the same masks.

Layout of the work: programs are persistent; each takes a contiguous range of items
(unit, chunk of BLOCK elements of one image). A unit is an image i with partner j, or
the flip pair (i, N-1-i) whose images are read once for the outputs of both. A program
draws a mask into registers, stores it to the masks buffer and gathers from that buffer
while mixing (Triton has no register gather); programs drawing the same per-batch mask
store the same bytes.

On a CPU-only machine these kernels run in Triton's interpreter: ``TRITON_INTERPRET=1``
must be set before this module is imported. The interpreter has no bfloat16, so data is
moved as integer bits (masking never needs the value) and bfloat16 is converted by hand
(round to nearest even, as torch).
"""

from __future__ import annotations

import functools
import os
import types

import numpy as np
import torch
import triton
import triton.language as tl

from kernels import aot
from kernels.aot import Launch
from kernels.layout import out_format, per_image_dense

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 1024
# Globals read inside @triton.jit functions must be tl.constexpr: a GPU compile refuses any
# other global (the interpreter does not check). Wrapping changes no value.
MAX_REDRAWS = tl.constexpr(1000)  # block_mask.h: kMaxRedraws
BLOCK_ATTEMPTS = tl.constexpr(10)

# float32 constants of the block generator (exact hex floats, as in block_mask.h / fp32.h)
LOG_ASPECT_LO = tl.constexpr(float.fromhex("-0x1.34379p+0"))
LOG_ASPECT_SPAN = tl.constexpr(float.fromhex("0x1.34379p+1"))
EXP_C11 = tl.constexpr(float.fromhex("0x1.ae6456p-26"))
EXP_C10 = tl.constexpr(float.fromhex("0x1.27e4fcp-22"))
EXP_C9 = tl.constexpr(float.fromhex("0x1.71de3ap-19"))
EXP_C8 = tl.constexpr(float.fromhex("0x1.a01a02p-16"))
EXP_C7 = tl.constexpr(float.fromhex("0x1.a01a02p-13"))
EXP_C6 = tl.constexpr(float.fromhex("0x1.6c16c2p-10"))
EXP_C5 = tl.constexpr(float.fromhex("0x1.111112p-7"))
EXP_C4 = tl.constexpr(float.fromhex("0x1.555556p-5"))
EXP_C3 = tl.constexpr(float.fromhex("0x1.555556p-3"))

DT_F32, DT_BF16, DT_F16 = 0, 1, 2
_DT = {torch.float32: DT_F32, torch.bfloat16: DT_BF16, torch.float16: DT_F16}
_BITS_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


# ---------------------------------------------------------------------------------------
# shared device functions
# ---------------------------------------------------------------------------------------


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors (constants of Random123; philox.h)."""
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(0xCD9E8D57, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(0xD2511F53, _c0) ^ c3 ^ k1
        c1 = tl.mul(0xCD9E8D57, _c2, sanitize_overflow=False)
        c3 = tl.mul(0xD2511F53, _c0, sanitize_overflow=False)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _u32(v):
    return v.to(tl.uint32, bitcast=True) if v.dtype == tl.int32 else v.to(tl.uint32)


@triton.jit
def _uniform01(word):
    return (word >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _exp_poly(t):
    p = t * 0.0 + EXP_C11
    p = p * t + EXP_C10
    p = p * t + EXP_C9
    p = p * t + EXP_C8
    p = p * t + EXP_C7
    p = p * t + EXP_C6
    p = p * t + EXP_C5
    p = p * t + EXP_C4
    p = p * t + EXP_C3
    p = p * t + 0.5
    p = p * t + 1.0
    p = p * t + 1.0
    return p


@triton.jit
def _round_half_even(v):
    f = tl.floor(v)
    d = v - f
    r = f.to(tl.int32)
    up = (d > 0.5) | ((d == 0.5) & ((r & 1) == 1))
    return r + up.to(tl.int32)


@triton.jit
def _block_candidate(k0, k1, sample, draw, rem, min_patches, g):
    """One BEiT attempt (block_mask.h: block_candidate): (h, w, top, left, fits)."""
    zero = _u32(draw * 0)
    w0, w1, w2, w3 = _philox(_u32(draw), _u32(sample), zero, zero, k0, k1)
    area = min_patches.to(tl.float32) + (rem - min_patches).to(tl.float32) * _uniform01(w0)
    aspect = _exp_poly(LOG_ASPECT_LO + LOG_ASPECT_SPAN * _uniform01(w1))
    h = _round_half_even(tl.sqrt_rn(area * aspect))
    w = _round_half_even(tl.sqrt_rn(tl.div_rn(area, aspect)))
    fits = (h < g) & (w < g)
    top = tl.where(fits, tl.umulhi(w2, _u32(tl.maximum(g - h + 1, 1))).to(tl.int32), 0)
    left = tl.where(fits, tl.umulhi(w3, _u32(tl.maximum(g - w + 1, 1))).to(tl.int32), 0)
    return h, w, top, left, fits


@triton.jit
def _block_mask(k0, k1, sample, g, num, min_patches, GP: tl.constexpr):
    """BEiT block mask of `sample` as an int32 [GP, GP] tile (cells outside g x g are 0)."""
    rr = tl.arange(0, GP)[:, None]
    cc = tl.arange(0, GP)[None, :]
    m = tl.zeros((GP, GP), dtype=tl.int32)
    draw = sample * 0
    count = sample * 0
    redraw = sample * 0
    todo = count == 0
    while todo:
        m = tl.zeros((GP, GP), dtype=tl.int32)
        count = sample * 0
        tries = sample * 0
        # flattened "while count < num: up to 10 attempts to add one block"
        while (count < num) & (tries < BLOCK_ATTEMPTS):
            rem = num - count
            h, w, top, left, fits = _block_candidate(k0, k1, sample, draw, rem, min_patches, g)
            draw += 1
            rect = (rr >= top) & (rr < top + h) & (cc >= left) & (cc < left + w)
            fresh = h * w - tl.sum(tl.where(rect, m, 0))
            ok = fits & (fresh > 0) & (fresh <= rem)
            m = tl.where(rect & ok, 1, m)
            count += tl.where(ok, fresh, 0)
            tries = tl.where(ok, 0, tries + 1)
        redraw += 1
        todo = (count == 0) & (redraw < MAX_REDRAWS)
    # fallback after MAX_REDRAWS empty draws: a single 1 in cell (0, 0)
    m = tl.where(count == 0, ((rr == 0) & (cc == 0)).to(tl.int32), m)
    return m


@triton.jit
def _discrete_mask(k0, k1, sample, g, threshold24, GP: tl.constexpr):
    """i.i.d. mask of `sample` (block_mask.h: generate_discrete_mask) as int32 [GP, GP]."""
    rr = tl.arange(0, GP)[:, None]
    cc = tl.arange(0, GP)[None, :]
    valid = (rr < g) & (cc < g)
    cell = rr * g + cc
    cells = g * g
    draws = (cells + 3) // 4
    q = cell // 4
    j = cell % 4
    m = tl.zeros((GP, GP), dtype=tl.int32)
    rnd = sample * 0
    count = sample * 0
    todo = count == 0
    while todo:
        ctr = _u32(rnd * draws + q)
        zero = _u32(q * 0)
        w0, w1, w2, w3 = _philox(ctr, zero + _u32(sample), zero + 1, zero, k0, k1)
        word = tl.where(j == 0, w0, tl.where(j == 1, w1, tl.where(j == 2, w2, w3)))
        m = (valid & ((word >> 8) < _u32(threshold24))).to(tl.int32)
        count = tl.sum(m)
        rnd += 1
        todo = ((count == 0) | (count == cells)) & (rnd < MAX_REDRAWS)
    if (count == 0) | (count == cells):
        m = tl.where(threshold24 < (1 << 23), ((rr == 0) & (cc == 0)).to(tl.int32),
                     (valid & ((rr != 0) | (cc != 0))).to(tl.int32))
    return m


@triton.jit
def _draw_mask(k0, k1, sample, g, kind, num, min_patches, threshold24, GP: tl.constexpr):
    if kind == 0:
        m = _block_mask(k0, k1, sample, g, num, min_patches, GP)
    else:
        m = _discrete_mask(k0, k1, sample, g, threshold24, GP)
    return m


@triton.jit
def _store_mask(mbuf, k, m, g, GP: tl.constexpr):
    rr = tl.arange(0, GP)[:, None]
    cc = tl.arange(0, GP)[None, :]
    tl.store(mbuf + k * g * g + rr * g + cc, m.to(tl.uint8), mask=(rr < g) & (cc < g))


@triton.jit
def _nearest(i, scale, g):
    """F.interpolate(nearest) source index: min(floor(float32(i) * scale), g - 1)."""
    return tl.minimum(tl.floor(i.to(tl.float32) * scale).to(tl.int32), g - 1)


@triton.jit
def _lambda(mbuf, lam_ptr, k, g, H, W, sy, sx, GP: tl.constexpr, BLOCK_HW: tl.constexpr):
    """λ_k = |upsampled mask k| / (H W): count = sum_rc m[r, c] * rows(r) * cols(c)."""
    gidx = tl.arange(0, GP)
    rowcnt = tl.zeros((GP,), dtype=tl.int64)
    colcnt = tl.zeros((GP,), dtype=tl.int64)
    for y0 in range(0, H, BLOCK_HW):
        y = y0 + tl.arange(0, BLOCK_HW)
        gy = tl.where(y < H, _nearest(y, sy, g), -1)
        rowcnt += tl.sum((gy[:, None] == gidx[None, :]).to(tl.int64), axis=0)
    for x0 in range(0, W, BLOCK_HW):
        x = x0 + tl.arange(0, BLOCK_HW)
        gx = tl.where(x < W, _nearest(x, sx, g), -1)
        colcnt += tl.sum((gx[:, None] == gidx[None, :]).to(tl.int64), axis=0)
    rr = gidx[:, None]
    cc = gidx[None, :]
    m = tl.load(mbuf + k * g * g + rr * g + cc, mask=(rr < g) & (cc < g), other=0).to(tl.int64)
    count = tl.sum(tl.sum(m * rowcnt[:, None] * colcnt[None, :], axis=1), axis=0)
    lam = (count.to(tl.float64) / (H * W).to(tl.float64)).to(tl.float32)
    tl.store(lam_ptr + k, lam)


@triton.jit
def _pair_lambdas(mbuf, lam_ptr, i, j, both, g, H, W, sy, sx, PER_SAMPLE: tl.constexpr, GP: tl.constexpr,
                  BLOCK_HW: tl.constexpr):
    """λ for the flip pair (i, j): per-sample masks give both rows their own λ; one mask per
    batch has a single λ, written by the program that holds row 0."""
    if PER_SAMPLE:
        _lambda(mbuf, lam_ptr, i, g, H, W, sy, sx, GP, BLOCK_HW)
        if both:
            _lambda(mbuf, lam_ptr, j, g, H, W, sy, sx, GP, BLOCK_HW)
    elif i == 0:
        _lambda(mbuf, lam_ptr, i * 0, g, H, W, sy, sx, GP, BLOCK_HW)


@triton.jit
def _pixel_yx(e, C, H, W, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        y = e // (W * C)
        x = (e // C) % W
    else:
        y = (e // W) % H
        x = e % W
    return y, x


@triton.jit
def _aligned_strides(img, x_bs, ALIGNED: tl.constexpr):
    """(img, x_bs), the same values, written as (v // 16) * 16 when ALIGNED: the host checked that
    both are multiples of 16 elements, and this way Triton knows it too (a hint on a kernel
    argument is not kept) and moves image data in vectors."""
    if ALIGNED:
        img = (img // 16) * 16
        x_bs = (x_bs // 16) * 16
    return img, x_bs


@triton.jit
def _cta_range(total):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    per = (total + nprog - 1) // nprog
    begin = pid * per
    end = tl.minimum(begin + per, total)
    return begin, end


@triton.jit
def _bf16_to_f32(bits):
    return (bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_bf16(f):
    u = f.to(tl.uint32, bitcast=True)
    r = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16
    r = tl.where(f != f, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _load_f32(ptr, offs, mask, DT: tl.constexpr):
    v = tl.load(ptr + offs, mask=mask, other=0)
    if DT == 0:
        f = v.to(tl.float32, bitcast=True)
    elif DT == 1:
        f = _bf16_to_f32(v)
    else:
        f = v.to(tl.float32)
    return f


@triton.jit
def _store_f32(ptr, offs, f, mask, DT: tl.constexpr):
    if DT == 0:
        tl.store(ptr + offs, f.to(tl.int32, bitcast=True), mask=mask)
    elif DT == 1:
        tl.store(ptr + offs, _f32_to_bf16(f), mask=mask)
    else:
        tl.store(ptr + offs, f.to(tl.float16), mask=mask)


# ---------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n", "k0", "k1"])
def _philox_kernel(ctr, out, n, k0, k1, BLOCK_N: tl.constexpr):
    o = tl.arange(0, BLOCK_N)
    m = o < n
    words = _philox(tl.load(ctr + 4 * o + 0, mask=m).to(tl.uint32), tl.load(ctr + 4 * o + 1, mask=m).to(tl.uint32),
                    tl.load(ctr + 4 * o + 2, mask=m).to(tl.uint32), tl.load(ctr + 4 * o + 3, mask=m).to(tl.uint32),
                    _u32(k0), _u32(k1))
    for w in tl.static_range(4):
        tl.store(out + 4 * o + w, words[w].to(tl.int64), mask=m)


@triton.jit(do_not_specialize=["k0", "k1", "g", "kind", "num", "min_patches", "threshold24"])
def _make_masks_kernel(out, k0, k1, g, kind, num, min_patches, threshold24, GP: tl.constexpr):
    k = tl.program_id(0)
    m = _draw_mask(_u32(k0), _u32(k1), k, g, kind, num, min_patches, threshold24, GP)
    _store_mask(out, k, m, g, GP)


@triton.jit
def _prepare_masks(mbuf, lam_ptr, i, j, chunk, fresh_unit, both, GENERATE: tl.constexpr, PER_SAMPLE: tl.constexpr,
                   k0, k1, g, kind, num, min_patches, threshold24, H, W, sy, sx,
                   GP: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Draw the masks a unit needs into mbuf (when generating) and, for its first chunk,
    write λ. A per-batch mask is drawn by every program at its first item."""
    if GENERATE:
        if fresh_unit:
            if PER_SAMPLE:
                _store_mask(mbuf, i, _draw_mask(k0, k1, i, g, kind, num, min_patches, threshold24, GP), g, GP)
                if both:
                    _store_mask(mbuf, j, _draw_mask(k0, k1, j, g, kind, num, min_patches, threshold24, GP), g, GP)
            else:
                _store_mask(mbuf, 0, _draw_mask(k0, k1, i * 0, g, kind, num, min_patches, threshold24, GP), g, GP)
            tl.debug_barrier()
    if chunk == 0:
        _pair_lambdas(mbuf, lam_ptr, i, j, both, g, H, W, sy, sx, PER_SAMPLE, GP, BLOCK_HW)


@triton.jit(do_not_specialize=["N", "C", "H", "W", "x_bs", "f_bs", "units", "chunks", "g", "k0", "k1", "kind",
                               "num", "min_patches", "threshold24"])
def _mix_kernel(x, fill, perm, mixed, switch, mbuf, lam_ptr,
                N, C, H, W, x_bs, f_bs, units, chunks, g, sy, sx,
                k0, k1, kind, num, min_patches, threshold24,
                PAIR: tl.constexpr, HAS_FILLER: tl.constexpr, WANT_SWITCH: tl.constexpr,
                GENERATE: tl.constexpr, PER_SAMPLE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                GP: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_HW: tl.constexpr, ALIGNED: tl.constexpr):
    """MixMask over items (unit, chunk). Data is moved as integer bits (exact selection)."""
    img, x_bs = _aligned_strides(C * H * W, x_bs, ALIGNED)
    f_bs = _aligned_strides(f_bs, f_bs, ALIGNED)[0]
    begin, end = _cta_range(units * chunks)
    k0 = _u32(k0)
    k1 = _u32(k1)
    for item in range(begin, end):
        u = item // chunks
        chunk = item % chunks
        i = u
        if PAIR:
            j = N - 1 - u
        elif HAS_FILLER:
            j = u
        else:
            j = tl.load(perm + u).to(tl.int32)
        if PAIR:
            both = j != i
        else:
            both = i < 0  # never: unpaired units write only image i
        if PER_SAMPLE:
            fresh_unit = (item == begin) | (chunk == 0)
        else:
            fresh_unit = item == begin
        _prepare_masks(mbuf, lam_ptr, i, j, chunk, fresh_unit, both, GENERATE, PER_SAMPLE, k0, k1, g, kind, num,
                       min_patches, threshold24, H, W, sy, sx, GP, BLOCK_HW)
        e = chunk * BLOCK_E + tl.arange(0, BLOCK_E)
        inb = e < img
        y, xx = _pixel_yx(e, C, H, W, CHANNELS_LAST)
        cell = _nearest(y, sy, g) * g + _nearest(xx, sx, g)
        mi_k = i if PER_SAMPLE else i * 0
        keep_i = tl.load(mbuf + mi_k * g * g + cell, mask=inb, other=0) != 0
        a = tl.load(x + i.to(tl.int64) * x_bs + e, mask=inb)
        if HAS_FILLER:
            b = tl.load(fill + i.to(tl.int64) * f_bs + e, mask=inb)
        else:
            b = tl.load(x + j.to(tl.int64) * x_bs + e, mask=inb)
        tl.store(mixed + i.to(tl.int64) * img + e, tl.where(keep_i, a, b), mask=inb)
        if WANT_SWITCH:
            tl.store(switch + i.to(tl.int64) * img + e, tl.where(keep_i, b, a), mask=inb)
        if both:
            mj_k = j if PER_SAMPLE else j * 0
            keep_j = tl.load(mbuf + mj_k * g * g + cell, mask=inb, other=0) != 0
            tl.store(mixed + j.to(tl.int64) * img + e, tl.where(keep_j, b, a), mask=inb)
            if WANT_SWITCH:
                tl.store(switch + j.to(tl.int64) * img + e, tl.where(keep_j, a, b), mask=inb)


@triton.jit
def _unmix_pair(x, out, i, j, e, inb, img, x_bs, C, H, W, lam, mu, y1, y2, x1, x2, both,
                MIXUP: tl.constexpr, DT: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Un-Mix outputs of images i and j = N-1-i for elements e (flip pair)."""
    if MIXUP:
        fa = _load_f32(x + i.to(tl.int64) * x_bs, e, inb, DT)
        fb = _load_f32(x + j.to(tl.int64) * x_bs, e, inb, DT)
        _store_f32(out + i.to(tl.int64) * img, e, lam * fa + mu * fb, inb, DT)
        if both:
            _store_f32(out + j.to(tl.int64) * img, e, lam * fb + mu * fa, inb, DT)
    else:
        a = tl.load(x + i.to(tl.int64) * x_bs + e, mask=inb)
        b = tl.load(x + j.to(tl.int64) * x_bs + e, mask=inb)
        y, xx = _pixel_yx(e, C, H, W, CHANNELS_LAST)
        inside = (y >= y1) & (y < y2) & (xx >= x1) & (xx < x2)
        tl.store(out + i.to(tl.int64) * img + e, tl.where(inside, b, a), mask=inb)
        if both:
            tl.store(out + j.to(tl.int64) * img + e, tl.where(inside, a, b), mask=inb)


@triton.jit(do_not_specialize=["N", "C", "H", "W", "x_bs", "chunks", "y1", "y2", "x1", "x2"])
def _unmix_kernel(x, out, N, C, H, W, x_bs, chunks, lam, mu, y1, y2, x1, x2,
                  MIXUP: tl.constexpr, DT: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_E: tl.constexpr,
                  ALIGNED: tl.constexpr):
    img, x_bs = _aligned_strides(C * H * W, x_bs, ALIGNED)
    begin, end = _cta_range(((N + 1) // 2) * chunks)
    for item in range(begin, end):
        i = item // chunks
        chunk = item % chunks
        j = N - 1 - i
        e = chunk * BLOCK_E + tl.arange(0, BLOCK_E)
        inb = e < img
        _unmix_pair(x, out, i, j, e, inb, img, x_bs, C, H, W, lam, mu, y1, y2, x1, x2, j != i, MIXUP, DT,
                    CHANNELS_LAST)


@triton.jit(do_not_specialize=["N", "C", "H", "W", "x_bs", "chunks", "g", "y1", "y2", "x1", "x2"])
def _mix_unmix_kernel(x, perm, mixed, switch, um, mbuf, lam_ptr,
                      N, C, H, W, x_bs, chunks, g, sy, sx, lam, mu, y1, y2, x1, x2,
                      WANT_SWITCH: tl.constexpr, PER_SAMPLE: tl.constexpr, MIXUP: tl.constexpr, DT: tl.constexpr,
                      CHANNELS_LAST: tl.constexpr, GP: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_HW: tl.constexpr,
                      ALIGNED: tl.constexpr):
    """MixMask (perm, given masks) + Un-Mix (flip) over flip pairs: x_i, x_j read once."""
    img, x_bs = _aligned_strides(C * H * W, x_bs, ALIGNED)
    begin, end = _cta_range(((N + 1) // 2) * chunks)
    for item in range(begin, end):
        i = item // chunks
        chunk = item % chunks
        j = N - 1 - i
        both = j != i
        if chunk == 0:
            _pair_lambdas(mbuf, lam_ptr, i, j, both, g, H, W, sy, sx, PER_SAMPLE, GP, BLOCK_HW)
        e = chunk * BLOCK_E + tl.arange(0, BLOCK_E)
        inb = e < img
        _unmix_pair(x, um, i, j, e, inb, img, x_bs, C, H, W, lam, mu, y1, y2, x1, x2, both, MIXUP, DT, CHANNELS_LAST)
        y, xx = _pixel_yx(e, C, H, W, CHANNELS_LAST)
        cell = _nearest(y, sy, g) * g + _nearest(xx, sx, g)
        xbits = x.to(tl.pointer_type(tl.int32)) if DT == 0 else x.to(tl.pointer_type(tl.int16))
        for side in tl.static_range(2):
            if (side == 0) | both:
                k = i if side == 0 else j
                own = tl.load(xbits + k.to(tl.int64) * x_bs + e, mask=inb)
                p = tl.load(perm + k).to(tl.int64)
                fill = tl.load(xbits + p * x_bs + e, mask=inb)
                mk = k if PER_SAMPLE else k * 0
                keep = tl.load(mbuf + mk * g * g + cell, mask=inb, other=0) != 0
                tl.store(mixed + k.to(tl.int64) * img + e, tl.where(keep, own, fill), mask=inb)
                if WANT_SWITCH:
                    tl.store(switch + k.to(tl.int64) * img + e, tl.where(keep, fill, own), mask=inb)


# ---------------------------------------------------------------------------------------
# host wrappers (tensors validated by mixfast/ops/mix.py)
# ---------------------------------------------------------------------------------------


def _gp(g: int) -> int:
    return max(2, triton.next_power_of_2(g))


def _scale(g: int, n: int) -> float:
    """float32(g) / float32(n), exactly as the other backends (nearest_scale)."""
    return float(np.float32(g) / np.float32(n))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs(items: int, device: torch.device) -> int:
    if device.type == "cuda":
        return max(1, min(items, 4 * _sm_count(device.index or 0)))
    return max(1, min(items, 3))  # interpreter: a few programs, so the per-program logic is exercised


# Warps per program on a GPU. With Triton's default of 4, a [BLOCK] chunk is 8 elements a thread and the mask
# generator of make_masks_and_mix spills registers on sm_80 (at GP = 64 on sm_90 too); 8 warps halve that and no
# variant spills (tests/ops/test_triton_aot.py). Every reduction in these kernels is over integers, so the
# warp count changes no bit of the results.
NUM_WARPS = 8


def _aligned(*strides: int) -> bool:
    """Every image (and batch stride) a multiple of 16 elements: the kernels may then assume it,
    which lets Triton move image data in vectors. The sizes themselves are not specialized (one
    compiled kernel per flag value, not per shape)."""
    return all(s % 16 == 0 for s in strides)


def _launch_opts(device: torch.device) -> dict:
    return {} if INTERPRET else {"enable_fp_fusion": False, "num_warps": NUM_WARPS}


def _layout(x: torch.Tensor):
    """(format, channels_last, dense view of x, batch stride) as the native path does."""
    fmt = out_format(x)
    xx, bs = per_image_dense(x, fmt)
    return fmt, fmt == torch.channels_last, xx, bs


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS_VIEW[t.dtype])


def _i32(key: int) -> int:
    """A uint32 mask key as the int32 of the same bits (the kernels bitcast it back, _u32).
    Triton types an integer argument by its value (i32 below 2^31, else i64), so passing
    keys as they are would compile a kernel per key range; as int32 every seed and step
    launches the same compiled kernel."""
    return key - (1 << 32) if key >= 1 << 31 else key


def philox(counters: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """Philox4x32-10 words of int64 counters [n, 4] (values < 2^32) under key (k0, k1):
    int64 [n, 4]. For the tests: the kernels' Philox against the reference's."""
    n = counters.shape[0]
    out = torch.empty_like(counters)
    _philox_kernel[(1,)](counters.contiguous(), out, n, _i32(k0), _i32(k1),
                         BLOCK_N=triton.next_power_of_2(max(n, 1)), **_launch_opts(counters.device))
    return out


# Each op is split in two: *_launch allocates the outputs and describes the kernel launch
# (an aot.Launch), the op runs it. compile_for_gpu compiles the very launches the ops make.


def make_masks_launch(spec, out: torch.Tensor) -> Launch:
    n = out.shape[0]
    return Launch(_make_masks_kernel, (n,), (), dict(
        out=out, k0=_i32(spec.key0), k1=_i32(spec.key1), g=spec.grid, kind=spec.kind, num=spec.num,
        min_patches=spec.min_patches, threshold24=spec.threshold24, GP=_gp(spec.grid), **_launch_opts(out.device)))


def make_masks(spec, n: int, device) -> torch.Tensor:
    """uint8 [n, g, g] masks drawn from ``spec`` (mixfast.ops.reference.MaskSpec)."""
    out = torch.empty((n, spec.grid, spec.grid), dtype=torch.uint8, device=torch.device(device))
    make_masks_launch(spec, out)()
    return out


def mix_launch(x, *, masks, spec, n_masks: int, grid: int, perm, filler, want_switch: bool, perm_is_flip: bool):
    """Outputs (mixed, switch or empty, lam, masks uint8 [n, g, g]) and the launch of :func:`mix`."""
    B, C, H, W = x.shape
    fmt, cl, xx, xbs = _layout(x)
    mixed = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    switch = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if want_switch else x.new_empty((0,))
    lam = torch.empty((n_masks,), dtype=torch.float32, device=x.device)
    generate = masks is None
    mbuf = (torch.empty((n_masks, grid, grid), dtype=torch.uint8, device=x.device) if generate
            else masks.to(x.device).contiguous().view(torch.uint8))
    pair = perm_is_flip and filler is None
    units = (B + 1) // 2 if pair else B
    chunks = triton.cdiv(C * H * W, BLOCK)
    if filler is not None:
        ff, fbs = per_image_dense(filler, fmt)  # the filler in x's layout
    else:
        ff, fbs = xx, xbs
    # the mask generator's scalars (unused when the masks are given)
    draw = (dict(k0=_i32(spec.key0), k1=_i32(spec.key1), kind=spec.kind, num=spec.num, min_patches=spec.min_patches,
                 threshold24=spec.threshold24) if spec else dict(k0=0, k1=0, kind=0, num=1, min_patches=1,
                                                                  threshold24=1))
    launch = Launch(_mix_kernel, (_programs(units * chunks, x.device),), (), dict(
        x=_bits(xx), fill=_bits(ff),
        perm=perm.contiguous() if perm is not None else lam,  # not read when pairing or with a filler
        mixed=_bits(mixed), switch=_bits(switch) if want_switch else _bits(mixed), mbuf=mbuf, lam_ptr=lam,
        N=B, C=C, H=H, W=W, x_bs=xbs, f_bs=fbs, units=units, chunks=chunks, g=grid, sy=_scale(grid, H),
        sx=_scale(grid, W), **draw,
        PAIR=pair, HAS_FILLER=filler is not None, WANT_SWITCH=want_switch, GENERATE=generate,
        PER_SAMPLE=n_masks > 1, CHANNELS_LAST=cl, GP=_gp(grid), BLOCK_E=BLOCK, BLOCK_HW=64,
        ALIGNED=_aligned(C * H * W, xbs, fbs), **_launch_opts(x.device)))
    return (mixed, switch, lam, mbuf), launch


def mix(x, *, masks, spec, n_masks: int, grid: int, perm, filler, want_switch: bool, perm_is_flip: bool):
    """MixMask with given ``masks`` (bool [n, g, g]) or masks drawn from ``spec`` in the same
    launch. Returns (mixed, switch or empty, lam, masks uint8 [n, g, g])."""
    outs, launch = mix_launch(x, masks=masks, spec=spec, n_masks=n_masks, grid=grid, perm=perm, filler=filler,
                              want_switch=want_switch, perm_is_flip=perm_is_flip)
    launch()
    return outs


def _dt_view(t: torch.Tensor) -> torch.Tensor:
    """What the Un-Mix kernels load: float32/bfloat16 as integer bits, float16 as itself."""
    return t if t.dtype == torch.float16 else _bits(t)


def unmix_launch(x, *, lam: float, use_mixup: bool, box):
    """Output and launch of :func:`unmix`."""
    B, C, H, W = x.shape
    fmt, cl, xx, xbs = _layout(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    chunks = triton.cdiv(C * H * W, BLOCK)
    y1, y2, x1, x2 = box
    launch = Launch(_unmix_kernel, (_programs(((B + 1) // 2) * chunks, x.device),), (), dict(
        x=_dt_view(xx), out=_dt_view(out), N=B, C=C, H=H, W=W, x_bs=xbs, chunks=chunks,
        lam=float(np.float32(lam)), mu=float(np.float32(1.0 - lam)), y1=y1, y2=y2, x1=x1, x2=x2,
        MIXUP=use_mixup, DT=_DT[x.dtype], CHANNELS_LAST=cl, BLOCK_E=BLOCK, ALIGNED=_aligned(C * H * W, xbs),
        **_launch_opts(x.device)))
    return out, launch


def unmix(x, *, lam: float, use_mixup: bool, box):
    out, launch = unmix_launch(x, lam=lam, use_mixup=use_mixup, box=box)
    launch()
    return out


def mix_and_unmix_launch(x, *, masks, perm, want_switch: bool, lam: float, use_mixup: bool, box):
    """Outputs (mixed, switch or empty, lam of the masks, Un-Mix output) and launch of :func:`mix_and_unmix`."""
    B, C, H, W = x.shape
    n, g = masks.shape[0], masks.shape[1]
    fmt, cl, xx, xbs = _layout(x)
    mixed = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    switch = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if want_switch else x.new_empty((0,))
    um = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    lam_m = torch.empty((n,), dtype=torch.float32, device=x.device)
    mbuf = masks.to(x.device).contiguous().view(torch.uint8)
    chunks = triton.cdiv(C * H * W, BLOCK)
    y1, y2, x1, x2 = box
    launch = Launch(_mix_unmix_kernel, (_programs(((B + 1) // 2) * chunks, x.device),), (), dict(
        x=_dt_view(xx), perm=perm.contiguous(), mixed=_bits(mixed),
        switch=_bits(switch) if want_switch else _bits(mixed), um=_dt_view(um), mbuf=mbuf, lam_ptr=lam_m,
        N=B, C=C, H=H, W=W, x_bs=xbs, chunks=chunks, g=g, sy=_scale(g, H), sx=_scale(g, W),
        lam=float(np.float32(lam)), mu=float(np.float32(1.0 - lam)), y1=y1, y2=y2, x1=x1, x2=x2,
        WANT_SWITCH=want_switch, PER_SAMPLE=n > 1, MIXUP=use_mixup, DT=_DT[x.dtype], CHANNELS_LAST=cl, GP=_gp(g),
        BLOCK_E=BLOCK, BLOCK_HW=64, ALIGNED=_aligned(C * H * W, xbs), **_launch_opts(x.device)))
    return (mixed, switch, lam_m, um), launch


def mix_and_unmix(x, *, masks, perm, want_switch: bool, lam: float, use_mixup: bool, box):
    outs, launch = mix_and_unmix_launch(x, masks=masks, perm=perm, want_switch=want_switch, lam=lam,
                                        use_mixup=use_mixup, box=box)
    launch()
    return outs


# ---------------------------------------------------------------------------------------
# ahead-of-time compilation for a GPU target (no GPU needed)
# ---------------------------------------------------------------------------------------

OPS = ("make_masks", "mix", "make_masks_and_mix", "unmix", "mix_and_unmix")


def example_launch(op: str, *, dtype=torch.float32, channels_last=False, grid=8, per_sample=False, want_switch=False,
                   filler=False, flip=False, use_mixup=False, image=8) -> Launch:
    """The launch ``op`` makes, built by its *_launch function on a small batch of CPU tensors
    with the options the ops (mixfast/ops/mix.py) pass: ``filler`` (``mix`` only: an erase
    baseline, no switch), ``flip`` (``make_masks_and_mix`` with perm=None), ``use_mixup``
    (Un-Mix); ``image``: the side of the 3-channel images (3·image² a multiple of 16 elements
    or not sets ALIGNED). Only dtypes, pointer alignment and the constexprs reach a compile, not
    sizes."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    B, C, H, W = 3, 3, image, image
    x = torch.zeros((B, C, H, W), dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    n = B if per_sample else 1
    masks = torch.zeros((n, grid, grid), dtype=torch.bool)
    perm = torch.arange(B - 1, -1, -1)
    # a MaskSpec (mixfast.ops.reference) of a block mask, keys >= 2^31 included
    spec = types.SimpleNamespace(grid=grid, kind=0, num=max(1, grid * grid // 2), min_patches=1, threshold24=1 << 23,
                                 key0=0x9E3779B9, key1=0x7F4A7C15)
    box = (0, H // 2, 0, W // 2)
    if op == "make_masks":
        return make_masks_launch(spec, torch.empty((n, grid, grid), dtype=torch.uint8))
    if op == "mix":
        return mix_launch(x, masks=masks, spec=None, n_masks=n, grid=grid, perm=None if filler else perm,
                          filler=torch.zeros_like(x) if filler else None, want_switch=want_switch and not filler,
                          perm_is_flip=False)[1]
    if op == "make_masks_and_mix":
        return mix_launch(x, masks=None, spec=spec, n_masks=n, grid=grid, perm=perm, filler=None,
                          want_switch=want_switch, perm_is_flip=flip)[1]
    if op == "unmix":
        return unmix_launch(x, lam=0.3, use_mixup=use_mixup, box=box)[1]
    return mix_and_unmix_launch(x, masks=masks, perm=perm, want_switch=want_switch, lam=0.3, use_mixup=use_mixup,
                                box=box)[1]


def compile_for_gpu(op: str, arch: int = 90, **variant):
    """Compile the kernel ``op`` launches (:func:`example_launch` ``variant``) for CUDA
    sm_``arch``, without a GPU; returns Triton's CompiledKernel. Raises if Triton cannot
    compile it. Needs kernels defined outside the interpreter."""
    if INTERPRET:
        raise RuntimeError("compile_for_gpu needs kernels defined without TRITON_INTERPRET=1")
    return aot.compile_launch(example_launch(op, **variant), arch)
