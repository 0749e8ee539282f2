"""Where the probe runs: this host, an emulated aarch64 board, or a board over SSH.

Every target starts ``python -m hardware_tests.probe ...`` with pipes on stdin/stdout, so the
suite talks to all of them the same way. A target also stages what the probe needs (the
torch-free packages ``dccl``, ``edge_agent``, ``hardware_tests`` and a bundle) and gives the
broker address the board should use (for SSH, a reverse tunnel makes the controller's
loopback broker reachable on the board's loopback).
"""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dccl.errors import DcclError

REPO = Path(__file__).resolve().parents[1]
AGENT_PACKAGES = ("dccl", "edge_agent", "hardware_tests")
AARCH64_CACHE = Path(os.environ.get("DCCL_AARCH64_CACHE", REPO / ".cache" / "aarch64"))


class ProbeError(AssertionError):
    """The probe on the target failed or said something unexpected."""


class Probe:
    """One running probe process: read ``HIL {json}`` lines, write command words."""

    def __init__(self, proc: subprocess.Popen, label: str):
        self.proc, self.label = proc, label
        self._stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)[-3000:]

    def expect(self, kind: str, timeout: float = 60.0) -> dict[str, Any]:
        """The next structured line; it must be of ``kind``."""
        result: list[Any] = []

        def read():
            for line in self.proc.stdout:
                if line.startswith("HIL "):
                    result.append(json.loads(line[4:]))
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        if not result:
            self.kill()
            raise ProbeError(f"{self.label}: no '{kind}' line within {timeout:.0f} s "
                             f"(exit {self.proc.poll()}); stderr: {self.stderr}")
        msg = result[0]
        if msg["kind"] != kind:
            raise ProbeError(f"{self.label}: expected '{kind}', got {msg}; stderr: {self.stderr}")
        return msg

    def send(self, word: str) -> None:
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def close(self, timeout: float = 15.0) -> int | None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class Target:
    """Base: a local interpreter command."""

    name: str
    python: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def stage(self, bundle: Path) -> str:
        """Path of ``bundle`` as the probe sees it."""
        return str(bundle)

    def workdir(self, name: str, local: Path) -> str:
        return str(local)

    def broker_for_board(self, url: str) -> str:
        return url

    def command(self, args: list[str]) -> list[str]:
        return [*self.python, "-m", "hardware_tests.probe", *args]

    def start(self, args: list[str], label: str | None = None) -> Probe:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [self.env.get("PYTHONPATH"), str(REPO)])),
               **{k: v for k, v in self.env.items() if k != "PYTHONPATH"}, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(self.command(args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        return Probe(proc, label or f"{self.name}: probe {args[0]}")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "python": self.python[-1]}

    def close(self) -> None:
        pass


def host_target(python: str | None = None) -> Target:
    return Target("host", [python or sys.executable])


def emulated_target(cpu: str | None = "cortex-a72", cache: Path = AARCH64_CACHE) -> Target:
    sysroot, site = cache / "sysroot", cache / "site"
    py = sysroot / "usr" / "bin" / "python3.11"
    qemu = "qemu-aarch64-static"
    from shutil import which
    if not which(qemu):
        raise DcclError("target emulated-aarch64 needs qemu-user-static (apt-get install qemu-user-static)")
    if not (py.exists() and (site / "onnxruntime").is_dir() and (sysroot / "proc" / "cpuinfo").exists()):
        raise DcclError(f"target emulated-aarch64: no aarch64 sysroot in {cache}; "
                        "build it with scripts/aarch64_sysroot.sh")
    cmd = [qemu] + (["-cpu", cpu] if cpu else []) + ["-L", str(sysroot), str(py)]
    return Target("emulated-aarch64", cmd, env={"PYTHONPATH": str(site)})


@dataclass
class SshTarget(Target):
    """``ssh://user@host[:port]``: code and bundles are copied to ``remote_dir`` on the board
    (tar over the SSH connection; no rsync or scp needed), the probe runs with ``remote_python``."""

    destination: str = ""
    port: int | None = None
    ssh_options: list[str] = field(default_factory=list)
    remote_dir: str = ""
    tunnels: dict[int, int] = field(default_factory=dict)      # board port -> controller port

    def _ssh(self, *extra: str) -> list[str]:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
        for o in self.ssh_options:
            cmd += ["-o", o]
        if self.port:
            cmd += ["-p", str(self.port)]
        return [*cmd, *extra, self.destination]

    def run(self, remote_cmd: str, data: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run(self._ssh() + [remote_cmd], input=data, capture_output=True, timeout=timeout)
        if r.returncode != 0:
            raise DcclError(f"ssh {self.destination}: `{remote_cmd}` failed ({r.returncode}): "
                            f"{r.stderr.decode(errors='replace').strip()[-500:]}")
        return r

    def _push(self, items: list[tuple[Path, str]], dest: str) -> None:
        buf = io.BytesIO()
        skip = lambda ti: None if "__pycache__" in ti.name or ti.name.endswith(".pyc") else ti  # noqa: E731
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for src, arc in items:
                tar.add(src, arcname=arc, filter=skip)
        self.run(f"mkdir -p {shlex.quote(dest)} && tar xzf - -C {shlex.quote(dest)}", buf.getvalue())

    def prepare(self) -> None:
        self._push([(REPO / p, p) for p in AGENT_PACKAGES], self.remote_dir + "/code")

    def stage(self, bundle: Path) -> str:
        dest = f"{self.remote_dir}/bundles"
        self._push([(bundle, bundle.name)], dest)
        return f"{dest}/{bundle.name}"

    def workdir(self, name: str, local: Path) -> str:
        return f"{self.remote_dir}/work/{name}"

    def broker_for_board(self, url: str) -> str:
        """The controller's broker as the board reaches it: through ``ssh -R``."""
        parts = urlsplit(url)
        if parts.hostname not in ("127.0.0.1", "localhost"):
            return url       # a broker the board can reach by itself
        board_port = self.tunnels.setdefault(parts.port, 20000 + (parts.port * 7) % 20000)
        return url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{board_port}")

    def command(self, args: list[str]) -> list[str]:
        remote = (f"cd {shlex.quote(self.remote_dir)}/code && PYTHONPATH=. PYTHONUNBUFFERED=1 exec "
                  + " ".join(shlex.quote(a) for a in [*self.python, "-m", "hardware_tests.probe", *args]))
        tun = [x for local, board in self.tunnels.items() for x in ("-R", f"127.0.0.1:{board}:127.0.0.1:{local}")]
        if tun:
            tun += ["-o", "ExitOnForwardFailure=yes"]
        return self._ssh(*tun) + [remote]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "destination": self.destination, "port": self.port,
                "python": self.python[-1], "remote_dir": self.remote_dir}

    def close(self) -> None:
        try:
            self.run(f"rm -rf {shlex.quote(self.remote_dir)}", timeout=30)
        except (DcclError, subprocess.TimeoutExpired):
            pass


def ssh_target(url: str, python: str = "python3", ssh_options: list[str] | None = None) -> SshTarget:
    parts = urlsplit(url)
    if parts.scheme != "ssh" or not parts.hostname:
        raise DcclError(f"--target = {url!r}: expected ssh://user@host[:port]")
    try:
        port = parts.port
    except ValueError:
        raise DcclError(f"--target = {url!r}: bad port") from None
    dest = f"{parts.username}@{parts.hostname}" if parts.username else parts.hostname
    t = SshTarget(name="ssh", python=shlex.split(python), destination=dest, port=port,
                  ssh_options=list(ssh_options or []), remote_dir=f"/tmp/dccl-hil-{uuid.uuid4().hex[:10]}")
    t.prepare()
    return t


def make_target(spec: str, *, python: str | None = None, qemu_cpu: str | None = None,
                ssh_options: list[str] | None = None) -> Target:
    if spec == "host":
        return host_target(python)
    if spec == "emulated-aarch64":
        return emulated_target(qemu_cpu)
    if spec.startswith("ssh://"):
        return ssh_target(spec, python or "python3", ssh_options)
    raise DcclError(f"--target = {spec!r}: expected host, emulated-aarch64 or ssh://user@host[:port]")
