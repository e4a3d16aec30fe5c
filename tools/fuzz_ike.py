#!/usr/bin/env python3
"""Coverage-guided fuzzing of the IKEv2 codec and engine (atheris; `make fuzz`).

Usage: python tools/fuzz_ike.py [--target outer|inner|engine] [--corpus DIR]
                                [libFuzzer flags, e.g. -max_total_time=60 -runs=N]
The targets and what counts as a crash are tests/fixtures/fuzz_targets.py's: the outer
decoder, the decoder of the payload chain inside SK, and the engine's handling of
protected messages behind a harness that knows the keys. The seed corpus is generated
from a real session between two engines and written into DIR (default
build/fuzz/TARGET), where libFuzzer also keeps what it finds; nothing of it is tracked.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / ".collections"), str(ROOT)]

import atheris

# Only the code under test is instrumented for coverage (not cryptography, nor the
# harness); it must be imported here first, inside the block, to be instrumented.
with atheris.instrument_imports(include=["ansible_collections.keyway.ipsec"]):
    from ansible_collections.keyway.ipsec.plugins.module_utils.ike import codec  # noqa: F401
    from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine import (  # noqa: F401
        core,
    )

from tests.fixtures import fuzz_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=sorted(fuzz_targets.TARGETS), default="outer")
    parser.add_argument("--corpus", type=Path, help="default: build/fuzz/TARGET")
    args, libfuzzer = parser.parse_known_args()
    # Every dropped input is logged by design; a fuzz run would only be slowed by it.
    logging.disable(logging.CRITICAL)
    corpus = args.corpus or ROOT / "build" / "fuzz" / args.target
    count = fuzz_targets.write_corpus(args.target, corpus)
    print(f"fuzz_ike: target {args.target}, {count} seeds in {corpus}", flush=True)
    atheris.Setup([sys.argv[0], *libfuzzer, str(corpus)], fuzz_targets.TARGETS[args.target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
