"""Real-time control record (issue 42 item 4): ``drift-policy run``'s loop with the default inference path, one
thread, synchronous receding horizon: the highest sustained control rate and the missed deadlines at fixed rates.

    python eval/runner_record.py checkpoint=runs/<run> rates=50,100 seconds=60 search=1 \
        out=eval/results/runner/runner_fast_default.json

For each rate in ``rates`` it runs ``seconds`` of Push-T on the wall clock (``runner.run``) and keeps the report;
with ``search=1`` it first searches the highest rate that misses at most ``tolerance`` of its deadlines
(``runner.find_max_rate``: ``search_seconds`` per trial) and runs ``seconds`` there too. The policy is loaded
once (a run folder: its newest good checkpoint's EMA weights). Writes ``out`` (every report in full) and the
``.md`` beside it (one table row per run, from those reports). About 2 x seconds + 1 minute with search=0, plus
~2 minutes for the search; the first inference of a machine compiles the batch-1 kernel (about a minute, during
the warm-up, before any clock runs).
"""
from __future__ import annotations

import sys
from pathlib import Path

OPTIONS = {"checkpoint": "", "rates": "50,100", "seconds": "60", "search": "1", "search_seconds": "5",
           "tolerance": "0.01", "threads": "1", "backend": "eager", "async": "0", "episodes": "0", "max_steps": "0",
           "out": "eval/results/runner/runner_fast_default.json"}


def parse(argv: list[str]) -> dict:
    o = dict(OPTIONS)
    for a in argv:
        k, sep, v = a.partition("=")
        if not sep or k not in o:
            raise SystemExit(f"usage: python eval/runner_record.py [{' '.join(f'{k}={v}' for k, v in OPTIONS.items())}]"
                             f"\nunknown or malformed argument {a!r}")
        o[k] = v
    if not o["checkpoint"]:
        raise SystemExit("checkpoint= is required (a run folder, a checkpoint file or a pretrained/ folder)")
    return o


def row(name: str, r: dict) -> str:
    lat = r["inference_latency_ms"]
    score = r.get("mean_score")
    return (f"| {name} | {r['target_rate_hz']:g} | {r['achieved_rate_hz']:.1f} | {r['ticks']} | "
            f"{r['missed_deadlines']} ({r['missed_fraction']:.2%}) | {r['waited_for_chunk']} / {r['overruns']} | "
            f"{lat.get('p50', float('nan')):.3f} / {lat.get('p99', float('nan')):.3f} / {lat.get('max', float('nan')):.3f} | "
            f"{r['tick_work_ms'].get('p99', float('nan')):.2f} | "
            f"{'n/a' if score is None else f'{score:.3f}'} ({r['n_complete_episodes']}) |")


def report_md(rec: dict) -> str:
    m = rec["runs"][0]["report"]["machine"] if rec["runs"] else {}
    lines = ["# Real-time control, default inference path (`eval/runner_record.py`)", "",
             f"Checkpoint `{rec['checkpoint']}`; backend {rec['options']['backend']}, {rec['options']['threads']} "
             f"thread(s), async={rec['options']['async']}, receding horizon. Machine: {m.get('cpu', '?')} "
             f"({m.get('logical_cpus', '?')} logical CPUs), torch {m.get('torch', '?')}, {m.get('time_utc', '?')} UTC, "
             f"code commit {rec.get('code_commit') or 'unknown'}, "
             f"load average {m.get('load_avg_1min_at_start', float('nan')):.2f} at the start.", "",
             "| run | target Hz | achieved Hz | ticks | missed deadlines | waited / overruns | inference p50 / p99 / "
             "max ms | tick work p99 ms | score (complete episodes) |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [row(r["name"], r["report"]) for r in rec["runs"]]
    if rec.get("search"):
        s = rec["search"]
        lines += ["", f"Highest sustained rate (at most {float(rec['options']['tolerance']):.1%} missed deadlines, "
                      f"{rec['options']['search_seconds']} s per trial): {s['max_sustained_hz']:g} Hz; trials: "
                  + ", ".join(f"{t['rate_hz']:g} Hz {'ok' if t['ok'] else 'missed ' + format(t['missed_fraction'], '.2%')}"
                              for t in s["trials"]) + "."]
    lines += ["", "Missed deadline: the tick's action was not ready in time or the tick's work (inference + env step) "
                  "ended after the next tick's start. The simulator advances one 0.1 s control period per tick, so "
                  "above 10 Hz it runs faster than real time: these runs measure whether the controller keeps up."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> dict:
    from drift_policy.evaluation import save_eval_json
    from drift_policy.fileio import atomic_write_text, check_writable
    from drift_policy.runner import RunConfig, find_max_rate, run
    from drift_policy.runs import load_policy_for_eval

    o = parse(argv)
    out = check_writable(o["out"], "out=")
    rates = [float(r) for r in o["rates"].split(",") if r.strip()]
    policy, run_cfg = load_policy_for_eval(o["checkpoint"])
    task = run_cfg.task if run_cfg is not None else None
    cfg = RunConfig(seconds=float(o["seconds"]), episodes=int(o["episodes"]), max_steps=int(o["max_steps"]),
                    threads=int(o["threads"]), backend=o["backend"], async_=o["async"] not in ("0", "false"))
    from drift_policy.provenance import git_commit

    rec = {"code_commit": git_commit(), "checkpoint": o["checkpoint"], "options": o, "runs": [], "search": None}
    if o["search"] not in ("0", "false"):
        best, trials = find_max_rate(policy, cfg, seconds=float(o["search_seconds"]),
                                     tolerance=float(o["tolerance"]), task=task)
        rec["search"] = {"max_sustained_hz": best, "trials": trials}
        if best > 0:
            rates.append(best)
    for rate in rates:
        report = run(policy, RunConfig(**{**cfg.__dict__, "rate_hz": rate}), o["checkpoint"], task)
        name = f"{rate:g} Hz" + (" (highest sustained in the search)" if rec["search"] and
                                 rate == rec["search"]["max_sustained_hz"] and rate not in rates[:-1] else "")
        rec["runs"].append({"name": name, "report": report})
        print(f"{name}: achieved {report['achieved_rate_hz']:.1f} Hz, missed {report['missed_fraction']:.2%}, "
              f"inference p50 {report['inference_latency_ms'].get('p50', float('nan')):.3f} ms", flush=True)
    save_eval_json(rec, out)
    atomic_write_text(Path(out).with_suffix(".md"), report_md(rec))
    print(f"written: {out}, {Path(out).with_suffix('.md')}")
    return rec


if __name__ == "__main__":
    main(sys.argv[1:])
