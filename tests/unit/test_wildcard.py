"""Wildcard matching (PS3.4 C.2.2.2.4) without regex backtracking."""

from __future__ import annotations

import re
import time

from hypothesis import given
from hypothesis import strategies as st

from translators.matching import wildcard_match

ALPHABET = "ab*?"


def reference(pattern: str, text: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text, re.DOTALL) is not None


@given(st.text(alphabet=ALPHABET, max_size=8), st.text(alphabet="ab", max_size=10))
def test_same_answers_as_the_regex_translation(pattern, text):
    assert wildcard_match(pattern, text) == reference(pattern, text)


def test_the_backtracking_key_costs_linear_time():
    pattern = "*?" * 20 + "!"
    text = "A" * 5000
    started = time.process_time()
    assert not wildcard_match(pattern, text)
    assert wildcard_match("*" + "?" * 10 + "*", text)
    # Bounded in CPU work, not wall time: the regex translation of this key on this text does not
    # finish in minutes; the two-pointer walk is O(len(pattern) * len(text)) = 200k steps.
    assert time.process_time() - started < 5
