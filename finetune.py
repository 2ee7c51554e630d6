"""
Supervised fine-tuning: turn a pretrained GPT into one that answers instructions.

Run it (after `python train.py`):
    python finetune.py                                  # the built-in task, from out/ into out-sft/
    python finetune.py --max_steps=100 --eval_interval=50   # a quick look
    python finetune.py --data=chats.jsonl               # your chat or Alpaca JSONL
    python finetune.py --pack                           # several examples a row, each on its own
    python finetune.py --lora_rank=8                    # LoRA adapters instead of all the weights
    python finetune.py --resume                         # continue out-sft/ckpt.pt exactly
    python sample.py --out_dir=out-sft --chat           # then talk to it
    python finetune.py --task=dpo --init_from=out-sft --out_dir=out-dpo   # preference tuning
    python finetune.py --task=classify --out_dir=out-cls    # a classification head
    python finetune.py --init_from=path/to/hf_gpt2      # start from a Hugging Face directory
    python finetune.py -h                               # every option

What it does: each example is a conversation, rendered with tokenizer.encode_chat (the one
template sample.py --chat also uses: <|role|> content <|end|> per message). The model learns
only the assistant's tokens, their <|end|> included: every other target is -100, which the
loss ignores. Batches are right-padded with <|pad|> (pad targets -100 too), or with --pack
filled with several examples per row, each attending only to itself (GPT.forward's segments);
an example longer than the context is cut to it, and counted. Training is train.py's own step
(train.train_step over a train.Run: warmup and cosine, clipping, the out-of-memory fallback,
the non-finite guard) with fine-tuning batches; checkpoints are train.py checkpoints, so
sample.py loads out-sft/ as it loads out/.

The built-in task (offline, graded exactly): short instructions about Python lists and
numbers that the default CPU model, which has only read Python source, can learn in a few
minutes: reverse, sort, length, maximum and minimum of a list of digits, and the sum of two
numbers. Held-out exact match is printed before and after training.

--task=dpo tunes on preference pairs (a prompt, a chosen and a rejected reply) with DPO: the
policy learns to prefer the chosen reply more than the reference model (the starting model:
a frozen copy, or the same weights with the LoRA adapters switched off) does. The built-in
pairs set the right answer against a near miss (two list entries swapped, a number off by one).

--task=classify puts a linear head on the last token (each text ends in <|end|>) and trains
it with the model, on {"text", "label"} JSONL or on the built-in task: which of four stdlib
packages (asyncio, email, multiprocessing, unittest) a function of this Python comes from,
held out by file. Accuracy is printed before (a random head: chance) and after.

--init_from may be a Hugging Face directory (GPT-2 or Llama family, read by model.py). A
tokenizer without the chat tokens (GPT-2's has only <|endoftext|>) gets them, and the model
gets rows for them at the mean embedding; the first lines say so.

Multi-process runs: torchrun --nproc_per_node=N finetune.py ... uses train.py's DDP with the
task's loss inside the wrapped module; batch_size examples per step are split over the
processes, and 2 CPU processes end where 1 does (sft and classify are tested).

Sources: Ouyang et al. 2022 (InstructGPT: supervised fine-tuning on demonstrations, loss on
the response only); Taori et al. 2023 (the Alpaca format); Hu et al. 2021 (LoRA); Rafailov
et al. 2023 (DPO); Krell et al. 2021 (packing without cross-contamination: a block-diagonal
mask, positions restarted per example); Raschka 2024, ch. 6 (a last-token classification
head); Hewitt 2021 ("Initializing new word embeddings": the mean of the old ones).
"""

import ast
import contextlib
import copy
import functools
import json
import math
import os
import random
import sys
import sysconfig
import textwrap
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import train
from model import GPT
from sample import load_for_sampling
from tokenizer import CHAT_ROLES, Tokenizer, list_text_files, parse_config, read_text_file

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class FinetuneConfig:
    task: str = "sft"  # "sft" (instructions), "dpo" (preference pairs, after sft), "classify"
    init_from: str = "out"  # a train.py/finetune.py out_dir, or a Hugging Face model dir
    data: str = ""  # JSONL: chat or Alpaca (sft), prompt/chosen/rejected (dpo), text/label
    # (classify); "" = the task's built-in data
    out_dir: str = "out-sft"  # ckpt.pt, best.pt, tokenizer.bpe, log.jsonl, loss.svg
    val_fraction: float = 0.05  # of a JSONL file's examples held out (every 20th)
    pack: bool = False  # sft: pack a step's examples into as few rows as fit, each attending
    # only to itself (instead of padding every row to the longest)
    # LoRA (Hu et al. 2021): 0 = full fine-tuning of every weight
    lora_rank: int = 0  # rank r of the adapters B A added to the target matrices
    lora_alpha: float = 16.0  # the adapters' output is scaled by alpha / r
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = ""  # comma-separated Linear names to adapt; "" = attention and MLP
    # optimization: train.py's step, with these settings
    max_steps: int = 0  # optimizer steps; 0 = the task's default (TASK_DEFAULTS)
    stop_step: int = 0  # stop with a checkpoint at this step, schedule unchanged; 0 = max_steps
    batch_size: int = 0  # examples (or pairs) per step; 0 = the task's default
    learning_rate: float = 0.0  # peak lr; 0 = the task's default (LoRA wants more: try 1e-2)
    warmup_steps: int = 20  # linear warmup steps
    min_lr_ratio: float = 0.0  # cosine decay down to learning_rate * this
    weight_decay: float = 0.0  # decoupled weight decay on matrices
    grad_clip: float = 1.0  # clip the global gradient norm; 0 = no clipping
    # evaluation and logging
    eval_interval: int = 250  # steps between held-out evaluations and checkpoints
    eval_examples: int = 200  # held-out examples scored by exact match at each evaluation
    log_interval: int = 50  # steps between progress lines
    # the built-in task
    builtin_train: int = 20000  # training examples generated
    builtin_val: int = 500  # held-out examples generated (none of them in the training set)
    beta: float = 0.1  # dpo: how far the policy may move from the reference (Rafailov eq. 7)
    # system
    device: str = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "mps"
    dtype: str = "auto"  # "auto", float32, bfloat16, float16 (as train.py)
    seed: int = 1337  # seeds the data order, dropout and the built-in task
    resume: bool = False  # continue out_dir/ckpt.pt (weights, optimizer, step, data, RNG)


# Per-task defaults for the fields left at 0, chosen on the built-in task (README "Fine-tuning"):
# sft at 2e-3 reaches ~83% held-out exact match in 1500 steps (2-3 minutes on 2 cores); dpo
# starts from that model and needs a 20x smaller lr, or it unlearns the answers while the
# preference margin grows (2e-3: exact match 83.5% -> 54% in 100 steps; 1e-4: 83.5% -> 81.5%).
TASK_DEFAULTS = {"sft": dict(max_steps=1500, batch_size=32, learning_rate=2e-3),
                 "dpo": dict(max_steps=300, batch_size=16, learning_rate=1e-4),
                 "classify": dict(max_steps=300, batch_size=32, learning_rate=1e-3)}


def resolve_task_defaults(cfg: FinetuneConfig) -> FinetuneConfig:
    """A copy of cfg with the task's defaults filled in and the task checked."""
    if cfg.task not in TASK_DEFAULTS:
        raise ValueError(f"--task={cfg.task} is not one of {', '.join(TASK_DEFAULTS)}")
    if cfg.pack and cfg.task != "sft":
        raise ValueError(f"--pack packs chat examples for --task=sft; --task={cfg.task} pads its "
                         f"rows, so drop --pack")
    cfg = FinetuneConfig(**asdict(cfg))
    for key, value in TASK_DEFAULTS[cfg.task].items():
        if not getattr(cfg, key):
            setattr(cfg, key, value)
    return cfg


# -----------------------------------------------------------------------------
# The built-in task: instructions a model of Python source can learn in minutes

# Each task is (instruction, answer) written the way Python prints things, so the pretrained
# model already knows the notation ([1, 2, 3], 3 + 4) and only has to learn the operation.
# Answers are exact strings: a reply is right only if it is exactly the answer. Every task
# has thousands of distinct inputs, so the held-out instructions (never trained on) test the
# operation, not a memorised answer. (A task with few inputs, say upper-casing one of 16
# words, would put them all in the held-out set and none in training.)
BUILTIN_KINDS = ("reverse", "sort", "add", "len", "max", "min")


def builtin_example(rng: random.Random) -> tuple[str, str]:
    """One (instruction, answer) pair, e.g. ("reverse [3, 7, 1]", "[1, 7, 3]"),
    ("12 + 30 =", "42"), ("max [4, 9, 2, 2]", "9")."""
    kind = rng.choice(BUILTIN_KINDS)
    xs = [rng.randrange(10) for _ in range(rng.randint(3, 5))]  # 3 to 5 digits: 111,000 lists
    if kind == "reverse":
        return f"reverse {xs}", str(xs[::-1])
    if kind == "sort":
        return f"sort {xs}", str(sorted(xs))
    if kind == "add":
        a, b = rng.randrange(50), rng.randrange(50)  # 2,500 sums
        return f"{a} + {b} =", str(a + b)
    if kind == "len":
        return f"len {xs}", str(len(xs))
    return f"{kind} {xs}", str(max(xs) if kind == "max" else min(xs))


def builtin_task(n_train: int, n_val: int, seed: int) -> tuple[list, list]:
    """(train, val) lists of chat examples, deterministic in seed; no val instruction occurs in
    train, so held-out exact match measures the operation learned, not a memorised answer."""
    rng = random.Random(f"builtin-val-{seed}")
    val = [builtin_example(rng) for _ in range(n_val)]
    held_out = {q for q, _ in val}
    rng = random.Random(f"builtin-train-{seed}")
    pairs = (builtin_example(rng) for _ in range(10 * n_train))  # more than enough to fill it
    train_pairs = []
    for q, a in pairs:
        if q not in held_out:
            train_pairs.append((q, a))
            if len(train_pairs) == n_train:
                break
    as_chat = lambda q, a: {"messages": [{"role": "user", "content": q},
                                         {"role": "assistant", "content": a}]}
    return [as_chat(q, a) for q, a in train_pairs], [as_chat(q, a) for q, a in val]


# -----------------------------------------------------------------------------
# Reading examples: chat JSONL or Alpaca JSONL, every line checked


def example_from_json(obj, where: str) -> dict:
    """One JSONL object -> {"messages": [...]}, or ValueError naming `where` (file and line).

    Chat: {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", ...}]}
    Alpaca (Taori et al. 2023): {"instruction": ..., "input": ... (optional), "output": ...},
    which becomes one user turn (instruction, then input after a blank line) and one reply."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is not a JSON object; each line needs \"messages\" (chat) or "
                         f"\"instruction\" and \"output\" (Alpaca)")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: \"messages\" must be a non-empty list of "
                             f"{{\"role\", \"content\"}} objects")
        for m in messages:
            if not (isinstance(m, dict) and m.get("role") in CHAT_ROLES
                    and isinstance(m.get("content"), str)):
                raise ValueError(f"{where}: a message needs a role in {CHAT_ROLES} and a string "
                                 f"content, got {json.dumps(m)[:80]}")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: the conversation has no assistant turn, so there is "
                             f"nothing to learn; add the reply as a message with role assistant")
        return {"messages": messages}
    if isinstance(obj.get("instruction"), str) and isinstance(obj.get("output"), str):
        user = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
        return {"messages": [{"role": "user", "content": user},
                             {"role": "assistant", "content": obj["output"]}]}
    raise ValueError(f"{where} has neither \"messages\" (chat) nor string \"instruction\" and "
                     f"\"output\" fields (Alpaca)")


def read_examples(path: str, parse=None) -> list:
    """Every line of a JSONL file through parse(obj, where) (example_from_json by default: a
    chat example); the first bad line stops the run with its number."""
    parse = parse or example_from_json
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data={path} does not exist; pass a chat or Alpaca JSONL file, "
                                f"or leave --data empty for the built-in task")
    examples = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{where} is not UTF-8 text; save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where} is not valid JSON ({e.msg} at column "
                                 f"{e.colno})") from None
            examples.append(parse(obj, where))
    if not examples:
        raise ValueError(f"{path} holds no examples; write one JSON object per line")
    return examples


def split_examples(examples: list, val_fraction: float) -> tuple[list, list]:
    """(train, val): every k-th example is held out (k = round(1 / val_fraction)); a file with
    fewer than k examples holds out its last one. Both splits are never empty."""
    if len(examples) < 2:
        raise ValueError(f"{len(examples)} example is too few: fine-tuning needs at least 2 (one "
                         f"to train on, one to hold out)")
    every = max(2, round(1 / val_fraction)) if val_fraction > 0 else len(examples)
    held = set(range(every - 1, len(examples), every)) or {len(examples) - 1}
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


# -----------------------------------------------------------------------------
# Encoding: the chat template, the loss mask, padding and truncation


def encode_example(tok: Tokenizer, messages: list, block_size: int) -> tuple[list, list, bool]:
    """(inputs, targets, truncated) for one conversation: targets are the next tokens where
    the next token is the assistant's (its content and <|end|>), -100 elsewhere.

    [user "hi", assistant "yo"] renders as  <|user|> hi <|end|> <|assistant|> yo <|end|>;
    the inputs are all but the last token, and only "yo" and its <|end|> are targets."""
    ids, mask = tok.encode_chat(messages)
    inputs = ids[:-1]
    targets = [t if learn else -100 for t, learn in zip(ids[1:], mask[1:])]
    truncated = len(inputs) > block_size
    return inputs[:block_size], targets[:block_size], truncated


def pad_rows(rows: list, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[(inputs, targets)] -> (inputs, targets) tensors (B, T), right-padded to the longest row:
    pad inputs are <|pad|> and pad targets -100. A causal model never attends forwards, so the
    pads change nothing before them, and the loss never sees them."""
    T = max(len(x) for x, _ in rows)
    x = torch.tensor([x + [pad_id] * (T - len(x)) for x, _ in rows])
    y = torch.tensor([y + [-100] * (T - len(y)) for _, y in rows])
    return x.to(device), y.to(device)


def pack_rows(rows: list, pad_id: int, block_size: int, device) -> tuple:
    """[(inputs, targets)] -> (inputs, targets, {"segments": ...}), each (R, T) with R <= B:
    the examples packed into as few rows of at most block_size tokens as first-fit decreasing
    finds (longest first, each into the first row with room). segments numbers the examples
    inside each row (the pad tail gets a number of its own), and GPT.forward(segments=...)
    lets a token attend only within its own example, with positions restarting at 0: each
    example is computed as it would be alone, so the loss equals pad_rows' on the same rows.
    Example: lengths 5, 3, 2 with block_size 8 -> rows [5 | 3] and [2 + 6 pads]."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    bins = []  # [tokens used, [example indices]]
    for i in order:
        n = len(rows[i][0])
        for b in bins:
            if b[0] + n <= block_size:
                b[0] += n
                b[1].append(i)
                break
        else:
            bins.append([n, [i]])
    T = max(used for used, _ in bins)
    xs, ys, segs = [], [], []
    for used, members in bins:
        x, y, s = [], [], []
        for k, i in enumerate(members):
            x, y, s = x + rows[i][0], y + rows[i][1], s + [k] * len(rows[i][0])
        xs.append(x + [pad_id] * (T - used))
        ys.append(y + [-100] * (T - used))
        segs.append(s + [len(members)] * (T - used))
    as_tensor = lambda v: torch.tensor(v).to(device)
    return as_tensor(xs), as_tensor(ys), {"segments": as_tensor(segs)}


class ChatBatches:
    """Encoded examples with a resumable position, like train.TokenWindows: row r of the run is
    example perm_e[r mod N] of epoch e = r // N, a pure function of (seed, r), so resuming needs
    only the counter `rows` and any split of a step into micro-batches gives the same batch.
    pack=True: batch() packs its examples (pack_rows) instead of padding them (pad_rows)."""

    def __init__(self, tok: Tokenizer, examples: list, block_size: int, seed: int, name: str,
                 pack: bool = False):
        encoded = [encode_example(tok, e["messages"], block_size) for e in examples]
        self.truncated = sum(t for _, _, t in encoded)
        kept = [(x, y) for x, y, _ in encoded if any(v != -100 for v in y)]
        self.dropped = len(encoded) - len(kept)  # cut so short that no reply token was left
        if not kept:
            raise ValueError(f"no {name} example keeps a reply token within the model's "
                             f"{block_size}-token context; shorten the prompts")
        self.examples, self.seed, self.pad_id, self.rows = kept, seed, tok.pad_id, 0
        self.pack, self.block_size = pack, block_size
        self._order = (-1, [])  # (epoch, its permutation of the examples)

    def example(self, row: int) -> tuple[list, list]:
        epoch, pos = divmod(row, len(self.examples))
        if self._order[0] != epoch:  # a fresh shuffle each epoch, seeded by (seed, epoch)
            n = len(self.examples)
            self._order = (epoch, random.Random(f"{self.seed}-{epoch}").sample(range(n), n))
        return self.examples[self._order[1][pos]]

    def batch(self, rows: range, device) -> tuple:
        """(inputs, targets) (B, T) for these rows, right-padded (pad_rows), or packed
        (pack_rows: fewer rows, and the segments for the forward)."""
        examples = [self.example(r) for r in rows]
        if self.pack:
            return pack_rows(examples, self.pad_id, self.block_size, device)
        return pad_rows(examples, self.pad_id, device)


class ReplyLoss(nn.Module):
    """forward(x, y, weight=1.0, **kw) -> (None, weight * the model's mean reply loss): what
    train_step runs for sft. The weight makes a step's loss the mean over all its reply tokens,
    however the step is split: train.py averages micro-batch means (each over accum, then over
    processes), which weights a token by 1 / (its micro-batch's token count); with weight =
    n_micro * step_rows / (micro rows * n_step) each token counts 1 / n_step (chat_batches).
    One micro-batch on one process: weight 1, the plain mean."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, x, y, weight: float = 1.0, **kwargs):
        _, loss = self.model(x, y, **kwargs)
        return None, loss * weight


# -----------------------------------------------------------------------------
# LoRA: a frozen base linear plus a trainable low-rank update (Hu et al. 2021)

# Every linear inside a block, in both model styles: model.py names them alike, GPT-2 style
# has attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, and Llama style adds mlp.c_gate (SwiGLU).
# LoRA's paper adapted only W_q and W_v (section 7.1); QLoRA (Dettmers et al. 2023, section 4)
# found that adapting every linear layer is what matches full finetuning. A name that a style
# lacks (c_gate in GPT-2) simply matches nothing there.
LORA_TARGETS = ("c_attn", "c_proj", "c_fc", "c_gate")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B A x, with base frozen, A (r, in) and B (out, r) trained
    (Hu et al. 2021, eq. 3). B starts at zero, so a fresh adapter changes nothing: the model
    begins exactly where the base model is. Example: a (96, 32) c_attn with r=8 gains
    8 * (32 + 96) = 1,024 trainable numbers next to its 3,072 frozen ones."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = rank
        # Hu et al. section 4.1: scaling by alpha / r keeps the update's size roughly fixed
        # when r changes, so a learning rate tuned at one rank carries over to another
        self.scale = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device,
                                               dtype=w.dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device,
                                               dtype=w.dtype))  # (out, r), zero: B A = 0 at start
        # The paper draws A from a Gaussian; loralib and PEFT use nn.Linear's own init
        # (kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), as we do. Either
        # way A must be random: with A and B both zero no gradient would ever reach them.
        if not w.is_meta:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # dropout on the low-rank path's input only (as loralib): the base path stays exact
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # False: behave as the base linear (DPO's reference model)

    def forward(self, x):
        y = self.base(x)  # (B, T, out)
        if not self.enabled:
            return y
        # two thin matmuls, in -> r -> out, instead of materializing the (out, in) matrix B A
        h = F.linear(self.dropout(x), self.lora_A)  # (B, T, r)
        return y + self.scale * F.linear(h, self.lora_B)  # (B, T, out)

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) * B A, (out, in): the single matrix this layer now computes with
        (Hu et al. section 4.1: merged, LoRA adds no inference latency)."""
        w = self.base.weight
        # subtle: in bf16 a small update added to a large weight loses its low bits; add in fp32
        delta = self.lora_B.float() @ self.lora_A.float()  # (out, in)
        return (w.float() + self.scale * delta).to(w.dtype)  # (out, in)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, enabled={self.enabled}"


def _is_target(name: str, targets: tuple) -> bool:
    """True when the qualified name ends with a target on a dot boundary:
    "transformer.h.0.attn.c_proj" matches "c_proj" and "attn.c_proj", never "proj"."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _wrappable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every nn.Linear LoRA may wrap: all but the output head.
    subtle: a tied head *is* the token embedding (model.py sets lm_head.weight = wte.weight);
    merging an update into it would silently change the input embeddings too, so the head is
    skipped by name, and so is any other linear whose weight an nn.Embedding shares."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [(n, m) for n, m in model.named_modules()
            if type(m) is nn.Linear and n.split(".")[-1] != "lm_head"
            and id(m.weight) not in embeddings]


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: tuple[str, ...] = LORA_TARGETS) -> list[str]:
    """Replace every nn.Linear whose qualified name ends with one of `targets` by a LoRALinear
    around it, freeze everything else, and return the replaced names in module order.
    Example: a 2-layer GPT-2 style model with the default targets -> 8 names,
    ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", ...]; Llama style -> 10."""
    if not isinstance(rank, int) or rank <= 0 or alpha <= 0 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"apply_lora needs a positive integer rank, alpha > 0 and dropout in "
                         f"[0, 1); got rank={rank!r}, alpha={alpha!r}, dropout={dropout!r}.")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("apply_lora: the model already has LoRA adapters; call merge_lora "
                         "first to stack a new set on the merged weights.")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)  # "c_attn" alone
    candidates = _wrappable_linears(model)
    chosen = [(n, m) for n, m in candidates if _is_target(n, targets)]
    if not chosen:
        # the last two parts name a layer's role ("attn.c_attn") without its layer index
        options = sorted({".".join(n.split(".")[-2:]) for n, _ in candidates})
        raise ValueError(f"apply_lora: targets {targets} match no nn.Linear in the model; its "
                         f"linear layers are {', '.join(options) or 'none'} (lm_head is never "
                         f"wrapped), so pass some of those names, e.g. {LORA_TARGETS}.")
    # freeze first, then un-freeze only what the adapters add: the base never trains
    model.requires_grad_(False)
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lora = LoRALinear(linear, rank, alpha, dropout)
        lora.lora_A.requires_grad_(True)
        lora.lora_B.requires_grad_(True)
        setattr(parent, child, lora)
    return [n for n, _ in chosen]


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRALinear back into a plain nn.Linear holding W + (alpha / r) B A and the
    base bias. Afterwards model.state_dict() has exactly an unmodified GPT's keys, so
    GPT(GPTConfig(...)).load_state_dict loads it (sample.py needs nothing LoRA-specific).
    A model without adapters is left as it is, so saving code can call this unconditionally.
    The merged weights keep the base's requires_grad (False after apply_lora)."""
    loras = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, lora in loras:
        base = lora.base
        # meta device: no init work for a matrix that is overwritten on the next lines
        plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                          device="meta")
        with torch.no_grad():
            plain.weight = nn.Parameter(lora.merged_weight(),
                                        requires_grad=base.weight.requires_grad)  # (out, in)
        if base.bias is not None:
            plain.bias = base.bias  # the adapter never touches the bias: keep the very tensor
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, plain)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block every LoRALinear computes only its base linear: the model is the
    frozen base model again. DPO's reference policy is exactly that (Rafailov et al. 2023,
    section 4: pi_ref is the model finetuning started from), without a second copy in memory.
    Each adapter's previous `enabled` flag is restored on exit, even after an exception."""
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    # subtle: without adapters the "reference" would be the policy itself, moving as it trains;
    # DPO would then see zero reward margins forever instead of an error
    if not loras:
        raise ValueError("adapters_disabled: the model has no LoRA adapters, so switching them "
                         "off would not give the base model; call apply_lora first, or keep a "
                         "separate frozen copy as the reference model.")
    before = [m.enabled for m in loras]
    for m in loras:
        m.enabled = False
    try:
        yield model
    finally:
        for m, flag in zip(loras, before):
            m.enabled = flag


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(parameters that require grad, all parameters), a tied tensor counted once.
    Example: 2-layer GPT-2 style, C=32, V=64, T=16, rank 4, default targets ->
    (4,096, 32,128): 4 * (32+96 + 32+32 + 32+128 + 128+32) = 2,048 adapter numbers per
    layer next to the base model's 28,032."""
    params = list(model.parameters())  # parameters() yields a shared tensor only once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# -----------------------------------------------------------------------------
# DPO: preference pairs as a classification loss on log-probability ratios (Rafailov 2023)


def sequence_logprobs(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(response | prompt) per row: the sum over positions t of log p(targets[t] | ids[:t+1])
    where targets[t] != -100 (the prompt and the padding are masked with -100, as finetune.py
    masks its SFT targets). ids, targets: (B, T), aligned as in GPT.forward. Returns (B,).
    Example: targets [[-100, 5, 7]] -> log p(5 | ids[:2]) + log p(7 | ids[:3])."""
    B, T = ids.shape
    # targets make GPT.forward return logits at every position; its mean loss goes unused
    logits, _ = model(ids, targets)  # (B, T, V)
    # -cross_entropy per position is log_softmax gathered at the target, and it is exactly 0
    # where the target is -100; fp32, because a sum over hundreds of bf16 terms drifts
    logp = -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                            reduction="none")  # (B*T,)
    return logp.view(B, T).sum(dim=1)  # (B,)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple:
    """DPO's loss and two diagnostics from sequence log-probs, each (B,) (Rafailov et al. eq. 7):
      loss = -mean log sigmoid(beta * ((pc - rc) - (pr - rr)))
    The implicit reward of a response is beta * (log pi - log pi_ref) (section 5), so
    reward_margin = mean(chosen reward - rejected reward) and accuracy = the fraction of pairs
    whose chosen reward is higher; both are detached. With policy == reference the loss is
    log 2 (sigmoid(0) = 1/2) and the margin 0. Example: beta=0.1, pc - rc = 0.5, pr - rr = -1
    -> loss log(1 + exp(-0.15)) = 0.6210, margin 0.15, accuracy 1."""
    chosen_reward = beta * (policy_chosen - ref_chosen)  # (B,)
    rejected_reward = beta * (policy_rejected - ref_rejected)  # (B,)
    # logsigmoid rather than log(sigmoid()): stable when a margin is large and negative
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    margin = (chosen_reward - rejected_reward).detach()  # (B,)
    # beta is a temperature (section 4): larger keeps the policy closer to the reference
    return loss, margin.mean(), (margin > 0).float().mean()



def builtin_rejected(instruction: str, answer: str, rng: random.Random) -> str:
    """A plausible wrong reply for a built-in instruction: a near miss, not noise, so DPO has to
    learn the operation's details. Lists get two entries swapped (or the input list back, when
    the swap changes nothing); numbers are off by one or two."""
    if answer.startswith("["):
        xs = json.loads(answer)
        i, j = rng.sample(range(len(xs)), 2)
        xs[i], xs[j] = xs[j], xs[i]
        wrong = str(xs)
        return wrong if wrong != answer else instruction.split(" ", 1)[1]
    return str(int(answer) + rng.choice((-2, -1, 1, 2)))


def builtin_pairs(examples: list, seed: int) -> list:
    """{"prompt", "chosen", "rejected"} pairs from built-in chat examples; pairs whose wrong
    reply happens to equal the right one (a sort of an already sorted list) are left out."""
    rng, pairs = random.Random(f"builtin-rejected-{seed}"), []
    for e in examples:
        prompt, answer = e["messages"][0]["content"], e["messages"][1]["content"]
        wrong = builtin_rejected(prompt, answer, rng)
        if wrong != answer:
            pairs.append({"prompt": prompt, "chosen": answer, "rejected": wrong})
    return pairs


def pair_from_json(obj, where: str) -> dict:
    """One DPO JSONL object {"prompt", "chosen", "rejected"} (strings), checked."""
    fields = ("prompt", "chosen", "rejected")
    if not (isinstance(obj, dict) and all(isinstance(obj.get(k), str) for k in fields)):
        raise ValueError(f"{where} needs string \"prompt\", \"chosen\" and \"rejected\" fields "
                         f"(a DPO preference pair)")
    if obj["chosen"].strip() == obj["rejected"].strip():
        raise ValueError(f"{where}: chosen and rejected are the same reply, so there is no "
                         f"preference to learn; drop the line or fix one of them")
    return {k: obj[k] for k in ("prompt", "chosen", "rejected")}


class PairBatches(ChatBatches):
    """Preference pairs rendered with the chat template: a row is (chosen inputs, chosen targets,
    rejected inputs, rejected targets); batch() stacks the chosen rows over the rejected ones,
    (2B, T), the layout DPOObjective reads (one forward pass for both, as TRL does)."""

    def __init__(self, tok: Tokenizer, pairs: list, block_size: int, seed: int, name: str):
        def render(p, reply):
            return encode_example(tok, [{"role": "user", "content": p["prompt"]},
                                        {"role": "assistant", "content": reply}], block_size)
        encoded = [(render(p, p["chosen"]), render(p, p["rejected"])) for p in pairs]
        self.truncated = sum(c[2] or r[2] for c, r in encoded)
        kept = [(c[0], c[1], r[0], r[1]) for c, r in encoded
                if any(v != -100 for v in c[1]) and any(v != -100 for v in r[1])]
        self.dropped = len(encoded) - len(kept)
        if not kept:
            raise ValueError(f"no {name} pair keeps a reply token within block_size={block_size}; "
                             f"shorten the prompts")
        self.examples, self.seed, self.pad_id, self.rows = kept, seed, tok.pad_id, 0
        self._order = (-1, [])

    def batch(self, rows: range, device) -> tuple[torch.Tensor, torch.Tensor]:
        quads = [self.example(r) for r in rows]
        # the chosen rows first, then the rejected ones
        seqs = [(q[0], q[1]) for q in quads] + [(q[2], q[3]) for q in quads]
        return pad_rows(seqs, self.pad_id, device)


class DPOObjective(nn.Module):
    """forward(x, y) -> (None, DPO loss) for a PairBatches batch, so train.train_step trains it
    as it trains any model: the policy is `policy` (what trains and is saved); the reference is
    the policy with its LoRA adapters switched off, or else a frozen copy taken at the start
    (Rafailov et al. 2023: pi_ref is the model the preference tuning starts from)."""

    def __init__(self, policy: GPT, beta: float):
        super().__init__()
        self.policy, self.beta = policy, beta
        self.lora = any(isinstance(m, LoRALinear) for m in policy.modules())
        # a frozen copy only without LoRA; kept out of the module tree (no state_dict entries)
        self._reference = [] if self.lora else [copy.deepcopy(policy).eval().requires_grad_(False)]
        self.margin = self.accuracy = self.ranked = float("nan")  # of the last batch, for the log

    def reference_logprobs(self, x, y) -> torch.Tensor:
        with torch.no_grad():
            if self.lora:
                was_training = self.policy.training
                self.policy.eval()  # no adapter dropout in the reference
                with adapters_disabled(self.policy):
                    ref = sequence_logprobs(self.policy, x, y)
                self.policy.train(was_training)
                return ref
            return sequence_logprobs(self._reference[0], x, y)

    def forward(self, x, y):
        n = x.size(0) // 2  # rows [0, n) chosen, [n, 2n) rejected
        logp = sequence_logprobs(self.policy, x, y)  # (2n,)
        ref = self.reference_logprobs(x, y)  # (2n,)
        loss, margin, accuracy = dpo_loss(logp[:n], logp[n:], ref[:n], ref[n:], self.beta)
        self.margin, self.accuracy = margin.item(), accuracy.item()
        # and without the reference: how often the policy itself gives the chosen reply the
        # higher likelihood (what greedy decoding cares about; before training, the SFT model's)
        self.ranked = (logp[:n] > logp[n:]).float().mean().item()
        return None, loss


# -----------------------------------------------------------------------------
# Classification: a head on the last token (as the book's spam classifier, Raschka ch. 6)

# The built-in task: which of these standard-library packages a function comes from, read from
# this Python's own source. A causal model's last position has attended to every token before
# it, so its hidden state summarises the text; a linear head maps it to one score per class.
# Each text ends in <|end|>, so the position the head reads is the same token in every example.
# The held-out functions come from held-out files (every 5th file of a package), so the test
# is on code the head never saw, not on near copies of methods of the same class.
CLASSIFY_PACKAGES = ("asyncio", "email", "multiprocessing", "unittest")
CLASSIFY_CHARS = 1200  # characters of a function kept (its start); the context cuts it again


@functools.lru_cache(maxsize=None)  # parsing a package takes a second; its files do not change
def stdlib_functions(package: str) -> tuple[tuple[str, str], ...]:
    """((file relative to the stdlib, source of one function), ...) for every function and
    method of at least 3 lines in the package's .py files (sorted, tests included), dedented.
    Example: "email" -> (("email/_encoded_words.py", "def decode_q(encoded):\n..."), ...)."""
    root = sysconfig.get_paths()["stdlib"]
    folder = os.path.join(root, package)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the built-in classification task reads the {package} package "
                                f"of this Python, but {folder} does not exist; pass your own "
                                f"--data=FILE.jsonl of {{\"text\", \"label\"}} lines")
    found = []
    for rel, _, _ in list_text_files(folder, (".py",)):
        path = os.path.join(folder, rel)
        source = read_text_file(path)[0]
        if source is None:  # binary
            continue
        try:
            tree = ast.parse(source)
        except SyntaxError:  # lib2to3-style test data: not Python 3
            continue
        lines = source.split("\n")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    node.end_lineno - node.lineno >= 2:
                text = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno]))
                found.append((os.path.relpath(path, root), text[:CLASSIFY_CHARS]))
    return tuple(found)


def builtin_classify(seed: int, packages: tuple = CLASSIFY_PACKAGES) -> tuple[list, list]:
    """(train, val) lists of {"text", "label"}: functions of each package, the same number per
    package in each split (the smallest package's count), so chance is 1 / len(packages)."""
    splits = ([], [])
    for package in packages:
        functions = stdlib_functions(package)
        files = sorted({f for f, _ in functions})
        held = set(files[4::5])  # every 5th file of the package
        for k in (0, 1):
            chosen = [t for f, t in functions if (f in held) == bool(k)]
            splits[k].append([{"text": t, "label": package} for t in chosen])
    out = []
    for k, per_package in enumerate(splits):
        n = min(len(p) for p in per_package)
        rng = random.Random(f"builtin-classify-{seed}-{k}")
        balanced = [e for p in per_package for e in rng.sample(p, n)]
        rng.shuffle(balanced)
        out.append(balanced)
    return out[0], out[1]


def class_example_from_json(obj, where: str) -> dict:
    """One classification JSONL object {"text": string, "label": string or integer}, checked."""
    if not (isinstance(obj, dict) and isinstance(obj.get("text"), str)
            and isinstance(obj.get("label"), (str, int)) and not isinstance(obj["label"], bool)):
        raise ValueError(f"{where} needs a string \"text\" and a \"label\" (a string or an "
                         f"integer) (a classification example)")
    if not obj["text"].strip():
        raise ValueError(f"{where}: the text is empty, so there is nothing to classify")
    return {"text": obj["text"], "label": str(obj["label"])}


class ClassBatches(ChatBatches):
    """Classification examples: inputs are the text's tokens then <|end|>, cut to block_size
    (the start kept); targets are -100 except at that last position, which holds the class
    index, so a right-padded (B, T) batch says where the head reads and what it should say."""

    def __init__(self, tok: Tokenizer, examples: list, block_size: int, seed: int, name: str,
                 classes: list):
        index, end = {c: i for i, c in enumerate(classes)}, tok.special_tokens["<|end|>"]
        self.truncated, self.dropped, kept = 0, 0, []
        for e in examples:
            ids = tok.encode(e["text"])
            self.truncated += len(ids) + 1 > block_size
            ids = ids[:block_size - 1] + [end]
            kept.append((ids, [-100] * (len(ids) - 1) + [index[e["label"]]]))
        if not kept:
            raise ValueError(f"no {name} example to classify")
        self.examples, self.seed, self.pad_id, self.rows = kept, seed, tok.pad_id, 0
        self.pack, self.block_size, self._order = False, block_size, (-1, [])


class ClassifierObjective(nn.Module):
    """forward(x, y) -> (class logits (B, K), cross-entropy loss) for a ClassBatches batch, so
    train.train_step trains it like a language model. The head is model.score, a Linear from
    the last hidden state to one logit per class, attached to the GPT so that the optimizer,
    the checkpoints and resume carry it with the other weights. The language-model head is not
    used; when untied it is frozen (it would get no gradient, which DDP refuses)."""

    def __init__(self, model: GPT, n_classes: int):
        super().__init__()
        self.model = model
        if not hasattr(model, "score"):
            model.score = nn.Linear(model.config.n_embd, n_classes).to(model.lm_head.weight.device)
            nn.init.normal_(model.score.weight, std=0.02)  # GPT-2's init for every matrix
            nn.init.zeros_(model.score.bias)
        if model.lm_head.weight is not model.transformer.wte.weight:
            model.lm_head.weight.requires_grad_(False)
        self.accuracy = float("nan")  # of the last batch, for the log

    def forward(self, x, y):
        h = self.model.hidden_states(x)  # (B, T, C)
        where = y != -100  # (B, T): one True per row, the <|end|> that ends the text
        logits = self.model.score(h[where]).float()  # (B, K)
        labels = y[where]  # (B,)
        self.accuracy = (logits.argmax(-1) == labels).float().mean().item()
        return logits, F.cross_entropy(logits, labels)


@torch.no_grad()
def classify_heldout(objective: ClassifierObjective, val: ClassBatches, batch: int,
                     ctx, device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the head over the held-out examples."""
    was_training = objective.training
    objective.eval()
    loss_sum, right = 0.0, 0
    for i in range(0, len(val.examples), batch):
        x, y = pad_rows(val.examples[i:i + batch], val.pad_id, device)
        with ctx:
            logits, loss = objective(x, y)
        loss_sum += loss.item() * len(logits)  # the batch mean, weighted back to a sum
        right += (logits.argmax(-1) == y[y != -100]).sum().item()
    objective.train(was_training)
    return loss_sum / len(val.examples), right / len(val.examples)


def load_classifier(out_dir: str, device="cpu") -> tuple[GPT, Tokenizer, list]:
    """(model with its .score head, tokenizer, class names) from a --task=classify out_dir.
    predict(model, tok, classes, texts) then labels texts."""
    model, tok, _ = load_for_sampling(out_dir, device=device)
    ckpt = "best.pt" if os.path.exists(os.path.join(out_dir, "best.pt")) else "ckpt.pt"
    _, ck = train.load_checkpoint(os.path.join(out_dir, ckpt))
    head = ck.get("classifier")
    if not head:
        raise ValueError(f"{out_dir}/{ckpt} has no classification head; it was not written by "
                         f"finetune.py --task=classify")
    ClassifierObjective(model, len(head["classes"]))
    model.score.load_state_dict({"weight": head["weight"], "bias": head["bias"]})
    return model.to(device).eval(), tok, head["classes"]


@torch.no_grad()
def predict(model: GPT, tok: Tokenizer, classes: list, texts: list) -> list[str]:
    """The class name of each text, as the held-out evaluation scores it."""
    objective = ClassifierObjective(model, len(classes)).eval()
    device = model.lm_head.weight.device
    data = ClassBatches(tok, [{"text": t, "label": classes[0]} for t in texts],
                        model.config.block_size, 0, "given", classes)
    labels = []
    for i in range(0, len(texts), 32):
        x, y = pad_rows(data.examples[i:i + 32], tok.pad_id, device)
        logits, _ = objective(x, y)
        labels += [classes[k] for k in logits.argmax(-1).tolist()]
    return labels


# -----------------------------------------------------------------------------
# The pretrained model and its tokenizer

CHAT_TOKENS = ("<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


def is_hf_dir(path: str) -> bool:
    """True for a Hugging Face model directory (config.json, no train.py checkpoint): train.py's
    out_dirs have a config.json too, but always next to ckpt.pt or best.pt."""
    return os.path.isfile(os.path.join(path, "config.json")) and not any(
        os.path.exists(os.path.join(path, n)) for n in ("ckpt.pt", "best.pt"))


def load_pretrained(init_from: str, log=print) -> tuple[GPT, Tokenizer, str | None]:
    """(model, tokenizer, tokenizer path or None) from a train.py/finetune.py out_dir or a
    Hugging Face directory, through sample.py's loader (the one reader of both): best.pt if
    there is one, else ckpt.pt, and the tokenizer beside it, checked to be the one the
    checkpoint was trained with. A tokenizer without the chat tokens (GPT-2's has only
    <|endoftext|>) gets them (Tokenizer adds them after its last id), and the model rows for
    them (GPT.grow_vocab); the path is then None, as no file holds that tokenizer yet.
    Example: "out" -> (the GPT of 1.38M parameters, its Tokenizer, "out/tokenizer.bpe")."""
    hf = is_hf_dir(init_from)
    model, tok, _ = load_for_sampling(hf=init_from) if hf else load_for_sampling(init_from)
    tok_path = os.path.join(init_from, "tokenizer.bpe")
    rows = model.config.vocab_size
    # chat tokens the tokenizer had to add, or that it has but the model has no row for
    fresh = [t for t in CHAT_TOKENS if t in tok.added_specials or tok.special_tokens[t] >= rows]
    if fresh or tok.n_vocab > rows:
        ids = [tok.special_tokens[t] for t in fresh]
        model.grow_vocab(tok.n_vocab, ids)
        log(f"tokenizer: {init_from} lacks {', '.join(fresh) or 'rows for some ids'}: added as "
            f"ids {', '.join(map(str, ids))}; the embedding and head grow from {rows:,} to "
            f"{model.config.vocab_size:,} rows, the new ones at the mean embedding")
        if tok.added_specials:
            tok_path = None  # no file holds this tokenizer yet: setup_finetune writes it
    return model.train(), tok, tok_path


# -----------------------------------------------------------------------------
# Evaluation: held-out loss on the replies, and exact match of generated replies


@torch.no_grad()
def heldout_loss(run: train.Run, val: ChatBatches) -> float:
    """Mean cross-entropy over the held-out replies' tokens (prompt tokens are -100)."""
    model = run.eval_model
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(val.examples), run.micro_bs):
        rows = [val.examples[j] for j in range(i, min(i + run.micro_bs, len(val.examples)))]
        n = sum(sum(t != -100 for t in y) for _, y in rows)  # reply tokens in this batch
        x, y = pad_rows(rows, val.pad_id, run.device)
        with run.ctx:
            _, loss = model(x, y)
        total, count = total + loss.item() * n, count + n  # the batch mean, weighted back to a sum
    model.train(was_training)
    return total / count


@torch.no_grad()
def exact_match(model: GPT, tok: Tokenizer, examples: list, device, batch: int = 50) -> float:
    """Fraction of examples whose greedy reply, up to <|end|>, is exactly the reference reply
    (the last assistant message), both stripped of surrounding white space. The prompts of a
    batch are left-padded so each row decodes as it would alone (model.generate, prompt_lens)."""
    was_training = model.training
    model.eval()
    end, right = tok.special_tokens["<|end|>"], 0
    for i in range(0, len(examples), batch):
        prompts, answers = [], []
        for e in examples[i:i + batch]:
            last = max(j for j, m in enumerate(e["messages"]) if m["role"] == "assistant")
            ids, _ = tok.encode_chat(e["messages"][:last], add_generation_prompt=True)
            prompts.append(ids[-model.config.block_size // 2:])  # room left for the reply
            answers.append(e["messages"][last]["content"].strip())
        longest = max(len(p) for p in prompts)
        idx = torch.tensor([[tok.pad_id] * (longest - len(p)) + p for p in prompts], device=device)
        new = max(len(tok.encode(a)) for a in answers) + 2  # enough for the reply and <|end|>
        new = min(new, model.config.block_size - longest)
        out = model.generate(idx, new, temperature=0.0, eos_id=end, vocab_limit=tok.n_vocab,
                             prompt_lens=[len(p) for p in prompts])
        for row, answer in zip(out[:, longest:].tolist(), answers):
            reply = row[:row.index(end)] if end in row else row
            right += tok.decode(reply).strip() == answer
    model.train(was_training)
    return right / len(examples)


# -----------------------------------------------------------------------------
# The run: train.py's Run and phases, with fine-tuning batches


def train_config(cfg: FinetuneConfig, block_size: int, world: int = 1) -> train.TrainConfig:
    """The train.TrainConfig that train.py's phases read: AdamW, warmup then cosine, one
    micro-batch per step and process, batch_size examples across the processes together
    (train.py halves the micro-batch on CUDA out-of-memory)."""
    if cfg.batch_size % world:
        raise ValueError(f"--batch_size={cfg.batch_size} examples per step do not split evenly "
                         f"over {world} processes; pass a multiple of {world}")
    return train.TrainConfig(dataset=cfg.init_from, out_dir=cfg.out_dir, sampling="sequential",
                             batch_size=cfg.batch_size // world,
                             total_batch_size=cfg.batch_size * block_size,
                             optimizer="adamw", learning_rate=cfg.learning_rate,
                             min_lr_ratio=cfg.min_lr_ratio, warmup_steps=cfg.warmup_steps,
                             schedule="cosine", weight_decay=cfg.weight_decay,
                             grad_clip=cfg.grad_clip, max_steps=cfg.max_steps,
                             eval_interval=cfg.eval_interval, log_interval=cfg.log_interval,
                             sample_tokens=0, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed,
                             resume=cfg.resume)


def read_task_data(cfg: FinetuneConfig) -> tuple[list, list, list]:
    """(training set, held-out set, what the score needs) of the task: conversations and the
    held-out ones for sft, preference pairs and their chosen replies as conversations for dpo
    (graded by exact match), {"text", "label"} examples and the class names for classify;
    from --data (checked line by line before anything else is loaded, so a bad file fails at
    once) or built in."""
    if cfg.task == "sft":
        if cfg.data:
            train_set, val_set = split_examples(read_examples(cfg.data), cfg.val_fraction)
        else:
            train_set, val_set = builtin_task(cfg.builtin_train, cfg.builtin_val, cfg.seed)
        return train_set, val_set, val_set
    if cfg.task == "classify":
        if cfg.data:
            examples = read_examples(cfg.data, class_example_from_json)
            train_set, val_set = split_examples(examples, cfg.val_fraction)
        else:
            train_set, val_set = builtin_classify(cfg.seed)
        classes = sorted({e["label"] for e in train_set + val_set})
        if len(classes) < 2:
            raise ValueError(f"{cfg.data}: every example has the label {classes[0]!r}; a "
                             f"classifier needs at least two classes")
        return train_set, val_set, classes
    if cfg.data:
        pairs = read_examples(cfg.data, pair_from_json)
        train_set, val_set = split_examples(pairs, cfg.val_fraction)
    else:
        train_set, val_set = (builtin_pairs(e, cfg.seed) for e in
                              builtin_task(cfg.builtin_train, cfg.builtin_val, cfg.seed))
    val_chats = [{"messages": [{"role": "user", "content": p["prompt"]},
                               {"role": "assistant", "content": p["chosen"]}]} for p in val_set]
    return train_set, val_set, val_chats


def encode_task_data(cfg: FinetuneConfig, sets: tuple, tok: Tokenizer, block_size: int,
                     log) -> tuple:
    """(training batches, held-out batches): the sets rendered with the chat template, or, for
    classify, as texts ending in <|end|>."""
    train_set, val_set, extra = sets
    if cfg.task == "classify":
        make = lambda s, name: ClassBatches(tok, s, block_size, cfg.seed, name, extra)
        what = f"examples of {len(extra)} classes ({', '.join(extra)})"
    elif cfg.task == "sft":
        make = lambda s, name: ChatBatches(tok, s, block_size, cfg.seed, name, cfg.pack)
        what = "examples" + (", packed into rows" if cfg.pack else "")
    else:
        make = lambda s, name: PairBatches(tok, s, block_size, cfg.seed, name)
        what = "preference pairs"
    train_data, val_data = make(train_set, "training"), make(val_set, "held-out")
    dropped = train_data.dropped + val_data.dropped
    log(f"data: {cfg.data or 'the built-in task'}: {len(train_data.examples):,} training and "
        f"{len(val_data.examples):,} held-out {what}; {train_data.truncated + val_data.truncated} "
        f"cut to block_size={block_size}" + (f", {dropped} dropped (no reply token left)"
                                             if cfg.task != "classify" else ""))
    return train_data, val_data


def setup_finetune(cfg: FinetuneConfig) -> tuple[train.Run, ChatBatches, list]:
    """Phase 1: device, the pretrained model, the examples, LoRA, the task's objective,
    optimizer, out_dir (cleared for a fresh run, or the checkpoint loaded for --resume).
    Returns (run, held-out batches, what the score needs: see read_task_data)."""
    rank, world, device, dtype, why = train.start_processes(cfg)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    log(f"device: {device} ({why})")
    sets = read_task_data(cfg)
    model, tok, tok_path = load_pretrained(cfg.init_from, log)
    mcfg, block_size = model.config, model.config.block_size
    tcfg = train.resolve_config(train_config(cfg, block_size, world), device)
    log("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    train_data, val_data = encode_task_data(cfg, sets, tok, block_size, log)
    torch.manual_seed(cfg.seed)  # the adapters' and the head's initial weights, then dropout
    model = model.to(device).train()
    if cfg.lora_rank:
        targets = tuple(t for t in cfg.lora_targets.split(",") if t) or LORA_TARGETS
        names = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets)
        log(f"LoRA: rank {cfg.lora_rank}, alpha {cfg.lora_alpha} on {len(names)} matrices "
            f"({', '.join(sorted({n.split('.')[-1] for n in names}))}); the rest is frozen")
    # subtle: DPO's frozen reference is copied here, before --resume loads the later weights:
    # the reference is always the model the preference tuning started from. The classifier's
    # head is made after LoRA froze the base, so it trains either way.
    if cfg.task == "dpo":
        objective = DPOObjective(model, cfg.beta)
    elif cfg.task == "classify":
        objective = ClassifierObjective(model, len(sets[2]))
    else:
        objective = ReplyLoss(model)
    train.seed_this_rank(cfg.seed, rank)  # the same weights everywhere, dropout masks per rank
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"trainable parameters: {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")
    micro_bs, accum, step_rows, total_tokens = train.batch_geometry(tcfg, block_size, world)
    if rank == 0:
        train.check_writable(cfg.out_dir)
    optimizers = train.build_optimizers(model, tcfg, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    out_tok = os.path.join(cfg.out_dir, "tokenizer.bpe")
    run = train.Run(tcfg, mcfg, device, dtype, rank, world, model, optimizers, scaler, micro_bs,
                    accum, step_rows, total_tokens, cfg.init_from, {}, tok, out_tok, train_data,
                    None, log)
    if not cfg.resume and run.master:
        train.clear_previous_run(cfg.out_dir, log)
    if run.master:  # the tokenizer first: checkpoints (and resume) check its sha256
        if tok_path:
            train.copy_durably(tok_path, out_tok)
        else:  # one grown by load_pretrained, in no file yet
            tok.save(out_tok)
    if cfg.resume:
        train.resume_run(run)  # continues from ck["resume_weights"]: adapters and head apart
    if run.master:
        train.write_text(os.path.join(cfg.out_dir, "config.json"), json.dumps(
            {"finetune": asdict(cfg), "train": asdict(tcfg), "model": asdict(mcfg)}, indent=1))
        if not cfg.resume:
            open(os.path.join(cfg.out_dir, "log.jsonl"), "w").close()
    # what train_step runs: the task's loss around the model, wrapped whole, so that under
    # DDP the gradients of every loss are all-reduced
    train.wrap_model(run, objective)
    return run, val_data, sets[2]


def chat_batches(run: train.Run):
    """batch_fn for this step (see train.train_step): rows [lo, hi) of this process's share;
    for sft with ReplyLoss's weight, so each reply token of the step counts the same."""
    data, first = run.train_data, run.train_data.rows
    mine = run.rank * (run.step_rows // run.world)
    weigh = type(data) is ChatBatches
    if weigh:  # reply tokens in the whole step, over every process
        step_tokens = sum(sum(t != -100 for t in data.example(r)[1])
                          for r in range(first, first + run.step_rows))

    def batch_fn(lo, hi):
        x, y, *extra = data.batch(range(first + mine + lo, first + mine + hi), run.device)
        kwargs = dict(extra[0]) if extra else {}
        if weigh:
            kwargs["weight"] = (y != -100).sum().item() * run.step_rows / ((hi - lo) * step_tokens)
        return x, y, kwargs
    return batch_fn


def plain_weights(model: GPT) -> dict:
    """The state_dict sample.py loads: a plain GPT's keys. With LoRA, a copy with the adapters
    merged into the weights (W + alpha / r * B A); a classifier's head is left out (saved
    apart, as ck["classifier"])."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        model = copy.deepcopy(model)
        merge_lora(model)
    return {k: v for k, v in model.state_dict().items() if not k.startswith("score.")}


@torch.no_grad()
def heldout_preferences(run: train.Run, val: PairBatches) -> tuple[float, float, float, float]:
    """(DPO loss, mean reward margin, preference accuracy, chosen ranked first) over the held-out
    pairs: accuracy compares rewards (relative to the reference), ranked-first likelihoods."""
    objective = run.eval_model  # the DPOObjective, without DDP: evaluation syncs nothing
    was_training = run.raw.training
    run.raw.eval()
    sums, n = [0.0, 0.0, 0.0, 0.0], 0
    for i in range(0, len(val.examples), run.micro_bs):
        rows = range(i, min(i + run.micro_bs, len(val.examples)))
        quads = [val.examples[r] for r in rows]
        seqs = [(q[0], q[1]) for q in quads] + [(q[2], q[3]) for q in quads]
        x, y = pad_rows(seqs, val.pad_id, run.device)
        with run.ctx:
            _, loss = objective(x, y)
        values = (loss.item(), objective.margin, objective.accuracy, objective.ranked)
        for k, value in enumerate(values):
            sums[k] += value * len(quads)  # batch means, weighted back to sums
        n += len(quads)
    run.raw.train(was_training)
    return tuple(total / n for total in sums)


def score(run: train.Run, val: ChatBatches, scored: list, cfg: FinetuneConfig) -> float:
    """The task's held-out score: exact match of greedy replies (sft, dpo) or accuracy of the
    head (classify; its loss and accuracy come from one pass, see evaluate_and_save)."""
    if cfg.task == "classify":
        return classify_heldout(run.eval_model, val, run.micro_bs, run.ctx, run.device)[1]
    return exact_match(run.raw, run.tok, scored[:cfg.eval_examples], run.device)


def evaluate_and_save(run: train.Run, val: ChatBatches, scored: list,
                      cfg: FinetuneConfig) -> float:
    """Phase 5: the held-out loss (sft: of the replies; dpo: DPO's, with the reward margin and
    the preference accuracy; classify: the head's cross-entropy), the score (exact match, or
    accuracy), a log row; on rank 0 ckpt.pt, best.pt when the held-out loss is the lowest so
    far, and loss.svg. Returns the score."""
    row, extra = {"step": run.step, "tokens": run.tokens_seen}, ""
    if cfg.task == "dpo":
        loss, row["reward_margin"], row["preference_accuracy"], row["chosen_first"] = \
            heldout_preferences(run, val)
        extra = (f", reward margin {row['reward_margin']:.4f}, preference accuracy "
                 f"{100 * row['preference_accuracy']:.1f}%, chosen ranked first "
                 f"{100 * row['chosen_first']:.1f}%")
    if cfg.task == "classify":
        loss, value = classify_heldout(run.eval_model, val, run.micro_bs, run.ctx, run.device)
        name, what = "accuracy", f"accuracy {100 * value:.1f}% of {len(val.examples)}"
    else:
        loss = loss if cfg.task == "dpo" else heldout_loss(run, val)
        value, name = score(run, val, scored, cfg), "exact_match"
        what = f"exact match {100 * value:.1f}% of {min(len(scored), cfg.eval_examples)}"
    run.history["val"].append([run.tokens_seen, loss, value])
    improved = loss < run.best_val
    if improved:
        run.best_val, run.best_step = loss, run.step
    run.log(f"eval step {run.step}: held-out loss {loss:.4f}{extra}, {what}"
            + (" (best)" if improved else ""))
    rng = train.gather_rng_states(run.world)  # a collective: every rank, before rank 0 saves
    if run.master:
        train.append_log(cfg.out_dir, {**row, "val_loss": loss, name: value,
                                       "time": time.time() - run.t_start})
        ck = train.checkpoint_dict(run, rng)
        ck["model"] = plain_weights(run.raw)
        if cfg.lora_rank or cfg.task == "classify":
            ck["resume_weights"] = run.raw.state_dict()  # adapters and head apart, to go on exactly
        if cfg.task == "classify":
            ck["classifier"] = {"classes": scored, **{k: v.detach().clone() for k, v in
                                                      run.raw.score.state_dict().items()}}
        ck["finetune"] = asdict(cfg)
        train.save_checkpoint(run.ckpt_path, ck)
        if improved:
            train.copy_durably(run.ckpt_path, run.best_path)
        train.write_loss_svg(os.path.join(cfg.out_dir, "loss.svg"), run.history["train"],
                             run.history["val"])
        write_score_svgs(cfg, run.history, row)
    return value


def write_score_svgs(cfg: FinetuneConfig, history: dict, row: dict) -> None:
    """score.svg: the held-out score (exact match, or accuracy) in % against the step; for dpo
    also reward_margin.svg. The points live in history (saved in the checkpoint), so a resumed
    run draws the whole curve."""
    points = history.setdefault("score", [])  # [step, score, reward margin or None]
    points.append([row["step"], 100 * history["val"][-1][2], row.get("reward_margin")])
    name = "accuracy" if cfg.task == "classify" else "exact match"
    train.write_curves_svg(os.path.join(cfg.out_dir, "score.svg"),
                           [(name, "#2ca02c", [(s, v) for s, v, _ in points])],
                           "step", f"held-out {name} (%)")
    if cfg.task == "dpo":
        train.write_curves_svg(os.path.join(cfg.out_dir, "reward_margin.svg"),
                               [("reward margin", "#9467bd", [(s, m) for s, _, m in points])],
                               "step", "held-out reward margin (beta * log-ratio gap)")


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune; returns {"score_before", "score", "val_loss", "step", ...}, the score being
    held-out exact match (sft, dpo; also as "exact_match_before", "exact_match") or accuracy
    (classify; also as "accuracy_before", "accuracy", with "chance": the largest class's share)."""
    cfg = resolve_task_defaults(cfg)
    run, val, scored = setup_finetune(cfg)
    name = "accuracy" if cfg.task == "classify" else "exact match"
    before, chance = None, None
    if cfg.task == "classify":
        labels = [y[-1] for _, y in val.examples]
        chance = max(labels.count(k) for k in set(labels)) / len(labels)
    if not cfg.resume:  # the starting point, on the same held-out examples
        before = score(run, val, scored, cfg)
        run.log(f"{name} before fine-tuning: {100 * before:.1f}%"
                + (f" (chance: {100 * chance:.1f}%, the largest class)" if chance else ""))
        if cfg.task == "dpo":
            ranked = heldout_preferences(run, val)[3]
            run.log(f"chosen ranked first before preference tuning: {100 * ranked:.1f}%")
        # the curves' first point (score.svg); DPO's margin is 0 there: policy == reference
        run.history["score"] = [[0, 100 * before, 0.0 if cfg.task == "dpo" else None]]
    last_step = min(cfg.max_steps, cfg.stop_step or cfg.max_steps)
    reason = "reached max_steps" if last_step == cfg.max_steps else f"reached stop_step={last_step}"
    stop = {"signal": None}
    with train.stop_on_signals(stop):
        run.t_start = time.time() - run.elapsed_before
        run.logged = (0.0, run.tokens_seen)
        while run.step < last_step:
            stop_reason, _ = train.check_stop(run, stop)
            if stop_reason:
                reason = stop_reason
                break
            train.train_step(run, 0.0, chat_batches(run))
            is_last = run.step == last_step
            if run.step % cfg.log_interval == 0 or is_last or run.step == 1:
                train.log_progress(run, cfg.max_steps)
            if run.step % cfg.eval_interval == 0 or is_last:
                evaluate_and_save(run, val, scored, cfg)
        if not run.history["val"] or run.history["val"][-1][0] != run.tokens_seen:
            evaluate_and_save(run, val, scored, cfg)  # stopped between evaluations
    _, val_loss, value = run.history["val"][-1]
    gain = "" if before is None else f" (before: {100 * before:.1f}%)"
    run.log(f"done: {reason} at step {run.step}; held-out loss {val_loss:.4f}, {name} "
            f"{100 * value:.1f}%{gain}; {train.fmt_time(time.time() - run.t_start)}; "
            f"checkpoint in {run.ckpt_path}")
    key = name.replace(" ", "_")
    return {"step": run.step, "score_before": before, "score": value, f"{key}_before": before,
            key: value, "chance": chance, "val_loss": val_loss, "best_val_loss": run.best_val,
            "skipped_steps": run.bad_total, "time_s": time.time() - run.t_start,
            "stop_reason": reason, "out_dir": cfg.out_dir}


# -----------------------------------------------------------------------------
# Command line


def main(argv=None) -> None:
    cfg = parse_config(FinetuneConfig, argv)
    try:
        finetune(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
