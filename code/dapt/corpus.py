"""Corpora: JSONL reading with clear errors, blob masking, and the embedded offline samples.

Corpora are JSONL files (one JSON object a line, the text under a configurable key,
``text`` by default), found recursively under a folder (symlinked sub-folders
included), as NeMo Curator writes them. ``.jsonl.gz``, ``.jsonl.zst``, ``.jsonl.bz2``
and ``.jsonl.xz`` files are decompressed while they are read (streamed, never
whole); a UTF-8 byte-order mark at the start of a file is skipped.

Why the samples live here too (about 600 lines): the ``sample-data`` stage writes exactly the records this
module reads, with the same blob masking; keeping writer and reader side by side keeps that format one definition.
"""

from __future__ import annotations

import ast
import bz2
import contextlib
import gzip
import hashlib
import importlib
import io
import json
import lzma
import os
import re
import sysconfig
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from tqdm.auto import tqdm

from dapt.artifacts import write_json
from dapt.config import CODE_DIR, DEFAULT_DOMAIN_DATA, DEFAULT_GENERAL_DATA, param
from dapt.errors import UserInputError

DEFAULT_HELDOUT = CODE_DIR / "heldout"


class CorpusError(UserInputError):
    """A corpus file or folder cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Document:
    """One JSONL record: its text, where it came from, and its other fields."""

    text: str
    path: str
    line: int
    meta: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def file_type(self) -> str:
        return str(self.meta.get("file_type", "unknown"))

    @property
    def source(self) -> str:
        return str(self.meta.get("source") or Path(self.path).stem)


# Corpus file names, each with how it is opened; compressed files are streamed, never decompressed whole.
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.bz2", ".jsonl.xz")
_MAGIC = {  # leading bytes of compressed streams: a file named .jsonl that starts with one is refused clearly
    b"\x1f\x8b": ("gzip", ".gz"),
    b"\x28\xb5\x2f\xfd": ("zstd", ".zst"),
    b"BZh": ("bzip2", ".bz2"),
    b"\xfd7zXZ\x00": ("xz", ".xz"),
}
_UTF8_BOM = b"\xef\xbb\xbf"
# the only way a str from json.loads can hold a lone surrogate is an escape like \ud800 in the line
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
ZSTD_HINT = "pip install zstandard==0.25.0"


def is_jsonl_name(name: str) -> bool:
    """True for the file names read as corpora: ``*.jsonl``, optionally compressed (see JSONL_SUFFIXES)."""
    return name.endswith(JSONL_SUFFIXES)


def _walk_jsonl(root: Path) -> Iterator[Path]:
    """Corpus files under ``root``, following symlinked folders; each real folder is entered once (no loops)."""
    seen: set[tuple[int, int]] = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:
            subfolders[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        subfolders.sort()
        for name in names:
            path = Path(folder) / name
            if is_jsonl_name(name) and path.is_file():
                yield path


def find_jsonl_files(path: str | Path) -> list[Path]:
    """All corpus files under ``path`` (a file or a folder, any depth, symlinked folders followed), sorted.

    Corpus files are ``*.jsonl`` and their compressed forms ``*.jsonl.gz``, ``.zst``, ``.bz2`` and ``.xz``.
    """
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus path {path} does not exist; pass a folder of JSONL files.")
    if path.is_file():
        return [path]
    files = sorted(_walk_jsonl(path))
    if not files:
        raise CorpusError(
            f"corpus folder {path} holds no *.jsonl files (nor .jsonl.gz/.zst/.bz2/.xz); put JSONL records "
            "there (for the embedded sample run `python -m dapt sample-data`)."
        )
    return files


def _zstd_stream(raw: BinaryIO, path: Path) -> BinaryIO:
    try:
        import zstandard
    except ImportError:
        raise CorpusError(
            f"{path} is zstd-compressed and reading it needs the zstandard package: `{ZSTD_HINT}` "
            "(or decompress it first: `zstd -d FILE`)."
        ) from None
    # read_across_frames: files written by parallel compressors (pzstd, zstd -T) hold several frames
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
    return io.BufferedReader(reader, buffer_size=1 << 20)


def _compression_of(path: Path) -> str | None:
    name = path.name
    for suffix, kind in ((".gz", "gzip"), (".zst", "zstd"), (".bz2", "bzip2"), (".xz", "xz")):
        if name.endswith(suffix):
            return kind
    return None


@contextlib.contextmanager
def open_corpus_file(path: str | Path) -> Iterator[BinaryIO]:
    """The bytes of a corpus file, decompressed as it is read when its name ends in .gz/.zst/.bz2/.xz.

    A compressed file whose name does not say so is refused with a message naming the fix.
    """
    path = Path(path)
    kind = _compression_of(path)
    if kind is None:
        with open(path, "rb") as handle:
            head = handle.read(6)
            handle.seek(0)
            for magic, (found, suffix) in _MAGIC.items():
                if head.startswith(magic):
                    raise CorpusError(
                        f"{path} is {found}-compressed but its name does not say so; rename it to "
                        f"{path.name}{suffix} (compressed corpora are read as they are) or decompress it."
                    )
            yield handle
        return
    openers = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}
    stream = _zstd_stream(open(path, "rb"), path) if kind == "zstd" else openers[kind](path, "rb")  # noqa: SIM115
    with stream:
        yield stream


def _decompression_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error, lzma.LZMAError]
    with contextlib.suppress(ImportError):
        import zstandard

        errors.append(zstandard.ZstdError)
    return tuple(errors)


def _lone_surrogate(value, where: str) -> tuple[str, int, str] | None:
    """(field, character index, escape) of the first lone surrogate in a parsed JSON value, or None."""
    if isinstance(value, str):
        match = _SURROGATE.search(value)
        return (where, match.start(), f"\\u{ord(match.group()):04x}") if match else None
    if isinstance(value, dict):
        items = [(f"{where}.{key}" if where else str(key), item) for key, item in value.items()]
        items += [(f"{where} key", key) for key in value]
    elif isinstance(value, list):
        items = [(f"{where}[{index}]", item) for index, item in enumerate(value)]
    else:
        return None
    for name, item in items:
        found = _lone_surrogate(item, name)
        if found:
            return found
    return None


def _parse_line(raw: bytes, path: Path, line_no: int, text_keys: tuple[str, ...]) -> Document | None:
    if not raw or raw.isspace():
        return None
    # the line's own bytes, without a leading byte-order mark or the line break, decoded without copies
    start = len(_UTF8_BOM) if line_no == 1 and raw.startswith(_UTF8_BOM) else 0
    end = len(raw)
    while end > start and raw[end - 1] in b"\r\n":
        end -= 1
    try:
        line = str(memoryview(raw)[start:end], "utf-8")
    except UnicodeDecodeError as error:
        raise CorpusError(
            f"{path}:{line_no}: bytes that are not UTF-8 at offset {start + error.start}; "
            "re-encode the file as UTF-8."
        ) from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise CorpusError(f"{path}:{line_no}: malformed JSON ({error.msg} at column {error.colno}).") from None
    del line
    if not isinstance(record, dict):
        raise CorpusError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}.")
    if _SURROGATE_ESCAPE.search(raw):
        found = _lone_surrogate(record, "")
        if found:
            field_name, index, escape = found
            raise CorpusError(
                f"{path}:{line_no}: field {field_name!r} holds a lone surrogate ({escape} at character {index}), "
                "a JSON escape that is not a Unicode character and cannot be encoded or tokenized; fix the "
                "program that wrote the file, or replace the escape (for example with \\ufffd) or drop the record."
            )
    key = next((k for k in text_keys if k in record), None)
    if key is None:
        raise CorpusError(
            f"{path}:{line_no}: none of the text keys {list(text_keys)} is present "
            f"(keys: {sorted(record)}); pass --text-keys to name the right one."
        )
    text = record[key]
    if not isinstance(text, str):
        raise CorpusError(f"{path}:{line_no}: field {key!r} is {type(text).__name__}, not a string.")
    meta = {k: v for k, v in record.items() if k != key}
    return Document(text=text, path=str(path), line=line_no, meta=meta)


def iter_documents(path: str | Path, text_keys: Iterable[str] = ("text",)) -> Iterator[Document]:
    """Yield every document under ``path``; raise :class:`CorpusError` on the first bad line.

    Files are streamed line by line (compressed ones decompressed as they are read), so memory
    holds one line at a time whatever the corpus size.
    """
    keys = tuple(text_keys)
    if not keys:
        raise CorpusError("no text keys given; pass --text-keys with at least one JSON key (e.g. text).")
    broken = _decompression_errors()
    for file in find_jsonl_files(path):
        line_no = 0
        with open_corpus_file(file) as handle:
            lines = iter(handle)
            while True:
                try:
                    raw = next(lines, None)
                except broken as error:
                    raise CorpusError(
                        f"{file}:{line_no + 1}: cannot be read or decompressed ({error}); the file is damaged "
                        "or truncated: fetch or compress it again."
                    ) from None
                if raw is None:
                    break
                line_no += 1
                doc = _parse_line(raw, file, line_no, keys)
                del raw  # a long line is not kept alive while its document is used
                if doc is not None and doc.text:
                    yield doc


@dataclass
class Corpus:
    """Documents of one corpus, loaded in memory, with counts."""

    name: str
    root: str
    documents: list[Document]

    @property
    def num_bytes(self) -> int:
        return sum(len(d.text.encode("utf-8")) for d in self.documents)

    def summary(self) -> dict:
        """Documents and UTF-8 bytes, in total and per file type."""
        per_type: Counter = Counter()
        docs_per_type: Counter = Counter()
        for doc in self.documents:
            per_type[doc.file_type] += len(doc.text.encode("utf-8"))
            docs_per_type[doc.file_type] += 1
        return {
            "name": self.name,
            "root": self.root,
            "documents": len(self.documents),
            "bytes": sum(per_type.values()),
            "file_types": {t: {"documents": docs_per_type[t], "bytes": per_type[t]} for t in sorted(per_type)},
        }


def load_corpus(path: str | Path, name: str, text_keys: Iterable[str] = ("text",)) -> Corpus:
    """Load every document under ``path``; an empty corpus is an error."""
    docs = list(tqdm(iter_documents(path, text_keys), desc=f"reading {name}", unit=" docs", leave=False))
    if not docs:
        raise CorpusError(f"corpus {name} at {path} holds no non-empty documents.")
    return Corpus(name=name, root=str(path), documents=docs)


# --- embedded blobs -------------------------------------------------------------------------------

_BLOB_PATTERNS = [
    # base64 runs: long, no spaces, letters of both cases and digits somewhere
    r"(?<![A-Za-z0-9+/])(?=[A-Za-z0-9+/]*[0-9+/])(?=[A-Za-z0-9+/]*[a-z])(?=[A-Za-z0-9+/]*[A-Z])"
    r"[A-Za-z0-9+/]{24,}={0,2}",
    # hex literals and hex dumps: 0x..., Verilog 'h..., bare runs of 16+ hex digits (hashes, ROM words)
    r"\b0[xX][0-9a-fA-F_]{8,}\b",
    r"'s?[hH][0-9a-fA-F_xzXZ]{8,}\b",
    r"(?<![0-9A-Za-z_])(?=[0-9a-fA-F]*[0-9])[0-9a-fA-F]{16,}(?![0-9A-Za-z_])",
    # bit vectors: Verilog 'b..., bare runs of 16+ binary digits
    r"'s?[bB][01_xzXZ?]{8,}\b",
    r"(?<![0-9A-Za-z_])[01_]{16,}(?![0-9A-Za-z_])",
    # runs of hex byte pairs separated by spaces/commas (hex dumps)
    r"(?:\b[0-9a-fA-F]{2}[ ,]){12,}[0-9a-fA-F]{2}\b",
]
BLOB_RE = re.compile("|".join(f"(?:{p})" for p in _BLOB_PATTERNS))


def mask_blobs(text: str, replacement: str = " ") -> str:
    """Replace embedded blobs (base64, hex dumps, hashes, bit vectors) with ``replacement``."""
    return BLOB_RE.sub(replacement, text)


def _class_table(chars: bytes, mark: bytes = b"a") -> bytes:
    return bytes(mark[0] if byte in chars else ord(".") for byte in range(256))


_ALNUM = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_HEX = b"0123456789abcdefABCDEF"
# Necessary conditions for a blob on a line, found in the UTF-8 bytes (each blob pattern's
# characters are ASCII): a run of 16 base64 characters, a run of 16 of [01_], two hex pairs
# each followed by a space or comma, or the literal starts of the 0x.../'h.../'b... patterns.
_RUN_SCANS = [
    (_class_table(_ALNUM + b"+/"), b"a" * 16),
    (_class_table(b"01_"), b"a" * 16),
    (bytes(ord("h") if b in _HEX else ord("s") if b in b" ," else ord(".") for b in range(256)), b"hhshhs"),
]
_LITERAL_SCAN = re.compile(rb"0[xX][0-9a-fA-F_]{8}|'s?[hHbB][0-9a-fA-F_xzXZ?]{8}")


def _blob_line_numbers(data: bytes) -> set[int]:
    """Indices of the lines of ``data`` (UTF-8) that may hold a blob."""
    positions: list[int] = [m.start() for m in _LITERAL_SCAN.finditer(data)]
    for table, needle in _RUN_SCANS:
        codes = data.translate(table)
        found = codes.find(needle)
        while found >= 0:
            positions.append(found)
            end = data.find(b"\n", found)
            if end < 0:
                break
            found = codes.find(needle, end)
    lines: set[int] = set()
    line, last = 0, 0
    for position in sorted(positions):
        line += data.count(b"\n", last, position)
        last = position
        lines.add(line)
    return lines


def mask_blobs_by_line(text: str, replacement: str = " ") -> str:
    """The same as :func:`mask_blobs`, several times faster on large corpora.

    No blob pattern crosses a line break, so the full pattern runs only on the lines
    where a quick byte-level scan finds what every blob must contain.
    """
    candidates = _blob_line_numbers(text.encode("utf-8", "surrogatepass"))
    if not candidates:
        return text
    lines = text.split("\n")
    for index in candidates:
        lines[index] = BLOB_RE.sub(replacement, lines[index])
    return "\n".join(lines)


def looks_like_blob(piece: str) -> bool:
    """True for a token string that is a fragment of an encoded blob rather than a word of the domain."""
    core = piece.lstrip("▁")
    if len(core) < 6:
        return False
    if BLOB_RE.fullmatch(core):
        return True
    has_digit = any(c.isdigit() for c in core)
    letters = [c for c in core if c.isalpha()]
    mixed_case = any(c.isupper() for c in letters) and any(c.islower() for c in letters)
    switches = sum(1 for a, b in zip(core, core[1:]) if a.isalpha() and b.isalpha() and a.isupper() != b.isupper())
    # base64 fragments: mixed case, many case switches, almost no vowels (CamelCase identifiers have them)
    if core.isalnum() and mixed_case and switches >= 3:
        vowels = sum(c in "aeiouAEIOU" for c in letters)
        if vowels < 0.2 * len(letters):
            return True
    # hex fragments: only hex digits with digits and letters mixed
    return bool(re.fullmatch(r"[0-9a-fA-F]{8,}", core) and has_digit and any(c.isalpha() for c in core))


# --- the embedded offline sample -------------------------------------------------------------------

DOMAIN_PACKAGES = {
    # package: (SPDX licence, upstream)
    "pythondata_cpu_cv32e40p": ("SHL-0.51", "https://github.com/openhwgroup/cv32e40p"),
    "pythondata_cpu_mor1kx": ("CERN-OHL-W-2.0", "https://github.com/openrisc/mor1kx"),
}
FILE_TYPES = {
    ".sv": "systemverilog", ".svh": "systemverilog", ".v": "verilog", ".vh": "verilog",
    ".tcl": "tcl", ".sdc": "sdc", ".xdc": "sdc", ".rst": "rst", ".md": "markdown",
    ".sby": "sby", ".yml": "yaml", ".yaml": "yaml", ".py": "python", ".c": "c", ".h": "c",
    ".S": "assembly", ".s": "assembly", ".sh": "shell", ".txt": "text",
}
_SKIP_NAMES = re.compile(r"(?i)^(license|copying|notice)|\.license")
_GENERATED = re.compile(r"(?i)auto-?generated|do not edit|generated by")


@dataclass
class SampleDataConfig:
    """Where the embedded samples go and how they are split."""

    domain_output: Path = param(DEFAULT_DOMAIN_DATA, "folder for the domain sample JSONL")
    general_output: Path = param(DEFAULT_GENERAL_DATA, "folder for the general sample JSONL")
    heldout_output: Path = param(DEFAULT_HELDOUT, "folder for held-out domain/general JSONL")
    heldout_percent: int = param(10, "percent of files held out for evaluation (by file, fixed hash order)")
    max_file_bytes: int = param(256 * 1024, "skip source files larger than this")
    general_max_bytes: int = param(4_000_000, "cap on the general sample's size")


def _is_heldout(key: str, percent: int) -> bool:
    digest = hashlib.sha256(f"dapt-sample-v1:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < percent


def _read_source_file(path: Path, max_bytes: int) -> str | None:
    size = path.stat().st_size
    if size < 64 or size > max_bytes or _SKIP_NAMES.search(path.name):
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None
    if "\x00" in text or _GENERATED.search("\n".join(text.splitlines()[:25])):
        return None
    return text


def domain_sample_records(max_file_bytes: int) -> Iterator[dict]:
    """Real RTL, scripts and docs of open CPU cores, read from LiteX's pythondata packages."""
    for package, (license_id, upstream) in DOMAIN_PACKAGES.items():
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise UserInputError(
                f"package {package} is not installed; run `pip install -r requirements.txt`."
            ) from None
        root = Path(module.data_location)
        for path in sorted(root.rglob("*")):
            file_type = FILE_TYPES.get(path.suffix)
            if file_type is None or not path.is_file() or "__pycache__" in path.parts:
                continue
            text = _read_source_file(path, max_file_bytes)
            if text is not None:
                yield {
                    "text": text,
                    "file_name": str(path.relative_to(root)),
                    "file_type": file_type,
                    "source": package.removeprefix("pythondata_cpu_"),
                    "license": license_id,
                    "upstream": upstream,
                    "commit": getattr(module, "data_git_hash", ""),
                }


def _module_docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 200:
                parts.append(doc)
    return "\n\n".join(parts)


def general_sample_records(max_bytes: int) -> Iterator[dict]:
    """English prose from the documentation strings of Python's own standard library (PSF licence)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if rel.parts[0] in {"test", "site-packages", "idlelib", "lib2to3", "turtledemo", "tkinter"} or any(
            part.startswith("test") for part in rel.parts
        ):
            continue
        text = _module_docstrings(path)
        if len(text) < 500:
            continue
        total += len(text.encode("utf-8"))
        if total > max_bytes:
            break
        yield {
            "text": text,
            "file_name": str(rel),
            "file_type": "prose",
            "source": "python-stdlib-docstrings",
            "license": "PSF-2.0",
        }


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


def build_sample_data(config: SampleDataConfig) -> dict:
    """Write the embedded samples: domain RTL and general prose, each split into train and held-out files."""
    splits: dict[str, dict[str, list[dict]]] = {"domain": {"train": [], "heldout": []},
                                                 "general": {"train": [], "heldout": []}}
    for kind, records in (
        ("domain", domain_sample_records(config.max_file_bytes)),
        ("general", general_sample_records(config.general_max_bytes)),
    ):
        for record in tqdm(records, desc=f"collecting {kind} sample", unit=" files", leave=False):
            split = "heldout" if _is_heldout(record["source"] + "/" + record["file_name"],
                                             config.heldout_percent) else "train"
            splits[kind][split].append(record)
    _write_jsonl(Path(config.domain_output) / "domain_sample.jsonl", splits["domain"]["train"])
    _write_jsonl(Path(config.general_output) / "general_sample.jsonl", splits["general"]["train"])
    _write_jsonl(Path(config.heldout_output) / "domain" / "domain_heldout.jsonl", splits["domain"]["heldout"])
    _write_jsonl(Path(config.heldout_output) / "general" / "general_heldout.jsonl", splits["general"]["heldout"])
    summary = {
        kind: {split: {"documents": len(recs), "bytes": sum(len(r["text"].encode()) for r in recs)}
               for split, recs in parts.items()}
        for kind, parts in splits.items()
    }
    write_json(Path(config.heldout_output) / "sample_summary.json", summary)
    print(json.dumps(summary, indent=2))
    return summary


# --- streaming -------------------------------------------------------------------------------------


def iter_batches(path: str | Path, text_keys: Iterable[str] = ("text",),
                 batch_chars: int = 8_000_000) -> Iterator[list[Document]]:
    """Documents under ``path`` in lists of about ``batch_chars`` characters, in corpus order."""
    batch: list[Document] = []
    size = 0
    for doc in iter_documents(path, text_keys):
        batch.append(doc)
        size += len(doc.text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class CorpusCounter:
    """Running document and byte counts of a streamed corpus; :meth:`summary` matches :meth:`Corpus.summary`."""

    def __init__(self, name: str, root: str | Path):
        self.name, self.root = name, str(root)
        self.bytes_per_type: Counter = Counter()
        self.docs_per_type: Counter = Counter()

    def add(self, doc: Document) -> None:
        self.bytes_per_type[doc.file_type] += len(doc.text.encode("utf-8"))
        self.docs_per_type[doc.file_type] += 1

    @property
    def documents(self) -> int:
        return sum(self.docs_per_type.values())

    def summary(self) -> dict:
        """Documents and UTF-8 bytes, in total and per file type; an empty corpus is an error."""
        if not self.documents:
            raise CorpusError(f"corpus {self.name} at {self.root} holds no non-empty documents.")
        per_type = self.bytes_per_type
        return {
            "name": self.name,
            "root": self.root,
            "documents": self.documents,
            "bytes": sum(per_type.values()),
            "file_types": {t: {"documents": self.docs_per_type[t], "bytes": per_type[t]} for t in sorted(per_type)},
        }
