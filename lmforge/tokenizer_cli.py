"""`lmforge tokenizer train|stats`, and the per-language measures that `stats` prints.

Training and the tokenizer itself live in lmforge/tokenizer.py; this module is the command line over
them, plus what a user wants to know of a trained tokenizer: how many bytes a token covers, how many
tokens a word (or, for Chinese, a character) costs, how often [UNK] shows up, per language.

    $ lmforge tokenizer train --type bpe --data shakespeare --vocab-size 8192 --out tok/
    $ lmforge tokenizer stats tok/ --data heldout.txt
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmforge.errors import ConfigError
from lmforge.tokenizer import TYPES, Tokenizer, save_path, train

# ---------------------------------------------------------------------------------------------
# stats


def is_cjk(ch: str) -> bool:
    """Han ideographs, kana and hangul: scripts written without spaces between words.

    >>> is_cjk("中"), is_cjk("a")
    (True, False)
    """
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2FA1F
        or 0xF900 <= cp <= 0xFAFF or 0x3040 <= cp <= 0x30FF or 0xAC00 <= cp <= 0xD7AF
    )


def language_of(text: str) -> str:
    """'zh' when more than 30% of the letters are CJK ideographs (Chinese text mixes in Latin words and
    names), else 'other'.

    >>> language_of("今天天气很好, ok"), language_of("the weather is fine")
    ('zh', 'other')
    """
    letters = [c for c in text[:4000] if unicodedata.category(c)[0] == "L"]
    cjk = sum(map(is_cjk, letters))
    return "zh" if letters and cjk / len(letters) > 0.3 else "other"


def stats(tok: Tokenizer, docs: Iterable[str], sample_bytes: int = 2_000_000) -> dict[str, dict]:
    """Per language: documents, bytes, tokens, bytes/token, tokens/word (other), tokens/char (zh), unk %."""
    out: dict[str, dict] = {}
    seen = 0
    for doc in docs:
        if seen >= sample_bytes:
            break
        nbytes = len(doc.encode("utf-8"))
        seen += nbytes
        ids = tok.encode(doc)
        s = out.setdefault(language_of(doc), dict(documents=0, bytes=0, chars=0, words=0, tokens=0, unk=0))
        s["documents"] += 1
        s["bytes"] += nbytes
        s["chars"] += sum(1 for c in doc if not c.isspace())
        s["words"] += len(doc.split())
        s["tokens"] += len(ids)
        s["unk"] += ids.count(tok.unk_id) if tok.unk_id is not None else 0
    for s in out.values():
        t = max(s["tokens"], 1)
        s["bytes_per_token"] = s["bytes"] / t
        s["tokens_per_word"] = s["tokens"] / max(s["words"], 1)
        s["tokens_per_char"] = s["tokens"] / max(s["chars"], 1)
        s["unk_percent"] = 100 * s["unk"] / t
    return out


def format_stats(tok: Tokenizer, table: dict[str, dict]) -> str:
    lines = [f"{tok.kind} tokenizer, vocab size {tok.vocab_size:,}"]
    for lang, s in sorted(table.items()):
        per = (
            f"tokens/char {s['tokens_per_char']:.3f} (words are not space-separated)"
            if lang == "zh" else f"tokens/word {s['tokens_per_word']:.3f}"
        )
        lines.append(
            f"  {lang:<5} docs {s['documents']:>7,}  bytes {s['bytes']:>11,}  tokens {s['tokens']:>10,}  "
            f"bytes/token {s['bytes_per_token']:.3f}  {per}  unk {s['unk_percent']:.2f}%"
        )
    if not table:
        lines.append("  (no documents in the sample)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser(
        "train", help="train a tokenizer on documents (streaming) and write OUT/tokenizer.json",
        description="Train a tokenizer with the `tokenizers` library, streaming the documents.",
    )
    p.add_argument("--type", required=True, choices=TYPES,
                   help="bpe: byte-level BPE (GPT); wordpiece: BERT; unigram: T5-style")
    p.add_argument("--data", action="append", required=True, metavar="SPEC",
                   help="named source, file, glob or folder (txt/jsonl/csv/parquet); repeatable")
    p.add_argument("--vocab-size", type=int, required=True, help="total vocabulary, specials included")
    p.add_argument("--out", required=True, help="folder to write tokenizer.json into, or a path ending in "
                   ".json: the file itself")
    p.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer.json at --out")
    p.add_argument("--text-field", default="text", help="column / JSON key holding the text (default: text)")
    p.add_argument("--cased", action="store_true", help="wordpiece: keep case (default lowercases)")
    p.add_argument("--extra-ids", type=int, default=100, help="unigram: number of <extra_id_N> sentinels")
    p.add_argument("--min-frequency", type=int, default=2, help="bpe/wordpiece: minimum pair frequency")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "stats", help="vocab size, bytes/token, tokens/word (tokens/char for zh) on a held-out sample",
        description="Measure a tokenizer on held-out text, per language (zh vs other, by script).",
    )
    p.add_argument("tokenizer", help="tokenizer.json or a folder holding one")
    p.add_argument("--data", action="append", required=True, metavar="SPEC", help="held-out text; repeatable")
    p.add_argument("--sample-mb", type=float, default=2.0, help="megabytes of text to measure (default 2)")
    p.add_argument("--text-field", default="text", help="column / JSON key holding the text")
    p.set_defaults(func=_cmd_stats)


def _documents(specs: list[str], text_field: str, stats_obj=None) -> Iterator[str]:
    from lmforge.data.readers import iter_documents

    for spec in specs:
        yield from iter_documents(spec, text_field=text_field, stats=stats_obj)


def _out_file(out: str, overwrite: bool) -> Path:
    """`--out`: a folder (tokenizer.json goes into it) or a path ending in .json (that very file)."""
    file = save_path(out)
    if file != Path(out) and Path(out).is_file():
        raise ConfigError(f"--out {out} is a file, not a folder; give a folder or a path ending in .json")
    if what := _not_a_tokenizer_folder(file.parent):  # even with --overwrite: the ids there mean its tokens
        raise ConfigError(f"{file.parent} is {what}, not a tokenizer folder: its tokenizer.json must stay "
                          "the one it was made with; choose another --out")
    if file.exists() and not overwrite:
        raise ConfigError(f"{file} already exists; pass --overwrite to replace it, or choose another --out")
    return file


def _not_a_tokenizer_folder(folder: Path) -> str:
    """What else lmforge wrote `folder` as: 'a shard folder (meta.json)', 'a run dir (run.yaml)', a model
    or checkpoint folder; '' for a new folder, a tokenizer folder or any other."""
    from lmforge.data.readers import lmforge_output

    if (folder / "meta.json").is_file():
        return "a shard folder (meta.json)"
    what = lmforge_output(folder)
    return "" if what.startswith("a tokenizer") else what


def _cmd_train(args: argparse.Namespace) -> int:
    t0 = time.time()
    if args.min_frequency < 0:
        raise ConfigError(f"--min-frequency must be >= 0 (the fewest times a merge must occur), "
                          f"got {args.min_frequency}")
    out = _out_file(args.out, args.overwrite)  # before training: a refusal costs nothing
    from lmforge.data.readers import ReadStats

    read = ReadStats()
    tok = train(
        args.type, _documents(args.data, args.text_field, read), args.vocab_size, lowercase=not args.cased,
        extra_ids=args.extra_ids, min_frequency=args.min_frequency, show_progress=sys.stderr.isatty(),
    )
    path = tok.save(out)
    print(f"wrote {path}: {tok.kind}, vocab size {tok.vocab_size:,}, {time.time() - t0:.1f}s")
    if read.replaced_bytes:
        print(f"note: {read.replaced_bytes:,} input byte(s) were not valid UTF-8 and became U+FFFD; "
              "convert the files to UTF-8 (e.g. iconv -t UTF-8) for their characters to count",
              file=sys.stderr)
    if tok.vocab_size < args.vocab_size:
        print(f"note: the data gave {tok.vocab_size:,} tokens, fewer than --vocab-size {args.vocab_size:,}; "
              "more (or more varied) text would fill the rest", file=sys.stderr)
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    if not 0 < args.sample_mb < float("inf"):  # NaN fails too
        raise ConfigError(f"--sample-mb must be a positive number of megabytes, got {args.sample_mb}")
    tok = Tokenizer.load(args.tokenizer)
    table = stats(tok, _documents(args.data, args.text_field), math.ceil(args.sample_mb * 1e6))
    print(format_stats(tok, table))
    return 0
