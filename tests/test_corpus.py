"""Every input in tests/corpus (seeds and every odd input the fuzzers found) through its parser:
each is parsed or refused with the parser's own error, never anything else (tests/fuzzing.py)."""

from __future__ import annotations

import pytest

from tests.fuzzing import CORPUS, TARGETS

FILES = sorted(p for p in CORPUS.glob("*/*") if p.is_file())


def test_every_target_has_a_corpus_and_every_corpus_a_target():
    assert {p.parent.name for p in FILES} == set(TARGETS)


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_input_is_parsed_or_refused_cleanly(path):
    TARGETS[path.parent.name](path.read_bytes())
