"""docs/fidelity.md: every config field it names exists, and the repository cites no document
outside itself (the fidelity facts live in docs/fidelity.md)."""
import os
import re
import subprocess

from us3l_jax import config as config_lib
from tests.helpers import REPO

SECTIONS = ("model", "heads", "method", "sampler", "data", "optim", "train", "eval")


def test_fidelity_fields_exist():
    with open(os.path.join(REPO, "docs", "fidelity.md")) as f:
        text = f.read()
    names = set(re.findall(rf"`((?:{'|'.join(SECTIONS)})\.[a-z_]+)", text))
    assert {"method.update_mode", "method.decay_rule", "eval.calibration"} <= names
    default = config_lib.get_default()
    missing = [n for n in sorted(names) if n.split(".")[1] not in default[n.split(".")[0]]]
    assert not missing, f"docs/fidelity.md names config fields that do not exist: {missing}"


def test_no_citations_of_documents_outside_the_repository():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"reference\s+§|DESIGN\.md|official_us3l\.md|shared/(?:paper|reference)")
    hits = []
    for name in files:
        if name.endswith((".py", ".md", ".ipynb", ".txt", ".cfg", ".toml")) and \
                name != "tests/test_docs.py":
            with open(os.path.join(REPO, name), encoding="utf-8", errors="replace") as f:
                hits += [f"{name}:{i}" for i, line in enumerate(f, 1) if pattern.search(line)]
    assert not hits, f"citations of documents outside the repository: {hits}"
