"""
model.py: the whole GPT in one file.

One decoder-only transformer that covers two families through its config:
  GPT-2 style:  LayerNorm, GELU MLP, learned position embeddings, biases, tied head
  Llama style:  RMSNorm, SwiGLU MLP, rotary position embeddings (RoPE), grouped-query
                attention (GQA), no biases, tied or untied head
plus a preallocated KV cache and the one decoding loop (GPT.generate_stream, which sample.py
and train.py build on), the FLOP and MFU accounting that train.py and bench.py report, and
import/export of Hugging Face checkpoints (GPT2LMHeadModel, LlamaForCausalLM) plus export of
one GGUF file for llama.cpp, so weights come in from and go out to the wider ecosystem.

Run:
  python model.py                  # sizing table: parameters and FLOPs/token of every preset
  python -c "import model; m = model.GPT(model.GPTConfig(**model.PRESETS['cpu-1m']))"

Use:
  from model import GPTConfig, GPT, PRESETS, KVCache, sample_logits, peak_flops
  model = GPT(GPTConfig(**PRESETS["gpt2"]))
  logits, loss = model(idx, targets)                    # idx, targets: (B, T) LongTensor
  out = model.generate(idx, max_new_tokens=50, temperature=0.8, top_k=50)
  for column in model.generate_stream(idx, 50, temperature=0):  # (B, 1) ids, step by step
      print(column[:, 0].tolist())
  model = GPT.from_pretrained("path/to/hf_dir"); model.save_hf("out/hf")
  model.save_gguf("out/model.gguf", vocab, "f16")  # vocab: see save_gguf; llama-cli -m it

Shapes, in every comment: B batch, T time (tokens), C channels (n_embd), nh query heads,
nkv key/value heads, hs head size (C // nh), V vocabulary; S = start_pos + T is the number
of keys a query can see once a KV cache holds earlier positions.

Imports only torch (safetensors lazily, when a checkpoint uses it; gguf, llama.cpp's own
writer, lazily in save_gguf), so it can be copied alone into another project.

Sources (facts and formulas, not code):
  GPT-2: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"
  Attention: Vaswani et al. 2017, "Attention Is All You Need"
  RoPE: Su et al. 2021, "RoFormer" (rotate-half layout as in Hugging Face's Llama)
  RMSNorm: Zhang & Sennrich 2019; SwiGLU: Shazeer 2020, "GLU Variants Improve Transformer"
  GQA: Ainslie et al. 2023; MQA: Shazeer 2019, "Fast Transformer Decoding"
  Llama: Touvron et al. 2023; FLOPs: PaLM (Chowdhery et al. 2022) appendix B
  Sampling: Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration" (top-p)
  nanoGPT and llm.c (Karpathy) for the GPT-2 layout and parameter names;
  gpt-fast (PyTorch) for the KV-cache shape, prefill + decode steps and meta-device loading;
  llama.cpp's convert_hf_to_gguf.py and loader (src/models/*.cpp) for the GGUF names, keys,
  dtypes and the q/k row order its RoPE expects.
"""

import json
import math
import os
import pickle
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# SDPA learned to broadcast key/value heads itself (enable_gqa=True) in torch 2.5.
_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
_SDPA_HAS_GQA = _TORCH_VERSION >= (2, 5)

# ----------------------------------------------------------------------------------------
# Configuration

# the keys of a Llama 3.1 "llama3" rope_scaling block in config.json (used by rope_tables)
_LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings")


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # ids 0..V-1; 50257 for GPT-2, padded to a multiple of 64 for speed
    block_size: int = 1024  # longest context in tokens (size of wpe / of the RoPE tables)
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # query heads; head size hs = n_embd // n_head
    n_kv_head: int = 0  # key/value heads; 0 means n_head (plain multi-head), 1 is multi-query
    n_embd: int = 768  # residual stream width C
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama)
    mlp: str = "gelu"  # "gelu": C -> 4C -> C; "swiglu": C -> mlp_hidden (x2, gate and up) -> C
    mlp_hidden: int = 0  # MLP hidden size; 0 means the rule in mlp_hidden_size()
    pos: str = "learned"  # "learned" absolute embeddings (GPT-2) or "rope" rotary (Llama)
    rope_theta: float = 10000.0  # RoPE base; Llama 3 uses 500000
    rope_scaling: dict | None = None  # Llama 3.1+ "llama3" RoPE scaling: {factor,
    #   low_freq_factor, high_freq_factor, original_max_position_embeddings}, as in its
    #   config.json; None = plain RoPE
    bias: bool = True  # biases in linears and LayerNorms (GPT-2: True; Llama: False)
    dropout: float = 0.0  # dropout on embeddings, attention probabilities and residual branches
    tie_embeddings: bool = True  # lm_head shares its weight with the token embedding wte
    norm_eps: float = 1e-5  # epsilon in LayerNorm / RMSNorm

    def __post_init__(self):
        # Every problem is collected and reported in one sentence: a bad config should fail
        # here, naming its fields, not later as a shape mismatch deep inside forward.
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head  # resolved here so asdict() round-trips
        problems = []
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            problems.append(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.mlp not in ("gelu", "swiglu"):
            problems.append(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.pos not in ("learned", "rope"):
            problems.append(f"pos must be 'learned' or 'rope', got {self.pos!r}")
        # the divisibility checks need the sizes above to be valid integers first
        if not problems and self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not problems and self.n_head % self.n_kv_head:  # each kv head serves nh/nkv queries
            problems.append(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        if not problems and self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            # RoPE rotates pairs of dimensions (i, i + hs/2), so hs must split into two halves
            problems.append("RoPE needs an even head size, got n_embd/n_head="
                            f"{self.n_embd // self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_scaling is not None and set(self.rope_scaling) != set(_LLAMA3_SCALING_KEYS):
            problems.append("rope_scaling needs exactly the keys "
                            f"{', '.join(_LLAMA3_SCALING_KEYS)}")
        if self.mlp_hidden < 0 or self.rope_theta <= 0 or self.norm_eps <= 0:
            problems.append("mlp_hidden must be >= 0 and rope_theta, norm_eps must be > 0")
        if problems:
            raise ValueError(f"invalid GPTConfig: {'; '.join(problems)}; fix these fields.")


def mlp_hidden_size(cfg: GPTConfig) -> int:
    """GELU: 4C (GPT-2). SwiGLU: 8C/3 rounded up to a multiple of 64, so its three matrices
    hold the same 8C^2 parameters as GELU's two (Shazeer 2020; Llama rounds to 256).
    Example: C=768 -> gelu 3072, swiglu 2048."""
    if cfg.mlp_hidden:
        return cfg.mlp_hidden
    if cfg.mlp == "gelu":
        return 4 * cfg.n_embd
    return 64 * math.ceil(8 * cfg.n_embd / 3 / 64)


_GPT2 = dict(vocab_size=50257, block_size=1024, norm="layernorm", mlp="gelu", pos="learned",
             bias=True, tie_embeddings=True, norm_eps=1e-5)
_LLAMA = dict(vocab_size=50304, block_size=2048, norm="rmsnorm", mlp="swiglu", pos="rope",
              bias=False, tie_embeddings=False, norm_eps=1e-5, rope_theta=10000.0)
PRESETS = {  # name -> GPTConfig kwargs; `python model.py` prints their sizes
    # GPT-2 family (Radford et al. 2019); gpt2 is the 124M model, exactly 124,439,808 parameters
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),
    # a small modern Llama-style family: RMSNorm, SwiGLU, RoPE, GQA with 4 query heads per kv head
    "llama-small": dict(_LLAMA, n_layer=12, n_head=12, n_kv_head=4, n_embd=768),
    "llama-medium": dict(_LLAMA, n_layer=24, n_head=16, n_kv_head=4, n_embd=1024),
    "llama-large": dict(_LLAMA, n_layer=24, n_head=16, n_kv_head=4, n_embd=2048),
    # tiny CPU presets (Llama style, tied head); train.py replaces vocab_size with the tokenizer's
    "cpu-1m": dict(_LLAMA, vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_kv_head=2,
                   n_embd=128, tie_embeddings=True),
    "cpu-10m": dict(_LLAMA, vocab_size=4096, block_size=256, n_layer=6, n_head=6, n_kv_head=2,
                    n_embd=384, tie_embeddings=True),
}

# ----------------------------------------------------------------------------------------
# Building blocks: norms, rotary embeddings, attention, MLP


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019): LayerNorm without the
    mean subtraction and bias. Computed in fp32 and cast back, as Hugging Face's Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # a gain per channel, starting at identity

    def forward(self, x):
        # subtle: a mean of C squares in bf16 loses most of its precision; fp32 avoids that,
        # and the same round trip as Hugging Face's LlamaRMSNorm keeps our outputs equal to its
        xf = x.float()  # (B, T, C) in fp32
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)  # (B, T, C)
        return self.weight * xf.to(x.dtype)  # (B, T, C), back in the input's dtype


def make_norm(cfg: GPTConfig) -> nn.Module:
    """The config's norm over C channels: RMSNorm (Llama), or LayerNorm (GPT-2), biased or not."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(block_size: int, head_size: int, theta: float, scaling: dict | None = None,
                device=None):
    """cos, sin tables of shape (block_size, hs) for RoPE (Su et al. 2021, eq. 34).
    Pair i of a head rotates at frequency theta^(-2i/hs); Hugging Face's Llama pairs
    dimension i with i + hs/2 (the "rotate half" layout), so we repeat the frequencies."""
    # RoFormer eq. 15: theta_i = base^(-2i/d), one frequency per pair of dimensions
    dims = torch.arange(0, head_size, 2, device=device, dtype=torch.float32)  # (hs/2,)
    inv_freq = 1.0 / theta ** (dims / head_size)  # (hs/2,)
    if scaling:  # Llama 3.1: waves longer than the original context slow down by `factor`,
        # waves shorter than original/high_freq_factor stay, and those between blend linearly
        old = scaling["original_max_position_embeddings"]
        lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq  # (hs/2,) tokens per full turn of each pair
        keep = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)  # 1: unchanged, 0: divided by factor
        inv_freq = (1 - keep) * inv_freq / scaling["factor"] + keep * inv_freq
    # the angle of pair i at position m is m * theta_i, in fp32: angles reach block_size
    # radians, where bf16's coarse steps would give neighbouring positions the same angle
    angles = torch.outer(torch.arange(block_size, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (block_size, hs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i+hs/2}) pair of x (B, nh or nkv, T, hs) by its position's angle;
    cos, sin are (T, hs) or (B, 1, T, hs) when every row has its own positions."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, nh, T, hs)
    # RoFormer eq. 34, rotate-half form: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
    return x * cos + rotated * sin  # (B, nh, T, hs)


class CausalSelfAttention(nn.Module):
    """Multi-head attention with nh query heads sharing nkv key/value heads (GQA; nkv == nh
    is plain multi-head, nkv == 1 multi-query). One fused projection c_attn makes q, k, v."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_size = cfg.n_embd // cfg.n_head
        # one matmul for q, k and v together keeps the GPU busier than three smaller ones
        qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * self.head_size  # q, then k, then v
        self.c_attn = nn.Linear(cfg.n_embd, qkv_out, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)  # residual projection
        self.dropout = cfg.dropout  # a probability: SDPA drops attention weights itself
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.manual = False  # True: the explicit softmax(QK^T/sqrt(hs))V below, for teaching

    def forward(self, x, cos=None, sin=None, kv_cache=None, layer=0, start_pos=0, mask=None):
        B, T, C = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_size
        qkv = self.c_attn(x)  # (B, T, (nh + 2 * nkv) * hs)
        q, k, v = qkv.split([nh * hs, nkv * hs, nkv * hs], dim=-1)  # (B, T, nh*hs), (B, T, nkv*hs)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if cos is not None:  # RoPE rotates queries and keys, never values
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # shapes unchanged
        if kv_cache is not None:  # append this chunk, attend over everything cached so far
            k, v = kv_cache.update(layer, start_pos, k, v)  # (B, nkv, S, hs), S = start_pos + T
        S = k.size(2)
        # subtle: F.dropout and SDPA's dropout_p ignore self.training; eval must pass p=0 itself
        drop = self.dropout if self.training else 0.0
        if self.manual:
            # subtle: the slow path materializes the repeated heads: query head j reads
            # kv head j // (nh/nkv), which is what repeat_interleave lays out
            k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, hs)
            v = v.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, hs)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, S), Vaswani et al. eq. 1
            if mask is None:  # query i sits at absolute position S - T + i and sees keys up to it
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            att = att.masked_fill(~mask, float("-inf"))  # (B, nh, T, S)
            att = F.dropout(F.softmax(att, dim=-1), p=drop)  # (B, nh, T, S), rows sum to 1
            y = att @ v  # (B, nh, T, hs)
        else:
            # Flash / memory-efficient kernels where available. Without a mask the only cases
            # are a full causal square (T == S) and a single decoding query that sees all keys.
            kwargs = {}
            if nkv != nh:
                if _SDPA_HAS_GQA:
                    kwargs["enable_gqa"] = True  # broadcast kv heads inside the kernel
                else:
                    k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, hs)
                    v = v.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, hs)
            # subtle: is_causal aligns its triangle to the top left, so it is right only for
            # T == S; one query (T == 1) must see every key, hence is_causal=False there
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop,
                                               is_causal=mask is None and T > 1, **kwargs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    """GELU (GPT-2): c_proj(gelu(c_fc(x))). SwiGLU (Llama): c_proj(silu(c_gate(x)) * c_fc(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = mlp_hidden_size(cfg)
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)  # "up" projection
        self.c_gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias) if cfg.mlp == "swiglu" else None
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)  # "down", a residual projection
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.c_gate is None:
            h = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, 4C); GPT-2 used the tanh form
        else:  # Shazeer 2020's FFN_SwiGLU: a silu gate scales the up projection elementwise
            h = F.silu(self.c_gate(x)) * self.c_fc(x)  # (B, T, hidden)
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block (GPT-2 section 2.3): x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos=None, sin=None, kv_cache=None, layer=0, start_pos=0, mask=None):
        # pre-norm (Xiong et al. 2020): the residual stream itself is never normalized, so
        # gradients reach the embeddings through a plain sum and deep stacks train stably
        x = x + self.attn(self.ln_1(x), cos, sin, kv_cache, layer, start_pos, mask)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class KVCache:
    """Preallocated keys and values of every layer, (n_layer, B, nkv, max_len, hs) each, so
    decoding a token costs O(T) attention instead of recomputing the whole prefix."""

    def __init__(self, n_layer, batch_size, n_kv_head, max_len, head_size, device=None,
                 dtype=None):
        # allocated once at full length (gpt-fast): no torch.cat that copies the cache per step
        shape = (n_layer, batch_size, n_kv_head, max_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def update(self, layer: int, start_pos: int, k, v):
        """Write k, v (B, nkv, T, hs) at positions start_pos..start_pos+T-1; return the
        keys and values of positions 0..start_pos+T-1, (B, nkv, start_pos + T, hs)."""
        end = start_pos + k.size(2)
        # past max_len the write below would fail with a bare shape error; say what to do instead
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions but {end} were asked for; "
                             "allocate a longer cache with model.new_kv_cache(batch_size, "
                             "max_len).")
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        # views, not copies: attention reads the first `end` positions in place
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# ----------------------------------------------------------------------------------------
# Sampling: from the last position's logits to the next token


def check_sampling_args(temperature: float, top_k=None, top_p=None) -> None:
    """The one rule for the sampling settings, shared by sample_logits, GPT.generate_stream
    and sample.py's command line: temperature >= 0 (0 = greedy), top_k >= 0 (0 or None =
    off), 0 < top_p <= 1 (None or 1 = off). Out of range: ValueError, one sentence with the fix."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is negative; use 0 for greedy decoding or "
                         "a value > 0 to sample")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} is negative; use 0 to disable top-k or a positive count")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is outside (0, 1]; use e.g. 0.9, or 1.0 to disable "
                         "nucleus sampling")


def sample_logits(logits, temperature: float = 1.0, top_k=None, top_p=None, generator=None):
    """Draw one id per row from logits (B, V) -> LongTensor (B, 1).
    temperature 0 is greedy (argmax); otherwise softmax(logits / temperature), restricted to
    the top_k most likely ids and then to the smallest set whose probability reaches top_p
    (nucleus sampling, Holtzman et al. 2019). Example: probs [.5, .3, .15, .05], top_p=0.8
    keeps ids 0 and 1 and samples them with probabilities .625 and .375."""
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:  # greedy: argmax draws no random number, so generator stays untouched
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    # fp32 even for a bf16 model: top-p's running sum over V probabilities needs the precision
    logits = logits.float() / temperature  # (B, V); below 1 sharper, above 1 flatter
    if top_k and top_k < logits.size(-1):  # 0 or None: off; k >= V would keep every id anyway
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest
        # subtle: ids tied with the k-th value all stay, so a row may keep more than k
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (B, V)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = F.softmax(sorted_logits, dim=-1)  # (B, V), most likely first
        # drop an id when the ids ranked above it already reach top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # (B, V) bool
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        # scatter the kept logits back from rank order to id order
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)  # (B, V); -inf ids get probability exactly 0
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


# ----------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    """Token ids (B, T) -> embeddings -> n_layer Blocks -> final norm -> logits (B, T, V)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = cfg = config
        # subtle: _weight=empty skips nn.Embedding's own normal_ init; _init_weights below does it,
        # and on the meta device (from_pretrained) normal_ would first import torch._dynamo (slow).
        emb = lambda n: nn.Embedding(n, cfg.n_embd, _weight=torch.empty(n, cfg.n_embd))
        self.transformer = nn.ModuleDict(dict(
            wte=emb(cfg.vocab_size),  # token embeddings
            wpe=emb(cfg.block_size) if cfg.pos == "learned" else None,  # learned positions
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=make_norm(cfg),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # C -> V next-token scores
        if cfg.tie_embeddings:  # Press & Wolf 2017; GPT-2 ties, Llama 2/3 do not
            self.lm_head.weight = self.transformer.wte.weight
        self._set_rope_tables()  # buffers, so model.to(device) moves them with the weights
        # True: keep only block inputs, redo each block's forward in backward (memory for time)
        self.grad_checkpoint = False
        if self.lm_head.weight.is_meta:
            return  # shapes only (from_pretrained, sizing): the weights come from elsewhere
        self.apply(self._init_weights)
        # GPT-2 section 2.3: scale the init of residual projections by 1/sqrt(N), N = 2 * n_layer
        # residual branches (one attention, one MLP per block), so the stream's variance stays ~1.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        """N(0, 0.02) for every matrix and embedding, zero biases (GPT-2's init, as in nanoGPT)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)  # GPT-2's initializer_range
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _set_rope_tables(self, device=None):
        # Non-persistent buffers: derived from the config, so not in state_dict / checkpoints.
        cos = sin = None
        if self.config.pos == "rope":
            hs = self.config.n_embd // self.config.n_head
            cos, sin = rope_tables(self.config.block_size, hs, self.config.rope_theta,
                                   self.config.rope_scaling, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs) or None
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def manual_attention(self) -> bool:
        """True routes every layer through the explicit softmax(QK^T/sqrt(hs))V path."""
        return self.transformer.h[0].attn.manual

    @manual_attention.setter
    def manual_attention(self, value: bool):
        for block in self.transformer.h:
            block.attn.manual = bool(value)

    def forward(self, idx, targets=None, kv_cache=None, start_pos: int = 0, left_pad=None,
                segments=None):
        """idx (B, T) token ids at positions start_pos..start_pos+T-1.
        targets (B, T): returns logits (B, T, V) and the mean cross-entropy over targets != -100
        (finetune.py masks prompts with -100); without targets: logits (B, 1, V) of the last
        position only, and loss None. kv_cache, left_pad, segments: see hidden_states."""
        x = self.hidden_states(idx, kv_cache, start_pos, left_pad, segments)  # (B, T, C)
        if targets is None:
            # (B, 1, V): generation needs only the last position; the list [-1] keeps the T axis
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)  # (B, T, V)
        # subtle: sum / count instead of reduction="mean", so a batch whose targets are all -100
        # gives loss 0 (and zero gradients) rather than NaN.
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-100, reduction="sum")  # (B*T, V) vs (B*T,)
        return logits, loss / (targets != -100).sum().clamp(min=1)

    def hidden_states(self, idx, kv_cache=None, start_pos: int = 0, left_pad=None,
                      segments=None):
        """The trunk: embeddings, every block, the final norm; (B, T) ids -> (B, T, C), what
        lm_head (or finetune.py's classification head) reads.
        kv_cache: a KVCache that receives this chunk's keys and values. left_pad (B,): rows are
        left-padded by this many tokens; the pads are never attended to and real tokens are
        numbered from 0 (used by generate). segments (B, T): packed rows, several examples
        side by side; equal ids mark one example (contiguous), a token attends only inside its
        own example and positions restart at 0 at each example's start, so every example is
        computed exactly as it would be alone (finetune.py --pack).
        Example: segments [[0, 0, 0, 1, 1]] -> positions [0, 1, 2, 0, 1]; token 3 sees only 3."""
        B, T = idx.shape
        cfg = self.config
        if start_pos + T > cfg.block_size:  # wpe and the RoPE tables end at block_size
            raise ValueError(f"sequence of {start_pos + T} tokens is longer than block_size="
                             f"{cfg.block_size}; crop the input or use a config with a larger "
                             "block_size.")
        if segments is not None and (left_pad is not None or kv_cache is not None or start_pos):
            raise ValueError("segments (packed rows) are for training and scoring whole rows; "
                             "they cannot be combined with left_pad, a kv_cache or start_pos")
        positions = torch.arange(start_pos, start_pos + T, device=idx.device)  # (T,)
        if left_pad is not None:  # row b's first real token is position 0; its pads clamp to 0
            positions = (positions[None, :] - left_pad[:, None]).clamp(min=0)  # (B, T)
        if segments is not None:  # each example counts from 0 again
            positions = self._segment_positions(segments)  # (B, T)
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.transformer.wpe is not None:
            x = x + self.transformer.wpe(positions)  # (B, T, C), broadcasts over B if (T,)
        x = self.transformer.drop(x)  # (B, T, C)
        cos = sin = None
        if self.rope_cos is not None and positions.dim() == 1:
            cos = self.rope_cos[start_pos:start_pos + T]  # (T, hs)
            sin = self.rope_sin[start_pos:start_pos + T]  # (T, hs)
        elif self.rope_cos is not None:  # every row has its own positions
            cos = self.rope_cos[positions].unsqueeze(1)  # (B, 1, T, hs)
            sin = self.rope_sin[positions].unsqueeze(1)  # (B, 1, T, hs)
        mask = self._attention_mask(T, start_pos, left_pad, idx.device)  # None or (B|1, 1, T, S)
        if segments is not None:  # causal, and inside one example only
            same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
            mask = same[:, None] & torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
        # checkpointing saves memory only when backward will run, and a cache is for inference
        use_ckpt = (self.grad_checkpoint and self.training and torch.is_grad_enabled()
                    and kv_cache is None)
        for layer, block in enumerate(self.transformer.h):
            if use_ckpt:  # keep only block inputs; recompute the inside during backward
                x = checkpoint(block, x, cos, sin, None, layer, start_pos, mask,
                               use_reentrant=False)  # (B, T, C)
            else:
                x = block(x, cos, sin, kv_cache, layer, start_pos, mask)  # (B, T, C)
        return self.transformer.ln_f(x)  # (B, T, C)

    @staticmethod
    def _segment_positions(segments):
        """(B, T) example ids of packed rows -> each token's position inside its example."""
        T = segments.size(1)
        idx = torch.arange(T, device=segments.device).expand_as(segments)  # (B, T)
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]  # an example begins here
        # the latest start at or before each column: a running maximum of the start columns
        first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, T)
        return idx - first  # (B, T)

    @staticmethod
    def _attention_mask(T, start_pos, left_pad, device):
        """None where SDPA's own is_causal is right (a full square from position 0, or one
        query), else a boolean (B or 1, 1, T, S) mask, True where a query may attend."""
        S = start_pos + T
        # None lets SDPA choose its fastest kernel: flash attention takes no explicit mask
        if left_pad is None and (start_pos == 0 or T == 1):
            return None
        q_pos = torch.arange(start_pos, S, device=device)[:, None]  # (T, 1) absolute columns
        k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        mask = k_pos <= q_pos  # (T, S) causal
        if left_pad is not None:
            real = k_pos >= left_pad[:, None, None]  # (B, 1, S): pad columns are never keys
            # subtle: a pad query would see no key at all and softmax would give NaN; let it
            # see itself. Its output is garbage that no real token ever reads.
            mask = (mask & real) | (k_pos == q_pos)  # (B, T, S)
            return mask[:, None]  # (B, 1, T, S)
        return mask[None, None]  # (1, 1, T, S)

    def new_kv_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        """An empty KVCache for this model, on its device and (unless dtype is given) dtype."""
        p = self.lm_head.weight
        hs = self.config.n_embd // self.config.n_head
        return KVCache(self.config.n_layer, batch_size, self.config.n_kv_head, max_len, hs,
                       device=p.device, dtype=dtype or p.dtype)

    # ------------------------------------------------------------------------------------
    # Generation: prefill the prompt once, then one token per forward pass

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None,
                        top_p=None, eos_id=None, use_cache: bool = True, generator=None,
                        vocab_limit=None, prompt_lens=None, logits_hook=None, decode_fn=None):
        """Yield the next token of every row, a (B, 1) LongTensor per step, up to max_new_tokens.

        idx (B, T) holds the prompts. temperature, top_k, top_p: as in sample_logits, checked
        by check_sampling_args; generator: a seeded torch.Generator makes the draws repeat.
        eos_id (int or list): a row that samples one has finished and repeats that id in its
        later columns; the stream ends early once every row has finished.
        vocab_limit: ids >= vocab_limit are never sampled. prompt_lens (B,): rows are
        LEFT-padded prompts of these lengths; each row yields what it would alone.
        logits_hook(logits (B, V), idx so far (B, T + steps)) -> logits: extra filters, applied
        after the vocabulary mask and before sampling (sample.py's repetition penalty, min-p).
        With use_cache, when the whole output fits in block_size, the prompt is prefilled into
        a KV cache and then one token is fed per step (through decode_fn if given, e.g. a
        torch.compile'd forward); otherwise (or use_cache=False) each step reruns the last
        block_size tokens (a sliding window). Dropout is off while the stream runs; the
        model's train/eval mode comes back when it ends or is closed."""
        check_sampling_args(temperature, top_k, top_p)  # once, before any forward pass
        B, T = idx.shape
        left_pad = self._left_pad(prompt_lens, B, T, idx.device)  # (B,) or None
        eos = None
        if eos_id is not None:
            eos = torch.as_tensor([eos_id] if isinstance(eos_id, int) else list(eos_id),
                                  dtype=torch.long, device=idx.device)
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)  # (B,)
        # the cache is preallocated for the whole output; past block_size the oldest tokens
        # must leave the window, and the cached keys of the others would then sit at wrong
        # positions, so that case recomputes every step instead
        cache = None
        if use_cache and T + max_new_tokens <= self.config.block_size:
            cache = self.new_kv_cache(B, T + max_new_tokens)
        # only one-token steps may go through decode_fn: the prefill's length changes with every
        # prompt, and a compiled forward would recompile for new lengths
        decode = decode_fn or self.forward
        was_training = self.training
        self.eval()  # no dropout while sampling
        try:
            nxt = None  # the newest column, (B, 1); None until the prefill has run
            for _ in range(max_new_tokens):
                if cache is None:  # the last block_size tokens again: O(T) work per token
                    crop = max(0, idx.size(1) - self.config.block_size)
                    pad = None if left_pad is None else (left_pad - crop).clamp(min=0)  # (B,)
                    logits, _ = self(idx[:, crop:], left_pad=pad)  # (B, 1, V)
                elif nxt is None:  # prefill: all T prompt positions in one pass, into the cache
                    logits, _ = self(idx, kv_cache=cache, start_pos=0, left_pad=left_pad)
                else:  # decode one token: only the newest column, at its absolute position
                    logits, _ = decode(nxt, kv_cache=cache, start_pos=idx.size(1) - 1,
                                       left_pad=left_pad)  # (B, 1, V)
                logits = logits[:, -1, :].float()  # (B, V)
                if vocab_limit is not None:  # train.py pads V to a multiple of 64; never emit those
                    logits[:, vocab_limit:] = float("-inf")
                if logits_hook is not None:
                    logits = logits_hook(logits, idx)  # (B, V)
                nxt = sample_logits(logits, temperature, top_k, top_p, generator)  # (B, 1)
                if eos is not None:  # a finished row repeats its eos, so columns stay aligned
                    nxt = torch.where(finished[:, None], idx[:, -1:], nxt)  # (B, 1)
                    finished |= torch.isin(nxt[:, 0], eos)  # (B,)
                idx = torch.cat([idx, nxt], dim=1)  # (B, T + steps so far)
                yield nxt
                if eos is not None and bool(finished.all()):  # bool() waits for the device
                    return
        finally:
            self.train(was_training)

    @staticmethod
    def _left_pad(prompt_lens, B: int, T: int, device):
        """prompt_lens (B,) of a LEFT-padded (B, T) batch -> pad tokens per row, (B,), as
        forward(left_pad=...) takes them; None stays None."""
        if prompt_lens is None:
            return None
        lens = torch.as_tensor(prompt_lens, dtype=torch.long, device=device).view(-1)  # (B,)
        if lens.numel() != B or bool((lens < 1).any()) or bool((lens > T).any()):
            raise ValueError(f"prompt_lens must hold {B} lengths between 1 and {T} (the padded "
                             f"prompt width); got {lens.tolist()}.")
        return T - lens  # (B,)

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None,
                 top_p=None, eos_id=None, use_cache: bool = True, generator=None,
                 vocab_limit=None, prompt_lens=None, logits_hook=None):
        """Continue idx (B, T) by up to max_new_tokens tokens; returns (B, T + new): the
        prompts followed by every column of generate_stream (same arguments), collected.
        Fewer than max_new_tokens columns come back only when every row hit an eos_id."""
        columns = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p,
                                            eos_id, use_cache, generator, vocab_limit,
                                            prompt_lens, logits_hook))
        return torch.cat([idx, *columns], dim=1)  # (B, T + new)

    # ------------------------------------------------------------------------------------
    # Accounting: parameters, FLOPs, MFU, optimizer groups

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count, each shared tensor once. non_embedding=True leaves out the lookup
        tables that do no matmul: wpe, and wte when untied (a tied wte is counted once, as the
        lm_head matrix). That is the N in the 6N FLOPs rule. gpt2: 124,439,808 with everything,
        123,653,376 without wpe."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if non_embedding:
            if self.transformer.wpe is not None:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token for a full block_size context (PaLM appendix B):
        6N (forward 2N + backward 4N, N the non-embedding parameters) plus attention's
        QK^T and AV matmuls, 12 * n_layer * n_head * hs * T. Causal masking would skip about half
        of that, but like PaLM we count it all."""
        cfg = self.config
        hs = cfg.n_embd // cfg.n_head
        attention = 12 * cfg.n_layer * cfg.n_head * hs * cfg.block_size  # PaLM appendix B
        return 6 * self.num_params(non_embedding=True) + attention

    def estimate_mfu(self, tokens_per_sec: float, device) -> float | None:
        """Model FLOPs utilization: achieved FLOP/s over the device's peak dense bf16 FLOP/s
        (PaLM, Chowdhery et al. 2022, section 4.1); None when the peak is unknown."""
        peak = peak_flops(device)
        return None if peak is None else self.flops_per_token() * tokens_per_sec / peak

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay every matrix (linears and the embeddings; a tied wte is also the
        output matrix, so it decays like one), never norms or biases (1-D). Each parameter is
        in exactly one group."""
        params = dict(self.named_parameters())  # shared tensors appear once
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        # a tensor in no group would never train; AdamW refuses one that is in two
        assert len(decay) + len(no_decay) == len({id(p) for p in self.parameters()})
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def grow_vocab(self, n_vocab: int, fresh_ids: list = ()) -> int:
        """Give every id below n_vocab an embedding row (and a head row), the table padded up
        to a multiple of 64 as train.py pads it; the rows added, and the rows of fresh_ids
        (tokens the model never saw), are set to the mean of the old rows, which keeps their
        logits at the average instead of random (Hewitt 2021, "Initializing new word
        embeddings for pretrained language models"). A tied head stays tied. Returns the old
        row count. Example: GPT-2 (50,257 rows) and its BPE with 5 chat tokens added at
        50257..50261 -> 50,304 rows (finetune.py adds chat tokens this way)."""
        old = self.config.vocab_size
        size = max(old, -(-n_vocab // 64) * 64)
        new_rows = list(range(old, size)) + [i for i in fresh_ids if i < old]
        tied = self.lm_head.weight is self.transformer.wte.weight

        def grown(weight):  # (old, C) -> (size, C), the new rows at the mean of the old ones
            w = torch.cat([weight.detach(), weight.new_empty(size - old, weight.size(1))])
            w[new_rows] = weight.detach()[:old].mean(dim=0)
            return nn.Parameter(w, requires_grad=weight.requires_grad)

        self.transformer.wte.weight = grown(self.transformer.wte.weight)
        self.transformer.wte.num_embeddings = size
        self.lm_head.weight = self.transformer.wte.weight if tied else grown(self.lm_head.weight)
        self.lm_head.out_features = size
        self.config = GPTConfig(**{**asdict(self.config), "vocab_size": size})
        return old

    # ------------------------------------------------------------------------------------
    # Hugging Face checkpoints in and out, and GGUF (llama.cpp) out

    @classmethod
    def from_pretrained(cls, hf_dir: str, dtype=torch.float32,
                        block_size: int | None = None) -> "GPT":
        """Load a local Hugging Face GPT2LMHeadModel or LlamaForCausalLM directory (config.json
        plus model.safetensors or pytorch_model.bin, or their sharded *.index.json form), in
        eval mode. block_size optionally shortens the context (smaller RoPE tables / wpe)."""
        cfg = config_from_hf(_read_json(os.path.join(hf_dir, "config.json")), hf_dir)
        # RoPE tables are computed for any length, but learned positions can only be cut short
        if block_size is not None and block_size > cfg.block_size and cfg.pos == "learned":
            raise ValueError(f"{hf_dir}: block_size={block_size} exceeds the checkpoint's "
                             f"{cfg.block_size} learned positions; pass a block_size no larger "
                             "than that.")
        if block_size is not None:
            cfg = GPTConfig(**{**asdict(cfg), "block_size": block_size})
        hf_sd = _load_hf_weights(hf_dir)  # Hugging Face name -> tensor, on the CPU
        if "wte.weight" in hf_sd:  # OpenAI's gpt2 checkpoints were saved without the prefix
            hf_sd = {k if k.startswith("lm_head") else "transformer." + k: v
                     for k, v in hf_sd.items()}
        with torch.device("meta"):
            model = cls(cfg)  # shapes only: no memory and no init work, the weights arrive next
        # rename every tensor into our layout (transposing GPT-2's Conv1D weights); strict loading
        # below then proves no parameter was left as an empty meta-device placeholder
        sd = {}
        for ours, names, transpose in _hf_layout(cfg):
            missing = [n for n in names if n not in hf_sd]
            if missing:
                raise ValueError(f"{hf_dir}: the weights lack {missing[0]!r}, which its "
                                 "config.json implies; the checkpoint and config do not belong "
                                 "together.")
            # pop: each loaded tensor is released as soon as its converted copy exists
            t = torch.cat([hf_sd.pop(n) for n in names]) if len(names) > 1 else hf_sd.pop(names[0])
            if block_size is not None and ours == "transformer.wpe.weight":
                t = t[:block_size]
            sd[ours] = (t.t() if transpose else t).to(dtype).contiguous()
        if cfg.tie_embeddings:  # strict loading wants the head too; it is the same tensor
            sd["lm_head.weight"] = sd["transformer.wte.weight"]
        model.load_state_dict(sd, strict=True, assign=True)
        # subtle: assign=True put two separate Parameters in; share one again
        if cfg.tie_embeddings:
            model.lm_head.weight = model.transformer.wte.weight
        model._set_rope_tables()  # the tables built on the meta device hold no values
        return model.eval()

    def save_hf(self, out_dir: str, extra_config: dict | None = None) -> None:
        """Write out_dir/config.json and model.safetensors (pytorch_model.bin when the
        safetensors package is missing) that transformers' AutoModelForCausalLM loads as
        GPT2LMHeadModel (GPT-2 style) or LlamaForCausalLM (Llama style). extra_config adds
        keys to config.json, e.g. {"eos_token_id": 0}."""
        hf_cfg = {**config_to_hf(self.config, self.lm_head.weight.dtype), **(extra_config or {})}
        sd = self.state_dict()  # our names; a tied lm_head.weight, which _hf_layout skips, too
        hf_sd = {}
        for ours, names, transpose in _hf_layout(self.config):
            t = sd[ours].detach().cpu()
            t = t.t() if transpose else t
            # the reverse of from_pretrained's cat: our fused c_attn back into q, k and v
            parts = t.split(_qkv_sizes(self.config)) if len(names) > 1 else [t]
            for name, part in zip(names, parts):
                # subtle: safetensors refuses tensors that share memory (q/k/v are views of one)
                hf_sd[name] = part.clone(memory_format=torch.contiguous_format)
        os.makedirs(out_dir, exist_ok=True)
        _write_atomic(os.path.join(out_dir, "config.json"), lambda p: _write_json(p, hf_cfg))
        try:
            from safetensors.torch import save_file
            name, stale = "model.safetensors", "pytorch_model.bin"
            _write_atomic(os.path.join(out_dir, name),
                          lambda p: save_file(hf_sd, p, {"format": "pt"}))
        except ImportError:  # a plain dict of tensors, which torch.load(weights_only=True) reads
            name, stale = "pytorch_model.bin", "model.safetensors"
            _write_atomic(os.path.join(out_dir, name), lambda p: torch.save(hf_sd, p))
        # transformers would prefer a stale safetensors left by an earlier save
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))

    def save_gguf(self, path: str, vocab: dict, dtype: str = "f32") -> None:
        """Write one .gguf file that llama.cpp runs as it is (llama-cli -m path): llama.cpp's
        "llama" architecture for the Llama style, "gpt2" for the GPT-2 style, with the
        hyperparameters, the tokenizer and every tensor under llama.cpp's name, in dtype "f32",
        "f16" or "bf16" (norms, biases and wpe stay f32, as llama.cpp's converter keeps them).
        Needs the gguf package (pip install gguf), imported here only.

        vocab is plain data (sample.py's gguf_vocab builds it from a Tokenizer):
          tokens       list[str], by id, byte-level strings as in GPT-2's vocab.json ("Ġthe");
                       fewer than vocab_size are padded with "[PAD{i}]" tokens of type unused
          merges       list[str], the BPE merges by rank, "Ġ t" (two tokens and a space)
          pre          llama.cpp's name of the split regex: "gpt-2" or "llama-bpe" (gpt4's)
          token_types  optional list[int], by id: 1 normal, 3 control, 5 unused (gguf.TokenType);
                       default 1, and 3 for the special ids below
          bos_id, eos_id, eot_id, pad_id   optional int ids; llama.cpp stops at eos and eot
          add_bos      optional bool, default False: llama.cpp puts bos_id before a prompt
          chat_template  optional Jinja string, which llama-cli's chat mode applies
        Example: {"tokens": ["a", "b", "ab", "<|endoftext|>"], "merges": ["a b"],
                  "pre": "gpt-2", "token_types": [1, 1, 1, 3], "eos_id": 3}"""
        try:  # lazily: model.py imports only torch, and only this method needs gguf
            import gguf
        except ImportError:
            raise RuntimeError("GGUF export needs the gguf package (llama.cpp's own reader and "
                               "writer); install it with pip install gguf.") from None
        cfg = self.config
        arch = _gguf_arch(cfg)  # "llama" or "gpt2", or ValueError naming what does not fit
        if dtype not in _GGUF_DTYPES:
            raise ValueError(f"dtype={dtype!r} is not a GGUF export type; pass one of "
                             f"{', '.join(_GGUF_DTYPES)}.")
        vocab = _gguf_vocab(vocab, cfg.vocab_size)
        model_arch = gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GPT2
        qtype = getattr(gguf.GGMLQuantizationType, dtype.upper())  # F32, F16 or BF16
        file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]  # general.file_type

        def write(tmp):
            w = gguf.GGUFWriter(tmp, arch)  # writes general.architecture itself
            _gguf_add_metadata(w, gguf, cfg, vocab, file_type)
            for name, t in _gguf_tensors(self, gguf, model_arch):
                # llama.cpp's convert_hf_to_gguf.py keeps 1-D tensors (norms, biases), *_norm
                # weights and position embeddings in f32: much of llama.cpp reads those in f32 only
                keep_f32 = t.dim() == 1 or name.endswith("_norm.weight") or \
                    name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD])
                t = t.detach().cpu().contiguous()
                if keep_f32 or dtype == "f32":
                    w.add_tensor(name, t.float().numpy(), raw_dtype=gguf.GGMLQuantizationType.F32)
                elif dtype == "f16":
                    w.add_tensor(name, t.half().numpy(), raw_dtype=qtype)
                else:  # numpy has no bfloat16: hand over the raw 16-bit patterns, typed BF16
                    # subtle: torch rounds to nearest even, as ggml's fp32 -> bf16 does
                    w.add_tensor(name, t.bfloat16().view(torch.int16).numpy(), raw_dtype=qtype)
            try:  # the header lists every tensor's name, shape and offset; the data comes last
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_tensors_to_file()
            finally:
                w.close()

        _write_atomic(path, write)


# ----------------------------------------------------------------------------------------
# Peak FLOP/s per GPU, for MFU

# Peak dense (no sparsity) bf16 tensor-core FLOP/s, from NVIDIA's datasheets and whitepapers.
# Matched as a substring of torch.cuda.get_device_name(); first match wins, so the more
# specific names come first. A GPU that is not listed gets None, never a guess.
PEAK_BF16_FLOPS = [
    ("H200", 989e12),  # H200 SXM (GH200 too): same compute as H100 SXM
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # H100 SXM5, reported as "NVIDIA H100 80GB HBM3"
    ("B200", 2250e12),
    ("A100", 312e12),  # SXM and PCIe alike
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),  # Ada whitepaper: 165.2 with fp32 accumulate
    ("RTX 3090", 71e12),  # Ampere GA102 whitepaper, fp32 accumulate
]


def peak_flops(device) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device (torch.device, "cuda:0", or a GPU name such as
    "NVIDIA H100 PCIe"); None for CPU, MPS or a GPU missing from PEAK_BF16_FLOPS."""
    name = None
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError:
            name = device  # not a device string: treat it as a GPU model name
    if name is None:
        if device.type != "cuda" or not torch.cuda.is_available():
            return None  # subtle: never touch CUDA APIs on a machine without CUDA
        name = torch.cuda.get_device_name(device)
    # a substring, ignoring case: drivers decorate the model name (memory size, form factor)
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None


# ----------------------------------------------------------------------------------------
# Hugging Face names, configs and files


def _hf_family(cfg: GPTConfig) -> str:
    """"gpt2" or "llama": the Hugging Face architecture whose exact layout cfg has."""
    parts = (cfg.norm, cfg.mlp, cfg.pos)
    if parts == ("layernorm", "gelu", "learned") and cfg.bias and cfg.n_kv_head == cfg.n_head:
        return "gpt2"
    if parts == ("rmsnorm", "swiglu", "rope"):
        return "llama"
    # a mix (e.g. GPT-2 with RoPE) trains fine here but has no Hugging Face class to load it
    raise ValueError(f"Hugging Face export needs a GPT-2 style config (layernorm, gelu, learned, "
                     f"bias=True, n_kv_head == n_head) or a Llama style one (rmsnorm, swiglu, "
                     f"rope); this one has norm={cfg.norm}, mlp={cfg.mlp}, pos={cfg.pos}, "
                     f"bias={cfg.bias}, n_kv_head={cfg.n_kv_head}.")


def _qkv_sizes(cfg: GPTConfig) -> list[int]:
    """Rows of q, k and v inside the fused c_attn weight: [nh * hs, nkv * hs, nkv * hs]."""
    hs = cfg.n_embd // cfg.n_head
    return [cfg.n_head * hs, cfg.n_kv_head * hs, cfg.n_kv_head * hs]


def _hf_layout(cfg: GPTConfig) -> list[tuple[str, list[str], bool]]:
    """(our name, Hugging Face names, transpose?) for every tensor. Several HF names are
    concatenated along dim 0 into ours (Llama's q_proj, k_proj, v_proj -> c_attn). GPT-2's
    checkpoints use Conv1D layers that store weights as (in, out): transpose those."""
    if _hf_family(cfg) == "gpt2":  # our names are GPT-2's own
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")
        names = ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"]
        for i in range(cfg.n_layer):  # six modules per block, each with a weight and a bias
            for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
                names += [f"h.{i}.{part}.weight", f"h.{i}.{part}.bias"]
        out = [(f"transformer.{n}", [f"transformer.{n}"], n.endswith(conv1d)) for n in names]
    else:
        out = [("transformer.wte.weight", ["model.embed_tokens.weight"], False),
               ("transformer.ln_f.weight", ["model.norm.weight"], False)]
        pairs = [("attn.c_attn", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                 ("attn.c_proj", ["self_attn.o_proj"]), ("mlp.c_gate", ["mlp.gate_proj"]),
                 ("mlp.c_fc", ["mlp.up_proj"]), ("mlp.c_proj", ["mlp.down_proj"])]
        for i in range(cfg.n_layer):
            ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
            out.append((ours + "ln_1.weight", [hf + "input_layernorm.weight"], False))
            out.append((ours + "ln_2.weight", [hf + "post_attention_layernorm.weight"], False))
            for suffix in ("weight", "bias") if cfg.bias else ("weight",):
                out += [(f"{ours}{o}.{suffix}", [f"{hf}{n}.{suffix}" for n in names], False)
                        for o, names in pairs]
    if not cfg.tie_embeddings:  # a tied head is wte itself, which HF does not store twice
        out.append(("lm_head.weight", ["lm_head.weight"], False))
    return out


def config_from_hf(hf: dict, where: str = "config.json") -> GPTConfig:
    """GPTConfig from a Hugging Face config.json dict (model_type "gpt2" or "llama")."""
    try:
        return _config_from_hf(hf, where)
    except KeyError as e:
        raise ValueError(f"{where}: config.json lacks the key {e}; it is not a complete "
                         "GPT-2 or Llama config.") from None


def _config_from_hf(hf: dict, where: str) -> GPTConfig:
    """config_from_hf's work; a missing required key surfaces as KeyError, reworded there.
    Anything the model cannot reproduce exactly is refused rather than silently approximated."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{where}: activation {hf['activation_function']!r} is not the "
                             "tanh GELU that model.py uses; this checkpoint cannot be loaded.")
        # a config.json may omit keys left at transformers' defaults: .get falls back to those
        return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", 1024),
                         n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                         mlp_hidden=hf.get("n_inner") or 0, norm="layernorm", mlp="gelu",
                         pos="learned", bias=True,
                         tie_embeddings=hf.get("tie_word_embeddings", True),
                         norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    if kind != "llama":
        raise ValueError(f"{where}: model_type {kind!r} is not supported; model.py reads "
                         "'gpt2' and 'llama' checkpoints.")
    # transformers 5 keeps rope_theta in rope_parameters; 4.x had rope_theta and rope_scaling
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        scaling = {k: rope[k] for k in _LLAMA3_SCALING_KEYS if k in rope}
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    problems = [
        (rope_type not in ("default", "llama3"),
         f"RoPE scaling {rope_type!r} is not implemented here"),
        (scaling is not None and len(scaling) < 4,
         f"llama3 RoPE scaling needs {', '.join(_LLAMA3_SCALING_KEYS)}"),
        (hf.get("head_dim") not in (None, n_embd // n_head),
         f"head_dim={hf.get('head_dim')} differs from hidden_size/num_attention_heads"),
        (hf.get("hidden_act", "silu") != "silu",
         f"hidden_act={hf.get('hidden_act')!r} is not SwiGLU's silu"),
        (hf.get("attention_bias", False) != hf.get("mlp_bias", False),
         "attention_bias and mlp_bias differ, while model.py has one bias flag"),
    ]
    for bad, problem in problems:
        if bad:
            raise ValueError(f"{where}: {problem}; this checkpoint cannot be loaded.")
    return GPTConfig(vocab_size=hf["vocab_size"],
                     block_size=hf.get("max_position_embeddings", 2048),
                     n_layer=hf["num_hidden_layers"], n_head=n_head,
                     n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd,
                     norm="rmsnorm", mlp="swiglu", mlp_hidden=hf["intermediate_size"], pos="rope",
                     rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                     rope_scaling=scaling, bias=hf.get("attention_bias", False),
                     tie_embeddings=hf.get("tie_word_embeddings", False),
                     norm_eps=hf.get("rms_norm_eps", 1e-6))


def config_to_hf(cfg: GPTConfig, dtype=torch.float32) -> dict:
    """A Hugging Face config.json dict for cfg (GPT2LMHeadModel or LlamaForCausalLM)."""
    # bos/eos ids belong to the tokenizer, not the model: pass them in save_hf's extra_config
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
                  bos_token_id=None, eos_token_id=None,
                  torch_dtype=str(dtype).removeprefix("torch."))
    if _hf_family(cfg) == "gpt2":
        hidden = mlp_hidden_size(cfg)
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2",
                    n_positions=cfg.block_size, n_ctx=cfg.block_size, n_embd=cfg.n_embd,
                    n_layer=cfg.n_layer, n_head=cfg.n_head,
                    n_inner=None if hidden == 4 * cfg.n_embd else hidden,  # None: HF's 4C
                    activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                    resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                    **common)
    scaling = {"rope_type": "llama3", **cfg.rope_scaling} if cfg.rope_scaling else None
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=cfg.n_embd,
                intermediate_size=mlp_hidden_size(cfg), num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                head_dim=cfg.n_embd // cfg.n_head, hidden_act="silu",
                max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
                # RoPE settings twice: transformers 4.x reads the first pair, 5 rope_parameters
                rope_theta=cfg.rope_theta, rope_scaling=scaling,
                rope_parameters={"rope_theta": cfg.rope_theta,
                                 **(scaling or {"rope_type": "default"})},
                attention_bias=cfg.bias, mlp_bias=cfg.bias, attention_dropout=0.0, **common)


def _read_json(path: str) -> dict:
    """A JSON file as a dict, or FileNotFoundError that says what directory was expected."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; point to a Hugging Face model directory that "
                                "has a config.json.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _load_hf_weights(hf_dir: str) -> dict:
    """All tensors of a HF directory: one file or shards listed in an *.index.json."""
    for single in ("model.safetensors", "pytorch_model.bin"):  # safetensors first, as HF does
        path = os.path.join(hf_dir, single)
        if os.path.isfile(path):
            files = [path]
        elif os.path.isfile(path + ".index.json"):
            index = path + ".index.json"
            shards = _read_json(index)["weight_map"].values()  # tensor name -> shard file
            files = [_shard_path(hf_dir, s, index) for s in sorted(set(map(str, shards)))]
        else:
            continue
        sd = {}
        for f in files:
            if f.endswith(".safetensors"):
                try:
                    from safetensors.torch import load_file
                except ImportError:
                    raise RuntimeError(f"{f} is in safetensors format and the safetensors "
                                       "package is missing; install it with pip install "
                                       "safetensors.") from None
                sd.update(load_file(f, device="cpu"))
            else:  # never arbitrary pickle: tensors and plain containers only
                try:  # mmap: tensors are paged in from the file as they are read, not copied
                    sd.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
                except pickle.UnpicklingError:  # torch's own message suggests weights_only=False
                    raise ValueError(f"{f} holds Python objects besides tensors, and unpickling "
                                     "them could run arbitrary code, so it is refused; use the "
                                     "model's model.safetensors or a pytorch_model.bin of plain "
                                     "tensors from a source you trust.") from None
        return sd
    raise FileNotFoundError(f"{hf_dir} holds neither model.safetensors nor pytorch_model.bin (or "
                            "a sharded index of them); copy the complete Hugging Face model "
                            "directory there.")


def _shard_path(hf_dir: str, name: str, index: str) -> str:
    """hf_dir/name for a shard listed in an index, refused unless it lies inside hf_dir: the
    index is data, and "../x", "/etc/x" or "link/x" (a folder linking out) would read any file.
    subtle: the shard file itself may be a symlink; the Hugging Face cache links every file of
    snapshots/REV/ to ../../blobs/, so only the folders on the way are resolved with realpath."""
    root = os.path.realpath(hf_dir)
    path = os.path.join(hf_dir, name)
    inside = os.path.commonpath([root, os.path.realpath(os.path.dirname(path))]) == root
    if not name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/") or not inside:
        raise ValueError(f"{index} lists the shard {name!r}, which is not a file inside {hf_dir}; "
                         "the index is damaged or hostile, so download the model again.")
    return path


def _write_json(path: str, obj: dict) -> None:
    """obj as indented JSON with a final newline, as Hugging Face writes its config.json."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2) + "\n")


def _write_atomic(path: str, write) -> None:
    """write(tmp_path), then rename over path, so a crash never leaves half a file."""
    tmp = path + ".tmp"
    write(tmp)
    # subtle: safetensors (0.8, measured) creates its file with mode 0600, not per the umask;
    # give every output the mode open() would, 0666 minus the umask (0644 under umask 022)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old file or the new


def _umask() -> int:
    """The process umask. Linux reports it in /proc (4.7+); elsewhere os.umask is the only way
    to read it, by setting it and putting it back (a brief window another thread could see)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # os.umask returns the old mask while setting a new one; the second call restores it
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------
# GGUF names, metadata and tensors, for llama.cpp

_GGUF_DTYPES = ("f32", "f16", "bf16")  # save_gguf's dtype choices
# vocab keys save_gguf reads: required, then optional (see its docstring)
_GGUF_VOCAB_REQUIRED = ("tokens", "merges", "pre")
_GGUF_VOCAB_OPTIONAL = ("token_types", "bos_id", "eos_id", "eot_id", "pad_id", "add_bos",
                        "chat_template")


def _gguf_arch(cfg: GPTConfig) -> str:
    """"llama" or "gpt2": the llama.cpp architecture that computes exactly what cfg does.
    llama.cpp's gpt2 loader requires every bias; its llama takes biases or none (all optional
    tensors there). A mix of the two styles has no llama.cpp architecture, so it is refused
    rather than approximated. The GPT-2 style also keeps Hugging Face's n_kv_head == n_head:
    llama.cpp's gpt2 would read fewer kv heads, but no test here has run that."""
    try:
        return _hf_family(cfg)  # the same two layouts that Hugging Face export knows
    except ValueError:
        raise ValueError(f"GGUF export needs a GPT-2 style config (norm=layernorm, mlp=gelu, "
                         f"pos=learned, bias=True, n_kv_head == n_head) for llama.cpp's gpt2 or "
                         f"a Llama style one (norm=rmsnorm, mlp=swiglu, pos=rope) for its llama; "
                         f"this one has norm={cfg.norm}, mlp={cfg.mlp}, pos={cfg.pos}, "
                         f"bias={cfg.bias}, n_kv_head={cfg.n_kv_head}, which neither runs, so "
                         f"train with one of those two sets.") from None


def _gguf_vocab(vocab: dict, vocab_size: int) -> dict:
    """save_gguf's vocab checked and completed: token_types filled in, tokens padded to
    vocab_size rows, defaults for the optional keys. ValueError names the first problem."""
    if not isinstance(vocab, dict):
        raise ValueError(f"vocab must be a dict with the keys {', '.join(_GGUF_VOCAB_REQUIRED)} "
                         f"(see GPT.save_gguf), got {type(vocab).__name__}.")
    unknown = sorted(set(vocab) - set(_GGUF_VOCAB_REQUIRED) - set(_GGUF_VOCAB_OPTIONAL))
    missing = [k for k in _GGUF_VOCAB_REQUIRED if k not in vocab]
    if unknown or missing:
        problem = f"has the unknown key {unknown[0]!r}" if unknown else f"lacks {missing[0]!r}"
        raise ValueError(f"vocab {problem}; its keys are {', '.join(_GGUF_VOCAB_REQUIRED)} and "
                         f"optionally {', '.join(_GGUF_VOCAB_OPTIONAL)} (see GPT.save_gguf).")
    tokens, merges, pre = list(vocab["tokens"]), list(vocab["merges"]), vocab["pre"]
    if not all(isinstance(s, str) for s in tokens + merges) or not isinstance(pre, str):
        raise ValueError("vocab tokens, merges and pre must be strings (tokens as byte-level "
                         "text such as 'Ġthe', merges as 'Ġ t').")
    if len(tokens) > vocab_size:
        raise ValueError(f"vocab has {len(tokens)} tokens but the model only {vocab_size} "
                         "embedding rows; export the tokenizer the model was trained with.")
    if pre == "gpt2":  # subtle: llama.cpp spells GPT-2's split "gpt-2" and refuses "gpt2"
        raise ValueError("vocab pre='gpt2' is not a llama.cpp pre-tokenizer name; GPT-2's split "
                         "regex is called 'gpt-2' there.")
    specials = {k: vocab.get(k) for k in ("bos_id", "eos_id", "eot_id", "pad_id")}
    for key, i in specials.items():
        if i is not None and (not isinstance(i, int) or not 0 <= i < len(tokens)):
            raise ValueError(f"vocab {key}={i!r} is not the id of one of its {len(tokens)} "
                             "tokens.")
    types = vocab.get("token_types")
    if types is None:  # special ids are control tokens: llama.cpp never makes them from text
        control = {i for i in specials.values() if i is not None}
        types = [3 if i in control else 1 for i in range(len(tokens))]
    if len(types) != len(tokens):
        raise ValueError(f"vocab has {len(tokens)} tokens but {len(types)} token_types; give "
                         "one type per token.")
    # one token per embedding row, as llama.cpp's converter writes for rows no token uses
    pad = range(len(tokens), vocab_size)
    return {**specials, "tokens": tokens + [f"[PAD{i}]" for i in pad], "merges": merges,
            "pre": pre, "token_types": [int(t) for t in types] + [5] * len(pad),
            "add_bos": bool(vocab.get("add_bos", False)),
            "chat_template": vocab.get("chat_template")}


def _gguf_add_metadata(w, gguf, cfg: GPTConfig, vocab: dict, file_type) -> None:
    """The key/value half of the file: what llama.cpp's loader reads to size the model and
    its tokenizer (the keys convert_hf_to_gguf.py writes for GPT-2 and Llama checkpoints)."""
    w.add_context_length(cfg.block_size)  # {arch}.context_length: the trained context
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(mlp_hidden_size(cfg))
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.norm == "rmsnorm":
        w.add_layer_norm_rms_eps(cfg.norm_eps)
    else:
        w.add_layer_norm_eps(cfg.norm_eps)
    if cfg.pos == "rope":
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.n_embd // cfg.n_head)  # every dimension of a head turns
        # Llama 3.1 scaling travels as a rope_freqs tensor (_gguf_tensors), with no key of its own
    w.add_file_type(file_type)
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE, whatever the model
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["token_types"])
    w.add_token_merges(vocab["merges"])
    for key in ("bos", "eos", "eot", "pad"):
        if vocab[f"{key}_id"] is not None:
            getattr(w, f"add_{key}_token_id")(vocab[f"{key}_id"])
    # subtle: without this key llama.cpp decides by the pre name (llama-bpe: add one, gpt-2:
    # not), so the same model would read prompts differently under the two regexes
    w.add_add_bos_token(vocab["add_bos"])
    if vocab["chat_template"]:
        w.add_chat_template(vocab["chat_template"])


def _rope_pairs_adjacent(w, n_heads: int):
    """Reorder the rows of a q or k projection (weight (n_heads * hs, C) or bias (n_heads * hs,))
    inside each head from the rotate-half layout, which pairs dimension j with j + hs/2, to
    the interleaved one, which pairs 2j with 2j + 1: row j goes to 2j and row j + hs/2 to
    2j + 1. ggml's "normal" RoPE (the one llama.cpp's llama runs) rotates adjacent pairs at
    frequency theta^(-2j/hs), so on these rows it computes our RoPE with its output rows
    permuted the same way, and q.k, which a permutation shared by q and k leaves alone, is
    unchanged. This is LlamaModel.permute of llama.cpp's converter, which undoes the
    permutation that Hugging Face's convert_llama_weights_to_hf applied to Meta's weights."""
    hs = w.shape[0] // n_heads
    return (w.reshape(n_heads, 2, hs // 2, *w.shape[1:])  # (heads, half, j, ...)
            .transpose(1, 2)  # (heads, j, half, ...): the two halves of pair j side by side
            .reshape(w.shape))  # (n_heads * hs, ...)


def _gguf_tensors(model: "GPT", gguf, model_arch):
    """(llama.cpp name, tensor) for every tensor save_gguf writes, in our (out, in) layout,
    which is the numpy shape gguf's writer wants (it stores the dims reversed, as ggml's
    (in, out)). Names come from gguf's own Hugging Face -> GGUF table, applied to the Hugging
    Face names of _hf_layout, so they are the names llama.cpp's converter would write."""
    cfg = model.config
    names = gguf.get_tensor_name_map(model_arch, cfg.n_layer)
    sd = model.state_dict()  # a tied lm_head.weight, which _hf_layout skips, too
    for ours, hf_names, _conv1d in _hf_layout(cfg):
        # subtle: _conv1d is ignored; the converter transposes GPT-2's Conv1D weights back
        # to (out, in), which is how ours are stored already
        t = sd[ours]
        parts = t.split(_qkv_sizes(cfg)) if len(hf_names) > 1 else [t]  # Llama: q, k, v apart
        for hf_name, part in zip(hf_names, parts):
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                part = _rope_pairs_adjacent(part, cfg.n_head)  # (nh * hs, ...)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                part = _rope_pairs_adjacent(part, cfg.n_kv_head)  # (nkv * hs, ...)
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:  # only if a future gguf renamed its table
                raise RuntimeError(f"the installed gguf package has no GGUF name for {hf_name}; "
                                   "upgrade it with pip install -U gguf.")
            yield name, part
    if cfg.rope_scaling:  # Llama 3.1: one factor per pair, read by every layer
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _rope_factors(cfg)


def _rope_factors(cfg: GPTConfig):
    """llama.cpp's rope_freqs tensor (hs/2,): ggml divides pair j's angle by factor j, so the
    factor is plain RoPE's frequency over the scaled one (1 for fast pairs, up to
    rope_scaling["factor"] for slow ones). Read off rope_tables itself: at position 1 the
    angle is the frequency, so the export follows whatever the forward pass computes."""
    hs = cfg.n_embd // cfg.n_head

    def frequencies(scaling):
        cos, sin = rope_tables(2, hs, cfg.rope_theta, scaling)  # (2, hs): positions 0 and 1
        # position 1, first half: one angle per pair (the second half repeats them)
        return torch.atan2(sin[1, : hs // 2], cos[1, : hs // 2])  # (hs/2,)

    return frequencies(None) / frequencies(cfg.rope_scaling)  # (hs/2,)


# ----------------------------------------------------------------------------------------
# Sizing table: python model.py


def main():
    """Print parameters and training FLOPs per token of every preset, without allocating them."""
    print(f"{'preset':<13} {'style':<6} {'layers':>6} {'nh/nkv':>7} {'C':>5} {'T':>5} {'V':>6} "
          f"{'params':>14} {'non-emb':>14} {'GFLOP/token':>12}")
    for name, kwargs in PRESETS.items():
        cfg = GPTConfig(**kwargs)
        with torch.device("meta"):  # sizes only: no memory even for gpt2-xl
            m = GPT(cfg)
        style = "gpt2" if cfg.pos == "learned" else "llama"
        heads = f"{cfg.n_head}/{cfg.n_kv_head}"
        print(f"{name:<13} {style:<6} {cfg.n_layer:>6} {heads:>7} {cfg.n_embd:>5} "
              f"{cfg.block_size:>5} {cfg.vocab_size:>6} {m.num_params(False):>14,} "
              f"{m.num_params(True):>14,} {m.flops_per_token() / 1e9:>12.3f}")
    print("params counts every tensor once (tied head = wte); non-emb leaves out wpe and an "
          "untied wte;\nGFLOP/token = 6 * non-emb + 12 * layers * C * T (training, PaLM "
          "appendix B).")


if __name__ == "__main__":
    main()
