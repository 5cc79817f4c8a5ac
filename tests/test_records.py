"""Records of results (issue 38): where each came from, no machine folder in any, and the tables generated from them.

- every record written names the commits (each run's, and the code's that wrote it), command, machine, seeds and
  budget, and no absolute path;
- ``bench summary`` without ``out=`` writes nothing (not even into the run folder), and a path that is not a run
  folder is a user's error (exit 2);
- ``drift-policy results``: the committed docs/results pages (and README's block, once it has the markers) are
  what the command writes from eval/results/index.yaml and the records, so no number can drift from its record.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from drift_policy import runs
from drift_policy.config import compose

REPO = Path(__file__).resolve().parents[1]
ABSOLUTE = re.compile(r"(?:^|[\s='\"(\[,`])(/(?:work|home|tmp|root|Users|mnt|private|var)/[^\s'\"`]*)")


def _run(d: Path, seed: int = 0, scores=(0.5, 0.75), provenance: bool = True, overrides=(), minutes=None) -> Path:
    """A finished-looking run folder: its config, one eval file per score (at ``minutes``, default 1, 2, ..), a
    metrics log and its provenance."""
    from drift_policy.provenance import write_provenance

    cfg = compose(["train.sample_passes=640", f"train.seed={seed}", "train.eval_episodes=3", "train.eval_fraction=0.5",
                   f"train.run_dir={d}", *overrides])
    runs.write_config(d, cfg)
    steps = cfg.train.max_steps
    lines = []
    for i, s in enumerate(scores, 1):
        step = i * steps // len(scores)
        m = float(minutes[i - 1] if minutes else i)
        p = runs.eval_path(d, step)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"step": step, "train_minutes": m, "mean_score": s, "success_rate": s / 2}))
        lines.append(json.dumps({"step": step, "train_minutes": m, "loss": 1.0 / i}))
    runs.metrics_path(d).write_text("\n".join(lines) + "\n")
    if provenance:
        write_provenance(d, ["train", f"train.run_dir={d}", f"train.seed={seed}"])
    return d


def _absolute_paths(text: str) -> list[str]:
    return [m.group(1) for m in ABSOLUTE.finditer(text)]


# ---- what a record holds -----------------------------------------------------------------------------------------
def test_a_bench_record_names_its_commits_command_machine_seeds_and_budget_and_no_machine_folder(tmp_path):
    from drift_policy.bench import bench_train
    from drift_policy.provenance import git_commit

    _run(tmp_path / "runs" / "drift_unet-s0", 0)
    _run(tmp_path / "runs" / "drift_unet-s1", 1, provenance=False)          # trained before provenance.json
    path = bench_train(["report_only=1", "budget=640", "seeds=0,1", "policies=drift_unet",
                        f"runs={tmp_path / 'runs'}", f"out={tmp_path / 'out'}"])
    rec = json.loads(path.read_text())
    meta = rec["meta"]
    assert meta["code_commit"] == git_commit() and meta["seeds"] == [0, 1] and meta["budget"] == 640
    assert meta["command"].startswith("drift-policy bench train report_only=1") and meta["machine"]["cores"]
    assert meta["runs_dir"] == "<dir>/" + "/".join((tmp_path / "runs").parts[-2:])
    first, second = rec["runs"]
    assert first["provenance"]["commit"] == git_commit() and first["provenance"]["machine"]["cores"]
    assert first["provenance"]["command"] == "drift-policy train train.run_dir=<dir>/runs/drift_unet-s0 train.seed=0"
    assert second["provenance"] is None                  # said, not invented
    assert first["budget_sample_passes"] == 640 and first["seed"] == 0
    for f in (path, path.with_suffix(".md")):
        assert str(tmp_path) not in f.read_text() and not _absolute_paths(f.read_text()), f
    md = path.with_suffix(".md").read_text()
    assert f"written by the code at commit {git_commit()}" in md and f"{git_commit()}: drift_unet s0" in md


def test_a_rescored_run_keeps_its_sources_provenance_and_its_record_no_machine_folder(tmp_path, monkeypatch):
    from drift_policy import bench

    src = _run(tmp_path / "drift_unet-s0", 0)
    for step in (5, 10):
        runs.checkpoint_path(src, step).parent.mkdir(parents=True, exist_ok=True)
        runs.checkpoint_path(src, step).write_bytes(b"")
    calls = []

    def fake_eval(policy, cfg, episodes, workers, progress, seed):
        calls.append(seed)
        return {"mean_score": 0.25, "success_rate": 0.0, "n_episodes": episodes}

    monkeypatch.setattr(bench.runs, "load_policy_for_eval", lambda path, inference: (None, runs.read_config(src)))
    import drift_policy.train as train_mod

    monkeypatch.setattr(train_mod, "evaluate_policy", fake_eval)
    dst = bench._rescore_run(src, tmp_path / "drift_unet_sampling_seed_3-s0", {}, sampling_seed=3)
    rescored = json.loads(runs.rescored_path(dst).read_text())
    assert rescored["source_provenance"] == json.loads((src / "provenance.json").read_text())
    assert json.loads((dst / "provenance.json").read_text())["command"].startswith("drift-policy")
    ev = json.loads(runs.eval_path(dst, 10).read_text())
    assert ev["rescored_from"].startswith("<dir>/") and calls == [3, 3]
    from drift_policy.records import run_record

    rec = run_record(dst)
    assert rec["rescored"]["source"] == "<dir>/" + "/".join(src.parts[-2:]) and rec["rescored"]["sampling_seed"] == 3
    assert str(tmp_path) not in json.dumps(rec)
    # A rerun resumes (the same rescore): nothing is scored again.
    bench._rescore_run(src, dst, {}, sampling_seed=3)
    assert calls == [3, 3]


def test_no_committed_record_names_a_folder_of_the_development_machine():
    """Every committed JSON under eval/results and eval/diagnostics says the commit it was committed at (or, if
    written since, the commit of the code that wrote it) and holds no absolute path."""
    files = [p for root in ("results", "diagnostics") for p in (REPO / "eval" / root).rglob("*.json")]
    assert len(files) > 80
    bad = {str(p.relative_to(REPO)): _absolute_paths(p.read_text())[:2] for p in files if _absolute_paths(p.read_text())}
    assert not bad, bad
    for p in files:
        d = json.loads(p.read_text())
        if isinstance(d, dict):
            assert (d.get("committed_at") or d.get("code_commit") or d.get("meta", {}).get("code_commit")
                    or (d.get("provenance") or {}).get("commit")), p


def test_every_committed_records_md_is_what_its_json_renders():
    """The .md beside a bench or run record is written from its JSON alone (rendering.py), so a number in it can
    only come from the JSON; the migration script has nothing left to change."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("migrate_records", REPO / "eval" / "migrate_records.py")
    mig = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mig)
    checked = 0
    for path in mig.committed_files():
        out, md = mig.migrate(path)
        assert out == path.read_text(), f"{path} is not migrated"
        if md is not None:
            assert md == path.with_suffix(".md").read_text(), f"{path.with_suffix('.md')} is not its JSON's table"
            checked += 1
    assert checked > 30


def test_the_migration_shortens_paths_and_never_a_number():
    import importlib.util

    from drift_policy.provenance import machine_free_text

    spec = importlib.util.spec_from_file_location("migrate_records", REPO / "eval" / "migrate_records.py")
    mig = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mig)
    d = {"run_dir": "/work/runs/r19/drift_unet-s2", "x": [0.1, 1e-06, None, True, 3],
         "command": "drift-policy bench train runs=/work/runs/r19 'overrides=task.dataset=/work/data/can/low_dim.hdf5'",
         "text": "0.02 / 0.05 s/step, https://github.com/a/b"}
    out = mig._strings(d)
    assert out["run_dir"] == "<dir>/r19/drift_unet-s2" and mig._numbers(out) == mig._numbers(d)
    assert out["command"] == ("drift-policy bench train runs=<dir>/runs/r19 "
                              "'overrides=task.dataset=<dir>/can/low_dim.hdf5'")
    assert out["text"] == d["text"] and machine_free_text(out["command"]) == out["command"]     # idempotent
    # A moved folder takes its files along; a path that did not move stays.
    assert mig.new_path("eval/results/" + "compute_matched/lr_6e-4/pusht_keypoints.md") == \
        "eval/results/pusht_keypoints/levers/lr_6e-4/pusht_keypoints.md"
    assert mig.fix_references("see eval/results/" + "compute_matched/obs_origin/wide200/pusht_keypoints.md.") == \
        "see eval/results/pusht_keypoints/superseded/exact_placement/obs_origin/wide200/pusht_keypoints.md."
    assert mig.fix_references("`eval/results/" + "bench_train.{md,json,png}`, eval/results/" + "blockpush_{a,b}.json") == \
        "`eval/results/pusht_keypoints/superseded/wall_clock/bench_train.{md,json,png}`, " \
        "eval/results/blockpush_lowdim/default/blockpush_{a,b}.json"
    assert all(not (REPO / old).exists() and (REPO / new).exists() for old, new in mig.MOVES.items())


# ---- bench summary: stdout only without out= --------------------------------------------------------------------------
def _listing(d: Path) -> dict:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(d.rglob("*"))}


def test_bench_summary_without_out_writes_nothing(tmp_path, capsys):
    from drift_policy.bench import run_summary

    run = _run(tmp_path / "run")
    before = _listing(run)
    s = run_summary([f"run={run}"])
    assert _listing(run) == before                            # no plots/ in the run folder: stdout only
    assert s["plots"] == [] and "| 10 | 2.0 | 0.750 | 0.38 |" in capsys.readouterr().out
    assert s["provenance"]["commit"] and s["run_dir"].startswith("<dir>/") and s["seed"] == 0


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write into a read-only folder")
def test_bench_summary_reads_a_read_only_run(tmp_path, capsys):
    from drift_policy.bench import run_summary

    run = _run(tmp_path / "run")
    modes = {p: p.stat().st_mode for p in [run, *run.rglob("*")]}
    for p in modes:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        assert run_summary([f"run={run}"])["evals"]
    finally:
        for p, m in modes.items():
            p.chmod(m)


def test_bench_summary_of_a_folder_that_is_not_a_run_exits_2(tmp_path, capsys):
    from drift_policy.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "summary", f"run={tmp_path}"])
    assert e.value.code == 2 and "not a run folder" in capsys.readouterr().err


# ---- drift-policy results -----------------------------------------------------------------------------------------------
def test_the_committed_results_pages_are_what_the_command_writes():
    from drift_policy.errors import ConfigError
    from drift_policy.results import BEGIN, outputs

    index, docs, readme = REPO / "eval" / "results" / "index.yaml", REPO / "docs" / "results", REPO / "README.md"
    pages = outputs(index, None, docs)
    assert {p.name for p in pages} >= {"pusht_keypoints.md", "can_lowdim.md"}
    for path, text in pages.items():
        assert path.read_text() == text, f"{path}: run drift-policy results"
    if BEGIN in readme.read_text():
        assert readme.read_text() == outputs(index, readme, docs)[readme], "README.md: run drift-policy results"
    else:
        with pytest.raises(ConfigError, match="has no results block"):
            outputs(index, readme, docs)


def _fixture(tmp_path) -> tuple[Path, Path]:
    """An index of one task over a copy of one committed record, and a README with the markers."""
    src = REPO / "eval" / "results" / "can_lowdim" / "default"
    shutil.copytree(src, tmp_path / "results" / "can_lowdim" / "default")
    (tmp_path / "results" / "index.yaml").write_text(
        "tasks:\n  can_lowdim:\n    name: Can\n"
        "    default: {record: can_lowdim/default/can_neighbours/can_lowdim.json, "
        "label: \"drift_unet[policy.neighbor_positives=0]\"}\n"
        "    baseline: {record: can_lowdim/default/can1200k/can_lowdim.json, label: diffusion_unet}\n"
        "    published: {source: a paper, values: {Drifting: 0.98}}\n"
        "    levers:\n      - {lever: none, record: can_lowdim/default/can_neighbours/can_lowdim.json, "
        "label: \"drift_unet[policy.neighbor_positives=0]\", verdict: kept,\n"
        "         reference: {record: can_lowdim/default/can1200k/can_lowdim.json, label: drift_unet, seeds: [0]}}\n")
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nintro\n\n<!-- results:begin -->\nold table\n<!-- results:end -->\n\nthe rest\n")
    return tmp_path / "results" / "index.yaml", readme


def test_results_fills_the_readme_block_and_the_pages_and_check_catches_a_drifted_number(tmp_path, capsys):
    from drift_policy.cli import main
    from drift_policy.records import mean

    index, readme = _fixture(tmp_path)
    args = ["results", f"index={index}", f"readme={readme}", f"docs={tmp_path / 'docs'}"]
    main(args)
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n\n<!-- results:begin -->\n") and text.endswith(
        "<!-- results:end -->\n\nthe rest\n") and "old table" not in text
    rec = json.loads((tmp_path / "results/can_lowdim/default/can_neighbours/can_lowdim.json").read_text())
    last5 = [r["last5_score"] for r in rec["runs"]]
    row = next(x for x in text.splitlines() if x.startswith("| Can |"))
    assert f"success {mean(last5):.3f} ±" in row and "(seeds 0,1;" in row and "Drifting 0.98 (a paper)" in row
    assert "[can_lowdim.md](docs/can_lowdim.md)" in row
    page = (tmp_path / "docs" / "can_lowdim.md").read_text()
    assert f"({last5[0]:.3f}, {last5[1]:.3f})" in page and "| none |" in page and "| kept |" in page
    main([*args, "check=1"])
    assert "up to date" in capsys.readouterr().out
    # A number edited in the record (or in the README) is caught by check=1 until the command writes it again.
    rec["runs"][0]["last5_score"] += 0.01
    (tmp_path / "results/can_lowdim/default/can_neighbours/can_lowdim.json").write_text(json.dumps(rec))
    with pytest.raises(SystemExit) as e:
        main([*args, "check=1"])
    assert e.value.code == 1 and "README.md" in capsys.readouterr().out


def test_results_without_the_readme_markers_says_so_and_exits_2(tmp_path, capsys):
    from drift_policy.cli import main

    index, readme = _fixture(tmp_path)
    readme.write_text("# title\n\nno block here\n")
    with pytest.raises(SystemExit) as e:
        main(["results", f"index={index}", f"readme={readme}", f"docs={tmp_path / 'docs'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "has no results block" in err and "<!-- results:begin -->" in err
    assert not (tmp_path / "docs").exists()                    # nothing written by a refused command


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.replace("verdict: kept", "verdict: maybe"), "verdict must be one of"),
    (lambda s: s.replace('label: diffusion_unet', 'label: nobody'), "no variant 'nobody'"),
    (lambda s: s.replace("can1200k/can_lowdim.json, label: diffusion", "gone.json, label: diffusion"), "no record at"),
    (lambda s: s.replace("    name: Can\n", ""), "needs 'name' and 'default'"),
])
def test_a_wrong_index_is_a_one_line_error_naming_it(tmp_path, edit, message):
    from drift_policy.errors import ConfigError
    from drift_policy.results import outputs

    index, readme = _fixture(tmp_path)
    index.write_text(edit(index.read_text()))
    with pytest.raises(ConfigError, match=message):
        outputs(index, readme, tmp_path / "docs")


def test_a_reach_record_becomes_one_sentence_with_its_ratio_and_an_unreached_target_says_so(tmp_path):
    from drift_policy.results import _reach

    def write(held_b):
        rec = {"target": 0.95, "result": {"drift_unet": {"seeds": [0, 1], "held": 600000},
                                          "diffusion_unet": {"seeds": [0], "held": held_b}}}
        (tmp_path / "reach.json").write_text(json.dumps(rec))
        return _reach({"name": "T", "reach": {"record": "reach.json"}}, tmp_path / "index.yaml", tmp_path)

    text = write(800000)
    assert "reach and hold 0.95" in text and "drift_unet 0.60M sample-passes (seeds 0,1)" in text
    assert "diffusion_unet 0.80M sample-passes (seed 0)" in text and "ratio drift_unet / diffusion_unet 0.75" in text
    text = write(None)
    assert "diffusion_unet not reached" in text and "ratio" not in text
    assert _reach({"name": "T"}, tmp_path / "index.yaml", tmp_path) == ""


def test_a_bench_record_of_an_image_task_counts_encoder_passes_beside_sample_passes(tmp_path):
    """Issue 39: with cameras the record and its table carry images through the encoder, per run and per
    evaluation; drift (32 x G=2) encodes half the images of the baseline (64) at the same sample-passes."""
    from drift_policy.bench import bench_train

    img = ["task=pusht_image"]
    _run(tmp_path / "runs" / "drift_unet-s0", 0, overrides=[*img, "policy=drift_unet"])
    _run(tmp_path / "runs" / "diffusion_unet-s0", 0, overrides=[*img, "policy=diffusion_unet"])
    path = bench_train(["report_only=1", "budget=640", "seeds=0", "policies=drift_unet,diffusion_unet", "task=pusht_image",
                        f"runs={tmp_path / 'runs'}", f"out={tmp_path / 'out'}"])
    rec = json.loads(path.read_text())
    by = {r["policy"]: r for r in rec["runs"]}
    assert by["drift"]["sample_passes"] == by["diffusion"]["sample_passes"] == 640
    assert by["drift"]["encoder_passes"] == 640 and by["diffusion"]["encoder_passes"] == 2 * 640   # To = 2
    for r in rec["runs"]:
        assert [e["encoder_passes"] for e in r["evals"]] == [e["steps"] * r["encoder_passes_per_step"] for e in r["evals"]]
    md = path.with_suffix(".md").read_text()
    assert "| sample-passes | encoder passes |" in md and "| 640 | 1,280 |" in md and "| 640 | 640 |" in md
    low = _run(tmp_path / "low" / "drift_unet-s0", 0)
    from drift_policy.records import run_record

    assert run_record(low)["encoder_passes"] == 0


def test_an_image_bench_record_shows_the_same_runs_at_equal_training_time(tmp_path):
    """Issue 39: drift's cheaper visual step counts at equal wall-clock. The quickest variant's minutes for its whole
    budget (mean over seeds) is the cut; the other variant is scored by its evaluations made within it."""
    from drift_policy.bench import bench_train
    from drift_policy.records import equal_minutes

    img = ["task=pusht_image"]
    scores = (0.2, 0.4, 0.6, 0.8)
    _run(tmp_path / "runs" / "drift_unet-s0", 0, scores, overrides=[*img, "policy=drift_unet"], minutes=(1, 2, 3, 4))
    _run(tmp_path / "runs" / "drift_unet-s1", 1, scores, overrides=[*img, "policy=drift_unet"], minutes=(1, 2, 3, 6))
    _run(tmp_path / "runs" / "diffusion_unet-s0", 0, (0.3, 0.5, 0.7, 0.9), overrides=[*img, "policy=diffusion_unet"],
         minutes=(2, 4, 6, 8))
    for d in (tmp_path / "runs").iterdir():                        # finished: the policy is saved
        runs.pretrained_dir(d).mkdir(parents=True)
        (runs.pretrained_dir(d) / "model.safetensors").write_bytes(b"")
    path = bench_train(["report_only=1", "budget=640", "seeds=0,1", "policies=drift_unet,diffusion_unet",
                        "task=pusht_image", f"runs={tmp_path / 'runs'}", f"out={tmp_path / 'out'}"])
    rec = json.loads(path.read_text())
    same = equal_minutes(rec["runs"])
    assert same["minutes"] == 5.0                                   # drift: (4 + 6) / 2, diffusion 8
    dr, df = same["variants"]["drift_unet"], same["variants"]["diffusion_unet"]
    assert dr["score"] == pytest.approx(0.7) and dr["minutes"] == 5.0   # seed 0 at its end (0.8), seed 1 at 3 min (0.6)
    assert df["score"] == pytest.approx(0.5) and df["success"] == pytest.approx(0.25) and df["minutes"] == 8.0
    assert df["last5_score"] == pytest.approx(0.4) and df["sample_passes"] == 320       # evaluations at 2 and 4 min
    md = path.with_suffix(".md").read_text()
    assert "within 5.0 training minutes" in md and "| diffusion_unet | 8.0 | 320 | 0.500 | 0.25 | 0.400 |" in md
    # an unfinished variant, or runs without cameras, get no such table
    assert equal_minutes([{**r, "complete": False} if r["seed"] == 1 else r for r in rec["runs"]]) is None
    from drift_policy.rendering import bench_markdown

    assert "equal training time" not in bench_markdown({**rec, "runs": [{**r, "encoder_passes": 0} for r in rec["runs"]]})


def test_episode_flags_reach_the_bench_record_and_the_results_cells_that_name_them(tmp_path):
    """BlockPush's p1 / p2 and mode fractions, Kitchen's p1..p4: every evaluation's flags are in the record, their
    last-5 means per variant in its table, and in the results cells of a task whose index entry names them."""
    from drift_policy.bench import bench_train
    from drift_policy.results import outputs

    p1s = {0: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 1: [0.0, 0.0, 0.2, 0.2, 0.4, 0.4]}
    for seed, p1 in p1s.items():
        d = _run(tmp_path / "runs" / f"drift_unet-s{seed}", seed, scores=[x / 2 for x in p1])
        for f, x in zip(runs.eval_files(d), p1):
            r = json.loads(f.read_text())
            f.write_text(json.dumps({**r, "p1": x, "p2": x / 4, "flags": ["p1", "p2"]}))
    path = bench_train(["report_only=1", "budget=640", "seeds=0,1", "policies=drift_unet",
                        f"runs={tmp_path / 'runs'}", f"out={tmp_path / 'results' / 'bp'}"])
    rec = json.loads(path.read_text())
    run0 = next(r for r in rec["runs"] if r["seed"] == 0)
    assert [e["flags"]["p1"] for e in run0["evals"]] == p1s[0]
    want = (sum(p1s[0][-5:]) / 5 + sum(p1s[1][-5:]) / 5) / 2
    assert rec["summary"]["drift_unet"]["last5_flags"]["p1"] == pytest.approx(want)
    md = path.with_suffix(".md").read_text()
    assert "| variant | p1 | p2 |" in md and f"| drift_unet | {want:.2f} | {want / 4:.2f} |" in md
    assert "drift_unet seed 1: " in md and "p1 0.40, p2 0.10" in md               # every evaluation's flags
    index = tmp_path / "results" / "index.yaml"
    entry = "tasks:\n  bp:\n    name: BP\n    default: {record: bp/pusht_keypoints.json, label: drift_unet}\n"
    index.write_text(entry)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:begin -->\n<!-- results:end -->\n")
    assert "p1 " not in outputs(index, readme, tmp_path / "docs")[readme]              # not named: not shown
    index.write_text(entry + "    flags: [p1]\n")
    row = next(x for x in outputs(index, readme, tmp_path / "docs")[readme].splitlines() if x.startswith("| BP |"))
    assert f"; p1 {want:.2f}" in row and "p2" not in row
