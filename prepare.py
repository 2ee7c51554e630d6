"""
prepare.py: raw text -> cleaned documents -> BPE tokens -> llm.c-format shards on disk.

The data stage. It reads a corpus one document at a time, cleans and deduplicates it,
trains (or loads) a tokenizer, and streams the token ids into fixed-size binary shards
that train.py memory-maps. Memory stays flat whatever the corpus size: documents are
streamed, tokenized in parallel in bounded batches, and appended to shards as they come.

Run:
    python prepare.py                                  # default: this Python's stdlib, BPE 4096
    python prepare.py --dataset=shakespeare            # Tiny Shakespeare (downloaded once, 1.1 MB)
    python prepare.py --dataset=path/to/dir_or_file    # .txt .md .py, .jsonl with a "text" field
    python prepare.py --dataset=https://host/file.txt  # any plain-text URL
    python prepare.py --tokenizer=gpt2 --force         # tiktoken's GPT-2 vocabulary, not trained
    python prepare.py --max_docs=200 --vocab_size=512  # a tiny run for a quick look
    python prepare.py -h                               # every option with its meaning

Output, in out_dir/NAME/ (NAME = pystdlib, shakespeare, or the file/URL stem):
    train_000.bin ...  val_000.bin ...   token shards (format below)
    tokenizer.bpe                        the tokenizer the ids belong to (tokenizer.py's format)
    meta.json                            dataset, fingerprint, cleaning counts, tokens and exact
                                         bytes per split

How it runs (the sections below, in this order): resolve the dataset to a list of files
(downloading it once if needed); fingerprint inputs, options and tokenizer, and stop there if
out_dir/NAME already holds exactly that; else, in a temporary folder, pass 1 reads and cleans
the train split to train the BPE, pass 2 reads and cleans everything again and tokenizes it
into shards, and the folder replaces out_dir/NAME only when all of it is written. Reading
twice costs seconds; keeping a cleaned copy of the corpus would cost its size on disk.

Shard format, llm.c's (karpathy/llm.c dev/data/data_common.py, also used by modded-nanogpt's
FineWeb shards, which therefore train here unchanged): a header of 256 int32 (little endian),
header[0] = 20240520 (magic), header[1] = 1 for uint16 tokens or 2 for uint32 tokens (ours;
llm.c's own uint32 shards use magic 20240801, version 7, and read here too), header[2] = number
of tokens; then the tokens. Convention, as in GPT-2 and llm.c: every
document STARTS with <|endoftext|>, so a model sees "end of the previous text" before each
new one and a window that spans two documents can tell they are unrelated.

Sources: llm.c (shard format, eot-before-document), nanoGPT data/shakespeare_char (the
positional 90/10-style split of a single text), Gopher (Rae et al. 2021, Appendix A) and
CCNet (Wenzek et al. 2019) for the exact-dedup and line-dedup filters.
"""

import array
import hashlib
import http.client
import json
import multiprocessing
import os
import re
import shutil
import sys
import sysconfig
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import numpy as np

import tokenizer as tokenizer_module  # its source file is part of the fingerprint
from tokenizer import (SNIFF_BYTES, Tokenizer, atomic_write, decode_text, file_sha256, is_binary,
                       list_text_files, parse_config, read_text_file)

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class PrepareConfig:
    dataset: str = "pystdlib"  # pystdlib (this Python's stdlib .py files, offline) | shakespeare
                               # | a file or directory | an http(s) URL
    out_dir: str = "data"  # outputs go in out_dir/NAME/; downloads are cached in out_dir/downloads/
    name: str = ""  # NAME of the output folder; "" derives it from dataset (pystdlib,
                    # shakespeare, the file or URL stem)
    # 4096, for the default CPU run (train.py CPU_MODEL: 4 layers x 128 wide, block 64, tied
    # embeddings), where the embedding and softmax are a large share of the compute. Measured
    # on the stdlib val split, V = 1024 / 2048 / 4096 / 8192 give 2.50 / 2.92 / 3.30 / 3.64
    # bytes per token and cost 6.3 / 7.1 / 8.7 / 11.8 MFLOP per training token
    # (model.flops_per_token), so 2.52 / 2.43 / 2.62 / 3.24 MFLOP per byte of text: 4096 costs
    # 8% more per byte than the cheapest (2048) but its window holds 13% more text; 8192 would
    # cost 24% more per byte for 10% more context. (A test recomputes FLOPs and ratios.)
    vocab_size: int = 4096  # size of the BPE trained here, special tokens included
                            # (ignored with --tokenizer)
    tokenizer: str = ""  # "" trains a BPE on the train split; or a saved tokenizer file;
                         # or gpt2 | cl100k_base | o200k_base
    pattern: str = "gpt4"  # pre-tokenizer regex for training: gpt4, gpt2, or a regex string
    tokenizer_max_bytes: int = 200_000_000  # train the BPE on at most this many bytes of the
                                            # train split (memory)
    val_fraction: float = 0.0  # validation share: documents by path hash, or a single text's
                               # tail; 0 = dataset default (0.1 shakespeare, as nanoGPT; else 0.05)
    min_chars: int = 32  # drop documents shorter than this (characters, cleaned, surrounding
                         # whitespace stripped)
    dedup: bool = True  # drop exact duplicate documents (hash of the cleaned text)
    dedup_lines: bool = False  # drop non-blank lines seen in an earlier document (CCNet-style;
                               # off: it breaks code)
    lowercase: bool = False  # lowercase all text (off: case carries meaning, see normalize_case)
    normalize_punct: bool = False  # curly quotes, dashes, ellipsis, no-break spaces -> ASCII
    dtype: str = "auto"  # shard token type: auto (uint16 when the vocabulary fits) | uint16
                         # | uint32
    shard_tokens: int = 100_000_000  # tokens per shard file (llm.c's FineWeb shards hold 1e8)
    max_docs: int = 0  # keep only the first N documents after filtering (0 = all); for quick runs
    backend: str = "processes"  # parallel tokenization: processes | threads (measured: see
                                # README.md)
    workers: int = 0  # tokenizer workers; 0 = one per CPU core
    base_url: str = ""  # mirror for named downloads: fetch BASE_URL/FILE instead (env
                        # PREPARE_BASE_URL works too)
    max_download_mb: float = 2048.0  # refuse downloads over this many MB (1e6 bytes); 0 = no cap
    force: bool = False  # rebuild even when out_dir/NAME already matches this configuration's
                         # fingerprint


SHARD_MAGIC = 20240520  # llm.c's magic number, header[0] of every shard written here
# header size in int32 (1024 bytes); llm.c uses 3 of the 256 and leaves the rest 0 for later fields
HEADER_INTS = 256
# (magic, version) -> token dtype. Version 2 is this project's uint32 variant; llm.c writes its
# own uint32 (Llama 3) shards with magic 20240801 and version 7, which open_shard also reads.
SHARD_FORMATS = {(SHARD_MAGIC, 1): np.uint16, (SHARD_MAGIC, 2): np.uint32,
                 (20240801, 7): np.uint32}
PREPARE_FORMAT = 1  # bump when the output of the same inputs and options would change
TIKTOKEN_NAMES = ("gpt2", "cl100k_base", "o200k_base")  # loaded by Tokenizer.from_tiktoken
# Files taken from a directory tree: tokenizer.py's plain-text files, plus .jsonl, which holds
# one document per line (its "text" field) and so is read by _iter_jsonl, not as text.
TEXT_SUFFIXES = tokenizer_module.TEXT_SUFFIXES + (".jsonl",)
BATCH_BYTES = 1 << 20  # text per tokenization task: amortizes IPC, yet bounds memory

# Named downloads. To add a dataset: its URL, the file name it is cached under in
# out_dir/downloads/, and its size and sha256 when known (checked after the download).
# A corpus that needs a new required dependency (parquet for FineWeb-Edu) does not belong here.
DATASETS = {
    "shakespeare": dict(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
            "input.txt",
        file="tinyshakespeare.txt",
        bytes=1115394,
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        val_fraction=0.1,  # nanoGPT's 90/10 split, so val losses compare with its published numbers
    ),
}

# -----------------------------------------------------------------------------
# Shard format: write and read (the reader is what train.py uses)


def write_shard(path: str, tokens, dtype=None) -> None:
    """Write tokens to an llm.c shard at path, atomically (tokenizer.atomic_write).

    dtype None keeps a uint16/uint32 array's type, else picks uint16 when every id fits.
    >>> write_shard("x.bin", [50256, 15496, 995])  # 1024-byte header + 3 x uint16
    """
    tokens = np.asarray(tokens)
    # checked before the cast: astype(uint16) would silently wrap 70000 around to 4464
    lo, hi = (int(tokens.min()), int(tokens.max())) if tokens.size else (0, 0)
    if dtype is None:
        keep = tokens.dtype in (np.uint16, np.uint32)
        dtype = tokens.dtype if keep else (np.uint16 if hi < 2**16 else np.uint32)
    dtype = np.dtype(dtype)
    # header[2] is an int32, so a shard holds fewer than 2**31 tokens
    if tokens.ndim != 1 or dtype not in (np.uint16, np.uint32) or tokens.size > 2**31 - 1:
        raise ValueError(f"write_shard({path}): a shard holds a 1-D array of fewer than 2**31 "
                         f"ids as uint16 or uint32, got shape {tokens.shape} as {dtype}.")
    if lo < 0 or hi > np.iinfo(dtype).max:
        raise ValueError(f"write_shard({path}): ids in [{lo}, {hi}] do not fit {dtype}; "
                         f"use uint32.")

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(_shard_header(len(tokens), dtype).tobytes())
            f.write(tokens.astype(dtype, copy=False).tobytes())  # native order: little endian

    atomic_write(path, write)


def _shard_header(count: int, dtype) -> np.ndarray:
    """The 1024-byte header: magic, version (1 = uint16, 2 = uint32), token count, then zeros."""
    header = np.zeros(HEADER_INTS, dtype="<i4")  # "<": little endian on every machine
    header[0] = SHARD_MAGIC
    header[1] = 1 if np.dtype(dtype) == np.uint16 else 2
    header[2] = count
    return header


def open_shard(path: str) -> np.ndarray:
    """Validate an llm.c shard's header and return its tokens as a read-only 1-D numpy memmap.

    Checks the magic, the version (1 = uint16, 2 = uint32) and that the token count matches
    the file size, so a truncated copy or a foreign file fails here, not mid-training.
    (An empty shard comes back as an empty array: a zero-length file region cannot be mapped.)
    A memmap reads only the pages a training window touches, so shards may exceed the RAM.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard {path} does not exist; HINT: run prepare.py to create it.")
    size = os.path.getsize(path)
    if size < HEADER_INTS * 4:
        raise ValueError(f"shard {path} is {size} bytes, shorter than the 1024-byte header; "
                         f"HINT: the file is truncated or not a shard, rerun prepare.py with "
                         f"--force.")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)  # llm.c writes little endian
    magic, version, count = (int(x) for x in header[:3])
    if magic not in {m for m, _ in SHARD_FORMATS}:
        raise ValueError(f"shard {path} has magic {magic}, expected {SHARD_MAGIC}; "
                         f"HINT: this is not an llm.c token shard, rerun prepare.py with --force.")
    if (magic, version) not in SHARD_FORMATS:
        raise ValueError(f"shard {path} has version {version}, expected 1 (uint16) or 2 (uint32); "
                         f"HINT: a shard from another tool needs converting, or rerun prepare.py.")
    dtype = np.dtype(SHARD_FORMATS[magic, version])
    expected = HEADER_INTS * 4 + count * dtype.itemsize
    if count < 0 or size != expected:
        raise ValueError(f"shard {path} holds {size} bytes but its header promises {count} "
                         f"{dtype} tokens ({expected} bytes); HINT: the file is truncated or "
                         f"corrupt, rerun prepare.py with --force.")
    if count == 0:  # subtle: np.memmap refuses a zero-length region
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_INTS * 4, shape=(count,))


class _ShardWriter:
    """Appends token arrays to train_000.bin, train_001.bin, ... with exactly shard_tokens each
    (the last one shorter); the count goes into the header when a shard is closed.

    The files are written in place: they live in prepare()'s temporary folder, which becomes
    the dataset only once everything is complete, so no per-file temporary name is needed.
    """

    def __init__(self, folder: str, split: str, dtype, shard_tokens: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.dtype = np.dtype(dtype)
        self.files, self.total = [], 0  # shard names written, tokens written in all
        self._file, self._in_shard = None, 0  # the open shard and the tokens it holds so far

    def add(self, tokens: np.ndarray) -> None:
        # An array may straddle a shard boundary: it is cut there, so shard sizes depend only on
        # the token stream, never on how the stream was batched (a test compares two batchings).
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None:
                name = f"{self.split}_{len(self.files):03d}.bin"
                self.files.append(name)
                self._file = open(os.path.join(self.folder, name), "wb")
                # the count is not known yet: a placeholder header, rewritten by _close_shard
                self._file.write(_shard_header(0, self.dtype).tobytes())
                self._in_shard = 0
            take = min(len(tokens), self.shard_tokens - self._in_shard)
            self._file.write(tokens[:take].tobytes())
            self._in_shard += take
            self.total += take
            tokens = tokens[take:]
            if self._in_shard == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self._file.seek(0)  # back to the placeholder header, now that the count is known
        self._file.write(_shard_header(self._in_shard, self.dtype).tobytes())
        self._file.close()
        self._file = None

    def close(self) -> list:
        """Close the last (shorter) shard; -> every shard name written, in order."""
        if self._file is not None:
            self._close_shard()
        return self.files


# -----------------------------------------------------------------------------
# Sources: which files make up the corpus (downloading them when needed)


@dataclass
class _Source:
    """What the corpus is, decided once by resolve_source and then read twice."""
    name: str  # output folder name
    label: str  # what meta.json calls the dataset
    root: str  # folder the relative paths below refer to
    files: list  # [(relative path, size in bytes, mtime_ns)], sorted by path
    single: bool  # one document (split by position) rather than many (split by hash)
    moved: dict = field(default_factory=dict)  # {doc id: split} overriding the hash rule


def _stem(path: str) -> str:
    """A folder name safe on every filesystem, from a path or URL file name:
    "/x/My Notes.txt" -> "My_Notes"."""
    base = os.path.basename(path.rstrip("/\\")) or "dataset"
    stem = os.path.splitext(base)[0] if not os.path.isdir(path) else base
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem).strip(".") or "dataset"


def resolve_source(cfg: PrepareConfig) -> _Source:
    """Turn cfg.dataset into a list of files, downloading named datasets and URLs first.

    The list (path, size, mtime of each file) is taken once, here: the fingerprint hashes it,
    and both reading passes walk the same list, so a file added mid-run changes nothing.
    """
    dataset = cfg.dataset
    if dataset == "pystdlib":  # the default: offline, in every Python, tens of MB of real code
        root = sysconfig.get_paths()["stdlib"]
        # subtle: site-packages lives inside the stdlib folder; it is third-party code, not stdlib.
        files = list_text_files(root, (".py",), skip_dirs=("site-packages", "dist-packages"))
        return _Source(cfg.name or "pystdlib", f"pystdlib (Python {sys.version.split()[0]})",
                       root, files, False)
    if dataset in DATASETS or dataset.lower().startswith(("http://", "https://")):
        return _download_source(cfg)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", dataset):  # file://, ftp://, s3://: not fetched
        _check_url_scheme(dataset)
    if not os.path.exists(dataset):
        raise FileNotFoundError(f"dataset path {dataset} does not exist; pass --dataset=pystdlib, "
                                f"shakespeare, an existing file or directory, or an http(s) URL.")
    path = os.path.abspath(dataset)
    if os.path.isdir(path):
        files = list_text_files(path, TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"directory {dataset} holds no {'/'.join(TEXT_SUFFIXES)} files; "
                             f"point --dataset at text files.")
        single = len(files) == 1 and not files[0][0].endswith(".jsonl")
        return _Source(cfg.name or _stem(path), path, path, files, single)
    return _file_source(cfg.name or _stem(path), path, path)


def _file_source(name: str, label: str, path: str) -> _Source:
    """One file: a single document (split by position), or one document per .jsonl line."""
    stat = os.stat(path)
    return _Source(name, label, os.path.dirname(path),
                   [(os.path.basename(path), stat.st_size, stat.st_mtime_ns)],
                   not path.endswith(".jsonl"))


def _download_source(cfg: PrepareConfig) -> _Source:
    """A named dataset or a URL: downloaded once into out_dir/downloads/, then read from there."""
    if cfg.dataset in DATASETS:
        spec = DATASETS[cfg.dataset]
        base = cfg.base_url or os.environ.get("PREPARE_BASE_URL", "")
        url = f"{base.rstrip('/')}/{spec['file']}" if base else spec["url"]
        local, name = os.path.join(cfg.out_dir, "downloads", spec["file"]), cfg.dataset
    else:
        url, spec = cfg.dataset, {}
        file_name = os.path.basename(urllib.parse.urlparse(url).path) or "download.txt"
        tag = hashlib.sha256(url.encode()).hexdigest()[:8]  # two URLs ending in input.txt differ
        ext = os.path.splitext(file_name)[1] or ".txt"
        local = os.path.join(cfg.out_dir, "downloads", f"{_stem(file_name)}-{tag}{ext}")
        name = _stem(file_name)
    # cached: a second run, or --force, reads the same bytes without the network. The size and
    # sha256 of a named dataset catch a wrong mirror; a URL has only its Content-Length.
    if not os.path.exists(local):
        download(url, local, expected_bytes=spec.get("bytes"), sha256=spec.get("sha256"),
                 max_bytes=int(cfg.max_download_mb * 1e6) or None)
    return _file_source(cfg.name or name, cfg.dataset, local)


def _check_url_scheme(url: str, asked: str = None) -> None:
    """Only http:// and https://: urllib would also read file:// (any local file) and ftp://."""
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme not in ("http", "https"):
        via = f" (redirected from {asked})" if asked else ""
        raise ValueError(f"{url}{via} uses {f'{scheme}://' if scheme else 'no scheme'}, but only "
                         f"http:// and https:// are downloaded; pass an http(s) URL or a plain "
                         f"local path.")


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    # subtle: urllib's own handler follows a redirect to ftp:// too; refuse it before connecting
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _check_url_scheme(newurl, req.full_url)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(url: str, path: str, expected_bytes: int = None, sha256: str = None,
             timeout: float = 60.0, max_bytes: int = None) -> str:
    """Stream url to path through tokenizer.atomic_write's temporary file; check the length
    (Content-Length and expected_bytes) and sha256 before the rename, so a cut connection leaves
    nothing behind. max_bytes (None = no cap) refuses a bigger file, by its Content-Length before
    reading and by the bytes received while reading (a chunked or close-delimited response has
    no length; one that understates it is cut there by http.client, and caught as truncated)."""
    _check_url_scheme(url)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    print(f"downloading {url} -> {path}")
    # subtle: atomic_write's temporary is path + ".tmp", one name for every process; two runs
    # downloading the same file into the same out_dir at once would write into one temporary
    t0 = time.time()
    try:
        atomic_write(path, lambda tmp: _fetch(url, tmp, path, expected_bytes, sha256, timeout,
                                              max_bytes))
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"download of {url} failed with HTTP {e.code} {e.reason}; check the URL "
                           f"or pass --base_url=MIRROR.") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", None) or e.__class__.__name__
        raise RuntimeError(f"download of {url} failed ({reason}); check the network, or put the "
                           f"file at {path} yourself.") from None
    print(f"downloaded {os.path.getsize(path) / 1e6:.1f} MB in {time.time() - t0:.1f}s")
    return path


def _fetch(url: str, tmp: str, path: str, expected_bytes, sha256, timeout, max_bytes) -> None:
    """download()'s body: stream url into tmp, raising RuntimeError unless every check passes."""
    digest, got = hashlib.sha256(), 0  # hashed in flight, so the file is never read twice
    cap = f"the --max_download_mb={max_bytes / 1e6:g} cap" if max_bytes else ""
    opener = urllib.request.build_opener(_HTTPOnlyRedirects)
    with opener.open(url, timeout=timeout) as response, open(tmp, "wb") as f:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if max_bytes and total is not None and total > max_bytes:
            raise RuntimeError(f"download of {url} is {total:,} bytes (Content-Length), over "
                               f"{cap}; raise it (0 = no cap) or fetch the file yourself "
                               f"into {path}.")
        while True:
            # subtle: when the server closes early, http.client returns b"" (or raises
            # IncompleteRead) instead of data; only the byte count below tells them apart.
            chunk = response.read(1 << 20)
            if not chunk:
                break
            if max_bytes and got + len(chunk) > max_bytes:
                raise RuntimeError(f"download of {url} sent more than {cap} allows; raise it "
                                   f"(0 = no cap) or fetch the file yourself into {path}.")
            f.write(chunk)
            digest.update(chunk)
            got += len(chunk)
    if total is not None and got != total:
        raise RuntimeError(f"download of {url} was truncated: got {got} of {total} bytes; run "
                           f"again (or fetch the file yourself into {path}).")
    if expected_bytes is not None and got != expected_bytes:
        raise RuntimeError(f"download of {url} gave {got} bytes, expected {expected_bytes}; "
                           f"the file or mirror is wrong, check --base_url.")
    if sha256 is not None and digest.hexdigest() != sha256:
        raise RuntimeError(f"download of {url} has sha256 {digest.hexdigest()[:16]}..., not the "
                           f"known {sha256[:16]}...; the file or mirror is wrong, check "
                           f"--base_url.")


# -----------------------------------------------------------------------------
# Reading: files -> raw documents, streamed (what counts as a text file: tokenizer.py)


def _count_replaced(n_replaced: int, stats: dict) -> None:
    """Count a document whose invalid UTF-8 decode_text replaced, and how many replacements."""
    if n_replaced:  # kept, with U+FFFD for each bad sequence, but counted and reported
        stats["invalid_utf8_documents"] += 1
        stats["replacement_chars"] += n_replaced


def _safe_cut(raw: bytes, pos: int) -> int:
    """The last offset <= pos just after a newline that is followed by a printable ASCII
    character, or -1. Cutting there splits neither a UTF-8 sequence, a \\r\\n pair, nor a
    pre-tokenizer chunk of the gpt2/gpt4 patterns (their whitespace runs never cross it),
    so blocks tokenize exactly like the whole text would. (With a custom regex a cut may
    change a few tokens next to it, to another valid encoding of the same text.)"""
    i = pos
    while True:
        i = raw.rfind(b"\n", 0, i)
        if i < 0:
            return -1
        if i + 1 < len(raw) and 0x21 <= raw[i + 1] <= 0x7E:  # "!".."~": not a space, not UTF-8
            return i + 1


def _val_cut(raw: bytes, pos: int, at_start: bool) -> int:
    """Where validation starts inside raw (pos = the ideal offset): the last line start before
    pos, else this block's own start, else (a first block without newlines) a character start.
    Any line start will do here: train and val are separate documents, each encoded whole."""
    cut = raw.rfind(b"\n", 0, pos) + 1
    if cut > 0 or not at_start:
        return cut
    while pos > 0 and (raw[pos] & 0xC0) == 0x80:  # 10xxxxxx is a UTF-8 continuation byte
        pos -= 1
    return pos


def _iter_single_file(path: str, size: int, val_fraction: float, stats: dict):
    """One big document, streamed in ~1 MB blocks: yields (split, text, starts_document).
    Its last val_fraction of bytes, from a line start, is the validation part (as nanoGPT
    splits Tiny Shakespeare); each part starts with one <|endoftext|>."""
    val_at = int(size * (1 - val_fraction))  # the byte offset where val would ideally start
    starts = {"train": True, "val": True}  # each split's first block starts its document
    try:
        f = open(path, "rb")
    except OSError as e:
        raise RuntimeError(f"cannot read {path} ({e.strerror}); check that it exists and is "
                           f"readable.") from None
    with f:
        if is_binary(f.read(SNIFF_BYTES)):
            stats["skipped_binary"] += 1
            return
        f.seek(0)
        # buf: bytes read but not yet yielded; offset: where buf starts in the file; want: how
        # much buf must hold before a cut is looked for (it grows while no safe cut is found)
        buf, offset, split, eof, want = b"", 0, "train", False, BATCH_BYTES
        while buf or not eof:
            if not eof and len(buf) < want:
                data = f.read(BATCH_BYTES)
                eof, buf = not data, buf + data
                continue
            end = len(buf) if eof else _safe_cut(buf, len(buf))
            if end <= 0:
                want = len(buf) + BATCH_BYTES  # no safe boundary in this block yet: read more
                continue
            want, next_split = BATCH_BYTES, split
            # the block crosses the val boundary: end train at a line start before it instead
            if split == "train" and offset + end > val_at:
                end, next_split = _val_cut(buf, val_at - offset, offset == 0), "val"
            if end:
                stats["bytes_in"] += end
                text, n_replaced = decode_text(buf[:end])
                _count_replaced(n_replaced, stats)
                yield split, text, starts[split]
                starts[split] = False
            buf, offset, split = buf[end:], offset + end, next_split


def iter_raw_documents(source: _Source, stats: dict):
    """Yield (document id, raw text) for every readable text document, in sorted path order.
    Files are read as bytes and decoded (the same as open(newline=""): no \\r translation).
    A .jsonl file gives one document per line (its "text" field), streamed line by line;
    binary or unreadable files are skipped and counted."""
    for rel, _, _ in source.files:
        path = os.path.join(source.root, rel)
        try:
            if rel.endswith(".jsonl"):
                yield from _iter_jsonl(path, rel, stats)
                continue
            text, n_bytes, n_replaced = read_text_file(path)
        except OSError as e:  # deleted, or made unreadable, since the listing: say so, go on
            stats["skipped_unreadable"] += 1
            print(f"warning: skipping unreadable {path} ({e.strerror})")
            continue
        if text is None:
            stats["skipped_binary"] += 1
            continue
        stats["bytes_in"] += n_bytes
        _count_replaced(n_replaced, stats)
        yield rel, text


def _iter_jsonl(path: str, rel: str, stats: dict):
    """Yield ("rel:line number", text) for each line of a .jsonl file with a string "text".
    Streamed line by line: a .jsonl corpus may be far bigger than the memory."""
    with open(path, "rb") as f:
        if is_binary(f.read(SNIFF_BYTES)):
            stats["skipped_binary"] += 1
            return
        f.seek(0)
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]  # bytes in: invalid UTF-8 raises a ValueError
                if not isinstance(text, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                stats["skipped_bad_jsonl"] += 1
                continue
            try:
                stats["bytes_in"] += len(text.encode("utf-8"))
            # subtle: JSON may escape a lone surrogate ("\ud800"), which UTF-8 cannot encode
            except UnicodeEncodeError:
                text = text.encode("utf-8", "replace").decode("utf-8")
                stats["invalid_utf8_documents"] += 1
                stats["bytes_in"] += len(text.encode("utf-8"))
            yield f"{rel}:{lineno}", text


# -----------------------------------------------------------------------------
# Cleaning: small steps, each counted

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Unicode Cc minus \t (09) and \n (0a)
# typographic punctuation -> its ASCII look-alike, one character (or "...") each
_PUNCT = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                        "\u2013": "-", "\u2014": "-", "\u2026": "...",
                        "\u00a0": " ", "\u202f": " ", "\u2009": " "})


def normalize_newlines(text: str, stats: dict) -> str:
    """\\r\\n and lone \\r become \\n. One line-ending convention means the model never spends
    capacity (or vocabulary) on Windows/old-Mac endings; the stdlib has only a couple of them."""
    if "\r" not in text:
        return text
    stats["cr_normalized_documents"] += 1
    return text.replace("\r\n", "\n").replace("\r", "\n")


def remove_control_chars(text: str, stats: dict) -> str:
    """Drop C0/C1 control characters except \\n and \\t (and a leading byte-order mark): they
    are invisible, mostly come from broken conversions, and would otherwise get merges."""
    if text.startswith("\ufeff"):
        text = text[1:]
        stats["control_chars_removed"] += 1
    text, n = _CONTROL.subn("", text)
    stats["control_chars_removed"] += n
    return text


def normalize_punctuation(text: str) -> str:
    """Optional: typographic quotes, dashes, ellipses and no-break spaces -> ASCII. Off by
    default: it saves a few merges on prose, but it rewrites the text the model learns from."""
    return text.translate(_PUNCT)


def normalize_case(text: str) -> str:
    """Optional lowercasing. Off by default: case is information (names, sentence starts,
    and in code Foo vs foo are different identifiers); lowercasing dates from word-count
    models where sparse statistics mattered, a BPE pays only a few merges for both cases."""
    return text.lower()


def clean_text(text: str, cfg: PrepareConfig, stats: dict) -> str:
    """The per-document cleaning pipeline, in order: newlines, NFC, control characters,
    then the optional punctuation and case normalizations."""
    # subtle: newlines first; "\r" is a control character, so removing those first would
    # delete an old-Mac line end and join its two lines
    text = normalize_newlines(text, stats)
    # NFC (composed) form, so "é" is one code point whether typed as e+U+0301 or U+00E9 and
    # the tokenizer sees one spelling; NFC, not NFKC, so that "²" or "ﬁ" keep their meaning.
    text = unicodedata.normalize("NFC", text)
    text = remove_control_chars(text, stats)
    if cfg.normalize_punct:
        text = normalize_punctuation(text)
    if cfg.lowercase:
        text = normalize_case(text)
    return text


def _hash64(data) -> int:
    """64-bit blake2b of a str (as UTF-8) or bytes. A false duplicate among n documents has
    probability about n**2 / 2**65 (the birthday bound): 3% at a billion documents, 3e-8 at a
    million. Keeping hashes, not texts, is what lets dedup run in flat memory."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def dedup_lines(text: str, seen: set, stats: dict) -> str:
    """Drop every non-blank line already seen in an earlier document (CCNet, Wenzek et al.
    2019, removes repeated boilerplate this way). Off by default: in code, lines such as
    "    return None" repeat legitimately and removing them breaks the program."""
    out = []
    for line in text.split("\n"):
        key = line.strip()  # indentation aside, the same line is the same boilerplate
        if key:
            line_hash = _hash64(key)
            if line_hash in seen:
                stats["lines_deduplicated"] += 1
                continue
            seen.add(line_hash)
        out.append(line)
    return "\n".join(out)


def _in_val(doc_id: str, val_fraction: float) -> bool:
    # a hash of the path, not a random draw: the same file always lands in the same split, even
    # when files are added or the order changes, so val never leaks into a later train set.
    return _hash64(doc_id) / 2**64 < val_fraction


def new_stats() -> dict:
    """The cleaning counts, all 0; meta.json keeps them and prepare() prints the non-zero ones."""
    keys = ("documents_in", "documents_kept", "dropped_short", "dropped_duplicate",
            "skipped_binary", "skipped_unreadable", "skipped_bad_jsonl", "invalid_utf8_documents",
            "replacement_chars", "cr_normalized_documents", "control_chars_removed",
            "lines_deduplicated", "bytes_in", "bytes_out")
    return dict.fromkeys(keys, 0)


def iter_documents(source: _Source, cfg: PrepareConfig, stats: dict):
    """Yield (split, cleaned text, starts_document, its UTF-8 bytes) for the corpus, in a fixed
    order.

    Many documents: read, clean, drop short ones and exact duplicates, optionally dedup lines,
    and send each to val when a hash of its path falls below val_fraction (5% by default: for
    the stdlib far more text than an eval reads, while 95% stays for training; README has the
    counts). When that leaves a split empty, prepare() moves one document (source.moved,
    plan_split_move). One document (Tiny Shakespeare): streamed in blocks, its tail is val.
    """
    seen_lines = set()  # 64-bit hashes of the lines kept
    if source.single:
        rel, size, _ = source.files[0]
        stats["documents_in"] = 1
        path = os.path.join(source.root, rel)
        for split, raw, starts in _iter_single_file(path, size, cfg.val_fraction, stats):
            text = clean_text(raw, cfg, stats)
            if cfg.dedup_lines:
                text = dedup_lines(text, seen_lines, stats)
            if text.strip():
                stats["documents_kept"] = 1
            nbytes = len(text.encode("utf-8"))
            stats["bytes_out"] += nbytes
            yield split, text, starts, nbytes
        # counted per block above, but it is one document
        stats["invalid_utf8_documents"] = min(stats["invalid_utf8_documents"], 1)
        return
    for doc_id, text, nbytes in _iter_kept_documents(source, cfg, stats):
        split = "val" if _in_val(doc_id, cfg.val_fraction) else "train"
        yield source.moved.get(doc_id, split), text, True, nbytes


def _iter_kept_documents(source: _Source, cfg: PrepareConfig, stats: dict):
    """Yield (document id, cleaned text, its UTF-8 bytes) for every document the filters keep."""
    seen_docs, seen_lines = set(), set()  # 64-bit hashes, not texts: flat memory
    for doc_id, raw in iter_raw_documents(source, stats):
        stats["documents_in"] += 1
        # cleaned before the duplicate check, so copies that differ only in \r\n vs \n, a BOM
        # or the Unicode normal form count as the duplicates they are
        text = clean_text(raw, cfg, stats)
        if len(text.strip()) < cfg.min_chars:
            stats["dropped_short"] += 1
            continue
        data = text.encode("utf-8")
        if cfg.dedup:  # exact dedup after cleaning, as Gopher does (Rae et al. 2021, App. A)
            doc_hash = _hash64(data)
            if doc_hash in seen_docs:
                stats["dropped_duplicate"] += 1
                continue
            seen_docs.add(doc_hash)
        if cfg.dedup_lines:
            text = dedup_lines(text, seen_lines, stats)
            if len(text.strip()) < cfg.min_chars:
                stats["dropped_short"] += 1
                continue
            data = text.encode("utf-8")
        stats["documents_kept"] += 1
        nbytes = len(data)
        stats["bytes_out"] += nbytes
        yield doc_id, text, nbytes
        # checked after the yield: --max_docs=N keeps exactly N, counted after the filters
        if cfg.max_docs and stats["documents_kept"] >= cfg.max_docs:
            return


def plan_split_move(source: _Source, cfg: PrepareConfig) -> dict:
    """{document id: split} for the one document to move when the hash rule leaves a split
    empty, or {} when it does not (or fewer than two documents are kept).

    33 documents at val_fraction 0.05 get no val document with probability 0.95**33 = 18%.
    Then the train document whose hash lies closest above the threshold goes to val (or, with
    every document in val, the one closest below goes to train): the choice depends only on
    the kept documents, and it is the one a slightly different val_fraction would move first."""
    lowest_train = highest_val = None  # (hash, document id); the id breaks (unlikely) ties
    kept = 0
    for doc_id, _, _ in _iter_kept_documents(source, cfg, new_stats()):
        kept += 1
        key = (_hash64(doc_id), doc_id)
        if _in_val(doc_id, cfg.val_fraction):
            highest_val = max(highest_val or key, key)
        else:
            lowest_train = min(lowest_train or key, key)
    if kept < 2 or (lowest_train and highest_val):
        return {}  # one document cannot fill two splits; two non-empty splits need no move
    return {lowest_train[1]: "val"} if lowest_train else {highest_val[1]: "train"}


# -----------------------------------------------------------------------------
# Tokenizer: train on the train split, or load one


def _tokenizer_identity(cfg: PrepareConfig) -> dict:
    """What the fingerprint knows of the tokenizer: its name, its file's hash, or the trainer."""
    if cfg.tokenizer in TIKTOKEN_NAMES:
        return {"tiktoken": cfg.tokenizer}
    if cfg.tokenizer:
        if not os.path.isfile(cfg.tokenizer):
            raise FileNotFoundError(f"tokenizer file {cfg.tokenizer} does not exist; pass a file "
                                    f"saved by tokenizer.py, one of {', '.join(TIKTOKEN_NAMES)}, "
                                    f"or nothing to train one.")
        return {"file_sha256": file_sha256(cfg.tokenizer)}
    # subtle: the trainer's own source is hashed, so editing tokenizer.py (even a comment)
    # rebuilds the data: a changed trainer may learn other merges, hence other tokens
    return {"train": {"vocab_size": cfg.vocab_size, "pattern": cfg.pattern,
                      "max_bytes": cfg.tokenizer_max_bytes,
                      "tokenizer_py_sha256": file_sha256(tokenizer_module.__file__)}}


def build_tokenizer(source: _Source, cfg: PrepareConfig):
    """Load the tokenizer cfg names, or train a BPE on the cleaned train split (first pass)."""
    if cfg.tokenizer in TIKTOKEN_NAMES:
        return Tokenizer.from_tiktoken(cfg.tokenizer)
    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    # pass 1 reads the corpus the way pass 2 will (same cleaning, same split), so the BPE learns
    # from exactly the train text it will encode; its own counts are thrown away
    budget, stats = {"bytes": 0}, new_stats()

    # At most tokenizer_max_bytes: the frequent merges settle long before a huge corpus is
    # read, and training memory grows with the number of distinct chunks it has seen.
    def train_texts():
        for split, text, _, nbytes in iter_documents(source, cfg, stats):
            if split != "train":
                continue  # subtle: training on val text would make val loss look better than it is
            budget["bytes"] += nbytes
            yield text
            if budget["bytes"] >= cfg.tokenizer_max_bytes:
                return
        budget["read_all"] = True

    t0 = time.time()
    try:
        tok = Tokenizer.train(train_texts(), cfg.vocab_size, pattern=cfg.pattern)
    except ValueError:
        if budget.get("read_all") and stats["documents_kept"] == 0:  # say why the corpus is empty
            raise ValueError(_nothing_left(source.label, stats)) from None
        raise
    print(f"trained BPE vocab {tok.n_vocab} on {budget['bytes'] / 1e6:.1f} MB of the train split "
          f"in {time.time() - t0:.1f}s")
    return tok


def choose_dtype(n_vocab: int, asked: str):
    """uint16 holds ids 0..65535: enough for GPT-2's 50257 but not for cl100k's 100277.
    Half the bytes of uint32 means half the disk, page cache and read bandwidth per token."""
    if asked not in ("auto", "uint16", "uint32"):
        raise ValueError(f"--dtype={asked} is not one of auto, uint16, uint32.")
    if asked == "uint16" and n_vocab > 2**16:
        raise ValueError(f"the tokenizer has {n_vocab} ids, too many for --dtype=uint16 (at most "
                         f"65536); use --dtype=uint32 or auto.")
    if asked == "auto":
        return np.uint16 if n_vocab <= 2**16 else np.uint32
    return np.uint16 if asked == "uint16" else np.uint32


# -----------------------------------------------------------------------------
# Tokenize and write: bounded batches to worker processes (or threads), shards in order

# per-process state: "tok" and "eot", set by _worker_init in each worker process, or by
# _start_encoders for threads; _encode_batch is top-level so that it pickles by name
_WORKER = {}


def _worker_init(tokenizer_path: str) -> None:
    # each worker process loads the saved file itself: only a path crosses the process
    # boundary, and it works under "spawn" (macOS, Windows) as it does under "fork"
    tok = Tokenizer.load(tokenizer_path)
    _WORKER.update(tok=tok, eot=tok.eot_id)


def _encode_batch(texts: list, starts: list) -> np.ndarray:
    """[eot] + encode(text) for every document start, concatenated into one uint32 array."""
    tok, eot = _WORKER["tok"], _WORKER["eot"]
    ids = []
    for text, start in zip(texts, starts):
        if start:  # llm.c's convention: <|endoftext|> opens every document
            ids.append(eot)
        ids.extend(tok.encode(text))
    # array("I") converts a list of ints several times faster than np.array does (measured)
    return np.frombuffer(array.array("I", ids), dtype=np.uint32)


def _start_encoders(cfg: PrepareConfig, tok, folder: str, workers: int) -> tuple:
    """-> (pool, submit(texts, starts) -> job, wait(job) -> tokens), on processes or threads.

    Processes scale with the cores whatever the GIL does, but pay a start-up and the pickling
    of every batch and result; threads share one tokenizer. README.md has both measured.
    """
    if cfg.backend == "processes" and workers > 1:
        tokenizer_path = os.path.join(folder, "tokenizer.bpe")
        pool = multiprocessing.get_context().Pool(workers, _worker_init, (tokenizer_path,))
        return (pool, lambda texts, starts: pool.apply_async(_encode_batch, (texts, starts)),
                lambda job: job.get())
    _WORKER.update(tok=tok, eot=tok.eot_id)  # threads work too: tiktoken releases the GIL
    pool = ThreadPoolExecutor(workers)
    return (pool, lambda texts, starts: pool.submit(_encode_batch, texts, starts),
            lambda job: job.result())


def tokenize_and_write(source: _Source, cfg: PrepareConfig, tok, folder: str, dtype) -> tuple:
    """Second pass: stream documents, tokenize them in parallel, append tokens to the shards.
    Returns (splits dict for meta.json, cleaning stats)."""
    stats = new_stats()
    writers = {s: _ShardWriter(folder, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    split_info = {s: {"documents": 0, "tokens": 0, "bytes": 0, "shards": []}
                  for s in ("train", "val")}
    # the cores this process may use (a container or taskset can allow fewer than the machine has)
    workers = cfg.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                              else os.cpu_count() or 1)
    pool, submit, wait = _start_encoders(cfg, tok, folder, workers)
    # (split, job) in submission order: results are written in that order, so the shards do not
    # depend on which worker finishes first; at most 2 jobs per worker wait, so memory is flat
    pending = deque()
    total = sum(size for _, size, _ in source.files)
    t0 = last = time.time()
    try:
        batches = {s: ([], [], 0) for s in ("train", "val")}  # texts, starts flags, characters
        for split, text, starts, nbytes in iter_documents(source, cfg, stats):
            info = split_info[split]
            # a document counts once, at its start (a single text arrives in many blocks)
            info["documents"] += starts
            info["bytes"] += nbytes  # exact bytes of the text tokenized: bits per byte needs them
            # one batch per split: a batch's tokens all go to one split's shards
            texts, flags, size = batches[split]
            texts.append(text)
            flags.append(starts)
            size += len(text)
            batches[split] = (texts, flags, size)
            if size >= BATCH_BYTES:
                pending.append((split, submit(texts, flags)))
                batches[split] = ([], [], 0)
                # backpressure: write the oldest results before submitting more
                while len(pending) > 2 * workers:
                    split_done, job = pending.popleft()
                    writers[split_done].add(wait(job))
            if time.time() - last > 2:
                last = time.time()
                _print_progress(stats["bytes_in"], total, last - t0)
        for split, (texts, flags, _) in batches.items():
            if texts:
                pending.append((split, submit(texts, flags)))
        while pending:
            split_done, job = pending.popleft()
            writers[split_done].add(wait(job))
    # on any error or ^C: stop the workers (terminate: their queued batches are moot), close
    # the files; prepare() then removes the whole temporary folder
    finally:
        if isinstance(pool, ThreadPoolExecutor):
            pool.shutdown(cancel_futures=True)
        else:
            pool.terminate()
            pool.join()
        for writer in writers.values():
            writer.close()
    for split, writer in writers.items():
        split_info[split]["tokens"] = writer.total
        split_info[split]["shards"] = writer.files
    seconds, mb = time.time() - t0, stats["bytes_out"] / 1e6
    print(f"tokenize+write: {mb:.1f} MB in {seconds:.1f}s = {mb / max(seconds, 1e-9):.1f} MB/s "
          f"({cfg.backend if workers > 1 else 'threads'}, {workers} workers)")
    return split_info, stats


def _print_progress(done: int, total: int, seconds: float) -> None:
    """One progress line every 2 seconds: a multi-GB corpus takes minutes, silence looks hung."""
    eta = (total - done) / max(done / seconds, 1e-9)  # at the rate so far
    print(f"  tokenized {done / 1e6:.1f}/{total / 1e6:.1f} MB, {done / 1e6 / seconds:.1f} MB/s, "
          f"ETA {eta:.0f}s", flush=True)


# -----------------------------------------------------------------------------
# The whole stage: fingerprint, reuse or rebuild in a temporary folder, then swap it in


def fingerprint(source: _Source, cfg: PrepareConfig) -> str:
    """sha256 of everything the output depends on: the input files (path, size, mtime),
    the options that change tokens, and the tokenizer (its file hash, or the trainer's source).

    Inputs by size and mtime, as make and rsync judge them: hashing every input would cost as
    much as reading it, and the point is to answer "up to date" in a moment. PREPARE_FORMAT
    covers a change to this file's own rules.
    """
    skip = ("out_dir", "name", "force", "workers", "backend", "base_url",  # same tokens either way
            "max_download_mb",  # a download that succeeds gives the same bytes under any cap
            # covered by _tokenizer_identity instead:
            "tokenizer", "vocab_size", "pattern", "tokenizer_max_bytes")
    options = {k: v for k, v in asdict(cfg).items() if k not in skip}
    blob = json.dumps({"format": PREPARE_FORMAT, "label": source.label, "files": source.files,
                       "single": source.single, "options": options,
                       "tokenizer": _tokenizer_identity(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _is_complete(folder: str, digest: str) -> bool:
    """True when folder holds a finished dataset with this fingerprint and intact files."""
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        if meta.get("fingerprint") != digest:
            return False
        if file_sha256(os.path.join(folder, meta["tokenizer_file"])) != meta["tokenizer_sha256"]:
            return False
        for info in meta["splits"].values():  # open_shard checks each header against its size
            shards = [open_shard(os.path.join(folder, s)) for s in info["shards"]]
            if sum(len(tokens) for tokens in shards) != info["tokens"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):  # missing, damaged or foreign: rebuild
        return False


# the only names prepare.py writes into out_dir/NAME: anything else there is the user's
_OUR_FILES = re.compile(r"^((train|val)_\d{3,}\.bin|tokenizer\.bpe|meta\.json)$")


def _check_replaceable(folder: str, label: str, force: bool) -> None:
    """Refuse to replace a folder that holds something else: another dataset (without
    --force), or files prepare.py did not write (never deleted, even with --force)."""
    if not os.path.exists(folder):
        return
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} exists and is not a folder; remove it or pass --name=OTHER.")
    foreign = [n for n in os.listdir(folder) if not _OUR_FILES.match(n)]
    if foreign:
        raise ValueError(f"{folder} holds files prepare.py did not write ({foreign[0]}, ...); "
                         f"pass --out_dir or --name to write elsewhere.")
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            other = json.load(f).get("dataset")
    except (OSError, ValueError, AttributeError):
        return
    if other != label and not force:
        raise ValueError(f"{folder} holds dataset {other!r}, not {label!r}; pass --name=OTHER to "
                         f"keep both or --force to replace it.")


def _validate(cfg: PrepareConfig) -> None:
    """Reject bad options before any download or training, with the option's name."""
    if not 0 <= cfg.val_fraction < 1:
        raise ValueError(f"--val_fraction={cfg.val_fraction} must lie in [0, 1) "
                         f"(e.g. 0.05; 0 = the dataset's default).")
    if not 1 <= cfg.shard_tokens <= 2**31 - 1:
        raise ValueError(f"--shard_tokens={cfg.shard_tokens} must lie in [1, 2**31 - 1] (an int32 "
                         f"header count).")
    if not cfg.max_download_mb >= 0:  # subtle: written so that nan fails too
        raise ValueError(f"--max_download_mb={cfg.max_download_mb} must be >= 0 (0 = no cap).")
    if cfg.backend not in ("processes", "threads"):
        raise ValueError(f"--backend={cfg.backend} is not one of processes, threads.")
    # choose_dtype checks this too, but only after the tokenizer is trained: minutes later
    if cfg.dtype not in ("auto", "uint16", "uint32"):
        raise ValueError(f"--dtype={cfg.dtype} is not one of auto, uint16, uint32.")
    # a name is one folder inside out_dir, never a path out of it or the downloads cache
    if cfg.name and (cfg.name.startswith(".") or "/" in cfg.name or os.sep in cfg.name
                     or cfg.name == "downloads"):
        raise ValueError(f"--name={cfg.name} must be a plain folder name (no path, no leading "
                         f"dot, not downloads).")
    if cfg.workers < 0 or cfg.min_chars < 0 or cfg.max_docs < 0 or cfg.tokenizer_max_bytes < 1:
        raise ValueError("--workers, --min_chars and --max_docs must be >= 0 and "
                         "--tokenizer_max_bytes >= 1.")


def _tokenize_into(source: _Source, cfg: PrepareConfig, folder: str) -> tuple:
    """Train (or load) the tokenizer, save it in folder, write the shards there.
    Returns (tokenizer, token dtype, splits dict, cleaning stats)."""
    tok = build_tokenizer(source, cfg)
    dtype = choose_dtype(tok.n_vocab, cfg.dtype)
    tok.save(os.path.join(folder, "tokenizer.bpe"))
    return (tok, dtype) + tokenize_and_write(source, cfg, tok, folder, dtype)


def _build(source: _Source, cfg: PrepareConfig, tmp: str) -> tuple:
    """Everything of out_dir/NAME, written into tmp: tokenizer, shards, then meta.json."""
    tok, dtype, splits, stats = _tokenize_into(source, cfg, tmp)
    empty = not source.single and not all(i["documents"] for i in splits.values())
    move = plan_split_move(source, cfg) if empty else {}
    if move:
        # Rare (a small corpus), so it costs one more pass rather than a lookahead on every
        # run; rebuilt from scratch so that a trained tokenizer never saw the new val document.
        (doc_id, split), = move.items()
        other = "train" if split == "val" else "val"
        print(f"the path hash put all {stats['documents_kept']} documents in {other} "
              f"(val_fraction {cfg.val_fraction}); moved {doc_id}, the one closest to the "
              f"threshold, to {split} so that neither split is empty")
        source = replace(source, moved=move)
        shutil.rmtree(tmp)
        os.makedirs(tmp)
        tok, dtype, splits, stats = _tokenize_into(source, cfg, tmp)
    if stats["documents_kept"] == 0:
        raise ValueError(_nothing_left(source.label, stats))
    for s in ("train", "val"):  # train.py needs both: it trains on one and evaluates on the other
        if splits[s]["tokens"] == 0:
            raise ValueError(f"the {s} split of {source.label} is empty "
                             f"({splits['train']['documents']} train, "
                             f"{splits['val']['documents']} val documents); adjust "
                             f"--val_fraction or add documents.")
    return tok, dtype, splits, stats


def _write_meta(folder: str, meta: dict) -> None:
    """meta.json, the file train.py reads first: written last, so its presence means done."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)

    atomic_write(os.path.join(folder, "meta.json"), write)  # fsynced before the folder swap


def prepare(cfg: PrepareConfig) -> str:
    """Build (or reuse) out_dir/NAME and return its path."""
    _validate(cfg)
    # 0 means "the dataset's own default", resolved now so meta.json records the real value
    if cfg.val_fraction == 0:
        cfg = replace(cfg, val_fraction=DATASETS.get(cfg.dataset, {}).get("val_fraction", 0.05))
    source = resolve_source(cfg)
    folder = os.path.join(cfg.out_dir, source.name)
    digest = fingerprint(source, cfg)
    if not cfg.force and _is_complete(folder, digest):
        print(f"{folder} is up to date (fingerprint {digest[:12]}); pass --force to rebuild.")
        return folder
    _check_replaceable(folder, source.label, cfg.force)  # before minutes of work, not after them
    print(f"preparing {source.label}: {len(source.files)} files, "
          f"{sum(s for _, s, _ in source.files) / 1e6:.1f} MB -> {folder}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    # Everything is built in a hidden sibling folder and swapped in at the end: a run that is
    # interrupted leaves no meta.json in folder that a later run (or train.py) could trust.
    # (A folder rename, not tokenizer.atomic_write: the whole dataset changes at once.)
    # Per-process names, so two runs into one out_dir never build in the same folder.
    tmp = os.path.join(cfg.out_dir, f".{source.name}.tmp-{os.getpid()}")
    old = os.path.join(cfg.out_dir, f".{source.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # subtle: a dead run's leftover whose pid came back
    os.makedirs(tmp)
    try:
        tok, dtype, splits, stats = _build(source, cfg, tmp)
        _write_meta(tmp, {"dataset": source.label, "fingerprint": digest,
                          "tokenizer_file": "tokenizer.bpe",
                          "tokenizer_sha256": file_sha256(os.path.join(tmp, "tokenizer.bpe")),
                          "vocab_size": tok.n_vocab, "eot_id": tok.eot_id,
                          "dtype": np.dtype(dtype).name, "splits": splits, "cleaning": stats,
                          "config": asdict(cfg)})
        # Two renames: the old dataset steps aside, the new one takes its name. A directory
        # cannot replace a non-empty one in one rename, hence the finally below.
        if os.path.exists(folder):
            os.rename(folder, old)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(old) and not os.path.exists(folder):
            os.rename(old, folder)  # the swap failed half-way: put the previous dataset back
        shutil.rmtree(old, ignore_errors=True)
    _report(source.label, stats, splits)
    print(f"wrote {folder} (vocab {tok.n_vocab}, {np.dtype(dtype).name})")
    return folder


def _report(label: str, stats: dict, splits: dict) -> None:
    """The end-of-run summary: cleaning counts, warnings, and per split its size and shards."""
    print(f"cleaning: {_summary(stats)}")
    # kept going, but say so: input the user may not know is damaged (counts are in meta.json)
    if stats["invalid_utf8_documents"]:
        print(f"warning: {stats['invalid_utf8_documents']} documents of {label} are not valid "
              f"UTF-8; their bad bytes became U+FFFD (re-encode them, e.g. iconv -f latin1 -t "
              f"UTF-8, if that is wrong)", file=sys.stderr)
    if stats["skipped_bad_jsonl"]:
        print(f"warning: skipped {stats['skipped_bad_jsonl']} lines of {label} that are not a "
              f'JSON object with a string "text" field', file=sys.stderr)
    for split in ("train", "val"):
        info = splits[split]
        # bytes per token without the <|endoftext|> that opens each document
        per_token = info["bytes"] / max(info["tokens"] - info["documents"], 1)
        print(f"{split}: {info['documents']} documents, {info['tokens']:,} tokens, "
              f"{info['bytes']:,} bytes ({per_token:.2f} bytes/token), shards "
              f"{', '.join(info['shards'])}")


def _summary(stats: dict) -> str:
    """"documents_in 1,790, documents_kept 1,723, ...": the counts that are not zero."""
    return ", ".join(f"{k} {v:,}" for k, v in stats.items()
                     if v or k in ("documents_in", "documents_kept"))


def _nothing_left(label: str, stats: dict) -> str:
    """The one sentence for a corpus with no usable text, with the fix for its likeliest cause."""
    if stats["skipped_binary"]:  # the likeliest cause first: nothing could be read at all
        fix = ("its files are binary or not UTF-8 text (UTF-16 reads as binary): convert them, "
               "e.g. iconv -f UTF-16 -t UTF-8")
    elif stats["skipped_bad_jsonl"]:
        fix = 'every .jsonl line must be a JSON object with a string "text" field'
    elif stats["dropped_short"]:
        fix = "every document is shorter than --min_chars: lower it"
    else:
        fix = "the input is empty: give it some text"
    return f"nothing left of {label} after cleaning ({_summary(stats)}); {fix}."


# -----------------------------------------------------------------------------
# Command line


def main(argv=None) -> None:
    """python prepare.py --key=value ...: one sentence and exit 1 on bad input, 130 on ^C."""
    cfg = parse_config(PrepareConfig, argv)
    print("config: " + " ".join(f"--{k}={v}" for k, v in asdict(cfg).items()))
    try:
        prepare(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("prepare.py: interrupted; no output was written (partial files are removed)",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
