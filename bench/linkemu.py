"""A user-space link emulator: a TCP proxy that imposes bandwidth, one-way delay, stalls and connection drops.

Bench and test machinery (``bench/`` is not installed): benches and integration tests put it between a client
and a server; nothing in the installed packages imports it.

This kernel has no netem, so delay and loss are emulated here, between an edge agent (or any client) and a
server on loopback. Each direction of each connection is a separate link::

    client --(uplink: rate, delay, stalls)--> proxy --> server
    client <--(downlink: rate, delay, stalls)-- proxy <-- server

A chunk read from one side departs when the link is free (serialization at ``rate_bps``: a token bucket with
no burst) and is delivered ``delay_s`` later, in order. TCP never loses bytes, so packet loss is emulated by
its effect on a TCP stream: with probability ``stall_prob`` per chunk the link stalls for ``stall_s``
(a retransmission timeout's head-of-line blocking). With probability ``drop_prob`` per chunk the connection
is reset (both sides closed), which is what a middlebox or a dying server does. Reading stops while
``max_queue`` chunks wait to be serialized (the bottleneck's buffer), so a fast sender is slowed down by TCP
flow control, as by a real bottleneck; bytes already serialized and propagating (up to bandwidth x delay)
do not count against that buffer.

Use :class:`LinkEmulator` from asyncio, or :func:`start_in_thread` from synchronous code (tests, benchmarks)::

    with start_in_thread("127.0.0.1", server_port, LinkSettings(rate_bps=5e6, delay_s=0.02)) as emu:
        client = CloudClient(f"127.0.0.1:{emu.port}", ...)

``python -m bench.linkemu --target HOST:PORT --rate 5mbit --delay 20ms [--listen-port P]`` runs one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import threading
from dataclasses import dataclass, field

CHUNK = 16 * 1024


@dataclass(frozen=True)
class LinkSettings:
    """One direction's behaviour (the same settings apply to both directions unless ``down`` is given)."""

    rate_bps: float | None = None  # None: unlimited
    delay_s: float = 0.0
    stall_prob: float = 0.0
    stall_s: float = 0.2
    drop_prob: float = 0.0

    def __post_init__(self):
        if self.rate_bps is not None and self.rate_bps <= 0:
            raise ValueError(f"rate must be positive, got {self.rate_bps}")
        if self.delay_s < 0 or self.stall_s < 0:
            raise ValueError("delay and stall duration must not be negative")
        for name in ("stall_prob", "drop_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be within [0, 1]")


@dataclass(eq=False)  # identity semantics: live schedules are kept in sets
class LinkSchedule:
    """Departure and delivery times of one direction (pure logic: no sockets, no clock)."""

    settings: LinkSettings
    free_at: float = 0.0

    def schedule(self, now: float, nbytes: int, stall: bool = False) -> float:
        """Delivery time of a chunk of ``nbytes`` that arrives at ``now``."""
        start = max(now, self.free_at)
        if stall:
            start += self.settings.stall_s
        tx = nbytes * 8 / self.settings.rate_bps if self.settings.rate_bps else 0.0
        self.free_at = start + tx
        return self.free_at + self.settings.delay_s


@dataclass
class LinkStats:
    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    stalls: int = 0
    drops: int = 0
    errors: list[str] = field(default_factory=list)


class LinkEmulator:
    """The proxy. ``await start()`` binds (``port`` is then known); ``await close()`` stops and resets all."""

    def __init__(self, target_host: str, target_port: int, up: LinkSettings, down: LinkSettings | None = None,
                 listen_host: str = "127.0.0.1", listen_port: int = 0, seed: int = 0, max_queue: int = 8):
        self.target = (target_host, target_port)
        self.up, self.down = up, down or up
        self.listen = (listen_host, listen_port)
        self.rng = random.Random(seed)
        self.max_queue = max_queue
        self.stats = LinkStats()
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._live: dict[str, set[LinkSchedule]] = {"up": set(), "down": set()}

    def update(self, up: LinkSettings, down: LinkSettings | None = None) -> None:
        """Change the link's behaviour for new and open connections (from the next chunk on)."""
        self.up, self.down = up, down or up
        for link in list(self._live["up"]):
            link.settings = self.up
        for link in list(self._live["down"]):
            link.settings = self.down

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.target)
        except OSError as exc:  # the server is down: the client sees its connection closed, as without us
            self.stats.errors.append(f"connect {self.target}: {exc}")
            c_writer.close()
            return
        self._writers.update((c_writer, s_writer))
        conn = {"closed": False}

        def reset() -> None:
            conn["closed"] = True
            for w in (c_writer, s_writer):
                with contextlib.suppress(Exception):
                    w.transport.abort()

        pipes = [self._pipe(c_reader, s_writer, LinkSchedule(self.up), "up", reset, conn),
                 self._pipe(s_reader, c_writer, LinkSchedule(self.down), "down", reset, conn)]
        tasks = [asyncio.create_task(p) for p in pipes]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.difference_update(tasks)
        self._writers.difference_update((c_writer, s_writer))
        for w in (c_writer, s_writer):
            with contextlib.suppress(Exception):
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: LinkSchedule,
                    direction: str, reset, conn: dict) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()  # chunks in the buffer or propagating: bounded below
        self._live[direction].add(link)

        async def deliver() -> None:
            while True:
                at, data = await queue.get()
                if data is None:
                    with contextlib.suppress(Exception):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if conn["closed"]:
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while not conn["closed"]:
                settings = link.settings  # update() may change it between chunks
                buffer_s = self.max_queue * CHUNK * 8 / settings.rate_bps if settings.rate_bps else 0.0
                backlog = link.free_at - loop.time()  # serialization time of what waits in the buffer
                if backlog > buffer_s:
                    await asyncio.sleep(backlog - buffer_s)
                elif not settings.rate_bps and queue.qsize() > 4 * self.max_queue + 1024:
                    await asyncio.sleep(0.001)  # an unlimited link: keep memory bounded all the same
                data = await reader.read(CHUNK)
                if not data:
                    await queue.put((0.0, None))
                    break
                if settings.drop_prob and self.rng.random() < settings.drop_prob:
                    self.stats.drops += 1
                    reset()
                    break
                stall = bool(settings.stall_prob and self.rng.random() < settings.stall_prob)
                self.stats.stalls += stall
                if direction == "up":
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                await queue.put((link.schedule(loop.time(), len(data), stall), data))
            await sender
        except (ConnectionError, asyncio.IncompleteReadError):
            reset()
        finally:
            sender.cancel()
            self._live[direction].discard(link)


class RunningEmulator:
    """A :class:`LinkEmulator` on its own event loop thread (for synchronous callers)."""

    def __init__(self, emulator: LinkEmulator):
        self.emulator = emulator
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="linkemu", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("link emulator did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self.emulator.start())
        self._ready.set()
        self._loop.run_forever()

    @property
    def port(self) -> int:
        return self.emulator.port

    @property
    def stats(self) -> LinkStats:
        return self.emulator.stats

    def update(self, up: LinkSettings, down: LinkSettings | None = None) -> None:
        """Change the settings (thread-safe; applies from the next chunk of every connection)."""
        self._loop.call_soon_threadsafe(self.emulator.update, up, down)

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.emulator.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> RunningEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_in_thread(target_host: str, target_port: int, up: LinkSettings, down: LinkSettings | None = None,
                    **kw) -> RunningEmulator:
    """Start an emulator in a background thread; use as a context manager or call ``stop()``."""
    return RunningEmulator(LinkEmulator(target_host, target_port, up, down, **kw))


def main(argv: list[str] | None = None) -> None:
    from partitioner.cost import parse_bandwidth, parse_duration

    ap = argparse.ArgumentParser(description="user-space TCP link emulator (bandwidth, delay, stalls, drops)")
    ap.add_argument("--target", required=True, help="HOST:PORT of the server")
    ap.add_argument("--listen-host", default="127.0.0.1")
    ap.add_argument("--listen-port", type=int, default=0)
    ap.add_argument("--rate", default=None, help="per-direction bandwidth, e.g. 5mbit (default unlimited)")
    ap.add_argument("--delay", default="0ms", help="one-way delay, e.g. 20ms")
    ap.add_argument("--stall-prob", type=float, default=0.0)
    ap.add_argument("--stall", default="200ms")
    ap.add_argument("--drop-prob", type=float, default=0.0)
    args = ap.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    settings = LinkSettings(rate_bps=parse_bandwidth(args.rate) if args.rate else None,
                            delay_s=parse_duration(args.delay), stall_prob=args.stall_prob,
                            stall_s=parse_duration(args.stall), drop_prob=args.drop_prob)

    async def run() -> None:
        emu = LinkEmulator(host, int(port), settings, listen_host=args.listen_host, listen_port=args.listen_port)
        await emu.start()
        print(f"link emulator on {args.listen_host}:{emu.port} -> {args.target} ({settings})", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await emu.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
