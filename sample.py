"""
sample.py: generate text from a trained GPT, or chat with a fine-tuned one.

It loads a checkpoint that train.py or finetune.py wrote (or a local Hugging Face directory),
then decodes through GPT.generate_stream, the project's one decoding loop (model.py): a
prefill pass fills a preallocated KV cache, then each new token costs one forward pass over
one position instead of over the whole context. This file adds what a command line needs on
top: two more filters (repetition penalty, min-p), stop tokens, prompts that fit the window,
tokens streamed to the terminal as they are made, speed, and `--chat`, a REPL that speaks the
chat template of tokenizer.py.

Run it:
    python sample.py                                     # samples from out/ (best.pt, else ckpt.pt)
    python sample.py --out_dir=out --prompt="def main(" --max_new_tokens=100 --temperature=0
    python sample.py --prompt=FILE:prompt.txt --num_samples=4 --top_p=0.9 --seed=7
    python sample.py --prompt=FILE:prompts.txt --prompt_lines    # one prompt per line, one batch
    python sample.py --out_dir=out-sft --chat                # interactive; /reset, /exit
    printf 'hello\\n/exit\\n' | python sample.py --out_dir=out-sft --chat --temperature=0
    python sample.py --hf=path/to/gpt2 --prompt="Hello"      # a local HF dir (config + weights)
    python sample.py --use_cache=False --temperature=0       # the slow reference: no KV cache
    python sample.py --export=export/hf                      # a Hugging Face dir (transformers)
    python sample.py --export=model.gguf --format=gguf --export_dtype=f16   # llama.cpp / Ollama
    python sample.py -h                                      # every option with its meaning

Sources:
    nanoGPT sample.py (the overall shape of the script), gpt-fast generate.py (a preallocated
    KV cache filled by a prefill pass, then one-token decode steps; torch.compile of the step),
    Holtzman et al. 2019 "The Curious Case of Neural Text Degeneration" (top-p / nucleus),
    Nguyen et al. 2024 "Turning Up the Heat: Min-p Sampling" (min-p),
    Keskar et al. 2019 "CTRL" section 4.1 (repetition penalty).
"""

import codecs
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import torch

from model import GPT, check_sampling_args
from tokenizer import CHAT_TEMPLATE, Tokenizer, file_sha256, gguf_pre_name, parse_config
from train import choose_device, load_checkpoint  # one device rule, one checkpoint reader

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class SampleConfig:
    # where the model comes from
    out_dir: str = "out"  # holds ckpt.pt / best.pt and tokenizer.bpe (from train.py or finetune.py)
    ckpt: str = ""  # checkpoint file inside out_dir; "" = best.pt if present, else ckpt.pt
    hf: str = ""  # a local Hugging Face model dir (config.json + weights); replaces out_dir if set
    # what to generate
    prompt: str = ""  # prompt text, or FILE:path of a UTF-8 file; "" = start from <|endoftext|>
    prompt_lines: bool = False  # each non-empty line is a prompt; all run as one left-padded batch
    num_samples: int = 1  # samples per prompt, generated together as one batch
    max_new_tokens: int = 200  # new tokens per sample; fewer if the context (block_size) fills up
    # how to pick each token; the ranges are model.check_sampling_args's and check_filter_args's
    temperature: float = 0.8  # 0 = greedy (argmax); below 1 sharper, above 1 flatter; must be >= 0
    top_k: int = 200  # sample only among the k most likely tokens; 0 disables
    top_p: float = 1.0  # nucleus: the smallest set of tokens with this much probability; 1 disables
    min_p: float = 0.0  # drop tokens less likely than min_p * the most likely one; 0 disables
    repetition_penalty: float = 1.0  # CTRL: >1 discourages tokens already in context; 1 disables
    seed: int = 1337  # seed of the sampling torch.Generator: same seed + same settings = same text
    # chat
    chat: bool = False  # chat REPL (finetune.py checkpoints): a message per line; /reset, /exit
    system: str = ""  # chat only: a system message that opens every conversation; "" = none
    # how to run
    use_cache: bool = True  # KV cache; False reruns the whole context each step (slow reference)
    stream: bool = True  # print tokens as they are made (batch size 1 only); False: each when done
    device: str = "auto"  # auto = cuda, then mps, then cpu; or cpu / cuda / cuda:1 / mps
    # or float32 / bfloat16 / float16; train.choose_device's rule, and the weights are cast to it
    dtype: str = "auto"  # auto: bf16 at CUDA compute capability >= 8.0, fp16 below, fp32 on CPU/MPS
    compile: bool = True  # torch.compile the one-token decode step on CUDA only; False if it errors
    threads: int = 0  # torch.set_num_threads for CPU runs; 0 keeps torch's default
    # export instead of sampling: the loaded model and its tokenizer, for other runtimes
    export: str = ""  # a directory (--format=hf) or a .gguf file (--format=gguf); "" = sample
    format: str = "hf"  # hf: transformers / vLLM (safetensors, tokenizer.json, chat template); gguf
    export_dtype: str = "f32"  # the exported weights: f32, f16 or bf16


def check_filter_args(min_p: float, repetition_penalty: float) -> None:
    """Raise ValueError with one sentence for a filter setting outside its range. These two
    filters are sample.py's own; temperature, top_k and top_p follow model.check_sampling_args,
    the rule GPT.generate and this file share."""
    if not 0 <= min_p < 1:
        raise ValueError(f"min_p={min_p} is outside [0, 1); use e.g. 0.05, or 0 to disable min-p")
    if repetition_penalty <= 0:  # a penalty of 0 would divide by zero, a negative one flip signs
        raise ValueError(f"repetition_penalty={repetition_penalty} must be > 0; use 1.0 to "
                         "disable it")


# -----------------------------------------------------------------------------
# Loading: one entry point for a training out_dir and for a Hugging Face directory


def load_for_sampling(out_dir: str | None = None, hf: str | None = None, device="cpu",
                      ckpt_name: str = "") -> tuple[GPT, Tokenizer, int]:
    """Return (model in eval mode on device, tokenizer, vocab_limit).

    vocab_limit is the tokenizer's real vocabulary size: train.py pads the model's vocabulary
    up to a multiple of 64 for speed, and the padded ids are never valid tokens, so sampling
    masks ids >= vocab_limit. Example: load_for_sampling("out") -> (GPT, Tokenizer, 4099).
    """
    if hf:
        return _load_hf_dir(hf, device)
    return _load_out_dir(out_dir or "out", device, ckpt_name)


def _load_hf_dir(hf: str, device) -> tuple[GPT, Tokenizer, int]:
    """A Hugging Face directory: GPT.from_pretrained, and its tokenizer.bpe or GPT-2's BPE."""
    if not os.path.isdir(hf):
        raise FileNotFoundError(f"--hf={hf} is not a directory; pass a local Hugging Face model "
                                "dir with config.json")
    model = GPT.from_pretrained(hf).to(device).eval()
    tok_path = os.path.join(hf, "tokenizer.bpe")
    if os.path.exists(tok_path):
        tok = Tokenizer.load(tok_path)
    elif model.config.vocab_size in (50257, 50304):  # GPT-2's vocabulary (50304: padded to 64)
        # a stock GPT-2 dir ships HF's own tokenizer files, which this project does not read;
        # its BPE is tiktoken's "gpt2", usable when tiktoken has it cached (no network here)
        try:
            tok = Tokenizer.from_tiktoken("gpt2")
        except Exception as e:
            raise FileNotFoundError(
                f"{hf} has no tokenizer.bpe and tiktoken's gpt2 encoding is unavailable "
                f"({type(e).__name__}); copy the model's tokenizer.bpe into {hf}, or run once "
                "with network so tiktoken caches gpt2") from None
        print(f"{hf} has no tokenizer.bpe: using tiktoken's GPT-2 BPE", file=sys.stderr)
    else:
        raise FileNotFoundError(f"{hf} has no tokenizer.bpe and its vocabulary "
                                f"({model.config.vocab_size} ids) is not GPT-2's; save the "
                                "model's tokenizer there as tokenizer.bpe (Tokenizer.save)")
    # subtle: a padded GPT-2 model (50304 ids) with the 50257-id BPE must mask the pad ids
    return model, tok, min(tok.n_vocab, model.config.vocab_size)


def _load_out_dir(out_dir: str, device, ckpt_name: str) -> tuple[GPT, Tokenizer, int]:
    """A train.py / finetune.py out_dir: the checkpoint, and the very tokenizer it trained with."""
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"out_dir {out_dir} does not exist; train a model first (python "
                                "train.py) or pass --out_dir=DIR (or --hf=DIR for a Hugging Face "
                                "model)")
    names = [ckpt_name] if ckpt_name else ["best.pt", "ckpt.pt"]  # best validation loss first
    paths = [os.path.join(out_dir, n) for n in names if os.path.exists(os.path.join(out_dir, n))]
    if not paths:
        raise FileNotFoundError(f"no {' or '.join(names)} in {out_dir}; train first (python "
                                f"train.py --out_dir={out_dir}) or point --out_dir at the "
                                "directory that holds the checkpoint")
    model, ckpt = load_checkpoint(paths[0], device=device)
    tok_path = os.path.join(out_dir, ckpt.get("tokenizer") or "tokenizer.bpe")
    hint = os.path.join(ckpt.get("dataset") or "DATA_DIR", "tokenizer.bpe")  # where it came from
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"{tok_path} is missing: the checkpoint {paths[0]} needs the "
                                f"tokenizer it was trained with; copy {hint} into {out_dir}")
    # subtle: another tokenizer of the same size loads fine and samples fluent-looking garbage;
    # train.py records the sha256 of the one it used (HF dirs and older checkpoints have none)
    if ckpt.get("tokenizer_sha256") and file_sha256(tok_path) != ckpt["tokenizer_sha256"]:
        raise ValueError(f"{tok_path} is not the tokenizer {paths[0]} was trained with (its "
                         f"sha256 differs from the one the checkpoint records); copy {hint} into "
                         f"{out_dir}, or retrain")
    tok = Tokenizer.load(tok_path)
    # another run's tokenizer of another size: wrong text, or ids the model lacks
    if ckpt.get("vocab_size") and ckpt["vocab_size"] != tok.n_vocab:
        raise ValueError(f"{tok_path} has {tok.n_vocab} tokens but {paths[0]} was trained with "
                         f"{ckpt['vocab_size']}; copy the tokenizer.bpe of its training run (from "
                         f"{ckpt.get('dataset') or 'its dataset'}) into {out_dir}")
    vocab_limit = int(ckpt.get("vocab_size") or tok.n_vocab)
    print(f"loaded {paths[0]} (step {ckpt.get('step', '?')}, {model.num_params() / 1e6:.2f}M "
          "params)", file=sys.stderr)
    return model.eval(), tok, min(vocab_limit, model.config.vocab_size)


# -----------------------------------------------------------------------------
# Prompts: text -> token ids that fit the context window


def read_prompts(prompt: str, lines: bool) -> list[str]:
    """--prompt text or FILE:path -> a list of prompts (one, or one per non-empty line)."""
    if prompt.startswith("FILE:"):
        path = prompt[len("FILE:"):]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt file {path} does not exist; pass --prompt=FILE:path "
                                    "to an existing UTF-8 file")
        try:
            with open(path, encoding="utf-8") as f:
                prompt = f.read()
        except UnicodeDecodeError:
            raise ValueError(f"prompt file {path} is not UTF-8 text; re-encode it, e.g. iconv -f "
                             "latin1 -t UTF-8") from None
    if lines:
        prompts = [ln for ln in prompt.splitlines() if ln.strip()]
        if not prompts:
            raise ValueError("--prompt_lines was given but the prompt has no non-empty line; put "
                             "one prompt per line")
        return prompts
    return [prompt]


def fit_context(ids: list[int], block_size: int, max_new_tokens: int) -> tuple[list[int], int, str]:
    """Left-truncate a prompt so that generation fits in block_size; return (ids, max_new, warning).

    The prompt keeps at most block_size - min(max_new_tokens, block_size // 2) tokens: a long
    prompt gives up its oldest tokens to make room for the new ones, but always keeps at least
    half the window. Example with block_size=8, max_new_tokens=3: 10 prompt ids -> the last 5.
    """
    keep = block_size - min(max_new_tokens, block_size // 2)
    warning = ""
    if len(ids) > keep:  # the newest tokens matter most for what comes next, so they stay
        warning = (f"prompt has {len(ids)} tokens, more than the {keep} that fit; dropped the "
                   f"oldest {len(ids) - keep}")
        ids = ids[-keep:]
    max_new = min(max_new_tokens, block_size - len(ids))
    if max_new < max_new_tokens:
        cut = f"max_new_tokens cut to {max_new} by block_size={block_size}"
        warning += ("; " if warning else "") + cut
    return ids, max_new, warning


# -----------------------------------------------------------------------------
# Decoding: GPT.generate_stream with this file's filters, stop tokens and timers


class SpeedStats:
    """Prefill and decode throughput, summed over every generate call of a run."""

    def __init__(self):
        self.prefill_tokens = self.decode_tokens = 0  # prompt tokens; tokens made one by one
        self.prefill_s = self.decode_s = 0.0  # seconds spent in each phase

    def report(self) -> str:
        """One line for stderr: "prefill: N tokens in S s (rate) | decode: ..."; n/a: no rate."""
        def rate(n, s):
            return f"{n / s:,.1f} tok/s, {1e3 * s / n:.1f} ms/token" if s > 0 and n > 0 else "n/a"
        return (f"prefill: {self.prefill_tokens:,} tokens in {self.prefill_s:.3f} s "
                f"({rate(self.prefill_tokens, self.prefill_s)}) | "
                f"decode: {self.decode_tokens:,} tokens in {self.decode_s:.3f} s "
                f"({rate(self.decode_tokens, self.decode_s)})")


def process_logits(logits, context, temperature=1.0, min_p=0.0, repetition_penalty=1.0):
    """The filters GPT.generate_stream takes as its logits_hook: repetition penalty, min-p.

    logits (B, V) float, already cut to the vocabulary; context (B, T) ids so far -> filtered
    logits (B, V); -inf = never sampled. Example: logits [[2, -2, 1]], context [[0, 1, 1]],
    repetition_penalty=2 -> [[1, -4, 1]].
    """
    if repetition_penalty != 1.0:
        # CTRL sec. 4.1: divide a seen token's logit by the penalty; a negative logit is
        # multiplied instead, so that a penalty > 1 always makes the token less likely
        seen = torch.gather(logits, 1, context)  # (B, T)
        seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
        logits.scatter_(1, context, seen)  # repeated ids write the same value twice: harmless
    if min_p > 0 and temperature > 0:  # greedy ignores min-p: the top token always survives it
        # min-p (Nguyen et al. 2024): the cut scales with the model's confidence, measured
        # after temperature, so a confident step keeps few tokens and an unsure one many
        probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
        cut = min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
        logits = logits.masked_fill(probs < cut, float("-inf"))  # (B, V)
    return logits


@torch.inference_mode()
def generate_stream(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, min_p: float = 0.0,
                    repetition_penalty: float = 1.0, stop_ids=(), vocab_limit: int | None = None,
                    generator: torch.Generator | None = None, use_cache: bool = True,
                    decode_fn=None, stats: SpeedStats | None = None, prompt_lens=None):
    """Yield the next token of every row, one step at a time: a list of B ints per step.

    The loop is GPT.generate_stream's (prefill, one-token steps through the KV cache, stop ids
    as its eos_id, vocab_limit, LEFT-padded rows of prompt_lens; see generate_batch); this adds
    process_logits as its logits_hook and times prefill and decode into stats. A row that
    emits one of stop_ids is finished: it repeats that id and the stream ends when every row
    has finished. T + max_new_tokens must fit in block_size (fit_context sees to that; there
    is no sliding window here). decode_fn, if given, replaces model.forward for the one-token
    steps (a torch.compile'd forward on CUDA).
    """
    check_sampling_args(temperature, top_k, top_p)
    check_filter_args(min_p, repetition_penalty)
    B, T = idx.shape
    if T + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds block_size="
                         f"{model.config.block_size}; shorten the prompt or lower --max_new_tokens")
    if max_new_tokens <= 0:
        return
    stats = stats if stats is not None else SpeedStats()

    def filters(logits, context):  # reads only settings that stay fixed for this call
        return process_logits(logits, context, temperature, min_p, repetition_penalty)

    steps = model.generate_stream(idx, max_new_tokens, temperature, top_k, top_p,
                                  eos_id=list(stop_ids) or None, use_cache=use_cache,
                                  generator=generator, vocab_limit=vocab_limit,
                                  prompt_lens=prompt_lens, logits_hook=filters, decode_fn=decode_fn)
    t0 = time.perf_counter()
    for i, column in enumerate(steps):  # column: (B, 1), this step's token of every row
        tokens = column[:, 0].tolist()  # waits for the device: the caller needs the ids anyway
        dt = time.perf_counter() - t0
        if i == 0:  # the first new token is the product of the prefill pass
            stats.prefill_tokens += B * T
            stats.prefill_s += dt
        else:
            stats.decode_tokens += B
            stats.decode_s += dt
        yield tokens  # subtle: time spent by the consumer (printing) stays outside the timers
        t0 = time.perf_counter()


def generate_batch(model: GPT, prompts: list[list[int]], max_new_tokens: int, stop_ids=(),
                   **kw) -> list[list[int]]:
    """Generate for a batch of prompts -> the new ids of each row, cut after its stop token.

    Prompts of different lengths are LEFT-padded to one width, so that every row's next token
    sits in the same last column; model.forward(left_pad=...) hides the padding from attention
    and starts each row's positions at 0, so each row gives the tokens it would give alone.
    Example: [[5, 6, 7], [8]] -> idx [[5, 6, 7], [8, 8, 8]] with prompt_lens [3, 1].
    """
    device = next(model.parameters()).device
    T = max(len(p) for p in prompts)
    # subtle: pad with the row's own first token, so the repetition penalty (which reads the
    # whole row) sees no token that is not really in the prompt
    padded = [[p[0]] * (T - len(p)) + p for p in prompts]
    idx = torch.tensor(padded, dtype=torch.long, device=device)  # (B, T)
    lens = [len(p) for p in prompts]
    # without padding, no prompt_lens: forward then takes the plain causal path, as alone
    prompt_lens = lens if any(n < T for n in lens) else None
    steps = list(generate_stream(model, idx, max_new_tokens, stop_ids=stop_ids,
                                 prompt_lens=prompt_lens, **kw))  # steps x B ids
    rows = [list(r) for r in zip(*steps)] if steps else [[] for _ in prompts]  # B x steps
    stops = set(stop_ids)
    for r in rows:  # cut each row after its first stop token
        hit = next((j for j, t in enumerate(r) if t in stops), None)
        if hit is not None:
            del r[hit + 1:]
    return rows


# -----------------------------------------------------------------------------
# Terminal: stream bytes, print only complete UTF-8 characters


class Utf8Stream:
    """Write token ids to a text stream as soon as they form complete UTF-8 characters.

    A byte-level BPE token can end in the middle of a character: "é" is b"\\xc3\\xa9" and may
    be two tokens. Decoding each token alone would print two replacement characters, so an
    incremental decoder keeps the incomplete tail until the next token completes it.
    Example: write([195]) -> "" then write([169]) -> "é" (ids of the bytes 0xc3, 0xa9).
    """

    def __init__(self, tok: Tokenizer, out=None):
        self.tok, self.out = tok, out
        # errors="replace": bytes that can never form a character still print, as U+FFFD
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, ids: list[int]) -> str:
        """Decode ids, print and return the characters they complete ("" while one is open)."""
        text = self.decoder.decode(self.tok.decode_bytes(ids))
        if text and self.out is not None:
            self.out.write(text)
            self.out.flush()  # a terminal should see each token as it comes, not per line
        return text

    def close(self) -> str:
        """Flush what is left at the end of a reply; return it."""
        text = self.decoder.decode(b"", final=True)  # a truncated last character becomes U+FFFD
        if text and self.out is not None:
            self.out.write(text)
            self.out.flush()
        return text


# -----------------------------------------------------------------------------
# Chat REPL


def chat_prompt_ids(tok: Tokenizer, messages: list[dict], max_prompt: int
                    ) -> tuple[list[int], list[dict], str]:
    """Encode a conversation for the next reply, dropping the oldest turns until it fits.

    The system message (if any) always stays; whole turns go from the front until the prompt
    has at most max_prompt tokens. A single user message longer than that is left-truncated.
    Returns (ids, the messages kept, a warning or "").
    """
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(head):]
    warning = ""
    while True:
        ids, _ = tok.encode_chat(head + turns, add_generation_prompt=True)
        if len(ids) <= max_prompt or len(turns) <= 1:
            break
        turns = turns[1:]
        while turns and turns[0]["role"] != "user":  # a conversation restarts on a user turn
            turns = turns[1:]
        warning = "history trimmed to fit the context window"
    if len(ids) > max_prompt:
        warning = f"message too long: kept its last {max_prompt} tokens"
        ids = ids[-max_prompt:]
    return ids, head + turns, warning


def _read_message(inp, interactive: bool) -> str | None:
    """The next user line, or None at the end of input (Ctrl-D on a terminal)."""
    if interactive:
        try:
            return input("\nyou> ")  # line editing, with readline where the platform has it
        except EOFError:  # Ctrl-D
            return None
    line = inp.readline()
    return line.rstrip("\r\n") if line else None  # "" only at the end of input


def chat(model: GPT, tok: Tokenizer, vocab_limit: int, cfg: SampleConfig, generator=None,
         stats=None, decode_fn=None, inp=None, out=None) -> None:
    """Read user lines from inp, write replies to out; /reset clears the history, /exit quits.

    On a pipe (not a terminal) stdout carries only the replies, one per line, so a script can
    drive it: printf 'hi\\n/exit\\n' | python sample.py --chat --temperature=0
    """
    inp, out = inp or sys.stdin, out or sys.stdout
    needed = ["<|user|>", "<|assistant|>", "<|end|>"]
    missing = [s for s in needed if tok.special_tokens.get(s) is None
               or tok.special_tokens[s] >= model.config.vocab_size]
    if missing:
        raise ValueError(f"--chat needs the chat tokens {', '.join(missing)} in the tokenizer and "
                         "the model; use a checkpoint from finetune.py, or sample without --chat")
    stop_ids = [tok.special_tokens["<|end|>"], tok.eot_id]  # end of a reply, or of a document
    block = model.config.block_size
    max_prompt = block - min(cfg.max_new_tokens, block // 2)  # fit_context's rule
    device = next(model.parameters()).device
    interactive = inp.isatty()
    base = [{"role": "system", "content": cfg.system}] if cfg.system else []
    history = list(base)
    if interactive:
        print("chat: type a message and press enter; /reset clears the history, /exit quits",
              file=sys.stderr)
        try:
            import readline  # noqa: F401  arrow keys and history in input(); absent on Windows
        except ImportError:
            pass
    while (text := _read_message(inp, interactive)) is not None:
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = list(base)
            print("(history cleared)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        messages = history + [{"role": "user", "content": text}]
        ids, history, warning = chat_prompt_ids(tok, messages, max_prompt)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        if interactive:
            out.write("assistant> ")
        stream, reply = Utf8Stream(tok, out), []
        idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
        steps = generate_stream(model, idx, min(cfg.max_new_tokens, block - len(ids)),
                                cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p,
                                cfg.repetition_penalty, stop_ids, vocab_limit, generator,
                                cfg.use_cache, decode_fn, stats)
        try:
            for (t,) in steps:
                if t in stop_ids:
                    break
                reply.append(t)
                stream.write([t])
        except KeyboardInterrupt:  # Ctrl-C cuts this reply short; at the prompt it quits
            if not interactive:
                raise
        stream.close()
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": tok.decode(reply)})


# -----------------------------------------------------------------------------
# Main: load, then sample or chat, then print the speed


def run(cfg: SampleConfig) -> SpeedStats:
    """The whole command: check, load, generate (or chat), print the speed; returns the stats."""
    if cfg.export:
        export(cfg)
        return SpeedStats()
    # bad settings fail before the (slow) load, in the order the options are listed
    check_sampling_args(cfg.temperature, cfg.top_k, cfg.top_p)
    check_filter_args(cfg.min_p, cfg.repetition_penalty)
    if cfg.num_samples < 1 or cfg.max_new_tokens < 1:
        raise ValueError("num_samples and max_new_tokens must be at least 1")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    # decided once, with the reason, by the same rule as training (cfg has .device and .dtype);
    # on a CUDA GPU without bf16 that rule picks fp16, which is also fine for inference
    device, dtype, why = choose_device(cfg)
    print(f"device: {device} ({why}), dtype: {str(dtype).replace('torch.', '')}", file=sys.stderr)
    print("config: " + " ".join(f"{k}={v!r}" for k, v in asdict(cfg).items()), file=sys.stderr)
    model, tok, vocab_limit = load_for_sampling(cfg.out_dir, cfg.hf or None, device, cfg.ckpt)
    model.to(dtype=dtype)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    decode_fn = None
    if cfg.compile and cfg.use_cache and device.type == "cuda":
        # compile only the one-token step: its shapes never change, so it compiles once
        # (start_pos becomes a symbolic int after its first change); prefill stays eager
        decode_fn = torch.compile(model.forward)
    stats = SpeedStats()
    if cfg.chat:
        chat(model, tok, vocab_limit, cfg, generator, stats, decode_fn)
    else:
        _sample(model, tok, vocab_limit, cfg, generator, stats, decode_fn)
    print(stats.report(), file=sys.stderr)
    return stats


def _sample(model: GPT, tok: Tokenizer, vocab_limit: int, cfg: SampleConfig, generator, stats,
            decode_fn) -> None:
    """Print a continuation of every prompt: streamed for one sample, else each when done."""
    device = next(model.parameters()).device
    texts = read_prompts(cfg.prompt, cfg.prompt_lines)
    # a document ends at <|endoftext|>; a chat-tuned model's reply ends at <|end|>
    stop_ids = [tok.eot_id] + [tok.special_tokens[s] for s in ["<|end|>"]
                               if s in tok.special_tokens]
    prompts, max_new = [], cfg.max_new_tokens
    for text in texts:
        ids = tok.encode(text) or [tok.eot_id]  # no prompt: start a new document, as in training
        ids, n, warning = fit_context(ids, model.config.block_size, cfg.max_new_tokens)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        prompts += [ids] * cfg.num_samples
        max_new = min(max_new, n)  # one batch shares one length: the tightest prompt decides
    kw = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
              repetition_penalty=cfg.repetition_penalty, vocab_limit=vocab_limit,
              generator=generator, use_cache=cfg.use_cache, stats=stats, decode_fn=decode_fn)
    shown = lambda ids: [t for t in ids if t not in stop_ids]  # the end tokens are not text
    if len(prompts) == 1 and cfg.stream:
        sys.stdout.write(tok.decode(shown(prompts[0])))
        stream = Utf8Stream(tok, sys.stdout)
        idx = torch.tensor(prompts, dtype=torch.long, device=device)  # (1, T)
        for (t,) in generate_stream(model, idx, max_new, stop_ids=stop_ids, **kw):
            if t not in stop_ids:
                stream.write([t])
        stream.close()
        sys.stdout.write("\n")
    else:
        rows = generate_batch(model, prompts, max_new, stop_ids, **kw)
        for i, (p, r) in enumerate(zip(prompts, rows)):
            sep = "" if i == 0 else "---------------\n"
            sys.stdout.write(sep + tok.decode(shown(p) + shown(r)) + "\n")
    sys.stdout.flush()


# -----------------------------------------------------------------------------
# Export: the model with its tokenizer, for transformers, vLLM and llama.cpp

# The export lives here, not in model.py, because it needs the tokenizer: model.py imports only
# torch (STYLE.md rule 6), and this file already reads every kind of checkpoint there is
# (train.py's, finetune.py's, a Hugging Face directory).
EXPORT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def export(cfg: SampleConfig) -> str:
    """--export: load as for sampling (on the CPU), then write cfg.export in cfg.format.
    Returns the path written."""
    if cfg.format not in ("hf", "gguf"):
        raise ValueError(f"--format={cfg.format} is not one of hf, gguf")
    if cfg.export_dtype not in EXPORT_DTYPES:
        raise ValueError(f"--export_dtype={cfg.export_dtype} is not one of "
                         f"{', '.join(EXPORT_DTYPES)}")
    if cfg.format == "gguf" and not cfg.export.endswith(".gguf"):
        raise ValueError(f"--export={cfg.export} should end in .gguf (one file, as llama.cpp "
                         f"loads it); pass e.g. --export=model.gguf")
    model, tok, _ = load_for_sampling(cfg.out_dir, cfg.hf or None, "cpu", cfg.ckpt)
    if tok.n_vocab > model.config.vocab_size:
        # an imported GPT-2 with tiktoken's BPE: the chat tokens were added after its last id,
        # and an exported file must hold a row for every token it names
        rows = model.grow_vocab(tok.n_vocab)
        print(f"the tokenizer has {tok.n_vocab:,} ids and the model {rows:,} rows: exporting "
              f"{model.config.vocab_size:,} rows, the new ones at the mean embedding",
              file=sys.stderr)
    if cfg.format == "hf":
        export_hf(model, tok, cfg.export, EXPORT_DTYPES[cfg.export_dtype])
    else:
        model.save_gguf(cfg.export, gguf_vocab(tok, model.config.vocab_size), cfg.export_dtype)
    print(f"exported {cfg.format} to {cfg.export}", file=sys.stderr)
    return cfg.export


def generation_ids(tok: Tokenizer, rows: int) -> dict:
    """The ids a runtime needs to start, stop and pad: generation stops at <|endoftext|> (a
    document's end) and at <|end|> (a chat turn's end); embedding rows past the tokenizer's
    vocabulary (train.py pads the table to a multiple of 64) are never valid tokens."""
    sp = tok.special_tokens
    return {"bos_token_id": sp["<|endoftext|>"], "eos_token_id": [sp["<|endoftext|>"], sp["<|end|>"]],
            "pad_token_id": sp["<|pad|>"], "unused_ids": list(range(tok.n_vocab, rows))}


def export_hf(model: GPT, tok: Tokenizer, out_dir: str, dtype=torch.float32) -> None:
    """A directory that transformers' AutoModelForCausalLM and AutoTokenizer load as they are:
    config.json and model.safetensors (model.save_hf), tokenizer.json and tokenizer_config.json
    with the chat template (Tokenizer.save_hf), generation_config.json, and tokenizer.bpe (so
    `sample.py --hf=out_dir` uses the very same tokenizer). Written into out_dir + ".tmp", then
    renamed into place: an interrupted export never leaves a half-written directory."""
    ids = generation_ids(tok, model.config.vocab_size)
    tmp, old = out_dir.rstrip("/") + ".tmp", out_dir.rstrip("/") + ".old"
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    os.makedirs(tmp)
    copy = GPT(model.config)
    copy.load_state_dict(model.state_dict())
    copy.to(dtype).save_hf(tmp, {"bos_token_id": ids["bos_token_id"],
                                 "eos_token_id": ids["eos_token_id"][0],
                                 "pad_token_id": ids["pad_token_id"]})
    tok.save_hf(tmp)
    generation = {k: v for k, v in ids.items() if k != "unused_ids"}
    if ids["unused_ids"]:  # greedy decoding must never pick a padding row, as sample.py masks them
        generation["suppress_tokens"] = ids["unused_ids"]
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=1)
    tok.save(os.path.join(tmp, "tokenizer.bpe"))
    if os.path.exists(out_dir):  # swap: the old export stays whole until the new one is
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def gguf_vocab(tok: Tokenizer, rows: int) -> dict:
    """The tokenizer as GPT.save_gguf takes it: llama.cpp's "gpt2" (byte-level BPE) model with
    the tokens by id, the merges, a type per token, the pre-tokenizer name of our split regex
    and the special ids. llama.cpp wants one token per embedding row, so the rows past the
    vocabulary get placeholder tokens of type unused, as its own converter does."""
    tokens, merges = tok.hf_vocab()
    specials = set(tok.special_tokens.values())
    # llama.cpp token types: 1 normal, 3 control (never produced from text), 5 unused (a gap in
    # an imported vocabulary's ids)
    types = [3 if i in specials else 1 if i in tok.vocab else 5 for i in range(len(tokens))]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), rows)]
    types += [5] * (rows - len(types))
    ids = generation_ids(tok, rows)
    return {"tokens": tokens, "merges": merges, "token_types": types,
            "pre": gguf_pre_name(tok.pattern), "bos_id": ids["bos_token_id"],
            "eos_id": ids["eos_token_id"][0], "eot_id": ids["eos_token_id"][1],
            "pad_id": ids["pad_token_id"], "chat_template": CHAT_TEMPLATE}


def main(argv=None) -> None:
    """Command-line entry: a user mistake exits with one line on stderr, never a traceback."""
    cfg = parse_config(SampleConfig, argv)
    try:
        run(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        sys.exit(130)  # what a shell reports for a program stopped by Ctrl-C


if __name__ == "__main__":
    main()
