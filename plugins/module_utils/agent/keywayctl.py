"""keywayctl: talk to keywayd over its control socket (agent/control.py).

keywayctl [--socket PATH] [--json] status | list-conns | list-sas [--json] | list-policies |
    stats | metrics
keywayctl initiate CONN [--no-wait] | terminate CONN [--child NAME]
keywayctl rekey CONN [--child NAME] | reload | watch
"""

from __future__ import annotations

import argparse
import json
import sys

from .control import DEFAULT_SOCKET, ControlError, request, watch


def _table(sas: list[dict]) -> str:
    lines = []
    for sa in sas:
        lines.append(
            f"{sa['connection']}: {sa['state']}, {sa['local']} <-> {sa['remote']}"
            f" ({sa['remote_id']}), {sa['proposal']}, spis {sa['spi_i']}_i {sa['spi_r']}_r"
            + (", initiator" if sa["initiator"] else "")
        )
        for child in sa["children"]:
            counters = ""
            if "bytes_in" in child:
                counters = (
                    f", {child['bytes_in']} bytes_i ({child['packets_in']} pkts),"
                    f" {child['bytes_out']} bytes_o ({child['packets_out']} pkts)"
                )
            lines.append(
                f"  {child['name']}: {child['mode']} {child['protocol'].upper()}"
                f"{' in UDP' if child['encap'] else ''}, spis {child['spi_in']}_i"
                f" {child['spi_out']}_o, {child['proposal']}{counters}"
            )
            lines.append(f"    {' '.join(child['local_ts'])} === {' '.join(child['remote_ts'])}")
    return "\n".join(lines) if lines else "no IKE SAs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keywayctl", description="control keywayd")
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="keywayd's control socket")
    parser.add_argument("--json", action="store_true", help="print the raw JSON result")
    # --json also after the command (keywayctl list-sas --json), as the README writes it
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = ("status", "list-conns", "list-sas", "list-policies", "reload", "stats")
    for name in (*commands, "metrics", "watch"):
        sub.add_parser(name, parents=[after])
    initiate = sub.add_parser("initiate", parents=[after])
    initiate.add_argument("connection")
    initiate.add_argument("--no-wait", action="store_true")
    initiate.add_argument("--timeout", type=float, default=30)
    for name in ("terminate", "rekey"):
        cmd = sub.add_parser(name, parents=[after])
        cmd.add_argument("connection")
        cmd.add_argument("--child")
    args = parser.parse_args(argv)
    try:
        if args.command == "watch":
            for event in watch(args.socket):
                print(json.dumps(event), flush=True)
            return 0
        extra = {}
        if args.command == "initiate":
            extra = {"connection": args.connection, "wait": not args.no_wait}
            extra["timeout"] = args.timeout
        elif args.command in ("terminate", "rekey"):
            extra = {"connection": args.connection}
            if args.child:
                extra["child"] = args.child
        result = request(
            args.socket, args.command, timeout=max(30, extra.get("timeout", 0) + 5), args=extra
        )
    except ControlError as exc:
        print(f"keywayctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.command == "metrics" and not args.json:
        sys.stdout.write(result)
    elif args.command == "list-sas" and not args.json:
        print(_table(result))
    else:
        print(json.dumps(result, indent=2))
    if args.command == "initiate" and isinstance(result, dict) and result.get("up") is False:
        print(f"keywayctl: {args.connection}: {result.get('error')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
