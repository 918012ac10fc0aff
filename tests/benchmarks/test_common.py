"""benchmarks/_common.py: result files are named `*.json` (demo_training.py once wrote one without the suffix)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from .scripts import BENCHMARKS, load_script

common = load_script("_common")


def test_write_json_needs_a_json_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="demo_training_cpu"):
        common.write_json("demo_training_cpu", {}, None)
    path = common.write_json("x.json", {"a": 1}, str(tmp_path / "x.json"))
    assert json.loads(path.read_text()) == {"a": 1}


def test_every_benchmark_names_its_result_file_json() -> None:
    """Literal names passed to write_json by the scripts end in .json (f-strings are checked by their tail)."""
    calls = 0
    for script in sorted(BENCHMARKS.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "write_json":
                calls += 1
                name = node.args[0]
                tail = name.values[-1] if isinstance(name, ast.JoinedStr) else name
                assert isinstance(tail, ast.Constant) and str(tail.value).endswith(".json"), script.name
    assert calls >= 4  # training, inference, memory, demo_training: the walk found the calls it checks
