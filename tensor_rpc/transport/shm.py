"""Shared-memory segments for the same-host lane: unguessable names, mode 0600, a janitor.

Names are ``ll-<owner pid>-<128 random bits>`` under ``/dev/shm``. The creator writes a random
nonce at offset 0; the peer must read it back (MAC'd with the lane key) to prove it really maps the
same memory — same hostname is not proof. As soon as the proof is checked the name is unlinked, so
after that point a SIGKILL of either side leaves nothing behind (the mapping dies with the last
process). The only window is create → proof; :func:`janitor` removes segments of our prefix whose
owner pid is dead, and runs at service start and whenever a lane ends abnormally.
"""

from __future__ import annotations

import mmap
import os
import secrets
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 22, 23  # Linux 5.14+; Python 3.11 lacks the names
PREFIX = "ll-"


class Segment:
    """One mapped segment. ``view`` is a memoryview over the whole mapping."""

    def __init__(self, name: str, fd: int, size: int, created: bool) -> None:
        self.name, self.size, self.created = name, size, created
        try:
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.view = memoryview(self._map)

    @classmethod
    def create(cls, size: int) -> Segment:
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            _unlink(name)
            raise
        return cls(name, fd, size, True)

    @classmethod
    def attach(cls, name: str, size: int) -> Segment:
        if not (name.startswith(PREFIX) and "/" not in name and len(name) < 100):
            raise ValueError("not a LatentLink segment name")
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        if os.fstat(fd).st_size < size:
            os.close(fd)
            raise ValueError("segment smaller than announced")
        return cls(name, fd, size, False)

    def prefault(self, write: bool) -> None:
        """Map every page now (a fault per 4 KiB page mid-transfer costs ~2.5 us each)."""
        try:
            self._map.madvise(_MADV_POPULATE_WRITE if write else _MADV_POPULATE_READ)
        except (OSError, ValueError):  # kernel < 5.14: touch the pages by hand
            step = mmap.PAGESIZE
            if write:
                zero = bytes(1 << 20)
                for off in range(0, self.size, len(zero)):
                    n = min(len(zero), self.size - off)
                    self.view[off:off + n] = zero[:n]
            else:
                sum(self.view[off] for off in range(0, self.size, step))

    def unlink(self) -> None:
        _unlink(self.name)

    def close(self) -> None:
        try:
            self.view.release()
            self._map.close()
        except (BufferError, ValueError):  # a view still alive: the mapping goes with the object
            pass


def _unlink(name: str) -> None:
    try:
        os.unlink(SHM_DIR / name)
    except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def janitor() -> list[str]:
    """Unlink our segments whose owner process is gone; returns the names removed."""
    removed = []
    try:
        entries = list(SHM_DIR.iterdir())
    except OSError:
        return removed
    for p in entries:
        if not p.name.startswith(PREFIX):
            continue
        try:
            pid = int(p.name[len(PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            _unlink(p.name)
            removed.append(p.name)
    return removed


def segments_of(pid: int) -> list[str]:
    """Names of live segments owned by ``pid`` (tests, diagnostics)."""
    return sorted(p.name for p in SHM_DIR.glob(f"{PREFIX}{pid}-*"))
