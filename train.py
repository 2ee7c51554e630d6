"""
Pretraining: the loop that turns prepared token shards into a GPT checkpoint.

Run it:
    python train.py                                   # prepare data/pystdlib if missing, train
    python train.py --max_steps=50 --eval_interval=25 # a quick CPU smoke run
    python prepare.py --dataset=shakespeare           # then, on Tiny Shakespeare, 70 s:
    python train.py --dataset=shakespeare --max_minutes=1.2
    python train.py --preset=gpt2 --batch_size=16     # a model.py preset (GPU-sized; slow on a CPU)
    python train.py --dataset=path/to/fineweb10B --tokenizer=gpt2  # llm.c's FineWeb shards as is
    python train.py --resume                          # continue out/ckpt.pt where it stopped
    torchrun --standalone --nproc_per_node=8 train.py # DDP: NCCL on GPUs, gloo on CPUs
    python train.py -h                                # every option with its meaning

What one step does: total_batch_size tokens are split into micro-batches (gradient
accumulation x processes), the gradients are averaged, clipped at 1.0 and applied by AdamW
(or Muon for the hidden matrices), with linear warmup then cosine or warmup-stable-decay.
Every eval_interval (and once more when a run stops early) the validation loss and bits per
byte are measured, a sample is printed, out/ckpt.pt (and best.pt on improvement) is written
durably (fsync, rename, fsync: a kill or a power loss leaves the previous file) and out/loss.svg
is redrawn. A fresh run into a used out_dir first removes the earlier run's files.

How the file reads, top to bottom: the configuration and its per-device defaults; the device
and processes; the data (windows over token shards); evaluation; the model and optimizers
(AdamW, Muon); one step's gradients with the out-of-memory fallback; checkpoints; logs and the
loss plot; then the run itself, as named phases that `train()` calls in a short loop:

    setup_run          device, data, model, optimizers, out_dir, --resume, compile and DDP
    check_stop         a signal or the --max_minutes budget ends the run between steps
    train_step         one optimizer step: lr, gradients, clip, the non-finite guard
    log_progress       a console line and a log.jsonl row, on the training clock
    evaluate_and_save  validation loss and bits per byte, a sample, ckpt.pt, best.pt, loss.svg

The phases take the Run they advance as an argument, so finetune.py drives the same steps
with its own batches (train_step's batch_fn) instead of copying the loop.

Sources: nanoGPT train.py and llm.c train_gpt2.py (loop structure, accumulation and DDP
sync on the last micro-step, MFU); Loshchilov & Hutter 2019 (AdamW); Hoffmann et al. 2022
(Chinchilla, ~20 tokens per parameter); Hagele et al. 2024 and Hu et al. 2024 (MiniCPM) for
warmup-stable-decay; Jordan et al. 2024 and Liu et al. 2025 ("Muon is Scalable") for Muon;
Chen et al. 2016 (activation checkpointing); Micikevicius et al. 2018 (loss scaling for fp16).
"""

import atexit
import contextlib
import datetime
import gc
import json
import math
import os
import pickle  # only for its exception type: nothing here unpickles
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist

from model import GPT, PRESETS, GPTConfig, peak_flops
from prepare import PrepareConfig, open_shard, prepare
from tokenizer import FILE_HEADER, Tokenizer, atomic_write, file_sha256, parse_config

# -----------------------------------------------------------------------------
# Configuration

# One field per option, `--key=value` on the command line; the trailing comment is its -h text.
# 0, "" and -1 mean "the device default" (DEVICE_DEFAULTS below) or "the preset's value".


@dataclass
class TrainConfig:
    # data and outputs
    dataset: str = "pystdlib"  # prepared dir, dir of llm.c shards, or name/file/URL for prepare.py
    tokenizer: str = ""  # llm.c shards only: "gpt2" (tiktoken), a .tiktoken ranks file, a .bpe
    data_dir: str = "data"  # where prepare.py keeps its datasets
    out_dir: str = "out"  # ckpt.pt, best.pt, log.jsonl, loss.svg, config.json, tokenizer.bpe
    sampling: str = "random"  # "random" windows, or "sequential" non-overlapping ones in order
    # model: 0, "" or -1 keep the preset's value
    preset: str = ""  # a model.py PRESETS name; "" = CPU_MODEL on a CPU, gpt2 on CUDA
    block_size: int = 0  # context length in tokens
    n_layer: int = 0  # transformer blocks
    n_head: int = 0  # query heads
    n_kv_head: int = 0  # key/value heads (fewer than n_head = grouped-query attention)
    n_embd: int = 0  # channels C
    norm: str = ""  # "layernorm" or "rmsnorm"
    mlp: str = ""  # "gelu" or "swiglu"
    pos: str = ""  # "learned" or "rope"
    dropout: float = -1.0  # dropout probability; -1 keeps the preset's
    pad_vocab: int = 64  # round the vocabulary up to a multiple of this (faster matmuls)
    # batch
    batch_size: int = 0  # micro-batch rows per process; halved by itself on CUDA out-of-memory
    total_batch_size: int = 0  # tokens per optimizer step; 0 = one micro-batch per process
    # optimizer and schedule
    optimizer: str = ""  # "adamw", or "muon" (Muon on hidden matrices, AdamW on the rest)
    learning_rate: float = 0.0  # peak learning rate
    muon_lr: float = 0.0  # peak Muon lr (RMS-matched to AdamW's); 0 = learning_rate
    min_lr_ratio: float = -1.0  # the schedule ends at learning_rate * min_lr_ratio
    warmup_steps: int = -1  # linear warmup steps
    schedule: str = ""  # "cosine", or "wsd" (warmup, stable, linear decay over decay_frac)
    decay_frac: float = 0.0  # wsd: the final fraction of training spent decaying
    weight_decay: float = 0.1  # decoupled weight decay, on matrices only (model.param_groups)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.0  # AdamW beta2 (0.95 for big batches as in GPT-3; 0.99 for tiny ones)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    # length
    max_steps: int = 0  # optimizer steps
    max_minutes: float = 0.0  # wall-time budget, the lr annealing on the clock; 0 = none
    stop_step: int = 0  # stop with a checkpoint at this step, schedule unchanged; 0 = max_steps
    # evaluation and logging
    eval_interval: int = 0  # steps between evaluations and checkpoints
    eval_batches: int = 20  # validation micro-batches per evaluation (fixed windows)
    log_interval: int = 0  # steps between console lines (and log.jsonl rows)
    sample_tokens: int = 48  # tokens sampled at each evaluation (0 = no sample)
    wandb: bool = False  # also log to Weights & Biases (needs `pip install wandb`)
    wandb_project: str = "gpt"  # wandb project name
    # system
    device: str = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1", "mps"
    dtype: str = "auto"  # "auto", float32, bfloat16, float16 (see choose_device)
    compile: str = "auto"  # torch.compile the model: "auto" (CUDA only), "true", "false"
    grad_checkpoint: bool = False  # recompute activations in backward: less memory, ~30% slower
    # torchrun: "ddp" replicas; "fsdp" shards of every tensor (FSDP2); "pipeline" one stage of
    # consecutive blocks per process (see "Scale-out" below for when to switch)
    parallel: str = "ddp"  # "ddp", "fsdp" or "pipeline"
    fsdp_offload: bool = False  # fsdp on GPUs: shards, gradients, AdamW state in CPU memory
    pipeline_schedule: str = "1f1b"  # pipeline: "1f1b" (<= S micro-batches held) or "gpipe"
    seed: int = 1337  # seeds the initial weights, dropout and the data order
    dist_timeout_s: float = 600.0  # torchrun: a process waiting this long on another stops
    resume: bool = False  # continue out_dir/ckpt.pt; without it, start afresh there
    # stability
    max_bad_steps: int = 3  # non-finite steps in a row before reloading at half the lr
    spike_factor: float = 1.5  # log a loss spike above this times the running mean


# Per-device defaults for the fields left at their "device default" values. CPU: a small
# Llama-style model (RMSNorm, SwiGLU, RoPE, tied embeddings) trained with Muon on the hidden
# matrices, 16 x 64 tokens a step, lr 4e-3 held, then decayed linearly over the last 40%
# (warmup-stable-decay). Chosen by wall clock on Tiny Shakespeare (70 s runs, README
# "Measurements"): Muon beat AdamW by ~0.1 bits/byte at equal time once its Newton-Schulz
# iteration ran in fp32 (Muon32); 16 rows a step beat 8 and 32; wsd beat cosine; lr 4e-3 and
# 6e-3 tied, 2-3e-3 lost. 2000 steps take about 5 minutes on 2 cores. CUDA: GPT-2 small
# with AdamW and 256K-token batches; pystdlib is only ~8.5M tokens, so the run is ~12 epochs
# with dropout and best.pt keeps the best validation loss.
CPU_MODEL = dict(block_size=64, n_layer=4, n_head=4, n_kv_head=4, n_embd=128, norm="rmsnorm",
                 mlp="swiglu", pos="rope", rope_theta=10000.0, bias=False, dropout=0.0,
                 tie_embeddings=True)
DEVICE_DEFAULTS = {
    "cpu": dict(optimizer="muon", batch_size=16, learning_rate=4e-3, warmup_steps=20,
                max_steps=2000, schedule="wsd", decay_frac=0.4, eval_interval=250,
                min_lr_ratio=0.0, beta2=0.99, log_interval=50),
    "cuda": dict(preset="gpt2", optimizer="adamw", batch_size=32, total_batch_size=2**18,
                 learning_rate=6e-4, warmup_steps=40, max_steps=400, schedule="cosine",
                 decay_frac=0.2, eval_interval=50, min_lr_ratio=0.1, beta2=0.95, dropout=0.1,
                 log_interval=10),
}


def resolve_config(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """Fill the fields left at their "device default" values from DEVICE_DEFAULTS; validate."""
    defaults = DEVICE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    # a field still at its declared default means "use the device default"
    unset = {f.name: f.default for f in fields(TrainConfig)}
    explicit_muon = cfg.optimizer == "muon"
    for key, value in defaults.items():
        if getattr(cfg, key) == unset[key]:
            setattr(cfg, key, value)
    for key, allowed in (("sampling", ("random", "sequential")), ("optimizer", ("adamw", "muon")),
                         ("schedule", ("cosine", "wsd")), ("compile", ("auto", "true", "false")),
                         ("parallel", PARALLEL_MODES), ("pipeline_schedule", ("1f1b", "gpipe"))):
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"--{key}={getattr(cfg, key)} is not one of {', '.join(allowed)}")
    if cfg.batch_size < 1 or cfg.max_steps < 1 or cfg.learning_rate <= 0:
        raise ValueError("--batch_size and --max_steps must be at least 1 and --learning_rate "
                         "positive")
    if cfg.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        if explicit_muon:
            raise RuntimeError(f"--optimizer=muon needs torch.optim.Muon (torch >= 2.9); this is "
                               f"torch {torch.__version__}")
        cfg.optimizer = "adamw"  # the CPU default asked for Muon, but this torch predates it
    if cfg.schedule == "wsd" and not 0 < cfg.decay_frac <= 1:
        raise ValueError(f"--decay_frac={cfg.decay_frac} must be in (0, 1]: the fraction of the "
                         f"steps spent decaying")
    cfg.warmup_steps = min(cfg.warmup_steps, cfg.max_steps)
    return cfg


# Test hooks (see test_all.py): a CUDA-style out-of-memory error on the next `oom` micro-steps,
# and a NaN loss at the listed steps. Never set in normal runs. A test cannot reach into the
# processes torchrun starts, so the two for DDP come from the environment as "RANK:STEP":
# TRAIN_TEST_EXIT=1:1 makes rank 1 exit hard after step 1 (a crash, a lost node),
# TRAIN_TEST_HANG=1:1 makes it stop answering instead (a stuck GPU, a deadlock).
def _rank_step(name: str) -> tuple | None:
    value = os.environ.get(name, "")
    return tuple(int(v) for v in value.split(":")) if value else None


FAULTS = {"oom": 0, "nan_steps": (), "exit": _rank_step("TRAIN_TEST_EXIT"),
          "hang": _rank_step("TRAIN_TEST_HANG")}


def fault_after_step(rank: int, step: int) -> None:
    """Act out FAULTS["exit"] or FAULTS["hang"] when they name this rank and step."""
    if FAULTS["exit"] == (rank, step):
        os._exit(3)  # no cleanup and no goodbye to the process group, as in a real crash
    if FAULTS["hang"] == (rank, step):
        time.sleep(3600)  # alive, holding its connections, silent: only a timeout notices

# -----------------------------------------------------------------------------
# Device, dtype and processes

# Decided once, printed with the reason (STYLE rule 8). Under torchrun each process reads its
# rank from the environment, takes one GPU (LOCAL_RANK) and joins the process group.


def choose_device(cfg: TrainConfig, local_rank: int = 0) -> tuple[torch.device, torch.dtype, str]:
    """Decide device and compute dtype once; returns (device, dtype, reason). Never touches
    CUDA without it. "auto" dtype: bf16 autocast on GPUs of compute capability 8.0 or newer,
    fp16 autocast with a GradScaler below that, fp32 on CPUs and Apple's MPS."""
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
            raise RuntimeError(f"--device={name} was asked for but this torch build sees no CUDA "
                               f"GPU; use --device=cpu")
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
        # (7.0) and T4 (7.5), whose bf16 is emulated and slow; bf16 tensor cores start at
        # Ampere (8.0)
        capability = f"compute capability {major}.{minor}"
        if major >= 8:
            return device, torch.bfloat16, why + f"; bf16 autocast ({capability})"
        return device, torch.float16, why + f"; fp16 autocast, GradScaler ({capability}: no bf16)"
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
        one_gb = 1 << 30
        mmap_set = libc.mallopt(M_MMAP_THRESHOLD, one_gb)  # blocks under 1 GB come from the heap
        return bool(mmap_set and libc.mallopt(M_TRIM_THRESHOLD, one_gb))  # and stay there
    # not glibc (macOS, Windows, musl without mallopt): nothing to do
    except (OSError, AttributeError):
        return False


def setup_distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) for a plain run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world


def start_processes(cfg: TrainConfig) -> tuple[int, int, torch.device, torch.dtype, str]:
    """This process's (rank, world, device, dtype, reason), with the process group joined
    under torchrun and TF32 allowed on CUDA. NCCL talks GPU to GPU; gloo is PyTorch's CPU
    backend, which is how the tests run two processes on a laptop."""
    rank, local_rank, world = setup_distributed()
    device, dtype, why = choose_device(cfg, local_rank)
    if world > 1 and not dist.is_initialized():
        # subtle: the timeout is how a dead or stuck process is noticed. Without one, the others
        # wait in their next collective for torch's default, 10 minutes under NCCL and 30 under
        # gloo, holding their GPUs; with it, gloo raises in the waiting process, and NCCL's
        # watchdog aborts the collective and takes the process down (the init_process_group
        # docs). It must exceed the longest gap between two collectives: rank 0 writing
        # ckpt.pt while the others wait, the first step's torch.compile. finetune.py's config
        # has no dist_timeout_s, hence the default.
        seconds = getattr(cfg, "dist_timeout_s", TrainConfig.dist_timeout_s)
        if not seconds > 0:  # checked here: resolve_config runs after the group is joined
            raise ValueError(f"--dist_timeout_s={seconds} must be positive: the seconds a "
                             f"process waits on another before it stops")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=seconds))
    if device.type == "cuda":
        # TF32 for any fp32 matmul left outside autocast
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu" and keep_freed_memory():
        why += "; malloc keeps freed memory (fewer page faults)"
    return rank, world, device, dtype, why

# -----------------------------------------------------------------------------
# Data: fixed-length windows over llm.c-format shards

# prepare.py wrote each split as shards of token ids, every document starting with
# <|endoftext|>. Training reads windows of block_size + 1 tokens straight from memory-mapped
# shards: the first block_size are the inputs, the last block_size the targets (the same
# tokens shifted by one), so every position learns to predict its next token.


def bits_per_byte(loss_nats: float, tokens: int, n_bytes: int) -> float:
    """Convert a mean per-token loss (nats) into bits per UTF-8 byte: loss / ln 2 * tokens / bytes.
    Tokenizer-independent, so a char model and a BPE model can be compared: nanoGPT's Tiny
    Shakespeare char model at 1.88 nats/char is 2.72 bits/byte (one byte per char there)."""
    return loss_nats / math.log(2) * tokens / n_bytes


def load_meta(data_dir: str) -> dict:
    """prepare.py's meta.json of data_dir, checked for the fields this file reads."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; run `python prepare.py` (or pass "
                                f"--dataset=NAME) first")
    try:
        with open(path) as f:
            meta = json.load(f)
        meta["vocab_size"], meta["splits"]["train"]["shards"], meta["splits"]["val"]["shards"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid prepare.py meta.json ({e!r}); re-run prepare.py "
                         f"with --force") from None
    return meta


class TokenWindows:
    """Windows of block_size+1 tokens (inputs plus shifted targets) from one split's shards.

    The data position is a row counter: row i of the run is a pure function of (seed, i), so
    resuming needs only the counter, and splitting a step's rows into micro-batches, processes
    or a halved micro-batch after an OOM always yields the same global batch."""

    def __init__(self, data_dir: str, meta: dict, split: str, block_size: int, seed: int,
                 vocab_size: int = 0):
        self.T, self.seed = block_size, seed
        files = meta["splits"][split]["shards"]
        if not files:
            raise ValueError(f"{data_dir}/meta.json lists no {split} shards; re-run prepare.py "
                             f"with --force")
        # memory-mapped: nothing is read until a window is sliced, so shards may exceed RAM
        self.shards = [open_shard(os.path.join(data_dir, f)) for f in files]
        # a shard of another tokenizer: ids past the vocabulary train on rows that mean nothing
        # (or crash the embedding); its first million tokens tell, for ~2 MB of reading per shard
        for f, s in zip(files, self.shards):
            top = int(s[:1_000_000].max()) if len(s) else 0
            if vocab_size and top >= vocab_size:
                raise ValueError(f"shard {os.path.join(data_dir, f)} holds token id {top}, but "
                                 f"the tokenizer has only {vocab_size} ids; HINT: it was made with "
                                 f"another tokenizer, rerun prepare.py with --force.")
        # a window starting at p reads tokens p .. p+T, so a shard of n tokens has n-T starts
        lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.starts = np.maximum(0, lengths - block_size)  # random windows may start anywhere
        self.chunks = np.maximum(0, (lengths - 1) // block_size)  # sequential ones tile the shard
        if self.starts.sum() == 0:
            longest = max(len(s) for s in self.shards)
            raise ValueError(f"the {split} split of {data_dir} has at most {longest} tokens per "
                             f"shard, too few for block_size={block_size}; lower --block_size or "
                             f"prepare more data")
        self.cum_starts, self.cum_chunks = np.cumsum(self.starts), np.cumsum(self.chunks)
        self.rows = 0  # rows consumed so far: the resumable data position

    def _window(self, cum: np.ndarray, k: int, stride: int) -> np.ndarray:
        # which shard holds global start number k (cum is the running total of starts per shard)
        shard = int(np.searchsorted(cum, k, side="right"))
        offset = (k - (int(cum[shard - 1]) if shard else 0)) * stride
        return np.asarray(self.shards[shard][offset:offset + self.T + 1], dtype=np.int64)

    def rows_at(self, first_row: int, lo: int, hi: int, step_rows: int,
                sampling: str) -> np.ndarray:
        """Rows lo..hi of the step whose first row is first_row, as an int64 array (hi-lo, T+1)."""
        # "random": windows anywhere, with overlaps, as nanoGPT samples (an epoch is a notion of
        # expectation only); "sequential": each token is seen once per epoch, in order
        if sampling == "random":
            # subtle: one generator per step keyed by its first row, drawing all step_rows starts,
            # then slicing: the same global batch whatever the micro-batch size or process count
            rng = np.random.default_rng([self.seed, first_row])
            starts = rng.integers(0, int(self.cum_starts[-1]), size=step_rows)
            return np.stack([self._window(self.cum_starts, int(k), 1) for k in starts[lo:hi]])
        # sequential: non-overlapping windows in order, wrapping each epoch
        n = int(self.cum_chunks[-1])
        rows = [self._window(self.cum_chunks, (first_row + r) % n, self.T) for r in range(lo, hi)]
        return np.stack(rows)

    def fixed_windows(self, count: int) -> np.ndarray:
        """`count` non-overlapping windows spread evenly over the split: the validation set."""
        n = int(self.cum_chunks[-1])
        if n == 0:
            raise ValueError(f"the validation split is shorter than block_size={self.T}+1 tokens; "
                             f"lower --block_size")
        # fixed, not random: every evaluation scores the same text, so successive losses are
        # comparable and their noise is the model's, not the sample's
        picks = np.unique(np.linspace(0, n - 1, num=min(count, n)).round().astype(np.int64))
        return np.stack([self._window(self.cum_chunks, int(k), self.T) for k in picks])


def to_device(rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) on the device from (B, T+1) rows: targets are the inputs shifted by one."""
    t = torch.from_numpy(rows)
    if device.type == "cuda":  # pinned host memory lets the copy overlap with compute
        t = t.pin_memory().to(device, non_blocking=True)
    else:
        t = t.to(device)
    return t[:, :-1], t[:, 1:]  # inputs (B, T), targets (B, T)


def find_dataset(cfg: TrainConfig) -> str:
    """The dataset directory; runs prepare.py in-process when a named dataset is missing."""
    if os.path.isfile(os.path.join(cfg.dataset, "meta.json")):
        return cfg.dataset
    if os.path.isdir(cfg.dataset) and any(n.endswith(".bin") for n in os.listdir(cfg.dataset)):
        return cfg.dataset  # a prepared folder that lost its meta.json: load_meta says so
    path = os.path.join(cfg.data_dir, cfg.dataset)
    if not os.path.isfile(os.path.join(path, "meta.json")):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # N processes must not prepare it N times
            raise FileNotFoundError(f"{path}/meta.json is missing; run `python prepare.py "
                                    f"--dataset={cfg.dataset}` once before launching torchrun")
        print(f"{path}/meta.json not found: preparing the {cfg.dataset} dataset first (python "
              f"prepare.py --dataset={cfg.dataset})")
        path = prepare(PrepareConfig(dataset=cfg.dataset, out_dir=cfg.data_dir))
    return path


def load_dataset(cfg: TrainConfig) -> tuple[str, dict, str, Tokenizer]:
    """(data_dir, meta, tokenizer path, tokenizer), checked to agree with each other: a shard
    is only meaningful with the tokenizer that wrote it. meta.json records the tokenizer's
    sha256, so a tokenizer file edited or replaced after prepare.py ran is caught here.
    A directory of llm.c shards without meta.json is read by load_llmc_dataset instead."""
    llmc = find_llmc_dataset(cfg)
    if llmc:
        return load_llmc_dataset(*llmc, cfg.tokenizer)
    if cfg.tokenizer:  # checked before find_dataset, which may spend minutes in prepare.py
        raise ValueError(f"--tokenizer={cfg.tokenizer} is for a directory of llm.c shards without "
                         f"meta.json, and --dataset={cfg.dataset} is not one (prepare.py's "
                         f"datasets train with their own tokenizer.bpe); drop --tokenizer")
    data_dir = find_dataset(cfg)
    meta = load_meta(data_dir)
    tok_path = os.path.join(data_dir, meta.get("tokenizer_file", "tokenizer.bpe"))
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"{tok_path} is missing; re-run prepare.py for {data_dir} with "
                                f"--force")
    if meta.get("tokenizer_sha256") and file_sha256(tok_path) != meta["tokenizer_sha256"]:
        raise ValueError(f"{tok_path} is not the tokenizer that produced {data_dir}'s shards "
                         f"(sha256 differs); re-run prepare.py with --force")
    tok = Tokenizer.load(tok_path)
    if tok.n_vocab != meta["vocab_size"]:
        raise ValueError(f"{tok_path} has {tok.n_vocab} tokens but {data_dir}/meta.json says "
                         f"{meta['vocab_size']}; re-run prepare.py with --force")
    return data_dir, meta, tok_path, tok


# llm.c's shards as they are. karpathy/llm.c (dev/data/fineweb.py) and modded-nanogpt's FineWeb
# download (data/cached_fineweb10B.py) write the same format as prepare.py (magic 20240520,
# uint16), named NAME_val_000000.bin (the first shard written is the validation split) and
# NAME_train_000001.bin onwards, or NAME_val.bin / NAME_train.bin for the small sets
# (tiny_shakespeare, TinyStories). Their ids are tiktoken's GPT-2 ids, each document opening
# with <|endoftext|> as here. They come without meta.json and tokenizer.bpe, so the two things
# those would say are rebuilt: the vocabulary from --tokenizer, and the validation split's
# bytes of text (for bits per byte) by decoding it, counted once and cached beside the shards.
LLMC_SHARD_NAME = re.compile(r"(?P<name>.+)_(?P<split>train|val)(?:_\d+)?\.bin")
VAL_BYTES_FILE = "val_bytes.json"  # the cached count, beside the shards
# GPT-2's ranks as one .tiktoken file: tiktoken's r50k_base, the same ranks as its gpt2
GPT2_RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"


def llmc_shards(folder: str) -> dict | None:
    """The llm.c-named shards of folder by split, or None when it has none or has a meta.json.
    Example: llmc_shards("fineweb10B") -> {"train": ["fineweb_train_000001.bin", ...],
    "val": ["fineweb_val_000000.bin"]} (sorted: the zero-padded indices sort in order)."""
    if not os.path.isdir(folder) or os.path.exists(os.path.join(folder, "meta.json")):
        return None
    found = {"train": [], "val": []}
    for name in sorted(os.listdir(folder)):
        match = LLMC_SHARD_NAME.fullmatch(name)
        if match:
            found[match["split"]].append(name)
    return found if found["train"] or found["val"] else None


def find_llmc_dataset(cfg: TrainConfig) -> tuple[str, dict] | None:
    """(folder, shards by split) when --dataset names a folder of llm.c shards, as a path or
    inside --data_dir (data/fineweb10B), in find_dataset's order; else None."""
    for folder in (cfg.dataset, os.path.join(cfg.data_dir, cfg.dataset)):
        if os.path.isfile(os.path.join(folder, "meta.json")):
            return None  # prepared by prepare.py: its own path, untouched
        found = llmc_shards(folder)
        if found:
            return folder, found
    return None


def load_tokenizer(spec: str, data_dir: str) -> Tokenizer:
    """The --tokenizer that llm.c shards were written with: "gpt2" (tiktoken's, downloaded once
    into its cache), a tokenizer.py file, or a tiktoken ranks file read with GPT-2's conventions
    (the gpt2 split pattern, <|endoftext|> the id right after the last rank: 50256 for GPT-2).
    Example: load_tokenizer("r50k_base.tiktoken", "fineweb10B").eot_id -> 50256."""
    if not spec:
        raise ValueError(f"{data_dir} holds llm.c shards and no meta.json, so nothing says which "
                         f"tokenizer wrote them; pass --tokenizer=gpt2 (llm.c's and "
                         f"modded-nanogpt's FineWeb shards) or --tokenizer=PATH to its .tiktoken "
                         f"ranks file or .bpe")
    if os.path.isfile(spec):
        with open(spec, "rb") as f:
            is_ours = f.readline().rstrip(b"\r\n") == FILE_HEADER.encode()
        if is_ours:
            return Tokenizer.load(spec)
        # subtle: a ranks file holds no special tokens; GPT-2's one special follows its ranks
        ranks = Tokenizer.from_ranks_file(spec).ranks
        return Tokenizer(ranks, "gpt2", {"<|endoftext|>": max(ranks.values()) + 1},
                         name=os.path.basename(spec))
    if spec != "gpt2":
        raise FileNotFoundError(f"--tokenizer={spec} is neither a file nor gpt2; pass the "
                                f"tokenizer {data_dir}'s shards were written with")
    try:
        return Tokenizer.from_tiktoken("gpt2")
    except RuntimeError:  # offline, with no cached copy: say where the file goes instead
        local = os.path.join(data_dir, "gpt2.tiktoken")
        raise RuntimeError(f"tiktoken could not load gpt2 (it downloads GPT-2's ranks on first "
                           f"use, and found none in its cache): download {GPT2_RANKS_URL} where "
                           f"there is network, put it at {local} and pass --tokenizer={local}, or "
                           f"set TIKTOKEN_CACHE_DIR to a tiktoken cache that has gpt2") from None


def _check_ids(path: str, ids: np.ndarray, tok: Tokenizer, spec: str) -> None:
    """Fail with one sentence when a shard's ids go past the tokenizer's vocabulary."""
    top = int(ids.max()) if len(ids) else 0
    if top >= tok.n_vocab:
        raise ValueError(f"shard {path} holds token id {top}, but --tokenizer={spec} has only "
                         f"{tok.n_vocab} ids; HINT: pass the tokenizer the shards were written "
                         f"with (--tokenizer=gpt2 for llm.c's GPT-2 shards).")


def count_text_bytes(paths: list, shards: list, tok: Tokenizer, spec: str = "") -> dict:
    """{"tokens", "bytes", "documents"} of token shards. bytes is prepare.py's definition, the
    UTF-8 bytes of the text that was tokenized: what the ids decode to (tok.decode_bytes), with
    special tokens (<|endoftext|>) counting none, as they mark documents and are no text.
    documents counts the <|endoftext|> ids. Example with GPT-2's tokenizer:
    [50256, 15496, 995] ("<|endoftext|>", "Hello", " world") -> tokens 3, bytes 11, documents 1."""
    length = np.zeros(tok.n_vocab, dtype=np.int64)  # id -> bytes it decodes to (0: special, gap)
    for token_bytes, i in tok.ranks.items():
        length[i] = len(token_bytes)
    counts = np.zeros(tok.n_vocab, dtype=np.int64)  # id -> occurrences
    for path, ids in zip(paths, shards):
        # a histogram of ids, never the text itself, so a 100M-token val shard is one fast pass;
        # in slices, as bincount widens its input to 8 bytes a token
        for lo in range(0, len(ids), 1 << 24):
            part = ids[lo:lo + (1 << 24)]
            _check_ids(path, part, tok, spec)  # the whole split, not a sample, is read here
            counts += np.bincount(part, minlength=tok.n_vocab)
    return {"tokens": int(counts.sum()), "bytes": int(counts @ length),
            "documents": int(counts[tok.eot_id])}


def val_split_bytes(data_dir: str, files: list, tok: Tokenizer, tok_sha256: str,
                    spec: str = "") -> dict:
    """count_text_bytes of the val shards, from data_dir/val_bytes.json when that was counted
    for these very shards (name, size, mtime, as make judges a file) and this tokenizer (the
    sha256 of its tokenizer.bpe form), else counted now and cached there for the next run. A
    read-only data_dir only costs the count at every start (one warning line).
    Example: val_split_bytes("fineweb10B", ["fineweb_val_000000.bin"], tok, sha)
    -> {"tokens": 100000000, "bytes": ..., "documents": ...}."""
    path = os.path.join(data_dir, VAL_BYTES_FILE)
    paths = [os.path.join(data_dir, f) for f in files]
    stats = [os.stat(p) for p in paths]
    key = {"shards": [[f, st.st_size, st.st_mtime_ns] for f, st in zip(files, stats)],
           "tokenizer_sha256": tok_sha256}
    counts = ("tokens", "bytes", "documents")
    try:
        with open(path) as f:
            cached = json.load(f)
        if all(cached[k] == v for k, v in key.items()) and all(
                isinstance(cached[k], int) and cached[k] >= 0 for k in counts):
            return {k: cached[k] for k in counts}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent, damaged or stale: count again, and replace it
    t0 = time.time()
    counted = count_text_bytes(paths, [open_shard(p) for p in paths], tok, spec)
    # under torchrun every process counts, one writes (atomic_write's temporary name is shared)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"counted the val split's text: {counted['bytes']:,} bytes in {counted['tokens']:,} "
              f"tokens ({time.time() - t0:.1f}s)")
        try:
            write_text(path, json.dumps({**key, **counted}, indent=1))
        except OSError as e:
            print(f"warning: could not cache the val byte count in {path} ({e.strerror}); it is "
                  f"counted again at every start", file=sys.stderr)
    return counted


def _saved_tokenizer(tok: Tokenizer) -> str:
    """tok in tokenizer.py's format, in a temporary file removed at exit: the run copies it into
    out_dir and checks its sha256 on --resume, as it does a prepared dataset's tokenizer.bpe."""
    folder = tempfile.mkdtemp(prefix="train-tokenizer-")
    atexit.register(shutil.rmtree, folder, True)
    path = os.path.join(folder, "tokenizer.bpe")
    tok.save(path)
    return path


def load_llmc_dataset(data_dir: str, found: dict, spec: str) -> tuple[str, dict, str, Tokenizer]:
    """load_dataset for a folder of llm.c shards (found: llmc_shards): the tokenizer from
    --tokenizer, every shard's first million ids checked against its vocabulary, and a meta dict
    in prepare.py's shape, so the rest of the run reads it alike (the train split's bytes are not
    needed). Example: load_llmc_dataset("fineweb10B", llmc_shards("fineweb10B"), "gpt2")."""
    for split, example in (("val", "fineweb_val_000000.bin"),
                           ("train", "fineweb_train_000001.bin")):
        if not found[split]:
            raise FileNotFoundError(f"{data_dir} has llm.c shards but no {split} shard "
                                    f"(NAME_{split}_NNNNNN.bin, e.g. {example}); download it too "
                                    f"(modded-nanogpt's cached_fineweb10B.py gets the val shard "
                                    f"first) or point --dataset at a folder with both splits")
    tok = load_tokenizer(spec, data_dir)
    tok_path = _saved_tokenizer(tok)
    tokens = {}
    for split in ("train", "val"):
        tokens[split] = 0
        for f in found[split]:
            path = os.path.join(data_dir, f)
            ids = open_shard(path)
            # a sample, as TokenWindows takes (~2 MB read per shard): the wrong --tokenizer shows.
            # The val split is also read whole when its bytes are counted (a cached count was
            # made, and so checked, with these very shards and this tokenizer)
            _check_ids(path, ids[:1_000_000], tok, spec)
            tokens[split] += len(ids)
    val = val_split_bytes(data_dir, found["val"], tok, file_sha256(tok_path), spec)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"llm.c shards in {data_dir}: {len(found['train'])} train ({tokens['train']:,} "
              f"tokens), {len(found['val'])} val ({val['tokens']:,} tokens, {val['bytes']:,} bytes "
              f"of text); tokenizer {spec} ({tok.n_vocab} ids)")
    splits = {"train": {"shards": found["train"], "tokens": tokens["train"]},
              "val": {"shards": found["val"], **val}}
    return data_dir, {"format": "llm.c", "vocab_size": tok.n_vocab, "splits": splits}, tok_path, tok


# -----------------------------------------------------------------------------
# Evaluation

# The validation loss is the mean next-token cross-entropy on held-out windows. Its value in
# nats depends on the tokenizer (a bigger vocabulary packs more text in a token), so it is
# also reported in bits per byte of text, which compares across tokenizers.


@torch.no_grad()
def evaluate_windows(model, windows: np.ndarray, batch_size: int, device, ctx=None,
                     rank: int = 0, world: int = 1) -> tuple[float, int]:
    """Mean loss (nats/token) of the model over the given (N, T+1) windows; under DDP each
    process takes every world-th batch and the sums are all-reduced. Returns (loss, tokens)."""
    ctx = ctx or contextlib.nullcontext()
    was_training = model.training
    model.eval()  # dropout off: the same windows always give the same loss
    # one 0-d float32 tensor per batch (left on the device), tokens per batch
    losses, counts = [], []
    # under DDP, process r takes batches r, r + world, r + 2 world, ...: each window once
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


def evaluate_bpb(model, data_dir: str, split: str = "val", batch_size: int = 8,
                 max_windows: int = 160, device="cpu", ctx=None) -> dict:
    """Validation loss and bits per byte of `model` on a prepared dataset (used by bench.py):
    {"loss", "bpb", "tokens"} over up to max_windows windows of the model's block_size."""
    meta = load_meta(data_dir)
    data = TokenWindows(data_dir, meta, split, model.config.block_size, 0)
    windows = data.fixed_windows(max_windows)
    loss, tokens = evaluate_windows(model, windows, batch_size, torch.device(device), ctx)
    s = meta["splits"][split]
    return {"loss": loss, "bpb": bits_per_byte(loss, s["tokens"], s["bytes"]), "tokens": tokens}


# -----------------------------------------------------------------------------
# Model and optimizers

# AdamW for everything by default; with --optimizer=muon, Muon takes the 2-D matrices inside
# the blocks (attention and MLP weights) and AdamW keeps the embeddings, the head and the
# norms. Both follow one schedule: linear warmup, then cosine or warmup-stable-decay.


def resolve_model_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    """The model to train: a model.py preset (or CPU_MODEL), with the model fields given on
    the command line laid over it and the vocabulary padded."""
    if cfg.preset:
        if cfg.preset not in PRESETS:
            raise ValueError(f"--preset={cfg.preset} is not a model.py preset; choose one of "
                             f"{', '.join(PRESETS)}")
        kw = dict(PRESETS[cfg.preset])
    else:
        kw = dict(CPU_MODEL)
    for key in ("block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "norm", "mlp", "pos"):
        if getattr(cfg, key):
            kw[key] = getattr(cfg, key)
    if cfg.n_head and not cfg.n_kv_head and "n_kv_head" in kw:
        # changing the head count alone keeps plain multi-head attention
        kw["n_kv_head"] = cfg.n_head
    if cfg.dropout >= 0:
        kw["dropout"] = cfg.dropout
    # subtle: pad the embedding rows to a multiple of pad_vocab (e.g. 50257 -> 50304) for faster
    # matmuls; the extra logits are trained towards -inf and sample.py never samples them
    kw["vocab_size"] = -(-vocab_size // max(1, cfg.pad_vocab)) * max(1, cfg.pad_vocab)
    return GPTConfig(**kw)


def hidden_matrices(model: GPT) -> set:
    """ids of the 2-D weights inside the transformer blocks: what Muon orthogonalises. Embeddings
    and the output head (tied or not) are excluded: their rows are per-token lookups, not linear
    maps, and Muon's authors keep them on AdamW (Jordan et al. 2024)."""
    skip = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    skip |= {id(m.weight) for m in model.modules()
             if isinstance(m, torch.nn.Linear) and m.out_features == model.config.vocab_size}
    return {id(p) for p in model.parameters() if p.ndim == 2 and id(p) not in skip}


class Muon32(getattr(torch.optim, "Muon", torch.optim.Optimizer)):  # torch < 2.9: never used
    """torch.optim.Muon with its Newton-Schulz iteration in float32, for CPUs. The built-in one
    runs the iteration in bfloat16, right on GPUs but emulated slowly on CPUs without bf16 matrix
    units: 600-790 ms a step for the 4 x 128 CPU model on 2 cores, against 23-30 ms here. Same
    math, hyperparameters and state ("momentum_buffer"), so checkpoints move between the two;
    matrices of one shape are orthogonalised together in one batched matmul (fewer kernels)."""

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
                # momentum first, then orthogonalise the momentum, not the raw gradient
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - mu)  # buf = mu * buf + (1 - mu) * grad
                u = p.grad.lerp(buf, mu) if group["nesterov"] else buf  # Nesterov: one step ahead
                # iterate on the wide side: X X^T is then the smaller of the two Gram matrices
                u = u.float() if u.shape[0] <= u.shape[1] else u.float().T
                by_shape.setdefault(tuple(u.shape), []).append((p, u))
            # the quintic's coefficients (3.4445, -4.7750, 2.0315 by default) were tuned by
            # Jordan et al. to reach singular values near 1 in 5 steps, not exactly 1
            a, b, c = group["ns_coefficients"]
            for items in by_shape.values():
                X = torch.stack([u for _, u in items])  # (n, rows, cols)
                # scale so the spectral norm is <= 1 (the Frobenius norm bounds it), where the
                # iteration converges
                X = X / X.norm(dim=(1, 2), keepdim=True).clamp(min=group["eps"])
                # X <- a X + (b A + c A^2) X with A = X X^T: a quintic that pushes every singular
                # value towards 1, i.e. X towards the orthogonal factor U V^T of its SVD
                for _ in range(group["ns_steps"]):
                    A = X @ X.mT
                    X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
                for (p, _), o in zip(items, X):
                    rows, cols = p.shape
                    if group["adjust_lr_fn"] == "match_rms_adamw":  # Liu et al. 2025: RMS ~ AdamW's
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
    # fused: one kernel over all parameters instead of a loop of small ops
    # (the CPU model: 5.4 -> 1.3 ms a step)
    fused = device.type in ("cuda", "cpu")
    betas = (cfg.beta1, cfg.beta2)
    optimizers = [torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, fused=fused)]
    if muon_ids:
        lr = cfg.muon_lr or cfg.learning_rate
        matrices = [p for p in model.parameters() if id(p) in muon_ids]
        # "match_rms_adamw" scales each update to AdamW's RMS (0.2 * sqrt(max(A, B))), so the
        # AdamW learning rate transfers (Liu et al. 2025)
        muon = torch.optim.Muon if device.type == "cuda" else Muon32
        optimizers.append(muon([{"params": matrices, "base_lr": lr}], lr=lr,
                               weight_decay=cfg.weight_decay, momentum=0.95, nesterov=True,
                               adjust_lr_fn="match_rms_adamw"))
    return optimizers


def lr_factor(step: int, cfg: TrainConfig, time_frac: float = 0.0) -> float:
    """Multiplier on the peak lr: linear warmup, then cosine or warmup-stable-decay to min_lr_ratio.
    Progress is the larger of the step fraction and the wall-clock fraction (time_frac, under
    --max_minutes) so that a time-limited run still anneals before it stops."""
    # warmup: Adam's second-moment estimates are noisy over the first steps, so full-size updates
    # then can throw the weights far off (Goyal et al. 2017, and every GPT recipe since)
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    lo = cfg.min_lr_ratio
    if cfg.schedule == "wsd":  # hold the peak, then decay linearly over the last decay_frac
        p = min(1.0, max(step / cfg.max_steps, time_frac))
        start = 1.0 - cfg.decay_frac
        return 1.0 if p < start else 1.0 - (1.0 - lo) * (p - start) / max(cfg.decay_frac, 1e-9)
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    p = min(1.0, max((step - cfg.warmup_steps) / decay_steps, time_frac))
    # half a cosine from 1 down to min_lr_ratio (Loshchilov & Hutter 2017, SGDR)
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * p))


# -----------------------------------------------------------------------------
# One optimizer step's gradients, with the out-of-memory fallback

# A step's batch can be larger than fits in memory at once: it is cut into micro-batches whose
# gradients add up (gradient accumulation). When a micro-batch runs out of CUDA memory, the
# step is retried with half of it and twice the accumulation: the same rows, the same update.


# torch.OutOfMemoryError is torch >= 2.5; before it the same class was torch.cuda.OutOfMemoryError
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _is_oom(e: BaseException) -> bool:
    # older paths (and other backends) raise a plain RuntimeError that says so
    said_so = isinstance(e, RuntimeError) and "out of memory" in str(e)
    return isinstance(e, OutOfMemoryError) or said_so


def accumulate_gradients(model, batch_fn, micro_bs: int, accum: int, ctx, scaler=None,
                         nan: bool = False) -> torch.Tensor:
    """Forward and backward over `accum` micro-batches of micro_bs rows; gradients end up as those
    of the mean loss over all rows (each micro-loss is divided by accum). Under DDP the all-reduce
    runs only on the last micro-step (no_sync before). Returns the mean loss (detached).
    batch_fn(lo, hi) gives rows lo..hi of this process's share of the step as (inputs, targets),
    or (inputs, targets, keyword arguments for the forward: finetune.py's packed rows pass
    segments); targets of -100 carry no loss (finetune.py masks its prompts that way)."""
    # Dividing each micro-batch's mean loss by accum makes the summed gradients those of the mean
    # over the whole step, so accum micro-batches of B rows train exactly like one batch of
    # accum x B rows (tested against a single large batch).
    total = 0.0
    for m in range(accum):
        x, y, *extra = batch_fn(m * micro_bs, (m + 1) * micro_bs)
        kwargs = extra[0] if extra else {}
        last = m == accum - 1
        # under DDP, no_sync() skips the all-reduce (FSDP2: the reduce-scatter): only the last
        # micro-step pays for it
        no_sync = skip_gradient_sync(model)
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync:
            with ctx:
                logits, loss = model(x, y, **kwargs)
            # after the forward, as a real OOM: this frame holds the activations
            if FAULTS["oom"] > 0:
                FAULTS["oom"] -= 1
                raise OutOfMemoryError("CUDA out of memory (injected by a test)")
            # the graph keeps what backward needs; the (B, T, V) logits need not wait for it
            del logits
            if nan:
                loss = loss * float("nan")
            loss = loss / accum
            # fp16: multiply the loss by the GradScaler's scale so small gradients do not
            # underflow to zero in half precision (Micikevicius et al. 2018); unscaled later
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total = total + loss.detach()
    return total


def free_failed_step(optimizers: list, device: torch.device) -> None:
    """After an out-of-memory error: drop the partial gradients, collect what the failed step left
    (once its traceback is gone), and hand the CUDA allocator's cached blocks back. gc.collect
    breaks any reference cycle still holding activations; empty_cache then returns the freed
    blocks, so the smaller micro-batch does not meet a fragmented cache."""
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

# ckpt.pt is the latest state, written at every evaluation; best.pt a copy of the one with the
# lowest validation loss. Both hold plain tensors and values only (no pickled classes), are
# written all-or-nothing through tokenizer.atomic_write, and load with weights_only=True.


def rng_state() -> dict:
    """Every random generator the run draws from, as plain values (weights_only loads them)."""
    # numpy's state holds an array of 624 uint32s: stored as a list, a plain value that
    # torch.load(weights_only=True) accepts (a numpy array would need unpickling)
    np_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(world: int) -> list | None:
    """Every process's rng_state(), in rank order, on rank 0; None on the others. A collective:
    every rank calls it, at the same point. One process: [rng_state()]."""
    mine = rng_state()
    if world == 1:
        return [mine]
    states = [None] * world if dist.get_rank() == 0 else None
    # gather_object pickles each state and unpickles it on rank 0; that is safe here, as the
    # senders are this run's own processes, and what reaches the checkpoint is plain values.
    # Under NCCL the bytes travel through the current GPU (set in choose_device).
    dist.gather_object(mine, states, dst=0)
    return states


def save_checkpoint(path: str, ckpt: dict) -> None:
    """torch.save through tokenizer.atomic_write: a crash, a power loss or a full disk leaves
    the old file intact."""
    try:
        atomic_write(path, lambda tmp: torch.save(ckpt, tmp))  # torch.save closes its own file
    except (OSError, RuntimeError) as e:
        first_line = str(e).splitlines()[0]
        raise RuntimeError(f"could not write {path} ({first_line}); the previous checkpoint is "
                           f"intact; free disk space or pick another --out_dir") from None


def copy_durably(src: str, dst: str) -> None:
    """Copy a finished file (ckpt.pt -> best.pt, the tokenizer), all or nothing too."""
    try:
        atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
    except OSError as e:
        raise RuntimeError(f"could not write {dst} ({e.strerror}); free disk space or pick another "
                           f"--out_dir") from None


def load_checkpoint(path: str, device="cpu") -> tuple[GPT, dict]:
    """(model in eval mode on `device`, checkpoint dict) from a train.py checkpoint, loaded with
    weights_only=True: tensors and plain values only, so a hostile file cannot run code."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; train one with `python "
                                f"train.py` first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except pickle.UnpicklingError:  # weights_only refused a class or a function: never run it
        raise ValueError(f"{path} holds Python objects besides tensors and plain values; "
                         f"loading them could run arbitrary code, so it is refused; retrain or "
                         f"pick another file") from None
    except Exception as e:  # a truncated file, or keys of another model shape
        reason = " ".join(str(e).split())[:300]  # torch's message on one line
        raise ValueError(f"{path} is not a loadable train.py checkpoint ({reason}); retrain or "
                         f"pick another file") from None
    return model.to(device).eval(), ckpt


# What one run writes into its out_dir. A fresh run removes them first, so nothing of an earlier
# run (a better best.pt, a longer log.jsonl) ends up beside the new run's tokenizer.
RUN_FILES = ("ckpt.pt", "best.pt", "log.jsonl", "loss.svg", "config.json", "tokenizer.bpe",
             "score.svg", "reward_margin.svg")  # the last two: finetune.py's


def clear_previous_run(out_dir: str, log=print) -> None:
    """Remove an earlier run's RUN_FILES (and temporary files a crash left) from out_dir."""
    if not os.path.isdir(out_dir):
        return
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]
    if found:
        log(f"{out_dir} holds an earlier run ({', '.join(found)}): starting afresh, so they are "
            f"removed; pass --resume to continue that run instead")
    leftovers = [f for f in os.listdir(out_dir) if f.endswith(".tmp") and f[:-4] in RUN_FILES]
    for f in found + leftovers:
        os.remove(os.path.join(out_dir, f))


def checkpoint_step(path: str) -> int | None:
    """The step a checkpoint holds, or None if it is missing or unreadable (mmap: no full read)."""
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
    if not os.path.exists(log_path):
        return
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
        write_text(log_path, "".join(keep))


# -----------------------------------------------------------------------------
# Scale-out: FSDP2 shards and pipeline stages (--parallel)

# DDP keeps a whole replica on every GPU: fp32 weights, gradients and AdamW's m and v, 16 bytes
# a parameter before any activation, so a 1.3B model needs ~21 GB per GPU however many there
# are. Two ways past that, both launched with torchrun like DDP:
#   fsdp      FSDP2 (torch.distributed.fsdp.fully_shard; ZeRO-3, Rajbhandari et al. 2020): each
#             rank keeps 1/N of every tensor, a block's weights are all-gathered just before its
#             forward and its backward and freed after, and its gradients are reduce-scattered:
#             ~16/N bytes a parameter plus one block's whole weights at a time. The data split is
#             DDP's (each rank its own rows), so runs match DDP's and one process's.
#   pipeline  the blocks cut into S consecutive stages, one per rank (GPipe, Huang et al. 2019;
#             1F1B, Narayanan et al. 2019 and 2021): a rank keeps only its stage, and the step's
#             micro-batches flow through, activations forward and their gradients back. Every
#             stage reads the same rows (no data parallelism), and (S-1)/(M+S-1) of a step with
#             M micro-batches is the bubble, stages idle while the pipe fills and drains.
# Both reproduce one process's run on the same global batch (to fp32 rounding; with dropout,
# each rank draws its own masks, so in distribution only, as under DDP).
# Checkpoints stay one plain state_dict with the whole model's names: shards and stages are
# gathered to rank 0, so sample.py, finetune.py and load_checkpoint read them like any other.
# Not here: a model too big for one host's memory would be built on the meta device and
# initialized shard by shard (torchtitan does); every rank here builds the whole model from
# the seed, so the shards and stages start from exactly the weights one process would train.
PARALLEL_MODES = ("ddp", "fsdp", "pipeline")


def data_parallel(parallel: str, rank: int, world: int) -> tuple[int, int]:
    """(rank, world) of the data split: each process its own rows under ddp and fsdp; under
    pipeline the processes are stages of one model, which all read the same rows: (0, 1)."""
    return (0, 1) if parallel == "pipeline" else (rank, world)


def check_parallel(cfg: TrainConfig, mcfg: GPTConfig, world: int, device: torch.device,
                   dtype: torch.dtype, accum: int) -> None:
    """One sentence for a --parallel this run cannot do. Every rank raises the same error from
    the same inputs before any collective of the run, so bad input stops it, never hangs it."""
    mode = cfg.parallel
    if cfg.fsdp_offload and mode != "fsdp":
        raise ValueError(f"--fsdp_offload applies to --parallel=fsdp, not --parallel={mode}; add "
                         f"--parallel=fsdp or drop --fsdp_offload")
    if cfg.fsdp_offload and device.type != "cuda":
        raise ValueError(f"--fsdp_offload moves the shards out of GPU memory into the host's; on "
                         f"--device={device.type} they are there already, so drop --fsdp_offload")
    if mode == "ddp":
        return
    if world < 2:
        raise ValueError(f"--parallel={mode} splits the model across torchrun processes and this "
                         f"is one process; launch `torchrun --nproc_per_node=N train.py "
                         f"--parallel={mode}` or drop --parallel")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--parallel={mode} runs on CUDA GPUs (NCCL) or CPUs (gloo), not "
                         f"{device.type}; use --device=cpu or --parallel=ddp")
    if dtype == torch.float16:
        # subtle: a GradScaler skips a step when *its* gradients overflow; with shards or stages
        # each rank sees only part of them, so the ranks would disagree on which steps to skip
        raise ValueError(f"--parallel={mode} with float16 needs a GradScaler that agrees on "
                         f"overflows across ranks, which train.py does not have; use "
                         f"--dtype=bfloat16 or float32, or --parallel=ddp")
    if mode == "pipeline" and world > mcfg.n_layer:
        raise ValueError(f"--parallel=pipeline needs a block per stage: {world} processes "
                         f"(stages) for n_layer={mcfg.n_layer}; launch at most {mcfg.n_layer} "
                         f"processes or add layers")
    if mode == "pipeline" and cfg.pipeline_schedule == "1f1b" and accum < world:
        # 1F1B's steady state runs one forward and one backward per stage in turn, which needs
        # a micro-batch in flight on every stage (torch's Schedule1F1B refuses fewer)
        raise ValueError(f"--pipeline_schedule=1f1b needs at least one micro-batch per stage: "
                         f"{accum} micro-batch(es) a step for {world} stages; raise "
                         f"--total_batch_size (to {world * cfg.batch_size * mcfg.block_size} or "
                         f"more), lower --batch_size, or use --pipeline_schedule=gpipe")
    if mode == "pipeline" and cfg.compile == "true":
        raise ValueError("--compile=true is not wired up for --parallel=pipeline (the schedule "
                         "calls each stage itself); drop --compile or use --parallel=fsdp")


@dataclass
class ScaleOut:
    """run.parallel under --parallel=fsdp or pipeline (None under ddp)."""
    mode: str  # "fsdp" or "pipeline"
    schedule: object = None  # pipeline: the torch.distributed.pipelining schedule of this stage
    first: bool = True  # pipeline: this rank holds the embeddings
    last: bool = True  # pipeline: this rank holds ln_f, lm_head and the loss
    tied: torch.nn.Parameter = None  # pipeline, tied head: this stage's copy of wte = lm_head
    tied_group: object = None  # pipeline, tied head: the process group of the first and last stage


def scale_out(raw: GPT, cfg: TrainConfig, rank: int, world: int, device: torch.device,
              dtype: torch.dtype, accum: int, log=print) -> tuple[torch.nn.Module, ScaleOut]:
    """setup_run's step between building the model and its optimizers (which must see the final
    parameters): (raw, None) under ddp; (the same module sharded in place, ScaleOut) under fsdp;
    (this rank's PipelineStageModule, ScaleOut) under pipeline."""
    check_parallel(cfg, raw.config, world, device, dtype, accum)
    if cfg.parallel == "ddp":
        return raw, None
    if cfg.parallel == "fsdp":
        return shard_fsdp(raw, cfg, world, device, dtype, log), ScaleOut("fsdp")
    if cfg.compile == "auto":
        cfg.compile = "false"  # see check_parallel: the stages run uncompiled
    return split_pipeline(raw, cfg, rank, world, device, accum, log)


def shard_fsdp(model: GPT, cfg: TrainConfig, world: int, device: torch.device,
               dtype: torch.dtype, log=print) -> GPT:
    """FSDP2 in place: each block its own unit (its weights gathered only around its forward
    and backward), then the root for the rest (embeddings, ln_f, the head, tied or not). The
    module is then an FSDPGPT, still a GPT, whose parameters are DTensors holding this rank's
    rows (dim 0) of each tensor; names are unchanged, so state_dict keys carry no prefix."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy
    from torch.distributed.fsdp import fully_shard
    mp, what = MixedPrecisionPolicy(), "fp32 throughout"
    if device.type == "cuda" and dtype == torch.bfloat16:
        # the gathered copies that compute are bf16, the fp32 shards stay the master weights the
        # optimizer updates, and gradients are reduce-scattered in fp32: a sum of N bf16
        # gradients would lose their low bits
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        what = "bf16 compute copies, fp32 master shards and gradient reduction"
    # offload: shards, gradients and optimizer state in pinned host memory and the optimizer
    # step on the CPU: the GPU keeps only what computes now, for a PCIe copy each way per step
    offload = CPUOffloadPolicy() if cfg.fsdp_offload else OffloadPolicy()
    for block in model.transformer.h:
        fully_shard(block, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mp_policy=mp, offload_policy=offload)
    # each tensor's dim 0 in `world` chunks, as torch.chunk cuts it: rank 0 holds the largest
    mine = sum(p.to_local().numel() for p in model.parameters())
    log(f"fsdp: {len(model.transformer.h)} blocks and the root sharded over {world} ranks "
        f"(FSDP2), rank 0 keeps {mine:,} of {model.num_params(False):,} parameters; {what}"
        + ("; shards offloaded to CPU memory" if cfg.fsdp_offload else ""))
    return model


def skip_gradient_sync(model):
    """accumulate_gradients' context for a micro-step that only accumulates its gradients:
    DDP's no_sync(); FSDP2's set_requires_gradient_sync(False), so the reduce-scatter runs once,
    on the last micro-step, as DDP's all-reduce does; None in one process (nothing to skip).
    The trade: until that last micro-step FSDP2 keeps each block's whole gradient (in fp32, its
    reduce dtype), not 1/N of it; a model whose whole gradients do not fit needs a sync on every
    micro-step instead (communication for memory), which train.py does not offer."""
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync
    fsdp = getattr(model, "_orig_mod", model)  # under torch.compile, the module it wraps
    if not hasattr(fsdp, "set_requires_gradient_sync"):
        return None

    @contextlib.contextmanager
    def no_sync():
        fsdp.set_requires_gradient_sync(False)  # recurses into every block
        try:
            yield
        finally:
            fsdp.set_requires_gradient_sync(True)
    return no_sync


class PipelineStageModule(torch.nn.Module):
    """Blocks [lo, hi) of a GPT, with the embeddings on the first stage and ln_f and lm_head on
    the last. Its tensors keep the whole model's names (transformer.h.5.attn.c_attn.weight on
    whichever stage holds block 5), so the stages' state_dicts merge into the GPT's."""
    param_groups = GPT.param_groups  # the same AdamW groups, over this stage's tensors
    estimate_mfu = GPT.estimate_mfu  # of the whole model (flops_per_token below)

    def __init__(self, model: GPT, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        self.config, self.grad_checkpoint = model.config, model.grad_checkpoint
        self.first, self.last = first, last
        # the whole model's counts, for the plan and MFU (per GPU: tokens/s / world, FLOPs of all)
        self.whole = {"params": model.num_params(True), "all_params": model.num_params(False),
                      "flops": model.flops_per_token()}
        t = model.transformer
        self.transformer = torch.nn.ModuleDict()
        if first:
            self.transformer["wte"] = t.wte
            if t.wpe is not None:
                self.transformer["wpe"] = t.wpe
            self.transformer["drop"] = t.drop
        # keys "5", "6", ...: a block keeps its index in the whole model, in its name too
        self.transformer["h"] = torch.nn.ModuleDict({str(i): t.h[i] for i in range(lo, hi)})
        if last:
            self.transformer["ln_f"] = t.ln_f
            self.lm_head = model.lm_head  # tied: the same Parameter as wte (on the first stage)
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)  # (block_size, hs)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def num_params(self, non_embedding: bool = True) -> int:
        return self.whole["params" if non_embedding else "all_params"]

    def flops_per_token(self) -> int:
        return self.whole["flops"]

    def forward(self, x):
        """First stage: token ids (B, T) in; the others: the residual stream (B, T, C) from the
        stage before. Out: logits (B, T, V) from the last stage, the residual stream from the
        others. GPT.hidden_states and GPT.forward for whole rows from position 0, cut at the
        stage's bounds (a pipeline run matches one process: _draft_parallel.py)."""
        from torch.utils.checkpoint import checkpoint
        T = x.size(1)
        if self.first:
            x = self.transformer.wte(x)  # (B, T) -> (B, T, C)
            if "wpe" in self.transformer:
                x = x + self.transformer.wpe(torch.arange(T, device=x.device))  # (B, T, C)
            x = self.transformer.drop(x)  # (B, T, C)
        cos = sin = None
        if self.rope_cos is not None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, hs) each
        use_ckpt = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for name, block in self.transformer.h.items():
            if use_ckpt:  # as GPT.hidden_states: keep the block's input, redo it in backward
                x = checkpoint(block, x, cos, sin, None, int(name), 0, None,
                               use_reentrant=False)  # (B, T, C)
            else:
                x = block(x, cos, sin, None, int(name), 0, None)  # (B, T, C)
        if self.last:
            return self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        return x  # (B, T, C)


def stage_bounds(n_layer: int, stages: int) -> list[tuple[int, int]]:
    """[lo, hi) blocks of each stage, as even as can be, the first stages taking the extras
    (the last one also computes the head and the loss).
    Example: 5 layers, 2 stages -> [(0, 3), (3, 5)]."""
    per, extra = divmod(n_layer, stages)
    bounds, lo = [], 0
    for s in range(stages):
        hi = lo + per + (1 if s < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def micro_batch_loss(logits, targets, accum: int = 1):
    """The pipeline's loss_fn on the last stage: GPT.forward's loss (mean cross-entropy over the
    targets that are not -100), divided by accum as accumulate_gradients divides each micro-loss,
    so gradients add up to those of the step's mean loss, with the same arithmetic."""
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.reshape(-1), ignore_index=-100,
        reduction="sum")  # (B*T, V) vs (B*T,)
    return loss / (targets != -100).sum().clamp(min=1) / accum


def split_pipeline(model: GPT, cfg: TrainConfig, rank: int, world: int, device: torch.device,
                   accum: int, log=print) -> tuple[PipelineStageModule, ScaleOut]:
    """This rank's stage of the model, and the schedule that runs the step's accum micro-batches
    through all stages: 1F1B (one forward, one backward in turn once the pipe is full: at most S
    micro-batches' activations held) or GPipe (every forward, then every backward: M held)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    bounds = stage_bounds(model.config.n_layer, world)
    first, last = rank == 0, rank == world - 1
    stage = PipelineStageModule(model, *bounds[rank], first, last)
    # the loss is applied on the last stage; scale_grads=False, as micro_batch_loss divides
    loss_fn = lambda logits, targets: micro_batch_loss(logits, targets, accum)
    make = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[cfg.pipeline_schedule]
    # the activations' shapes between stages are found on the first step (PipelineStage sends
    # them along); every step then has the same micro-batch shape, (batch_size, block_size)
    schedule = make(PipelineStage(stage, rank, world, device), accum, loss_fn=loss_fn,
                    scale_grads=False)
    par = ScaleOut("pipeline", schedule, first, last)
    if model.config.tie_embeddings:
        # Tied embeddings: wte (first stage) and lm_head (last stage) are one matrix in the
        # model, so each of those two stages keeps a copy, equal at the start (same seed), and
        # after each backward the two halves of its gradient (the embedding's and the head's)
        # are summed on both (Megatron-LM's embedding group, Shoeybi et al. 2019). The same sum
        # and the same optimizer step keep the copies equal, and the model is the tied one that
        # one process trains. (Untying instead would train another model, with V*C more weights.)
        par.tied = stage.transformer.wte.weight if first else (
            stage.lm_head.weight if last else None)
        par.tied_group = dist.new_group([0, world - 1])  # every rank must call new_group
    m, s = accum, world
    spans = " | ".join(f"{lo}-{hi - 1}" for lo, hi in bounds)
    mine = sum(p.numel() for p in stage.parameters())
    log(f"pipeline: {s} stages (blocks {spans}), stage 0 keeps {mine:,} of "
        f"{model.num_params(False):,} parameters; {cfg.pipeline_schedule} over {m} micro-batches "
        f"of {cfg.batch_size} rows; bubble (S-1)/(M+S-1) = {s - 1}/{m + s - 1} = "
        f"{100 * (s - 1) / (m + s - 1):.0f}% of each step idle" +
        ("; tied wte/lm_head gradients summed across the first and last stage"
         if par.tied_group is not None else ""))
    return stage, par


def pipeline_gradients(run, batch_fn) -> torch.Tensor:
    """accumulate_gradients for a pipeline stage: the schedule runs the step's micro-batches
    forward and backward through every stage; then the tied weight's halves of gradient are
    summed. Returns the step's mean loss (the last stage's) on every rank."""
    par = run.parallel
    x, y = batch_fn(0, run.micro_bs * run.accum)[:2]  # (M*B, T) each: the whole step's rows
    losses = []  # last stage: one 0-d loss per micro-batch, each already divided by accum
    with run.ctx:
        if par.first:
            par.schedule.step(x)  # the schedule cuts x into accum micro-batches of micro_bs rows
        elif par.last:  # return_outputs=False: no (M*B, T, V) logits kept for nothing
            par.schedule.step(target=y, losses=losses, return_outputs=False)
        else:
            par.schedule.step()
    if par.tied is not None:
        dist.all_reduce(par.tied.grad, group=par.tied_group)
    loss = torch.stack(losses).sum().detach() if par.last else torch.zeros((), device=run.device)
    dist.broadcast(loss, src=run.world - 1)
    return loss


def clip_gradients(run, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ on the global gradient; returns its norm before clipping. DDP's replicas
    hold it whole. FSDP2's parameters are DTensors: clip_grad_norm_ sums the shards' squared
    norms across ranks itself (a replicated DTensor comes back). A pipeline stage holds some
    layers, so the stages' squared norms are summed here (the tied copy counted once) and every
    stage scales by the same factor, as torch's clip_grad_norm_ does: max_norm / (norm + 1e-6)."""
    par = run.parallel
    if par is None or par.mode == "fsdp":
        norm = torch.nn.utils.clip_grad_norm_(run.raw.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    params = [p for p in run.raw.parameters() if p.grad is not None]
    # subtle: the last stage's copy of a tied weight holds the first stage's gradient again
    counted = [p.grad for p in params if not (p is par.tied and not par.first)]
    sq = torch.stack([g.detach().float().norm() for g in counted]).square().sum()  # this stage's
    dist.all_reduce(sq)
    norm = sq.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(scale.to(p.grad.dtype))
    return norm


@torch.no_grad()
def evaluate_scaled_out(run) -> float:
    """Validation loss over run.val_windows under fsdp or pipeline, equal to evaluate_windows'.
    fsdp: every rank must run the same number of forward passes (each gathers the shards), so
    the windows are padded with rows whose targets are -100 (no loss, no weight) to a multiple
    of world * micro_bs, and each rank takes its micro_bs rows of every group. pipeline: the
    schedule's forward-only pass (schedule.eval) over groups of accum * micro_bs rows."""
    par, bs = run.parallel, run.micro_bs
    group = bs * (run.world if par.mode == "fsdp" else run.accum)
    windows = run.val_windows
    pad = -len(windows) % group
    rows = np.concatenate([windows, np.repeat(windows[:1], pad, axis=0)])  # (N + pad, T+1)
    x, y = to_device(rows, run.device)  # (N + pad, T) each
    y = y.clone()
    y[len(windows):] = -100  # the padding rows score nothing
    was_training = run.raw.training
    run.raw.eval()  # dropout off
    total = torch.zeros(2, dtype=torch.float64)  # (loss * tokens, tokens), summed on the CPU
    for i in range(0, len(rows), group):
        if par.mode == "fsdp":
            lo = i + run.rank * bs  # this rank's micro_bs rows of the group
            with run.ctx:
                _, loss = run.eval_model(x[lo:lo + bs], y[lo:lo + bs])
            n = int((y[lo:lo + bs] != -100).sum())
            total += torch.tensor([loss.item() * n, n], dtype=torch.float64)
            continue
        losses = []  # last stage: each micro-batch's mean loss, divided by accum
        with run.ctx:
            if par.first:
                par.schedule.eval(x[i:i + group])
            elif par.last:
                par.schedule.eval(target=y[i:i + group], losses=losses)
            else:
                par.schedule.eval()
        if par.last:
            counts = (y[i:i + group] != -100).view(run.accum, bs, -1).sum(dim=(1, 2))  # (M,)
            for loss, n in zip(losses, counts.tolist()):
                total += torch.tensor([loss.item() * run.accum * n, n], dtype=torch.float64)
    run.raw.train(was_training)
    total = total.to(run.device)  # NCCL reduces CUDA tensors only
    if par.mode == "fsdp":
        dist.all_reduce(total)
    else:  # only the last stage saw the losses
        dist.broadcast(total, src=run.world - 1)
    return (total[0] / total[1]).item()


def gather_full_state(run) -> dict | None:
    """A collective under fsdp or pipeline (every rank calls it): on rank 0, the whole model's
    plain state_dict (the keys of GPT.state_dict(), CPU tensors) and each optimizer's state
    with tensors named by those keys ({"state": {name: {...}}, "param_groups": [{..., "params":
    [name, ...]}]}, what torch.distributed.checkpoint's get_optimizer_state_dict gives), as
    {"model", "optimizer", "optimizer_muon"}; None on the other ranks and under ddp."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    par = run.parallel
    if par is None:
        return None
    if par.mode == "fsdp":
        # full_state_dict: each tensor all-gathered from its shards; cpu_offload: onto rank 0's
        # CPU only, so no GPU ever holds the whole model
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = get_model_state_dict(run.raw, options=opts)
        optim = [get_optimizer_state_dict(run.raw, o, options=opts) for o in run.optimizers]
    else:
        # a stage's tensors are whole already: named, copied to the CPU, sent to rank 0
        cpu = lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v
        named = [get_optimizer_state_dict(run.raw, o, options=StateDictOptions()) for o in
                 run.optimizers]
        mine = {"model": {k: cpu(v) for k, v in run.raw.state_dict().items()},
                "optim": [{"state": {n: {k: cpu(v) for k, v in s.items()}
                                     for n, s in d["state"].items()},
                           "param_groups": d["param_groups"]} for d in named]}
        parts = [None] * run.world if run.master else None
        # gather_object pickles in transit, between this run's own processes; what reaches the
        # checkpoint is plain tensors and values
        dist.gather_object(mine, parts, dst=0)
        if not run.master:
            return None
        model = {k: v for part in parts for k, v in part["model"].items()}  # stage order = GPT's
        tied_head = "lm_head.weight" if run.mcfg.tie_embeddings else None
        optim = [merge_named_states([part["optim"][j] for part in parts], drop=tied_head)
                 for j in range(len(run.optimizers))]
    if not run.master:
        return None
    return {"model": model, "optimizer": optim[0],
            "optimizer_muon": optim[1] if len(optim) > 1 else None}


def merge_named_states(states: list, drop: str | None = None) -> dict:
    """The stages' named optimizer states as one, as if one optimizer held every tensor: the
    states side by side, and each stage's param group joined to the one with the same settings
    (a stage has a subset of the decay / no-decay groups). drop: the tied head's name, whose
    state is the first stage's wte state again."""
    merged, groups = {}, []
    for s in states:
        merged.update({k: v for k, v in s["state"].items() if k != drop})
        for g in s["param_groups"]:
            settings = {k: v for k, v in g.items() if k != "params"}
            same = next((m for m in groups if {k: v for k, v in m.items() if k != "params"}
                         == settings), None)
            params = [p for p in g["params"] if p != drop]
            if same is None:
                groups.append({**settings, "params": params})
            else:
                same["params"] += params
    return {"state": merged, "param_groups": groups}


def gathered_model(mcfg: GPTConfig, weights: dict) -> GPT:
    """A plain GPT on rank 0's CPU around gather_full_state's weights (no copy: assign=True),
    for the evaluation's sample. On the CPU, so a big model's sample is slow: --sample_tokens=0."""
    with torch.device("meta"):
        model = GPT(mcfg)  # shapes only; the weights are the gathered tensors themselves
    model.load_state_dict(weights, strict=True, assign=True)
    if mcfg.tie_embeddings:  # assign=True put two Parameters in; share one again
        model.lm_head.weight = model.transformer.wte.weight
    model._set_rope_tables()  # the meta device's tables hold no values
    return model


def load_full_state(run, ck: dict) -> None:
    """resume_run's and reload_after_divergence's loading for a named checkpoint (written under
    fsdp or pipeline) or into a run under fsdp or pipeline. fsdp: set_model_state_dict and
    set_optimizer_state_dict take the whole tensors (every rank read the file) and keep this
    rank's shards. pipeline: each stage takes the tensors and states of its own names."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    path, par = run.ckpt_path, run.parallel
    was = ck["config"].get("parallel", "ddp")
    states = [ck["optimizer"]] + ([ck["optimizer_muon"]] if ck.get("optimizer_muon") else [])
    # ddp numbers the optimizer's tensors by position, fsdp and pipeline name them
    numbered = any(isinstance(p, int) for s in states for g in s["param_groups"]
                   for p in g["params"])
    if (par is None) != numbered:
        raise ValueError(f"{path} was written under --parallel={was}, whose optimizer state is "
                         f"{'numbered by position' if numbered else 'named'}, and "
                         f"--parallel={run.cfg.parallel} keeps it "
                         f"{'named' if numbered else 'numbered'}; resume with --parallel={was} "
                         f"(fsdp and pipeline share one layout; the weights alone load anywhere)")
    if len(states) != len(run.optimizers):
        raise ValueError(f"{path} was trained with --optimizer={ck['config']['optimizer']}; resume "
                         f"with it")
    weights = ck.get("resume_weights") or ck["model"]
    if par.mode == "fsdp":
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(run.raw, weights, options=opts)
        for opt, state in zip(run.optimizers, states):
            set_optimizer_state_dict(run.raw, opt, state, options=opts)
        return
    mine = run.raw.state_dict()
    missing = [k for k in mine if k not in weights]
    if missing:
        raise ValueError(f"{path} lacks {missing[0]} of this stage; it is not this model's "
                         f"checkpoint: resume with its options or use a new --out_dir")
    run.raw.load_state_dict({k: weights[k] for k in mine})
    for opt, state in zip(run.optimizers, states):
        if par.tied is not None and not par.first:  # the head's copy takes wte's state
            w, h = "transformer.wte.weight", "lm_head.weight"
            state = {"state": {**state["state"], h: state["state"][w]} if w in state["state"]
                     else state["state"],
                     "param_groups": [{**g, "params": g["params"] + [h]} if w in g["params"]
                                      else g for g in state["param_groups"]]}
        # strict=False: the file names every stage's tensors; this stage takes its own
        set_optimizer_state_dict(run.raw, opt, state,
                                 options=StateDictOptions(full_state_dict=True, strict=False))


# -----------------------------------------------------------------------------
# Logs and the loss plot

# log.jsonl has one JSON object per line (a progress line or an evaluation), easy to read
# back with pandas or `jq`; loss.svg redraws both curves at each evaluation.


def write_text(path: str, text: str) -> None:
    """Replace a small text file (config.json, loss.svg, a trimmed log) all at once."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def append_log(out_dir: str, row: dict) -> None:
    """One JSON line in out_dir/log.jsonl (appended: a kill loses at most the line being written,
    which repair_after_crash drops)."""
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def write_loss_svg(path: str, train_pts: list, val_pts: list) -> None:
    """Train and validation loss against tokens as a small standalone SVG (no plotting library)."""
    write_curves_svg(path, [("train", "#1f77b4", train_pts), ("val", "#d62728", val_pts)],
                     "tokens", "loss (nats/token)")


def write_curves_svg(path: str, series: list, xlabel: str, ylabel: str) -> None:
    """[(name, color, [(x, y, ...), ...]), ...] as lines on one pair of axes, a standalone SVG.
    Example: write_curves_svg("m.svg", [("margin", "#2ca02c", [(50, 0.1), (100, 0.3)])],
    "step", "reward margin")."""
    pts = [p for _, _, s in series for p in s]
    if len(pts) < 2:
        return
    width, height = 640, 400  # the canvas, then the margins around the plot, in pixels
    left, right, top, bottom = 60, 20, 20, 45
    x0, x1 = 0, max(p[0] for p in pts) or 1
    ys = [p[1] for p in pts if math.isfinite(p[1])]
    y0, y1 = min(ys), max(ys)
    pad = 0.1 if y1 - y0 < 1e-6 else 0.02 * (y1 - y0)  # a flat curve still gets a visible band
    y0, y1 = y0 - pad, y1 + pad
    px = lambda x: left + (width - left - right) * (x - x0) / (x1 - x0)
    # data -> pixel coordinates (SVG's y axis points down, hence the 1 - ...)
    py = lambda y: top + (height - top - bottom) * (1 - (y - y0) / (y1 - y0))
    plot_w, plot_h = width - left - right, height - top - bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
           f'stroke="#888"/>']
    for i in range(6):  # six ticks on each axis, with light grid lines
        xv, yv = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        out.append(f'<text x="{px(xv):.1f}" y="{height - bottom + 15}" '
                   f'text-anchor="middle">{xv:.3g}</text>')
        out.append(f'<text x="{left - 5}" y="{py(yv) + 4:.1f}" text-anchor="end">{yv:.3g}</text>')
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{py(yv):.1f}" y2="{py(yv):.1f}" '
                   f'stroke="#eee"/>')
    out.append(f'<text x="{(width + left) / 2}" y="{height - 8}" '
               f'text-anchor="middle">{xlabel}</text>')
    out.append(f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" '
               f'text-anchor="middle">{ylabel}</text>')
    for k, (name, color, points) in enumerate(series):
        # a skipped NaN step leaves a gap, not a spike
        good = [p for p in points if math.isfinite(p[1])]
        if good:
            line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y, *_ in good)
            out.append(f'<polyline points="{line}" fill="none" stroke="{color}" '
                       f'stroke-width="1.5"/>')
            out.append(f'<text x="{width - right - 90}" y="{35 + 17 * k}" '
                       f'fill="{color}">{name}</text>')
    out.append("</svg>")
    write_text(path, "\n".join(out))


def fmt_time(s: float) -> str:
    """Seconds as 4m05s (or 2h07m past an hour)."""
    if s >= 3600:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 60)}m{int(s % 60):02d}s"


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
# The run: its state, then its phases in the order the loop calls them

# One dataclass holds the run; each phase is a function of it. Nothing reads a loop variable
# from an enclosing scope, so each phase can be read, tested and reused on its own.


@dataclass
class Run:
    """Everything one training run holds. setup_run builds it; train_step, log_progress and
    evaluate_and_save advance it; checkpoint_dict is the part that is saved. The phases take
    the Run as an argument (never a closure over changing loop variables), so finetune.py can
    build one with its own data and drive the same phases."""
    cfg: TrainConfig
    mcfg: GPTConfig
    device: torch.device
    dtype: torch.dtype
    rank: int
    world: int
    raw: GPT  # the plain module: what is saved and sampled
    optimizers: list  # AdamW, then Muon under --optimizer=muon
    scaler: object  # a torch.amp.GradScaler under fp16, else None
    micro_bs: int  # rows per micro-batch and process (halved after an out-of-memory error)
    accum: int  # micro-batches per step and process
    step_rows: int  # rows per optimizer step over all processes
    total_tokens: int  # tokens per optimizer step over all processes
    data_dir: str
    meta: dict  # prepare.py's meta.json (the val split's tokens and bytes give bits per byte)
    tok: Tokenizer
    tok_path: str
    train_data: TokenWindows
    val_windows: np.ndarray  # (N, T+1): the fixed validation windows
    log: object  # print on rank 0, a no-op elsewhere
    model: torch.nn.Module = None  # raw, compiled and/or DDP-wrapped: what trains
    eval_model: torch.nn.Module = None  # compiled but not DDP-wrapped: what evaluates
    ctx: object = None  # the autocast context (a no-op for fp32)
    wandb: object = None  # a wandb run under --wandb
    parallel: ScaleOut = None  # --parallel=fsdp or pipeline: its state; None under ddp
    # progress: saved in every checkpoint, restored by --resume
    step: int = 0
    tokens_seen: int = 0
    best_val: float = float("inf")
    best_step: int = -1  # the step best.pt holds
    lr_scale: float = 1.0  # halved at each reload after non-finite steps
    history: dict = field(default_factory=lambda: {"train": [], "val": []})  # for loss.svg
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # only its own checkpoints reload
    elapsed_before: float = 0.0  # wall seconds of the earlier parts of a resumed run
    # this process's counters, not saved
    t_start: float = 0.0  # wall clock, set back by elapsed_before: the --max_minutes budget
    train_time: float = 0.0  # seconds spent in steps: the clock of tokens/s, MFU and the ETA
    logged: tuple = (0.0, 0)  # (train_time, tokens_seen) at the last progress line
    step_times: list = field(default_factory=list)
    bad_streak: int = 0  # non-finite steps in a row
    bad_total: int = 0
    reloads: int = 0
    loss_ema: float = None  # running mean of the loss, to spot spikes
    train_loss: float = float("nan")
    grad_norm: float = float("nan")

    @property
    def master(self) -> bool:  # rank 0 logs and writes the files
        return self.rank == 0

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.cfg.out_dir, "ckpt.pt")

    @property
    def best_path(self) -> str:
        return os.path.join(self.cfg.out_dir, "best.pt")


def batch_geometry(cfg: TrainConfig, block_size: int, world: int) -> tuple[int, int, int, int]:
    """(micro_bs, accum, step_rows, total_tokens): total_batch_size = micro_bs * block_size *
    world * accum, so the same global batch is seen whatever the process count. Example: the
    GPU default, 2**18 tokens of 1024-token rows in micro-batches of 32 on 8 GPUs, is
    262144 / (32 * 1024 * 8) = 1 micro-batch per GPU; on one GPU it is 8."""
    per_micro = cfg.batch_size * block_size * world
    total_tokens = cfg.total_batch_size or per_micro
    if total_tokens % per_micro:
        raise ValueError(f"--total_batch_size={total_tokens} is not a multiple of batch_size*"
                         f"block_size*world_size = {cfg.batch_size}*{block_size}*{world} = "
                         f"{per_micro}; change one of them")
    return cfg.batch_size, total_tokens // per_micro, total_tokens // block_size, total_tokens


def seed_this_rank(seed: int, rank: int) -> None:
    """Called once the weights are drawn (under `seed` on every process, so all start alike):
    rank r > 0 reseeds torch with seed + r, so its dropout masks are its own; rank 0 goes on
    with the stream it has, so one process, and rank 0 of many, draw exactly what a plain
    `python train.py` draws."""
    # subtle: were every rank to go on from the same seed, all would drop the same units at
    # the same positions of their different rows: the world's masks would be one mask
    # repeated world times, less noise than the dropout rate says (and than one process
    # running the same rows with gradient accumulation, which draws fresh masks per micro-step)
    if rank > 0:
        torch.manual_seed(seed + rank)  # also seeds every CUDA device


def setup_run(cfg: TrainConfig) -> Run:
    """Phase 1: device, data, model, optimizers, then the out_dir: cleared for a fresh run,
    or the checkpoint loaded for --resume; finally the compile and DDP wrappers."""
    rank, world, device, dtype, why = start_processes(cfg)
    # only rank 0 prints, flushed at once: runs are often piped to a file or a scheduler's log
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    cfg = resolve_config(TrainConfig(**asdict(cfg)), device)  # a copy: the caller's stays as it was
    log(f"device: {device} ({why})")
    # the data first: the model's vocabulary comes from the tokenizer the shards were written with
    data_dir, meta, tok_path, tok = load_dataset(cfg)
    mcfg = resolve_model_config(cfg, tok.n_vocab)
    train_data = TokenWindows(data_dir, meta, "train", mcfg.block_size, cfg.seed, tok.n_vocab)
    val_data = TokenWindows(data_dir, meta, "val", mcfg.block_size, cfg.seed, tok.n_vocab)
    val_windows = val_data.fixed_windows(cfg.eval_batches * cfg.batch_size)
    # subtle: seeded right before the weights are drawn, so every process starts from the same
    # weights and a resumed run (whose weights are then overwritten) draws the same numbers
    torch.manual_seed(cfg.seed)
    raw = GPT(mcfg).to(device)
    seed_this_rank(cfg.seed, rank)  # then dropout masks of its own on each process
    raw.grad_checkpoint = cfg.grad_checkpoint
    micro_bs, accum, step_rows, total_tokens = batch_geometry(
        cfg, mcfg.block_size, data_parallel(cfg.parallel, rank, world)[1])
    cfg.total_batch_size = total_tokens
    # fsdp: the model sharded in place; pipeline: this rank's stage; before the optimizers, which
    # must hold the parameters that train
    raw, parallel = scale_out(raw, cfg, rank, world, device, dtype, accum, log)
    if rank == 0:
        check_writable(cfg.out_dir)
    optimizers = build_optimizers(raw, cfg, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None  # fp16 only
    run = Run(cfg, mcfg, device, dtype, rank, world, raw, optimizers, scaler, micro_bs, accum,
              step_rows, total_tokens, data_dir, meta, tok, tok_path, train_data, val_windows, log)
    run.parallel = parallel
    # out_dir: a fresh run removes an earlier run's files before writing any of its own; a
    # resumed one continues from ckpt.pt
    if not cfg.resume and run.master:
        clear_previous_run(cfg.out_dir, log)
    if cfg.resume:
        resume_run(run)
    if world > 1:  # every process must agree on the run's name to check a reload against it
        name = [run.run_id]
        dist.broadcast_object_list(name, src=0)
        run.run_id = name[0]
    if run.master:
        # out_dir holds all that sample.py needs: the tokenizer beside the checkpoints, and the
        # resolved config (every device default filled in) to rerun the run exactly
        copy_durably(tok_path, os.path.join(cfg.out_dir, "tokenizer.bpe"))
        write_text(os.path.join(cfg.out_dir, "config.json"),
                   json.dumps({"train": asdict(cfg), "model": asdict(mcfg)}, indent=1))
        if not cfg.resume:
            open(os.path.join(cfg.out_dir, "log.jsonl"), "w").close()
    wrap_model(run)
    print_plan(run)
    return run


def check_writable(out_dir: str) -> None:
    """Fail at once, not after the first eval_interval, when out_dir cannot be written."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise RuntimeError(f"cannot write to --out_dir={out_dir} ({e.strerror}); pick a writable "
                           f"directory") from None


def resume_run(run: Run) -> None:
    """--resume: weights, optimizer and GradScaler states, progress, data position, RNG states and
    the clock from out_dir/ckpt.pt, after checking that it belongs to this model and data."""
    # load_checkpoint validates the file (weights_only, shapes); its weights go into run.raw,
    # which the optimizers already point at, so their states load onto the right tensors
    _, ck = load_checkpoint(run.ckpt_path)
    path = run.ckpt_path
    if ck["model_config"] != asdict(run.mcfg):
        diff = [f"{k}={ck['model_config'].get(k)} (now {v})" for k, v in asdict(run.mcfg).items()
                if ck["model_config"].get(k) != v]
        raise ValueError(f"{path} was trained with {', '.join(diff)}; pass the same model options "
                         f"to resume or use a new --out_dir")
    same_tokenizer = ck.get("tokenizer_sha256", "") in ("", file_sha256(run.tok_path))
    if ck["vocab_size"] != run.tok.n_vocab or not same_tokenizer:
        raise ValueError(f"{path} was trained with another tokenizer than {run.tok_path}; "
                         f"resume on its dataset ({ck.get('dataset')}) or use a new --out_dir")
    # "resume_weights", where present, are the weights to go on from when they differ from the
    # ones to use (finetune.py's LoRA: base and adapters apart, "model" has them merged)
    if run.parallel is not None or ck["config"].get("parallel", "ddp") != "ddp":
        load_full_state(run, ck)  # fsdp, pipeline: named states into this rank's shards or stage
    else:
        run.raw.load_state_dict(ck.get("resume_weights") or ck["model"])
        states = [ck["optimizer"]] + ([ck["optimizer_muon"]] if ck.get("optimizer_muon") else [])
        if len(states) != len(run.optimizers):
            raise ValueError(f"{path} was trained with --optimizer={ck['config']['optimizer']}; "
                             f"resume with it")
        for opt, state in zip(run.optimizers, states):
            opt.load_state_dict(state)
    if run.scaler is not None and ck.get("scaler"):
        run.scaler.load_state_dict(ck["scaler"])
    run.step, run.tokens_seen, run.best_val = ck["step"], ck["tokens_seen"], ck["best_val_loss"]
    run.lr_scale, run.history = ck.get("lr_scale", 1.0), ck.get("history", run.history)
    run.best_step, run.run_id = ck.get("best_step", -1), ck.get("run_id", "")
    run.elapsed_before = ck.get("elapsed", 0.0)  # --max_minutes is a budget for the whole run
    run.train_data.rows = ck["data_position"]["rows"]
    # each process takes back its own RNG state, so the dropout masks of the next steps are
    # those of a straight run; "rng" holds one per rank (gather_rng_states), older checkpoints
    # one dict, rank 0's. A rank with no saved state (more processes than the run had) keeps
    # seed_this_rank's stream: the run goes on, but not bit for bit as a straight one would.
    states = ck["rng"] if isinstance(ck["rng"], list) else [ck["rng"]]
    if run.rank < len(states):
        set_rng_state(states[run.rank])
    if len(states) < run.world:
        run.log(f"{path} holds the RNG states of {len(states)} process(es) and this run has "
                f"{run.world}: the others draw their dropout masks afresh from seed + rank")
    if run.master:
        repair_after_crash(run.cfg.out_dir, run.step, run.best_step)
    run.log(f"resumed {path} at step {run.step} ({run.tokens_seen:,} tokens seen, "
            f"{fmt_time(run.elapsed_before)} of training so far)")


def wrap_model(run: Run, objective: torch.nn.Module | None = None) -> None:
    """DDP, then torch.compile (CUDA by default); run.raw stays the plain module that is saved,
    so checkpoints never carry the "_orig_mod." or "module." prefixes the wrappers add.
    DDP all-reduces the gradients during backward, bucket by bucket (Li et al. 2020).
    objective: a module whose forward(x, y) returns (anything, loss) around run.raw (finetune.py's
    DPO and classification losses); it is what gets wrapped and what train_step runs, so DDP
    sees the whole loss computation."""
    run.model = objective if objective is not None else run.raw
    compiled = run.cfg.compile == "true" or (run.cfg.compile == "auto"
                                             and run.device.type == "cuda")
    if compiled:
        run.log("compiling the model with torch.compile (the first steps are slow)")
    # evaluation runs the plain module, compiled but never DDP-wrapped: no gradients to sync
    run.eval_model = torch.compile(run.model) if compiled else run.model
    if run.world > 1 and run.parallel is None:  # fsdp shards and pipeline stages sync themselves
        from torch.nn.parallel import DistributedDataParallel as DDP
        cuda = run.device.type == "cuda"
        ddp = DDP(run.model, device_ids=[run.device.index] if cuda else None)
        # DDP first, then torch.compile: the order of PyTorch's DDP notes ("TorchDynamo
        # DDPOptimizer"), so that Dynamo splits the graph at DDP's bucket bounds and each
        # bucket's all-reduce overlaps the rest of backward. subtle: Dynamo does not trace
        # DDP.forward (it breaks the graph there) but compiles the forward DDP calls, and in
        # torch 2.13 DDPOptimizer splits it in either order; it compiles only a forward of
        # our own code (GPT, finetune.py's objectives), never a torch.nn container such as
        # nn.Sequential, which would then run uncompiled. On 2 CPU processes the two orders
        # gave the same graphs and losses bit for bit (the DDP notes in README).
        run.model = torch.compile(ddp) if compiled else ddp
    else:
        run.model = run.eval_model
    if run.dtype == torch.float32:
        run.ctx = contextlib.nullcontext()
    else:  # matmuls in bf16/fp16, reductions and the loss in fp32 (autocast's own op lists)
        run.ctx = torch.autocast(device_type=run.device.type, dtype=run.dtype)


def print_plan(run: Run) -> None:
    """The resolved config and the compute budget (FLOPs per token: PaLM, Chowdhery et al. 2022,
    appendix B), before the first step; then open wandb if asked."""
    cfg, raw = run.cfg, run.raw
    n_params, flops_tok = raw.num_params(non_embedding=False), raw.flops_per_token()
    train_tokens = cfg.max_steps * run.total_tokens
    run.log("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    run.log("model:  " + " ".join(f"{k}={v}" for k, v in asdict(run.mcfg).items()))
    # a time estimate at 40% MFU (model FLOPs utilisation, PaLM's measure) where the GPU's
    # datasheet peak is known; elsewhere the step times give one after 5 steps
    peak = peak_flops(run.device)
    est = (f"~{fmt_time(flops_tok * train_tokens / (0.4 * peak * run.world))} at 40% MFU" if peak
           else "measured after the first steps")
    run.log(f"budget: {n_params / 1e6:.2f}M parameters, {flops_tok / 1e6:.1f} MFLOPs/token, "
            f"{train_tokens:,} tokens to train ({cfg.max_steps} steps x {run.total_tokens:,}), "
            f"{flops_tok * train_tokens:.3g} FLOPs, {est}; {train_tokens / n_params:.1f} "
            f"tokens/parameter (Chinchilla-optimal ~20)")
    dp_world = data_parallel(cfg.parallel, run.rank, run.world)[1]  # pipeline: 1, stages share rows
    run.log(f"batch: {run.micro_bs} rows x {run.mcfg.block_size} tokens x {dp_world} processes x "
            f"{run.accum} accumulation = {run.total_tokens:,} tokens/step; train split "
            f"{run.meta['splits']['train']['tokens']:,} tokens")
    if cfg.wandb and run.master:
        try:
            import wandb
        except ImportError:
            raise RuntimeError("--wandb needs the wandb package; `pip install wandb` or drop "
                               "--wandb") from None
        everything = {**asdict(cfg), **asdict(run.mcfg)}
        run.wandb = wandb.init(project=cfg.wandb_project, config=everything)


def check_stop(run: Run, stop: dict) -> tuple[str | None, float]:
    """Phase 2, before each step: (why the run stops now or None, the fraction of --max_minutes
    spent). Under DDP all processes take the largest clock and any signal, so they stop together."""
    # checked between steps, never inside one: a step is all or nothing, so a stop always
    # leaves a state that a checkpoint can hold exactly
    elapsed, signalled = time.time() - run.t_start, stop["signal"] is not None
    # subtle: every rank must stop at the same step and use the same clock for the lr
    if run.world > 1:
        flags = torch.tensor([elapsed, float(signalled)], dtype=torch.float64, device=run.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        elapsed, signalled = flags[0].item(), flags[1].item() > 0
    if signalled:
        return f"got {stop['signal'] or 'a signal on another rank'}", 0.0
    if run.cfg.max_minutes and elapsed >= run.cfg.max_minutes * 60:
        return f"reached max_minutes={run.cfg.max_minutes}", 0.0
    return None, (elapsed / (run.cfg.max_minutes * 60) if run.cfg.max_minutes else 0.0)


def pretraining_batches(run: Run):
    """batch_fn for this step: rows [lo, hi) of this process's share of the step's global batch."""
    # the step's first row (a fixed value now: the closure below never sees it change), and
    # where this process's share of the step's rows begins
    dp_rank = data_parallel(run.cfg.parallel, run.rank, run.world)[0]  # pipeline: 0 on every stage
    first, mine = run.train_data.rows, dp_rank * run.micro_bs * run.accum

    def batch_fn(lo, hi):
        rows = run.train_data.rows_at(first, mine + lo, mine + hi, run.step_rows, run.cfg.sampling)
        return to_device(rows, run.device)
    return batch_fn


def train_step(run: Run, time_frac: float = 0.0, batch_fn=None) -> None:
    """Phase 3: one optimizer step. Set the lr, accumulate the gradients of the step's batch
    (pretraining_batches unless batch_fn is given), clip, and apply them unless the loss or the
    gradients are not finite; reload the last checkpoint after max_bad_steps such steps."""
    cfg = run.cfg
    # the schedule is applied to each group's own peak (AdamW's and Muon's may differ)
    for opt in run.optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(run.step, cfg, time_frac) * run.lr_scale
    t0 = time.time()
    loss = gradients_with_oom_fallback(run, batch_fn or pretraining_batches(run))
    if run.world > 1:  # SUM then divide: gloo has ReduceOp.AVG only from torch 2.8
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        loss /= run.world
    if run.scaler is not None:  # clip the true gradients, not the scaled ones
        for opt in run.optimizers:
            run.scaler.unscale_(opt)
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    norm = clip_gradients(run, clip)  # the global norm (all shards, all stages), before clipping
    run.train_loss, run.grad_norm = loss.item(), norm.item()
    # A non-finite loss, or a non-finite gradient without a GradScaler, is a bad step: no update
    # at all (Adam's moments would be poisoned). With a GradScaler (fp16), non-finite gradients
    # under a finite loss are an overflow of the loss scale: scaler.step skips the update and
    # scaler.update halves the scale (Micikevicius et al. 2018), which is routine, not divergence.
    if math.isfinite(run.train_loss) and (math.isfinite(run.grad_norm) or run.scaler is not None):
        for opt in run.optimizers:
            run.scaler.step(opt) if run.scaler is not None else opt.step()
        run.bad_streak = 0
    else:
        run.bad_streak, run.bad_total = run.bad_streak + 1, run.bad_total + 1
        run.log(f"step {run.step}: non-finite loss {run.train_loss} / grad norm {run.grad_norm}; "
                f"step skipped ({run.bad_total} so far)")
    if run.scaler is not None:
        run.scaler.update()
    # set_to_none frees the gradient memory until the next backward writes it afresh
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
    # the step counts even when it was skipped: its batch is not retried (the same rows would
    # likely fail again), and the data position stays a pure function of the step
    run.train_data.rows += run.step_rows
    run.step += 1
    run.tokens_seen += run.total_tokens
    if run.bad_streak >= cfg.max_bad_steps:
        reload_after_divergence(run)
    dt = time.time() - t0
    run.step_times.append(dt)
    run.train_time += dt
    loss, ema = run.train_loss, run.loss_ema
    if math.isfinite(loss):  # a spike is logged, not acted on: the non-finite guard is the stop
        if ema is not None and run.step > 10 and loss > cfg.spike_factor * ema:
            run.log(f"step {run.step}: loss spike {loss:.3f} vs running mean {ema:.3f}")
        run.loss_ema = loss if ema is None else 0.95 * ema + 0.05 * loss
    fault_after_step(run.rank, run.step)  # test hooks only (FAULTS)


def gradients_with_oom_fallback(run: Run, batch_fn) -> torch.Tensor:
    """accumulate_gradients; after a CUDA out-of-memory error, halve the micro-batch, double the
    accumulation (the global batch stays the same) and run the step again."""
    while True:
        try:
            if run.parallel is not None and run.parallel.mode == "pipeline":
                return pipeline_gradients(run, batch_fn)  # the schedule runs every micro-batch
            return accumulate_gradients(run.model, batch_fn, run.micro_bs, run.accum, run.ctx,
                                        run.scaler, nan=run.step in FAULTS["nan_steps"])
        except RuntimeError as e:
            if not _is_oom(e):
                raise
        # subtle: only here, outside the except block, are the exception and its traceback
        # gone; their frames hold the failed step's activations, which must go first
        free_failed_step(run.optimizers, run.device)
        smaller = smaller_micro_batch(run.micro_bs)
        if run.world > 1 or not smaller:
            raise RuntimeError(f"out of memory with micro-batch {run.micro_bs}" + (
                " under DDP (ranks cannot shrink independently)" if run.world > 1 else "") +
                "; lower --batch_size or --block_size, or use --grad_checkpoint")
        run.accum, run.micro_bs = run.accum * run.micro_bs // smaller, smaller
        run.log(f"out of memory at step {run.step}: micro-batch now {run.micro_bs} rows x "
                f"{run.accum} accumulation (global batch unchanged)")


def reload_after_divergence(run: Run) -> None:
    """max_bad_steps non-finite steps in a row: go back to this run's last checkpoint with half
    the learning rate (at most 3 times); the data position moves on, past the bad batches.
    A run that diverges once at a given lr usually does again from the same weights, so the
    lr is what changes; the last resort, a clear stop, names the two flags to try."""
    if run.reloads >= 3 or not os.path.exists(run.ckpt_path):
        why = " and no checkpoint to return to" if run.reloads < 3 else " after 3 reloads"
        raise RuntimeError(f"training diverged: {run.bad_streak} non-finite steps in a row at step "
                           f"{run.step}{why}; lower --learning_rate or raise --warmup_steps")
    _, ck = load_checkpoint(run.ckpt_path)
    if ck.get("run_id", "") != run.run_id or ck["model_config"] != asdict(run.mcfg):
        raise RuntimeError(f"training diverged at step {run.step} and {run.ckpt_path} was not "
                           f"written by this run, so it is not reloaded; lower --learning_rate or "
                           f"raise --warmup_steps and start again")
    if run.parallel is not None:  # fsdp, pipeline: named states into this rank's part
        load_full_state(run, ck)
    else:
        run.raw.load_state_dict(ck["model"])
        run.optimizers[0].load_state_dict(ck["optimizer"])
        if len(run.optimizers) > 1:
            run.optimizers[1].load_state_dict(ck["optimizer_muon"])
    run.lr_scale, run.bad_streak, run.reloads = run.lr_scale * 0.5, 0, run.reloads + 1
    run.log(f"reloaded {run.ckpt_path} (step {ck['step']}) with the learning rate scaled by "
            f"{run.lr_scale}")


def log_progress(run: Run, last_step: int) -> None:
    """Phase 4: a console line and a log.jsonl row. Rates are over the steps since the last line,
    on the training clock: evaluation, sampling and checkpoint writes in between do not count."""
    cfg = run.cfg
    tps = (run.tokens_seen - run.logged[1]) / max(run.train_time - run.logged[0], 1e-9)
    run.logged = (run.train_time, run.tokens_seen)
    mfu = run.raw.estimate_mfu(tps / run.world, run.device)  # per GPU, against its datasheet peak
    elapsed = time.time() - run.t_start
    # the ETA: the steps left at the mean of the last 10 step times (the first steps, slow
    # with compilation and cold caches, soon drop out of it), capped by the time budget
    recent = run.step_times[-10:]
    eta = (last_step - run.step) * sum(recent) / len(recent)
    if cfg.max_minutes:
        eta = min(eta, max(0.0, cfg.max_minutes * 60 - elapsed))
    lr = run.optimizers[0].param_groups[0]["lr"]
    mfu_text = f" | mfu {100 * mfu:.1f}%" if mfu else ""  # only where the GPU's peak is known
    run.log(f"step {run.step}/{cfg.max_steps} | loss {run.train_loss:.4f} | lr {lr:.2e} | "
            f"norm {run.grad_norm:.3f} | {tps:,.0f} tok/s" + mfu_text
            + f" | {fmt_time(elapsed)} elapsed, eta {fmt_time(eta)}")
    run.history["train"].append([run.tokens_seen, run.train_loss])
    if run.master:
        append_log(cfg.out_dir, {"step": run.step, "tokens": run.tokens_seen,
                                 "loss": run.train_loss, "norm": run.grad_norm, "lr": lr,
                                 "tok_per_s": tps, "mfu": mfu, "time": elapsed,
                                 "train_time": run.train_time, "skipped": run.bad_total})
    if run.wandb:
        run.wandb.log({"train/loss": run.train_loss, "lr": lr, "grad_norm": run.grad_norm},
                      step=run.step)


def evaluate_and_save(run: Run) -> None:
    """Phase 5: validation loss and bits per byte on the fixed windows (all processes), then on
    rank 0 a log row, a sample, ckpt.pt, best.pt when this is the best evaluation, and loss.svg."""
    # eval_model: compiled but never DDP-wrapped, since evaluation has no gradients to sync
    if run.parallel is not None:  # fsdp, pipeline: every rank runs the same passes
        loss = evaluate_scaled_out(run)
    else:
        loss, _ = evaluate_windows(run.eval_model, run.val_windows, run.micro_bs, run.device,
                                   run.ctx, run.rank, run.world)
    val = run.meta["splits"]["val"]
    bpb = bits_per_byte(loss, val["tokens"], val["bytes"])
    run.history["val"].append([run.tokens_seen, loss, bpb])
    improved = loss < run.best_val
    if improved:
        run.best_val, run.best_step = loss, run.step
    run.log(f"eval step {run.step}: val loss {loss:.4f}, {bpb:.4f} bits/byte"
            + (" (best)" if improved else "") + f" | {fmt_time(time.time() - run.t_start)}")
    rng = gather_rng_states(run.world)  # on every rank: a collective
    full = gather_full_state(run)  # fsdp, pipeline: the whole model on rank 0 (a collective too)
    if run.master:
        append_log(run.cfg.out_dir, {"step": run.step, "tokens": run.tokens_seen, "val_loss": loss,
                                     "val_bpb": bpb, "time": time.time() - run.t_start})
        if run.cfg.sample_tokens:
            run.log("sample: " + repr(sample_text(run, full)[:300]))
        save_checkpoint(run.ckpt_path, checkpoint_dict(run, rng, full))
        if improved:
            # after ckpt.pt, so a kill in between leaves best.pt behind, which resume_run repairs
            copy_durably(run.ckpt_path, run.best_path)
        svg = os.path.join(run.cfg.out_dir, "loss.svg")
        write_loss_svg(svg, run.history["train"], run.history["val"])
    if run.wandb:
        run.wandb.log({"val/loss": loss, "val/bpb": bpb}, step=run.step)


def sample_text(run: Run, full: dict | None = None) -> str:
    """A short sample from <|endoftext|>, with a generator of its own: the training RNG is
    untouched, so a run with samples and one without train the same weights. full: under fsdp or
    pipeline, gather_full_state's dict; the sample then comes from its weights on the CPU."""
    model = run.raw if full is None else gathered_model(run.mcfg, full["model"])
    device = model.lm_head.weight.device
    g = torch.Generator(device=device).manual_seed(run.cfg.seed)
    idx = torch.tensor([[run.tok.eot_id]], device=device)
    with run.ctx:
        out = model.generate(idx, run.cfg.sample_tokens, temperature=0.8, top_k=50, generator=g,
                             vocab_limit=run.tok.n_vocab)
    run.raw.train()
    return run.tok.decode(out[0, 1:].tolist())


def checkpoint_dict(run: Run, rng: list | None = None, full: dict | None = None) -> dict:
    """What ckpt.pt holds: the unwrapped weights, every state needed to continue exactly, and
    plain values only (STYLE rule 9), so it loads with weights_only=True. rng: every rank's RNG
    state from gather_rng_states; without it, only this process's (enough for one process).
    full: gather_full_state's whole weights and named optimizer states, under fsdp or pipeline,
    where run.raw and run.optimizers hold only this rank's part."""
    # Three groups: what the model is (weights, configs); how to go on exactly (optimizer and
    # GradScaler states, step, RNG, data position, best-so-far, clock, run id); and what it needs
    # to be used (the tokenizer's name and sha256, the vocabulary, the dataset).
    opt = run.optimizers
    full = full or {"model": run.raw.state_dict(), "optimizer": opt[0].state_dict(),
                    "optimizer_muon": opt[1].state_dict() if len(opt) > 1 else None}
    return {"model": full["model"], "model_config": asdict(run.mcfg),
            "config": asdict(run.cfg),
            "optimizer": full["optimizer"],
            "optimizer_muon": full["optimizer_muon"],
            "scaler": run.scaler.state_dict() if run.scaler else None,
            "step": run.step, "tokens_seen": run.tokens_seen, "rng": rng or [rng_state()],
            "data_position": {"rows": run.train_data.rows, "sampling": run.cfg.sampling},
            "best_val_loss": run.best_val, "best_step": run.best_step, "lr_scale": run.lr_scale,
            "history": run.history, "run_id": run.run_id, "elapsed": time.time() - run.t_start,
            "tokenizer": "tokenizer.bpe", "tokenizer_sha256": file_sha256(run.tok_path),
            "vocab_size": run.tok.n_vocab, "dataset": run.data_dir}


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) one pretraining run; returns a summary dict (step, train_loss, val_loss,
    val_bpb, best_val_loss, ...). SIGINT/SIGTERM finish the current step, evaluate, save, return.
    Whatever ends the run (max_steps, stop_step, max_minutes, a signal), the last state is
    evaluated and saved, so ckpt.pt and best.pt always describe where training stopped."""
    run = setup_run(cfg)
    cfg = run.cfg  # resolved: the device defaults filled in
    last_step = min(cfg.max_steps, cfg.stop_step or cfg.max_steps)
    reason = "reached max_steps" if last_step == cfg.max_steps else f"reached stop_step={last_step}"
    stop = {"signal": None}
    with stop_on_signals(stop):
        run.t_start = time.time() - run.elapsed_before
        run.logged = (0.0, run.tokens_seen)  # rates count from here, also after a resume
        run.raw.train()  # dropout on (evaluation switches it off and back)
        # The loop: check for a stop, one optimizer step, then the periodic log line and
        # evaluation. Everything else lives in the phases above.
        while run.step < last_step:
            stop_reason, time_frac = check_stop(run, stop)
            if stop_reason:
                reason = stop_reason
                break
            train_step(run, time_frac)
            if len(run.step_times) == 5 and run.step < last_step:  # warmed up: a better estimate
                median = sorted(run.step_times[1:])[2]
                left = median * (last_step - run.step)
                if cfg.max_minutes:
                    left = min(left, cfg.max_minutes * 60 - (time.time() - run.t_start))
                run.log(f"estimated wall time: {fmt_time(left)} more (median step "
                        f"{1000 * median:.0f} ms)")
            is_last = run.step == last_step
            if run.step % cfg.log_interval == 0 or is_last or run.step == 1:
                log_progress(run, last_step)
            if run.step % cfg.eval_interval == 0 or is_last:
                evaluate_and_save(run)
        if not run.history["val"] or run.history["val"][-1][0] != run.tokens_seen:
            evaluate_and_save(run)  # stopped between evaluations: measure and save where we are
    _, val_loss, val_bpb = run.history["val"][-1]
    run.log(f"done: {reason} at step {run.step}; val loss {val_loss:.4f}, {val_bpb:.4f} bits/byte, "
            f"best {run.best_val:.4f}; {fmt_time(time.time() - run.t_start)}; checkpoint in "
            f"{run.ckpt_path}")
    if run.wandb:
        run.wandb.finish()
    return {"step": run.step, "train_loss": run.train_loss, "val_loss": val_loss,
            "val_bpb": val_bpb, "best_val_loss": run.best_val, "tokens_seen": run.tokens_seen,
            "skipped_steps": run.bad_total, "batch_size": run.micro_bs, "grad_accum": run.accum,
            "time_s": time.time() - run.t_start,
            "stop_reason": reason, "out_dir": cfg.out_dir}


# -----------------------------------------------------------------------------
# Command line


def main(argv=None) -> None:
    cfg = parse_config(TrainConfig, argv)
    try:
        train(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}{lost_process_hint(e, cfg)}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def lost_process_hint(e: BaseException, cfg: TrainConfig) -> str:
    """The second half of the sentence for a collective that failed because another process
    died ("Connection closed by peer") or stopped answering ("Timed out waiting 600000ms"),
    as gloo words it; "" for any other error."""
    # NCCL's watchdog ends the process itself on a timeout (its own log lines say so), so what
    # reaches here is gloo's message ("Connection closed by peer" or "reset by peer" when the
    # other process is gone) or an NCCL error raised at the call
    said = str(e)
    if not (dist.is_available() and dist.is_initialized()) or not any(
            s in said for s in ("by peer", "Timed out", "timed out", "NCCL error")):
        return ""
    return (f" (rank {dist.get_rank()} of {dist.get_world_size()}: another process died, or "
            f"stopped answering for more than --dist_timeout_s={cfg.dist_timeout_s:g} seconds; "
            f"its own log holds the first error; once that is fixed, go on with --resume)")


if __name__ == "__main__":
    main()
