"""LoRA (Hu et al. 2021, 2106.09685) inside nanorl's transformer, saved as a PEFT adapter.

A targeted projection keeps its frozen weight W (any dtype) and gains a trainable low-rank update:
y = W x + b + (alpha / r) B A dropout(x), with A [r, in] kaiming-uniform (a = sqrt(5)) and B [out, r] zeros,
so at step 0 the model is exactly the base. This is PEFT's parametrisation, so the adapter files are
PEFT's too (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`), and `peft.PeftModel.from_pretrained`
loads them onto the transformers model of the base.

For RL, "LoRA Without Regret" (Schulman et al. 2025) found LoRA on all linear layers matches full fine-tuning
for policy gradients at ~10x the full-FT learning rate (train.py uses that when --lr is not given). Two
things come for free: the reference policy (KL, DPO) is the same model with the adapters switched off
(`disabled`), as in TRL and verl, and only the adapters carry gradients and optimizer state. The sampler
gets merged weights W + (alpha / r) B A, recomputed from the unmerged base every step (`merged_state_dict`):
merging into W in place and subtracting later would round differently each time and drift.
"""

import contextlib
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanorl import UserError
from nanorl.linear import Linear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # "all-linear"
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model.model."  # PEFT's wrapper + transformers' XForCausalLM.model + our parameter names


class LoRALinear(Linear):
    """A Linear whose weight and bias are frozen, plus the trainable pair lora_A [r, in], lora_B [out, r].

    The adapters are fp32 whatever the base dtype (they are the master weights being trained); the update
    runs in the input's dtype, or autocast's.
    """

    def __init__(self, base: Linear, r, alpha, dropout=0.0, scaling=None, generator=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight.requires_grad_(False)
        self.bias = base.bias.requires_grad_(False) if base.bias is not None else None
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev))
        if dev.type != "meta":  # PEFT's init: nn.Linear's default for A, zeros for B
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.scaling = alpha / r if scaling is None else scaling
        self.enabled = True

    def forward(self, x):
        y = super().forward(x)
        if not self.enabled:
            return y
        dt = x.dtype if not torch.is_autocast_enabled(x.device.type) else torch.get_autocast_dtype(x.device.type)
        # no dropout call at p = 0: CUDA's fused dropout would still write a copy of x and a mask
        xd = F.dropout(x, self.dropout, True) if self.dropout and self.training else x
        h = F.linear(xd, self.lora_A.to(dt))
        return y + F.linear(h, self.lora_B.to(dt)) * self.scaling

    def delta(self):
        """(alpha / r) B A in fp32: the merged weight is W + delta."""
        A, B = (_full(p).float() for p in (self.lora_A, self.lora_B))
        return (B @ A) * self.scaling

    def extra_repr(self):
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, dropout={self.dropout}"


def _full(t):
    """A whole tensor from an FSDP2 shard (a collective: every rank must call it), else t itself."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def parse_targets(targets):
    """'all-linear' or a comma list (or list) of projection names -> a tuple; never the LM head or embeddings."""
    names = TARGETS if targets in (None, "all-linear") else \
        tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip())
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise UserError(f"--lora-targets: {', '.join(bad) or 'nothing'} is not a projection LoRA can adapt; use "
                        f"'all-linear' or a comma list of {', '.join(TARGETS)} (never lm_head or the embeddings)")
    return names


def lora_modules(model):
    """(name, LoRALinear) pairs, names as in our state dict (`layers.0.self_attn.q_proj`)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def has_lora(model):
    return any(isinstance(m, LoRALinear) for m in model.modules())


def add_lora(model, r, alpha=32.0, targets="all-linear", dropout=0.0, seed=0, use_rslora=False):
    """Freeze every parameter of `model` and put a LoRA pair on each targeted projection (in place).

    The A matrices come from a generator seeded with `seed`, so every rank starts from the same adapters.
    """
    if r < 1:
        raise UserError(f"--lora-rank {r} must be >= 1 (0 means full fine-tuning)")
    if not 0 <= dropout < 1:
        raise UserError(f"--lora-dropout {dropout} must be in [0, 1)")
    names = parse_targets(targets)
    model.requires_grad_(False)
    g = torch.Generator(device=model.device if model.device.type != "meta" else "cpu").manual_seed(seed)
    scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in names:
                if hasattr(parent, name):
                    setattr(parent, name, LoRALinear(getattr(parent, name), r, alpha, dropout, scaling, g))
    model.lora_config = dict(r=r, lora_alpha=alpha, target_modules=list(names), lora_dropout=dropout,
                             use_rslora=use_rslora)
    return model


@contextlib.contextmanager
def disabled(model):
    """The base model: the adapters switched off inside the block (the reference policy). No-op without LoRA."""
    mods = [m for _, m in lora_modules(model)]
    saved = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, s in zip(mods, saved):
            m.enabled = s


@torch.no_grad()
def merged_items(model):
    """(name, tensor) of the model's state dict with every adapter merged, W + (alpha / r) B A (in fp32, then
    cast to W's dtype), and no lora_* keys: the weights of a plain Transformer. One merged tensor at a time, so
    refreshing a sampler copy of a 7B model needs one layer's weight of extra memory, not a model's. Without
    LoRA, the state dict's own items. Under FSDP2 the merged weights are gathered (every rank must iterate)."""
    mods = dict(lora_modules(model))
    for k, v in model.state_dict().items():
        prefix, _, leaf = k.rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            continue
        if leaf == "weight" and prefix in mods:
            W = _full(v)
            v = (W.float() + mods[prefix].delta()).to(W.dtype)
        yield k, v


def merged_state_dict(model):
    """merged_items as a dict (every merged weight at once: for saving a model, not for each step)."""
    return dict(merged_items(model))


def merge(model):
    """Replace each LoRALinear by a plain Linear holding the merged weight (in place); returns the model."""
    for name, m in lora_modules(model):
        parent_name, _, leaf = name.rpartition(".")
        lin = Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        with torch.no_grad():
            lin.weight = nn.Parameter((m.weight.float() + m.delta()).to(m.weight.dtype), requires_grad=False)
            lin.bias = m.bias
        setattr(model.get_submodule(parent_name), leaf, lin)
    model.__dict__.pop("lora_config", None)
    return model


def trainable_state(state, model):
    """Only the entries of a (policy) state dict that are trained: the adapters (and a value head)."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in keep}


# -----------------------------------------------------------------------------
# PEFT files


def adapter_tensors(state, strip=""):
    """{PEFT key: fp32 tensor} of the adapters in a state dict (a model's, or a policy's with strip="model.").
    FSDP2 shards are gathered: every rank must call it then."""
    out = {}
    for k, v in state.items():
        if k.endswith((".lora_A", ".lora_B")):
            out[PREFIX + k.removeprefix(strip) + ".weight"] = _full(v).float().contiguous().cpu()
    return out


def remove_adapter(path):
    """Delete an adapter's files from `path` (a full-fine-tuning run reusing a LoRA run's directory)."""
    for name in (CONFIG, WEIGHTS):
        if os.path.isfile(os.path.join(path, name)):
            os.remove(os.path.join(path, name))


def save_adapter(path, tensors, lora_config, base_path, tokenizer=None):
    """Write adapter_config.json + adapter_model.safetensors (each file atomically) into `path`.

    base_path: an HF directory transformers loads (peft's AutoPeftModelForCausalLM reads the base from it).
    """
    from safetensors.torch import save_file

    from nanorl.checkpoint import atomic_files

    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": os.path.abspath(base_path),
           "r": lora_config["r"], "lora_alpha": lora_config["lora_alpha"],
           "target_modules": lora_config["target_modules"], "lora_dropout": lora_config["lora_dropout"],
           "use_rslora": lora_config.get("use_rslora", False), "bias": "none", "fan_in_fan_out": False,
           "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True}
    with atomic_files(path) as tmp:
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(cfg, f, indent=2)
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)


def is_adapter_dir(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def read_adapter_config(path):
    cfg_path = os.path.join(path, CONFIG)
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{cfg_path}: unreadable PEFT adapter config ({e}); pass a directory saved by peft or nanorl") from None
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("modules_to_save") or \
            cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("bias", "none") != "none":
        raise UserError(f"{cfg_path}: nanorl reads plain LoRA adapters only (peft_type LORA, no DoRA, bias none, "
                        f"no modules_to_save / rank_pattern / alpha_pattern)")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":  # peft also allows a regex; we need names
        raise UserError(f"{cfg_path}: target_modules {targets!r} is a pattern; nanorl needs a list of projection names")
    return cfg


def base_of(path):
    """The base model directory an adapter names (an absolute path, or relative to the adapter)."""
    base = read_adapter_config(path).get("base_model_name_or_path")
    for cand in (base, os.path.join(path, base or "")) if base else ():
        if os.path.exists(cand):
            return cand
    if base in ("tiny", "smollm2-135m"):
        return base
    raise UserError(f"{os.path.join(path, CONFIG)}: base_model_name_or_path {base!r} does not exist here; "
                    f"edit it to the base model's HF directory")


def load_adapter(model, path, seed=0):
    """Put the PEFT adapter in `path` onto `model` (its base): every key must be present with the right shape."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(path)
    add_lora(model, int(cfg["r"]), float(cfg["lora_alpha"]), cfg.get("target_modules") or "all-linear",
             float(cfg.get("lora_dropout") or 0.0), seed, bool(cfg.get("use_rslora")))
    wpath = os.path.join(path, WEIGHTS)
    if not os.path.isfile(wpath):
        raise UserError(f"{path}: no {WEIGHTS}; nanorl reads safetensors adapters (save with safe_serialization=True)")
    # peft strips the adapter name on save; a hand-made file may still carry ".default"
    tensors = {k.replace(".default.", "."): v for k, v in load_file(wpath).items()}
    expected = adapter_tensors(model.state_dict())
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise UserError(f"{wpath}: unexpected key {extra[0]!r}; the adapter was made for another architecture")
    with torch.no_grad():
        for name, m in lora_modules(model):
            for leaf in ("lora_A", "lora_B"):
                key = f"{PREFIX}{name}.{leaf}.weight"
                if key not in tensors:
                    raise UserError(f"{wpath}: missing {key!r}; the adapter does not match this base model")
                p = getattr(m, leaf)
                if tuple(tensors[key].shape) != tuple(p.shape):
                    raise UserError(f"{wpath}: {key!r} has shape {tuple(tensors[key].shape)}, expected "
                                    f"{tuple(p.shape)}; the adapter does not match this base model")
                p.copy_(tensors[key])
    return model
