"""Compile the datapath on first use: ``clang -O2 -target bpf`` into a cache directory.

The cache key is the SHA-256 of the source, the flags and ``clang --version``, so an edited
source or another compiler gives another object; concurrent builders write a temporary
file and rename it, so readers never see a half-written object. Where the cache lives:
``$STOCKADE_BPF_CACHE`` if set, else ``/var/cache/stockade/bpf`` for root, else
``$XDG_CACHE_HOME/stockade/bpf`` (``~/.cache/stockade/bpf``).

Needs clang and the kernel UAPI / libbpf headers (Debian: ``clang``, ``libbpf-dev``).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from stockade.errors import ApplyError

SOURCE = Path(__file__).with_name("stockade.bpf.c")
CLANG_CANDIDATES = ("clang", *(f"clang-{v}" for v in range(20, 13, -1)))
_MULTIARCH = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu", "armv7l": "arm-linux-gnueabihf"}
FLAGS = ("-O2", "-target", "bpf", "-Wall", "-Werror", "-fno-stack-protector")


class BuildError(ApplyError):
    """The datapath could not be compiled (no clang, missing headers, a compile error)."""


def find_clang() -> str:
    for name in CLANG_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise BuildError("clang not found: install clang and libbpf-dev to use the eBPF backend")


def cache_dir() -> Path:
    env = os.environ.get("STOCKADE_BPF_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/stockade/bpf")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stockade" / "bpf"


def _include_flags() -> list[str]:
    arch = _MULTIARCH.get(platform.machine())
    return [f"-I/usr/include/{arch}"] if arch else []


def compile_command(clang: str, source: Path, output: Path) -> list[str]:
    return [clang, *FLAGS, *_include_flags(), "-c", str(source), "-o", str(output)]


def object_path(source: Path = SOURCE) -> Path:
    """The compiled object for ``source``, building it if the cache does not hold it yet.

    Remembered per process (keyed by the source's path and modification time), so only the
    first apply pays for ``clang --version`` and the hash.
    """
    key = (str(source), source.stat().st_mtime_ns)
    known = _BUILT.get(key)
    if known is not None and known.is_file():
        return known
    built = _build(source)
    _BUILT[key] = built
    return built


_BUILT: dict[tuple[str, int], Path] = {}


def _build(source: Path) -> Path:
    clang = find_clang()
    try:
        version = subprocess.run([clang, "--version"], capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"{clang} --version failed: {exc}") from exc
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    digest.update("\0".join(FLAGS + tuple(_include_flags())).encode())
    digest.update(version.encode())
    directory = cache_dir()
    target = directory / f"stockade-{digest.hexdigest()[:20]}.o"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".o", dir=directory)
    os.close(fd)
    try:
        proc = subprocess.run(
            compile_command(clang, source, Path(tmp)), capture_output=True, text=True, check=False, timeout=300
        )
        if proc.returncode != 0:
            raise BuildError(f"compiling {source.name} failed:\n{proc.stderr.strip()[-4000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
