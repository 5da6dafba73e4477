"""The README's Task snippet runs exactly as written, from a directory of its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _task_snippet() -> str:
    section = README.read_text().split("## Writing a Task", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_task_snippet_runs_as_written(tmp_path):
    (tmp_path / "snippet.py").write_text(_task_snippet())
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True,
        env=env, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    trained, new_instance, best = (eval(x) for x in lines[:3])  # noqa: S307 - our own output
    assert trained == new_instance
    assert trained["val/accuracy"] > 0.8  # 38 held-out wines; chance is 1/3
    assert best["test/accuracy"] >= trained["val/accuracy"] - 1e-6
    assert (tmp_path / "runs" / "wine" / "checkpoints").is_dir()


def test_the_readme_links_point_at_files_that_exist():
    # The README is the newcomer's page; everything else is linked (docs/, benchmarks/).
    text = README.read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert "docs/task_guide.md" in local and "benchmarks/README.md" in local
    missing = [link for link in local if not (README.parent / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
