"""The randomized hostile-input suite (bench/hostile.py) in a short run with a fixed seed,
against the real ``edgelink serve``: peak RSS under 80 MiB, no refusal of the well-behaved
client caused by anonymous clients, every event answered 201 stored. A longer run with any
seed: ``python -m bench.hostile --seed N --minutes M``."""

from __future__ import annotations

import importlib.util

import pytest

from bench import hostile

SEED = 20  # printed with every problem, so a failure can be repeated with bench.hostile


@pytest.mark.skipif(importlib.util.find_spec("edgelink.jsonbounds") is None,
                    reason="the bodies it draws need the decoded-cost bound of issue 20 part B (edgelink.jsonbounds)")
def test_short_hostile_run_with_a_fixed_seed():
    lines: list[str] = []
    problems = hostile.run(SEED, seconds=100, say=lines.append)
    assert problems == [], "\n".join(lines)
