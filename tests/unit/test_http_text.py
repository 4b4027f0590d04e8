"""The HTTP API's text rules, pure: stop strings over streamed pieces, chat templates,
the OpenAI error body and its `param`."""

from __future__ import annotations

import pytest

from qlmserve.controller.exceptions import InvalidRequest, Overloaded, UnknownModel
from qlmserve.controller.http.chat_template import plain_template, render
from qlmserve.controller.http.errors import classify
from qlmserve.controller.http.stop import StopMatcher
from qlmserve.controller.tokenizers import TokenizerCache
from qlmserve.operations.model_spec import ModelSpec

pytestmark = pytest.mark.unit


def _run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces)
    return out + m.flush(), m.stopped


def test_stop_strings_across_pieces():
    """This test verifies that a stop string is found when it spans pieces, that the text
    before it is all sent and nothing after it, that text which only began a stop string is
    sent once the next piece rules it out, and that the earliest of several stops wins."""
    assert _run(["END"], ["hello E", "N", "D and more"]) == ("hello ", True)
    assert _run(["END"], ["hello E", "NX"]) == ("hello ENX", False)
    assert _run(["END"], ["tail E"]) == ("tail E", False)  # the stream ended: held text is sent
    assert _run(["\n\n", "b"], ["a", "b\n\nc"]) == ("a", True)
    assert _run([], ["a", "b"]) == ("ab", False)
    m = StopMatcher(["xy"])
    assert m.feed("ax") == "a" and m.held == "x"
    assert m.feed("y tail") == "" and m.stopped and m.feed("more") == ""


def test_chat_templates(tmp_path):
    """This test verifies that a model without a tokenizer chat template gets the plain
    template (role lines, then `assistant:`), one whose tokenizer has a template gets that
    template's rendering, with its own special tokens only (no second BOS), and a template
    that refuses the messages is a bad request naming `messages`."""
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert plain_template(msgs) == "system: be brief\nuser: hi\nassistant:"
    byte_model = TokenizerCache({"sim": ModelSpec()})
    assert render(byte_model, "sim", msgs) == list(plain_template(msgs).encode())

    from qlmserve.tiny_models import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    tok.save_pretrained(tmp_path)
    cache = TokenizerCache({"tiny": ModelSpec(path=str(tmp_path))})
    ids = render(cache, "tiny", msgs)
    assert tok.decode(ids) == "<system>be brief<user>hi<assistant>"

    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    tok.save_pretrained(tmp_path)
    with pytest.raises(InvalidRequest, match="field 'messages'.*roles must alternate"):
        render(TokenizerCache({"tiny": ModelSpec(path=str(tmp_path))}), "tiny", msgs)


def test_error_bodies():
    """This test verifies that controller errors become the OpenAI error body with the
    matching status, `param` in the OpenAI request's field names, and Retry-After on 429."""
    st, body, _ = classify(InvalidRequest("field 'sampling.top_p' must be in [0, 1] (0 or 1: off)"))
    assert st == 400 and body["error"]["param"] == "top_p" and "field 'top_p'" in body["error"]["message"]
    st, body, _ = classify(InvalidRequest("field 'prompt': the prompt has no tokens"), prompt_param="messages")
    assert body["error"]["param"] == "messages"
    st, body, _ = classify(UnknownModel("field 'model': the policy serves no such model"))
    assert st == 404 and body["error"]["type"] == "not_found_error"
    st, body, headers = classify(Overloaded("class 'batch': limit reached", retry_after_s=2.4))
    assert st == 429 and headers["Retry-After"] == "2"
    assert classify(RuntimeError("boom")) is None


def test_port_search_skips_a_busy_port():
    """This test verifies that the embedded default's port search (8000, or the next free
    port) moves past a port in use, and that an exact port in use is an error naming it."""
    import socket

    from qlmserve.controller.http.app import bind

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        s = bind("127.0.0.1", port, search=20)
        assert s.getsockname()[1] > port
        s.close()
        with pytest.raises(OSError, match=str(port)):
            bind("127.0.0.1", port)
    finally:
        busy.close()
