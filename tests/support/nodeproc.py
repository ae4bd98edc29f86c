"""Start a real dicomnode as a subprocess on a free loopback port, for tests and benches."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from tests.support.paths import REPO

DICOMNODE = [sys.executable, "-m", "node.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(
    folder: Path,
    port: int,
    extra: str = "",
    models: Path | None = None,
    database: str = "sqlite:///node.sqlite",
    **node: Any,
) -> Path:
    """A config.toml for a node under ``folder``, listening on loopback ``port``.

    Without ``models`` (a registry folder) the node runs no worker: intake only. One
    receiving process unless ``receivers`` says more: a process per core would start two
    interpreters per node on CI's two cores, for tests that do not test receiving in several.
    """
    folder.mkdir(parents=True, exist_ok=True)
    node.setdefault("receivers", 1)
    node_lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in node.items())
    text = f"""
[node]
ae_title = "SYNTH"
host = "127.0.0.1"
port = {port}
storage = "spool"
database = "{database}"
{node_lines}

[completion]
quiet_seconds = 2
check_interval_seconds = 0.2
"""
    if models is None:
        text += "\n[worker]\nin_process = false\n"
    else:
        text += f'\n[models]\nregistry = "{models}"\n'
    text += extra
    if "[http]" not in extra:  # the console on a port of its own: nodes run side by side
        text += f"\n[http]\nport = {free_port()}\n"
    if "[destinations." not in extra:
        text += routes_toml()
    path = folder / "config.toml"
    path.write_text(text)
    return path


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs, from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        for child in children:
            found += [child, *descendants(child)]
    return found


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs: a zombie (killed, not yet reaped) has ended."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class NodeProcess:
    """`dicomnode serve` in a subprocess; its log goes to ``folder/node.log``."""

    def __init__(self, config: Path, port: int, *options: str) -> None:
        self.config = config
        self.port = port
        self.options = options  # more of `serve`'s options (--log-format json)
        self.log_path = config.parent / "node.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> NodeProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [*DICOMNODE, "serve", "--config", str(self.config), *self.options],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dicomnode exited at start:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"dicomnode did not listen on {self.port}:\n{self.log()}")

    def wait_until_receiving(self, receivers: int, timeout: float = 60) -> None:
        """Until the other ``receivers - 1`` receiver processes listen too (`serve` itself
        listens once ``start`` returns)."""
        deadline = time.monotonic() + timeout
        while len(re.findall(r" receiver-\d+ node\.scp: listening", self.log())) < receivers - 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"receivers did not all listen:\n{self.log()}")
            time.sleep(0.1)

    @property
    def http_url(self) -> str:
        """Where its console listens (``[http]`` of its config)."""
        http = tomllib.loads(self.config.read_text())["http"]
        return f"http://{http.get('host', '127.0.0.1')}:{http['port']}"

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to clean up. Returns once its receivers have died
        too (the kernel kills them as `serve` dies): until then they hold its sockets and
        would take, then drop, a connection meant for the next start."""
        if self.process and self.process.poll() is None:
            receivers = descendants(self.process.pid)
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            deadline = time.monotonic() + 10
            while any(alive(pid) for pid in receivers) and time.monotonic() < deadline:
                time.sleep(0.02)

    def stop(self) -> None:
        stop_process(self.process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> dict[str, Any]:
        return dicomnode_status(self.config)

    def wait_for(self, predicate, timeout: float = 60, interval: float = 0.3) -> dict[str, Any]:
        """Poll `dicomnode status --json` until ``predicate(status)`` is true."""
        deadline = time.monotonic() + timeout
        status = self.status()
        while not predicate(status):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out; last status:\n{json.dumps(status, indent=1)}\nlog:\n{self.log()}"
                )
            if self.process and self.process.poll() is not None:
                raise AssertionError(f"dicomnode died:\n{self.log()}")
            time.sleep(interval)
            status = self.status()
        return status


def stop_process(process: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL if it has not stopped within 20 s."""
    if process and process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def routes_toml(ae_title: str = "PACS", port: int = 9) -> str:
    """A destination "pacs" on loopback and the default two routes to it."""
    return f"""
[destinations.pacs]
ae_title = "{ae_title}"
host = "127.0.0.1"
port = {port}

[[routes]]
name = "t1-to-t2"
direction = "t1-to-t2"
destinations = ["pacs"]

[[routes]]
name = "t2-to-t1"
direction = "t2-to-t1"
destinations = ["pacs"]
"""


def dicomnode_status(config: Path) -> dict[str, Any]:
    result = subprocess.run(
        [*DICOMNODE, "status", "--json", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def run_dicomnode(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DICOMNODE, *args], cwd=REPO, capture_output=True, text=True, check=check
    )
