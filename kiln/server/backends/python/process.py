"""A Python model's process as the server sees it: start it, wait for its replies, read it, stop it.

The process is ``python stub/kiln_python_stub.py FD`` started with ``subprocess``, its end of a Unix
socket pair passed as FD. Not ``multiprocessing``: the stub imports nothing of the server, so it starts
in a fraction of a second and inherits none of the server's threads, event loop or sockets. Its
stdout and stderr are the server's, so a model's ``print`` lands in the server's log.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.server.backends.python.stub import kiln_python_wire as wire

log = logging.getLogger("kiln.server")

STUB = Path(__file__).resolve().parent / "stub" / "kiln_python_stub.py"
_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR, "verbose": logging.DEBUG}


class StubProcess:
    def __init__(self, label: str):
        self.label = label  # "model 'm' instance 'm_0_0'", for log lines and errors
        ours, theirs = socket.socketpair()
        try:
            # Unbuffered: a model's print reaches the log when it prints, not when the process ends.
            self.proc = subprocess.Popen([sys.executable, str(STUB), str(theirs.fileno())],
                                         pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.conn = wire.Connection(ours)
        # Set (under the owner's lock) once the connection has ended; stopping: the server ended it.
        self.exited = False
        self.stopping = False
        self.reclaimed = False  # killed by the server because requests outlived their cancellation
        self._reader: threading.Thread | None = None

    def request(self, message: dict[str, Any], reply_op: str) -> dict[str, Any]:
        """Send ``message`` and wait for the reply named ``reply_op`` (before the reader thread runs).
        Raises EOFError when the process ends first."""
        self.conn.send(message)
        while True:
            reply = self.conn.recv()
            if reply["op"] == "log":
                self.log_line(reply)
            elif reply["op"] == reply_op:
                return reply

    def start_reader(self, on_message: Callable[[dict[str, Any]], None], on_exit: Callable[[], None]) -> None:
        """Read every later message on a thread of its own; ``on_exit`` once the connection ends."""
        def read() -> None:
            try:
                while True:
                    on_message(self.conn.recv())
            except (EOFError, OSError):
                pass
            except Exception:
                log.exception("reading from the Python process of %s failed", self.label)
                self.proc.kill()
            on_exit()

        self._reader = threading.Thread(target=read, name=f"kiln-python-{self.proc.pid}", daemon=True)
        self._reader.start()

    def send(self, message: dict[str, Any]) -> None:
        self.conn.send(message)

    def exit_status(self, timeout: float = 5.0) -> str:
        """How the process ended ("exit code 1", "killed by signal SIGSEGV"), waiting up to ``timeout``
        for it (and killing it after that: its connection is gone, it can do nothing more)."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if code < 0:
            try:
                return f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def stop(self, timeout: float) -> None:
        """Ask the model to finalize and the process to end; kill it after ``timeout`` seconds."""
        self.stopping = True
        if self.proc.poll() is None:
            try:
                self.conn.send({"op": "finalize"})
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("the Python process of %s did not end within %.0f s of finalize; killing it",
                            self.label, timeout)
                self.proc.kill()
                self.proc.wait()
        self.close()

    def reclaim(self) -> None:
        """Kill the process while it holds requests: its reader then fails them (``reclaimed`` says why)."""
        self.reclaimed = True
        if self.proc.poll() is None:
            self.proc.kill()

    def kill(self) -> None:
        self.stopping = True
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.close()

    def close(self) -> None:
        self.conn.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)

    def log_line(self, message: dict[str, Any]) -> None:
        where = f" {message['where']}]" if message.get("where") else ""
        log.log(_LEVELS.get(message["level"], logging.INFO), "%s%s %s", self.label, where, message["message"])
