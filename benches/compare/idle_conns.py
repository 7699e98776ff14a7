#!/usr/bin/env python3
"""Open N keep-alive connections to 127.0.0.1:PORT; each sends one GET and
reads the whole response, then stays open and idle. Requests go out at most
CONCURRENCY at a time so the proxy's upstream pool stays small (the
measurement is about client connections). Prints "READY <ok> <failed>" once
all are idle, then holds until SIGTERM/SIGINT or HOLD seconds, and checks how
many were closed by the peer meanwhile ("HELD <still_open>").

usage: idle_conns.py PORT [N=2000] [HOLD=60] [CONCURRENCY=16]
"""
import asyncio
import signal
import sys


async def one(port, sem, conns):
    async with sem:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: idle-conns\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head[:40])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if length:
            await reader.readexactly(length)
        conns.append((reader, writer))


async def main():
    port = int(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    hold = float(sys.argv[3]) if len(sys.argv) > 3 else 60.0
    conc = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    sem = asyncio.Semaphore(conc)
    conns = []
    results = await asyncio.wait_for(
        asyncio.gather(*(one(port, sem, conns) for _ in range(n)), return_exceptions=True),
        timeout=60,
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    print(f"READY {len(conns)} {len(failed)}", flush=True)
    if failed:
        print(f"first failure: {failed[0]!r}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), timeout=hold)
    except asyncio.TimeoutError:
        pass
    still = sum(1 for r, _ in conns if not r.at_eof())
    print(f"HELD {still}", flush=True)
    for _, w in conns:
        w.close()


if __name__ == "__main__":
    asyncio.run(main())
