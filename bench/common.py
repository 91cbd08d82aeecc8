"""Shared by the benchmark scripts: print a markdown report and save it under build/bench/."""

from pathlib import Path


def save_report(lines: list[str], name: str) -> Path:
    """Print the report and write it to ``build/bench/NAME.md`` (the folder is created)."""
    text = "\n".join(lines)
    print(text)
    out = Path("build/bench")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.md"
    path.write_text(text + "\n")
    return path
