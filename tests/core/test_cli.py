"""The ``keyguard`` CLI, driven in-process through ``main()`` (and once as a real script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keyguard import InvalidCredential, KeyFormat, KeyHasher, KeyManager, Secret, __version__
from keyguard.backends import open_key_store
from keyguard.cli import EXIT_NOT_FOUND, EXIT_OK, EXIT_STORAGE, EXIT_USAGE, main

PEPPER = "pepper-that-is-long-enough-0123"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Run = Callable[..., Result]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], storage_url: str) -> Run:
    """``cli("keys", "list")`` against a store that persists between calls."""

    def run(*argv: str) -> Result:
        code = main(["--storage-url", storage_url, *argv])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def cli_once(capsys: pytest.CaptureFixture[str], clean_env: Path) -> Run:
    """For single commands: a fresh ``memory://`` store each call."""

    def run(*argv: str) -> Result:
        code = main([*argv, "--storage-url", "memory://"])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@contextmanager
def manager_for(url: str, **options: Any) -> Iterator[KeyManager]:
    """A manager on the same store the CLI used, to check what it wrote."""
    store = open_key_store(url)
    try:
        yield KeyManager(store, **options)
    finally:
        store.close()


def assert_one_line_error(result: Result, code: int) -> None:
    assert result.code == code
    assert result.out == ""
    assert result.err.startswith("keyguard: error: ")
    assert result.err.count("\n") == 1
    assert "Traceback" not in result.err


def create(cli: Run, *argv: str) -> dict[str, Any]:
    result = cli("keys", "create", "--json", *argv)
    assert result.code == EXIT_OK, result.err
    issued: dict[str, Any] = result.json()
    return issued


# --- create ---------------------------------------------------------------------------


def test_create_json_has_the_public_record_and_the_key(cli: Run) -> None:
    issued = create(
        cli,
        "--name", "ci",
        "--owner", "team-a",
        "--scopes", "text:generate,image:*",
        "--plan", "basic",
        "--limits", "60/minute;1000/hour",
        "--quota-daily", "500",
        "--quota-monthly", "9000",
        "--concurrency", "3",
        "--ip", "10.0.0.0/8",
        "--ip", "2001:db8::/32",
        "--expires", "30d",
        "--env", "test",
        "--metadata", '{"ticket": 42}',
    )  # fmt: skip
    assert {
        "id", "name", "hint", "owner", "scopes", "plan", "limits", "ip_allow", "expires_at",
        "created_at", "updated_at", "last_used_at", "revoked_at", "revoked_reason",
        "metadata", "status", "key",
    } == set(issued)  # fmt: skip
    assert issued["name"] == "ci"
    assert issued["owner"] == "team-a"
    assert issued["scopes"] == ["image:*", "text:generate"]
    assert issued["plan"] == "basic"
    assert issued["limits"] == {
        "rate": "60/minute;1000/hour",
        "quota_daily": 500,
        "quota_monthly": 9000,
        "concurrency": 3,
    }
    assert issued["ip_allow"] == ["10.0.0.0/8", "2001:db8::/32"]
    assert issued["metadata"] == {"ticket": 42}
    assert issued["status"] == "active"
    created = datetime.fromisoformat(issued["created_at"])
    expires = datetime.fromisoformat(issued["expires_at"])
    assert expires - created == timedelta(days=30)
    parsed = KeyFormat().parse(issued["key"])
    assert parsed.env == "test"
    head, _, tail = issued["hint"].partition("…")
    assert issued["key"].startswith(head)
    assert issued["key"].endswith(tail)


def test_create_uses_the_default_plan_and_no_overrides(cli: Run) -> None:
    issued = create(cli, "--name", "plain")
    assert issued["plan"] == "free"
    assert issued["scopes"] == []
    assert issued["expires_at"] is None
    assert set(issued["limits"].values()) == {None}
    assert KeyFormat().parse(issued["key"]).env == "live"


def test_create_text_shows_the_key_once_on_its_own_line(cli_once: Run) -> None:
    result = cli_once("keys", "create", "--name", "human", "--scopes", "chat:completions")
    assert result.code == EXIT_OK
    lines = result.out.strip().splitlines()
    KeyFormat().parse(lines[-1])
    assert "will not be shown again" in lines[-2]
    assert result.out.count(lines[-1]) == 1
    assert "chat:completions" in result.out


@pytest.mark.parametrize("where", ["before", "after"])
def test_json_is_accepted_before_and_after_the_subcommand(
    capsys: pytest.CaptureFixture[str], clean_env: Path, where: str
) -> None:
    argv = ["keys", "create", "--name", "x", "--storage-url", "memory://"]
    argv = ["--json", *argv] if where == "before" else [*argv, "--json"]
    assert main(argv) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["name"] == "x"


def test_storage_url_is_accepted_before_the_subcommand(
    capsys: pytest.CaptureFixture[str], clean_env: Path
) -> None:
    assert main(["--storage-url", "memory://", "--json", "keys", "list"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == []


def test_storage_url_comes_from_the_environment(
    capsys: pytest.CaptureFixture[str], clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYGUARD_STORAGE_URL", "nothing://here")
    assert main(["keys", "list"]) == EXIT_STORAGE
    assert "'nothing'" in capsys.readouterr().err


# --- list -----------------------------------------------------------------------------


def test_list_never_shows_a_key_or_a_digest(cli: Run) -> None:
    keys = [create(cli, "--name", f"k{i}", "--scopes", "text:generate")["key"] for i in range(3)]
    digests = [KeyHasher().digest(Secret(k)) for k in keys]
    for argv in (("--json",), ()):
        result = cli("keys", "list", *argv)
        assert result.code == EXIT_OK
        for secret in (*keys, *digests):
            assert secret not in result.out
            assert secret not in result.err
        assert "digest" not in result.out
    records = cli("keys", "list", "--json").json()
    assert [r["name"] for r in records] == ["k0", "k1", "k2"]
    assert all("key" not in r and r["status"] == "active" for r in records)


def test_list_table_has_a_header_and_one_row_per_key(cli: Run) -> None:
    first = create(cli, "--name", "alpha", "--scopes", "text:generate")
    create(cli, "--name", "beta", "--plan", "premium")
    lines = cli("keys", "list").out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "HINT", "STATUS", "SCOPES", "PLAN", "CREATED"]
    assert len(lines) == 3
    assert lines[1].split()[:6] == [
        first["id"], "alpha", first["hint"], "active", "text:generate", "free"
    ]  # fmt: skip
    assert lines[2].index("premium") == lines[0].index("PLAN")


def test_list_filters_and_pages(cli: Run) -> None:
    ids = [
        create(cli, "--name", f"k{i}", "--owner", "even" if i % 2 == 0 else "odd")["id"]
        for i in range(5)
    ]
    assert cli("keys", "revoke", ids[0]).code == EXIT_OK

    def names(*argv: str) -> list[str]:
        result = cli("keys", "list", "--json", *argv)
        assert result.code == EXIT_OK, result.err
        return [r["name"] for r in result.json()]

    assert names("--owner", "odd") == ["k1", "k3"]
    assert names("--status", "revoked") == ["k0"]
    assert names("--status", "active", "--owner", "even") == ["k2", "k4"]
    assert names("--plan", "premium") == []
    page = cli("keys", "list", "--json", "--limit", "2")
    assert [r["name"] for r in page.json()] == ["k0", "k1"]
    assert f"--after {ids[1]}" in page.err
    assert names("--limit", "2", "--after", ids[1]) == ["k2", "k3"]
    assert names("--limit", "2", "--all") == ["k0", "k1", "k2", "k3", "k4"]


def test_list_on_an_empty_store(cli_once: Run) -> None:
    assert cli_once("keys", "list").out.strip() == "No keys."
    assert cli_once("keys", "list", "--json").json() == []


# --- show, revoke, rotate, update, delete ---------------------------------------------


def test_show_prints_one_record(cli: Run) -> None:
    issued = create(cli, "--name", "shown", "--metadata", '{"a": [1, 2]}')
    shown = cli("keys", "show", issued["id"], "--json").json()
    assert shown == {k: v for k, v in issued.items() if k != "key"}
    text = cli("keys", "show", issued["id"]).out
    assert issued["id"] in text
    assert issued["hint"] in text
    assert issued["key"] not in text


def test_revoke_takes_effect_and_records_the_actor(cli: Run, storage_url: str) -> None:
    issued = create(cli, "--name", "doomed")
    result = cli("keys", "revoke", issued["id"], "--reason", "leaked", "--actor", "ops:alice")
    assert result.code == EXIT_OK
    assert "Revoked" in result.out
    record = cli("keys", "show", issued["id"], "--json").json()
    assert record["status"] == "revoked"
    assert record["revoked_reason"] == "leaked"
    with manager_for(storage_url) as manager:
        with pytest.raises(InvalidCredential):
            manager.authenticate(issued["key"])
        events = manager.audit(issued["id"])
    assert (events[0].action, events[0].actor) == ("revoke", "ops:alice")
    assert events[-1].actor.startswith("cli")


def test_rotate_prints_a_new_key_and_keeps_the_old_one_for_the_grace(
    cli: Run, storage_url: str
) -> None:
    issued = create(cli, "--name", "rotating")
    result = cli("keys", "rotate", issued["id"], "--grace", "1h", "--json")
    assert result.code == EXIT_OK
    rotated = result.json()
    assert rotated["id"] == issued["id"]
    assert rotated["key"] != issued["key"]
    KeyFormat().parse(rotated["key"])
    assert rotated["hint"] != issued["hint"]
    updated = datetime.fromisoformat(rotated["updated_at"])
    assert datetime.fromisoformat(rotated["grace_until"]) == updated + timedelta(hours=1)
    with manager_for(storage_url) as manager:
        assert manager.authenticate(rotated["key"]).id == issued["id"]
        assert manager.authenticate(issued["key"]).id == issued["id"]


def test_rotate_without_grace_retires_the_old_key_at_once(cli: Run, storage_url: str) -> None:
    issued = create(cli, "--name", "rotating")
    rotated = cli("keys", "rotate", issued["id"], "--grace", "0", "--json").json()
    assert rotated["grace_until"] is None
    with manager_for(storage_url) as manager, pytest.raises(InvalidCredential):
        manager.authenticate(issued["key"])
    text = cli("keys", "rotate", issued["id"])
    assert text.code == EXIT_OK
    KeyFormat().parse(text.out.strip().splitlines()[-1])
    assert "will not be shown again" in text.out


def test_update_changes_only_the_given_fields(cli: Run) -> None:
    issued = create(
        cli, "--name", "before", "--owner", "me", "--quota-daily", "5", "--ip", "10.0.0.0/8"
    )
    key_id = issued["id"]

    def update(*argv: str) -> dict[str, Any]:
        result = cli("keys", "update", key_id, "--json", *argv)
        assert result.code == EXIT_OK, result.err
        record: dict[str, Any] = result.json()
        return record

    record = update("--name", "after", "--scopes", "audio:speech", "--limits", "10/minute")
    assert record["name"] == "after"
    assert record["owner"] == "me"
    assert record["scopes"] == ["audio:speech"]
    assert record["limits"]["rate"] == "10/minute"
    assert record["limits"]["quota_daily"] == 5
    assert record["ip_allow"] == ["10.0.0.0/8"]
    record = update("--quota-daily", "none", "--concurrency", "4", "--plan", "enterprise")
    assert record["limits"] == {
        "rate": "10/minute",
        "quota_daily": None,
        "quota_monthly": None,
        "concurrency": 4,
    }
    assert record["plan"] == "enterprise"
    assert update("--ip", "192.0.2.0/24", "--ip", "::1")["ip_allow"] == ["192.0.2.0/24", "::1/128"]
    assert update("--clear-ip")["ip_allow"] == []
    assert update("--expires", "2h")["expires_at"] is not None
    assert update("--no-expiry")["expires_at"] is None
    assert update("--metadata", '{"k": "v"}')["metadata"] == {"k": "v"}
    assert update("--no-owner")["owner"] is None
    assert update("--scopes", "")["scopes"] == []
    assert cli("keys", "show", key_id, "--json").json()["name"] == "after"


def test_update_with_nothing_to_change_is_invalid(cli: Run) -> None:
    issued = create(cli, "--name", "same")
    assert_one_line_error(cli("keys", "update", issued["id"]), EXIT_USAGE)


def test_delete_needs_yes(cli: Run) -> None:
    issued = create(cli, "--name", "gone")
    refused = cli("keys", "delete", issued["id"])
    assert_one_line_error(refused, EXIT_USAGE)
    assert "--yes" in refused.err
    assert cli("keys", "show", issued["id"]).code == EXIT_OK
    result = cli("keys", "delete", issued["id"], "--yes", "--json")
    assert result.code == EXIT_OK
    assert result.json() == {"id": issued["id"], "deleted": True}
    assert cli("keys", "show", issued["id"]).code == EXIT_NOT_FOUND


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(["--ip", "10.0.0.1/8"], "ip_allow: '10.0.0.1/8'", id="cidr-host-bits"),
        pytest.param(["--ip", "300.1.1.1"], "ip_allow:", id="cidr-bad-address"),
        pytest.param(["--limits", "lots/sometimes"], "limits:", id="limits"),
        pytest.param(["--limits", "0/minute"], "limits:", id="limits-zero"),
        pytest.param(["--quota-daily", "0"], "quota_daily:", id="quota-zero"),
        pytest.param(["--expires", "yesterday"], "expires:", id="expiry-word"),
        pytest.param(["--expires", "2001-01-01T00:00:00Z"], "expires:", id="expiry-past"),
        pytest.param(["--expires", "2099-01-01T00:00:00"], "expires:", id="expiry-naive"),
        pytest.param(["--metadata", "{not json"], "metadata: is not valid JSON", id="json"),
        pytest.param(["--metadata", "[1, 2]"], "metadata: must be a JSON object", id="json-list"),
        pytest.param(["--metadata", "[" * 100_000], "metadata:", id="json-deep"),
        pytest.param(["--scopes", "Bad Scope"], "scopes: 'Bad Scope' is not a scope", id="scope"),
        pytest.param(["--plan", "gold"], "plan: 'gold' is not a configured plan", id="plan"),
        pytest.param(["--plan", "Gold!"], "plan:", id="plan-name"),
        pytest.param(["--env", "prod"], "env:", id="env"),
        pytest.param(["--actor", "a\nb"], "actor:", id="actor"),
    ],
)
def test_bad_create_input_is_one_line_and_exit_2(
    cli_once: Run, argv: list[str], expected: str
) -> None:
    result = cli_once("keys", "create", "--name", "x", *argv)
    assert_one_line_error(result, EXIT_USAGE)
    assert expected in result.err


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("a\x00b", "name: must not contain control characters", id="nul"),
        pytest.param("x" * 100_000, "name: must be at most 200 characters", id="huge"),
        pytest.param("   ", "name: must not be empty", id="blank"),
        pytest.param("line\nbreak", "name: must not contain control characters", id="newline"),
    ],
)
def test_bad_names_are_refused(cli_once: Run, name: str, expected: str) -> None:
    result = cli_once("keys", "create", "--name", name)
    assert_one_line_error(result, EXIT_USAGE)
    assert expected in result.err
    assert name not in result.err


@pytest.mark.parametrize(
    "argv",
    [
        ["show", "key_missing"],
        ["revoke", "key_missing"],
        ["rotate", "key_missing"],
        ["update", "key_missing", "--name", "n"],
        ["update", "key_missing", "--quota-daily", "3"],
        ["delete", "key_missing", "--yes"],
        ["show", "k" * 10_000],
    ],
)
def test_unknown_ids_exit_1(cli_once: Run, argv: list[str]) -> None:
    result = cli_once("keys", *argv)
    assert_one_line_error(result, EXIT_NOT_FOUND)
    assert "no key with id" in result.err


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "rotate", "key_x", "--grace", "1x"],
        ["keys", "update", "key_x", "--quota-daily", "lots"],
        ["keys", "list", "--limit", "0"],
        ["keys", "list", "--after", "c" * 100],
    ],
)
def test_other_invalid_values_exit_2(cli_once: Run, argv: list[str]) -> None:
    assert_one_line_error(cli_once(*argv), EXIT_USAGE)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["keys"],
        ["keys", "create"],
        ["keys", "explode"],
        ["keys", "create", "--name", "x", "--quota-daily", "many"],
        ["keys", "list", "--status", "sleeping"],
        ["keys", "update", "key_x", "--ip", "10.0.0.0/8", "--clear-ip"],
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], clean_env: Path, argv: list[str]
) -> None:
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "error:" in err
    assert "Traceback" not in err


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == EXIT_OK
    assert capsys.readouterr().out.strip() == f"keyguard {__version__}"
    assert main(["--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "exit codes:" in out
    assert "3  storage or configuration error" in out
    assert main(["keys", "create", "--help"]) == EXIT_OK
    assert "--quota-monthly" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--storage-url", "bogus://x"], "unknown storage scheme 'bogus'"),
        (["--storage-url", "not a url"], "invalid setting storage_url:"),
        (["--storage-url", "sqlite:////no/such/dir/keys.db"], "does not exist"),
        (["--config", "missing.toml"], "config file 'missing.toml' does not exist"),
    ],
)
def test_configuration_errors_exit_3(
    capsys: pytest.CaptureFixture[str], clean_env: Path, argv: list[str], expected: str
) -> None:
    result = main(["keys", "list", *argv])
    err = capsys.readouterr().err
    assert result == EXIT_STORAGE
    assert err.startswith("keyguard: error: ")
    assert err.count("\n") == 1
    assert expected in err


def test_a_bad_setting_is_named_and_the_pepper_never_shown(
    capsys: pytest.CaptureFixture[str], clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYGUARD_PEPPER", "tiny-pepper")
    assert main(["keys", "list", "--storage-url", "memory://"]) == EXIT_STORAGE
    err = capsys.readouterr().err
    assert err == "keyguard: error: invalid setting pepper: must be at least 16 bytes\n"


# --- settings reach the CLI -----------------------------------------------------------


def test_the_pepper_and_the_prefix_from_settings_are_used(
    cli: Run, storage_url: str, monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    monkeypatch.setenv("KEYGUARD_PEPPER", PEPPER)
    (clean_env / "keyguard.toml").write_text('key_prefix = "acme"\n')
    result = cli("keys", "create", "--name", "p", "--json", "--config", "keyguard.toml")
    assert result.code == EXIT_OK, result.err
    assert PEPPER not in result.out + result.err
    key = result.json()["key"]
    assert key.startswith("acme_live_")
    acme = KeyFormat(prefix="acme")
    with manager_for(storage_url, key_format=acme, hasher=KeyHasher(PEPPER)) as manager:
        assert manager.authenticate(key).name == "p"
    with manager_for(storage_url, key_format=acme) as manager, pytest.raises(InvalidCredential):
        manager.authenticate(key)


def test_the_dotenv_file_is_read(capsys: pytest.CaptureFixture[str], clean_env: Path) -> None:
    (clean_env / ".env").write_text("KEYGUARD_STORAGE_URL=memory://\nKEYGUARD_KEY_PREFIX=dot\n")
    assert main(["keys", "create", "--name", "d", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["key"].startswith("dot_live_")


# --- the installed script -------------------------------------------------------------


def test_the_console_script_creates_a_key(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "keyguard"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("KEYGUARD_")}
    env["KEYGUARD_STORAGE_URL"] = f"sqlite:///{tmp_path / 'ci.db'}"
    proc = subprocess.run(
        [str(script), "keys", "create", "--name", "ci", "--scopes", "text:generate", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    issued = json.loads(proc.stdout)
    assert issued["scopes"] == ["text:generate"]
    KeyFormat().parse(issued["key"])
    with manager_for(env["KEYGUARD_STORAGE_URL"]) as manager:
        assert manager.authenticate(issued["key"]).id == issued["id"]
