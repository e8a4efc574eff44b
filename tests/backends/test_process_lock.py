"""The lock that lets one process per SQLite file count its limits in memory.

Each conflict is checked against a real second process: ``flock`` locks belong to open
file descriptions, so only another process shows what a deployment would see.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from keyguard.backends._process_lock import _forked, hold_limits_lock, lock_path
from keyguard.errors import ConfigurationError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no fcntl: nothing is checked")

HOLDER = """
import sys
from keyguard.backends._process_lock import hold_limits_lock
from keyguard.errors import ConfigurationError
try:
    hold_limits_lock(sys.argv[1], exclusive=sys.argv[2] == "exclusive")
except ConfigurationError as exc:
    print(exc, flush=True)
    sys.exit(3)
print("held", flush=True)
sys.stdin.read()
"""


@contextmanager
def held_elsewhere(db: Path, mode: str) -> Iterator[None]:
    """Another process holds ``mode`` on ``db``'s limits until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(db), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    try:
        assert proc.stdout.readline() == "held\n"
        yield
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
        proc.stdout.close()


def refused_elsewhere(db: Path, mode: str) -> str:
    """The error another process gets asking ``mode`` on ``db``'s limits ("" if none)."""
    done = subprocess.run(
        [sys.executable, "-c", HOLDER, str(db), mode],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 3 else ""


def test_the_sidecar_sits_beside_the_real_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every spelling of one database (a symlink, a relative path) names one lock file."""
    db = tmp_path / "kg.db"
    link = tmp_path / "link.db"
    link.symlink_to(db)
    assert lock_path(db) == tmp_path.resolve() / "kg.db-limits.lock"
    assert lock_path(link) == lock_path(db)
    monkeypatch.chdir(tmp_path)
    assert lock_path("kg.db") == lock_path(db)


def test_one_process_may_ask_again_in_any_mode(tmp_path: Path) -> None:
    """Guards of one process share its lock: asking twice, or shared then exclusive, is fine."""
    db = tmp_path / "kg.db"
    hold_limits_lock(db, exclusive=False)
    hold_limits_lock(db, exclusive=False)
    hold_limits_lock(db, exclusive=True)  # upgraded: no other process shares it
    hold_limits_lock(db, exclusive=False)  # the process has the file to itself already
    assert "another process" in refused_elsewhere(db, "shared")
    assert (tmp_path / "kg.db-limits.lock").exists()


@pytest.mark.parametrize(
    ("theirs", "ours"),
    [("exclusive", True), ("exclusive", False), ("shared", True)],
)
def test_a_conflicting_process_is_refused_with_the_fix(
    tmp_path: Path, theirs: str, ours: bool
) -> None:
    """In-memory windows exclude every other process; the error names the file and the fix."""
    db = tmp_path / "kg.db"
    with held_elsewhere(db, theirs), pytest.raises(ConfigurationError) as info:
        hold_limits_lock(db, exclusive=ours)
    message = str(info.value)
    assert str(tmp_path.resolve() / "kg.db") in message
    assert f"KEYGUARD_LIMITER_URL=sqlite:///{tmp_path.resolve() / 'kg.db'}" in message
    hold_limits_lock(db, exclusive=ours)  # the holder exited: its lock went with it


def test_processes_that_count_in_the_file_share_it(tmp_path: Path) -> None:
    """Any number of processes counting limits in the file run side by side."""
    db = tmp_path / "kg.db"
    with held_elsewhere(db, "shared"):
        hold_limits_lock(db, exclusive=False)


def test_a_failed_upgrade_keeps_the_shared_lock(tmp_path: Path) -> None:
    """Refused an upgrade, the process still holds its shared lock: no one may go exclusive."""
    db = tmp_path / "kg.db"
    hold_limits_lock(db, exclusive=False)
    with held_elsewhere(db, "shared"), pytest.raises(ConfigurationError):
        hold_limits_lock(db, exclusive=True)
    assert "another process" in refused_elsewhere(db, "exclusive")
    assert refused_elsewhere(db, "shared") == ""


def test_a_missing_directory_is_a_configuration_error(tmp_path: Path) -> None:
    """A sidecar that cannot be created says which file, as a ConfigurationError."""
    with pytest.raises(ConfigurationError, match="limits lock"):
        hold_limits_lock(tmp_path / "nowhere" / "kg.db", exclusive=True)


def test_a_fork_after_counting_in_memory_is_logged_in_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A child that inherits in-memory windows (gunicorn --preload) says so; a shared lock
    does not, since the file counts for every process."""
    exclusive, shared = tmp_path / "mem.db", tmp_path / "file.db"
    hold_limits_lock(exclusive, exclusive=True)
    hold_limits_lock(shared, exclusive=False)
    parent = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: parent + 1)  # as seen from the child
    with caplog.at_level(logging.WARNING, logger="keyguard"):
        _forked()
    assert "forked" in caplog.text
    assert str(exclusive.resolve()) in caplog.text
    assert str(shared.resolve()) not in caplog.text
