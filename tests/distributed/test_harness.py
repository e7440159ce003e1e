"""The multi-process harness reports each rank's outcome, and stops after a failure."""

from pathlib import Path

from tests.distributed.harness import _launch

CASES = str(Path(__file__).parent / "fixtures" / "harness_cases.py")


def test_harness_reports_per_rank_failures():
    results = _launch(CASES, 2, ["case_a_passes", "case_b_fails_on_rank_1", "case_c_after_failure"])
    assert all(r["status"] == "passed" for r in results["case_a_passes"]["ranks"].values())
    failing = results["case_b_fails_on_rank_1"]["ranks"]
    assert failing[0]["status"] == "passed"
    assert failing[1]["status"] == "failed"
    assert "ValueError: deliberate failure on rank 1" in failing[1]["detail"]
    after = results["case_c_after_failure"]["ranks"]
    assert {r["status"] for r in after.values()} == {"not run"}
    assert "case_b_fails_on_rank_1" in after[0]["detail"]
