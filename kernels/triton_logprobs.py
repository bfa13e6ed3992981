"""
Triton kernels for kernels.fused_logprobs (the math and its plain-PyTorch twin are in
fused_logprobs.py; the design follows shared/reference/kernel-design.md section 5).

Forward: one program per (row block of BM tokens, vocab split of SPLIT_TILES * BV columns).
It computes each [BM, BV] logit tile with tl.dot (fp32 accumulate), scales by 1/tau and
folds it into an online (max m, sum-exp s, shifted entropy sum t, target logit zy) per row;
the logits never leave registers. Per-split partials [4, S, N] (a few MB) are merged by
O(N S) torch ops. The split count depends on V only, never on N, so a token's logp is
bit-identical whatever batch it is in (old and new logprobs must agree for ratio == 1).

Backward: for each vocab chunk of Vc columns (Vc sized for a ~512 MiB workspace), a Triton
kernel recomputes the logit tiles in the same K order and writes
G = (1/tau)[g 1[j=y] - p (g + e (log p + H))] into a [N, Vc] workspace (bf16 for 16-bit
inputs, fp32 for fp32 inputs); then two cuBLAS GEMMs: dW[chunk] = G^T h (written once, no
fp32 V x d accumulator) and dh += G W[chunk] in fp32. No atomics anywhere: deterministic.
FLOPs: 2NdV forward, 2NdV recompute + 4NdV GEMMs backward = 8NdV.

Programs are ordered in groups of GROUP_M row blocks (the matmul "swizzle") so CTAs that run
together share W tiles and h rows in L2 (section 3 of the design notes: without it the forward
is memory-bound at large N).

Block sizes are fixed, not autotuned (batch invariance, no tuning pass on first call).
GPU tuning (BV=256, TMA descriptors, warp specialization) is pending a run on a device; the
GPU values below are the conservative choice from section 5.2. Under TRITON_INTERPRET=1
(CPU testing) tiles are small and loaded tiles are upcast to fp32 before tl.dot, because
the interpreter computes bf16 dots and bf16 arithmetic wrongly (section 6).
"""

import os

import torch
import triton
import triton.language as tl

from .fused_logprobs import mm_out_dtype_unsupported


# ----------------------------------------------------------------------------------------
# kernels

@triton.jit
def _tile_logits(h_ptr, w_ptr, rows, cols, N, V, D, stride_h, stride_w,
                 BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # raw logits x[rows, cols] = h[rows] . W[cols], fp32 accumulate; out-of-range rows/cols read 0
    acc = tl.zeros((BM, BV), dtype=tl.float32)
    h_row = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_col = w_ptr + cols.to(tl.int64)[None, :] * stride_w
    rmask = (rows < N)[:, None]
    cmask = (cols < V)[None, :]
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        a = tl.load(h_row + ks[None, :], mask=rmask & (ks < D)[None, :], other=0.0)
        b = tl.load(w_col + ks[:, None], mask=cmask & (ks < D)[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _group_pid(pid, num_m, num_n, GROUP_M: tl.constexpr):
    # GROUP_M row blocks x all column blocks are consecutive pids: they share L2 traffic
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, y_ptr, part_ptr, N, V, D, stride_h, stride_w, inv_tau, num_splits,
                BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, SPLIT_TILES: tl.constexpr,
                GROUP_M: tl.constexpr, WITH_ENTROPY: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    pid_m, pid_s = _group_pid(tl.program_id(0), tl.cdiv(N, BM), num_splits, GROUP_M)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < N
    y = tl.load(y_ptr + rows, mask=rmask, other=-1).to(tl.int32)
    m = tl.full((BM,), float("-inf"), tl.float32)  # -inf, not 0: all-negative rows (verl #7439)
    s = tl.zeros((BM,), tl.float32)
    t = tl.zeros((BM,), tl.float32)
    zy = tl.zeros((BM,), tl.float32)
    v_lo = pid_s * (SPLIT_TILES * BV)
    v_hi = tl.minimum(v_lo + SPLIT_TILES * BV, V)  # the last split may be short
    for v0 in range(v_lo, v_hi, BV):
        cols = v0 + tl.arange(0, BV)
        acc = _tile_logits(h_ptr, w_ptr, rows, cols, N, V, D, stride_h, stride_w,
                           BM, BV, BK, UPCAST, PRECISION)
        valid = (cols < V)[None, :]
        z = tl.where(valid, acc * inv_tau, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))  # finite: every tile has >= 1 valid column
        zc = z - m_new[:, None]              # <= 0; -inf on padding columns
        q = tl.exp(zc)
        alpha = tl.exp(m - m_new)            # 0 on the first tile (m = -inf)
        if WITH_ENTROPY:
            # t = sum q (z - m): re-centre the running sum on m_new; guard -inf * 0 on tile 1
            shift = (tl.where(s > 0, m, m_new) - m_new) * s
            t = alpha * (t + shift) + tl.sum(q * tl.where(valid, zc, 0.0), 1)
        s = alpha * s + tl.sum(q, 1)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        m = m_new
    out = part_ptr + pid_s * N + rows
    stride_stat = num_splits * N
    tl.store(out, m, mask=rmask)
    tl.store(out + stride_stat, s, mask=rmask)
    tl.store(out + 2 * stride_stat, t, mask=rmask)
    tl.store(out + 3 * stride_stat, zy, mask=rmask)


@triton.jit
def _grad_logits_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, ent_ptr, g_ptr, e_ptr, G_ptr,
                        N, V, D, v_lo, Vc, stride_h, stride_w, stride_G, inv_tau,
                        BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                        HAS_G: tl.constexpr, HAS_E: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr):
    pid_m, pid_v = _group_pid(tl.program_id(0), tl.cdiv(N, BM), tl.cdiv(Vc, BV), GROUP_M)
    rows = pid_m * BM + tl.arange(0, BM)
    loc = pid_v * BV + tl.arange(0, BV)  # column inside the chunk
    cols = v_lo + loc
    rmask = rows < N
    acc = _tile_logits(h_ptr, w_ptr, rows, cols, N, V, D, stride_h, stride_w,
                       BM, BV, BK, UPCAST, PRECISION)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    # log p; formed first so that |z| ~ 1e4 does not cancel (design notes section 4);
    # -inf on padding columns keeps exp() finite there when lse << 0
    u = tl.where((loc < Vc)[None, :], acc * inv_tau - lse[:, None], float("-inf"))
    p = tl.exp(u)
    coef = tl.zeros((BM, BV), tl.float32)  # G = -p * coef (+ g on the target column)
    if HAS_G:
        g = tl.load(g_ptr + rows, mask=rmask, other=0.0) * inv_tau
        coef += g[:, None]
    if HAS_E:
        e = tl.load(e_ptr + rows, mask=rmask, other=0.0) * inv_tau
        H = tl.load(ent_ptr + rows, mask=rmask, other=0.0)
        coef += e[:, None] * tl.where((loc < Vc)[None, :], u + H[:, None], 0.0)
    G = -p * coef
    if HAS_G:
        y = tl.load(y_ptr + rows, mask=rmask, other=-1).to(tl.int32)
        G = tl.where(cols[None, :] == y[:, None], G + g[:, None], G)
    mask = rmask[:, None] & (loc < Vc)[None, :]
    tl.store(G_ptr + rows.to(tl.int64)[:, None] * stride_G + loc[None, :],
             G.to(G_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# launch configuration

def _interpret():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _config(x):
    """Fixed tile sizes per dtype (no autotune: keeps logp batch-invariant, see docstring)."""
    if _interpret():
        # small tiles: the interpreter runs numpy per program; tests cover partial tiles and splits
        return dict(BM=16, BV=32, BK=16, SPLIT_TILES=2, GROUP_M=2, num_warps=4, num_stages=1)
    big_smem = getattr(torch.cuda.get_device_properties(x.device),
                       "shared_memory_per_block_optin", 0) >= 160 * 1024  # A100 / H100 class
    if x.dtype == torch.float32:
        return dict(BM=128, BV=128, BK=32, SPLIT_TILES=16, GROUP_M=8, num_warps=8, num_stages=2)
    return dict(BM=128, BV=128, BK=64, SPLIT_TILES=16, GROUP_M=8, num_warps=8,
                num_stages=3 if big_smem else 2)


def _precision(x):
    # fp32 inputs honour torch's TF32 switch (off by default, as for torch.matmul); for 16-bit
    # inputs "tf32" is Triton's default and means nothing; the interpreter computes in fp32
    if _interpret() or (x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


_WORKSPACE_BYTES = 512 * 1024 * 1024  # G workspace budget for the backward


def _launch_kw(cfg):
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _forward(hidden, weight, targets, inv_tau, with_entropy):
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    if N == 0:
        z = torch.empty(0, dtype=torch.float32, device=dev)
        return z, (z.clone() if with_entropy else None), z.clone()
    cfg = _config(hidden)
    split = cfg["SPLIT_TILES"] * cfg["BV"]
    num_splits = triton.cdiv(V, split)
    part = torch.empty(4, num_splits, N, dtype=torch.float32, device=dev)
    grid = (triton.cdiv(N, cfg["BM"]) * num_splits,)
    _fwd_kernel[grid](hidden, weight, targets, part, N, V, D, hidden.stride(0), weight.stride(0),
                      inv_tau, num_splits,
                      BM=cfg["BM"], BV=cfg["BV"], BK=cfg["BK"], SPLIT_TILES=cfg["SPLIT_TILES"],
                      GROUP_M=cfg["GROUP_M"], WITH_ENTROPY=with_entropy, UPCAST=_interpret(),
                      PRECISION=_precision(hidden), **_launch_kw(cfg))
    # merge the splits (O(N S), deterministic torch reductions)
    m, s, t, zy = part.unbind(0)
    M = m.amax(0)
    w = torch.exp(m - M)
    S = (s * w).sum(0)
    log_S = S.log()
    lse = M + log_S
    logp = zy.sum(0) - lse  # zy is non-zero only in the split holding the target
    ent = None
    if with_entropy:
        T = (w * (t + (m - M) * s)).sum(0)
        ent = log_S - T / S
    return logp, ent, lse


_MM_OUT_DTYPE = True  # torch.mm(..., out_dtype=fp32) for 16-bit inputs (CUDA, torch >= 2.8)


def _mm_f32(a, b):
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32:
        return a @ b
    if _MM_OUT_DTYPE and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except Exception as e:
            if not mm_out_dtype_unsupported(e):  # an OOM must reach the user, not disable this path for good
                raise
            _MM_OUT_DTYPE = False
    return a.float() @ b.float()


def _backward(hidden, weight, targets, lse, ent, g, e, inv_tau, need_dh, need_dw):
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    cfg = _config(hidden)
    BV = cfg["BV"]
    g_dtype = torch.float32 if hidden.dtype == torch.float32 else hidden.dtype
    el = torch.finfo(g_dtype).bits // 8
    Vc = max(BV, (_WORKSPACE_BYTES // max(1, N * el)) // BV * BV)
    Vc = min(Vc, V)
    ws = torch.empty(N * Vc, dtype=g_dtype, device=dev)
    dh = torch.zeros(N, D, dtype=torch.float32, device=dev) if need_dh else None
    dW = torch.empty_like(weight) if need_dw else None
    g = g.float().contiguous() if g is not None else None
    e = e.float().contiguous() if e is not None else None
    dummy = lse
    for v_lo in range(0, V, Vc):
        vc = min(Vc, V - v_lo)
        G = ws[: N * vc].view(N, vc)
        grid = (triton.cdiv(N, cfg["BM"]) * triton.cdiv(vc, BV),)
        _grad_logits_kernel[grid](
            hidden, weight, targets, lse, ent if ent is not None else dummy,
            g if g is not None else dummy, e if e is not None else dummy, G,
            N, V, D, v_lo, vc, hidden.stride(0), weight.stride(0), G.stride(0), inv_tau,
            BM=cfg["BM"], BV=BV, BK=cfg["BK"], GROUP_M=cfg["GROUP_M"],
            HAS_G=g is not None, HAS_E=e is not None, UPCAST=_interpret(),
            PRECISION=_precision(hidden), **_launch_kw(cfg))
        Wc = weight[v_lo:v_lo + vc]
        if need_dh:
            dh += _mm_f32(G, Wc)  # fp32 accumulation across chunks (verl accumulates in bf16)
        if need_dw:
            torch.mm(G.t(), hidden, out=dW[v_lo:v_lo + vc])  # fp32 inside the GEMM, written once
    return (dh.to(hidden.dtype) if need_dh else None), dW


class _TritonLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_tau, with_entropy):
        logp, ent, lse = _forward(hidden, weight, targets, inv_tau, with_entropy)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.inv_tau = inv_tau
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g, e):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g is None and e is None) or not (need_dh or need_dw) or hidden.shape[0] == 0:
            dh = torch.zeros_like(hidden) if need_dh else None
            dW = torch.zeros_like(weight) if need_dw else None
            return dh, dW, None, None, None
        dh, dW = _backward(hidden, weight, targets, lse, ent, g, e, ctx.inv_tau, need_dh, need_dw)
        return dh, dW, None, None, None


def triton_fused_logprobs(hidden, weight, targets, temperature, with_entropy=True):
    """Triton implementation of kernels.fused_logprobs (arguments already validated)."""
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    targets = targets.contiguous()
    inv_tau = 1.0 / temperature
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        logp, ent, _ = _forward(hidden, weight, targets, inv_tau, with_entropy)  # no-grad fast path
        return logp, ent
    return _TritonLogprobs.apply(hidden, weight, targets, inv_tau, with_entropy)
