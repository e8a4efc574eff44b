"""``keyguard usage`` and ``keyguard errors``: what was recorded, printed for people
and for scripts, with the live limit state, and never a secret."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from keyguard._cli_usage import sparkline
from keyguard.backends.registry import open_usage_store
from keyguard.backends.sqlite_limiter import SQLiteRateStore
from keyguard.cli import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, main
from keyguard.limiting import HitRequest, LimitPolicy, Quota, QuotaPeriod
from keyguard.settings import KeyGuardSettings
from keyguard.usage.recorder import UsageRecorder
from keyguard.usage.records import UsageEvent


def run(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> tuple[int, str, str]:
    code = main(["--storage-url", url, *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def recorded(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, str, str]:
    """A SQLite store with one key and a scripted hour of its usage: (url, id, secret)."""
    url = f"sqlite:///{clean_env / 'keyguard.db'}"
    code, out, _ = run(
        capsys, url, "keys", "create", "--name", "ci", "--scopes", "text:generate,image:*", "--json"
    )
    assert code == EXIT_OK
    created = json.loads(out)
    key_id, secret = created["id"], created["key"]
    recorder = UsageRecorder(open_usage_store(url), owns_store=True)
    now = time.time()
    for n in range(40):
        service = "image:create" if n % 4 == 0 else "text:generate"
        recorder.record(
            UsageEvent(
                now - 60 * n,
                key_id,
                None,
                service,
                "POST",
                "/v1/generate",
                200,
                0.02,
                2,
                None,
                "10.0.0.1",
                f"req-{n}",
            )
        )
    recorder.record(
        UsageEvent(
            now - 5,
            key_id,
            None,
            "text:generate",
            "POST",
            "/v1/generate",
            429,
            0.001,
            0,
            "rate_limit_exceeded",
            "10.0.0.1",
            "req-denied",
        )
    )
    recorder.record(
        UsageEvent(
            now - 4,
            key_id,
            None,
            "text:generate",
            "POST",
            "/v1/generate",
            502,
            1.5,
            2,
            None,
            "10.0.0.1",
            "req-bad-gateway",
        )
    )
    recorder.close()
    return url, key_id, secret


def test_usage_json_total_holds_requests_errors_denied_units(
    recorded: tuple[str, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url, key_id, secret = recorded
    code, out, _ = run(capsys, url, "usage", key_id, "--since", "24h", "--by", "service", "--json")
    assert code == EXIT_OK
    document = json.loads(out)
    assert document["key_id"] == key_id
    total = document["total"]
    assert (total["requests"], total["errors"], total["denied"], total["units"]) == (42, 2, 1, 82)
    assert document["by_service"]["image:create"]["requests"] == 10
    assert sum(p["requests"] for p in document["series"]["*"]) == 42
    assert set(document["series"]) == {"*", "image:create", "text:generate"}
    assert document["granularity"] == "hour"
    # By default windows live in the server's memory: only the quota is read, from the file.
    assert [limit["name"] for limit in document["limits"]] == ["monthly"]
    assert "server process" in document["limits_note"]
    assert secret not in out


def test_usage_reads_the_quota_a_server_spent_from_the_file(
    recorded: tuple[str, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Units a server charged to the monthly quota in the file show in ``keyguard usage``."""
    url, key_id, _ = recorded
    store = SQLiteRateStore.from_url(url)
    monthly = Quota("monthly", 100_000, QuotaPeriod.MONTH)  # the free plan's
    assert store.hit(HitRequest(key_id, LimitPolicy(quotas=(monthly,)), cost=7)).allowed
    store.close()
    code, out, _ = run(capsys, url, "usage", key_id, "--json")
    assert code == EXIT_OK
    [limit] = json.loads(out)["limits"]
    assert (limit["name"], limit["used"]) == ("monthly", 7)


def test_usage_reads_windows_when_the_file_counts_them(
    recorded: tuple[str, str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``KEYGUARD_LIMITER_URL`` naming the file, windows are read from it too."""
    url, key_id, _ = recorded
    monkeypatch.setenv("KEYGUARD_LIMITER_URL", url)
    code, out, _ = run(capsys, url, "usage", key_id, "--json")
    assert code == EXIT_OK
    document = json.loads(out)
    names = {limit["name"] for limit in document["limits"]}
    assert {"minute", "hour", "day", "monthly"} <= names  # the free plan's, read from SQLite
    assert "limits_note" not in document


def test_usage_text_has_totals_a_chart_and_limits(
    recorded: tuple[str, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url, key_id, secret = recorded
    code, out, _ = run(capsys, url, "usage", key_id, "--since", "1h", "--by", "service")
    assert code == EXIT_OK
    assert f"Usage of {key_id}" in out
    assert "requests 42" in out
    assert "per minute" in out
    assert any(bar in out for bar in "▁▂▃▄▅▆▇█")
    assert "Limits now:" in out
    assert "monthly" in out
    assert "counted in the server process's memory; not shown" in out
    assert "image:create" in out
    assert secret not in out


def test_errors_lists_the_newest_first(
    recorded: tuple[str, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url, key_id, _ = recorded
    code, out, _ = run(capsys, url, "errors", key_id, "--json")
    assert code == EXIT_OK
    entries = json.loads(out)
    assert [e["code"] for e in entries] == ["http_502", "rate_limit_exceeded"]
    assert entries[0]["message"] == "Bad Gateway"
    assert entries[0]["request_id"] == "req-bad-gateway"
    code, out, _ = run(capsys, url, "errors", key_id)
    assert "rate_limit_exceeded" in out
    assert "REQUEST ID" in out


@pytest.mark.parametrize(
    "argv",
    [
        ("usage", "{id}", "--since", "yesterday"),
        ("usage", "{id}", "--since", "30d", "--granularity", "minute"),
        ("errors", "{id}", "--limit", "0"),
    ],
)
def test_bad_ranges_are_usage_errors(
    recorded: tuple[str, str, str], capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    url, key_id, _ = recorded
    code, out, err = run(capsys, url, *(a.format(id=key_id) for a in argv))
    assert code == EXIT_USAGE
    assert out == ""
    assert err.startswith("keyguard: error:")


def test_an_unknown_key_is_not_found(
    recorded: tuple[str, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _, _ = recorded
    assert run(capsys, url, "usage", "key_nope")[0] == EXIT_NOT_FOUND
    assert run(capsys, url, "errors", "key_nope")[0] == EXIT_NOT_FOUND


def test_sparkline_scales_to_the_largest_value() -> None:
    assert sparkline([0, 1, 2, 4, 8]) == " ▁▂▄█"
    assert sparkline([0, 0]) == "  "
    assert sparkline([]) == ""


def test_usage_settings_default_to_the_storage_url(clean_env: Path) -> None:
    settings = KeyGuardSettings(storage_url=f"sqlite:///{clean_env / 'k.db'}")
    store = settings.open_usage_store()
    store.close()
    assert settings.usage_enabled
