"""Turn one run's measurements into its report: JSON, a Markdown table and a PNG plot.

bench/run.py calls ``write`` after every measured row, so an interrupted run keeps what it
measured. The targets are the ratios issues 15, 22 and 23 name, each computed from this run
alone and marked met or missed. ``python bench/report.py FOLDER`` writes a run's report again
from its results.json.
"""

import json
import statistics
from pathlib import Path

# The peers' names, as bench/run.py gives them and the targets look them up.
FLOOR = "floor: Flask + PyJWT (granian)"
FLASK_JWT_EXTENDED = "Flask-JWT-Extended (granian)"
EXPRESS = "Express original"
EXPRESS_KEY_OBJECTS = "Express, key objects"
# Ratios of req/s: (what, route, numerator, denominator, at least); "ours" is our first
# server on the memory store, "redis" the same on Redis, at the smallest number of sessions.
RATIO_TARGETS = [
    ("GET /me vs the floor", "me", "ours", FLOOR, 1.0),
    ("POST /token vs the floor", "token", "ours", FLOOR, 0.7),
    ("POST /token vs the Express original", "token", "ours", EXPRESS, 2.5),
    ("POST /token vs Flask-JWT-Extended", "token", "ours", FLASK_JWT_EXTENDED, 1.3),
    ("POST /token, Redis store vs memory store", "token", "redis", "ours", 0.6),
    ("POST /token, metrics on vs off", "token", "ours", "without_metrics", 0.95),
    ("GET /me, metrics on vs off", "me", "ours", "without_metrics", 0.95),
]
LOGIN_P50_MS, LOGINS_PER_SECOND = 60, 15  # POST /login: p50 when idle, req/s on one core
ROUTES = (("token", "POST /token"), ("me", "GET /me"))


def write(results: dict, folder: Path, stem: str, plot_too: bool) -> None:
    """Write ``stem``.json and ``stem``.md to ``folder``, and the plot if asked."""
    (folder / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (folder / f"{stem}.md").write_text(markdown(results))
    if plot_too and results["runs"]:
        plot(results, folder / "throughput.png")


def warmup(results: dict) -> str:
    """How long each route was driven before it was measured, if at all (older runs: no)."""
    seconds = results.get("warmup", 0)
    return f", each after {seconds} s of warm-up" if seconds else ""


def rounds(results: dict) -> str:
    """How many times each row at the smallest N (and ours at the largest) was measured, if
    more than once."""
    count = results.get("rounds", 1)
    if count < 2:
        return ""
    return f"; {count} rounds at the smallest N and of ours at the largest, targets from medians"


def markdown(results: dict) -> str:
    """The report: the targets first, then every row, then logins and memory."""
    machine, rows = results["machine"], targets(results)
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; "
        f"server on core 0, wrk on core 1, {results['connections']} connections, "
        f"{results['duration']} s a route{warmup(results)}{rounds(results)}; "
        f"load average {machine.get('load', 0):.1f} at the start.",
        "",
        "| target | measured | needed | |",
        "|---|---|---|---|",
        *[
            f"| {what} | {measured} | {needed} | {verdict} |"
            for what, measured, needed, verdict in rows
        ],
    ]
    if any("missed" in verdict for *_, verdict in rows):
        lines += ["", "For a target missed, `python bench/profile.py` shows where the time goes."]
    lines += [
        "",
        "| server | live sessions | POST /token req/s | p50 ms | p99 ms "
        "| GET /me req/s | p50 ms | p99 ms | RSS per session | failed requests |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        token, me = run["token"], run["me"]
        rss = f"{run['rss_per_session']:.0f} B" if run.get("rss_per_session") else ""
        sessions = "as running" if run["sessions"] is None else f"{run['sessions']:,}"
        sessions += of_round(run)
        failed = f"**{errors(run)}**" if errors(run) else ""
        lines.append(
            f"| {run['name']} | {sessions} | {token['rps']:.0f} | {token['p50_ms']:.2f} "
            f"| {token['p99_ms']:.2f} | {me['rps']:.0f} | {me['p50_ms']:.2f} "
            f"| {me['p99_ms']:.2f} | {rss} | {failed} |"
        )
    if results["skipped"]:
        lines += ["", "Not measured:", *[f"- {reason}" for reason in results["skipped"]]]
    lines += ["", *results["notes"]] if results["notes"] else []
    if results.get("login"):
        idle, loaded = results["login"]["idle"], results["login"]["loaded"]
        lines += [
            "",
            f"POST /login: p50 {idle['p50_ms']:.0f} ms, p99 {idle['p99_ms']:.0f} ms on an idle "
            f"server (one connection); {loaded['rps']:.1f} req/s, p50 {loaded['p50_ms']:.0f} ms "
            f"under load ({results['connections']} connections).",
        ]
    if results.get("memory"):
        lines += [
            "",
            "| live sessions | memory store, B/session (tracemalloc) "
            "| Redis store, B/session (INFO memory) |",
            "|---|---|---|",
        ]
        for row in results["memory"]:
            redis_cell = f"{row['redis_store']:.0f}" if "redis_store" in row else "not measured"
            lines.append(f"| {row['sessions']:,} | {row['memory_store']:.0f} | {redis_cell} |")
    return "\n".join(lines) + "\n"


def targets(results: dict) -> list[tuple[str, str, str, str]]:
    """Each target as (what, measured, needed, met or missed); "not measured" without data."""
    runs = [run for run in results["runs"] if run["sessions"] is not None]
    if not runs:
        return []
    fewest, most = min(run["sessions"] for run in runs), max(run["sessions"] for run in runs)
    names = {"ours": results["ours"], "redis": results["ours_redis"]}
    names["without_metrics"] = results.get("ours_without_metrics", "")
    rows = []
    for what, route, numerator, denominator, at_least in RATIO_TARGETS:
        top = rps(runs, names.get(numerator, numerator), fewest, route)
        bottom = rps(runs, names.get(denominator, denominator), fewest, route)
        rows.append(ratio_row(f"{what}, {fewest:,} sessions", top, bottom, at_least))
    # Flat in the number of sessions: ours at the most against ours at the fewest.
    at_most = rps(runs, names["ours"], most, "token") if most > fewest else None
    at_fewest = rps(runs, names["ours"], fewest, "token")
    what = f"POST /token at the most sessions ({most:,}) vs the fewest ({fewest:,})"
    rows.append(ratio_row(what, at_most, at_fewest, 0.9))
    login = results.get("login")
    idle_ms = login and login["idle"]["p50_ms"]
    per_second = login and login["loaded"]["rps"]
    rows.append(bound_row("POST /login p50, idle server", idle_ms, "ms", LOGIN_P50_MS))
    rows.append(bound_row("POST /login req/s, one core", per_second, "req/s", LOGINS_PER_SECOND))
    return rows


def rps(runs: list[dict], name: str, sessions: int, route: str) -> float | None:
    """The req/s of ``name`` at ``sessions`` on ``route``, the median of its rounds if it was
    measured in several, or None if not measured."""
    found = [
        run[route]["rps"] for run in runs if run["name"] == name and run["sessions"] == sessions
    ]
    return statistics.median(found) if found else None


def of_round(run: dict) -> str:
    """ ", round N" for a row measured in several rounds, else nothing."""
    return f", round {run['round']}" if run.get("round") else ""


def ratio_row(what: str, top: float | None, bottom: float | None, at_least: float) -> tuple:
    needed = f"≥ {at_least}x"
    if top is None or not bottom:
        return what, "not measured", needed, ""
    ratio = top / bottom
    return what, f"{ratio:.2f}x", needed, "met" if ratio >= at_least else "**missed**"


def bound_row(what: str, value: float | None, unit: str, bound: float) -> tuple:
    """A row for a login target: a p50 in ms must stay below it, req/s must reach it."""
    upper = unit == "ms"
    needed = f"{'<' if upper else '≥'} {bound} {unit}"
    if value is None:
        return what, "not measured", needed, ""
    met = value < bound if upper else value >= bound
    return what, f"{value:.1f} {unit}", needed, "met" if met else "**missed**"


def errors(run: dict) -> int:
    """Requests that failed: non-2xx answers and socket errors, both routes."""
    return sum(run[route][kind] for route, _ in ROUTES for kind in ("non_2xx", "socket_errors"))


def plot(results: dict, path: Path) -> None:
    """req/s of each server, a panel per route: against live sessions, or bars for one N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    runs = [run for run in results["runs"] if run["sessions"] is not None]
    several = len({run["sessions"] for run in runs}) > 1
    names = list(dict.fromkeys(run["name"] for run in runs))
    plain = FuncFormatter(lambda value, _: f"{value:,.0f}")
    figure, panels = plt.subplots(1, 2, figsize=(12, 5))
    for axes, (route, title) in zip(panels, ROUTES, strict=True):
        axes.set_title(f"{title}, req/s on one core")
        if not several:
            sessions = runs[0]["sessions"]
            bars = axes.barh(
                names[::-1], [rps(runs, name, sessions, route) for name in names[::-1]]
            )
            axes.bar_label(bars, fmt="%.0f", padding=3)
            axes.set_xlabel(f"req/s at {sessions:,} live sessions")
            axes.grid(True, axis="x", alpha=0.3)
            continue
        for name in names:
            sizes = sorted({r["sessions"] for r in runs if r["name"] == name})
            points = [(n, rps(runs, name, n, route)) for n in sizes]
            axes.plot([max(n, 1) for n, _ in points], [y for _, y in points], "o-", label=name)
        axes.set_xscale("log")
        axes.set_yscale("log")  # the Express original falls a hundredfold at 1M sessions
        axes.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axes.yaxis.set_major_formatter(plain)
        axes.yaxis.set_minor_formatter(NullFormatter())
        axes.set_xlabel("live sessions (0 drawn at 1)")
        axes.grid(True, which="both", alpha=0.3)
    if several:
        figure.legend(*panels[0].get_legend_handles_labels(), loc="lower center", ncol=3)
        figure.tight_layout(rect=(0, 0.12, 1, 1))
    else:
        figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    import sys

    folder = Path(sys.argv[1])
    write(json.loads((folder / "results.json").read_text()), folder, "results", plot_too=True)
