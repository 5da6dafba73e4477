"""The README's Task snippet runs exactly as written, from a directory of its own."""

from __future__ import annotations

import re
from pathlib import Path

from wine_snippet import run_wine_example

README = Path(__file__).resolve().parents[1] / "README.md"


def _task_snippet() -> str:
    section = README.read_text().split("## Writing a Task", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_task_snippet_runs_as_written(tmp_path):
    run_wine_example(_task_snippet(), tmp_path)
    assert (tmp_path / "runs" / "wine" / "checkpoints").is_dir()


def test_the_readme_links_point_at_files_that_exist():
    # The README is the newcomer's page; everything else is linked (docs/, benchmarks/).
    text = README.read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert "docs/task_guide.md" in local and "benchmarks/README.md" in local
    missing = [link for link in local if not (README.parent / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
