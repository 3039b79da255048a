"""A misbehaving TCP link in user space: latency, dropped connections, connections cut mid-way.

These kernels have no netem, so members reach the coordinator through this proxy instead:

    python tests/netns/netns_proxy.py --listen 10.77.0.1:0 --target 10.77.0.1:7443 \
        --latency-ms 25 --drop 0.3 --cut-after 60000 --seed 1 \
        --port-file proxy.port --stats-file proxy.json

- every chunk read from either side is written to the other `--latency-ms` later (order kept;
  chunks in flight overlap, so latency does not cap the bandwidth);
- a new connection is reset at once, never forwarded, with probability `--drop` (decisions
  drawn from `--seed`), and always when it is among the first `--drop-first` connections from
  its source address;
- a connection is reset on both sides once it has carried `--cut-after` bytes (counted in
  `--cut-direction`: "down" from the target, "up" to it, or "both"), wherever the protocol is:
  the bytes that would cross the mark never arrive;
- with `--cut-upload-over B`, a connection is reset when more than B bytes come from the
  client within UPLOAD_WINDOW_S: in the middle of a large upload;
- `--max-cuts` bounds the cuts of both kinds, over all connections.

The port it listens on goes to `--port-file` (written once listening); the counts (connections,
dropped, cut, bytes each way) to `--stats-file` (JSON, rewritten after every change). It runs
until SIGTERM or SIGINT. Standard library only: it runs wherever Python 3.11 does.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import socket
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CHUNK = 65536
#: `--cut-upload-over` counts the bytes from the client within this many seconds.
UPLOAD_WINDOW_S = 0.2


@dataclass
class Stats:
    connections: int = 0
    dropped: int = 0
    cut: int = 0
    bytes_to_target: int = 0
    bytes_from_target: int = 0


@dataclass
class Rules:
    """The impairments (see the module docstring)."""

    latency_s: float = 0.0
    drop: float = 0.0
    drop_first: int = 0
    cut_after: int | None = None
    cut_direction: str = "both"
    cut_upload_over: int | None = None
    max_cuts: int | None = None
    seed: int = 0


class _Link:
    """One forwarded connection: what it carried, and whether it has been cut."""

    def __init__(self) -> None:
        self.carried = 0
        self.recent_up: collections.deque[tuple[float, int]] = collections.deque()
        self.cut = asyncio.Event()


class Proxy:
    """Forwards connections to `target` with the impairments of `rules`."""

    def __init__(self, target: tuple[str, int], rules: Rules, stats_file: Path | None) -> None:
        self.target = target
        self.rules = rules
        self.random = random.Random(rules.seed)
        self.stats = Stats()
        self.stats_file = stats_file
        self.per_host: collections.Counter[str] = collections.Counter()

    def write_stats(self) -> None:
        if self.stats_file is None:
            return
        tmp = self.stats_file.with_name(self.stats_file.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self.stats)))
        os.replace(tmp, self.stats_file)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.forward(reader, writer)
        except asyncio.CancelledError:
            # The proxy is stopping: end quietly (asyncio would print a cancelled handler).
            writer.transport.abort()

    async def forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: drop it, or forward it until both sides close or it is cut."""
        self.stats.connections += 1
        host = str(writer.get_extra_info("peername")[0])
        self.per_host[host] += 1
        chance = self.random.random()  # drawn for every connection: the sequence is the seed's
        if self.per_host[host] <= self.rules.drop_first or chance < self.rules.drop:
            self.stats.dropped += 1
            self.write_stats()
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        link = _Link()
        pumps = [
            asyncio.create_task(self.pump(reader, up_writer, link, to_target=True)),
            asyncio.create_task(self.pump(up_reader, writer, link, to_target=False)),
        ]
        cutter = asyncio.create_task(link.cut.wait())
        # The connection ends when both directions have closed (each passes its end of stream
        # on) or when it is cut (both sides reset at once).
        while not link.cut.is_set() and (pending := [p for p in pumps if not p.done()]):
            await asyncio.wait([*pending, cutter], return_when=asyncio.FIRST_COMPLETED)
        cutter.cancel()
        for task in pumps:
            task.cancel()
        if link.cut.is_set():
            _reset(writer)
            _reset(up_writer)
        else:
            for w in (writer, up_writer):
                w.close()
        self.write_stats()

    def counted(self, to_target: bool) -> bool:
        """Whether bytes in this direction count towards `--cut-after`."""
        direction = self.rules.cut_direction
        return direction == "both" or (direction == "up") == to_target

    def should_cut(self, link: _Link, size: int, *, to_target: bool) -> bool:
        """Whether `size` more bytes in this direction break the link (and never arrive)."""
        rules = self.rules
        if rules.max_cuts is not None and self.stats.cut >= rules.max_cuts:
            return False
        counted = self.counted(to_target)
        if rules.cut_after is not None and counted and link.carried + size >= rules.cut_after:
            return True
        if rules.cut_upload_over is not None and to_target and size:
            now = time.monotonic()
            link.recent_up.append((now, size))
            while link.recent_up[0][0] < now - UPLOAD_WINDOW_S:
                link.recent_up.popleft()
            return sum(n for _, n in link.recent_up) > rules.cut_upload_over
        return False

    async def pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        *,
        to_target: bool,
    ) -> None:
        """Read chunks as they come; deliver each `latency_s` after it was read."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        deliver = asyncio.create_task(self.deliver(queue, writer))
        try:
            while not link.cut.is_set():
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    data = b""
                if link.cut.is_set():
                    return
                if self.should_cut(link, len(data), to_target=to_target):
                    self.stats.cut += 1
                    link.cut.set()
                    return
                link.carried += len(data) if self.counted(to_target) else 0
                if to_target:
                    self.stats.bytes_to_target += len(data)
                else:
                    self.stats.bytes_from_target += len(data)
                await queue.put((time.monotonic() + self.rules.latency_s, data))
                if not data:
                    break
            await deliver
        finally:
            deliver.cancel()

    async def deliver(
        self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter
    ) -> None:
        while True:
            due, data = await queue.get()
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if not data:  # the source closed: pass the end of stream on
                with contextlib.suppress(OSError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            try:
                writer.write(data)
                await writer.drain()
            except OSError:
                return


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a broken link looks to the peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def serve(args: argparse.Namespace) -> None:
    rules = Rules(
        latency_s=args.latency_ms / 1000.0,
        drop=args.drop,
        drop_first=args.drop_first,
        cut_after=args.cut_after,
        cut_direction=args.cut_direction,
        cut_upload_over=args.cut_upload_over,
        max_cuts=args.max_cuts,
        seed=args.seed,
    )
    stats_file = Path(args.stats_file) if args.stats_file else None
    proxy = Proxy(_host_port(args.target), rules, stats_file)
    host, port = _host_port(args.listen)
    server = await asyncio.start_server(proxy.handle, host, port)
    proxy.write_stats()
    if args.port_file:
        bound = server.sockets[0].getsockname()[1]
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(bound))
        os.replace(tmp, args.port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on (port 0: any)")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every chunk")
    parser.add_argument("--drop", type=float, default=0.0, help="chance a connection is reset")
    parser.add_argument("--drop-first", type=int, default=0, help="reset the first N per host")
    parser.add_argument("--cut-after", type=int, default=None, help="reset after this many bytes")
    parser.add_argument("--cut-direction", choices=["both", "down", "up"], default="both")
    parser.add_argument("--cut-upload-over", type=int, default=None, help="reset in big uploads")
    parser.add_argument("--max-cuts", type=int, default=None, help="at most this many cuts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port-file", help="where to write the port listened on")
    parser.add_argument("--stats-file", help="where to keep the counts (JSON)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.drop < 1.0:
        parser.error("--drop must be in [0, 1)")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
