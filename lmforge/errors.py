"""User-facing errors. Each is shown by the CLI as one line `error: ...` with exit code 2.

Raise these for anything the user can fix (bad path, bad config, mismatched files); keep
`assert` for internal invariants only. The message says what is wrong *and* how to fix it.
"""


class LmforgeError(Exception):
    """Base class: a problem with the user's input, not a bug in lmforge."""


class ConfigError(LmforgeError):
    """Unknown config key, wrong type, bad choice."""


class DataError(LmforgeError):
    """Missing / empty / unreadable input data, or a failed fetch."""


class CheckpointError(LmforgeError):
    """Corrupt, missing or mismatched checkpoint / run dir / tokenizer."""


def is_count(value, least: int = 0) -> bool:
    """An int (not a bool) >= least: what a count read back from a JSON / pickled file must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least
