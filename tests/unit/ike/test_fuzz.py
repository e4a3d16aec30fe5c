"""The fuzz targets (tests/fixtures/fuzz_targets.py): their seeds replay cleanly, the
engine harness really reaches the engine, and a short coverage-guided run of each
(atheris, as `make fuzz` runs them for longer) finds nothing."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils.ike import codec
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.constants import (
    ExchangeType,
)
from tests.fixtures import fuzz_targets

ROOT = Path(__file__).resolve().parents[3]
# Executions per target in `make test`: a few seconds each on a loaded 2-core runner.
# libFuzzer's seed and Python's hash seed are fixed and every input runs the same way
# (fuzz_targets.deterministic), but the exploration still drifts a little from run to
# run (cov within about 1%): a crash it finds is real, not noise.
RUNS = {"outer": 50_000, "inner": 50_000, "engine": 15_000}


@pytest.mark.parametrize("target", sorted(fuzz_targets.TARGETS))
def test_the_seed_corpus_replays_through_each_target(target):
    corpus = fuzz_targets.seeds(target)
    assert len(corpus) > 40  # every exchange of two sessions
    for seed in corpus:
        fuzz_targets.TARGETS[target](seed)


def test_the_session_has_every_exchange_both_ways():
    seen = {
        (c.header.exchange, c.header.is_response, c.src) for c in fuzz_targets.captures()
    }  # fmt: skip
    for exchange in (ExchangeType.CREATE_CHILD_SA, ExchangeType.INFORMATIONAL):
        for response in (False, True):
            for src in (fuzz_targets.A, fuzz_targets.B):
                assert (exchange, response, src) in seen
    for exchange in (ExchangeType.IKE_SA_INIT, ExchangeType.IKE_AUTH):
        assert {(exchange, False, fuzz_targets.A), (exchange, True, fuzz_targets.B)} <= seen


def test_every_request_seed_is_answered_under_the_keys_the_harness_knows():
    """Otherwise the engine target would only ever test the integrity check."""
    for capture in fuzz_targets.captures():
        if capture.header.is_response:
            continue
        engine = capture.receiver.clone()
        engine.receive(fuzz_targets.replayed(capture), capture.src, capture.now)
        (answer,) = engine.pop_datagrams()
        msg = codec.decode_message(answer.data)
        assert msg.header.is_response and msg.header.message_id == capture.header.message_id
        if capture.protected:
            codec.open_encrypted(answer.data, msg, capture.open)


_DONE = re.compile(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\S+)")


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris (the fuzz extra of pyproject.toml) is not installed",
)
@pytest.mark.parametrize("target", sorted(fuzz_targets.TARGETS))
def test_a_short_fuzz_finds_nothing(target, tmp_path, capsys, record_property):
    command = [
        sys.executable,
        str(ROOT / "tools" / "fuzz_ike.py"),
        f"--target={target}",
        f"--corpus={tmp_path / 'corpus'}",
        f"-runs={RUNS[target]}",
        "-seed=1",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={tmp_path}/",
    ]
    started = time.monotonic()
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, env=env)
    took = time.monotonic() - started
    log = run.stdout + run.stderr
    assert run.returncode == 0, f"fuzz target {target} crashed:\n{log[-6000:]}"
    done = _DONE.search(log)
    assert done, log[-3000:]
    runs, cov, ft, corp = done.groups()
    rate = int(runs) / took
    figures = (
        f"fuzz {target}: {runs} executions in {took:.1f} s ({rate:.0f}/s with start-up), "
        f"cov {cov} ft {ft} corp {corp}"
    )
    for name, value in (("runs", runs), ("cov", cov), ("ft", ft), ("seconds", f"{took:.1f}")):
        record_property(f"fuzz_{target}_{name}", value)
    with capsys.disabled():
        print(f"\n{figures}")
