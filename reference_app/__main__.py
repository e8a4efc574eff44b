"""``python -m reference_app [--host H] [--port P]``: what ``make run`` starts."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import uvicorn

from .app import create_app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reference_app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(port=args.port), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
