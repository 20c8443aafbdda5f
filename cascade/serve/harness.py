"""Running a server: a bound socket, uvicorn (one process or several), and
:class:`ServerProcess`, a server in a child process for tests and benchmarks."""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from uvicorn.supervisors import Multiprocess

from cascade.core.errors import CascadeError


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one, read it back with
    ``getsockname()``).

    Raises:
        CascadeError: the port is in use, the address is not this machine's, the port is
            out of range or needs privileges.
    """
    if not 0 <= port <= 65535:
        raise CascadeError(f"--port {port}: must be 0 (any free port) to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CascadeError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only then
    # (without it, a response waits ~40 ms on the client's delayed ACK)
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        why = {errno.EADDRINUSE: "already in use (choose another --port, or 0 for any free one)",
               errno.EACCES: "needs privileges (choose a port above 1023)",
               errno.EADDRNOTAVAIL: "not an address of this machine"}.get(exc.errno, exc.strerror)
        raise CascadeError(f"{host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


def run_server(app: FastAPI | str, sock: socket.socket, *, workers: int = 1, log_level: str = "warning") -> None:
    """Serve ``app`` with uvicorn on a bound socket until SIGINT / SIGTERM.

    Args:
        app: the app; with ``workers`` > 1, the import string of a factory each worker
            process calls (``"module:function"``), the processes sharing the socket.
        workers: processes; the kernel spreads connections over them.
    """
    if workers > 1:
        config = uvicorn.Config(app, factory=True, workers=workers, log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=10)
        Multiprocess(config, sockets=[sock]).run()
        return
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=10)
    uvicorn.Server(config).run(sockets=[sock])


def server_url(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


class ServerProcess:
    """``cascade serve`` or ``cascade serve-oracle`` in a child process on a free port,
    ready (``/health`` answers) on entering; terminated on exit (tests, benchmarks).

    Args:
        args: the command's arguments after ``cascade`` (no ``--port``: a free one is
            bound, and read back from the server's first line).
        startup_timeout_s: how long to wait for ``/health``.
        host: the address to listen on.
        env: environment variables set for the server (on top of this process's).
        command: the program run with ``args`` (default ``python -m cascade``); it must
            print its ``http://`` URL on its first line, and take ``--host``/``--port``.

    Attributes:
        url: ``http://host:port`` once started.
        proc: the ``subprocess.Popen``.

    Raises:
        RuntimeError: the server exited or did not answer ``/health`` in time (with the
            tail of its stderr).
    """

    def __init__(self, args: Sequence[str], *, startup_timeout_s: float = 120.0, host: str = "127.0.0.1",
                 env: dict[str, str] | None = None, command: Sequence[str] | None = None):
        self.args, self.startup_timeout_s, self.host = list(args), startup_timeout_s, host
        self.env = None if env is None else {**os.environ, **env}
        self.command = list(command) if command is not None else [sys.executable, "-m", "cascade"]
        self.url = ""
        self.proc: Any = None

    def __enter__(self) -> ServerProcess:  # noqa: PYI034  (Python 3.10 has no typing.Self)
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([*self.command, *self.args, "--host", self.host, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=self.env)
        lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while not self.url:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"`cascade {' '.join(self.args)}` did not start: {self.stderr_tail()}")
                with contextlib.suppress(queue.Empty):
                    line = lines.get(timeout=0.2)
                    self.url = next((w for w in line.split() if w.startswith("http://")), "")
            while not self._healthy():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.url}/health did not answer: {self.stderr_tail()}")
                time.sleep(0.1)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stderr_tail(self, chars: int = 2000) -> str:
        """The end of the server's stderr so far."""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-chars:]

    def kill(self) -> None:
        """Kill the server at once (SIGKILL: as a crash would) and wait for it to be gone."""
        self.proc.kill()
        self.proc.wait(timeout=30)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # uvicorn shuts down gracefully on SIGTERM
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None:
            self._reader.join(timeout=5)  # EOF once the server is gone
            self.proc.stdout.close()
            self._stderr.close()
