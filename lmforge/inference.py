"""Encoder inference: `lmforge fill-mask` (top-k tokens for each [MASK]) and `lmforge embed` (vectors).

    $ lmforge fill-mask runs/bert "Paris is the [MASK] of France." --top-k 5
    $ lmforge embed runs/bert --input sentences.txt --pooling mean --normalize --output emb.npy

Python:

    >>> model, tok = load_encoder("runs/bert")
    >>> fill_mask(model, tok, "Paris is the [MASK] of France.", top_k=2)
    [[{'token': 'capital', 'id': 3007, 'prob': 0.91}, {'token': 'center', 'id': 2415, 'prob': 0.02}]]
    >>> embed(model, tok, ["a cat", "a dog"], pooling="mean", normalize=True).shape
    (2, 384)

Text is encoded as [CLS] text [SEP] (truncated to the model's max_seq_len). Mean pooling averages
the last hidden states over the attention mask ([CLS] and [SEP] included, as sentence-transformers
does); cls pooling takes the [CLS] hidden state. Any BERT run dir works for embed, including an
imported backbone without an MLM head (model.heads=none); fill-mask needs the MLM head.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.io import atomic_write_bytes, atomic_write_text


def load_encoder(run: str | Path, device: str = "cpu"):
    """(model, tokenizer) from a run dir (or whatever `lmforge.api.load` reads); the model must be a BERT."""
    from lmforge.api import load
    from lmforge.runtime import pick_device

    model, tok = load(run, device=pick_device(device, flag="--device"), need_tokenizer=True)
    if model.cfg.family != "bert":
        raise CheckpointError(f"{run} holds a {model.cfg.family!r} model; fill-mask and embed need an "
                              "encoder (model.family=bert)")
    return model.eval(), tok


def _encode(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """[CLS] ids [SEP] per text, with the text truncated to fit max_len."""
    cls, sep = tokenizer.cls_id, tokenizer.sep_id
    if cls is None or sep is None:
        raise CheckpointError("tokenizer has no [CLS] / [SEP]; an encoder run needs a WordPiece tokenizer")
    return [[cls, *ids[: max_len - 2], sep] for ids in tokenizer.encode_batch(texts)]


def _pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad -> input_ids (B, T), attention_mask (B, T)."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    am = torch.zeros((len(rows), T), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        am[r, : len(row)] = 1
    return ids.to(device), am.to(device)


@torch.no_grad()
def fill_mask(model, tokenizer, text: str, top_k: int = 5) -> list[list[dict]]:
    """For each [MASK] in `text`, in order: the top_k tokens [{token, id, prob}] by probability."""
    if getattr(model, "mlm", None) is None:
        raise CheckpointError("this model has no MLM head (model.heads=none); fill-mask needs a masked LM; "
                              "use `lmforge embed` for a backbone")
    if tokenizer.mask_id is None:
        raise CheckpointError("tokenizer has no [MASK] token; fill-mask needs a WordPiece (BERT) tokenizer")
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    dev = next(model.parameters()).device
    (row,) = _encode(tokenizer, [text], model.cfg.max_seq_len)
    ids = torch.tensor([row], device=dev)  # (1, T)
    where = ids[0] == tokenizer.mask_id  # (T,)
    n_masks = tokenizer.encode(text).count(tokenizer.mask_id)
    if n_masks == 0:
        raise DataError(f"no [MASK] in {text!r}; write the token to predict as [MASK], "
                        "e.g. \"Paris is the [MASK] of France.\"")
    if int(where.sum()) < n_masks:  # truncation cut one off
        raise DataError(f"a [MASK] falls after the first max_seq_len={model.cfg.max_seq_len} tokens "
                        "(with [CLS] and [SEP]); shorten the text so every [MASK] comes earlier")
    logits = model(ids, mlm_positions=where[None]).mlm_logits.float()  # (n_mask, V)
    logits[:, tokenizer.vocab_size:] = float("-inf")  # rows past the tokenizer (a padded vocab) spell nothing
    probs = F.softmax(logits, dim=-1)
    p, idx = probs.topk(min(top_k, tokenizer.vocab_size), dim=-1)  # (n_mask, k)
    return [[{"token": tokenizer.id_to_token(int(i)), "id": int(i), "prob": float(q)} for q, i in zip(pr, ir)]
            for pr, ir in zip(p.tolist(), idx.tolist())]


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], pooling: str = "mean", normalize: bool = False,
          batch_size: int = 32) -> np.ndarray:
    """texts -> float32 (N, d_model): last hidden states, mean-pooled over the attention mask or [CLS]."""
    if pooling not in ("mean", "cls"):
        raise ConfigError(f"--pooling {pooling!r} is not valid; choose mean or cls")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    dev = next(model.parameters()).device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    out = []
    for i in range(0, len(texts), batch_size):
        ids, am = _pad(_encode(tokenizer, texts[i : i + batch_size], model.cfg.max_seq_len), pad, dev)
        h = model.encode(ids, attention_mask=am).float()  # (B, T, C)
        if pooling == "cls":
            v = h[:, 0]  # (B, C)
        else:
            m = am[..., None].float()  # (B, T, 1)
            v = (h * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, C)
        if normalize:
            v = F.normalize(v, dim=-1)
        out.append(v.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.d_model), np.float32)


# ---------------------------------------------------------------------------------------------
# CLI


def read_texts(path: str | Path, text_field: str | None = None) -> list[str]:
    """The texts of one file: a .jsonl / .json / .csv / .parquet file (.gz but Parquet) read by
    lmforge.data.readers, as `--data` is (field `text_field`, default text, or the only text column
    of a CSV / Parquet); any other file is UTF-8 text (.gz decompressed), one text per line. Empty
    texts are skipped; text that is not UTF-8 is an error, never U+FFFD embedded."""
    from lmforge.data import readers
    from lmforge.data.readers import RECORD_EXTS, ReadStats, file_kind, iter_documents

    path = Path(path)
    records = "a .jsonl, .json, .csv or .parquet file"
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"input file {path} {what}; give --input a text file (one text per line) "
                        f"or {records}")
    if file_kind(path) in RECORD_EXTS:
        stats = ReadStats()
        texts = list(iter_documents(path, text_field=text_field or "text", stats=stats))
        if stats.replaced_bytes:
            raise DataError(f"{path} is not UTF-8 ({stats.replaced_bytes} bad bytes); convert it, e.g. "
                            "`iconv -f latin1 -t utf-8`")
        return texts
    if text_field is not None:
        raise ConfigError(f"--text-field is for {records}; {path} is read as text, one text per line")
    try:
        with gzip.open(path) if path.suffix.lower() == ".gz" else open(path, "rb") as f:
            data = f.read()
    except readers.GZIP_ERRORS as e:
        raise readers.gzip_error(path, e) from None
    try:
        lines = data.decode("utf-8").removeprefix("\ufeff").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8`, or give --input {records}") from None
    texts = [ln for ln in lines if ln.strip()]
    if not texts:
        raise DataError(f"{path} holds no text; give one text per line")
    return texts


def register_fill_mask(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run dir of a BERT with an MLM head (config.json, weights, tokenizer)")
    parser.add_argument("text", help='text with one or more [MASK], e.g. "Paris is the [MASK] of France."')
    parser.add_argument("--top-k", type=int, default=5, help="predictions per [MASK] (default 5)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--json", action="store_true", help="print the predictions as JSON")
    parser.set_defaults(func=_cmd_fill_mask)


def _cmd_fill_mask(args: argparse.Namespace) -> int:
    model, tok = load_encoder(args.run, args.device)
    preds = fill_mask(model, tok, args.text, args.top_k)
    if args.json:
        print(json.dumps(preds, ensure_ascii=False))
        return 0
    for n, cands in enumerate(preds, 1):
        print(f"[MASK] {n}:")
        for c in cands:
            print(f"  {c['token']:<20} {c['prob']:.4f}")
    return 0


def register_embed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run dir of a BERT (any heads, e.g. an imported sentence encoder)")
    parser.add_argument("--input", required=True,
                        help="text file (one text per line), or .jsonl / .json / .csv / .parquet (.gz too)")
    parser.add_argument("--text-field", default=None,
                        help="JSON key / column holding the text (default: text, or the only text column)")
    parser.add_argument("--pooling", default="mean", choices=("mean", "cls"), help="default mean")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise each vector")
    parser.add_argument("--output", default=None,
                        help="OUT.npy (float32 (N, d)) or OUT.jsonl ({text, embedding}); default: stdout")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.set_defaults(func=_cmd_embed)


def _cmd_embed(args: argparse.Namespace) -> int:
    out = Path(args.output) if args.output else None
    if out is not None and out.suffix not in (".npy", ".jsonl"):
        raise ConfigError(f"--output {out} must end in .npy or .jsonl")
    if out is not None and out.is_dir():  # before the work, and named as given (not the temp file)
        raise ConfigError(f"--output {out} is a folder; give a file path ending in .npy or .jsonl")
    if out is not None and out.is_file() and Path(args.input).is_file() and out.samefile(args.input):
        raise ConfigError(f"--output {out} is the --input file; writing it would replace the texts, give "
                          "another path")
    texts = read_texts(args.input, args.text_field)
    model, tok = load_encoder(args.run, args.device)
    vecs = embed(model, tok, texts, args.pooling, args.normalize, args.batch_size)
    if out is not None and out.suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, vecs)
        atomic_write_bytes(out, buf.getvalue())
    else:
        text = "".join(json.dumps({"text": t, "embedding": v.tolist()}, ensure_ascii=False) + "\n"
                       for t, v in zip(texts, vecs))
        if out is None:
            sys.stdout.write(text)
            return 0
        atomic_write_text(out, text)
    print(f"wrote {len(vecs)} x {vecs.shape[1]} embeddings ({args.pooling} pooling"
          f"{', normalized' if args.normalize else ''}) to {out}", file=sys.stderr)
    return 0
