"""
sample.py: generate text from a trained GPT, or chat with a fine-tuned one.

It loads a checkpoint that train.py or finetune.py wrote (or a local Hugging Face directory),
then decodes one token at a time with a preallocated KV cache, so each new token costs one
forward pass over one position instead of over the whole context. Tokens stream to the
terminal as they are made; `--chat` opens a REPL that speaks the chat template of tokenizer.py.

Run it:
    python sample.py                                     # samples from out/ (best.pt, else ckpt.pt)
    python sample.py --out_dir=out --prompt="def main(" --max_new_tokens=100 --temperature=0
    python sample.py --prompt=FILE:prompt.txt --num_samples=4 --top_p=0.9 --seed=7
    python sample.py --prompt=FILE:prompts.txt --prompt_lines    # one prompt per line, one batch
    python sample.py --out_dir=out_sft --chat                # interactive; /reset, /exit
    printf 'hello\\n/exit\\n' | python sample.py --out_dir=out_sft --chat --temperature=0
    python sample.py --hf=path/to/gpt2 --prompt="Hello"      # a local HF dir (config.json + weights)
    python sample.py --use_cache=False --temperature=0       # the slow reference: no KV cache
    python sample.py -h                                      # every option with its meaning

Sources:
    nanoGPT sample.py (the overall shape of the script), gpt-fast generate.py (a preallocated
    KV cache filled by a prefill pass, then one-token decode steps; torch.compile of the step),
    Holtzman et al. 2019 "The Curious Case of Neural Text Degeneration" (top-p / nucleus),
    Nguyen et al. 2024 "Turning Up the Heat: Min-p Sampling" (min-p),
    Keskar et al. 2019 "CTRL" section 4.1 (repetition penalty).
"""

import codecs
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from model import GPT, sample_logits
from tokenizer import Tokenizer, parse_config
from train import choose_device, file_sha256, load_checkpoint  # one device rule, one ckpt reader

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class SampleConfig:
    out_dir: str = "out"  # directory with ckpt.pt / best.pt and tokenizer.bpe (written by train.py or finetune.py)
    ckpt: str = ""  # checkpoint file inside out_dir; "" = best.pt if present, else ckpt.pt
    hf: str = ""  # local Hugging Face model directory (config.json + weights); replaces out_dir when set
    prompt: str = ""  # prompt text, or FILE:path to read it from a UTF-8 file; "" = start from <|endoftext|>
    prompt_lines: bool = False  # each non-empty line of the prompt is its own prompt; all run as one left-padded batch
    num_samples: int = 1  # samples per prompt, generated together as one batch
    max_new_tokens: int = 200  # new tokens per sample; fewer if the context window (block_size) fills up
    temperature: float = 0.8  # 0 = greedy (argmax); below 1 sharper, above 1 flatter; must be >= 0
    top_k: int = 200  # sample only among the k most likely tokens; 0 disables
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens holding this much probability; in (0, 1], 1 disables
    min_p: float = 0.0  # min-p sampling: drop tokens whose probability is below min_p * the top one; 0 disables
    repetition_penalty: float = 1.0  # CTRL penalty on every token already in the context (>1 discourages repeats); 1 disables
    seed: int = 1337  # seed of the sampling torch.Generator: same seed + same settings = same text
    chat: bool = False  # chat REPL for fine-tuned checkpoints: one user message per stdin line; /reset, /exit; works on a pipe
    system: str = ""  # chat only: a system message that opens every conversation; "" = none
    use_cache: bool = True  # preallocated KV cache; False recomputes the whole context for every token (slow reference)
    stream: bool = True  # print tokens as they are made (batch size 1 only); False prints each sample when done
    device: str = "auto"  # auto = cuda, then mps, then cpu; or cpu / cuda / cuda:1 / mps
    dtype: str = "auto"  # auto = bfloat16 on CUDA GPUs that support it, else float32; or float32 / bfloat16 / float16
    compile: bool = True  # torch.compile the one-token decode step on CUDA (ignored elsewhere); False if it errors
    threads: int = 0  # torch.set_num_threads for CPU runs; 0 keeps torch's default


def check_sampling_args(temperature: float, top_k, top_p, min_p: float, repetition_penalty: float) -> None:
    """Raise ValueError with one sentence for a sampling setting outside its range."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is negative; use 0 for greedy decoding or a value > 0 to sample")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} is negative; use 0 to disable top-k or a positive count")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is outside (0, 1]; use e.g. 0.9, or 1.0 to disable nucleus sampling")
    if not 0 <= min_p < 1:
        raise ValueError(f"min_p={min_p} is outside [0, 1); use e.g. 0.05, or 0 to disable min-p")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty={repetition_penalty} must be > 0; use 1.0 to disable it")


# -----------------------------------------------------------------------------
# Loading: one code path for a training out_dir and for a Hugging Face directory


def load_for_sampling(out_dir: str | None = None, hf: str | None = None, device="cpu",
                      ckpt_name: str = "") -> tuple[GPT, Tokenizer, int]:
    """Return (model in eval mode on device, tokenizer, vocab_limit).

    vocab_limit is the tokenizer's real vocabulary size: train.py pads the model's vocabulary
    up to a multiple of 64 for speed, and the padded ids are never valid tokens, so sampling
    masks ids >= vocab_limit. Example: load_for_sampling("out") -> (GPT, Tokenizer, 4099).
    """
    if hf:
        if not os.path.isdir(hf):
            raise FileNotFoundError(f"--hf={hf} is not a directory; pass a local Hugging Face model dir with config.json")
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
                    f"{hf} has no tokenizer.bpe and tiktoken's gpt2 encoding is unavailable ({type(e).__name__}); "
                    f"copy the model's tokenizer.bpe into {hf}, or run once with network so tiktoken caches gpt2") from None
            print(f"{hf} has no tokenizer.bpe: using tiktoken's GPT-2 BPE", file=sys.stderr)
        else:
            raise FileNotFoundError(f"{hf} has no tokenizer.bpe and its vocabulary ({model.config.vocab_size} ids) is "
                                    f"not GPT-2's; save the model's tokenizer there as tokenizer.bpe (Tokenizer.save)")
        return model, tok, min(tok.n_vocab, model.config.vocab_size)

    out_dir = out_dir or "out"
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"out_dir {out_dir} does not exist; train a model first (python train.py) "
                                f"or pass --out_dir=DIR (or --hf=DIR for a Hugging Face model)")
    names = [ckpt_name] if ckpt_name else ["best.pt", "ckpt.pt"]
    paths = [os.path.join(out_dir, n) for n in names if os.path.exists(os.path.join(out_dir, n))]
    if not paths:
        raise FileNotFoundError(f"no {' or '.join(names)} in {out_dir}; train first (python train.py --out_dir={out_dir}) "
                                f"or point --out_dir at the directory that holds the checkpoint")
    model, ckpt = load_checkpoint(paths[0], device=device)
    tok_path = os.path.join(out_dir, ckpt.get("tokenizer") or "tokenizer.bpe")
    if not os.path.exists(tok_path):
        hint = os.path.join(ckpt.get("dataset") or "DATA_DIR", "tokenizer.bpe")
        raise FileNotFoundError(f"{tok_path} is missing: the checkpoint {paths[0]} needs the tokenizer it was "
                                f"trained with; copy {hint} into {out_dir}")
    # subtle: another tokenizer of the same size loads fine and samples fluent-looking garbage;
    # train.py records the sha256 of the one it used (HF dirs and older checkpoints have none)
    if ckpt.get("tokenizer_sha256") and file_sha256(tok_path) != ckpt["tokenizer_sha256"]:
        hint = os.path.join(ckpt.get("dataset") or "DATA_DIR", "tokenizer.bpe")
        raise ValueError(f"{tok_path} is not the tokenizer {paths[0]} was trained with (its "
                         f"sha256 differs from the one the checkpoint records); copy {hint} into "
                         f"{out_dir}, or retrain")
    tok = Tokenizer.load(tok_path)
    if ckpt.get("vocab_size") and ckpt["vocab_size"] != tok.n_vocab:  # another run's tokenizer: wrong text, or ids the model lacks
        raise ValueError(f"{tok_path} has {tok.n_vocab} tokens but {paths[0]} was trained with {ckpt['vocab_size']}; "
                         f"copy the tokenizer.bpe of its training run (from {ckpt.get('dataset') or 'its dataset'}) "
                         f"into {out_dir}")
    vocab_limit = int(ckpt.get("vocab_size") or tok.n_vocab)
    print(f"loaded {paths[0]} (step {ckpt.get('step', '?')}, {model.num_params() / 1e6:.2f}M params)", file=sys.stderr)
    return model.eval(), tok, min(vocab_limit, model.config.vocab_size)


# -----------------------------------------------------------------------------
# Prompts: text -> token ids that fit the context window


def read_prompts(prompt: str, lines: bool) -> list[str]:
    """--prompt text or FILE:path -> a list of prompts (one, or one per non-empty line)."""
    if prompt.startswith("FILE:"):
        path = prompt[len("FILE:"):]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt file {path} does not exist; pass --prompt=FILE:path to an existing UTF-8 file")
        try:
            with open(path, encoding="utf-8") as f:
                prompt = f.read()
        except UnicodeDecodeError:
            raise ValueError(f"prompt file {path} is not UTF-8 text; re-encode it, e.g. iconv -f latin1 -t UTF-8") from None
    if lines:
        prompts = [ln for ln in prompt.splitlines() if ln.strip()]
        if not prompts:
            raise ValueError("--prompt_lines was given but the prompt has no non-empty line; put one prompt per line")
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
    if len(ids) > keep:
        warning = f"prompt has {len(ids)} tokens, more than the {keep} that fit; dropped the oldest {len(ids) - keep}"
        ids = ids[-keep:]
    max_new = min(max_new_tokens, block_size - len(ids))
    if max_new < max_new_tokens:
        warning += ("; " if warning else "") + f"max_new_tokens cut to {max_new} by block_size={block_size}"
    return ids, max_new, warning


# -----------------------------------------------------------------------------
# The decoding loop: prefill the cache once, then one token per forward pass


class SpeedStats:
    """Prefill and decode throughput, summed over every generate call of a run."""

    def __init__(self):
        self.prefill_tokens = self.decode_tokens = 0
        self.prefill_s = self.decode_s = 0.0

    def report(self) -> str:
        rate = lambda n, s: f"{n / s:,.1f} tok/s, {1e3 * s / n:.1f} ms/token" if s > 0 and n > 0 else "n/a"
        return (f"prefill: {self.prefill_tokens:,} tokens in {self.prefill_s:.3f} s ({rate(self.prefill_tokens, self.prefill_s)}) | "
                f"decode: {self.decode_tokens:,} tokens in {self.decode_s:.3f} s ({rate(self.decode_tokens, self.decode_s)})")


def process_logits(logits, context, vocab_limit=None, temperature=1.0, min_p=0.0, repetition_penalty=1.0):
    """The filters sample_logits does not have: vocabulary limit, repetition penalty, min-p.

    logits (B, V) float, context (B, T) ids so far -> filtered logits (B, V); -inf = never sampled.
    """
    if vocab_limit is not None and vocab_limit < logits.size(-1):
        logits[:, vocab_limit:] = float("-inf")  # padded ids are not tokens
    if repetition_penalty != 1.0:
        # CTRL sec. 4.1: divide a seen token's logit by the penalty; a negative logit is
        # multiplied instead, so that a penalty > 1 always makes the token less likely
        seen = torch.gather(logits, 1, context)  # (B, T)
        seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
        logits.scatter_(1, context, seen)  # repeated ids write the same value twice: harmless
    if min_p > 0 and temperature > 0:
        # min-p: the cut scales with the model's confidence, measured after temperature
        probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
        cut = min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
        logits = logits.masked_fill(probs < cut, float("-inf"))
    return logits


@torch.inference_mode()
def generate_stream(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, min_p: float = 0.0,
                    repetition_penalty: float = 1.0, stop_ids=(), vocab_limit: int | None = None,
                    generator: torch.Generator | None = None, use_cache: bool = True,
                    decode_fn=None, stats: SpeedStats | None = None, left_pad: torch.Tensor | None = None):
    """Yield the next token of every row, one step at a time: a list of B ints per step.

    idx (B, T) holds the prompts; left_pad (B,) says how many padding tokens open each row
    (model.forward keeps them out of attention and numbers real tokens from 0; see
    generate_batch). A row that emits one of stop_ids is finished: it repeats that id and the
    loop ends when every row has finished. T + max_new_tokens must fit in block_size
    (fit_context sees to that). decode_fn, if given, replaces model.forward for the one-token
    steps (a torch.compile'd forward on CUDA).
    """
    check_sampling_args(temperature, top_k, top_p, min_p, repetition_penalty)
    B, T = idx.shape
    if T + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds block_size="
                         f"{model.config.block_size}; shorten the prompt or lower --max_new_tokens")
    if max_new_tokens <= 0:
        return
    V = vocab_limit or model.config.vocab_size
    top_k = min(top_k, V) if top_k else None  # more than V would let padded (-inf) ids in
    top_p = top_p if top_p is not None and top_p < 1.0 else None
    stop = torch.tensor(sorted(set(stop_ids)), device=idx.device) if stop_ids else None
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    stats = stats if stats is not None else SpeedStats()
    step = decode_fn or model.forward
    context = idx  # (B, T + steps so far): the repetition penalty and the uncached path read it
    cache = model.new_kv_cache(B, T + max_new_tokens) if use_cache else None

    t0 = time.perf_counter()
    if use_cache:  # prefill: all T positions in one pass, their keys and values into the cache
        logits, _ = model(idx, kv_cache=cache, start_pos=0, left_pad=left_pad)
    else:
        logits, _ = model(idx, left_pad=left_pad)  # (B, 1, V): last position only
    for i in range(max_new_tokens):
        logits = process_logits(logits[:, -1, :].float(), context, vocab_limit, temperature, min_p, repetition_penalty)
        nxt = sample_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)  # (B, 1)
        if stop is not None:
            nxt = torch.where(finished[:, None], context[:, -1:], nxt)  # finished rows repeat their stop id
            finished |= torch.isin(nxt[:, 0], stop)
        tokens = nxt[:, 0].tolist()  # waits for the device: the caller needs the ids anyway
        dt = time.perf_counter() - t0
        if i == 0:  # the first new token is the product of the prefill pass
            stats.prefill_tokens, stats.prefill_s = stats.prefill_tokens + B * T, stats.prefill_s + dt
        else:
            stats.decode_tokens, stats.decode_s = stats.decode_tokens + B, stats.decode_s + dt
        yield tokens  # subtle: time spent by the consumer (printing) stays outside the timers
        if i == max_new_tokens - 1 or (stop is not None and bool(finished.all())):
            return
        t0 = time.perf_counter()
        context = torch.cat([context, nxt], dim=1)  # (B, T + i + 1)
        if use_cache:
            logits, _ = step(nxt, kv_cache=cache, start_pos=T + i, left_pad=left_pad)  # (B, 1, V): one position
        else:
            logits, _ = model(context, left_pad=left_pad)  # the whole context again: O(T) work per token


def generate_batch(model: GPT, prompts: list[list[int]], max_new_tokens: int, stop_ids=(), **kw) -> list[list[int]]:
    """Generate for a batch of prompts -> the new ids of each row, cut after its stop token.

    Prompts of different lengths are LEFT-padded to one width, so that every row's next token
    sits in the same last column; model.forward(left_pad=...) hides the padding from attention
    and starts each row's positions at 0, so each row gives the tokens it would give alone.
    Example: [[5, 6, 7], [8]] -> idx [[5, 6, 7], [8, 8, 8]] with left_pad [0, 2].
    """
    device = next(model.parameters()).device
    T = max(len(p) for p in prompts)
    # subtle: pad with the row's own first token, so the repetition penalty (which reads the
    # whole row) sees no token that is not really in the prompt
    idx = torch.tensor([[p[0]] * (T - len(p)) + p for p in prompts], dtype=torch.long, device=device)
    pads = [T - len(p) for p in prompts]
    left_pad = torch.tensor(pads, device=device) if any(pads) else None
    steps = list(generate_stream(model, idx, max_new_tokens, stop_ids=stop_ids, left_pad=left_pad, **kw))
    rows = [list(r) for r in zip(*steps)] if steps else [[] for _ in prompts]
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
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, ids: list[int]) -> str:
        text = self.decoder.decode(self.tok.decode_bytes(ids))
        if text and self.out is not None:
            self.out.write(text)
            self.out.flush()
        return text

    def close(self) -> str:
        text = self.decoder.decode(b"", final=True)  # a truncated last character becomes U+FFFD
        if text and self.out is not None:
            self.out.write(text)
            self.out.flush()
        return text


# -----------------------------------------------------------------------------
# Chat REPL


def chat_prompt_ids(tok: Tokenizer, messages: list[dict], max_prompt: int) -> tuple[list[int], list[dict], str]:
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


def chat(model: GPT, tok: Tokenizer, vocab_limit: int, cfg: SampleConfig, generator=None, stats=None,
         decode_fn=None, inp=None, out=None) -> None:
    """Read user lines from inp, write replies to out; /reset clears the history, /exit quits.

    On a pipe (not a terminal) stdout carries only the replies, one per line, so a script can
    drive it: printf 'hi\\n/exit\\n' | python sample.py --chat --temperature=0
    """
    inp, out = inp or sys.stdin, out or sys.stdout
    needed = ["<|user|>", "<|assistant|>", "<|end|>"]
    missing = [s for s in needed if tok.special_tokens.get(s) is None or tok.special_tokens[s] >= model.config.vocab_size]
    if missing:
        raise ValueError(f"--chat needs the chat tokens {', '.join(missing)} in the tokenizer and the model; "
                         f"use a checkpoint from finetune.py, or sample without --chat")
    stop_ids = [tok.special_tokens["<|end|>"], tok.eot_id]
    block = model.config.block_size
    max_prompt = block - min(cfg.max_new_tokens, block // 2)
    device = next(model.parameters()).device
    interactive = inp.isatty()
    base = [{"role": "system", "content": cfg.system}] if cfg.system else []
    history = list(base)
    if interactive:
        print("chat: type a message and press enter; /reset clears the history, /exit quits", file=sys.stderr)
        try:
            import readline  # noqa: F401  arrow keys and history in input(); absent on Windows
        except ImportError:
            pass
    while True:
        if interactive:
            try:
                text = input("\nyou> ")  # line editing, with readline where the platform has it
            except EOFError:  # Ctrl-D
                break
        else:
            line = inp.readline()
            if not line:  # end of input
                break
            text = line.rstrip("\r\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = list(base)
            print("(history cleared)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        ids, history, warning = chat_prompt_ids(tok, history + [{"role": "user", "content": text}], max_prompt)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        if interactive:
            out.write("assistant> ")
        stream, reply = Utf8Stream(tok, out), []
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        try:
            for (t,) in generate_stream(model, idx, min(cfg.max_new_tokens, block - len(ids)), cfg.temperature,
                                        cfg.top_k or None, cfg.top_p, cfg.min_p, cfg.repetition_penalty, stop_ids,
                                        vocab_limit, generator, cfg.use_cache, decode_fn, stats):
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
    check_sampling_args(cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, cfg.repetition_penalty)
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
        print(stats.report(), file=sys.stderr)
        return stats

    texts = read_prompts(cfg.prompt, cfg.prompt_lines)
    stop_ids = [tok.eot_id] + [tok.special_tokens[s] for s in ["<|end|>"] if s in tok.special_tokens]
    prompts, max_new = [], cfg.max_new_tokens
    for text in texts:
        ids = tok.encode(text) or [tok.eot_id]  # no prompt: start a new document, as in training
        ids, n, warning = fit_context(ids, model.config.block_size, cfg.max_new_tokens)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        prompts += [ids] * cfg.num_samples
        max_new = min(max_new, n)
    kw = dict(temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p, min_p=cfg.min_p,
              repetition_penalty=cfg.repetition_penalty, vocab_limit=vocab_limit, generator=generator,
              use_cache=cfg.use_cache, stats=stats)
    shown = lambda ids: [t for t in ids if t not in stop_ids]  # the end tokens are not text
    if len(prompts) == 1 and cfg.stream:
        sys.stdout.write(tok.decode(shown(prompts[0])))
        stream = Utf8Stream(tok, sys.stdout)
        idx = torch.tensor(prompts, dtype=torch.long, device=device)
        for (t,) in generate_stream(model, idx, max_new, stop_ids=stop_ids, decode_fn=decode_fn, **kw):
            if t not in stop_ids:
                stream.write([t])
        stream.close()
        sys.stdout.write("\n")
    else:
        rows = generate_batch(model, prompts, max_new, stop_ids, decode_fn=decode_fn, **kw)
        for i, (p, r) in enumerate(zip(prompts, rows)):
            sys.stdout.write(("" if i == 0 else "---------------\n") + tok.decode(shown(p) + shown(r)) + "\n")
    sys.stdout.flush()
    print(stats.report(), file=sys.stderr)
    return stats


def main(argv=None) -> None:
    cfg = parse_config(SampleConfig, argv)
    try:
        run(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
