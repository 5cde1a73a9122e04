"""Built-in workloads: SpotGEO-like frames on disk, the dataset classes, the registry."""

from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pytest
import torch
from PIL import Image

from nostall.cli import _workloads as wl
from nostall.cli._workloads import (
    FRAME_HEIGHT,
    FRAME_WIDTH,
    WORKLOADS,
    SpotGeoFrames,
    TinySamples,
    ensure_spotgeo,
    frame_label,
    frame_path,
    render_frame,
)


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    return ensure_spotgeo(12, tmp_path_factory.mktemp("cache"), jobs=2)


# --------------------------------------------------------------------------- generation


def test_render_frame_is_a_dark_star_field():
    a = render_frame(0, 3)
    assert a.shape == (FRAME_HEIGHT, FRAME_WIDTH) and a.dtype == np.uint8
    assert np.median(a) < 30, "background must be dark"
    assert a.std() > 1.0, "background must be noisy"
    # A few hundred stars: many local bright spots well above the background.
    assert (a > 100).sum() > 50
    assert a.max() >= 200


def test_render_frame_is_deterministic():
    assert np.array_equal(render_frame(0, 5), render_frame(0, 5))
    assert not np.array_equal(render_frame(0, 5), render_frame(0, 6))
    assert not np.array_equal(render_frame(0, 5), render_frame(1, 5))


def test_labels_are_deterministic_and_mixed():
    labels = [frame_label(0, i) for i in range(200)]
    assert labels == [frame_label(0, i) for i in range(200)]
    assert set(labels) == {0, 1}
    assert 0.15 < sum(labels) / len(labels) < 0.45


def test_frames_on_disk_decode_to_the_rendered_pixels(frames_dir):
    assert frames_dir.is_dir()
    for i in (0, 7, 11):
        with Image.open(frame_path(frames_dir, i)) as img:
            assert img.format == "PNG"
            assert img.mode == "L"
            assert img.size == (FRAME_WIDTH, FRAME_HEIGHT)
            pixels = np.array(img)
        assert np.array_equal(pixels, render_frame(0, i))
    assert not list(frames_dir.glob(".*.tmp")), "no temporary file may be left behind"


def test_ensure_spotgeo_reuses_existing_frames(frames_dir):
    path = frame_path(frames_dir, 2)
    before = path.stat().st_mtime_ns
    t = time.perf_counter()
    again = ensure_spotgeo(12, frames_dir.parent)
    assert again == frames_dir
    assert time.perf_counter() - t < 1.0
    assert path.stat().st_mtime_ns == before


def test_ensure_spotgeo_completes_an_interrupted_run(tmp_path):
    out = ensure_spotgeo(4, tmp_path, jobs=1)
    frame_path(out, 1).unlink()
    stale = out / ".frame_000001.abc.tmp"
    stale.write_bytes(b"half a png")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    ensure_spotgeo(6, tmp_path, jobs=1)
    for i in range(6):
        with Image.open(frame_path(out, i)) as img:
            assert np.array_equal(np.array(img), render_frame(0, i))
    assert not stale.exists()


@pytest.mark.timeout(120)
def test_ensure_spotgeo_parallel_matches_serial(tmp_path):
    serial = ensure_spotgeo(40, tmp_path / "a", jobs=1)
    parallel = ensure_spotgeo(40, tmp_path / "b", jobs=2)
    for i in (0, 17, 39):
        assert frame_path(serial, i).read_bytes() == frame_path(parallel, i).read_bytes()


def test_frames_of_another_seed_live_elsewhere(tmp_path):
    a = ensure_spotgeo(2, tmp_path, seed=0, jobs=1)
    b = ensure_spotgeo(2, tmp_path, seed=1, jobs=1)
    assert a != b
    assert frame_path(a, 0).read_bytes() != frame_path(b, 0).read_bytes()


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NOSTALL_CACHE", str(tmp_path))
    assert wl.default_cache_dir() == tmp_path / "spotgeo"
    monkeypatch.delenv("NOSTALL_CACHE")
    assert wl.default_cache_dir() == wl.Path.home() / ".cache" / "nostall" / "spotgeo"


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_ensure_spotgeo_rejects_bad_counts(tmp_path, bad):
    with pytest.raises(ValueError, match="n_frames"):
        ensure_spotgeo(bad, tmp_path)


# --------------------------------------------------------------------------- SpotGeoFrames


def test_sample_shape_range_and_label(frames_dir):
    ds = SpotGeoFrames(frames_dir, 12)
    assert len(ds) == 12
    s = ds[4]
    assert set(s) == {"image", "label", "index"}
    img = s["image"]
    assert img.shape == (1, 224, 224) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert s["label"] == frame_label(0, 4) and isinstance(s["label"], int)
    assert s["index"] == 4
    assert ds[-1]["index"] == 11
    with pytest.raises(IndexError):
        ds[12]


def test_crop_and_flip_come_from_torch_global_rng(frames_dir):
    ds = SpotGeoFrames(frames_dir, 12, crop=100)
    frame = torch.from_numpy(render_frame(0, 9))
    for seed in range(6):
        torch.manual_seed(seed)
        top = int(torch.randint(0, FRAME_HEIGHT - 100 + 1, ()))
        left = int(torch.randint(0, FRAME_WIDTH - 100 + 1, ()))
        flip = float(torch.rand(())) < 0.5
        expected = frame[top : top + 100, left : left + 100]
        if flip:
            expected = expected.flip(-1)
        torch.manual_seed(seed)
        got = ds[9]["image"]
        assert torch.equal(got[0], expected.to(torch.float32) / 255.0)
        torch.manual_seed(seed)
        assert torch.equal(ds[9]["image"], got), "same seed, same sample"


def test_full_frame_without_crop(frames_dir):
    ds = SpotGeoFrames(frames_dir, 12, crop=None)
    img = ds[0]["image"]
    assert img.shape == (1, FRAME_HEIGHT, FRAME_WIDTH)
    frame = torch.from_numpy(render_frame(0, 0)).to(torch.float32) / 255.0
    assert torch.equal(img[0], frame) or torch.equal(img[0], frame.flip(-1))


def test_dataset_pickles_cheaply(frames_dir):
    ds = SpotGeoFrames(frames_dir, 12)
    blob = pickle.dumps(ds)
    assert len(blob) < 1000
    clone = pickle.loads(blob)
    torch.manual_seed(0)
    a = clone[3]["image"]
    torch.manual_seed(0)
    assert torch.equal(a, ds[3]["image"])


def test_dataset_rejects_bad_arguments(frames_dir):
    with pytest.raises(FileNotFoundError, match="ensure_spotgeo"):
        SpotGeoFrames(frames_dir, 13)
    with pytest.raises(ValueError, match="crop"):
        SpotGeoFrames(frames_dir, 12, crop=481)
    with pytest.raises(ValueError, match="n_frames"):
        SpotGeoFrames(frames_dir, 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_torch_loader_batches_the_frames(frames_dir, method):
    ds = SpotGeoFrames(frames_dir, 12)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=1,
                                         multiprocessing_context=method)
    batches = list(loader)
    assert len(batches) == 3
    assert batches[0]["image"].shape == (4, 1, 224, 224)
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(12))
    labels = torch.cat([b["label"] for b in batches])
    idx = torch.cat([b["index"] for b in batches])
    assert labels.tolist() == [frame_label(0, int(i)) for i in idx]


# --------------------------------------------------------------------------- TinySamples


def test_tiny_samples():
    ds = TinySamples(1000)
    assert len(ds) == 1000
    x, y = ds[123]
    assert x.shape == (16,) and x.dtype == torch.float32
    assert y == 3
    assert torch.equal(ds[123][0], x)
    assert not torch.equal(ds[124][0], x)
    assert ds[-1][1] == 9
    with pytest.raises(IndexError):
        ds[1000]
    with pytest.raises(ValueError):
        TinySamples(0)
    assert len(pickle.dumps(ds)) < 200


def test_tiny_samples_are_cheap():
    ds = TinySamples(5000)
    for i in range(200):  # warm-up
        ds[i]
    t = time.perf_counter()
    for i in range(5000):
        ds[i]
    per_sample = (time.perf_counter() - t) / 5000
    assert per_sample < 500e-6  # about 10 us on an idle core; generous for loaded CI


# --------------------------------------------------------------------------- registry


def test_registry_builds_both(tmp_path):
    assert set(WORKLOADS) >= {"spotgeo", "tiny"}
    spot = WORKLOADS["spotgeo"].build(3, root=tmp_path)
    assert isinstance(spot, SpotGeoFrames) and len(spot) == 3
    tiny = WORKLOADS["tiny"].build(10)
    assert isinstance(tiny, TinySamples) and len(tiny) == 10
