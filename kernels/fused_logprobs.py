"""
Fused LM head + log-softmax-at-target + entropy, without the [N, V] logits.

For token t with hidden state h_t, LM head W [V, d] and temperature tau:

    z_tj  = h_t . W_j / tau              scaled logits (never stored whole)
    lse_t = log sum_j exp(z_tj)
    logp_t = z_{t,y_t} - lse_t           log-prob of the target token y_t
    H_t    = lse_t - sum_j p_tj z_tj     entropy of softmax(z_t)

The RL trainer builds every policy loss (GRPO, DAPO, GSPO, CISPO, KL, entropy bonus ...)
from these two per-token fp32 vectors, so the op never needs to know the algorithm.
Autograd hands back g_t = dL/dlogp_t and e_t = dL/dH_t, and the gradient w.r.t. the
raw logits x = h W^T is (derivation: shared/reference/kernel-design.md section 4)

    G_tj = (1/tau) [ g_t 1[j = y_t] - p_tj (g_t + e_t (log p_tj + H_t)) ]
    dh = G W        dW = G^T h

This file holds the public entry point (argument checks + dispatch), the plain eager
reference (materialises the logits; for tests and benchmarks), and the chunked PyTorch
implementation, which is both the CPU path and the readable spec of what the Triton
kernels in triton_logprobs.py compute:

    impl="torch"   token-chunked autograd.Function; forward keeps only lse and H [N];
                   backward recomputes each chunk's logits (8NdV FLOPs in total instead of
                   eager's 6NdV) and needs O(chunk * V) scratch instead of O(N * V).
    impl="triton"  tiled Triton kernels (CUDA; or CPU tensors under TRITON_INTERPRET=1).
    impl="auto"    triton for CUDA tensors, torch otherwise.

Departures from verl / Liger worth knowing: logp and H are always fp32 (verl's torch path
returns bf16 logp, whose ~1% rounding is comparable to the PPO clip range); gradients are
computed in backward, not in forward, so the op composes with any loss written after it.
"""

import math
import os

import torch

_IMPLS = ("auto", "torch", "triton")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------
# public entry point

def fused_logprobs(hidden, weight, targets, temperature=1.0, impl="auto", *,
                   with_entropy=True, chunk_rows=None):
    """Per-token log-prob of `targets` and entropy under softmax(hidden @ weight.T / temperature).

    hidden  [N, d]  float32 / bfloat16 / float16 (flatten [B, T, d] with .flatten(0, -2))
    weight  [V, d]  same dtype and device as hidden (the LM head, e.g. model.lm_head_weight)
    targets [N]     integer token ids in [0, V)
    temperature     python float > 0: the sampling temperature (logits are divided by it)
    impl            "auto" | "torch" | "triton" (see the module docstring)
    with_entropy    False skips the entropy statistics (returns None for it; slightly cheaper)
    chunk_rows      torch impl only: tokens per chunk (default: sized for ~128 MiB of scratch)

    Returns (logp [N] float32, entropy [N] float32 or None). Both are differentiable w.r.t.
    hidden and weight; no gradient flows to targets. Nothing is saved for backward when
    autograd is off or neither input requires grad (the old-policy / reference-model path).
    A frozen head (weight.requires_grad False) skips the dW GEMM.
    """
    impl = _check_args(hidden, weight, targets, temperature, impl)
    tau = float(temperature)
    if impl == "triton":
        from . import triton_logprobs  # lazy: importing triton is slow and optional on CPU
        return triton_logprobs.triton_fused_logprobs(hidden, weight, targets, tau, with_entropy)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        logp, ent, _ = _torch_forward(hidden, weight, targets, 1.0 / tau, with_entropy, chunk_rows)
        return logp, ent
    return _ChunkedLogprobs.apply(hidden, weight, targets, 1.0 / tau, with_entropy, chunk_rows)


def fused_logprobs_reference(hidden, weight, targets, temperature=1.0, dtype=torch.float32):
    """Eager reference: materialises the [N, V] logits in `dtype` (float64 in the tests)."""
    z = (hidden.to(dtype) @ weight.to(dtype).T) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(1, targets.long()[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


# ----------------------------------------------------------------------------------------
# argument checks: one clear line naming the argument and the fix

def _check_args(hidden, weight, targets, temperature, impl):
    for name, x in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"fused_logprobs: {name} must be a torch.Tensor, got {type(x).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"fused_logprobs: hidden must be 2-D [N, d], got shape {tuple(hidden.shape)}; "
                         f"flatten batch and time first with hidden.flatten(0, -2)")
    if weight.dim() != 2:
        raise ValueError(f"fused_logprobs: weight must be 2-D [V, d] (the LM head), got shape {tuple(weight.shape)}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"fused_logprobs: targets must be 1-D [N] with N = hidden.shape[0] = {hidden.shape[0]}, "
                         f"got shape {tuple(targets.shape)}; flatten it with targets.flatten()")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"fused_logprobs: weight is [V, d] = {tuple(weight.shape)} but hidden has d = "
                         f"{hidden.shape[1]}; pass the LM head as [vocab, hidden] (transpose it if needed)")
    if weight.shape[0] == 0:
        raise ValueError("fused_logprobs: weight has V = 0 rows; the vocabulary must be non-empty")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fused_logprobs: hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"fused_logprobs: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}; "
                        f"cast one of them, e.g. weight.to(hidden.dtype)")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"fused_logprobs: targets must be an integer tensor (token ids), got {targets.dtype}; "
                        f"use targets.long()")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"fused_logprobs: hidden, weight and targets must be on one device, got "
                         f"{hidden.device}, {weight.device}, {targets.device}; move them with .to(hidden.device)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"fused_logprobs: temperature must be a python float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"fused_logprobs: temperature must be a finite number > 0, got {temperature}")
    if impl not in _IMPLS:
        raise ValueError(f"fused_logprobs: impl must be one of {_IMPLS}, got {impl!r}")
    # a value-range check needs a device->host sync, so only where it is free (CPU)
    if targets.device.type == "cpu" and targets.numel() > 0:
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"fused_logprobs: targets must lie in [0, V={weight.shape[0]}), got values in "
                             f"[{lo}, {hi}]; drop or remap padding ids (e.g. -100) before the call")
    if impl == "auto":
        impl = "triton" if hidden.is_cuda and _triton_importable() else "torch"
    if impl == "triton":
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if not (hidden.is_cuda or (interpret and hidden.device.type == "cpu")):
            raise ValueError(f"fused_logprobs: impl='triton' needs CUDA tensors (got {hidden.device}); use "
                             f"impl='torch' or 'auto', or set TRITON_INTERPRET=1 before importing triton to test on CPU")
        if not _triton_importable():
            raise ValueError("fused_logprobs: impl='triton' but triton is not importable; "
                             "pip install triton, or use impl='torch'")
    return impl


def mm_out_dtype_unsupported(e):
    """Whether exception e from torch.mm(..., out_dtype=) says only that this torch / device lacks it: a
    TypeError (a torch without the argument), NotImplementedError (no kernel for the device: CPU), or a
    RuntimeError naming the unsupported dtype. An out-of-memory error is never that: a fallback that caught
    it would switch the process to the slower or rounded path for good and hide the OOM from the user."""
    if isinstance(e, torch.OutOfMemoryError):
        return False
    if isinstance(e, (TypeError, NotImplementedError)):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out_dtype" in msg or "not supported" in msg or "not implemented" in msg)


_TRITON_OK = None


def _triton_importable():
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            _TRITON_OK = True
        except Exception:  # ImportError, or a broken install: fall back to torch
            _TRITON_OK = False
    return _TRITON_OK


# ----------------------------------------------------------------------------------------
# chunked PyTorch implementation (CPU path + readable reference for the Triton kernels)

# Scratch per chunk is two [rows, V] fp32 buffers. 2^24 elements = 64 MiB each: large enough
# that CPU GEMMs run at full speed on [rows, d] x [d, V] (they are slow below ~256 rows), and
# small enough for peak memory ~1/10 of eager at N=4096, V=49152 (bench/kernel.py).
_CHUNK_ELEMS = {"cpu": 1 << 24, "cuda": 1 << 26}


def _chunks(N, V, device, chunk_rows):
    """Yield (i0, i1, a, b): row ranges of at most chunk_rows rows (default: a fixed element budget per
    chunk) and two [i1 - i0, V] fp32 scratch views, the same two buffers for every chunk."""
    if chunk_rows is None:  # the budget's row count, N split evenly: a small last chunk runs GEMMs slowly
        budget_rows = max(1, _CHUNK_ELEMS.get(device.type, 1 << 24) // V)
        n_chunks = max(1, -(-N // budget_rows))
        chunk_rows = -(-N // n_chunks)
    c = max(1, min(int(chunk_rows), N))
    buf = torch.empty(c, V, dtype=torch.float32, device=device)
    buf2 = torch.empty(c, V, dtype=torch.float32, device=device)
    for i0 in range(0, N, c):
        i1 = min(i0 + c, N)
        yield i0, i1, buf[:i1 - i0], buf2[:i1 - i0]


def _f32(x):
    return x if x.dtype == torch.float32 else x.float()


def _torch_forward(hidden, weight, targets, inv_tau, with_entropy, chunk_rows):
    """Returns (logp, entropy or None, lse), all fp32 [N]; O(chunk * V) scratch."""
    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    logp = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    ent = torch.empty(N, dtype=torch.float32, device=dev) if with_entropy else None
    if N == 0:
        return logp, ent, lse
    # bf16/fp16: upcast so logits are never rounded to 16 bits before the lse/gather
    # (CPU has no bf16 x bf16 -> fp32 GEMM); O(V d) fp32, still far below O(N V)
    Wt = _f32(weight).t()
    y = targets.long()
    for i0, i1, z, q in _chunks(N, V, dev, chunk_rows):
        h = _f32(hidden[i0:i1])
        if inv_tau != 1.0:
            h = h * inv_tau  # scale the [n, d] operand, not the [n, V] product
        torch.mm(h, Wt, out=z)
        m = z.amax(1, keepdim=True)
        z.sub_(m)  # z <- z - m: every exp below is <= 1
        zy = z.gather(1, y[i0:i1, None]).squeeze(1)
        torch.exp(z, out=q)
        s = q.sum(1)
        log_s = s.log()
        lse[i0:i1] = m.squeeze(1) + log_s
        logp[i0:i1] = zy - log_s
        if with_entropy:
            # H = lse - sum p z = log s - sum q (z - m) / s   (shifted: no cancellation at |z| ~ 1e4)
            t = torch.bmm(q.unsqueeze(1), z.unsqueeze(2)).view(i1 - i0)
            ent[i0:i1] = log_s - t / s
    return logp, ent, lse


def _torch_backward(hidden, weight, targets, lse, ent, g, e, inv_tau, need_dh, need_dw, chunk_rows):
    """dh, dW for incoming per-token grads g (of logp) and e (of entropy); either may be None."""
    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    W32 = _f32(weight)
    dh = torch.empty(N, hidden.shape[1], dtype=torch.float32, device=dev) if need_dh else None
    dW = torch.zeros(V, weight.shape[1], dtype=torch.float32, device=dev) if need_dw else None
    # fold 1/tau (dz/dx) and the minus sign into the per-token coefficients: O(N), not O(N V)
    ng = g.float() * -inv_tau if g is not None else None
    ne = e.float() * -inv_tau if e is not None else None
    mean_z = lse - ent if e is not None else None  # sum_j p_j z_j = lse - H
    y = targets.long()
    for i0, i1, G, p in _chunks(N, V, dev, chunk_rows):
        h = _f32(hidden[i0:i1])
        hz = h * inv_tau if inv_tau != 1.0 else h
        torch.mm(hz, W32.t(), out=G)               # recompute z
        torch.sub(G, lse[i0:i1, None], out=p).exp_()  # p = exp(z - lse)
        if ne is not None:
            # G = -p (g + e (log p + H)); log p + H = z - (lse - H), one per-row shift
            G.sub_(mean_z[i0:i1, None])
            if ng is not None:
                torch.addcmul(ng[i0:i1, None], G, ne[i0:i1, None], out=G)
            else:
                G.mul_(ne[i0:i1, None])
            G.mul_(p)
        else:
            torch.mul(p, ng[i0:i1, None], out=G)
        if ng is not None:  # the one-hot part of d logp / dz: + g at the target
            G.scatter_add_(1, y[i0:i1, None], -ng[i0:i1, None])
        if need_dh:
            torch.mm(G, W32, out=dh[i0:i1])
        if need_dw:
            dW.addmm_(G.t(), h)
    dh = dh.to(hidden.dtype) if need_dh else None
    dW = dW.to(weight.dtype) if need_dw else None
    return dh, dW


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_tau, with_entropy, chunk_rows):
        logp, ent, lse = _torch_forward(hidden, weight, targets, inv_tau, with_entropy, chunk_rows)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.inv_tau, ctx.chunk_rows = inv_tau, chunk_rows
        ctx.set_materialize_grads(False)  # an unused output gives None: skip its term
        return logp, ent

    @staticmethod
    def backward(ctx, g, e):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g is None and e is None) or not (need_dh or need_dw):
            return None, None, None, None, None, None
        dh, dW = _torch_backward(hidden, weight, targets, lse, ent, g, e, ctx.inv_tau,
                                 need_dh, need_dw, ctx.chunk_rows)
        return dh, dW, None, None, None, None
