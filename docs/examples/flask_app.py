from flask import Flask, g

from keyguard import build_guard, load_settings
from keyguard.adapters.flask import KeyGuardFlask

app = Flask(__name__)
kg = KeyGuardFlask(app, guard=build_guard(load_settings()))  # default store: ./keyguard.db


@app.post("/v1/chat/completions")
@kg.require("chat:completions")
def chat() -> dict[str, str]:
    return {"key_id": g.keyguard.key_id}
