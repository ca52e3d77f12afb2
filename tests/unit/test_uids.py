"""translators.uids: the one UID rule (PS3.5 §9.1) and the node-scoped identities."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from translators.uids import InstanceId, InvalidUid, check_uid, is_uid

component = st.one_of(st.just("0"), st.integers(1, 10**12).map(str))


@given(st.lists(component, min_size=1, max_size=12).map(".".join).filter(lambda u: len(u) <= 64))
def test_valid_uids_are_accepted(uid):
    assert is_uid(uid) and check_uid("x", uid) == uid


@pytest.mark.parametrize("bad", ["", "1..2", ".1", "1.", "1.02", "01.2", "1.2\n", "1.2\r", "1.2 ", " 1.2",
                                 "1.2.a", "1" * 65, "1.2.3\\4", "١.٢", None, 12])
def test_anything_else_is_refused(bad):
    assert not is_uid(bad)


def test_check_uid_names_what_and_escapes_the_value():
    with pytest.raises(InvalidUid) as err:
        check_uid("study UID", "1.2\n")
    assert "study UID" in str(err.value) and "\\n" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InvalidUid) as err:
        check_uid("study UID", "1" * 9000)
    assert len(str(err.value)) < 300


def test_identities_differ_by_node():
    assert InstanceId("a", "1.2", "1.2.3", "1.2.3.4") != InstanceId("b", "1.2", "1.2.3", "1.2.3.4")
    assert InstanceId("a", "1.2", "1.2.3", "1.2.3.4").series_id.study_id.node == "a"
