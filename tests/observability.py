"""Helpers for the observability tests: read a /metrics endpoint, find free ports, run promtool."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape_text(port: int, host: str = "127.0.0.1") -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


class Exposition:
    """Samples of a Prometheus text exposition, by name and labels."""

    def __init__(self, text: str):
        self.text = text
        self.samples: dict[tuple[str, frozenset], float] = {}
        self.help: dict[str, str] = {}
        self.types: dict[str, str] = {}
        for line in text.splitlines():
            if line.startswith("# HELP "):
                name, _, doc = line[7:].partition(" ")
                self.help[name] = doc
            elif line.startswith("# TYPE "):
                name, _, kind = line[7:].partition(" ")
                self.types[name] = kind
            elif line and not line.startswith("#"):
                match = _SAMPLE.match(line)
                assert match, f"unparsable exposition line: {line!r}"
                labels = frozenset(_LABEL.findall(match.group(2) or ""))
                self.samples[(match.group(1), labels)] = float(match.group(3))

    def value(self, name: str, **labels: str) -> float:
        """The value of the one sample ``name{labels}`` (labels match exactly); KeyError if absent."""
        return self.samples[(name, frozenset(labels.items()))]

    def series(self, name: str) -> dict[frozenset, float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}


def scrape(port: int, host: str = "127.0.0.1") -> Exposition:
    return Exposition(scrape_text(port, host))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    """Path of a command the tests drive for real; fails (never skips silently) when missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make test-apt` installs Debian's prometheus package "
                    f"(prometheus, promtool)")
    return path


def promtool(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd, timeout=60)
