from typing import Annotated

from fastapi import Depends, FastAPI

from keyguard import Identity, build_guard, load_settings
from keyguard.adapters.fastapi import FastAPIKeyGuardMiddleware, require

app = FastAPI()
app.add_middleware(FastAPIKeyGuardMiddleware, guard=build_guard(load_settings()))


@app.post("/v1/chat/completions")
async def chat(caller: Annotated[Identity, Depends(require("chat:completions"))]) -> dict[str, str]:
    return {"key_id": caller.key_id}
