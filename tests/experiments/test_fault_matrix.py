"""experiments/fault_matrix.py: what counts as lost, stuck or unclean, the table and exit
status (fast), and a few real cases end to end (slow)."""
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, load_experiment

fm = load_experiment("fault_matrix")


def result(rc, err="", out=""):
    return fm.Result(rc, out, err, 1.0)


def test_lost_counts_intact_checkpoints_gone_and_config_rewritten():
    before = ({2: "a", 4: "b", 6: "c"}, "cfg")
    assert fm.lost(before, ({2: "a", 4: "b", 6: "c"}, "cfg")) == []
    assert fm.lost(before, ({2: "a", 4: "b"}, "cfg")) == ["checkpoint 6"]
    # a corrupt step moved aside and saved again counts as kept
    assert fm.lost(before, ({2: "a", 4: "b"}, "cfg"), replaced_ok=(6,)) == []
    # rotated out by keep_checkpoints=3 once three newer verified ones exist
    assert fm.lost(before, ({8: "", 10: "", 12: ""}, "cfg")) == []
    # ... but not when an older one is still there
    assert fm.lost(before, ({4: "", 8: "", 10: ""}, "cfg")) == ["checkpoint 6"]
    assert fm.lost(before, ({8: "", 10: ""}, "cfg")) == ["checkpoint 2", "checkpoint 4",
                                                        "checkpoint 6"]
    assert fm.lost(before, ({2: "a", 4: "b", 6: "c"}, "new")) == ["config.json"]
    assert fm.lost(before, ({2: "a", 4: "b", 6: "c"}, "new"), config_may_change=True) == []
    assert fm.lost(({}, None), ({}, "new")) == []


def test_one_line_means_one_error_line_and_no_traceback():
    assert fm.one_line(result(2, "error: config.optim.lr=inf is not a finite number\n"))
    assert fm.one_line(result(2, "python -m us3l_jax.evaluate: error: --widths is empty\n"))
    assert fm.one_line(result(2, "W1205 warning line\nerror: bad\n"))
    assert not fm.one_line(result(2, "error: a\nerror: b\n"))
    assert not fm.one_line(result(1, "Traceback (most recent call last):\nValueError: x\n"))
    assert not fm.one_line(result(2, "error: x\n", out="Traceback (most recent call last)"))
    assert not fm.one_line(result(2, "ValueError: x\n"))
    assert fm.first_error(result(None, "", "step 3")) == "timed out; step 3"


def test_verdict_fails_on_any_lost_stuck_unequal_or_unclean_row():
    ok = fm.Row("g", "fine", "", [0], True, bitwise=True)
    assert fm.verdict([ok])["exit_status"] == 0
    bad = [fm.Row("g", "lost", "", [0], True, lost=["checkpoint 6"]),
           fm.Row("g", "stuck", "", [None], True, stuck=True),
           fm.Row("g", "unequal", "", [0, 0], True, bitwise=False),
           fm.Row("bad input", "unclean", "", [1], False, bad_input=True)]
    for row in bad:
        assert fm.verdict([ok, row])["exit_status"] == 1, row.case
    v = fm.verdict([ok] + bad)
    assert (v["cases"], v["failed"], v["lost"], v["stuck"], v["bad_inputs"],
            v["bad_inputs_unclean"], v["bitwise_checked"], v["bitwise_equal"]) == \
        (5, 4, 1, 1, 1, 1, 2, 1)


def test_table_has_the_columns_and_one_row_per_case():
    rows = [fm.Row("signals", "kill -9 while training", "", [-9, 0], True, bitwise=True,
                   detail="152 leaves | equal"),
            fm.Row("bad input", "main: lr=inf", "", [2], True, bad_input=True),
            fm.Row("workdir", "renamed", "", [0, None], False, bitwise=False, stuck=True),
            fm.Row("corrupt", "flip", "", [0], True, bitwise=True, lost=["checkpoint 4"])]
    lines = fm.table(rows).splitlines()
    assert lines[0] == ("| group | case | outcome | exit | bitwise equal to the uninterrupted "
                        "run | lost | detail |")
    assert lines[2] == "| signals | kill -9 while training | ok | -9/0 | yes | - | 152 leaves " \
                       "/ equal |"
    assert lines[3] == "| bad input | main: lr=inf | ok | 2 | - | - |  |"
    assert lines[4] == "| workdir | renamed | STUCK | 0/timeout | NO | - |  |"
    assert lines[5] == "| corrupt | flip | LOST | 0 | yes | checkpoint 4 |  |"


def test_only_and_quick_select_cases(tmp_path):
    m = fm.Matrix(str(tmp_path), ["kill", "lr="], quick=True)
    assert m.want("kill -9 while training") and m.want("main: lr=inf")
    assert not m.want("latest checkpoint: truncated data file")
    assert not m.want("kill -9 something slow", slow=True)
    listing = fm.Matrix("", [], quick=False, listing=True)
    for group in fm.GROUPS:
        group(listing)
    assert listing.rows == [] and len(listing.names) == len(set(listing.names)) >= 60
    for needed in ("kill -9 during a checkpoint save", "SIGTERM while training",
                   "all checkpoints: 64 flipped bytes, then --start_over",
                   "all checkpoints: checksum file missing", "config.json missing",
                   "model changed (base_width 32)", "width range changed",
                   "failed override (--allow_config_change to AdamW)",
                   "NaN (lr 1e30 with --allow_config_change)", "lock file removed mid-run",
                   "read-only workdir (read-only mount)", "workdir deleted mid-run",
                   "workdir renamed mid-run", "workdir unmounted mid-run (tmpfs)",
                   "unprivileged: workdir not writable", "export: corrupt bn_stats file",
                   "export: garbage sweep.json", "profile unknown model"):
        assert needed in listing.names, needed


@pytest.mark.slow
def test_a_few_cases_end_to_end(tmp_path):
    """Two bad inputs and a kill -9 mid-training whose resume must equal the uninterrupted
    run bit for bit (about two minutes: the base and reference runs come first)."""
    out = tmp_path / "matrix.json"
    p = subprocess.run([sys.executable, "experiments/fault_matrix.py", f"--out={out}",
                        "--only=main: reg_alpha,main: key in the wrong,kill -9 while training"],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    record = json.loads(out.read_text())
    rows = {r["case"]: r for r in record["rows"]}
    assert sorted(rows) == ["kill -9 while training", "main: key in the wrong section",
                            "main: reg_alpha=-1"], p.stdout[-3000:]
    assert rows["main: reg_alpha=-1"]["exit"] == [2] and rows["main: reg_alpha=-1"]["ok"]
    assert rows["kill -9 while training"]["exit"] == [-9, 0]
    assert rows["kill -9 while training"]["bitwise"] is True, rows["kill -9 while training"]
    assert (record["failed"], record["lost"], record["stuck"], record["exit_status"]) == \
        (0, 0, 0, 0), p.stdout[-3000:]
    assert p.returncode == 0
    assert "| signals | kill -9 while training | ok | -9/0 | yes | - |" in p.stdout
