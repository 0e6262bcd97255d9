"""``fxoffload farm up | status | down``: the command-line face of ``farm.deploy``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import FxOffloadError


def add_parser(sub: Any) -> None:
    farm = sub.add_parser("farm", help="start, inspect or stop a shared compile farm (Ray)")
    actions = farm.add_subparsers(dest="farm_command", required=True, metavar="ACTION")
    p = actions.add_parser("up", help="start a local Ray head (or join --address) and deploy "
                           "warm compile workers; prints the address for FXOFFLOAD_FARM")
    p.add_argument("--workers", type=int, default=2, help="compile workers (1 CPU each)")
    p.add_argument("--address", help="join this Ray cluster instead of starting a head")
    p.add_argument("--host", default="127.0.0.1",
                   help="the head's node address (default 127.0.0.1: this machine only)")
    p.add_argument("--store", metavar="DIR", help="persist the artifact store here")
    p.add_argument("--store-bytes", type=int, default=None,
                   help="the store's bound in bytes (default 4 GiB, least recently used "
                   "out first)")
    _state_dir(p)
    p = actions.add_parser("status", help="workers, queue, in flight, store, hits, joins, "
                           "compiles")
    p.add_argument("--address", help="the farm's address (default: the state dir's)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _state_dir(p)
    p = actions.add_parser("down", help="stop what `farm up` started: actors, and the Ray "
                           "head's processes if it started one")
    _state_dir(p)
    farm.set_defaults(func=run)


def _state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", metavar="DIR", default=None,
                   help="the farm's key, Ray token and state (default ~/.fxoffload/farm, or "
                   "the directory of FXOFFLOAD_FARM_KEY_FILE)")


def run(args: argparse.Namespace) -> int:
    from . import deploy
    from . import state_dir as default_state_dir

    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    try:
        if args.farm_command == "up":
            if args.workers < 1:
                print("fxoffload: error: --workers must be a positive integer")
                return 2
            kw: dict[str, Any] = {}
            if args.store_bytes is not None:
                kw["store_bytes"] = args.store_bytes
            state = deploy.up(state_dir=state_dir, workers=args.workers,
                              address=args.address, host=args.host,
                              store_dir=Path(args.store) if args.store else None, **kw)
            print(f"farm up: {state['workers']} warm workers (start-up "
                  f"{state['worker_startup_s']} s), key id {state['key_id']}")
            print(f"  export FXOFFLOAD_FARM={state['address']}")
            print(f"  export FXOFFLOAD_FARM_KEY_FILE={state_dir / 'key'}")
            return 0
        if args.farm_command == "status":
            info = deploy.status(state_dir=state_dir, address=args.address)
            if args.json:
                print(json.dumps(info, indent=1))
            else:
                _print_status(info)
            return 0
        result = deploy.down(state_dir=state_dir)
        print(f"farm down: {result['actors']} actors and {result['processes']} processes "
              "stopped")
        return 0
    except FxOffloadError as e:
        print(f"fxoffload: error: {e}")
        return 2 if type(e).__name__ == "ConfigError" else 1


def _print_status(info: dict[str, Any]) -> None:
    workers = info["workers"]
    busy = sum(1 for w in workers if w["busy"])
    print(f"farm {info['address']} (key id {info['key_id']})")
    print(f"  workers      {len(workers)} ({busy} busy), queued {info['queued']}, in flight "
          f"{info['in_flight']}")
    print(f"  store        {info['store_entries']} entries, {info['store_bytes']} bytes")
    print(f"  requests     {info['requests']}: {info['compiles']} compiled, {info['hits']} "
          f"store hits, {info['joins']} single-flight joins, {info['failed']} failed, "
          f"{info['refused']} refused")
