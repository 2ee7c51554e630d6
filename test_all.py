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
import pytest
import tiktoken
import tiktoken.load

import tokenizer
from tokenizer import SPECIAL_TOKENS, Tokenizer, parse_config


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
