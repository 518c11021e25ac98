#!/usr/bin/env python3
"""Run a command as on an AVX2 + FMA CPU without AVX-512, AVX-VNNI or AMX, on any x86-64 machine.

Such CPUs (AMD Zen 1-3, Intel Haswell to Comet Lake) are common in the cloud; a machine with
AVX-512 can force the server's own kernel path (``--kernels avx2``) and cap torch's libraries
(``ATEN_CPU_CAPABILITY`` and friends), but fbgemm and the CPUID checks inside the libraries still
see the real CPU. Here nothing does:

* every instruction runs under ``qemu-x86_64 -cpu EPYC-Milan`` (Debian's ``qemu-user``): torch,
  fbgemm, oneDNN and MKL read that CPU's CPUID (AMD Zen 3: AVX2, FMA, no AVX-512, no VNNI, no AMX)
  and dispatch as they would on it; an AVX-512 instruction would stop the process (SIGILL);
* a private mount namespace (``unshare``; root, or an unprivileged user namespace) shows the same
  CPU's flags in ``/proc/cpuinfo``, which the server's kernel selection reads
  (``server.kernels.cpu``);
* Python runs from a wrapper environment whose ``python`` and console scripts (``asr-server``,
  ``asr-client``, ...) start qemu, so every Python process the command starts (a test's server, a
  console script) runs emulated too.

qemu 7.2 (Debian 12) is not faithful everywhere: it miscomputes numpy's AVX2 argpartition, so
numpy runs its x86-64-v2 kernels here (``emulated_command``).

Usage (``python`` and the console scripts on ``PATH`` are the emulated ones)::

    scripts/emulated_cpu.py -- python -m pytest tests/test_precision.py
    scripts/emulated_cpu.py -- asr-server --model demo --precision int8
    scripts/emulated_cpu.py --check          # print what the emulated CPU offers, exit

Emulation runs 10-30x slower than the host: use it for behaviour (which kernels run, exactness,
accuracy, start-up checks), never for timings.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
CPU_MODEL = "EPYC-Milan"
CPU_NAME = "AMD EPYC-Milan (Zen 3, emulated by qemu-user)"
# flags an AVX2 + FMA CPU without AVX-512, AVX-VNNI or AMX lacks (the host's other flags are kept)
ABSENT_FLAG = re.compile(r"^(avx512.*|amx.*|avx_vnni.*|avx_ifma|avx_ne_convert)$")


def qemu_cpu_option(qemu: str) -> str:
    """``-cpu`` value: the model with every feature qemu's TCG cannot emulate turned off (each
    would otherwise print a warning on every process start)."""
    probe = subprocess.run([qemu, "-cpu", CPU_MODEL, "/bin/true"], capture_output=True, text=True)
    unsupported = re.findall(r"TCG doesn't support requested feature: \S+\.([\w-]+) \[bit", probe.stderr)
    return ",".join([CPU_MODEL, *(f"-{name}" for name in dict.fromkeys(unsupported))])


def emulated_cpuinfo(text: str) -> str:
    """``/proc/cpuinfo`` text with each processor's flags and model name those of the emulated CPU."""
    def flags(match: re.Match) -> str:
        kept = [f for f in match.group(2).split() if not ABSENT_FLAG.match(f)]
        return match.group(1) + " ".join(kept)

    text = re.sub(r"^(flags\s*:\s*)(.*)$", flags, text, flags=re.M)
    return re.sub(r"^(model name\s*:\s*).*$", lambda m: m.group(1) + CPU_NAME, text, flags=re.M)


def wrapper_environment(where: Path, qemu: str, cpu: str) -> Path:
    """A Python environment in ``where`` sharing ``.venv``'s packages whose interpreter and console
    scripts run under qemu; returns its ``bin``."""
    bin_dir = where / "bin"
    bin_dir.mkdir(parents=True)
    (where / "pyvenv.cfg").write_text((VENV / "pyvenv.cfg").read_text())
    for name in ("lib", "lib64", "include"):
        if (VENV / name).exists():
            (where / name).symlink_to((VENV / name).resolve())
    python = bin_dir / "python"
    real = (VENV / "bin" / "python").resolve()
    # -0 keeps the wrapper as argv[0], so sys.executable (which children use) is the wrapper
    python.write_text(f'#!/bin/sh\nexec {qemu} -cpu {cpu} -0 "$0" {real} "$@"\n')
    python.chmod(0o755)
    for alias in ("python3", f"python3.{sys.version_info.minor}"):
        (bin_dir / alias).symlink_to("python")
    venv_shebang = re.compile(rb"^#!" + re.escape(str(VENV / "bin")).encode() + rb"/python[\d.]*\n")
    for script in sorted((VENV / "bin").iterdir()):
        if script.is_file() and not script.is_symlink():
            body = script.read_bytes()
            if venv_shebang.match(body):
                copy = bin_dir / script.name
                copy.write_bytes(venv_shebang.sub(f"#!{python}\n".encode(), body, count=1))
                copy.chmod(0o755)
    return bin_dir


def emulated_command(command: list[str], where: Path) -> tuple[list[str], dict[str, str]]:
    """``command`` (argv) and its environment to run on the emulated CPU; ``where`` (an empty,
    existing directory) holds the wrapper environment until the command ends."""
    qemu = shutil.which("qemu-x86_64")
    unshare = shutil.which("unshare")
    if qemu is None or unshare is None:
        raise SystemExit("emulated_cpu: needs qemu-x86_64 (Debian: apt install qemu-user) and unshare (util-linux)")
    bin_dir = wrapper_environment(where / "env", qemu, qemu_cpu_option(qemu))
    cpuinfo = where / "cpuinfo"
    cpuinfo.write_text(emulated_cpuinfo(Path("/proc/cpuinfo").read_text()))
    namespace = [unshare, "--mount"] if os.geteuid() == 0 else [unshare, "--mount", "--map-root-user"]
    inner = 'mount --bind "$0" /proc/cpuinfo && exec "$@"'
    # qemu 7.2 miscomputes numpy's x86-64-v3 (AVX2) argpartition: 39 of 300 random float32 arrays
    # wrong, where the same kernels on real silicon (NPY_ENABLE_CPU_FEATURES="X86_V2 X86_V3" on the
    # host) are right; the beam search uses it, so numpy is kept to its X86_V2 kernels here. torch's and the server's kernels are checked
    # against the host's results (tests/test_emulated_cpu.py).
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(bin_dir.parent),
               NPY_ENABLE_CPU_FEATURES="X86_V2")
    return [*namespace, "sh", "-c", inner, str(cpuinfo), *command], env


CHECK = """
import torch
from server.kernels.cpu import detect_cpu_features
from server.kernels import native
print("torch CPU capability:", torch.backends.cpu.get_cpu_capability())
print("CPU features (/proc/cpuinfo):", detect_cpu_features().describe())
print("native kernel paths this CPU runs:", ", ".join(native.runnable()), "- auto selects", native.resolve("auto"))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="print what the emulated CPU offers and exit")
    p.add_argument("command", nargs="*", help="the command to run (after --)")
    args = p.parse_args()
    command = ["python", "-c", CHECK] if args.check else args.command
    if not command:
        p.error("give a command after --, or --check")
    with tempfile.TemporaryDirectory(prefix="emulated-cpu-") as where:
        argv, env = emulated_command(command, Path(where))
        return subprocess.call(argv, env=env, cwd=os.getcwd())


if __name__ == "__main__":
    sys.exit(main())
