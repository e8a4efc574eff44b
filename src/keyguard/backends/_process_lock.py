"""Which processes count a SQLite file's limits: a ``flock`` on a file beside it.

Under the embedded default a process counts a SQLite file's windows in its own memory
(:mod:`keyguard.backends.local_limiter`). Two such processes would each enforce a whole
limit, so the process that does takes an **exclusive** lock on ``<db>-limits.lock``;
a process that counts limits in the file itself (``limiter_url`` set to the file)
takes a **shared** one. Any mix but shared + shared is refused at start-up with a
:class:`ConfigurationError` that says how to run several workers.

``flock`` locks belong to an open file description, not to a process or a file
descriptor: a second ``open()`` of the file in the same process would conflict with
the first. So each process opens a sidecar once, keeps it open until it exits (the
kernel drops the lock then, even after a crash), and every guard of the process on
that file shares it through :data:`_HELD`. Entries are keyed by pid too: a child
made by ``fork()`` inherits the parent's open file description, and with it the
parent's lock, so it must open its own to find out whether it may count.

A guard built *before* a fork (``gunicorn --preload``) is copied into every worker
with the lock it holds, which no later ``flock`` can see: each worker then counts on
its own. That is logged in the child (see :func:`_forked`), since nothing else can
catch it.

On platforms without ``fcntl`` (Windows) nothing is checked.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ..errors import ConfigurationError

__all__ = ["hold_limits_lock", "lock_path"]

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_logger = logging.getLogger("keyguard")


@dataclass(slots=True)
class _Held:
    fd: int
    exclusive: bool
    pid: int


_HELD: dict[str, _Held] = {}  # by the sidecar's real path
_HELD_LOCK = threading.Lock()


def lock_path(db: str | os.PathLike[str]) -> Path:
    """The sidecar of database file ``db``: ``<db>-limits.lock``, symlinks resolved,
    so every spelling of one file names one lock."""
    real = Path(os.path.realpath(db))
    return real.with_name(real.name + "-limits.lock")


def _fix(db: Path) -> str:
    return (
        f"to run several worker processes on one machine, set KEYGUARD_LIMITER_URL="
        f"sqlite:///{db} in every process (limits are then counted in the file, exact "
        "across processes)"
    )


def _conflict(db: Path, exclusive: bool) -> ConfigurationError:
    if exclusive:
        what = (
            f"another process already counts the limits of {str(db)!r}; by default keyguard "
            "counts a SQLite file's windows in the memory of one process only"
        )
    else:
        what = (
            f"another process counts the windows of {str(db)!r} in its own memory (the "
            "default for a SQLite storage URL), so this one cannot count them in the file"
        )
    return ConfigurationError(f"{what}: {_fix(db)}")


def _try(fd: int, exclusive: bool) -> bool:
    """One non-blocking ``flock``; ``False`` when another description holds it."""
    if fcntl is None:  # pragma: no cover - Windows
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def hold_limits_lock(db: str | os.PathLike[str], *, exclusive: bool) -> None:
    """Hold this process's lock on the limits of database file ``db`` until it exits.

    ``exclusive`` when the process counts the file's windows in memory, else shared.
    Calling again is harmless; an exclusive request after a shared one upgrades the
    lock. Never blocks.

    :raises ConfigurationError: another process holds a lock that conflicts (the
        message names the file and the fix), or the sidecar cannot be opened or locked.
    """
    if fcntl is None:  # pragma: no cover - Windows
        return
    sidecar = lock_path(db)
    db = sidecar.with_name(sidecar.name.removesuffix("-limits.lock"))
    key, pid = str(sidecar), os.getpid()
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is not None and held.pid == pid:
            if held.exclusive or not exclusive:
                return
            if not _upgrade(held):
                raise _conflict(db, exclusive=True)
            return
        fd = _open(sidecar)
        try:
            locked = _try(fd, exclusive)
        except OSError as exc:
            os.close(fd)
            raise ConfigurationError(
                f"could not lock {str(sidecar)!r} ({errno.errorcode.get(exc.errno or 0, exc)})"
            ) from None
        if not locked:
            os.close(fd)
            raise _conflict(db, exclusive)
        _HELD[key] = _Held(fd, exclusive, pid)


def _upgrade(held: _Held) -> bool:
    """Shared to exclusive. ``flock`` may drop the shared lock before it fails (the
    conversion is not atomic), so a failed upgrade takes the shared one back."""
    if _try(held.fd, exclusive=True):
        held.exclusive = True
        return True
    _try(held.fd, exclusive=False)
    return False


def _open(sidecar: Path) -> int:
    try:
        # O_CLOEXEC (Python's default, made explicit): a server's children never get it.
        return os.open(sidecar, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigurationError(
            f"could not open the limits lock {str(sidecar)!r} ({exc.strerror})"
        ) from None


def _forked() -> None:
    """In a child of ``fork()``: say so when it inherited in-memory windows."""
    global _HELD_LOCK  # noqa: PLW0603 - a lock held by a parent's thread at the fork stays held
    _HELD_LOCK = threading.Lock()
    inherited = [k for k, h in _HELD.items() if h.exclusive and h.pid != os.getpid()]
    if inherited:
        _logger.warning(
            "keyguard: this process was forked after a guard began counting the limits "
            "of %s in memory; each forked worker counts its own. Build the guard in each "
            "worker (no --preload), or count limits in the file with KEYGUARD_LIMITER_URL",
            ", ".join(repr(k.removesuffix("-limits.lock")) for k in inherited),
        )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)
