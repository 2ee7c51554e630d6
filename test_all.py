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
import functools
import hashlib
import http.server
import json
import struct
import threading
import unicodedata
import math
from dataclasses import asdict
import signal
import time
import io
import shutil
import pytest
import tiktoken
import tiktoken.load
import numpy as np
import torch
import torch.nn.functional as F
import torch.nn as nn

import tokenizer
from tokenizer import SPECIAL_TOKENS, Tokenizer, parse_config
import prepare
from prepare import SHARD_MAGIC, PrepareConfig, open_shard, write_shard
from tokenizer import Tokenizer
import model
from model import GPT, PRESETS, GPTConfig, KVCache, peak_flops, sample_logits
import train
from prepare import write_shard
import model as _sample_model_mod
import sample
import bench
from model import GPT, PRESETS, GPTConfig


# -----------------------------------------------------------------------------
# tokenizer.py: byte-level BPE

ROOT = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=1)
def _stdlib_corpus() -> str:
    """~1.2 MB of text every clone has (STYLE.md rule 16): this Python's top-level public stdlib
    modules (os.path.dirname(os.__file__), *.py not starting with "_", sorted by name), joined.
    Cleaned as prepare.py cleans (\\n line ends, NFC, no control characters but \\t and \\n), so
    a test comparing exact bytes through prepare.py can. Same Python version -> same text."""
    root, parts, n = os.path.dirname(os.__file__), [], 0
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py") or name.startswith("_") or n >= 1_200_000:
            continue
        with open(os.path.join(root, name), "rb") as f:
            try:
                text = f.read().decode("utf-8")
            except UnicodeDecodeError:  # a few test-data files are latin-1: leave them out
                continue
        text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff"))
        parts.append(prepare._CONTROL.sub("", text))
        n += len(parts[-1])
    return "".join(parts)


def _stdlib_text(n_chars: int) -> str:
    """The first n_chars characters of _stdlib_corpus (the suite's stand-in for Tiny Shakespeare)."""
    text = _stdlib_corpus()
    assert len(text) >= n_chars, f"this Python's stdlib gave {len(text)} characters, fewer than {n_chars}"
    return text[:n_chars]

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
def stdlib_tok():
    text = _stdlib_text(310_000)
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


def test_tokenizer_fast_and_slow_agree_on_samples(stdlib_tok):
    tok, text = stdlib_tok
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
        _TOKENIZER_CACHE["small"] = Tokenizer.train(_stdlib_text(100_000) + "".join(TOKENIZER_SAMPLES), 600)
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
    docs = _stdlib_text(120_000).split("\n\n")
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
    # The reference is tokenizer.learn_merges_naive (the teaching version beside the fast one):
    # lists of ints, recounted from scratch each merge; it shares no code with learn_merges.
    counts, _ = tokenizer.count_chunks(corpus, tokenizer.GPT2_PATTERN)
    fast = tokenizer.learn_merges(counts, 30)
    naive = tokenizer.learn_merges_naive(counts, 30)
    # both skip a pair whose bytes already have an id; none here
    assert fast == naive[:len(fast)] and len(fast) == len(naive)
    # the worked example of learn_merges_naive's docstring (Wikipedia's aaabdaaabac)
    example = {b"aaabdaaabac": 1}
    assert tokenizer.learn_merges_naive(example, 3) == tokenizer.learn_merges(example, 3) == [
        (97, 97), (97, 98), (256, 257)]
    # random corpora with many ties and runs (a, aa, aaa...), until no pair is left to merge
    rng = random.Random(5)
    for _ in range(300):
        chunks = {"".join(rng.choice("aab") for _ in range(rng.randint(1, 10))).encode(): rng.randint(1, 9)
                  for _ in range(rng.randint(1, 6))}
        assert tokenizer.learn_merges(chunks, 40) == tokenizer.learn_merges_naive(chunks, 40), chunks


def test_tokenizer_specials_cannot_be_injected():
    tok = Tokenizer.train(["hello <|endoftext|> world <|user|>"] * 50, vocab_size=300)
    for s in SPECIAL_TOKENS:
        ids = tok.encode(f"x {s} y")
        assert not set(ids) & set(tok.special_tokens.values())
        assert tok.decode(ids) == f"x {s} y"
    # and training never learned a token that spells a control token
    assert not any(b"<|" in t and b"|>" in t for t in tok.ranks)
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"


def test_tokenizer_save_load_identity(tmp_path, stdlib_tok):
    tok, text = stdlib_tok
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


def test_tokenizer_text_file_rule_is_the_one_prepare_uses(tmp_path):
    # One definition of "a text file" (tokenizer.py), used by read_texts and by prepare.py.
    assert tokenizer.TEXT_SUFFIXES == (".txt", ".md", ".py") and tokenizer.SNIFF_BYTES == 8192
    assert prepare.TEXT_SUFFIXES == tokenizer.TEXT_SUFFIXES + (".jsonl",)
    assert prepare.is_binary is tokenizer.is_binary and prepare.read_text_file is tokenizer.read_text_file
    # binary: a NUL, or more than 10% control bytes, within the first 8 KB
    assert tokenizer.is_binary(b"a" * 90 + b"\x01" * 10) is False  # 10%: still text
    assert tokenizer.is_binary(b"a" * 89 + b"\x01" * 11) is True
    assert tokenizer.is_binary(b"a" * 8192 + b"\x00") is False  # past the 8 KB sniffed
    assert tokenizer.is_binary(b"\x89PNG\r\n\x1a\n\x00\x00") and not tokenizer.is_binary(b"caf\xc3\xa9\n")
    assert tokenizer.is_binary("hello".encode("utf-16"))  # UTF-16 is skipped, not read as garbage
    assert tokenizer.decode_text(b"a\xffb") == ("a\ufffdb", 1)
    assert tokenizer.decode_text("\ufffd ok".encode()) == ("\ufffd ok", 0)  # a U+FFFD the file holds
    assert tokenizer.decode_text(b"\xef\xbf\xbd\xff\r\n") == ("\ufffd\ufffd\r\n", 1)  # \r kept
    (tmp_path / "ctl.txt").write_bytes(b"\x1b[0m\x07" * 100)  # control codes, no NUL
    (tmp_path / "a.md").write_bytes(b"kept\n")
    (tmp_path / "b.rst").write_bytes(b"not a text suffix\n")
    (tmp_path / ".hidden.txt").write_bytes(b"hidden\n")
    for folder in (".git", "__pycache__", "skipme"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.txt").write_bytes(b"left out\n")
    assert tokenizer.read_text_file(str(tmp_path / "ctl.txt")) == (None, 500, 0)
    assert [rel for rel, _, _ in tokenizer.list_text_files(str(tmp_path), skip_dirs=("skipme",))] == [
        "a.md", "ctl.txt"]
    stats = {"files": 0, "binary_skipped": 0, "invalid_utf8_files": 0}
    assert list(tokenizer.read_texts(str(tmp_path), stats, skip_dirs=("skipme",))) == ["kept\n"]
    assert stats == {"files": 1, "binary_skipped": 1, "invalid_utf8_files": 0}


def test_tokenizer_split_patterns_are_openais():
    # The patterns are written one commented alternative per line; joined, they must be exactly
    # the published strings (GPT-2's, as tiktoken first wrote it; cl100k_base), restated whole.
    assert tokenizer.GPT2_PATTERN == r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    assert tokenizer.GPT4_PATTERN == (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}|"""
                                      r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
    # the examples the comments give
    import regex
    assert regex.findall(tokenizer.GPT4_PATTERN, "2024 it'S\n    x") == ["202", "4", " it", "'S", "\n", "   ", " x"]
    assert regex.findall(tokenizer.GPT2_PATTERN, "a  world\nb") == ["a", " ", " world", "\n", "b"]


def test_tokenizer_docstring_examples_hold():
    # STYLE.md rule 5: the worked examples in tokenizer.py's and prepare.py's docstrings
    from collections import Counter
    assert tokenizer._count_chunks((["ab ab", "ab"], tokenizer.GPT2_PATTERN)) == (Counter({b"ab": 2, b" ab": 1}), 7)
    assert tokenizer._parse_rank_lines(["IQ== 0", "Ig== 1", ""]) == {b"!": 0, b'"': 1}
    assert prepare._stem("/x/My Notes.txt") == "My_Notes"
    assert int(np.array([70000]).astype(np.uint16)[0]) == 4464  # why write_shard checks before the cast


@dataclasses.dataclass
class _TokenizerDemoConfig:
    learning_rate: float = 1e-3  # step size
    max_iters: int = 100  # steps
    compile: bool = False  # torch.compile
    name: str = "x"  # a name
    limit: int | None = None  # optional cap
    note: str = ""  # a comment too long for one line
                    # goes on under the first one


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
    assert "a comment too long for one line goes on under the first one" in out


def test_tokenizer_cli_train_encode_stats(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello world\n" + _stdlib_text(20_000), encoding="utf-8")
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
# tokenizer.py -> Hugging Face: tokenizer.json, the chat template, GGUF's vocabulary

import inspect

from tokenizer import CHAT_TEMPLATE, gguf_pre_name

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

# More of what the two encoders must agree on: accents (composed and combining), the other
# Unicode spaces (NBSP, em space, ideographic space, NEL, \v, \f), runs of blank lines and
# indentation, and numbers glued to words.
HF_EXTRA_SAMPLES = [
    "café naïve über façade e\u0301 Å\u030a",
    "nbsp\u00a0em\u2003ideo\u3000nel\x85vt\x0bff\x0c end",
    "  \n  x\n\n\t\ty\n\n\n\n    \t \n",
    "x1 v2.0 3rd 4th 12345678 ١٢٣ ⅷ",
    "    def __init__(self):\n\t\treturn {'a': [1, 2], \"b\": None}  # done\n",
]
CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?\n"}],
    [{"role": "user", "content": "def f():\n    return 1"},
     {"role": "assistant", "content": "Looks fine 😀 — café.\n\n"},
     {"role": "user", "content": ""}, {"role": "assistant", "content": "  spaces  "}],
]


def _hf_tok_export(tok: Tokenizer, out_dir, **kw):
    """save_hf, then both readers: (tokenizers.Tokenizer, transformers.AutoTokenizer)."""
    tok.save_hf(str(out_dir), **kw)
    fast = tokenizers.Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    return fast, transformers.AutoTokenizer.from_pretrained(str(out_dir))


def _chat_ids(out) -> list:
    # transformers 5 returns a BatchEncoding (return_dict=True is its default); 4.x a list
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


@pytest.fixture(scope="module", params=["gpt4", "gpt2"])
def hf_export(request, tmp_path_factory):
    """A 1000-id BPE trained with each split pattern, exported: (tok, dir, tokenizers, AutoTokenizer)."""
    tok = Tokenizer.train(_stdlib_text(120_000)[:100_000] + "".join(TOKENIZER_SAMPLES + HF_EXTRA_SAMPLES),
                          vocab_size=1000, pattern=request.param)
    out = tmp_path_factory.mktemp(f"hf_{request.param}")
    fast, auto = _hf_tok_export(tok, out, model_max_length=256)
    return tok, out, fast, auto


def test_hf_byte_chars_are_gpt2s():
    # Our byte -> character map is GPT-2's bytes_to_unicode, as transformers ships it.
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    assert tokenizer.BYTE_CHARS == [bytes_to_unicode()[b] for b in range(256)]
    assert tokenizer.BYTE_CHARS[0x20] == "Ġ" == "\u0120" and tokenizer.BYTE_CHARS[0x0A] == "Ċ" == "\u010a"
    assert tokenizer.BYTE_CHARS[0x21] == "!" and tokenizer.BYTE_CHARS[0xFF] == "ÿ"
    assert not any(c.isspace() for c in tokenizer.BYTE_CHARS)  # so "left right" is a safe merge line
    assert sum(ord(c) >= 0x100 for c in tokenizer.BYTE_CHARS) == 68  # the bytes that are not visible
    assert tokenizer.bytes_to_hf(b" hello") == "Ġhello" and tokenizer.bytes_to_hf("é".encode()) == "Ã©"
    everything = bytes(range(256))
    assert tokenizer.hf_to_bytes(tokenizer.bytes_to_hf(everything)) == everything


def test_hf_vocab_docstring_example():
    ranks = {bytes([i]): i for i in range(256)} | {b"ab": 256, b" ab": 257}
    tokens, merges = Tokenizer(ranks, "gpt2").hf_vocab()
    assert tokens[97] == "a" and tokens[256] == "ab" and tokens[257] == "Ġab"
    assert tokens[258] == "<|endoftext|>" and tokens[258:] == SPECIAL_TOKENS
    assert merges == ["a b", "Ġ ab"]


def test_hf_export_encodes_like_tiktoken(hf_export):
    # The reference: Rust tokenizers reading our tokenizer.json gives encode()'s ids on code, prose,
    # whitespace runs, digits, emoji, CJK, accents, unseen stdlib text and random Unicode.
    tok, _, fast, auto = hf_export
    rng = random.Random(0)
    texts = (TOKENIZER_SAMPLES + HF_EXTRA_SAMPLES + [_stdlib_text(120_000)[100_000:]]
             + [_tokenizer_random_text(rng, rng.randint(0, 60)) for _ in range(300)])
    fast.encode_special_tokens = True  # "<|pad|>" in a sample is text here, as in encode()
    for text, enc in zip(texts, fast.encode_batch(texts, add_special_tokens=False)):
        ids = tok.encode(text)
        assert enc.ids == ids, text[:80]
        assert fast.decode(ids, skip_special_tokens=False) == tok.decode(ids) == text
    # transformers on top: the same ids and text back, nothing added around them
    for text in TOKENIZER_SAMPLES[:8] + HF_EXTRA_SAMPLES:
        assert auto(text, split_special_tokens=True)["input_ids"] == tok.encode(text)
        assert auto.decode(tok.encode(text)) == text
    # decoding a cut through a multi-byte character: U+FFFD, like decode()
    ids = tok.encode("emoji 😀👍🏽 中文 café")
    for k in range(len(ids) + 1):
        assert fast.decode(ids[:k]) == tok.decode(ids[:k])


def test_hf_export_of_handmade_vocabularies(tmp_path):
    base = {bytes([i]): i for i in range(256)}
    # b"abc" (256) outranks its parts: tiktoken still merges "ab" + "c", so the merge is listed
    tok = Tokenizer(base | {b"abc": 256, b"ab": 257}, "gpt2")
    assert tok.encode("abcabc") == [256, 256]
    assert "ab c" in tok.hf_vocab()[1]
    fast, _ = _hf_tok_export(tok, tmp_path / "outranked")
    assert fast.encode("abcabc").ids == [256, 256]
    # b"abc" with no split into two tokens: only tiktoken's whole-chunk lookup (ignore_merges) finds it
    tok = Tokenizer(base | {b"abc": 256}, "gpt2")
    assert tok.hf_vocab()[1] == [] and tok.encode("abc") == [256] and tok.encode("abcabc") == [97, 98, 99] * 2
    fast, _ = _hf_tok_export(tok, tmp_path / "unreachable")
    assert fast.encode("abc").ids == [256] and fast.encode("abcabc").ids == [97, 98, 99] * 2
    # gaps in the ids (as cl100k_base has): a "[PAD<i>]" placeholder in hf_vocab, nothing in tokenizer.json
    tok = Tokenizer(base | {b"ab": 256}, "gpt4", {"<|endoftext|>": 260})
    tokens, _ = tok.hf_vocab()
    assert len(tokens) == tok.n_vocab and tokens[257:260] == ["[PAD257]", "[PAD258]", "[PAD259]"]
    assert tokens[260] == "<|endoftext|>" and tokens[261:] == SPECIAL_TOKENS[1:]
    fast, auto = _hf_tok_export(tok, tmp_path / "gaps")
    assert "[PAD257]" not in fast.get_vocab()
    assert fast.encode("ab ab").ids == tok.encode("ab ab") == [256, 32, 256]
    assert _chat_ids(auto.apply_chat_template(CHATS[0])) == tok.encode_chat(CHATS[0])[0]
    # a special token that a mergeable token also spells: one clear error, no file
    tok = Tokenizer(base | {b"<|": 256, b"x|": 257, b"<|x|": 258}, "gpt2", {"<|x|": 300})
    with pytest.raises(ValueError, match="also spelled by a mergeable token"):
        tok.save_hf(str(tmp_path / "clash"))
    assert not os.path.exists(tmp_path / "clash" / "tokenizer.json")


@pytest.mark.skipif(not os.path.exists(GPT2_RANKS),
                    reason="needs OpenAI's gpt2.tiktoken: set GPT2_TIKTOKEN=/path/to/gpt2.tiktoken (no download here)")
def test_hf_export_of_openai_gpt2(tmp_path):
    # A vocabulary we did not train: the export's merges start as GPT-2's merges.txt does, and
    # tokenizers gives tiktoken's ids on unseen text.
    tok = Tokenizer.from_ranks_file(GPT2_RANKS, "gpt2", {"<|endoftext|>": 50256})
    tokens, merges = tok.hf_vocab()
    assert tokens[15496] == "Hello" and merges[:5] == ["Ġ t", "Ġ a", "h e", "i n", "r e"]
    fast, _ = _hf_tok_export(tok, tmp_path)
    fast.encode_special_tokens = True
    rng = random.Random(1)
    texts = TOKENIZER_SAMPLES + HF_EXTRA_SAMPLES + [_stdlib_text(200_000)] + [
        _tokenizer_random_text(rng, 80) for _ in range(200)]
    assert [e.ids for e in fast.encode_batch(texts)] == tok.encode_batch(texts)


def test_hf_chat_template_equals_encode_chat(hf_export):
    tok, out, _, auto = hf_export
    for messages in CHATS:
        for prompt in (False, True):
            ids, _ = tok.encode_chat(messages, add_generation_prompt=prompt)
            got = auto.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
            assert _chat_ids(got) == ids, (messages, prompt)
            assert auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == \
                tok.decode(ids)
    # the template refuses what encode_chat refuses
    for bad in ([{"role": "tool", "content": "x"}], [{"role": "user", "content": None}],
                [{"role": "user", "content": [{"type": "text", "text": "x"}]}]):
        with pytest.raises(ValueError):
            tok.encode_chat(bad)
        with pytest.raises(Exception, match="a chat message needs a role"):
            auto.apply_chat_template(bad, tokenize=False)
    # the config: what transformers reads, as save_hf's comments say
    config = json.load(open(out / "tokenizer_config.json", encoding="utf-8"))
    assert config["chat_template"] == CHAT_TEMPLATE and config["split_special_tokens"] is False
    assert auto.model_max_length == 256 and config["model_max_length"] == 256
    assert (auto.bos_token, auto.eos_token, auto.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert sorted(auto.all_special_tokens) == sorted(SPECIAL_TOKENS)
    assert auto.decode(tok.encode_chat(CHATS[1])[0], skip_special_tokens=True) == "Be brief.What is 2+2?4and 3+3?\n"
    assert auto.pad_token_id == tok.pad_id and auto.eos_token_id == tok.eot_id
    assert sorted(os.listdir(out)) == ["tokenizer.json", "tokenizer_config.json"]  # no .tmp left


def test_hf_special_token_text_is_the_documented_difference(hf_export, tmp_path):
    # encode() keeps a special token's text typed inside text as text; Hugging Face matches added
    # tokens in text. What the export gives, case by case (README, "Hugging Face"):
    tok, out, _, auto = hf_export
    end, text = tok.special_tokens["<|end|>"], "say <|end|> then <|endoftext|>."
    # 1. plain text: split_special_tokens=True per call gives encode() exactly; the default does not
    assert auto(text, split_special_tokens=True)["input_ids"] == tok.encode(text)
    assert auto.encode(text, add_special_tokens=False, split_special_tokens=True) == tok.encode(text)
    assert end in auto(text)["input_ids"] and end not in tok.encode(text)
    # 2. chat: a special token's text in a message's content becomes the special id
    messages = [{"role": "user", "content": text}]
    ours, _ = tok.encode_chat(messages)
    assert _chat_ids(auto.apply_chat_template(messages)).count(end) == 2 and ours.count(end) == 1
    # 3. sanitize_control_tokens=True keeps that text as text (one <|end|>, the same text back) but
    #    encodes it apart from its neighbours: " <|" can split otherwise than encode() splits it
    sanitized = _chat_ids(auto.apply_chat_template(messages, sanitize_control_tokens=True))
    assert sanitized.count(end) == 1 and tok.decode(sanitized) == tok.decode(ours)
    # 4. why the config keeps split_special_tokens=False: True would break every chat, since the
    #    template's own <|user|> and <|end|> then become text too
    config = json.load(open(out / "tokenizer_config.json", encoding="utf-8"))
    config["split_special_tokens"] = True
    tok.save_hf(str(tmp_path))
    with open(tmp_path / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f)
    split = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert split(text)["input_ids"] == tok.encode(text)
    assert _chat_ids(split.apply_chat_template(CHATS[0])) != tok.encode_chat(CHATS[0])[0]


def test_gguf_pre_name():
    assert gguf_pre_name("gpt4") == gguf_pre_name(tokenizer.GPT4_PATTERN) == "llama-bpe"
    assert gguf_pre_name("gpt2") == gguf_pre_name(tokenizer.GPT2_PATTERN) == "gpt-2"  # llama.cpp's spelling
    with pytest.raises(ValueError, match="llama.cpp has no pre-tokenizer for this split regex") as e:
        gguf_pre_name(r"\w+|\s+")
    assert "\n" not in str(e.value)
    # the forms tiktoken ships today (what from_tiktoken's tokenizers carry) are recognised too,
    # and they split text exactly as our two patterns do
    import regex
    import tiktoken_ext.openai_public as openai_public
    assert tokenizer._TIKTOKEN_R50K == openai_public.r50k_pat_str
    assert tokenizer._TIKTOKEN_CL100K in inspect.getsource(openai_public.cl100k_base)  # raw r"""..."""
    assert gguf_pre_name(tokenizer._TIKTOKEN_CL100K) == "llama-bpe" and gguf_pre_name(tokenizer._TIKTOKEN_R50K) == "gpt-2"
    rng = random.Random(2)
    texts = TOKENIZER_SAMPLES + HF_EXTRA_SAMPLES + [_tokenizer_random_text(rng, 60) for _ in range(200)]
    for ours, theirs in ((tokenizer.GPT4_PATTERN, tokenizer._TIKTOKEN_CL100K),
                         (tokenizer.GPT2_PATTERN, tokenizer._TIKTOKEN_R50K)):
        for text in texts:
            assert regex.findall(ours, text) == regex.findall(theirs, text), text


# -----------------------------------------------------------------------------
# prepare.py: corpus -> shards

# Tests for prepare.py: shard format, cleaning counts, exact bytes, splits, downloads, idempotence.


def _prepare_tokens(folder, split):
    meta = json.load(open(os.path.join(folder, "meta.json")))
    parts = [np.asarray(open_shard(os.path.join(folder, s))) for s in meta["splits"][split]["shards"]]
    return meta, np.concatenate(parts).astype(np.int64)


def _prepare_split_docs(tokens, eot):
    """Token stream -> list of documents' token lists, using the eot that starts each one."""
    starts = np.flatnonzero(tokens == eot)
    assert len(tokens) == 0 or starts[0] == 0, "every document must start with <|endoftext|>"
    return [tokens[a + 1:b].tolist() for a, b in zip(starts, list(starts[1:]) + [len(tokens)])]


def _prepare_in_val(doc_id, fraction):
    # an independent restatement of the documented rule: blake2b-64 of the path, little endian
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


# -----------------------------------------------------------------------------
# A loopback HTTP server: serves a folder, plus /truncated.txt which promises more than it sends


class _PrepareHandler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/truncated.txt":
            body = b"only part of the file\n" * 5
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + 1000))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        if self.path == "/nolength.txt":  # 4,800 bytes and no Content-Length: closing ends them
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"a line of a file that never says how long it is\n" * 100)
            self.close_connection = True
            return
        if self.path == "/redirect-ftp.txt":  # urllib's own redirect handler would follow this one
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1:9/x.txt")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def _prepare_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_PrepareHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def _prepare_tok(tmp_path_factory):
    """A small BPE trained once on 200 KB of stdlib source and saved."""
    tok = Tokenizer.train(_stdlib_text(200_000), 400)
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.bpe")
    tok.save(path)
    return tok, path


# -----------------------------------------------------------------------------
# Shard format


def test_prepare_shard_header_roundtrip(tmp_path):
    for dtype, version, ids in ((np.uint16, 1, [50256, 0, 65535, 7]), (np.uint32, 2, [100276, 0, 2**32 - 1])):
        path = str(tmp_path / f"s{version}.bin")
        write_shard(path, np.array(ids, dtype=dtype))
        raw = open(path, "rb").read()
        header = struct.unpack("<256i", raw[:1024])  # llm.c: 256 little-endian int32
        assert header[:3] == (SHARD_MAGIC, version, len(ids)) and not any(header[3:])
        assert len(raw) == 1024 + len(ids) * np.dtype(dtype).itemsize
        assert np.frombuffer(raw[1024:], dtype=dtype).tolist() == ids
        got = open_shard(path)
        assert got.dtype == dtype and got.tolist() == ids
    llama3 = struct.pack("<256i", 20240801, 7, 2, *[0] * 253) + np.array([128000, 9906], dtype="<u4").tobytes()
    open(tmp_path / "llama3.bin", "wb").write(llama3)  # llm.c's own uint32 format reads too
    assert open_shard(str(tmp_path / "llama3.bin")).tolist() == [128000, 9906]
    os.remove(tmp_path / "llama3.bin")
    write_shard(str(tmp_path / "auto.bin"), [1, 70000])  # a plain list with a big id picks uint32
    assert open_shard(str(tmp_path / "auto.bin")).dtype == np.uint32
    with pytest.raises(ValueError, match="do not fit"):
        write_shard(str(tmp_path / "bad.bin"), [70000], dtype=np.uint16)
    assert sorted(os.listdir(tmp_path)) == ["auto.bin", "s1.bin", "s2.bin"]  # no temporary left


def test_prepare_open_shard_rejects_corrupt(tmp_path):
    good = str(tmp_path / "good.bin")
    write_shard(good, np.arange(100, dtype=np.uint16))
    raw = open(good, "rb").read()

    def corrupt(name, data):
        p = str(tmp_path / name)
        open(p, "wb").write(data)
        with pytest.raises(ValueError, match="HINT"):
            open_shard(p)

    corrupt("magic.bin", struct.pack("<i", 1234) + raw[4:])
    corrupt("version.bin", raw[:4] + struct.pack("<i", 7) + raw[8:])
    corrupt("truncated.bin", raw[:-2])  # one token short of what the header promises
    corrupt("longer.bin", raw + b"\0\0")
    corrupt("short.bin", raw[:100])
    corrupt("count.bin", raw[:8] + struct.pack("<i", 101) + raw[12:])
    with pytest.raises(FileNotFoundError):
        open_shard(str(tmp_path / "missing.bin"))


def test_prepare_choose_dtype():
    assert prepare.choose_dtype(50257, "auto") == np.uint16
    assert prepare.choose_dtype(65536, "auto") == np.uint16  # ids 0..65535 all fit
    assert prepare.choose_dtype(65537, "auto") == np.uint32
    assert prepare.choose_dtype(300, "uint32") == np.uint32
    with pytest.raises(ValueError, match="too many for --dtype=uint16"):
        prepare.choose_dtype(100277, "uint16")


def test_prepare_numbers_its_comments_state():
    # STYLE.md rule 5: the numbers prepare.py's comments give, recomputed from the code.
    # "Why 4096" (PrepareConfig): train.py's CPU model at each vocabulary, and the stated ratios.
    cpu = train.CPU_MODEL
    assert (cpu["n_layer"], cpu["n_embd"], cpu["block_size"], cpu["tie_embeddings"]) == (4, 128, 64, True)
    bytes_per_token = {1024: 2.50, 2048: 2.92, 4096: 3.30, 8192: 3.64}  # measured on the stdlib val split
    mflop = {v: GPT(GPTConfig(vocab_size=v, **cpu)).flops_per_token() / 1e6 for v in bytes_per_token}
    assert [round(mflop[v], 1) for v in bytes_per_token] == [6.3, 7.1, 8.7, 11.8]
    per_byte = {v: mflop[v] / bytes_per_token[v] for v in bytes_per_token}
    assert [round(per_byte[v], 2) for v in bytes_per_token] == [2.52, 2.43, 2.62, 3.24]
    percent = lambda a, b: round(100 * (a / b - 1))
    assert percent(per_byte[4096], per_byte[2048]) == 8 and percent(bytes_per_token[4096], bytes_per_token[2048]) == 13
    assert percent(per_byte[8192], per_byte[4096]) == 24 and percent(bytes_per_token[8192], bytes_per_token[4096]) == 10
    # _hash64's birthday bound and plan_split_move's 18%
    assert round(100 * 1e9 ** 2 / 2 ** 65) == 3 and f"{1e6 ** 2 / 2 ** 65:.0e}" == "3e-08"
    assert round(100 * 0.95 ** 33) == 18
    # the 1024-byte header, llm.c's 1e8 tokens per shard, 1 MB blocks, the uint16 range
    assert prepare.HEADER_INTS * 4 == 1024 and PrepareConfig().shard_tokens == 10 ** 8
    assert prepare.BATCH_BYTES == 2 ** 20 and np.iinfo(np.uint16).max == 65535


# -----------------------------------------------------------------------------
# Cleaning, dedup, splits and exact bytes on a crafted corpus

_PREPARE_BODY = "The quick brown fox jumps over the lazy dog, again and again.\n"


def _prepare_crafted(root):
    """Write a corpus with one case per rule; return {doc_id: cleaned text} of the documents kept."""
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    files = {
        "a.txt": ("Windows line\r\nends\tand a bell\x07 here.\r\n" + _PREPARE_BODY).encode(),
        "b.md": ("# Cafe\u0301 notes\n\n" + _PREPARE_BODY * 2).encode(),  # NFD e + combining acute
        "c.py": ("Windows line\r\nends\tand a bell\x07 here.\r\n" + _PREPARE_BODY).encode(),  # dup of a.txt
        "d.txt": b"too short\n",
        "sub/e.txt": b"\xef\xbb\xbfBOM first, then a bad byte \xff in the middle.\n" + _PREPARE_BODY.encode(),
        "sub/f.txt": b"\x00\x01\x02binary\x00" * 20,
        "sub/g.jsonl": "\n".join([
            json.dumps({"text": "first json document " + _PREPARE_BODY}),
            "{not json",
            json.dumps({"title": "no text field"}),
            json.dumps({"text": "first json document " + _PREPARE_BODY}),  # duplicate
            json.dumps({"text": "second json document, with <|endoftext|> inside " + _PREPARE_BODY}),
            '{"text": "a lone surrogate \\ud800 in JSON ' + _PREPARE_BODY.strip() + '"}',
        ]).encode() + b'\n{"text": "invalid \xff utf-8 in a JSON line"}\n',
        "sub/ignored.csv": b"a,b,c\n" * 50,
        ".hidden/h.txt": _PREPARE_BODY.encode() * 3,
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return {
        "a.txt": "Windows line\nends\tand a bell here.\n" + _PREPARE_BODY,
        "b.md": "# Caf\u00e9 notes\n\n" + _PREPARE_BODY * 2,
        "sub/e.txt": "BOM first, then a bad byte \ufffd in the middle.\n" + _PREPARE_BODY,
        "sub/g.jsonl:1": "first json document " + _PREPARE_BODY,
        "sub/g.jsonl:5": "second json document, with <|endoftext|> inside " + _PREPARE_BODY,
        "sub/g.jsonl:6": "a lone surrogate ? in JSON " + _PREPARE_BODY.strip(),
    }


def test_prepare_crafted_corpus(tmp_path):
    expected = _prepare_crafted(tmp_path / "corpus")
    cfg = PrepareConfig(dataset=str(tmp_path / "corpus"), out_dir=str(tmp_path / "data"), vocab_size=300,
                        val_fraction=0.4, backend="threads", workers=2)
    folder = prepare.prepare(cfg)
    assert folder == os.path.join(str(tmp_path / "data"), "corpus")
    assert sorted(os.listdir(folder)) == ["meta.json", "tokenizer.bpe", "train_000.bin", "val_000.bin"]
    assert sorted(os.listdir(tmp_path / "data")) == ["corpus"]  # no temporary folder left
    tok = Tokenizer.load(os.path.join(folder, "tokenizer.bpe"))
    meta = json.load(open(os.path.join(folder, "meta.json")))
    c = meta["cleaning"]
    assert (c["documents_in"], c["documents_kept"], c["dropped_short"], c["dropped_duplicate"]) == (9, 6, 1, 2)
    assert (c["skipped_binary"], c["skipped_bad_jsonl"], c["invalid_utf8_documents"], c["replacement_chars"]) == (1, 3, 2, 1)
    assert c["cr_normalized_documents"] == 2  # a.txt and its duplicate c.py (cleaned before the dedup check)
    assert c["control_chars_removed"] == 3  # two bells and one byte-order mark
    assert meta["eot_id"] == tok.eot_id and meta["vocab_size"] == tok.n_vocab == 300 and meta["dtype"] == "uint16"
    ids = sorted(expected)
    for split in ("train", "val"):
        want = [expected[i] for i in ids if _prepare_in_val(i, 0.4) == (split == "val")]
        assert want, "the crafted names must put documents in both splits"
        m, tokens = _prepare_tokens(folder, split)
        docs = [tok.decode(d) for d in _prepare_split_docs(tokens, tok.eot_id)]
        assert docs == want  # shards decode to exactly the cleaned documents, in path order
        info = m["splits"][split]
        assert info["documents"] == len(want) and info["tokens"] == len(tokens)
        assert info["bytes"] == sum(len(d.encode("utf-8")) for d in want)  # exact, for bits per byte
    assert c["bytes_out"] == meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"]
    # data cannot inject control tokens: the literal "<|endoftext|>" in g.jsonl is ordinary text
    _, all_val = _prepare_tokens(folder, "val")
    _, all_train = _prepare_tokens(folder, "train")
    assert (np.concatenate([all_train, all_val]) == tok.eot_id).sum() == 6


def test_prepare_cleaning_steps():
    stats = prepare.new_stats()
    cfg = PrepareConfig(normalize_punct=True, lowercase=True)
    got = prepare.clean_text("\ufeffA\u201cB\u201d \u2014 e\u0301\r\nx\x1b[0m\x85\ty\u2026\r", cfg, stats)
    assert got == 'a"b" - \u00e9\nx[0m\ty...\n'
    assert unicodedata.is_normalized("NFC", got)
    seen = set()
    assert prepare.dedup_lines("a\nb\n\nc", seen, stats) == "a\nb\n\nc"
    assert prepare.dedup_lines("b\n  a\nd\n", seen, stats) == "d\n"
    assert stats["lines_deduplicated"] == 2


def test_prepare_dedup_lines_and_max_docs(tmp_path, _prepare_tok):
    corpus = tmp_path / "c"
    corpus.mkdir()
    shared_line = "this boilerplate line appears in every document\n"
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(f"document number {i} has its own first line\n{shared_line}")
    cfg = PrepareConfig(dataset=str(corpus), out_dir=str(tmp_path / "d"), tokenizer=_prepare_tok[1],
                        dedup_lines=True, max_docs=10, val_fraction=0.3, min_chars=10)
    meta = json.load(open(os.path.join(prepare.prepare(cfg), "meta.json")))
    assert meta["cleaning"]["documents_kept"] == 10 and meta["cleaning"]["lines_deduplicated"] == 9
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 10


# -----------------------------------------------------------------------------
# One long document: positional split, streamed in blocks, tokens as if encoded whole


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2"])
def test_prepare_single_document_blocks(tmp_path, monkeypatch, pattern):
    # Python source has every whitespace shape (indents, blank lines, trailing spaces) a block cut could break;
    # the gpt2 pattern glues a newline to the next line's indentation, so only some line starts are safe
    text = "".join(open(p, encoding="utf-8").read() for p in (prepare.__file__, json.__file__, functools.__file__))
    text = text.replace("\r", "").replace("\n\n", "\n  \n")
    tok = Tokenizer.train(text, 300, pattern=pattern)
    tok.save(str(tmp_path / "tok.bpe"))
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(prepare, "BATCH_BYTES", 4096)  # ~25 blocks instead of one
    cfg = PrepareConfig(dataset=str(tmp_path / "one.txt"), out_dir=str(tmp_path / "d"), tokenizer=str(tmp_path / "tok.bpe"),
                        val_fraction=0.2, backend="threads", workers=2)
    folder = prepare.prepare(cfg)
    meta, train = _prepare_tokens(folder, "train")
    _, val = _prepare_tokens(folder, "val")
    cut = meta["splits"]["train"]["bytes"]
    raw = text.encode("utf-8")
    assert meta["splits"]["val"]["bytes"] == len(raw) - cut and raw[cut - 1:cut] == b"\n"  # a line boundary
    assert abs(len(raw) - cut - 0.2 * len(raw)) < 200  # about val_fraction, from the end
    # the reference: the two parts encoded whole, each after one <|endoftext|>
    assert train.tolist() == [tok.eot_id] + tok.encode(raw[:cut].decode())
    assert val.tolist() == [tok.eot_id] + tok.encode(raw[cut:].decode())
    assert meta["splits"]["train"]["documents"] == meta["splits"]["val"]["documents"] == 1


# -----------------------------------------------------------------------------
# Downloads against a loopback server (never the internet)


def test_prepare_download_url_and_truncation(tmp_path, _prepare_server, _prepare_tok):
    www, base = _prepare_server
    lines = [f"line {i}: {'spam ' * (i % 7)}eggs" for i in range(3000)]
    (www / "corpus.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "data"
    cfg = PrepareConfig(dataset=f"{base}/corpus.txt", out_dir=str(out), tokenizer=_prepare_tok[1])
    folder = prepare.prepare(cfg)
    downloads = os.listdir(out / "downloads")
    assert len(downloads) == 1 and downloads[0].startswith("corpus-") and folder.endswith("corpus")
    assert open(out / "downloads" / downloads[0], "rb").read() == (www / "corpus.txt").read_bytes()
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["splits"]["val"]["bytes"] + meta["splits"]["train"]["bytes"] == (www / "corpus.txt").stat().st_size

    before = sorted(os.listdir(out))
    with pytest.raises(RuntimeError, match="truncated"):
        prepare.prepare(PrepareConfig(dataset=f"{base}/truncated.txt", out_dir=str(out), tokenizer=_prepare_tok[1]))
    with pytest.raises(RuntimeError, match="HTTP 404"):
        prepare.download(f"{base}/missing.txt", str(out / "downloads" / "missing.txt"))
    assert sorted(os.listdir(out)) == before and os.listdir(out / "downloads") == downloads  # nothing left behind


def test_prepare_shakespeare_from_mirror(tmp_path, _prepare_server, _prepare_tok, monkeypatch):
    # The named-dataset path (mirror URL, download, size + sha256 check, 90/10 single-file split)
    # on stand-in text: the mirror serves stdlib text a little longer than one read block (as the
    # real 1.1 MB file is), and the DATASETS entry is told that text's size and sha256.
    www, base = _prepare_server
    raw = _stdlib_text(prepare.BATCH_BYTES + 100_000).encode("utf-8")
    monkeypatch.setitem(prepare.DATASETS["shakespeare"], "bytes", len(raw))
    monkeypatch.setitem(prepare.DATASETS["shakespeare"], "sha256", hashlib.sha256(raw).hexdigest())
    (www / "tinyshakespeare.txt").write_bytes(raw)
    tok, tok_path = _prepare_tok
    cfg = PrepareConfig(dataset="shakespeare", out_dir=str(tmp_path), base_url=base, tokenizer=tok_path)
    folder = prepare.prepare(cfg)
    assert folder == os.path.join(str(tmp_path), "shakespeare")
    meta, val = _prepare_tokens(folder, "val")
    train = _prepare_tokens(folder, "train")[1]
    assert open(os.path.join(str(tmp_path), "downloads", "tinyshakespeare.txt"), "rb").read() == raw
    assert meta["config"]["val_fraction"] == 0.1  # the dataset's default, nanoGPT's 90/10 split
    cut = meta["splits"]["train"]["bytes"]
    # val starts at the last line start before 90% of the bytes (an independent restatement)
    assert cut == raw.rfind(b"\n", 0, int(len(raw) * 0.9)) + 1
    assert cut + meta["splits"]["val"]["bytes"] == len(raw) and raw[cut - 1:cut] == b"\n"
    assert tok.decode(train[1:].tolist()) + tok.decode(val[1:].tolist()) == raw.decode()
    # a mirror serving the wrong file is caught by the size/sha256 check, leaving nothing behind
    (www / "tinyshakespeare.txt").write_bytes(raw[:-10] + b"0123456789")
    with pytest.raises(RuntimeError, match="sha256"):
        prepare.prepare(PrepareConfig(dataset="shakespeare", out_dir=str(tmp_path / "x"), base_url=base))
    (www / "tinyshakespeare.txt").write_bytes(raw[:-10])  # and a short one by the size check
    with pytest.raises(RuntimeError, match=f"expected {len(raw)}"):
        prepare.prepare(PrepareConfig(dataset="shakespeare", out_dir=str(tmp_path / "x"), base_url=base))
    assert os.listdir(tmp_path / "x" / "downloads") == []


# -----------------------------------------------------------------------------
# Idempotence, backends, sharding, uint32


def _prepare_small_corpus(root, n=30):
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"f{i:02d}.txt").write_text(f"file {i}\n" + "".join(f"row {j} of {i}: {j * i}\n" for j in range(40)))


def test_prepare_idempotence_and_force(tmp_path, _prepare_tok, capsys):
    _prepare_small_corpus(tmp_path / "c")
    cfg = PrepareConfig(dataset=str(tmp_path / "c"), out_dir=str(tmp_path / "d"), tokenizer=_prepare_tok[1],
                        val_fraction=0.2)
    folder = prepare.prepare(cfg)
    shard = os.path.join(folder, "train_000.bin")
    ino = os.stat(shard).st_ino
    assert prepare.prepare(cfg) == folder and os.stat(shard).st_ino == ino  # reused, not rewritten
    assert "up to date" in capsys.readouterr().out
    prepare.prepare(PrepareConfig(**{**cfg.__dict__, "force": True}))
    ino2 = os.stat(shard).st_ino
    assert ino2 != ino  # --force rebuilt it
    prepare.prepare(PrepareConfig(**{**cfg.__dict__, "min_chars": 5}))  # another option: rebuilt
    ino3 = os.stat(shard).st_ino
    assert ino3 != ino2
    (tmp_path / "c" / "f03.txt").write_text("changed content of file three, long enough to keep\n")
    prepare.prepare(PrepareConfig(**{**cfg.__dict__, "min_chars": 5}))  # another input: rebuilt
    ino4 = os.stat(shard).st_ino
    assert ino4 != ino3
    with open(shard, "r+b") as f:  # a damaged output is not trusted
        f.truncate(2000)
    prepare.prepare(PrepareConfig(**{**cfg.__dict__, "min_chars": 5}))
    assert len(open_shard(shard)) == json.load(open(os.path.join(folder, "meta.json")))["splits"]["train"]["tokens"]
    assert sorted(os.listdir(tmp_path / "d")) == ["c"]


def test_prepare_backends_shards_and_uint32(tmp_path, _prepare_tok):
    _prepare_small_corpus(tmp_path / "c", n=40)
    base = dict(dataset=str(tmp_path / "c"), tokenizer=_prepare_tok[1], val_fraction=0.2)
    ref = prepare.prepare(PrepareConfig(out_dir=str(tmp_path / "one"), backend="threads", workers=1, **base))
    runs = {
        "processes": PrepareConfig(out_dir=str(tmp_path / "p"), backend="processes", workers=2, shard_tokens=1000, **base),
        "threads": PrepareConfig(out_dir=str(tmp_path / "t"), backend="threads", workers=2, shard_tokens=1000, **base),
        "uint32": PrepareConfig(out_dir=str(tmp_path / "u"), dtype="uint32", **base),
    }
    for split in ("train", "val"):
        ref_meta, ref_tokens = _prepare_tokens(ref, split)
        for name, cfg in runs.items():
            folder = prepare.prepare(cfg)
            meta, tokens = _prepare_tokens(folder, split)
            assert np.array_equal(tokens, ref_tokens), name
            assert meta["splits"][split]["bytes"] == ref_meta["splits"][split]["bytes"]
            sizes = [len(open_shard(os.path.join(folder, s))) for s in meta["splits"][split]["shards"]]
            if cfg.shard_tokens == 1000:
                assert len(sizes) > 1 and all(s == 1000 for s in sizes[:-1]) and 0 < sizes[-1] <= 1000
            if name == "uint32":
                shard = os.path.join(folder, meta["splits"][split]["shards"][0])
                assert struct.unpack("<3i", open(shard, "rb").read(12))[1] == 2 and meta["dtype"] == "uint32"


def test_prepare_pystdlib_order_and_reading(tmp_path):
    source = prepare.resolve_source(PrepareConfig())
    paths = [rel for rel, _, _ in source.files]
    assert len(paths) > 1000 and paths == sorted(paths) and all(p.endswith(".py") for p in paths)
    assert not any("site-packages" in p or "__pycache__" in p for p in paths)
    cfg = PrepareConfig(max_docs=25, vocab_size=300, out_dir=str(tmp_path), val_fraction=0.2, workers=1)
    folder = prepare.prepare(cfg)
    assert folder == os.path.join(str(tmp_path), "pystdlib")
    tok = Tokenizer.load(os.path.join(folder, "tokenizer.bpe"))
    kept = []  # reference: the first 25 files of 32+ characters, read with newline="" (no \r translation)
    for rel in paths:
        with open(os.path.join(source.root, rel), encoding="utf-8", errors="replace", newline="") as f:
            text = unicodedata.normalize("NFC", f.read().replace("\r\n", "\n"))
        if len(text.strip()) >= 32 and text not in kept:
            kept.append(text)
        if len(kept) == 25:
            break
    got = []
    for split in ("train", "val"):
        got += [tok.decode(d) for d in _prepare_split_docs(_prepare_tokens(folder, split)[1], tok.eot_id)]
    assert sorted(got) == sorted(kept)


# -----------------------------------------------------------------------------
# Bad input: one clear sentence, nothing half-written


def test_prepare_bad_input(tmp_path, _prepare_tok, capsys):
    out = str(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare.prepare(PrepareConfig(dataset=str(tmp_path / "nope"), out_dir=out))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="holds no"):
        prepare.prepare(PrepareConfig(dataset=str(tmp_path / "empty"), out_dir=out))
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "a.txt").write_text("hi\n")
    (tmp_path / "tiny" / "b.txt").write_text("yo\n")
    with pytest.raises(ValueError, match="nothing left"):
        prepare.prepare(PrepareConfig(dataset=str(tmp_path / "tiny"), out_dir=out, tokenizer=_prepare_tok[1]))
    assert not os.path.exists(out) or os.listdir(out) == []
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01" * 5000)  # a binary file passed directly
    with pytest.raises(ValueError, match="nothing left.*skipped_binary 1"):
        prepare.prepare(PrepareConfig(dataset=str(tmp_path / "blob.txt"), out_dir=out, tokenizer=_prepare_tok[1]))
    with pytest.raises(ValueError, match="val_fraction"):
        prepare.prepare(PrepareConfig(dataset=str(tmp_path / "tiny"), out_dir=out, val_fraction=1.5))
    # an out_dir/NAME that holds another dataset is not replaced without --force
    _prepare_small_corpus(tmp_path / "one" / "corpus")
    _prepare_small_corpus(tmp_path / "two" / "corpus")
    first = prepare.prepare(PrepareConfig(dataset=str(tmp_path / "one" / "corpus"), out_dir=out,
                                          tokenizer=_prepare_tok[1], val_fraction=0.2))
    other = PrepareConfig(dataset=str(tmp_path / "two" / "corpus"), out_dir=out, tokenizer=_prepare_tok[1],
                          val_fraction=0.2)
    with pytest.raises(ValueError, match="holds dataset"):
        prepare.prepare(other)
    assert prepare.prepare(PrepareConfig(**{**other.__dict__, "force": True})) == first
    open(os.path.join(first, "notes.txt"), "w").write("mine")  # a file prepare.py did not write: never deleted
    with pytest.raises(ValueError, match="did not write"):
        prepare.prepare(PrepareConfig(**{**other.__dict__, "force": True}))
    # the script: one sentence on stderr and exit status 1, no traceback
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        prepare.main([f"--dataset={tmp_path / 'nope'}", f"--out_dir={out}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.startswith("prepare.py: error:") and "\n" not in err
    with pytest.raises(SystemExit) as e:
        prepare.main(["--vocab_sise=300"])
    assert e.value.code == 2


# -----------------------------------------------------------------------------
# Reliability: neither split empty, downloads capped and http(s) only


def _prepare_hash(doc_id):
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")


def _prepare_docs_by_split(folder):
    """{split: sorted decoded documents} of a prepared folder."""
    tok = Tokenizer.load(os.path.join(folder, "tokenizer.bpe"))
    tokens = {s: _prepare_tokens(folder, s)[1] for s in ("train", "val")}
    return {s: sorted(map(tok.decode, _prepare_split_docs(t, tok.eot_id))) for s, t in tokens.items()}


def test_prepare_small_corpus_always_gets_a_val_document(tmp_path, capsys):
    # 33 names the 5% path hash all sends to train (18% of 33-document corpora: 0.95**33)
    names = [n for n in (f"n{i:02d}.txt" for i in range(99)) if not _prepare_in_val(n, 0.05)][:33]
    text = {n: f"{n}: a small document, but long enough to keep\n" for n in names}
    (tmp_path / "c").mkdir()
    for n in names:
        (tmp_path / "c" / n).write_text(text[n])
    cfg = PrepareConfig(dataset=str(tmp_path / "c"), out_dir=str(tmp_path / "d"), vocab_size=300,
                        workers=1)
    folder = prepare.prepare(cfg)
    assert "so that neither split is empty" in capsys.readouterr().out
    moved = min(names, key=_prepare_hash)  # the reference: the hash closest above the threshold
    train = [text[n] for n in names if n != moved]
    assert _prepare_docs_by_split(folder) == {"train": sorted(train), "val": [text[moved]]}
    # the tokenizer was trained on the final train split only (rebuilt after the move)
    want = Tokenizer.train(train, 300)
    assert Tokenizer.load(os.path.join(folder, "tokenizer.bpe")).ranks == want.ranks
    # deterministic: a second build gives the same bytes, and the first one counts as up to date
    again = prepare.prepare(dataclasses.replace(cfg, out_dir=str(tmp_path / "d2")))
    for name in ("tokenizer.bpe", "train_000.bin", "val_000.bin"):
        with open(os.path.join(folder, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read()
    capsys.readouterr()
    assert prepare.prepare(cfg) == folder and "up to date" in capsys.readouterr().out


@pytest.mark.parametrize("fraction", [0.05, 0.95])
def test_prepare_two_documents_give_one_train_one_val(tmp_path, _prepare_tok, fraction):
    # two names the hash puts in the same split: all train at 0.05, all val at 0.95
    all_val = fraction > 0.5
    same = [n for n in (f"d{i}.md" for i in range(99)) if _prepare_in_val(n, fraction) == all_val]
    text = {n: f"{n} holds one short paragraph of text\n" for n in same[:2]}
    (tmp_path / "c").mkdir()
    for n in text:
        (tmp_path / "c" / n).write_text(text[n])
    folder = prepare.prepare(PrepareConfig(dataset=str(tmp_path / "c"), out_dir=str(tmp_path / "d"),
                                           tokenizer=_prepare_tok[1], val_fraction=fraction))
    # the document nearest the threshold moves: at 0.05 the lower hash to val, at 0.95 the higher
    # one to train; either way the lower hash ends in val
    val, train = sorted(text, key=_prepare_hash)
    assert _prepare_docs_by_split(folder) == {"train": [text[train]], "val": [text[val]]}
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["splits"]["train"]["documents"] == meta["splits"]["val"]["documents"] == 1


def test_prepare_download_cap_and_http_only(tmp_path, _prepare_server, _prepare_tok):
    www, base = _prepare_server
    (www / "big.txt").write_text("a line of a file that says how long it is\n" * 100)  # 4,200 bytes
    out = tmp_path / "d"

    def refused(error, words, **kw):
        with pytest.raises(error, match=words):
            prepare.prepare(PrepareConfig(out_dir=str(out), tokenizer=_prepare_tok[1], **kw))
        assert not (out / "downloads").exists() or os.listdir(out / "downloads") == []  # no partial

    # over the cap: by Content-Length before reading, and by bytes received when there is no length
    refused(RuntimeError, r"is 4,200 bytes \(Content-Length\), over the --max_download_mb=0.004",
            dataset=f"{base}/big.txt", max_download_mb=0.004)
    refused(RuntimeError, "sent more than the --max_download_mb=0.004 cap allows",
            dataset=f"{base}/nolength.txt", max_download_mb=0.004)
    refused(ValueError, "must be >= 0", dataset=f"{base}/big.txt", max_download_mb=-1)
    # only http(s): file:// and ftp:// URLs, a file:// mirror and a redirect to ftp:// are refused
    (tmp_path / "local.txt").write_text("a local file that file:// would read\n" * 10)
    refused(ValueError, "uses file://, but only http:// and https:// are downloaded",
            dataset=(tmp_path / "local.txt").as_uri())
    refused(ValueError, "uses ftp://, but only http", dataset="ftp://127.0.0.1:9/x.txt")
    refused(ValueError, "uses file://, but only", dataset="shakespeare", base_url=tmp_path.as_uri())
    refused(ValueError, r"ftp://127.0.0.1:9/x.txt \(redirected from .*/redirect-ftp.txt\) uses ftp",
            dataset=f"{base}/redirect-ftp.txt")
    # under the cap, or with 0 = no cap, the same files download whole
    for name, cap, size in (("big.txt", 0.0045, 4200), ("nolength.txt", 0, 4800)):
        cfg = PrepareConfig(dataset=f"{base}/{name}", out_dir=str(out), name=name[:-4],
                            tokenizer=_prepare_tok[1], max_download_mb=cap)
        folder = prepare.prepare(cfg)
        meta = json.load(open(os.path.join(folder, "meta.json")))
        assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == size


# -----------------------------------------------------------------------------
# model.py: the GPT

# Tests for model.py: each compares against an independent reference (Hugging Face
# transformers, torch.nn.MultiheadAttention, the manual attention path, a full forward
# pass, single-row generation, hand-counted formulas).


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
    for bad in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            sample_logits(rows[:2], **{"temperature": 1.0, **bad})
        with pytest.raises(ValueError):  # one rule for every entry point, greedy included
            model.check_sampling_args(**{"temperature": 0.0, **bad})
    # top_k=0 and None are both "off", as in sample.py's --top_k=0, and so is top_p=1
    off = [sample_logits(rows[:50], 1.0, top_k=k, top_p=p, generator=torch.Generator().manual_seed(3))
           for k, p in ((0, None), (None, 1.0))]
    assert torch.equal(off[0], a) and torch.equal(off[1], a)


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


@_model_1t
def test_model_generate_stream_columns_hook_and_mode():
    m = _model_build("llama", dropout=0.1).train()
    idx = torch.randint(0, 61, (2, 4))
    free = m.generate(idx, 6, temperature=0, vocab_limit=50)
    assert m.training  # generate switched dropout off only while it ran
    # the stream yields the same tokens one (B, 1) column at a time
    stream = m.generate_stream(idx, 6, temperature=0, vocab_limit=50)
    first = next(stream)
    assert first.shape == (2, 1) and torch.equal(first, free[:, 4:5]) and not m.training
    stream.close()  # closed early: the train/eval mode comes back
    assert m.training
    # the hook runs after the vocabulary mask, before sampling, and sees every id so far
    banned, widths = int(free[0, 4]), []

    def hook(logits, so_far):
        widths.append(so_far.shape[1])
        assert torch.isinf(logits[:, 50:]).all()  # vocab_limit=50 already applied
        return logits.index_fill(1, torch.tensor([banned]), float("-inf"))

    out = m.generate(idx, 6, temperature=0, vocab_limit=50, logits_hook=hook)
    assert widths == [4, 5, 6, 7, 8, 9] and banned not in out[:, 4:].tolist()[0]


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


@_model_1t
def test_model_save_hf_files_follow_the_umask(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    m = _model_build("llama")
    old = os.umask(0o022)
    try:
        for umask in (0o022, 0o027):
            os.umask(umask)
            (tmp_path / f"ref{umask:o}").write_text("")  # the reference: the mode open() gives
            want = os.stat(tmp_path / f"ref{umask:o}").st_mode & 0o777
            assert want == 0o666 & ~umask
            for weights in ("model.safetensors", "pytorch_model.bin"):
                out = tmp_path / f"{umask:o}-{weights}"
                with monkeypatch.context() as mp:
                    if weights == "pytorch_model.bin":  # the fallback when safetensors is missing
                        mp.setitem(sys.modules, "safetensors", None)
                        mp.setitem(sys.modules, "safetensors.torch", None)
                    m.save_hf(str(out))
                modes = {n: os.stat(out / n).st_mode & 0o777 for n in os.listdir(out)}
                assert modes == {"config.json": want, weights: want}
    finally:
        os.umask(old)


@_model_1t
def test_model_from_pretrained_refuses_shards_outside_the_directory(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    m = _model_build("llama")
    hf, shard = tmp_path / "hf", "model-00001-of-00001.safetensors"
    m.save_hf(str(hf))
    os.rename(hf / "model.safetensors", hf / shard)
    keys = list(safetensors.load_file(str(hf / shard)))
    index = hf / "model.safetensors.index.json"

    def load(name):
        index.write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(keys, name)}))
        return GPT.from_pretrained(str(hf))

    torch.testing.assert_close(load(shard).state_dict(), m.state_dict())  # reference: a valid index
    # the Hugging Face cache layout: the shard is a symlink to ../../blobs/HASH, which is fine
    (tmp_path / "blobs").mkdir()
    os.replace(hf / shard, tmp_path / "blobs" / "0123abcd")
    os.symlink(os.path.join("..", "blobs", "0123abcd"), hf / shard)
    torch.testing.assert_close(load(shard).state_dict(), m.state_dict())
    # each hostile name points at a loadable copy, so only the check stands between it and the load
    shutil.copy(tmp_path / "blobs" / "0123abcd", tmp_path / "outside.safetensors")
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "blobs" / "0123abcd", tmp_path / "elsewhere" / shard)
    os.symlink(tmp_path / "elsewhere", hf / "link")
    for bad in ("../outside.safetensors", str(tmp_path / "outside.safetensors"), f"link/{shard}"):
        with pytest.raises(ValueError) as e:
            load(bad)
        assert f"{index} lists the shard {bad!r}, which is not a file inside" in str(e.value)


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


# -----------------------------------------------------------------------------
# model.py -> GGUF for llama.cpp (GPT.save_gguf)

try:  # llama.cpp's own GGUF package, a test-only dependency (.ci/run installs it)
    import gguf
except ImportError:
    gguf = None
_needs_gguf = pytest.mark.skipif(gguf is None, reason="needs the gguf package: pip install gguf")

# -----------------------------------------------------------------------------
# Models and a vocabulary

_TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=64)  # with hs=8 and theta=500: all three regimes
_STYLES = {
    "gpt2": dict(_TINY),
    "llama": dict(_TINY, norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=1,
                  tie_embeddings=False),
    # llama.cpp's llama takes optional biases, a tied head and Llama 3.1 scaling (rope_freqs)
    "llama-bias-tied-llama3": dict(_TINY, n_head=4, n_kv_head=2, norm="rmsnorm", mlp="swiglu",
                                   pos="rope", bias=True, tie_embeddings=True, rope_theta=500.0,
                                   rope_scaling=_SCALING, norm_eps=1e-6),
}


def _model(style: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**_STYLES[style])).eval()
    cfg = m.config
    q_and_k = (cfg.n_head + cfg.n_kv_head) * (cfg.n_embd // cfg.n_head)  # rows of c_attn
    with torch.no_grad():  # non-trivial norms and biases, so a swapped or zeroed one shows
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            # subtle: at GPT-2's init (std 0.02) attention is nearly uniform and RoPE hardly
            # matters (a file without the q/k permutation was off by only 5e-4 in llama.cpp);
            # larger q, k make scores of order 1, so a wrong rotation shows in the logits
            if name.endswith("attn.c_attn.weight"):
                p[:q_and_k] *= 10
    return m


def _vocab(n: int = 60) -> dict:
    """n byte-level tokens (fewer than the 64 rows, so save_gguf pads), a few merges."""
    tokens = [chr(0x21 + i) for i in range(n - 4)] + ["Ġthe", "Ġ", "<|endoftext|>", "<|end|>"]
    return {"tokens": tokens, "merges": ["! \"", "Ġ t"], "pre": "llama-bpe",
            "bos_id": n - 2, "eos_id": n - 2, "eot_id": n - 1, "pad_id": 0,
            "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}


def _export(tmp_path, style="llama", dtype="f32", vocab=None):
    m = _model(style)
    path = str(tmp_path / f"{style}-{dtype}.gguf")
    m.save_gguf(path, vocab or _vocab(), dtype)
    return m, path, gguf.GGUFReader(path)


def _fields(reader) -> dict:
    """Every metadata key -> its value, as gguf's reader decodes it (GGUF.* is the header)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _as_torch(t) -> torch.Tensor:
    """A ReaderTensor's values in numpy order (ggml's dims reversed), in its stored dtype."""
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:  # the reader hands back raw bytes
        raw = np.ascontiguousarray(t.data).view(np.int16).reshape(tuple(reversed(t.shape.tolist())))
        return torch.from_numpy(raw.copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(t.data))


def _undo_rope_pairs(w, n_heads):
    """The inverse of model._rope_pairs_adjacent, written independently: row 2j back to j and
    row 2j + 1 back to j + hs/2 inside each head."""
    hs = w.shape[0] // n_heads
    return w.reshape(n_heads, hs // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# -----------------------------------------------------------------------------
# Metadata


@pytest.mark.parametrize("style", sorted(_STYLES))
@_needs_gguf
def test_gguf_metadata_is_every_key_llama_cpp_reads(tmp_path, style):
    m, _, r = _export(tmp_path, style)
    cfg, v = m.config, _vocab()
    arch = "gpt2" if style == "gpt2" else "llama"
    want = {
        "general.architecture": arch, "general.file_type": 0,  # LlamaFileType.ALL_F32
        f"{arch}.context_length": 16, f"{arch}.embedding_length": cfg.n_embd,
        f"{arch}.block_count": 2, f"{arch}.feed_forward_length": model.mlp_hidden_size(cfg),
        f"{arch}.attention.head_count": cfg.n_head,
        f"{arch}.attention.head_count_kv": cfg.n_kv_head, f"{arch}.vocab_size": 64,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
        # 60 tokens padded to the 64 rows with placeholders of type unused (5), as
        # convert_hf_to_gguf.py pads; the special ids are control tokens (3)
        "tokenizer.ggml.tokens": v["tokens"] + ["[PAD60]", "[PAD61]", "[PAD62]", "[PAD63]"],
        "tokenizer.ggml.token_type": [3] + [1] * 57 + [3, 3] + [5] * 4,
        "tokenizer.ggml.merges": v["merges"],
        "tokenizer.ggml.bos_token_id": 58, "tokenizer.ggml.eos_token_id": 58,
        "tokenizer.ggml.eot_token_id": 59, "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": v["chat_template"],
    }
    eps_key = "attention.layer_norm_" + ("epsilon" if arch == "gpt2" else "rms_epsilon")
    if arch == "llama":
        want["llama.rope.freq_base"] = cfg.rope_theta
        want["llama.rope.dimension_count"] = cfg.n_embd // cfg.n_head
    got = _fields(r)
    # GGUF stores the epsilon and base as float32
    assert got.pop(f"{arch}.{eps_key}") == pytest.approx(cfg.norm_eps, rel=1e-6)
    assert got == want
    assert r.fields["GGUF.version"].contents() == 3


@_needs_gguf
def test_gguf_add_bos_and_default_token_types(tmp_path):
    # no token_types: every special id given is a control token; add_bos is written as asked
    v = {"tokens": ["a", "b", "ab", "<|endoftext|>"], "merges": ["a b"], "pre": "gpt-2",
         "bos_id": 3, "add_bos": True}
    _, _, r = _export(tmp_path, "gpt2", vocab=v)
    got = _fields(r)
    assert got["tokenizer.ggml.token_type"] == [1, 1, 1, 3] + [5] * 60
    assert got["tokenizer.ggml.add_bos_token"] is True
    assert "tokenizer.ggml.eos_token_id" not in got and "tokenizer.chat_template" not in got


# -----------------------------------------------------------------------------
# Tensors: names, shapes, dtypes, values


def _llama_cpp_shapes(cfg: GPTConfig) -> dict:
    """name -> ggml dims (ne0 = the input side first), as llama.cpp's load_arch_tensors asks
    for them (src/models/llama.cpp, src/models/gpt2.cpp); optional ones included when ours
    has them. Hand-written from llama.cpp, independent of gguf's name tables."""
    C, V, hs, ff = cfg.n_embd, cfg.vocab_size, cfg.n_embd // cfg.n_head, model.mlp_hidden_size(cfg)
    q, kv = cfg.n_head * hs, cfg.n_kv_head * hs
    out = {"token_embd.weight": [C, V], "output_norm.weight": [C]}
    if not cfg.tie_embeddings:  # tied: llama.cpp reuses token_embd when output is absent
        out["output.weight"] = [C, V]
    if cfg.pos == "learned":
        out |= {"position_embd.weight": [C, cfg.block_size], "output_norm.bias": [C]}
    if cfg.rope_scaling:
        out["rope_freqs.weight"] = [hs // 2]
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        out |= {b + "attn_norm.weight": [C], b + "ffn_norm.weight": [C],
                b + "attn_output.weight": [q, C], b + "ffn_up.weight": [C, ff],
                b + "ffn_down.weight": [ff, C]}
        if cfg.pos == "learned":  # gpt2: one fused q,k,v matrix, every bias required
            out |= {b + "attn_qkv.weight": [C, q + 2 * kv], b + "attn_qkv.bias": [q + 2 * kv],
                    b + "attn_norm.bias": [C], b + "ffn_norm.bias": [C]}
        else:
            out |= {b + "attn_q.weight": [C, q], b + "attn_k.weight": [C, kv],
                    b + "attn_v.weight": [C, kv], b + "ffn_gate.weight": [C, ff]}
            if cfg.bias:
                out |= {b + "attn_q.bias": [q], b + "attn_k.bias": [kv], b + "attn_v.bias": [kv],
                        b + "ffn_gate.bias": [ff]}
        if cfg.bias:
            out |= {b + "attn_output.bias": [C], b + "ffn_up.bias": [ff], b + "ffn_down.bias": [C]}
    return out


def _ours_by_gguf_name(m: GPT) -> dict:
    """Our tensors under the names llama.cpp uses, split and un-permuted by hand here."""
    cfg, sd = m.config, m.state_dict()
    hs = cfg.n_embd // cfg.n_head
    out = {"token_embd.weight": sd["transformer.wte.weight"],
           "output_norm.weight": sd["transformer.ln_f.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    if cfg.pos == "learned":
        out |= {"position_embd.weight": sd["transformer.wpe.weight"],
                "output_norm.bias": sd["transformer.ln_f.bias"]}
    ours = {"attn_norm": "ln_1", "ffn_norm": "ln_2", "attn_output": "attn.c_proj",
            "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj", "ffn_gate": "mlp.c_gate",
            "attn_qkv": "attn.c_attn"}
    for i in range(cfg.n_layer):
        for g, o in ours.items():
            for s in ("weight", "bias"):
                key = f"transformer.h.{i}.{o}.{s}"
                if key in sd and not (g == "attn_qkv" and cfg.pos == "rope"):
                    out[f"blk.{i}.{g}.{s}"] = sd[key]
                elif key in sd:  # Llama: q, k, v stored apart
                    q, k, v = sd[key].split([cfg.n_head * hs, cfg.n_kv_head * hs,
                                             cfg.n_kv_head * hs])
                    out |= {f"blk.{i}.attn_q.{s}": q, f"blk.{i}.attn_k.{s}": k,
                            f"blk.{i}.attn_v.{s}": v}
    return out


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("style", sorted(_STYLES))
@_needs_gguf
def test_gguf_tensors_have_llama_cpp_names_shapes_dtypes_and_our_values(tmp_path, style, dtype):
    m, _, r = _export(tmp_path, style, dtype)
    cfg = m.config
    got = {t.name: t for t in r.tensors}
    want_shapes = _llama_cpp_shapes(cfg)
    assert sorted(got) == sorted(want_shapes)
    assert {n: t.shape.tolist() for n, t in got.items()} == want_shapes
    assert _fields(r)["general.file_type"] == {"f32": 0, "f16": 1, "bf16": 32}[dtype]
    ours = _ours_by_gguf_name(m)
    stored = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for name, t in got.items():
        # convert_hf_to_gguf.py keeps 1-D tensors, norms and position embeddings in f32
        f32 = len(want_shapes[name]) == 1 or name.startswith("position_embd")
        assert t.tensor_type.name == ("F32" if f32 else dtype.upper()), name
        if name == "rope_freqs.weight":
            continue  # derived, not a weight of ours: its own test below
        value = _as_torch(t)
        if ".attn_q." in name or ".attn_k." in name:  # undo llama.cpp's pair layout
            value = _undo_rope_pairs(value, cfg.n_head if ".attn_q." in name else cfg.n_kv_head)
        want = ours[name].to(torch.float32 if f32 else stored)
        assert value.dtype == want.dtype and torch.equal(value, want), name  # bit for bit


@_needs_gguf
def test_gguf_names_agree_with_llama_cpp_arch_tables(tmp_path):
    # every name is one that gguf's MODEL_TENSORS lists for the architecture
    for style in _STYLES:
        _, _, r = _export(tmp_path, style)
        arch = gguf.MODEL_ARCH.GPT2 if style == "gpt2" else gguf.MODEL_ARCH.LLAMA
        allowed = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[arch]
                   for i in range(2)}
        assert {t.name.rsplit(".", 1)[0] for t in r.tensors} <= allowed


# -----------------------------------------------------------------------------
# RoPE: the permuted rows under ggml's rope are our rotate-half RoPE


def _ggml_rope_normal(x, positions, base: float, freq_factors=None):
    """ggml's GGML_ROPE_TYPE_NORMAL (ggml-cpu/ops.cpp: ggml_rope_cache_init + rotate_pairs with
    n_offset 1), with llama.cpp's defaults (freq_scale 1, ext_factor 0, attn_factor 1): pair
    (x[i0], x[i0+1]) of each head turns by p * base^(-i0/n_dims) / freq_factors[i0/2].
    x (T, heads, hs) -> (T, heads, hs), in float64."""
    x = x.double()
    out = x.clone()
    hs = x.shape[-1]
    for i0 in range(0, hs, 2):
        ff = 1.0 if freq_factors is None else float(freq_factors[i0 // 2])
        theta = positions.double() * base ** (-i0 / hs) / ff  # (T,)
        c, s = theta.cos()[:, None], theta.sin()[:, None]  # (T, 1)
        x0, x1 = x[..., i0], x[..., i0 + 1]  # (T, heads)
        out[..., i0] = x0 * c - x1 * s
        out[..., i0 + 1] = x0 * s + x1 * c
    return out


@_needs_gguf
def test_gguf_rope_pair_permutation_maps_rows_as_documented():
    # hs = 4: rotate-half pairs (0, 2) and (1, 3) become adjacent (0, 1) and (2, 3)
    rows = torch.arange(8.0)  # two heads of hs = 4
    assert model._rope_pairs_adjacent(rows, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    w = torch.randn(12, 5)
    torch.testing.assert_close(_undo_rope_pairs(model._rope_pairs_adjacent(w, 3), 3), w,
                               rtol=0, atol=0)


@pytest.mark.parametrize("scaling", [None, _SCALING])
@_needs_gguf
def test_gguf_rope_permutation_under_ggml_rope_equals_our_rope(scaling):
    # the numerical proof: ggml's normal RoPE on the permuted rows == our rotate-half RoPE with
    # its output rows permuted, so q.k (all attention reads) is the same in llama.cpp and here
    torch.manual_seed(0)
    T, nh, hs, base = 16, 3, 8, 500.0
    cos, sin = model.rope_tables(T, hs, base, scaling)  # (T, hs)
    q = torch.randn(T, nh, hs, dtype=torch.float64)
    k = torch.randn(T, nh, hs, dtype=torch.float64)
    ours_q = model.apply_rope(q.transpose(0, 1), cos.double(), sin.double()).transpose(0, 1)
    ours_k = model.apply_rope(k.transpose(0, 1), cos.double(), sin.double()).transpose(0, 1)
    perm = lambda x: model._rope_pairs_adjacent(x.reshape(T, nh * hs).T, nh).T.reshape(T, nh, hs)
    ff = None
    if scaling:  # the factors save_gguf writes, checked against the converter below
        ff = model._rope_factors(GPTConfig(**dict(_TINY, n_embd=nh * hs, n_head=nh, pos="rope",
                                                  norm="rmsnorm", mlp="swiglu",
                                                  rope_theta=base, rope_scaling=scaling)))
    pos = torch.arange(T)
    ggml_q = _ggml_rope_normal(perm(q), pos, base, ff)  # (T, nh, hs)
    ggml_k = _ggml_rope_normal(perm(k), pos, base, ff)
    torch.testing.assert_close(ggml_q, perm(ours_q), atol=1e-6, rtol=1e-6)
    scores = lambda a, b: torch.einsum("thd,shd->hts", a, b)  # (nh, T, T)
    torch.testing.assert_close(scores(ggml_q, ggml_k), scores(ours_q, ours_k), atol=1e-5, rtol=1e-6)
    # and the permutation is not a no-op here: the unpermuted rows give other values
    assert not torch.allclose(_ggml_rope_normal(q, pos, base, ff), ours_q, atol=1e-3)


@_needs_gguf
def test_gguf_rope_freqs_follow_the_converter_formula(tmp_path):
    # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: per pair, 1 where the wave is
    # shorter than original/high_freq_factor, factor where longer than original/low, a blend
    m, _, r = _export(tmp_path, "llama-bias-tied-llama3")
    cfg = m.config
    hs = cfg.n_embd // cfg.n_head
    s = cfg.rope_scaling
    low_wave = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wave = s["original_max_position_embeddings"] / s["high_freq_factor"]
    want = []
    for i in range(0, hs, 2):
        wave = 2 * math.pi * cfg.rope_theta ** (i / hs)
        if wave < high_wave:
            want.append(1.0)
        elif wave > low_wave:
            want.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wave - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            want.append(1 / ((1 - smooth) / s["factor"] + smooth))
    got = _as_torch(next(t for t in r.tensors if t.name == "rope_freqs.weight"))
    assert len(set(want)) > 2  # the three regimes all occur at this size
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# The whole file, run the way llama.cpp's graphs compute, gives our logits


def _llama_cpp_reference_logits(path: str, ids: list) -> torch.Tensor:
    """Logits (T, V) of a forward pass that reads only the GGUF file: llama.cpp's llm_build
    graphs for gpt2 and llama as written in src/models/*.cpp and llama-graph.cpp (pre-norm
    blocks, build_qkv's q, k, v split, ggml's normal RoPE, query head h reading kv head
    h // (nh / nkv), build_ffn's GELU or SiLU-gated MLP), in float64."""
    r = gguf.GGUFReader(path)
    meta = _fields(r)
    W = {t.name: _as_torch(t).double() for t in r.tensors}
    arch = meta["general.architecture"]
    C, L = meta[f"{arch}.embedding_length"], meta[f"{arch}.block_count"]
    nh, nkv = meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]
    hs, T = C // nh, len(ids)
    eps = meta.get(f"{arch}.attention.layer_norm_epsilon",
                   meta.get(f"{arch}.attention.layer_norm_rms_epsilon"))

    def lin(x, name):  # ggml_mul_mat(w, x) + optional bias
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    def norm(x, name):  # LLM_NORM (LayerNorm) for gpt2, LLM_NORM_RMS for llama
        if arch == "gpt2":
            var = x.var(-1, unbiased=False, keepdim=True)
            x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(var + eps)
            return x * W[name + ".weight"] + W[name + ".bias"]
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * W[name + ".weight"]

    pos = torch.arange(T)
    x = W["token_embd.weight"][ids]  # (T, C)
    if arch == "gpt2":
        x = x + W["position_embd.weight"][pos]
    for i in range(L):
        b = f"blk.{i}."
        h = norm(x, b + "attn_norm")
        if arch == "gpt2":
            q, k, v = lin(h, b + "attn_qkv").split([nh * hs, nkv * hs, nkv * hs], -1)
        else:
            q, k, v = lin(h, b + "attn_q"), lin(h, b + "attn_k"), lin(h, b + "attn_v")
        q, k, v = q.view(T, nh, hs), k.view(T, nkv, hs), v.view(T, nkv, hs)
        if arch == "llama":
            ff = W.get("rope_freqs.weight")
            q = _ggml_rope_normal(q, pos, meta["llama.rope.freq_base"], ff)
            k = _ggml_rope_normal(k, pos, meta["llama.rope.freq_base"], ff)
        heads = []
        for hq in range(nh):
            hk = hq // (nh // nkv)
            att = q[:, hq] @ k[:, hk].T / math.sqrt(hs)  # (T, T)
            att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            heads.append(att.softmax(-1) @ v[:, hk])  # (T, hs)
        x = x + lin(torch.cat(heads, -1), b + "attn_output")
        h = norm(x, b + "ffn_norm")
        if arch == "gpt2":
            h = F.gelu(lin(h, b + "ffn_up"), approximate="tanh")  # ggml_gelu is the tanh form
        else:
            h = F.silu(lin(h, b + "ffn_gate")) * lin(h, b + "ffn_up")
        x = x + lin(h, b + "ffn_down")
    x = norm(x, "output_norm")
    return x @ W.get("output.weight", W["token_embd.weight"]).T  # (T, V)


@pytest.mark.parametrize("style", sorted(_STYLES))
@_needs_gguf
def test_gguf_file_run_as_llama_cpp_computes_gives_our_logits(tmp_path, style):
    m, path, _ = _export(tmp_path, style)
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = m(ids, ids)[0][0]  # (T, V)
    got = _llama_cpp_reference_logits(path, ids[0].tolist())
    torch.testing.assert_close(got.float(), want, atol=1e-6, rtol=0)  # measured 9e-8


@pytest.mark.parametrize("dtype, atol", [("f32", 3e-4), ("f16", 3e-4), ("bf16", 3e-3)])
@_needs_gguf
def test_gguf_runs_in_llama_cpp_itself(tmp_path, dtype, atol):
    # the real thing, where llama-cpp-python (llama.cpp's C++ behind a Python API) is installed.
    # Measured (llama-cpp-python 0.3.36, CPU): f32 within 3.1e-5 (llama.cpp keeps K and V in
    # f16), f16 4.2e-5, bf16 7.7e-4 (ggml rounds activations to bf16 too); leaving the q/k
    # permutation out moved the llama logits by 5.6e-2, the llama3 ones by 6.0e-3
    llama_cpp = pytest.importorskip("llama_cpp")
    ids = torch.randint(0, 58, (1, 16), generator=torch.Generator().manual_seed(2))
    for style in _STYLES:
        m, path, _ = _export(tmp_path, style, dtype)
        with torch.no_grad():  # the reference: our model with the file's rounded weights
            for name, p in m.named_parameters():
                if p.dim() == 2 and "wpe" not in name:  # what save_gguf stores in dtype
                    p.copy_(p.to(getattr(torch, {"f32": "float32", "f16": "float16",
                                                 "bf16": "bfloat16"}[dtype])).float())
            want = m(ids, ids)[0][0]  # (T, V)
        llm = llama_cpp.Llama(model_path=path, n_ctx=16, logits_all=True, verbose=False,
                              n_threads=1, seed=0)
        llm.eval(ids[0].tolist())
        got = torch.tensor(np.array(llm.scores[: ids.shape[1]]), dtype=torch.float32)
        torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=f"{style} {dtype}")
        # its tokenizer loaded too: text -> our ids, without a BOS since add_bos is False
        assert llm.tokenize(b'!"#', add_bos=True) == [0, 1, 2]
        assert llm.token_eos() == 58


# -----------------------------------------------------------------------------
# Refusals, each before anything is written


@pytest.mark.parametrize("change, fragment", [
    (dict(norm="rmsnorm"), "norm=rmsnorm, mlp=gelu, pos=learned"),  # learned positions + RMSNorm
    (dict(pos="rope"), "pos=rope"),  # RoPE with LayerNorm and GELU
    (dict(norm="rmsnorm", mlp="gelu", pos="rope", bias=False), "mlp=gelu"),  # Llama without SwiGLU
    (dict(bias=False), "bias=False"),  # llama.cpp's gpt2 requires every bias
    (dict(n_head=4, n_kv_head=2), "n_kv_head=2"),  # GQA in the GPT-2 layout
])
@_needs_gguf
def test_gguf_refuses_configs_no_llama_cpp_architecture_holds(tmp_path, change, fragment):
    m = GPT(GPTConfig(**{**_TINY, **change}))
    path = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match="GGUF export needs") as e:
        m.save_gguf(str(path), _vocab())
    assert fragment in str(e.value) and "train with one of those" in str(e.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad, fragment", [
    ({"dtype": "q8_0"}, "dtype='q8_0'"),
    ({"drop": "pre"}, "lacks 'pre'"),
    ({"set": ("merge", [])}, "unknown key 'merge'"),
    ({"set": ("tokens", [str(i) for i in range(65)])}, "65 tokens but the model only 64"),
    ({"set": ("pre", "gpt2")}, "called 'gpt-2'"),
    ({"set": ("eos_id", 99)}, "eos_id=99"),
    ({"set": ("token_types", [1, 3])}, "2 token_types"),
    ({"set": ("tokens", [b"a"] * 4)}, "must be strings"),
])
@_needs_gguf
def test_gguf_refuses_bad_arguments_in_one_sentence(tmp_path, bad, fragment):
    m = _model("llama")
    v = _vocab()
    if "drop" in bad:
        del v[bad["drop"]]
    if "set" in bad:
        v[bad["set"][0]] = bad["set"][1]
    with pytest.raises(ValueError, match="^[^\n]*$") as e:
        m.save_gguf(str(tmp_path / "m.gguf"), v, bad.get("dtype", "f32"))
    assert fragment in str(e.value)
    assert os.listdir(tmp_path) == []


def test_gguf_missing_package_says_pip_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(RuntimeError, match="pip install gguf"):
        _model("gpt2").save_gguf(str(tmp_path / "m.gguf"), _vocab())
    assert os.listdir(tmp_path) == []


@_needs_gguf
def test_gguf_write_is_atomic(tmp_path, monkeypatch):
    # a failure while writing leaves the previous file whole; a success replaces it
    m = _model("llama")
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")

    def boom(self, *a, **k):
        raise OSError("disk full")

    with monkeypatch.context() as mp:
        mp.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
        with pytest.raises(OSError):
            m.save_gguf(str(path), _vocab())
    assert path.read_bytes() == b"old"
    m.save_gguf(str(path), _vocab())
    assert gguf.GGUFReader(str(path)).fields["general.architecture"].contents() == "llama"
    assert os.listdir(tmp_path) == ["m.gguf"]  # the new .tmp was renamed over it


@_needs_gguf
def test_gguf_llama_cpp_tokenizes_like_our_tokenizer(tmp_path):
    # the vocab as sample.py builds it from a trained Tokenizer (tokenizer.py's hf_vocab and
    # gguf_pre_name): llama.cpp splits and merges text into our very ids, for both regexes
    llama_cpp = pytest.importorskip("llama_cpp")
    import sample
    from tokenizer import Tokenizer
    text = "def hello(x):\n    return x + 42  # héllo 世界 !!\n\n" * 20 + "The cat sat. " * 30
    for pattern in ("gpt4", "gpt2"):
        tok = Tokenizer.train(text, vocab_size=300, pattern=pattern)
        m = GPT(GPTConfig(**dict(_STYLES["llama"], vocab_size=320, block_size=64)))
        path = str(tmp_path / f"{pattern}.gguf")
        m.save_gguf(path, sample.gguf_vocab(tok, 320))
        llm = llama_cpp.Llama(model_path=path, n_ctx=64, verbose=False, n_threads=1)
        s = "def cat(y):  # 世界 sat!\n\treturn 7\n"
        ids = llm.tokenize(s.encode(), add_bos=False, special=False)
        assert ids == tok.encode(s), pattern
        assert llm.detokenize(ids).decode() == s
        assert llm.token_eos() == tok.eot_id


# -----------------------------------------------------------------------------
# train.py: pretraining

# Tests for train.py: tiny models on a tiny stdlib-source dataset built in a temporary directory.


_TRAIN_ROOT = os.path.dirname(os.path.abspath(__file__))


def _train_write_dataset(path, tok, train_ids, val_ids, train_text, val_text):
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.bpe"))
    write_shard(os.path.join(path, "train_000.bin"), train_ids)
    write_shard(os.path.join(path, "val_000.bin"), val_ids)
    with open(os.path.join(path, "tokenizer.bpe"), "rb") as f:
        sha = __import__("hashlib").sha256(f.read()).hexdigest()
    split = lambda ids, text, name: {"documents": 1, "tokens": len(ids), "bytes": len(text.encode()), "shards": [name]}
    meta = {"dataset": "tiny", "fingerprint": "test", "tokenizer_file": "tokenizer.bpe", "tokenizer_sha256": sha,
            "vocab_size": tok.n_vocab, "eot_id": tok.eot_id, "dtype": "uint16",
            "splits": {"train": split(train_ids, train_text, "train_000.bin"), "val": split(val_ids, val_text, "val_000.bin")},
            "cleaning": {}}
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    return str(path)


@pytest.fixture(scope="module")
def _train_data(tmp_path_factory):
    """A ~40 KB dataset (stdlib source) with a 300-token BPE: (data_dir, tokenizer)."""
    text = _stdlib_text(40000)
    tok = Tokenizer.train(text[:20000], 300)
    train_text, val_text = text[:36000], text[36000:]
    train_ids = [tok.eot_id] + tok.encode(train_text)
    val_ids = [tok.eot_id] + tok.encode(val_text)
    path = _train_write_dataset(tmp_path_factory.mktemp("traindata") / "tiny", tok, train_ids, val_ids, train_text, val_text)
    return path, tok


def _train_cfg(data_dir, out_dir, **kw):
    base = dict(dataset=data_dir, out_dir=str(out_dir), device="cpu", n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                block_size=32, batch_size=4, max_steps=6, warmup_steps=2, learning_rate=3e-3, eval_interval=3,
                eval_batches=2, log_interval=100, sample_tokens=0, dropout=0.0)
    base.update(kw)
    return train.TrainConfig(**base)


def _train_weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)["model"]


# -----------------------------------------------------------------------------


def test_train_loss_falls_and_checkpoint_reloads(_train_data, tmp_path):
    data_dir, tok = _train_data
    out = tmp_path / "out"
    s = train.train(_train_cfg(data_dir, out, max_steps=40, eval_interval=20, sample_tokens=8))
    # reference: the same fixed validation windows scored by the untrained model with the same seed
    torch.manual_seed(1337)
    fresh = train.GPT(train.resolve_model_config(_train_cfg(data_dir, out), tok.n_vocab))
    before = train.evaluate_bpb(fresh, data_dir, batch_size=4, max_windows=8)
    assert before["loss"] == pytest.approx(math.log(fresh.config.vocab_size), abs=0.3)  # init ~ uniform
    assert s["val_loss"] < before["loss"] - 1.0 and s["step"] == 40
    # the checkpoint loads with weights_only=True and reproduces the reported validation loss
    ck = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert {"model", "model_config", "config", "optimizer", "step", "tokens_seen", "data_position", "rng",
            "best_val_loss", "tokenizer", "vocab_size", "dataset"} <= set(ck)
    assert not any(k.startswith("_orig_mod.") for k in ck["model"])
    assert ck["vocab_size"] == tok.n_vocab and ck["model_config"]["vocab_size"] % 64 == 0
    model, _ = train.load_checkpoint(str(out / "ckpt.pt"))
    again = train.evaluate_bpb(model, data_dir, batch_size=4, max_windows=8)
    assert again["loss"] == pytest.approx(s["val_loss"], abs=1e-5)
    meta = json.load(open(os.path.join(data_dir, "meta.json")))["splits"]["val"]
    assert s["val_bpb"] == pytest.approx(s["val_loss"] / math.log(2) * meta["tokens"] / meta["bytes"])
    # outputs: best.pt, the tokenizer copy, the log and the plot
    assert open(out / "tokenizer.bpe", "rb").read() == open(os.path.join(data_dir, "tokenizer.bpe"), "rb").read()
    assert os.path.exists(out / "best.pt") and "<polyline" in open(out / "loss.svg").read()
    rows = [json.loads(l) for l in open(out / "log.jsonl")]
    assert rows[-1]["val_loss"] == pytest.approx(s["val_loss"]) and any("norm" in r for r in rows)


def test_train_overfits_one_batch(_train_data, tmp_path):
    data_dir, tok = _train_data
    one = tmp_path / "one"
    ids = [tok.eot_id] + tok.encode("To be, or not to be, that is the question: whether 'tis nobler in the mind")[:32]
    _train_write_dataset(one, tok, ids, ids, "x" * 90, "x" * 90)  # one window of 32+1 tokens: every batch is that window
    s = train.train(_train_cfg(str(one), tmp_path / "o", max_steps=150, learning_rate=1e-2, warmup_steps=5, min_lr_ratio=1.0,
                               eval_interval=150, eval_batches=1))
    assert s["train_loss"] < 0.05, s


def test_train_accumulation_and_checkpointing_give_same_gradients(_train_data):
    data_dir, tok = _train_data
    cfg = _train_cfg(data_dir, "unused")
    meta = train.load_meta(data_dir)
    data = train.TokenWindows(data_dir, meta, "train", 32, seed=1)
    torch.manual_seed(0)
    model = train.GPT(train.resolve_model_config(cfg, tok.n_vocab))
    batch_fn = lambda lo, hi: train.to_device(data.rows_at(0, lo, hi, 8, "random"), torch.device("cpu"))

    def grads(micro_bs, accum, ckpt=False):
        model.zero_grad(set_to_none=True)
        model.grad_checkpoint = ckpt
        loss = train.accumulate_gradients(model, batch_fn, micro_bs, accum, __import__("contextlib").nullcontext())
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    ref_loss, ref = grads(8, 1)
    for micro_bs, accum, ckpt in ((4, 2, False), (1, 8, False), (8, 1, True), (2, 4, True)):
        loss, g = grads(micro_bs, accum, ckpt)
        assert loss == pytest.approx(ref_loss, abs=1e-6)
        for a, b in zip(ref, g):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_train_resume_is_bit_identical(_train_data, tmp_path):
    data_dir, _ = _train_data
    kw = dict(max_steps=8, eval_interval=4, dropout=0.1, log_interval=1, optimizer="adamw")  # Muon: its own test
    straight = train.train(_train_cfg(data_dir, tmp_path / "a", **kw))
    train.train(_train_cfg(data_dir, tmp_path / "b", stop_step=4, **kw))
    resumed = train.train(_train_cfg(data_dir, tmp_path / "b", resume=True, **kw))
    assert resumed["step"] == straight["step"] == 8
    wa, wb = _train_weights(tmp_path / "a"), _train_weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    loss = lambda d: [r["loss"] for r in map(json.loads, open(d / "log.jsonl")) if "loss" in r]
    assert loss(tmp_path / "a") == loss(tmp_path / "b") and len(loss(tmp_path / "a")) == 8
    assert resumed["val_loss"] == straight["val_loss"]


def test_train_sequential_sampling_resumes_too(_train_data, tmp_path):
    data_dir, _ = _train_data
    kw = dict(max_steps=4, eval_interval=2, sampling="sequential")
    train.train(_train_cfg(data_dir, tmp_path / "a", **kw))
    train.train(_train_cfg(data_dir, tmp_path / "b", stop_step=2, **kw))
    train.train(_train_cfg(data_dir, tmp_path / "b", resume=True, **kw))
    wa, wb = _train_weights(tmp_path / "a"), _train_weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_train_oom_fallback_keeps_global_batch(_train_data, tmp_path, monkeypatch):
    data_dir, _ = _train_data
    ref = train.train(_train_cfg(data_dir, tmp_path / "ref", max_steps=3, batch_size=4))
    monkeypatch.setitem(train.FAULTS, "oom", 1)  # the first micro-step raises a CUDA-style OOM
    s = train.train(_train_cfg(data_dir, tmp_path / "oom", max_steps=3, batch_size=4))
    assert (s["batch_size"], s["grad_accum"]) == (2, 2) and (ref["batch_size"], ref["grad_accum"]) == (4, 1)
    wa, wb = _train_weights(tmp_path / "ref"), _train_weights(tmp_path / "oom")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
    monkeypatch.setitem(train.FAULTS, "oom", 100)
    with pytest.raises(RuntimeError, match="out of memory with micro-batch 1"):
        train.train(_train_cfg(data_dir, tmp_path / "oom2", max_steps=3, batch_size=4))


def test_train_nan_step_is_skipped(_train_data, tmp_path, monkeypatch):
    data_dir, _ = _train_data
    train.train(_train_cfg(data_dir, tmp_path / "ref", max_steps=4, stop_step=2))
    monkeypatch.setitem(train.FAULTS, "nan_steps", (2, 3))  # the last two steps see a NaN loss
    s = train.train(_train_cfg(data_dir, tmp_path / "nan", max_steps=4))
    assert s["skipped_steps"] == 2 and s["step"] == 4 and math.isfinite(s["val_loss"])
    wa, wb = _train_weights(tmp_path / "ref"), _train_weights(tmp_path / "nan")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # no update at all from the skipped steps
    # three in a row: reload the last checkpoint (step 3) with half the learning rate
    monkeypatch.setitem(train.FAULTS, "nan_steps", (3, 4, 5))
    s = train.train(_train_cfg(data_dir, tmp_path / "nan3", max_steps=8, eval_interval=3))
    ck = torch.load(tmp_path / "nan3" / "ckpt.pt", weights_only=True)
    assert s["skipped_steps"] == 3 and ck["lr_scale"] == 0.5 and math.isfinite(s["val_loss"])
    monkeypatch.setitem(train.FAULTS, "nan_steps", (0, 1, 2))  # no checkpoint yet: a clear stop
    with pytest.raises(RuntimeError, match="diverged"):
        train.train(_train_cfg(data_dir, tmp_path / "nan4", max_steps=8, eval_interval=5))


def _torchrun(script, out_dir, args):
    """script under torchrun as 2 CPU processes (gloo) writing out_dir; the finished run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
           f"--out_dir={out_dir}", *args]
    r = subprocess.run(cmd, cwd=_TRAIN_ROOT, env=env, capture_output=True, text=True, timeout=120)
    first = r.stdout[-1500:] + r.stderr[-1500:]
    if r.returncode != 0 and "Signal 6 (SIGABRT)" in r.stderr:
        # subtle: about one full-suite run in eight on 2 busy cores, a gloo child has died of
        # SIGABRT (never when this test runs alone); one retry, and both outputs if it fails
        # again. Recorded for the DDP issue: the cause is not known yet.
        shutil.rmtree(out_dir, ignore_errors=True)
        r = subprocess.run(cmd, cwd=_TRAIN_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, first + "\n--- retry ---\n" + r.stdout[-1500:] + r.stderr[-1500:]
    return r


def test_train_ddp_two_processes_match_one(_train_data, tmp_path):
    data_dir, _ = _train_data
    args = [f"--dataset={data_dir}", "--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
            "--batch_size=2", "--total_batch_size=128", "--max_steps=3", "--warmup_steps=1", "--eval_interval=3", "--learning_rate=3e-3",
            "--eval_batches=2", "--sample_tokens=0", "--dropout=0.0"]
    r = _torchrun("train.py", tmp_path / "ddp", args)
    assert "2 processes x 1 accumulation" in r.stdout
    one = train.train(_train_cfg(data_dir, tmp_path / "one", batch_size=2, total_batch_size=128, max_steps=3,
                                 warmup_steps=1, eval_interval=3))
    assert one["grad_accum"] == 2
    wa, wb = _train_weights(tmp_path / "one"), _train_weights(tmp_path / "ddp")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original"])
def test_train_muon32_matches_torch_muon(adjust):
    # reference: torch.optim.Muon itself (Newton-Schulz in bfloat16), so agreement is to bf16 precision
    torch.manual_seed(0)
    shapes = [(96, 32), (32, 96), (32, 32), (96, 32)]  # tall, wide, square, and two of one shape (batched)
    ours = [torch.randn(s) for s in shapes]
    ref, start = [p.clone() for p in ours], [p.clone() for p in ours]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn=adjust)
    o1, o2 = train.Muon32([{"params": ours}], **kw), torch.optim.Muon([{"params": ref}], **kw)
    for _ in range(3):
        for a, b in zip(ours, ref):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        o1.step()
        o2.step()
    for a, b, s in zip(ours, ref, start):
        assert ((a - s) - (b - s)).norm() / (b - s).norm() < 2e-2
    # the state is torch.optim.Muon's, so a checkpoint moves between the two
    o2.load_state_dict(o1.state_dict())
    assert torch.equal(o2.state[ref[0]]["momentum_buffer"], o1.state[ours[0]]["momentum_buffer"])


def test_train_muon_run_learns_and_resumes(_train_data, tmp_path):
    data_dir, _ = _train_data
    kw = dict(optimizer="muon", max_steps=16, eval_interval=8, log_interval=1)
    straight = train.train(_train_cfg(data_dir, tmp_path / "a", **kw))
    train.train(_train_cfg(data_dir, tmp_path / "b", stop_step=8, **kw))
    resumed = train.train(_train_cfg(data_dir, tmp_path / "b", resume=True, **kw))
    wa, wb = _train_weights(tmp_path / "a"), _train_weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and resumed["val_loss"] == straight["val_loss"]
    ck = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert ck["optimizer_muon"]["state"] and ck["config"]["optimizer"] == "muon"
    first = json.loads(open(tmp_path / "a" / "log.jsonl").readline())["loss"]
    assert straight["train_loss"] < first - 0.5, (first, straight["train_loss"])
    with pytest.raises(ValueError, match="--optimizer=muon"):  # an AdamW run cannot resume a Muon checkpoint
        train.train(_train_cfg(data_dir, tmp_path / "a", optimizer="adamw", resume=True, max_steps=20, eval_interval=8))


def test_train_device_defaults_keep_explicit_choices():
    cpu = torch.device("cpu")
    d = train.resolve_config(train.TrainConfig(), cpu)
    assert (d.optimizer, d.schedule, d.decay_frac, d.batch_size) == ("muon", "wsd", 0.4, 16)
    e = train.resolve_config(train.TrainConfig(optimizer="adamw", schedule="cosine", learning_rate=1e-3), cpu)
    assert (e.optimizer, e.schedule, e.learning_rate) == ("adamw", "cosine", 1e-3)
    g = train.resolve_config(train.TrainConfig(), torch.device("cuda"))  # resolves names only; touches no GPU
    assert (g.optimizer, g.schedule, g.preset) == ("adamw", "cosine", "gpt2")
    import platform
    if platform.libc_ver()[0] == "glibc":  # mallopt is glibc's; elsewhere it is a no-op returning False
        assert train.keep_freed_memory() is True


def test_train_schedule_shapes():
    cfg = train.TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert train.lr_factor(0, cfg) == pytest.approx(0.1) and train.lr_factor(9, cfg) == pytest.approx(1.0)
    assert train.lr_factor(10, cfg) == pytest.approx(1.0) and train.lr_factor(100, cfg) == pytest.approx(0.1)
    assert train.lr_factor(55, cfg) == pytest.approx(0.55)  # cosine midpoint: halfway between 1 and 0.1
    assert train.lr_factor(20, cfg, time_frac=0.5) == pytest.approx(0.55)  # the clock can run ahead of the steps
    w = train.TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_frac=0.2)
    assert train.lr_factor(79, w) == 1.0 and train.lr_factor(90, w) == pytest.approx(0.5)


def test_train_bad_inputs(_train_data, tmp_path, monkeypatch):
    data_dir, tok = _train_data
    # config errors through the command line: one sentence, non-zero exit
    with pytest.raises(SystemExit) as e:
        train.main(["--learning_rat=1e-3"])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="not a multiple"):
        train.train(_train_cfg(data_dir, tmp_path / "x", total_batch_size=100))
    with pytest.raises(ValueError, match="block_size"):
        train.train(_train_cfg(data_dir, tmp_path / "x", block_size=4096))
    with pytest.raises(ValueError, match="--optimizer=sgd is not one of adamw, muon"):
        train.train(_train_cfg(data_dir, tmp_path / "x", optimizer="sgd"))
    with pytest.raises(ValueError, match="--decay_frac=1.5 must be in"):
        train.train(_train_cfg(data_dir, tmp_path / "x", schedule="wsd", decay_frac=1.5))
    open(tmp_path / "file", "w").close()
    with pytest.raises(RuntimeError, match="cannot write"):
        train.train(_train_cfg(data_dir, tmp_path / "file" / "out"))
    # resuming with another model shape
    train.train(_train_cfg(data_dir, tmp_path / "r", max_steps=2, eval_interval=2))
    with pytest.raises(ValueError, match="n_layer=2 \\(now 3\\)"):
        train.train(_train_cfg(data_dir, tmp_path / "r", max_steps=4, n_layer=3, resume=True))
    # a full disk while saving: clear error, the previous checkpoint intact
    before = open(tmp_path / "r" / "ckpt.pt", "rb").read()

    def full_disk(obj, path):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train.torch, "save", full_disk)
    with pytest.raises(RuntimeError, match="No space left"):
        train.train(_train_cfg(data_dir, tmp_path / "r", max_steps=4, eval_interval=2, resume=True))
    monkeypatch.undo()
    assert open(tmp_path / "r" / "ckpt.pt", "rb").read() == before and not os.path.exists(tmp_path / "r" / "ckpt.pt.tmp")
    # a corrupt shard and a tokenizer that is not the data's
    bad = tmp_path / "bad"
    _train_write_dataset(bad, tok, [1, 2, 3] * 100, [1, 2, 3] * 100, "a" * 300, "a" * 300)
    with open(bad / "train_000.bin", "r+b") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(ValueError):
        train.train(_train_cfg(str(bad), tmp_path / "y"))
    _train_write_dataset(bad, tok, [1, 2, 3] * 100, [1, 2, 3] * 100, "a" * 300, "a" * 300)
    Tokenizer.train("something else entirely " * 50, 280).save(str(bad / "tokenizer.bpe"))
    with pytest.raises(ValueError, match="tokenizer"):
        train.train(_train_cfg(str(bad), tmp_path / "y"))
    r = subprocess.run([sys.executable, "train.py", f"--dataset={tmp_path / 'nowhere'}", "--device=cpu"],
                       cwd=_TRAIN_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_train_sigterm_saves_and_exits_cleanly(_train_data, tmp_path):
    data_dir, _ = _train_data
    out = tmp_path / "sig"
    cmd = [sys.executable, "train.py", f"--dataset={data_dir}", f"--out_dir={out}", "--device=cpu", "--n_layer=1",
           "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=2", "--max_steps=100000", "--log_interval=1",
           "--eval_interval=100000", "--sample_tokens=0", "--eval_batches=1"]
    p = subprocess.Popen(cmd, cwd=_TRAIN_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (os.path.exists(out / "log.jsonl") and os.path.getsize(out / "log.jsonl") > 0):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert "got SIGTERM" in stdout and 0 < ck["step"] < 100000


def test_train_prepares_a_missing_dataset_in_process(tmp_path):
    # a text file as --dataset: train.py runs prepare.py's pipeline on it first, then trains
    (tmp_path / "plays.txt").write_text(_stdlib_text(30000), encoding="utf-8")
    s = train.train(train.TrainConfig(dataset=str(tmp_path / "plays.txt"), data_dir=str(tmp_path / "data"),
                                      out_dir=str(tmp_path / "out"), device="cpu", n_layer=1, n_embd=32, n_head=2,
                                      block_size=16, batch_size=2, max_steps=2, eval_batches=1, sample_tokens=4))
    meta = json.load(open(tmp_path / "data" / "plays" / "meta.json"))
    ck = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert s["step"] == 2 and ck["vocab_size"] == meta["vocab_size"] and ck["dataset"] == str(tmp_path / "data" / "plays")


def test_train_best_pt_follows_the_final_evaluation(_train_data, tmp_path):
    # a run stopped by --max_minutes before its first evaluation: the evaluation at the stop
    # must still write best.pt, and best.pt must be that very checkpoint
    data_dir, _ = _train_data
    out = tmp_path / "out"
    s = train.train(_train_cfg(data_dir, out, max_steps=100000, eval_interval=100000, max_minutes=0.01))
    assert s["stop_reason"].startswith("reached max_minutes") and 0 < s["step"] < 100000
    best = torch.load(out / "best.pt", weights_only=True)
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert best["step"] == ck["step"] == ck["best_step"] == s["step"]
    assert best["best_val_loss"] == s["val_loss"] == s["best_val_loss"]
    assert all(torch.equal(best["model"][k], ck["model"][k]) for k in ck["model"])


def test_train_fresh_run_clears_an_earlier_runs_files(_train_data, tmp_path, capsys):
    data_dir, _ = _train_data
    out = tmp_path / "out"
    train.train(_train_cfg(data_dir, out, max_steps=6, eval_interval=3))
    (out / "ckpt.pt.tmp").write_bytes(b"left by a crash")
    old_run = torch.load(out / "best.pt", weights_only=True)["run_id"]
    capsys.readouterr()
    train.train(_train_cfg(data_dir, out, max_steps=2, eval_interval=100))
    assert "holds an earlier run" in capsys.readouterr().out
    best = torch.load(out / "best.pt", weights_only=True)
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert best["run_id"] == ck["run_id"] != old_run and best["step"] == 2
    assert max(json.loads(line)["step"] for line in open(out / "log.jsonl")) == 2
    assert not (out / "ckpt.pt.tmp").exists()


def test_train_resume_continues_the_clock(_train_data, tmp_path):
    data_dir, _ = _train_data
    out = tmp_path / "out"
    kw = dict(max_steps=8, eval_interval=3, log_interval=1, max_minutes=1.0, schedule="wsd", decay_frac=0.5,
              min_lr_ratio=0.0, optimizer="adamw")
    train.train(_train_cfg(data_dir, out, stop_step=3, **kw))
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert 0 < ck["elapsed"] < 60

    def resume_at(seconds):  # pretend the first part of the run took `seconds` of the 60 s budget
        ck["elapsed"] = seconds
        torch.save(ck, out / "ckpt.pt")
        return train.train(_train_cfg(data_dir, out, resume=True, **kw))

    # 45 of 60 s gone: wsd with decay_frac 0.5 is 3/4 of the way, so the lr is about half the peak;
    # a clock that restarted would be at 3/8 of the steps, still at the peak
    s = resume_at(45.0)
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    first = next(r for r in rows if r["step"] == 4 and "lr" in r)
    assert 0.3 * 3e-3 < first["lr"] < 0.55 * 3e-3 and first["time"] >= 45.0
    # the rate counts from the resume, not from the run's first token
    assert first["tok_per_s"] == pytest.approx((first["tokens"] - ck["tokens_seen"]) / first["train_time"])
    # the whole budget already spent: the resumed run stops at once
    s = resume_at(60.0)
    assert s["step"] == 3 and s["stop_reason"] == "reached max_minutes=1.0"


def test_train_nonfinite_reload_refuses_another_runs_checkpoint(_train_data, tmp_path, monkeypatch):
    data_dir, _ = _train_data
    train.train(_train_cfg(data_dir, tmp_path / "other", max_steps=2, eval_interval=2))
    foreign = str(tmp_path / "other" / "ckpt.pt")
    # while this run saves its own ckpt.pt, another run's file takes its place
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith("ckpt.pt.tmp"):
            shutil.copyfile(foreign, src)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setitem(train.FAULTS, "nan_steps", (3, 4, 5))
    with pytest.raises(RuntimeError, match="not written by this run"):
        train.train(_train_cfg(data_dir, tmp_path / "out", max_steps=8, eval_interval=2))


def _train_fake_cuda(monkeypatch, capability, calls):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))

    def get_capability(d=None):
        calls.append(("capability", str(d)))
        return capability

    def no_emulation_probe(*a, **k):
        raise AssertionError("is_bf16_supported() counts emulated bf16; use the compute capability")

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", no_emulation_probe)


@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_train_cuda_dtype_from_compute_capability(monkeypatch, capability, dtype):
    # V100 (7.0) and T4 (7.5) emulate bf16: fp16 with a GradScaler; A100 (8.0) and H100 (9.0): bf16
    calls = []
    _train_fake_cuda(monkeypatch, capability, calls)
    device, got, why = train.choose_device(train.TrainConfig(), local_rank=1)
    assert str(device) == "cuda:1" and got == dtype and f"{capability[0]}.{capability[1]}" in why
    # the process's GPU is chosen before the first query, so DDP ranks never open a context on GPU 0
    assert calls[0] == ("set_device", "cuda:1") and ("capability", "cuda:1") in calls


def test_train_fp16_grad_scaler_is_checkpointed_and_bad_losses_count(_train_data, tmp_path, monkeypatch):
    # fp16 autocast with a GradScaler runs on the CPU too, so its bookkeeping is tested here
    data_dir, _ = _train_data
    kw = dict(dtype="float16", max_steps=6, eval_interval=3, optimizer="adamw", dropout=0.1)
    straight = train.train(_train_cfg(data_dir, tmp_path / "a", **kw))
    train.train(_train_cfg(data_dir, tmp_path / "b", stop_step=3, **kw))
    part = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["scaler"]
    assert part["scale"] > 0 and part["_growth_tracker"] == 3
    train.train(_train_cfg(data_dir, tmp_path / "b", resume=True, **kw))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["scaler"] == b["scaler"] and a["scaler"]["_growth_tracker"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # a NaN loss under fp16 is a bad step (it used to be handed to the scaler and never counted):
    # three in a row reload the last checkpoint with half the learning rate
    monkeypatch.setitem(train.FAULTS, "nan_steps", (3, 4, 5))
    s = train.train(_train_cfg(data_dir, tmp_path / "nan", **{**kw, "max_steps": 8}))
    ck = torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)
    assert s["skipped_steps"] == 3 and ck["lr_scale"] == 0.5 and math.isfinite(s["val_loss"])
    assert straight["skipped_steps"] == 0


def test_train_evaluation_never_makes_float64_tensors(_train_data):
    # Apple's MPS has no float64: every tensor evaluate_windows makes must be float32 or narrower;
    # the float64 sum is taken in Python on the CPU. Reference: the per-batch losses by hand.
    from torch.utils._python_dispatch import TorchDispatchMode
    data_dir, tok = _train_data

    class RecordDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.dtypes.add(t.dtype)
            return out

    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=32))
    windows = train.TokenWindows(data_dir, train.load_meta(data_dir), "val", 32, 0).fixed_windows(7)
    with RecordDtypes() as rec:
        loss, tokens = train.evaluate_windows(m, windows, 3, torch.device("cpu"))
    assert torch.float64 not in rec.dtypes and torch.float32 in rec.dtypes
    with torch.no_grad():
        parts = [(m(torch.from_numpy(w[:, :-1]), torch.from_numpy(w[:, 1:]))[1].item(), w[:, 1:].size)
                 for w in (windows[i:i + 3] for i in range(0, len(windows), 3))]
    assert tokens == 7 * 32 and loss == pytest.approx(sum(l * n for l, n in parts) / tokens, rel=1e-6)


def test_train_progress_lines_leave_evaluation_time_out(_train_data, tmp_path, monkeypatch):
    data_dir, _ = _train_data
    real = train.evaluate_windows

    def slow_eval(*a, **k):  # an evaluation that takes 0.4 s
        time.sleep(0.4)
        return real(*a, **k)

    monkeypatch.setattr(train, "evaluate_windows", slow_eval)
    train.train(_train_cfg(data_dir, tmp_path / "out", max_steps=8, eval_interval=2, log_interval=2))
    rows = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 4, 6, 8]
    for prev, r in zip(steps[1:], steps[2:]):  # an evaluation between each pair of these lines
        # tokens/s over the interval, on the training clock, which leaves the evaluation out
        assert r["tok_per_s"] == pytest.approx((r["tokens"] - prev["tokens"]) / (r["train_time"] - prev["train_time"]))
        assert r["train_time"] - prev["train_time"] < r["time"] - prev["time"] - 0.35
    assert steps[-1]["train_time"] < steps[-1]["time"] - 3 * 0.4


def test_train_oom_fallback_frees_the_failed_step_before_emptying_the_cache(_train_data, tmp_path, monkeypatch):
    import weakref
    data_dir, _ = _train_data
    alive = []  # when the cleanup starts: is the failed forward's (B, T, V) logits tensor still alive?
    refs = []
    real_free = train.free_failed_step

    def watch(*a):
        alive.append(refs[-1]() is not None)
        return real_free(*a)

    real_init = train.GPT.__init__

    def init_with_hook(self, *a, **k):
        real_init(self, *a, **k)
        self.lm_head.register_forward_hook(lambda mod, inp, out: refs.append(weakref.ref(out)))

    monkeypatch.setattr(train.GPT, "__init__", init_with_hook)
    monkeypatch.setattr(train, "free_failed_step", watch)
    monkeypatch.setitem(train.FAULTS, "oom", 1)
    s = train.train(_train_cfg(data_dir, tmp_path / "oom", max_steps=2, batch_size=4))
    assert alive == [False] and s["batch_size"] == 2


def test_train_checkpoint_is_fsynced_around_the_rename(_train_data, tmp_path, monkeypatch):
    # durable against a power loss: the file's data reaches the disk before its new name, and the
    # directory entry after the rename
    data_dir, _ = _train_data
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.path.realpath(a), os.path.realpath(b)))
        return real_replace(a, b)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name file descriptors")
    monkeypatch.setattr(train.os, "fsync", fsync)
    monkeypatch.setattr(train.os, "replace", replace)
    out = os.path.realpath(tmp_path / "out")
    train.train(_train_cfg(data_dir, out, max_steps=2, eval_interval=2))
    monkeypatch.undo()
    for name in ("ckpt.pt", "best.pt"):
        path = os.path.join(out, name)
        i = events.index(("replace", path + ".tmp", path))
        assert events[i - 1] == ("fsync", path + ".tmp") and events[i + 1] == ("fsync", out)



# -----------------------------------------------------------------------------
# train.py under torchrun: DDP made exact (seeds, RNG per rank), timeouts, FSDP2, pipeline

import socket

# a tiny model with dropout on: 4 steps of 2 rows x 2 processes (no accumulation)
DDP_ARGS = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
            "--batch_size=2", "--total_batch_size=128", "--max_steps=4", "--warmup_steps=1",
            "--eval_interval=2", "--learning_rate=3e-3", "--eval_batches=2", "--sample_tokens=0",
            "--dropout=0.1", "--log_interval=1"]


def _losses(out_dir):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl")))]


def _same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


@pytest.fixture(scope="module")
def _ddp_runs(_train_data, tmp_path_factory):
    """A straight 2-process run of 4 steps, and one stopped at step 2 (--stop_step), its out_dir
    kept as made: (data_dir, straight out_dir, stopped out_dir)."""
    data_dir, _ = _train_data
    root = tmp_path_factory.mktemp("ddp")
    args = [f"--dataset={data_dir}", *DDP_ARGS]
    _torchrun("train.py", root / "straight", args)
    _torchrun("train.py", root / "stopped", args + ["--stop_step=2"])
    return data_dir, root / "straight", root / "stopped"


def test_ddp_resume_with_dropout_is_exact(_ddp_runs, tmp_path):
    # reference: the straight run; the stopped one resumed must end on the same weights, bit for bit
    data_dir, straight, stopped = _ddp_runs
    ck = torch.load(stopped / "ckpt.pt", weights_only=True)
    assert ck["step"] == 2 and len(ck["rng"]) == 2  # every rank's RNG state, in rank order
    resumed = tmp_path / "resumed"
    shutil.copytree(stopped, resumed)
    r = _torchrun("train.py", resumed, [f"--dataset={data_dir}", *DDP_ARGS, "--resume"])
    assert "resumed" in r.stdout and "RNG states of" not in r.stdout
    assert _same_weights(_train_weights(straight), _train_weights(resumed))
    assert _losses(straight) == _losses(resumed)  # the training and validation losses too


def test_ddp_resume_reads_a_checkpoint_with_one_rng_state(_ddp_runs, tmp_path):
    # an older checkpoint held only rank 0's state (a dict): it still resumes, rank 1 draws afresh
    # from seed + 1, and so the run no longer matches the straight one, which shows that the exact
    # test above depends on rank 1 getting its own state back
    data_dir, straight, stopped = _ddp_runs
    old = tmp_path / "old"
    shutil.copytree(stopped, old)
    ck = torch.load(old / "ckpt.pt", weights_only=True)
    ck["rng"] = ck["rng"][0]
    torch.save(ck, old / "ckpt.pt")
    r = _torchrun("train.py", old, [f"--dataset={data_dir}", *DDP_ARGS, "--resume"])
    assert "holds the RNG states of 1 process(es) and this run has 2" in r.stdout
    assert not _same_weights(_train_weights(straight), _train_weights(old))


def test_ddp_ranks_draw_their_own_dropout_masks(_ddp_runs, tmp_path):
    # reference: one process at half the global batch draws the same masks, in the same order, as
    # rank 0 of two (2 rows a step each), so their RNG states agree after 4 steps; rank 1's differs
    data_dir, straight, _ = _ddp_runs
    ranks = torch.load(straight / "ckpt.pt", weights_only=True)["rng"]
    train.train(_train_cfg(data_dir, tmp_path / "one", batch_size=2, total_batch_size=64, max_steps=4,
                           warmup_steps=1, eval_interval=2, dropout=0.1))
    one = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["rng"]
    assert len(one) == 1 and torch.equal(one[0]["torch"], ranks[0]["torch"])
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])


# -----------------------------------------------------------------------------
# A lost process, bad input: every rank stops with a message, none waits forever


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(args, env_extra=None, then_wait=10, timeout=60):
    """train.py as ranks 0 and 1 with torchrun's environment but no torchrun, each with its own
    exit code: [(returncode, stdout, stderr, seconds it ran)] in rank order. Waits for rank 0,
    then at most then_wait seconds for rank 1, which is killed if still running (a rank the
    test made hang)."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, **(env_extra or {}), "OMP_NUM_THREADS": "1", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append((subprocess.Popen([sys.executable, "train.py", *args], cwd=_TRAIN_ROOT, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                      time.time()))
    results = []
    for rank, (p, t0) in enumerate(procs):
        try:
            out, err = p.communicate(timeout=timeout if rank == 0 else then_wait)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        results.append((p.returncode, out, err, time.time() - t0))
    return results


def test_ddp_dead_rank_stops_the_survivor(_train_data, tmp_path):
    # rank 1 exits hard after step 1 (TRAIN_TEST_EXIT); rank 0, in its next collective, must stop
    # with a sentence that says what happened, not wait for --dist_timeout_s or forever
    data_dir, _ = _train_data
    args = [f"--dataset={data_dir}", f"--out_dir={tmp_path / 'dead'}", *DDP_ARGS, "--dist_timeout_s=20"]
    (rc0, out0, err0, t0), (rc1, _, _, _) = _two_ranks(args, {"TRAIN_TEST_EXIT": "1:1"})
    assert rc1 == 3 and "step 1/4" in out0, err0[-2000:]
    assert rc0 == 1 and "another process died" in err0 and "rank 0 of 2" in err0, err0[-2000:]
    assert "Traceback" not in err0 and t0 < 20  # gloo sees the closed connection at once


def test_ddp_hung_rank_times_out(_train_data, tmp_path):
    # rank 1 stops answering after step 1 (TRAIN_TEST_HANG) but keeps its connections open, so
    # only the timeout can notice: rank 0 must stop within --dist_timeout_s=3 of its last step
    data_dir, _ = _train_data
    args = [f"--dataset={data_dir}", f"--out_dir={tmp_path / 'hung'}", *DDP_ARGS, "--dist_timeout_s=3"]
    (rc0, out0, err0, t0), (rc1, _, _, _) = _two_ranks(args, {"TRAIN_TEST_HANG": "1:1"}, then_wait=0)
    assert rc0 == 1 and "Timed out waiting 3000ms" in err0 and "--dist_timeout_s=3" in err0, err0[-2000:]
    assert "step 1/4" in out0 and "Traceback" not in err0
    assert rc1 != 0  # still hanging when the test killed it
    assert t0 < 25  # startup (~5 s on 2 busy cores), one step, then 3 s of waiting


def test_ddp_bad_batch_fails_on_every_rank(_train_data, tmp_path):
    # a global batch the processes cannot share: batch_geometry's sentence from each rank itself,
    # before any collective, so even with the default 600 s timeout neither waits on the other
    data_dir, _ = _train_data
    args = [f"--dataset={data_dir}", f"--out_dir={tmp_path / 'bad'}", *DDP_ARGS, "--total_batch_size=96"]
    t = time.time()
    for rc, _, err, _ in _two_ranks(args):
        assert rc == 1 and len(err.strip().splitlines()) == 1, err[-2000:]
        assert "--total_batch_size=96 is not a multiple of batch_size*block_size*world_size" in err
    assert time.time() - t < 30


def test_ddp_timeout_must_be_positive(monkeypatch):
    # checked before the process group is joined (resolve_config runs only after it)
    for k, v in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="dist_timeout_s=0 must be positive"):
        train.start_processes(train.TrainConfig(device="cpu", dist_timeout_s=0))


# -----------------------------------------------------------------------------
# torch.compile(DDP(model)): opt-in, ~1.5 minutes of compiling on 2 CPU cores with a cold cache


@pytest.mark.skipif(not os.environ.get("DDP_COMPILE_TEST"), reason="slow on CPUs: set DDP_COMPILE_TEST=1")
def test_ddp_compiled_matches_eager(_train_data, tmp_path):
    # reference: the same 2-process run uncompiled; 2 micro-steps a step, so no_sync is reached
    # through the compiled wrapper too
    data_dir, _ = _train_data
    args = [f"--dataset={data_dir}", *DDP_ARGS, "--n_layer=1", "--total_batch_size=256", "--max_steps=3",
            "--eval_interval=3", "--eval_batches=1", "--dropout=0.0"]
    r = _torchrun("train.py", tmp_path / "compiled", args + ["--compile=true"])
    assert "compiling the model" in r.stdout and "2 processes x 2 accumulation" in r.stdout
    _torchrun("train.py", tmp_path / "eager", args + ["--compile=false"])
    for (s1, l1, v1), (s2, l2, v2) in zip(_losses(tmp_path / "compiled"), _losses(tmp_path / "eager")):
        assert s1 == s2 and (l1 is None) == (l2 is None)
        assert (l1 or v1) == pytest.approx(l2 or v2, rel=1e-5)
    wa, wb = _train_weights(tmp_path / "compiled"), _train_weights(tmp_path / "eager")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


# the tiny model of test_all's _train_cfg, as torchrun arguments; 8 rows of 32 tokens a step:
# micro-batches of 2 rows, so one process accumulates 4, fsdp's two ranks 2 each, and the
# pipeline's two stages run 4 micro-batches (M = 4, S = 2)
_STEP = dict(batch_size=2, total_batch_size=256, max_steps=4, warmup_steps=1, eval_interval=2,
             log_interval=1, eval_batches=3)


def _args(data_dir, **kw):
    base = dict(dataset=data_dir, device="cpu", n_layer=2, n_head=2, n_embd=32, block_size=32,
                learning_rate=3e-3, sample_tokens=8, dropout=0.0, **_STEP)
    base.update(kw)
    return [f"--{k}={v}" for k, v in base.items()]


def _log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    steps = [(r["step"], r["loss"], r["norm"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    return steps, evals


def _assert_runs_match(a, b, atol):
    """Two out_dirs: the same steps, losses, gradient norms, validation losses and weights."""
    (sa, ea), (sb, eb) = _log(a), _log(b)
    assert [s[0] for s in sa] == [s[0] for s in sb] and [e[0] for e in ea] == [e[0] for e in eb]
    for x, y in zip(sa + ea, sb + eb):
        assert x[1:] == pytest.approx(y[1:], abs=atol, rel=0), (x, y)
    wa, wb = _train_weights(a), _train_weights(b)
    assert list(wa) == list(wb)  # the plain GPT's keys, in its order: no prefixes
    for k in wa:
        if atol == 0:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0)


def _one_process(data_dir, out):
    s = train.train(_train_cfg(data_dir, out, sample_tokens=0, **_STEP))
    assert s["grad_accum"] == 4
    return s


# Two runs in one torchrun launch (a launch costs ~6 s of imports on 2 cores): a straight one,
# then one stopped at step 2, which a second launch resumes in fresh processes.
_TWO_RUNS = """
import sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
import train
from tokenizer import parse_config
out, args = sys.argv[1].split("=", 1)[1], sys.argv[2:]
train.train(parse_config(train.TrainConfig, [f"--out_dir={{out}}/straight", *args]))
train.train(parse_config(train.TrainConfig, [f"--out_dir={{out}}/resumed", "--stop_step=2", *args]))
dist.destroy_process_group()
"""


def _check_scaled_out(data_dir, tmp_path, mode):
    """mode under torchrun == one process; stopped at step 2 and resumed == straight, bit for
    bit. Returns the two launches' outputs (straight and stopped, resumed)."""
    script = tmp_path / "two_runs.py"
    script.write_text(_TWO_RUNS.format(root=_TRAIN_ROOT))
    runs = tmp_path / "runs"  # _torchrun empties it before its one retry
    r = _torchrun(str(script), runs, _args(data_dir, parallel=mode))
    straight, resumed = runs / "straight", runs / "resumed"
    r2 = _torchrun("train.py", resumed, _args(data_dir, parallel=mode, resume=True))
    assert "resumed" in r2.stdout
    _assert_runs_match(straight, resumed, atol=0)
    one = tmp_path / "one"
    _one_process(data_dir, one)
    _assert_runs_match(one, straight, atol=1e-5)
    # sample.py's loader: a plain GPT from the gathered state, no process group
    model, ck = train.load_checkpoint(str(straight / "ckpt.pt"))
    assert ck["config"]["parallel"] == mode and isinstance(model, GPT)
    assert "sample: " in r.stdout  # sampled from the weights gathered on rank 0
    return r.stdout, r2.stdout


def test_parallel_fsdp_matches_one_process_and_resumes(_train_data, tmp_path):
    data_dir, _ = _train_data
    out, _ = _check_scaled_out(data_dir, tmp_path, "fsdp")
    # rank 0's shards: the first half (rounded up) of every tensor's rows
    ck = torch.load(tmp_path / "runs" / "straight" / "ckpt.pt", weights_only=True)
    model = GPT(GPTConfig(**ck["model_config"]))
    mine = sum(-(-p.shape[0] // 2) * p[0].numel() for p in model.parameters())
    assert (f"fsdp: 2 blocks and the root sharded over 2 ranks (FSDP2), rank 0 keeps {mine:,} of "
            f"{model.num_params(False):,} parameters; fp32 throughout") in out
    assert "2 rows x 32 tokens x 2 processes x 2 accumulation = 256" in out
    # the optimizer state is named under fsdp and numbered under ddp: a plain run says so
    with pytest.raises(ValueError, match="--parallel=fsdp, whose optimizer state is named"):
        train.train(_train_cfg(data_dir, tmp_path / "runs" / "straight", resume=True, **_STEP))


def test_parallel_pipeline_matches_one_process_and_resumes(_train_data, tmp_path):
    data_dir, _ = _train_data
    # the CPU model ties wte (stage 0) and lm_head (stage 1): their gradient halves are summed
    out, _ = _check_scaled_out(data_dir, tmp_path, "pipeline")
    assert "bubble (S-1)/(M+S-1) = 1/5 = 20%" in out and "tied wte/lm_head" in out
    ck = torch.load(tmp_path / "runs" / "straight" / "ckpt.pt", weights_only=True)
    stage0 = sum(v.numel() for k, v in ck["model"].items()
                 if k.startswith(("transformer.wte", "transformer.h.0.")))  # embeddings, block 0
    assert f"stage 0 keeps {stage0:,} of" in out
    assert "2 rows x 32 tokens x 1 processes x 4 accumulation = 256" in out
    # the stages' optimizer states merged as one optimizer's: every tensor once, by name
    names = set(ck["optimizer"]["state"]) | set(ck["optimizer_muon"]["state"])
    model_names = {n for n, _ in GPT(GPTConfig(**ck["model_config"])).named_parameters()}
    assert names == model_names and "lm_head.weight" not in names  # tied: wte's state is the head's


def test_parallel_fsdp_then_gpipe_uneven_stages_match_one_process(_train_data, tmp_path):
    data_dir, _ = _train_data
    # 3 layers: step 1 under fsdp, resumed for steps 2-3 as a GPipe pipeline (every forward,
    # then every backward) of 2 + 1 blocks; fsdp and pipeline checkpoints share one layout
    a, b = tmp_path / "fsdp-gpipe", tmp_path / "one"
    kw = dict(n_layer=3, max_steps=3, eval_interval=1)
    _torchrun("train.py", a, _args(data_dir, parallel="fsdp", stop_step=1, **kw))
    r = _torchrun("train.py", a, _args(data_dir, parallel="pipeline", pipeline_schedule="gpipe",
                                       resume=True, **kw))
    assert "pipeline: 2 stages (blocks 0-1 | 2-2), stage 0 keeps" in r.stdout
    assert "gpipe over 4 micro-batches of 2 rows" in r.stdout and "resumed" in r.stdout
    train.train(_train_cfg(data_dir, b, sample_tokens=0, **{**_STEP, **kw}))
    _assert_runs_match(b, a, atol=1e-5)


def _torchrun_fails(out_dir, args):
    """train.py under torchrun, expected to stop at once: (stdout + stderr) of the failed run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train.py", f"--out_dir={out_dir}", *args]
    # a hang would meet this timeout; the processes stop in seconds
    r = subprocess.run(cmd, cwd=_TRAIN_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, r.stdout[-1500:] + r.stderr[-1500:]
    return r.stdout + r.stderr


def test_parallel_bad_input_stops_every_rank(_train_data, tmp_path):
    data_dir, _ = _train_data
    out = _torchrun_fails(tmp_path / "bad", _args(data_dir, parallel="pipeline", n_layer=1))
    # both ranks reach the same sentence (main prints it from each), before any collective
    assert out.count("error: --parallel=pipeline needs a block per stage: 2 processes "
                     "(stages) for n_layer=1") == 2, out[-3000:]
    # the rest need no second process: check_parallel is a function of the config
    with pytest.raises(ValueError, match="splits the model across torchrun processes"):
        train.train(_train_cfg(data_dir, tmp_path / "one", parallel="fsdp"))
    with pytest.raises(ValueError, match="--fsdp_offload moves the shards out of GPU memory"):
        train.train(_train_cfg(data_dir, tmp_path / "one", parallel="fsdp", fsdp_offload=True))
    with pytest.raises(ValueError, match="--parallel is not one of|--parallel=zero is not one"):
        train.train(_train_cfg(data_dir, tmp_path / "one", parallel="zero"))
    cfg = train.resolve_config(_train_cfg(data_dir, tmp_path, parallel="pipeline"),
                               torch.device("cpu"))
    mcfg = GPTConfig(vocab_size=320, block_size=32, n_layer=4, n_head=2, n_embd=32)
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="1f1b needs at least one micro-batch per stage"):
        train.check_parallel(cfg, mcfg, 2, cpu, torch.float32, accum=1)
    train.check_parallel(cfg, mcfg, 2, cpu, torch.float32, accum=2)  # M = S is enough
    cfg.pipeline_schedule = "gpipe"
    train.check_parallel(cfg, mcfg, 2, cpu, torch.float32, accum=1)  # GPipe: any M
    with pytest.raises(ValueError, match="float16 needs a GradScaler that agrees"):
        train.check_parallel(cfg, mcfg, 2, cpu, torch.float16, accum=4)


def test_parallel_stage_bounds_and_stage_forward():
    assert train.stage_bounds(5, 2) == [(0, 3), (3, 5)]  # the docstring's example
    assert train.stage_bounds(12, 5) == [(0, 3), (3, 6), (6, 8), (8, 10), (10, 12)]
    # the stages chained by hand == the whole model's logits, GPT-2 style (learned positions,
    # LayerNorm, GELU) and Llama style (RoPE): the stage's forward is GPT.forward cut in pieces
    for style in (dict(pos="learned", norm="layernorm", mlp="gelu"),
                  dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=3, n_head=2, n_embd=16,
                              **style)).eval()
        idx = torch.randint(0, 64, (2, 16))
        stages = [train.PipelineStageModule(model, lo, hi, s == 0, s == 1)
                  for s, (lo, hi) in enumerate(train.stage_bounds(3, 2))]
        x = idx
        for stage in stages:
            x = stage(x)
        ref, _ = model(idx, idx)
        torch.testing.assert_close(x, ref, atol=1e-6, rtol=0)
        assert stages[1].num_params() == model.num_params()  # the plan counts the whole model
        assert "transformer.h.2.ln_1.weight" in stages[1].state_dict()  # the whole model's names


def test_parallel_fsdp_accumulation_syncs_on_the_last_micro_step_only():
    # a stand-in for an FSDP2 module: records set_requires_gradient_sync; accumulate_gradients
    # must switch the sync off for every micro-step but the last, and back on after each
    calls = []

    class FakeFSDP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def set_requires_gradient_sync(self, flag, recurse=True):
            calls.append(flag)

        def forward(self, x, y):
            calls.append("forward")
            return None, (self.w * x).sum()
    batch = lambda lo, hi: (torch.ones(hi - lo), None)
    train.accumulate_gradients(FakeFSDP(), batch, 2, 3, contextlib.nullcontext())
    assert calls == [False, "forward", True, False, "forward", True, "forward"]
    assert train.skip_gradient_sync(torch.nn.Linear(1, 1)) is None  # one process: nothing to skip


# -----------------------------------------------------------------------------
# bench.py --budget: memory per GPU


def test_bench_memory_table_gpt2_row_by_hand():
    # GPT-2 124M on 8 GPUs, micro-batch 8 x 1024, bf16 mixed precision and AdamW.
    # N = 124,439,808 (model.py's count): 12 blocks of 12C^2 + 13C = 7,087,872 (weights of
    # attention 4C^2 and MLP 8C^2, their biases 9C, two LayerNorms 4C), and the root
    # (wte 50257 x 768 tied, wpe 1024 x 768, ln_f) 39,385,344
    rows = {(r["model"], r["mode"]): r for r in bench.memory_table(gpus=8, batch_size=8)}
    N, block, root, gib = 124_439_808, 7_087_872, 39_385_344, 2**30
    assert 12 * block + root == N and rows[("124M", "ddp")]["n_params"] == N
    ddp = rows[("124M", "ddp")]
    assert ddp["params"] == pytest.approx(6 * N / gib)  # fp32 weights + autocast's bf16 copies
    assert ddp["grads"] == pytest.approx(8 * N / gib)  # fp32 gradients + DDP's bucket copy
    assert ddp["optimizer"] == pytest.approx(8 * N / gib)  # AdamW m and v in fp32
    # Korthikanti et al. 2022 without recomputation, s*b*h*(34 + 5*a*s/h) bytes a layer:
    # s*b*h = 1024 * 8 * 768 = 6,291,456 and 34 + 5 * 12 * 1024 / 768 = 114, 12 layers; and the
    # loss's fp32 log-probabilities, 4 * s * b * V
    layer, logits = 6_291_456 * 114, 4 * 1024 * 8 * 50257
    assert bench.activation_bytes(1024, 8, 768, 12) == layer == 717_225_984  # its docstring
    assert ddp["activations"] == pytest.approx((12 * layer + logits) / gib)
    assert ddp["total"] == pytest.approx((22 * N + 12 * layer + logits) / gib)  # 12.10 GiB
    fsdp = rows[("124M", "fsdp")]  # 1/8 of the fp32 state; bf16 root + 2 blocks gathered
    assert fsdp["params"] == pytest.approx((4 * N / 8 + 2 * (root + 2 * block)) / gib)
    assert fsdp["grads"] == pytest.approx((4 * N / 8 + 2 * (root + block)) / gib)
    assert fsdp["optimizer"] == pytest.approx(8 * N / 8 / gib)
    ac = rows[("124M", "fsdp+ac")]  # each block's bf16 input, and one block recomputed
    assert ac["activations"] == pytest.approx((12 * 2 * 6_291_456 + layer + logits) / gib)
    assert [r["total"] for r in rows.values() if r["model"] == "7B"] == sorted(
        [r["total"] for r in rows.values() if r["model"] == "7B"], reverse=True)


def test_bench_activation_formula_matches_saved_tensors():
    # reference: the bytes autograd actually saves for the backward of one block, measured with
    # saved_tensors_hooks (each storage once, parameters excluded) as the difference between a
    # 2-layer and a 1-layer model, fp32 on the CPU with dropout and the explicit attention that
    # keeps its (s, s) scores: Korthikanti's count with 4-byte values and 4-byte masks
    s, b, h, a = 64, 2, 64, 4

    def saved(n_layer):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=128, block_size=s, n_layer=n_layer, n_head=a, n_embd=h,
                              dropout=0.1)).train()
        model.manual_attention = True
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randint(0, 128, (b, s)), torch.randint(0, 128, (b, s)))
        return sum(seen.values())
    per_layer = saved(2) - saved(1)
    formula = bench.activation_bytes(s, b, h, a, value_bytes=4, mask_bytes=4)
    # what the formula leaves out: the LayerNorms' means and inverse deviations (16sb bytes)
    # and the explicit path's (s, s) causal mask (s^2 bool)
    assert per_layer == formula + 16 * s * b + s * s, (per_layer, formula)


# -----------------------------------------------------------------------------
# train.py on llm.c's and modded-nanogpt's shards as they are (no meta.json)

import base64
import tempfile

import requests
import tiktoken.registry

LLMC_SHARD_TOKENS = 2500  # llm.c writes 10**8 tokens a shard; a few thousand keep the test fast


def _write_llmc_shard(path, toks):
    """llm.c's dev/data/data_common.py write_datafile("gpt-2"), restated: 256 int32 (magic
    20240520, version 1, token count, zeros), then the tokens as uint16."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(toks)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.array(toks, dtype=np.uint16).tobytes())


def _write_llmc_dataset(folder, tok, docs, name="fineweb"):
    """llm.c's dev/data/fineweb.py sharding: every document opens with <|endoftext|>, the token
    stream is cut into shards of LLMC_SHARD_TOKENS (a document may straddle two), the first shard
    is NAME_val_000000.bin and the rest NAME_train_000001.bin, ... Returns the val shard's ids."""
    os.makedirs(folder, exist_ok=True)
    stream = []
    for doc in docs:
        stream += [tok.eot_id] + tok.encode(doc)
    shards = [stream[i:i + LLMC_SHARD_TOKENS] for i in range(0, len(stream), LLMC_SHARD_TOKENS)]
    assert len(shards) >= 3
    for index, ids in enumerate(shards):
        split = "val" if index == 0 else "train"
        _write_llmc_shard(os.path.join(folder, f"{name}_{split}_{index:06d}.bin"), ids)
    return shards[0]


def _write_ranks_file(path, tok):
    """tiktoken's .tiktoken format: one "base64(bytes) rank" line per mergeable token, no
    special tokens (GPT-2's file has 50256 lines; <|endoftext|> = 50256 comes from convention)."""
    lines = [f"{base64.b64encode(b).decode('ascii')} {i}"
             for b, i in sorted(tok.ranks.items(), key=lambda item: item[1])]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _decoded_bytes_by_hand(tok, ids):
    """The text bytes of ids: each non-special id's bytes, <|endoftext|> counting none."""
    return len(b"".join(tok.vocab[i] for i in ids if i not in tok.special_tokens.values()))


@pytest.fixture(scope="module")
def llmc(tmp_path_factory):
    """A folder of llm.c shards (no meta.json) and the ranks file of the BPE that wrote them."""
    root = tmp_path_factory.mktemp("llmc")
    text = _stdlib_text(40000)
    tok = Tokenizer.train(text[:20000], 300, pattern="gpt2")
    # documents of ~1500 characters, cut at line ends, as FineWeb's are separate web pages
    docs, start = [], 0
    while start < len(text):
        end = text.find("\n", start + 1500)
        end = len(text) if end < 0 else end + 1
        docs.append(text[start:end])
        start = end
    data = str(root / "fineweb10B")
    val_ids = _write_llmc_dataset(data, tok, docs)
    ranks = str(root / "tiny.tiktoken")
    _write_ranks_file(ranks, tok)
    return {"dir": data, "ranks": ranks, "tok": tok, "val_ids": val_ids, "docs": docs}


def test_llmc_shard_names():
    """llm.c's and modded-nanogpt's names are recognised, prepare.py's own are not (a prepared
    folder that lost its meta.json keeps load_meta's error)."""
    def names(tmp, files):
        for f in files:
            open(os.path.join(tmp, f), "wb").close()
        return train.llmc_shards(tmp)
    with tempfile.TemporaryDirectory() as tmp:
        assert names(tmp, ["fineweb_train_000002.bin", "fineweb_val_000000.bin",
                           "fineweb_train_000001.bin", "notes.txt"]) == {
            "train": ["fineweb_train_000001.bin", "fineweb_train_000002.bin"],
            "val": ["fineweb_val_000000.bin"]}
    with tempfile.TemporaryDirectory() as tmp:
        assert names(tmp, ["tiny_shakespeare_val.bin", "tiny_shakespeare_train.bin"]) == {
            "train": ["tiny_shakespeare_train.bin"], "val": ["tiny_shakespeare_val.bin"]}
    with tempfile.TemporaryDirectory() as tmp:
        assert names(tmp, ["edu_fineweb_val_000000.bin"])["val"] == ["edu_fineweb_val_000000.bin"]
    with tempfile.TemporaryDirectory() as tmp:
        assert names(tmp, ["train_000.bin", "val_000.bin"]) is None  # prepare.py's naming
    with tempfile.TemporaryDirectory() as tmp:
        open(os.path.join(tmp, "meta.json"), "w").close()
        assert names(tmp, ["fineweb_val_000000.bin"]) is None  # a meta.json: prepare.py's path


def test_llmc_dataset_by_name_in_data_dir(llmc):
    """--dataset=fineweb10B finds data_dir/fineweb10B, as it finds a prepared dataset there."""
    cfg = train.TrainConfig(dataset="fineweb10B", data_dir=os.path.dirname(llmc["dir"]))
    folder, found = train.find_llmc_dataset(cfg)
    assert folder == llmc["dir"] and found["val"] == ["fineweb_val_000000.bin"]
    assert train.find_llmc_dataset(train.TrainConfig(dataset="pystdlib")) is None


def test_llmc_shards_train_with_ranks_file(llmc, tmp_path):
    """A few steps on the shards as llm.c lays them out; bits per byte uses the val shard's
    decoded bytes (computed here by hand); the out_dir samples and resumes."""
    out = tmp_path / "out"
    cfg = _train_cfg(llmc["dir"], out, tokenizer=llmc["ranks"], max_steps=4, eval_interval=2)
    res = train.train(cfg)
    tok, val_ids = llmc["tok"], llmc["val_ids"]
    n_bytes = _decoded_bytes_by_hand(tok, val_ids)
    # the val shard ends inside a document (llm.c cuts the stream), so its bytes are those of
    # its own tokens: all the whole documents it holds, then the start of the next
    whole = [d for d in llmc["docs"] if d][:val_ids.count(tok.eot_id) - 1]
    assert n_bytes > sum(len(d.encode("utf-8")) for d in whole)
    assert res["val_bpb"] == pytest.approx(train.bits_per_byte(res["val_loss"], len(val_ids),
                                                               n_bytes), rel=1e-12)
    cache = json.load(open(os.path.join(llmc["dir"], train.VAL_BYTES_FILE)))
    assert (cache["bytes"], cache["tokens"], cache["documents"]) == (
        n_bytes, len(val_ids), val_ids.count(tok.eot_id))
    # the tokenizer was saved into out_dir in tokenizer.py's format, and sample.py uses it
    saved = Tokenizer.load(str(out / "tokenizer.bpe"))
    assert saved.ranks == tok.ranks and saved.eot_id == tok.eot_id == len(tok.ranks)
    model, tok2, vocab_limit = sample.load_for_sampling(str(out))
    assert vocab_limit == tok.n_vocab
    idx = torch.tensor([[tok2.eot_id]])
    assert model.generate(idx, 5, temperature=0.0, vocab_limit=vocab_limit).shape == (1, 6)
    # --resume finds the same tokenizer (sha256 of its saved form) and continues
    res2 = train.train(_train_cfg(llmc["dir"], out, tokenizer=llmc["ranks"], max_steps=6,
                                  eval_interval=2, resume=True))
    assert res2["step"] == 6


def test_llmc_val_bytes_cache(llmc, tmp_path, monkeypatch, capsys):
    """The count is made once and reused; a changed val shard or tokenizer is counted again;
    a read-only folder costs a warning, not the run."""
    data = str(tmp_path / "shards")
    shutil.copytree(llmc["dir"], data)
    cache = os.path.join(data, train.VAL_BYTES_FILE)
    if os.path.exists(cache):
        os.remove(cache)
    calls = []
    real = train.count_text_bytes
    monkeypatch.setattr(train, "count_text_bytes", lambda *a, **k: calls.append(1) or real(*a, **k))
    tok, val_ids = llmc["tok"], llmc["val_ids"]
    found = train.llmc_shards(data)

    def val_bytes(spec=llmc["ranks"]):
        return train.load_llmc_dataset(data, found, spec)[1]["splits"]["val"]["bytes"]

    assert val_bytes() == _decoded_bytes_by_hand(tok, val_ids) and len(calls) == 1
    mtime = os.stat(cache).st_mtime_ns
    assert val_bytes() == _decoded_bytes_by_hand(tok, val_ids) and len(calls) == 1  # reused
    assert os.stat(cache).st_mtime_ns == mtime  # and not rewritten
    # a new val shard, same name: counted again
    shorter = val_ids[:1000]
    _write_llmc_shard(os.path.join(data, "fineweb_val_000000.bin"), shorter)
    assert val_bytes() == _decoded_bytes_by_hand(tok, shorter) and len(calls) == 2
    # same size, other content: the mtime tells (set one second on: timestamps can be coarse)
    other = val_ids[1000:2000]
    _write_llmc_shard(os.path.join(data, "fineweb_val_000000.bin"), other)
    st = os.stat(os.path.join(data, "fineweb_val_000000.bin"))
    os.utime(os.path.join(data, "fineweb_val_000000.bin"), ns=(st.st_atime_ns, mtime + 10**9))
    assert val_bytes() == _decoded_bytes_by_hand(tok, other) and len(calls) == 3
    # another tokenizer (the same ranks saved as a tokenizer.bpe with another pattern): recounted
    bpe = str(tmp_path / "other.bpe")
    Tokenizer(tok.ranks, "gpt4", {"<|endoftext|>": tok.eot_id}).save(bpe)
    assert val_bytes(bpe) == _decoded_bytes_by_hand(tok, other) and len(calls) == 4
    # a damaged cache is counted again and replaced
    with open(cache, "w") as f:
        f.write("{not json")
    assert val_bytes(bpe) == _decoded_bytes_by_hand(tok, other) and len(calls) == 5
    assert json.load(open(cache))["bytes"] == _decoded_bytes_by_hand(tok, other)
    # read-only (the tests may run as root, where chmod does not stop a write): one warning line
    def refuse(path, text):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(train, "write_text", refuse)
    os.remove(cache)
    capsys.readouterr()
    assert val_bytes(bpe) == _decoded_bytes_by_hand(tok, other) and len(calls) == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not cache" in err[0] and "Permission denied" in err[0]
    assert not os.path.exists(cache) and not os.path.exists(cache + ".tmp")


def test_llmc_count_text_bytes_matches_decode(llmc):
    """count_text_bytes (a histogram) agrees with decoding the ids and measuring the text;
    ids past the vocabulary anywhere in the split are named, not miscounted."""
    tok = llmc["tok"]
    ids = np.array(llmc["val_ids"], dtype=np.uint16)
    text = tok.decode([i for i in llmc["val_ids"] if i != tok.eot_id])
    got = train.count_text_bytes(["val"], [ids], tok)
    assert got == {"tokens": len(ids), "bytes": len(text.encode("utf-8")),
                   "documents": int((ids == tok.eot_id).sum())}
    bad = np.concatenate([ids, np.array([tok.n_vocab + 3], dtype=np.uint16)])
    with pytest.raises(ValueError, match=f"holds token id {tok.n_vocab + 3}"):
        train.count_text_bytes(["val"], [bad], tok)


def _main_error(capsys, argv):
    """train.main's exit status and its stderr, which must be one line."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1, err
    return err


def _argv(data, out, *extra):
    return [f"--dataset={data}", f"--out_dir={out}", "--device=cpu", "--n_layer=1", "--n_head=2",
            "--n_embd=16", "--block_size=16", "--batch_size=2", "--max_steps=1", *extra]


def test_llmc_bad_input(llmc, tmp_path, capsys):
    """Each mistake is one sentence and exit status 1, before any training."""
    tok = llmc["tok"]
    out = tmp_path / "out"
    # no validation shard
    no_val = tmp_path / "no_val"
    no_val.mkdir()
    _write_llmc_shard(str(no_val / "fineweb_train_000001.bin"), llmc["val_ids"])
    err = _main_error(capsys, _argv(no_val, out, f"--tokenizer={llmc['ranks']}"))
    assert "no val shard" in err and "fineweb_val_000000.bin" in err
    # ids beyond the tokenizer's vocabulary: shards of another (bigger) tokenizer
    big = tmp_path / "big"
    big.mkdir()
    _write_llmc_shard(str(big / "fineweb_val_000000.bin"), llmc["val_ids"])
    _write_llmc_shard(str(big / "fineweb_train_000001.bin"), [tok.eot_id, 50000, 1, 2])
    err = _main_error(capsys, _argv(big, out, f"--tokenizer={llmc['ranks']}"))
    assert "holds token id 50000" in err and f"{tok.n_vocab} ids" in err and "fineweb_train_000001" in err
    # no --tokenizer at all
    err = _main_error(capsys, _argv(llmc["dir"], out))
    assert "--tokenizer=gpt2" in err and "no meta.json" in err
    # a ranks file that is not one
    junk = tmp_path / "junk.tiktoken"
    junk.write_text("hello world again\n")
    err = _main_error(capsys, _argv(llmc["dir"], out, f"--tokenizer={junk}"))
    assert "not a tiktoken rank file" in err
    # neither a file nor gpt2
    err = _main_error(capsys, _argv(llmc["dir"], out, "--tokenizer=gtp2"))
    assert "neither a file nor gpt2" in err
    assert not out.exists() or not (out / "ckpt.pt").exists()


def test_llmc_tokenizer_with_prepared_dataset_is_refused(tmp_path, capsys):
    """--tokenizer with a prepare.py dataset: refused at once (before prepare.py would run)."""
    err = _main_error(capsys, [f"--dataset={tmp_path / 'nothing_here'}", f"--data_dir={tmp_path}",
                               f"--out_dir={tmp_path / 'out'}", "--device=cpu", "--tokenizer=gpt2"])
    assert "drop --tokenizer" in err
    assert not (tmp_path / "nothing_here").exists()


def test_llmc_gpt2_offline_says_where_the_ranks_go(llmc, tmp_path, monkeypatch, capsys):
    """--tokenizer=gpt2 with no network and an empty tiktoken cache: the error names the ranks
    file's URL, where to put it and the flag to pass; no network is touched."""
    def offline(url):
        raise requests.exceptions.ConnectionError(f"Max retries exceeded with url: {url}")
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    err = _main_error(capsys, _argv(llmc["dir"], tmp_path / "out", "--tokenizer=gpt2"))
    local = os.path.join(llmc["dir"], "gpt2.tiktoken")
    assert train.GPT2_RANKS_URL in err and f"put it at {local}" in err
    assert f"--tokenizer={local}" in err and "TIKTOKEN_CACHE_DIR" in err


# -----------------------------------------------------------------------------
# sample.py: generation and chat

# Tests for sample.py: decoding loop, sampling filters, streaming, chat REPL, loading, errors.
#
# The checkpoint is built here in train.py's format (a tiny random GPT + a small BPE), so these
# tests do not depend on running train.py. References: the model without a KV cache, a second
# run, model.generate, hand-computed distributions, tokenizer.decode.


_sample_ROOT = os.path.dirname(os.path.abspath(sample.__file__))
_sample_EXTRA = "Caf\u00e9 cr\u00e8me, \u00fcber na\u00efve \u20ac5 \u65e5\u672c \U0001f642.\n"  # multi-byte characters


def _sample_text() -> str:
    return _stdlib_text(30_000)


def _sample_write_ckpt(out_dir, tok, seed=0, block_size=64):
    """A tiny random GPT saved as train.py saves it: ckpt.pt + tokenizer.bpe in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    padded = -(-tok.n_vocab // 64) * 64  # train.py pads the vocabulary to a multiple of 64
    cfg = _sample_model_mod.GPTConfig(
        vocab_size=padded, block_size=block_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, norm="layernorm",
        mlp="gelu", pos="learned", rope_theta=10000.0, bias=True, dropout=0.0, tie_embeddings=True, norm_eps=1e-5)
    torch.manual_seed(seed)
    m = _sample_model_mod.GPT(cfg)
    with torch.no_grad():  # sharper than the 0.02-std init, so greedy argmaxes are far from ties
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    tok.save(os.path.join(out_dir, "tokenizer.bpe"))
    ckpt = {"model": m.state_dict(), "model_config": asdict(cfg), "config": {}, "optimizer": {}, "step": 0,
            "tokens_seen": 0, "data_position": {}, "rng": {}, "best_val_loss": float("inf"),
            "tokenizer": "tokenizer.bpe", "vocab_size": tok.n_vocab, "dataset": ""}
    torch.save(ckpt, os.path.join(out_dir, "ckpt.pt"))
    return out_dir


@pytest.fixture(scope="module")
def sample_env_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    tok = Tokenizer.train(_sample_text() + _sample_EXTRA, vocab_size=300)
    out_dir = _sample_write_ckpt(str(root / "out"), tok)
    model, tok2, vocab_limit = sample.load_for_sampling(out_dir)
    return {"root": root, "out_dir": out_dir, "model": model, "tok": tok2, "vocab_limit": vocab_limit}


@pytest.fixture
def sample_env(sample_env_module):
    # subtle: on 2 busy shared cores, torch's 2 OpenMP threads make these tiny matmuls ~20x
    # slower than 1 thread (they spin waiting for each other); restored after each test
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield sample_env_module
    torch.set_num_threads(n)


def _sample_run(env, ids, n, **kw):
    idx = torch.tensor(ids, dtype=torch.long)
    kw.setdefault("vocab_limit", env["vocab_limit"])
    return [list(r) for r in zip(*sample.generate_stream(env["model"], idx, n, **kw))]


@torch.no_grad()
def _sample_argmax_chain(model, ids, n, vocab_limit):
    """Reference greedy decoding: full forward pass over the whole context every step, no cache."""
    idx = torch.tensor(ids, dtype=torch.long)
    for _ in range(n):
        logits, _ = model(idx)
        nxt = logits[:, -1, :vocab_limit].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], 1)
    return idx[:, len(ids[0]):].tolist()


# -----------------------------------------------------------------------------
# decoding loop


def test_sample_load_pads_vocab_and_limits_it(sample_env):
    m, tok, vl = sample_env["model"], sample_env["tok"], sample_env["vocab_limit"]
    assert vl == tok.n_vocab and m.config.vocab_size % 64 == 0 and m.config.vocab_size > vl
    assert not m.training


def test_sample_greedy_cached_equals_uncached_argmax_chain(sample_env):
    tok, m = sample_env["tok"], sample_env["model"]
    prompt = tok.encode("ROMEO:\nWhat light")
    ids = [prompt, tok.encode("And so to bed, my lord; good night to all")[: len(prompt)]]
    assert len(ids[0]) == len(ids[1])
    ref = _sample_argmax_chain(m, ids, 30, sample_env["vocab_limit"])
    assert _sample_run(sample_env, ids, 30, temperature=0.0) == ref
    assert _sample_run(sample_env, ids, 30, temperature=0.0, use_cache=False) == ref
    # and model.generate, the library path, agrees with this loop
    out = m.generate(torch.tensor(ids), 30, temperature=0.0, vocab_limit=sample_env["vocab_limit"])
    assert out[:, len(prompt):].tolist() == ref
    assert all(t < sample_env["vocab_limit"] for r in ref for t in r)


def test_sample_seeded_runs_repeat_and_seeds_differ(sample_env):
    ids = [sample_env["tok"].encode("KING:")] * 3
    run = lambda seed: _sample_run(sample_env, ids, 25, temperature=1.0,
                                   generator=torch.Generator().manual_seed(seed))
    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    assert a[0] != a[1]  # rows of one batch draw different random numbers


def test_sample_top_k_only_emits_top_k_tokens(sample_env):
    m, vl, k = sample_env["model"], sample_env["vocab_limit"], 3
    ids = [sample_env["tok"].encode("the")] * 4
    rows = _sample_run(sample_env, ids, 30, temperature=2.0, top_k=k, generator=torch.Generator().manual_seed(0))
    full = torch.tensor([p + r for p, r in zip(ids, rows)])
    with torch.no_grad():  # teacher-forced logits at every position, from the model without a cache
        logits, _ = m(full[:, :-1], targets=full[:, 1:])
    T0, seen_rank = len(ids[0]), set()
    for b in range(4):
        for j, t in enumerate(rows[b]):
            order = logits[b, T0 - 1 + j, :vl].argsort(descending=True).tolist()
            assert order.index(t) < k
            seen_rank.add(order.index(t))
    assert len(seen_rank) > 1  # temperature 2 really samples, so the test is not trivially greedy


def test_sample_top_p_mass_rule_and_min_p_on_crafted_distribution(sample_env):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).clone()
    g = torch.Generator().manual_seed(0)
    for top_p, allowed in [(0.75, 2), (0.85, 3), (0.97, 4)]:
        x = sample_logits(logits.clone(), temperature=1.0, top_p=top_p, generator=g)[:, 0]  # model's
        counts = torch.bincount(x, minlength=4).float() / len(x)
        assert set(x.tolist()) == set(range(allowed))  # the smallest prefix with mass >= top_p
        expect = probs[:allowed] / probs[:allowed].sum()  # renormalized inside the nucleus
        assert torch.allclose(counts[:allowed], expect, atol=0.03)
    ctx = torch.zeros(1, 1, dtype=torch.long)
    for min_p, kept in [(0.2, 3), (0.5, 2), (0.9, 1)]:  # cut at min_p * 0.5
        out = sample.process_logits(probs.log()[None].clone(), ctx, min_p=min_p)
        assert torch.isfinite(out[0]).sum().item() == kept
    # repetition penalty (CTRL): a seen positive logit is divided, a seen negative one multiplied
    out = sample.process_logits(torch.tensor([[2.0, -2.0, 1.0]]), torch.tensor([[0, 1, 1]]), repetition_penalty=2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_sample_stops_at_end_token_and_finished_rows_repeat_it(sample_env):
    ids = [sample_env["tok"].encode("To be, or")] * 1
    full = _sample_run(sample_env, ids, 20, temperature=0.0)[0]
    stop = full[5]
    first = full.index(stop)
    assert _sample_run(sample_env, ids, 20, temperature=0.0, stop_ids=[stop]) == [full[: first + 1]]
    # two rows that stop at different steps: the early one repeats its stop id until the other ends
    other = sample_env["tok"].encode("Good morrow, kind sir, and well met")[: len(ids[0])]
    assert len(other) == len(ids[0])
    full2 = _sample_run(sample_env, [other], 20, temperature=0.0)[0]
    rows = _sample_run(sample_env, ids + [other], 20, temperature=0.0, stop_ids=[stop])
    n = max(first + 1, full2.index(stop) + 1 if stop in full2 else 20)
    assert rows[0] == full[: first + 1] + [stop] * (n - first - 1)
    assert rows[1] == full2[:n]


def test_sample_ragged_prompts_match_each_prompt_alone(sample_env):
    tok, m = sample_env["tok"], sample_env["model"]
    prompts = [tok.encode("O"), tok.encode("Now is the winter of our discontent"), tok.encode("Hark, hark")]
    assert len({len(p) for p in prompts}) == 3
    batch = sample.generate_batch(m, prompts, 12, temperature=0.0, vocab_limit=sample_env["vocab_limit"])
    alone = [sample.generate_batch(m, [p], 12, temperature=0.0, vocab_limit=sample_env["vocab_limit"])[0]
             for p in prompts]
    assert batch == alone
    T = max(len(p) for p in prompts)  # and model.generate's own left-padded path agrees
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    out = m.generate(idx, 12, temperature=0.0, vocab_limit=sample_env["vocab_limit"], prompt_lens=[len(p) for p in prompts])
    assert out[:, T:].tolist() == batch


# -----------------------------------------------------------------------------
# streaming, prompts, CLI


def test_sample_utf8_stream_holds_back_split_characters(sample_env):
    tok = sample_env["tok"]
    text = "na\u00efve caf\u00e9 \u20ac \u65e5\u672c \U0001f642!"
    ids = tok.encode(text)
    pieces = [tok.decode_bytes([t]) for t in ids]
    split = [p for p in pieces if _sample_incomplete(p)]
    assert split, "the test needs a character split across tokens"
    naive = "".join(tok.decode([t]) for t in ids)
    assert "\ufffd" in naive  # decoding token by token would print garbage
    out = io.StringIO()
    stream = sample.Utf8Stream(tok, out)
    chunks = [stream.write([t]) for t in ids] + [stream.close()]
    assert all("\ufffd" not in c for c in chunks)
    assert out.getvalue() == "".join(chunks) == text == tok.decode(ids)
    raw = sample.Utf8Stream(tok)  # the docstring's example: ids 0..255 are the single bytes
    assert (raw.write([0xC3]), raw.write([0xA9]), raw.close()) == ("", "\u00e9", "")


def _sample_incomplete(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_sample_fit_context_truncates_from_the_left():
    ids, n, warning = sample.fit_context(list(range(10)), block_size=8, max_new_tokens=3)
    assert ids == list(range(5, 10)) and n == 3 and "dropped the oldest 5" in warning
    ids, n, warning = sample.fit_context(list(range(3)), block_size=8, max_new_tokens=100)
    assert ids == [0, 1, 2] and n == 5 and "cut to 5" in warning
    assert sample.fit_context([1, 2], 8, 3) == ([1, 2], 3, "")


@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16)])
def test_sample_dtype_auto_is_what_its_help_says(monkeypatch, capability, dtype):
    # SampleConfig.dtype's comment: bf16 at compute capability >= 8.0, fp16 below, fp32 on CPU
    assert train.choose_device(sample.SampleConfig(device="cpu"))[1] == torch.float32
    _train_fake_cuda(monkeypatch, capability, [])
    assert train.choose_device(sample.SampleConfig())[1] == dtype


def test_sample_cli_greedy_prints_prompt_and_reference_continuation(sample_env, capsys):
    tok = sample_env["tok"]
    prompt = "MENENIUS:\nWhy, masters"
    sample.main([f"--out_dir={sample_env['out_dir']}", f"--prompt={prompt}", "--max_new_tokens=15",
                 "--temperature=0", "--device=cpu"])
    cap = capsys.readouterr()
    new = _sample_argmax_chain(sample_env["model"], [tok.encode(prompt)], 15, sample_env["vocab_limit"])[0]
    new = new[: new.index(tok.eot_id)] if tok.eot_id in new else new
    assert cap.out == prompt + tok.decode(new) + "\n"
    assert "prefill:" in cap.err and "decode:" in cap.err and "tok/s" in cap.err


def test_sample_cli_long_prompt_file_is_truncated_with_warning(sample_env, capsys, tmp_path):
    tok, block = sample_env["tok"], sample_env["model"].config.block_size
    path = tmp_path / "p.txt"
    path.write_text(_sample_text()[:2000], encoding="utf-8")
    sample.main([f"--out_dir={sample_env['out_dir']}", f"--prompt=FILE:{path}", "--max_new_tokens=8",
                 "--temperature=0", "--stream=False"])
    cap = capsys.readouterr()
    assert "warning: prompt has" in cap.err
    kept = tok.encode(path.read_text(encoding="utf-8"))[-(block - 8):]
    new = _sample_argmax_chain(sample_env["model"], [kept], 8, sample_env["vocab_limit"])[0]
    new = new[: new.index(tok.eot_id)] if tok.eot_id in new else new
    assert cap.out == tok.decode(kept + new) + "\n"


@pytest.mark.parametrize("args, words", [
    (["--out_dir={root}/missing"], "does not exist"),
    (["--out_dir={root}/notok"], "tokenizer.bpe is missing"),
    (["--out_dir={root}"], "no best.pt or ckpt.pt in"),
    (["--top_p=1.5"], "top_p=1.5 is outside (0, 1]"),
    (["--temperature=-1"], "temperature=-1.0 is negative"),
    (["--prompt=FILE:{root}/nope.txt"], "prompt file"),
])
def test_sample_cli_bad_input_one_sentence(sample_env, capsys, args, words):
    root = sample_env["root"]
    if not (root / "notok").exists():
        shutil.copytree(sample_env["out_dir"], root / "notok")
        os.remove(root / "notok" / "tokenizer.bpe")
    argv = [a.format(root=root) for a in args]
    if not any(a.startswith("--out_dir") for a in argv):
        argv.append(f"--out_dir={sample_env['out_dir']}")
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and words in err[-1]
    assert not any("Traceback" in line for line in err)


def test_sample_hf_dir_gives_the_same_tokens(sample_env, tmp_path):
    m, tok = sample_env["model"], sample_env["tok"]
    m.save_hf(str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="has no tokenizer.bpe"):  # and a 320-id vocab is not GPT-2's
        sample.load_for_sampling(hf=str(tmp_path / "hf"))
    shutil.copy(os.path.join(sample_env["out_dir"], "tokenizer.bpe"), tmp_path / "hf")
    m2, tok2, vl2 = sample.load_for_sampling(hf=str(tmp_path / "hf"))
    ids = [tok.encode("Thou art")]
    env2 = dict(sample_env, model=m2)
    assert _sample_run(env2, ids, 12, temperature=0.0, vocab_limit=vl2) == _sample_run(sample_env, ids, 12, temperature=0.0)


# -----------------------------------------------------------------------------
# chat


def test_sample_chat_history_trimmed_to_window(sample_env):
    tok = sample_env["tok"]
    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(12):
        msgs += [{"role": "user", "content": f"question {i} about the king"}, {"role": "assistant", "content": "Aye."}]
    msgs.append({"role": "user", "content": "last one"})
    ids, kept, warning = sample.chat_prompt_ids(tok, msgs, 40)
    assert len(ids) <= 40 and "trimmed" in warning
    assert kept[0] == msgs[0] and kept[1]["role"] == "user" and kept[1:] == msgs[-(len(kept) - 1):]
    assert ids == tok.encode_chat(kept, add_generation_prompt=True)[0]
    longer = sample.chat_prompt_ids(tok, [msgs[0]] + msgs[-(len(kept) + 1):], 40)
    assert longer[1] == kept  # one turn more would not have fit


def test_sample_chat_repl_through_a_pipe(sample_env):
    tok, m, vl = sample_env["tok"], sample_env["model"], sample_env["vocab_limit"]
    stop = [tok.special_tokens["<|end|>"], tok.eot_id]

    def reply(messages):  # the reference: model.generate on the chat template
        ids, _ = tok.encode_chat(messages, add_generation_prompt=True)
        out = m.generate(torch.tensor([ids]), 10, temperature=0.0, eos_id=stop, vocab_limit=vl)[0, len(ids):].tolist()
        return tok.decode([t for t in out[: next((i for i, t in enumerate(out) if t in stop), len(out))]])

    r1 = reply([{"role": "user", "content": "Hello there"}])
    r2 = reply([{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": r1},
                {"role": "user", "content": "Who are you"}])
    proc = subprocess.run(
        [sys.executable, "sample.py", f"--out_dir={sample_env['out_dir']}", "--chat", "--temperature=0",
         "--max_new_tokens=10", "--device=cpu", "--threads=1"],
        input="Hello there\nWho are you\n/reset\nHello there\n/exit\nnever read\n",
        capture_output=True, text=True, cwd=_sample_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{r1}\n{r2}\n{r1}\n"  # /reset: the third answer is the first again
    assert "(history cleared)" in proc.stderr and "decode:" in proc.stderr


# -----------------------------------------------------------------------------
# The tokenizer beside a checkpoint must be the one it was trained with


def test_sample_refuses_a_tokenizer_the_checkpoint_was_not_trained_with(sample_env, tmp_path,
                                                                         capsys):
    out = _sample_write_ckpt(str(tmp_path / "out"), sample_env["tok"])
    ckpt_path, tok_path = os.path.join(out, "ckpt.pt"), os.path.join(out, "tokenizer.bpe")
    ck = torch.load(ckpt_path, weights_only=True)
    with open(tok_path, "rb") as f:  # what train.py records, computed here with hashlib itself
        ck.update(tokenizer_sha256=hashlib.sha256(f.read()).hexdigest(), dataset="data/plays")
    torch.save(ck, ckpt_path)
    assert sample.load_for_sampling(out)[1].ranks == sample_env["tok"].ranks  # the right one loads
    # another BPE of the same size loads without complaint on its own, so only the hash catches it
    other = Tokenizer.train(_sample_text()[:5000][::-1], vocab_size=300)
    assert other.n_vocab == sample_env["tok"].n_vocab and other.ranks != sample_env["tok"].ranks
    other.save(tok_path)
    with pytest.raises(ValueError) as e:
        sample.load_for_sampling(out)
    message = str(e.value)
    hint = os.path.join("data/plays", "tokenizer.bpe")
    assert message == (f"{tok_path} is not the tokenizer {ckpt_path} was trained with (its sha256 "
                       f"differs from the one the checkpoint records); copy {hint} into {out}, "
                       f"or retrain")
    with pytest.raises(ValueError, match="is not the tokenizer"):  # bench.py reads the pair too
        bench.checkpoint_tokenizer(ckpt_path, ck)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample.main([f"--out_dir={out}", "--device=cpu"])
    err = capsys.readouterr().err.strip().splitlines()  # the config lines, then one error line
    assert e.value.code == 1 and err[-1] == f"error: {message}"
    assert not any("Traceback" in line for line in err)
    del ck["tokenizer_sha256"]  # checkpoints without the field (older ones) skip the check
    torch.save(ck, ckpt_path)
    assert sample.load_for_sampling(out)[1].ranks == other.ranks


# -----------------------------------------------------------------------------
# sample.py --export: Hugging Face directories and GGUF files, run by transformers and llama.cpp

import contextlib


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def _export_ckpt(request, _train_data, tmp_path_factory):
    """A train.py out_dir of each model style (30 steps, context 64) to export: its path."""
    data_dir, _ = _train_data
    out = tmp_path_factory.mktemp("export") / request.param
    kw = {} if request.param == "gpt2" else dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=1)
    with contextlib.redirect_stdout(io.StringIO()):
        train.train(_train_cfg(data_dir, out, block_size=64, max_steps=30, eval_interval=30, **kw))
    return out


def test_export_hf_generates_what_sample_py_generates(_export_ckpt, _train_data, tmp_path, capsys):
    # reference: sample.py --temperature=0 on the checkpoint, against transformers on the export
    transformers = pytest.importorskip("transformers")
    _, tok = _train_data
    out, hf = _export_ckpt, tmp_path / "hf"
    sample.main([f"--out_dir={out}", f"--export={hf}"])
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "tokenizer.bpe"} <= set(os.listdir(hf))
    prompt = "def main(self, "
    capsys.readouterr()
    sample.main([f"--out_dir={out}", f"--prompt={prompt}", "--temperature=0", "--max_new_tokens=24",
                 "--device=cpu"])
    ours = capsys.readouterr().out
    at = transformers.AutoTokenizer.from_pretrained(str(hf))
    m = transformers.AutoModelForCausalLM.from_pretrained(str(hf)).eval()
    ids = at(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == tok.encode(prompt)
    new = m.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24)
    assert at.decode(new[0], skip_special_tokens=True) + "\n" == ours
    model, _, limit = sample.load_for_sampling(str(out))
    ref = model.generate(ids, new.size(1) - ids.size(1), temperature=0.0, vocab_limit=limit)
    assert ref[0].tolist() == new[0].tolist()
    # an imported Hugging Face model exports again to the same weights
    sample.main([f"--hf={hf}", f"--export={tmp_path / 'again'}"])
    from safetensors.torch import load_file
    a, b = load_file(str(hf / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_export_gguf_runs_in_llama_cpp_like_sample_py(_export_ckpt, _train_data, tmp_path, capsys):
    # reference: sample.py --temperature=0 on the checkpoint; llama.cpp (llama-cpp-python) on the
    # file, where it is installed (it builds from source: .ci/run does not install it)
    pytest.importorskip("gguf")
    llama_cpp = pytest.importorskip("llama_cpp")
    _, tok = _train_data
    out, path = _export_ckpt, tmp_path / "m.gguf"
    sample.main([f"--out_dir={out}", f"--export={path}", "--format=gguf"])
    prompt = "def main(self, "
    capsys.readouterr()
    sample.main([f"--out_dir={out}", f"--prompt={prompt}", "--temperature=0", "--max_new_tokens=24",
                 "--device=cpu"])
    ours = capsys.readouterr().out
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, n_threads=1, seed=0)
    text = "x = [1, 2]  # caf\u00e9 \u4f60\u597d \U0001F600\n\tdef f():\n        return 42"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
    got = llm(prompt, max_tokens=24, temperature=0.0, top_k=1)["choices"][0]["text"]
    assert prompt + got + "\n" == ours


def test_export_of_an_imported_model_whose_tokenizer_lacks_rows(_train_data, tmp_path, capsys):
    # a Hugging Face dir with GPT-2's shape of problem: the tokenizer adds chat tokens after the
    # model's last row; the export grows the rows so every token it names has one
    transformers = pytest.importorskip("transformers")
    _, tok = _train_data
    src = tmp_path / "src"
    plain = _tokenizer_without_chat_tokens(tok, src)
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=plain.eot_id + 1, block_size=64, n_layer=1, n_head=2, n_embd=32)).save_hf(str(src))
    sample.main([f"--hf={src}", f"--export={tmp_path / 'hf'}"])
    assert "exporting 320 rows, the new ones at the mean embedding" in capsys.readouterr().err
    m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert m.config.vocab_size == 320 and m.get_input_embeddings().weight.shape[0] == 320
    chat = [{"role": "user", "content": "sort [2, 1]"}, {"role": "assistant", "content": "[1, 2]"}]
    at = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    got = at.apply_chat_template(chat, tokenize=True)
    got = got["input_ids"] if not isinstance(got, list) else got
    assert got == plain.encode_chat(chat)[0]


# -----------------------------------------------------------------------------
# finetune.py: supervised fine-tuning with the chat template, prompt masking and LoRA

import contextlib
import re

import finetune


@pytest.fixture(scope="module")
def _ft_pretrained(_train_data, tmp_path_factory):
    """A train.py out_dir (tiny model, context 64) to fine-tune from: (out_dir, tokenizer)."""
    data_dir, tok = _train_data
    out = tmp_path_factory.mktemp("ft") / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        train.train(_train_cfg(data_dir, out, block_size=64, max_steps=20, eval_interval=20))
    return str(out), tok


def _ft_cfg(init_from, out_dir, **kw):
    base = dict(init_from=init_from, out_dir=str(out_dir), device="cpu", max_steps=6, batch_size=8,
                learning_rate=3e-3, eval_interval=3, eval_examples=8, log_interval=1000,
                builtin_train=400, builtin_val=16)
    base.update(kw)
    return finetune.FinetuneConfig(**base)


def test_finetune_mask_is_the_reply_and_its_end_token(_train_data):
    # reference: the template written out by hand, and the targets it should produce
    _, tok = _train_data
    sp = tok.special_tokens
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort [2, 1]"},
                {"role": "assistant", "content": "[1, 2]"}]
    rendered = ([sp["<|system|>"]] + tok.encode("be brief") + [sp["<|end|>"]] + [sp["<|user|>"]]
                + tok.encode("sort [2, 1]") + [sp["<|end|>"]] + [sp["<|assistant|>"]]
                + tok.encode("[1, 2]") + [sp["<|end|>"]])
    x, y, cut = finetune.encode_example(tok, messages, 64)
    reply = len(tok.encode("[1, 2]")) + 1  # the reply's tokens and its <|end|>
    assert x == rendered[:-1] and not cut
    assert y == [-100] * (len(rendered) - 1 - reply) + rendered[-reply:]
    assert y[-1] == sp["<|end|>"] and sum(t != -100 for t in y) == reply
    # the rendering parses back into the same conversation (decode keeps the special tokens)
    text = tok.decode(rendered)
    parsed = [{"role": r, "content": c} for r, c in re.findall(r"<\|(system|user|assistant)\|>(.*?)<\|end\|>", text)]
    assert parsed == messages
    # a second assistant turn is learned too; the user turn between them is not
    two = messages + [{"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    _, y2, _ = finetune.encode_example(tok, two, 64)
    assert sum(t != -100 for t in y2) == reply + len(tok.encode("ok")) + 1


def test_finetune_padding_changes_nothing_and_truncation_is_counted(_train_data):
    _, tok = _train_data
    examples = finetune.builtin_task(12, 1, 0)[0]
    batches = finetune.ChatBatches(tok, examples, 64, 0, "test")
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=320, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    x, y = batches.batch(range(12), "cpu")
    assert (x[y == -100] == tok.pad_id).sum() > 0 and ((x == tok.pad_id) <= (y == -100)).all()
    with torch.no_grad():
        _, padded = m(x, y)
        # reference: each example alone, unpadded, its loss weighted by its reply tokens
        alone = [(m(torch.tensor([a]), torch.tensor([b]))[1].item(), sum(t != -100 for t in b))
                 for a, b in (batches.example(r) for r in range(12))]
    assert padded.item() == pytest.approx(sum(l * n for l, n in alone) / sum(n for _, n in alone), rel=1e-5)
    # too long: cut to the context and counted; a reply pushed wholly past it is dropped
    long_prompt = {"messages": [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "y"}]}
    long_reply = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "z " * 200}]}
    b = finetune.ChatBatches(tok, [long_reply, long_prompt, *examples[:2]], 64, 0, "test")
    assert (b.truncated, b.dropped, len(b.examples)) == (2, 1, 3)
    assert max(len(x) for x, _ in b.examples) == 64


_FT_STYLES = {"gpt2": {}, "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=1,
                                           tie_embeddings=False)}


@pytest.mark.parametrize("style", sorted(_FT_STYLES))
def test_finetune_lora_freezes_the_base_and_merges_exactly(style):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, **_FT_STYLES[style])
    m = GPT(cfg)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    idx = torch.randint(0, 64, (2, 16))
    ref = m(idx)[0]
    names = finetune.apply_lora(m, rank=4, alpha=8.0, targets=finetune.LORA_TARGETS)
    assert names and all(".lm_head" not in n for n in names)
    assert torch.equal(m(idx)[0], ref)  # B starts at zero: the same model
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        m(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad()
    frozen = {k.replace(".base", ""): v for k, v in m.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(frozen[k], base[k]) for k in base)  # the base never moved
    weights = finetune.plain_weights(m)  # merged into a copy; m keeps its adapters
    assert sorted(weights) == sorted(base) and any("lora_A" in k for k in m.state_dict())
    plain = GPT(cfg)
    plain.load_state_dict(weights)
    torch.testing.assert_close(plain(idx)[0], m(idx)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain(idx)[0], ref)  # and it did learn something
    with pytest.raises(ValueError, match="match no nn.Linear"):
        finetune.apply_lora(GPT(cfg), rank=4, targets=("nothing",))


def test_finetune_tiny_model_learns_the_builtin_task(_ft_pretrained, tmp_path):
    init, _ = _ft_pretrained
    s = finetune.finetune(_ft_cfg(init, tmp_path / "sft", max_steps=400, batch_size=16, eval_interval=1000,
                                  eval_examples=50, builtin_train=2000, builtin_val=50))
    assert s["exact_match_before"] == 0.0 and s["exact_match"] >= 0.1
    log = [json.loads(line) for line in open(tmp_path / "sft" / "log.jsonl")]
    assert log[-1]["exact_match"] == s["exact_match"] and log[-1]["val_loss"] < 1.5


@pytest.mark.parametrize("task, lora", [("sft", 0), ("sft", 4), ("dpo", 0), ("classify", 4)])
def test_finetune_resume_is_bit_identical(_ft_pretrained, tmp_path, task, lora):
    # dpo without LoRA: the resumed run's reference must still be the starting model
    init, _ = _ft_pretrained
    kw = dict(task=task, max_steps=6, lora_rank=lora, lora_dropout=0.1 if lora else 0.0, log_interval=1,
              learning_rate=3e-3)
    finetune.finetune(_ft_cfg(init, tmp_path / "a", **kw))
    finetune.finetune(_ft_cfg(init, tmp_path / "b", stop_step=3, **kw))
    finetune.finetune(_ft_cfg(init, tmp_path / "b", resume=True, **kw))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    curve = lambda d: [(r["step"], r["loss"]) for r in map(json.loads, open(tmp_path / d / "log.jsonl")) if "loss" in r]
    assert curve("a") == curve("b")
    # the saved weights are a plain GPT's (adapters merged): train.load_checkpoint reads them
    model, ck = train.load_checkpoint(str(tmp_path / "a" / "best.pt"))
    assert ck["finetune"]["lora_rank"] == lora and ("resume_weights" in ck) == bool(lora or task == "classify")


def test_finetune_output_chats_through_sample_py(_ft_pretrained, tmp_path):
    init, _ = _ft_pretrained
    finetune.finetune(_ft_cfg(init, tmp_path / "sft", max_steps=3))
    r = subprocess.run([sys.executable, "sample.py", f"--out_dir={tmp_path / 'sft'}", "--chat",
                        "--temperature=0", "--device=cpu", "--max_new_tokens=8"], input="sort [3, 1]\n/exit\n",
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_finetune_reads_chat_and_alpaca_jsonl_and_names_bad_lines(_ft_pretrained, tmp_path, capsys):
    init, _ = _ft_pretrained
    good = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(5)] + [{"instruction": "say hi", "input": "to Ann", "output": "hi Ann"}]
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(e) + "\n" for e in good) + "\n")
    examples = finetune.read_examples(str(tmp_path / "good.jsonl"))
    assert examples[:5] == good[:5] and examples[5]["messages"] == [
        {"role": "user", "content": "say hi\n\nto Ann"}, {"role": "assistant", "content": "hi Ann"}]
    train_set, val = finetune.split_examples(examples, 0.05)
    assert len(val) == 1 and len(train_set) == 5
    bad = {"not JSON": ('{"messages": [', "line 3 is not valid JSON"),
           "not an object": ("[1, 2]", "line 3 is not a JSON object"),
           "no assistant turn": (json.dumps({"messages": [{"role": "user", "content": "q"}]}),
                                 "line 3: the conversation has no assistant turn"),
           "a bad role": (json.dumps({"messages": [{"role": "bot", "content": "q"}]}), "line 3: a message needs a role"),
           "neither format": (json.dumps({"prompt": "q"}), "line 3 has neither")}
    for name, (line, message) in bad.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(good[0]) + "\n\n" + line + "\n")
        with pytest.raises(SystemExit) as e:
            finetune.main([f"--init_from={init}", f"--data={path}", f"--out_dir={tmp_path / 'o'}", "--device=cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1 and message in err[0] and str(path) in err[0], (name, err)
    (tmp_path / "empty.jsonl").write_text("\n")
    cases = [([f"--data={tmp_path / 'empty.jsonl'}"], "holds no examples"),
             ([f"--data={tmp_path / 'missing.jsonl'}"], "does not exist"),
             (["--lora_rank=4", "--lora_targets=nothing"], "match no nn.Linear")]
    for args, message in cases:
        with pytest.raises(SystemExit):
            finetune.main([f"--init_from={init}", f"--out_dir={tmp_path / 'o'}", "--device=cpu", *args])
        assert message in capsys.readouterr().err
    lonely = tmp_path / "lonely"  # a checkpoint without its tokenizer
    lonely.mkdir()
    shutil.copy(os.path.join(init, "ckpt.pt"), lonely / "ckpt.pt")
    with pytest.raises(SystemExit):
        finetune.main([f"--init_from={lonely}", f"--out_dir={tmp_path / 'o'}", "--device=cpu"])
    assert "tokenizer.bpe is missing" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "ckpt.pt")  # nothing half-written


def test_finetune_dpo_loss_matches_a_hand_computation():
    beta = 0.1
    pc, pr = torch.tensor([-1.0, -2.0], requires_grad=True), torch.tensor([-3.0, -1.5])
    rc, rr = torch.tensor([-1.5, -1.5]), torch.tensor([-2.0, -2.0])
    loss, margin, accuracy = finetune.dpo_loss(pc, pr, rc, rr, beta)
    # pair 1: chosen reward 0.1 * 0.5 = 0.05, rejected 0.1 * -1.0 = -0.1, margin z1 = 0.15
    # pair 2: chosen reward 0.1 * -0.5 = -0.05, rejected 0.1 * 0.5 = 0.05, margin z2 = -0.1
    hand = (math.log(1 + math.exp(-0.15)) + math.log(1 + math.exp(0.1))) / 2  # -log sigmoid(z)
    assert loss.item() == pytest.approx(hand, abs=1e-6)
    assert margin.item() == pytest.approx((0.15 - 0.1) / 2, abs=1e-6) and accuracy.item() == 0.5
    assert finetune.dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta)[0].item() == pytest.approx(0.6210, abs=1e-4)
    loss.backward()  # d loss / d pc_i = -beta * sigmoid(-z_i) / N (Rafailov et al. section 5)
    sig = lambda z: 1 / (1 + math.exp(-z))
    assert pc.grad.tolist() == pytest.approx([-beta * sig(-0.15) / 2, -beta * sig(0.1) / 2], abs=1e-7)


@pytest.mark.parametrize("lora", [0, 4])
def test_finetune_dpo_starts_at_log_2_and_sequence_logprobs_equal_a_slow_loop(lora):
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    if lora:
        finetune.apply_lora(m, rank=lora)
    ids = torch.randint(0, 64, (4, 10))
    targets = ids.roll(-1, dims=1).clone()
    targets[:, :3] = -100  # a prompt
    targets[1, 7:] = -100  # padding
    fast = finetune.sequence_logprobs(m, ids, targets)
    slow = torch.zeros(4)  # reference: one forward per prefix, log_softmax, summed by hand
    with torch.no_grad():
        for b in range(4):
            for t in range(10):
                if targets[b, t] != -100:
                    logits, _ = m(ids[b:b + 1, :t + 1])
                    slow[b] += F.log_softmax(logits[0, -1], dim=-1)[targets[b, t]]
    torch.testing.assert_close(fast.detach(), slow, atol=1e-5, rtol=0)
    # the policy at the start is its reference (frozen copy, or the adapters switched off)
    _, loss = finetune.DPOObjective(m, beta=0.1)(ids, targets)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_finetune_dpo_learns_the_preference(_ft_pretrained, tmp_path, capsys):
    init, _ = _ft_pretrained
    sft = tmp_path / "sft"
    finetune.finetune(_ft_cfg(init, sft, max_steps=200, batch_size=16, eval_interval=1000,
                              builtin_train=1000, builtin_val=40))
    finetune.finetune(_ft_cfg(str(sft), tmp_path / "dpo", task="dpo", max_steps=60, batch_size=8,
                              learning_rate=1e-3, eval_interval=1000, log_interval=1,
                              builtin_train=1000, builtin_val=40))
    rows = [json.loads(line) for line in open(tmp_path / "dpo" / "log.jsonl")]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: policy == reference
    last = [r for r in rows if "preference_accuracy" in r][-1]
    assert last["preference_accuracy"] > 0.6 and last["reward_margin"] > 0
    # a pair with the same reply twice is refused with its line number
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "p", "chosen": "same", "rejected": "same "}) + "\n")
    with pytest.raises(SystemExit):
        finetune.main([f"--init_from={init}", "--task=dpo", f"--data={path}", f"--out_dir={tmp_path / 'o'}",
                       "--device=cpu"])
    assert "line 2: chosen and rejected are the same reply" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["sft", "classify"])
def test_finetune_ddp_two_processes_match_one(_ft_pretrained, tmp_path, task):
    # reference: one process on the same global batch. sft weighs every reply token of the step
    # alike (ReplyLoss), whichever process holds it; the head's gradients are all-reduced too
    init, _ = _ft_pretrained
    kw = dict(task=task, max_steps=4, batch_size=8, learning_rate=3e-3, eval_interval=4, builtin_train=200, builtin_val=8)
    args = [f"--{k}={v}" for k, v in kw.items()] + [f"--init_from={init}", "--device=cpu", "--eval_examples=8"]
    _torchrun("finetune.py", tmp_path / "ddp", args)
    finetune.finetune(_ft_cfg(init, tmp_path / "one", **kw))
    wa, wb = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("one", "ddp"))
    for k in wa["model"]:
        torch.testing.assert_close(wb["model"][k], wa["model"][k], atol=1e-5, rtol=1e-4)
    if task == "classify":
        torch.testing.assert_close(wb["classifier"]["weight"], wa["classifier"]["weight"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("style", sorted(_FT_STYLES))
def test_finetune_packed_loss_and_gradients_equal_padded(_train_data, style):
    # reference: the same examples padded one per row (pad_rows, checked against each example alone above)
    _, tok = _train_data
    rows = [finetune.encode_example(tok, e["messages"], 64)[:2] for e in finetune.builtin_task(16, 1, 3)[0]]
    x, y = finetune.pad_rows(rows, tok.pad_id, "cpu")
    px, py, kw = finetune.pack_rows(rows, tok.pad_id, 64, "cpu")
    assert px.size(0) < x.size(0) and px.size(1) <= 64
    assert sorted(py[py != -100].tolist()) == sorted(y[y != -100].tolist())  # every target once
    assert torch.equal(GPT._segment_positions(torch.tensor([[0, 0, 0, 1, 1, 2, 2]])),
                       torch.tensor([[0, 1, 2, 0, 1, 0, 1]]))
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                      **_FT_STYLES[style]))
    losses, grads = [], []
    for inputs, targets, extra in ((x, y, {}), (px, py, kw)):
        m.zero_grad()
        loss = m(inputs, targets, **extra)[1]
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in m.parameters()])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)
    m.manual_attention = True  # the explicit softmax path reads the same mask
    assert m(px, py, **kw)[1].item() == pytest.approx(losses[0], rel=1e-5)


def test_finetune_pack_trains_like_padding(_ft_pretrained, tmp_path):
    init, _ = _ft_pretrained
    for pack in (False, True):
        finetune.finetune(_ft_cfg(init, tmp_path / str(pack), pack=pack, max_steps=4, log_interval=1))
    curve = lambda d: [r["loss"] for r in map(json.loads, open(tmp_path / d / "log.jsonl")) if "loss" in r]
    assert len(curve("True")) == 4 and curve("True") == pytest.approx(curve("False"), rel=1e-4)
    with pytest.raises(ValueError, match="--pack packs chat examples for --task=sft"):
        finetune.finetune(_ft_cfg(init, tmp_path / "dpo", task="dpo", pack=True))


@pytest.mark.parametrize("style", sorted(_FT_STYLES))
def test_model_grow_vocab_keeps_old_rows_and_means_new_ones(style):
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=70, block_size=16, n_layer=1, n_head=2, n_embd=32, **_FT_STYLES[style]))
    wte, head = m.transformer.wte.weight.detach().clone(), m.lm_head.weight.detach().clone()
    idx = torch.randint(0, 60, (2, 16))
    ref = m(idx, idx)[0]
    assert m.grow_vocab(75, [65]) == 70  # ids 70..74 are new, 65 existed but was never trained
    assert m.config.vocab_size == 128 and m.transformer.wte.weight.shape == m.lm_head.weight.shape == (128, 32)
    assert (m.lm_head.weight is m.transformer.wte.weight) == (style == "gpt2")  # tied stays tied
    for new, old in ((m.transformer.wte.weight, wte), (m.lm_head.weight, head)):
        keep = [i for i in range(70) if i != 65]
        assert torch.equal(new[keep], old[keep])
        torch.testing.assert_close(new[[65] + list(range(70, 128))], old.mean(0).expand(59, -1))
    logits = m(idx, idx)[0]
    torch.testing.assert_close(logits[..., keep], ref[..., keep])  # old tokens: the same model
    again = GPT(m.config)
    again.load_state_dict(m.state_dict())  # a checkpoint of it loads as a plain GPT


def _tokenizer_without_chat_tokens(tok, folder) -> Tokenizer:
    """folder/tokenizer.bpe: tok with <|endoftext|> as its only special token, as GPT-2's BPE;
    returns it loaded (Tokenizer adds the others back after its last id)."""
    folder.mkdir()
    tok.save(str(folder / "full.bpe"))
    lines = (folder / "full.bpe").read_text(encoding="utf-8").split("\n")
    (folder / "full.bpe").unlink()
    (folder / "tokenizer.bpe").write_text("\n".join(l for l in lines if not l.startswith("special ")
                                                     or "endoftext" in l), encoding="utf-8")
    return Tokenizer.load(str(folder / "tokenizer.bpe"))


def test_finetune_from_a_hugging_face_dir_whose_tokenizer_lacks_chat_tokens(_train_data, tmp_path, capsys):
    _, tok = _train_data
    # a tokenizer file with only <|endoftext|> (as GPT-2's), and a model with no rows past it
    hf = tmp_path / "hf"
    plain = _tokenizer_without_chat_tokens(tok, hf)
    assert plain.added_specials == SPECIAL_TOKENS[1:]
    n_rows = plain.eot_id + 1
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=n_rows, block_size=64, n_layer=2, n_head=2, n_embd=32)).save_hf(str(hf))
    assert finetune.is_hf_dir(str(hf)) and not finetune.is_hf_dir(str(tmp_path))
    out = tmp_path / "sft"
    finetune.finetune(_ft_cfg(str(hf), out, max_steps=3))
    said = [l for l in capsys.readouterr().out.splitlines() if l.startswith("tokenizer:")]
    assert len(said) == 1 and "lacks <|pad|>, <|system|>, <|user|>, <|assistant|>, <|end|>: added" in said[0]
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["model_config"]["vocab_size"] == -(-plain.n_vocab // 64) * 64 > n_rows
    assert Tokenizer.load(str(out / "tokenizer.bpe")).special_tokens == plain.special_tokens
    model, loaded, limit = sample.load_for_sampling(str(out))  # sample.py reads it as its own
    assert limit == plain.n_vocab and loaded.special_tokens == plain.special_tokens


def _ft_class_file(path, n):
    """n classification lines: "numbers" (digits) or "words" (from stdlib text), two of each in
    turn, so that every 10th line (the held-out ones) alternates too."""
    rng, words = random.Random(0), re.findall(r"[a-z]{3,}", _stdlib_text(50_000))
    with open(path, "w") as f:
        for i in range(n):
            k, digits = rng.randint(3, 8), (i // 2) % 2
            text = " ".join(str(rng.randrange(1000)) if digits else rng.choice(words) for _ in range(k))
            f.write(json.dumps({"text": text, "label": "numbers" if digits else "words"}) + "\n")


def test_finetune_classify_head_learns_and_loads_back(_ft_pretrained, tmp_path):
    init, _ = _ft_pretrained
    data, out = tmp_path / "cls.jsonl", tmp_path / "cls"
    _ft_class_file(data, 400)
    s = finetune.finetune(_ft_cfg(init, out, task="classify", data=str(data), max_steps=60, batch_size=16,
                                  eval_interval=1000, val_fraction=0.1))
    assert s["chance"] == 0.5 and s["accuracy"] >= 0.95 and s["accuracy"] >= s["accuracy_before"] + 0.2
    # the head comes back from best.pt and labels the held-out texts as the run scored them
    model, tok, classes = finetune.load_classifier(str(out))
    val = finetune.split_examples(finetune.read_examples(str(data), finetune.class_example_from_json), 0.1)[1]
    got = finetune.predict(model, tok, classes, [e["text"] for e in val])
    right = sum(g == e["label"] for g, e in zip(got, val)) / len(val)
    assert classes == ["numbers", "words"] and abs(right - s["accuracy"]) <= 1 / len(val)
    ck = torch.load(out / "best.pt", weights_only=True)
    assert not any(k.startswith("score.") for k in ck["model"]) and ck["classifier"]["classes"] == classes
    sample.load_for_sampling(str(out))  # the language model itself stays a plain checkpoint


def test_finetune_builtin_classify_is_balanced_and_holds_out_whole_files():
    train_set, val_set = finetune.builtin_classify(0)
    assert finetune.builtin_classify(0) == (train_set, val_set)
    for split in (train_set, val_set):
        counts = {p: sum(e["label"] == p for e in split) for p in finetune.CLASSIFY_PACKAGES}
        assert len(set(counts.values())) == 1 and min(counts.values()) >= 40, counts
    for package in finetune.CLASSIFY_PACKAGES:
        functions = finetune.stdlib_functions(package)
        files = sorted({f for f, _ in functions})
        held = set(files[4::5])
        held_texts = {t for f, t in functions if f in held}
        other_texts = {t for f, t in functions if f not in held}
        assert all(e["text"] in held_texts for e in val_set if e["label"] == package)
        assert all(e["text"] in other_texts for e in train_set if e["label"] == package)


# -----------------------------------------------------------------------------
# bench.py: speed, budgets and evals

# Tests for bench.py: budget arithmetic against hand-computed values, the multiple-choice
# scorer on a model whose answer is certain and against a row-by-row reference, bits per byte
# against an independent window loop, toy-size speed, ladder and inference runs, and the
# numbers bench.py's comments state (defaults, padding, matmul FLOPs, mode precedence).


_BENCH_MC = os.path.join(os.path.dirname(os.path.abspath(bench.__file__)), "evals", "mc_tiny.jsonl")


def _bench_tiny_config(**kw) -> GPTConfig:
    base = dict(vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=32)
    base.update(kw)
    return GPTConfig(**base)


@pytest.fixture
def _bench_one_thread():
    """One torch thread: on a shared, busy CPU two spinning OpenMP threads make toy-size ops
    ~10x slower and the timings noisy. Restored afterwards for the rest of the suite."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -----------------------------------------------------------------------------
# Budget


def test_bench_budget_gpt2_124m_on_10b_tokens():
    # by hand: 6 * 124e6 * 10e9 = 7.44e18 FLOPs; H100 at 40% of 989e12: 7.44e18 / 3.956e14 / 3600 = 5.22413 h
    b = bench.training_budget(124e6, 10e9, mfu=0.4, gpus=["H100", "A100"], price=2.0)
    assert b["flops"] == pytest.approx(7.44e18, rel=1e-12)
    h100, a100 = b["gpus"]
    assert h100["gpu_hours"] == pytest.approx(5.224132, rel=1e-6)
    assert a100["gpu_hours"] == pytest.approx(16.559829, rel=1e-6)  # 7.44e18 / (0.4 * 312e12) / 3600
    assert h100["cost"] == pytest.approx(2.0 * 5.224132, rel=1e-6)
    # Chinchilla default: 20 tokens per parameter
    assert bench.training_budget(124e6)["tokens"] == pytest.approx(2.48e9)
    with pytest.raises(ValueError, match="PEAK_BF16_FLOPS"):
        bench.training_budget(124e6, gpus=["TPU v9"])
    with pytest.raises(ValueError):
        bench.training_budget(124e6, mfu=1.5)


def test_bench_budget_preset_adds_attention(capsys):
    n, attn = bench.count_params_and_attention(GPTConfig(**PRESETS["gpt2"]))
    # by hand: 124,439,808 parameters minus wpe (1024 x 768); attention 12 * L * C * T = 12 * 12 * 768 * 1024
    assert n == 124_439_808 - 1024 * 768 == 123_653_376
    assert attn == 12 * 12 * 768 * 1024 == 113_246_208
    bench.main(["--budget", "--preset=gpt2", "--tokens=10e9", "--gpus=H100", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # --json: exactly one machine-readable line
    res = json.loads(out[0])
    assert res["flops"] == pytest.approx((6 * 123_653_376 + 113_246_208) * 10e9, rel=1e-12)  # 8.5517e18
    assert res["gpus"][0]["gpu_hours"] == pytest.approx(8.55166464e18 / (0.4 * 989e12) / 3600, rel=1e-9)


# -----------------------------------------------------------------------------
# Multiple choice


class _BenchNextIsPlusOne(nn.Module):
    """A fake LM whose logits give `logit` to token cur+1 and 0 to every other id, so every
    score has a closed form: log p(right) = logit - log(e^logit + V - 1), log p(wrong) = -log(...)."""

    def __init__(self, V=50, logit=10.0, block_size=64):
        super().__init__()
        self.V, self.logit = V, logit
        self.config = GPTConfig(vocab_size=V, block_size=block_size, n_layer=1, n_head=1, n_embd=8)

    def forward(self, idx, targets=None):
        logits = torch.zeros(*idx.shape, self.V)
        logits.scatter_(-1, ((idx + 1) % self.V).unsqueeze(-1), self.logit)
        return logits, None


def test_bench_mc_scorer_certain_answer_and_normalization():
    m = _BenchNextIsPlusOne()
    z = math.log(math.exp(10.0) + 49)
    right, wrong = 10.0 - z, -z
    ctx = [1, 2, 3]
    # certain: only ending 2 continues the +1 pattern
    ex1 = (ctx, [[9, 9], [5, 5], [4, 5, 6], [7]])
    # summed vs normalized disagree: A has one miss in 10 tokens, B one miss in 2
    ex2 = (ctx, [[4, 5, 6, 7, 20, 21, 22, 23, 24, 25], [4, 9]])
    (s1, n1), (s2, n2) = bench.score_endings(m, [ex1, ex2], batch_size=4, device=torch.device("cpu"))
    assert max(range(4), key=s1.__getitem__) == 2 and max(range(4), key=n1.__getitem__) == 2
    assert s1[2] == pytest.approx(3 * right, abs=1e-4)
    assert s1[0] == pytest.approx(2 * wrong, abs=1e-4)
    assert s2[0] == pytest.approx(9 * right + wrong, abs=1e-4) and n2[0] == pytest.approx((9 * right + wrong) / 10, abs=1e-4)
    assert s2[1] == pytest.approx(right + wrong, abs=1e-4) and n2[1] == pytest.approx((right + wrong) / 2, abs=1e-4)
    assert s2[1] > s2[0] and n2[0] > n2[1]  # the sum prefers the short ending, the per-token mean the long one


def _bench_reference_scores(model, ctx, endings):
    """Row by row, no padding, no batching: the slow path the batched scorer must match."""
    T = model.config.block_size
    out = []
    for end in endings:
        row = (ctx + end)[-(T + 1):]
        x = torch.tensor([row[:-1]])
        logits, _ = model(x, torch.tensor([row[1:]]))
        out.append(-F.cross_entropy(logits[0, -len(end):], torch.tensor(end), reduction="sum").item())
    return out


@pytest.mark.usefixtures("_bench_one_thread")
def test_bench_mc_batched_matches_row_by_row():
    torch.manual_seed(0)
    model = GPT(_bench_tiny_config(block_size=16)).eval()
    g = torch.Generator().manual_seed(1)
    examples = []
    for n_ctx in (3, 7, 20):  # 20 + ending > 16 + 1: the oldest context tokens are dropped
        ctx = torch.randint(0, 100, (n_ctx,), generator=g).tolist()
        ends = [torch.randint(0, 100, (k,), generator=g).tolist() for k in (1, 4, 2, 6)]
        examples.append((ctx, ends))
    got = bench.score_endings(model, examples, batch_size=3, device=torch.device("cpu"))
    for (ctx, ends), (s, n) in zip(examples, got):
        ref = _bench_reference_scores(model, ctx, ends)
        assert s == pytest.approx(ref, abs=1e-4)
        assert n == pytest.approx([r / len(e) for r, e in zip(ref, ends)], abs=1e-4)


def test_bench_read_mc_formats(tmp_path):
    items = bench.read_mc(_BENCH_MC)
    assert len(items) == 32  # the count README_bench states
    assert all(len(it["endings"]) == 4 and 0 <= it["label"] < 4 for it in items)
    assert len({it["label"] for it in items}) == 4  # the right answer is not always in one place
    # a line in HellaSwag's own format: ctx_a/ctx_b, a string label, extra fields
    hs = {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
          "ctx_b": "he", "endings": ["is using wrap.", "is ripping shingles.", "is holding a rubik's cube.",
                                     "starts pulling up roofing."], "source_id": "activitynet~v_-JhWjGDPHMY",
          "split": "val", "split_type": "indomain", "label": "3"}
    p = tmp_path / "hs.jsonl"
    p.write_text(json.dumps(hs) + "\n\n" + json.dumps(dict(hs, ctx="A man is sitting on a roof. he", label=1)) + "\n")
    a, b = bench.read_mc(str(p))
    assert a == {"ctx": "A man is sitting on a roof. he", "endings": hs["endings"], "label": 3}
    assert b["label"] == 1
    p.write_text(json.dumps(dict(hs, label=7)) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        bench.read_mc(str(p))
    p.write_text(json.dumps({k: v for k, v in hs.items() if k != "label"}) + "\n")
    with pytest.raises(ValueError, match="label"):
        bench.read_mc(str(p))


# -----------------------------------------------------------------------------
# Evals through a real checkpoint: bits per byte and multiple choice


@pytest.fixture(scope="module")
def _bench_ckpt(tmp_path_factory):
    from tokenizer import Tokenizer
    d = tmp_path_factory.mktemp("bench_ckpt")
    text = _stdlib_text(20000)
    tok = Tokenizer.train(text, 300)
    tok.save(str(d / "tokenizer.bpe"))
    cfg = _bench_tiny_config(vocab_size=320, block_size=64)  # padded past tok.n_vocab, as train.py does
    torch.manual_seed(0)
    model = GPT(cfg)
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(cfg), "tokenizer": "tokenizer.bpe",
                "vocab_size": tok.n_vocab, "step": 0}, str(d / "ckpt.pt"))
    return d, model.eval(), tok


@pytest.mark.usefixtures("_bench_one_thread")
def test_bench_bpb_equals_loss_over_ln2_times_tokens_per_byte(_bench_ckpt, tmp_path):
    d, model, tok = _bench_ckpt
    text = _stdlib_text(31000)[30000:] + " caf\u00e9 \u2014 na\u00efve"  # some multi-byte characters too
    path = tmp_path / "val.txt"
    path.write_text(text, encoding="utf-8")
    res = bench.run(bench.BenchConfig(eval="bpb", ckpt=str(d / "ckpt.pt"), data=str(path), eval_batch=3))
    # reference: one window at a time, summed cross-entropy straight from the logits
    ids, T = [tok.eot_id] + tok.encode(text), model.config.block_size
    nats, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, T):
            w = torch.tensor(ids[i:i + T + 1])
            logits, _ = model(w[None, :-1], w[None, 1:])
            nats += F.cross_entropy(logits[0], w[1:], reduction="sum").item()
            n += len(w) - 1
    n_bytes = len(text.encode("utf-8"))
    assert res["tokens"] == n == len(ids) - 1 and res["bytes"] == n_bytes
    assert res["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert res["bpb"] == pytest.approx(res["loss"] / math.log(2) * res["tokens"] / res["bytes"], rel=1e-12)


@pytest.mark.usefixtures("_bench_one_thread")
def test_bench_bpb_on_prepared_val_split(_bench_ckpt, tmp_path):
    import hashlib
    from prepare import write_shard
    d, model, tok = _bench_ckpt
    text = _stdlib_text(41500)[40000:]
    ids = [tok.eot_id] + tok.encode(text)
    write_shard(str(tmp_path / "val_000.bin"), ids)
    sha = hashlib.sha256((d / "tokenizer.bpe").read_bytes()).hexdigest()
    split = {"documents": 1, "tokens": len(ids), "bytes": len(text.encode("utf-8")), "shards": ["val_000.bin"]}
    meta = {"tokenizer_file": "tokenizer.bpe", "tokenizer_sha256": sha, "vocab_size": tok.n_vocab,
            "eot_id": tok.eot_id, "dtype": "uint16", "splits": {"train": split, "val": split}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    res = bench.run(bench.BenchConfig(eval="bpb", ckpt=str(d / "ckpt.pt"), data=str(tmp_path), eval_batch=4))
    # reference: every non-overlapping window of T+1 tokens, stride T, one at a time
    T, losses = model.config.block_size, []
    with torch.no_grad():
        for k in range((len(ids) - 1) // T):
            w = torch.tensor(ids[k * T:k * T + T + 1])
            losses.append(F.cross_entropy(model(w[None, :-1], w[None, 1:])[0][0], w[1:]).item())
    loss = sum(losses) / len(losses)
    assert res["tokens"] == len(losses) * T and res["loss"] == pytest.approx(loss, rel=1e-5)
    assert res["bpb"] == pytest.approx(loss / math.log(2) * split["tokens"] / split["bytes"], rel=1e-5)
    meta["tokenizer_sha256"] = "0" * 64  # a dataset made with another tokenizer is refused
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="different tokenizer"):
        bench.run(bench.BenchConfig(eval="bpb", ckpt=str(d / "ckpt.pt"), data=str(tmp_path)))


@pytest.mark.usefixtures("_bench_one_thread")
def test_bench_mc_cli_matches_reference(_bench_ckpt, capsys):
    d, model, tok = _bench_ckpt
    bench.main(["--eval=mc", f"--ckpt={d / 'ckpt.pt'}", f"--data={_BENCH_MC}", "--eval_batch=24", "--json"])
    res = json.loads(capsys.readouterr().out.strip())
    items = bench.read_mc(_BENCH_MC)
    hit_sum = hit_norm = 0
    for it in items:
        ends = [tok.encode(" " + e) for e in it["endings"]]
        ref = _bench_reference_scores(model, [tok.eot_id] + tok.encode(it["ctx"]), ends)
        hit_sum += max(range(4), key=ref.__getitem__) == it["label"]
        hit_norm += max(range(4), key=lambda j: ref[j] / len(ends[j])) == it["label"]
    assert res["items"] == len(items) and res["chance"] == pytest.approx(0.25)
    assert res["acc_sum"] == pytest.approx(hit_sum / len(items))
    assert res["acc_norm"] == pytest.approx(hit_norm / len(items))


def test_bench_cli_errors_are_one_sentence(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench.main(["--eval=mc", f"--ckpt={tmp_path / 'none.pt'}"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--data" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        bench.main(["--budget", "--params=1e9", "--gpus=H100,TPU"])
    assert e.value.code == 1 and "TPU" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Speed at toy size: sane numbers


@pytest.mark.usefixtures("_bench_one_thread")
def test_bench_train_speed_sane():
    cfg = _bench_tiny_config()
    steps = 4
    t0 = time.perf_counter()
    r = bench.measure_train_speed(cfg, bench.Recipe(batch_size=2), torch.device("cpu"), steps=steps, warmup=1,
                                  matmul_size=256)
    wall = time.perf_counter() - t0
    assert r["tokens_per_sec"] == pytest.approx(2 * 32 / (r["ms_per_step"] / 1e3), rel=1e-9)
    # at least half the timed steps took the median or longer, so the wall clock bounds it
    assert wall >= (steps // 2) * r["ms_per_step"] / 1e3
    # FLOPs by hand: 6N + 12 * L * C * T, N counted here without wpe (tied wte counted once)
    m = GPT(cfg)
    n = sum(p.numel() for p in m.parameters()) - 32 * 32
    assert r["params"] == n and r["flops_per_token"] == 6 * n + 12 * 2 * 32 * 32
    assert r["achieved_flops"] == pytest.approx(r["flops_per_token"] * r["tokens_per_sec"])
    assert r["mfu"] is None  # a CPU has no datasheet peak: no MFU, only the honest ratio
    assert 0 < r["flops_ratio_vs_matmul"] < 2 and r["measured_matmul_flops"] > 1e8
    assert r["peak_mem_bytes"] > 10 * 2**20 and r["peak_mem_kind"] == "process max RSS"


@pytest.mark.usefixtures("_bench_one_thread")
def test_bench_ladder_cpu_rungs_and_gains():
    cfg = bench.BenchConfig(batch_size=2, steps=2, warmup=1, matmul_size=256)
    res = bench.run_ladder(cfg, torch.device("cpu"), _bench_tiny_config())
    names = [r["step"] for r in res["rows"]]
    expect = ["fp32"] + (["bf16 autocast"] if bench.cpu_bf16_native() else []) + \
             ["SDPA flash attention", "fused AdamW", "vocab padded to 128", "micro-batch x2"]
    assert names == expect
    skipped = {s["step"]: s["reason"] for s in res["skipped"]}
    assert "TF32 matmuls" in skipped and "torch.compile" in skipped and all(skipped.values())
    rows = res["rows"]
    assert rows[0]["recipe"]["sdpa"] is False and rows[-1]["recipe"]["sdpa"] is True  # cumulative
    assert rows[-2]["vocab_size"] == 128 and rows[-1]["batch_size"] == 4
    for prev, r in zip(rows, rows[1:]):
        assert r["tokens_per_sec"] > 0 and r["gain"] == pytest.approx(r["tokens_per_sec"] / prev["tokens_per_sec"])
    assert "not MFU" in bench.format_ladder(res)
    assert bench.default_batch(torch.device("cpu")) == 4  # BenchConfig.batch_size's comment


@pytest.mark.usefixtures("_bench_one_thread")
def test_bench_inference_cache_agrees():
    torch.manual_seed(0)
    model = GPT(_bench_tiny_config(block_size=48)).eval()
    r = bench.measure_inference(model, batch_size=2, context=24, new_tokens=8, device=torch.device("cpu"), reps=1)
    assert r["same_tokens"]  # the cached and uncached decoders did the same work
    for k in ("prefill_tokens_per_sec_cache", "prefill_tokens_per_sec_no_cache",
              "decode_tokens_per_sec_cache", "decode_tokens_per_sec_no_cache"):
        assert 0 < r[k] < 1e9
    with pytest.raises(ValueError, match="block_size"):
        bench.measure_inference(model, 1, 40, 16, torch.device("cpu"))


def test_bench_matmul_peak_counts_2n3_flops(monkeypatch):
    # measure_matmul_peak's comment: n^3 multiply-adds at 2 FLOPs each, over the fastest try.
    # A fake clock that advances 0.5 s per reading makes every try take exactly 0.5 s.
    clock = iter(range(10**6))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: 0.5 * next(clock))
    monkeypatch.setattr(bench, "_MATMUL_PEAK", {})  # a fresh cache, restored afterwards
    assert bench.measure_matmul_peak(torch.device("cpu"), n=8, reps=3) == 2 * 8 ** 3 / 0.5


def test_bench_config_defaults_match_their_comments():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object makes no CUDA call
    assert bench.default_batch(cuda) == 8 and bench.default_batch(cpu) == 4  # batch_size's comment
    default = bench.BenchConfig()  # preset's comment: "" = gpt2 on CUDA, cpu-1m elsewhere
    gpt2 = bench.resolve_model_config(default, cuda)
    assert gpt2 == GPTConfig(**PRESETS["gpt2"]) and gpt2.vocab_size == 50257  # vocab_size's
    assert bench.resolve_model_config(default, cpu) == GPTConfig(**PRESETS["cpu-1m"])
    # speed_recipe's docstring: GPT-2's 50257 padded to a multiple of 64 is nanoGPT's 50304
    recipe = bench.speed_recipe(default, cpu, torch.float32, gpt2)
    assert recipe.vocab_size == 50304 == 64 * 786 and recipe.batch_size == 4


def test_bench_mode_table_and_precedence():
    # BenchConfig's comment: when several are set, eval wins, then budget, ladder, infer
    C = bench.BenchConfig
    assert set(bench.MODES) == {"train", "ladder", "infer", "budget", "bpb", "mc"}
    assert bench.choose_mode(C()) == "train" and bench.choose_mode(C(infer=True)) == "infer"
    assert bench.choose_mode(C(ladder=True, infer=True)) == "ladder"
    assert bench.choose_mode(C(budget=True, ladder=True, infer=True)) == "budget"
    assert bench.choose_mode(C(eval="mc", budget=True, ladder=True)) == "mc"
    with pytest.raises(ValueError, match="bpb or mc"):
        bench.choose_mode(C(eval="ppl"))
    # a budget with an assumed MFU is arithmetic: no device is chosen for it
    res = bench.run(C(budget=True, params=1e9, gpus="H100"))
    assert res["device"] == "cpu" and res["device_reason"] == "the budget is arithmetic"
    assert res["mode"] == "budget" and "model_config" not in res  # --params: no model behind it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_cuda_speed_has_mfu():
    dev = torch.device("cuda")
    r = bench.measure_train_speed(_bench_tiny_config(vocab_size=128, block_size=128),
                                  bench.Recipe(tf32=True, amp=True, fused=True, batch_size=8), dev, steps=3, warmup=2)
    if bench.peak_flops(dev) is not None:
        assert 0 < r["mfu"] < 1
    assert r["peak_mem_kind"] == "cuda max_memory_allocated" and r["peak_mem_bytes"] > 0


# -----------------------------------------------------------------------------
# Chaos suite: kill and resume, malicious files, injected faults, fuzzing
#
# Faults injected by tests in the stage sections above, so the suite reads as one list
# (test_chaos_fault_list_names_real_tests keeps it true):
#   a full disk while saving a checkpoint          test_train_bad_inputs (torch.save raises ENOSPC)
#   a NaN loss: skip it; three: reload, lr / 2     test_train_nan_step_is_skipped
#   a CUDA out-of-memory: halve the micro-batch    test_train_oom_fallback_keeps_global_batch
#   SIGTERM mid-run: save, exit cleanly            test_train_sigterm_saves_and_exits_cleanly
#   stop and resume: bit-identical weights         test_train_resume_is_bit_identical
#   truncated, missing or wrong downloads          test_prepare_download_url_and_truncation
#                                                  test_prepare_shakespeare_from_mirror
#   corrupt, truncated or foreign shards           test_prepare_open_shard_rejects_corrupt
# Below: a malicious pickle offered to every loader, fuzzers for the parsers, a fresh-clone check.

import contextlib
import itertools
import pathlib
import pickle
import re


def test_chaos_fault_list_names_real_tests():
    # the list above is a comment; this keeps it from naming tests that were renamed or removed
    with open(os.path.join(ROOT, "test_all.py"), encoding="utf-8") as f:
        text = f.read()
    block = text.split("# Faults injected by tests in the stage sections above", 1)[1].split("\n\n", 1)[0]
    names = re.findall(r"\btest_\w+", block)
    assert len(names) >= 8 and [n for n in names if not callable(globals().get(n))] == []


class _ChaosEvil:
    """Unpickling this object creates the file `marker`: a harmless stand-in for what a malicious
    checkpoint does (os.system, a download, ...) the moment an unsafe torch.load reads it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _chaos_evil_file(path, marker, layout="torch.save"):
    """Write a checkpoint-shaped dict whose "model" is a _ChaosEvil: torch.save's zip layout (the
    realistic attack) or one bare pickle (torch's legacy layout)."""
    payload = {"model": _ChaosEvil(marker), "model_config": {}, "step": 0}
    if layout == "torch.save":
        torch.save(payload, str(path))
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)  # torch's own protocol (a newer one only adds a warning)


@pytest.mark.parametrize("layout", ["torch.save", "pickle"])
def test_chaos_malicious_payload_is_live(tmp_path, layout):
    # the reference for the tests below: an unsafe load of the same file does create the marker
    marker = tmp_path / "pwned"
    _chaos_evil_file(tmp_path / "evil.pt", marker, layout)
    # subtle: the project's one unpickling of untrusted bytes, of a file this test has just
    # written itself: its pickle stream (torch.save's data.pkl, or the bare legacy file) read
    # with plain pickle, which is what an unsafe torch.load does with it
    import zipfile
    path = tmp_path / "evil.pt"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            stream = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    else:
        stream = path.read_bytes()
    assert not marker.exists()
    pickle.loads(stream)
    assert marker.exists()


@pytest.mark.parametrize("layout", ["torch.save", "pickle"])
def test_chaos_malicious_checkpoint_refused_by_train_resume(_train_data, tmp_path, layout):
    data_dir, _ = _train_data
    out, marker = tmp_path / "out", tmp_path / "pwned"
    out.mkdir()
    _chaos_evil_file(out / "ckpt.pt", marker, layout)
    with pytest.raises(ValueError, match=r"ckpt\.pt holds Python objects besides tensors") as e:
        train.train(_train_cfg(data_dir, out, resume=True))  # train.py --resume -> train.load_checkpoint
    assert "\n" not in str(e.value) and not marker.exists()


def test_chaos_malicious_checkpoint_refused_by_sample_and_bench(tmp_path, capsys):
    out, marker = tmp_path / "out", tmp_path / "pwned"
    out.mkdir()
    _chaos_evil_file(out / "best.pt", marker)
    (tmp_path / "val.txt").write_text("some text to score\n" * 10)
    for main, argv in ((sample.main, [f"--out_dir={out}", "--device=cpu"]),  # sample.load_for_sampling
                       (bench.main, ["--eval=bpb", f"--ckpt={out / 'best.pt'}", f"--data={tmp_path / 'val.txt'}",
                                     "--device=cpu"])):  # bench.run -> train.load_checkpoint
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 1 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("error: ") and "best.pt holds Python objects" in err
    assert not marker.exists()


def test_chaos_malicious_pytorch_model_bin_refused_by_from_pretrained(tmp_path, capsys):
    hf, marker = tmp_path / "hf", tmp_path / "pwned"
    GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)).save_hf(str(hf))
    for name in ("model.safetensors", "pytorch_model.bin"):  # only the malicious weights remain
        with contextlib.suppress(FileNotFoundError):
            os.remove(hf / name)
    _chaos_evil_file(hf / "pytorch_model.bin", marker)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin holds Python objects"):
        GPT.from_pretrained(str(hf))
    with pytest.raises(SystemExit) as e:  # and through sample.py --hf: one sentence, no traceback
        sample.main([f"--hf={hf}", "--device=cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
    # the sharded layout (pytorch_model.bin.index.json naming its shards) goes the same way
    os.replace(hf / "pytorch_model.bin", hf / "pytorch_model-00001-of-00001.bin")
    (hf / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "pytorch_model-00001-of-00001.bin"}}))
    with pytest.raises(ValueError, match=r"pytorch_model-00001-of-00001\.bin holds Python objects"):
        GPT.from_pretrained(str(hf))
    # torch's legacy layout (one bare pickle) is refused before unpickling: mmap=True needs the zip layout
    _chaos_evil_file(hf / "pytorch_model-00001-of-00001.bin", marker, layout="pickle")
    with pytest.raises((ValueError, RuntimeError), match=r"pytorch_model-00001-of-00001\.bin"):
        GPT.from_pretrained(str(hf))
    assert not marker.exists()


def _chaos_fuzz():
    """(hypothesis, its strategies, the suite's settings), or a skip of the calling test alone.
    hypothesis is a test-only dependency that .ci/run installs; importorskip inside each fuzz test
    (not at module level, which would skip the whole file) keeps the rest of the suite running
    without it. derandomize=True and no example database: every run tries the same examples."""
    hyp = pytest.importorskip("hypothesis")
    fuzz = hyp.settings(max_examples=200, deadline=None, derandomize=True, database=None,
                        suppress_health_check=[hyp.HealthCheck.too_slow, hyp.HealthCheck.data_too_large])
    return hyp, hyp.strategies, fuzz


def test_chaos_fuzz_tokenizer_round_trips_any_unicode():
    hyp, st, fuzz = _chaos_fuzz()
    tok = _tokenizer_small()
    specials = set(tok.special_tokens.values())
    # any code point (surrogates included), mixed with the pieces the split regex cares about
    piece = st.one_of(st.text(st.characters(exclude_categories=())),
                      st.sampled_from(list(SPECIAL_TOKENS) + ["\ud800", "\udfff", "\ud83d\ude00", "'s", "'LL", " \n",
                                                              "\r\n", "   ", "12345", "e\u0301", "\ufeff", "\x00"]))

    @fuzz
    @hyp.given(st.lists(piece, max_size=8).map("".join))
    def check(s):
        ids = tok.encode(s)
        assert ids == tok.encode_slow(s)
        assert all(0 <= i < tok.n_vocab for i in ids) and not specials & set(ids)  # specials never injected
        # tiktoken's rule for text UTF-8 cannot hold: a lone surrogate becomes U+FFFD (a pair joins)
        assert tok.decode(ids) == s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")

    check()


def test_chaos_fuzz_open_shard_reads_or_refuses_any_bytes(tmp_path):
    hyp, st, fuzz = _chaos_fuzz()
    int32 = st.integers(-2**31, 2**31 - 1)
    # raw bytes; a 1024-byte header of plausible or random fields; or a valid shard cut or padded
    header = st.tuples(st.sampled_from(sorted({m for m, _ in prepare.SHARD_FORMATS})) | int32,
                       st.sampled_from([1, 2, 7]) | int32, st.integers(-2, 40) | int32, st.binary(max_size=16),
                       st.binary(max_size=120)).map(lambda h: struct.pack("<3i", *h[:3]) + h[3].ljust(1012, b"\0") + h[4])
    valid = st.tuples(st.sampled_from(sorted(prepare.SHARD_FORMATS)), st.lists(st.integers(0, 65535), max_size=30),
                      st.integers(-3, 3)).map(lambda v: _chaos_shard_bytes(*v))
    names = (str(tmp_path / f"fuzz{i}.bin") for i in itertools.count())  # a fresh file each: no remapping

    @fuzz
    @hyp.given(st.one_of(st.binary(max_size=1100), header, valid))
    def check(raw):
        path = next(names)
        with open(path, "wb") as f:
            f.write(raw)
        try:
            tokens = np.array(open_shard(path))
        except ValueError as e:  # the one documented error for a file that exists
            assert path in str(e) and "HINT" in str(e) and "\n" not in str(e)
            return
        # accepted: a known (magic, version) whose count matches the bytes that follow the header
        magic, version, count = struct.unpack("<3i", raw[:12])
        ref = np.frombuffer(raw[1024:], dtype=np.dtype(prepare.SHARD_FORMATS[magic, version]).newbyteorder("<"))
        assert len(tokens) == count and np.array_equal(tokens, ref)

    check()


def _chaos_shard_bytes(fmt, ids, cut):
    """A shard of `ids` in format fmt = (magic, version), then cut (< 0) or padded (> 0) by |cut| bytes."""
    dtype = np.dtype(prepare.SHARD_FORMATS[fmt]).newbyteorder("<")
    raw = struct.pack("<3i", *fmt, len(ids)) + bytes(1012) + np.asarray(ids, dtype=dtype).tobytes()
    return raw[:len(raw) + cut] if cut < 0 else raw + bytes(cut)


def test_chaos_fuzz_parse_config_parses_or_exits_with_one_sentence():
    hyp, st, fuzz = _chaos_fuzz()
    # mostly well-formed --key=value with a real or near-miss key, where values look like numbers;
    # `breaks` are the characters str.splitlines cuts at, which would break a one-line error
    breaks = st.text(st.sampled_from("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029ab_-="), max_size=4)
    key = st.one_of(st.sampled_from([f.name for f in dataclasses.fields(_TokenizerDemoConfig)]),
                    st.sampled_from(["learning-rate", "max_iter", "", "h"]), st.text(max_size=6), breaks)
    value = st.one_of(st.text(max_size=12), breaks, st.sampled_from(["true", "Off", "none", "nan", "-inf", "0x10", "1_000"]),
                      st.from_regex(r"[-+]?[0-9_]{0,4}(\.[0-9]{0,3})?([eE][-+]?[0-9]{1,4})?", fullmatch=True),
                      st.builds("{}e{}".format, st.integers(-99, 99), st.integers(-999, 999)))
    option = st.builds(lambda k, eq, v: f"--{k}{eq}{v}", key, st.sampled_from(["=", ""]), value)
    # and options every field should accept, so that parses are common too
    good = st.one_of(st.floats().map("--learning_rate={!r}".format), st.integers().map("--max_iters={}".format),
                     st.sampled_from(["--compile", "--compile=TRUE", "--compile=0", "--limit=None", "--limit=1_0"]),
                     st.text().map("--name={}".format), st.integers(-10**6, 10**6).map("--limit={}".format),
                     st.builds("--{}={}e{}".format, st.sampled_from(["max_iters", "limit", "learning_rate"]),
                               st.integers(-99, 99), st.integers(-999, 999)))  # ints may be written 1e3

    @fuzz
    @hyp.given(st.lists(st.one_of(good, good, option, st.text(max_size=10)), max_size=4))
    def check(argv):
        err, code = io.StringIO(), None
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                cfg = parse_config(_TokenizerDemoConfig, argv)
            except SystemExit as e:
                code = e.code
        if "-h" in argv or "--help" in argv:
            assert code == 0
        elif code is None:  # parsed: every field has its declared type
            assert type(cfg.learning_rate) is float and type(cfg.max_iters) is int and type(cfg.compile) is bool
            assert type(cfg.name) is str and (cfg.limit is None or type(cfg.limit) is int) and not err.getvalue()
        else:  # refused: exit code 2 and one line on stderr
            lines = err.getvalue().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()

    check()


def test_clone_mentions_no_folder_outside_it():
    # STYLE.md rule 16: a fresh clone runs its tests; no tracked file may point at the sibling
    # folder only this team's machines have. (The needles are split so this file does not match.)
    needle = re.compile(rb"\.\./" + b"shared|shared/" + rb"data|[\"']shared[\"'],\s*[\"']data[\"']")
    try:
        r = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=30)
        files = [f for f in r.stdout.decode().split("\0") if f] if r.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        files = []
    if not files:  # not a git checkout (a copied tree): walk it, leaving out what .gitignore does
        skip = {".git", "data", "__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks"}
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith("out")]
            files += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames if not f.endswith(".pyc")]
    if not files:
        pytest.skip("neither git ls-files nor a walk of the tree found any file")
    hits = []
    for rel in files:
        with contextlib.suppress(OSError):  # a tracked file deleted in the work tree
            with open(os.path.join(ROOT, rel), "rb") as f:
                hits += [f"{rel}:{i}" for i, line in enumerate(f, 1) if needle.search(line)]
    assert not hits, f"these lines point outside the clone (use the stdlib or a file the test writes): {hits}"


# Kill and resume: SIGKILL a training process at random moments, and on purpose in the middle of
# writing a checkpoint, resume each time, and finish bit-identical to a run never interrupted.
# CHAOS_KILLS=100 python -m pytest test_all.py -q -k kill  runs the longer variant (default 10).

_CHAOS_ARGS = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_kv_head=2", "--n_embd=32", "--block_size=32",
               "--batch_size=4", "--max_steps=40", "--warmup_steps=2", "--learning_rate=3e-3", "--eval_interval=4",
               "--eval_batches=2", "--log_interval=1", "--sample_tokens=0", "--dropout=0.1"]

# Run in a child: train.main(argv), with an optional way to die inside a checkpoint write:
# "rename" dies after the temporary file is complete but before it is renamed, "half" first cuts
# the temporary file to half its size (a kill in the middle of torch.save), "best" dies while
# best.pt is being copied. Each dies at the N-th such write of this process.
_CHAOS_CHILD = """
import os, signal, sys
import train
mode, nth, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
seen = [0]
def die(tmp):
    target = "best.pt.tmp" if mode == "best" else "ckpt.pt.tmp"
    if mode == "none" or not tmp.endswith(target):
        return
    seen[0] += 1
    if seen[0] < nth:
        return
    if mode == "half":
        os.truncate(tmp, os.path.getsize(tmp) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
real_replace = os.replace
def replace(src, dst):  # tokenizer.atomic_write renames every finished file through here
    die(str(src))
    return real_replace(src, dst)
os.replace = replace
print("ready", flush=True)
train.main(argv)
"""


def _chaos_run(args, mode="none", nth=1, kill_after=None):
    """Start a training child; SIGKILL it `kill_after` seconds after it is ready (None: let it end).
    Returns its exit code (negative: the signal)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: the same arithmetic in every child
    p = subprocess.Popen([sys.executable, "-c", _CHAOS_CHILD, mode, str(nth), *args], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        if kill_after is not None:
            time.sleep(kill_after)
            p.kill()
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, out


def test_chaos_kill_and_resume_ends_bit_identical(_train_data, tmp_path):
    data_dir, _ = _train_data
    args = [f"--dataset={data_dir}", *_CHAOS_ARGS]
    code, out = _chaos_run([*args, f"--out_dir={tmp_path / 'ref'}"])
    assert code == 0, out[-2000:]
    run = tmp_path / "run"
    rng = random.Random(2024)
    kills, modes, resumed_at = 0, ["time", "rename", "time", "half", "time", "best"], []
    want = int(os.environ.get("CHAOS_KILLS", "10"))
    for attempt in range(4 * want + 10):
        resume = ["--resume"] if (run / "ckpt.pt").exists() else []
        mode = modes[attempt % len(modes)] if kills < want else "none"
        if mode == "time":  # a random moment: startup, a step, an evaluation, a save, a log write
            code, out = _chaos_run([*args, f"--out_dir={run}", *resume], kill_after=rng.uniform(0.0, 1.5))
        else:
            code, out = _chaos_run([*args, f"--out_dir={run}", *resume], mode=mode, nth=rng.randint(1, 3))
        if code == 0:
            if kills >= want:
                break
            shutil.rmtree(run)  # it finished before the kill came: start the whole run again
            continue
        assert code == -signal.SIGKILL, out[-2000:]
        kills += 1
        if (run / "ckpt.pt").exists():
            resumed_at.append(torch.load(run / "ckpt.pt", weights_only=True)["step"])
        for pt in run.glob("*.pt"):  # after every kill, every checkpoint on disk loads, safely
            ck = torch.load(pt, map_location="cpu", weights_only=True)
            assert ck["step"] % 4 == 0 or ck["step"] == 40, pt
    assert kills >= want and len(set(resumed_at)) >= 3, resumed_at  # resumed from several places
    ref, got = (torch.load(d / "ckpt.pt", weights_only=True) for d in (tmp_path / "ref", run))
    assert got["step"] == ref["step"] == 40
    assert all(torch.equal(ref["model"][k], got["model"][k]) for k in ref["model"])
    best_ref, best_got = (torch.load(d / "best.pt", weights_only=True) for d in (tmp_path / "ref", run))
    assert best_got["step"] == best_ref["step"]
    assert all(torch.equal(best_ref["model"][k], best_got["model"][k]) for k in best_ref["model"])
    curve = lambda d: [(r["step"], r["loss"], r["norm"], r["lr"]) for r in map(json.loads, open(d / "log.jsonl"))
                       if "loss" in r]
    assert curve(run) == curve(tmp_path / "ref")  # the log lost no row and repeated none


# -----------------------------------------------------------------------------
# Bad input, every stage: one table of cases, each one clear sentence
#
# STYLE.md rule 10 as one table. Each row is one way a user's input can be wrong, run through
# the script's real command line. The run must print ONE line on stderr holding the row's
# stable message part (and the offending file's path, where there is one), exit with the row's
# code, print no traceback, and, when it stops, leave its folder byte for byte as it was (no
# *.tmp*, no half-written output). Code 0 marks a run that can go on: it warns in one line.
# README.md's "Troubleshooting" table repeats every row's message; test_bad_input_troubleshooting_table
# checks it against what these runs printed, so the README cannot drift.
#
# Every case runs in its own copy of _bad_base: a good dataset (data/), a checkpoint trained one
# step on it (out/) and a good eval file (mc.jsonl); its build(root) breaks one thing. A command
# starting with "python" runs as a real process (the exit code and stderr a user sees);
# otherwise SCRIPT.main(argv) runs in this process, which saves a 2-second torch import.

import contextlib
import re
import traceback

_BAD_PREPARE = ["prepare.py", "--out_dir={root}/prepared", "--vocab_size=300"]
_BAD_TOKENIZER = ["python", "tokenizer.py", "train", "--vocab_size=300", "--out={root}/prepared/t.bpe"]
_BAD_TRAIN = ["train.py", "--dataset={root}/data", "--data_dir={root}/prepared", "--out_dir={root}/out",
              "--device=cpu", "--n_layer=2", "--n_head=2", "--n_kv_head=2", "--n_embd=32", "--block_size=32",
              "--dropout=0", "--batch_size=4", "--max_steps=1", "--eval_batches=1", "--sample_tokens=0"]
_BAD_SAMPLE = ["sample.py", "--out_dir={root}/out", "--device=cpu", "--max_new_tokens=4", "--temperature=0"]
_BAD_BPB = ["bench.py", "--eval=bpb", "--ckpt={root}/out/ckpt.pt", "--data={root}/data", "--device=cpu"]
_BAD_MC = ["bench.py", "--eval=mc", "--ckpt={root}/out/ckpt.pt", "--data={root}/mc.jsonl", "--device=cpu"]
_BAD_FINETUNE = ["finetune.py", "--init_from={root}/out", "--out_dir={root}/sft", "--device=cpu", "--max_steps=1",
                 "--builtin_train=20", "--builtin_val=4", "--eval_examples=2"]
_BAD_CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n"
_BAD_MC_ITEM = json.dumps({"ctx": "def add(a, b):", "endings": [" return a + b", " retrun"], "label": 0}) + "\n"


def _bad_write(rel, data):
    """Write data (bytes, or str as UTF-8) to root/rel."""
    def build(root):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return build


def _bad_cut(rel, n):
    """Drop the last n bytes of root/rel: a copy or download that stopped early."""
    def build(root):
        data = (root / rel).read_bytes()
        (root / rel).write_bytes(data[:-n])
    return build


def _bad_int32(rel, index, value):
    """Overwrite int32 number `index` of a shard's header (0: magic, 1: version = dtype, 2: count)."""
    def build(root):
        data = bytearray((root / rel).read_bytes())
        data[4 * index:4 * index + 4] = struct.pack("<i", value)
        (root / rel).write_bytes(bytes(data))
    return build


def _bad_replace(rel, old, new):
    """Edit one spot of a text file, as a person with an editor would."""
    def build(root):
        text = (root / rel).read_text(encoding="utf-8")
        assert text.count(old) == 1, f"{rel} has {text.count(old)} copies of {old!r}"
        (root / rel).write_text(text.replace(old, new), encoding="utf-8")
    return build


def _bad_meta(edit):
    """edit(meta) on data/meta.json, then write it back."""
    def build(root):
        meta = json.loads((root / "data" / "meta.json").read_text())
        edit(meta)
        (root / "data" / "meta.json").write_text(json.dumps(meta))
    return build


def _bad_other_tokenizer(rel, vocab_size, meta=False):
    """Put another BPE (trained on other stdlib text) at root/rel; with meta, data/meta.json
    vouches for it (vocab_size, sha256), as if prepare.py had written it."""
    def build(root):
        Tokenizer.train(_stdlib_text(80_000)[50_000:], vocab_size).save(str(root / rel))
        if meta:
            sha = hashlib.sha256((root / rel).read_bytes()).hexdigest()
            _bad_meta(lambda m: m.update(vocab_size=vocab_size, tokenizer_sha256=sha))(root)
    return build


def _bad_shard_ids(token_id):
    """Rewrite data/train_000.bin, same length, every id = token_id: a shard of another tokenizer."""
    def build(root):
        n = len(open_shard(str(root / "data" / "train_000.bin")))
        write_shard(str(root / "data" / "train_000.bin"), np.full(n, token_id, dtype=np.uint16))
    return build


def _bad_ckpt(edit):
    """edit(checkpoint dict) on out/ckpt.pt; best.pt is removed, so ckpt.pt is the one sample.py loads."""
    def build(root):
        ck = torch.load(root / "out" / "ckpt.pt", map_location="cpu", weights_only=True)
        edit(ck)
        torch.save(ck, root / "out" / "ckpt.pt")
        (root / "out" / "best.pt").unlink()
    return build


def _bad_ckpt_config(**changes):
    """out/ckpt.pt whose model_config no longer matches its weights."""
    return _bad_ckpt(lambda ck: ck["model_config"].update(changes))


def _bad_all(*builds):
    def build(root):
        for b in builds:
            b(root)
    return build


_BAD_LATIN1 = ("# caf\u00e9, cr\u00e8me br\u00fbl\u00e9e, na\u00efve\n" * 40).encode("latin-1")
_BAD_JSONL = "".join(json.dumps({"text": _stdlib_text(30_000)[i:i + 1000]}) + "\n" for i in range(0, 30_000, 1000))

# (case, stage, build(root) or None, command, exit code, stable message part(s), offending file under root)
_BAD_CASES = [
    # corpora: prepare.py and tokenizer.py train
    ("empty corpus file", "corpus", _bad_write("corpus.txt", b""),
     [*_BAD_PREPARE, "--dataset={root}/corpus.txt"], 1, "the input is empty", "corpus.txt"),
    ("binary corpus file", "corpus", _bad_write("corpus.txt", bytes(range(256)) * 64),
     ["python", *_BAD_PREPARE, "--dataset={root}/corpus.txt"], 1, "binary or not UTF-8 text", "corpus.txt"),
    ("UTF-16 corpus file", "corpus", _bad_write("corpus.txt", _stdlib_text(20_000).encode("utf-16")),
     [*_BAD_PREPARE, "--dataset={root}/corpus.txt"], 1, "binary or not UTF-8 text", "corpus.txt"),
    ("latin-1 corpus file", "corpus", _bad_write("corpus.txt", _stdlib_text(20_000).encode() + _BAD_LATIN1),
     [*_BAD_PREPARE, "--dataset={root}/corpus.txt"], 0, "are not valid UTF-8", "corpus.txt"),
    ("empty corpus file given to train.py", "corpus", _bad_write("corpus.txt", b""),
     [*_BAD_TRAIN, "--dataset={root}/corpus.txt"], 1, "the input is empty", "corpus.txt"),
    ("empty corpus file (tokenizer.py)", "corpus", _bad_write("corpus.txt", b""),
     [*_BAD_TOKENIZER, "--input={root}/corpus.txt"], 1, "no text to train on in", "corpus.txt"),
    ("binary corpus file (tokenizer.py)", "corpus", _bad_write("corpus.txt", b"\x00\x01" * 5000),
     [*_BAD_TOKENIZER, "--input={root}/corpus.txt"], 1, "no text to train on in", "corpus.txt"),
    ("latin-1 corpus file (tokenizer.py)", "corpus", _bad_write("corpus.txt", _BAD_LATIN1),
     [*_BAD_TOKENIZER, "--input={root}/corpus.txt"], 0, "are not valid UTF-8", "corpus.txt"),
    # shards: prepare.open_shard, as train.py calls it
    ("truncated shard", "shards", _bad_cut("data/train_000.bin", 3),
     ["python", *_BAD_TRAIN], 1, "but its header promises", "data/train_000.bin"),
    ("shard with a wrong magic number", "shards", _bad_int32("data/train_000.bin", 0, 1234),
     _BAD_TRAIN, 1, "this is not an llm.c token shard", "data/train_000.bin"),
    ("shard whose header says uint32 over uint16 tokens", "shards", _bad_int32("data/val_000.bin", 1, 2),
     _BAD_TRAIN, 1, "but its header promises", "data/val_000.bin"),
    ("shard of an unknown version", "shards", _bad_int32("data/val_000.bin", 1, 7),
     _BAD_TRAIN, 1, "expected 1 (uint16) or 2 (uint32)", "data/val_000.bin"),
    # meta.json: train.py's load_meta, bench.py, prepare.py's output folder
    ("missing meta.json", "meta.json", lambda root: (root / "data" / "meta.json").unlink(),
     _BAD_TRAIN, 1, "meta.json does not exist", "data/meta.json"),
    ("missing meta.json (bench.py)", "meta.json", lambda root: (root / "data" / "meta.json").unlink(),
     _BAD_BPB, 1, "meta.json does not exist", "data/meta.json"),
    ("meta.json that is not JSON", "meta.json", _bad_write("data/meta.json", '{"dataset": "tiny", "splits": '),
     _BAD_TRAIN, 1, "is not a valid prepare.py meta.json", "data/meta.json"),
    ("meta.json without vocab_size", "meta.json", _bad_meta(lambda m: m.pop("vocab_size")),
     _BAD_TRAIN, 1, "is not a valid prepare.py meta.json", "data/meta.json"),
    ("meta.json naming a missing shard", "meta.json",
     _bad_meta(lambda m: m["splits"]["train"].update(shards=["train_001.bin"])),
     _BAD_TRAIN, 1, "does not exist; HINT: run prepare.py", "data/train_001.bin"),
    ("prepare.py output folder holding another dataset", "meta.json",
     _bad_all(lambda root: shutil.copytree(root / "data", root / "prepared" / "corpus"),
              _bad_write("corpus.txt", _stdlib_text(20_000))),
     [*_BAD_PREPARE, "--dataset={root}/corpus.txt"], 1, "pass --name=OTHER to keep both or --force to replace it",
     "prepared/corpus"),
    # tokenizer files: Tokenizer.load, as train.py, sample.py, bench.py and tokenizer.py call it
    ("tokenizer.bpe changed after prepare.py", "tokenizer", _bad_other_tokenizer("data/tokenizer.bpe", 300),
     _BAD_TRAIN, 1, "is not the tokenizer that produced", "data/tokenizer.bpe"),
    ("truncated tokenizer.bpe", "tokenizer", _bad_cut("out/tokenizer.bpe", 500),
     ["python", "tokenizer.py", "encode", "--tokenizer={root}/out/tokenizer.bpe", "hello"], 1,
     "is a damaged tokenizer file", "out/tokenizer.bpe"),
    ("tokenizer.bpe with an edited rank line", "tokenizer",  # byte 7's line now spells b"\x07\x07\x07"
     _bad_replace("out/tokenizer.bpe", "\nBw== 7\n", "\nBwcH 7\n"),
     ["python", "tokenizer.py", "encode", "--tokenizer={root}/out/tokenizer.bpe", "hello"], 1,
     "is a damaged tokenizer file", "out/tokenizer.bpe"),
    ("binary tokenizer.bpe", "tokenizer",
     _bad_all(_bad_write("out/tokenizer.bpe", b"\xff\xfe\x00junk"), _bad_write("corpus.txt", _stdlib_text(20_000))),
     [*_BAD_PREPARE, "--dataset={root}/corpus.txt", "--tokenizer={root}/out/tokenizer.bpe"], 1,
     "is not a tokenizer file", "out/tokenizer.bpe"),
    ("damaged tokenizer.bpe next to a checkpoint", "tokenizer", _bad_cut("out/tokenizer.bpe", 500),
     _BAD_SAMPLE, 1, "its sha256 differs from the one the checkpoint records", "out/tokenizer.bpe"),
    # vocabularies that disagree: data, tokenizer, checkpoint
    ("meta.json vocab_size edited", "vocabulary", _bad_meta(lambda m: m.update(vocab_size=999)),
     _BAD_TRAIN, 1, "meta.json says", "data/meta.json"),
    ("shard ids outside the tokenizer's vocabulary", "vocabulary", _bad_shard_ids(305),
     _BAD_TRAIN, 1, "but the tokenizer has only", "data/train_000.bin"),
    ("resume with another tokenizer", "vocabulary", _bad_other_tokenizer("data/tokenizer.bpe", 310, meta=True),
     [*_BAD_TRAIN, "--resume"], 1, "was trained with another tokenizer than", "out/ckpt.pt"),
    ("sample.py with another run's tokenizer", "vocabulary", _bad_other_tokenizer("out/tokenizer.bpe", 280),
     _BAD_SAMPLE, 1, "its sha256 differs from the one the checkpoint records", "out/tokenizer.bpe"),
    ("older checkpoint (no tokenizer sha256) with another run's tokenizer", "vocabulary",
     _bad_all(_bad_ckpt(lambda ck: ck.pop("tokenizer_sha256")), _bad_other_tokenizer("out/tokenizer.bpe", 280)),
     _BAD_SAMPLE, 1, "copy the tokenizer.bpe of its training run", "out/tokenizer.bpe"),
    ("bench.py on data of another tokenizer", "vocabulary", _bad_other_tokenizer("data/tokenizer.bpe", 300, meta=True),
     _BAD_BPB, 1, "was tokenized with a different tokenizer than", "data"),
    # configuration: tokenizer.parse_config behind every script's command line
    ("misspelled option", "config", None, ["python", "prepare.py", "--vocab_sise=300"], 2, "unknown option", None),
    ("misspelled option (bench.py)", "config", None, ["bench.py", "--eval=bpb", "--ckt=x"], 2, "unknown option", None),
    ("integer option given a word", "config", None, [*_BAD_TRAIN, "--max_steps=ten"], 2,
     "must be an integer, not", None),
    ("integer option given a word (tokenizer.py)", "config", None, [*_BAD_TOKENIZER, "--vocab_size=big"], 2,
     "must be an integer, not", None),
    ("boolean option given a word", "config", None, [*_BAD_SAMPLE, "--stream=maybe"], 2, "is a boolean: use", None),
    ("option value not among the choices", "config", None, [*_BAD_TRAIN, "--optimizer=sgd"], 1, "is not one of", None),
    # checkpoints of another model shape
    ("resume with another model shape", "checkpoint", None, [*_BAD_TRAIN, "--resume", "--n_layer=3"], 1,
     "pass the same model options to resume", "out/ckpt.pt"),
    ("checkpoint whose weights do not fit its config", "checkpoint", _bad_ckpt_config(n_embd=48),
     _BAD_SAMPLE, 1, ("is not a loadable train.py checkpoint", "size mismatch for"), "out/ckpt.pt"),
    ("checkpoint whose weights do not fit its config (bench.py)", "checkpoint", _bad_ckpt_config(n_layer=3),
     _BAD_MC, 1, ("is not a loadable train.py checkpoint", "Missing key(s)"), "out/ckpt.pt"),
    ("truncated checkpoint", "checkpoint", _bad_cut("out/best.pt", 1000),
     ["python", *_BAD_SAMPLE], 1, "is not a loadable train.py checkpoint", "out/best.pt"),
    # JSONL: prepare.py corpora and bench.py's eval files
    ("JSONL corpus without a usable line", "JSONL",
     _bad_write("docs.jsonl", '{"content": "no text field"}\nnot json\n'),
     [*_BAD_PREPARE, "--dataset={root}/docs.jsonl"], 1,
     'every .jsonl line must be a JSON object with a string "text" field', "docs.jsonl"),
    ("JSONL corpus with some bad lines", "JSONL", _bad_write("docs.jsonl", _BAD_JSONL + "not json\n" + '{"text": 7}\n'),
     [*_BAD_PREPARE, "--dataset={root}/docs.jsonl"], 0, "that are not a JSON object", "docs.jsonl"),
    ("eval JSONL line that is not JSON", "JSONL", _bad_write("mc.jsonl", _BAD_MC_ITEM + "{not json\n"),
     ["python", *_BAD_MC], 1, "is not a multiple-choice item", "mc.jsonl"),
    ("eval JSONL label out of range", "JSONL", _bad_write("mc.jsonl", _BAD_MC_ITEM.replace('"label": 0', '"label": 5')),
     _BAD_MC, 1, "and a label between 0 and", "mc.jsonl"),
    ("eval JSONL line that is not UTF-8", "JSONL", _bad_write("mc.jsonl", _BAD_MC_ITEM.encode() + b'{"ctx": "\xff"}\n'),
     _BAD_MC, 1, "save the file as UTF-8", "mc.jsonl"),
    # fine-tuning: finetune.py's data and starting model
    ("fine-tuning JSONL line that is not JSON", "finetune", _bad_write("chats.jsonl", _BAD_CHAT + "{not json\n"),
     [*_BAD_FINETUNE, "--data={root}/chats.jsonl"], 1, "line 2 is not valid JSON", "chats.jsonl"),
    ("empty fine-tuning dataset", "finetune", _bad_write("chats.jsonl", "\n"),
     ["python", *_BAD_FINETUNE, "--data={root}/chats.jsonl"], 1, "holds no examples", "chats.jsonl"),
    ("conversation without an assistant turn", "finetune",
     _bad_write("chats.jsonl", _BAD_CHAT + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"),
     [*_BAD_FINETUNE, "--data={root}/chats.jsonl"], 1, "the conversation has no assistant turn", "chats.jsonl"),
    ("DPO pair with identical chosen and rejected", "finetune",
     _bad_write("pairs.jsonl", json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n"),
     [*_BAD_FINETUNE, "--task=dpo", "--data={root}/pairs.jsonl"], 1, "chosen and rejected are the same reply",
     "pairs.jsonl"),
    ("checkpoint directory without a tokenizer", "finetune", lambda root: (root / "out" / "tokenizer.bpe").unlink(),
     _BAD_FINETUNE, 1, "needs the tokenizer it was trained with", "out/tokenizer.bpe"),
    ("LoRA targets that match nothing", "finetune", None, [*_BAD_FINETUNE, "--lora_rank=4", "--lora_targets=qkv"],
     1, "match no nn.Linear in the model", None),
    ("classification data of one class", "finetune",
     _bad_write("labels.jsonl", "".join(json.dumps({"text": t, "label": "a"}) + "\n" for t in ("x = 1", "y = 2"))),
     [*_BAD_FINETUNE, "--task=classify", "--data={root}/labels.jsonl"], 1, "a classifier needs at least two classes",
     "labels.jsonl"),
    ("classification line without a label", "finetune", _bad_write("labels.jsonl", json.dumps({"text": "x"}) + "\n"),
     [*_BAD_FINETUNE, "--task=classify", "--data={root}/labels.jsonl"], 1, 'needs a string "text" and a "label"',
     "labels.jsonl"),
    # prompts
    ("prompt longer than the context", "prompt", None, [*_BAD_SAMPLE, "--prompt=" + "word " * 200], 0,
     "that fit; dropped the oldest", None),
    ("prompt file that is not UTF-8", "prompt", _bad_write("prompt.txt", "caf\u00e9".encode("latin-1")),
     [*_BAD_SAMPLE, "--prompt=FILE:{root}/prompt.txt"], 1, "is not UTF-8 text; re-encode it", "prompt.txt"),
]

_BAD_SCRIPTS = {"prepare.py": prepare.main, "train.py": train.main, "sample.py": sample.main, "bench.py": bench.main,
                "finetune.py": finetune.main}
_BAD_SEEN = {}  # case name -> (root, exit code, stderr, files before, files after): each case runs once


@pytest.fixture(scope="module")
def _bad_base(_train_data, tmp_path_factory):
    """The good inputs every case starts from: data/ (_train_data), out/ (one train.py step on it), mc.jsonl."""
    base = tmp_path_factory.mktemp("bad_base")
    shutil.copytree(_train_data[0], base / "data")
    with contextlib.redirect_stdout(io.StringIO()):
        train.train(_train_cfg(str(base / "data"), base / "out", max_steps=1, eval_interval=1, eval_batches=1))
    (base / "mc.jsonl").write_text(_BAD_MC_ITEM * 2)
    return base


def _bad_files(root) -> dict:
    """{relative path: sha256} of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _bad_run(case, base, tmp_root):
    """Run one case (once per session) -> (root, exit code, stderr, files before, files after)."""
    name, _, build, argv, _, _, _ = case
    if name not in _BAD_SEEN:
        root = tmp_root / re.sub(r"\W+", "_", name)
        shutil.copytree(base, root)
        if build:
            build(root)
        argv = [a.replace("{root}", str(root)) for a in argv]
        before = _bad_files(root)
        if argv[0] == "python":  # the real command line
            r = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
            code, err = r.returncode, r.stderr
        else:  # SCRIPT.main(argv) here; an escaping exception is printed as Python would print it
            out, err_io, code = io.StringIO(), io.StringIO(), 0
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err_io):
                try:
                    _BAD_SCRIPTS[argv[0]](argv[1:])
                except SystemExit as e:
                    code = e.code
                except Exception:
                    traceback.print_exc()
                    code = 1
            err = err_io.getvalue()
        _BAD_SEEN[name] = (root, code, err, before, _bad_files(root))
    return _BAD_SEEN[name]


@pytest.fixture(scope="module")
def _bad_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("bad_cases")


@pytest.mark.parametrize("case", [pytest.param(c, id=re.sub(r"\W+", "-", c[0]).strip("-")) for c in _BAD_CASES])
def test_bad_input_table(case, _bad_base, _bad_tmp):
    name, _, _, argv, code, message, file = case
    root, got, err, before, after = _bad_run(case, _bad_base, _bad_tmp)
    parts = (message,) if isinstance(message, str) else message
    assert "Traceback" not in err, err
    assert got == code, f"exit code {got}, expected {code}; stderr:\n{err}"
    lines = [line for line in err.splitlines() if parts[0] in line]
    assert len(lines) == 1, f"expected one line with {parts[0]!r} on stderr:\n{err}"
    line = lines[0]
    assert re.match(r"(\w+\.py: )?(error|warning): ", line), line
    assert all(p in line for p in parts), line
    if file:
        assert os.path.join(str(root), file) in line, f"{line!r} does not name {file}"
    assert not [p for p in after if ".tmp" in p], after
    if code:
        assert err.strip().splitlines()[-1] == line  # the last word, after any progress lines
        assert after == before  # stopped: nothing written, nothing changed, nothing left half-written


def test_bad_input_troubleshooting_table(_bad_base, _bad_tmp):
    # README.md "## Troubleshooting": one row per case, its message column exactly the case's stable part
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split("\n## Troubleshooting\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) == 4 and not set(cells[0]) <= set("-: ") and cells[0] != "case":
            rows[cells[0]] = cells
    assert sorted(rows) == sorted(c[0] for c in _BAD_CASES), "README's troubleshooting rows and the test table differ"
    for case in _BAD_CASES:
        name, _, _, argv, _, message, _ = case
        first = message if isinstance(message, str) else message[0]
        _, script, shown, fix = rows[name]
        assert script == f"`{argv[1] if argv[0] == 'python' else argv[0]}`", (name, script)
        assert shown == f"`{first}`", (name, shown)
        assert fix, name
        err = _bad_run(case, _bad_base, _bad_tmp)[2]
        assert first in err, f"{name}: README quotes a message the run did not print"


# -----------------------------------------------------------------------------
# README.md, the guide: its tables point at real code, its links at real sections

import ast


def _readme_rows(title: str) -> list:
    """The cells of the table rows under README's '## title' (header and rule rows left out)."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set(cells[0]) <= set("-: "):
                rows.append(cells)
    return rows[1:]  # the header row first


def _function_source(path: str, qualname: str) -> str:
    """The source of function `qualname` ("name" or "Class.method") in path."""
    source = open(os.path.join(ROOT, path), encoding="utf-8").read()
    scopes = [ast.parse(source)]
    for part in qualname.split("."):
        node = next((n for s in scopes for n in ast.iter_child_nodes(s)
                     if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
        assert node is not None, f"{path} has no {qualname}"
        scopes = [node]
    return ast.get_source_segment(source, scopes[0])


def test_readme_ideas_point_at_real_lines():
    rows = _readme_rows("The ideas and where they live")
    assert len(rows) >= 12
    for idea, where, line in rows:
        path, function = (c.strip().strip("`") for c in where.split(","))
        assert line.strip("`") in _function_source(path, function), (idea, path, function)


def test_readme_stability_checklist_matches_train_py():
    rows = _readme_rows("The stability checklist")
    assert len(rows) >= 9
    source = open(os.path.join(ROOT, "train.py"), encoding="utf-8").read()
    for symptom, _, _, guards, printed in rows:
        for guard in re.findall(r"`(\w+)`", guards):
            _function_source("train.py", guard)  # the guard is a function of train.py
        for text in re.findall(r"`([^`]+)`", printed):
            assert text in source, (symptom, text)  # and what it prints is in its source


def test_readme_links_reach_its_sections():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    # GitHub's anchors: the heading lower-cased, punctuation but - and _ dropped, spaces -> -
    slug = lambda h: re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
    anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", readme, flags=re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", readme)
    assert links and not [a for a in links if a not in anchors]


def _readme_runnable_blocks() -> list:
    """[(overrides, [command, ...])] of README's blocks marked <!-- runnable --> (run as they are)
    or <!-- runnable: train.py --max_steps=30 ... --> (those options appended to that script's
    commands: fewer steps). pip installs are already done here, and the test suite's own command
    would run this test again, so both are left out."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = []
    for mark, body in re.findall(r"<!-- runnable(?:: (.*?))? -->\n```\w*\n(.*?)```", readme, flags=re.S):
        overrides, script = {}, None
        for word in mark.split():
            if word.endswith(".py"):
                script = word
                overrides[script] = []
            else:
                overrides[script].append(word)
        commands = []
        for line in body.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            for part in (p.strip() for p in line.split("&&")):
                if part and not part.startswith("pip install") and "pytest" not in part:
                    words = part.split()
                    extra = overrides.get(words[1], []) if words[0] == "python" and len(words) > 1 else []
                    commands.append(" ".join([part, *extra]))
        blocks.append((mark, commands))
    return blocks


def test_readme_runnable_commands(tmp_path):
    blocks = _readme_runnable_blocks()
    assert len(blocks) >= 3 and all(commands for _, commands in blocks)
    # a fresh copy of the repo: the files a clone has, nothing this checkout has made since
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name in ("README.md", "requirements.txt"):
            shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _, commands in blocks:
        for command in commands:  # in README order: each block may use what the earlier made
            r = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, input="/exit\n",
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0 and "Traceback" not in r.stderr, (command, r.stderr[-2000:])
