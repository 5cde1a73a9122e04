"""Flat containers (nostall.containers._flat): conversion, errors, pickling, sharing, loaders."""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
from collections import namedtuple
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
import torch.utils.data
from conftest import assert_same, close_loader, nostall_module
from hypothesis import given, settings
from hypothesis import strategies as st

from nostall.containers._flat import NumberArray, ObjectArray, Records, StringArray, flat

Row = namedtuple("Row", ["path", "label"])


def annotations(n: int) -> list[dict]:
    """Realistic annotation dicts: path, label, 4-float bbox, a variable list of tags."""
    return [
        {
            "path": f"images/{i:06d}.jpg" if i % 7 else f"bilder/straße_{i}.jpg",
            "label": i % 10,
            "bbox": [float(i % 640), float(i % 480), 32.0 + i % 5, 24.5],
            "tags": ["night", "blur"][: i % 3],
        }
        for i in range(n)
    ]


def _shm_entries() -> set[str]:
    # Only names shared-memory users of ours would create: torch storages, SharedMemory.
    return {name for name in os.listdir("/dev/shm") if name.startswith(("torch_", "psm_", "nostall"))}


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize(
    "data, cls",
    [
        (["a", "héllo", "", "日本語", "\udcff"], StringArray),
        ([b"\x00\xff", b"", b"abc"], StringArray),
        ([3, -1, 0, 2**62], NumberArray),
        ([0.5, -0.0, 1e300], NumberArray),
        ([True, False, True], NumberArray),
        ([np.int32(4), 5], NumberArray),
        ([[1.0, 2.0], [3.0, 4.5]], NumberArray),
        ([(1, 2, 3), (4, 5, 6)], Records),
        ([Row("a.jpg", 1), Row("b.jpg", 2)], Records),
        (annotations(50), Records),
    ],
)
def test_flat_picks_the_container_and_round_trips(data, cls):
    c = flat(data)
    assert type(c) is cls
    assert len(c) == len(data)
    assert list(c) == data
    assert c == data and c == tuple(data)
    assert [c[i] for i in range(-len(data), 0)] == data
    assert [type(x) for x in c] == [type(x) if not isinstance(x, np.integer) else int for x in data]
    assert flat(c) is c


def test_items_are_fresh_python_objects():
    rows = annotations(3)
    r = flat(rows)
    row = r[1]
    row["bbox"].append(0.0)
    row["label"] = 99
    assert r[1] == rows[1], "a returned row must not write through to the container"
    assert type(r[0]["label"]) is int and type(r[0]["bbox"][0]) is float


def test_records_columns_and_repr():
    rows = annotations(100)
    r = flat(rows)
    assert r.keys() == ["path", "label", "bbox", "tags"]
    assert isinstance(r["path"], StringArray) and r["path"][8] == rows[8]["path"]
    assert isinstance(r.column("bbox"), NumberArray) and r.columns["bbox"][3] == rows[3]["bbox"]
    assert isinstance(r["tags"], ObjectArray)
    assert np.array_equal(r["label"].numpy(), [x["label"] for x in rows])
    assert repr(r).startswith("Records(100 rows: path=str, label=int64, bbox=float64[4], tags=pickled;")
    with pytest.raises(KeyError, match="no column 'nope'; its keys are"):
        r.column("nope")


def test_number_array_as_numpy():
    c = flat([3, 1, 2])
    view = np.asarray(c)
    assert view.dtype == np.int64 and view.tolist() == [3, 1, 2]
    assert not view.flags.writeable, "the container is read-only"
    assert np.asarray(c, dtype=np.float32).tolist() == [3.0, 1.0, 2.0]
    assert np.array(c, copy=True).flags.writeable


def test_dict_of_columns_is_records():
    cols = {"path": ["a", "b", "c"], "label": np.array([1, 2, 3]), "w": [0.5, 1.0, None]}
    r = flat(cols)
    assert list(r) == [{"path": "a", "label": 1, "w": 0.5}, {"path": "b", "label": 2, "w": 1.0},
                       {"path": "c", "label": 3, "w": None}]
    assert repr(r).startswith("Records(3 rows: path=str, label=int64, w=pickled;")


def test_columns_that_do_not_fit_numbers_stay_exact():
    rows = [{"a": 1, "b": 1.5, "c": [1, 2], "d": 2**70}, {"a": 2.5, "b": None, "c": [1], "d": 1}]
    r = flat(rows)
    assert list(r) == rows
    assert type(r[0]["a"]) is int and type(r[1]["a"]) is float  # mixed int/float: pickled, exact


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (["a", 1], TypeError, r"obj\[1\] is an int 1, but obj\[0\] is a str: .*\[str\(x\) for x in obj\]"),
        ([b"a", "b"], TypeError, r"obj\[1\] is a str 'b', but obj\[0\] is a bytes"),
        ([1, 2, 2.5], TypeError, r"obj\[2\] is a float 2.5, but obj\[0\] is an int: .*float\(x\)"),
        ([1, None], TypeError, r"obj\[1\] is a NoneType None"),
        ([True, 1], TypeError, r"obj\[1\] is an int 1, but obj\[0\] is a bool"),
        ([2**64], OverflowError, r"outside the int64 range"),
        ([[1.0, 2.0], [1.0]], TypeError, r"obj\[1\] has length 1, but obj\[0\] has length 2"),
        ([[1.0, "x"]], TypeError, r"not all int, all float or all bool"),
        ([object()], TypeError, r"obj\[0\] is an object .*nostall.ObjectArray\(obj\)"),
        ([{"a": 1}, {"a": 2}, {"b": 3}], ValueError,
         r"obj\[2\] has keys \['b'\], but obj\[0\] has \['a'\] \(missing: \['a'\], extra: \['b'\]\)"),
        ([{"a": 1}, (1,)], TypeError, r"obj\[1\] is a tuple \(1,\), but obj\[0\] is a dict"),
        ([(1, 2), (1, 2, 3)], TypeError, r"obj\[1\] is a tuple .* of length 2"),
        ({"a": [1, 2], "b": [1]}, ValueError, r"obj\['b'\] has 1 items but obj\['a'\] has 2"),
        ({"a": 3}, TypeError, r"obj\['a'\] is an int 3; in a dict of columns"),
        ([], ValueError, r"obj is empty"),
        ("abc", TypeError, r"obj is a str 'abc'; nostall.flat\(\) takes"),
        (np.array(["a"]), TypeError, r"dtype <U1 .* list of str"),
    ],
)
def test_flat_errors_name_the_first_misfit_and_the_fix(bad, error, match):
    with pytest.raises(error, match=match):
        flat(bad)


def test_unpicklable_value_names_row_and_key():
    rows = [{"k": 1, "f": [1]}, {"k": 2, "f": [lambda: 0]}]
    with pytest.raises(TypeError, match=r"obj\[1\]\['f'\] \(a list .*\) cannot be pickled"):
        flat(rows)


def test_index_errors():
    c = flat(["a", "b"])
    with pytest.raises(IndexError, match="StringArray index 2 out of range for length 2"):
        c[2]
    with pytest.raises(IndexError, match="index -3"):
        c[-3]
    with pytest.raises(TypeError, match="StringArray indices must be int or slice; got list"):
        c[[0, 1]]
    assert c[np.int64(1)] == "b"
    with pytest.raises(IndexError):
        flat(annotations(3))[3]


# --------------------------------------------------------------------------- properties

_slices = st.builds(slice, st.none() | st.integers(-30, 30), st.none() | st.integers(-30, 30),
                    st.none() | st.integers(-5, 5).filter(bool))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(st.characters(codec=None), max_size=12), max_size=25), _slices)
def test_strings_round_trip_and_slice_like_a_list(items, s):
    c = StringArray(items)
    assert list(c) == items and [c[i] for i in range(len(items))] == items
    assert list(c[s]) == items[s]
    assert pickle.loads(pickle.dumps(c)) == items


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=12), max_size=25), _slices)
def test_bytes_round_trip_and_slice_like_a_list(items, s):
    c = StringArray(items)
    assert list(c) == items and list(c[s]) == items[s]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=25)
       | st.lists(st.floats(allow_nan=False), min_size=1, max_size=25), _slices)
def test_numbers_round_trip_and_slice_like_a_list(items, s):
    c = flat(items)
    assert list(c) == items and [type(x) for x in c] == [type(x) for x in items]
    assert list(c[s]) == items[s]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.fixed_dictionaries({"p": st.text(max_size=5), "n": st.integers(0, 9),
                                       "t": st.lists(st.text(max_size=3), max_size=3)}),
                min_size=1, max_size=20), _slices)
def test_records_round_trip_and_slice_like_a_list(rows, s):
    r = flat(rows)
    assert list(r) == rows and list(r[s]) == rows[s]


# --------------------------------------------------------------------------- pickling and sharing


def test_plain_pickle_copies_the_bytes_and_leaves_the_container_alone():
    r = flat(annotations(20_000))
    data = pickle.dumps(r)
    assert len(data) > r.nbytes * 0.9, "plain pickle must carry the data itself"
    assert all(c._shared is None for c in r.columns.values()), "plain pickle must not share memory"
    assert pickle.loads(data) == r == annotations(20_000)


def test_forking_pickler_sends_shared_memory_once():
    rows = annotations(20_000)
    r = flat(rows)
    path_buffer = r["path"]._data
    data = bytes(ForkingPickler.dumps(r))
    assert len(data) < 20_000, "ForkingPickler must send descriptors, not the buffers"
    shared = r["path"]._shared
    assert shared is not None and isinstance(shared[0][0], torch.Tensor) and shared[0][0].is_shared()
    # The container now reads from the shared copy (its private one is released)...
    assert r["path"]._data.ctypes.data == shared[0][0].data_ptr()
    assert r["path"]._data is not path_buffer
    assert r == rows
    # ...and sending it again sends the same memory.
    ForkingPickler.dumps(r)
    assert r["path"]._shared is shared
    copy = pickle.loads(data)
    assert copy == rows and copy["path"]._shared is not None
    assert copy["path"]._data.ctypes.data == shared[0][0].data_ptr()  # same process: torch's cache
    assert len(bytes(ForkingPickler.dumps(copy))) < 20_000


def test_small_buffers_travel_by_value():
    c = flat(["a", "b"])
    data = ForkingPickler.dumps(c)
    assert all(isinstance(b, np.ndarray) for b in c._shared)
    assert pickle.loads(data) == ["a", "b"]


def test_falls_back_to_copying_when_shared_memory_fails(monkeypatch):
    def full(self):
        raise RuntimeError("unable to write to file </torch_1>: No space left on device (28)")

    monkeypatch.setattr(torch.Tensor, "share_memory_", full)
    c = flat([f"p{i:07d}" for i in range(20_000)])
    with pytest.warns(RuntimeWarning, match=r"could not move a StringArray \(.* MB\) to shared memory .*shm-size"):
        data = ForkingPickler.dumps(c)
    assert len(data) > c.nbytes * 0.9
    assert pickle.loads(data) == c


def _private_growth(container, queue) -> None:
    """In a forked child: how much private memory reading every item costs (kB)."""

    def private_kb() -> int:
        with open("/proc/self/smaps_rollup") as fh:
            return sum(int(line.split()[1]) for line in fh if line.startswith("Private_"))

    before = private_kb()
    for _ in container:
        pass
    queue.put(private_kb() - before)


@pytest.mark.timeout(120)
def test_reading_in_a_forked_child_copies_nothing():
    rows = annotations(100_000)
    r = flat(rows)
    ctx = multiprocessing.get_context("fork")
    growth = {}
    for name, data in (("list", rows), ("flat", r)):
        queue = ctx.SimpleQueue()
        proc = ctx.Process(target=_private_growth, args=(data, queue))
        proc.start()
        growth[name] = queue.get()
        proc.join()
    assert growth["list"] > 10_000, growth  # the refcount writes copy the list's pages
    assert growth["flat"] < 2_000, growth


# --------------------------------------------------------------------------- real loaders


class Annotated(torch.utils.data.Dataset):
    """A bbox tensor and a label per sample; reports whether its bboxes (96 kB) arrived shared."""

    def __init__(self, rows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        shared = getattr(self.rows, "columns", None) and self.rows["bbox"]._shared is not None
        return torch.tensor(row["bbox"]), row["label"], row["path"], len(row["tags"]), bool(shared)


def _batches(loader) -> list:
    try:
        return [list(b) for epoch in range(2) for b in loader]
    finally:
        close_loader(loader)


# A fixed shuffled order: the loaders draw their seeds differently (persistent or not).
ORDER = np.random.default_rng(3).permutation(3000).tolist()


@pytest.fixture(scope="module")
def expected():
    return _batches(torch.utils.data.DataLoader(Annotated(annotations(3000)), batch_size=64, sampler=ORDER))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("impl", ["torch", "nostall"])
def test_loaders_give_the_same_batches_over_flat_containers(impl, method, expected):
    before = _shm_entries()
    cls = torch.utils.data.DataLoader if impl == "torch" else nostall_module().DataLoader
    extra = {"persistent_workers": True} if impl == "torch" else {}
    data = Annotated(flat(annotations(3000)))
    loader = cls(data, batch_size=64, sampler=ORDER, num_workers=2, multiprocessing_context=method, **extra)
    got = _batches(loader)
    assert len(got) == len(expected)
    for i, (e, g) in enumerate(zip(expected, got)):
        assert_same(e[:4], g[:4], f"batch {i}")
        # Under spawn the workers read the parent's shared buffers; fork shares pages as they are.
        assert g[4].tolist() == [method == "spawn"] * len(g[4]), f"batch {i}: shared flags {g[4]}"
    del loader, data, got
    gc.collect()
    assert _shm_entries() <= before, f"left in /dev/shm: {sorted(_shm_entries() - before)}"
