"""First run: on an empty key store, make an admin key and a demo key and print them
once, with a ready-to-paste ``curl`` line. Never again: the next start finds keys.

The keys go to standard error (the console of whoever started the server), never
to a log file or a response.
"""

from __future__ import annotations

import sys
from typing import TextIO

from keyguard import AsyncKeyManager

from .catalogue import ADMIN_SCOPE, SELF_SCOPE, SERVICE_SCOPES

__all__ = ["first_run"]

DEMO_SCOPES = (*SERVICE_SCOPES, SELF_SCOPE)
ADMIN_SCOPES = (ADMIN_SCOPE, SELF_SCOPE)


async def first_run(
    manager: AsyncKeyManager, where: str, *, default_plan: str = "free", out: TextIO | None = None
) -> bool:
    """Create and print the two keys when the store is empty; ``True`` if it did."""
    if (await manager.list(limit=1)).items:
        return False
    demo = await manager.create(
        "demo", owner="demo", scopes=DEMO_SCOPES, plan=default_plan, actor="first-run"
    )
    admin = await manager.create(
        "admin", owner="operator", scopes=ADMIN_SCOPES, plan="enterprise", actor="first-run"
    )
    demo_key, admin_key = demo.key.reveal(), admin.key.reveal()
    print(  # shown once, on purpose, to the operator at the console
        "keyguard: first run: created two keys (shown once; they will not be printed again)\n"
        f"  demo key  (every service scope, free plan): {demo_key}\n"
        f"  admin key (scope {ADMIN_SCOPE}; manages every key): {admin_key}\n"
        "try:\n"
        f"  curl -s -X POST {where}/v1/generate -H 'X-API-Key: {demo_key}' "
        "-H 'Content-Type: application/json' -d '{\"prompt\": \"hello keyguard\"}'\n"
        f"  curl -s {where}/v1/keys -H 'Authorization: Bearer {admin_key}'\n"
        f"  API docs: {where}/docs",
        file=out or sys.stderr,
        flush=True,
    )
    return True
