"""Bring the committed result files up to the record format of issue 38: traceable, and naming no machine folder.

    python eval/migrate_records.py                 # every committed JSON under eval/results and eval/diagnostics
    python eval/migrate_records.py --check         # exit 1 and list the files that a run would change
    python eval/migrate_records.py --move          # the reorganisation by task and status (git mv, once)
    python eval/migrate_records.py --fix-references README.md docs/x.md   # old result paths -> new ones

For each committed record JSON (run from the repository root, on a clean checkout, so that the commit it names is
the code that did it):

- ``committed_at``: the commit that first added the file (``git log --diff-filter=A --follow``), and
  ``last_committed_at`` the last commit that changed it before this migration, when another: the commits the file
  was *committed* at, not the commits its runs were trained at (those were not recorded before provenance.json);
- every absolute path inside a string (``run_dir``, ``runs_dir``, a rescore's ``source``, a checkpoint, a
  command line) made ``machine_free``: ``<dir>/`` and its last two parts;
- a bench record also gets ``meta.recipe_defaults`` (the default configs of this code, named by its commit), the
  reference its recipe column is read against;
- the ``.md`` beside a bench or run record is written again from the JSON (``rendering.py``).

No number changes: the script checks that every number of each file is the same before and after, and stops
otherwise. Running it again changes nothing.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from drift_policy.fileio import atomic_write_text  # noqa: E402
from drift_policy.provenance import git_commit, machine_free_text  # noqa: E402
from drift_policy.records import recipe_defaults, record_kind  # noqa: E402

ROOTS = ("eval/results", "eval/diagnostics")

# The reorganisation of eval/results by task, then status (issue 38): old path -> new path, folders and files.
# default/: the records behind today's default and its baseline; levers/: records that measured a change against
# a reference (their verdicts are in eval/results/index.yaml); superseded/: records of an earlier protocol (a
# wall-clock or minutes budget) that a later record replaced. eval/diagnostics/: checks and analyses, not results.
R, PT, CAN = "eval/results", "eval/results/pusht_keypoints", "eval/results/can_lowdim"
CM = f"{R}/compute_matched"
MOVES: dict[str, str] = {
    # Push-T keypoints
    f"{CM}/obs_origin": f"{PT}/superseded/exact_placement/obs_origin",
    f"{CM}/three_seeds": f"{PT}/superseded/exact_placement/three_seeds",
    f"{CM}/seed2": f"{PT}/superseded/exact_placement/seed2",
    **{f"{CM}/pusht_keypoints.{e}": f"{PT}/levers/absolute_chunks/pusht_keypoints.{e}" for e in ("json", "md", "png")},
    **{f"{CM}/{name}": f"{PT}/levers/{name}" for name in (
        "300k", "300k_extra", "action_anchor", "action_anchor_levers", "allocation_g3", "guidance", "kernel_scale",
        "levers_1200k", "lr_6e-4", "medium_1200k", "more_levers", "neighbour_anchor", "neighbour_bandwidth",
        "neighbour_negatives", "neighbours_k4", "neighbours_wd_b32", "noise_scale", "regularisation", "size_ema_300k",
        "temperatures", "wide200")},
    f"{R}/pusht_final_200ep": f"{PT}/levers/final_200ep",
    f"{R}/pusht_noise_scale_s0_final.json": f"{PT}/levers/noise_scale_final/pusht_noise_scale_s0_final.json",
    f"{R}/pusht_noise_scale_s1_final.json": f"{PT}/levers/noise_scale_final/pusht_noise_scale_s1_final.json",
    **{f"{R}/bench_train.{e}": f"{PT}/superseded/wall_clock/bench_train.{e}" for e in ("json", "md", "png")},
    f"{R}/transformer_causal": f"{PT}/superseded/transformer_causal",
    # Can
    f"{CM}/can_neighbours": f"{CAN}/default/can_neighbours",
    **{f"{CM}/can_lowdim.{e}": f"{CAN}/default/can1200k/can_lowdim.{e}" for e in ("json", "md", "png")},
    f"{CM}/can_levers": f"{CAN}/levers/can_levers",
    **{f"{R}/robomimic_can_drift_cpu{s}.{e}": f"{CAN}/superseded/time_budget/robomimic_can_drift_cpu{s}.{e}"
       for s in ("", "_45min") for e in ("json", "md")},
    # Lift and Push-T image: their only records, trained with the time-based schedule of 76819ae
    **{f"{R}/robomimic_lift_drift_cpu{s}.{e}": f"{R}/lift_lowdim/default/robomimic_lift_drift_cpu{s}.{e}"
       for s in ("", "_seed1") for e in ("json", "md")},
    **{f"{R}/pusht_image_drift_cpu.{e}": f"{R}/pusht_image/default/pusht_image_drift_cpu.{e}" for e in ("json", "md")},
    # BlockPush: the three runs of blockpush_reproduce.sh, its data and its oracle
    **{f"{R}/blockpush_{n}.{e}": f"{R}/blockpush_lowdim/default/blockpush_{n}.{e}"
       for n in ("drift_g2", "drift_g8", "diffusion") for e in ("json", "md")},
    f"{R}/blockpush_oracle.json": f"{R}/blockpush_lowdim/default/blockpush_oracle.json",
    f"{R}/blockpush_data.json": f"{R}/blockpush_lowdim/default/blockpush_data.json",
    f"{R}/blockpush_reproduce.sh": f"{R}/blockpush_lowdim/default/blockpush_reproduce.sh",
    # the image-generation track (Fashion-MNIST)
    f"{R}/image/main": f"{R}/fashion_mnist/default/main",
    **{f"{R}/image/{n}": f"{R}/fashion_mnist/default/{n}" for n in ("README.md", "summary.md", "reproduce.sh",
                                                                    "reproduce.log")},
    f"{R}/image/ablations": f"{R}/fashion_mnist/levers/ablations",
    **{f"{R}/image/ablation_synthetic.{e}": f"{R}/fashion_mnist/levers/ablation_synthetic.{e}"
       for e in ("json", "md", "log")},
    # benchmarks of every task: latency, the real-time runner
    **{f"{R}/{n}.{e}": f"{R}/latency/{n}.{e}" for n in ("latency_cpu", "latency_fast_default_cpu", "latency_tasks_cpu")
       for e in ("json", "md")},
    f"{R}/runner.md": f"{R}/runner/runner.md",
    f"{R}/runner_pusht_10hz.json": f"{R}/runner/runner_pusht_10hz.json",
    f"{R}/runner_pusht_max.json": f"{R}/runner/runner_pusht_max.json",
    # diagnostics: checks of a refactor or an import, and analyses of records, not results
    f"{R}/arch_refactor": "eval/diagnostics/arch_refactor",
    f"{R}/lerobot_parity.json": "eval/diagnostics/lerobot_parity.json",
    f"{R}/profile_step_cpu.json": "eval/diagnostics/profile_step/profile_step_cpu.json",
    f"{R}/profile_step_compile_cpu.json": "eval/diagnostics/profile_step/profile_step_compile_cpu.json",
    **{f"{R}/failure_coverage_{n}.json": f"eval/diagnostics/pusht_keypoints/failure_coverage_{n}.json"
       for n in ("pusht_keypoints", "obs_origin", "three_seeds")},
    f"{R}/neighbour_stats_pusht_keypoints.json": "eval/diagnostics/pusht_keypoints/neighbour_stats_pusht_keypoints.json",
    **{f"{R}/can_chunk_errors_{n}.json": f"eval/diagnostics/can_lowdim/can_chunk_errors_{n}.json"
       for n in ("lr1e4_final", "lr1e4_step4000", "nn0_final")},
}


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


# ---- the moves ------------------------------------------------------------------------------------------------------
def move() -> list[tuple[str, str]]:
    """``git mv`` every old path that still exists to its new place; [(old, new)] of those moved."""
    done = []
    for old, new in MOVES.items():
        if not (REPO / old).exists():
            continue
        (REPO / new).parent.mkdir(parents=True, exist_ok=True)
        git("mv", old, new)
        done.append((old, new))
    return done


def new_path(old: str) -> str:
    """Where a path of the old layout is now: the longest moved prefix replaced (a file inside a moved folder
    moves with it); the path unchanged when nothing of it moved."""
    for src in sorted(MOVES, key=len, reverse=True):
        if old == src or old.startswith(src + "/"):
            return MOVES[src] + old[len(src):]
    # The stem of a file group, as in "eval/results/bench_train.{md,json,png}" or "blockpush_{drift_g2,...}.json":
    # moved when every file it starts moved into one folder under its own name.
    group = [src for src in MOVES if src.startswith(old) and "/" not in src[len(old):]]
    folders = {MOVES[src].rsplit("/", 1)[0] for src in group}
    if group and len(folders) == 1 and all(MOVES[s].endswith("/" + s.rsplit("/", 1)[1]) for s in group):
        return folders.pop() + "/" + old.rsplit("/", 1)[1]
    return old


def fix_references(text: str) -> str:
    """Every ``eval/results/...`` path of the old layout in ``text`` replaced by its new place."""
    import re

    return re.sub(r"eval/results/[\w.\-/]*[\w\-]", lambda m: new_path(m.group(0)), text)


# ---- the records ----------------------------------------------------------------------------------------------------
def committed_files() -> list[Path]:
    listed = git("ls-files", "--", *(f"{r}/*.json" for r in ROOTS)).splitlines()
    return [REPO / p for p in listed if p]


def commits_of(path: Path) -> tuple[str, str]:
    """(the commit that first added ``path``, the last commit that changed it), following renames."""
    rel = str(path.resolve().relative_to(REPO))
    added = git("log", "--follow", "--diff-filter=A", "--format=%H", "--", rel).splitlines()
    changed = git("log", "--follow", "--format=%H", "--", rel).splitlines()
    return (added[-1] if added else ""), (changed[0] if changed else "")


def _numbers(d, out=None) -> list:
    """Every number (and bool, None) of a JSON value, in order: what a migration must leave alone."""
    out = [] if out is None else out
    if isinstance(d, dict):
        for v in d.values():
            _numbers(v, out)
    elif isinstance(d, list):
        for v in d:
            _numbers(v, out)
    elif not isinstance(d, str):
        out.append(repr(d))
    return out


def _strings(d):
    """``d`` with every string made machine-free."""
    if isinstance(d, dict):
        return {k: _strings(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_strings(v) for v in d]
    return machine_free_text(d) if isinstance(d, str) else d


def _indent(text: str) -> int | None:
    """The indentation the file was written with (1, 2 or 4 spaces; None: one line), kept so that a diff shows only
    what changed."""
    lines = text.splitlines()
    if len(lines) < 2:
        return None
    second = lines[1]
    return len(second) - len(second.lstrip(" ")) or None


def migrate(path: Path, commit: str | None = None) -> tuple[str, str | None]:
    """(the JSON text this migration gives ``path``, the text of the ``.md`` beside it, or None when none is
    rendered from it). ``commit``: this code's, read before any file was written."""
    from drift_policy.rendering import bench_markdown, run_markdown

    text = path.read_text()
    d = json.loads(text)
    if not isinstance(d, dict):
        return text, None
    new = _strings(d)
    # A record written since carries the commit of the code that wrote it (code_commit, or an eval's provenance).
    own = new.get("code_commit") or (new.get("meta") or {}).get("code_commit") or (new.get("provenance") or {}).get("commit")
    if "committed_at" not in new and not own:
        added, last = commits_of(path)
        new["committed_at"] = added
        if last and last != added:
            new["last_committed_at"] = last
    kind = record_kind(new)
    if kind == "bench" and "recipe_defaults" not in new["meta"]:
        new["meta"]["recipe_defaults"] = recipe_defaults(new["meta"], [r["label"] for r in new["runs"]], commit)
    kept = {k: v for k, v in new.items() if k in d}           # what was there, without what this adds
    if kind == "bench":
        kept["meta"] = {k: v for k, v in new["meta"].items() if k in d["meta"]}
    if _numbers(kept) != _numbers(d):
        raise SystemExit(f"{path}: the migration would change a number; nothing written")
    out = json.dumps(new, indent=_indent(text)) + ("\n" if text.endswith("\n") else "")
    md = path.with_suffix(".md")
    rendered = None
    if md.exists() and kind == "bench":
        rendered = bench_markdown(new)
    elif md.exists() and kind == "run":
        rendered = run_markdown(new)
    return out, rendered


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="list the files a run would change; exit 1 if any")
    ap.add_argument("--move", action="store_true", help="git mv the old layout into the new one")
    ap.add_argument("--fix-references", nargs="+", metavar="FILE", help="rewrite old result paths in these files")
    a = ap.parse_args(argv)
    if a.move:
        for old, new in move():
            print(f"moved: {old} -> {new}")
        return 0
    if a.fix_references:
        for f in map(Path, a.fix_references):
            text = f.read_text()
            fixed = fix_references(text)
            if fixed != text:
                atomic_write_text(f, fixed)
                print(f"references fixed: {f}")
        return 0
    changed, commit = [], git_commit()          # before this run writes anything
    for path in committed_files():
        out, md = migrate(path, commit)
        if out != path.read_text():
            changed.append(path)
            if not a.check:
                atomic_write_text(path, out)
        if md is not None and md != path.with_suffix(".md").read_text():
            changed.append(path.with_suffix(".md"))
            if not a.check:
                atomic_write_text(path.with_suffix(".md"), md)
    for p in changed:
        print(("would change: " if a.check else "written: ") + str(p.relative_to(REPO)))
    return 1 if a.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
