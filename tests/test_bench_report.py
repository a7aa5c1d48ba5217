"""The benchmark's report: each target from the rows this run measured, medians of rounds."""

import pytest

from bench import report


def row(name, token, me, round_=0, sessions=0):
    stats = {"p50_ms": 1.0, "p99_ms": 2.0, "non_2xx": 0, "socket_errors": 0}
    found = {"name": name, "sessions": sessions}
    found |= {"token": stats | {"rps": token}, "me": stats | {"rps": me}}
    return found | ({"round": round_} if round_ else {})


def results(runs, rounds=1):
    return {
        "machine": {"cpu": "test", "cores": 2, "python": "3.11", "load": 0.5},
        "connections": 32, "duration": 5, "warmup": 2, "rounds": rounds,
        "ours": "ours", "ours_redis": "ours, Redis", "ours_without_metrics": "ours, off",
        "runs": runs, "skipped": [], "notes": [],
    }  # fmt: skip


def verdict(rows, what):
    return next(row[1:] for row in rows if row[0].startswith(what))


def test_a_target_of_rows_measured_in_rounds_is_the_ratio_of_their_medians():
    # One slow round of the floor (a neighbour's burst on a shared machine) does not decide.
    runs = [
        row("ours", 700, 1000, 1), row(report.FLOOR, 2000, 1000, 1),
        row(report.FLOOR, 1000, 900, 2), row("ours", 650, 1300, 2),
        row("ours", 800, 900, 3), row(report.FLOOR, 1100, 950, 3),
    ]  # fmt: skip
    rows = report.targets(results(runs, rounds=3))
    assert verdict(rows, "POST /token vs the floor") == ("0.64x", "≥ 0.7x", "**missed**")
    assert verdict(rows, "GET /me vs the floor") == ("1.05x", "≥ 1.0x", "met")
    text = report.markdown(results(runs, rounds=3))
    assert "3 rounds at the smallest N and of ours at the largest, targets from medians" in text
    assert "| ours | 0, round 2 | 650 |" in text


def test_one_round_is_reported_as_it_was_measured():
    runs = [row("ours", 750, 1000), row(report.FLOOR, 1000, 1000)]
    rows = report.targets(results(runs))
    assert verdict(rows, "POST /token vs the floor") == ("0.75x", "≥ 0.7x", "met")
    text = report.markdown(results(runs))
    assert "round" not in text and "| ours | 0 | 750 |" in text


def test_rounds_measure_every_row_at_the_smallest_n_and_ours_alone_at_the_largest(
    monkeypatch, tmp_path
):
    # Which rows a run measures, in which order: the measuring itself is replaced by a note.
    from bench import run

    measured = []

    def measuring(name):
        def measure(*args, **kwargs):
            sessions = next(arg for arg in args if isinstance(arg, int))
            measured.append((name, sessions))
            return row(name, 1, 1, sessions=sessions)

        return measure

    monkeypatch.setattr(run, "RESULTS", tmp_path)
    monkeypatch.setattr(run, "measure_ours", measuring("ours"))
    monkeypatch.setattr(run, "measure_peer_cmd", lambda name, *a, **k: measuring(name)(*a, **k))
    monkeypatch.setattr(run, "measure_login", lambda args: None)
    monkeypatch.setattr(run, "measure_memory", lambda sizes, url: [])
    monkeypatch.setattr("sys.argv", ["run.py", "--sessions", "0,10,100", "--rounds", "3"])
    args = run.parse_args()
    args.peer_cmd = [("peer", "true")]
    results = run.Results(args)
    results.plot = False  # drawn after every row of a real run; its own test draws one
    run.measure_rows(args, results)
    assert measured == [
        ("ours", 0), ("peer", 0), ("peer", 0), ("ours", 0), ("ours", 0), ("peer", 0),
        ("ours", 10), ("peer", 10),
        ("ours", 100), ("peer", 100), ("ours", 100), ("ours", 100),
    ]  # fmt: skip
    rounds = [(kept["sessions"], kept.get("round")) for kept in results.data["runs"]]
    assert rounds[6:] == [(10, None), (10, None), (100, 1), (100, None), (100, 2), (100, 3)]


def test_the_plot_draws_one_n_as_bars_and_several_as_lines(tmp_path):
    pytest.importorskip("matplotlib")  # bench/requirements.txt's, not the test suite's
    one_n = [row("ours", 700, 1000), row(report.FLOOR, 1000, 900)]
    several = one_n + [
        row("ours", 690, 990, sessions=1000),
        row(report.FLOOR, 980, 880, sessions=1000),
    ]
    for name, runs in (("bars.png", one_n), ("lines.png", several)):
        report.plot(results(runs), tmp_path / name)
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
