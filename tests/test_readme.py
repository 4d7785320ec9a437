"""README's two set-up commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    main_job, tests = _setup_commands()
    assert main_job.endswith("lnfree demo")
    assert tests.endswith("-m pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci
