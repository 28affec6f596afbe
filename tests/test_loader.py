"""TokenWindows cuts exact slices of the shard stream in a seeded order, resumable, disjoint by rank."""

import itertools
import json

import numpy as np
import pytest
import torch

from lmforge.data.loader import TokenStream, TokenWindows
from lmforge.errors import CheckpointError, ConfigError, DataError


def write_shards(root, stream, cuts, dtype="uint16", split="train", vocab_size=60000):
    """A hand-made shard folder: `stream` cut into files at `cuts`, meta.json as prepare writes it."""
    (root / split).mkdir(parents=True)
    names = []
    for i, part in enumerate(np.split(np.asarray(stream, dtype=dtype), cuts)):
        name = f"{split}/shard-{i:05d}.bin"
        part.astype(np.dtype(dtype).newbyteorder("<")).tofile(root / name)
        names.append(name)
    meta = {"version": 1, "dtype": dtype, "vocab_size": vocab_size,
            "splits": {split: {"tokens": len(stream), "documents": 1, "shards": names}}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def shards(tmp_path):
    stream = np.random.default_rng(0).integers(0, 60000, size=1001)
    return write_shards(tmp_path, stream, [137, 500, 501]), stream  # uneven shards, one of 1 token


def epoch_rows(w, n_batches):
    return torch.cat([next(w) for _ in range(n_batches)])


def test_stream_is_the_concatenation_of_shards(shards):
    root, stream = shards
    s = TokenStream(root, "train")
    assert len(s) == len(stream)
    for a, b in [(0, 1001), (130, 140), (499, 503), (500, 501), (990, 1001)]:
        assert s[a:b].tolist() == stream[a:b].tolist()


def test_windows_are_stream_slices_each_once_per_epoch(shards):
    root, stream = shards
    T = 10  # (1001 - 1) // 10 = 100 windows
    w = TokenWindows(root, "train", seq_len=T, batch_size=5, seed=3)
    assert w.n_windows == 100
    rows = epoch_rows(w, 20)  # exactly one epoch
    assert rows.shape == (100, T + 1) and rows.dtype == torch.long
    starts = []
    for row in rows.tolist():
        k = next(k for k in range(100) if stream[k * T: k * T + T + 1].tolist() == row)
        starts.append(k)
    assert sorted(starts) == list(range(100))
    assert starts != list(range(100))  # shuffled
    assert w.state_dict()["epoch"] == 0 and w.state_dict()["position"] == 100


def test_same_seed_same_order_other_seed_or_epoch_differs(shards):
    root, _ = shards
    a = epoch_rows(TokenWindows(root, "train", 10, 4, seed=1), 50)
    b = epoch_rows(TokenWindows(root, "train", 10, 4, seed=1), 50)
    c = epoch_rows(TokenWindows(root, "train", 10, 4, seed=2), 50)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[:100], a[100:200])  # epoch 1 is a new permutation


def test_resume_from_state_equals_uninterrupted(shards):
    root, _ = shards
    full = [next(w) for w in [TokenWindows(root, "train", 10, 7, seed=5)] for _ in range(40)]
    w = TokenWindows(root, "train", 10, 7, seed=5)
    for _ in range(13):
        next(w)
    state = json.loads(json.dumps(w.state_dict()))  # must survive JSON (trainer_state)
    w2 = TokenWindows(root, "train", 10, 7, seed=5)
    w2.load_state_dict(state)
    for i in range(13, 40):  # batch 14 straddles the end of epoch 0
        assert torch.equal(next(w2), full[i])


def test_resume_from_a_later_epoch_continues_that_epochs_order(shards):
    """A position taken in epoch 1 resumes epoch 1's permutation, not epoch 0's."""
    root, _ = shards
    w = TokenWindows(root, "train", 10, 7, seed=5)
    full = [next(w) for _ in range(30)]  # 100 windows an epoch: batch 15 starts epoch 1
    w = TokenWindows(root, "train", 10, 7, seed=5)
    for _ in range(20):
        next(w)
    state = json.loads(json.dumps(w.state_dict()))
    assert (state["epoch"], state["position"]) == (1, 40)
    w2 = TokenWindows(root, "train", 10, 7, seed=5)
    w2.load_state_dict(state)
    assert all(torch.equal(next(w2), full[i]) for i in range(20, 30))


def test_rank_splits_are_disjoint_and_complete(shards):
    root, _ = shards
    world = 3
    seen = []
    for r in range(world):
        w = TokenWindows(root, "train", 10, 1, seed=9, rank=r, world_size=world)
        seen.append([tuple(next(w)[0].tolist()) for _ in range(w.windows_per_epoch())])
    sets = [set(s) for s in seen]
    assert sum(len(s) for s in seen) == 100
    assert not (sets[0] & sets[1]) and not (sets[1] & sets[2]) and not (sets[0] & sets[2])
    one = TokenWindows(root, "train", 10, 100, seed=9)
    assert set.union(*sets) == {tuple(r) for r in next(one).tolist()}


def test_no_shuffle_gives_first_windows_in_order(shards):
    root, stream = shards
    w = TokenWindows(root, "train", 10, 3, seed=0, shuffle=False)
    x = next(w)
    assert x.tolist() == [stream[k * 10: k * 10 + 11].tolist() for k in range(3)]


def test_uint32_shards(tmp_path):
    stream = np.arange(70000, 70000 + 65, dtype=np.uint32)
    write_shards(tmp_path, stream, [30], dtype="uint32", vocab_size=70065)
    x = next(TokenWindows(tmp_path, "train", 8, 2, seed=0, shuffle=False))
    assert x[0].tolist() == list(range(70000, 70009))


def test_errors(shards, tmp_path):
    root, _ = shards
    with pytest.raises(DataError, match="too few"):
        TokenWindows(root, "train", seq_len=1001, batch_size=1, seed=0)
    with pytest.raises(ConfigError, match="no split 'val'"):
        TokenWindows(root, "val", 10, 1, seed=0)
    with pytest.raises(CheckpointError, match="no meta.json"):
        TokenWindows(tmp_path / "nothing", "train", 10, 1, seed=0)
    w = TokenWindows(root, "train", 10, 1, seed=0)
    with pytest.raises(CheckpointError, match="seed=1"):
        w.load_state_dict({**w.state_dict(), "seed": 1})
    (root / "train" / "shard-00001.bin").write_bytes(b"\0\0")  # truncated shard
    with pytest.raises(CheckpointError, match="re-run prepare"):
        TokenWindows(root, "train", 10, 1, seed=0)
    (root / "train" / "shard-00001.bin").write_bytes(b"\0\0\0")  # cut inside a token
    with pytest.raises(CheckpointError, match="is truncated .* re-run `lmforge prepare`"):
        TokenWindows(root, "train", 10, 1, seed=0)
    for bad in ("{oops", "[]", '{"splits": {}}'):  # not JSON; not an object; no dtype
        (root / "meta.json").write_text(bad)
        with pytest.raises(CheckpointError, match=r"meta.json is corrupt \(.*\); re-run `lmforge prepare`"):
            TokenWindows(root, "train", 10, 1, seed=0)


@pytest.mark.parametrize("change, why", [
    ({"dtype": "bogus"}, "dtype 'bogus' is not uint16 or uint32"),
    ({"vocab_size": "big"}, "vocab_size 'big' is not a positive integer"),
    ({"vocab_size": True}, "vocab_size True is not a positive integer"),  # JSON true is no count
    ({"splits": {"train": {"tokens": 1001, "documents": 1}}}, "splits.train.shards is not a list"),
    ({"splits": {"train": {"tokens": "many", "shards": []}}}, "splits.train.tokens is not a count"),
    ({"splits": ["train"]}, "no splits object"),
    ({"separator_id": "eos"}, "separator_id 'eos' is not a token id"),
])
def test_malformed_meta_fields_are_one_line_errors(shards, change, why):
    root, _ = shards
    meta = json.loads((root / "meta.json").read_text())
    (root / "meta.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(CheckpointError, match=f"meta.json is corrupt \\({why}.*\\); re-run `lmforge prep"):
        TokenWindows(root, "train", 10, 1, seed=0)


def test_token_id_beyond_the_vocabulary_is_a_data_error(tmp_path):
    stream = np.arange(101) % 50
    stream[77] = 65535  # a corrupt shard: an id the tokenizer does not have
    write_shards(tmp_path, stream, [40], vocab_size=50)
    w = TokenWindows(tmp_path, "train", 10, 2, seed=0, shuffle=False)
    for _ in range(3):
        next(w)  # windows 0..5 hold ids < 50
    with pytest.raises(DataError, match=r"train: token id 65535 >= the tokenizer's vocab size 50: the shards "
                                        r"are corrupt; re-run `lmforge prepare`"):
        next(w)


def test_epochs_ends_the_stream_with_each_window_once(shards):
    root, stream = shards
    T = 10  # 100 windows; batches of 7: 14 full, then one of 2
    w = TokenWindows(root, "train", seq_len=T, batch_size=7, seed=0, shuffle=False, epochs=1)
    batches = list(itertools.islice(w, 100))  # capped: a stream that never ends fails, not hangs
    assert [len(b) for b in batches] == [7] * 14 + [2]
    rows = torch.cat(batches).tolist()
    assert rows == [stream[k * T: k * T + T + 1].tolist() for k in range(100)]
    with pytest.raises(StopIteration):
        next(w)  # stays ended
    two = TokenWindows(root, "train", seq_len=T, batch_size=7, seed=0, shuffle=False, epochs=2)
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        TokenWindows(root, "train", seq_len=T, batch_size=7, seed=0, epochs=0)
    # the second pass runs on across the batch edge
    assert torch.cat(list(itertools.islice(two, 100))).tolist() == rows + rows


@pytest.mark.parametrize("bad, why", [
    (b"garbage, not numpy", r"unreadable: ValueError"),
    (np.array([0, "x"], dtype=object), r"unreadable: ValueError"),  # pickled: never loaded
    (np.array([0.0, 5.0]), r"not a 1-D integer array"),
    (np.array([0, 900, 5]), r"offsets not sorted in \[0, 1001\]"),
])
def test_corrupt_docs_npy_is_a_data_error(shards, bad, why):
    from lmforge.objectives.nsp import SplitDocuments

    root, _ = shards
    docs = root / "train" / "docs.npy"
    np.save(docs, np.array([0, 500]))
    assert len(SplitDocuments(root, "train", set(), 64)) == 2
    if isinstance(bad, bytes):
        docs.write_bytes(bad)
    else:
        np.save(docs, bad, allow_pickle=True)
    with pytest.raises(DataError, match=f"docs.npy is corrupt \\({why}\\); re-run `lmforge prepare`"):
        SplitDocuments(root, "train", set(), 64)


def test_nsp_documents_check_token_ids_too(tmp_path):
    from lmforge.objectives.nsp import SplitDocuments

    write_shards(tmp_path, [1, 2, 0, 3, 65535, 0], [], vocab_size=50)
    np.save(tmp_path / "train" / "docs.npy", np.array([0, 3]))
    docs = SplitDocuments(tmp_path, "train", set(), 64)
    assert docs.tokens(0) == [1, 2, 0]
    with pytest.raises(DataError, match="token id 65535 >= the tokenizer's vocab size 50"):
        docs.tokens(1)


def test_the_first_id_past_the_vocabulary_is_caught(tmp_path):
    """ids run 0 .. vocab_size - 1: an id equal to vocab_size is already outside the embedding."""
    stream = np.arange(21) % 50
    stream[15] = 50
    write_shards(tmp_path, stream, [], vocab_size=50)
    w = TokenWindows(tmp_path, "train", 10, 1, seed=0, shuffle=False)
    assert next(w).max() == 10  # window 0: ids 0 .. 10
    with pytest.raises(DataError, match="token id 50 >= the tokenizer's vocab size 50"):
        next(w)


def test_more_ranks_than_windows_is_a_data_error(shards):
    root, _ = shards
    w = TokenWindows(root, "train", seq_len=500, batch_size=1, seed=0, world_size=2)  # (1001 - 1) // 500 = 2
    assert w.windows_per_epoch() == 1
    with pytest.raises(DataError, match="too few for 3 window"):  # rank 2 would get no window at all
        TokenWindows(root, "train", seq_len=500, batch_size=1, seed=0, rank=2, world_size=3)
