"""Tables and plots drawn from benchmark records (``records.py``): each is a function of the record's JSON alone,
so a committed ``.md`` can always be written again from the ``.json`` beside it.

- ``bench_markdown(record)``: a bench record's ``.md`` (one row per variant, per-run scores, failed test seeds,
  training signals);
- ``bench_plot(record, path)``: its ``.png`` (score against sample-passes and against training minutes);
- ``run_markdown(record)``: a run record's ``.md`` (``bench summary``).
"""
from __future__ import annotations

from pathlib import Path

from .records import LOW_SCORE, by_label, equal_minutes, evaluated_to, recipe_text

_SIGNALS = ("mse_to_expert", "sample_std", "eps_mse")   # the .md's training-signal lines


def fmt(v, d: int = 3) -> str:
    """A statistic for a table: ``-`` when there is none (None or NaN)."""
    return "-" if v is None or v != v else f"{v:.{d}f}"


def _signal(e: dict, part: str, k: str):
    """An evaluation's logged signal ``k``: its training mean (``part="train"``) or its held-out value ("val")."""
    v = e.get(part, {}).get(("train/" if part == "train" else "") + k)
    return None if v is None or v != v else v


def _at_once(meta: dict) -> str | None:
    # A report_only record is rewritten from run folders that may have been trained at different concurrencies.
    return None if meta.get("report_only") else f"{meta['machine']['concurrent_runs']} runs at a time"


def _done(s: dict, rs: list[dict]) -> str:
    """The done column: yes, or how far the variant's least advanced run was evaluated (its last-5 is not the last
    5 of the budget then)."""
    return "yes" if s["complete"] else f"no: evaluated to {evaluated_to(rs):,}"


def _provenance_lines(meta: dict, records: list[dict]) -> list[str]:
    """Where the record came from: the commit of the code that wrote it, and each run's training commit."""
    commits = {}
    for r in records:
        c = (r.get("provenance") or {}).get("commit")
        commits.setdefault(c or "not recorded", []).append(f"{r['label']} s{r['seed']}")
    lines = []
    if meta.get("code_commit") or meta.get("committed_at"):
        what = (f"written by the code at commit {meta['code_commit']}" if meta.get("code_commit") else
                f"committed at {meta['committed_at']} (the commit of the code that wrote it was not recorded)")
        lines.append(f"Record {what}.")
    if any(c != "not recorded" for c in commits):
        lines.append("Runs trained at commit " + "; ".join(f"{c}: {', '.join(v)}" for c, v in commits.items()) + ".")
    return lines + [""] if lines else []


def bench_markdown(record: dict) -> str:
    meta, records, summary = record["meta"], record["runs"], record["summary"]
    variants = by_label(records)
    m = meta["machine"]
    at_once = _at_once(meta)
    defaults = (meta.get("recipe_defaults") or {}).get("configs", {})
    against = meta.get("recipe_defaults", {}).get("commit") or "?"
    lines = [f"# {meta['task']}: drift vs diffusion at equal training compute", "",
             f"Budget {meta['budget']:,} generator sample-passes per run (one forward + backward of one action chunk; "
             f"drift pays batch x n_noise per step, diffusion batch). Evaluated every {meta['eval_fraction']:.0%} of the "
             f"budget on {meta['eval_episodes']} test seeds from {meta['start_seed']}. Machine: {m['cpu']}, "
             f"{m['cores']} cores, torch {m['torch']}, 1 thread per run, "
             f"{at_once or 'runs trained earlier, at the concurrency their commands set'}. "
             f"Written by `{meta['command']}`.", "",
             *_provenance_lines(meta, records),
             "A variant is named by the overrides its runs were given, over the defaults of the commit they ran at. "
             "Its recipe column is read from the runs' resolved configs: the policy and training keys whose values "
             f"differ from `drift-policy bench train` of the same policy with no override at commit {against} "
             "(the budget, the evaluation and how the runs were carried out left out; `defaults`: none differs). "
             "Statistics are means over the seeds (score last-5: ± the standard deviation of the seeds' last-5 means, "
             "where there are two or more); a variant not done (stopped early, or still training) has them over "
             "the evaluations it has, up to the sample-passes its done column names.", ""]
    if meta.get("sources"):
        lines += ["Merged by `bench merge` from the records " + ", ".join(f"`{s['record']}`" for s in meta["sources"])
                  + ". Runs of one recipe (the same resolved policy and training config, but for the seed and how they "
                  "ran: threads, checkpoints, torch.compile) are one variant, named by its first run's label; the "
                  "JSON keeps each run's source record and label.", ""]
    partial = sorted({f"{r['label']} (last {r['rescored']['last']})" for r in records if r.get("rescored", {}).get("last")})
    if partial:
        lines += ["Scored again by `bench rescore` at their source's last evaluations only, so their max is over those "
                  "and their last-10 is not defined: " + ", ".join(partial) + ".", ""]
    # With cameras, images through the encoder are a second unit of compute: drift encodes an observation once for
    # its G samples, so at equal sample-passes it encodes 1/G of the baseline's images (records without it: none).
    images = any(r.get("encoder_passes") for r in records)
    enc_head, enc_rule = (" encoder passes |", "---|") if images else ("", "")
    lines += ["| variant | recipe | NFE | seeds | steps | sample-passes |" + enc_head + " score max | score last-5 | "
              "score last-10 | success max | success last-5 | s/step | done |",
              "|---|---|---|---|---|---|" + enc_rule + "---|---|---|---|---|---|---|"]
    f = fmt
    for label, rs in variants.items():
        s = summary[label]
        passes = "/".join(f"{r['sample_passes']:,}" for r in rs)
        if images:
            passes += " | " + "/".join(f"{r.get('encoder_passes') or 0:,}" for r in rs)
        lines.append(f"| {label} | {recipe_text(rs[0], defaults)} | {rs[0]['nfe']} | {','.join(map(str, s['seeds']))} | "
                     f"{'/'.join(str(r['steps']) for r in rs)} | {passes} | "
                     f"{f(s.get('max_score'))} | {f(s.get('last5_score'))}"
                     f"{'' if s.get('last5_score_sd') is None else ' ± ' + f(s['last5_score_sd'])} | {f(s.get('last10_score'))} | "
                     f"{f(s.get('max_success'), 2)} | {f(s.get('last5_success'), 2)} | "
                     f"{'/'.join(f(r['seconds_per_step'], 2) for r in rs)} | {_done(s, rs)} |")
    flagged = [(label, summary[label]["last5_flags"]) for label in variants if summary[label].get("last5_flags")]
    if flagged:
        names = list(flagged[0][1])
        lines += ["", "The task's episode flags (shares of the test episodes), last-5 means over the seeds.", "",
                  "| variant | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {label} | " + " | ".join(f(fl.get(k), 2) for k in names) + " |" for label, fl in flagged]
    # With cameras drift's step is the cheaper one (it encodes 1/G of the images), so the same runs are also shown at
    # equal training time: what each variant had scored when the quickest finished its budget.
    same_time = equal_minutes(records) if images else None
    if same_time:
        lines += ["", f"The same runs at equal training time: each variant's evaluations made within "
                  f"{same_time['minutes']:.1f} training minutes (evaluations excluded), the time the quickest variant "
                  f"took for its whole budget, means over the seeds; {at_once or 'see how the runs were trained above'}. "
                  "A variant stopped there had its learning-rate schedule set for the whole budget.", "",
                  "| variant | minutes for the budget | sample-passes by then | score then | success then | "
                  "score, mean of up to 5 evaluations by then |", "|---|---|---|---|---|---|"]
        for label, v in same_time["variants"].items():
            reached = "-" if v["sample_passes"] is None else f"{v['sample_passes']:,.0f}"
            lines.append(f"| {label} | {v['minutes']:.1f} | {reached} | {f(v['score'])} | {f(v['success'], 2)} | "
                         f"{f(v['last5_score'])} |")
    lines += ["", "Per run (seed): score at each evaluation, by sample-passes.", ""]
    for r in records:
        pts = ", ".join(f"{e['sample_passes'] / 1e6:.2f}M: {e['mean_score']:.3f}/{e['success_rate']:.2f}" for e in r["evals"])
        lines.append(f"- {r['label']} seed {r['seed']}: {pts or 'no evaluation yet'}")
    if any(e.get("flags") for r in records for e in r["evals"]):
        lines += ["", "Per run (seed): the episode flags at each evaluation, by sample-passes.", ""]
        for r in records:
            pts = "; ".join(f"{e['sample_passes'] / 1e6:.2f}M: " + ", ".join(f"{k} {v:.2f}" for k, v in e["flags"].items())
                            for e in r["evals"] if e.get("flags"))
            lines.append(f"- {r['label']} seed {r['seed']}: {pts or 'no evaluation yet'}")
    failing = [r for r in records if r["evals"] and all(e.get("low_score_seeds") is not None for e in r["evals"][-5:])]
    if failing:
        lines += ["", f"Per run (seed): episodes scoring under {LOW_SCORE} in the last 5 evaluations (failures rather than "
                  "imprecise finishes), and the test seeds that failed most often (times failed).", ""]
        for r in failing:
            last = r["evals"][-5:]
            seeds = [s for e in last for s in e["low_score_seeds"]]
            n_ep = r["train_config"]["eval_episodes"] * len(last)
            top = sorted(set(seeds), key=lambda s: (-seeds.count(s), s))[:8]
            lines.append(f"- {r['label']} seed {r['seed']}: {len(seeds)} of {n_ep} episodes; "
                         + (", ".join(f"{s} ({seeds.count(s)})" for s in top) or "none"))
    signals = [(r, part, k) for r in records for k in _SIGNALS for part in ("train", "val")
               if any(_signal(e, part, k) is not None for e in r["evals"])]
    if signals:
        lines += ["", "Per run (seed): training signals at each evaluation, in normalised action units (drift: the mse "
                  "of the generated chunks to the expert chunk, and the spread of an observation's G chunks; "
                  "diffusion: the noise-prediction mse). train: the mean over the log lines since the previous "
                  "evaluation; val: the EMA policy on 256 fixed held-out windows.", ""]
        for r, part, k in signals:
            pts = ", ".join(f"{e['sample_passes'] / 1e6:.2f}M: {f(_signal(e, part, k), 4)}" for e in r["evals"]
                            if _signal(e, part, k) is not None)
            lines.append(f"- {r['label']} seed {r['seed']}, {part} {k}: {pts}")
    return "\n".join(lines) + "\n"


def bench_plot(record: dict, path: Path) -> Path:
    """Score against sample-passes and against training minutes, one colour per variant, one line style per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, records = record["meta"], record["runs"]
    variants = by_label(records)
    at_once = _at_once(meta)
    legend_h = 0.2 + 0.16 * ((len(records) + 1) // 2)                   # inches: the legend goes below the axes
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2 + legend_h), sharey=True)
    cmap = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")      # one distinct colour per variant
    colors = {label: cmap(i % cmap.N) for i, label in enumerate(variants)}
    for r in records:
        style = dict(color=colors[r["label"]], ls=["-", "--", ":", "-."][r["seed"] % 4], marker="o", ms=3,
                     label=f"{r['label']} s{r['seed']}")
        axes[0].plot([e["sample_passes"] / 1e6 for e in r["evals"]], [e["mean_score"] for e in r["evals"]], **style)
        axes[1].plot([e["train_minutes"] for e in r["evals"]], [e["mean_score"] for e in r["evals"]], **style)
    axes[0].set_xlabel("generator sample-passes (millions)")
    axes[1].set_xlabel("training minutes on this machine (1 thread per run" + (f", {at_once})" if at_once else ")"))
    axes[0].set_ylabel(" / ".join(sorted({r["score_label"] for r in records})) + f" ({meta['eval_episodes']} seeds)")
    for a in axes:
        a.grid(alpha=0.3)
        a.set_ylim(0, 1)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.suptitle(f"{meta['task']}: equal training compute, {meta['budget']:,} sample-passes")
    fig.tight_layout(rect=(0, legend_h / (4.2 + legend_h), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_markdown(s: dict) -> str:
    """A run record's table (``bench summary``): score and success at each evaluation, then max and last-k."""
    flags = [k for k in (s["evals"][-1] if s["evals"] else {}) if k not in
             ("step", "train_minutes", "coverage_score", "success_rate")]
    lines = [f"{s['config']['task']['name']}, {s['policy']['type']} policy ({s['policy']['architecture']} "
             f"{s['policy']['backbone']}), {s['machine']}", ""]
    if s.get("provenance") or s.get("code_commit"):
        lines += [f"Trained at commit {(s.get('provenance') or {}).get('commit') or 'not recorded'}; record written by "
                  f"`{s.get('command', 'drift-policy bench summary')}` at commit {s.get('code_commit') or '?'}.", ""]
    elif s.get("committed_at"):
        lines += [f"Record committed at {s['committed_at']} (the commits of the training and of the code that wrote "
                  f"it were not recorded).", ""]
    lines += ["| step | train min | score | success |" + "".join(f" {k} |" for k in flags),
              "|---|---|---|---|" + "---|" * len(flags)]
    lines += [f"| {r['step']} | {r['train_minutes']:.1f} | {r['coverage_score']:.3f} | {r['success_rate']:.2f} |"
              + "".join(f" {r.get(k, float('nan')):.2f} |" for k in flags) for r in s["evals"]]
    lines += ["", f"max score {s['max_coverage']:.3f}, mean of the last {s['n_last']} evaluations "
                  f"{s['last10_coverage']:.3f} (success {s['last10_success']:.2f})"]
    if s.get("plots"):
        lines += [""] + [f"![{Path(p).stem}]({p})" for p in s["plots"]]
    return "\n".join(lines) + "\n"
