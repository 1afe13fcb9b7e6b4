"""The floor of what a change costs: the same blocking query, nothing else.

``python -m bench.floor --consul HOST:PORT`` follows the agent's node with
one kept-alive connection and asyncio's streams, the least a Python process
can do per change (read the answer, parse its JSON, see whether
``_node_maintenance`` is critical, or with ``--key`` whether a KV key
exists, write the next query), and prints
``ready 0 PID`` and then ``status MONOTONIC STATUS`` per change, as
``bench.backends --report-changes`` does. :mod:`bench.change_cost` and
:mod:`bench.fleet` put the library's figures beside this one's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time


async def follow(address: str, key: str | None) -> None:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))

    async def ask(path: str) -> tuple[int, object]:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        fields = (line.partition(":") for line in head.split("\r\n")[1:])
        headers = {name.strip().lower(): value.strip() for name, _, value in fields}
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:
            chunks = []
            while size := int(await reader.readline(), 16):
                chunks.append(await reader.readexactly(size))
                await reader.readline()
            await reader.readline()
            body = b"".join(chunks)
        return int(headers.get("x-consul-index", 0)), json.loads(body or b"null")

    if key is None:
        _, agent = await ask("/v1/agent/self")
        path = f"/v1/health/node/{agent['Config']['NodeName']}"  # type: ignore[index]
    else:
        path = f"/v1/kv/{key}"
    print(f"ready 0 {os.getpid()}", flush=True)
    index, status = 0, None
    while True:
        index, answer = await ask(f"{path}?index={index}&wait=60000ms&stale=1")
        if key is None:
            critical = any(
                c["CheckID"] == "_node_maintenance" and c["Status"] == "critical"
                for c in answer  # type: ignore[attr-defined]
            )
        else:
            critical = answer is not None  # the key exists
        new = "maintenance" if critical else "ok"
        if status is not None and new != status:
            print(f"status {time.monotonic():.6f} {new}", flush=True)
        status = new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    parser.add_argument("--consul", required=True, help="the agent, host:port")
    parser.add_argument("--key", help="follow this KV key instead of the node")
    args = parser.parse_args(argv)
    asyncio.run(follow(args.consul, args.key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
