"""reports.learn_field_types: a test process must inherit os.PathLike's answers, not find them again."""

from __future__ import annotations

import abc
import os

import pytest

from pytest_isolate.plugin.reports import learn_field_types


def _known_not_pathlike() -> set[type]:
    return {ref() for ref in abc._get_dump(os.PathLike)[2]}  # type: ignore[attr-defined]


def test_field_types_are_cached_after_learning() -> None:
    abc._reset_caches(os.PathLike)  # type: ignore[attr-defined]
    assert str not in _known_not_pathlike()
    learn_field_types()
    assert {str, int, float, bool, type(None), list, tuple, dict} <= _known_not_pathlike()


def test_every_field_of_a_report_has_a_learned_type(pytester: pytest.Pytester) -> None:
    """If pytest adds a field of another type, a test process pays for it again: this says so."""
    pytester.makepyfile("def test_one(): pass")
    reports = pytester.inline_run().getreports("pytest_runtest_logreport")
    abc._reset_caches(os.PathLike)  # type: ignore[attr-defined]
    learn_field_types()
    known = _known_not_pathlike()
    for report in reports:
        data = report._to_json()
        assert {type(value) for value in data.values()} <= known
