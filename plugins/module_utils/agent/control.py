"""keywayd's control socket: a Unix stream socket (root only) speaking JSON lines.

Protocol, one JSON object per line each way:

    -> {"command": "list-sas", "args": {}}
    <- {"ok": true, "result": [...]}
    <- {"ok": false, "error": "no connection 'x'"}

Commands: status, list-conns, list-sas, initiate {connection}, terminate {connection,
child?}, rekey {connection, child?}, reload, stats, metrics, watch. `watch` answers
{"ok": true, "result": "watching"} and then streams {"event": NAME, ...} lines until
the client closes. Several requests may follow each other on one connection. Keys never
cross this socket: the daemon's handlers only return SPIs, names and counters.

The same module holds the client (`request`, `watch`) that keywayctl and the Ansible
modules use, so both ends agree on framing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

# Where keywayd listens unless its config says control_socket (keywayctl, the modules).
DEFAULT_SOCKET = "/run/keyway/keywayd.sock"
from typing import Any

log = logging.getLogger("keyway.control")

MAX_LINE = 1 << 20  # a request larger than this is refused, not buffered
Handler = Callable[[dict], Awaitable[Any]]


class ControlError(Exception):
    """The daemon refused a command, or could not be reached; the message says why."""


class InstanceLock:
    """One keywayd per control socket: an exclusive lock on `SOCKET.lock`, taken before
    the daemon touches its data plane or its socket (a second instance would flush the
    running one's SAs and unlink its socket). The kernel drops the lock when the process
    ends however it ends, so a crash leaves nothing that blocks a restart."""

    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self.path = socket_path + ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        Path(self.path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ControlError(
                    f"another keywayd (pid {holder}) is running with control socket "
                    f"{self.socket_path}; not starting a second one"
                ) from None
            # Its last holder may have removed the file between our open and lock.
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still held: no one can take a file being removed
        os.close(self._fd)
        self._fd = None


class ControlServer:
    def __init__(self, path: str, handler: Handler, subscribe: Callable[[], AsyncIterator[dict]]):
        self.path = path
        self.handler = handler
        self.subscribe = subscribe
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task] = set()

    async def start(self) -> None:
        directory = Path(self.path).parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left by a daemon that died without cleaning up
        old_umask = os.umask(0o177)  # the socket is born 0600: no window for others
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=self.path, limit=MAX_LINE
            )
        finally:
            os.umask(old_umask)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._clients.add(task)
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                        raise ValueError("a request is an object with a 'command' string")
                except ValueError as exc:
                    await _send(writer, {"ok": False, "error": f"bad request: {exc}"})
                    continue
                if request["command"] == "watch":
                    stream = self.subscribe()  # registered before the client hears so
                    await _send(writer, {"ok": True, "result": "watching"})
                    async for event in stream:
                        await _send(writer, event)
                    return
                try:
                    result = await self.handler(request)
                    reply = {"ok": True, "result": result}
                except ControlError as exc:
                    reply = {"ok": False, "error": str(exc)}
                except Exception as exc:  # a bug must not take the daemon down
                    log.exception("control command %s failed", request["command"])
                    reply = {"ok": False, "error": f"internal error: {exc}"}
                await _send(writer, reply)
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass  # the client went away or sent an oversized line
        except asyncio.CancelledError:
            pass
        finally:
            self._clients.discard(task)
            writer.close()


async def _send(writer: asyncio.StreamWriter, obj: dict) -> None:
    writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


def _connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise ControlError(f"{path}: no control socket (is keywayd running?)") from None
    except OSError as exc:
        sock.close()
        raise ControlError(f"{path}: {exc.strerror}") from None
    return sock


def request(
    path: str, command: str, timeout: float = 30.0, args: dict | None = None, **kwargs: Any
) -> Any:
    """Send one command with `args` (and/or keyword arguments; `timeout` is the socket's,
    a command's own timeout goes in `args`) and return its result; ControlError if the
    daemon refused it."""
    args = {**(args or {}), **kwargs}
    with _connect(path, timeout) as sock:
        sock.sendall(json.dumps({"command": command, "args": args}).encode() + b"\n")
        reply = _read_line(sock.makefile("rb"))
    if reply is None:
        raise ControlError(f"{path}: keywayd closed the connection without answering")
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "refused"))
    return reply.get("result")


def watch(
    path: str, timeout: float | None = None, ready: Callable[[], None] | None = None
) -> Iterator[dict]:
    """Events as keywayd reports them, until the daemon stops; `ready` is called once
    the daemon has subscribed this client (nothing from then on is missed)."""
    with _connect(path, 30.0) as sock:
        sock.sendall(b'{"command":"watch"}\n')
        sock.settimeout(timeout)
        stream = sock.makefile("rb")
        first = _read_line(stream)
        if not first or not first.get("ok"):
            raise ControlError((first or {}).get("error", "watch refused"))
        if ready is not None:
            ready()
        while (event := _read_line(stream)) is not None:
            yield event


def _read_line(stream) -> dict | None:
    line = stream.readline(MAX_LINE)
    return json.loads(line) if line else None
