"""The packed cache: a GGUF's k-quant layers kept in the decode layout after a first load, mapped by later
loads; a stale, damaged or hostile cache file is packed over, never read past its end or trusted."""

from __future__ import annotations

import json
import os
import struct
import threading

import pytest
import torch
from tiny_gguf import T, write_llama_gguf

from lmkernel import load_model
from lmkernel.layers import cpu_kernels
from lmkernel.layers.linear import GGUFLinear
from lmkernel.loader import packed_cache
from lmkernel.loader.packed_cache import MAGIC, PAGE, PackedLayer

# Q4_K and Q6_K layers (packed at load) beside types that are not.
TYPES = {
    "blk.0.attn_q.weight": T.Q4_K,
    "blk.0.ffn_up.weight": T.Q4_K,
    "blk.0.ffn_down.weight": T.Q6_K,
    "blk.1.ffn_gate.weight": T.Q6_K,
    "blk.1.attn_q.weight": T.Q8_0,
}


def outputs(model) -> dict[str, torch.Tensor]:
    """Each packed layer's product on fixed rows (the file's k-quant blocks are random, so the whole model's
    logits overflow; each layer's product does not)."""
    g = torch.Generator().manual_seed(0)
    out = {n: m(torch.randn(5, m.in_features, generator=g)) for n, m in model.model.named_modules()
           if isinstance(m, GGUFLinear) and m.packed}
    assert out and all(y.isfinite().all() for y in out.values())
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.fixture(autouse=True)
def packing_kernels() -> None:
    if not cpu_kernels.build() or not cpu_kernels.gguf_packable(int(T.Q4_K), 16):
        pytest.skip("this build's kernels do not read the packed layout (no AVX-512 VNNI): nothing is packed")


@pytest.fixture
def gguf_file(tmp_path, tiny_llama):
    return write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama, TYPES)


def written() -> None:
    """Wait for the cache files the loads so far are writing in the background."""
    for thread in threading.enumerate():
        if thread.name == packed_cache.WRITER:
            thread.join()


def packed_layers(model) -> dict[str, torch.Tensor]:
    return {n: m.blocks for n, m in model.model.named_modules() if isinstance(m, GGUFLinear) and m.packed}


class CountPacks:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = cpu_kernels.gguf_pack

        def counted(*args):
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(cpu_kernels, "gguf_pack", counted)


def test_a_second_load_maps_the_layers_the_first_packed(tmp_path, gguf_file, monkeypatch):
    cache = tmp_path / "packed"
    first = load_model(gguf_file, packed_cache=cache)
    written()
    layers = packed_layers(first)
    assert len(layers) == 4  # the Q4_K and Q6_K projections; Q8_0 and F32 stay as stored
    assert [p.name for p in cache.iterdir()] == [packed_cache.cache_file(cache, gguf_file).name]
    packs = CountPacks(monkeypatch)
    second = load_model(gguf_file, packed_cache=cache)
    assert packs.calls == 0
    again = packed_layers(second)
    assert same(again, layers) and same(outputs(second), outputs(first))


def test_a_changed_gguf_or_a_damaged_cache_file_is_packed_again(tmp_path, gguf_file, monkeypatch):
    cache = tmp_path / "packed"
    reference = outputs(load_model(gguf_file, packed_cache=cache))
    written()
    kept = packed_cache.cache_file(cache, gguf_file)
    size = kept.stat().st_size
    packs = CountPacks(monkeypatch)
    with kept.open("r+b") as f:  # cut short: the last layer's bytes would run past the end
        f.truncate(size - PAGE)  # the padding after the last layer is under a page
    assert same(outputs(load_model(gguf_file, packed_cache=cache)), reference)
    written()
    assert packs.calls == 4 and kept.stat().st_size == size  # packed, and kept whole again
    stat = gguf_file.stat()
    os.utime(gguf_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the GGUF changed since
    load_model(gguf_file, packed_cache=cache)
    written()
    assert packs.calls == 8
    load_model(gguf_file, packed_cache=cache)
    assert packs.calls == 8


def test_no_cache_packs_at_every_load_and_keeps_nothing(tmp_path, gguf_file, monkeypatch):
    monkeypatch.setenv("LMK_HOME", str(tmp_path / "home"))
    packs = CountPacks(monkeypatch)
    load_model(gguf_file, packed_cache=None)
    load_model(gguf_file, packed_cache=None)
    assert packs.calls == 8 and not (tmp_path / "home").exists()
    load_model(gguf_file, packed_cache="auto")  # $LMK_HOME/packed
    written()
    assert packed_cache.cache_file(tmp_path / "home" / "packed", gguf_file).exists()


def test_a_cache_that_cannot_be_written_costs_a_log_line_not_the_load(tmp_path, gguf_file, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    with caplog.at_level("INFO", logger="lmkernel.loader.packed_cache"):
        model = load_model(gguf_file, packed_cache=blocked / "packed")
        written()
    assert len(packed_layers(model)) == 4
    assert "could not keep the packed layers" in caplog.text


def write_file(path, header: object, data_end: int) -> None:
    raw = json.dumps(header).encode()
    with path.open("wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(raw)) + raw)
        f.truncate(data_end)


@pytest.mark.parametrize(("why", "change"), [
    ("offset past the end", lambda e: e.update(offset=3 * PAGE)),
    ("offset inside the header", lambda e: e.update(offset=0)),
    ("offset off a page", lambda e: e.update(offset=PAGE + 1)),
    ("another shape", lambda e: e.update(shape=[2, 64])),
    ("another type", lambda e: e.update(type=14)),
    ("no shape", lambda e: e.pop("shape")),
    ("a string offset", lambda e: e.update(offset="x")),
])
def test_hostile_headers_are_refused_before_any_byte_is_mapped(tmp_path, why, change):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    expected = {"a": PackedLayer(12, (1, 2560)), "b": PackedLayer(12, (1, 2560))}
    entries = {"a": {"type": 12, "shape": [1, 2560], "offset": PAGE}, "b": {"type": 12, "shape": [1, 2560], "offset": 2 * PAGE}}
    path = packed_cache.cache_file(tmp_path, gguf)
    write_file(path, {"key": packed_cache.source_key(gguf), "layers": entries}, 3 * PAGE)
    assert set(packed_cache.read(tmp_path, gguf, expected)) == {"a", "b"}  # the file as made is read
    change(entries["b"])
    write_file(path, {"key": packed_cache.source_key(gguf), "layers": entries}, 3 * PAGE)
    assert packed_cache.read(tmp_path, gguf, expected) is None, why


def test_overlapping_layers_missing_layers_and_broken_files_are_refused(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    expected = {"a": PackedLayer(12, (1, 2560)), "b": PackedLayer(12, (1, 2560))}
    key = packed_cache.source_key(gguf)
    path = packed_cache.cache_file(tmp_path, gguf)
    same = {"type": 12, "shape": [1, 2560], "offset": PAGE}
    for header in ({"key": key, "layers": {"a": same, "b": same}},  # both layers on the same bytes
                   {"key": key, "layers": {"a": same}},  # a layer missing
                   {"key": {**key, "layout": 0}, "layers": {"a": same, "b": {**same, "offset": 2 * PAGE}}},
                   [1, 2, 3]):
        write_file(path, header, 3 * PAGE)
        assert packed_cache.read(tmp_path, gguf, expected) is None
    path.write_bytes(MAGIC + struct.pack("<Q", 1 << 40))  # a header longer than the file
    assert packed_cache.read(tmp_path, gguf, expected) is None
    path.write_bytes(MAGIC + struct.pack("<Q", 5) + b"{nope")
    assert packed_cache.read(tmp_path, gguf, expected) is None
    path.write_bytes(b"GGUF" + bytes(100))
    assert packed_cache.read(tmp_path, gguf, expected) is None


def test_files_of_models_that_are_gone_are_dropped_when_another_is_kept(tmp_path, tiny_llama):
    cache = tmp_path / "packed"
    gone = write_llama_gguf(tmp_path / "gone.gguf", tiny_llama, TYPES)
    load_model(gone, packed_cache=cache)
    written()
    orphan = packed_cache.cache_file(cache, gone)
    assert orphan.exists()
    gone.unlink()
    (cache / f"junk{packed_cache.SUFFIX}").write_bytes(b"not ours")
    kept = write_llama_gguf(tmp_path / "kept.gguf", tiny_llama, TYPES)
    load_model(kept, packed_cache=cache)
    written()
    assert sorted(p.name for p in cache.iterdir()) == [packed_cache.cache_file(cache, kept).name]
