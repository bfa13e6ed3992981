"""Offline and supervised losses: DPO-family preference losses on sequence log-prob sums, and SFT NLL.

With pi_c, pi_r the summed log-probs of the chosen / rejected completion under the policy, ref_c, ref_r
under the frozen reference, and delta = (pi_c - ref_c) - (pi_r - ref_r):

    sigmoid  DPO 2305.18290              -log sig(beta delta)
    cdpo     conservative DPO (label smoothing eps; OpenRLHF, TRL)
                                         -(1-eps) log sig(beta delta) - eps log sig(-beta delta)
    robust   rDPO 2403.00409             [-(1-eps) log sig(beta delta) + eps log sig(-beta delta)] / (1 - 2 eps)
    ipo      IPO 2310.12036              (delta - 1/(2 beta))^2 on sequence sums, as in the paper
                                         (TRL's "ipo" divides each log-ratio by its length; use "ln" for that flavour)
    ln       length-normalised DPO       -log sig(beta (delta_c/L_c - delta_r/L_r) - gamma)
    simpo    SimPO 2405.14734            -log sig(beta (pi_c/L_c - pi_r/L_r) - gamma), reference-free

eps = cfg.label_smoothing, gamma = cfg.pref_margin. Losses are summed over pairs and divided by n_pairs
(default: this batch's pairs), so gradient accumulation over micro-batches with the global n_pairs is exact.
Metrics are detached 0-dim tensors, each a sum over this batch divided by n_pairs: add them up over
micro-batches and ranks.
"""

import torch
import torch.nn.functional as F

PREF_LOSSES = ("sigmoid", "cdpo", "robust", "ipo", "ln", "simpo")


def preference_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, cfg, chosen_len=None, rejected_len=None,
                    n_pairs=None):
    """(loss, metrics) for one batch of preference pairs; all inputs are [B] sequence log-prob sums."""
    beta, eps, kind = cfg.beta, cfg.label_smoothing, cfg.pref_loss
    if kind in ("ln", "simpo") and (chosen_len is None or rejected_len is None):
        raise ValueError(f"pref_loss={kind!r} is length-normalised: pass chosen_len and rejected_len")
    if kind != "simpo" and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"pref_loss={kind!r} needs the reference log-probs (only 'simpo' is reference-free)")
    if kind == "simpo":
        lr_c, lr_r = pol_chosen / chosen_len, pol_rejected / rejected_len
    elif kind == "ln":
        lr_c, lr_r = (pol_chosen - ref_chosen) / chosen_len, (pol_rejected - ref_rejected) / rejected_len
    else:
        lr_c, lr_r = pol_chosen - ref_chosen, pol_rejected - ref_rejected
    d = lr_c - lr_r
    if kind == "sigmoid":
        ell = -F.logsigmoid(beta * d)
    elif kind == "cdpo":
        ell = -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
    elif kind == "robust":
        ell = (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
    elif kind == "ipo":
        ell = (d - 1 / (2 * beta)) ** 2
    elif kind in ("ln", "simpo"):
        ell = -F.logsigmoid(beta * d - cfg.pref_margin)
    else:
        raise ValueError(f"unknown pref_loss={kind!r}; choose one of {PREF_LOSSES}")
    n = torch.as_tensor(d.numel() if n_pairs is None else n_pairs, dtype=d.dtype, device=d.device).clamp(min=1)
    loss = ell.sum() / n
    with torch.no_grad():
        metrics = {"loss": loss.detach(), "reward_chosen": (beta * lr_c).sum() / n,
                   "reward_rejected": (beta * lr_r).sum() / n, "reward_margin": (beta * d).sum() / n,
                   "reward_acc": (d > 0).to(d.dtype).sum() / n}
    return loss, metrics


def sft_loss(logp, mask, n_tokens=None):
    """Negative log-likelihood of the completion tokens, summed and divided by n_tokens (global count)."""
    m = mask.to(logp.dtype)
    n = torch.as_tensor(m.sum() if n_tokens is None else n_tokens, dtype=logp.dtype, device=logp.device).clamp(min=1)
    loss = -(logp * m).sum() / n
    return loss, {"nll": loss.detach(), "tokens": m.sum().detach()}
