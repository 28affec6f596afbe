"""Fixtures shared by several test files."""

import pytest


@pytest.fixture
def fail_nth(monkeypatch):
    """fail_nth(module, name, n, exc): the n-th call of module.name (1 = the first) raises exc; the others
    run as usual. For injecting a full disk or a Ctrl-C at one step of a write."""

    def install(module, name: str, n: int, exc: BaseException) -> None:
        real, calls = getattr(module, name), []

        def fake(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise exc
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, fake)

    return install
