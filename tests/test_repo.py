"""The README's commands are exactly what CI runs."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _fenced_commands(text: str) -> list:
    blocks, inside, current = [], False, []
    for line in text.splitlines():
        if line.startswith("```"):
            if inside:
                blocks.append("\n".join(current).strip())
                current = []
            inside = not inside
        elif inside:
            current.append(line)
    return blocks


def test_ci_runs_the_readme_setup_and_test_commands():
    readme = (REPO / "README.md").read_text()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    setup, test = _fenced_commands(readme)[:2]
    assert setup == 'pip install -r requirements.txt -e ".[dev]"'
    assert test == "python -m pytest -q"
    assert setup in ci_lines and test in ci_lines
    assert ci_lines.index(setup) < ci_lines.index(test)


def test_requirements_pin_torch_exactly():
    reqs = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert "torch==2.13.0" in reqs
    assert any(r.startswith("megatron-core>=0.16,<0.17") for r in reqs)
