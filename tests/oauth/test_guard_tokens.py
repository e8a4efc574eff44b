"""The guard's token path: keys and tokens in one slot, one principal, shared limits."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from keyguard.backends.memory import MemoryKeyStore
from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.credentials import CredentialConfig
from keyguard.denials import Denial
from keyguard.errors import ConfigurationError, StorageError
from keyguard.guard import Allow, Decision, Guard
from keyguard.lifecycle import KeyChanges
from keyguard.manager import KeyManager
from keyguard.oauth.issuer import TokenIssuer
from keyguard.oauth.jwks import RemoteJWKS
from keyguard.oauth.keyset import StaticKeys
from keyguard.oauth.validator import JWTValidator
from keyguard.plans import Plan
from keyguard.records import KeyRecord, LimitOverrides
from keyguard.request import RequestInfo
from keyguard.testing import FakeClock
from tests.adapters.security_support import PEER, SpyMemoryKeyStore
from tests.oauth.support import AUD, ISS, NOW, Keys, StubServer, forge, header, token
from tests.oauth.support import claims as payload

PLANS = {"free": Plan("free", "2/minute"), "partner": Plan("partner", "3/minute")}


class FailingStore(SpyMemoryKeyStore):
    """A memory store whose lookups by id fail too, when told to."""

    def get(self, key_id: str) -> KeyRecord | None:
        if self.failure is not None:
            raise self.failure
        return super().get(key_id)


class Setup:
    """A guard that takes keys and both kinds of tokens: an outside IdP's (static keys)
    and keyguard's own (a TokenIssuer bound to the key store)."""

    def __init__(self, keys: Keys, *, bound: bool = True, **options: object) -> None:
        self.clock = FakeClock(NOW)
        self.store = FailingStore()
        self.manager = KeyManager(self.store, clock=self.clock)
        self.issuer = TokenIssuer(issuer=ISS, audience=AUD, clock=self.clock)
        outside = JWTValidator(keys=StaticKeys.from_jwks(keys.jwks()), issuer=ISS, audience=AUD)
        settings: dict[str, object] = {
            "keys": self.store,
            "limiter": MemoryRateStore(clock=self.clock),
            "clock": self.clock,
            "plans": PLANS,
            "tokens": self.issuer.validator() if bound else outside,
        }
        settings.update(options)
        self.guard = Guard(**settings)  # type: ignore[arg-type]

    def check(
        self, credential: str, scope: str | None = None, *, header_name: str = ""
    ) -> Decision:
        name, value = (
            (header_name.encode(), credential.encode())
            if header_name
            else (b"authorization", f"Bearer {credential}".encode())
        )
        return self.guard.check(RequestInfo("GET", "/", ((name, value),), peer=PEER), scope=scope)

    def token_for(self, key_id: str, scopes: tuple[str, ...] | None = None) -> str:
        """A token for the key, with all its scopes unless ``scopes`` narrows them."""
        record = self.manager.get(key_id)
        granted = record.scopes if scopes is None else scopes
        return self.issuer.issue(record, granted, self.clock.now())[0]


def status(decision: Decision) -> int:
    return decision.status if isinstance(decision, Denial) else 200


def test_keys_still_work_beside_tokens(keys: Keys) -> None:
    """A key-shaped bearer value and X-API-Key go to the key store as before."""
    setup = Setup(keys)
    key = setup.manager.create("k", scopes=["read"]).key.reveal()
    by_bearer = setup.check(key, "read")
    assert isinstance(by_bearer, Allow)
    assert by_bearer.identity is not None
    assert by_bearer.identity.auth_method == "bearer"
    assert status(setup.check(key, "read", header_name="x-api-key")) == 200
    typo = setup.check(key[:-1] + ("A" if key[-1] != "A" else "B"))
    assert isinstance(typo, Denial)
    assert typo.code == "invalid_api_key"  # still key-shaped (our prefix): refused offline
    assert setup.store.finds == 2


def test_an_outside_client_is_its_own_principal_on_the_token_plan(keys: Keys) -> None:
    """``oauth:<client_id>`` with the token's scopes, limited per client on token_plan."""
    setup = Setup(keys, bound=False, token_plan="partner")
    first = setup.check(token(keys))
    assert isinstance(first, Allow)
    assert first.identity is not None
    assert (first.identity.key_id, first.identity.plan) == ("oauth:client-1", "partner")
    assert first.identity.scopes == ("read",)
    assert first.identity.auth_method == "oauth"
    assert [status(setup.check(token(keys))) for _ in range(3)] == [200, 200, 429]
    other = forge(header(), payload(client_id="client-2", sub="client-2"), keys.ec)
    assert status(setup.check(other)) == 200, "another client has its own bucket"
    assert setup.store.finds == 0, "an outside token never touches the key store"


def test_keyguard_tokens_share_the_key_limits(keys: Keys) -> None:
    """A key and its tokens are one principal: one bucket, the key's own limits."""
    setup = Setup(keys)
    created = setup.manager.create("k", scopes=["read"], limits=LimitOverrides(rate="3/minute"))
    tok = setup.token_for(created.record.id, ("read",))
    key = created.key.reveal()
    results = [status(setup.check(c, "read")) for c in (key, tok, key, tok)]
    assert results == [200, 200, 200, 429]
    decision = setup.check(tok, "read")
    assert isinstance(decision, Denial)
    assert decision.code == "rate_limit_exceeded"


def test_revoking_or_narrowing_the_key_stops_its_tokens_here(keys: Keys) -> None:
    """Where the guard shares the key store, revocation stops existing tokens at once,
    and a key's narrowed scopes narrow its tokens."""
    setup = Setup(keys)
    created = setup.manager.create("k", scopes=["read", "write"])
    tok = setup.token_for(created.record.id)
    assert status(setup.check(tok, "write")) == 200
    setup.manager.update(created.record.id, KeyChanges(scopes=("read",)))
    narrowed = setup.check(tok, "write")
    assert isinstance(narrowed, Denial)
    assert narrowed.code == "insufficient_permissions"
    assert status(setup.check(tok, "read")) == 200
    setup.manager.revoke(created.record.id)
    revoked = setup.check(tok, "read")
    assert isinstance(revoked, Denial)
    assert revoked.code == "invalid_token"
    setup.manager.delete(created.record.id)
    assert status(setup.check(tok, "read")) == 401


def test_token_lacking_scope_is_403_insufficient_scope(keys: Keys) -> None:
    """A valid token without the route's scope gets 403, naming the scope."""
    setup = Setup(keys)
    created = setup.manager.create("k", scopes=["read", "write"])
    decision = setup.check(setup.token_for(created.record.id, ("read",)), "write")
    assert isinstance(decision, Denial)
    assert (decision.status, decision.code, decision.scope) == (
        403,
        "insufficient_permissions",
        "write",
    )


def test_the_key_ip_allow_list_follows_its_tokens(keys: Keys) -> None:
    """A token of an IP-restricted key is refused from elsewhere."""
    setup = Setup(keys)
    created = setup.manager.create("k", ip_allow=["10.0.0.0/8"])
    decision = setup.check(setup.token_for(created.record.id))
    assert isinstance(decision, Denial)
    assert decision.code == "ip_not_allowed"


def test_forged_tokens_count_as_failed_attempts_expired_ones_do_not(keys: Keys) -> None:
    """Bad signatures feed the per-address brute-force limiter; genuine expired tokens
    (the secret was proven) do not, as for keys."""
    setup = Setup(keys, bound=False, auth_failures=3)
    expired = forge(header(), payload(exp=NOW - 100), keys.ec)
    assert {status(setup.check(expired)) for _ in range(5)} == {401}
    forged = forge(header(), payload(), keys.attacker)
    assert [status(setup.check(forged)) for _ in range(4)] == [401, 401, 401, 429]


def test_key_store_down_for_a_keyguard_token_is_503(keys: Keys) -> None:
    """Authentication fails closed: no record, no admission."""
    setup = Setup(keys)
    tok = setup.token_for(setup.manager.create("k").record.id)
    setup.store.failure = StorageError("down")
    decision = setup.check(tok)
    assert isinstance(decision, Denial)
    assert decision.code == "key_store_unavailable"


def test_long_tokens_pass_the_credential_length_check(keys: Keys) -> None:
    """With tokens, bearer values up to the validator's max_token_bytes are read."""
    setup = Setup(keys, bound=False)
    long_token = forge(header(), payload(extra="e" * 1500), keys.ec)
    assert len(long_token) > CredentialConfig().max_length
    assert status(setup.check(long_token)) == 200
    assert setup.guard.credentials.max_length == 8192


def test_inline_only_when_validation_never_fetches(keys: Keys, idp: StubServer) -> None:
    """Static keys keep the in-process fast path; a JWKS URL takes the async driver so
    its fetch never blocks the loop."""
    assert Setup(keys, bound=False).guard.inline
    remote = JWTValidator(keys=RemoteJWKS(idp.url + "/jwks"), issuer=ISS, audience=AUD)
    setup = Setup(keys, tokens=remote)
    assert not setup.guard.inline
    request = RequestInfo(
        "GET", "/", ((b"authorization", f"Bearer {token(keys)}".encode()),), peer=PEER
    )
    assert isinstance(asyncio.run(setup.guard.acheck(request)), Allow)


def test_token_configuration_errors(keys: Keys) -> None:
    """Tokens need the bearer method, a known token plan and a validator."""
    validator = Setup(keys, bound=False).guard.tokens
    store = MemoryKeyStore()
    with pytest.raises(ConfigurationError):
        Guard(keys=store, tokens=validator, credentials=CredentialConfig(methods=("header",)))
    with pytest.raises(ConfigurationError):
        Guard(keys=store, tokens=validator, token_plan="gold")
    with pytest.raises(ConfigurationError):
        Guard(keys=store, tokens="https://idp.example.com")  # type: ignore[arg-type]


def test_expired_key_tokens_die_with_the_key(keys: Keys) -> None:
    """A token issued shortly before its key expires stops when the key does."""
    setup = Setup(keys)
    created = setup.manager.create("k", expires=timedelta(minutes=2))
    tok = setup.token_for(created.record.id)
    assert status(setup.check(tok)) == 200
    setup.clock.advance(121)
    assert status(setup.check(tok)) == 401
