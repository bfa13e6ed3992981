"""The trainable forward: packed prompt/completion rows -> per-token log-probabilities and entropy.

    inp = collate(prompts, completions, pad_id, device, group=G)     # one packed row per GRPO group
    logp, entropy, values = Policy(model, value_head)(inp, temperature)  # each [B, T_completion]

Policy is the one module DDP / FSDP wrap: everything trainable (the transformer, the LM head through
kernels.fused_logprobs, a PPO value head) runs inside its forward, so the wrappers see every parameter.
collate packs each group of completions after a single copy of their shared prompt (Prefix Grouper,
Liu et al. 2506.05433): the prompt is computed once per group instead of once per sample, and the
log-probabilities and gradients are the same as with separate rows (tests/test_train.py).
"""

import torch
import torch.nn as nn

import kernels


class Policy(nn.Module):
    """Transformer (+ PPO value head) -> per-token logp and entropy of the completion tokens."""

    def __init__(self, model, value_head=None, impl="auto"):
        super().__init__()
        self.model, self.value_head, self.impl = model, value_head, impl

    def forward(self, inp, temperature=1.0):
        """inp: a dict from collate. Returns logp, entropy (and values) as [B, Tc], zero where mask is 0.

        Only the valid completion positions reach the LM-head kernel (packed), so padding and prompt
        tokens cost no vocabulary work.
        """
        h = self.model.hidden(inp["ids"], positions=inp["positions"], attn_mask=inp["attn_mask"])
        h = h.flatten(0, 1)[inp["idx"]]  # [B, Tc, d]: the state whose output predicts each target
        sel = inp["mask"] > 0
        W = self.model.lm_head_weight
        logp, ent = kernels.fused_logprobs(h[sel], W.to(h.dtype), inp["targets"][sel], temperature, impl=self.impl)
        out_lp = h.new_zeros(sel.shape, dtype=torch.float32).masked_scatter(sel, logp)
        out_ent = h.new_zeros(sel.shape, dtype=torch.float32).masked_scatter(sel, ent)
        values = self.value_head(h.float()) if self.value_head is not None else None
        return out_lp, out_ent, values


def collate(prompts, completions, pad_id, device, group=1):
    """Model inputs for rows of (prompt tokens, completion tokens).

    Rows come in runs of `group` that share one prompt (a GRPO group). Each run becomes one packed row:
    the prompt once, then each completion but its last token, every completion attending to the prompt
    and causally to itself only (Prefix Grouper, 2506.05433). The shared prompt is computed once instead
    of `group` times, with the same logprobs and gradients; group=1 is the plain causal layout.
    Returns a dict: ids, positions [R, L]; attn_mask [R, 1, L, L] (None for group=1: causal); idx [B, Tc],
    the flat index into the [R * L] hidden states of the state that predicts targets [B, Tc]; mask [B, Tc].
    """
    B, R = len(prompts), len(prompts) // group
    lens = [len(prompts[r * group]) + sum(len(c) - 1 for c in completions[r * group:(r + 1) * group]) for r in range(R)]
    L, Tc = max(lens), max(len(c) for c in completions)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    positions = torch.zeros(R, L, dtype=torch.long)
    seg = torch.full((R, L), -2)  # -1: the shared prompt, i: completion i of the run, -2: padding
    idx = torch.zeros(B, Tc, dtype=torch.long)
    targets = torch.zeros(B, Tc, dtype=torch.long)
    mask = torch.zeros(B, Tc)
    for r in range(R):
        p = prompts[r * group]
        lp = len(p)
        ids[r, :lp], positions[r, :lp], seg[r, :lp] = torch.tensor(p), torch.arange(lp), -1
        off = lp
        for i in range(group):
            b, c = r * group + i, completions[r * group + i]
            n = len(c) - 1
            ids[r, off:off + n], positions[r, off:off + n], seg[r, off:off + n] = torch.tensor(c[:-1]), torch.arange(lp, lp + n), i
            # c[0] is predicted by the prompt's last state, c[j] by the state of c[j - 1]
            idx[b, 0], idx[b, 1:n + 1] = r * L + lp - 1, r * L + off + torch.arange(n)
            targets[b, :n + 1], mask[b, :n + 1] = torch.tensor(c), 1
            off += n
    attn_mask = None
    if group > 1:
        k = torch.arange(L)
        attn_mask = ((k[None, :] <= k[:, None])[None] & ((seg[:, None, :] == -1) | (seg[:, None, :] == seg[:, :, None])))[:, None]
    out = dict(ids=ids, positions=positions, attn_mask=attn_mask, idx=idx, targets=targets, mask=mask)
    return {key: v.to(device) if v is not None else None for key, v in out.items()}


def autocast(device):
    # fp32 master weights, bf16 matmuls on GPU; the CPU path stays in fp32 (exact, and what tests compare)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


@torch.no_grad()
def forward_all(policy, prompts, completions, pad_id, device, mb, temperature, group=1):
    """No-grad logp, entropy and values of every row, micro-batch by micro-batch: [B, T] each (values None)."""
    T = max(len(c) for c in completions)
    outs = [torch.zeros(len(prompts), T, device=device) for _ in range(3)]
    has_values = False
    for s in range(0, len(prompts), mb):
        with autocast(device):
            res = policy(collate(prompts[s:s + mb], completions[s:s + mb], pad_id, device, group), temperature)
        for o, r in zip(outs, res):
            if r is not None:
                o[s:s + mb, :r.shape[1]] = r
        has_values = res[2] is not None
    return outs[0], outs[1], outs[2] if has_values else None


def token_matrix(rows, T, device):
    """List of per-row float lists -> zero-padded [B, T] tensor."""
    out = torch.zeros(len(rows), T)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out.to(device)
