"""Tokenizers across the Hugging Face boundary: the tokenizer half of `lmforge convert`.

Import: an HF folder's `tokenizer.json` is taken as is. Older folders carry only the slow-tokenizer
files; those are rebuilt with the `tokenizers` library into the same pipeline HF's fast converter
builds:
    vocab.txt               -> WordPiece + BERT normalizer / pre-tokenizer / [CLS] A [SEP] post-processor
                               (lowercasing from tokenizer_config.json `do_lower_case`, default True)
    vocab.json + merges.txt -> byte-level BPE (GPT-2)
A tokenizer.json's built-in padding / truncation settings are dropped: lmforge pads its own batches.
Export: `tokenizer.json` is copied and a `tokenizer_config.json` naming the special tokens is written,
so `transformers.AutoTokenizer.from_pretrained(dir)` loads it. A GPT's copy encodes a prompt as lmforge
does (`prompt_post_processor`): our WordPiece's [CLS] A [SEP] and Unigram's A </s> are for BERT and T5.

    >>> tok = tokenizer_from_hf("bert-dir")        # a tokenizers.Tokenizer, or None when the folder has none
    >>> tok.encode("Hello world").tokens
    ['[CLS]', 'hello', 'world', '[SEP]']
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from lmforge.errors import CheckpointError
from lmforge.models.convert_config import read_json


def wordpiece_from_vocab(
    vocab_file: Path, lowercase: bool = True, strip_accents: bool | None = None, chinese_chars: bool = True
) -> Tokenizer:
    """A BERT WordPiece tokenizer from a `vocab.txt` (one token a line, id = line number).

    >>> wordpiece_from_vocab(Path("vocab.txt")).encode("Hi there", "you").type_ids
    [0, 0, 0, 0, 1, 1]
    """
    vocab: dict[str, int] = {}
    try:
        with vocab_file.open(encoding="utf-8") as f:  # as transformers' load_vocab: id = line number, even
            for i, line in enumerate(f.readlines()):  # for a blank line or a repeat (the last one wins); only
                vocab[line.rstrip("\n")] = i          # \n (and \r\n) ends a line, not U+2028 and friends
    except UnicodeDecodeError:
        raise CheckpointError(f"{vocab_file} is not UTF-8 text; re-download it") from None
    for needed in ("[UNK]", "[CLS]", "[SEP]"):
        if needed not in vocab:
            raise CheckpointError(
                f"{vocab_file} has no {needed} token; a BERT vocab.txt needs [UNK] [CLS] [SEP]"
            )
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=chinese_chars, strip_accents=strip_accents, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    specials = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab]
    tok.add_special_tokens(specials)  # already in the vocab: only marks them unsplittable
    return tok


def bytelevel_bpe_from_files(vocab_file: Path, merges_file: Path) -> Tokenizer:
    """GPT-2's byte-level BPE from `vocab.json` + `merges.txt` (no prefix space, no post-processing)."""
    try:
        tok = Tokenizer(models.BPE.from_file(str(vocab_file), str(merges_file)))
    except Exception as e:  # the Rust side raises a plain Exception: "Error while reading BPE files: ..."
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{vocab_file} + {merges_file.name} cannot be read ({why}); "
                              "re-download them") from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if tok.token_to_id("<|endoftext|>") is not None:
        tok.add_special_tokens(["<|endoftext|>"])
    return tok


def tokenizer_from_hf(hf_dir: str | Path) -> Tokenizer | None:
    """The tokenizer an HF folder ships, as a `tokenizers.Tokenizer`; None when it ships none."""
    hf_dir = Path(hf_dir)
    if (hf_dir / "tokenizer.json").exists():
        try:
            tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise CheckpointError(
                f"{hf_dir / 'tokenizer.json'} cannot be read ({e}); fix or remove it"
            ) from None
        # some files bake in padding / truncation (all-MiniLM: pad every text to 128); lmforge pads its
        # own batches and must never cut a document silently, so the tokenizer returns raw ids only
        tok.no_padding()
        tok.no_truncation()
        return tok
    tcfg = read_json(hf_dir / "tokenizer_config.json") if (hf_dir / "tokenizer_config.json").exists() else {}
    if (hf_dir / "vocab.txt").exists():
        return wordpiece_from_vocab(
            hf_dir / "vocab.txt",
            lowercase=bool(tcfg.get("do_lower_case", True)),
            strip_accents=tcfg.get("strip_accents"),
            chinese_chars=bool(tcfg.get("tokenize_chinese_chars", True)),
        )
    if (hf_dir / "vocab.json").exists() and (hf_dir / "merges.txt").exists():
        return bytelevel_bpe_from_files(hf_dir / "vocab.json", hf_dir / "merges.txt")
    return None


def prompt_post_processor(tok: Tokenizer) -> Tokenizer:
    """A copy of `tok` whose post-processor adds to a text what lmforge adds to a generation prompt.

    `Tokenizer.encode_prompt` gives the raw ids, with bos in front where the template starts with it
    (Llama), while `transformers` applies the whole post-processor (`add_special_tokens=True`). So a
    template becomes "bos $A" or goes (a Llama one that already reads so stays as it is), Bert / Roberta
    processors go, and ByteLevel (offsets only) stays.

    >>> prompt_post_processor(wordpiece).encode("hi there").tokens      # was [CLS] hi there [SEP]
    ['hi', 'there']
    """
    from lmforge.tokenizer import Tokenizer as Ours
    from lmforge.tokenizer import post_processor_steps

    ours = Ours(tok)
    leads = ours.bos_id is not None and ours.prompts_start_with_bos()
    bos = ours.id_to_token(ours.bos_id) if leads else None
    want = json.loads(processors.TemplateProcessing(  # its JSON, as tokenizer.json holds it
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, ours.bos_id)]
    ).__getstate__()) if bos else None
    spec = json.loads(tok.to_str())
    kept = []
    for step in post_processor_steps(spec):
        if step["type"] == "ByteLevel":
            kept.append(step)
        elif step["type"] == "TemplateProcessing" and want:
            kept.append(step if step["single"] == want["single"] else want)
    spec["post_processor"] = (None if not kept else kept[0] if len(kept) == 1
                              else {"type": "Sequence", "processors": kept})
    return Tokenizer.from_str(json.dumps(spec))


def write_hf_tokenizer(tok: Tokenizer, out_dir: Path, max_len: int, causal: bool = False) -> dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json into `out_dir`; return {'eos_token_id': 2, ...}.

    The special tokens are the roles lmforge's Tokenizer recognises (eos, bos, pad, unk, cls, sep, mask).
    `causal` (a GPT): `tokenizer(prompt)` in transformers gives the ids lmforge generates from
    (`prompt_post_processor`); an encoder keeps its [CLS] A [SEP].
    """
    from lmforge.tokenizer import Tokenizer as Ours

    ours = Ours(tok)
    (prompt_post_processor(tok) if causal else tok).save(str(out_dir / "tokenizer.json"))
    ids = {role: getattr(ours, f"{role}_id") for role in ("bos", "eos", "unk", "pad", "cls", "sep", "mask")}
    ids = {role: i for role, i in ids.items() if i is not None}
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}
    tcfg.update({f"{role}_token": ours.id_to_token(i) for role, i in ids.items()})
    if "cls" in ids:  # BERT: generate() must not treat [CLS] / [SEP] as bos / eos
        tcfg.pop("bos_token", None)
        tcfg.pop("eos_token", None)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n", encoding="utf-8")
    return {f"{role}_token_id": i for role, i in ids.items() if role in ("bos", "eos", "pad")}
