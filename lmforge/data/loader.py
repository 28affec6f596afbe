"""TokenWindows: packed fixed-length windows over token shards; seeded, resumable, rank-aware.

A split's shard files (written by `lmforge prepare`) are memory-mapped and read as one
concatenated token stream of N tokens. Window k is stream[k*T : k*T + T + 1] (T = seq_len), so
windows overlap by one token and every token after the first is a target exactly once per epoch:

    stream  a b c d e f g h i j      N = 10, T = 3 -> (N - 1) // T = 3 windows
    window  a b c d | d e f g | g h i j

Epoch e visits the windows in the order `permutation(n)` drawn from a generator seeded with
(seed, e) (or 0..n-1 when shuffle=False, e.g. for val). Rank r of w takes every w-th entry
starting at r: disjoint across ranks, and together all windows. Batches run on across epoch
ends, so every batch has exactly `batch_size` rows, unless `epochs` is set: then the stream ends
after that many passes, its last batch possibly short (evaluation reads each val window once).
The position (epoch, windows consumed) is the whole state:

    >>> w = TokenWindows("shards/", "train", seq_len=256, batch_size=8, seed=0)
    >>> x = next(w)                  # LongTensor (8, 257)
    >>> state = w.state_dict()       # {"epoch": 0, "position": 8, ...}: JSON-able
    >>> w2 = TokenWindows("shards/", "train", 256, 8, 0); w2.load_state_dict(state)
    >>> torch.equal(next(w2), next(w))
    True
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmforge.errors import CheckpointError, ConfigError, DataError


class TokenStream:
    """The concatenation of a split's shard files as one read-only array-like: `len`, and slices.

    >>> s = TokenStream("shards/", "train"); len(s), s[10:14]
    (1000000, array([ 464, 1110,  286, 1578], dtype=uint16))
    """

    def __init__(self, shard_dir: str | Path, split: str):
        from lmforge.data.prepare import load_meta

        root = Path(shard_dir)
        meta = load_meta(root)
        if split not in meta.get("splits", {}):
            raise ConfigError(f"{root} has no split {split!r}; it has: {', '.join(meta.get('splits', {}))}")
        info = meta["splits"][split]
        self.meta, self.where = meta, f"{root}/{split}"
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.maps = []
        for name in info["shards"]:
            path = root / name
            if not path.is_file():
                raise CheckpointError(f"shard {path} is missing; re-run `lmforge prepare`")
            size = path.stat().st_size
            if size % self.dtype.itemsize:
                raise CheckpointError(f"shard {path} is truncated ({size} bytes, not a whole number of "
                                      f"{self.dtype.itemsize}-byte tokens); re-run `lmforge prepare`")
            if size:
                self.maps.append(np.memmap(path, dtype=self.dtype, mode="r"))
        self.ends = np.cumsum([len(m) for m in self.maps], dtype=np.int64)
        self.n = int(self.ends[-1]) if len(self.ends) else 0
        if self.n != info["tokens"]:
            raise CheckpointError(
                f"{root}/{split} holds {self.n} tokens but meta.json says {info['tokens']}; re-run prepare"
            )

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, sl: slice) -> np.ndarray:
        start, stop, _ = sl.indices(self.n)
        first = int(np.searchsorted(self.ends, start, side="right"))
        parts = []
        while start < stop:
            lo = int(self.ends[first - 1]) if first else 0
            take = min(stop, int(self.ends[first])) - start
            parts.append(self.maps[first][start - lo: start - lo + take])
            start += take
            first += 1
        if len(parts) == 1:
            return np.array(parts[0])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def check_ids(self, ids: np.ndarray) -> None:
        """DataError when `ids` (any shape, read from this stream) hold an id outside the vocabulary:
        corrupt shards would otherwise fail deep in the model's embedding. One max: cheap per batch."""
        top = int(ids.max()) if ids.size else 0
        if top >= self.meta["vocab_size"]:
            raise DataError(f"{self.where}: token id {top} >= the tokenizer's vocab size "
                            f"{self.meta['vocab_size']}: the shards are corrupt; re-run `lmforge prepare`")


class TokenWindows:
    """Iterator of LongTensor (batch_size, seq_len + 1) windows; see the module docstring."""

    def __init__(
        self,
        shard_dir: str | Path,
        split: str,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        epochs: int | None = None,
    ):
        if seq_len < 1 or batch_size < 1:
            raise ConfigError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
        if epochs is not None and epochs < 1:
            raise ConfigError(f"epochs must be >= 1 (or None: endless), got {epochs}")
        self.stream = TokenStream(shard_dir, split)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epochs = epochs  # None: run on forever
        self.n_windows = max(0, (len(self.stream) - 1) // seq_len)
        if self.n_windows < world_size:
            raise DataError(
                f"split {split!r} of {shard_dir} has {len(self.stream):,} tokens: too few for "
                f"{world_size} window(s) of seq_len + 1 = {seq_len + 1}; lower seq_len or add data"
            )
        self.epoch = 0
        self.position = 0  # windows of this rank's epoch order already yielded
        self._order: np.ndarray | None = None

    def order(self, epoch: int) -> np.ndarray:
        """Start offsets of this rank's windows for `epoch`, in visiting order."""
        if self.shuffle:
            idx = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        else:
            idx = np.arange(self.n_windows)
        return idx[self.rank:: self.world_size].astype(np.int64) * self.seq_len

    def windows_per_epoch(self) -> int:
        """How many windows this rank sees per epoch."""
        return len(range(self.rank, self.n_windows, self.world_size))

    def __iter__(self) -> TokenWindows:
        return self

    def __next__(self) -> torch.Tensor:
        rows = []
        while len(rows) < self.batch_size:
            if self._order is None:
                self._order = self.order(self.epoch)
            if self.position >= len(self._order):
                if self.epochs is not None and self.epoch + 1 >= self.epochs:
                    break  # the last pass is done: a short batch, then StopIteration
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
                continue
            start = int(self._order[self.position])
            rows.append(self.stream[start: start + self.seq_len + 1].astype(np.int64))
            self.position += 1
        if not rows:
            raise StopIteration
        batch = np.stack(rows)  # (B, T + 1), B < batch_size only at the end of `epochs`
        self.stream.check_ids(batch)
        return torch.from_numpy(batch)

    def setup(self) -> dict:
        """What shapes the order: a position is only meaningful in a stream with the same setup."""
        return {"seed": self.seed, "seq_len": self.seq_len, "rank": self.rank, "world_size": self.world_size,
                "shuffle": self.shuffle, "n_windows": self.n_windows}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, **self.setup()}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken; the setup that shapes the order must match."""
        check_setup(state, self.setup())
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


def check_setup(state: dict, setup: dict) -> None:
    """CheckpointError when a saved data position was taken with another setup (keys it lacks pass)."""
    for key, value in setup.items():
        if key in state and state[key] != value:
            raise CheckpointError(
                f"data position was saved with {key}={state[key]}, this run has {value}; "
                "resume with the same data and settings or start fresh"
            )
