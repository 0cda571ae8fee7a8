"""docs/sampling.md's "Coming from diffusers" example runs as written (with the installed diffusers)."""
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "sampling.md"


def test_coming_from_diffusers_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    section = DOC.read_text().split("## Coming from diffusers", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{DOC}:Coming from diffusers", "exec"), {})
    assert (tmp_path / "ddim.png").is_file()
