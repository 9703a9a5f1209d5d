"""Training data for fine-tuning: read and validate files, tokenize with label masks, pack, collate.

Every problem a data file can have is found by `read_records`/`load_dataset` before any training
step runs, and reported all at once (a DataError listing "path:line: what"), so a bad sample in
the middle of a big file never costs a crashed run. Once validated, tokenization cannot fail.

Accepted files (the format is detected from the extension, then from the content):

- JSON list (``.json``, or any file whose first character is ``[``): the official SFT format,
  ``[{"id": ..., "conversations": [{"from": "user", "value": "..."}, ...]}, ...]``.
- JSONL (``.jsonl``/``.ndjson``, or any file whose first character is ``{``): one sample per line,
  blank lines skipped. A sample is a chat (as above) or a pretraining document ``{"text": "..."}``.
- Plain text (``.txt``/``.text``/``.md``, or anything else): the whole file is one document, unless
  it contains lines holding only ``<|endoftext|>``; those lines separate documents. Blank documents
  are skipped; ``<|endoftext|>`` anywhere else is ordinary text.

Chat samples may also use ``{"role", "content"}`` turns (OpenAI style, under "conversations" or
"messages"), the ShareGPT role names ``human``/``gpt``, and a top-level ``"system"`` string.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwen.chat_template import DEFAULT_SYSTEM, EOD_ID, IM_END_ID, IM_START_ID, render_messages

__all__ = [
    "IGNORE_INDEX",
    "LABEL_MASKS",
    "DataError",
    "Record",
    "Example",
    "TokenizedData",
    "read_records",
    "encode_chat",
    "encode_text",
    "tokenize_records",
    "collate",
    "load_dataset",
]

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index, as HF and the official code
LABEL_MASKS = ("assistant", "official")
DOC_SEPARATOR = "<|endoftext|>"
MAX_LISTED_PROBLEMS = 20

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
_JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
_TEXT_SUFFIXES = frozenset({".txt", ".text", ".md"})


class DataError(ValueError):
    """Training data that cannot be used; ``problems`` holds every "where: what" found."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = self.problems[:MAX_LISTED_PROBLEMS]
        n = len(self.problems)
        lines = [f"{n} problem{'s' if n != 1 else ''} in the training data:"] + [f"  {p}" for p in shown]
        if n > len(shown):
            lines.append(f"  ... and {n - len(shown)} more")
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[Any, ...]:
        # The default would rebuild from the formatted message (e.g. across DataLoader workers).
        return (type(self), (self.problems,))


@dataclass
class Record:
    """One validated raw sample; ``source`` ("file.jsonl:17", "data.json[3]") names it in every message."""

    source: str
    kind: str  # "chat" | "text"
    conversations: list[dict[str, str]] | None = None  # [{"role": "system"|"user"|"assistant", "content": str}]
    text: str | None = None


@dataclass
class Example:
    """One training row. ``labels`` is aligned with ``input_ids`` (not shifted: the model shifts)."""

    input_ids: list[int]
    labels: list[int]
    source: str

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{self.source}: {len(self.input_ids)} input ids but {len(self.labels)} labels")


# ---------------------------------------------------------------------------------------------------------
# Reading and validation


def read_records(path: str | os.PathLike[str]) -> list[Record]:
    """All samples of one file, or a DataError listing every problem in it."""
    records, problems = _read_file(Path(path))
    if problems:
        raise DataError(problems)
    return records


def _read_file(path: Path) -> tuple[list[Record], list[str]]:
    name = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        return [], [f"{name}: cannot read ({e.strerror or e})"]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return [], [f"{name}:{line}: not UTF-8 text (bad byte at offset {e.start})"]
    if not text.strip():
        return [], [f"{name}: empty file"]

    fmt = _detect_format(path, text)
    if fmt == "json":
        records, problems = _read_json_list(name, text)
    elif fmt == "jsonl":
        records, problems = _read_jsonl(name, text)
        if problems and _is_single_object(text):
            problems = [f"{name}: one JSON object spanning several lines; expected a JSON list of samples "
                        "or one sample per line (JSONL)"]
    else:
        records, problems = _read_text(name, text), []
    if not records and not problems:
        problems.append(f"{name}: no samples")
    return records, problems


def _detect_format(path: Path, text: str) -> str:
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if suffix in _TEXT_SUFFIXES:
        return "text"
    first = text.lstrip()[:1]
    if first == "[":
        return "json"
    if first == "{":  # also catches JSONL saved as .json, a common mix-up
        return "jsonl"
    # A .json file that starts with neither is broken JSON: say so instead of training on it as prose.
    return "json" if suffix == ".json" else "text"


def _is_single_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _read_json_list(name: str, text: str) -> tuple[list[Record], list[str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return [], [f"{name}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})"]
    if not isinstance(data, list):
        return [], [f"{name}: expected a JSON list of samples, got {_type_name(data)}"]
    records: list[Record] = []
    problems: list[str] = []
    for i, sample in enumerate(data):
        record = _parse_sample(f"{name}[{i}]", sample, problems)
        if record is not None:
            records.append(record)
    return records, problems


def _read_jsonl(name: str, text: str) -> tuple[list[Record], list[str]]:
    records: list[Record] = []
    problems: list[str] = []
    # Split on "\n" only: str.splitlines() also splits on U+2028 etc., which JSON allows unescaped in strings.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: invalid JSON ({e.msg}, column {e.colno})")
            continue
        record = _parse_sample(where, sample, problems)
        if record is not None:
            records.append(record)
    return records, problems


def _read_text(name: str, text: str) -> list[Record]:
    records: list[Record] = []
    lines = text.split("\n")
    start = 0
    for i in range(len(lines) + 1):
        if i < len(lines) and lines[i].strip() != DOC_SEPARATOR:
            continue
        doc_lines = lines[start:i]
        first = next((k for k, line in enumerate(doc_lines) if line.strip()), None)
        if first is not None:
            doc = "\n".join(doc_lines).strip("\r\n")
            records.append(Record(f"{name}:{start + first + 1}", "text", text=doc))
        start = i + 1
    return records


def _parse_sample(where: str, sample: Any, problems: list[str]) -> Record | None:
    if not isinstance(sample, dict):
        problems.append(f"{where}: expected a JSON object, got {_type_name(sample)}")
        return None
    conv_key = next((k for k in ("conversations", "messages") if k in sample), None)
    if conv_key is not None and "text" in sample:
        problems.append(f"{where}: has both 'text' and '{conv_key}'; a sample is either a document or a chat")
        return None
    if "text" in sample:
        text = sample["text"]
        if not isinstance(text, str):
            problems.append(f"{where}: 'text' must be a string, got {_type_name(text)}")
        elif not text.strip():
            problems.append(f"{where}: 'text' is empty")
        else:
            return Record(where, "text", text=text)
        return None
    if conv_key is None:
        problems.append(f"{where}: no 'conversations' (chat sample) or 'text' (pretraining document) field")
        return None
    turns = _parse_conversation(where, conv_key, sample[conv_key], sample.get("system"), problems)
    return None if turns is None else Record(where, "chat", conversations=turns)


def _parse_conversation(
    where: str, key: str, turns: Any, system: Any, problems: list[str]
) -> list[dict[str, str]] | None:
    if not isinstance(turns, list):
        problems.append(f"{where}: '{key}' must be a list of turns, got {_type_name(turns)}")
        return None
    if not turns:
        problems.append(f"{where}: '{key}' is empty")
        return None
    found = len(problems)
    out: list[dict[str, str]] = []
    for j, turn in enumerate(turns):
        at = f"{where}: {key}[{j}]"
        if not isinstance(turn, dict):
            problems.append(f"{at}: expected an object with 'from'/'value' (or 'role'/'content'), got {_type_name(turn)}")
            continue
        role_key = next((k for k in ("from", "role") if k in turn), None)
        value_key = next((k for k in ("value", "content") if k in turn), None)
        if role_key is None:
            problems.append(f"{at}: missing 'from' (or 'role')")
        if value_key is None:
            problems.append(f"{at}: missing 'value' (or 'content')")
        if role_key is None or value_key is None:
            continue
        raw_role, value = turn[role_key], turn[value_key]
        role = _ROLES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            problems.append(f"{at}: unknown role {raw_role!r} (expected user/human, assistant/gpt or system)")
        if not isinstance(value, str):
            problems.append(f"{at}: '{value_key}' must be a string, got {_type_name(value)}")
        if role == "system" and j != 0:
            problems.append(f"{at}: a system turn must be the first turn")
        if role is not None and isinstance(value, str):
            out.append({"role": role, "content": value})

    if system is not None:
        if not isinstance(system, str):
            problems.append(f"{where}: 'system' must be a string, got {_type_name(system)}")
        elif out and out[0]["role"] == "system":
            problems.append(f"{where}: has both a top-level 'system' and a system turn")
        else:
            out.insert(0, {"role": "system", "content": system})
    if len(problems) == found and not any(t["role"] == "assistant" for t in out):
        problems.append(f"{where}: no assistant turn, so nothing to learn from")
    return out if len(problems) == found else None


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a number ({value!r})" if isinstance(value, (int, float)) else type(value).__name__
    )


# ---------------------------------------------------------------------------------------------------------
# Tokenization


def encode_chat(tokenizer: Any, record: Record, *, label_mask: str = "assistant", system: str | None = None) -> Example:
    """ChatML ids and labels for one chat record.

    ``system`` is the prompt for samples without their own (default: "You are a helpful assistant.").

    =========================  ====================================  =========================================
    (loss on = label kept)     "assistant" (ours, default)           "official" (finetune.py ``preprocess``)
    =========================  ====================================  =========================================
    system prompt              the sample's, else ``system``         always ``system``; the sample's is dropped
    first turn not from user   kept                                  dropped (one turn only)
    "<|im_end|>" etc. in data  plain text (injection-safe)           parsed as control tokens
    ``<|im_start|>``           no loss                               loss, in every turn
    role header ``role\\n``     no loss                               no loss
    system / user content      no loss                               no loss
    assistant content          loss                                  loss
    ``<|im_end|>``             loss after assistant content only     loss, in every turn
    ``\\n`` after <|im_end|>    no loss; none after the last turn     loss, in every turn (also the last)
    padding                    none (the collator pads per batch)    official pads every sample to
                                                                     model_max_length with <|endoftext|>
    =========================  ====================================  =========================================

    Ours trains exactly what inference generates: the ids before each assistant reply equal
    `make_context`'s prompt, and the reply ends at <|im_end|>, where generation stops. The official
    mode reproduces finetune.py for comparisons and for checkpoints meant to match official SFT.
    """
    if record.kind != "chat" or not record.conversations:
        raise ValueError(f"{record.source}: not a chat record")
    default_system = system or DEFAULT_SYSTEM
    if label_mask == "assistant":
        ids, mask = render_messages(tokenizer, record.conversations, add_generation_prompt=False,
                                    default_system=default_system)
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    elif label_mask == "official":
        ids, labels = _encode_official(tokenizer, record.conversations, default_system)
    else:
        raise ValueError(f"label_mask must be one of {LABEL_MASKS}, got {label_mask!r}")
    return Example(ids, labels, record.source)


def _encode_official(tokenizer: Any, turns: list[dict[str, str]], system: str) -> tuple[list[int], list[int]]:
    def tok(text: str) -> list[int]:
        # The official tokenizer call parses special-token text ("all" is its default).
        return list(tokenizer.encode(text, allowed_special="all"))

    im_start = getattr(tokenizer, "im_start_id", IM_START_ID)
    im_end = getattr(tokenizer, "im_end_id", IM_END_ID)
    nl = tok("\n")
    # The official code has no per-sample system, and drops a first turn that is not from the user.
    turns = [t for t in turns if t["role"] != "system"]
    if turns and turns[0]["role"] != "user":
        turns = turns[1:]

    ids: list[int] = []
    labels: list[int] = []
    for role, content in [("system", system)] + [(t["role"], t["content"]) for t in turns]:
        header = tok(role) + nl
        body = tok(content)
        ids += [im_start] + header + body + [im_end] + nl
        kept = body if role == "assistant" else [IGNORE_INDEX] * len(body)
        labels += [im_start] + [IGNORE_INDEX] * len(header) + kept + [im_end] + nl
    return ids, labels


def encode_text(tokenizer: Any, record: Record) -> list[int]:
    """A pretraining document's ids followed by <|endoftext|>, the document boundary Qwen was trained with.

    Special-token text inside the document stays text, so data cannot forge document boundaries.
    """
    if record.kind != "text" or record.text is None:
        raise ValueError(f"{record.source}: not a text record")
    ids = list(tokenizer.encode(record.text, allowed_special=set(), disallowed_special=()))
    return ids + [getattr(tokenizer, "eod_id", EOD_ID)]


@dataclass
class TokenizedData:
    """Training rows plus the counts that tell whether --max-len and the data fit together."""

    examples: list[Example]
    num_records: int
    num_truncated: int  # chat samples cut at max_len (dropped ones included)
    num_dropped: int  # chat samples left with no supervised token after the cut
    num_tokens: int
    num_supervised_tokens: int  # labels != IGNORE_INDEX
    num_documents: int = 0  # text records among num_records
    num_blocks: int = 0  # rows cut from the documents (at the end of examples)
    max_len: int = 0
    packed: bool = False

    def report(self) -> str:
        """One line for the log, e.g. "1,234 samples (12 truncated to --max-len 512), 456,789 tokens, 40% supervised"."""
        parts = []
        num_chat = self.num_records - self.num_documents
        if num_chat:
            part = _plural(num_chat, "sample")
            notes = []
            if self.num_truncated:
                notes.append(f"{self.num_truncated:,} truncated to --max-len {self.max_len}")
            if self.num_dropped:
                notes.append(f"{self.num_dropped:,} dropped: no supervised tokens left")
            if notes:
                part += f" ({', '.join(notes)})"
            if self.packed:
                part += f" packed into {_plural(len(self.examples) - self.num_blocks, 'row')}"
            parts.append(part)
        if self.num_documents:
            parts.append(f"{_plural(self.num_documents, 'document')} in "
                         f"{_plural(self.num_blocks, 'block')} of {self.max_len} tokens")
        share = 100 * self.num_supervised_tokens / self.num_tokens if self.num_tokens else 0.0
        return " + ".join(parts) + f", {self.num_tokens:,} tokens, {share:.0f}% supervised"


def tokenize_records(
    tokenizer: Any,
    records: Sequence[Record],
    *,
    max_len: int,
    label_mask: str = "assistant",
    system: str | None = None,
    packing: bool = False,
    progress: bool = False,
) -> TokenizedData:
    """Turn validated records into training rows of at most ``max_len`` tokens.

    Chat records: one row each (`encode_chat`), cut at ``max_len``. A sample with no supervised
    label left at positions >= 1 is dropped (labels[0] never reaches the loss once the model shifts).
    With ``packing``, consecutive samples are concatenated greedily into rows of <= ``max_len``
    tokens, each keeping its own labels. Attention is NOT blocked between packed samples (as in most
    packers): a sample can attend to the one before it, a small price for fewer padded tokens.

    Text records (pretraining): all documents are concatenated (each followed by <|endoftext|>) and
    cut into blocks of exactly ``max_len`` tokens, labels = input_ids; the last block is kept if it
    has >= 2 tokens. Nothing is truncated. The blocks come after the chat rows.

    Raises DataError when no row is left, so an unusable dataset fails before training starts.
    """
    if label_mask not in LABEL_MASKS:
        raise ValueError(f"label_mask must be one of {LABEL_MASKS}, got {label_mask!r}")
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2 (an input and its next-token target), got {max_len!r}")
    if not records:
        raise DataError(["no training samples"])

    chat: list[Example] = []
    stream: list[int] = []
    doc_starts: list[tuple[int, str]] = []  # (offset in stream, source) of each document
    num_truncated = num_dropped = 0
    for record in _progress(records, progress):
        if record.kind == "text":
            doc_starts.append((len(stream), record.source))
            stream += encode_text(tokenizer, record)
            continue
        ex = encode_chat(tokenizer, record, label_mask=label_mask, system=system)
        if len(ex.input_ids) > max_len:
            num_truncated += 1
            ex = Example(ex.input_ids[:max_len], ex.labels[:max_len], ex.source)
        if all(label == IGNORE_INDEX for label in ex.labels[1:]):
            num_dropped += 1
            continue
        chat.append(ex)

    if packing:
        chat = _pack(chat, max_len)
    blocks = _blocks(stream, doc_starts, max_len)
    examples = chat + blocks
    if not examples:
        raise DataError([
            f"no training rows left: all {_plural(len(records), 'sample')} were dropped "
            f"(no supervised token within --max-len {max_len})"
        ])
    return TokenizedData(
        examples=examples,
        num_records=len(records),
        num_truncated=num_truncated,
        num_dropped=num_dropped,
        num_tokens=sum(len(ex.input_ids) for ex in examples),
        num_supervised_tokens=sum(label != IGNORE_INDEX for ex in examples for label in ex.labels),
        num_documents=len(doc_starts),
        num_blocks=len(blocks),
        max_len=max_len,
        packed=packing,
    )


def _pack(examples: list[Example], max_len: int) -> list[Example]:
    rows: list[Example] = []
    group: list[Example] = []
    length = 0

    def flush() -> None:
        source = group[0].source + (f" (+{len(group) - 1} packed)" if len(group) > 1 else "")
        rows.append(Example([t for ex in group for t in ex.input_ids], [t for ex in group for t in ex.labels], source))

    for ex in examples:
        if group and length + len(ex.input_ids) > max_len:
            flush()
            group, length = [], 0
        group.append(ex)
        length += len(ex.input_ids)
    if group:
        flush()
    return rows


def _blocks(stream: list[int], doc_starts: list[tuple[int, str]], max_len: int) -> list[Example]:
    blocks: list[Example] = []
    doc = 0
    for start in range(0, len(stream), max_len):
        ids = stream[start:start + max_len]
        if len(ids) < 2:  # a single token has nothing to predict
            break
        while doc + 1 < len(doc_starts) and doc_starts[doc + 1][0] <= start:
            doc += 1
        blocks.append(Example(ids, list(ids), doc_starts[doc][1]))
    return blocks


def _progress(items: Sequence[Record], enabled: bool) -> Iterable[Record]:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; tqdm is an optional dependency
        return items
    return tqdm(items, desc="tokenizing", unit="sample")


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------------------------------------------------
# Batching and the one-call entry point


def collate(examples: Sequence[Example], pad_id: int, *, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row (dynamic padding: no compute spent on a fixed max length).

    Returns int64 [B, T] tensors: input_ids (pad_id), labels (IGNORE_INDEX) and attention_mask (1 real, 0 pad).
    ``pad_to_multiple_of`` rounds T up, e.g. to keep kernel shapes few.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(ex.input_ids) for ex in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(examples), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[i, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def load_dataset(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    tokenizer: Any,
    *,
    max_len: int,
    label_mask: str = "assistant",
    system: str | None = None,
    packing: bool = False,
    progress: bool = False,
) -> TokenizedData:
    """Read, validate and tokenize one or more files; a DataError lists the problems of all files together."""
    if label_mask not in LABEL_MASKS:  # fail before reading gigabytes
        raise ValueError(f"label_mask must be one of {LABEL_MASKS}, got {label_mask!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError(["no data files given"])
    records: list[Record] = []
    problems: list[str] = []
    for path in paths:
        file_records, file_problems = _read_file(Path(path))
        records += file_records
        problems += file_problems
    if problems:
        raise DataError(problems)
    return tokenize_records(tokenizer, records, max_len=max_len, label_mask=label_mask, system=system,
                            packing=packing, progress=progress)
