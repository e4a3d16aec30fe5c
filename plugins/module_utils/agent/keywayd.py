"""keywayd's command line: `keywayd --config PATH [--log-level LEVEL]`, in the foreground.

There is no daemonizing: systemd (roles/keywayd's unit, Type=exec) or the lab's netns
runner keeps the process; logs go to stderr (journald under systemd). Exit codes: 0 after
a clean SIGTERM, 2 for a config that does not validate, 1 for any other start failure.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from .daemon import Agent, AgentError


class _NoSecretsFilter(logging.Filter):
    """Last line of defence: a record carrying bytes arguments (possible key material)
    is rendered with their lengths only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                f"<{len(a)} bytes>" if isinstance(a, bytes | bytearray) else a for a in record.args
            )
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keywayd", description="Keyway's IKEv2 keying agent")
    parser.add_argument("--config", required=True, help="YAML config (see agent/config.py)")
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="overrides the config's log_level",
    )
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_NoSecretsFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    agent = Agent(args.config)

    async def run() -> None:
        if args.log_level:
            logging.getLogger("keyway").setLevel(args.log_level.upper())
        await agent.run()

    try:
        asyncio.run(run())
    except AgentError as exc:
        print(f"keywayd: {exc}", file=sys.stderr)
        return 2 if "problem(s)" in str(exc) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
