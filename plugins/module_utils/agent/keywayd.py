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
import time
from collections.abc import Callable

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


class RateLimit(logging.Filter):
    """For the `keyway.untrusted` logger (what any sender can provoke with a datagram):
    each message template passes at most `burst` times per `window` seconds, and the
    first one after a suppression says how many were dropped. A flood then costs a few
    lines a minute and stays visible; the set of templates is fixed by the code, so this
    state is bounded whatever arrives."""

    def __init__(
        self, burst: int = 10, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ):
        super().__init__()
        self.burst, self.window, self.clock = burst, window, clock
        self._windows: dict[str, list] = {}  # template -> [start, passed, suppressed]

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        template = str(record.msg)
        state = self._windows.get(template)
        if state is None or now - state[0] >= self.window:
            suppressed = state[2] if state else 0
            state = self._windows[template] = [now, 0, 0]
            if suppressed:
                record.msg = f"{template} [{suppressed} similar messages suppressed]"
        if state[1] >= self.burst:
            state[2] += 1
            return False
        state[1] += 1
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
    logging.getLogger("keyway.untrusted").addFilter(RateLimit())
    agent = Agent(args.config, log_level=args.log_level)
    try:
        asyncio.run(agent.run())
    except AgentError as exc:
        print(f"keywayd: {exc}", file=sys.stderr)
        return 2 if "problem(s)" in str(exc) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
