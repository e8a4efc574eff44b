"""The key format: generation, offline validation, digests and hints."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyguard.errors import ConfigurationError, InvalidCredential
from keyguard.keys import BASE62, KeyFormat, KeyHasher, Secret

FORMAT = KeyFormat()


def test_generated_key_has_the_documented_shape() -> None:
    """A key is prefix_env_ then 32 base62 characters and a 6-character checksum."""
    key = FORMAT.generate().reveal()
    assert re.fullmatch(r"kg_live_[0-9A-Za-z]{38}", key)
    assert re.fullmatch(FORMAT.pattern, key)
    assert FORMAT.parse(key).env == "live"


def test_t19_key_generation() -> None:
    """100k keys are distinct, match the charset and stay under 255 characters."""
    keys = {FORMAT.generate().reveal() for _ in range(100_000)}
    assert len(keys) == 100_000
    charset = set(BASE62)
    for key in list(keys)[:1000]:
        assert len(key) <= 255
        assert set(key.split("_")[2]) <= charset
    # 32 base62 characters carry log2(62) * 32 ≈ 190 bits, above the 128-bit bar.
    assert FORMAT.random_length * 5.95 > 128


@given(st.sampled_from(["live", "test"]))
def test_format_round_trip(env: str) -> None:
    """Every generated key parses back to its prefix and environment."""
    key = FORMAT.generate(env)
    parsed = FORMAT.parse(key.reveal())
    assert (parsed.prefix, parsed.env, parsed.secret) == ("kg", env, key)


KEY = FORMAT.generate().reveal()  # fixed per run, so hypothesis sees one strategy


@given(st.data())
def test_any_single_character_change_is_refused_offline(data: st.DataObject) -> None:
    """Changing any one character of a valid key fails the offline checks."""
    index = data.draw(st.integers(0, len(KEY) - 1))
    alphabet = BASE62 + "_-" + string.punctuation
    replacement = data.draw(st.sampled_from(alphabet.replace(KEY[index], "")))
    changed = KEY[:index] + replacement + KEY[index + 1 :]
    with pytest.raises(InvalidCredential):
        FORMAT.parse(changed)


@given(st.text(max_size=300))
def test_random_strings_are_refused_without_error(text: str) -> None:
    """Arbitrary text is refused with InvalidCredential and nothing else."""
    with pytest.raises(InvalidCredential):
        FORMAT.parse(text)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "kg_live_",
        "kg_prod_" + "a" * 38,
        "xx_live_" + "a" * 38,
        "kg_live_" + "é" * 38,
        "kg_live_" + "a" * 5000,
        "kg_live_" + "a" * 37 + "\x00",
        "kg__live_" + "a" * 37,
    ],
)
def test_malformed_keys_are_refused(raw: str) -> None:
    """Wrong prefix, environment, length, charset or NUL bytes are malformed."""
    with pytest.raises(InvalidCredential) as info:
        FORMAT.parse(raw)
    assert info.value.reason == "malformed"
    assert raw not in str(info.value) or raw == ""


@given(st.sampled_from([None, "a-pepper-of-16-bytes", b"\x00" * 32]))
def test_digest_never_equals_the_key(pepper: str | bytes | None) -> None:
    """A digest is 64 hex characters and never contains the key."""
    key = FORMAT.generate()
    digest = KeyHasher(pepper).digest(key)
    assert len(digest) == 64
    assert key.reveal() not in digest
    assert digest != key.reveal()


def test_pepper_changes_the_digest() -> None:
    """HMAC with a pepper gives a different digest than plain SHA-256."""
    key = FORMAT.generate()
    assert KeyHasher().digest(key) != KeyHasher("a-pepper-of-16-bytes").digest(key)
    assert "pepper" not in repr(KeyHasher("a-pepper-of-16-bytes")).replace("peppered", "")


def test_short_pepper_is_refused() -> None:
    """A pepper under 16 bytes is a configuration error."""
    with pytest.raises(ConfigurationError):
        KeyHasher("short")


def test_secret_masks_itself() -> None:
    """repr, str and f-strings of a Secret never show the key."""
    key = FORMAT.generate()
    raw = key.reveal()
    assert raw not in repr(key)
    assert raw not in str(key)
    assert raw not in f"{key} {key!r}"
    assert raw not in repr([key, {"k": key}])


def test_hint_shows_the_start_and_end_only() -> None:
    """The hint is recognisable but far too short to use."""
    key = FORMAT.generate()
    hint = FORMAT.hint(key)
    raw = key.reveal()
    assert hint.startswith(raw[:12])
    assert hint.endswith(raw[-4:])
    assert len(hint) == len("kg_live_") + 4 + 1 + 4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prefix": "KG"}, "prefix"),
        ({"prefix": "k_g"}, "prefix"),
        ({"prefix": ""}, "prefix"),
        ({"environments": ()}, "environments"),
        ({"environments": ("li ve",)}, "environments"),
        ({"random_length": 16}, "random_length"),
    ],
)
def test_bad_format_configuration_is_refused(options: dict[str, object], message: str) -> None:
    """An unusable prefix, environment or length fails at construction."""
    with pytest.raises(ConfigurationError, match=message):
        KeyFormat(**options)  # type: ignore[arg-type]


def test_custom_prefix_and_length() -> None:
    """A deployment's own prefix and length round-trip, and other prefixes are refused."""
    fmt = KeyFormat(prefix="acme", environments=("prod",), random_length=40)
    key = fmt.generate()
    assert key.reveal().startswith("acme_prod_")
    assert fmt.parse(key).env == "prod"
    with pytest.raises(InvalidCredential):
        FORMAT.parse(key)


def test_secret_equality_is_by_value() -> None:
    """Two Secrets with the same key are equal; a Secret never equals a str."""
    raw = FORMAT.generate().reveal()
    assert Secret(raw) == Secret(raw)
    assert Secret(raw) != raw
