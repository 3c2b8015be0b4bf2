"""C kernels compiled at first use: the system's C compiler, a cache directory, :mod:`ctypes`.

A source is compiled with ``$CC`` (else ``cc``) and ``-O3 -std=c99``, once
per source text, flags, scalar type (``-DSCALAR=float`` or ``double``) and machine,
into ``$SEQPAR_CACHE_DIR`` (else ``$XDG_CACHE_HOME/seqpar`` or
``~/.cache/seqpar``); builds go to a temporary file renamed into place, so
concurrent processes never load a half-written library.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("seqpar.runtime")

# -fno-trapping-math lets comparisons in a loop become vector selects (it changes no value; floating-point
# exceptions are not observed); -std=c99 keeps contraction off (no FMA: the same roundings on every CPU).
_FLAGS = ("-O3", "-std=c99", "-fno-trapping-math", "-shared", "-fPIC")


class BuildError(RuntimeError):
    """The kernel could not be compiled or loaded; the message says why (the compiler's last line)."""


def load(source: Path, scalar: str) -> ctypes.CDLL:
    """``source`` compiled for ``scalar`` (``"float"`` or ``"double"``) and loaded; :class:`BuildError` if not."""
    try:
        return ctypes.CDLL(str(_build(source, scalar)))
    except (OSError, subprocess.CalledProcessError) as error:
        raise BuildError(_describe(error)) from None


def _build(source: Path, scalar: str) -> Path:
    """Compile ``source`` for ``scalar`` into the cache unless it is there; return the library's path."""
    compiler = os.environ.get("CC", "cc")
    command = [compiler, *_FLAGS, f"-DSCALAR={scalar}"]
    key = hashlib.sha256(source.read_bytes() + " ".join(command + [platform.machine()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}_{scalar}_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        subprocess.run([*command, "-o", partial, str(source), "-lm"], check=True, capture_output=True, text=True)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    log.info("seqpar: built the CPU kernel %s", target)
    return target


def _cache_dir() -> Path:
    if "SEQPAR_CACHE_DIR" in os.environ:
        return Path(os.environ["SEQPAR_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seqpar"


def _describe(error: Exception) -> str:
    if isinstance(error, subprocess.CalledProcessError):
        output = (error.stderr or "").strip().splitlines()
        return f"{error.cmd[0]} failed: {output[-1] if output else 'exit status ' + str(error.returncode)}"
    return str(error)
