"""
bench.py: how fast a model trains and generates, what a training run costs, and how good a
checkpoint is.

Run it:
    python bench.py                              # training speed of the device's default model
    python bench.py --preset=cpu-1m --steps=5 --threads=1   # a tiny CPU run (seconds)
    python bench.py --preset=gpt2 --batch_size=16   # GPT-2 124M on a GPU: tokens/s, MFU, memory
    python bench.py --ladder --preset=gpt2       # optimizations switched on one at a time
    python bench.py --infer                      # prefill and decode tokens/s, KV cache or not
    python bench.py --infer --preset=gpt2 --context=512 --compile   # the same on a GPU, compiled
    python bench.py --budget --preset=gpt2 --tokens=10e9 --gpus=H100,A100 --price=2.5
    python bench.py --budget --params=7e9        # Chinchilla-optimal tokens (20 per parameter)
    python bench.py --budget --memory_gpus=8 --batch_size=8   # + memory per GPU: DDP vs FSDP
    python bench.py --eval=bpb --ckpt=out/best.pt --data=data/pystdlib   # or --data=some.txt
    python bench.py --eval=mc --ckpt=out/best.pt --data=evals/mc_tiny.jsonl   # HellaSwag's too
    python bench.py --json ...                   # one machine-readable line instead of the report
    python bench.py -h                           # every option with its meaning

Speed is measured on synthetic tokens (data loading excluded): forward, backward and AdamW
step, warmup steps dropped, the median of the timed steps, CUDA synchronized around each.
On a CPU there is no datasheet peak, so the achieved FLOP/s is compared with an fp32 matmul
measured on the same machine, and the report says plainly that this is not MFU.

Sections follow a run: configuration; mode, device and dtype; timing; one section per mode,
each ending in its bench_* function; last, MODES, the table from a mode to that function.

Sources (facts and formulas): Kaplan et al. 2020 (training FLOPs ~ 6ND); Hoffmann et al.
2022 (Chinchilla, ~20 tokens per parameter); PaLM (Chowdhery et al. 2022) appendix B and
section 4 (attention FLOPs, MFU); nanoGPT's estimate_mfu and llm.c for how MFU is reported
in practice; Zellers et al. 2019 (HellaSwag) and llm.c's hellaswag.py for scoring endings
by their log-likelihood; Micikevicius et al. 2018 and NVIDIA's TF32 notes for the precision
rungs; Dao et al. 2022 (FlashAttention) for the SDPA rung.
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
from tokenizer import Tokenizer, file_sha256, parse_config
# a later stage imports the earlier stage's helpers (STYLE rule 6): one device rule, one
# checkpoint reader and one bits-per-byte formula for train.py, sample.py and this file
from train import bits_per_byte, choose_device, evaluate_bpb, load_checkpoint, load_meta

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class BenchConfig:
    # what to run (default: one training-speed measurement); when several are set, the first
    # of eval, budget, ladder, infer wins (choose_mode)
    ladder: bool = False  # the optimization ladder: the same model, one speed-up added per rung
    infer: bool = False  # prefill and decode tokens/s, with and without the KV cache
    budget: bool = False  # FLOPs, GPU-hours and cost of a training run; no model unless --mfu=0
    eval: str = ""  # "bpb": bits per byte of --ckpt on --data; "mc": accuracy on a JSONL --data
    json: bool = False  # print one JSON line instead of the human-readable report
    # model and batch. Speed runs pad the vocabulary to a multiple of 64 as train.py does; the
    # ladder pads it in a rung of its own, where its gain shows
    preset: str = ""  # a model.py PRESETS name; "" = gpt2 on CUDA, cpu-1m elsewhere
    vocab_size: int = 0  # 0 = the preset's (gpt2: 50257); speed runs pad it to a multiple of 64
    block_size: int = 0  # tokens per row; 0 = the preset's block_size
    batch_size: int = 0  # rows per micro-batch; 0 = 8 on CUDA, 4 elsewhere
    steps: int = 10  # timed steps; the median is reported
    warmup: int = 3  # untimed steps first (allocator, cuDNN/cuBLAS heuristics, torch.compile)
    device: str = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1", "mps"
    dtype: str = "auto"  # "auto" (bf16 autocast where supported, else fp32), "float32", "bfloat16"
    compile: bool = False  # torch.compile the model for speed and inference runs (CUDA recommended)
    seed: int = 1337  # seeds the weights and the synthetic tokens
    # why 1 is steadier: torch's OpenMP threads spin while they wait, competing with other jobs
    threads: int = 0  # CPU threads; 0 = torch's default, one per core; 1 is steadier when busy
    matmul_size: int = 1024  # CPU/MPS: n of the n x n fp32 matmul whose FLOP/s stands in for a peak
    # ladder
    ladder_cpu_compile: bool = False  # also torch.compile on a CPU (needs a C++ compiler; minutes)
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
    memory_gpus: int = 8  # GPUs of the memory-per-GPU table (ddp, fsdp, fsdp + checkpointing)
    # quality
    ckpt: str = "out/best.pt"  # a train.py checkpoint (its tokenizer.bpe sits next to it)
    data: str = ""  # bpb: a prepared dataset dir (meta.json) or a text file; mc: a JSONL file
    eval_windows: int = 0  # bpb on a dataset: block_size windows spread over val; 0 = all of them
    eval_batch: int = 16  # rows per forward pass in the evals
    mc_limit: int = 0  # mc: score only the first N items (0 = all)


def default_batch(device: torch.device) -> int:
    """Rows per micro-batch when --batch_size is 0 (the ladder's last rung multiplies it)."""
    return 8 if device.type == "cuda" else 4


def resolve_model_config(cfg: BenchConfig, device: torch.device) -> GPTConfig:
    """The benchmarked GPTConfig: the preset with --vocab_size/--block_size applied."""
    name = cfg.preset or ("gpt2" if device.type == "cuda" else "cpu-1m")
    if name not in PRESETS:
        raise ValueError(f"--preset={name} is not a model.py preset; "
                         f"choose one of {', '.join(PRESETS)}")
    preset_fields = dict(PRESETS[name])
    if cfg.vocab_size:
        preset_fields["vocab_size"] = cfg.vocab_size
    if cfg.block_size:
        preset_fields["block_size"] = cfg.block_size
    return GPTConfig(**preset_fields)


# -----------------------------------------------------------------------------
# Mode, device and dtype: decided once, before anything runs (STYLE rule 8)


def choose_mode(cfg: BenchConfig) -> str:
    """The one thing this run does: a key of MODES. Eval first, then budget, ladder, infer;
    no flag means one training-speed measurement."""
    if cfg.eval not in ("", "bpb", "mc"):
        raise ValueError(f"--eval={cfg.eval} must be bpb or mc")
    if cfg.eval:
        return cfg.eval
    return "budget" if cfg.budget else "ladder" if cfg.ladder else "infer" if cfg.infer else "train"


def choose_bench_device(cfg: BenchConfig) -> tuple[torch.device, torch.dtype, str]:
    """(device, dtype, reason) as train.choose_device decides them, with two differences a
    benchmark needs: a budget with an assumed MFU is arithmetic and touches no device, and a
    GPU without bf16 runs fp32, not train.py's fp16 (whose GradScaler a speed run leaves out)."""
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"--dtype={cfg.dtype} must be auto, float32 or bfloat16 (fp16 needs a "
                         f"GradScaler, which a speed benchmark leaves out)")
    # subtle: this reads --budget, not the chosen mode: with --eval and --budget together the
    # eval runs on the CPU
    if cfg.budget and cfg.mfu > 0:
        return torch.device("cpu"), torch.float32, "the budget is arithmetic"
    device, dtype, why = choose_device(cfg)
    if device.type == "cuda" and cfg.dtype == "auto" and dtype != torch.bfloat16:
        # keep choose_device's reason for the device (before the ";"), replace its dtype part
        dtype, why = torch.float32, why.split(";")[0] + "; fp32 (no bf16 on this GPU)"
    return device, dtype, why


# -----------------------------------------------------------------------------
# Timing, memory and a measured CPU peak


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures compute rather than kernel launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(device: torch.device, fn, *args, **kwargs) -> tuple[float, object]:
    """(seconds, fn(*args, **kwargs)), the device synchronized on both sides of the clock.

    subtle: without the first sync the clock would also count work queued before the call,
    and without the second it would stop when the kernels are launched, not when they finish."""
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return time.perf_counter() - t0, out


def reset_peak_memory(device: torch.device) -> None:
    """Start CUDA's peak counter afresh, so each rung reports its own peak, not the ladder's."""
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


# measured once per process: the ladder would otherwise re-time the same matmul on every rung
_MATMUL_PEAK = {}  # (device str, n, torch threads) -> FLOP/s


def measure_matmul_peak(device: torch.device, n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of the fastest of `reps` n x n fp32 matmuls (2 n^3 FLOPs each) on `device`:
    the practical ceiling that a CPU's training step can be compared with."""
    # the thread count is part of the key: a one-thread ceiling is not the all-core one
    key = (str(device), n, torch.get_num_threads())
    if key not in _MATMUL_PEAK:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=generator).to(device)
        b = torch.randn(n, n, generator=generator).to(device)
        a @ b  # warm the BLAS thread pool
        # the fastest try, not the median: a ceiling is the best the machine can do, and
        # every slower try was slowed by something else (another job, a frequency change)
        best = float("inf")
        for _ in range(reps):
            best = min(best, timed(device, torch.matmul, a, b)[0])
        # n^3 multiply-adds, each counted as 2 FLOPs, the convention of every datasheet peak
        _MATMUL_PEAK[key] = 2 * n ** 3 / best
    return _MATMUL_PEAK[key]


def cpu_bf16_native() -> bool:
    """Whether oneDNN has native bf16 on this CPU (AVX512-BF16 or AMX); without it autocast
    emulates bf16, which is no speed-up worth a rung, so the ladder skips it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


# -----------------------------------------------------------------------------
# Training speed


@dataclass
class Recipe:
    """What one speed run switches on; each rung of the ladder changes one field."""
    tf32: bool = False  # fp32 matmuls on TF32 tensor cores (CUDA Ampere and newer)
    amp: bool = False  # bf16 autocast for the forward pass (master weights stay fp32)
    sdpa: bool = True  # F.scaled_dot_product_attention (flash kernels), not the manual softmax
    compile: bool = False  # torch.compile the model
    fused: bool = False  # AdamW's fused single-kernel step instead of the default
    batch_size: int = 4  # rows per micro-batch
    vocab_size: int = 0  # embedding rows of the model


def train_step(runner, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               amp) -> torch.Tensor:
    """One optimizer step on one micro-batch: forward under autocast, backward, AdamW, and
    the gradients freed (set_to_none) as train.py frees them. Returns the loss."""
    with amp:
        _, loss = runner(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def measure_train_speed(model_config: GPTConfig, recipe: Recipe, device: torch.device,
                        steps: int = 10, warmup: int = 3, seed: int = 1337,
                        matmul_size: int = 1024) -> dict:
    """Time `steps` training steps (after `warmup` untimed ones) of a fresh GPT on fixed random
    tokens. Returns tokens/s, ms/step (median), MFU or the CPU FLOP/s ratio, and peak memory.

    subtle: not quite train.py's step. Left out are gradient clipping and Muon (train.py's CPU
    default for the hidden matrices), which cost train.py time, and train.keep_freed_memory
    (glibc keeps freed blocks instead of returning them to the kernel, saving page faults every
    step), which saves it time; on a CPU, tokens/s here read a little below train.py's log."""
    if steps < 1:
        raise ValueError(f"--steps={steps} must be at least 1")
    # dropout off: every rung then does the same arithmetic, and its masks are not the subject
    model_config = dataclasses.replace(
        model_config, vocab_size=recipe.vocab_size or model_config.vocab_size, dropout=0.0)
    B, T, V = recipe.batch_size, model_config.block_size, model_config.vocab_size
    torch.manual_seed(seed)  # the same initial weights on every rung: only the recipe differs
    precision = torch.get_float32_matmul_precision()
    # "high" lets cuBLAS use TF32 for fp32 matmuls: a 10-bit mantissa, ~8x the fp32 rate on A100
    torch.set_float32_matmul_precision("high" if recipe.tf32 else "highest")
    reset_peak_memory(device)
    model = optimizer = None
    try:
        model = GPT(model_config).to(device)
        model.manual_attention = not recipe.sdpa
        model.train()
        # GPT-3's AdamW betas and weight decay (Brown et al. 2020, appendix B), decay on the
        # matrices only as train.py does; the lr only has to keep the loss finite
        optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, betas=(0.9, 0.95),
                                      fused=recipe.fused)
        runner = torch.compile(model) if recipe.compile else model
        amp = (torch.autocast(device.type, dtype=torch.bfloat16) if recipe.amp
               else contextlib.nullcontext())
        # one fixed batch, reused every step: data loading is not what is being measured
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, V, (B, T + 1), generator=generator).to(device)
        x, y = tokens[:, :-1], tokens[:, 1:]  # (B, T) each

        times = []
        for i in range(warmup + steps):
            seconds, loss = timed(device, train_step, runner, optimizer, x, y, amp)
            if i >= warmup:  # warmup pays for allocation, autotuning and compilation
                times.append(seconds)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"the benchmark's loss became {loss.item()}; try --dtype=float32")
        # median: robust to a stray slow step (GC, other jobs); subtle: with an even count this
        # is the upper of the two middle values, not their mean
        step_seconds = sorted(times)[len(times) // 2]
        return speed_result(model, B, T, V, step_seconds, device, matmul_size)
    finally:
        torch.set_float32_matmul_precision(precision)  # leave the process as it was found
        del model, optimizer
        if device.type == "cuda":  # hand the memory back before the next rung allocates its own
            gc.collect()
            torch.cuda.empty_cache()


def speed_result(model: GPT, B: int, T: int, V: int, step_seconds: float, device: torch.device,
                 matmul_size: int) -> dict:
    """The numbers of one speed run, from its median step time.

    Training FLOPs per token are model.flops_per_token(): 6N + 12 * n_layer * C * T (PaLM
    appendix B). MFU is those FLOPs times tokens/s over the datasheet peak dense bf16 FLOP/s
    (PaLM section 4.1), as nanoGPT's estimate_mfu and llm.c report it."""
    tokens_per_sec = B * T / step_seconds
    mem, mem_kind = peak_memory(device)
    flops_per_token = model.flops_per_token()
    out = dict(params=model.num_params(), vocab_size=V, batch_size=B, block_size=T,
               tokens_per_sec=tokens_per_sec, ms_per_step=step_seconds * 1e3,
               flops_per_token=flops_per_token, achieved_flops=flops_per_token * tokens_per_sec,
               mfu=model.estimate_mfu(tokens_per_sec, device),
               peak_mem_bytes=mem, peak_mem_kind=mem_kind)
    if out["mfu"] is None:  # no datasheet peak: compare with a matmul measured here instead
        peak = measure_matmul_peak(device, matmul_size)
        out.update(measured_matmul_flops=peak,
                   flops_ratio_vs_matmul=flops_per_token * tokens_per_sec / peak)
    return out


def speed_recipe(cfg: BenchConfig, device: torch.device, dtype: torch.dtype,
                 model_config: GPTConfig) -> Recipe:
    """The everyday configuration, as train.py runs: every speed-up that applies to this device,
    and the vocabulary padded to a multiple of 64 (nanoGPT pads GPT-2's 50257 to 50304 so the
    embedding and lm_head matmuls split into whole tensor-core tiles)."""
    return Recipe(tf32=device.type == "cuda", amp=dtype == torch.bfloat16, sdpa=True,
                  compile=cfg.compile, fused=device.type in ("cuda", "cpu"),
                  batch_size=cfg.batch_size or default_batch(device),
                  vocab_size=64 * math.ceil(model_config.vocab_size / 64))


def speed_run(cfg: BenchConfig, model_config: GPTConfig, recipe: Recipe,
              device: torch.device) -> dict:
    """measure_train_speed with the step counts, seed and matmul size of the command line."""
    return measure_train_speed(model_config, recipe, device, cfg.steps, cfg.warmup, cfg.seed,
                               cfg.matmul_size)


def format_speed(r: dict, device: torch.device) -> str:
    lines = [f"{r['params'] / 1e6:.2f}M non-embedding params, B={r['batch_size']} "
             f"T={r['block_size']} V={r['vocab_size']} on {device}",
             f"{r['tokens_per_sec']:,.0f} tokens/s, {r['ms_per_step']:.1f} ms/step (median), "
             f"peak memory {r['peak_mem_bytes'] / 2**20:,.0f} MiB ({r['peak_mem_kind']})"]
    if r["mfu"] is not None:
        lines.append(f"MFU {100 * r['mfu']:.1f}% ({r['achieved_flops'] / 1e12:.1f} TFLOP/s of "
                     f"{peak_flops(device) / 1e12:.0f} peak dense bf16)")
    else:
        # the report must not let a CPU ratio pass for MFU: say what the ceiling is, in words
        lines.append(f"achieved {r['achieved_flops'] / 1e9:.2f} GFLOP/s = "
                     f"{100 * r['flops_ratio_vs_matmul']:.0f}% of a "
                     f"{r['measured_matmul_flops'] / 1e9:.1f} GFLOP/s fp32 matmul measured on "
                     f"this machine. This is NOT MFU: there is no datasheet peak for "
                     f"{device.type}, and a measured matmul is a practical ceiling, not a "
                     f"theoretical one.")
    return "\n".join(lines)


def bench_train_speed(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, amp) -> dict:
    """Mode "train" (the default): one speed run of the everyday recipe."""
    model_config = resolve_model_config(cfg, device)
    recipe = speed_recipe(cfg, device, dtype, model_config)
    return {"model_config": asdict(model_config), "mode": "train", "recipe": asdict(recipe),
            **speed_run(cfg, model_config, recipe, device)}


# -----------------------------------------------------------------------------
# The ladder: one optimization per rung


def ladder_rungs(device: torch.device, cfg: BenchConfig, model_config: GPTConfig) -> list:
    """[(name, the Recipe fields the rung changes, why it is skipped or "")], in ladder order.

    The speed-ups of Karpathy's GPT-2 reproduction (build-nanogpt), precision first and shapes
    last. Each is measured on top of all the rungs before it, so a gain is what that rung adds
    to the ones above it, not what it would give alone."""
    cuda, base_batch = device.type == "cuda", cfg.batch_size or default_batch(device)
    if cuda:
        # subtle: is_bf16_supported() also counts emulation (True on V100 and T4; see
        # train.choose_device), so on those GPUs this rung times emulated bf16
        bf16_skip = "" if torch.cuda.is_bf16_supported() else "this GPU has no bf16"
    elif device.type == "cpu":
        bf16_skip = "" if cpu_bf16_native() else ("this CPU has no native bf16 (AVX512-BF16/AMX); "
                                                  "autocast would emulate it")
    else:
        bf16_skip = "bf16 autocast is not benchmarked on " + device.type
    padded = 64 * math.ceil(model_config.vocab_size / 64)  # as speed_recipe pads it
    compile_skip = ""
    if not cuda and not (device.type == "cpu" and cfg.ladder_cpu_compile):
        compile_skip = ("off on CPU by default (compile time dwarfs a short run); "
                        "--ladder_cpu_compile tries it")
    fused_skip = "" if device.type in ("cuda", "cpu") else "no fused AdamW on " + device.type
    pad_skip = ("" if padded != model_config.vocab_size
                else f"vocab_size {model_config.vocab_size} is already a multiple of 64")
    batch_mult = cfg.ladder_batch_mult
    return [
        ("fp32", {}, ""),
        # TF32 (NVIDIA's Ampere notes): fp32 matmuls with a 10-bit mantissa, on tensor cores
        ("TF32 matmuls", {"tf32": True},
         "" if cuda else "TF32 is an NVIDIA tensor-core format (Ampere+)"),
        # mixed precision (Micikevicius et al. 2018): bf16 compute, fp32 master weights
        ("bf16 autocast", {"amp": True}, bf16_skip),
        # FlashAttention (Dao et al. 2022): never materializes the (T, T) attention matrix
        ("SDPA flash attention", {"sdpa": True}, ""),
        # fuses elementwise ops into fewer kernels: fewer trips through memory
        ("torch.compile", {"compile": True}, compile_skip),
        # one kernel over all parameters instead of a Python loop of small ops per tensor
        ("fused AdamW", {"fused": True}, fused_skip),
        (f"vocab padded to {padded}", {"vocab_size": padded}, pad_skip),
        # more rows per step amortize the per-step fixed costs (launches, optimizer, Python)
        (f"micro-batch x{batch_mult}", {"batch_size": base_batch * batch_mult},
         "" if batch_mult > 1 else "--ladder_batch_mult=1"),
    ]


def run_ladder(cfg: BenchConfig, device: torch.device, model_config: GPTConfig) -> dict:
    """Each applicable rung keeps the previous ones (cumulative) and reports its gain."""
    # the bottom rung is everything off: manual attention, default AdamW, unpadded vocabulary
    recipe = Recipe(sdpa=False, batch_size=cfg.batch_size or default_batch(device),
                    vocab_size=model_config.vocab_size)
    rows, skipped, previous = [], [], None
    for name, change, skip in ladder_rungs(device, cfg, model_config):
        if skip:
            skipped.append({"step": name, "reason": skip})
            continue
        recipe = dataclasses.replace(recipe, **change)
        try:
            r = speed_run(cfg, model_config, recipe, device)
        # the bigger micro-batch may not fit: report it, keep the table
        # (torch < 2.5 has only torch.cuda's class)
        except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError):
            rows.append({"step": name, "oom": True, "recipe": asdict(recipe)})
            continue
        # subtle: "vs fp32" divides by rows[0], so this assumes the fp32 rung fit in memory;
        # an OOM there leaves rows[0] without tokens_per_sec
        first = rows[0]["tokens_per_sec"] if rows else r["tokens_per_sec"]
        r.update(step=name, recipe=asdict(recipe),
                 gain=r["tokens_per_sec"] / previous if previous else 1.0,
                 cumulative=r["tokens_per_sec"] / first)
        rows.append(r)
        previous = r["tokens_per_sec"]
    return {"rows": rows, "skipped": skipped}


def format_ladder(res: dict) -> str:
    lines = [f"{'step':<24} {'tokens/s':>11} {'ms/step':>9} {'gain':>7} {'vs fp32':>8} "
             f"{'MFU or ratio*':>13}"]
    for r in res["rows"]:
        if r.get("oom"):
            lines.append(f"{r['step']:<24} {'out of memory':>11}")
            continue
        utilization = r["mfu"] if r["mfu"] is not None else r["flops_ratio_vs_matmul"]
        lines.append(f"{r['step']:<24} {r['tokens_per_sec']:>11,.0f} {r['ms_per_step']:>9.1f} "
                     f"{r['gain']:>6.2f}x {r['cumulative']:>7.2f}x {100 * utilization:>12.1f}%")
    for s in res["skipped"]:
        lines.append(f"skipped {s['step']}: {s['reason']}")
    if any(not r.get("oom") and r["mfu"] is None for r in res["rows"]):
        lines.append("* no datasheet peak here: the last column is achieved FLOP/s over a matmul "
                     "measured on this machine, not MFU")
    return "\n".join(lines)


def bench_ladder(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, amp) -> dict:
    """Mode "ladder": run_ladder on the preset; each rung brings its own precision."""
    model_config = resolve_model_config(cfg, device)
    return {"model_config": asdict(model_config), "mode": "ladder",
            **run_ladder(cfg, device, model_config)}


# -----------------------------------------------------------------------------
# Inference speed: prefill and decode, with and without the KV cache
# (named after gpt-fast's generate.py: prefill, then decode_n_tokens)


def time_prefill(model: GPT, prompt: torch.Tensor, use_cache: bool, reps: int,
                 device: torch.device, amp) -> float:
    """Median seconds of one forward over the whole (B, context) prompt, after one warmup;
    each try gets a fresh cache, allocated outside the clock, as a new prompt would."""
    batch_size, context = prompt.shape
    times = []
    for _ in range(reps + 1):  # the first is warmup
        cache = model.new_kv_cache(batch_size, context) if use_cache else None
        with amp:
            times.append(timed(device, model, prompt, kv_cache=cache, start_pos=0)[0])
    return sorted(times[1:])[reps // 2]


def decode_n_tokens(model: GPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool,
                    device: torch.device, amp) -> tuple[float, torch.Tensor]:
    """(seconds, tokens) of `new_tokens` greedy steps after an untimed prefill. With the cache
    each step feeds one token at start_pos; without it each step re-reads the whole sequence,
    the quadratic cost the cache removes. Greedy, so both paths should pick the same tokens."""
    batch_size, context = prompt.shape
    cache = model.new_kv_cache(batch_size, context + new_tokens) if use_cache else None
    with amp:
        logits, _ = model(prompt, kv_cache=cache, start_pos=0)  # fills the cache; not timed
    idx, total = prompt, 0.0
    for i in range(new_tokens):
        next_token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1) greedy
        idx = torch.cat([idx, next_token], dim=1)  # (B, context + i + 1)
        with amp:
            if use_cache:
                seconds, (logits, _) = timed(device, model, next_token, kv_cache=cache,
                                             start_pos=context + i)
            else:
                seconds, (logits, _) = timed(device, model, idx)
        total += seconds
    return total, idx


@torch.no_grad()
def measure_inference(model: GPT, batch_size: int, context: int, new_tokens: int,
                      device: torch.device, amp=None, reps: int = 3, seed: int = 1337) -> dict:
    """Prefill: one forward over a (B, context) prompt (median of reps). Decode: new_tokens
    greedy steps after it, with and without the KV cache (decode_n_tokens)."""
    T = model.config.block_size
    if context < 1 or context + new_tokens > T:
        raise ValueError(f"context={context} + new_tokens={new_tokens} must fit in block_size={T}; "
                         f"lower --context or --new_tokens")
    amp = amp or contextlib.nullcontext()
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch_size, context),
                           generator=generator).to(device)  # (B, context)
    out = {"batch_size": batch_size, "context": context, "new_tokens": new_tokens}
    generated = []
    for use_cache in (True, False):
        tag = "cache" if use_cache else "no_cache"
        prefill_seconds = time_prefill(model, prompt, use_cache, reps, device, amp)
        out[f"prefill_tokens_per_sec_{tag}"] = batch_size * context / prefill_seconds
        seconds, idx = decode_n_tokens(model, prompt, new_tokens, use_cache, device, amp)
        out[f"decode_tokens_per_sec_{tag}"] = batch_size * new_tokens / seconds
        generated.append(idx)
    # both paths did the same work only if they chose the same tokens (bf16 may flip near-ties)
    out["same_tokens"] = bool(torch.equal(generated[0], generated[1]))
    return out


def format_inference(r: dict) -> str:
    lines = [f"B={r['batch_size']}, prompt {r['context']} tokens, then {r['new_tokens']} decoded",
             f"{'':<10} {'prefill tok/s':>14} {'decode tok/s':>13}"]
    for name, tag in (("KV cache", "cache"), ("no cache", "no_cache")):
        lines.append(f"{name:<10} {r['prefill_tokens_per_sec_' + tag]:>14,.0f} "
                     f"{r['decode_tokens_per_sec_' + tag]:>13,.1f}")
    agree = "agree" if r["same_tokens"] else "DIFFER"
    lines.append("greedy tokens with and without the cache " + agree)
    return "\n".join(lines)


def bench_infer(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, amp) -> dict:
    """Mode "infer": a freshly initialized model of the preset; random weights decode as fast
    as trained ones, so no checkpoint is needed."""
    model_config = resolve_model_config(cfg, device)
    torch.manual_seed(cfg.seed)
    model = GPT(model_config).to(device).eval()
    if cfg.compile and device.type == "cuda":
        # dynamic=True: start_pos and the growing no-cache length would otherwise recompile
        # per step. Untested here (no GPU when this was written).
        model = torch.compile(model, dynamic=True)
    context = cfg.context or model_config.block_size - cfg.new_tokens
    return {"model_config": asdict(model_config), "mode": "infer",
            **measure_inference(model, cfg.batch_size or 1, context, cfg.new_tokens, device,
                                amp, seed=cfg.seed)}


# -----------------------------------------------------------------------------
# Compute budget


def count_params_and_attention(model_config: GPTConfig) -> tuple[int, int]:
    """(N non-embedding parameters, attention FLOPs per token) of a config, from a model built
    on the meta device: no memory is allocated, so gpt2-xl costs nothing to count."""
    with torch.device("meta"):
        model = GPT(model_config)
    n = model.num_params(non_embedding=True)
    # flops_per_token() is 6N + attention (PaLM appendix B): take the 6N back out
    return n, model.flops_per_token() - 6 * n


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
        raise ValueError(f"the budget needs N > 0 (got {n_params:g}) and 0 < MFU <= 1 "
                         f"(got {mfu:g})")
    tokens = tokens or 20 * n_params  # Chinchilla: ~20 training tokens per parameter
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
            "attn_flops_per_token": attn_flops_per_token, "flops": flops, "mfu": mfu,
            "price": price, "gpus": rows}


def format_budget(b: dict, label: str) -> str:
    if b["attn_flops_per_token"]:
        formula = (f"FLOPs = (6N + {b['attn_flops_per_token'] / 1e6:,.1f}M attention/token) x D "
                   f"= {b['flops']:.3e}")
    else:
        formula = f"FLOPs = 6ND = {b['flops']:.3e}"
    lines = [f"{label}: N = {b['params'] / 1e6:,.1f}M parameters, "
             f"D = {b['tokens'] / 1e9:,.2f}B tokens ({b['tokens_per_param']:.1f} per parameter)",
             formula,
             f"at {100 * b['mfu']:.0f}% MFU and ${b['price']:.2f} per GPU-hour:",
             f"{'GPU':<12} {'peak TFLOP/s':>12} {'GPU-hours':>11} {'cost $':>10}"]
    for r in b["gpus"]:
        lines.append(f"{r['gpu']:<12} {r['peak_flops'] / 1e12:>12,.0f} "
                     f"{r['gpu_hours']:>11,.1f} {r['cost']:>10,.0f}")
    if b.get("memory"):
        lines += ["", format_memory(b["memory"], b["memory_gpus"], b["memory_batch"])]
    return "\n".join(lines)


# Memory per GPU: what one training step holds at its peak (the end of the forward pass, when
# every activation is saved and the backward has not freed any), for train.py's GPU recipe:
# bf16 mixed precision and AdamW, G GPUs, one micro-batch of b rows of s tokens, dropout on.
# The models: GPT-2 small and medium (model.py's presets), and GPT-3's 1.3B and 6.7B shapes
# (Brown et al. 2020, table 2.1, n_head chosen for 128-wide heads) in the same architecture,
# so Korthikanti's formula below, derived for exactly this block, applies to every row.
MEMORY_MODELS = {"124M": PRESETS["gpt2"], "350M": PRESETS["gpt2-medium"],
                 "1.3B": dict(PRESETS["gpt2"], n_layer=24, n_head=16, n_embd=2048),
                 "7B": dict(PRESETS["gpt2"], n_layer=32, n_head=32, n_embd=4096)}
MEMORY_MODES = ("ddp", "fsdp", "fsdp+ac")  # ac: activation checkpointing (--grad_checkpoint)


def activation_bytes(s: int, b: int, h: int, a: int, value_bytes: int = 2,
                     mask_bytes: int = 1) -> int:
    """Bytes one transformer block keeps for its backward, no recomputation (Korthikanti et al.
    2022, "Reducing Activation Recomputation in Large Transformer Models", section 4.1): with
    16-bit values and 1-byte dropout masks, s*b*h*(34 + 5*a*s/h). Counted as values: attention
    keeps its input, Q, K, V, the softmax output and the dropout output (a*s*s*b each), the
    output projection's input (5sbh + 2as^2b); the MLP its input and the 4h-wide GELU input and
    output (9sbh); the two LayerNorms their inputs (2sbh): 16sbh + 2as^2b values. Dropout
    masks: after attention's softmax (as^2b), after each residual branch (2sbh).
    value_bytes / mask_bytes generalize it: a CPU run in fp32 keeps 4-byte values and 4-byte
    masks (CPU dropout stores its mask in the input's dtype; CUDA's is bool), 72sbh + 12as^2b,
    which a test checks against the tensors autograd saves. With FlashAttention (SDPA on GPUs,
    dropout 0 or not) the (s, s) terms are never stored, so the table is an upper bound there.
    Example: s=1024, b=8, h=768, a=12 -> 6,291,456 * 114 = 717,225,984 bytes (0.67 GiB) a layer."""
    values = 16 * s * b * h + 2 * a * s * s * b
    masks = 2 * s * b * h + a * s * s * b
    return value_bytes * values + mask_bytes * masks


def memory_per_gpu(model_config: GPTConfig, mode: str, gpus: int, b: int) -> dict:
    """GiB per GPU of weights, gradients, optimizer state and activations, and their total.
    N parameters (tied embeddings once), P_block of them in one block, P_root in the rest
    (embeddings, ln_f, an untied head). DDP (autocast): fp32 weights 4N, their bf16 copies
    that autocast casts for the matmuls and keeps for the backward 2N; fp32 gradients 4N plus
    DDP's bucket copy of them 4N (gradient_as_bucket_view=False, torch's default); AdamW's m and
    v 8N; the fp32 weights are the master copy. FSDP2 (bf16 MixedPrecisionPolicy): each of the
    G ranks keeps 4N/G fp32 master weights, 4N/G fp32 gradients, 8N/G of m and v; gathered in
    bf16 are the root unit (kept through the forward and backward) and two blocks (the one
    computing and the one prefetched), 2*(P_root + 2*P_block); the unsharded bf16 gradients of
    the root and of one block wait for their reduce-scatter, 2*(P_root + P_block).
    Activations: n_layer * activation_bytes(s, b, h, a), plus the fp32 log-probabilities the
    loss keeps, 4*s*b*V. With checkpointing (fsdp+ac) each block keeps only its bf16 input,
    2sbh, and one block at a time holds its full activation_bytes while it is recomputed."""
    with torch.device("meta"):
        model = GPT(model_config)  # shapes only: counting gpt-3-sized models costs nothing
    n = model.num_params(non_embedding=False)
    p_block = sum(p.numel() for p in model.transformer.h[0].parameters())
    p_root = n - model_config.n_layer * p_block
    c = model_config
    s, h, L = c.block_size, c.n_embd, c.n_layer
    per_layer = activation_bytes(s, b, h, c.n_head)
    logits = 4 * s * b * c.vocab_size
    if mode == "ddp":
        weights, grads, optimizer = 6 * n, 8 * n, 8 * n
        activations = L * per_layer + logits
    elif mode in ("fsdp", "fsdp+ac"):
        weights = 4 * n / gpus + 2 * (p_root + 2 * p_block)
        grads = 4 * n / gpus + 2 * (p_root + p_block)
        optimizer = 8 * n / gpus
        if mode == "fsdp":
            activations = L * per_layer + logits
        else:
            activations = L * 2 * s * b * h + per_layer + logits
    else:
        raise ValueError(f"memory mode {mode!r} is not one of {', '.join(MEMORY_MODES)}")
    gib = 2**30
    out = {"params": weights / gib, "grads": grads / gib, "optimizer": optimizer / gib,
           "activations": activations / gib}
    return {**out, "total": sum(out.values()), "n_params": n}


def memory_table(gpus: int = 8, batch_size: int = 8, block_size: int = 0) -> list[dict]:
    """memory_per_gpu for every MEMORY_MODELS row and MEMORY_MODES column, micro-batches of
    batch_size rows of block_size tokens (0 = each model's own, 1024)."""
    rows = []
    for label, kw in MEMORY_MODELS.items():
        config = GPTConfig(**{**kw, **({"block_size": block_size} if block_size else {})})
        for mode in MEMORY_MODES:
            rows.append({"model": label, "mode": mode, "block_size": config.block_size,
                         **memory_per_gpu(config, mode, gpus, batch_size)})
    return rows


def format_memory(rows: list, gpus: int, batch_size: int) -> str:
    s = rows[0]["block_size"]
    lines = [f"memory per GPU, GiB: {gpus} GPUs, bf16 mixed precision, AdamW, micro-batch "
             f"{batch_size} x {s} tokens, dropout on (activations: Korthikanti et al. 2022, "
             f"s*b*h*(34 + 5*a*s/h) bytes a layer, plus 4*s*b*V for the loss)",
             f"{'model':<6} {'mode':<8} {'params':>8} {'grads':>8} {'AdamW':>8} "
             f"{'activ.':>8} {'total':>8}"]
    for r in rows:
        lines.append(f"{r['model']:<6} {r['mode']:<8} {r['params']:>8.2f} {r['grads']:>8.2f} "
                     f"{r['optimizer']:>8.2f} {r['activations']:>8.2f} {r['total']:>8.2f}")
    return "\n".join(lines)


def bench_budget(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, amp) -> dict:
    """Mode "budget": --params alone counts 6ND; a preset also counts its attention."""
    model_config = resolve_model_config(cfg, device)  # also rejects a misspelled --preset
    # with --params there is no model behind the numbers, so no config is recorded
    result = {} if cfg.params else {"model_config": asdict(model_config)}
    if cfg.params:
        n, attention = cfg.params, 0.0
        label = f"--params={cfg.params:g} (6ND only; a --preset adds attention)"
    else:
        n, attention = count_params_and_attention(model_config)
        label = f"preset {cfg.preset or 'default'} at T = {model_config.block_size}"
    mfu = cfg.mfu
    if mfu <= 0:  # measure it: the everyday recipe on this device
        if peak_flops(device) is None:
            raise ValueError(f"--mfu=0 asks to measure MFU, but {device} has no datasheet peak in "
                             f"model.PEAK_BF16_FLOPS; pass an assumed value such as --mfu=0.4")
        mfu = speed_run(cfg, model_config, speed_recipe(cfg, device, dtype, model_config),
                        device)["mfu"]
        label += f", MFU measured on {device}"
    gpus = [g.strip() for g in cfg.gpus.split(",") if g.strip()]
    result.update(mode="budget", label=label,
                  **training_budget(n, cfg.tokens, attention, mfu, gpus, cfg.price))
    if cfg.memory_gpus < 1:
        raise ValueError(f"--memory_gpus={cfg.memory_gpus} must be at least 1")
    batch = cfg.batch_size or 8  # the GPU default micro-batch of bench and train.py's gpt2 runs
    result.update(memory=memory_table(cfg.memory_gpus, batch, cfg.block_size),
                  memory_gpus=cfg.memory_gpus, memory_batch=batch)
    return result


# -----------------------------------------------------------------------------
# Quality: bits per byte (and the checkpoint and tokenizer both evals load)
#
# Bits per byte = loss / ln 2 * tokens / bytes: unlike loss per token it does not depend on
# the tokenizer, so models with different vocabularies can be compared on the same text.


def load_eval_checkpoint(cfg: BenchConfig, device: torch.device) -> tuple[GPT, dict]:
    """(model, checkpoint dict) of --ckpt, through train.load_checkpoint (weights_only=True:
    a checkpoint holding pickled code is refused). --data is checked first, so a forgotten
    option fails before a gigabyte loads."""
    if not cfg.data:
        raise ValueError(f"--eval={cfg.eval} needs --data=...: a dataset dir or text file (bpb), "
                         f"a JSONL file (mc)")
    return load_checkpoint(cfg.ckpt, device)


def checkpoint_tokenizer(ckpt_path: str, ckpt: dict) -> tuple[Tokenizer, str]:
    """(Tokenizer, its path): the tokenizer file train.py saved beside the checkpoint."""
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)),
                        ckpt.get("tokenizer", "tokenizer.bpe"))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} (the tokenizer of {ckpt_path}) is missing; copy it from "
                                f"the dataset directory the model was trained on")
    # the same check as sample.py: another tokenizer of the same size would load without complaint
    if ckpt.get("tokenizer_sha256") and file_sha256(path) != ckpt["tokenizer_sha256"]:
        hint = os.path.join(ckpt.get("dataset") or "DATA_DIR", "tokenizer.bpe")
        raise ValueError(f"{path} is not the tokenizer {ckpt_path} was trained with (its sha256 "
                         f"differs from the one the checkpoint records); copy {hint} beside it, "
                         f"or retrain")
    return Tokenizer.load(path), path


@torch.no_grad()
def stream_nats(model: GPT, ids: list, batch_size: int, device: torch.device,
                amp=None) -> tuple[float, int]:
    """(total nats, predicted tokens) over a token stream cut into non-overlapping windows of
    block_size; every token but the first is predicted exactly once. The last, shorter window
    is padded with targets -100, which the loss ignores."""
    T = model.config.block_size
    amp = amp or contextlib.nullcontext()
    rows = []  # (inputs, targets), each T long
    for start in range(0, len(ids) - 1, T):
        window = ids[start:start + T + 1]
        pad = T + 1 - len(window)
        rows.append((window[:-1] + [0] * pad, window[1:] + [-100] * pad))
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x = torch.tensor([r[0] for r in rows[i:i + batch_size]], device=device)  # (B, T)
        y = torch.tensor([r[1] for r in rows[i:i + batch_size]], device=device)  # (B, T)
        with amp:
            _, loss = model(x, y)  # mean over the targets that are not -100
        n = int((y != -100).sum())
        # back from the mean to the sum: the last window has fewer real targets than the rest
        total += loss.double().item() * n
        count += n
    return total, count


def eval_bpb(cfg: BenchConfig, model: GPT, ckpt: dict, device: torch.device, amp) -> dict:
    """A prepared dataset: train.evaluate_bpb over its val split, with meta.json's tokens/bytes.
    A text file: exact, every byte of it, tokenized with the checkpoint's tokenizer."""
    if os.path.isdir(cfg.data) or cfg.data.endswith("meta.json"):
        data_dir = cfg.data if os.path.isdir(cfg.data) else os.path.dirname(cfg.data)
        meta = load_meta(data_dir)
        tok_path = checkpoint_tokenizer(cfg.ckpt, ckpt)[1]
        # the shards hold token ids: under another tokenizer the same ids mean other text
        if meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] != file_sha256(tok_path):
            raise ValueError(f"{data_dir} was tokenized with a different tokenizer than "
                             f"{cfg.ckpt}; evaluate on the dataset the model was trained with, "
                             f"or pass a text file")
        # "all of them": fixed_windows takes min(count, windows in the split)
        windows = cfg.eval_windows or sys.maxsize
        r = evaluate_bpb(model, data_dir, "val", cfg.eval_batch, windows, device, amp)
        # not exact: meta.json's tokens/bytes ratio stands in for that of the scored windows
        return {"bpb": r["bpb"], "loss": r["loss"], "tokens": r["tokens"],
                "source": f"{data_dir} val split", "exact": False}
    if not os.path.isfile(cfg.data):
        raise FileNotFoundError(f"--data={cfg.data!r} is neither a prepared dataset directory "
                                f"nor a text file")
    with open(cfg.data, encoding="utf-8", errors="replace") as f:
        text = f.read()
    tok = checkpoint_tokenizer(cfg.ckpt, ckpt)[0]
    body = tok.encode(text)
    # subtle: training documents start with <|endoftext|>, so it is the context of the first token
    nats, n = stream_nats(model, [tok.eot_id] + body, cfg.eval_batch, device, amp)
    # subtle: the bytes of the text as decoded (errors="replace"), not of the file on disk
    n_bytes = len(text.encode("utf-8"))
    if n == 0 or n_bytes == 0:
        raise ValueError(f"{cfg.data} is empty; pass a file with some text")
    return {"bpb": bits_per_byte(nats / n, n, n_bytes), "loss": nats / n, "tokens": n,
            "bytes": n_bytes, "source": cfg.data, "exact": True}


def bench_eval_bpb(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, amp) -> dict:
    """Mode "bpb": eval_bpb on the checkpoint."""
    model, ckpt = load_eval_checkpoint(cfg, device)
    return {"mode": "bpb", "ckpt": cfg.ckpt, **eval_bpb(cfg, model, ckpt, device, amp)}


# -----------------------------------------------------------------------------
# Quality: multiple choice (HellaSwag's JSONL format)
#
# HellaSwag (Zellers et al. 2019) asks which of four endings follows a context. A base model
# answers by likelihood: the ending whose tokens it finds most probable after the context wins,
# both by the summed log-likelihood and by the per-token (length-normalized) mean, the
# acc / acc_norm pair llm.c's hellaswag.py reports.


def read_mc(path: str) -> list[dict]:
    """[{"ctx", "endings", "label"}] from a JSONL file. Accepts this project's files and
    HellaSwag's own (ctx, or ctx_a + ctx_b; endings; label as int or string; other fields
    such as activity_label, ind, split_type, source_id are ignored)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data={path!r} does not exist; pass a JSONL file such as "
                                f"evals/mc_tiny.jsonl")
    items = []
    # bytes, decoded line by line: a bad byte is then reported with its line number
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} line {line_no} is not UTF-8 text (at byte "
                                 f"{e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                # HellaSwag splits its context in two: ctx_a, then the sentence's start in ctx_b
                ctx = d.get("ctx") or (d.get("ctx_a", "") + " " + d.get("ctx_b", "")).strip()
                endings = [str(e) for e in d["endings"]]
                label = int(d["label"])  # HellaSwag writes it as a string, "3"
            # AttributeError: a line that is not an object
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path} line {line_no} is not a multiple-choice item ({e!r}); "
                                 f"each line needs ctx, endings and an integer label "
                                 f"(HellaSwag's test split has no labels)") from None
            if (not isinstance(ctx, str) or not ctx or len(endings) < 2
                    or not 0 <= label < len(endings) or not all(endings)):
                raise ValueError(f"{path} line {line_no} needs a context, two or more non-empty "
                                 f"endings and a label between 0 and {len(endings) - 1}")
            items.append({"ctx": ctx, "endings": endings, "label": label})
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


def score_rows(model, rows: list, device: torch.device, amp) -> list:
    """[(summed, normalized) log-likelihood of the ending] for a batch of (tokens, ending
    length) rows, right-padded to the longest."""
    # L: the longest row of this batch minus one (inputs are a row without its last token)
    L = max(len(r) for r, _ in rows) - 1
    x = torch.zeros(len(rows), L, dtype=torch.long)  # (B, L)
    y = torch.full((len(rows), L), -100, dtype=torch.long)  # (B, L)
    for j, (r, n_end) in enumerate(rows):
        x[j, :len(r) - 1] = torch.tensor(r[:-1])
        y[j, len(r) - 1 - n_end:len(r) - 1] = torch.tensor(r[-n_end:])  # only the ending is scored
    x, y = x.to(device), y.to(device)
    with amp:
        logits, _ = model(x, y)  # (B, L, V)
    logits = logits.float()  # logsumexp in fp32: bf16 would round the scores being compared
    # log p(target) = logit of the target - logsumexp of all logits, without a second (B, L, V)
    # tensor. subtle: -100 is no index, so clamp it to 0 and mask those positions after
    log_probs = (logits.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                 - torch.logsumexp(logits, dim=-1))  # (B, L)
    log_probs = log_probs * (y != -100)  # (B, L): only the ending's tokens count
    return [(s, s / n_end) for s, (_, n_end) in zip(log_probs.sum(1).tolist(), rows)]


@torch.no_grad()
def score_endings(model, examples: list, batch_size: int, device: torch.device, amp=None) -> list:
    """Log-likelihood of each ending given its context, for examples [(ctx_ids, [ending_ids, ...])].
    Returns [(summed, normalized)] per example, each a list over endings; normalized is the sum
    over the ending's token count (llm.c; lm-eval-harness divides by characters instead).
    Rows of all examples are batched together; causal attention lets a row be right-padded
    without changing the scores of its real tokens."""
    amp = amp or contextlib.nullcontext()
    T = model.config.block_size
    rows = []  # (tokens, number of ending tokens); every ending is checked before any work
    for ctx_ids, endings in examples:
        for end in endings:
            if not end or len(end) > T:
                raise ValueError(f"an ending of {len(end)} tokens cannot be scored with "
                                 f"block_size={T}")
            keep = T + 1 - len(end)  # too long: drop the oldest context tokens
            rows.append(((ctx_ids[-keep:] if keep > 0 else []) + end, len(end)))
    scores = []  # (summed, normalized) per row, in row order
    for i in range(0, len(rows), batch_size):
        scores += score_rows(model, rows[i:i + batch_size], device, amp)
    out, k = [], 0
    for _, endings in examples:  # regroup the flat rows by example
        part = scores[k:k + len(endings)]
        out.append(([s for s, _ in part], [n for _, n in part]))
        k += len(endings)
    return out


def eval_mc(cfg: BenchConfig, model: GPT, ckpt: dict, device: torch.device, amp) -> dict:
    """Accuracy of `model` on the items of --data, by summed and by per-token log-likelihood,
    with the chance level of those items (1 / number of endings, averaged)."""
    items = read_mc(cfg.data)
    if cfg.mc_limit:
        items = items[:cfg.mc_limit]
    tok = checkpoint_tokenizer(cfg.ckpt, ckpt)[0]
    # HellaSwag convention: the ending follows the context after a space; <|endoftext|> first,
    # as every training document starts
    examples = [([tok.eot_id] + tok.encode(it["ctx"]), [tok.encode(" " + e) for e in it["endings"]])
                for it in items]
    scores = score_endings(model, examples, cfg.eval_batch, device, amp)
    # the argmax of each item's scores; max() breaks a tie in favour of the first ending
    hit_sum = sum(max(range(len(s)), key=s.__getitem__) == it["label"]
                  for (s, _), it in zip(scores, items))
    hit_norm = sum(max(range(len(n)), key=n.__getitem__) == it["label"]
                   for (_, n), it in zip(scores, items))
    return {"items": len(items), "acc_sum": hit_sum / len(items), "acc_norm": hit_norm / len(items),
            "chance": sum(1 / len(it["endings"]) for it in items) / len(items), "source": cfg.data}


def bench_eval_mc(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, amp) -> dict:
    """Mode "mc": eval_mc on the checkpoint."""
    model, ckpt = load_eval_checkpoint(cfg, device)
    return {"mode": "mc", "ckpt": cfg.ckpt, **eval_mc(cfg, model, ckpt, device, amp)}


# -----------------------------------------------------------------------------
# Main: one table from mode to function, the shared setup, the report


# every mode takes (cfg, device, dtype, amp) and returns its part of the result dict
MODES = {"train": bench_train_speed, "ladder": bench_ladder, "infer": bench_infer,
         "budget": bench_budget, "bpb": bench_eval_bpb, "mc": bench_eval_mc}


def run(cfg: BenchConfig) -> dict:
    """Run what cfg asks for and return the result dict (main prints it)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    mode = choose_mode(cfg)
    device, dtype, why = choose_bench_device(cfg)
    result = {"device": str(device), "device_reason": why,
              "dtype": str(dtype).replace("torch.", "")}
    # the evals and inference run under this; the speed runs build their own from each Recipe
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16
           else contextlib.nullcontext())
    result.update(MODES[mode](cfg, device, dtype, amp))
    return result


def report(res: dict) -> str:
    """The human-readable report of a result dict (what --json prints instead)."""
    mode = res["mode"]
    if mode == "budget":  # arithmetic: the device line would only distract
        return format_budget(res, res["label"])
    if mode == "bpb":
        extra = ("" if res["exact"]
                 else f" (over {res['tokens']:,} tokens; tokens/bytes from meta.json)")
        return (f"{res['ckpt']} on {res['source']}: {res['bpb']:.4f} bits per byte, "
                f"loss {res['loss']:.4f}{extra}")
    if mode == "mc":
        return (f"{res['ckpt']} on {res['source']}: {res['items']} items, "
                f"accuracy {100 * res['acc_sum']:.1f}% (summed log-likelihood), "
                f"{100 * res['acc_norm']:.1f}% (per-token normalized), "
                f"chance {100 * res['chance']:.1f}%")
    head = f"device {res['device']} ({res['device_reason']}), dtype {res['dtype']}"
    if mode == "train":
        return head + "\n" + format_speed(res, torch.device(res["device"]))
    return head + "\n" + (format_ladder(res) if mode == "ladder" else format_inference(res))


def main(argv=None) -> None:
    cfg = parse_config(BenchConfig, argv)
    try:
        if not cfg.json:  # --json promises exactly one line on stdout
            print("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
        res = run(cfg)
    # a user's mistake or a failed run: one sentence and exit code 1 (STYLE rule 10)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(res) if cfg.json else report(res))


if __name__ == "__main__":
    main()
