"""Parsing and validation of sandbox arguments (pure functions, no kernel)."""

from __future__ import annotations

import pytest

from pytest_isolate.engine.spec import SandboxSpec, SpecError, build_spec, parse_size


@pytest.mark.parametrize(
    ("value", "expected"),
    [("256M", 256 * 2**20), ("1.5G", int(1.5 * 2**30)), ("512Ki", 512 * 1024), ("64MiB", 64 * 2**20), (4096, 4096), ("100", 100)],
)
def test_sizes_are_binary(value: object, expected: int) -> None:
    assert parse_size(value, "memory", "from marker on t") == expected


@pytest.mark.parametrize("value", ["256Q", "", "-1M", "0", True, 1.5, None])
def test_bad_sizes_name_the_source(value: object) -> None:
    with pytest.raises(SpecError, match="memory=.* from marker on test_x"):
        parse_size(value, "memory", "from marker on test_x")


def test_unknown_unit_is_named() -> None:
    with pytest.raises(SpecError, match="memory='256Q' from marker on test_x: unknown unit Q"):
        parse_size("256Q", "memory", "from marker on test_x")


def test_defaults_and_overrides(tmp_path: object) -> None:
    spec = build_spec({"net": "host", "hostname": "a-b.c"}, "here")
    assert spec == SandboxSpec(net="host", hostname="a-b.c")
    assert build_spec({}, "here") == SandboxSpec()


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        ({"net": "bridge"}, "net='bridge' here: expected one of 'none', 'host'"),
        ({"hostname": "-bad"}, "hostname='-bad' here"),
        ({"hostname": "x" * 65}, "hostname="),
        ({"user_namespace": 1}, "user_namespace=1 here"),
        ({"pids": 0}, "pids=0 here: expected a positive integer"),
        ({"pids": 2.5}, "pids=2.5 here: expected a positive integer"),
        ({"cpus": float("inf")}, "cpus=inf here: expected a positive number"),
        ({"bogus": 1, "other": 2}, "unknown arguments bogus, other here"),
    ],
)
def test_invalid_values(values: dict[str, object], pattern: str) -> None:
    with pytest.raises(SpecError, match=pattern.replace("(", r"\(").replace("[", r"\[")):
        build_spec(values, "here")


def test_writable_resolves_relative_to_base(tmp_path: "object") -> None:
    import pathlib

    base = pathlib.Path(str(tmp_path))
    (base / "data").mkdir()
    spec = build_spec({"writable": "data"}, "here", base=str(base))
    assert spec.writable == (str((base / "data").resolve()),)
    with pytest.raises(SpecError, match="is not an existing directory"):
        build_spec({"writable": ["nope"]}, "here", base=str(base))


@pytest.mark.parametrize("text", ["256mb", "256MB", "256mB", "256m", "256M", "256MiB"])
def test_size_suffix_b_in_any_case(text: str) -> None:
    assert parse_size(text, "memory", "here") == 256 * 2**20
