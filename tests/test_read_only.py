"""The server runs on a read-only root filesystem, as the container does (deploy/k8s:
``readOnlyRootFilesystem: true`` with an emptyDir at /tmp; docker-compose.yml: ``read_only`` with
a tmpfs at /tmp): a real ``asr-server`` process, from a copy of the application (its packages,
the native kernels and the demo model), with HOME and the working directory in that copy's
directory and a TMPDIR of its own, serves the demo model and leaves every file outside TMPDIR as
it was. Run as root, the tests give the server a mount namespace whose whole root filesystem is
read-only except TMPDIR (``unshare``, util-linux), as in the container; run as another user, the
copy and HOME are made read-only (``chmod``), which that user cannot override."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from asr.v1 import asr_pb2_grpc
from client.stream import channel
from tests.conftest import ROOT
from tests.helpers import transcript

pytestmark = pytest.mark.timeout(240)

BIN = Path(sys.executable).parent
APP = ("server", "asr", "models")  # what the server imports and loads (the image's /app holds these)


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root``: (mode, size, mtime in ns)."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def writable(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


def confined(command: list[str], tmp: Path) -> list[str]:
    """``command`` so that it can write nothing but ``tmp``. As root (whom file modes do not stop):
    in a mount namespace of its own where ``/`` is read-only and ``tmp`` a writable bind mount."""
    if os.geteuid() != 0:
        return command
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.fail("unshare is not installed (Debian's util-linux)")
    script = ('mount --rbind / / && mount -o remount,bind,ro / && mount --bind "$0" "$0" '
              '&& mount -o remount,bind,rw "$0" && exec "$@"')
    return [unshare, "--mount", "--propagation", "private", "sh", "-c", script, str(tmp), *command]


@pytest.fixture
def sandbox():
    """(application, HOME, TMPDIR) in a new directory that the server's user may enter."""
    base = Path(tempfile.mkdtemp(prefix="asr-read-only-"))
    app, home, tmp = base / "app", base / "home", base / "tmp"
    for name in APP:
        shutil.copytree(ROOT / name, app / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    home.mkdir()
    tmp.mkdir()
    read_only(app)
    read_only(home)
    yield app, home, tmp
    writable(app)
    writable(home)
    shutil.rmtree(base)


def env_for(app: Path, home: Path, tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "ASR_", "PYTHON", "TORCH"))}
    # The image's environment (Dockerfile: PYTHONDONTWRITEBYTECODE) and the pod's: TMPDIR is /tmp there.
    return {**env, "PYTHONPATH": str(app), "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(home), "TMPDIR": str(tmp),
            "ASR_LOG_LEVEL": "info"}


def test_the_sandbox_is_really_read_only(sandbox):
    """The counter-case: a process started as the server is imports the copy, cannot write it,
    HOME or the working directory, and can write TMPDIR."""
    app, home, tmp = sandbox
    probe = ("import sys\nfrom pathlib import Path\nimport server\nout = [server.__file__]\n"
             "for d in sys.argv[1:]:\n"
             "    try:\n        (Path(d) / 'probe').write_text('x'); out.append('written')\n"
             "    except OSError as exc:\n        out.append(type(exc).__name__)\n"
             "print(' '.join(out))")
    result = subprocess.run(confined([sys.executable, "-c", probe, str(app / "server"), str(home), ".", str(tmp)],
                                     tmp), cwd=app, env=env_for(app, home, tmp), capture_output=True, text=True,
                            timeout=60)
    refused = "OSError" if os.geteuid() == 0 else "PermissionError"  # EROFS, EACCES
    assert result.stdout.split() == [str(app / "server" / "__init__.py"), *[refused] * 3, "written"], \
        result.stdout + result.stderr


async def test_the_server_serves_from_a_read_only_tree_and_writes_only_to_tmpdir(sandbox, speech):
    app, home, tmp = sandbox
    before_app, before_home = snapshot(app), snapshot(home)
    command = [str(BIN / "asr-server"), "--model", "demo", "--host", "127.0.0.1", "--port", "0",
               "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--threads", "1", "--latency-budget-ms", "0"]
    proc = subprocess.Popen(confined(command, tmp), cwd=app, env=env_for(app, home, tmp), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        while not any("metrics on" in line for line in lines):
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
            await asyncio.sleep(0.2)
        port = int(re.search(r"listening on .*:(\d+)", "".join(lines)).group(1))
        async with channel(f"127.0.0.1:{port}") as ch:
            stub = asr_pb2_grpc.SpeechRecognitionStub(ch)
            for _, audio, reference in speech:
                assert await transcript(stub, audio) == reference
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    log = "".join(lines)
    assert proc.returncode == 0, log[-3000:]
    assert not re.search("Traceback|Permission denied|Read-only file system", log), log[-3000:]
    assert snapshot(app) == before_app, "the server changed files of its application"
    assert snapshot(home) == before_home == {}, "the server wrote to HOME"
    written = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))
    print(f"TMPDIR after a run: {written or 'empty'}")


def test_the_container_and_the_pod_give_the_server_a_read_only_root_and_a_writable_tmp():
    steps = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ENV [^\n]*PYTHONDONTWRITEBYTECODE=1", steps, re.M), "the image must not write bytecode"
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    asr = compose["services"]["asr"]
    assert asr["read_only"] is True and "/tmp" in asr["tmpfs"]
