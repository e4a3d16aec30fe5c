"""Command line of the lab: `python -m ...module_utils.lab up|down|status`."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .netns import existing_namespaces, lab_down, lab_plan_of, lab_up
from .plan import DEFAULT_LAB, DEFAULT_ROOT, LabError, plan_lab


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keyway-lab", description=__doc__)
    parser.add_argument("--name", default=os.environ.get("KEYWAY_LAB_NAME", DEFAULT_LAB))
    parser.add_argument("--root", default=os.environ.get("KEYWAY_LAB_ROOT", DEFAULT_ROOT))
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create or resize the lab")
    up.add_argument("--hosts", default=os.environ.get("KEYWAY_LAB_HOSTS", "4"))
    sub.add_parser("down", help="remove the lab and everything it made")
    sub.add_parser("status", help="show the lab's hosts")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        if args.command == "up":
            try:
                hosts = int(args.hosts)
            except ValueError:
                raise LabError(f"lab size must be an integer, got {args.hosts!r}") from None
            plan = plan_lab(hosts, args.name, args.root)
            result = lab_up(plan)
            verb = "built" if result["changed"] else "already up"
            print(
                f"lab {plan.name}: {verb}, {len(plan.hosts)} hosts "
                f"({time.monotonic() - started:.1f}s)"
            )
            _print_hosts(plan)
        elif args.command == "down":
            result = lab_down(args.name, args.root)
            if result["changed"]:
                print(
                    f"lab {args.name}: removed {len(result['removed'])} namespaces "
                    f"({time.monotonic() - started:.1f}s)"
                )
            else:
                print(f"lab {args.name}: not up, nothing to remove")
        else:
            plan = lab_plan_of(args.name, args.root)
            if plan is None:
                print(f"lab {args.name}: not up")
                return 1
            missing = set(plan.namespaces()) - existing_namespaces()
            health = f"DEGRADED, missing {', '.join(sorted(missing))}" if missing else "up"
            print(f"lab {plan.name}: {health}")
            _print_hosts(plan)
    except LabError as exc:
        print(f"lab: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _print_hosts(plan) -> None:
    print(f"  {'host':<5} {'namespace':<14} {'ipv4':<12} {'ipv6':<15} site")
    for h in plan.hosts:
        print(f"  {h.name:<5} {h.netns:<14} {h.ipv4:<12} {h.ipv6:<15} {h.site4} {h.site6}")


if __name__ == "__main__":
    sys.exit(main())
