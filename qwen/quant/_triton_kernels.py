"""The Triton kernels behind qwen/quant/triton_gptq.py (imported only from there, and only when triton is installed).

All three read the official GPTQ tensors as they are stored (layout.py): ``qweight`` int32 [K / per, N]
with ``per = 32 // BITS`` codes of consecutive input rows per word, lowest row in the lowest bits;
``qzeros`` int32 [G, N / per] with ``zero - 1`` of consecutive output columns per word; ``scales``
float16 [G, N]. A tile of W^T (rows = inputs k, columns = outputs n) is rebuilt in registers as
``(q - zero) * scale`` in fp32 and never written to memory.

Group lookup: with ``TILE_GROUP`` every K-tile lies inside one group (group_size a multiple of
BLOCK_K, or one group for the whole layer), so one row of scales and zeros serves the tile; otherwise
each input row looks its group up in ``g_idx`` (any grouping, e.g. a short last group or groups of 8).

Act-order: the caller has permuted the rows of qweight into group order (``perm``: position j of the
permuted weight is input ``perm[j]``); the kernels read input columns (forward) or write gradient
columns (backward) through ``perm``, so the activations are never copied into the permuted order.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dequant_tile(qw_ptr, qz_ptr, sc_ptr, gi_ptr, offs_k, offs_n, mask_k, mask_n, k0, N, group_size,
                  BITS: tl.constexpr, TILE_GROUP: tl.constexpr):
    """W^T[offs_k, offs_n] in fp32 (zero where masked)."""
    PER: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    mask = mask_k[:, None] & mask_n[None, :]
    words = tl.load(qw_ptr + (offs_k // PER)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    # >> on int32 is arithmetic: the sign bit smears into the high bits, which the mask removes.
    q = (words >> ((offs_k % PER) * BITS)[:, None]) & MAXQ
    zshift = (offs_n % PER) * BITS
    if TILE_GROUP:
        g = k0 // group_size
        s = tl.load(sc_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        zw = tl.load(qz_ptr + g * (N // PER) + offs_n // PER, mask=mask_n, other=0)
        z = ((zw >> zshift) & MAXQ) + 1
        w = (q - z[None, :]).to(tl.float32) * s[None, :]
    else:
        g = tl.load(gi_ptr + offs_k, mask=mask_k, other=0)
        s = tl.load(sc_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        zw = tl.load(qz_ptr + g[:, None] * (N // PER) + (offs_n // PER)[None, :], mask=mask, other=0)
        z = ((zw >> zshift[None, :]) & MAXQ) + 1
        w = (q - z).to(tl.float32) * s
    return tl.where(mask, w, 0.0)


@triton.jit
def gptq_mm_kernel(x_ptr, perm_ptr, qw_ptr, qz_ptr, sc_ptr, gi_ptr, bias_ptr, out_ptr,
                   M, N, K, stride_xm, group_size, tiles_per_split,
                   BITS: tl.constexpr, TILE_GROUP: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                   SPLIT: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[M, N] = x[M, K] @ W^T (+ bias), tensor-core tiles; with SPLIT, program (., s) sums the K-tiles
    [s * tiles_per_split, (s + 1) * tiles_per_split) into out[s] (fp32 partial sums, reduced by the caller)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Grouped ordering of the output tiles: GROUP_M consecutive programs share weight columns in L2.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_tiles = tl.cdiv(K, BLOCK_K)
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, k_tiles)
    for t in range(t0, t1):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if HAS_PERM:
            cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        else:
            cols = offs_k
        x = tl.load(x_rows + cols[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = _dequant_tile(qw_ptr, qz_ptr, sc_ptr, gi_ptr, offs_k, offs_n, mask_k, mask_n, k0, N, group_size,
                          BITS, TILE_GROUP)
        if IEEE:
            # fp32 inputs (exact, no TF32), or bf16 under the interpreter, whose bf16 dot is wrong:
            # the same products (w rounded to the input dtype first) in fp32.
            acc = tl.dot(x.to(tl.float32), w.to(x.dtype).to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        dst = out_ptr + pid_k.to(tl.int64) * M * N + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(dst, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        dst = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def gptq_gemv_kernel(x_ptr, perm_ptr, qw_ptr, qz_ptr, sc_ptr, gi_ptr, bias_ptr, out_ptr,
                     M, N, K, stride_xm, group_size, tiles_per_split,
                     BITS: tl.constexpr, TILE_GROUP: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The decode shape (M <= BLOCK_M <= 8 rows): no tensor cores, the fp32 products of a [BLOCK_M, BLOCK_K]
    activation tile and a [BLOCK_K, BLOCK_N] weight tile are summed over K in registers. Each program
    owns BLOCK_N columns and one K-split, so small layers still spread over the whole GPU."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_tiles = tl.cdiv(K, BLOCK_K)
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, k_tiles)
    for t in range(t0, t1):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if HAS_PERM:
            cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        else:
            cols = offs_k
        x = tl.load(x_rows + cols[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        w = _dequant_tile(qw_ptr, qz_ptr, sc_ptr, gi_ptr, offs_k, offs_n, mask_k, mask_n, k0, N, group_size,
                          BITS, TILE_GROUP)
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        dst = out_ptr + pid_k.to(tl.int64) * M * N + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(dst, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        dst = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def gptq_mm_t_kernel(g_ptr, perm_ptr, qw_ptr, qz_ptr, sc_ptr, gi_ptr, out_ptr,
                     M, N, K, stride_gm, group_size,
                     BITS: tl.constexpr, TILE_GROUP: tl.constexpr, HAS_PERM: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[M, K] = grad[M, N] @ W (the input gradient), from the same packed codes: program (m, k) owns a
    [BLOCK_M, BLOCK_K] tile of the result and walks N, rebuilding W^T[k-tile, n-tile] as the forward does.
    With act-order the result's column j is written to input perm[j]."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    per_group = GROUP_M * num_k
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_k = (pid % per_group) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    k0 = pid_k * BLOCK_K
    g_rows = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        gy = tl.load(g_rows + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w = _dequant_tile(qw_ptr, qz_ptr, sc_ptr, gi_ptr, offs_k, offs_n, mask_k, mask_n, k0, N, group_size,
                          BITS, TILE_GROUP)
        if IEEE:
            acc = tl.dot(gy.to(tl.float32), tl.trans(w.to(gy.dtype).to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(gy, tl.trans(w.to(gy.dtype)), acc)
    if HAS_PERM:
        cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
    else:
        cols = offs_k
    dst = out_ptr + offs_m.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])
