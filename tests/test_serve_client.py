"""The serve-mode load generator of scripts/bench_cell.py against a small stdlib server that
streams like vLLM's (HTTP/1.1, chunked transfer encoding, server-sent events): what it records
per request, the closed and open loops, the cool-down, and a server that dies mid-level."""

import asyncio
import json
import random
import threading

import pytest
from cellbench import measure, serving

TOKENS, GAP = 4, 0.02  # tokens per answer, seconds between streamed chunks


class FakeServer:
    """An OpenAI-style /v1/completions that streams TOKENS chunks GAP apart, then usage and [DONE]."""

    def __init__(self, status: int = 200):
        self.status, self.seen, self.in_flight, self.most = status, [], 0, 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()
        self.ready.wait(5)

    def _serve(self):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _handle(self, reader, writer):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length"):
                    length = int(line.split(b":")[1])
            body = json.loads(await reader.readexactly(length))
            self.seen.append(body)
            if self.status != 200:
                text = b'{"error": "bad"}'
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")

            def frame(event: dict | str) -> bytes:
                data = b"data: " + (event if isinstance(event, str) else json.dumps(event)).encode() + b"\n\n"
                return b"%x\r\n%s\r\n" % (len(data), data)

            for _ in range(body["max_tokens"]):
                await asyncio.sleep(GAP)
                writer.write(frame({"choices": [{"index": 0, "text": "a"}]}))
                await writer.drain()
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
            writer.write(frame({"choices": [], "usage": usage}) + frame("[DONE]") + b"0\r\n\r\n")
            await writer.drain()
        finally:
            self.in_flight -= 1
            writer.close()


class Engine:
    """What a load level needs of a server: send, alive, death."""

    def __init__(self, bench, server, alive_for: int | None = None):
        self.bench, self.server, self.calls, self.alive_for = bench, server, 0, alive_for
        self.vocab_size, self.special_ids = 1000, {0}

    async def send(self, prompt, output_len, record, start):
        body = {"prompt": prompt, "max_tokens": output_len, "stream": True}
        await self.bench.stream_completion(self.server.port, body, record, start)

    def alive(self):
        self.calls += 1
        return self.alive_for is None or self.calls <= self.alive_for

    def death(self):
        return "vLLM server exited with code 1: boom"


@pytest.fixture(scope="module")
def server():
    return FakeServer()


def _requests(n, lengths=(TOKENS,)):
    return [([1, 2, 3], lengths[i % len(lengths)]) for i in range(n)]


def test_a_streamed_request_is_timed_per_chunk(bench, server):
    record = bench.new_record([1, 2, 3])
    asyncio.run(Engine(bench, server).send([1, 2, 3], TOKENS, record, 0.0))
    assert record["error"] is None and record["output_tokens"] == TOKENS and record["prompt_tokens"] == 3
    assert len(record["chunk_s"]) == TOKENS  # the usage chunk carries no text: not a token
    timed = serving.request_timings(record)
    assert timed["ttft_s"] >= GAP * 0.9
    assert all(gap >= GAP * 0.5 for gap in timed["itl_s"])
    assert record["end_s"] >= record["chunk_s"][-1]


def test_a_refused_request_is_a_failed_record(bench):
    record = bench.new_record([1])
    body = {"prompt": [1], "max_tokens": 1}
    asyncio.run(bench.stream_completion(1, body, record, 0.0))  # nothing listens on port 1
    assert record["error"].startswith("ConnectionRefusedError") and record["end_s"] is not None


def test_an_error_status_is_a_failed_record(bench):
    record = bench.new_record([1])
    asyncio.run(Engine(bench, FakeServer(status=400)).send([1], 2, record, 0.0))
    assert record["error"].startswith("server answered 400") and not record["chunk_s"]


def test_closed_loop_keeps_the_concurrency_and_cools_down(bench, server):
    load = serving.level("concurrency", 3, "sweep")
    server.most = 0
    requests = _requests(40, (2, 4, 7, 3))  # answers of different lengths end at different times
    records = asyncio.run(bench._run_level(Engine(bench, server), load, requests, 3, 6, random.Random(0)))
    warmup, measured, cooldown = serving.split(records, 3, 6)
    assert len(measured) == 6 and all(r["error"] is None for r in warmup + measured)
    assert server.most == 3  # never more in flight than the level's concurrency
    # the load stays on until the last measured request ended: cool-down requests were sent
    assert cooldown and all(r["send_s"] is not None for r in cooldown)
    sends = [r["send_s"] for r in records]
    assert sends == sorted(sends)  # records are in send order
    last_measured_end = max(r["chunk_s"][-1] for r in measured)
    assert any(r["send_s"] <= last_measured_end for r in cooldown)
    # cool-down requests still running when the last measured one ended were cancelled
    assert all(r["error"] in (None, "cancelled: the level ended") for r in cooldown)


def test_open_loop_sends_at_the_rate(bench, server):
    load = serving.level("request_rate", 50.0, "sweep")
    records = asyncio.run(bench._run_level(Engine(bench, server), load, _requests(100), 2, 20, random.Random(1)))
    figures = serving.level_figures(records, 2, 20, {"ttft_ms": 1000})
    assert figures["completed"] == 20 and figures["slo_share"] == 1.0
    sends = [r["send_s"] for r in records[:22]]
    # 21 gaps at 50 req/s: 0.42 s expected; a generous band for a busy host
    assert 0.15 < sends[-1] - sends[0] < 1.5


def test_an_open_loop_at_its_cool_down_cap_waits_for_the_measured_requests(bench, server):
    # 100 req/s: all 1 + 2 x 3 requests are sent within ~0.1 s, each streams 20 x 20 ms = 0.4 s
    load = serving.level("request_rate", 100.0, "sweep")
    requests = _requests(20, (20,))
    records = asyncio.run(bench._run_level(Engine(bench, server), load, requests, 1, 3, random.Random(2)))
    assert len(records) == 7  # the cap: warm-up + 2 x measured
    _, measured, _ = serving.split(records, 1, 3)
    assert all(r["error"] is None and len(r["chunk_s"]) == 20 for r in measured)


def test_a_server_that_dies_mid_level_raises(bench, server):
    load = serving.level("concurrency", 2, "sweep")
    with pytest.raises(bench.ServerDied, match="exited with code 1"):
        asyncio.run(bench._run_level(Engine(bench, server, alive_for=3), load, _requests(50), 2, 40, random.Random(0)))


def test_run_level_record_becomes_a_row(bench, server):
    cell = {"sweep": {"seed": 0}, "serve": {"concurrency": [2], "requests_per_level": 2, "slo": {"ttft_ms": 5000}}}
    point = {"batch_size": 2, "input_len": 8, "output_len": TOKENS, **serving.level("concurrency", 2, "sweep")}
    level = bench.run_level(Engine(bench, server), cell, point, 0, None)
    assert (level["warmup_requests"], level["measured_requests"]) == (2, 4)
    assert all(len(body["prompt"]) == 8 for body in server.seen[-4:])
    row = measure.level_columns(level, cell["serve"]["slo"])
    assert row["requests_measured"] == 4 and row["requests_failed"] == 0 and row["slo_share"] == 1.0
    assert row["output_tokens"] == 4 * TOKENS and row["goodput_rps"] == pytest.approx(row["requests_s"])


def test_levels_send_different_prompts(bench):
    cell = {"sweep": {"seed": 0}}
    engine = Engine(bench, None)
    shape = {"batch_size": 0, "input_len": 4, "output_len": 2}
    one = bench.point_requests(cell, {**shape, **serving.level("request_rate", 1, "sweep")}, 0, 3, engine)
    two = bench.point_requests(cell, {**shape, **serving.level("request_rate", 2, "sweep")}, 0, 3, engine)
    assert [p for p, _ in one] != [p for p, _ in two] and {n for _, n in one} == {2}


def test_body_lines_decode_chunks_split_across_reads(bench):
    events = [b'data: {"a": 1}\n\n', b"data: [DONE]\n\n"]
    raw = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    # three reads: the first ends inside the first event's chunk, the second inside the size line of the next
    cut1, cut2 = 9, raw.index(b"data: [DONE]") - 3
    reads = [(1.0, raw[:cut1]), (2.0, raw[cut1:cut2]), (3.0, raw[cut2:])]
    lines = [(t, line) for t, line in bench.body_lines(reads, chunked=True) if line]
    assert lines == [(2.0, b'data: {"a": 1}'), (3.0, b"data: [DONE]")]
    assert bench.body_complete(raw[-16:], True) and not bench.body_complete(raw[:cut2][-16:], True)
    plain = bench.body_lines([(1.0, b"data: x\n"), (2.0, b"\ndata: y\n")], chunked=False)
    assert plain == [(1.0, b"data: x"), (2.0, b""), (2.0, b"data: y")]
