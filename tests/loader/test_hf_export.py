"""hf_export's directory handling: whole numbers for transformers, refusing a used -o, swapping in by renames."""

from __future__ import annotations

import pytest

from lmkernel.errors import LmkError
from lmkernel.loader.hf_export import _whole, prepare_output, publish


def test_whole_numbers_become_ints():
    assert [(v, type(v)) for v in (_whole(2.0), _whole(0.5), _whole(3))] == [(2, int), (0.5, float), (3, int)]
    assert _whole(None) is None


def test_prepare_output_refuses_a_used_directory_unless_overwriting(tmp_path):
    prepare_output(tmp_path / "new", overwrite=False)
    (tmp_path / "empty").mkdir()
    prepare_output(tmp_path / "empty", overwrite=False)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "config.json").write_text("{}")
    (tmp_path / "file").write_text("x")
    for taken in (tmp_path / "used", tmp_path / "file"):
        with pytest.raises(LmkError) as err:
            prepare_output(taken, overwrite=False)
        assert str(err.value) == f"-o {taken}: already exists and is not empty; pass --overwrite to replace it"
        prepare_output(taken, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "used"]


def test_publish_moves_a_new_directory_and_replaces_an_old_one(tmp_path):
    out = tmp_path / "model"
    for version in ("one", "two"):
        tmp = tmp_path / f".model.{version}"
        tmp.mkdir()
        (tmp / "config.json").write_text(version)
        publish(tmp, out)
        assert not tmp.exists()
        assert [(p.name, p.read_text()) for p in out.iterdir()] == [("config.json", version)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
