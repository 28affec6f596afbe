"""`lmforge <verb>`: a table of verb -> module. Each module defines `register(parser)`, which adds
its arguments and sets `func` (and, for verbs that take config overrides, `overrides=True`).

Modules are imported only when their verb runs, so `lmforge --help` stays fast. Every
`LmforgeError`, and any OSError the system raises on a path, becomes one line on stderr and exit
code 2; no traceback for user mistakes.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lmforge.errors import LmforgeError

VERBS: dict[str, tuple[str, str]] = {
    "data": ("lmforge.data.sources", "list and fetch named real corpora"),
    "tokenizer": ("lmforge.tokenizer_cli", "train a BPE / WordPiece / Unigram tokenizer; print stats"),
    "prepare": ("lmforge.data.prepare", "text -> uint16/uint32 token shards + meta.json"),
    "model": ("lmforge.models.info", "model info CONFIG: parameters, FLOPs per token, memory"),
    "pretrain": ("lmforge.train.pretrain", "pretrain a model (clm | mlm | mlm,nsp) with the one Trainer"),
    "eval": ("lmforge.train.evaluate", "loss, perplexity and bits per byte of a run dir on token shards"),
    "generate": ("lmforge.generate", "generate text from a run dir"),
    "fill-mask": ("lmforge.inference", "top-k predictions for [MASK] with a BERT run dir"),
    "embed": ("lmforge.inference", "sentence / token embeddings from an encoder run dir"),
    "convert": ("lmforge.models.convert", "import from / export to the Hugging Face format"),
    "quickstart": ("lmforge.quickstart", "fetch -> tokenizer -> shards -> pretrain -> samples, in one go"),
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="lmforge: from raw text to a working language model and back out.",
        epilog="Run `lmforge VERB --help` for a verb's options.",
    )
    from lmforge import __version__

    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module, help_) in VERBS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == verb:
            mod = importlib.import_module(module)
            register = getattr(mod, f"register_{name.replace('-', '_')}", None) or mod.register
            register(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    debug = os.environ.get("LMFORGE_DEBUG") == "1"
    try:
        parser = build_parser(verb if verb in VERBS else None)
        args, extra = parser.parse_known_args(argv)
        if args.verb is None:
            parser.print_help()
            if not argv or argv[0] in ("-h", "--help"):
                return 0
            # `lmforge --bogus`: the help on stdout, and on stderr what was wrong
            print(f"error: unrecognized arguments: {' '.join(extra or argv)}; give a verb first, e.g. "
                  "`lmforge generate --help`", file=sys.stderr)
            return 2
        if extra and not getattr(args, "overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if getattr(args, "overrides", False):
            args.overrides = extra
        return int(args.func(args) or 0)
    except LmforgeError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmforge generate ... | head`: the reader left; stop quietly, as `cat` would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # 128 + SIGPIPE, what a shell reports for a tool the pipe killed
    except OSError as e:  # a path the system refuses: a file where a folder must go, no permission, disk full
        if debug or e.strerror is None:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror}{where}; check the path, its permissions and free disk space",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
