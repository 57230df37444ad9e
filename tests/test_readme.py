"""README's two commands are the ones CI and users run."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _commands():
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_readme_starts_with_install_and_run_then_the_test_command():
    commands = _commands()
    assert commands[0].endswith("vlm-lora finetune recipes/quickstart.yaml")
    assert commands[1].endswith("python -m pytest -q")
    assert commands[0].split(" && vlm-lora")[0] == commands[1].split(" && python -m pytest")[0]


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert _commands()[1] in ci_lines
