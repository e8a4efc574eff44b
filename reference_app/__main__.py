"""``python -m reference_app [--host H] [--port P] [--loop L]``: what ``make run`` starts.

The server runs on asyncio's own event loop unless told otherwise. Under load
(``benchmarks.server_load``, wrk with 32 connections) uvloop served about as many
requests a second here but with a long tail: p99 2.9-6.3x the bare route's and
single requests past 300 ms, against 1.5-2.1x and ~40 ms at most on asyncio's loop.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
from collections.abc import Sequence

import uvicorn
from pydantic import ValidationError

from keyguard import ConfigurationError
from keyguard.settings import describe_settings_error

from .app import create_app


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until interrupted; exit 2 with one line on bad settings."""
    parser = argparse.ArgumentParser(prog="python -m reference_app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop", "auto"),
        default="asyncio",
        help="the event loop (uvloop: more requests/s on light routes, a longer tail)",
    )
    args = parser.parse_args(argv)
    if args.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        print("reference_app: --loop uvloop needs uvloop: pip install uvloop", file=sys.stderr)
        return 2
    try:
        app = create_app(host=args.host, port=args.port)
    except ValidationError as exc:
        print(f"reference_app: {describe_settings_error(exc)}", file=sys.stderr)
        return 2
    except ConfigurationError as exc:
        print(f"reference_app: {exc}", file=sys.stderr)
        return 2
    # Everything built so far lives as long as the server: out of the collector's
    # sight, a full collection scans only what requests create. Under load a full
    # collection of the whole heap took up to 70 ms, and set the p99 latency.
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=args.host, port=args.port, loop=args.loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
