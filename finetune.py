"""
Supervised fine-tuning: turn a pretrained GPT into one that answers instructions.

Run it (after `python train.py`):
    python finetune.py                                  # the built-in task, from out/ into out-sft/
    python finetune.py --max_steps=100 --eval_interval=50   # a quick look
    python finetune.py --data=chats.jsonl               # your chat or Alpaca JSONL
    python finetune.py --lora_rank=8                    # LoRA adapters instead of all the weights
    python finetune.py --resume                         # continue out-sft/ckpt.pt exactly
    python sample.py --out_dir=out-sft --chat           # then talk to it
    python finetune.py --task=dpo --init_from=out-sft --out_dir=out-dpo   # preference tuning
    python finetune.py -h                               # every option

What it does: each example is a conversation, rendered with tokenizer.encode_chat (the one
template sample.py --chat also uses: <|role|> content <|end|> per message). The model learns
only the assistant's tokens, their <|end|> included: every other target is -100, which the
loss ignores. Batches are right-padded with <|pad|> (pad targets -100 too); an example
longer than the context is cut to it, and counted. Training is train.py's own step
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

Not here yet: packing several examples into one row, a classification head, starting from a
Hugging Face model or a tokenizer without the chat tokens, and multi-process runs (one
process only has been tested).

Sources: Ouyang et al. 2022 (InstructGPT: supervised fine-tuning on demonstrations, loss on
the response only); Taori et al. 2023 (the Alpaca format); Hu et al. 2021 (LoRA); Rafailov
et al. 2023 (DPO).
"""

import contextlib
import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import train
from model import GPT
from sample import load_for_sampling
from tokenizer import CHAT_ROLES, Tokenizer, parse_config

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class FinetuneConfig:
    task: str = "sft"  # "sft" (instructions), or "dpo" (preference pairs, after sft)
    init_from: str = "out"  # a train.py out_dir (best.pt, else ckpt.pt, and its tokenizer.bpe)
    data: str = ""  # JSONL: chat or Alpaca (sft), prompt/chosen/rejected (dpo); "" = built-in
    out_dir: str = "out-sft"  # ckpt.pt, best.pt, tokenizer.bpe, log.jsonl, loss.svg
    val_fraction: float = 0.05  # of a JSONL file's examples held out (every 20th)
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
                 "dpo": dict(max_steps=300, batch_size=16, learning_rate=1e-4)}


def resolve_task_defaults(cfg: FinetuneConfig) -> FinetuneConfig:
    """A copy of cfg with the task's defaults filled in and the task checked."""
    if cfg.task not in TASK_DEFAULTS:
        raise ValueError(f"--task={cfg.task} is not one of {', '.join(TASK_DEFAULTS)}")
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


class ChatBatches:
    """Encoded examples with a resumable position, like train.TokenWindows: row r of the run is
    example perm_e[r mod N] of epoch e = r // N, a pure function of (seed, r), so resuming needs
    only the counter `rows` and any split of a step into micro-batches gives the same batch."""

    def __init__(self, tok: Tokenizer, examples: list, block_size: int, seed: int, name: str):
        encoded = [encode_example(tok, e["messages"], block_size) for e in examples]
        self.truncated = sum(t for _, _, t in encoded)
        kept = [(x, y) for x, y, _ in encoded if any(v != -100 for v in y)]
        self.dropped = len(encoded) - len(kept)  # cut so short that no reply token was left
        if not kept:
            raise ValueError(f"no {name} example keeps a reply token within the model's "
                             f"{block_size}-token context; shorten the prompts")
        self.examples, self.seed, self.pad_id, self.rows = kept, seed, tok.pad_id, 0
        self._order = (-1, [])  # (epoch, its permutation of the examples)

    def example(self, row: int) -> tuple[list, list]:
        epoch, pos = divmod(row, len(self.examples))
        if self._order[0] != epoch:  # a fresh shuffle each epoch, seeded by (seed, epoch)
            n = len(self.examples)
            self._order = (epoch, random.Random(f"{self.seed}-{epoch}").sample(range(n), n))
        return self.examples[self._order[1][pos]]

    def batch(self, rows: range, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) (B, T) for these rows, right-padded (pad_rows)."""
        return pad_rows([self.example(r) for r in rows], self.pad_id, device)


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
# The pretrained model and its tokenizer

CHAT_TOKENS = ("<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


def load_pretrained(init_from: str) -> tuple[GPT, Tokenizer, str]:
    """(model, tokenizer, tokenizer path) from a train.py out_dir, through sample.py's loader
    (the one reader of out_dirs): best.pt if there is one, else ckpt.pt, and the tokenizer
    beside it, checked to be the one the checkpoint was trained with. Example: "out" ->
    (the GPT of 1.38M parameters, its Tokenizer of 4,096 ids, "out/tokenizer.bpe")."""
    model, tok, _ = load_for_sampling(init_from, device="cpu")
    tok_path = os.path.join(init_from, "tokenizer.bpe")
    missing = [t for t in CHAT_TOKENS if t not in tok.special_tokens]
    if missing:
        raise ValueError(f"{tok_path} has no {', '.join(missing)}: the chat template needs them; "
                         f"retrain the tokenizer with tokenizer.py, whose tokenizers all have them")
    return model, tok, tok_path


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


def train_config(cfg: FinetuneConfig, block_size: int) -> train.TrainConfig:
    """The train.TrainConfig that train.py's phases read: AdamW, warmup then cosine, one
    micro-batch of batch_size examples per step (train.py halves it on CUDA out-of-memory)."""
    return train.TrainConfig(dataset=cfg.init_from, out_dir=cfg.out_dir, sampling="sequential",
                             batch_size=cfg.batch_size,
                             total_batch_size=cfg.batch_size * block_size,
                             optimizer="adamw", learning_rate=cfg.learning_rate,
                             min_lr_ratio=cfg.min_lr_ratio, warmup_steps=cfg.warmup_steps,
                             schedule="cosine", weight_decay=cfg.weight_decay,
                             grad_clip=cfg.grad_clip, max_steps=cfg.max_steps,
                             eval_interval=cfg.eval_interval, log_interval=cfg.log_interval,
                             sample_tokens=0, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed,
                             resume=cfg.resume)


def read_task_data(cfg: FinetuneConfig) -> tuple[list, list, list]:
    """(training set, held-out set, held-out chat examples for exact match) of the task:
    conversations for sft, preference pairs for dpo; from --data (checked line by line before
    anything else is loaded, so a bad file fails at once) or built in."""
    if cfg.task == "sft":
        if cfg.data:
            train_set, val_set = split_examples(read_examples(cfg.data), cfg.val_fraction)
        else:
            train_set, val_set = builtin_task(cfg.builtin_train, cfg.builtin_val, cfg.seed)
        return train_set, val_set, val_set
    else:
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
    """(training batches, held-out batches): the sets rendered with the chat template."""
    train_set, val_set, _ = sets
    batches = ChatBatches if cfg.task == "sft" else PairBatches
    train_data = batches(tok, train_set, block_size, cfg.seed, "training")
    val_data = batches(tok, val_set, block_size, cfg.seed, "held-out")
    what = "examples" if cfg.task == "sft" else "preference pairs"
    log(f"data: {cfg.data or 'the built-in task'}: {len(train_data.examples):,} training and "
        f"{len(val_data.examples):,} held-out {what}; {train_data.truncated + val_data.truncated} "
        f"cut to block_size={block_size}, {train_data.dropped + val_data.dropped} dropped (no "
        f"reply token left)")
    return train_data, val_data


def setup_finetune(cfg: FinetuneConfig) -> tuple[train.Run, ChatBatches, list]:
    """Phase 1: device, the pretrained model, the examples, LoRA, optimizer, out_dir (cleared
    for a fresh run, or the checkpoint loaded for --resume). Returns (run, held-out batches,
    held-out examples)."""
    rank, world, device, dtype, why = train.start_processes(cfg)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    log(f"device: {device} ({why})")
    sets = read_task_data(cfg)
    model, tok, tok_path = load_pretrained(cfg.init_from)
    mcfg, block_size = model.config, model.config.block_size
    tcfg = train.resolve_config(train_config(cfg, block_size), device)
    log("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    train_data, val_data = encode_task_data(cfg, sets, tok, block_size, log)
    val_examples = sets[2]
    torch.manual_seed(cfg.seed)  # the adapters' initial weights, then dropout
    model = model.to(device).train()
    if cfg.lora_rank:
        targets = tuple(t for t in cfg.lora_targets.split(",") if t) or LORA_TARGETS
        names = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets)
        log(f"LoRA: rank {cfg.lora_rank}, alpha {cfg.lora_alpha} on {len(names)} matrices "
            f"({', '.join(sorted({n.split('.')[-1] for n in names}))}); the rest is frozen")
    # subtle: DPO's frozen reference is copied here, before --resume loads the later weights:
    # the reference is always the model the preference tuning started from
    objective = DPOObjective(model, cfg.beta) if cfg.task == "dpo" else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"trainable parameters: {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")
    micro_bs, accum, step_rows, total_tokens = train.batch_geometry(tcfg, block_size, world)
    if rank == 0:
        train.check_writable(cfg.out_dir)
    optimizers = train.build_optimizers(model, tcfg, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    run = train.Run(tcfg, mcfg, device, dtype, rank, world, model, optimizers, scaler, micro_bs,
                    accum, step_rows, total_tokens, cfg.init_from, {}, tok, tok_path, train_data,
                    None, log)
    if not cfg.resume and run.master:
        train.clear_previous_run(cfg.out_dir, log)
    if cfg.resume:
        train.resume_run(run)  # continues from ck["resume_weights"]: the unmerged adapters
    if run.master:
        train.copy_durably(tok_path, os.path.join(cfg.out_dir, "tokenizer.bpe"))
        train.write_text(os.path.join(cfg.out_dir, "config.json"), json.dumps(
            {"finetune": asdict(cfg), "train": asdict(tcfg), "model": asdict(mcfg)}, indent=1))
        if not cfg.resume:
            open(os.path.join(cfg.out_dir, "log.jsonl"), "w").close()
    train.wrap_model(run)
    if objective is not None:  # what train_step runs: the DPO loss of the policy, run.raw
        run.model = objective
    return run, val_data, val_examples


def chat_batches(run: train.Run):
    """batch_fn for this step (see train.train_step): rows [lo, hi) of this process's share."""
    first, mine = run.train_data.rows, run.rank * run.micro_bs * run.accum

    def batch_fn(lo, hi):
        return run.train_data.batch(range(first + mine + lo, first + mine + hi), run.device)
    return batch_fn


def plain_weights(model: GPT) -> dict:
    """The state_dict sample.py loads: with LoRA, a copy with the adapters merged into the
    weights (W + alpha / r * B A), so the saved model has exactly a plain GPT's keys."""
    if not any(isinstance(m, LoRALinear) for m in model.modules()):
        return model.state_dict()
    merged = copy.deepcopy(model)
    merge_lora(merged)
    return merged.state_dict()


@torch.no_grad()
def heldout_preferences(run: train.Run, val: PairBatches) -> tuple[float, float, float, float]:
    """(DPO loss, mean reward margin, preference accuracy, chosen ranked first) over the held-out
    pairs: accuracy compares rewards (relative to the reference), ranked-first likelihoods."""
    objective = run.model
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


def evaluate_and_save(run: train.Run, val: ChatBatches, val_examples: list,
                      cfg: FinetuneConfig) -> float:
    """Phase 5: the held-out loss (sft: of the replies; dpo: DPO's, with the reward margin and
    the preference accuracy), exact match, a log row; on rank 0 ckpt.pt, best.pt when the
    held-out loss is the lowest so far, and loss.svg. Returns the exact match."""
    row = {"step": run.step, "tokens": run.tokens_seen}
    if cfg.task == "dpo":
        loss, row["reward_margin"], row["preference_accuracy"], row["chosen_first"] = \
            heldout_preferences(run, val)
        extra = (f", reward margin {row['reward_margin']:.4f}, preference accuracy "
                 f"{100 * row['preference_accuracy']:.1f}%, chosen ranked first "
                 f"{100 * row['chosen_first']:.1f}%")
    else:
        loss, extra = heldout_loss(run, val), ""
    match = exact_match(run.raw, run.tok, val_examples[:cfg.eval_examples], run.device)
    run.history["val"].append([run.tokens_seen, loss, match])
    improved = loss < run.best_val
    if improved:
        run.best_val, run.best_step = loss, run.step
    run.log(f"eval step {run.step}: held-out loss {loss:.4f}{extra}, exact match "
            f"{100 * match:.1f}% of {min(len(val_examples), cfg.eval_examples)}"
            + (" (best)" if improved else ""))
    if run.master:
        train.append_log(cfg.out_dir, {**row, "val_loss": loss, "exact_match": match,
                                       "time": time.time() - run.t_start})
        ck = train.checkpoint_dict(run)
        ck["model"] = plain_weights(run.raw)
        if cfg.lora_rank:
            ck["resume_weights"] = run.raw.state_dict()  # base and adapters apart, to go on exactly
        ck["finetune"] = asdict(cfg)
        train.save_checkpoint(run.ckpt_path, ck)
        if improved:
            train.copy_durably(run.ckpt_path, run.best_path)
        train.write_loss_svg(os.path.join(cfg.out_dir, "loss.svg"), run.history["train"],
                             run.history["val"])
    return match


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune; returns {"exact_match_before", "exact_match", "val_loss", "step", ...}."""
    cfg = resolve_task_defaults(cfg)
    run, val, val_examples = setup_finetune(cfg)
    before = None
    if not cfg.resume:  # the starting point, on the same held-out examples
        before = exact_match(run.raw, run.tok, val_examples[:cfg.eval_examples], run.device)
        run.log(f"exact match before fine-tuning: {100 * before:.1f}%")
        if cfg.task == "dpo":
            ranked = heldout_preferences(run, val)[3]
            run.log(f"chosen ranked first before preference tuning: {100 * ranked:.1f}%")
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
                evaluate_and_save(run, val, val_examples, cfg)
        if not run.history["val"] or run.history["val"][-1][0] != run.tokens_seen:
            evaluate_and_save(run, val, val_examples, cfg)  # stopped between evaluations
    _, val_loss, match = run.history["val"][-1]
    gain = "" if before is None else f" (before: {100 * before:.1f}%)"
    run.log(f"done: {reason} at step {run.step}; held-out loss {val_loss:.4f}, exact match "
            f"{100 * match:.1f}%{gain}; {train.fmt_time(time.time() - run.t_start)}; "
            f"checkpoint in {run.ckpt_path}")
    return {"step": run.step, "exact_match_before": before, "exact_match": match,
            "val_loss": val_loss, "best_val_loss": run.best_val, "skipped_steps": run.bad_total,
            "time_s": time.time() - run.t_start, "stop_reason": reason, "out_dir": cfg.out_dir}


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
