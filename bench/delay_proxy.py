"""A TCP proxy on 127.0.0.1 that holds every chunk, each way, for a while: a store "far away".

    python bench/delay_proxy.py LISTEN_PORT TARGET_PORT DELAY_MS

Each chunk read from one side reaches the other side DELAY_MS later, in order. asyncio's
timers are coarse (about a millisecond), so measure the round trip through it rather than
trust the figure given (bench/negotiate.py does: redis PING). Prints "ready" once listening;
runs until killed. Loopback only.
"""

from __future__ import annotations

import asyncio
import sys
import time


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def release() -> None:
        while True:
            due, data = await held.get()
            if not data:
                writer.close()
                return
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            writer.write(data)

    releasing = asyncio.create_task(release())
    try:
        while data := await reader.read(65536):
            held.put_nowait((time.monotonic() + delay, data))
    except ConnectionError:
        pass
    held.put_nowait((0.0, b""))
    await releasing


async def _main(listen: int, target: int, delay: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            _pipe(reader, up_writer, delay), _pipe(up_reader, writer, delay),
            return_exceptions=True,
        )  # fmt: skip

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000))
