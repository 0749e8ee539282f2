"""The broker of a run: the one given by --broker, or a private Mosquitto on a free port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from dccl.errors import DcclError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class EmbeddedBroker:
    """``mosquitto -c DIR/mosquitto.conf`` on 127.0.0.1, with persistence (a restart keeps sessions
    and retained messages). ``restart()`` is what the fault-injection test uses."""

    def __init__(self, workdir: Path, port: int | None = None):
        exe = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.path.exists(p)), None)
        if exe is None:
            raise DcclError("no --broker given and the `mosquitto` binary is not installed "
                            "(apt-get install mosquitto, or pass --broker mqtt://host:port)")
        self.exe = exe
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        body = (f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                f"persistence true\npersistence_location {self.dir}/\nautosave_interval 5\n"
                "max_queued_messages 0\nmax_inflight_messages 100\nmax_keepalive 600\n")
        if os.geteuid() == 0:
            body = "user root\n" + body   # otherwise it drops to 'mosquitto' and cannot write here
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(body)
        self.log = self.dir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "EmbeddedBroker":
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while not _listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text()[-1000:] if self.log.exists() else ""
                raise DcclError(f"embedded mosquitto did not start on port {self.port}: {tail.strip()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)   # saves the persistence file
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, down_seconds: float = 1.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()
