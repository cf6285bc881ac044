"""TextTracker: hold back split characters and possible stop-string starts, release them once settled."""

from megalodon.data import ByteTokenizer
from megalodon.inference.text_stream import TextTracker


def push_all(tracker: TextTracker, text: str) -> list[str]:
    data = text.encode("utf-8")
    return [tracker.push(b, final=i == len(data) - 1) for i, b in enumerate(data)]


def test_a_stop_string_spanning_tokens_is_never_printed():
    tracker = TextTracker(ByteTokenizer(), ("lo w",))
    pieces = push_all(tracker, "hello world")
    assert "".join(pieces) == "hel" == tracker.text
    assert tracker.stop_string == "lo w"


def test_a_split_character_waits_for_its_last_byte():
    tracker = TextTracker(ByteTokenizer())
    assert [tracker.push(b) for b in "é!".encode()] == ["", "é", "!"]


def test_a_false_start_is_released_when_it_cannot_be_a_stop():
    tracker = TextTracker(ByteTokenizer(), ("xyz",))
    assert push_all(tracker, "axyb") == ["a", "", "", "xyb"]
    assert tracker.stop_at is None and tracker.text == "axyb"


def test_final_releases_everything_held_back():
    tracker = TextTracker(ByteTokenizer(), ("xyz",))
    assert [tracker.push(b, final=i == 1) for i, b in enumerate(b"ax")] == ["a", "x"]
