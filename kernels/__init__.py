"""
nanorl kernels: each op has a plain-PyTorch reference, a fallback that runs anywhere, and
(where it pays) a Triton kernel; tests/test_kernels.py checks them against float64 and
bench/kernel.py times them.

    fused_logprobs(hidden [N,d], weight [V,d], targets [N], temperature=1.0, impl="auto")
        -> (logp [N] fp32, entropy [N] fp32)   LM head + log-softmax at target + entropy,
        without materialising the [N, V] logits (kernels/fused_logprobs.py)

Triton is imported lazily (only for impl="triton" / CUDA tensors), so `import kernels`
works, and the CPU path runs, where triton is missing.
"""

from .fused_logprobs import fused_logprobs, fused_logprobs_reference, mm_out_dtype_unsupported

__all__ = ["fused_logprobs", "fused_logprobs_reference"]
