"""Peak memory and time of the `data` and `tokenizer` stages on ONE 200 MB document, and exact ids.

    python benchmarks/bench_memory.py [--mb 200] [--stages data tokenizer] [--limit-gb 6]

The document is built in a temporary folder (never the repository) from ../shared's domain data:
its ~1,300 source texts joined by newlines, repeated with a "// copy N" line before each repetition,
until it holds ``--mb`` MB, written as a single JSONL record. Each stage runs as ``python -m dapt``
in a child process under ``prlimit --as`` (``--limit-gb``), so a regression is stopped there instead
of taking the machine down. Memory is read from /proc every 0.2 s for the stage's process and all its
children: ``peak_rss_mb`` is the largest VmHWM (the kernel's exact peak resident size) of one process,
``peak_tree_pss_mb`` the largest sampled sum of PSS over the tree (shared pages counted once).

Ids checked (data stage):

* ``whole_document_check``: a ``--check-mb`` document built the same way goes through the data stage
  (cut there into pieces of about 16 Ki characters) and its ids are compared with SentencePiece's
  ``encode`` of the whole document in this process; whole-document encoding of the 200 MB one would
  need about 22 GB.
* ``independent_cut_check``: the 200 MB document's ids in the ``.bin`` are compared with an independent
  encoding cut elsewhere, before every newline that joins two source texts (this script asserts that
  no piece of the model holds a newline and that it has byte fallback, so no token can span such a
  cut); the stage cuts near every 1 MiB, mostly before spaces (``dapt.piecewise``).

Target: each stage below 2 GB (peak_rss_mb and peak_tree_pss_mb). Prints JSON; exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "code"))

from dapt.corpus import iter_documents  # noqa: E402

TARGET_MB = 2000


def source_texts(data: Path) -> list[str]:
    """The domain texts of ../shared, in file and line order."""
    return [doc.text for file in sorted((data / "domain").glob("*.jsonl")) for doc in iter_documents(file)]


def document_blocks(texts: list[str], megabytes: float) -> Iterator[str]:
    """The generated document as blocks; every block but the first starts with the newline joining it."""
    total, copy, limit = 0, 0, int(megabytes * 1e6)
    while True:
        for index, text in enumerate(texts):
            header = f"// copy {copy}\n" if index == 0 and copy else ""
            block = ("\n" if total else "") + header + text
            yield block
            total += len(block.encode("utf-8"))
            if total >= limit:
                return
        copy += 1


def write_document(path: Path, blocks: Iterator[str]) -> int:
    """One JSONL record holding the blocks joined; written block by block (never the whole text at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    with open(path, "w", encoding="utf-8") as handle:
        handle.write('{"text": "')
        for block in blocks:
            handle.write(json.dumps(block, ensure_ascii=False)[1:-1])
            size += len(block.encode("utf-8"))
        handle.write('", "file_type": "generated"}\n')
    return size


# --- memory of a process tree ------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _tree(pid: int) -> list[int]:
    pids, index = [pid], 0
    while index < len(pids):
        pids += _children(pids[index])
        index += 1
    return pids


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(command: list[str], limit_bytes: int, log: Path) -> dict:
    """Run ``command`` under ``prlimit --as``; wall time, exit code and peak memory of its process tree."""
    full = ["prlimit", f"--as={limit_bytes}", "--", *command]
    peaks: dict[int, int] = {}
    tree_peak = [0]
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})

        def sample() -> None:
            while process.poll() is None:
                pids = _tree(process.pid)
                for pid in pids:
                    peaks[pid] = max(peaks.get(pid, 0), _status_kb(pid, "VmHWM"))
                tree_peak[0] = max(tree_peak[0], sum(_pss_kb(pid) for pid in pids))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        sampler.join()
    wall = time.perf_counter() - start
    return {
        "exit_code": code,
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(max(peaks.values(), default=0) / 1024),
        "peak_tree_pss_mb": round(tree_peak[0] / 1024),
        "processes_seen": len(peaks),
        "log_tail": log.read_text(errors="replace")[-600:] if code else "",
    }


# --- the ids ----------------------------------------------------------------------------------------------


def _bin_ids(prefix: Path) -> np.ndarray:
    from dapt.megatron_data import read_data_record, split_prefix

    dtype = np.dtype(read_data_record(prefix)["dtype"])
    return np.memmap(split_prefix(prefix, "train") + ".bin", dtype=dtype, mode="r")


def _processors(model: Path):
    import sentencepiece as spm

    from dapt.compat import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    assert not any("\n" in p.piece for p in proto.pieces), "a piece holds a newline: the independent cut is unsafe"
    assert proto.trainer_spec.byte_fallback and not proto.normalizer_spec.remove_extra_whitespaces
    assert proto.normalizer_spec.name == "identity" and proto.trainer_spec.model_type == 2  # BPE
    whole = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    proto.normalizer_spec.add_dummy_prefix = False
    return whole, spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def whole_document_check(model: Path, texts: list[str], megabytes: float, prefix: Path) -> dict:
    whole, _ = _processors(model)
    text = "".join(document_blocks(texts, megabytes))
    expected = np.array([*whole.encode(text), whole.eos_id()])
    got = _bin_ids(prefix)
    return {"document_mb": round(len(text.encode()) / 1e6, 2), "tokens": int(expected.size),
            "equal": bool(got.size == expected.size and np.array_equal(got, expected))}


def independent_cut_check(model: Path, texts: list[str], megabytes: float, prefix: Path) -> dict:
    whole, inner = _processors(model)
    got = _bin_ids(prefix)
    offset, blocks, equal = 0, 0, True
    for block in document_blocks(texts, megabytes):
        ids = np.array((inner if blocks else whole).encode(block))
        if not np.array_equal(got[offset:offset + ids.size], ids):
            equal = False
            break
        offset += ids.size
        blocks += 1
    equal = equal and offset + 1 == got.size and int(got[offset]) == whole.eos_id()
    return {"blocks_encoded_separately": blocks, "tokens": int(got.size), "equal": equal}


# --- main -------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200.0, help="size of the single document")
    parser.add_argument("--check-mb", type=float, default=4.0, help="document compared with whole encoding")
    parser.add_argument("--stages", nargs="+", default=["data", "tokenizer"], choices=["data", "tokenizer"])
    parser.add_argument("--limit-gb", type=float, default=6.0, help="address-space limit of each stage")
    parser.add_argument("--workers", type=int, default=2, help="data stage workers")
    args = parser.parse_args()
    model_dir = SHARED / "models" / "llama2-tokenizer"
    if not (SHARED / "data" / "domain").is_dir() or not (model_dir / "tokenizer.model").is_file():
        print(json.dumps({"skipped": f"{SHARED} lacks data/domain or the Llama 2 tokenizer"}))
        return 0
    limit = int(args.limit_gb * 1e9)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # this process too (whole encoding of the check)
    texts = source_texts(SHARED / "data")
    tmp = Path(tempfile.mkdtemp(prefix="dapt-bench-memory-"))
    python = [sys.executable, "-m", "dapt"]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "code"), os.environ.get("PYTHONPATH", "")])
    result: dict = {"document_mb": args.mb, "limit_gb": args.limit_gb, "target_mb": TARGET_MB,
                    "cpus": len(os.sched_getaffinity(0))}
    try:
        big = tmp / "big" / "one_document.jsonl"
        result["document_bytes"] = write_document(big, document_blocks(texts, args.mb))
        if "data" in args.stages:
            small = tmp / "small" / "check_document.jsonl"
            write_document(small, document_blocks(texts, args.check_mb))
            data = ["data", "--tokenizer", str(model_dir), "--split-percent", "100", "0", "0",
                    "--workers", str(args.workers)]
            check = run_measured([*python, *data, "--input", str(small), "--output-prefix", str(tmp / "d4" / "d")],
                                 limit, tmp / "data_check.log")
            stage = run_measured([*python, *data, "--input", str(big), "--output-prefix", str(tmp / "d200" / "d")],
                                 limit, tmp / "data.log")
            if check["exit_code"] == 0:
                stage["whole_document_check"] = whole_document_check(model_dir / "tokenizer.model", texts,
                                                                     args.check_mb, tmp / "d4" / "d")
            if stage["exit_code"] == 0:
                stage["independent_cut_check"] = independent_cut_check(model_dir / "tokenizer.model", texts,
                                                                       args.mb, tmp / "d200" / "d")
            result["data"] = stage
        if "tokenizer" in args.stages:
            heldout = SHARED / "data" / "heldout"
            command = [*python, "tokenizer", "--base-tokenizer", str(model_dir), "--domain-data", str(big.parent),
                       "--general-data", str(SHARED / "data" / "general"), "--output", str(tmp / "tok"),
                       "--heldout-domain", str(heldout / "domain_heldout.jsonl"),
                       "--heldout-general", str(heldout / "general_heldout.jsonl")]
            result["tokenizer"] = run_measured(command, limit, tmp / "tokenizer.log")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = True
    for name in args.stages:
        stage = result[name]
        stage["under_target"] = stage["exit_code"] == 0 and max(stage["peak_rss_mb"],
                                                                 stage["peak_tree_pss_mb"]) < TARGET_MB
        ok &= stage["exit_code"] == 0
    if "data" in result:
        checks = [result["data"].get(k, {}).get("equal") for k in ("whole_document_check", "independent_cut_check")]
        ok &= all(checks)
    result["passed"] = ok and all(result[name]["under_target"] for name in args.stages)
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
