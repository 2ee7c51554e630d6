"""
tokenizer.py: a byte-level BPE tokenizer, trained from scratch, encoded fast through tiktoken.

A language model reads integers, not text. This file turns text into integers and back:

    text --regex split--> chunks --UTF-8--> bytes --BPE merges--> token ids

Byte-level BPE (GPT-2 paper, Radford et al. 2019; BPE from Sennrich et al. 2016) starts from
the 256 possible byte values, so any string can be encoded and nothing is ever "unknown".
Training then repeatedly finds the most frequent adjacent pair of tokens and gives it a new id,
until the vocabulary is full. A regex first cuts the text into chunks (words, numbers,
punctuation runs, whitespace runs) so merges never cross, say, a word and the space after it.

Run it:
    python tokenizer.py train --input=path/to/dir_or_file --vocab_size=8192 --out=tokenizer.bpe
    python tokenizer.py train --input=README.md --vocab_size=300 --out=tiny.bpe  # a tiny run: <1 s
    python tokenizer.py encode --tokenizer=tokenizer.bpe "def hello(): return 42"
    python tokenizer.py stats --tokenizer=tokenizer.bpe --input=some_file.py
    python tokenizer.py bench --vocab_size=8192    # training time vs Hugging Face tokenizers

Use it:
    tok = Tokenizer.train(texts, vocab_size=8192)   # texts: a str or an iterable of documents
    ids = tok.encode("hello world")                  # ordinary text: never a special id
    tok.decode(ids) == "hello world"
    tok.save("tokenizer.bpe"); tok = Tokenizer.load("tokenizer.bpe")

What it simplifies, and where the speed comes from:
- Training runs in pure Python, but it counts each distinct chunk once (a corpus of 31 MB of
  Python has ~120k distinct chunks), keeps pair counts up to date incrementally, touches only
  the chunks that contain the pair being merged, and picks the best pair from a heap
  (learn_merges). learn_merges_naive is the textbook loop that recounts every pair on every
  merge, kept beside it for reading; the tests prove the two learn the same merges.
- Encoding goes through tiktoken (Rust) built from our learned ranks. `encode_slow` does the
  same thing in a dozen lines of Python, for reading, and the tests prove they agree.

Sources: GPT-2 (byte-level BPE, the "gpt2" split pattern), tiktoken (the cl100k "gpt4" split
pattern and the .tiktoken rank-file format), minbpe (the idea of a readable BPE chapter).
"""

import base64
import contextlib
import dataclasses
import difflib
import hashlib
import heapq
import inspect
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
import typing
from collections import Counter, defaultdict

import regex
import tiktoken

# -----------------------------------------------------------------------------
# Split patterns and special tokens

# The regex that cuts text into chunks before BPE. These two are facts from OpenAI's releases,
# as tiktoken first published them (GPT-2's encoder.py with its contractions grouped; cl100k_base;
# later tiktoken versions use equivalent, faster forms). Written one alternative per line; the
# regex tries them left to right at each position. A test restates both strings whole.
# "gpt2": letters, numbers and punctuation runs each keep one leading space (" world").
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)|"""  # the English contractions 's 'd 'm 't 'll 've 're
                r""" ?\p{L}+| ?\p{N}+|"""  # a run of letters, or of digits, with one leading space
                r""" ?[^\s\p{L}\p{N}]+|"""  # a run of punctuation and symbols, the same way
                r"""\s+(?!\S)|"""  # whitespace, leaving its last space to the word after it
                r"""\s+""")  # any other whitespace: a newline or tab right before a word
# "gpt4" (cl100k_base): case-insensitive contractions, numbers in groups of at most 3 digits
# (so "2024" is "202" + "4" and arithmetic sees regular pieces), newlines kept apart from
# indentation. This is the default: it compresses code better than the gpt2 split.
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|"""  # contractions in any case: 'S 'll 'RE
                r"""[^\r\n\p{L}\p{N}]?+\p{L}+|"""  # a word with one optional leading non-letter
                r"""\p{N}{1,3}|"""  # 1-3 digits: "2024" -> "202", "4"
                r""" ?[^\s\p{L}\p{N}]++[\r\n]*|"""  # punctuation, then the newlines right after it
                r"""\s*[\r\n]|"""  # whitespace up to a line end: "\n" stays apart from indentation
                r"""\s+(?!\S)|"""  # as in gpt2: the last space goes to the word after it
                r"""\s+""")  # any other whitespace
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

# The same two patterns for pure-ASCII text, where \p{L} is [A-Za-z], \p{N} is [0-9] and \s is
# Unicode's White_Space: tab, \n, \v, \f, \r and space. (subtle: Python's re also counts
# \x1c-\x1f as \s, the regex module and tiktoken do not, hence the explicit class.) The standard
# library's re runs these about 2.5x faster than the regex module runs the originals, and most
# code is ASCII, so training uses them wherever text.isascii(); a test proves they split alike.
_SPACE, _NOT_SPACE = r"[\t\n\x0b\x0c\r ]", r"[^\t\n\x0b\x0c\r ]"
ASCII_PATTERNS = {
    GPT2_PATTERN: (rf"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^\t\n\x0b\x0c\r A-Za-z0-9]+|"""
                   rf"""{_SPACE}+(?!{_NOT_SPACE})|{_SPACE}+"""),
    GPT4_PATTERN: (rf"""'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?+[A-Za-z]+|[0-9]{{1,3}}|"""
                   rf""" ?[^\t\n\x0b\x0c\r A-Za-z0-9]++[\r\n]*|"""
                   rf"""{_SPACE}*[\r\n]|{_SPACE}+(?!{_NOT_SPACE})|{_SPACE}+"""),
}

# Special tokens are control symbols, not text. They get ids after the merges and are always
# present, so every stage can rely on them:
#   <|endoftext|>  separates documents (prepare.py puts one before every document)
#   <|pad|>        fills unused positions in a batch; never trained on
#   <|system|> <|user|> <|assistant|>  open a chat message of that role (see encode_chat)
#   <|end|>        closes a chat message; a model's reply is done when it emits it
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_ROLES = ("system", "user", "assistant")

FILE_HEADER = "tokenizer.py bpe v1"  # a saved tokenizer's first line; bump on format changes


def resolve_pattern(pattern: str) -> str:
    """'gpt2' or 'gpt4' -> the regex; anything else must itself be a valid regex."""
    if pattern in PATTERNS:
        return PATTERNS[pattern]
    try:
        regex.compile(pattern)
    except regex.error as e:
        raise ValueError(f"pattern {pattern!r} is neither 'gpt2', 'gpt4' nor a valid regex "
                         f"({e})") from None
    return pattern


# -----------------------------------------------------------------------------
# Training, step 1: count the distinct chunks

def _count_chunks(job: tuple) -> tuple:
    """Split every text of a batch with the regex; count each distinct chunk (as UTF-8 bytes).

    (["ab ab", "ab"], GPT2_PATTERN) -> (Counter({b"ab": 2, b" ab": 1}), 7 characters)
    Runs in a worker process when training is parallel, so it is a top-level function.
    """
    texts, pattern = job
    split = regex.compile(pattern).findall
    ascii_pattern = ASCII_PATTERNS.get(pattern)  # None for a custom regex: no fast twin known
    split_ascii = re.compile(ascii_pattern).findall if ascii_pattern else split
    # Special-token strings never take part in training: a document that contains the literal
    # text "<|endoftext|>" is cut there, so no merge ever learns to spell a control token.
    cut = regex.compile("|".join(regex.escape(s) for s in SPECIAL_TOKENS)).split
    counts = Counter()
    for text in texts:
        for part in (cut(text) if "<|" in text else (text,)):
            counts.update(split_ascii(part) if part.isascii() else split(part))
    # Bytes, not str: BPE merges bytes, so a 3-byte character like "€" starts as 3 tokens.
    return Counter({chunk.encode("utf-8"): n for chunk, n in counts.items()}), sum(map(len, texts))


def _batches(texts, max_chars: int = 1 << 20):
    """Group documents into lists of about max_chars characters: the work units of the pool."""
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def count_chunks(texts, pattern: str, num_proc: int | None = None) -> tuple:
    """Count the distinct chunks of all documents -> (Counter of chunk bytes, total characters).

    The regex split is the slowest step of training, so with more than one batch of text it
    runs on num_proc processes (default: all cores). Documents stream through in batches;
    memory grows with the number of distinct chunks, not with the corpus.
    """
    jobs = ((batch, pattern) for batch in _batches([texts] if isinstance(texts, str) else texts))
    head = list(itertools.islice(jobs, 2))
    num_proc = num_proc or os.cpu_count() or 1
    chunks, total = Counter(), 0
    if len(head) < 2 or num_proc == 1:  # little text: a pool would only add its start-up time
        parts = map(_count_chunks, itertools.chain(head, jobs))
        for part, n in parts:
            chunks.update(part)
            total += n
        return chunks, total
    # subtle: "fork" starts workers in milliseconds and they inherit the imported modules;
    # elsewhere (macOS, Windows) the safe default is "spawn", which re-imports this file.
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(num_proc) as pool:
        # unordered is safe: adding Counters commutes, so the result does not depend on it
        for part, n in pool.imap_unordered(_count_chunks, itertools.chain(head, jobs)):
            chunks.update(part)
            total += n
    return chunks, total


# -----------------------------------------------------------------------------
# Training, step 2: merge the most frequent pair, again and again

def learn_merges_naive(chunk_counts: dict, n_merges: int) -> list:
    """The textbook BPE loop, for reading: recount every pair, merge the best, repeat.

    BPE as Sennrich et al. 2016 (section 3.2, their Algorithm 1) and minbpe's basic.py run it:
    before every merge, count every adjacent pair of the whole corpus (here: of every distinct
    chunk, times how often the chunk occurs), then merge the most frequent pair everywhere.
    Same rule as learn_merges, so the same merges (a test checks it):

        {b"aaabdaaabac": 1}, 3 merges -> [(97, 97), (97, 98), (256, 257)]
          a a a b d a a a b a c   "aa" occurs 4 times: it becomes 256 (call it Z)
          Z a b d Z a b a c       "ab" and "Za" tie at 2: the smaller pair (97, 98) -> 257 (Y)
          Z Y d Z Y a c           "ZY" occurs twice -> 258, and the text reads X d X a c

    Why learn_merges exists: this loop's cost is (number of merges) x (size of the corpus),
    because one merge changes only the pairs next to it yet all of them are counted again.
    Thousands of merges on a real corpus take this loop minutes where learn_merges, which
    updates the counts it changes and takes the best pair from a heap, takes seconds.
    """
    words = {chunk: list(chunk) for chunk in chunk_counts}  # chunk bytes -> its current ids
    vocab = {i: bytes([i]) for i in range(256)}  # id -> the bytes it spells
    merges = []
    while len(merges) < n_merges:
        pair_counts = Counter()  # (left id, right id) -> occurrences in the whole corpus
        for chunk, ids in words.items():
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += chunk_counts[chunk]
        # subtle: a pair that spells bytes a token already has ("a"+"bc" after "ab"+"c") is
        # never merged: each byte string must have exactly one id (tiktoken requires it).
        known = set(vocab.values())
        candidates = [p for p in pair_counts if vocab[p[0]] + vocab[p[1]] not in known]
        if not candidates:
            break  # no pair is left that would make a new token: the corpus is used up
        # the highest count wins; among equal counts the smallest (left id, right id)
        best = min(candidates, key=lambda p: (-pair_counts[p], p))
        new_id = 256 + len(merges)
        merges.append(best)
        vocab[new_id] = vocab[best[0]] + vocab[best[1]]
        for ids in words.values():  # replace every occurrence, left to right, never overlapping
            i = 0
            while i < len(ids) - 1:
                if (ids[i], ids[i + 1]) == best:
                    ids[i:i + 2] = [new_id]  # "a a a" with (a, a) -> "Z a", as str.replace does
                i += 1
    return merges


def learn_merges(chunk_counts: dict, n_merges: int, verbose: bool = False) -> list:
    """Learn up to n_merges merges from {chunk bytes: count}: [(left_id, right_id), ...], merge
    i creating id 256 + i. The rule and result of learn_merges_naive (the highest count wins,
    ties go to the smallest pair: a function of the corpus, not of document order), but fast:
      - keep pair counts (stats) up to date: a merge only changes the pairs right next to each
        occurrence, in the words that contain it (where[pair] lists them);
      - take the best pair from a max-heap. Counts of old pairs only ever go down after a
        merge, so a heap entry may be stale (too high): when popped, it is checked against
        stats and pushed back with the true count ("lazy refresh"); new pairs are pushed fresh;
      - spell each word as a str with one character per token, chr(id), so that finding a pair
        (str.find) and merging it everywhere in a word (str.replace) run at C speed. A pair is
        then a 2-character string, and comparing those compares (left id, right id).
    """
    words = ["".join(map(chr, chunk)) for chunk in chunk_counts]  # b"hi" -> "hi": chr(id) a token
    counts = list(chunk_counts.values())  # how often each word occurs in the corpus
    stats = defaultdict(int)  # pair (2-char str) -> weighted count of that adjacent pair
    where = defaultdict(set)  # pair -> indices of words that (may) contain it
    for index, (word, count) in enumerate(zip(words, counts)):
        for j in range(len(word) - 1):
            stats[word[j:j + 2]] += count
            where[word[j:j + 2]].add(index)
    heap = [(-count, pair) for pair, count in stats.items()]  # heapq is a min-heap: negate
    heapq.heapify(heap)
    vocab = [bytes([i]) for i in range(256)]  # id -> bytes, grows with every merge
    known = set(vocab)  # byte strings that already have an id
    merges = []
    t0 = time.time()
    while len(merges) < n_merges and heap:
        # -- pop the best pair, refreshing stale entries on the way
        neg_count, pair = heapq.heappop(heap)
        count = stats.get(pair, 0)
        if count <= 0:
            continue
        if count != -neg_count:
            heapq.heappush(heap, (-count, pair))
            continue
        left, right = ord(pair[0]), ord(pair[1])
        # subtle: two different pairs can spell the same bytes ("a"+"bc" and "ab"+"c").
        # tiktoken (and the byte-level encoder) need each byte string to have one id, so the
        # second spelling is never merged.
        if vocab[left] + vocab[right] in known:
            stats[pair] = 0
            continue
        merges.append((left, right))
        vocab.append(vocab[left] + vocab[right])
        known.add(vocab[-1])
        # -- in every word with the pair, move the counts of its neighbours:
        # "x a b y" -> "x M y" takes (x,a) and (b,y) away and adds (x,M) and (M,y)
        merged = chr(len(vocab) - 1)  # M, the new token as one character
        fresh = set()  # pairs that contain M: their counts are final only after the loop
        for index in where.pop(pair):
            word = words[index]
            j = word.find(pair)
            if j < 0:
                continue  # stale entry: an earlier merge already took the pair from this word
            weight, length, prev_end = counts[index], len(word), -1
            while j >= 0:
                nxt = word.find(pair, j + 2)  # occurrences do not overlap, as in str.replace
                if j > 0:  # left neighbour x; it is M itself when the previous occurrence ends here
                    stats[word[j - 1:j + 1]] -= weight
                    new_pair = (merged if prev_end == j else word[j - 1]) + merged
                    stats[new_pair] += weight
                    fresh.add(new_pair)
                    where[new_pair].add(index)
                k = j + 2
                if k < length and nxt != k:  # right neighbour y, unless y starts the next
                    stats[word[k - 1:k + 1]] -= weight  # occurrence (whose left step counts (M, M))
                    new_pair = merged + word[k]
                    stats[new_pair] += weight
                    fresh.add(new_pair)
                    where[new_pair].add(index)
                prev_end, j = k, nxt
            words[index] = word.replace(pair, merged)
        del stats[pair]
        for new_pair in fresh:
            heapq.heappush(heap, (-stats[new_pair], new_pair))
        if verbose and len(merges) % 1000 == 0:
            print(f"  merge {len(merges):6d}/{n_merges}: {vocab[-1]!r} ({-neg_count} times), "
                  f"{time.time() - t0:.1f}s")
    return merges


# -----------------------------------------------------------------------------
# Exchange formats: Hugging Face's tokenizer.json and llama.cpp's GGUF

# Both store a byte-level BPE token as a str with one character per byte (GPT-2's encoder.py,
# bytes_to_unicode): a byte that is a visible Latin-1 character stands for itself, and each of
# the other 68 (the controls, space, DEL, NBSP, the soft hyphen) takes the next character from
# U+0100 on, in byte order. So no token string holds whitespace, and a merge can be written
# "left right" with a space between the two.
def _byte_chars() -> list:
    """[the character that stands for byte b, for b in 0..255]:
    0x21 "!" -> "!",  0x20 " " -> "Ġ" (U+0120),  0x0A "\\n" -> "Ċ" (U+010A),  0xFF -> "ÿ"."""
    visible = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}  # !..~ ¡..¬ ®..ÿ
    chars, spare = [], 0x100
    for b in range(256):
        if b in visible:
            chars.append(chr(b))
        else:
            chars.append(chr(spare))
            spare += 1
    return chars


BYTE_CHARS = _byte_chars()  # byte -> the character that stands for it
CHAR_BYTES = {c: b for b, c in enumerate(BYTE_CHARS)}  # character -> its byte


def bytes_to_hf(token: bytes) -> str:
    """A token's bytes as Hugging Face spells them: b" hello" -> "Ġhello", "é" -> "Ã©"."""
    return "".join([BYTE_CHARS[b] for b in token])


def hf_to_bytes(text: str) -> bytes:
    """The inverse of bytes_to_hf: "Ġhello" -> b" hello"."""
    return bytes([CHAR_BYTES[c] for c in text])


# encode_chat's template in Jinja, for tokenizer_config.json and GGUF's tokenizer.chat_template:
# <|role|> content <|end|> per message, and <|assistant|> at the end with add_generation_prompt.
# It refuses what encode_chat refuses (raise_exception is the error hook transformers and
# llama.cpp give templates). A test proves apply_chat_template gives encode_chat's ids.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] "
    "or message['content'] is not string -%}"
    "{{- raise_exception('a chat message needs a role in system, user, assistant and a string "
    "content') -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}")

# llama.cpp names the split regexes it implements (src/llama-vocab.cpp, tokenizer.ggml.pre) and
# falls back to a different regex, with only a warning, for a name it does not know. Ours are
# GPT-2's ("gpt-2", with the hyphen) and cl100k's, which Llama 3 uses ("llama-bpe"). Each also
# as tiktoken writes it today (equivalent, faster forms), for tokenizers from from_tiktoken.
_TIKTOKEN_R50K = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|"""
                  r"""\s++$|\s+(?!\S)|\s""")
_TIKTOKEN_CL100K = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
                    r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
GGUF_PRE_NAMES = {GPT4_PATTERN: "llama-bpe", _TIKTOKEN_CL100K: "llama-bpe",
                  GPT2_PATTERN: "gpt-2", _TIKTOKEN_R50K: "gpt-2"}


def gguf_pre_name(pattern: str) -> str:
    """llama.cpp's pre-tokenizer name for a split regex (or "gpt2"/"gpt4"):
    gguf_pre_name(GPT4_PATTERN) -> "llama-bpe";  gguf_pre_name("gpt2") -> "gpt-2"."""
    name = GGUF_PRE_NAMES.get(PATTERNS.get(pattern, pattern))
    if name is None:
        raise ValueError("llama.cpp has no pre-tokenizer for this split regex, only for the gpt4 "
                         "(cl100k) and gpt2 patterns, so a GGUF file would split text "
                         "differently: train the tokenizer with --pattern=gpt4 or gpt2 to export")
    return name


# -----------------------------------------------------------------------------
# The Tokenizer

class Tokenizer:
    """Byte-level BPE: ranks (bytes -> id) define the merges, tiktoken does the encoding.

    A token's id is also its merge rank: lower ids were merged earlier, and encoding merges
    the adjacent pair whose joined bytes have the lowest id first. Ids 0..255 are the bytes.
    """

    def __init__(self, ranks: dict, pattern: str = "gpt4", special_tokens: dict | None = None,
                 name: str = "bpe"):
        self.pattern = resolve_pattern(pattern)  # the split regex itself
        self.ranks = dict(ranks)  # bytes -> id, the mergeable tokens (tiktoken's "mergeable_ranks")
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing:
            raise ValueError(f"the vocabulary lacks {len(missing)} of the 256 single bytes (e.g. "
                             f"{missing[0]}); a byte-level BPE needs them all to encode any text")
        if len(set(self.ranks.values())) != len(self.ranks):
            raise ValueError("the vocabulary gives the same id to two different byte strings")
        # Special tokens: keep the given ones, then add any of ours that are missing after the
        # highest id in use, so every tokenizer has <|endoftext|>, <|pad|> and the chat markers.
        specials = dict(special_tokens or {})
        taken = set(self.ranks.values()) | set(specials.values())
        if len(taken) != len(self.ranks) + len(specials):
            raise ValueError("a special token's id collides with a mergeable token or another "
                             "special token")
        next_id = max(taken) + 1
        # the ones added here, which a model trained on the given vocabulary has never seen
        # (GPT-2's has only <|endoftext|>): finetune.py gives them embedding rows
        self.added_specials = [s for s in SPECIAL_TOKENS if s not in specials]
        for s in self.added_specials:
            specials[s] = next_id
            next_id += 1
        self.special_tokens = specials  # name -> id
        # ids run 0..n_vocab-1 (an imported vocabulary may leave gaps: an embedding row each)
        self.n_vocab = max(max(self.ranks.values()), max(specials.values())) + 1
        self.eot_id = specials["<|endoftext|>"]
        self.pad_id = specials["<|pad|>"]
        self.vocab = {i: b for b, i in self.ranks.items()}  # id -> bytes
        self.vocab.update({i: s.encode("utf-8") for s, i in specials.items()})
        # The fast path: tiktoken's Rust BPE with exactly our ranks, pattern and specials.
        self._enc = tiktoken.Encoding(name, pat_str=self.pattern, mergeable_ranks=self.ranks,
                                      special_tokens=specials)
        self._split = regex.compile(self.pattern)

    # -- training ------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts, vocab_size: int, pattern: str = "gpt4", verbose: bool = False,
              num_proc: int | None = None) -> "Tokenizer":
        """Learn a vocabulary of vocab_size ids in all: 256 bytes + merges + special tokens.

        texts: one str, or an iterable of documents (str); documents are never merged across.
        """
        pattern = resolve_pattern(pattern)
        n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
        if n_merges < 0:
            raise ValueError(f"vocab_size={vocab_size} is too small: it must hold the 256 byte "
                             f"tokens and {len(SPECIAL_TOKENS)} special tokens, so at least "
                             f"{256 + len(SPECIAL_TOKENS)}")
        t0 = time.time()
        chunk_counts, n_chars = count_chunks(texts, pattern, num_proc)
        if not chunk_counts:
            raise ValueError("cannot train a tokenizer on an empty corpus: give it some text")
        t1 = time.time()
        merges = learn_merges(chunk_counts, n_merges, verbose=verbose)
        if verbose:
            print(f"split {n_chars / 1e6:.1f}M characters into {len(chunk_counts):,} distinct "
                  f"chunks in {t1 - t0:.1f}s; learned {len(merges):,} merges in "
                  f"{time.time() - t1:.1f}s")
        if len(merges) < n_merges and verbose:
            print(f"note: the corpus only supports {len(merges)} merges, so the vocabulary is "
                  f"smaller than asked")
        vocab = [bytes([i]) for i in range(256)]
        for left, right in merges:
            vocab.append(vocab[left] + vocab[right])
        ranks = {token: i for i, token in enumerate(vocab)}
        specials = {s: len(vocab) + i for i, s in enumerate(SPECIAL_TOKENS)}
        return cls(ranks, pattern, specials)

    # -- encoding and decoding -----------------------------------------------------------------

    def encode(self, text: str) -> list:
        """Ordinary text -> ids. Special-token strings in the text are plain text here:
        "<|endoftext|>" inside a document becomes byte-level tokens, never eot_id, so data
        cannot inject control tokens. Code that builds sequences adds special ids itself."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list, num_threads: int = 8) -> list:
        """encode() for many texts at once, on tiktoken's thread pool."""
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def encode_slow(self, text: str) -> list:
        """The same result as encode(), in plain Python, to show what BPE encoding is.

        For each chunk of the split: start from its bytes, then repeatedly merge the adjacent
        pair whose joined bytes have the lowest rank (the earliest merge), until no adjacent
        pair is a token. "hello" with merges (l,l) < (h,e) < (he,ll):
            h e l l o -> h e ll o -> he ll o -> hell o
        """
        ids = []
        text = _fix_surrogates(text)
        for chunk in self._split.findall(text):
            parts = [bytes([b]) for b in chunk.encode("utf-8")]
            while len(parts) > 1:
                joined = [self.ranks.get(parts[i] + parts[i + 1]) for i in range(len(parts) - 1)]
                ranked = [(rank, i) for i, rank in enumerate(joined) if rank is not None]
                if not ranked:
                    break  # no adjacent pair is a token: this chunk is fully merged
                # subtle: ties cannot happen (ranks are unique), but the lowest i would win
                i = min(ranked)[1]
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids.extend(self.ranks[p] for p in parts)
        return ids

    def decode_bytes(self, ids) -> bytes:
        """ids -> the raw bytes they spell (special tokens spell their own names)."""
        try:
            return b"".join(self.vocab[int(i)] for i in ids)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in this vocabulary (ids run "
                             f"0..{self.n_vocab - 1})") from None

    def decode(self, ids) -> str:
        """ids -> text. A token can end in the middle of a multi-byte character, so the bytes
        of some id lists are not valid UTF-8: those bytes become U+FFFD instead of an error."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # -- chat template --------------------------------------------------------------------------

    def encode_chat(self, messages: list, add_generation_prompt: bool = False) -> tuple:
        """Chat messages -> (ids, assistant_mask), the one template shared by finetune and sample.

        Each message is  <|role|> content <|end|>.  With add_generation_prompt, a final
        <|assistant|> asks the model for the next reply. assistant_mask is True on the tokens a
        fine-tuned model learns to produce: the content of assistant messages and their <|end|>.

        [{"role": "user", "content": "hi"}]
            -> [<|user|>, "hi"..., <|end|>], [False, False..., False]
        """
        ids, mask = [], []
        for m in messages:
            role, content = m.get("role"), m.get("content")
            if role not in CHAT_ROLES or not isinstance(content, str):
                raise ValueError(f"a chat message needs a role in {CHAT_ROLES} and a string "
                                 f"content, got {m!r}")
            body = self.encode(content) + [self.special_tokens["<|end|>"]]
            ids += [self.special_tokens[f"<|{role}|>"]] + body
            mask += [False] + [role == "assistant"] * len(body)
        if add_generation_prompt:
            ids.append(self.special_tokens["<|assistant|>"])
            mask.append(False)
        return ids, mask

    # -- saving and loading ---------------------------------------------------------------------

    def save(self, path: str) -> None:
        """Write one human-readable UTF-8 file:

            tokenizer.py bpe v1
            pattern "<the split regex as a JSON string>"
            special "<|endoftext|>" 8186          (one line per special token)
            ranks 8186
            AA== 0                                (base64 of the token's bytes, then its id,
            AQ== 1                                 as in tiktoken's .tiktoken files)
        """
        specials = sorted(self.special_tokens.items(), key=lambda item: item[1])  # by id
        lines = [FILE_HEADER, "pattern " + json.dumps(self.pattern)]
        lines += [f"special {json.dumps(s)} {i}" for s, i in specials]
        lines.append(f"ranks {len(self.ranks)}")
        # base64, because a token's bytes can be anything: a newline, half a character, NUL
        lines += [f"{base64.b64encode(b).decode('ascii')} {i}"
                  for b, i in sorted(self.ranks.items(), key=lambda item: item[1])]

        def write(tmp):
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.write("\n".join(lines) + "\n")

        atomic_write(path, write)  # never a half-written tokenizer under the real name

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """Read a file written by save(). A foreign or damaged file gives one clear error."""
        damaged_fix = ("copy back the original, or re-create it with `python tokenizer.py "
                       "train` or prepare.py --force")
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer file {path} does not exist: train one with "
                                    "`python tokenizer.py train` or run prepare.py") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a tokenizer file (it is not UTF-8 text); "
                             f"{damaged_fix}") from None
        if lines[0] != FILE_HEADER:
            raise ValueError(f"{path} is not a tokenizer.py file (its first line is "
                             f"{lines[0][:40]!r}, expected {FILE_HEADER!r}); a tiktoken rank "
                             f"file loads with Tokenizer.from_ranks_file")
        try:
            assert lines[1].startswith("pattern ")
            pattern = json.loads(lines[1][len("pattern "):])
            specials, i = {}, 2
            while lines[i].startswith("special "):
                name, _, special_id = lines[i][len("special "):].rpartition(" ")
                specials[json.loads(name)] = int(special_id)
                i += 1
            assert lines[i].startswith("ranks ")
            n = int(lines[i].split()[1])
            ranks = _parse_rank_lines(lines[i + 1:])
            assert len(ranks) == n, f"header promises {n} ranks, file has {len(ranks)}"
            # subtle: inside the try, so an edited rank or regex names the file too
            tok = cls(ranks, pattern, specials)
        except (AssertionError, ValueError, IndexError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is a damaged tokenizer file ({e or 'unexpected line'}); "
                             f"{damaged_fix}") from None
        return tok

    @classmethod
    def from_ranks_file(cls, path: str, pattern: str = "gpt2",
                        special_tokens: dict | None = None) -> "Tokenizer":
        """A tiktoken rank file on disk (lines "base64 rank"), e.g. OpenAI's gpt2.tiktoken:
        Tokenizer.from_ranks_file("gpt2.tiktoken", "gpt2", {"<|endoftext|>": 50256})."""
        try:
            with open(path, encoding="ascii") as f:
                ranks = _parse_rank_lines(f.read().split("\n"))
        except FileNotFoundError:
            raise FileNotFoundError(f"rank file {path} does not exist") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a tiktoken rank file of 'base64 rank' lines "
                             f"({e})") from None
        return cls(ranks, pattern, special_tokens, name=os.path.basename(path))

    @classmethod
    def from_tiktoken(cls, name: str) -> "Tokenizer":
        """OpenAI's pretrained vocabularies: "gpt2", "cl100k_base", "o200k_base".

        tiktoken downloads the rank file on first use and caches it (TIKTOKEN_CACHE_DIR); with no
        network and no cache this fails, with one sentence saying so.
        """
        if name not in ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base"):
            raise ValueError(f"unknown tiktoken vocabulary {name!r}: use gpt2, cl100k_base or "
                             f"o200k_base")
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as e:  # requests/urllib/blobfile errors all mean the same thing here
            raise RuntimeError(f"tiktoken could not load {name!r} ({type(e).__name__}): it "
                               "downloads the vocabulary on first use, so run once with network "
                               "access or point TIKTOKEN_CACHE_DIR at a cache that has it, or "
                               "pass a local rank file to Tokenizer.from_ranks_file") from None
        return cls(enc._mergeable_ranks, enc._pat_str, enc._special_tokens, name=name)

    # -- Hugging Face and GGUF export ------------------------------------------------------------

    def hf_vocab(self) -> tuple[list[str], list[str]]:
        """-> (tokens, merges): the vocabulary as Hugging Face and GGUF store a byte-level BPE.

        tokens[i] is id i's string: a mergeable token's bytes one character each (bytes_to_hf),
        a special token its own text, and an id that is neither (an imported vocabulary may have
        gaps; cl100k_base does) "[PAD<i>]", as llama.cpp's converter writes. merges are
        "left right", in the order Hugging Face's BPE applies them. With 256 bytes, b"ab" (256)
        and b" ab" (257):
            tokens[97] == "a", tokens[256] == "ab", tokens[257] == "Ġab",
            tokens[258] == "<|endoftext|>", merges == ["a b", "Ġ ab"]
        """
        tokens = [f"[PAD{i}]" for i in range(self.n_vocab)]  # id -> its string; gaps keep this
        for token, i in self.ranks.items():
            tokens[i] = bytes_to_hf(token)
        for name, i in self.special_tokens.items():
            tokens[i] = name
        # Our BPE merges, at each step, the adjacent pair whose joined bytes have the lowest rank;
        # Hugging Face's merges the pair that comes first in its list. Listing every pair by the
        # rank of the token it makes gives the same steps. Every split of a token into two tokens
        # is listed, not just the one that training made:
        # subtle: tiktoken merges any adjacent pair that spells a token, even one whose parts
        # outrank it (an imported vocabulary can have b"abc" at 300 but b"ab" at 400); and other
        # splits do occur: "a"+"bc" makes "abc" in a text where "ab" never formed.
        merges = []  # (rank of the merged token, rank of left, rank of right)
        for token, rank in self.ranks.items():
            for k in range(1, len(token)):
                left, right = self.ranks.get(token[:k]), self.ranks.get(token[k:])
                if left is not None and right is not None:
                    merges.append((rank, left, right))
        # subtle: splits of one token share a rank, and Hugging Face breaks that tie by list
        # order where tiktoken takes the leftmost pair. That could only matter where three
        # adjacent parts spell one token two ways ("ab"+"a" and "a"+"ba" in "ab a ba"); a search
        # over hundreds of small random vocabularies found no text that gets there, and the
        # tests compare both encoders on real text, random text and GPT-2's own vocabulary.
        merges.sort()
        return tokens, [f"{tokens[left]} {tokens[right]}" for _, left, right in merges]

    def save_hf(self, out_dir: str, model_max_length: int | None = None) -> None:
        """Write tokenizer.json and tokenizer_config.json into out_dir, for
        transformers.AutoTokenizer.from_pretrained(out_dir) (and tokenizers.Tokenizer.from_file):

            tok.save_hf("out/hf")
            AutoTokenizer.from_pretrained("out/hf")("def f():").input_ids == tok.encode("def f():")

        The same ids for text, and apply_chat_template(messages, tokenize=True) gives
        encode_chat(messages)[0]. One difference: Hugging Face reads a special token's text
        inside ordinary text as that special token, where encode() keeps it text; pass
        split_special_tokens=True when encoding text to match encode() (README, "Hugging Face").
        model_max_length: the context window to record (None: transformers' "no limit").
        """
        tokens, merges = self.hf_vocab()
        vocab = {tokens[i]: i for i in sorted(self.ranks.values())}
        clash = sorted(set(self.special_tokens) & set(vocab))
        if clash:
            raise ValueError(f"special token {clash[0]!r} is also spelled by a mergeable token, so "
                             f"tokenizer.json could not tell them apart; rename the special token")
        # subtle: tokenizers ignores the "id" of an added token that the model's vocab lacks and
        # numbers it after the vocab instead, which is wrong wherever ids have gaps (cl100k_base).
        # In the vocab too, as GPT-2's own tokenizer.json has <|endoftext|>, each keeps its id.
        # No merge makes one, and the gpt2/gpt4 regexes never cut one out as a whole chunk (a
        # custom regex that did would get the special id there even with split_special_tokens).
        vocab.update(self.special_tokens)
        added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True}
                 for s, i in sorted(self.special_tokens.items(), key=lambda item: item[1])]
        tokenizer_json = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None,
            # our regex cuts the text into chunks ("Isolated": each match is one piece), then
            # ByteLevel turns each chunk's UTF-8 bytes into characters; its own regex (GPT-2's)
            # and prefix space are off, or it would split and change the chunks a second time
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": False}]},
            "post_processor": None,  # nothing added around the ids, as encode() adds nothing
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                        "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False,
                      # subtle: tiktoken first looks the whole chunk up and takes its id if
                      # there is one, before any merge; ignore_merges does the same. Without it
                      # a chunk whose merges do not lead back to its own token gets other ids.
                      "ignore_merges": True,
                      "vocab": vocab, "merges": merges}}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            # sample.py's export writes the same ids into config.json and generation_config.json
            # (which stops at <|end|> too); prepare.py puts <|endoftext|> before each document
            "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
            # the other specials (chat markers...), so all_special_tokens lists every one
            "additional_special_tokens": [s for s, _ in sorted(self.special_tokens.items(),
                                                                  key=lambda item: item[1])
                                          if s not in ("<|endoftext|>", "<|pad|>")],
            "add_bos_token": False, "add_eos_token": False,  # encode() adds nothing either
            # decode() gives the bytes back as they were: no tidying of " ." or " 's"
            "clean_up_tokenization_spaces": False,
            # subtle: True would keep "<|end|>" in text as text (as encode() does), but also
            # breaks the special tokens the chat template writes (see the README)
            "split_special_tokens": False,
            "chat_template": CHAT_TEMPLATE}
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        os.makedirs(out_dir, exist_ok=True)
        for name, obj in (("tokenizer.json", tokenizer_json), ("tokenizer_config.json", config)):
            def write(tmp, obj=obj):
                with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                    json.dump(obj, f, ensure_ascii=False, indent=1)
                    f.write("\n")
            atomic_write(os.path.join(out_dir, name), write)


def _fix_surrogates(text: str) -> str:
    """Lone surrogates (possible in a Python str, impossible in UTF-8) become U+FFFD, as
    tiktoken does: "a\\ud800b" -> "a\\ufffdb"."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _parse_rank_lines(lines: list) -> dict:
    """["IQ== 0", "Ig== 1", ""] -> {b"!": 0, b'"': 1}: tiktoken's "base64 rank" lines."""
    ranks = {}
    for line in lines:
        if not line.strip():
            continue
        token, rank = line.split()  # subtle: a line without exactly 2 fields is a ValueError
        ranks[base64.b64decode(token, validate=True)] = int(rank)
    return ranks


# -----------------------------------------------------------------------------
# Files: the project's one atomic write and one sha256 (every later stage imports these two)


def atomic_write(path: str, write) -> None:
    """Call write(tmp) to fill a temporary file beside `path`, then make it `path` all at once.

    The data is fsynced before the rename and the directory after it: a crash, a kill or a
    power loss leaves either the old file or the new one, never half of one (without the fsyncs
    a rename survives a killed process but not a power cut: the kernel may write the new name
    before the data it points to). On any error the temporary file is removed and the error
    re-raised, the old file untouched. Example (write() must close its file before returning):
        def write(tmp):
            with open(tmp, "w") as f:
                f.write("hello")
        atomic_write("notes.txt", write)
    """
    # subtle: one fixed name, so that a fresh run knows what a crash left behind (train.py
    # looks for it); the price: two processes writing the same path at once share the temporary
    tmp = path + ".tmp"
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)  # atomic on POSIX and Windows, even when path already exists
    except BaseException:  # KeyboardInterrupt too: a ^C must not leave the temporary behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync(os.path.dirname(os.path.abspath(path)))


def _fsync(path: str) -> None:
    """Flush a file's data, or a directory's list of names, from the OS cache to the disk."""
    if os.path.isdir(path):
        if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a directory; NTFS orders this
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    else:
        fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MB pieces (a checkpoint can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -----------------------------------------------------------------------------
# Text files: which files of a tree are text, and how they are read (prepare.py uses these too)

TEXT_SUFFIXES = (".txt", ".md", ".py")  # plain-text files taken from a directory tree
SNIFF_BYTES = 8192  # how much of a file's start is_binary looks at
# NUL, and the C0 codes no text file holds in bulk (tab, \n, \v, \f, \r and ESC are allowed)
_NON_TEXT_CONTROL = re.compile(rb"[\x00-\x08\x0e-\x1a\x1c-\x1f]")


def is_binary(head: bytes) -> bool:
    """A NUL byte, or more than 10% control bytes, in the first 8 KB: an image, archive, pyc...

    b"\\x89PNG\\r\\n\\x1a\\n\\x00\\x00" -> True;  b"caf\\xc3\\xa9\\n" -> False.
    subtle: UTF-16 text counts as binary (its ASCII characters carry a NUL byte each), so it is
    skipped, never silently read as garbage; the error messages say to convert it with iconv.
    """
    head = head[:SNIFF_BYTES]
    return b"\x00" in head or len(_NON_TEXT_CONTROL.findall(head)) > len(head) // 10


def decode_text(raw: bytes) -> tuple:
    """UTF-8 bytes -> (text, how many invalid sequences became U+FFFD).

    b"a\\xffb" -> ("a\\ufffdb", 1). Kept rather than refused: one mis-encoded file (the stdlib
    ships a few, latin-1 and koi8-r test data for its own decoders) should not stop a run, but
    callers count it and say so.
    Decoding bytes ourselves is open(newline=""): a "\\r" stays in the text, as it is data too.
    """
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # subtle: a U+FFFD the file itself held (bytes EF BF BD) is text, not a replacement
        return text, text.count("\ufffd") - raw.count("\ufffd".encode())


def read_text_file(path: str) -> tuple:
    """-> (text, bytes read, invalid sequences replaced); text is None when the file is binary.

    Only the first 8 KB of a binary file are read, however big it is.
    """
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
        if is_binary(head):
            return None, len(head), 0
        raw = head + f.read()
    text, n_replaced = decode_text(raw)
    return text, len(raw), n_replaced


def list_text_files(root: str, suffixes: tuple = TEXT_SUFFIXES, skip_dirs: tuple = ()) -> list:
    """[(path relative to root with "/", size in bytes, mtime_ns)] of the files under root with
    one of the suffixes, sorted by path. Hidden files and folders, __pycache__ and skip_dirs
    (by name, at any depth) are left out."""
    files = []
    for folder, dirs, names in os.walk(root):
        # sorted in place so os.walk descends in a deterministic order on every filesystem
        dirs[:] = sorted(d for d in dirs
                         if not d.startswith(".") and d not in ("__pycache__",) + skip_dirs)
        for name in sorted(names):
            if name.endswith(suffixes) and not name.startswith("."):
                path = os.path.join(folder, name)
                try:
                    stat = os.stat(path)
                    size, mtime = stat.st_size, stat.st_mtime_ns
                except OSError:  # a broken link: listed here, then unreadable for the reader
                    size, mtime = 0, 0
                files.append((os.path.relpath(path, root).replace(os.sep, "/"), size, mtime))
    files.sort()
    return files


def read_texts(path: str, stats: dict | None = None, suffixes: tuple = TEXT_SUFFIXES,
               skip_dirs: tuple = ()):
    """Yield the documents under path (a file, or every text file of a directory tree, sorted).

    Binary files (is_binary) are skipped; invalid UTF-8 is replaced by U+FFFD (decode_text).
    Both are counted in stats. A "\\r" stays as it is in the file.
    """
    stats = {"files": 0, "binary_skipped": 0, "invalid_utf8_files": 0} if stats is None else stats
    if not os.path.exists(path):
        raise FileNotFoundError(f"input {path} does not exist")
    if os.path.isdir(path):
        listed = list_text_files(path, suffixes, skip_dirs)
        files = [os.path.join(path, rel) for rel, _, _ in listed]
        if not files:
            raise ValueError(f"directory {path} holds no text files ({', '.join(suffixes)})")
    else:
        files = [path]
    for file in files:
        text, _, n_replaced = read_text_file(file)
        if text is None:
            stats["binary_skipped"] += 1
            continue
        stats["invalid_utf8_files"] += n_replaced > 0
        stats["files"] += 1
        yield text


# -----------------------------------------------------------------------------
# Command line: one dataclass per command, parsed by parse_config (shared by every stage)

def _field_comments(cls) -> dict:
    """{field name: its trailing # comment} read from the dataclass source, for -h.

    A comment too long for one line goes on below, its # right under the field's # :
        name: str = ""  # the first part
                        # and the rest     -> "the first part and the rest"
    """
    comments = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # a class defined in a REPL or exec has no source to read
        return comments
    field, column = None, -1  # the field whose comment may go on, and the column of its #
    for line in source.splitlines():
        m = regex.match(r"(\s+(\w+)\s*:[^#]*)#\s*(.*)$", line)  # "  name: type = x  # comment"
        if m:
            field, column = m.group(2), len(m.group(1))
            comments[field] = m.group(3)
        elif field and line[:column].isspace() and line[column:column + 1] == "#":
            comments[field] += " " + line[column + 1:].strip()
        else:
            field = None
    return comments


def _convert(name: str, kind, text):
    """One --key=value string -> a value of the field's type (int, float, str, bool, X | None)."""
    args = typing.get_args(kind)
    if args and type(None) in args:  # Optional: "none" means None
        if text is not None and text.lower() in ("none", "null"):
            return None
        kind = next(a for a in args if a is not type(None))
    if kind is bool:  # parsed explicitly: bool("false") would be True
        if text is None:
            return True  # a bare --flag means true
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} is a boolean: use --{name}=true or --{name}=false, "
                         f"not {text!r}")
    if text is None:
        raise ValueError(f"--{name} needs a value: --{name}=...")
    try:
        if kind is int:  # "1e3" and "100_000" are integers too, "1.5" is not
            digits = text.replace("_", "")
            value = float(digits) if any(c in text for c in ".eE") else int(digits)
            if value != int(value):
                raise ValueError
            return int(value)
        if kind is float:
            return float(text)
    # OverflowError: --max_iters=1e400 is float inf, and int() of that fails
    except (ValueError, OverflowError):
        raise ValueError(f"--{name} must be {'an integer' if kind is int else 'a number'}, "
                         f"not {text!r}") from None
    return text


def parse_config(cls, argv: list | None = None):
    """Build the dataclass cls from ["--key=value", ...] (default: sys.argv[1:]).

    --flag alone sets a boolean; -h prints every field, its default and its comment. Unknown
    keys are rejected with the closest valid name; a bad value exits with one sentence (code 2).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)  # resolves "int | None" written as a string annotation
    if "-h" in argv or "--help" in argv:
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0]
        comments = _field_comments(cls)
        print(doc + "\n\noptions (--key=value):")
        rows = []
        for name, f in fields.items():
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING
                else "(required)")
            rows.append((f"--{name}={default}", comments.get(name, "")))
        width = min(max(len(left) for left, _ in rows), 40)
        for left, comment in rows:
            print(f"  {left:<{width}}  {comment}")
        raise SystemExit(0)
    values = {}
    try:
        for arg in argv:
            if not arg.startswith("--") or arg == "--":
                raise ValueError(f"unexpected argument {arg!r}: options are written --key=value "
                                 f"(see -h)")
            key, eq, text = arg[2:].partition("=")
            key = key.replace("-", "_")
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f"; did you mean --{close[0]}?" if close else "; see -h for the list"
                # subtle: repr a key holding a newline (or \x85, \u2028...), or the one-line
                # error splits
                shown = f"--{key}" if key.isprintable() else repr(f"--{key}")
                raise ValueError(f"unknown option {shown}{hint}")
            values[key] = _convert(key, hints[key], text if eq else None)
        return cls(**values)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


@dataclasses.dataclass
class TokenizerTrainConfig:
    input: str = ""  # a text file or a directory tree of .txt/.md/.py files
    vocab_size: int = 8192  # ids in all: 256 bytes + merges + special tokens
    out: str = "tokenizer.bpe"  # where to write the tokenizer
    pattern: str = "gpt4"  # split regex: gpt4 (cl100k), gpt2, or a regex of your own


@dataclasses.dataclass
class EncodeConfig:
    tokenizer: str = "tokenizer.bpe"  # a file written by `train`, or gpt2/cl100k_base/o200k_base


@dataclasses.dataclass
class StatsConfig:
    tokenizer: str = "tokenizer.bpe"  # a file written by `train`, or gpt2/cl100k_base/o200k_base
    input: str = ""  # a text file or directory to measure on


@dataclasses.dataclass
class TokenizerBenchConfig:
    input: str = ""  # text file or directory; empty = this Python's standard library .py files
    vocab_size: int = 8192  # vocabulary to train
    repeat: int = 3  # timed runs of each trainer, interleaved; the median is reported
    threads: int = 0  # processes/threads for both trainers; 0 = all cores


def bench_training(cfg: TokenizerBenchConfig) -> None:
    """Time Tokenizer.train against Hugging Face tokenizers' BpeTrainer (Rust), if installed, on
    the same texts, split regex and byte alphabet, runs interleaved so machine load hits both."""
    threads = cfg.threads or os.cpu_count() or 1
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # must be set before tokenizers is imported
    if cfg.input:
        texts = list(read_texts(cfg.input))
    else:  # prepare.py's default corpus: the standard library's .py files, not site-packages
        import sysconfig
        texts = list(read_texts(sysconfig.get_paths()["stdlib"], suffixes=(".py",),
                                skip_dirs=("site-packages", "dist-packages")))
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"{len(texts)} documents, {mb:.1f} MB, vocab {cfg.vocab_size}, "
          f"{threads} processes/threads")
    try:
        import tokenizers as hf
    except ImportError:
        hf = None
        print("(pip install tokenizers to compare against Hugging Face's Rust trainer)")

    def ours():
        Tokenizer.train(texts, cfg.vocab_size, num_proc=threads)

    def theirs():  # the same job: our split regex, then bytes mapped to 256 visible characters
        tok = hf.Tokenizer(hf.models.BPE())
        tok.pre_tokenizer = hf.pre_tokenizers.Sequence([
            hf.pre_tokenizers.Split(hf.Regex(GPT4_PATTERN), behavior="isolated"),
            hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        trainer = hf.trainers.BpeTrainer(vocab_size=cfg.vocab_size, show_progress=False,
                                         initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
                                         special_tokens=SPECIAL_TOKENS)
        tok.train_from_iterator(texts, trainer=trainer)

    times = {"tokenizer.py": [], "HF tokenizers": []}
    for _ in range(cfg.repeat):
        for name, fn in (("tokenizer.py", ours), ("HF tokenizers", theirs)):
            if name == "HF tokenizers" and hf is None:
                continue
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    import resource

    def median(ts):
        return sorted(ts)[len(ts) // 2]

    for name, ts in times.items():
        if ts:
            print(f"{name:>14}: median {median(ts):.2f}s over {len(ts)} runs "
                  f"({', '.join(f'{t:.2f}' for t in ts)})")
    if times["HF tokenizers"]:
        ratio = median(times["tokenizer.py"]) / median(times["HF tokenizers"])
        print(f"tokenizer.py / HF time ratio: {ratio:.2f}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KB
    print(f"peak memory of this process (both trainers): {peak_mb:.0f} MB")


def _open_tokenizer(spec: str) -> Tokenizer:
    if spec in ("gpt2", "cl100k_base", "o200k_base") and not os.path.exists(spec):
        return Tokenizer.from_tiktoken(spec)
    return Tokenizer.load(spec)


def _train_command(cfg: TokenizerTrainConfig) -> None:
    if not cfg.input:
        raise ValueError("train needs --input=FILE_OR_DIR")
    stats = {"files": 0, "binary_skipped": 0, "invalid_utf8_files": 0}
    texts = list(read_texts(cfg.input, stats))
    if not any(t.strip() for t in texts):
        raise ValueError(f"no text to train on in {cfg.input} ({stats['files']} files read, "
                         f"{stats['binary_skipped']} binary skipped); give it UTF-8 text "
                         f"(UTF-16 reads as binary: iconv -f UTF-16 -t UTF-8)")
    if stats["invalid_utf8_files"]:
        print(f"warning: {stats['invalid_utf8_files']} files in {cfg.input} are not valid UTF-8; "
              f"their bad bytes became U+FFFD (re-encode them, e.g. iconv -f latin1 -t UTF-8, "
              f"if that is wrong)", file=sys.stderr)
    t0 = time.time()
    # the output folder is made before minutes of training, not after them
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    tok = Tokenizer.train(texts, cfg.vocab_size, cfg.pattern, verbose=True)
    tok.save(cfg.out)
    print(f"read {stats['files']} files ({stats['binary_skipped']} binary skipped, "
          f"{stats['invalid_utf8_files']} with invalid UTF-8 replaced); trained vocab "
          f"{tok.n_vocab} in {time.time() - t0:.1f}s; wrote {cfg.out}")


def main(argv: list) -> None:
    commands = ("train", "encode", "stats", "bench")
    if not argv or argv[0] not in commands:
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__)
            return
        raise ValueError(f"the first argument must be one of {', '.join(commands)} "
                         f"(see python tokenizer.py -h)")
    command, rest = argv[0], argv[1:]
    if command == "train":
        _train_command(parse_config(TokenizerTrainConfig, rest))
    elif command == "encode":
        words = [a for a in rest if not a.startswith("--")]  # the text to encode
        cfg = parse_config(EncodeConfig, [a for a in rest if a.startswith("--")])
        tok = _open_tokenizer(cfg.tokenizer)
        ids = tok.encode(" ".join(words))
        for i in ids:
            print(f"{i:>7}  {tok.decode_bytes([i])!r}")
        print(f"{len(ids)} tokens")
    elif command == "bench":
        bench_training(parse_config(TokenizerBenchConfig, rest))
    else:
        cfg = parse_config(StatsConfig, rest)
        tok = _open_tokenizer(cfg.tokenizer)
        texts = list(read_texts(cfg.input)) if cfg.input else []
        if not texts:
            raise ValueError("stats needs --input=FILE_OR_DIR with some text")
        t0 = time.time()
        n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
        seconds = time.time() - t0
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        # bytes per token is the tokenizer's compression: more means a longer text per window
        print(f"{n_bytes:,} bytes -> {n_tokens:,} tokens: {n_bytes / max(n_tokens, 1):.3f} bytes "
              f"per token (vocab {tok.n_vocab}); encoded at "
              f"{n_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
