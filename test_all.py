"""
test_all.py: the whole test suite, one section per stage in the order of the guide.

    python -m pytest test_all.py -q            # everything (under 8 minutes on 2 CPU cores)
    python -m pytest test_all.py -q -k model   # one stage

No test touches the network. References: tiktoken for the tokenizer, the slow paths for the fast
ones, Hugging Face transformers for the model, a second batch split / process count / fresh run
for training. GPU-only checks are skipped on machines without CUDA.
"""

import base64
import dataclasses
import os
import random
import subprocess
import sys
import json
import math
from dataclasses import asdict
import pytest
import tiktoken
import tiktoken.load
import torch
import torch.nn.functional as F

import tokenizer
from tokenizer import SPECIAL_TOKENS, Tokenizer, parse_config
import model
from model import GPT, PRESETS, GPTConfig, KVCache, peak_flops, sample_logits


# -----------------------------------------------------------------------------
# tokenizer.py: byte-level BPE

ROOT = os.path.dirname(os.path.abspath(__file__))
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")

# A corpus with a bit of everything the encoders must agree on.
TOKENIZER_SAMPLES = [
    "def forward(self, idx, targets=None):\n    B, T = idx.size()\n    return self.lm_head(x)\n",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n",
    "tabs\t\tand   spaces    \n\n\n   trailing   \r\n\r\nwindows\rold-mac",
    "digits 0 12 345 6789 3.14159 1e-10 2024-11-20 1,000,000",
    "emoji 😀👍🏽👨‍👩‍👧 flags 🇫🇷 and ✓ ✗ ★",
    "中文分词很难。日本語のテキスト。한국어 텍스트.",
    "mixed: Ελληνικά, русский, עברית, العربية, हिन्दी, ไทย",
    "contractions: I'm, you're, they've, we'll, it's, DON'T, He'D",
    "<|endoftext|> literal special text <|pad|><|user|>",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def shakespeare_tok():
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    return Tokenizer.train(text[:300_000], vocab_size=1024), text


def test_tokenizer_classic_aaabdaaabac():
    # Wikipedia's BPE example: aa -> Z, then ab -> Y, then ZY -> X, so the text becomes X d X a c.
    tok = Tokenizer.train("aaabdaaabac", vocab_size=256 + 3 + len(SPECIAL_TOKENS))
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]
    assert tok.vocab[256] == b"aa" and tok.vocab[257] == b"ab" and tok.vocab[258] == b"aaab"
    assert tok.n_vocab == 265 and tok.eot_id == 259 and tok.special_tokens["<|end|>"] == 264


def test_tokenizer_tie_break_is_smallest_pair():
    # "ab" and "cd" both occur twice: the smaller pair (a, b) is merged first.
    tok = Tokenizer.train(["cd ab", "ab cd"], vocab_size=256 + 1 + len(SPECIAL_TOKENS), pattern="gpt2")
    assert tok.vocab[256] == b"ab"


def test_tokenizer_fast_and_slow_agree_on_samples(shakespeare_tok):
    tok, text = shakespeare_tok
    for s in TOKENIZER_SAMPLES + [text[300_000:310_000]]:
        assert tok.encode(s) == tok.encode_slow(s), s
        assert tok.decode(tok.encode(s)) == s


def _tokenizer_random_text(rng: random.Random, n: int) -> str:
    """Random unicode from every plane and category (but lone surrogates, which UTF-8 cannot hold),
    with ASCII, spaces and newlines over-represented so the regex split gets exercised."""
    pools = [(0x20, 0x7E), (0x09, 0x0D), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_tokenizer_fast_slow_and_round_trip_on_random_unicode():
    # property test: 400 random strings, seeded so a failure reproduces
    tok = _tokenizer_small()
    rng = random.Random(1234)
    for _ in range(400):
        s = _tokenizer_random_text(rng, rng.randint(0, 60))
        ids = tok.encode(s)
        assert ids == tok.encode_slow(s), repr(s)
        assert tok.decode(ids) == s
        assert all(0 <= i < tok.n_vocab and i not in tok.special_tokens.values() for i in ids)


_TOKENIZER_CACHE = {}


def _tokenizer_small():
    if "small" not in _TOKENIZER_CACHE:
        with open(SHAKESPEARE, encoding="utf-8") as f:
            _TOKENIZER_CACHE["small"] = Tokenizer.train(f.read()[:100_000] + "".join(TOKENIZER_SAMPLES), 600)
    return _TOKENIZER_CACHE["small"]


def test_tokenizer_gpt2_pattern_matches_tiktoken_reference():
    # Our byte-level encoder and a tiktoken.Encoding built independently from the same ranks agree.
    tok = Tokenizer.train("".join(TOKENIZER_SAMPLES) * 3, vocab_size=400, pattern="gpt2")
    ref = tiktoken.Encoding("ref", pat_str=tokenizer.GPT2_PATTERN, mergeable_ranks=tok.ranks, special_tokens={})
    for s in TOKENIZER_SAMPLES:
        assert tok.encode_slow(s) == ref.encode_ordinary(s)


def test_tokenizer_lone_surrogates_become_replacement():
    tok = _tokenizer_small()
    s = "a\ud800b"
    assert tok.encode(s) == tok.encode_slow(s) == tok.encode("a\ufffdb")


def test_tokenizer_training_is_deterministic_and_order_independent():
    with open(SHAKESPEARE, encoding="utf-8") as f:
        docs = f.read()[:120_000].split("\n\n")
    a = Tokenizer.train(docs, 700)
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    b = Tokenizer.train(shuffled, 700)
    assert a.ranks == b.ranks


def test_tokenizer_ascii_fast_split_equals_unicode_regex():
    # The re-based ASCII patterns used in training must cut every ASCII text exactly like the
    # regex-module originals (which tiktoken also uses), control characters and all.
    import re
    import regex
    rng = random.Random(7)
    alphabet = "aZs'tmdlvrEDLLVE09 \t\n\r\x0b\x0c\x1c\x1d\x85_!.:(){}#@" + "".join(map(chr, range(128)))
    for pattern in (tokenizer.GPT2_PATTERN, tokenizer.GPT4_PATTERN):
        fast, ref = re.compile(tokenizer.ASCII_PATTERNS[pattern]), regex.compile(pattern)
        for _ in range(3000):
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
            if s.isascii():
                assert fast.findall(s) == ref.findall(s), repr(s)


def test_tokenizer_parallel_count_equals_serial():
    docs = [f"doc {i} " + "word " * (i % 50) + "\n" * (i % 3) for i in range(3000)] * 6  # ~2.7 MB: 3 batches
    serial, n1 = tokenizer.count_chunks(docs, tokenizer.GPT4_PATTERN, num_proc=1)
    parallel, n2 = tokenizer.count_chunks(docs, tokenizer.GPT4_PATTERN, num_proc=2)
    assert serial == parallel and n1 == n2 == sum(map(len, docs))


def test_tokenizer_merges_with_incremental_counts_equal_naive_recount():
    # The incremental pair bookkeeping against the obvious algorithm: recount every pair, every merge.
    corpus = ["aaaa bbbb abab aabb", "abababab aaaaaaa", "the cat sat on the mat", "ab ab ab aaa"]
    counts, _ = tokenizer.count_chunks(corpus, tokenizer.GPT2_PATTERN)
    fast = tokenizer.learn_merges(counts, 30)
    words = {chunk: list(chunk) for chunk in counts}
    naive = []
    for new_id in range(256, 256 + 30):
        stats = {}
        for chunk, word in words.items():
            for pair in zip(word, word[1:]):
                stats[pair] = stats.get(pair, 0) + counts[chunk]
        if not stats:
            break
        best = min(stats, key=lambda p: (-stats[p], p))
        naive.append(best)
        for chunk, word in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[chunk] = out
    # the naive loop may merge a pair whose bytes already exist (ours skips those); none here
    assert fast == naive[:len(fast)] and len(fast) == len(naive)


def test_tokenizer_specials_cannot_be_injected():
    tok = Tokenizer.train(["hello <|endoftext|> world <|user|>"] * 50, vocab_size=300)
    for s in SPECIAL_TOKENS:
        ids = tok.encode(f"x {s} y")
        assert not set(ids) & set(tok.special_tokens.values())
        assert tok.decode(ids) == f"x {s} y"
    # and training never learned a token that spells a control token
    assert not any(b"<|" in t and b"|>" in t for t in tok.ranks)
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"


def test_tokenizer_save_load_identity(tmp_path, shakespeare_tok):
    tok, text = shakespeare_tok
    path = tmp_path / "tok.bpe"
    tok.save(str(path))
    back = Tokenizer.load(str(path))
    assert back.ranks == tok.ranks and back.pattern == tok.pattern and back.special_tokens == tok.special_tokens
    assert back.encode(text[:5000]) == tok.encode(text[:5000])
    assert path.read_text(encoding="utf-8").startswith(tokenizer.FILE_HEADER + "\n")
    assert not list(tmp_path.glob("*.tmp*"))


def test_tokenizer_load_rejects_foreign_and_damaged_files(tmp_path):
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("just some text\n")
    with pytest.raises(ValueError, match="not a tokenizer.py file"):
        Tokenizer.load(str(foreign))
    tok = _tokenizer_small()
    good = tmp_path / "good.bpe"
    tok.save(str(good))
    lines = good.read_text().split("\n")
    damaged = tmp_path / "damaged.bpe"
    damaged.write_text("\n".join(lines[:-40]))  # truncated
    with pytest.raises(ValueError, match="damaged"):
        Tokenizer.load(str(damaged))
    damaged.write_text("\n".join(lines).replace(lines[20], "@@not base64@@ 3"))
    with pytest.raises(ValueError, match="damaged"):
        Tokenizer.load(str(damaged))
    binary = tmp_path / "binary.bpe"
    binary.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(ValueError, match="not a tokenizer"):
        Tokenizer.load(str(binary))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.load(str(tmp_path / "missing.bpe"))


def test_tokenizer_from_ranks_file(tmp_path):
    # A tiny .tiktoken file: the 256 bytes plus three merges, in tiktoken's "base64 rank" lines.
    tokens = [bytes([i]) for i in range(256)] + [b"he", b"ll", b"hell"]
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    tok = Tokenizer.from_ranks_file(str(path), pattern="gpt2", special_tokens={"<|endoftext|>": 259})
    assert tok.encode("hello") == [258, ord("o")]
    assert tok.encode(" hello") == tok.encode_slow(" hello") == [ord(" "), 258, ord("o")]
    assert tok.eot_id == 259 and tok.special_tokens["<|pad|>"] == 260 and tok.n_vocab == 265
    ref = tiktoken.Encoding("ref", pat_str=tokenizer.GPT2_PATTERN, mergeable_ranks=dict(zip(tokens, range(259))),
                            special_tokens={"<|endoftext|>": 259})
    assert tok.encode("hello hell he") == ref.encode_ordinary("hello hell he")


def test_tokenizer_from_ranks_file_rejects_garbage(tmp_path):
    path = tmp_path / "bad.tiktoken"
    path.write_text("this is not a rank file\n")
    with pytest.raises(ValueError, match="not a tiktoken rank file"):
        Tokenizer.from_ranks_file(str(path))


GPT2_RANKS = os.environ.get("GPT2_TIKTOKEN", "")


@pytest.mark.skipif(not os.path.exists(GPT2_RANKS),
                    reason="needs OpenAI's gpt2.tiktoken: set GPT2_TIKTOKEN=/path/to/gpt2.tiktoken (no download here)")
def test_tokenizer_openai_gpt2_ranks_hello_world():
    tok = Tokenizer.from_ranks_file(GPT2_RANKS, pattern="gpt2", special_tokens={"<|endoftext|>": 50256})
    assert tok.encode("Hello world") == [15496, 995]


def test_tokenizer_from_tiktoken_offline_is_one_clear_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache and (in CI) no network

    def no_network(*a, **k):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    with pytest.raises(RuntimeError, match="could not load 'gpt2'.*TIKTOKEN_CACHE_DIR"):
        Tokenizer.from_tiktoken("gpt2")
    with pytest.raises(ValueError, match="unknown tiktoken vocabulary"):
        Tokenizer.from_tiktoken("gpt5")


def test_tokenizer_decode_replaces_invalid_utf8():
    tok = _tokenizer_small()
    euro = tok.encode("€")  # 3 bytes; take the first alone
    assert tok.decode_bytes([0xE2]) == b"\xe2"
    assert tok.decode([0xE2]) == "\ufffd"
    assert tok.decode(euro) == "€"
    with pytest.raises(ValueError, match="not in this vocabulary"):
        tok.decode([tok.n_vocab + 5])


def test_tokenizer_encode_batch_equals_encode():
    tok = _tokenizer_small()
    assert tok.encode_batch(TOKENIZER_SAMPLES) == [tok.encode(s) for s in TOKENIZER_SAMPLES]


def test_tokenizer_chat_template_and_mask():
    tok = _tokenizer_small()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    ids, mask = tok.encode_chat(msgs)
    sp = tok.special_tokens
    expect = ([sp["<|system|>"]] + tok.encode("Be brief.") + [sp["<|end|>"]] + [sp["<|user|>"]] + tok.encode("hi")
              + [sp["<|end|>"]] + [sp["<|assistant|>"]] + tok.encode("hello") + [sp["<|end|>"]])
    assert ids == expect
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == tok.encode("hello") + [sp["<|end|>"]]
    ids2, mask2 = tok.encode_chat(msgs[:2], add_generation_prompt=True)
    assert ids2[-1] == sp["<|assistant|>"] and not any(mask2)
    with pytest.raises(ValueError, match="role"):
        tok.encode_chat([{"role": "robot", "content": "x"}])


def test_tokenizer_bad_vocab_and_empty_corpus():
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train("hello", vocab_size=100)
    with pytest.raises(ValueError, match="empty corpus"):
        Tokenizer.train([], vocab_size=300)
    with pytest.raises(ValueError, match="empty corpus"):
        Tokenizer.train(["", ""], vocab_size=300)
    with pytest.raises(ValueError, match="valid regex"):
        Tokenizer.train("x", vocab_size=300, pattern="([unclosed")


def test_tokenizer_read_texts_skips_binary_and_counts_invalid_utf8(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"good text\r\nline two\n")
    (tmp_path / "b.py").write_bytes(b"x = '\xff\xfe'\n")
    (tmp_path / "c.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "d.bin").write_bytes(b"ignored suffix")
    stats = {"files": 0, "binary_skipped": 0, "invalid_utf8_files": 0}
    docs = list(tokenizer.read_texts(str(tmp_path), stats))
    assert docs == ["good text\r\nline two\n", "x = '\ufffd\ufffd'\n"]
    assert stats == {"files": 2, "binary_skipped": 1, "invalid_utf8_files": 1}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no text files"):
        list(tokenizer.read_texts(str(empty)))


@dataclasses.dataclass
class _TokenizerDemoConfig:
    learning_rate: float = 1e-3  # step size
    max_iters: int = 100  # steps
    compile: bool = False  # torch.compile
    name: str = "x"  # a name
    limit: int | None = None  # optional cap


def test_tokenizer_parse_config_types_and_errors(capsys):
    cfg = parse_config(_TokenizerDemoConfig, ["--learning_rate=3e-4", "--max_iters=1e3", "--compile", "--limit=none"])
    assert cfg == _TokenizerDemoConfig(3e-4, 1000, True, "x", None)
    assert parse_config(_TokenizerDemoConfig, ["--compile=false", "--limit=7"]).limit == 7
    for bad, message in [(["--learning_rte=1"], "did you mean --learning_rate"), (["--max_iters=abc"], "an integer"),
                         (["--compile=maybe"], "boolean"), (["--max_iters"], "needs a value"), (["stray"], "unexpected")]:
        with pytest.raises(SystemExit) as e:
            parse_config(_TokenizerDemoConfig, bad)
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        parse_config(_TokenizerDemoConfig, ["-h"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--learning_rate=0.001" in out and "step size" in out and "optional cap" in out


def test_tokenizer_cli_train_encode_stats(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with open(SHAKESPEARE, encoding="utf-8") as f:
        (corpus / "a.txt").write_text("hello world\n" + f.read()[:20_000])
    out = tmp_path / "t.bpe"
    run = lambda *args: subprocess.run([sys.executable, os.path.join(ROOT, "tokenizer.py"), *args],
                                       capture_output=True, text=True, cwd=tmp_path)
    r = run("train", f"--input={corpus}", "--vocab_size=300", f"--out={out}")
    assert r.returncode == 0, r.stderr
    assert Tokenizer.load(str(out)).n_vocab == 300
    r = run("encode", f"--tokenizer={out}", "hello", "world")
    expect = Tokenizer.load(str(out)).encode("hello world")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == f"{len(expect)} tokens"
    assert [int(line.split()[0]) for line in r.stdout.splitlines()[:-1]] == expect
    r = run("stats", f"--tokenizer={out}", f"--input={corpus}")
    assert r.returncode == 0 and "bytes per token" in r.stdout
    r = run("train", f"--input={tmp_path / 'nope'}", "--vocab_size=300")
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run("train", f"--input={corpus}", "--vocab_size=10")
    assert r.returncode == 1 and "too small" in r.stderr and "Traceback" not in r.stderr


# -----------------------------------------------------------------------------
# model.py: the GPT

"""Tests for model.py: each compares against an independent reference (Hugging Face
transformers, torch.nn.MultiheadAttention, the manual attention path, a full forward
pass, single-row generation, hand-counted formulas)."""





def _model_cfg(style: str = "llama", **overrides) -> GPTConfig:
    kw = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32)
    if style == "llama":
        kw.update(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False, n_kv_head=2)
    kw.update(overrides)
    return GPTConfig(**kw)


def _model_build(style: str = "llama", seed: int = 0, **overrides) -> GPT:
    """A tiny model in eval mode whose every parameter (norms and biases too) is random and
    large enough that logits are peaked, so greedy choices are far from ties."""
    torch.manual_seed(seed)
    m = GPT(_model_cfg(style, **overrides)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def _model_perturb_hf(hf_model):
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return hf_model.eval()


_MODEL_STYLES = ["gpt2", "llama"]


@pytest.fixture
def _model_one_thread():
    """Tiny models run ~40x faster on one thread when the 2 cores are shared (OpenMP
    workers spin-wait for each other); restored afterwards for the rest of the suite."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_model_1t = pytest.mark.usefixtures("_model_one_thread")

# ----------------------------------------------------------------------------------------
# Configuration, sizes, init


@_model_1t
def test_model_gpt2_preset_has_124439808_params():
    with torch.device("meta"):
        m = GPT(GPTConfig(**PRESETS["gpt2"]))
    assert m.num_params(non_embedding=False) == 124_439_808  # tied head, wpe counted
    assert m.num_params(non_embedding=True) == 124_439_808 - 1024 * 768 == 123_653_376
    assert m.lm_head.weight is m.transformer.wte.weight


@_model_1t
def test_model_config_round_trips_and_rejects_invalid():
    for name, kw in PRESETS.items():
        cfg = GPTConfig(**kw)
        assert GPTConfig(**asdict(cfg)) == cfg, name
    assert GPTConfig(n_head=8, n_kv_head=0, n_embd=64).n_kv_head == 8  # 0 means plain multi-head
    bad = [dict(n_embd=30, n_head=4), dict(n_head=4, n_kv_head=3, n_embd=32), dict(norm="batchnorm"),
           dict(mlp="relu"), dict(pos="alibi"), dict(pos="rope", n_embd=12, n_head=4),
           dict(dropout=1.0), dict(n_layer=0), dict(norm_eps=0.0)]
    for kw in bad:
        with pytest.raises(ValueError) as e:
            GPTConfig(**kw)
        assert "\n" not in str(e.value) and str(e.value).startswith("invalid GPTConfig")
    # the hidden-size rule's docstring example: C=768 -> gelu 3072, swiglu 2048
    assert model.mlp_hidden_size(GPTConfig(n_embd=768, mlp="gelu")) == 3072
    assert model.mlp_hidden_size(GPTConfig(n_embd=768, mlp="swiglu")) == 2048


@_model_1t
def test_model_init_statistics():
    torch.manual_seed(0)
    L, C = 4, 256
    for style in _MODEL_STYLES:
        m = GPT(_model_cfg(style, n_layer=L, n_embd=C, n_head=4, vocab_size=1024, block_size=256))
        resid_std = 0.02 / math.sqrt(2 * L)  # GPT-2's scaled init of residual projections
        for name, p in m.named_parameters():
            if name.endswith("c_proj.weight"):
                assert abs(p.std().item() - resid_std) < 0.05 * resid_std, name
            elif p.dim() == 2:  # wte, wpe, c_attn, c_fc, c_gate, lm_head
                assert abs(p.std().item() - 0.02) < 0.05 * 0.02, name
                assert abs(p.mean().item()) < 1e-3, name
            elif name.endswith("bias"):
                assert torch.all(p == 0), name
            else:  # LayerNorm / RMSNorm gains
                assert torch.all(p == 1), name


# ----------------------------------------------------------------------------------------
# Attention: causality, manual vs SDPA, GQA


@_model_1t
@pytest.mark.parametrize("style", _MODEL_STYLES)
def test_model_causality(style):
    m = _model_build(style)
    idx = torch.randint(0, 61, (2, 20))
    idx2 = idx.clone()
    idx2[:, 9] = (idx2[:, 9] + 1) % 61
    a, _ = m(idx, idx)
    b, _ = m(idx2, idx2)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)  # the past never sees the future
    assert not torch.allclose(a[:, 9], b[:, 9], atol=1e-3)


@_model_1t
@pytest.mark.parametrize("style", _MODEL_STYLES)
def test_model_manual_attention_matches_sdpa(style):
    m = _model_build(style)
    idx = torch.randint(0, 61, (3, 24))
    results = []
    for manual in (False, True):
        m.manual_attention = manual
        m.zero_grad()
        logits, loss = m(idx, idx)
        loss.backward()
        pad = torch.tensor([0, 3, 7])  # left-padded rows use an explicit mask
        padded, _ = m(idx, left_pad=pad)
        cache = m.new_kv_cache(3, 24)
        m(idx[:, :10], kv_cache=cache)
        chunk, _ = m(idx[:, 10:16], kv_cache=cache, start_pos=10)  # non-square causal chunk
        grads = [p.grad.clone() for p in m.parameters()]
        results.append((logits, padded, chunk, grads))
    m.manual_attention = False
    (l0, p0, c0, g0), (l1, p1, c1, g1) = results
    torch.testing.assert_close(l0, l1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p0, p1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c0, c1, atol=1e-5, rtol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@_model_1t
def test_model_gqa_equals_multihead_with_repeated_kv_heads():
    gqa = _model_build("llama", n_head=4, n_kv_head=2)
    mha = GPT(_model_cfg("llama", n_head=4, n_kv_head=4)).eval()
    hs, nh, nkv = 8, 4, 2
    sd = {}
    for k, v in gqa.state_dict().items():
        if k.endswith("attn.c_attn.weight"):
            q, kk, vv = v.split([nh * hs, nkv * hs, nkv * hs])
            # query head j reads kv head j // (nh / nkv): repeat each kv head's rows
            rep = lambda t: t.view(nkv, hs, -1).repeat_interleave(nh // nkv, dim=0).reshape(nh * hs, -1)
            v = torch.cat([q, rep(kk), rep(vv)])
        sd[k] = v
    mha.load_state_dict(sd)
    idx = torch.randint(0, 61, (2, 16))
    torch.testing.assert_close(gqa(idx, idx)[0], mha(idx, idx)[0], atol=1e-5, rtol=1e-5)
    for manual in (False, True):
        gqa.manual_attention = manual
        torch.testing.assert_close(gqa(idx, idx)[0], mha(idx, idx)[0], atol=1e-5, rtol=1e-5)


@_model_1t
def test_model_attention_equals_torch_multihead_attention():
    torch.manual_seed(0)
    cfg = _model_cfg("gpt2", n_head=4, n_embd=32)  # n_kv_head == n_head: plain multi-head
    attn = model.CausalSelfAttention(cfg).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.2)
    ref = torch.nn.MultiheadAttention(32, 4, bias=True, batch_first=True).eval()
    ref.load_state_dict({"in_proj_weight": attn.c_attn.weight, "in_proj_bias": attn.c_attn.bias,
                         "out_proj.weight": attn.c_proj.weight, "out_proj.bias": attn.c_proj.bias})
    x = torch.randn(2, 12, 32)
    future = torch.ones(12, 12, dtype=torch.bool).triu(1)  # True = may not attend
    want, _ = ref(x, x, x, attn_mask=future, need_weights=False)
    torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# KV cache and generation


@_model_1t
@pytest.mark.parametrize("style", _MODEL_STYLES)
def test_model_kv_cache_logits_match_full_forward_at_every_step(style):
    m = _model_build(style)
    idx = torch.randint(0, 61, (2, 20))
    full, _ = m(idx, idx)  # (B, T, V): every position at once, no cache
    cache = m.new_kv_cache(2, 20)
    nkv = m.config.n_kv_head  # (n_layer, B, nkv, max_len, hs)
    assert isinstance(cache, KVCache) and cache.k.shape == cache.v.shape == (2, 2, nkv, 20, 8)
    out, _ = m(idx[:, :6], kv_cache=cache)  # prefill
    torch.testing.assert_close(out[:, 0], full[:, 5], atol=1e-5, rtol=1e-5)
    out, _ = m(idx[:, 6:10], kv_cache=cache, start_pos=6)  # a chunk after the prefill
    torch.testing.assert_close(out[:, 0], full[:, 9], atol=1e-5, rtol=1e-5)
    for t in range(10, 20):  # one token at a time
        out, _ = m(idx[:, t:t + 1], kv_cache=cache, start_pos=t)
        torch.testing.assert_close(out[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        cache.update(0, 20, torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8))
    with pytest.raises(ValueError):
        m(torch.zeros(1, 33, dtype=torch.long))  # longer than block_size


@_model_1t
@pytest.mark.parametrize("style", _MODEL_STYLES)
def test_model_greedy_generate_same_with_and_without_cache(style):
    m = _model_build(style)
    idx = torch.randint(0, 61, (3, 5))
    a = m.generate(idx, 20, temperature=0, use_cache=True)
    b = m.generate(idx, 20, temperature=0, use_cache=False)
    assert a.shape == (3, 25) and torch.equal(a, b)
    # past block_size (32) generate slides a window; reference: a naive argmax loop
    long = m.generate(idx, 40, temperature=0)
    ref = idx
    for _ in range(40):
        logits, _ = m(ref[:, -32:])
        ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(long, ref)


@_model_1t
@pytest.mark.parametrize("style", _MODEL_STYLES)
def test_model_left_padded_batch_matches_rows_alone(style):
    m = _model_build(style)
    lens = [3, 7, 5]
    prompts = [torch.randint(1, 61, (n,)) for n in lens]
    batch = torch.zeros(3, 7, dtype=torch.long)  # pad id 0, on the left
    for i, p in enumerate(prompts):
        batch[i, 7 - len(p):] = p
    for use_cache in (True, False):
        out = m.generate(batch, 8, temperature=0, prompt_lens=lens, use_cache=use_cache)
        for i, p in enumerate(prompts):
            alone = m.generate(p[None], 8, temperature=0)
            assert torch.equal(out[i, 7:], alone[0, len(p):]), (use_cache, i)
    with pytest.raises(ValueError):
        m.generate(batch, 2, prompt_lens=[3, 8, 5])


@_model_1t
def test_model_sample_logits_top_k_top_p_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    assert torch.equal(sample_logits(logits, temperature=0), logits.argmax(-1, keepdim=True))
    assert torch.equal(sample_logits(logits, 1.0, top_k=1, generator=g), logits.argmax(-1, keepdim=True))
    many = logits.repeat_interleave(500, dim=0)  # (2000, 50): 500 draws per row
    ids = sample_logits(many, 1.0, top_k=5, generator=g).view(4, 500)
    top5 = logits.topk(5, dim=-1).indices
    assert all(set(ids[r].tolist()) <= set(top5[r].tolist()) for r in range(4))

    def freqs(ids, n):
        return torch.bincount(ids.view(-1), minlength=n).float() / ids.numel()

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = probs.log().expand(20000, 4)
    # the docstring's example: top_p=0.8 keeps ids 0 and 1 with probabilities .625 and .375
    got = freqs(sample_logits(rows, 1.0, top_p=0.8, generator=g), 4)
    assert torch.allclose(got, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015)
    got = freqs(sample_logits(rows, 1.0, top_p=0.85, generator=g), 4)
    assert got[3] == 0 and got[2] > 0.1
    for temp in (0.5, 2.0):
        want = torch.softmax(probs.log() / temp, dim=-1)
        got = freqs(sample_logits(rows, temp, generator=g), 4)
        assert torch.allclose(got, want, atol=0.015), temp
    a = sample_logits(rows[:50], 1.0, generator=torch.Generator().manual_seed(3))
    b = sample_logits(rows[:50], 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            sample_logits(rows[:2], **{"temperature": 1.0, **bad})


@_model_1t
def test_model_generate_eos_and_vocab_limit():
    m = _model_build("llama")
    idx = torch.randint(0, 61, (2, 4))
    free = m.generate(idx, 12, temperature=0)
    eos_ids = [int(free[0, 4]), int(free[1, 5])]  # row 0's first new token, row 1's second
    out = m.generate(idx, 12, temperature=0, eos_id=eos_ids)
    # reference: cut each greedy row after its first eos, then repeat that eos
    want, stop = free.clone(), []
    for r in range(2):
        hit = next((j for j in range(4, 16) if int(free[r, j]) in eos_ids), 15)
        want[r, hit + 1:] = free[r, hit]
        stop.append(hit + 1)
    assert torch.equal(out, want[:, :max(stop)])
    assert out.shape[1] < 16 and not torch.equal(out, free[:, :out.shape[1]])  # stopped early, filled
    # a single int works too; alone, row 0 stops right after its first new token
    assert torch.equal(m.generate(idx[:1], 12, temperature=0, eos_id=eos_ids[0]), free[:1, :5])
    g = torch.Generator().manual_seed(0)
    sampled = m.generate(idx.repeat(4, 1), 30, temperature=1.5, generator=g)
    assert int(sampled[:, 4:].max()) >= 10  # without a limit high ids do appear
    limited = m.generate(idx.repeat(4, 1), 30, temperature=1.5, generator=g, vocab_limit=10)
    assert int(limited[:, 4:].max()) < 10


# ----------------------------------------------------------------------------------------
# Training helpers: loss, checkpointing, parameter groups, accounting


@_model_1t
def test_model_loss_ignores_minus_100():
    m = _model_build("gpt2")
    idx = torch.randint(0, 61, (2, 10))
    targets = idx.roll(-1, dims=1)
    targets[:, :4] = -100
    logits, loss = m(idx, targets)
    want = F.cross_entropy(logits[:, 4:].reshape(-1, 61), targets[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, want)
    _, loss = m(idx, torch.full_like(idx, -100))
    loss.backward()
    assert loss.item() == 0 and all(torch.isfinite(p.grad).all() for p in m.parameters())


@_model_1t
@pytest.mark.parametrize("style", _MODEL_STYLES)
def test_model_grad_checkpoint_gives_same_gradients(style):
    m = _model_build(style).train()
    idx = torch.randint(0, 61, (2, 16))
    grads = []
    for ckpt in (False, True):
        m.grad_checkpoint = ckpt
        m.zero_grad()
        _, loss = m(idx, idx)
        loss.backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@_model_1t
@pytest.mark.parametrize("style", _MODEL_STYLES)
def test_model_param_groups_cover_every_parameter_once(style):
    m = _model_build(style, tie_embeddings=(style == "gpt2"))
    decay, no_decay = m.param_groups(0.1)
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in m.parameters()})
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    torch.optim.AdamW([decay, no_decay], lr=1e-3)  # accepted as-is


@_model_1t
def test_model_flops_mfu_and_peak_table():
    with torch.device("meta"):
        m = GPT(GPTConfig(**PRESETS["gpt2"]))
    L, C, V, T = 12, 768, 50257, 1024
    n = L * (12 * C * C + 13 * C) + V * C + 2 * C  # per block 12C^2 + 13C, plus wte (the head) and ln_f
    assert m.flops_per_token() == 6 * n + 12 * L * C * T == 855_166_464
    assert peak_flops("cpu") is None and peak_flops(torch.device("cpu")) is None
    assert m.estimate_mfu(1e4, "cpu") is None
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA L40S") == 362e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA GeForce RTX 4090") == 165e12
    assert peak_flops("Tesla T4") is None  # unknown: no made-up number
    assert m.estimate_mfu(1e5, "NVIDIA H200") == pytest.approx(855_166_464 * 1e5 / 989e12)


@_model_1t
def test_model_sizing_table_prints_every_preset(capsys):
    model.main()
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS) and "124,439,808" in out


# ----------------------------------------------------------------------------------------
# Hugging Face import and export (transformers is a test-only reference)


def _model_compare_both_ways(hf_model, tmp_path, vocab, length=17, shard=None):
    from transformers import AutoModelForCausalLM

    hf_model.save_pretrained(tmp_path / "hf", **({"max_shard_size": shard} if shard else {}))
    ours = GPT.from_pretrained(str(tmp_path / "hf"))
    idx = torch.randint(0, vocab, (2, length))
    with torch.no_grad():
        want = hf_model(idx).logits
        got, _ = ours(idx, idx)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    ours.save_hf(str(tmp_path / "out"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(back).__name__ == type(hf_model).__name__
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, got, atol=1e-4, rtol=1e-4)
    return ours


@_model_1t
def test_model_hf_gpt2_import_and_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    hf = _model_perturb_hf(transformers.GPT2LMHeadModel(cfg))
    ours = _model_compare_both_ways(hf, tmp_path, 97)
    assert ours.config.tie_embeddings and ours.lm_head.weight is ours.transformer.wte.weight
    # OpenAI's original checkpoints store names without "transformer."; and an untied head exports too
    safetensors = pytest.importorskip("safetensors.torch")
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.transformer.state_dict().items()}
    safetensors.save_file(sd, str(tmp_path / "hf" / "model.safetensors"))
    again = GPT.from_pretrained(str(tmp_path / "hf"))
    torch.testing.assert_close(again.state_dict(), ours.state_dict())


@_model_1t
@pytest.mark.parametrize("variant", ["tied", "untied", "llama3-rope"])
def test_model_hf_llama_import_and_export(tmp_path, variant):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if variant == "llama3-rope":
        # hs=8, theta=1e4: wavelengths 2*pi*(1, 10, 100, 1000). With 64 original positions the
        # first (< 64/4) is kept, the second (between 16 and 64) blended, the last two slowed 8x.
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_parameters=rope,
                                   rms_norm_eps=1e-5, max_position_embeddings=64,
                                   tie_word_embeddings=(variant == "tied"))
    hf = _model_perturb_hf(transformers.LlamaForCausalLM(cfg))
    shard = "40KB" if variant == "untied" else None  # several files and a model.safetensors.index.json
    ours = _model_compare_both_ways(hf, tmp_path, 101, length=60, shard=shard)
    assert (variant == "untied") == (tmp_path / "hf" / "model.safetensors.index.json").exists()
    c = ours.config
    assert (c.n_kv_head, c.rope_theta, c.norm_eps, c.mlp_hidden) == (2, rope["rope_theta"], 1e-5, 88)
    assert c.tie_embeddings == (variant == "tied") and (c.rope_scaling is None) == (variant != "llama3-rope")


@_model_1t
def test_model_save_hf_falls_back_to_pytorch_bin(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    m = _model_build("llama")
    m.save_hf(str(tmp_path))  # first a safetensors file, which the fallback must remove
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "safetensors", None)  # makes `import safetensors...` fail
        mp.setitem(sys.modules, "safetensors.torch", None)
        m.save_hf(str(tmp_path))
        assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin"]
        again = GPT.from_pretrained(str(tmp_path))
    idx = torch.randint(0, 61, (1, 9))
    want, _ = m(idx, idx)
    torch.testing.assert_close(again(idx, idx)[0], want)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, want, atol=1e-4, rtol=1e-4)


@_model_1t
def test_model_from_pretrained_rejects_bad_directories(tmp_path):
    with pytest.raises(FileNotFoundError):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="bert"):
        GPT.from_pretrained(str(tmp_path))
    llama = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                 num_attention_heads=2, rope_scaling={"rope_type": "yarn", "factor": 8.0})
    (tmp_path / "config.json").write_text(json.dumps(llama))
    with pytest.raises(ValueError, match="yarn"):
        GPT.from_pretrained(str(tmp_path))
    llama["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}  # the other three keys missing
    (tmp_path / "config.json").write_text(json.dumps(llama))
    with pytest.raises(ValueError, match="low_freq_factor"):
        GPT.from_pretrained(str(tmp_path))
    llama["rope_scaling"] = None
    (tmp_path / "config.json").write_text(json.dumps(llama))
    with pytest.raises(FileNotFoundError):  # config fine, weights missing
        GPT.from_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------------------
# GPU only


@_model_1t
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_model_cuda_bf16_sdpa_matches_fp32():
    m = _model_build("llama").cuda()
    idx = torch.randint(0, 61, (2, 32), device="cuda")
    want, _ = m(idx, idx)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, loss = m(idx, idx)
    loss.backward()
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)
    out = m.generate(idx[:, :4], 8, temperature=0)
    assert out.shape == (2, 12)
    assert peak_flops("cuda") is None or peak_flops("cuda") > 1e13
