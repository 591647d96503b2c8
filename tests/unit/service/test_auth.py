"""Bearer tokens read from a mounted file (sdxl_server.service.auth.TokenFile), with a fake clock: re-read
after the recheck interval, the tokens that worked kept while the file is missing or empty."""

from __future__ import annotations

import os

import pytest
from sdxl_server.service.auth import TokenFile, TokenFileError


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_token_file_is_looked_at_again_only_after_the_recheck_interval(tmp_path) -> None:
    path = tmp_path / "token"
    path.write_text("one\n\n  two  \n")
    clock = _Clock()
    tokens = TokenFile(str(path), recheck_seconds=1.0, clock=clock)
    assert tokens.accepts("one") and tokens.accepts("two") and not tokens.accepts("three")
    path.write_text("three\n")
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    clock.now += 0.5
    assert not tokens.accepts("three")  # within the interval: the cached tokens
    clock.now += 0.5
    assert tokens.accepts("three") and not tokens.accepts("one")


def test_a_missing_or_empty_token_file_keeps_the_tokens_that_worked(tmp_path) -> None:
    path = tmp_path / "token"
    path.write_text("kept")
    clock = _Clock()
    tokens = TokenFile(str(path), clock=clock)
    path.unlink()
    clock.now += 2
    assert tokens.accepts("kept")
    path.write_text("   \n")
    clock.now += 2
    assert tokens.accepts("kept")


def test_an_empty_token_file_is_refused_at_start(tmp_path) -> None:
    path = tmp_path / "token"
    path.write_text("\n")
    with pytest.raises(TokenFileError, match="holds no token"):
        TokenFile(str(path))
