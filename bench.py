"""
bench.py: how fast a model trains and generates, what a training run costs, and how good a
checkpoint is.

Run it:
    python bench.py                                   # training speed of the device's default model
    python bench.py --preset=cpu-1m --steps=5 --threads=1   # a tiny CPU run (seconds)
    python bench.py --preset=gpt2 --batch_size=16     # GPT-2 124M on a GPU: tokens/s, ms/step, MFU, memory
    python bench.py --ladder --preset=gpt2            # optimizations switched on one at a time
    python bench.py --infer                           # prefill and decode tokens/s, with and without the KV cache
    python bench.py --infer --preset=gpt2 --context=512 --compile   # the same on a GPU, compiled
    python bench.py --budget --preset=gpt2 --tokens=10e9 --gpus=H100,A100 --price=2.5
    python bench.py --budget --params=7e9             # Chinchilla-optimal tokens (20 per parameter)
    python bench.py --eval=bpb --ckpt=out/best.pt --data=data/pystdlib   # or --data=some.txt
    python bench.py --eval=mc --ckpt=out/best.pt --data=evals/mc_tiny.jsonl  # HellaSwag's JSONL works too
    python bench.py --json ...                        # one machine-readable line instead of the report
    python bench.py -h                                # every option with its meaning

Speed is measured on synthetic tokens (data loading excluded): forward, backward and AdamW
step, warmup steps dropped, the median of the timed steps, CUDA synchronized around each.
On a CPU there is no datasheet peak, so the achieved FLOP/s is compared with an fp32 matmul
measured on the same machine, and the report says plainly that this is not MFU.

Sources (facts and formulas): Kaplan et al. 2020 (training FLOPs ~ 6ND); Hoffmann et al.
2022 (Chinchilla, ~20 tokens per parameter); PaLM (Chowdhery et al. 2022) appendix B and
section 4 (attention FLOPs, MFU); Zellers et al. 2019 (HellaSwag) and llm.c's hellaswag.py
for scoring endings by their log-likelihood; Micikevicius et al. 2018 and NVIDIA's TF32
notes for the precision rungs; Dao et al. 2022 (FlashAttention) for the SDPA rung.
"""

import contextlib
import dataclasses
import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from model import GPT, PEAK_BF16_FLOPS, PRESETS, GPTConfig, peak_flops

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class BenchConfig:
    # what to run (default: one training-speed measurement)
    ladder: bool = False  # the optimization ladder: the same model with one speed-up added per rung
    infer: bool = False  # prefill and decode tokens/s, with and without the KV cache
    budget: bool = False  # FLOPs, GPU-hours and cost of a training run; runs no model unless --mfu=0
    eval: str = ""  # "bpb": bits per byte of --ckpt on --data; "mc": multiple-choice accuracy on --data (JSONL)
    json: bool = False  # print one JSON line instead of the human-readable report
    # model and batch
    preset: str = ""  # a model.py PRESETS name; "" = gpt2 on CUDA, cpu-1m elsewhere
    vocab_size: int = 0  # 0 = the preset's (gpt2: 50257); speed runs pad it to a multiple of 64 as train.py does, the ladder in its own rung
    block_size: int = 0  # tokens per row; 0 = the preset's block_size
    batch_size: int = 0  # rows per micro-batch; 0 = 8 on CUDA, 4 elsewhere
    steps: int = 10  # timed steps; the median is reported
    warmup: int = 3  # untimed steps first (allocator, cuDNN/cuBLAS heuristics, torch.compile)
    device: str = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1", "mps"
    dtype: str = "auto"  # "auto" (bf16 autocast on GPUs that support it, else fp32), "float32", "bfloat16"
    compile: bool = False  # torch.compile the model for the speed and inference runs (CUDA recommended)
    seed: int = 1337  # seeds the weights and the synthetic tokens
    threads: int = 0  # CPU threads for torch; 0 = torch's default (one per core); 1 is steadier on a busy machine
    matmul_size: int = 1024  # CPU/MPS: n of the n x n fp32 matmul whose FLOP/s stands in for a peak
    # ladder
    ladder_cpu_compile: bool = False  # also try torch.compile on a CPU (needs a C++ compiler; minutes to compile)
    ladder_batch_mult: int = 2  # the last rung multiplies the micro-batch by this
    # inference
    context: int = 0  # prompt tokens; 0 = block_size - new_tokens
    new_tokens: int = 32  # tokens decoded after the prompt
    # budget
    params: float = 0.0  # parameter count N (e.g. 124e6); 0 = the preset's non-embedding count
    tokens: float = 0.0  # training tokens D (e.g. 10e9); 0 = 20 * N (Chinchilla)
    mfu: float = 0.4  # assumed model FLOPs utilization; 0 = measure it with a speed run on this GPU
    gpus: str = "H100,A100,L4"  # GPU names looked up in model.PEAK_BF16_FLOPS, comma-separated
    price: float = 2.5  # dollars per GPU-hour
    # quality
    ckpt: str = "out/best.pt"  # a train.py checkpoint (its tokenizer.bpe sits next to it)
    data: str = ""  # bpb: a prepared dataset dir (meta.json) or a text file; mc: a JSONL file
    eval_windows: int = 0  # bpb on a dataset: validation windows of block_size, spread over the split; 0 = all of them
    eval_batch: int = 16  # rows per forward pass in the evals
    mc_limit: int = 0  # mc: score only the first N items (0 = all)


def default_batch(device: torch.device) -> int:
    return 8 if device.type == "cuda" else 4


def resolve_model_config(cfg: BenchConfig, device: torch.device) -> GPTConfig:
    """The benchmarked GPTConfig: the preset with --vocab_size/--block_size applied."""
    name = cfg.preset or ("gpt2" if device.type == "cuda" else "cpu-1m")
    if name not in PRESETS:
        raise ValueError(f"--preset={name} is not a model.py preset; choose one of {', '.join(PRESETS)}")
    kw = dict(PRESETS[name])
    if cfg.vocab_size:
        kw["vocab_size"] = cfg.vocab_size
    if cfg.block_size:
        kw["block_size"] = cfg.block_size
    return GPTConfig(**kw)


# -----------------------------------------------------------------------------
# Timing, memory and a measured CPU peak


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures compute rather than kernel launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured). CUDA: the allocator's peak since the last reset. Elsewhere
    the process's peak resident set size, which only ever grows: a later, smaller run reports
    the peak of an earlier, bigger one."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    try:
        import resource  # Unix only
    except ImportError:
        return 0, "unavailable on this OS"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # subtle: Linux reports ru_maxrss in KiB, macOS in bytes
    return int(rss if sys.platform == "darwin" else rss * 1024), "process max RSS"


_MATMUL_PEAK = {}  # (device str, n) -> FLOP/s, measured once per process


def measure_matmul_peak(device: torch.device, n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of the fastest of `reps` n x n fp32 matmuls (2 n^3 FLOPs each) on `device`:
    the practical ceiling that a CPU's training step can be compared with."""
    key = (str(device), n, torch.get_num_threads())
    if key not in _MATMUL_PEAK:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(device)
        b = torch.randn(n, n, generator=g).to(device)
        a @ b  # warm the BLAS thread pool
        best = float("inf")
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            best = min(best, time.perf_counter() - t0)
        _MATMUL_PEAK[key] = 2 * n ** 3 / best
    return _MATMUL_PEAK[key]


def cpu_bf16_native() -> bool:
    """Whether oneDNN has native bf16 on this CPU (AVX512-BF16 or AMX); without it autocast emulates bf16."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# -----------------------------------------------------------------------------
# Training speed


@dataclass
class Recipe:
    tf32: bool = False  # fp32 matmuls on TF32 tensor cores (CUDA Ampere and newer)
    amp: bool = False  # bf16 autocast for the forward pass (master weights stay fp32)
    sdpa: bool = True  # F.scaled_dot_product_attention (flash kernels) instead of the manual softmax path
    compile: bool = False  # torch.compile the model
    fused: bool = False  # AdamW's fused single-kernel step instead of the default
    batch_size: int = 4  # rows per micro-batch
    vocab_size: int = 0  # embedding rows of the model


def measure_train_speed(gcfg: GPTConfig, recipe: Recipe, device: torch.device, steps: int = 10,
                        warmup: int = 3, seed: int = 1337, matmul_size: int = 1024) -> dict:
    """Time `steps` training steps (after `warmup` untimed ones) of a fresh GPT on fixed random
    tokens. Returns tokens/s, ms/step (median), MFU or the CPU FLOP/s ratio, and peak memory."""
    if steps < 1:
        raise ValueError(f"--steps={steps} must be at least 1")
    gcfg = dataclasses.replace(gcfg, vocab_size=recipe.vocab_size or gcfg.vocab_size, dropout=0.0)
    B, T, V = recipe.batch_size, gcfg.block_size, gcfg.vocab_size
    torch.manual_seed(seed)
    precision = torch.get_float32_matmul_precision()
    # "high" lets cuBLAS use TF32 for fp32 matmuls: a 10-bit mantissa, ~8x the fp32 rate on A100
    torch.set_float32_matmul_precision("high" if recipe.tf32 else "highest")
    reset_peak_memory(device)
    model = opt = None
    try:
        model = GPT(gcfg).to(device)
        model.manual_attention = not recipe.sdpa
        model.train()
        opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, betas=(0.9, 0.95), fused=recipe.fused)
        runner = torch.compile(model) if recipe.compile else model
        amp = (torch.autocast(device.type, dtype=torch.bfloat16) if recipe.amp else contextlib.nullcontext())
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, V, (B, T + 1), generator=g).to(device)
        x, y = tokens[:, :-1], tokens[:, 1:]  # (B, T) each

        times = []
        for i in range(warmup + steps):
            sync(device)
            t0 = time.perf_counter()
            with amp:
                _, loss = runner(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"the benchmark's loss became {loss.item()}; try --dtype=float32")
        dt = sorted(times)[len(times) // 2]  # median: robust to a stray slow step (GC, other jobs)
        tps = B * T / dt
        mem, mem_kind = peak_memory(device)
        fpt = model.flops_per_token()
        out = dict(params=model.num_params(), vocab_size=V, batch_size=B, block_size=T,
                   tokens_per_sec=tps, ms_per_step=dt * 1e3, flops_per_token=fpt,
                   achieved_flops=fpt * tps, mfu=model.estimate_mfu(tps, device),
                   peak_mem_bytes=mem, peak_mem_kind=mem_kind)
        if out["mfu"] is None:  # no datasheet peak: compare with a matmul measured here instead
            peak = measure_matmul_peak(device, matmul_size)
            out.update(measured_matmul_flops=peak, flops_ratio_vs_matmul=fpt * tps / peak)
        return out
    finally:
        torch.set_float32_matmul_precision(precision)
        del model, opt
        if device.type == "cuda":  # hand the memory back before the next rung allocates its own
            gc.collect()
            torch.cuda.empty_cache()


def speed_recipe(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, gcfg: GPTConfig) -> Recipe:
    """The everyday configuration, as train.py runs: every speed-up that applies to this device,
    and the vocabulary padded to a multiple of 64."""
    return Recipe(tf32=device.type == "cuda", amp=dtype == torch.bfloat16, sdpa=True,
                  compile=cfg.compile, fused=device.type in ("cuda", "cpu"),
                  batch_size=cfg.batch_size or default_batch(device), vocab_size=64 * math.ceil(gcfg.vocab_size / 64))


def speed_run(cfg: BenchConfig, gcfg: GPTConfig, recipe: Recipe, device: torch.device) -> dict:
    return measure_train_speed(gcfg, recipe, device, cfg.steps, cfg.warmup, cfg.seed, cfg.matmul_size)


def format_speed(r: dict, device: torch.device) -> str:
    lines = [f"{r['params'] / 1e6:.2f}M non-embedding params, B={r['batch_size']} T={r['block_size']} "
             f"V={r['vocab_size']} on {device}",
             f"{r['tokens_per_sec']:,.0f} tokens/s, {r['ms_per_step']:.1f} ms/step (median), "
             f"peak memory {r['peak_mem_bytes'] / 2**20:,.0f} MiB ({r['peak_mem_kind']})"]
    if r["mfu"] is not None:
        lines.append(f"MFU {100 * r['mfu']:.1f}% ({r['achieved_flops'] / 1e12:.1f} TFLOP/s of "
                     f"{peak_flops(device) / 1e12:.0f} peak dense bf16)")
    else:
        lines.append(f"achieved {r['achieved_flops'] / 1e9:.2f} GFLOP/s = {100 * r['flops_ratio_vs_matmul']:.0f}% "
                     f"of a {r['measured_matmul_flops'] / 1e9:.1f} GFLOP/s fp32 matmul measured on this machine. "
                     f"This is NOT MFU: there is no datasheet peak for {device.type}, and a measured matmul is a "
                     f"practical ceiling, not a theoretical one.")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The ladder: one optimization per rung


def ladder_rungs(device: torch.device, cfg: BenchConfig, gcfg: GPTConfig) -> list:
    """[(name, change to the Recipe or None, reason it was skipped)] in the order they are added."""
    cuda, base_b = device.type == "cuda", cfg.batch_size or default_batch(device)
    if cuda:
        bf16_skip = "" if torch.cuda.is_bf16_supported() else "this GPU has no bf16"
    elif device.type == "cpu":
        bf16_skip = "" if cpu_bf16_native() else "this CPU has no native bf16 (AVX512-BF16/AMX); autocast would emulate it"
    else:
        bf16_skip = "bf16 autocast is not benchmarked on " + device.type
    padded = 64 * math.ceil(gcfg.vocab_size / 64)
    compile_skip = ""
    if not cuda and not (device.type == "cpu" and cfg.ladder_cpu_compile):
        compile_skip = "off on CPU by default (compile time dwarfs a short run); --ladder_cpu_compile tries it"
    return [
        ("fp32", {}, ""),
        ("TF32 matmuls", {"tf32": True}, "" if cuda else "TF32 is an NVIDIA tensor-core format (Ampere+)"),
        ("bf16 autocast", {"amp": True}, bf16_skip),
        ("SDPA flash attention", {"sdpa": True}, ""),
        ("torch.compile", {"compile": True}, compile_skip),
        ("fused AdamW", {"fused": True}, "" if device.type in ("cuda", "cpu") else "no fused AdamW on " + device.type),
        (f"vocab padded to {padded}", {"vocab_size": padded},
         "" if padded != gcfg.vocab_size else f"vocab_size {gcfg.vocab_size} is already a multiple of 64"),
        (f"micro-batch x{cfg.ladder_batch_mult}", {"batch_size": base_b * cfg.ladder_batch_mult},
         "" if cfg.ladder_batch_mult > 1 else "--ladder_batch_mult=1"),
    ]


def run_ladder(cfg: BenchConfig, device: torch.device, gcfg: GPTConfig) -> dict:
    """Each applicable rung keeps the previous ones (cumulative) and reports its gain."""
    recipe = Recipe(sdpa=False, batch_size=cfg.batch_size or default_batch(device), vocab_size=gcfg.vocab_size)
    rows, skipped, prev = [], [], None
    for name, change, skip in ladder_rungs(device, cfg, gcfg):
        if skip:
            skipped.append({"step": name, "reason": skip})
            continue
        recipe = dataclasses.replace(recipe, **change)
        try:
            r = speed_run(cfg, gcfg, recipe, device)
        # the bigger micro-batch may not fit: report it, keep the table (torch < 2.5: torch.cuda's class)
        except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError):
            rows.append({"step": name, "oom": True, "recipe": asdict(recipe)})
            continue
        first = rows[0]["tokens_per_sec"] if rows else r["tokens_per_sec"]
        r.update(step=name, recipe=asdict(recipe), gain=r["tokens_per_sec"] / prev if prev else 1.0,
                 cumulative=r["tokens_per_sec"] / first)
        rows.append(r)
        prev = r["tokens_per_sec"]
    return {"rows": rows, "skipped": skipped}


def format_ladder(res: dict) -> str:
    lines = [f"{'step':<24} {'tokens/s':>11} {'ms/step':>9} {'gain':>7} {'vs fp32':>8} {'MFU or ratio*':>13}"]
    for r in res["rows"]:
        if r.get("oom"):
            lines.append(f"{r['step']:<24} {'out of memory':>11}")
            continue
        util = r["mfu"] if r["mfu"] is not None else r["flops_ratio_vs_matmul"]
        lines.append(f"{r['step']:<24} {r['tokens_per_sec']:>11,.0f} {r['ms_per_step']:>9.1f} "
                     f"{r['gain']:>6.2f}x {r['cumulative']:>7.2f}x {100 * util:>12.1f}%")
    for s in res["skipped"]:
        lines.append(f"skipped {s['step']}: {s['reason']}")
    if any(not r.get("oom") and r["mfu"] is None for r in res["rows"]):
        lines.append("* no datasheet peak here: the last column is achieved FLOP/s over a matmul measured on "
                     "this machine, not MFU")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Inference speed: prefill and decode, with and without the KV cache


@torch.no_grad()
def measure_inference(model: GPT, batch_size: int, context: int, new_tokens: int, device: torch.device,
                      amp=None, reps: int = 3, seed: int = 1337) -> dict:
    """Prefill: one forward over a (B, context) prompt (median of reps). Decode: new_tokens
    greedy steps after it; with the cache each step feeds one token at start_pos, without it
    each step re-reads the whole sequence, which is the quadratic cost the cache removes."""
    T = model.config.block_size
    if context < 1 or context + new_tokens > T:
        raise ValueError(f"context={context} + new_tokens={new_tokens} must fit in block_size={T}; "
                         f"lower --context or --new_tokens")
    amp = amp or contextlib.nullcontext()
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch_size, context), generator=g).to(device)

    def timed(fn):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        return time.perf_counter() - t0, out

    def decode(use_cache: bool):
        cache = model.new_kv_cache(batch_size, context + new_tokens) if use_cache else None
        with amp:
            logits, _ = model(prompt, kv_cache=cache, start_pos=0)
        idx, total = prompt, 0.0
        for i in range(new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1) greedy
            idx = torch.cat([idx, nxt], dim=1)  # (B, context + i + 1)
            with amp:
                if use_cache:
                    dt, (logits, _) = timed(lambda: model(nxt, kv_cache=cache, start_pos=context + i))
                else:
                    dt, (logits, _) = timed(lambda: model(idx))
            total += dt
        return total, idx

    out = {"batch_size": batch_size, "context": context, "new_tokens": new_tokens}
    generated = []
    for use_cache in (True, False):
        tag = "cache" if use_cache else "no_cache"
        times = []
        for _ in range(reps + 1):  # the first is warmup
            cache = model.new_kv_cache(batch_size, context) if use_cache else None
            with amp:
                times.append(timed(lambda: model(prompt, kv_cache=cache, start_pos=0))[0])
        out[f"prefill_tokens_per_sec_{tag}"] = batch_size * context / sorted(times[1:])[reps // 2]
        dt, idx = decode(use_cache)
        out[f"decode_tokens_per_sec_{tag}"] = batch_size * new_tokens / dt
        generated.append(idx)
    # both paths did the same work only if they chose the same tokens (bf16 may flip near-ties)
    out["same_tokens"] = bool(torch.equal(generated[0], generated[1]))
    return out


def format_inference(r: dict) -> str:
    lines = [f"B={r['batch_size']}, prompt {r['context']} tokens, then {r['new_tokens']} decoded",
             f"{'':<10} {'prefill tok/s':>14} {'decode tok/s':>13}"]
    for name, tag in (("KV cache", "cache"), ("no cache", "no_cache")):
        lines.append(f"{name:<10} {r['prefill_tokens_per_sec_' + tag]:>14,.0f} {r['decode_tokens_per_sec_' + tag]:>13,.1f}")
    lines.append("greedy tokens with and without the cache " + ("agree" if r["same_tokens"] else "DIFFER"))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Compute budget


def count_params_and_attention(gcfg: GPTConfig) -> tuple[int, int]:
    """(N non-embedding parameters, attention FLOPs per token) of a config, from a model built
    on the meta device: no memory is allocated, so gpt2-xl costs nothing to count."""
    with torch.device("meta"):
        m = GPT(gcfg)
    n = m.num_params(non_embedding=True)
    return n, m.flops_per_token() - 6 * n


def training_budget(n_params: float, tokens: float = 0.0, attn_flops_per_token: float = 0.0,
                    mfu: float = 0.4, gpus=("H100",), price: float = 2.5) -> dict:
    """FLOPs, GPU-hours and dollars of training an N-parameter model on D tokens.

    FLOPs = (6 N + attention) * D. Per token, each parameter costs one multiply-add (2 FLOPs)
    in the forward pass and twice that in the backward pass (gradients w.r.t. activations and
    w.r.t. weights): 2N + 4N = 6N (Kaplan et al. 2020, section 2.1). Attention's QK^T and AV
    add 12 * n_layer * C * T per token at context T (PaLM appendix B).
    D defaults to 20 N, Chinchilla's compute-optimal ratio (Hoffmann et al. 2022).
    GPU-hours = FLOPs / (MFU * peak dense bf16 FLOP/s) / 3600; cost = GPU-hours * price.
    Example: N = 124e6, D = 10e9 -> 7.44e18 FLOPs -> 5.22 H100-hours at 40% MFU."""
    if n_params <= 0 or mfu <= 0 or mfu > 1:
        raise ValueError(f"the budget needs N > 0 (got {n_params:g}) and 0 < MFU <= 1 (got {mfu:g})")
    tokens = tokens or 20 * n_params
    flops = (6 * n_params + attn_flops_per_token) * tokens
    rows = []
    for name in gpus:
        peak = peak_flops(name)
        if peak is None:
            known = ", ".join(k for k, _ in PEAK_BF16_FLOPS)
            raise ValueError(f"GPU {name!r} is not in model.PEAK_BF16_FLOPS; use one of: {known}")
        hours = flops / (mfu * peak) / 3600
        rows.append({"gpu": name, "peak_flops": peak, "gpu_hours": hours, "cost": hours * price})
    return {"params": n_params, "tokens": tokens, "tokens_per_param": tokens / n_params,
            "attn_flops_per_token": attn_flops_per_token, "flops": flops, "mfu": mfu, "price": price, "gpus": rows}


def format_budget(b: dict, label: str) -> str:
    lines = [f"{label}: N = {b['params'] / 1e6:,.1f}M parameters, D = {b['tokens'] / 1e9:,.2f}B tokens "
             f"({b['tokens_per_param']:.1f} per parameter)",
             f"FLOPs = (6N + {b['attn_flops_per_token'] / 1e6:,.1f}M attention/token) x D = {b['flops']:.3e}"
             if b["attn_flops_per_token"] else f"FLOPs = 6ND = {b['flops']:.3e}",
             f"at {100 * b['mfu']:.0f}% MFU and ${b['price']:.2f} per GPU-hour:",
             f"{'GPU':<12} {'peak TFLOP/s':>12} {'GPU-hours':>11} {'cost $':>10}"]
    for r in b["gpus"]:
        lines.append(f"{r['gpu']:<12} {r['peak_flops'] / 1e12:>12,.0f} {r['gpu_hours']:>11,.1f} {r['cost']:>10,.0f}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Quality: bits per byte


@torch.no_grad()
def stream_nats(model: GPT, ids: list, batch_size: int, device: torch.device, amp=None) -> tuple[float, int]:
    """(total nats, predicted tokens) over a token stream cut into non-overlapping windows of
    block_size; every token but the first is predicted exactly once. The last, shorter window
    is padded with targets -100, which the loss ignores."""
    T = model.config.block_size
    amp = amp or contextlib.nullcontext()
    rows = []
    for i in range(0, len(ids) - 1, T):
        w = ids[i:i + T + 1]
        rows.append((w[:-1] + [0] * (T + 1 - len(w)), w[1:] + [-100] * (T + 1 - len(w))))
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x = torch.tensor([r[0] for r in rows[i:i + batch_size]], device=device)  # (B, T)
        y = torch.tensor([r[1] for r in rows[i:i + batch_size]], device=device)  # (B, T)
        with amp:
            _, loss = model(x, y)  # mean over the targets that are not -100
        n = int((y != -100).sum())
        total += loss.double().item() * n
        count += n
    return total, count


def checkpoint_tokenizer(ckpt_path: str, ckpt: dict):
    from tokenizer import Tokenizer
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), ckpt.get("tokenizer", "tokenizer.bpe"))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} (the tokenizer of {ckpt_path}) is missing; copy it from the dataset "
                                f"directory the model was trained on")
    from train import file_sha256
    # the same check as sample.py: another tokenizer of the same size would load without complaint
    if ckpt.get("tokenizer_sha256") and file_sha256(path) != ckpt["tokenizer_sha256"]:
        hint = os.path.join(ckpt.get("dataset") or "DATA_DIR", "tokenizer.bpe")
        raise ValueError(f"{path} is not the tokenizer {ckpt_path} was trained with (its sha256 "
                         f"differs from the one the checkpoint records); copy {hint} beside it, "
                         f"or retrain")
    return Tokenizer.load(path), path


def eval_bpb(cfg: BenchConfig, model: GPT, ckpt: dict, device: torch.device, amp) -> dict:
    """A prepared dataset: train.evaluate_bpb over its val split, with meta.json's tokens/bytes.
    A text file: exact, every byte of it, tokenized with the checkpoint's tokenizer."""
    from train import bits_per_byte, evaluate_bpb, file_sha256, load_meta
    if os.path.isdir(cfg.data) or cfg.data.endswith("meta.json"):
        data_dir = cfg.data if os.path.isdir(cfg.data) else os.path.dirname(cfg.data)
        meta = load_meta(data_dir)
        tok_path = checkpoint_tokenizer(cfg.ckpt, ckpt)[1]
        if meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] != file_sha256(tok_path):
            raise ValueError(f"{data_dir} was tokenized with a different tokenizer than {cfg.ckpt}; "
                             f"evaluate on the dataset the model was trained with, or pass a text file")
        windows = cfg.eval_windows or sys.maxsize  # fixed_windows takes min(count, windows in the split)
        r = evaluate_bpb(model, data_dir, "val", cfg.eval_batch, windows, device, amp)
        return {"bpb": r["bpb"], "loss": r["loss"], "tokens": r["tokens"], "source": f"{data_dir} val split",
                "exact": False}
    if not os.path.isfile(cfg.data):
        raise FileNotFoundError(f"--data={cfg.data!r} is neither a prepared dataset directory nor a text file")
    with open(cfg.data, encoding="utf-8", errors="replace") as f:
        text = f.read()
    tok = checkpoint_tokenizer(cfg.ckpt, ckpt)[0]
    body = tok.encode(text)
    # subtle: training documents start with <|endoftext|>, so it is the context of the first token
    nats, n = stream_nats(model, [tok.eot_id] + body, cfg.eval_batch, device, amp)
    n_bytes = len(text.encode("utf-8"))
    if n == 0 or n_bytes == 0:
        raise ValueError(f"{cfg.data} is empty; pass a file with some text")
    return {"bpb": bits_per_byte(nats / n, n, n_bytes), "loss": nats / n, "tokens": n, "bytes": n_bytes,
            "source": cfg.data, "exact": True}


# -----------------------------------------------------------------------------
# Quality: multiple choice (HellaSwag's JSONL format)


def read_mc(path: str) -> list[dict]:
    """[{"ctx", "endings", "label"}] from a JSONL file. Accepts this project's files and
    HellaSwag's own (ctx, or ctx_a + ctx_b; endings; label as int or string; other fields
    such as activity_label, ind, split_type, source_id are ignored)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data={path!r} does not exist; pass a JSONL file such as evals/mc_tiny.jsonl")
    items = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} line {line_no} is not UTF-8 text (at byte {e.start + 1}); save the file as "
                                 f"UTF-8") from None
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                ctx = d.get("ctx") or (d.get("ctx_a", "") + " " + d.get("ctx_b", "")).strip()
                endings = [str(e) for e in d["endings"]]
                label = int(d["label"])
            except (ValueError, KeyError, TypeError, AttributeError) as e:  # AttributeError: a line that is not an object
                raise ValueError(f"{path} line {line_no} is not a multiple-choice item ({e!r}); each line needs "
                                 f"ctx, endings and an integer label (HellaSwag's test split has no labels)") from None
            if not isinstance(ctx, str) or not ctx or len(endings) < 2 or not 0 <= label < len(endings) or not all(endings):
                raise ValueError(f"{path} line {line_no} needs a context, two or more non-empty endings and a "
                                 f"label between 0 and {len(endings) - 1}")
            items.append({"ctx": ctx, "endings": endings, "label": label})
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


@torch.no_grad()
def score_endings(model, examples: list, batch_size: int, device: torch.device, amp=None) -> list:
    """Log-likelihood of each ending given its context, for examples [(ctx_ids, [ending_ids, ...])].
    Returns [(summed, normalized)] per example, each a list over endings; normalized is the sum
    over the ending's token count (llm.c; lm-eval-harness divides by characters instead).
    Rows of all examples are batched together; causal attention lets a row be right-padded
    without changing the scores of its real tokens."""
    amp = amp or contextlib.nullcontext()
    T = model.config.block_size
    rows = []  # (tokens, number of ending tokens)
    for ctx_ids, endings in examples:
        for end in endings:
            if not end or len(end) > T:
                raise ValueError(f"an ending of {len(end)} tokens cannot be scored with block_size={T}")
            keep = T + 1 - len(end)  # too long: drop the oldest context tokens
            rows.append(((ctx_ids[-keep:] if keep > 0 else []) + end, len(end)))
    scores = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        L = max(len(r) for r, _ in chunk) - 1
        x = torch.zeros(len(chunk), L, dtype=torch.long)
        y = torch.full((len(chunk), L), -100, dtype=torch.long)
        for j, (r, n_end) in enumerate(chunk):
            x[j, :len(r) - 1] = torch.tensor(r[:-1])
            y[j, len(r) - 1 - n_end:len(r) - 1] = torch.tensor(r[-n_end:])  # only the ending is scored
        x, y = x.to(device), y.to(device)
        with amp:
            logits, _ = model(x, y)  # (R, L, V)
        logits = logits.float()
        # log p(target) = logit of the target - logsumexp of all logits, without a second (R, L, V) tensor
        lp = logits.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        lp = lp * (y != -100)  # (R, L): only the ending's tokens count
        for s, (_, n_end) in zip(lp.sum(1).tolist(), chunk):
            scores.append((s, s / n_end))
    out, k = [], 0
    for _, endings in examples:
        part = scores[k:k + len(endings)]
        out.append(([s for s, _ in part], [n for _, n in part]))
        k += len(endings)
    return out


def eval_mc(cfg: BenchConfig, model: GPT, ckpt: dict, device: torch.device, amp) -> dict:
    items = read_mc(cfg.data)
    if cfg.mc_limit:
        items = items[:cfg.mc_limit]
    tok = checkpoint_tokenizer(cfg.ckpt, ckpt)[0]
    # HellaSwag convention: the ending follows the context after a space
    examples = [([tok.eot_id] + tok.encode(it["ctx"]), [tok.encode(" " + e) for e in it["endings"]])
                for it in items]
    scores = score_endings(model, examples, cfg.eval_batch, device, amp)
    hit_sum = sum(max(range(len(s)), key=s.__getitem__) == it["label"] for (s, _), it in zip(scores, items))
    hit_norm = sum(max(range(len(n)), key=n.__getitem__) == it["label"] for (_, n), it in zip(scores, items))
    return {"items": len(items), "acc_sum": hit_sum / len(items), "acc_norm": hit_norm / len(items),
            "chance": sum(1 / len(it["endings"]) for it in items) / len(items), "source": cfg.data}


# -----------------------------------------------------------------------------
# Main


def run(cfg: BenchConfig) -> dict:
    """Run what cfg asks for and return the result dict (main prints it)."""
    from train import choose_device
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.eval not in ("", "bpb", "mc"):
        raise ValueError(f"--eval={cfg.eval} must be bpb or mc")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"--dtype={cfg.dtype} must be auto, float32 or bfloat16 (fp16 needs a GradScaler, "
                         f"which a speed benchmark leaves out)")
    if cfg.budget and cfg.mfu > 0:  # pure arithmetic: no device needed
        device, dtype, why = torch.device("cpu"), torch.float32, "the budget is arithmetic"
    else:
        device, dtype, why = choose_device(cfg)
        if device.type == "cuda" and cfg.dtype == "auto" and dtype != torch.bfloat16:
            dtype, why = torch.float32, why.split(";")[0] + "; fp32 (no bf16 on this GPU)"
    res = {"device": str(device), "device_reason": why, "dtype": str(dtype).replace("torch.", "")}
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()

    if cfg.eval:
        from train import load_checkpoint
        if not cfg.data:
            raise ValueError(f"--eval={cfg.eval} needs --data=...: a dataset dir or text file (bpb), a JSONL file (mc)")
        model, ckpt = load_checkpoint(cfg.ckpt, device)
        res.update(mode=cfg.eval, ckpt=cfg.ckpt)
        res.update((eval_bpb if cfg.eval == "bpb" else eval_mc)(cfg, model, ckpt, device, amp))
        return res

    gcfg = resolve_model_config(cfg, device)
    if not (cfg.budget and cfg.params):
        res["model_config"] = asdict(gcfg)
    if cfg.budget:
        if cfg.params:
            n, attn, label = cfg.params, 0.0, f"--params={cfg.params:g} (6ND only; a --preset adds attention)"
        else:
            n, attn = count_params_and_attention(gcfg)
            label = f"preset {cfg.preset or 'default'} at T = {gcfg.block_size}"
        mfu = cfg.mfu
        if mfu <= 0:  # measure it: the everyday recipe on this device
            if peak_flops(device) is None:
                raise ValueError(f"--mfu=0 asks to measure MFU, but {device} has no datasheet peak in "
                                 f"model.PEAK_BF16_FLOPS; pass an assumed value such as --mfu=0.4")
            mfu = speed_run(cfg, gcfg, speed_recipe(cfg, device, dtype, gcfg), device)["mfu"]
            label += f", MFU measured on {device}"
        gpus = [g.strip() for g in cfg.gpus.split(",") if g.strip()]
        res.update(mode="budget", label=label, **training_budget(n, cfg.tokens, attn, mfu, gpus, cfg.price))
        return res
    if cfg.ladder:
        res.update(mode="ladder", **run_ladder(cfg, device, gcfg))
        return res
    if cfg.infer:
        torch.manual_seed(cfg.seed)
        model = GPT(gcfg).to(device).eval()
        if cfg.compile and device.type == "cuda":
            # dynamic=True: start_pos and the growing no-cache length would otherwise recompile per step.
            # Untested here (no GPU when this was written).
            model = torch.compile(model, dynamic=True)
        context = cfg.context or gcfg.block_size - cfg.new_tokens
        res.update(mode="infer", **measure_inference(model, cfg.batch_size or 1, context, cfg.new_tokens,
                                                      device, amp, seed=cfg.seed))
        return res
    recipe = speed_recipe(cfg, device, dtype, gcfg)
    res.update(mode="train", recipe=asdict(recipe), **speed_run(cfg, gcfg, recipe, device))
    return res


def report(res: dict) -> str:
    device = torch.device(res["device"])
    head = f"device {res['device']} ({res['device_reason']}), dtype {res['dtype']}"
    mode = res["mode"]
    if mode == "budget":
        return format_budget(res, res["label"])
    if mode == "train":
        return head + "\n" + format_speed(res, device)
    if mode == "ladder":
        return head + "\n" + format_ladder(res)
    if mode == "infer":
        return head + "\n" + format_inference(res)
    if mode == "bpb":
        extra = "" if res["exact"] else f" (over {res['tokens']:,} tokens; tokens/bytes from meta.json)"
        return f"{res['ckpt']} on {res['source']}: {res['bpb']:.4f} bits per byte, loss {res['loss']:.4f}{extra}"
    return (f"{res['ckpt']} on {res['source']}: {res['items']} items, accuracy {100 * res['acc_sum']:.1f}% "
            f"(summed log-likelihood), {100 * res['acc_norm']:.1f}% (per-token normalized), "
            f"chance {100 * res['chance']:.1f}%")


def main(argv=None) -> None:
    from tokenizer import parse_config
    cfg = parse_config(BenchConfig, argv)
    try:
        if not cfg.json:
            print("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
        res = run(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(res) if cfg.json else report(res))


if __name__ == "__main__":
    main()
