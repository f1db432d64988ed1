"""mixchat.speed.hugepages: weights copied out of the file mapping into one huge-page region."""

from __future__ import annotations

import pytest
import torch

from mixchat.engine.engine import Engine
from mixchat.speed import hugepages

needs_linux = pytest.mark.skipif(not hugepages.supported(), reason="huge pages need Linux with MADV_HUGEPAGE")


@needs_linux
def test_copies_keep_values_dtypes_shapes_and_strides():
    g = torch.Generator().manual_seed(0)
    src = {
        "a": torch.randn(64, 48, generator=g).to(torch.bfloat16),
        "t": torch.randn(40, 24, generator=g).to(torch.bfloat16).t(),  # a transposed view (torrent w2)
        "q": torch.randint(-127, 128, (33,), generator=g, dtype=torch.int8),
        "odd": torch.randn(10, 10, generator=g)[:, ::2],  # no layout to keep: left where it is
    }
    out = hugepages.copy_into_huge_pages(src, show=False)
    assert list(out) == list(src)
    for name in ("a", "t", "q"):
        assert out[name].dtype == src[name].dtype and out[name].shape == src[name].shape
        assert out[name].stride() == src[name].stride()
        assert torch.equal(out[name], src[name])
        assert out[name].data_ptr() != src[name].data_ptr()
        assert out[name].data_ptr() % 64 == 0
    assert out["odd"] is src["odd"]
    # One region, in order: the copies do not overlap.
    spans = sorted((out[n].data_ptr(), out[n].data_ptr() + out[n].nbytes) for n in ("a", "t", "q"))
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    src["a"].zero_()  # a copy, not a view
    assert out["a"].abs().sum() > 0


@needs_linux
def test_engine_pins_when_asked_and_gives_the_same_logits(make_release, monkeypatch):
    from conftest import tiny_args

    folder = make_release(tiny_args(moe={"num_experts": 4, "num_experts_per_tok": 2}), "torrent")
    calls = []
    real = hugepages.copy_into_huge_pages

    def spy(tensors, *a, **kw):
        out = real(tensors, *a, **kw)
        calls.append({n: t.data_ptr() for n, t in out.items()})
        return out

    monkeypatch.setattr(hugepages, "copy_into_huge_pages", spy)
    monkeypatch.delenv("MIXCHAT_HUGEPAGES", raising=False)
    mapped = Engine.load(folder, show_progress=False, huge_pages=False)
    assert calls == []
    pinned = Engine.load(folder, show_progress=False)  # on by default on Linux
    assert len(calls) == 1
    monkeypatch.setenv("MIXCHAT_HUGEPAGES", "0")
    Engine.load(folder, show_progress=False)
    assert len(calls) == 1
    monkeypatch.setenv("MIXCHAT_HUGEPAGES", "1")
    Engine.load(folder, show_progress=False)
    assert len(calls) == 2
    w_pinned = pinned.model.layers[0].attention.wq.weight
    w_mapped = mapped.model.layers[0].attention.wq.weight
    assert w_pinned.data_ptr() == calls[0]["layers.0.attention.wq.weight"]  # the model holds the copies
    assert torch.equal(w_pinned, w_mapped) and w_pinned.data_ptr() != w_mapped.data_ptr()
    w2 = pinned.model.layers[0].feed_forward.experts[0].w2.weight
    assert not w2.is_contiguous() and w2.t().is_contiguous()  # the torrent layout's strides are kept
    ids = torch.tensor(pinned.tokenizer.encode("Once upon a time"))
    a = pinned.model(ids, pinned.new_cache()).logits
    b = mapped.model(ids, mapped.new_cache()).logits
    assert torch.equal(a, b)


@needs_linux
def test_converts_while_copying_the_names_it_is_given():
    g = torch.Generator().manual_seed(1)
    src = {"w": torch.randn(32, 16, generator=g).to(torch.bfloat16),
           "t": torch.randn(16, 8, generator=g).to(torch.bfloat16).t(),
           "q": torch.randint(-127, 128, (32, 16), generator=g, dtype=torch.int8),
           "odd": torch.randn(6, 6, generator=g).to(torch.bfloat16)[:, ::2]}
    out = hugepages.copy_into_huge_pages(src, show=False, dtypes={"w": torch.float32, "t": torch.float32,
                                                                  "odd": torch.float32})
    assert out["w"].dtype == out["t"].dtype == out["odd"].dtype == torch.float32
    assert torch.equal(out["w"], src["w"].float()) and torch.equal(out["t"], src["t"].float())
    assert out["t"].stride() == src["t"].stride()
    assert torch.equal(out["odd"], src["odd"].float())  # not copied into the region, but converted
    assert out["q"].dtype == torch.int8 and torch.equal(out["q"], src["q"])  # not named: kept as it is


@needs_linux
def test_a_dtype_change_with_huge_pages_copies_once(make_release, monkeypatch):
    from conftest import tiny_args

    folder = make_release(tiny_args(), "dense")
    seen = []
    real = hugepages.copy_into_huge_pages

    def spy(tensors, *a, **kw):
        seen.append({n: t.dtype for n, t in tensors.items()})
        return real(tensors, *a, **kw)

    monkeypatch.setattr(hugepages, "copy_into_huge_pages", spy)
    pinned = Engine.load(folder, dtype="fp32", show_progress=False, huge_pages=True)
    plain = Engine.load(folder, dtype="fp32", show_progress=False, huge_pages=False)
    assert len(seen) == 1 and seen[0]["layers.0.attention.wq.weight"] == torch.bfloat16  # not converted first
    w = pinned.model.layers[0].attention.wq.weight
    assert w.dtype == torch.float32 and torch.equal(w, plain.model.layers[0].attention.wq.weight)
    ids = torch.tensor(plain.tokenizer.encode("Once upon a time"))
    assert torch.equal(pinned.model(ids, pinned.new_cache()).logits, plain.model(ids, plain.new_cache()).logits)


def _resident_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                inside = len(head) >= 6 and head[5] == str(path)
            elif inside and head[:1] == ["Rss:"]:
                total += int(head[1])
    return total


@needs_linux
def test_released_sources_stay_readable_and_anonymous_ones_untouched(tmp_path):
    """release_sources unmaps a file-backed source's pages (they fault back in from the file if read
    again): its values must survive. An anonymous source must not be released at all (MADV_DONTNEED
    would zero it)."""
    g = torch.Generator().manual_seed(2)
    data = torch.randn(3, 1 << 18, generator=g).to(torch.bfloat16)  # 1.5 MiB: whole pages inside each row
    path = tmp_path / "w.bin"
    path.write_bytes(data.view(torch.int16).numpy().tobytes())
    mapped = torch.from_file(str(path), shared=False, size=data.numel(), dtype=torch.bfloat16).view(3, -1)
    anon = data.clone()
    src = {"m0": mapped[0], "m1": mapped[1], "m2": mapped[2], "anon": anon}
    out = hugepages.copy_into_huge_pages(src, show=False, release_sources=True)
    # The copy read every page of the file; released, at most the pages the rows share stay mapped.
    assert _resident_kib(path) <= 3 * 4 * (hugepages._PAGE // 1024)
    for i in range(3):
        assert torch.equal(out[f"m{i}"], data[i]) and torch.equal(mapped[i], data[i])
    assert torch.equal(anon, data) and torch.equal(out["anon"], data)


@needs_linux
def test_no_copy_where_transparent_huge_pages_are_switched_off(monkeypatch):
    import io

    for setting, copies in (("always [madvise] never\n", True), ("always madvise [never]\n", False)):
        monkeypatch.setattr(hugepages, "open", lambda *a, s=setting, **k: io.StringIO(s), raising=False)
        assert hugepages.supported() is copies


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and ":" not in head[0]:
                lo, hi = (int(a, 16) for a in head[0].split("-"))
                inside = lo <= address < hi
            elif inside and head[:1] == ["VmFlags:"]:
                return head[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_linux
def test_empty_gives_a_tensor_in_memory_advised_for_huge_pages():
    t = hugepages.empty((3, 1 << 20), torch.bfloat16)  # 6 MiB
    assert t.shape == (3, 1 << 20) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % hugepages.HUGE == 0
    assert "hg" in _vm_flags(t.data_ptr())  # MADV_HUGEPAGE: the kernel backs it with 2 MiB pages if it can
    t.fill_(1.5)
    assert float(t.float().sum()) == 1.5 * t.numel()
    plain = torch.empty(3, 1 << 20, dtype=torch.bfloat16)
    assert "hg" not in _vm_flags(plain.data_ptr())  # what torch's allocator gives: not advised


def test_empty_falls_back_to_torch_where_huge_pages_are_off(monkeypatch):
    monkeypatch.setattr(hugepages, "supported", lambda: False)
    t = hugepages.empty((5, 7), torch.float32)
    assert t.shape == (5, 7) and t.dtype == torch.float32
    assert hugepages.empty((0,)).numel() == 0
