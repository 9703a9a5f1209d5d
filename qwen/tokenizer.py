"""The first-generation Qwen tokenizer: byte-level BPE (tiktoken) over `qwen.tiktoken` plus 208 specials.

A dependency-light rewrite of the official `tokenization_qwen.py` (no transformers import). It keeps the
official ids, defaults and method names, so code written against `AutoTokenizer.from_pretrained(
"Qwen/Qwen-7B-Chat", trust_remote_code=True)` keeps working:

    tok = QWenTokenizer()                      # bundled vocabulary
    tok.encode("你好，世界")                    # [108386, 3837, 99489]
    tok.decode([108386])                       # '你好'
    batch = QWenTokenizer(pad_token="<|extra_0|>", padding_side="left")(
        ["hi", "a longer prompt"], padding=True, return_tensors="pt")

BPE runs inside tiktoken; this module only adds NFC normalisation, input chunking (tiktoken's regex engine
overflows on very long whitespace runs), id validation and the Hugging-Face-style conveniences.
See docs/tokenizer.md.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import hashlib
import json
import logging
import operator
import os
import pathlib
import re
import tempfile
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Union

import tiktoken

__all__ = [
    "PAT_STR",
    "ENDOFTEXT",
    "IMSTART",
    "IMEND",
    "EXTRAS",
    "SPECIAL_TOKENS",
    "SPECIAL_START_ID",
    "VOCAB_FILES_NAMES",
    "BUNDLED_VOCAB_SHA256",
    "MAX_CHUNK_CHARS",
    "BatchEncoding",
    "VocabFileError",
    "QWenTokenizer",
    "QwenTokenizer",
    "bundled_vocab_path",
    "load_tiktoken_bpe",
]

logger = logging.getLogger(__name__)

# cl100k's pattern except `\p{N}` (one digit per piece instead of up to three).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS: tuple[str, ...] = tuple(f"<|extra_{i}|>" for i in range(205))
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IMSTART, IMEND) + EXTRAS
# Absolute ids (151643..151850) since the 2023-10 tokenizer; they follow the 151643 BPE ranks.
SPECIAL_START_ID = 151643
VOCAB_FILES_NAMES = {"vocab_file": "qwen.tiktoken"}
BUNDLED_VOCAB_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Texts longer than this are encoded in pieces cut at regex-piece boundaries (see _split_for_tiktoken).
MAX_CHUNK_CHARS = 100_000
# What Hugging Face uses for "no length limit".
VERY_LARGE_INTEGER = int(1e30)

TokenIds = Union[int, Sequence[int], Any]  # also torch tensors and numpy arrays
AllowedSpecial = Union[Literal["all"], Iterable[str], None]
DisallowedSpecial = Union[Literal["all"], Iterable[str]]

# Keyword arguments that Hugging Face loaders/callers pass around and that mean nothing here.
_IGNORED_INIT_KWARGS = frozenset({
    "trust_remote_code", "revision", "use_fast", "cache_dir", "force_download", "local_files_only",
    "token", "use_auth_token", "proxies", "resume_download", "subfolder", "_commit_hash",
    "tokenizer_type", "tokenizer_class", "auto_map", "name_or_path", "clean_up_tokenization_spaces",
    "added_tokens_decoder", "add_prefix_space", "legacy", "chat_template", "split_special_tokens",
    "model_input_names", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token",
    "additional_special_tokens", "extra_special_tokens",
})
_IGNORED_CALL_KWARGS = frozenset({"verbose", "add_special_tokens", "split_special_tokens"})
_IGNORED_DECODE_KWARGS = frozenset({"clean_up_tokenization_spaces", "spaces_between_special_tokens", "verbose"})


# ---------------------------------------------------------------------------------------------------------
# Vocabulary file


class VocabFileError(ValueError):
    """A `.tiktoken` vocabulary file is malformed or corrupted."""


def bundled_vocab_path() -> pathlib.Path:
    """Path of the `qwen.tiktoken` shipped inside the package (see qwen/assets/NOTICE)."""
    return pathlib.Path(__file__).resolve().parent / "assets" / VOCAB_FILES_NAMES["vocab_file"]


def _parse_tiktoken_bpe(data: bytes, source: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    for lineno, line in enumerate(data.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{source}, line {lineno}"
        if len(fields) != 2:
            raise VocabFileError(f"{where}: expected '<base64 token> <rank>', got {line[:80]!r}")
        try:
            token = base64.b64decode(fields[0], validate=True)
            rank = int(fields[1])
        except (binascii.Error, ValueError):
            raise VocabFileError(f"{where}: bad base64 token or rank in {line[:80]!r}") from None
        if not token or rank < 0:
            raise VocabFileError(f"{where}: empty token or negative rank in {line[:80]!r}")
        # Duplicates would silently shadow each other inside tiktoken.
        if token in ranks:
            raise VocabFileError(f"{where}: token {token!r} already has rank {ranks[token]}")
        if rank in seen_ranks:
            raise VocabFileError(f"{where}: rank {rank} is used twice")
        ranks[token] = rank
        seen_ranks.add(rank)
    if not ranks:
        raise VocabFileError(f"{source}: no tokens found")
    return ranks


def load_tiktoken_bpe(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Read a tiktoken vocabulary ("<base64 bytes> <rank>" per line) into a bytes -> rank dict.

    Raises VocabFileError (a ValueError) naming the file and line of the first malformed entry.
    """
    path = pathlib.Path(path)
    return _parse_tiktoken_bpe(path.read_bytes(), str(path))


@functools.lru_cache(maxsize=1)
def _bundled_ranks() -> dict[bytes, int]:
    # Shared by every tokenizer that uses the bundled file; never mutated (extra vocab works on a copy).
    path = bundled_vocab_path()
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != BUNDLED_VOCAB_SHA256:
        raise VocabFileError(
            f"{path} is corrupted: sha256 {digest}, expected {BUNDLED_VOCAB_SHA256}. "
            "Reinstall the package (or restore the file from git)."
        )
    return _parse_tiktoken_bpe(data, str(path))


def _build_encoding(ranks: dict[bytes, int]) -> tiktoken.Encoding:
    specials = {tok: SPECIAL_START_ID + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding("Qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


@functools.lru_cache(maxsize=1)
def _bundled_encoding() -> tiktoken.Encoding:
    return _build_encoding(_bundled_ranks())


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    # A crash mid-save must never leave a truncated vocabulary behind a valid-looking name.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are usually shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ---------------------------------------------------------------------------------------------------------
# Chunking long inputs
#
# tiktoken's regex engine (fancy-regex) backtracks on `\s+(?!\S)` and gives up on horizontal whitespace runs of
# about 1M chars; very long texts also cost memory in one call. So texts over MAX_CHUNK_CHARS are encoded in
# pieces, cut only where the PAT_STR pieces (and therefore the ids) are provably unchanged. Every rule below
# looks at the pair (a, b) = (text[i-1], text[i]) and guarantees that (1) the regex piece covering `a` ends at
# `a` and (2) no alternative tried for it reads past `b`, so end-of-chunk and `b` behave the same; the next
# piece then starts at `b` in both the whole text and the chunk. tests/test_tokenizer.py checks this against
# tiktoken on random strings at every position the rules accept.

# `\s` in the Rust regex is the Unicode White_Space property: str.isspace() minus U+001C..U+001F.
_WS = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(map(chr, range(0x2000, 0x200B))))
_WS_CLASS = "[\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_NON_WS_CLASS = "[^\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_HWS_CLASS = "[\t\x0b\x0c \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_NEWLINES = "\r\n"
# Cheap superset of the safe positions (cut = match end); each hit is re-checked by _is_safe_cut.
_CUT_CANDIDATE = re.compile(
    rf"{_NON_WS_CLASS}(?={_HWS_CLASS})|[\r\n](?={_NON_WS_CLASS})|\d(?=.)|[^\W\d_](?=[\W\d_])|{_NON_WS_CLASS}(?=\d)",
    re.DOTALL,
)
_WS_RUN = re.compile(f"{_WS_CLASS}*")
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS))
_MAX_SPECIAL_LEN = max(map(len, SPECIAL_TOKENS))


def _is_safe_cut(text: str, i: int) -> bool:
    """True if encoding text[:i] and text[i:] separately gives the same regex pieces as encoding text."""
    a, b = text[i - 1], text[i]
    if a in _WS:
        # After a newline the whitespace piece ends there (`\s*[\r\n]+` wins before `\s+(?!\S)`).
        return a in _NEWLINES and b not in _WS
    if b in _WS and b not in _NEWLINES:
        # No alternative both contains a non-space char and continues with a space.
        return True
    cat_a = unicodedata.category(a)
    if cat_a[0] == "N":
        return True  # `\p{N}` is always a one-char piece: nothing before or after can absorb it
    cat_b = unicodedata.category(b)
    if cat_b[0] == "N":
        return True  # nothing that contains a non-space char continues with a digit
    # A letter run ends at a non-letter. b must be assigned in our Unicode tables: tiktoken's may be newer,
    # and `[^\r\n\p{L}\p{N}]?\p{L}+` would glue a letter b to a symbol a, so symbol->letter is never cut.
    return cat_a[0] == "L" and cat_b[0] != "L" and cat_b != "Cn"


def _inside_special(text: str, i: int) -> bool:
    """True if some special-token surface form spans position i (starts before i, ends after it)."""
    p = text.find("<|", max(0, i - _MAX_SPECIAL_LEN + 1), i)
    while p != -1:
        m = _SPECIAL_RE.match(text, p)
        if m is not None and m.end() > i:
            return True
        p = text.find("<|", p + 1, i)
    return False


def _next_safe_cut(text: str, pos: int, limit: int) -> int | None:
    """First safe cut position in [pos, limit), or None."""
    m = _CUT_CANDIDATE.search(text, pos - 1, limit)
    while m is not None:
        i = m.end()
        if i >= limit:
            return None
        if _is_safe_cut(text, i) and not _inside_special(text, i):
            return i
        m = _CUT_CANDIDATE.search(text, m.start() + 1, limit)
    return None


@functools.lru_cache(maxsize=8)
def _long_ws_run_re(max_chars: int) -> re.Pattern[str]:
    # Anchored at the start of a run so the scan stays linear.
    return re.compile(f"(?<!{_WS_CLASS}){_WS_CLASS}{{{max_chars + 1}}}")


def _split_for_tiktoken(text: str, max_chars: int = MAX_CHUNK_CHARS) -> list[str]:
    """Split text into chunks of roughly max_chars whose encodings concatenate to the encoding of text.

    Chunks end at the first safe cut at or after max_chars chars, so a chunk is longer when no safe cut is
    near (e.g. a long run of letters; tiktoken copes with those). The exception is a whitespace run longer
    than max_chars: it has no safe cut inside and would crash tiktoken, so it is cut every max_chars chars,
    and only the ids for that run can differ from a (hypothetical) unchunked encoding.
    """
    n = len(text)
    if n <= max_chars:
        return [text]
    forced: list[int] = []
    for m in _long_ws_run_re(max_chars).finditer(text):
        run_end = _WS_RUN.match(text, m.start()).end()
        forced.extend(range(m.start() + max_chars, run_end, max_chars))
    forced.reverse()  # used as a stack, smallest last

    chunks = []
    start = 0
    while n - start > max_chars:
        pos = start + max_chars
        next_forced = forced[-1] if forced else n
        if next_forced <= pos:
            cut = forced.pop()
        else:
            cut = _next_safe_cut(text, pos, next_forced)
            if cut is None:
                cut = forced.pop() if forced else n
        chunks.append(text[start:cut])
        start = cut
    if start < n:
        chunks.append(text[start:])
    return chunks


# ---------------------------------------------------------------------------------------------------------
# Batch output


class BatchEncoding(dict):
    """The dict returned by `QWenTokenizer.__call__`, with attribute access and `.to(device)`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no field {name!r} (fields: {sorted(self)})") from None

    def to(self, device: Any) -> BatchEncoding:
        """Move every tensor field to `device` (in place; returns self, like Hugging Face)."""
        for key, value in self.items():
            if hasattr(value, "to") and callable(value.to):
                self[key] = value.to(device)
        return self


def _to_id_list(token_ids: TokenIds) -> list[int]:
    if hasattr(token_ids, "tolist"):  # torch tensors, numpy arrays and their scalars
        token_ids = token_ids.tolist()
    if isinstance(token_ids, (list, tuple)):
        try:
            return [operator.index(t) for t in token_ids]
        except TypeError:
            raise TypeError(
                "decode expects a flat sequence of ints; use batch_decode for a batch of sequences"
            ) from None
    return [operator.index(token_ids)]


def _as_token_surface(value: Any) -> str | None:
    # pad_token / eos_token may arrive as str, an HF AddedToken, or its JSON form {"content": ...}.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and "content" in value:
        return value["content"]
    content = getattr(value, "content", None)
    if isinstance(content, str):
        return content
    raise TypeError(f"expected a special-token string such as '<|extra_0|>', got {value!r}")


# ---------------------------------------------------------------------------------------------------------
# The tokenizer


class QWenTokenizer:
    """Qwen (1st generation) tokenizer with the official ids and an HF-compatible surface.

    Args:
        vocab_file: a `qwen.tiktoken` file; None uses the bundled copy (sha256-checked on first load).
        errors: UTF-8 error handler for decode ("replace"; use "ignore" when streaming partial tokens).
        extra_vocab_file: an extra tiktoken file; entries with new bytes and unused ids are added.
        pad_token, eos_token: surface strings of existing specials, e.g. "<|extra_0|>", "<|endoftext|>".
        padding_side, truncation_side: "right" or "left".
        model_max_length: default limit for truncation / padding="max_length" (None: unlimited).
        allow_special_in_text: True (the official behaviour) parses special-token text such as "<|im_end|>"
            inside `encode`/`__call__`/`tokenize` input as control tokens. False makes those methods default to
            `allowed_special=set()`, which is safe for untrusted text (see docs/tokenizer.md).
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    is_fast = False

    def __init__(
        self,
        vocab_file: str | os.PathLike[str] | None = None,
        errors: str = "replace",
        extra_vocab_file: str | os.PathLike[str] | None = None,
        pad_token: Any = None,
        eos_token: Any = None,
        padding_side: str = "right",
        model_max_length: int | None = None,
        *,
        truncation_side: str = "right",
        allow_special_in_text: bool = True,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - _IGNORED_INIT_KWARGS)
        if unknown:
            logger.warning("QWenTokenizer ignores unknown keyword arguments: %s", ", ".join(unknown))
        codecs.lookup_error(errors)  # fail now, not at the first decode
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
        self.errors = errors
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = VERY_LARGE_INTEGER if model_max_length is None else int(model_max_length)
        self.allow_special_in_text = bool(allow_special_in_text)
        self.name_or_path = kwargs.get("name_or_path", "")
        self.vocab_file = None if vocab_file is None else str(vocab_file)
        self.extra_vocab_file = None if extra_vocab_file is None else str(extra_vocab_file)

        self.special_tokens: dict[str, int] = {t: SPECIAL_START_ID + i for i, t in enumerate(SPECIAL_TOKENS)}
        self._id_to_special: dict[int, str] = {i: t for t, i in self.special_tokens.items()}
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IMSTART]
        self.im_end_id = self.special_tokens[IMEND]
        self._load_vocab()

        self._pad_token_id: int | None = None
        self._eos_token_id: int | None = None
        self.pad_token = pad_token
        self.eos_token = eos_token

    # -- construction helpers ------------------------------------------------------------------------------

    def _load_vocab(self) -> None:
        if self.vocab_file is None:
            is_release = True
        else:
            # Checkpoints ship the released file; recognising it lets every tokenizer share one parsed copy.
            data = pathlib.Path(self.vocab_file).read_bytes()
            is_release = hashlib.sha256(data).hexdigest() == BUNDLED_VOCAB_SHA256
        if is_release:
            ranks = _bundled_ranks()
        else:
            ranks = _parse_tiktoken_bpe(data, self.vocab_file)
            clash = sorted(set(ranks.values()) & set(self._id_to_special))
            if clash:
                raise VocabFileError(f"{self.vocab_file}: rank {clash[0]} collides with a special-token id")
        if self.extra_vocab_file is not None:
            ranks = dict(ranks)  # never touch the shared bundled dict
            used_ids = set(ranks.values()) | set(self._id_to_special)
            for token, rank in load_tiktoken_bpe(self.extra_vocab_file).items():
                if token in ranks:
                    logger.info("extra vocab: %r is already in the vocabulary, skipped", token)
                elif rank in used_ids:
                    logger.info("extra vocab: id %d is already used, %r skipped", rank, token)
                else:
                    ranks[token] = rank
                    used_ids.add(rank)
        self.mergeable_ranks: dict[bytes, int] = ranks
        self._shares_release_vocab = is_release and self.extra_vocab_file is None
        self.tokenizer: tiktoken.Encoding = _bundled_encoding() if self._shares_release_vocab else _build_encoding(ranks)
        # Extra vocab may leave holes below n_vocab; those ids must not decode.
        n = self.tokenizer.n_vocab
        self._holes: frozenset[int] = (
            frozenset()
            if len(ranks) + len(self.special_tokens) == n
            else frozenset(range(n)) - set(ranks.values()) - set(self._id_to_special)
        )

    def _special_id(self, token: Any, what: str) -> int | None:
        surface = _as_token_surface(token)
        if surface is None:
            return None
        if surface not in self.special_tokens:
            raise ValueError(
                f"{what} {surface!r} is not a Qwen special token; Qwen cannot add tokens, use an existing one "
                f"such as '<|extra_0|>' or '<|endoftext|>'"
            )
        return self.special_tokens[surface]

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike[str], *init_inputs: Any, **kwargs: Any
    ) -> QWenTokenizer:
        """Load from a checkpoint directory (its `qwen.tiktoken` wins over the bundled copy), a `.tiktoken`
        file, or the name "qwen-demo" (bundled vocabulary). Reads `tokenizer_config.json` when present;
        keyword arguments override it. Nothing is downloaded."""
        if init_inputs:
            raise TypeError("from_pretrained takes the path and keyword arguments only (e.g. pad_token='<|extra_0|>')")
        name = os.fspath(pretrained_model_name_or_path)
        init: dict[str, Any] = {}
        if name != "qwen-demo":
            path = pathlib.Path(name).expanduser()
            if not path.exists():
                raise FileNotFoundError(
                    f"{name!r} is not a local checkpoint directory or .tiktoken file. This tokenizer does not "
                    "download; fetch the checkpoint first (e.g. `huggingface-cli download Qwen/Qwen-7B-Chat "
                    "--local-dir DIR`) or use 'qwen-demo' for the bundled vocabulary."
                )
            if path.is_file():
                init["vocab_file"] = str(path)
            else:
                vocab = path / VOCAB_FILES_NAMES["vocab_file"]
                if vocab.is_file():
                    init["vocab_file"] = str(vocab)
                config_file = path / TOKENIZER_CONFIG_FILE
                if config_file.is_file():
                    init.update(cls._read_tokenizer_config(config_file))
        init.update(kwargs)
        init["name_or_path"] = name
        return cls(**init)

    @staticmethod
    def _read_tokenizer_config(config_file: pathlib.Path) -> dict[str, Any]:
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: invalid JSON ({e})") from None
        keys = ("model_max_length", "padding_side", "truncation_side", "errors", "pad_token", "eos_token",
                "allow_special_in_text")
        return {k: config[k] for k in keys if config.get(k) is not None}

    # -- special tokens and sizes --------------------------------------------------------------------------

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_token_id

    @pad_token_id.setter
    def pad_token_id(self, value: int | None) -> None:
        self._pad_token_id = None if value is None else self._checked_id(value)

    @property
    def pad_token(self) -> str | bytes | None:
        return None if self._pad_token_id is None else self.convert_ids_to_tokens(self._pad_token_id)

    @pad_token.setter
    def pad_token(self, value: Any) -> None:
        self._pad_token_id = self._special_id(value, "pad_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @eos_token_id.setter
    def eos_token_id(self, value: int | None) -> None:
        self._eos_token_id = None if value is None else self._checked_id(value)

    @property
    def eos_token(self) -> str | bytes | None:
        return None if self._eos_token_id is None else self.convert_ids_to_tokens(self._eos_token_id)

    @eos_token.setter
    def eos_token(self, value: Any) -> None:
        self._eos_token_id = self._special_id(value, "eos_token")

    # Qwen has no BOS/UNK; kept for code that probes them.
    bos_token = None
    bos_token_id = None
    unk_token = None
    unk_token_id = None

    @property
    def vocab_size(self) -> int:
        """Largest id + 1: 151851 for the released vocabulary (extra vocab can raise it)."""
        return self.tokenizer.n_vocab

    def __len__(self) -> int:
        return self.tokenizer.n_vocab

    @property
    def all_special_tokens(self) -> list[str]:
        return list(self.special_tokens)

    @property
    def all_special_ids(self) -> list[int]:
        return list(self.special_tokens.values())

    @property
    def special_tokens_map(self) -> dict[str, str | bytes]:
        out: dict[str, str | bytes] = {}
        if self._eos_token_id is not None:
            out["eos_token"] = self.eos_token
        if self._pad_token_id is not None:
            out["pad_token"] = self.pad_token
        return out

    def get_vocab(self) -> dict[bytes, int]:
        """The bytes -> id map of ordinary tokens (no specials), as in the official tokenizer."""
        return self.mergeable_ranks

    @functools.cached_property
    def decoder(self) -> dict[int, bytes | str]:
        """id -> token (bytes for ordinary tokens, str for specials); built on first use."""
        out: dict[int, bytes | str] = {v: k for k, v in self.mergeable_ranks.items()}
        out.update(self._id_to_special)
        return out

    def add_special_tokens(self, special_tokens_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> int:
        """Set pad/eos from existing specials (Qwen cannot grow its vocabulary). Returns 0 tokens added."""
        for key, value in special_tokens_dict.items():
            if key == "pad_token":
                self.pad_token = value
            elif key == "eos_token":
                self.eos_token = value
            elif key in ("additional_special_tokens", "extra_special_tokens"):
                for tok in value:
                    self._special_id(tok, key)
            else:
                raise ValueError(f"cannot set {key!r}: Qwen only supports pad_token and eos_token")
        return 0

    def add_tokens(self, new_tokens: Any, special_tokens: bool = False) -> int:
        """Only existing special tokens are accepted (and nothing is added); use extra_vocab_file instead."""
        tokens = [new_tokens] if isinstance(new_tokens, str) or not isinstance(new_tokens, Iterable) else new_tokens
        for tok in tokens:
            surface = _as_token_surface(tok)
            if not special_tokens or surface not in self.special_tokens:
                raise ValueError(f"cannot add token {surface!r}: the Qwen vocabulary is fixed (see extra_vocab_file)")
        return 0

    # -- encoding ------------------------------------------------------------------------------------------

    def _resolve_allowed(self, allowed_special: AllowedSpecial) -> Literal["all"] | frozenset[str]:
        if allowed_special is None:
            return "all" if self.allow_special_in_text else frozenset()
        if allowed_special == "all":
            return "all"
        if isinstance(allowed_special, str):
            raise TypeError(f"allowed_special must be 'all' or a set of special tokens, got {allowed_special!r}")
        allowed = frozenset(allowed_special)
        self._check_special_names(allowed, "allowed_special")
        return allowed

    def _check_special_names(self, tokens: frozenset[str], what: str) -> None:
        unknown = sorted(tokens - self.special_tokens.keys())
        if unknown:
            raise ValueError(f"{what}: {unknown[0]!r} is not a Qwen special token")

    def encode(
        self,
        text: str,
        allowed_special: AllowedSpecial = None,
        disallowed_special: DisallowedSpecial = (),
        add_special_tokens: bool = True,
        **kwargs: Any,
    ) -> list[int]:
        """Encode text to ids: NFC-normalise, split out allowed specials, regex-split, BPE.

        allowed_special: "all" (the official default, used when None unless the tokenizer was built with
            allow_special_in_text=False, then set()), or a set of special surface strings to parse; any other
            special text is encoded as ordinary text.
        disallowed_special: specials (or "all" = every special not allowed) whose presence raises ValueError.
        add_special_tokens: accepted for HF compatibility; Qwen adds no BOS/EOS.
        """
        self._reject_kwargs(kwargs, _IGNORED_CALL_KWARGS, "encode")
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}; use __call__ for batches")
        allowed = self._resolve_allowed(allowed_special)
        if disallowed_special == "all":
            disallowed: Literal["all"] | frozenset[str] = "all"
        else:
            if isinstance(disallowed_special, str):
                raise TypeError(f"disallowed_special must be 'all' or a set of special tokens, got {disallowed_special!r}")
            disallowed = frozenset(disallowed_special)
            self._check_special_names(disallowed, "disallowed_special")
        text = unicodedata.normalize("NFC", text)
        encode = self.tokenizer.encode
        if len(text) <= MAX_CHUNK_CHARS:
            return encode(text, allowed_special=allowed, disallowed_special=disallowed)
        ids: list[int] = []
        for chunk in _split_for_tiktoken(text, MAX_CHUNK_CHARS):
            ids.extend(encode(chunk, allowed_special=allowed, disallowed_special=disallowed))
        return ids

    def tokenize(
        self,
        text: str,
        allowed_special: AllowedSpecial = None,
        disallowed_special: DisallowedSpecial = (),
        **kwargs: Any,
    ) -> list[bytes | str]:
        """Like encode, but returns tokens: bytes for ordinary tokens, str for specials."""
        ids = self.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special, **kwargs)
        return self._ids_to_tokens(ids)

    def convert_tokens_to_ids(self, tokens: bytes | str | Iterable[bytes | str]) -> int | None | list[int | None]:
        """Specials (str) first, then ordinary tokens (bytes); unknown tokens map to None, as officially."""
        if isinstance(tokens, (str, bytes)):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: bytes | str) -> int | None:
        if isinstance(token, str):
            return self.special_tokens.get(token)
        return self.mergeable_ranks.get(token)

    def convert_ids_to_tokens(self, ids: TokenIds, skip_special_tokens: bool = False) -> bytes | str | list[bytes | str]:
        """id(s) -> token(s): bytes for ordinary ids, str for specials; ValueError on unknown ids."""
        single = not hasattr(ids, "__len__") or (hasattr(ids, "ndim") and ids.ndim == 0)
        id_list = _to_id_list(ids)
        if single:
            return self._ids_to_tokens(id_list)[0]
        if skip_special_tokens:
            id_list = [i for i in id_list if i not in self._id_to_special]
        return self._ids_to_tokens(id_list)

    def _ids_to_tokens(self, ids: list[int]) -> list[bytes | str]:
        self._validate_ids(ids)
        specials = self._id_to_special
        token_bytes = self.tokenizer.decode_single_token_bytes
        return [specials[i] if i in specials else token_bytes(i) for i in ids]

    def convert_tokens_to_string(self, tokens: Iterable[bytes | str]) -> str:
        """Join tokens: runs of bytes are UTF-8-decoded (with self.errors), str tokens are kept verbatim."""
        parts: list[str] = []
        buf = bytearray()
        for token in tokens:
            if isinstance(token, bytes):
                buf += token
            elif isinstance(token, str):
                if buf:
                    parts.append(buf.decode("utf-8", errors=self.errors))
                    buf.clear()
                parts.append(token)
            else:
                raise TypeError(f"token should be bytes or str, got {type(token).__name__}: {token!r}")
        if buf:
            parts.append(buf.decode("utf-8", errors=self.errors))
        return "".join(parts)

    # -- decoding ------------------------------------------------------------------------------------------

    def _checked_id(self, token_id: Any) -> int:
        token_id = operator.index(token_id)
        self._validate_ids([token_id])
        return token_id

    def _validate_ids(self, ids: list[int]) -> None:
        if not ids:
            return
        n = self.tokenizer.n_vocab
        lo, hi = min(ids), max(ids)
        bad = lo if lo < 0 else hi if hi >= n else None
        if bad is None and self._holes:
            bad = next((i for i in ids if i in self._holes), None)
        if bad is not None:
            raise ValueError(
                f"unknown token id {bad}: valid ids are 0..{n - 1}"
                + (" (ids past that are padding rows of the embedding matrix)" if bad >= n else "")
            )

    def decode(
        self,
        token_ids: TokenIds,
        skip_special_tokens: bool = False,
        errors: str | None = None,
        **kwargs: Any,
    ) -> str:
        """ids (int, list, tensor or array) -> text. Specials decode to their surface strings unless
        skip_special_tokens. Invalid UTF-8 is handled by `errors` (default: the tokenizer's, "replace")."""
        self._reject_kwargs(kwargs, _IGNORED_DECODE_KWARGS, "decode")
        ids = token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids
        if not isinstance(ids, (list, tuple)):
            ids = [operator.index(ids)]
        try:
            # Fast path: plain int lists go to tiktoken as they are (a per-element check would triple the cost).
            if skip_special_tokens:
                specials = self._id_to_special
                ids = [i for i in ids if i not in specials]
            self._validate_ids(ids)
            return self.tokenizer.decode(ids, errors=errors or self.errors)
        except TypeError:
            _to_id_list(ids)  # raises a clearer TypeError for floats, nested lists, ...
            raise

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, errors: str | None = None, **kwargs: Any) -> list[str]:
        """decode each row of a list of id lists or a 2-D tensor/array."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens, errors=errors, **kwargs) for s in sequences]

    # -- batching ------------------------------------------------------------------------------------------

    @staticmethod
    def _reject_kwargs(kwargs: Mapping[str, Any], ignorable: frozenset[str], where: str) -> None:
        unknown = sorted(set(kwargs) - ignorable)
        if unknown:
            hint = " (use tokenizer(text, return_tensors=...))" if "return_tensors" in unknown else ""
            raise TypeError(f"{where}() got unexpected keyword argument(s): {', '.join(unknown)}{hint}")

    def __call__(
        self,
        text: str | Sequence[str],
        return_tensors: Literal["pt", "np"] | None = None,
        padding: bool | Literal["longest", "max_length", "do_not_pad"] = False,
        max_length: int | None = None,
        truncation: bool | Literal["longest_first", "only_first", "do_not_truncate"] = False,
        padding_side: Literal["left", "right"] | None = None,
        return_attention_mask: bool = True,
        allowed_special: AllowedSpecial = None,
        disallowed_special: DisallowedSpecial = (),
        *,
        truncation_side: Literal["left", "right"] | None = None,
        pad_to_multiple_of: int | None = None,
        return_token_type_ids: bool = True,
        **kwargs: Any,
    ) -> BatchEncoding:
        """Tokenize one text or a batch into a BatchEncoding (input_ids, token_type_ids, attention_mask).

        padding: False | True/"longest" | "max_length" (to max_length, else model_max_length); needs a pad
            token (pad_token="<|extra_0|>"). truncation: cut to max_length (else model_max_length) on
            truncation_side. return_tensors: None (lists), "pt" (torch.long) or "np" (int64).
        """
        self._reject_kwargs(kwargs, _IGNORED_CALL_KWARGS, "__call__")
        batched = not isinstance(text, str)
        texts = list(text) if batched else [text]
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"expected str or a list of str, got an element of type {type(t).__name__}")
        padding_side = padding_side or self.padding_side
        truncation_side = truncation_side or self.truncation_side
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
        if padding is True:
            padding = "longest"
        elif padding in (False, None, "do_not_pad"):
            padding = False
        elif padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be a bool, 'longest' or 'max_length', got {padding!r}")
        truncate = truncation not in (False, None, "do_not_truncate")
        limit = max_length if max_length is not None else self.model_max_length
        if padding and self._pad_token_id is None:
            raise ValueError(
                "Asking to pad but the tokenizer has no pad token. Qwen has none by default: pass "
                "pad_token='<|extra_0|>' (or set tokenizer.pad_token_id = tokenizer.eod_id)."
            )
        if padding == "max_length" and limit >= VERY_LARGE_INTEGER:
            raise ValueError("padding='max_length' needs max_length (model_max_length is unlimited)")

        rows = [self.encode(t, allowed_special=allowed_special, disallowed_special=disallowed_special) for t in texts]
        if truncate and limit < VERY_LARGE_INTEGER:
            rows = [r[len(r) - limit:] if truncation_side == "left" and len(r) > limit else r[:limit] for r in rows]
        masks = [[1] * len(r) for r in rows]

        if padding and rows:
            target = max(map(len, rows)) if padding == "longest" else max(limit, 0)
            if pad_to_multiple_of:
                target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
            pad = self._pad_token_id
            for k, (r, m) in enumerate(zip(rows, masks)):
                extra = target - len(r)
                if extra > 0:
                    if padding_side == "left":
                        rows[k], masks[k] = [pad] * extra + r, [0] * extra + m
                    else:
                        rows[k], masks[k] = r + [pad] * extra, m + [0] * extra

        out = BatchEncoding(input_ids=rows)
        if return_token_type_ids:
            out["token_type_ids"] = [[0] * len(r) for r in rows]
        if return_attention_mask:
            out["attention_mask"] = masks
        if return_tensors is not None:
            if len({len(r) for r in rows}) > 1:
                raise ValueError(
                    f"cannot make {return_tensors!r} tensors from sequences of different lengths "
                    f"{sorted({len(r) for r in rows})}; pass padding=True (and a pad_token such as '<|extra_0|>')"
                )
            for key in list(out):
                out[key] = self._as_tensor(out[key], return_tensors)
        elif not batched:
            for key in list(out):
                out[key] = out[key][0]
        return out

    @staticmethod
    def _as_tensor(rows: list[list[int]], kind: str) -> Any:
        import numpy as np

        array = np.array(rows, dtype=np.int64).reshape(len(rows), -1 if rows else 0)
        if kind == "np":
            return array
        if kind == "pt":
            import torch

            return torch.from_numpy(array)
        raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {kind!r}")

    # -- saving and pickling -------------------------------------------------------------------------------

    def save_vocabulary(self, save_directory: str | os.PathLike[str], filename_prefix: str | None = None) -> tuple[str]:
        """Write the ordinary tokens (extra vocab included) as a tiktoken file; returns (path,)."""
        directory = pathlib.Path(save_directory)
        if not directory.is_dir():
            raise NotADirectoryError(f"{directory} is not a directory")
        name = VOCAB_FILES_NAMES["vocab_file"]
        path = directory / (f"{filename_prefix}-{name}" if filename_prefix else name)
        items = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        data = b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in items)
        _write_atomically(path, data)
        return (str(path),)

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> tuple[str, ...]:
        """Write tokenizer_config.json and qwen.tiktoken into save_directory (created if missing)."""
        directory = pathlib.Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"{directory} exists and is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        (vocab_path,) = self.save_vocabulary(directory)
        config: dict[str, Any] = {
            "model_max_length": self.model_max_length,
            "tokenizer_class": "QWenTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "errors": self.errors,
        }
        if self._pad_token_id is not None:
            config["pad_token"] = self.pad_token
        if self._eos_token_id is not None:
            config["eos_token"] = self.eos_token
        if not self.allow_special_in_text:
            config["allow_special_in_text"] = False
        for key in ("pad_token", "eos_token"):
            if isinstance(config.get(key), bytes):  # an ordinary token set via pad_token_id; not JSON-able
                del config[key]
        config_path = directory / TOKENIZER_CONFIG_FILE
        _write_atomically(config_path, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        return (str(config_path), vocab_path)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["tokenizer"]  # the Rust core is rebuilt on unpickle
        state.pop("decoder", None)
        if self._shares_release_vocab:
            state["mergeable_ranks"] = None  # reloaded from the bundled file; keeps pickles small
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.mergeable_ranks is None:
            self.mergeable_ranks = _bundled_ranks()
            self.tokenizer = _bundled_encoding()
        else:
            self.tokenizer = _build_encoding(self.mergeable_ranks)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"pad_token={self.pad_token!r}, eos_token={self.eos_token!r}, padding_side={self.padding_side!r}, "
            f"allow_special_in_text={self.allow_special_in_text})"
        )


QwenTokenizer = QWenTokenizer


def save_default_tokenizer(model: Any, directory: str) -> None:
    """save_model without a tokenizer (registered in qwen/__init__.py): the tokenizer of the checkpoint the
    model came from, else the bundled Qwen vocabulary."""
    source = getattr(model, "name_or_path", None)
    source = source if source and os.path.isdir(source) else None
    tokenizer = QWenTokenizer.from_pretrained(source) if source else QWenTokenizer()
    tokenizer.save_pretrained(directory)
