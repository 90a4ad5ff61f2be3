"""The test tiers (tests/conftest.py TIERS) cover every test module, their markers are registered, and tests of the
product never import the benchmarks (tests/test_bench*.py are the benchmarks' own smoke tests and may)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def conftest():
    import importlib.util

    spec = importlib.util.spec_from_file_location("srd_tests_conftest", TESTS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_test_module_has_a_tier():
    module = conftest()
    tiers = module.TIERS
    missing = sorted(path.stem for path in TESTS.glob("test_*.py") if module.tier_of(path.stem) is None)
    assert not missing, f"add these test modules to TIERS in tests/conftest.py: {missing}"
    assert set(tiers.values()) <= {"fast", "ray", "slow"}
    for key in tiers:  # a single test's entry names a test that exists
        if "::" in key:
            module, test = key.split("::")
            assert re.search(rf"^def {test}\(", (TESTS / f"{module}.py").read_text(), re.MULTILINE), key


def test_tier_markers_are_registered():
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    registered = {line.split(":", 1)[0].strip() for line in options["markers"]}
    assert {"fast", "ray", "slow"} <= registered


def test_product_tests_do_not_import_the_benchmarks():
    importing = re.compile(r"^\s*(from bench(\.| import)|import bench\b)", re.MULTILINE)
    offenders = sorted(path.name for path in TESTS.glob("test_*.py")
                       if not path.name.startswith("test_bench") and importing.search(path.read_text()))
    assert not offenders, f"these tests import bench/: {offenders}"
