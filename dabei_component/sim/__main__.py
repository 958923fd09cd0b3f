"""`python -m dabei_component.sim serve [--host] [--port] [--state-dir] [--ssh-port]`.

Prints one JSON line when ready (`endpoint`, `token`, `control`, `ssh_port`), serves until SIGTERM or
SIGINT, then stops every machine and removes what it created.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from .simulator import Simulator


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0..65535)")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dabei_component.sim")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the simulator until SIGTERM/SIGINT")
    serve.add_argument("--host", default="127.0.0.1", help="address of the API (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=0, help="API port; 0 picks a free one (default)")
    serve.add_argument("--state-dir", type=Path, help="where disks and machine state live (default: temp)")
    serve.add_argument("--ssh-port", type=_port, default=22, help="SSH port of every server (default 22)")
    serve.add_argument("--log-level", default="WARNING", help="logging level on stderr (default WARNING)")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sim = Simulator(state_dir=args.state_dir, host=args.host, port=args.port, ssh_port=args.ssh_port)
    await sim.start()
    try:
        ready = {"endpoint": sim.endpoint, "token": sim.token, "control": sim.control_url, "ssh_port": args.ssh_port}
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await sim.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
