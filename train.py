"""
Pretraining: the loop that turns prepared token shards into a GPT checkpoint.

Run it:
    python train.py                                   # prepares data/pystdlib if missing, then trains into out/
    python train.py --max_steps=50 --eval_interval=25 # a quick CPU smoke run
    python prepare.py --dataset=shakespeare && python train.py --dataset=shakespeare --max_minutes=1.2
    python train.py --preset=gpt2 --batch_size=16     # a model.py preset (GPU-sized; slow on a CPU)
    python train.py --resume                          # continue out/ckpt.pt exactly where it stopped
    torchrun --standalone --nproc_per_node=8 train.py # DDP: NCCL on GPUs, gloo on CPUs
    python train.py -h                                # every option with its meaning

What one step does: total_batch_size tokens are split into micro-batches (gradient
accumulation x processes), the gradients are averaged, clipped at 1.0 and applied by AdamW
(or Muon for the hidden matrices), with linear warmup then cosine or warmup-stable-decay.
Every eval_interval (and once more when a run stops early) the validation loss and bits per
byte are measured, a sample is printed, out/ckpt.pt (and best.pt on improvement) is written
durably (fsync, rename, fsync: a kill or a power loss leaves the previous file) and out/loss.svg
is redrawn. A fresh run into a used out_dir first removes the earlier run's files.

Sources: nanoGPT train.py and llm.c train_gpt2.py (loop structure, accumulation and DDP
sync on the last micro-step, MFU); Loshchilov & Hutter 2019 (AdamW); Hoffmann et al. 2022
(Chinchilla, ~20 tokens per parameter); Hagele et al. 2024 and Hu et al. 2024 (MiniCPM) for
warmup-stable-decay; Jordan et al. 2024 and Liu et al. 2025 ("Muon is Scalable") for Muon;
Chen et al. 2016 (activation checkpointing); Micikevicius et al. 2018 (loss scaling for fp16).
"""

import contextlib
import gc
import hashlib
import json
import math
import os
import pickle  # only for its exception type: nothing here unpickles
import random
import shutil
import signal
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist

from model import GPT, PRESETS, GPTConfig, peak_flops
from prepare import PrepareConfig, open_shard, prepare
from tokenizer import Tokenizer, parse_config

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    # data and outputs
    dataset: str = "pystdlib"  # a prepared directory (with meta.json), or a name/file/URL that prepare.py turns into data_dir/NAME
    data_dir: str = "data"  # where prepare.py keeps its datasets
    out_dir: str = "out"  # ckpt.pt, best.pt, log.jsonl, loss.svg, config.json and tokenizer.bpe are written here
    sampling: str = "random"  # "random" windows anywhere in the train split, or "sequential" non-overlapping windows in order
    # model: 0, "" or -1 keep the preset's value
    preset: str = ""  # a model.py PRESETS name; "" = the device default (CPU_MODEL below on a CPU, gpt2 on CUDA)
    block_size: int = 0  # context length in tokens
    n_layer: int = 0  # transformer blocks
    n_head: int = 0  # query heads
    n_kv_head: int = 0  # key/value heads (fewer than n_head = grouped-query attention)
    n_embd: int = 0  # channels C
    norm: str = ""  # "layernorm" or "rmsnorm"
    mlp: str = ""  # "gelu" or "swiglu"
    pos: str = ""  # "learned" or "rope"
    dropout: float = -1.0  # dropout probability; -1 keeps the preset's
    pad_vocab: int = 64  # round the embedding rows up to a multiple of this (tensor-core friendly); padded ids are never sampled
    # batch
    batch_size: int = 0  # micro-batch rows per process; 0 = device default; halved automatically on CUDA out-of-memory
    total_batch_size: int = 0  # tokens per optimizer step over all micro-steps and processes; 0 = one micro-batch per process
    # optimizer and schedule
    optimizer: str = ""  # "adamw", or "muon" (Muon for the 2-D hidden matrices, AdamW for the rest); "" = device default
    learning_rate: float = 0.0  # peak learning rate; 0 = device default
    muon_lr: float = 0.0  # peak Muon learning rate (RMS-matched to AdamW, Liu et al. 2025); 0 = same as learning_rate
    min_lr_ratio: float = -1.0  # the schedule ends at learning_rate * min_lr_ratio; -1 = device default
    warmup_steps: int = -1  # linear warmup steps; -1 = device default
    schedule: str = ""  # "cosine" decay after warmup, or "wsd" (warmup, stable, linear decay over decay_frac); "" = device default
    decay_frac: float = 0.0  # wsd: the final fraction of training spent decaying; 0 = device default
    weight_decay: float = 0.1  # decoupled weight decay on matrices only (model.param_groups)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.0  # AdamW beta2; 0 = device default (0.95 as in GPT-3 for big batches; 0.99 for the CPU's tiny, noisy ones)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping (the norm is still logged)
    # length
    max_steps: int = 0  # optimizer steps; 0 = device default
    max_minutes: float = 0.0  # stop with a checkpoint after this wall time (0 = no limit); the lr then anneals on the clock
    stop_step: int = 0  # stop with a checkpoint at this step, schedule unchanged (a run in parts); 0 = max_steps
    # evaluation and logging
    eval_interval: int = 0  # steps between evaluations and checkpoints; 0 = device default
    eval_batches: int = 20  # validation micro-batches per evaluation (a fixed set of windows spread over the split)
    log_interval: int = 0  # steps between console lines (and log.jsonl rows); 0 = device default
    sample_tokens: int = 48  # tokens sampled at each evaluation (0 = no sample)
    wandb: bool = False  # also log to Weights & Biases (needs `pip install wandb`)
    wandb_project: str = "gpt"  # wandb project name
    # system
    device: str = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1", "mps"
    dtype: str = "auto"  # "auto" (GPU: bf16 autocast, or fp16 + GradScaler without bf16; CPU: fp32), float32, bfloat16, float16
    compile: str = "auto"  # torch.compile the model: "auto" (on for CUDA only), "true", "false"
    grad_checkpoint: bool = False  # recompute each block's activations in backward: less memory, ~30% more compute
    seed: int = 1337  # seeds the initial weights, dropout and the data order
    resume: bool = False  # continue out_dir/ckpt.pt (weights, optimizer, step, data position, RNG, clock); off: start afresh, removing out_dir's earlier run
    # stability
    max_bad_steps: int = 3  # non-finite steps in a row before reloading the last checkpoint with half the learning rate
    spike_factor: float = 1.5  # log a loss spike when a step's loss exceeds this times the running mean


# Per-device defaults for the fields left at their "device default" values. CPU: a small
# Llama-style model (RMSNorm, SwiGLU, RoPE, tied embeddings) trained with Muon on the hidden
# matrices, 16 x 64 tokens a step, lr 4e-3 held, then decayed linearly over the last 40%
# (warmup-stable-decay). Chosen by wall clock on Tiny Shakespeare (70 s runs, README
# "Measurements"): Muon beat AdamW by ~0.1 bits/byte at equal time once its Newton-Schulz
# iteration ran in fp32 (Muon32); 16 rows a step beat 8 and 32; wsd beat cosine; lr 4e-3 and
# 6e-3 tied, 2-3e-3 lost. 2000 steps take about 5 minutes on 2 cores. CUDA: GPT-2 small
# (124M) with AdamW and 256K-token batches; pystdlib is only ~8.5M tokens, so the run is ~12
# epochs with dropout and best.pt keeps the best validation loss.
CPU_MODEL = dict(block_size=64, n_layer=4, n_head=4, n_kv_head=4, n_embd=128, norm="rmsnorm",
                 mlp="swiglu", pos="rope", rope_theta=10000.0, bias=False, dropout=0.0, tie_embeddings=True)
DEVICE_DEFAULTS = {
    "cpu": dict(optimizer="muon", batch_size=16, learning_rate=4e-3, warmup_steps=20, max_steps=2000, schedule="wsd",
                decay_frac=0.4, eval_interval=250, min_lr_ratio=0.0, beta2=0.99, log_interval=50),
    "cuda": dict(preset="gpt2", optimizer="adamw", batch_size=32, total_batch_size=2**18, learning_rate=6e-4,
                 warmup_steps=40, max_steps=400, schedule="cosine", decay_frac=0.2, eval_interval=50,
                 min_lr_ratio=0.1, beta2=0.95, dropout=0.1, log_interval=10),
}

# Test hooks (see test_all.py): inject a CUDA-style out-of-memory error on the next `oom`
# micro-steps, a NaN loss at the listed steps, and call before_rename(tmp) just before a
# checkpoint's temporary file is renamed into place. Never set in normal runs.
FAULTS = {"oom": 0, "nan_steps": (), "before_rename": None}

# -----------------------------------------------------------------------------
# Device, dtype and processes


def choose_device(cfg: TrainConfig, local_rank: int = 0) -> tuple[torch.device, torch.dtype, str]:
    """Decide device and compute dtype once; returns (device, dtype, reason). Never touches CUDA without it."""
    name = cfg.device
    if name == "auto":
        if torch.cuda.is_available():
            name, why = f"cuda:{local_rank}", "CUDA is available"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name, why = "mps", "no CUDA, Apple MPS is available"
        else:
            name, why = "cpu", "no CUDA or MPS found"
    else:
        why = "--device was given"
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"--device={name} was asked for but this torch build sees no CUDA GPU; use --device=cpu")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        # subtle: pick the GPU before any query below; a query first would open a context on
        # GPU 0 in every DDP process (N contexts on one GPU, each costing ~500 MB)
        torch.cuda.set_device(device)
    if cfg.dtype != "auto":
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if cfg.dtype not in dtypes:
            raise ValueError(f"--dtype={cfg.dtype} is not one of {', '.join(['auto', *dtypes])}")
        return device, dtypes[cfg.dtype], why + f"; dtype {cfg.dtype} was given"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        # subtle: torch.cuda.is_bf16_supported() also counts emulation, so it says True on V100
        # (7.0) and T4 (7.5), whose bf16 is emulated and slow; bf16 tensor cores start at Ampere (8.0)
        if major >= 8:
            return device, torch.bfloat16, why + f"; bf16 autocast (compute capability {major}.{minor})"
        return device, torch.float16, why + (f"; fp16 autocast with a GradScaler (compute capability "
                                             f"{major}.{minor} has no native bf16)")
    return device, torch.float32, why + "; fp32 (autocast buys little on " + device.type + ")"


def keep_freed_memory() -> bool:
    """On Linux/glibc, stop malloc from handing big freed blocks back to the kernel. By default
    glibc serves large blocks with mmap (over 128 KB, a threshold that adapts up to 32 MB) and
    unmaps them on free, and trims the top of the heap, so the next step's identical tensors
    page-fault their memory in again, zero-filled by the kernel.
    For the CPU model at batch 16 that was ~8,000 page faults and ~20 ms of kernel time a step
    (median step 153 -> 134 ms on 2 cores, 4x fewer faults). The cost: the process keeps its peak
    heap. CPU only: CUDA tensors live in PyTorch's own caching allocator. Returns True if set."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt): nothing to do
        return False


def setup_distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) for a plain run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world


# -----------------------------------------------------------------------------
# Data: fixed-length windows over llm.c-format shards


def bits_per_byte(loss_nats: float, tokens: int, n_bytes: int) -> float:
    """Convert a mean per-token loss (nats) into bits per UTF-8 byte: loss / ln 2 * tokens / bytes.
    Tokenizer-independent, so a char model and a BPE model can be compared (e.g. 1.88 nats/char ~ 2.72 bpb)."""
    return loss_nats / math.log(2) * tokens / n_bytes


def load_meta(data_dir: str) -> dict:
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; run `python prepare.py` (or pass --dataset=NAME) first")
    try:
        with open(path) as f:
            meta = json.load(f)
        meta["vocab_size"], meta["splits"]["train"]["shards"], meta["splits"]["val"]["shards"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid prepare.py meta.json ({e!r}); re-run prepare.py with --force") from None
    return meta


class TokenWindows:
    """Windows of block_size+1 tokens (inputs plus shifted targets) from one split's shards.

    The data position is a row counter: row i of the run is a pure function of (seed, i), so
    resuming needs only the counter, and splitting a step's rows into micro-batches, processes
    or a halved micro-batch after an OOM always yields the same global batch."""

    def __init__(self, data_dir: str, meta: dict, split: str, block_size: int, seed: int, vocab_size: int = 0):
        self.T, self.seed = block_size, seed
        files = meta["splits"][split]["shards"]
        if not files:
            raise ValueError(f"{data_dir}/meta.json lists no {split} shards; re-run prepare.py with --force")
        self.shards = [open_shard(os.path.join(data_dir, f)) for f in files]
        # a shard of another tokenizer: ids past the vocabulary train on rows that mean nothing (or
        # crash the embedding); its first million tokens tell, for ~2 MB of reading per shard
        for f, s in zip(files, self.shards):
            top = int(s[:1_000_000].max()) if len(s) else 0
            if vocab_size and top >= vocab_size:
                raise ValueError(f"shard {os.path.join(data_dir, f)} holds token id {top}, but the tokenizer has "
                                 f"only {vocab_size} ids; HINT: it was made with another tokenizer, rerun "
                                 f"prepare.py with --force.")
        # a window starting at p reads tokens p .. p+T, so a shard of n tokens has n-T starts
        self.starts = np.array([max(0, len(s) - block_size) for s in self.shards], dtype=np.int64)
        self.chunks = np.array([max(0, (len(s) - 1) // block_size) for s in self.shards], dtype=np.int64)
        if self.starts.sum() == 0:
            longest = max(len(s) for s in self.shards)
            raise ValueError(f"the {split} split of {data_dir} has at most {longest} tokens per shard, too few for "
                             f"block_size={block_size}; lower --block_size or prepare more data")
        self.cum_starts, self.cum_chunks = np.cumsum(self.starts), np.cumsum(self.chunks)
        self.rows = 0  # rows consumed so far: the resumable data position

    def _window(self, cum: np.ndarray, k: int, stride: int) -> np.ndarray:
        s = int(np.searchsorted(cum, k, side="right"))  # which shard holds global start number k
        off = (k - (int(cum[s - 1]) if s else 0)) * stride
        return np.asarray(self.shards[s][off:off + self.T + 1], dtype=np.int64)

    def rows_at(self, first_row: int, lo: int, hi: int, step_rows: int, sampling: str) -> np.ndarray:
        """Rows lo..hi of the step whose first row is first_row, as an int64 array (hi-lo, T+1)."""
        if sampling == "random":
            # subtle: one generator per step keyed by its first row, drawing all step_rows starts, then slicing:
            # the same global batch whatever the micro-batch size or process count
            starts = np.random.default_rng([self.seed, first_row]).integers(0, int(self.cum_starts[-1]), size=step_rows)
            return np.stack([self._window(self.cum_starts, int(k), 1) for k in starts[lo:hi]])
        n = int(self.cum_chunks[-1])  # sequential: non-overlapping windows in shard order, wrapping each epoch
        return np.stack([self._window(self.cum_chunks, (first_row + r) % n, self.T) for r in range(lo, hi)])

    def fixed_windows(self, count: int) -> np.ndarray:
        """`count` non-overlapping windows spread evenly over the split: the fixed validation set."""
        n = int(self.cum_chunks[-1])
        if n == 0:
            raise ValueError(f"the validation split is shorter than block_size={self.T}+1 tokens; lower --block_size")
        picks = np.unique(np.linspace(0, n - 1, num=min(count, n)).round().astype(np.int64))
        return np.stack([self._window(self.cum_chunks, int(k), self.T) for k in picks])


def to_device(rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(rows)
    if device.type == "cuda":  # pinned host memory lets the copy overlap with compute
        t = t.pin_memory().to(device, non_blocking=True)
    else:
        t = t.to(device)
    return t[:, :-1], t[:, 1:]  # inputs (B, T), targets (B, T)


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_windows(model, windows: np.ndarray, batch_size: int, device, ctx=None,
                     rank: int = 0, world: int = 1) -> tuple[float, int]:
    """Mean loss (nats/token) of the model over the given (N, T+1) windows; under DDP each
    process takes every world-th batch and the sums are all-reduced. Returns (loss, tokens)."""
    ctx = ctx or contextlib.nullcontext()
    was_training = model.training
    model.eval()
    losses, counts = [], []  # one 0-d float32 tensor per batch (left on the device), tokens per batch
    for i in range(rank * batch_size, len(windows), batch_size * world):
        x, y = to_device(windows[i:i + batch_size], device)
        with ctx:
            _, loss = model(x, y)
        losses.append(loss.detach().float())
        counts.append(y.numel())
    # subtle: the sum is taken in float64 on the CPU (Python floats), never on the device:
    # Apple's MPS has no float64, and one transfer at the end is one sync instead of one a batch
    total_loss, total_tokens = 0.0, 0
    for value, n in zip(torch.stack(losses).cpu().tolist() if losses else [], counts):
        total_loss, total_tokens = total_loss + value * n, total_tokens + n
    if world > 1:  # NCCL reduces CUDA tensors only (which have float64); gloo reduces CPU tensors
        t = torch.tensor([total_loss, total_tokens], dtype=torch.float64,
                         device=device if torch.device(device).type == "cuda" else "cpu")
        dist.all_reduce(t)
        total_loss, total_tokens = t.tolist()
    model.train(was_training)
    return total_loss / total_tokens, int(total_tokens)


def evaluate_bpb(model, data_dir: str, split: str = "val", batch_size: int = 8, max_windows: int = 160,
                 device="cpu", ctx=None) -> dict:
    """Validation loss and bits per byte of `model` on a prepared dataset (used by bench.py):
    {"loss", "bpb", "tokens"} over up to max_windows windows of the model's block_size."""
    meta = load_meta(data_dir)
    windows = TokenWindows(data_dir, meta, split, model.config.block_size, 0).fixed_windows(max_windows)
    loss, tokens = evaluate_windows(model, windows, batch_size, torch.device(device), ctx)
    s = meta["splits"][split]
    return {"loss": loss, "bpb": bits_per_byte(loss, s["tokens"], s["bytes"]), "tokens": tokens}


# -----------------------------------------------------------------------------
# Model and optimizers


def resolve_model_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    if cfg.preset:
        if cfg.preset not in PRESETS:
            raise ValueError(f"--preset={cfg.preset} is not a model.py preset; choose one of {', '.join(PRESETS)}")
        kw = dict(PRESETS[cfg.preset])
    else:
        kw = dict(CPU_MODEL)
    for key in ("block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "norm", "mlp", "pos"):
        if getattr(cfg, key):
            kw[key] = getattr(cfg, key)
    if cfg.n_head and not cfg.n_kv_head and "n_kv_head" in kw:
        kw["n_kv_head"] = cfg.n_head  # changing the head count alone keeps plain multi-head attention
    if cfg.dropout >= 0:
        kw["dropout"] = cfg.dropout
    # subtle: pad the embedding rows to a multiple of pad_vocab (e.g. 50257 -> 50304) for faster matmuls;
    # the extra logits are trained towards -inf and sample.py never samples them (vocab_limit)
    kw["vocab_size"] = -(-vocab_size // max(1, cfg.pad_vocab)) * max(1, cfg.pad_vocab)
    return GPTConfig(**kw)


def hidden_matrices(model: GPT) -> set:
    """ids of the 2-D weights inside the transformer blocks: what Muon orthogonalises. Embeddings and
    the output head (tied or not) are excluded: their rows are per-token lookups, not linear maps."""
    skip = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    skip |= {id(m.weight) for m in model.modules()
             if isinstance(m, torch.nn.Linear) and m.out_features == model.config.vocab_size}
    return {id(p) for p in model.parameters() if p.ndim == 2 and id(p) not in skip}


class Muon32(getattr(torch.optim, "Muon", torch.optim.Optimizer)):  # torch < 2.9 has no Muon: never used there
    """torch.optim.Muon with its Newton-Schulz iteration in float32, for CPUs. The built-in one
    runs the iteration in bfloat16, right on GPUs but emulated slowly on CPUs without bf16 matrix
    units: 600-790 ms a step for the 4 x 128 CPU model on 2 cores, against 23-30 ms here. Same math,
    hyperparameters and state ("momentum_buffer"), so checkpoints move between the two; matrices
    of one shape are orthogonalised together in one batched matmul (fewer, larger kernels)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            by_shape = {}  # (rows, cols) with rows <= cols -> [(param, update)]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - mu)  # buf = mu * buf + (1 - mu) * grad
                u = p.grad.lerp(buf, mu) if group["nesterov"] else buf  # Nesterov: look one step ahead
                u = u.float() if u.shape[0] <= u.shape[1] else u.float().T  # iterate on the wide side
                by_shape.setdefault(tuple(u.shape), []).append((p, u))
            a, b, c = group["ns_coefficients"]
            for items in by_shape.values():
                X = torch.stack([u for _, u in items])
                X = X / X.norm(dim=(1, 2), keepdim=True).clamp(min=group["eps"])  # spectral norm <= 1
                for _ in range(group["ns_steps"]):  # X <- a X + (b A + c A^2) X, A = X X^T: singular values -> ~1
                    A = X @ X.mT
                    X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
                for (p, _), o in zip(items, X):
                    rows, cols = p.shape
                    if group["adjust_lr_fn"] == "match_rms_adamw":  # Liu et al. 2025: update RMS ~ AdamW's
                        step_lr = lr * 0.2 * math.sqrt(max(rows, cols))
                    else:  # Jordan's original: sqrt(max(1, rows / cols))
                        step_lr = lr * math.sqrt(max(1.0, rows / cols))
                    p.mul_(1 - lr * wd)  # decoupled weight decay, then the shape-adjusted step
                    p.add_((o if rows <= cols else o.T).to(p.dtype), alpha=-step_lr)
        return loss


def build_optimizers(model: GPT, cfg: TrainConfig, device: torch.device) -> list:
    """AdamW over model.param_groups (decay on matrices only), plus Muon for the hidden matrices
    when --optimizer=muon. Each group remembers its peak lr in "base_lr" for the schedule."""
    muon_ids = hidden_matrices(model) if cfg.optimizer == "muon" else set()
    groups = []
    for g in model.param_groups(cfg.weight_decay):
        params = [p for p in g["params"] if id(p) not in muon_ids]
        if params:
            groups.append({**g, "params": params, "base_lr": cfg.learning_rate})
    # fused: one kernel over all parameters instead of a Python loop of small ops (CPU: 5.4 -> 1.3 ms a step)
    fused = device.type in ("cuda", "cpu")
    opts = [torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)]
    if muon_ids:
        lr = cfg.muon_lr or cfg.learning_rate
        mats = [p for p in model.parameters() if id(p) in muon_ids]
        # "match_rms_adamw" scales each update to AdamW's RMS (0.2 * sqrt(max(A, B))), so the AdamW lr transfers
        muon = torch.optim.Muon if device.type == "cuda" else Muon32
        opts.append(muon([{"params": mats, "base_lr": lr}], lr=lr, weight_decay=cfg.weight_decay,
                         momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw"))
    return opts


def lr_factor(step: int, cfg: TrainConfig, time_frac: float = 0.0) -> float:
    """Multiplier on the peak lr: linear warmup, then cosine or warmup-stable-decay to min_lr_ratio.
    Progress is the larger of the step fraction and the wall-clock fraction (time_frac, under
    --max_minutes) so that a time-limited run still anneals before it stops."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    lo = cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        p = min(1.0, max(step / cfg.max_steps, time_frac))
        start = 1.0 - cfg.decay_frac
        return 1.0 if p < start else 1.0 - (1.0 - lo) * (p - start) / max(cfg.decay_frac, 1e-9)
    p = min(1.0, max((step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps), time_frac))
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * p))


# -----------------------------------------------------------------------------
# One optimizer step's gradients, with the out-of-memory fallback


# torch.OutOfMemoryError is torch >= 2.5; before it the same class lived at torch.cuda.OutOfMemoryError
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def accumulate_gradients(model, batch_fn, micro_bs: int, accum: int, ctx, scaler=None, nan: bool = False) -> torch.Tensor:
    """Forward and backward over `accum` micro-batches of micro_bs rows; gradients end up as those
    of the mean loss over all rows (each micro-loss is divided by accum). Under DDP the all-reduce
    runs only on the last micro-step (no_sync before). Returns the mean loss (detached)."""
    total = 0.0
    for m in range(accum):
        x, y = batch_fn(m * micro_bs, (m + 1) * micro_bs)
        last = m == accum - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with ctx:
                logits, loss = model(x, y)
            if FAULTS["oom"] > 0:  # after the forward, as a real OOM: this frame holds the activations
                FAULTS["oom"] -= 1
                raise OutOfMemoryError("CUDA out of memory (injected by a test)")
            del logits  # the graph keeps what backward needs; the (B, T, V) logits need not wait for it
            if nan:
                loss = loss * float("nan")
            loss = loss / accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total = total + loss.detach()
    return total


def free_failed_step(optimizers: list, device: torch.device) -> None:
    """After an out-of-memory error: drop the partial gradients, collect what the failed step left
    (once its traceback is gone), and hand the CUDA allocator's cached blocks back."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def smaller_micro_batch(b: int) -> int:
    """The largest divisor of b that is at most b/2 (b/2 itself when b is even), so the global
    batch splits into whole micro-batches; 0 when b is already 1."""
    for d in range(b // 2, 0, -1):
        if b % d == 0:
            return d
    return 0


# -----------------------------------------------------------------------------
# Checkpoints


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],  # plain values: weights_only loads them
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fsync_path(path: str) -> None:
    """Flush a file, or a directory's list of names, from the OS cache to the disk. Without it a
    rename survives a crash of the process but not a power loss: the kernel may write the new name
    before the data it points to, leaving a complete-looking, empty checkpoint."""
    if os.path.isdir(path):
        if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a directory; NTFS orders this itself
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    else:
        fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: str, path: str) -> None:
    """Rename a finished temporary file over `path`: fsync the file, rename, fsync the directory."""
    fsync_path(tmp)
    if FAULTS["before_rename"]:
        FAULTS["before_rename"](tmp)  # test hook: the chaos suite kills the process here
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def save_checkpoint(path: str, ckpt: dict) -> None:
    """torch.save to a temporary name, then rename: a crash, a power loss or a full disk leaves
    the old file intact."""
    tmp = path + ".tmp"
    try:
        torch.save(ckpt, tmp)
        replace_durably(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise RuntimeError(f"could not write {path} ({str(e).splitlines()[0]}); the previous checkpoint is intact; "
                           f"free disk space or pick another --out_dir") from None


def copy_durably(src: str, dst: str) -> None:
    """Copy a finished file (ckpt.pt -> best.pt, the tokenizer) with the same all-or-nothing guarantee."""
    try:
        shutil.copyfile(src, dst + ".tmp")
        replace_durably(dst + ".tmp", dst)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(dst + ".tmp")
        raise RuntimeError(f"could not write {dst} ({e.strerror}); free disk space or pick another --out_dir") from None


# What one run writes into its out_dir. A fresh run removes them first, so nothing of an earlier
# run (a better best.pt, a longer log.jsonl) ends up beside the new run's tokenizer.
RUN_FILES = ("ckpt.pt", "best.pt", "log.jsonl", "loss.svg", "config.json", "tokenizer.bpe")


def clear_previous_run(out_dir: str, log=print) -> None:
    """Remove an earlier run's RUN_FILES (and temporary files a crash left) from out_dir."""
    if not os.path.isdir(out_dir):
        return
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]
    if found:
        log(f"{out_dir} holds an earlier run ({', '.join(found)}): starting afresh, so they are removed; "
            f"pass --resume to continue that run instead")
    leftovers = [f for f in os.listdir(out_dir) if f.endswith(".tmp") and f[:-4] in RUN_FILES]
    for f in found + leftovers:
        os.remove(os.path.join(out_dir, f))


def checkpoint_step(path: str) -> int | None:
    """The step a checkpoint holds, or None when it is missing or unreadable (mmap: no full read)."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)["step"]
    except Exception:
        return None


def repair_after_crash(out_dir: str, step: int, best_step: int) -> None:
    """On resume from ckpt.pt at `step`: a run killed between writing ckpt.pt and copying it to
    best.pt left best.pt one evaluation behind, so copy it again; and log.jsonl rows written after
    the checkpoint describe steps that will now run again, so drop them."""
    ckpt_path, best_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "best.pt")
    if best_step == step and checkpoint_step(best_path) != step:
        copy_durably(ckpt_path, best_path)
    log_path = os.path.join(out_dir, "log.jsonl")
    if os.path.exists(log_path):
        with open(log_path) as f:
            rows = [line for line in f if line.strip()]
        keep = []
        for line in rows:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):  # a line cut short by the kill
                pass
        if len(keep) != len(rows):
            with open(log_path + ".tmp", "w") as f:
                f.writelines(keep)
            replace_durably(log_path + ".tmp", log_path)


def load_checkpoint(path: str, device="cpu") -> tuple[GPT, dict]:
    """(model in eval mode on `device`, checkpoint dict) from a train.py checkpoint, loaded with weights_only=True."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; train one with `python train.py` first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except pickle.UnpicklingError:  # weights_only refused a class or a function: never run it
        raise ValueError(f"{path} holds Python objects besides tensors and plain values; loading them could run "
                         f"arbitrary code, so it is refused; retrain or pick another file") from None
    except Exception as e:  # a truncated file, or keys of another model shape
        raise ValueError(f"{path} is not a loadable train.py checkpoint ({' '.join(str(e).split())[:300]}); "
                         f"retrain or pick another file") from None
    return model.to(device).eval(), ckpt


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# -----------------------------------------------------------------------------
# Logs and the loss plot


def write_loss_svg(path: str, train_pts: list, val_pts: list) -> None:
    """Train and validation loss against tokens as a small standalone SVG (no plotting dependency)."""
    pts = train_pts + val_pts
    if len(pts) < 2:
        return
    W, H, L, R, Tp, Bt = 640, 400, 60, 20, 20, 45  # canvas and margins in px
    x0, x1 = 0, max(p[0] for p in pts) or 1
    ys = [p[1] for p in pts if math.isfinite(p[1])]
    y0, y1 = min(ys), max(ys)
    y0, y1 = (y0 - 0.1, y1 + 0.1) if y1 - y0 < 1e-6 else (y0 - 0.02 * (y1 - y0), y1 + 0.02 * (y1 - y0))
    sx = lambda x: L + (W - L - R) * (x - x0) / (x1 - x0)
    sy = lambda y: Tp + (H - Tp - Bt) * (1 - (y - y0) / (y1 - y0))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<rect x="{L}" y="{Tp}" width="{W - L - R}" height="{H - Tp - Bt}" fill="none" stroke="#888"/>']
    for i in range(6):  # ticks
        xv, yv = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        out.append(f'<text x="{sx(xv):.1f}" y="{H - Bt + 15}" text-anchor="middle">{xv:.3g}</text>')
        out.append(f'<text x="{L - 5}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.3g}</text>')
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" stroke="#eee"/>')
    out.append(f'<text x="{(W + L) / 2}" y="{H - 8}" text-anchor="middle">tokens</text>')
    out.append(f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle">loss (nats/token)</text>')
    for series, color, name, ly in ((train_pts, "#1f77b4", "train", 35), (val_pts, "#d62728", "val", 52)):
        good = [p for p in series if math.isfinite(p[1])]
        if good:
            line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, *_ in good)
            out.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.5"/>')
            out.append(f'<text x="{W - R - 60}" y="{ly}" fill="{color}">{name}</text>')
    out.append("</svg>")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(out))
    os.replace(path + ".tmp", path)


def fmt_time(s: float) -> str:
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


@contextlib.contextmanager
def stop_on_signals(stop: dict):
    """While active, SIGINT and SIGTERM only set stop["signal"] (the loop checks it between steps);
    the previous handlers come back afterwards, also when training raises."""
    old = {}
    if threading.current_thread() is threading.main_thread():  # handlers can only be set there
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, lambda s, f: stop.update(signal=signal.Signals(s).name))
    try:
        yield stop
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)



# -----------------------------------------------------------------------------
# The training run


def resolve_config(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """Fill the fields left at their "device default" values; validate the choices."""
    d = DEVICE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    unset = {f.name: f.default for f in fields(TrainConfig)}  # the declared defaults mean "device default"
    explicit_muon = cfg.optimizer == "muon"
    for key, value in d.items():
        if getattr(cfg, key) == unset[key]:
            setattr(cfg, key, value)
    for key, allowed in (("sampling", ("random", "sequential")), ("optimizer", ("adamw", "muon")),
                         ("schedule", ("cosine", "wsd")), ("compile", ("auto", "true", "false"))):
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"--{key}={getattr(cfg, key)} is not one of {', '.join(allowed)}")
    if cfg.batch_size < 1 or cfg.max_steps < 1 or cfg.learning_rate <= 0:
        raise ValueError("--batch_size and --max_steps must be at least 1 and --learning_rate positive")
    if cfg.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        if explicit_muon:
            raise RuntimeError(f"--optimizer=muon needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}")
        cfg.optimizer = "adamw"  # the CPU default asked for Muon, but this torch predates it
    if cfg.schedule == "wsd" and not 0 < cfg.decay_frac <= 1:
        raise ValueError(f"--decay_frac={cfg.decay_frac} must be in (0, 1]: the fraction of the steps spent decaying")
    cfg.warmup_steps = min(cfg.warmup_steps, cfg.max_steps)
    return cfg


def find_dataset(cfg: TrainConfig, is_master: bool) -> str:
    """The dataset directory; runs prepare.py's pipeline in-process when a named dataset is missing."""
    if os.path.isfile(os.path.join(cfg.dataset, "meta.json")):
        return cfg.dataset
    if os.path.isdir(cfg.dataset) and any(n.endswith(".bin") for n in os.listdir(cfg.dataset)):
        return cfg.dataset  # a prepared folder that lost its meta.json: load_meta says so
    path = os.path.join(cfg.data_dir, cfg.dataset)
    if not os.path.isfile(os.path.join(path, "meta.json")):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise FileNotFoundError(f"{path}/meta.json is missing; run `python prepare.py --dataset={cfg.dataset}` "
                                    f"once before launching torchrun")
        print(f"{path}/meta.json not found: preparing the {cfg.dataset} dataset first (python prepare.py "
              f"--dataset={cfg.dataset})")
        path = prepare(PrepareConfig(dataset=cfg.dataset, out_dir=cfg.data_dir))
    return path


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) one pretraining run; returns a summary dict (step, train_loss, val_loss, val_bpb, best_val_loss, ...)."""
    rank, local_rank, world = setup_distributed()
    master = rank == 0
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)  # flushed: runs are often piped to a file
    device, dtype, why = choose_device(cfg, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    cfg = resolve_config(TrainConfig(**asdict(cfg)), device)
    if device.type == "cpu" and keep_freed_memory():
        why += "; malloc keeps freed memory (fewer page faults)"
    log(f"device: {device} ({why})")

    # ---- data, tokenizer, and a check that they agree
    data_dir = find_dataset(cfg, master)
    meta = load_meta(data_dir)
    tok_path = os.path.join(data_dir, meta.get("tokenizer_file", "tokenizer.bpe"))
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"{tok_path} is missing; re-run prepare.py for {data_dir} with --force")
    if meta.get("tokenizer_sha256") and file_sha256(tok_path) != meta["tokenizer_sha256"]:
        raise ValueError(f"{tok_path} is not the tokenizer that produced {data_dir}'s shards (sha256 differs); "
                         f"re-run prepare.py with --force")
    tok = Tokenizer.load(tok_path)
    if tok.n_vocab != meta["vocab_size"]:
        raise ValueError(f"{tok_path} has {tok.n_vocab} tokens but {data_dir}/meta.json says {meta['vocab_size']}; "
                         f"re-run prepare.py with --force")

    # ---- model (seeded so every process starts from the same weights)
    mcfg = resolve_model_config(cfg, tok.n_vocab)
    train_data = TokenWindows(data_dir, meta, "train", mcfg.block_size, cfg.seed, tok.n_vocab)
    val_data = TokenWindows(data_dir, meta, "val", mcfg.block_size, cfg.seed, tok.n_vocab)
    val_windows = val_data.fixed_windows(cfg.eval_batches * cfg.batch_size)
    torch.manual_seed(cfg.seed)
    raw = GPT(mcfg).to(device)
    raw.grad_checkpoint = cfg.grad_checkpoint

    # ---- batch geometry: total_batch_size = micro_bs * block_size * world * accum
    micro_bs = cfg.batch_size
    per_micro = micro_bs * mcfg.block_size * world
    total_tokens = cfg.total_batch_size or per_micro
    if total_tokens % per_micro:
        raise ValueError(f"--total_batch_size={total_tokens} is not a multiple of batch_size*block_size*world_size = "
                         f"{micro_bs}*{mcfg.block_size}*{world} = {per_micro}; change one of them")
    accum = total_tokens // per_micro
    step_rows = total_tokens // mcfg.block_size  # rows per optimizer step over all processes
    cfg.total_batch_size = total_tokens

    # ---- outputs, resume
    ckpt_path, best_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "best.pt")
    if master:
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(os.path.join(cfg.out_dir, ".write_test"), "w") as f:
                f.write("ok")
            os.remove(os.path.join(cfg.out_dir, ".write_test"))
        except OSError as e:
            raise RuntimeError(f"cannot write to --out_dir={cfg.out_dir} ({e.strerror}); pick a writable directory") from None
    optimizers = build_optimizers(raw, cfg, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    step, tokens_seen, best_val, lr_scale, history = 0, 0, float("inf"), 1.0, {"train": [], "val": []}
    best_step, elapsed_before = -1, 0.0  # the step best.pt holds; wall seconds of earlier parts of this run
    run_id = uuid.uuid4().hex  # names this run in its checkpoints: only its own are ever reloaded
    if not cfg.resume and master:
        clear_previous_run(cfg.out_dir, log)
    if cfg.resume:
        _, ck = load_checkpoint(ckpt_path)  # validates the file; weights are copied into `raw` below
        if ck["model_config"] != asdict(mcfg):
            diff = [f"{k}={ck['model_config'].get(k)} (now {v})" for k, v in asdict(mcfg).items() if ck["model_config"].get(k) != v]
            raise ValueError(f"{ckpt_path} was trained with {', '.join(diff)}; pass the same model options to resume "
                             f"or use a new --out_dir")
        if ck["vocab_size"] != tok.n_vocab or ck.get("tokenizer_sha256", "") not in ("", file_sha256(tok_path)):
            raise ValueError(f"{ckpt_path} was trained with another tokenizer than {tok_path}; resume on its dataset "
                             f"({ck.get('dataset')}) or use a new --out_dir")
        raw.load_state_dict(ck["model"])
        opt_states = [ck["optimizer"]] + ([ck["optimizer_muon"]] if ck.get("optimizer_muon") else [])
        if len(opt_states) != len(optimizers):
            raise ValueError(f"{ckpt_path} was trained with --optimizer={ck['config']['optimizer']}; resume with it")
        for opt, state in zip(optimizers, opt_states):
            opt.load_state_dict(state)
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        step, tokens_seen, best_val = ck["step"], ck["tokens_seen"], ck["best_val_loss"]
        lr_scale, history = ck.get("lr_scale", 1.0), ck.get("history", history)
        best_step, run_id = ck.get("best_step", -1), ck.get("run_id", "")
        # the clock goes on where it stopped: --max_minutes is a budget for the whole run
        elapsed_before = ck.get("elapsed", 0.0)
        train_data.rows = ck["data_position"]["rows"]
        set_rng_state(ck["rng"])
        if master:
            repair_after_crash(cfg.out_dir, step, best_step)
        log(f"resumed {ckpt_path} at step {step} ({tokens_seen:,} tokens seen, {fmt_time(elapsed_before)} "
            f"of training so far)")
        del ck
    if world > 1:  # every process must agree on the run's name to check a reload against it
        name = [run_id]
        dist.broadcast_object_list(name, src=0)
        run_id = name[0]
    if master:
        copy_durably(tok_path, os.path.join(cfg.out_dir, "tokenizer.bpe"))
        with open(os.path.join(cfg.out_dir, "config.json.tmp"), "w") as f:
            json.dump({"train": asdict(cfg), "model": asdict(mcfg)}, f, indent=1)
        os.replace(os.path.join(cfg.out_dir, "config.json.tmp"), os.path.join(cfg.out_dir, "config.json"))
        if not cfg.resume:
            open(os.path.join(cfg.out_dir, "log.jsonl"), "w").close()

    # ---- wrappers: compile (CUDA by default), then DDP; `raw` stays the plain module we save
    model = raw
    if cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda"):
        log("compiling the model with torch.compile (the first steps are slow)")
        model = torch.compile(raw)
    eval_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    ctx = (torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())

    # ---- the printed plan: config, compute budget
    n_params = raw.num_params(non_embedding=False)
    flops_tok = raw.flops_per_token()
    train_tokens = cfg.max_steps * total_tokens
    log("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    log("model:  " + " ".join(f"{k}={v}" for k, v in asdict(mcfg).items()))
    peak = peak_flops(device)
    est = f"~{fmt_time(flops_tok * train_tokens / (0.4 * peak * world))} at 40% MFU" if peak else "measured after the first steps"
    log(f"budget: {n_params / 1e6:.2f}M parameters, {flops_tok / 1e6:.1f} MFLOPs/token, {train_tokens:,} tokens to train "
        f"({cfg.max_steps} steps x {total_tokens:,}), {flops_tok * train_tokens:.3g} FLOPs, {est}; "
        f"{train_tokens / n_params:.1f} tokens/parameter (Chinchilla-optimal ~20)")
    log(f"batch: {micro_bs} rows x {mcfg.block_size} tokens x {world} processes x {accum} accumulation = "
        f"{total_tokens:,} tokens/step; train split {meta['splits']['train']['tokens']:,} tokens")
    wb = None
    if cfg.wandb and master:
        try:
            import wandb
        except ImportError:
            raise RuntimeError("--wandb needs the wandb package; `pip install wandb` or drop --wandb") from None
        wb = wandb.init(project=cfg.wandb_project, config={**asdict(cfg), **asdict(mcfg)})

    def checkpoint(path: str) -> None:
        ck = {"model": raw.state_dict(), "model_config": asdict(mcfg), "config": asdict(cfg),
              "optimizer": optimizers[0].state_dict(), "optimizer_muon": optimizers[1].state_dict() if len(optimizers) > 1 else None,
              "step": step, "tokens_seen": tokens_seen, "data_position": {"rows": train_data.rows, "sampling": cfg.sampling},
              "rng": rng_state(), "best_val_loss": best_val, "tokenizer": "tokenizer.bpe",
              "tokenizer_sha256": file_sha256(tok_path), "vocab_size": tok.n_vocab, "dataset": data_dir,
              "lr_scale": lr_scale, "history": history, "scaler": scaler.state_dict() if scaler else None,
              "run_id": run_id, "best_step": best_step, "elapsed": time.time() - t_start}
        save_checkpoint(path, ck)

    def save_run(improved: bool) -> None:
        """ckpt.pt, then best.pt when this evaluation is the best so far, then the loss plot."""
        checkpoint(ckpt_path)
        if improved:
            copy_durably(ckpt_path, best_path)
        write_loss_svg(os.path.join(cfg.out_dir, "loss.svg"), history["train"], history["val"])

    def evaluate() -> tuple[float, float]:
        loss, _ = evaluate_windows(eval_model, val_windows, micro_bs, device, ctx, rank, world)
        return loss, bits_per_byte(loss, meta["splits"]["val"]["tokens"], meta["splits"]["val"]["bytes"])

    def sample_text() -> str:
        g = torch.Generator(device=device).manual_seed(cfg.seed)  # its own generator: training RNG untouched
        idx = torch.tensor([[tok.eot_id]], device=device)
        with ctx:
            out = raw.generate(idx, cfg.sample_tokens, temperature=0.8, top_k=50, generator=g, vocab_limit=tok.n_vocab)
        raw.train()
        return tok.decode(out[0, 1:].tolist())

    # ---- the loop; SIGINT/SIGTERM finish the current step, evaluate, save and exit cleanly
    stop = {"signal": None}
    with stop_on_signals(stop):
        # two clocks: the wall clock (t_start, set back by the earlier parts of a resumed run) is
        # the --max_minutes budget; train_time counts only the steps, for tokens/s, MFU and the ETA
        t_start = time.time() - elapsed_before
        train_time, logged = 0.0, (0.0, tokens_seen)  # (train_time, tokens_seen) at the last log line
        step_times, bad_streak, bad_total, reloads, ema = [], 0, 0, 0, None
        train_loss = val_loss = val_bpb = float("nan")
        last_step = min(cfg.max_steps, cfg.stop_step or cfg.max_steps)
        raw.train()
        reason = "reached max_steps" if last_step == cfg.max_steps else f"reached stop_step={last_step}"
        while step < last_step:
            elapsed, signalled = time.time() - t_start, stop["signal"] is not None
            if world > 1:  # subtle: every rank must stop at the same step and use the same clock for the lr
                flags = torch.tensor([elapsed, float(signalled)], dtype=torch.float64, device=device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                elapsed, signalled = flags[0].item(), flags[1].item() > 0
            if signalled:
                reason = f"got {stop['signal'] or 'a signal on another rank'}"
                break
            if cfg.max_minutes and elapsed >= cfg.max_minutes * 60:
                reason = f"reached max_minutes={cfg.max_minutes}"
                break
            time_frac = elapsed / (cfg.max_minutes * 60) if cfg.max_minutes else 0.0
            lr_mult = lr_factor(step, cfg, time_frac) * lr_scale
            for opt in optimizers:
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * lr_mult
            t0 = time.time()
            first = train_data.rows
            me = rank * micro_bs * accum  # this process's rows within the step: [me, me + micro_bs*accum)

            def batch_fn(lo, hi):
                return to_device(train_data.rows_at(first, me + lo, me + hi, step_rows, cfg.sampling), device)

            while True:  # retried with a smaller micro-batch after an out-of-memory error
                try:
                    loss = accumulate_gradients(model, batch_fn, micro_bs, accum, ctx, scaler, nan=step in FAULTS["nan_steps"])
                    break
                except RuntimeError as e:
                    if not _is_oom(e):
                        raise
                # subtle: only here, outside the except block, are the exception and its traceback
                # gone; their frames hold the failed step's activations, which must go first
                free_failed_step(optimizers, device)
                smaller = smaller_micro_batch(micro_bs)
                if world > 1 or not smaller:
                    raise RuntimeError(f"out of memory with micro-batch {micro_bs}" + (" under DDP (ranks cannot shrink "
                                       "independently)" if world > 1 else "") + "; lower --batch_size or --block_size, "
                                       "or use --grad_checkpoint")
                accum, micro_bs = accum * micro_bs // smaller, smaller
                log(f"out of memory at step {step}: micro-batch now {micro_bs} rows x {accum} accumulation "
                    f"(global batch unchanged)")
            if world > 1:  # SUM then divide: gloo has ReduceOp.AVG only from torch 2.8
                dist.all_reduce(loss, op=dist.ReduceOp.SUM)
                loss /= world
            if scaler is not None:
                for opt in optimizers:
                    scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            train_loss, norm = loss.item(), norm.item()
            # A non-finite loss, or a non-finite gradient without a GradScaler, is a bad step: no update
            # at all (Adam's moments would be poisoned). With a GradScaler (fp16), non-finite gradients
            # under a finite loss are an overflow of the loss scale: scaler.step skips the update and
            # scaler.update halves the scale (Micikevicius et al. 2018), which is routine, not divergence.
            if math.isfinite(train_loss) and (math.isfinite(norm) or scaler is not None):
                for opt in optimizers:
                    scaler.step(opt) if scaler is not None else opt.step()
                bad_streak = 0
            else:
                bad_streak, bad_total = bad_streak + 1, bad_total + 1
                log(f"step {step}: non-finite loss {train_loss} / grad norm {norm}; step skipped ({bad_total} so far)")
            if scaler is not None:
                scaler.update()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            train_data.rows += step_rows
            step += 1
            tokens_seen += total_tokens
            if bad_streak >= cfg.max_bad_steps:
                if reloads >= 3 or not os.path.exists(ckpt_path):
                    raise RuntimeError(f"training diverged: {bad_streak} non-finite steps in a row at step {step}"
                                       f"{' and no checkpoint to return to' if reloads < 3 else ' after 3 reloads'}; "
                                       f"lower --learning_rate or raise --warmup_steps")
                _, ck = load_checkpoint(ckpt_path)
                if ck.get("run_id", "") != run_id or ck["model_config"] != asdict(mcfg):
                    raise RuntimeError(f"training diverged at step {step} and {ckpt_path} was not written by this run, "
                                       f"so it is not reloaded; lower --learning_rate or raise --warmup_steps and "
                                       f"start again")
                raw.load_state_dict(ck["model"])
                optimizers[0].load_state_dict(ck["optimizer"])
                if len(optimizers) > 1:
                    optimizers[1].load_state_dict(ck["optimizer_muon"])
                lr_scale, bad_streak, reloads = lr_scale * 0.5, 0, reloads + 1
                log(f"reloaded {ckpt_path} (step {ck['step']}) with the learning rate scaled by {lr_scale}")
                del ck
            dt = time.time() - t0
            step_times.append(dt)
            train_time += dt
            if math.isfinite(train_loss):
                if ema is not None and step > 10 and train_loss > cfg.spike_factor * ema:
                    log(f"step {step}: loss spike {train_loss:.3f} vs running mean {ema:.3f}")
                ema = train_loss if ema is None else 0.95 * ema + 0.05 * train_loss
            if len(step_times) == 5 and step < last_step:  # a refined wall-time estimate once warmed up
                med = sorted(step_times[1:])[2]
                left = med * (last_step - step)
                if cfg.max_minutes:
                    left = min(left, cfg.max_minutes * 60 - (time.time() - t_start))
                log(f"estimated wall time: {fmt_time(left)} more (median step {1000 * med:.0f} ms)")

            # ---- log, evaluate, checkpoint
            is_last = step == last_step
            if step % cfg.log_interval == 0 or is_last or step == 1:
                # rates over the steps since the last line, on the training clock: evaluation,
                # sampling and checkpoint writes in between do not count as training time
                tps = (tokens_seen - logged[1]) / max(train_time - logged[0], 1e-9)
                logged = (train_time, tokens_seen)
                mfu = raw.estimate_mfu(tps / world, device)
                elapsed = time.time() - t_start
                eta = (last_step - step) * sum(step_times[-10:]) / len(step_times[-10:])
                if cfg.max_minutes:
                    eta = min(eta, max(0.0, cfg.max_minutes * 60 - elapsed))
                log(f"step {step}/{cfg.max_steps} | loss {train_loss:.4f} | lr {optimizers[0].param_groups[0]['lr']:.2e} | "
                    f"norm {norm:.3f} | {tps:,.0f} tok/s" + (f" | mfu {100 * mfu:.1f}%" if mfu else "") +
                    f" | {fmt_time(elapsed)} elapsed, eta {fmt_time(eta)}")
                history["train"].append([tokens_seen, train_loss])
                if master:
                    with open(os.path.join(cfg.out_dir, "log.jsonl"), "a") as f:
                        f.write(json.dumps({"step": step, "tokens": tokens_seen, "loss": train_loss, "norm": norm,
                                            "lr": optimizers[0].param_groups[0]["lr"], "tok_per_s": tps,
                                            "mfu": mfu, "time": elapsed, "train_time": train_time,
                                            "skipped": bad_total}) + "\n")
                if wb:
                    wb.log({"train/loss": train_loss, "lr": optimizers[0].param_groups[0]["lr"], "grad_norm": norm}, step=step)
            if step % cfg.eval_interval == 0 or is_last:  # a stop between evals is evaluated after the loop
                val_loss, val_bpb = evaluate()
                history["val"].append([tokens_seen, val_loss, val_bpb])
                improved = val_loss < best_val
                best_val = min(best_val, val_loss)
                best_step = step if improved else best_step
                log(f"eval step {step}: val loss {val_loss:.4f}, {val_bpb:.4f} bits/byte" + (" (best)" if improved else "")
                    + f" | {fmt_time(time.time() - t_start)}")
                if master:
                    with open(os.path.join(cfg.out_dir, "log.jsonl"), "a") as f:
                        f.write(json.dumps({"step": step, "tokens": tokens_seen, "val_loss": val_loss, "val_bpb": val_bpb,
                                            "time": time.time() - t_start}) + "\n")
                    if cfg.sample_tokens:
                        log("sample: " + repr(sample_text()[:300]))
                    save_run(improved)
                if wb:
                    wb.log({"val/loss": val_loss, "val/bpb": val_bpb}, step=step)
        if history["val"] and history["val"][-1][0] == tokens_seen:  # the last step was evaluated (or resumed at the end)
            val_loss, val_bpb = history["val"][-1][1], history["val"][-1][2]
        else:  # stopped between evaluations: measure and save where we are, best.pt too if it is the best
            val_loss, val_bpb = evaluate()
            history["val"].append([tokens_seen, val_loss, val_bpb])
            improved = val_loss < best_val
            best_val = min(best_val, val_loss)
            best_step = step if improved else best_step
            log(f"eval step {step}: val loss {val_loss:.4f}, {val_bpb:.4f} bits/byte" + (" (best)" if improved else ""))
            if master:
                save_run(improved)
        log(f"done: {reason} at step {step}; val loss {val_loss:.4f}, {val_bpb:.4f} bits/byte, best {best_val:.4f}; "
            f"{fmt_time(time.time() - t_start)}; checkpoint in {ckpt_path}")
        if wb:
            wb.finish()
        return {"step": step, "train_loss": train_loss, "val_loss": val_loss, "val_bpb": val_bpb, "best_val_loss": best_val,
                "tokens_seen": tokens_seen, "skipped_steps": bad_total, "batch_size": micro_bs, "grad_accum": accum,
                "time_s": time.time() - t_start, "stop_reason": reason, "out_dir": cfg.out_dir}


# -----------------------------------------------------------------------------
# Command line


def main(argv=None) -> None:
    cfg = parse_config(TrainConfig, argv)
    try:
        train(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
