"""Scope matching and route rules (SECURITY.md C5, T48-T50, T90)."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyguard.errors import ConfigurationError
from keyguard.scopes import RouteMap, RouteMatch, RouteRule, normalise_path, scope_allows

ROUTES = RouteMap(
    [
        RouteRule("POST", "/v1/images", "image:create"),
        RouteRule("GET", "/v1/images/{id}", "image:read"),
        RouteRule("GET", "/v1/images/latest", "image:list"),
        RouteRule("*", "/v1/chat/*", "chat:completions"),
        RouteRule("POST", "/v1/chat/admin/*", "chat:admin"),
        RouteRule("*", "/admin", "admin"),
        RouteRule("*", "/orders", "orders:read"),
        RouteRule("POST", "/orders", "orders:write"),
    ],
    public=["/health", "/docs/*"],
    default_scope=None,
)


def needed(method: str, path: str, routes: RouteMap = ROUTES) -> str | None:
    found = routes.match(method, path)
    assert found is not None
    return "public" if found.public else found.scope


def test_t48_least_privilege() -> None:
    """orders:read does not grant what POST /orders needs."""
    assert needed("POST", "/orders") == "orders:write"
    assert not scope_allows(["orders:read"], "orders:write")
    assert scope_allows(["orders:read"], needed("GET", "/orders") or "")


@pytest.mark.parametrize(
    ("granted", "scope", "allowed"),
    [
        ("orders:*", "orders:write", True),
        ("orders:*", "orders:edit:hd", True),
        ("orders:*", "ordersx:write", False),
        ("orders:*", "orders", False),
        ("orders:*", "orders:", False),
        ("ORDERS:WRITE", "orders:write", False),
        ("orders:write ", "orders:write", False),
        (" orders:write", "orders:write", False),
        ("orders\uff1awrite", "orders:write", False),
        ("orders\ua789*", "orders:write", False),
        ("orders:* ", "orders:write", False),
        ("orders*", "orders:write", False),
        ("or*", "orders:write", False),
        ("orders:*:hd", "orders:edit:hd", False),
        ("*", "orders:write", True),
        ("orders:write", "orders:write", True),
        ("orders:write", "orders:writ", False),
        ("", "orders:write", False),
    ],
)
def test_t49_permission_string_tricks(granted: str, scope: str, allowed: bool) -> None:
    """Only exact matches and the two documented wildcard forms grant a scope."""
    assert scope_allows([granted], scope) is allowed


def test_needed_scopes_with_wildcards_are_never_satisfied() -> None:
    """A needed scope containing '*' (or an empty one) is refused even against '*'."""
    assert not scope_allows(["*"], "image:*")
    assert not scope_allows(["image:*"], "image:*")
    assert not scope_allows(["*"], "")
    assert scope_allows(iter(["a", "image:*"]), "image:create")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/admin", "/admin"),
        ("/admin/", "/admin"),
        ("/", "/"),
        ("/ADMIN", "/ADMIN"),
        ("/admin;x", "/admin;x"),
        ("/admin%2F..", "/admin%2F.."),
        ("/a/.b/..c/...", "/a/.b/..c/..."),
        ("//admin", None),
        ("/admin//", None),
        ("/./admin", None),
        ("/x/../admin", None),
        ("/admin/..", None),
        ("/admin/.", None),
        ("/..", None),
        ("admin", None),
        ("", None),
        ("*", None),
    ],
)
def test_t50_normalise_path(path: str, expected: str | None) -> None:
    """Only a trailing slash is removed; forms routers read differently are refused."""
    assert normalise_path(path) == expected


def test_t50_route_normalisation() -> None:
    """Each T50 input needs the admin scope, is refused, or is a different route."""
    assert needed("GET", "/admin/") == "admin"
    assert ROUTES.match("GET", "//admin") is None
    assert ROUTES.match("GET", "/./admin") is None
    assert ROUTES.match("GET", "/admin/..") is None  # what the ASGI path holds for /admin%2F..
    assert needed("GET", "/admin%2F..") is None  # a literal segment, never decoded again
    assert needed("GET", "/ADMIN") is None  # the default: case-sensitive routers 404 it
    assert needed("GET", "/admin;x") is None  # Starlette does not route it to /admin


def test_default_scope_applies_to_unmatched_paths() -> None:
    """An unmatched path needs default_scope, with no pattern reported."""
    routes = RouteMap([RouteRule("GET", "/a", "a:read")], default_scope="api:use")
    assert routes.match("GET", "/elsewhere") == RouteMatch(False, "api:use", None)
    assert routes.match("DELETE", "/a") == RouteMatch(False, "api:use", None)


def test_most_specific_rule_wins() -> None:
    """Literal segments beat parameters, which beat wildcards; exact methods beat '*'."""
    assert needed("GET", "/v1/images/latest") == "image:list"
    assert needed("GET", "/v1/images/42") == "image:read"
    assert needed("POST", "/v1/images") == "image:create"
    assert needed("GET", "/v1/chat") == "chat:completions"
    assert needed("GET", "/v1/chat/x/y") == "chat:completions"
    assert needed("POST", "/v1/chat/admin/x") == "chat:admin"
    assert needed("GET", "/v1/chat/admin/x") == "chat:completions"
    assert needed("POST", "/orders") == "orders:write"
    assert needed("DELETE", "/orders") == "orders:read"
    assert needed("GET", "/v1/imagesx") is None


def test_head_is_checked_like_get() -> None:
    """HEAD runs the GET handler in Starlette and Flask, so it needs the GET scope."""
    assert needed("HEAD", "/v1/images/42") == "image:read"
    routes = RouteMap([RouteRule("GET", "/a", "a:read"), RouteRule("HEAD", "/a", "a:head")])
    assert needed("HEAD", "/a", routes) == "a:head"
    assert needed("GET", "/a", routes) == "a:read"


def test_public_paths() -> None:
    """Public patterns need no credential, for any method."""
    assert ROUTES.match("GET", "/health") == RouteMatch(True, None, "/health")
    assert needed("POST", "/docs") == "public"
    assert needed("GET", "/docs/openapi.json") == "public"
    assert needed("GET", "/healthz") is None


def test_trailing_slash_matches_the_same_rule() -> None:
    """/x/ and /x need the same scope when every reading agrees."""
    assert needed("GET", "/v1/images/42/") == "image:read"
    assert needed("GET", "/v1/chat/") == "chat:completions"
    assert needed("GET", "/health/") == "public"


def test_trailing_slash_ambiguity_is_refused() -> None:
    """/x/ is refused when /x and /x/* need different things (Starlette mounts vs Flask)."""
    routes = RouteMap([RouteRule("*", "/x/*", "x:all")], public=["/x"])
    assert needed("GET", "/x", routes) == "public"
    assert routes.match("GET", "/x/") is None
    assert needed("GET", "/x/y", routes) == "x:all"
    same = RouteMap([RouteRule("*", "/x/*", "x:all"), RouteRule("GET", "/x", "x:all")])
    assert needed("GET", "/x/", same) == "x:all"


def test_root_patterns() -> None:
    """'/' matches only the root and '/*' matches everything, least specifically."""
    routes = RouteMap([RouteRule("*", "/*", "any:thing"), RouteRule("GET", "/", "root")])
    assert needed("GET", "/", routes) == "root"
    assert needed("GET", "/a/b", routes) == "any:thing"
    assert needed("POST", "/", routes) == "any:thing"


@pytest.mark.parametrize(
    ("method", "pattern", "scope", "named"),
    [
        ("get", "/a", "a:read", "'get'"),
        ("G T", "/a", "a:read", "'G T'"),
        ("GET", "a", "a:read", "'a'"),
        ("GET", "/a//b", "a:read", "'/a//b'"),
        ("GET", "/a/*/b", "a:read", "'\\*'"),
        ("GET", "/a/{id:int}", "a:read", "'{id:int}'"),
        ("GET", "/a/x{id}", "a:read", "'x{id}'"),
        ("GET", "/a/../b", "a:read", "'..'"),
        ("GET", "/a b", "a:read", "'/a b'"),
        ("GET", "/a", "A:Read", "'A:Read'"),
        ("GET", "/a", "a:*", "'a:\\*'"),
        ("GET", "/a", "*", "'\\*'"),
        ("GET", "/a", "", "''"),
    ],
)
def test_invalid_rules_are_refused(method: str, pattern: str, scope: str, named: str) -> None:
    """Invalid methods, patterns and scopes raise ConfigurationError naming the value."""
    with pytest.raises(ConfigurationError, match=named):
        RouteRule(method, pattern, scope)


def test_invalid_map_settings_are_refused() -> None:
    """Duplicated shapes, a bad default scope and a bare public string are refused."""
    with pytest.raises(ConfigurationError, match="overlap"):
        RouteMap([RouteRule("GET", "/a/{id}", "a:x"), RouteRule("GET", "/a/{name}", "a:y")])
    with pytest.raises(ConfigurationError, match="overlap"):
        RouteMap([RouteRule("*", "/health", "a:x")], public=["/health/"])
    with pytest.raises(ConfigurationError, match="default_scope"):
        RouteMap(default_scope="image:*")
    with pytest.raises(ConfigurationError, match="not one string"):
        RouteMap(public="/health")
    with pytest.raises(ConfigurationError, match="'/a b'"):
        RouteMap(public=["/a b"])
    assert "2 rules" in repr(RouteMap([RouteRule("GET", "/a", "a"), RouteRule("GET", "/b", "b")]))


ADVERSARIAL = 100 * 1024


@pytest.mark.parametrize(
    "path",
    [
        "/a" * (ADVERSARIAL // 2),
        "/v1/images/" + "x" * ADVERSARIAL,
        "/v1/images/" + "x/" * (ADVERSARIAL // 2) + "y",
        "/v1/chat/" + "/" * ADVERSARIAL,
        "/v1/chat" + "/." * (ADVERSARIAL // 2),
        "/v1/images" * (ADVERSARIAL // 10),
        "/" + "{" * ADVERSARIAL,
    ],
)
def test_t90_no_super_linear_parsing(path: str) -> None:
    """100 KiB adversarial paths and scope strings are matched in under 10 ms."""
    many = RouteMap(
        [RouteRule("GET", f"/v1/{'{p}/' * i}images/{{id}}", f"s:r{i}") for i in range(40)]
        + [RouteRule("GET", "/v1/images/{id}/*", "image:tree")]
    )
    long_scope = "a:" * (ADVERSARIAL // 2)
    for call in (
        lambda: ROUTES.match("GET", path),
        lambda: many.match("GET", path),
        lambda: scope_allows([long_scope, "a:*", "*" * ADVERSARIAL], long_scope + "b"),
    ):
        timings = []
        for _ in range(3):
            start = time.perf_counter()
            call()
            timings.append(time.perf_counter() - start)
        assert min(timings) < 0.01


SEGMENTS = st.sampled_from(["v1", "images", "chat", "admin", "42", "latest", "", ".", "..", "x;y"])
METHODS = st.sampled_from(["GET", "HEAD", "POST", "DELETE", "get"])


def reference(method: str, path: str) -> str | None:
    """A brute-force reading of ROUTES: every rule tried, the most specific kept."""
    rules = [(r.method, r.pattern, r.scope) for r in ROUTES.rules]
    rules += [("*", p, "public") for p in ROUTES.public]
    segments = [] if path == "/" else path[1:].split("/")
    best: tuple[tuple[int, ...], int, str] | None = None
    for rule_method, pattern, scope in rules:
        parts = [] if pattern == "/" else pattern[1:].split("/")
        wildcard = parts[-1:] == ["*"]
        parts = parts[:-1] if wildcard else parts
        if len(segments) < len(parts) or (not wildcard and len(segments) != len(parts)):
            continue
        if any(p != s and not p.startswith("{") for p, s in zip(parts, segments, strict=False)):
            continue
        if rule_method not in ("*", method) and not (rule_method == "GET" and method == "HEAD"):
            continue
        key = (*(2 if p.startswith("{") else 3 for p in parts), 0 if wildcard else 1)
        rank = 2 if rule_method == method else (1 if rule_method != "*" else 0)
        if best is None or (key, rank) > best[:2]:
            best = (key, rank, scope)
    return None if best is None else best[2]


@given(method=METHODS, segments=st.lists(SEGMENTS, max_size=5), slash=st.booleans())
def test_matching_agrees_with_a_brute_force_reading(
    method: str, segments: list[str], slash: bool
) -> None:
    """The compiled alternation picks the rule a brute-force search picks, or refuses."""
    path = "/" + "/".join(segments) + ("/" if slash and segments else "")
    found = ROUTES.match(method, path)
    norm = normalise_path(path)
    if norm is None:
        assert found is None
        return
    if found is None:
        assert norm != path  # only an ambiguous trailing slash is refused
        return
    assert ("public" if found.public else found.scope) == reference(method, norm)


def test_t50_agrees_with_starlette_routing() -> None:
    """Whenever Starlette fully matches a route for a path, keyguard checks that route's scope."""
    routing = pytest.importorskip("starlette.routing")

    async def endpoint(scope: object, receive: object, send: object) -> None:  # pragma: no cover
        return None

    table = {
        "/v1/images/latest": "image:list",
        "/v1/images/{id}": "image:read",
        "/admin": "admin",
        "/v1/chat/{rest:path}": "chat:completions",
        "/v1/chat": "chat:completions",
    }
    routes = {path: routing.Route(path, endpoint, methods=["GET"]) for path in table}
    paths = ["/admin", "/admin;x", "/ADMIN", "/v1/images/1;x", "/v1/images/latest", "/v1/chat/a//b"]
    paths += ["/v1/images/%2F..", "/v1/chat/../admin", "/admin/x", "/v1/chat/a/b", "/v1/chat"]
    for path in paths:
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}
        matched = [p for p, r in routes.items() if r.matches(scope)[0] == routing.Match.FULL]
        ours = ROUTES.match("GET", path)
        if ours is None:
            continue  # refused: the router never sees it
        if matched:
            assert ours.scope in {table[p] for p in matched}, path
        else:
            assert ours.pattern is None or ours.public, path


@pytest.mark.parametrize("method", ["get", "Get", "GET"])
def test_methods_match_whatever_their_case(method: str) -> None:
    """A lower-case method meets the same rule a router serving it upper-cased would."""
    routes = RouteMap([RouteRule("GET", "/admin", "admin:read")])
    match = routes.match(method, "/admin")
    assert match is not None
    assert match.scope == "admin:read"


def test_route_matches_are_remembered_within_bounds() -> None:
    """A pair seen before gets the same answer from memory; the memory stays bounded
    however many paths arrive, and long paths are never kept."""
    routes = RouteMap([RouteRule("GET", "/v1/items/{id}", "items:read")], public=["/healthz"])
    first = routes.match("GET", "/v1/items/1")
    assert first is not None
    assert first.scope == "items:read"
    assert routes.match("GET", "/v1/items/1") is first
    assert routes.match("GET", "//v1/items/1") is None  # refusals are remembered too
    assert routes.match("GET", "//v1/items/1") is None
    for n in range(5000):
        assert routes.match("GET", f"/v1/items/{n}") == first
    assert len(routes._seen) <= 4096
    long_path = "/v1/items/" + "x" * 300
    assert routes.match("GET", long_path) == first
    assert ("GET", long_path) not in routes._seen
