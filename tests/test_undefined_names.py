"""The benchmark scripts (and the library's modules) import, and every global name their functions read exists.

The tests do not run ``bench/`` (minutes each, real data), so a name lost in a refactor only
shows when someone runs ``make bench``: ``bench_generate.py`` read ``data.load_prepared`` for a
while after ``synthgen.data`` stopped being imported there.
"""

from __future__ import annotations

import builtins
import dis
import importlib.util
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
LIBRARY = sorted((ROOT / "synthgen").rglob("*.py")) + sorted((ROOT / "flows").glob("*.py"))


def global_reads(code: types.CodeType):
    """Names every function nested in ``code`` reads as globals."""
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from (i.argval for i in dis.get_instructions(constant) if i.opname == "LOAD_GLOBAL")
            yield from global_reads(constant)


@pytest.mark.parametrize("script", sorted(BENCH.glob("*.py")), ids=lambda path: path.name)
def test_bench_script_reads_only_names_it_defines(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # as `python bench/x.py` does: its helpers (bench/workdir.py) import
    spec = importlib.util.spec_from_file_location(f"_bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the scripts act only under `if __name__ == "__main__"`
    missing = undefined_reads(module, script)
    assert not missing, f"{script.name} reads undefined globals: {missing}"


def undefined_reads(module: types.ModuleType, path: Path) -> list[str]:
    code = compile(path.read_text(), str(path), "exec")
    return sorted({name for name in global_reads(code) if name not in vars(module) and not hasattr(builtins, name)})


@pytest.mark.parametrize("path", LIBRARY, ids=lambda path: str(path.relative_to(ROOT)))
def test_library_module_reads_only_names_it_defines(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    module = importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert not undefined_reads(module, path), f"{path.name} reads undefined globals: {undefined_reads(module, path)}"


def test_the_check_catches_an_undefined_global(tmp_path):
    code = compile("import os\n\ndef f():\n    return os.sep, data.load()\n", "x.py", "exec")
    assert set(global_reads(code)) == {"os", "data"}
