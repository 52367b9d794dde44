"""Retention settings (issue 15): read from the environment, checked before anything runs."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.retention import RetentionPolicy

_BASE = RetentionPolicy()


def test_defaults_keep_raw_a_month_minutes_over_a_year_and_buckets_for_ever() -> None:
    assert RetentionPolicy.from_env({}, _BASE).days() == (30, 400, None)
    assert not RetentionPolicy.set_in({})
    assert not RetentionPolicy.set_in({"PIPELINE_RETENTION_RAW_DAYS": " "})


@pytest.mark.parametrize(
    ("env", "days"),
    [
        ({"PIPELINE_RETENTION_RAW_DAYS": "7"}, (7, 400, None)),
        ({"PIPELINE_RETENTION_MINUTE_DAYS": "0"}, (30, None, None)),
        ({"PIPELINE_RETENTION_MINUTE_DAYS": "forever"}, (30, None, None)),
        ({"PIPELINE_RETENTION_MINUTE_DAYS": "00"}, (30, None, None)),
        ({"PIPELINE_RETENTION_10MIN_DAYS": "3650"}, (30, 400, 3650)),
        (
            {"PIPELINE_RETENTION_RAW_DAYS": "400", "PIPELINE_RETENTION_MINUTE_DAYS": "400"},
            (400, 400, None),
        ),
    ],
)
def test_what_the_environment_sets_replaces_the_base(
    env: dict[str, str], days: tuple[int | None, ...]
) -> None:
    assert RetentionPolicy.set_in(env)
    assert RetentionPolicy.from_env(env, _BASE).days() == days


def test_unset_levels_keep_the_stored_values() -> None:
    stored = RetentionPolicy(10, 20, 30)
    assert RetentionPolicy.from_env({"PIPELINE_RETENTION_RAW_DAYS": "5"}, stored).days() == (
        5,
        20,
        30,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PIPELINE_RETENTION_RAW_DAYS": "7d"}, "PIPELINE_RETENTION_RAW_DAYS='7d' is not a whole"),
        ({"PIPELINE_RETENTION_RAW_DAYS": "-1"}, "PIPELINE_RETENTION_RAW_DAYS='-1' is not a whole"),
        ({"PIPELINE_RETENTION_RAW_DAYS": "²"}, "PIPELINE_RETENTION_RAW_DAYS='²' is not a whole"),
        (
            {"PIPELINE_RETENTION_RAW_DAYS": "100001"},
            "PIPELINE_RETENTION_RAW_DAYS=100001 is outside",
        ),
        (
            {"PIPELINE_RETENTION_RAW_DAYS": "500"},
            (
                "PIPELINE_RETENTION_RAW_DAYS=500 keeps raw data longer than "
                "PIPELINE_RETENTION_MINUTE_DAYS=400"
            ),
        ),
        (
            {"PIPELINE_RETENTION_RAW_DAYS": "0"},
            "PIPELINE_RETENTION_RAW_DAYS=0 (for ever) keeps raw data longer than",
        ),
        (
            {"PIPELINE_RETENTION_10MIN_DAYS": "100"},
            (
                "PIPELINE_RETENTION_MINUTE_DAYS=400 keeps minute data longer than "
                "PIPELINE_RETENTION_10MIN_DAYS=100"
            ),
        ),
    ],
)
def test_bad_values_name_the_variable_and_the_value(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        RetentionPolicy.from_env(env, _BASE)
