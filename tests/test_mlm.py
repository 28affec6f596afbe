"""MLM / NSP batches: pinned literal masks, 15% and 80/10/10 statistics, whole words, NSP pairs, resume,
weighted NSP loss and exact accumulation."""

import itertools

import numpy as np
import pytest
import torch

from lmforge.objectives.mlm import IGNORE, mask_tokens, special_id_tensor
from lmforge.objectives.nsp import encode_pair, nsp_pairs, pad_batch, split_segments, truncate_pair

PAD, CLS, SEP, MASK = 0, 2, 3, 4
SPECIAL = torch.tensor([PAD, CLS, SEP, MASK])
RANDOM = torch.arange(5, 40)


def test_mask_literal_example():
    # fixed seed -> exact masks: row 0 keeps 11 (selected, unchanged), masks 12 13 14;
    # row 1 masks 24 25 and replaces 26 by the random token 32. [CLS] [SEP] [PAD] never touched.
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16, 3, 0, 0], [2, 20, 21, 22, 3, 23, 24, 25, 26, 27, 3]])
    g = torch.Generator().manual_seed(4)
    x, y = mask_tokens(ids, mask_id=MASK, special_ids=SPECIAL, random_ids=RANDOM, mlm_prob=0.4, generator=g)
    assert x.tolist() == [[2, 10, 11, 4, 4, 4, 15, 16, 3, 0, 0], [2, 20, 21, 22, 3, 23, 4, 4, 32, 27, 3]]
    assert y.tolist() == [
        [-100, -100, 11, 12, 13, 14, -100, -100, -100, -100, -100],
        [-100, -100, -100, -100, -100, -100, 24, 25, 26, -100, -100],
    ]


def test_mask_statistics_15_percent_and_80_10_10():
    g = torch.Generator().manual_seed(0)
    V = 1000
    ids = torch.randint(5, V, (400, 128), generator=g)
    ids[:, 0], ids[:, -1], ids[:, 60] = CLS, SEP, SEP
    ids[::3, 100:] = PAD
    x, y = mask_tokens(ids, mask_id=MASK, special_ids=SPECIAL, random_ids=torch.arange(5, V),
                       generator=g, mlm_prob=0.15)
    special = torch.isin(ids, SPECIAL)
    sel = y != IGNORE
    assert not (sel & special).any() and (x[special] == ids[special]).all()
    assert (y[sel] == ids[sel]).all() and (x[~sel] == ids[~sel]).all()
    frac = sel.sum().item() / (~special).sum().item()
    assert abs(frac - 0.15) < 0.005, frac
    n = sel.sum().item()
    masked = (x[sel] == MASK).sum().item() / n
    replaced = (x[sel] != ids[sel]).sum().item() / n - masked
    kept = (x[sel] == ids[sel]).sum().item() / n
    assert abs(masked - 0.8) < 0.01 and abs(replaced - 0.1) < 0.01 and abs(kept - 0.1) < 0.01
    assert not torch.isin(x[sel & (x != MASK)], SPECIAL).any()  # random tokens are never special


def test_every_row_gets_a_target():
    ids = torch.tensor([[CLS, 7, 8, SEP], [CLS, 9, SEP, PAD]])
    for seed in range(20):
        _, y = mask_tokens(ids, mask_id=MASK, special_ids=SPECIAL, random_ids=RANDOM, mlm_prob=0.01,
                           generator=torch.Generator().manual_seed(seed))
        assert ((y != IGNORE).sum(1) >= 1).all()


def test_whole_word_masking_keeps_words_together():
    # ids 30..39 are '##' continuation pieces; words are a start piece plus following '##' pieces
    cont = torch.zeros(64, dtype=torch.bool)
    cont[30:40] = True
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 40, (200, 64), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    x, y = mask_tokens(ids, mask_id=MASK, special_ids=SPECIAL, random_ids=RANDOM, mlm_prob=0.15,
                       generator=g, continuation=cont)
    sel = y != IGNORE
    special = torch.isin(ids, SPECIAL)
    piece = cont[ids] & ~special
    piece[:, 1:] &= ~special[:, :-1]  # a '##' right after [CLS] starts its own word
    # a continuation piece is selected iff the piece before it is (its word's earlier piece)
    assert (sel[:, 1:][piece[:, 1:]] == sel[:, :-1][piece[:, 1:]]).all()
    frac = sel.sum().item() / (~torch.isin(ids, SPECIAL)).sum().item()
    assert 0.12 < frac < 0.18  # word-level 15% keeps the token rate near 15%
    # without the table the same batch splits words
    _, y2 = mask_tokens(ids, mask_id=MASK, special_ids=SPECIAL, random_ids=RANDOM, mlm_prob=0.15,
                        generator=torch.Generator().manual_seed(1))
    s2 = y2 != IGNORE
    assert (s2[:, 1:][piece[:, 1:]] != s2[:, :-1][piece[:, 1:]]).any()


def test_segments_truncation_and_encoding_literal():
    assert split_segments([5, 6, 1, 7, 1, 8, 9, 9, 9], {1}, 3) == [[5, 6, 1], [7, 1], [8, 9, 9], [9]]
    assert truncate_pair([1, 2, 3, 4, 5], [6, 7], 5) == ([1, 2, 3], [6, 7])
    assert truncate_pair([1, 2], [6, 7, 8, 9], 4) == ([1, 2], [6, 7])
    # with an rng, as BERT: each dropped token comes off the front or the end of the longer segment
    seen = set()
    for seed in range(200):
        a, b = truncate_pair(list(range(10)), [50, 51, 52], 8, np.random.default_rng(seed))
        assert b == [50, 51, 52] and len(a) == 5 and a == list(range(a[0], a[0] + 5))  # a contiguous span
        seen.add(a[0])
    assert seen == set(range(6))  # every span from [0..4] to [5..9] occurs
    ids, types = encode_pair([7, 8], [9, 10, 11], cls_id=CLS, sep_id=SEP)
    assert ids == [2, 7, 8, 3, 9, 10, 11, 3]
    assert types == [0, 0, 0, 0, 1, 1, 1, 1]
    b = pad_batch([ids, [2, 5, 3, 6, 3]], [types, [0, 0, 0, 1, 1]], pad_id=PAD)
    assert b["input_ids"][1].tolist() == [2, 5, 3, 6, 3, 0, 0, 0]
    assert b["token_type_ids"][1].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert b["attention_mask"].tolist() == [[1] * 8, [1, 1, 1, 1, 1, 0, 0, 0]]


def _docs(n_docs=60, n_sent=8):
    # document d owns token ids d*100 + 10 .. ; sentence end token 1
    rng = np.random.default_rng(0)
    docs = []
    for d in range(n_docs):
        sents = [[int(t) for t in d * 100 + 10 + rng.integers(0, 80, rng.integers(3, 9))] + [1]
                 for _ in range(n_sent)]
        docs.append(sents)
    return docs


def test_nsp_balance_other_document_and_max_length():
    docs = _docs()
    rng = np.random.default_rng(0)

    def random_segments(exclude):
        j = int(rng.integers(len(docs) - 1))
        return docs[j + (j >= exclude)]

    max_len = 24
    pairs = [p for d, segs in enumerate(docs) for p in nsp_pairs(d, segs, random_segments, rng, max_len)]
    labels = np.array([lab for _, _, lab in pairs])
    assert len(pairs) > 150 and abs(labels.mean() - 0.5) < 0.07
    again = [(d, p) for d, segs in enumerate(docs) for p in nsp_pairs(d, segs, random_segments, rng, max_len)]
    for d, (a, b, lab) in again:
        owner = lambda toks: {(t - 10) // 100 for t in toks if t != 1}
        assert owner(a) == {d} and len(a) + len(b) + 3 <= max_len and a and b
        if lab == 0:  # B is the true continuation: same document
            assert owner(b) == {d}
        else:  # B comes from exactly one other document
            assert len(owner(b)) == 1 and d not in owner(b)


def test_nsp_true_pair_is_contiguous():
    segs = [[10, 11, 1], [12, 1], [13, 14, 1], [15, 1]]
    rng = np.random.default_rng(3)
    pairs = nsp_pairs(0, segs, lambda e: [[900, 901, 1]], rng, max_len=64)
    for a, b, lab in pairs:
        if lab == 0:
            flat = [t for s in segs for t in s]
            assert flat[flat.index(a[0]) : flat.index(a[0]) + len(a) + len(b)] == a + b
        else:
            assert b == [900, 901, 1]


def test_short_seq_prob_aims_some_documents_at_shorter_pairs():
    docs, max_len = _docs(), 48

    def lengths(p):
        out = []
        for d, segs in enumerate(docs):
            rng = np.random.default_rng([0, d])  # per document, as NSPStream seeds it
            other = lambda exclude: docs[(exclude + 1 + int(rng.integers(len(docs) - 1))) % len(docs)]  # noqa: B023
            out += [len(a) + len(b) for a, b, _ in nsp_pairs(d, segs, other, rng, max_len, short_seq_prob=p)]
        return out

    full, short = lengths(0.0), lengths(1.0)
    assert max(short) <= max_len - 3 and max(lengths(0.1)) <= max_len - 3  # truncation stays at max_len
    assert np.mean(short) < 0.75 * np.mean(full)  # every document aims at a random length in [2, 45]
    assert len(short) > len(full)  # shorter chunks: more pairs from the same text


def test_short_seq_prob_reaches_the_stream(shards):
    a = next(objective(shards, "mlm,nsp", short_seq_prob=0.0).stream("train", 16, seed=0))
    b = next(objective(shards, "mlm,nsp", short_seq_prob=1.0).stream("train", 16, seed=0))
    assert b["attention_mask"].sum() < a["attention_mask"].sum()


@pytest.mark.parametrize("mlm_prob", [0.15, 0.3])
def test_mask_is_deterministic_for_a_seed(mlm_prob):
    ids = torch.randint(5, 40, (4, 32), generator=torch.Generator().manual_seed(0))
    run = lambda: mask_tokens(ids, mask_id=MASK, special_ids=SPECIAL, random_ids=RANDOM, mlm_prob=mlm_prob,
                              generator=torch.Generator().manual_seed(7))
    (x1, y1), (x2, y2) = run(), run()
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


# ---------------------------------------------------------------------------------------------
# objectives on real shards: a WordPiece tokenizer trained on a synthetic corpus


WORDS = ("the cat sat on a mat while dogs were running quickly around unbelievable gardens "
         "and people kept talking about weather tomorrow").split()


def synthetic_docs(n: int) -> list[str]:
    """n documents of 3-7 random sentences of WORDS, the same every call."""
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(n):
        sents = [" ".join(rng.choice(WORDS, rng.integers(4, 10))).capitalize() + rng.choice([".", "!", "?"])
                 for _ in range(rng.integers(3, 8))]
        docs.append(" ".join(sents))
    return docs


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer import train

    docs = synthetic_docs(40)
    root = tmp_path_factory.mktemp("mlm")
    tok = train("wordpiece", docs * 3, vocab_size=120, min_frequency=1)
    tok.save(root / "tok")
    prepare([], root / "tok", root / "shards", val_docs=6, progress=False, documents=docs)
    return root


def objective(root, name, **train):
    from lmforge.config import load_config
    from lmforge.objectives import make_objective
    from lmforge.tokenizer import Tokenizer

    over = {"data": {"shards": str(root / "shards"), "seq_len": 32}, "train": {"objective": name, **train}}
    return make_objective(load_config("bert-tiny", over), Tokenizer.load(root / "tok"))


def take(stream, n):
    return [next(stream) for _ in range(n)]


@pytest.mark.parametrize("name", ["mlm", "mlm,nsp"])
def test_stream_is_deterministic_and_resumes_exactly(shards, name):
    obj = objective(shards, name)
    a = obj.stream("train", 4, seed=3)
    take(a, 3)
    state = a.state_dict()
    expect = take(a, 4)
    b = obj.stream("train", 4, seed=3)
    b.load_state_dict(state)
    for x, y in zip(take(b, 4), expect):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    first = take(obj.stream("train", 4, seed=3), 1)[0]
    other = take(obj.stream("train", 4, seed=4), 1)[0]
    assert not torch.equal(first["labels"], other["labels"])


@pytest.mark.parametrize("name", ["mlm", "mlm,nsp"])
def test_val_stream_is_one_pass(shards, name):
    """Evaluation reads each val window / document once: the val stream ends instead of wrapping around."""
    obj = objective(shards, name)
    batches = list(itertools.islice(obj.stream("val", 4, seed=0), 500))  # capped: fails, not hangs
    assert len(batches) < 500 and all(len(b["input_ids"]) == 4 for b in batches[:-1])
    more = list(itertools.islice(obj.stream("val", 4, seed=0), 500))
    for x, y in zip(batches, more, strict=True):  # the same batches each time
        assert all(torch.equal(x[k], y[k]) for k in x)
    if name == "mlm":  # every window of the val split exactly once
        from lmforge.data.loader import TokenWindows

        n = TokenWindows(shards / "shards", "val", 32 - 3, 1, 0, shuffle=False).n_windows
        assert sum(len(b["input_ids"]) for b in batches) == n
    else:  # every pair of one pass over the val documents exactly once
        stream = obj.stream("val", 4, seed=0)
        pairs = sum(len(stream._doc_pairs(int(d))) for d in stream._order())
        assert sum(len(b["input_ids"]) for b in batches) == pairs


def test_mlm_windows_are_cls_text_sep(shards):
    obj = objective(shards, "mlm")
    tok = obj.tokenizer
    batch = next(obj.stream("train", 4, seed=0))
    assert batch["input_ids"].shape == (4, 32)
    assert (batch["input_ids"][:, 0] == tok.cls_id).all() and (batch["input_ids"][:, -1] == tok.sep_id).all()
    assert (batch["labels"][:, [0, -1]] == IGNORE).all()


def test_nsp_batch_layout(shards):
    obj = objective(shards, "mlm,nsp")
    tok = obj.tokenizer
    batches = take(obj.stream("train", 8, seed=0), 30)
    labels = torch.cat([b["next_sentence_label"] for b in batches]).float()
    assert abs(labels.mean().item() - 0.5) < 0.15  # 240 pairs, ~50/50 (short docs force a few randoms)
    for b in batches:
        ids, tt, am = b["input_ids"], b["token_type_ids"], b["attention_mask"]
        assert ids.shape[1] <= 32
        for r in range(len(ids)):
            n = int(am[r].sum())
            row = torch.where(b["labels"][r] != IGNORE, b["labels"][r], ids[r])[:n].tolist()
            seps = [i for i, t in enumerate(row) if t == tok.sep_id]
            assert row[0] == tok.cls_id and len(seps) == 2 and seps[1] == n - 1
            expect_tt = [0] * (seps[0] + 1) + [1] * (n - seps[0] - 1) + [0] * (len(ids[r]) - n)
            assert tt[r].tolist() == expect_tt
            assert (ids[r, n:] == tok.pad_id).all() and not am[r, n:].any()


def test_whole_word_masking_with_wordpiece(shards):
    obj = objective(shards, "mlm", whole_word_mask=True)
    cont = torch.tensor([t.startswith("##") for t in
                         (obj.tokenizer.id_to_token(i) for i in range(obj.tokenizer.vocab_size))])
    assert cont.any()
    for b in take(obj.stream("train", 8, seed=1), 5):
        ids = torch.where(b["labels"] != IGNORE, b["labels"], b["input_ids"])
        sel = b["labels"] != IGNORE
        piece = cont[ids]  # a piece that opens a row (or follows [CLS]) is a word of its own
        piece[:, 1:] &= ~torch.isin(ids[:, :-1], special_id_tensor(obj.tokenizer))
        piece[:, 0] = False
        assert (sel[:, 1:][piece[:, 1:]] == sel[:, :-1][piece[:, 1:]]).all()


@pytest.mark.parametrize("name", ["mlm", "mlm,nsp"])
def test_loss_is_sum_over_targets_and_matches_full_logits(shards, name):
    obj = objective(shards, name)
    torch.manual_seed(0)
    model = obj.build_model().eval()
    assert model.cfg.heads == name and (model.nsp is None) == (name == "mlm")
    batch = next(obj.stream("train", 4, seed=0))
    loss, n = obj.loss(model, batch)
    assert int(n) == obj.count_targets(batch)
    with torch.no_grad():  # reference: full (B, T, V) logits, mean-free cross-entropy
        out = model(batch["input_ids"], batch.get("token_type_ids"), batch.get("attention_mask"))
        ref = torch.nn.functional.cross_entropy(out.mlm_logits.flatten(0, 1), batch["labels"].flatten(),
                                                reduction="sum")
        if name == "mlm,nsp":
            nsp = torch.nn.functional.cross_entropy(out.nsp_logits, batch["next_sentence_label"],
                                                    reduction="sum")
            assert abs(nsp.item() / 4 - np.log(2)) < 0.2  # untrained: about ln(2) per pair
            w = obj.nsp_weight
            assert w == round(0.15 * 32)  # default: round(mlm_prob * seq_len) targets per pair
            ref = ref + w * nsp
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-4)
    n_mlm = (batch["labels"] != IGNORE).sum().item()
    assert int(n) == n_mlm + (4 * w if name == "mlm,nsp" else 0)  # every masked token once, pairs w times
    mlm_mean = (ref - (w * nsp if name == "mlm,nsp" else 0)).item() / n_mlm
    assert abs(mlm_mean - np.log(model.cfg.vocab_size)) < 0.5  # untrained: about ln(V)


def full_batch(batches: list[dict], pad_id: int) -> dict:
    """NSP micro-batches (each padded to its own longest row) -> one batch padded to the longest of all."""
    T = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "labels": IGNORE, "token_type_ids": 0, "attention_mask": 0}
    out = {k: torch.cat([torch.nn.functional.pad(b[k], (0, T - b[k].shape[1]), value=v) for b in batches])
           for k, v in fill.items()}
    out["next_sentence_label"] = torch.cat([b["next_sentence_label"] for b in batches])
    return out


def test_nsp_weight_n_mlm_over_pairs_gives_half_the_bert_pretraining_loss(shards):
    """With w = n_mlm / n_pairs, loss_sum / n = (mean MLM CE + mean NSP CE) / 2 (HF's loss / 2)."""
    F = torch.nn.functional
    stream = objective(shards, "mlm,nsp").stream("train", 4, seed=0)
    batch = next(b for b in take(stream, 20) if int((b["labels"] != IGNORE).sum()) % 4 == 0)
    n_mlm = int((batch["labels"] != IGNORE).sum())
    obj = objective(shards, "mlm,nsp", nsp_weight=n_mlm // 4)
    assert obj.nsp_weight == n_mlm // 4 > 1
    torch.manual_seed(0)
    model = obj.build_model().eval()
    with torch.no_grad():
        loss, n = obj.loss(model, batch)
        out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        mean_mlm = F.cross_entropy(out.mlm_logits.flatten(0, 1), batch["labels"].flatten())  # ignores -100
        mean_nsp = F.cross_entropy(out.nsp_logits, batch["next_sentence_label"])
    assert int(n) == 2 * n_mlm == obj.count_targets(batch)
    torch.testing.assert_close(loss / n, (mean_mlm + mean_nsp) / 2, rtol=1e-5, atol=1e-5)


def test_nsp_config_fields_are_checked():
    from lmforge.config import load_config
    from lmforge.errors import ConfigError

    train = load_config("bert-tiny").train
    assert (train.nsp_weight, train.short_seq_prob) == (None, 0.1)
    with pytest.raises(ConfigError, match="train.nsp_weight must be >= 1"):
        load_config("bert-tiny", ["--train.nsp_weight=0"])
    with pytest.raises(ConfigError, match=r"train.short_seq_prob must be in \[0, 1\]"):
        load_config("bert-tiny", ["--train.short_seq_prob=1.5"])


def test_weighted_nsp_accumulation_equals_one_big_batch(shards):
    """Trainer.accumulate over uneven mlm,nsp micro-batches == one forward / backward on their union."""
    import copy

    from lmforge.train.trainer import Trainer

    F = torch.nn.functional
    obj = objective(shards, "mlm,nsp", device="cpu", nsp_weight=3)
    torch.manual_seed(0)
    trainer = Trainer(obj.cfg, obj.build_model(), obj, progress=False)
    reference = copy.deepcopy(trainer.model)
    micro = take(obj.stream("train", 3, seed=0), 3)
    counts = [obj.count_targets(b) for b in micro]
    assert len(set(counts)) > 1 and any((b["attention_mask"] == 0).any() for b in micro), counts  # uneven

    loss_sum, total, done = trainer.accumulate(micro)
    assert done == 3 and total == sum(counts)

    big = full_batch(micro, obj.tokenizer.pad_id)
    out = reference(big["input_ids"], big["token_type_ids"], big["attention_mask"])
    n_mlm = int((big["labels"] != IGNORE).sum())
    sum_mlm = F.cross_entropy(out.mlm_logits.flatten(0, 1), big["labels"].flatten(), reduction="sum")
    sum_nsp = F.cross_entropy(out.nsp_logits, big["next_sentence_label"], reduction="sum")
    ref = (sum_mlm + 3 * sum_nsp) / (n_mlm + 3 * 9)  # 9 pairs, each counted as 3 targets
    ref.backward()
    assert abs(loss_sum.item() / total - ref.item()) < 1e-5
    ref_grads = dict(reference.named_parameters())
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-6, rtol=1e-4, msg=name)


def test_mlm_objective_rejects_a_gpt():
    from lmforge.config import load_config
    from lmforge.errors import ConfigError
    from lmforge.objectives.mlm import MaskedLM

    with pytest.raises(ConfigError, match="family=bert"):
        MaskedLM(load_config("gpt-tiny", {"train": {"objective": "mlm"}})).build_model()


def test_eval_cli_reproduces_the_trainers_mlm_eval(shards, tmp_path, capsys):
    """`lmforge eval` on a BERT scores MLM with the same masks as the run's own eval, given its seed."""
    import json

    import yaml

    from lmforge.cli import main
    from lmforge.tokenizer import Tokenizer

    run = tmp_path / "run"
    assert main(["pretrain", "bert-tiny", "--objective", "mlm", "--data.shards", str(shards / "shards"),
                 "--data.tokenizer", str(shards / "tok" / "tokenizer.json"), "--out", str(run),
                 "--no-progress", "--train.tensorboard=false", "--data.seq_len=32", "--train.max_steps=2",
                 f"--model.vocab_size={Tokenizer.load(shards / 'tok').vocab_size}"]) == 0
    last = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in ln][-1]
    t = yaml.safe_load((run / "run.yaml").read_text())["config"]["train"]
    capsys.readouterr()
    args = ["eval", str(run), "--data", str(shards / "shards"), "--seq-len", "32", "--json", "--dtype",
            t["dtype"], "--batch-size", str(t["batch_size"]), "--max-batches", str(t["eval_steps"])]
    assert main(args + ["--seed", str(t["seed"])]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(last["val_loss"], rel=1e-6)
    assert main(args + ["--seed", "7"]) == 0  # other masks, another (close) estimate
    assert json.loads(capsys.readouterr().out)["loss"] != pytest.approx(last["val_loss"], rel=1e-6)
    # the defaults are the documented ones: --seed 0, --dtype bf16
    short = ["eval", str(run), "--data", str(shards / "shards"), "--seq-len", "32", "--json"]
    losses = []
    for extra in ([], ["--seed", "0", "--dtype", "bf16"], ["--seed", "1", "--dtype", "bf16"],
                  ["--seed", "0", "--dtype", "fp32"]):
        assert main(short + extra) == 0
        losses.append(json.loads(capsys.readouterr().out)["loss"])
    assert losses[0] == losses[1] and losses[1] not in (losses[2], losses[3])
    assert main(args + ["--objective", "mlm,nsp"]) == 2  # this BERT was built without the NSP head
    assert "has heads=mlm" in capsys.readouterr().err
    assert main(args + ["--seq-len", "3"]) == 2
    assert "--seq-len 3 is too short for objective mlm; use >= 4" in capsys.readouterr().err


def test_eval_cli_scores_an_mlm_nsp_bert_with_both_heads_by_default(shards, tmp_path, capsys):
    """... and with the run's own MLM settings, which eval reads from run.yaml (it has no flags for them)."""
    import json

    import yaml

    from lmforge.cli import main
    from lmforge.tokenizer import Tokenizer

    run = tmp_path / "run"
    assert main(["pretrain", "bert-tiny", "--data.shards", str(shards / "shards"), "--data.tokenizer",
                 str(shards / "tok" / "tokenizer.json"), "--out", str(run), "--no-progress",
                 "--train.tensorboard=false", "--data.seq_len=32", "--train.max_steps=2",
                 "--train.mlm_prob=0.4", "--train.nsp_weight=3", "--train.short_seq_prob=0.5",
                 f"--model.vocab_size={Tokenizer.load(shards / 'tok').vocab_size}"]) == 0
    last = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in ln][-1]
    t = yaml.safe_load((run / "run.yaml").read_text())["config"]["train"]
    capsys.readouterr()
    args = ["--data", str(shards / "shards"), "--seq-len", "32", "--json", "--dtype", t["dtype"],
            "--batch-size", str(t["batch_size"]), "--max-batches", str(t["eval_steps"]),
            "--seed", str(t["seed"])]
    assert main(["eval", str(run), *args]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(last["val_loss"], rel=1e-6)
    # a checkpoint folder of the run: the settings come from the run's run.yaml, two levels up
    newest = sorted((run / "checkpoints").iterdir())[-1]
    assert newest.name == f"step-{t['max_steps']:06d}" and not (newest / "run.yaml").exists()
    assert main(["eval", str(newest), *args]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(last["val_loss"], rel=1e-6)
    from lmforge.models.store import load_model, save_model

    bare = load_model(run)
    bare.cfg.heads = "none"  # an encoder without heads has no language-modelling loss
    save_model(type(bare)(bare.cfg), tmp_path / "bare")
    Tokenizer.load(run).save(tmp_path / "bare")
    assert main(["eval", str(tmp_path / "bare"), "--data", str(shards / "shards")]) == 2
    assert "encoder without an MLM head (heads=none)" in capsys.readouterr().err


def test_mlm_only_run_resumes_from_the_cli(shards, tmp_path, capsys):
    """mlm builds a BERT without the NSP head; resume must compare against that model, not the preset."""
    from lmforge.cli import main
    from lmforge.tokenizer import Tokenizer

    args = ["pretrain", "bert-tiny", "--objective", "mlm", "--data.shards", str(shards / "shards"),
            "--data.tokenizer", str(shards / "tok" / "tokenizer.json"), "--out", str(tmp_path / "run"),
            "--no-progress", "--train.tensorboard=false", "--data.seq_len=32",
            f"--model.vocab_size={Tokenizer.load(shards / 'tok').vocab_size}"]
    assert main(args + ["--train.max_steps=2", "--train.save_every=2"]) == 0
    assert main(args + ["--train.max_steps=3", "--resume"]) == 0
    # resumed without its --objective (the preset's is mlm,nsp): the fix named is the objective
    capsys.readouterr()
    assert main([a for a in args if a not in ("--objective", "mlm")] + ["--resume"]) == 2
    assert "pass the run's own --objective" in capsys.readouterr().err


def test_mlm_run_from_an_mlm_nsp_bert_leaves_the_nsp_head_out(shards, tmp_path, capsys):
    """--init-from a BertForPreTraining-shaped run with objective mlm: pooler + NSP are not carried over."""
    from lmforge.cli import main
    from lmforge.models.store import load_model
    from lmforge.tokenizer import Tokenizer

    args = ["pretrain", "bert-tiny", "--data.shards", str(shards / "shards"), "--data.tokenizer",
            str(shards / "tok" / "tokenizer.json"), "--no-progress", "--train.tensorboard=false",
            "--data.seq_len=32", "--train.max_steps=1"]
    vocab = f"--model.vocab_size={Tokenizer.load(shards / 'tok').vocab_size}"
    assert main(args + ["--objective", "mlm,nsp", "--out", str(tmp_path / "src"), vocab]) == 0
    assert main(args + ["--objective", "mlm", "--out", str(tmp_path / "new"), "--init-from",
                        str(tmp_path / "src"), "--train.lr=0", "--train.min_lr=0"]) == 0
    assert "leaving out" in (err := capsys.readouterr().err) and "nsp, pooler (not trained by mlm)" in err
    src, new = load_model(tmp_path / "src").state_dict(), load_model(tmp_path / "new").state_dict()
    assert sorted(set(src) - set(new)) == ["nsp.bias", "nsp.weight", "pooler.bias", "pooler.weight"]
    assert all(torch.equal(src[k], new[k]) for k in new)


def test_mlm_nsp_run_from_an_encoder_only_bert_starts_its_heads_fresh(shards, tmp_path, capsys):
    """--init-from a bare encoder (heads none, HF BertModel-shaped): as BertForPreTraining.from_pretrained
    does, the encoder and pooler are loaded and the MLM / NSP heads start newly initialised."""
    import dataclasses

    from lmforge.cli import main
    from lmforge.config import load_config
    from lmforge.models.store import build_model, load_model
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.checkpoint import save_model_files

    tok = Tokenizer.load(shards / "tok")
    cfg = dataclasses.replace(load_config("bert-tiny").model, vocab_size=tok.vocab_size, heads="none")
    torch.manual_seed(1)
    save_model_files(build_model(cfg), tok, tmp_path / "encoder")
    args = ["pretrain", "bert-tiny", "--data.shards", str(shards / "shards"), "--data.tokenizer",
            str(shards / "tok" / "tokenizer.json"), "--no-progress", "--train.tensorboard=false",
            "--data.seq_len=32", "--train.max_steps=1", "--train.lr=0", "--train.min_lr=0"]
    assert main(args + ["--objective", "mlm,nsp", "--out", str(tmp_path / "new"),
                        "--init-from", str(tmp_path / "encoder")]) == 0
    assert "has no mlm, nsp head; it starts newly initialised" in capsys.readouterr().err
    src, new = load_model(tmp_path / "encoder").state_dict(), load_model(tmp_path / "new").state_dict()
    assert {k.split(".")[0] for k in set(new) - set(src)} == {"mlm", "nsp"}
    assert all(torch.equal(src[k], new[k]) for k in src)  # encoder + pooler carried over (lr 0)


@pytest.mark.parametrize("name", ["mlm", "mlm,nsp"])
def test_resume_refuses_another_seed_seq_len_or_data(shards, tmp_path, name):
    import shutil

    from lmforge.config import load_config
    from lmforge.data.prepare import prepare
    from lmforge.errors import CheckpointError
    from lmforge.objectives import make_objective
    from lmforge.tokenizer import Tokenizer

    state = objective(shards, name).stream("train", 4, seed=3).state_dict()
    longer = load_config("bert-tiny", {"data": {"shards": str(shards / "shards"), "seq_len": 48},
                                       "train": {"objective": name}})
    shutil.copytree(shards / "tok", tmp_path / "tok")  # other data: 12 documents, not 40
    prepare([], tmp_path / "tok", tmp_path / "shards", val_docs=2, progress=False,
            documents=[f"{WORDS[i]} {WORDS[i + 1]} sat. The {WORDS[i + 2]} ran!" for i in range(12)])
    for stream, saved in [(objective(shards, name).stream("train", 4, seed=4), "seed=3, this run has 4"),
                          (make_objective(longer, Tokenizer.load(shards / "tok")).stream("train", 4, seed=3),
                           r"seq_len=\d+, this run has \d+"),
                          (objective(tmp_path, name).stream("train", 4, seed=3), r"n_\w+=\d+, this run has")]:
        with pytest.raises(CheckpointError, match=f"data position was saved with {saved}.*start fresh"):
            stream.load_state_dict(state)
    objective(shards, name).stream("train", 4, seed=3).load_state_dict(state)  # the same setup resumes


def test_a_row_of_only_special_tokens_gets_no_target():
    """[CLS] [SEP] [PAD] are never selected, not even by the at-least-one-target rule."""
    ids = torch.tensor([[CLS, SEP, PAD, PAD], [CLS, 7, SEP, PAD]])
    for seed in range(10):
        x, y = mask_tokens(ids, mask_id=MASK, special_ids=SPECIAL, random_ids=RANDOM, mlm_prob=0.01,
                           generator=torch.Generator().manual_seed(seed))
        assert (y[0] == IGNORE).all() and x[0].tolist() == ids[0].tolist()
        assert y[1].tolist() == [IGNORE, 7, IGNORE, IGNORE]  # the one eligible token is the target


def test_truncate_pair_on_a_tie_shortens_b_as_bert_does():
    # BERT's truncate_seq_pair: `tokens_a if len(tokens_a) > len(tokens_b) else tokens_b`
    assert truncate_pair([1, 2, 3], [4, 5, 6], 5) == ([1, 2, 3], [4, 5])
    assert truncate_pair([1, 2, 3], [4, 5, 6], 4) == ([1, 2], [4, 5])


def test_every_segment_is_used_once_random_b_puts_the_rest_back():
    """Without truncation each segment of the document lands in exactly one A or true B: the segments a
    random B displaced start the next chunk (BERT's create_instances_from_document)."""
    segs = [[100 + 3 * s, 101 + 3 * s, 102 + 3 * s] for s in range(10)]
    doc = sorted(t for s in segs for t in s)
    randoms = 0
    for seed in range(20):
        # max_len 15: chunks of <= 4 segments = 12 tokens = max_len - 3, so nothing is ever truncated
        pairs = nsp_pairs(0, segs, lambda e: [[900, 901]], np.random.default_rng(seed), max_len=15)
        used = [t for a, b, lab in pairs for t in a + (b if lab == 0 else [])]
        assert sorted(used) == doc, seed
        randoms += sum(lab for _, _, lab in pairs)
    assert randoms > 10


class _Docs:
    """A stand-in for SplitDocuments: document d owns ids d*100 + 10 .. (sentence ender 1)."""

    def __init__(self, n):
        self.segs = [[[d * 100 + 10 + 3 * s + k for k in range(3)] + [1] for s in range(6)] for d in range(n)]
        self.stream = [0] * 1000

    def __len__(self):
        return len(self.segs)

    def segments(self, i):
        return self.segs[i]


def _nsp_stream(docs, **kw):
    import types

    from lmforge.objectives.nsp import NSPStream

    tok = types.SimpleNamespace(cls_id=CLS, sep_id=SEP, pad_id=PAD)
    no_mask = lambda ids, seed: (ids, torch.full_like(ids, IGNORE))  # noqa: E731
    args = dict(max_len=24, batch_size=4, seed=0, rank=0, world_size=1, shuffle=True, split="train")
    return NSPStream(docs, no_mask, tok, **{**args, **kw})


def _pairs(batches):
    """(owner of A, owners of B, label) of every row: A = segment 0 without [CLS] / [SEP], B = segment 1."""
    owner = lambda toks: {(t - 10) // 100 for t in toks if t not in (1, CLS, SEP, PAD)}  # noqa: E731
    out = []
    for b in batches:
        for ids, tt, lab in zip(b["input_ids"], b["token_type_ids"], b["next_sentence_label"]):
            a = [t for t, s in zip(ids.tolist(), tt.tolist()) if s == 0]
            rest = [t for t, s in zip(ids.tolist(), tt.tolist()) if s == 1]
            (oa,) = owner(a)
            out.append((oa, owner(rest), int(lab)))
    return out


def test_nsp_stream_random_b_comes_from_another_document():
    pairs = _pairs(take(_nsp_stream(_Docs(3)), 30))
    assert sum(lab for _, _, lab in pairs) > 20
    for a, b, lab in pairs:
        assert b == {a} if lab == 0 else (len(b) == 1 and a not in b), (a, b, lab)


def test_nsp_stream_ranks_split_the_documents_and_epochs_reshuffle():
    docs = _Docs(8)
    seen = [{a for a, _, _ in _pairs(_nsp_stream(docs, rank=r, world_size=2, epochs=1))} for r in (0, 1)]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(8))

    def visits(epochs):  # the order documents are visited in, one entry per document
        owners = [a for a, _, _ in _pairs(_nsp_stream(docs, batch_size=1, epochs=epochs))]
        return [a for i, a in enumerate(owners) if i == 0 or owners[i - 1] != a]

    one = visits(1)
    assert sorted(one) == list(range(8))
    assert visits(2) != one + one  # epoch 1 is a new permutation, as TokenWindows' epochs are


def test_random_replacements_are_never_special_tokens(shards):
    from lmforge.objectives.mlm import Masker
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(shards / "tok")
    special = special_id_tensor(tok)
    vocab = torch.arange(tok.vocab_size)
    words = vocab[~torch.isin(vocab, special)]
    ids = words[torch.randint(len(words), (400, 64), generator=torch.Generator().manual_seed(0))]
    x, y = Masker(tok, mlm_prob=0.5, whole_word=False)(ids, seed=1)
    sel = y != IGNORE
    replaced = sel & (x != tok.mask_id) & (x != ids)
    assert replaced.sum() > 500  # ~10% of ~12800 selected
    assert not torch.isin(x[sel & (x != tok.mask_id)], special).any()


def test_successive_mlm_batches_draw_new_masks(shards):
    """Each batch's masking has its own seed: two batches do not select the same positions."""
    tok = objective(shards, "mlm").tokenizer
    b0, b1 = take(objective(shards, "mlm").stream("train", 4, seed=0), 2)
    sel, eligible = [], []
    for b in (b0, b1):
        orig = torch.where(b["labels"] != IGNORE, b["labels"], b["input_ids"])
        sel.append(b["labels"] != IGNORE)
        eligible.append(~torch.isin(orig, special_id_tensor(tok)))
    both = eligible[0] & eligible[1]
    assert both.sum() > 100 and (sel[0][both] != sel[1][both]).any()


def test_masker_never_selects_a_special_token_but_does_select_unk(shards):
    """[PAD] [CLS] [SEP] [MASK] (a literal [MASK] in the text too) are never targets; [UNK] is a word."""
    from lmforge.objectives.mlm import Masker
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(shards / "tok")
    specials = [tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id]
    ids = torch.tensor(specials + [tok.unk_id] * 4).repeat(200, 8)  # (200, 64)
    _, y = Masker(tok, mlm_prob=0.5, whole_word=False)(ids, seed=0)
    assert (y[torch.isin(ids, torch.tensor(specials))] == IGNORE).all()
    assert (y[ids == tok.unk_id] == tok.unk_id).float().mean() > 0.4


def test_nsp_with_a_one_row_segment_table_is_a_config_error_not_an_index_error():
    """Sentence B has segment id 1: a model with type_vocab_size=1 (e.g. RoBERTa-like) cannot take it.
    The stream refuses before reading any shard, so pretrain, the Trainer and eval all stop cleanly."""
    from lmforge.config import ModelConfig, RunConfig, TrainConfig
    from lmforge.errors import ConfigError
    from lmforge.objectives.mlm import MaskedLMWithNSP

    cfg = RunConfig(model=ModelConfig(family="bert", vocab_size=64, max_seq_len=32, n_layer=1, n_head=2,
                                      d_model=16, type_vocab_size=1), train=TrainConfig(objective="mlm,nsp"))
    with pytest.raises(ConfigError, match="objective mlm,nsp needs model.type_vocab_size >= 2 .*got 1; "
                                          "use objective mlm"):
        MaskedLMWithNSP(cfg, None).stream("train", 2, seed=0)
