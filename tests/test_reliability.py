"""The reliability harness of bench/reliability, short: a few hundred malformed inputs
and three SIGKILLs, with the zeros that are due asserted."""

from __future__ import annotations

import pytest

from tests.support.reliability import Phase, kill_trials, malformed_inputs


@pytest.mark.slow
def test_a_few_hundred_malformed_inputs_leave_the_node_whole(tmp_path):
    report = malformed_inputs(tmp_path, 300, seed=12)
    zeros = report.zeros_due()
    assert zeros == dict.fromkeys(zeros, 0), "\n".join(report.lines())
    assert report.inputs >= 300
    # Both outcomes happened: inputs that are fine to keep were kept, the others refused.
    assert report.statuses["0x0000"] and report.statuses["0xA900"] and report.statuses["0x0111"]


@pytest.mark.slow
def test_three_sigkills_lose_nothing_and_leave_nothing_stuck(tmp_path):
    report = kill_trials(tmp_path, 3, seed=12)
    zeros = report.zeros_due()
    assert zeros == dict.fromkeys(zeros, 0), "\n".join(report.lines())
    assert report.trials == 3 and sum(report.kills_by_phase[p] for p in Phase) == 3
    assert report.synthetic_series_found == 3


@pytest.mark.slow
def test_three_sigkills_on_postgresql_lose_nothing_and_leave_nothing_stuck(tmp_path, postgres_url):
    report = kill_trials(tmp_path, 3, seed=13, database=postgres_url)
    zeros = report.zeros_due()
    assert zeros == dict.fromkeys(zeros, 0), "\n".join(report.lines())
    assert report.trials == 3 and report.synthetic_series_found == 3
