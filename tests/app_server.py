"""Run `python app.py` in a subprocess on a free 127.0.0.1 port, for the client and browser tests.

The server runs the shipped model (assets/tinychat) when it is there, else stories260K from
../shared/data (skipping with the reason when neither exists). Its log goes to a file under the
test's temporary directory and is shown when the server fails to start.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from llama.assets import shipped_model_dir
from tests.conftest import REPO, shared_file

START_TIMEOUT_S = 240  # importing torch + gradio on 2 busy cores can take a while


def model_path() -> Path:
    """The model the app tests run: the shipped one, else stories260K."""
    try:
        return shipped_model_dir()
    except FileNotFoundError:
        return shared_file("stories260K", "stories260K.bin")


def model_flags() -> list[str]:
    """app.py flags for that model: none for the shipped one (the app's default)."""
    try:
        shipped_model_dir()
        return []
    except FileNotFoundError:
        return ["--model", str(shared_file("stories260K", "stories260K.bin"))]


def model_template() -> str:
    """The template the app picks for that model by default."""
    return "chat" if not model_flags() else "completion"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AppServer:
    proc: subprocess.Popen
    url: str
    log: Path

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS not found")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_app(log_dir: Path, *extra: str) -> AppServer:
    """Start the app and wait until it answers HTTP; raise with its log if it does not."""
    port = free_port()
    log = log_dir / f"app-{port}.log"
    args = [
        sys.executable,
        str(REPO / "app.py"),
        *model_flags(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = AppServer(proc, f"http://127.0.0.1:{port}/", log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(server.url, timeout=5) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"the app did not answer within {START_TIMEOUT_S} s:\n{log.read_text()}")
