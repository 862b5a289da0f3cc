"""The workers' own SSE parsing (workers/transport.py): the WHATWG framing rules on bytes
split anywhere, the event-size bound, and the event stream over a real httpx2 response."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator, Callable

import httpx2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_orchestrator.workers.base import WorkerError
from mcp_orchestrator.workers.sse import SSEDecoder, SSEEvent, SSEFramingError
from mcp_orchestrator.workers.transport import Endpoint, EventStream, open_event_stream

# The bytes of a real llama-server answer (max_tokens 4, with usage), as recorded from it.
LLAMA_STREAM = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],'
    b'"object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"Say"}}],'
    b'"object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"\xe3\x81\xab\xe8\xa1\x8c"}}],'
    b'"object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"object":"chat.completion.chunk"}\n\n'
    b'data: {"choices":[],"object":"chat.completion.chunk","usage":{"completion_tokens":4,"prompt_tokens":11}}\n\n'
    b"data: [DONE]\n\n"
)


def decode(*pieces: bytes, max_event_bytes: int = 1 << 20) -> list[SSEEvent]:
    decoder = SSEDecoder(max_event_bytes)
    return [event for piece in pieces for event in decoder.feed(piece)]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({min(cut, len(data)) for cut in cuts})
    return [data[start:end] for start, end in zip([0, *bounds], [*bounds, len(data)], strict=True)]


def test_a_real_answer_decodes_to_its_events() -> None:
    events = decode(LLAMA_STREAM)
    assert [event.event for event in events] == ["message"] * 6
    assert events[2].data.endswith('"delta":{"content":"に行"}}],"object":"chat.completion.chunk"}')
    assert events[-1] == SSEEvent("message", "[DONE]")


@given(st.lists(st.integers(min_value=0, max_value=len(LLAMA_STREAM)), max_size=40))
def test_reads_split_anywhere_give_the_same_events(cuts: list[int]) -> None:
    # Also inside a multibyte character: lines are decoded once complete, never per read.
    assert decode(*split(LLAMA_STREAM, cuts)) == decode(LLAMA_STREAM)


_text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=12)
_event = st.tuples(
    st.one_of(st.none(), _text.filter(lambda name: name != "")),  # event name, or the default
    st.lists(_text, min_size=1, max_size=3),  # data lines
    st.lists(_text, max_size=2),  # comment lines
)


@given(
    st.lists(_event, max_size=6),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.booleans(),
    st.lists(st.integers(min_value=0, max_value=400), max_size=30),
)
def test_the_framing_rules_hold_for_any_events_line_ending_and_split(
    events: list[tuple[str | None, list[str], list[str]]], newline: bytes, space: bool, cuts: list[int]
) -> None:
    stream = b""
    expected = []
    for name, data, comments in events:
        for comment in comments:
            stream += b":" + comment.encode() + newline
        if name is not None:
            stream += b"event:" + (b" " if space else b"") + name.encode() + newline
        for line in data:
            stream += b"data:" + (b" " if space else b"") + line.encode() + newline
        stream += newline
        # A value's first space belongs to the separator; only when we wrote one is it stripped.
        shown = [line if space or not line.startswith(" ") else line[1:] for line in data]
        event_name = name if space or name is None or not name.startswith(" ") else name[1:]
        expected.append(SSEEvent(event_name or "message", "\n".join(shown)))
    assert decode(*split(stream, cuts)) == expected


def test_line_endings_mixed_and_split_between_cr_and_lf() -> None:
    assert decode(b"data: a\r", b"\ndata: b\r", b"\r", b"data: c\n\n") == [
        SSEEvent("message", "a\nb"),
        SSEEvent("message", "c"),
    ]


def test_fields_as_the_spec_reads_them() -> None:
    events = decode(
        b": keep-alive\n\n"  # a comment alone dispatches nothing
        b"event: ping\n\n"  # no data: not dispatched, and the name does not leak into the next event
        b"data\n\n"  # a field name alone: empty data, still an event
        b"data:no space\nid: 7\nretry: 10\nunknown: x\n\n"
        b"event:  two spaces\ndata: x\n\n"
    )
    assert events == [
        SSEEvent("message", ""),
        SSEEvent("message", "no space"),
        SSEEvent(" two spaces", "x"),
    ]


def test_a_byte_order_mark_is_skipped_even_split() -> None:
    assert decode(b"\xef\xbb\xbfdata: a\n\n") == [SSEEvent("message", "a")]
    assert decode(b"\xef", b"\xbb", b"\xbfdata: a\n\n") == [SSEEvent("message", "a")]
    assert decode(b"data: \xef\xbb\xbfa\n\n") == [SSEEvent("message", "\ufeffa")]  # only at the very start


def test_an_unfinished_last_event_is_dropped_and_bad_utf8_replaced() -> None:
    assert decode(b"data: a\n\ndata: b\n") == [SSEEvent("message", "a")]
    assert decode(b"data: \xff\n\n") == [SSEEvent("message", "\ufffd")]


@pytest.mark.parametrize(
    "pieces",
    [
        [b"data: " + b"x" * 100],  # one line that never ends
        [b"data: " + b"x" * 50, b"y" * 50],  # ... arriving in pieces
        [b"data: " + b"x" * 40 + b"\n", b"data: " + b"y" * 40 + b"\n", b"data: z"],  # many lines, no blank one
    ],
)
def test_an_event_over_the_size_bound_is_refused(pieces: list[bytes]) -> None:
    with pytest.raises(SSEFramingError, match="exceeded the 64 byte limit"):
        decode(*pieces, max_event_bytes=64)


def test_the_bound_is_per_event() -> None:
    line = b"data: " + b"x" * 50 + b"\n\n"
    assert len(decode(line * 100, max_event_bytes=64)) == 100


# ---------------------------------------------------------------------------- over an httpx2 response

ENDPOINT = Endpoint(backend="test at http://sse.test", base_url="http://sse.test")


def serving(body: Callable[[], AsyncIterator[bytes]], headers: dict[str, str] | None = None) -> httpx2.AsyncClient:
    async def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream", **(headers or {})}, content=body())

    return httpx2.AsyncClient(transport=httpx2.MockTransport(handler))


async def read_all(client: httpx2.AsyncClient) -> list[SSEEvent]:
    async with client, open_event_stream(client, ENDPOINT, "/stream", {}) as events:
        return [event async for batch in events for event in batch]


@pytest.mark.anyio
async def test_events_arrive_in_batches_of_what_each_read_completed() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"data: a\n\ndata: b\n\ndata: c"
        yield b"\n\n"

    async with serving(body) as client, open_event_stream(client, ENDPOINT, "/stream", {}) as events:
        assert isinstance(events, EventStream)
        batches = [batch async for batch in events]
    assert batches == [[SSEEvent("message", "a"), SSEEvent("message", "b")], [SSEEvent("message", "c")]]


@pytest.mark.anyio
async def test_a_compressed_stream_is_decompressed() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield gzip.compress(LLAMA_STREAM)

    assert await read_all(serving(body, {"content-encoding": "gzip"})) == decode(LLAMA_STREAM)


@pytest.mark.anyio
async def test_an_oversized_event_is_a_permanent_malformed_response() -> None:
    async def body() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 65536  # never a newline

    with pytest.raises(WorkerError) as caught:
        await read_all(serving(body))
    assert not caught.value.retryable
    assert "malformed response: bad SSE framing" in str(caught.value)


@pytest.mark.anyio
async def test_a_broken_stream_is_a_retryable_error_and_drain_ignores_one() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"data: a\n\n"
        raise httpx2.ReadError("connection reset")

    with pytest.raises(WorkerError) as caught:
        await read_all(serving(broken))
    assert caught.value.retryable
    assert "the connection broke while reading the answer" in str(caught.value)

    async with serving(broken) as client, open_event_stream(client, ENDPOINT, "/stream", {}) as events:
        assert await anext(events) == [SSEEvent("message", "a")]
        await events.drain()  # what follows the last event does not matter


def test_endpoint_parses_each_url_once() -> None:
    endpoint = Endpoint(backend="b", base_url="http://127.0.0.1:8080/")
    first = endpoint.parsed_url("/v1/chat/completions")
    assert str(first) == "http://127.0.0.1:8080/v1/chat/completions"
    assert endpoint.parsed_url("/v1/chat/completions") is first
