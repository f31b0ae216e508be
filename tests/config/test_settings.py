"""`setting`: a field's help, CLI type and flag in its metadata; `flag_of`: the flag a field goes by."""

from __future__ import annotations

import dataclasses

import pytest

from lmkernel.config import EngineConfig, ServerConfig
from lmkernel.config.settings import flag_of, setting


@dataclasses.dataclass(frozen=True)
class _Sample:
    plain: int = setting(3, "a number")
    typed: str | None = setting(None, "a name", cli=str)
    hidden: object = setting(None, "not on the command line", cli=None)
    renamed: int = setting(7, "under another flag", flag="--other-name")
    list_default: tuple[int, ...] = setting((), "an empty tuple")


def _meta(name: str) -> dict:
    return dict(next(f.metadata for f in dataclasses.fields(_Sample) if f.name == name))


def test_setting_keeps_the_default_and_records_only_what_was_given() -> None:
    assert _Sample() == _Sample(3, None, None, 7, ())
    assert _meta("plain") == {"help": "a number"}
    assert _meta("typed") == {"help": "a name", "cli": str}
    assert _meta("hidden") == {"help": "not on the command line", "cli": None}  # None is a choice, not "unset"
    assert _meta("renamed") == {"help": "under another flag", "flag": "--other-name"}


@pytest.mark.parametrize(("name", "flag"), [("plain", "--plain"), ("list_default", "--list-default"),
                                            ("renamed", "--other-name")])
def test_flag_of_is_the_fields_own_flag_or_its_dashed_name(name: str, flag: str) -> None:
    assert flag_of(_Sample, name) == flag
    assert flag_of(_Sample(), name) == flag  # the class or an instance


def test_flag_of_the_real_configs() -> None:
    assert flag_of(EngineConfig, "max_num_batched_tokens") == "--max-num-batched-tokens"
    assert EngineConfig().flag("kv_cache_fraction") == "--kv-cache-fraction"
    assert flag_of(ServerConfig, "requests_per_minute") == "--rate-limit-rpm"
    assert flag_of(ServerConfig, "tokens_per_minute") == "--rate-limit-tpm"



def test_flag_of_a_setting_that_does_not_exist_is_named() -> None:
    with pytest.raises(ValueError, match="^EngineConfig has no setting 'gpu_count'$"):
        flag_of(EngineConfig, "gpu_count")
