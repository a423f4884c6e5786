"""make bench-hierarchy's arithmetic: intervals over seeds, paired differences, the verdict and the docs table
(the training runs themselves are the benchmark, not a test)."""

from __future__ import annotations

import json

import pytest

from mushroomclip.evaluation.hierarchy_bench import (
    TABLE_END,
    TABLE_START,
    interval,
    render_table,
    summarise,
    update_docs,
    verdict,
)


def runs(severity: list[float], oa: float = 0.5) -> list[dict]:
    return [{"seed": i, "oa": oa, "miou": oa, "mistake_severity": s, "hdist_top5": 3.0} for i, s in enumerate(severity)]


def test_interval_is_the_students_t_interval_of_the_mean():
    result = interval([1.0, 2.0, 3.0])  # mean 2, sd 1, n 3: half-width t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051
    assert result["mean"] == 2.0 and result["n"] == 3
    assert result["ci95"] == pytest.approx([2 - 2.484138, 2 + 2.484138], abs=1e-5)
    assert interval([4.0])["ci95"] is None  # one seed: no interval


def test_differences_are_paired_by_seed_and_the_verdict_says_only_what_the_interval_shows():
    per_seed = {
        "class_text": runs([4.0, 4.2, 3.8]),
        "hierarchical_soft": runs([3.0, 3.3, 2.7], oa=0.4),  # lower by 1.0, 0.9, 1.1; OA 10 points lower
        "hierarchical_xent": runs([4.5, 3.5, 4.1]),  # +0.5, -0.7, +0.3: the interval holds 0
    }
    summary = summarise(per_seed)
    delta = summary["hierarchical_soft"]["minus_class_text"]["mistake_severity"]
    assert delta["mean"] == pytest.approx(-1.0) and delta["ci95"][1] < 0
    assert "minus_class_text" not in summary["class_text"]
    text = verdict({"summary": summary})
    assert "hierarchical_soft lowers mistake severity" in text
    assert "hierarchical_soft: no significant difference in the hierarchical distance of the top-5" in text
    assert "hierarchical_xent: no significant difference in mistake severity" in text
    assert (
        "hierarchical_soft lowers test OA" in text and "hierarchical_xent: no significant difference in test OA" in text
    )


def test_docs_table_is_regenerated_between_its_markers(tmp_path):
    per_seed = {"class_text": runs([4.0, 4.2]), "hierarchical_soft": runs([3.0, 3.1])}
    result = {
        "per_seed": per_seed,
        "summary": summarise(per_seed),
        "config": {"data": "/x/genus/prepared", "seeds": 2, "steps": 60, "config": "tiny.yaml"},
        "machine": {"cores": 2, "cpu": "Test CPU"},
        "git_commit": "abc123",
    }
    (tmp_path / "hierarchy.json").write_text(json.dumps(result))
    page = tmp_path / "benchmarks.md"
    page.write_text(f"before\n{TABLE_START}\nold\n{TABLE_END}\nafter\n")
    table = update_docs(page, tmp_path / "hierarchy.json")
    assert table == render_table(result)
    text = page.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert (
        "| hierarchical_soft | 50.00 [50.00, 50.00] |" in text
        and "data `genus/prepared`; 2-core Test CPU, no GPU; commit abc123" in text
    )
    with pytest.raises(FileNotFoundError, match="make bench-hierarchy"):
        update_docs(page, tmp_path / "missing.json")
