#!/usr/bin/env python3
"""The serve-mode client's own timing error: asyncio streams vs a thread per request.

usage: python3 benchmarks/serve_client.py [--concurrency 1 16 64] [--tokens 32] [--rounds 3]

A stand-in server in another process streams like vLLM's OpenAI server (HTTP/1.1, chunked
transfer encoding, server-sent events): the first chunk FIRST_S after the request arrives, then
one chunk every GAP_S. What each client measures beyond those exact delays is its own error:
TTFT - FIRST_S and |ITL - GAP_S| (ms, median and p99 over every request and chunk), with the
client process's CPU seconds per request. Both clients send C requests at once per round:
asyncio is scripts/bench_cell.py's stream_completion (the load-level client); threads is its
older thread-per-request http.client path (VllmServer._stream). The server's own sleep jitter is
common to both.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from cellbench import serving  # noqa: E402

FIRST_S, GAP_S = 0.05, 0.02
SERVER = r"""
import asyncio, json, sys
FIRST, GAP = float(sys.argv[1]), float(sys.argv[2])
async def handle(reader, writer):
    await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length"):
            length = int(line.split(b":")[1])
    body = json.loads(await reader.readexactly(length))
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    def frame(data):
        data = b"data: " + data + b"\n\n"
        return b"%x\r\n%s\r\n" % (len(data), data)
    loop = asyncio.get_running_loop()
    due = loop.time() + FIRST
    for _ in range(body["max_tokens"]):
        await asyncio.sleep(max(0.0, due - loop.time()))
        writer.write(frame(b'{"choices": [{"index": 0, "text": "a"}]}'))
        await writer.drain()
        due += GAP
    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": body["max_tokens"]}})
    writer.write(frame(usage.encode()) + frame(b"[DONE]") + b"0\r\n\r\n")
    await writer.drain()
    writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_cell", ROOT / "scripts" / "bench_cell.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_asyncio(bench, port: int, count: int, tokens: int) -> list[dict]:
    records = [bench.new_record([1]) for _ in range(count)]
    body = {"prompt": [1], "max_tokens": tokens, "stream": True}

    async def all_at_once():
        start = time.perf_counter()
        await asyncio.gather(*(bench.stream_completion(port, body, r, start) for r in records))

    asyncio.run(all_at_once())
    return records


def run_threads(bench, port: int, count: int, tokens: int) -> list[dict]:
    fake = SimpleNamespace(PORT=port, completion_body=lambda prompt, n: {"prompt": prompt, "max_tokens": n})
    records = [bench.new_record([1]) for _ in range(count)]
    start = time.perf_counter()
    threads = [
        threading.Thread(target=bench.VllmServer._stream, args=(fake, [1], tokens, start, record)) for record in records
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


def errors(records: list[dict]) -> dict:
    timed = [serving.request_timings(r) for r in records]
    ttft = [(t["ttft_s"] - FIRST_S) * 1000 for t in timed if t["ok"]]
    itl = [abs(gap - GAP_S) * 1000 for t in timed if t["ok"] for gap in t["itl_s"]]
    return {"ttft": ttft, "itl": itl, "failed": sum(not t["ok"] for t in timed)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bench = load_bench()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(FIRST_S), str(GAP_S)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        port = int(server.stdout.readline())
        print(f"first chunk after {FIRST_S * 1000:.0f} ms, then every {GAP_S * 1000:.0f} ms; {args.tokens} tokens")
        print("client   C   TTFT err p50/p99 ms   |ITL err| p50/p99 ms   CPU ms/request   failed")
        for concurrency in args.concurrency:
            for name, run in (("asyncio", run_asyncio), ("threads", run_threads)):
                found = {"ttft": [], "itl": [], "failed": 0}
                cpu = time.process_time()
                for _ in range(args.rounds):
                    got = errors(run(bench, port, concurrency, args.tokens))
                    found = {k: found[k] + got[k] for k in found}
                cpu = (time.process_time() - cpu) / (concurrency * args.rounds) * 1000
                p = serving.percentile
                print(f"{name:8} {concurrency:3}   {p(found['ttft'], 50):7.2f} / {p(found['ttft'], 99):7.2f}     "
                      f"{p(found['itl'], 50):7.2f} / {p(found['itl'], 99):7.2f}      {cpu:8.2f}      "
                      f"{found['failed']}")  # fmt: skip
    finally:
        server.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
