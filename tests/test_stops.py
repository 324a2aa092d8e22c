"""Stop strings over streamed text: whatever the split into deltas, the output is the input cut
right before the earliest stop string, and without one it is the whole input."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unigemma.errors import InputError
from unigemma.generate.stops import StopChecker


def stream(stops, deltas):
    """Feed deltas until a stop: (emitted text, stopped, index of the delta that stopped)."""
    checker, out = StopChecker(stops), []
    for i, d in enumerate(deltas):
        text, stopped = checker.feed(d)
        out.append(text)
        if stopped:
            return "".join(out), True, i
    return "".join(out) + checker.flush(), False, None


def expected(stops, text):
    """The oracle on the whole text: cut at the stop that completes first (longest on a tie)."""
    ends = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    return (text, False) if not ends else (text[:min(ends)[1]], True)


def split(text, cuts):
    cuts = sorted(set(c % (len(text) + 1) for c in cuts))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def test_stop_split_at_every_point():
    text, stop = "Hello wor<END>ld", "<END>"
    for a in range(len(text) + 1):
        for b in range(a, len(text) + 1):
            got = stream([stop], [text[:a], text[a:b], text[b:]])
            assert got[:2] == ("Hello wor", True), (a, b)


def test_per_character_deltas_emit_early_and_hold_only_prefixes():
    checker = StopChecker(["abc"])
    assert [checker.feed(c) for c in "xaby"] == [("x", False), ("", False), ("", False), ("aby", False)]
    assert checker.feed("ab") == ("", False)
    assert checker.flush() == "ab"


def test_multiple_and_overlapping_stops():
    assert stream(["bar", "ob"], ["fo", "oba", "r"])[:2] == ("fo", True)
    assert stream(["<", "><<"], ["><<"])[:2] == (">", True)  # the first to complete wins
    assert stream(["ab", "b"], ["xab"])[:2] == ("x", True)  # the longest of those ending together
    assert stream(["aab", "ab"], ["xa", "a", "b!"])[:2] == ("x", True)
    assert stream(["aaab"], ["aa", "aa", "ab"])[:2] == ("aa", True)  # a held prefix that restarts
    assert stream(["abab", "abc"], ["ab", "ab", "c"])[:2] == ("", True)
    assert stream(["abc", "b"], ["ab"])[:2] == ("a", True)  # a short stop inside a longer one's prefix


def test_nothing_after_a_stop():
    checker = StopChecker(["\n\n"])
    assert checker.feed("one\n") == ("one", False)
    assert checker.feed("\ntwo") == ("", True)
    assert checker.matched == "\n\n"
    assert checker.feed("three") == ("", True) and checker.flush() == ""


def test_no_stop_strings_pass_through():
    checker = StopChecker()
    assert checker.feed("a<") == ("a<", False) and checker.flush() == ""
    assert StopChecker("x").stops == ("x",) and StopChecker(None).stops == ()


@pytest.mark.parametrize("bad", [[""], [3], [None], 5])
def test_bad_stop_strings(bad):
    with pytest.raises(InputError, match="stop"):
        StopChecker(bad)


alphabet = st.sampled_from("ab<>\n")
stop_lists = st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=1, max_size=3)


@settings(max_examples=300, deadline=None)
@given(stops=stop_lists, text=st.text(alphabet, max_size=24), cuts=st.lists(st.integers(0, 100), max_size=8))
def test_any_split_equals_cutting_the_whole_text(stops, text, cuts):
    deltas = split(text, cuts)
    out, stopped, at = stream(stops, deltas)
    assert (out, stopped) == expected(stops, text)
    if stopped:  # the stop is reported by the delta that completes it, not later
        done = len("".join(deltas[:at + 1]))
        assert expected(stops, text[:done])[1] and not expected(stops, "".join(deltas[:at]))[1]


@settings(max_examples=200, deadline=None)
@given(stops=stop_lists, text=st.text(alphabet, max_size=24), cuts=st.lists(st.integers(0, 100), max_size=8))
def test_held_text_is_only_a_stop_prefix(stops, text, cuts):
    """What is held back after each delta is the longest tail that could still start a stop."""
    checker, fed, out = StopChecker(stops), "", ""
    for d in split(text, cuts):
        emitted, stopped = checker.feed(d)
        fed, out = fed + d, out + emitted
        if stopped:
            return
        held = fed[len(out):]
        assert fed.startswith(out)
        assert held == "" or any(s.startswith(held) and s != held for s in stops)
        for n in range(len(held) + 1, len(fed) + 1):  # no longer tail could start a stop
            assert not any(s.startswith(fed[-n:]) for s in stops), (fed, out)
