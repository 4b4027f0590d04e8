"""One text rule for streamed tokens and for text rebuilt from stored ids
(operations/detokenize.py)."""

from __future__ import annotations

import pytest

from qlmserve.operations.detokenize import decode, next_piece, streamed_text


def _stream(ids: list[int]) -> str:
    """What a worker's stream shows, token by token (backends/worker.py EngineLoop._detok)."""
    shown = ""
    for n in range(1, len(ids) + 1):
        piece = next_piece(None, ids[:n], shown)
        if piece is not None:
            shown += piece
    return shown


@pytest.mark.parametrize("ids", [
    list("héllo €".encode()),
    list("a€".encode())[:-1],  # ends inside the euro sign: held back for good
    list("€".encode())[:1],
    [300, 104, 105, 999],  # ids past 255 carry no text in a simulated model
    [0xE2, 0x82, 0xAC, 0xE2, 0x82],
    [],
])
def test_streamed_text_equals_what_the_stream_showed(ids):
    """This test verifies that:
    1. the text rebuilt from the stored ids (streamed_text) equals what the token-by-token
       stream showed, for complete text, text ending inside a multi-byte character, and
       ids that carry no text;
    2. the stream never shows a replacement character for a character still incomplete,
       and the text of any split point adds up (the controller's text after an offset)."""
    assert streamed_text(None, ids) == _stream(ids)
    assert "\ufffd" not in _stream(ids)
    for cut in range(len(ids) + 1):
        before, after = streamed_text(None, ids[:cut]), streamed_text(None, ids)
        assert after.startswith(before)


def test_decode_of_a_simulated_model_is_utf8_bytes():
    assert decode(None, list("héllo".encode())) == "héllo"
    assert next_piece(None, list("€".encode())[:2], "") is None
