"""The libraries people feed into a DataLoader, on small local data made here.

Each library's data set goes through torch's DataLoader and nostall's with
num_workers 0 and 2 (fork and spawn), comparing the samples, and their order where
it is deterministic; then ``set_epoch`` and nostall's mid-epoch resume where they
apply. A library's tests are skipped only when it does not import.

torchvision: the wheel on PyPI is a CUDA build that does not import beside a CPU-only
torch; ``torchvision_cpu`` (imported through ``library_datasets``) makes it import
without its C++ ops, which nothing here uses (see that module).
"""

from __future__ import annotations

import gc
import pickle
import warnings

import pytest
import torch
from library_datasets import importable

import library_datasets as L
import nostall

pytestmark = [pytest.mark.timeout(180), pytest.mark.filterwarnings("ignore:This DataLoader will create"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

# (num_workers, start method): in-process, fork, spawn.
CASES = [(0, None), (2, "fork"), (2, "spawn")]
CASE_IDS = ["nw0", "nw2-fork", "nw2-spawn"]


def needs(name: str):
    return pytest.mark.skipif(not importable(name), reason=f"`import {name}` fails: {name} is not installed")


def make(impl: str, dataset, num_workers: int, ctx: str | None, **kw):
    """torch's or nostall's DataLoader over ``dataset`` (persistent workers in both)."""
    if num_workers:
        kw.update(multiprocessing_context=ctx)
        kw.setdefault("persistent_workers", True)
    cls = torch.utils.data.DataLoader if impl == "torch" else nostall.DataLoader
    return cls(dataset, num_workers=num_workers, **kw)


def epochs(loader, n: int, values, before=None) -> list:
    """``n`` epochs of ``loader`` as plain values (``before(epoch)`` runs before each)."""
    out = []
    for epoch in range(n):
        if before is not None:
            before(epoch)
        out.append([values(b) for b in loader])
    return out


def close(loader) -> None:
    if isinstance(loader, nostall.DataLoader):
        loader.close()
    else:
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
    gc.collect()


def resumed(make_loader, stop: int, values, epoch: int = 0, before=None) -> tuple[list, list]:
    """Run to batch ``stop`` of epoch ``epoch``, save, load into a new loader (pickled
    state, as after a restart) and finish that epoch. Returns (batches of that epoch
    before and after the save, warnings raised by the resumed loader)."""
    loader = make_loader()
    for e in range(epoch):
        if before is not None:
            before(loader, e)
        for _ in loader:
            pass
    if before is not None:
        before(loader, epoch)
    got = []
    for batch in loader:
        got.append(values(batch))
        if len(got) == stop:
            break
    state = pickle.loads(pickle.dumps(loader.state_dict()))
    close(loader)
    again = make_loader()
    again.load_state_dict(state)
    if before is not None:
        before(again, epoch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got += [values(b) for b in again]
    close(again)
    return got, [str(w.message) for w in caught if "nostall" in str(w.message)]


# --------------------------------------------------------------------------- torchvision


def _images(batch):
    x, y = batch
    return x.tolist(), y.tolist()


@pytest.fixture(scope="module")
def png_folders(tmp_path_factory):
    return L.make_png_folders(str(tmp_path_factory.mktemp("png")))


@needs("torchvision")
@pytest.mark.parametrize("num_workers,ctx", CASES, ids=CASE_IDS)
def test_torchvision_imagefolder_transforms_v2_as_torch(png_folders, num_workers, ctx):
    """Deterministic transforms: the same images, labels and order as torch, two epochs."""
    got = {}
    for impl in ("torch", "nostall"):
        loader = make(impl, L.image_folder(png_folders, random=False), num_workers, ctx, batch_size=5,
                      shuffle=True, generator=torch.Generator().manual_seed(3))
        got[impl] = epochs(loader, 2, _images)
        close(loader)
    assert got["nostall"] == got["torch"]
    assert got["torch"][0] != got["torch"][1]  # reshuffled
    labels = sorted(y for b in got["torch"][0] for y in b[1])
    assert labels == sorted(k % 3 for k in range(L.N_IMAGES))


@needs("torchvision")
def test_torchvision_random_transforms_are_the_same_for_any_workers_and_resume(png_folders):
    """Random crops and flips: nostall seeds each batch, so the batches do not depend on
    num_workers, the start method or thread workers (torch's depend on which worker
    made them), and a mid-epoch resume gives the uninterrupted batches."""
    def run(num_workers, ctx, **kw):
        # Not persistent: a generator then gives each epoch a new base seed, as with num_workers=0.
        loader = make("nostall", L.image_folder(png_folders, random=True), num_workers, ctx, batch_size=4,
                      shuffle=True, generator=torch.Generator().manual_seed(5), persistent_workers=False, **kw)
        out = epochs(loader, 2, _images)
        close(loader)
        return out

    reference = run(0, None)
    assert run(2, "fork") == reference
    assert run(2, "spawn") == reference
    assert run(2, None, worker_type="thread") == reference
    torch_labels = epochs(make("torch", L.image_folder(png_folders, random=True), 0, None, batch_size=4,
                               shuffle=True, generator=torch.Generator().manual_seed(5)), 2, lambda b: b[1].tolist())
    assert [[b[1] for b in e] for e in reference] == torch_labels  # the order is torch's
    got, caught = resumed(lambda: make("nostall", L.image_folder(png_folders, random=True), 2, "fork",
                                       batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5),
                                       persistent_workers=False),
                          stop=2, values=_images, epoch=1)
    assert got == reference[1] and not caught


# --------------------------------------------------------------------------- Hugging Face datasets


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
    if not importable("datasets"):
        pytest.skip("`import datasets` fails: Hugging Face datasets is not installed")
    return L.make_hf(str(tmp_path_factory.mktemp("hf")))


def _hf(batch):
    return batch["idx"].tolist(), batch["x"].tolist()


@needs("datasets")
@pytest.mark.parametrize("num_workers,ctx", CASES, ids=CASE_IDS)
def test_hf_map_style_with_format_torch_as_torch(hf_path, num_workers, ctx):
    import datasets

    got = {}
    for impl in ("torch", "nostall"):
        ds = datasets.load_from_disk(hf_path).with_format("torch")
        loader = make(impl, ds, num_workers, ctx, batch_size=7, shuffle=True,
                      generator=torch.Generator().manual_seed(1))
        got[impl] = epochs(loader, 2, _hf)
        close(loader)
    assert got["nostall"] == got["torch"]
    assert sorted(i for b in got["torch"][1] for i in b[0]) == list(range(L.N_SAMPLES))


def _hf_iterable(hf_path, rank=None, shuffle=True):
    import datasets
    from datasets.distributed import split_dataset_by_node

    ds = datasets.load_from_disk(hf_path).to_iterable_dataset(num_shards=4)
    if shuffle:
        ds = ds.shuffle(seed=11, buffer_size=8)
    if rank is not None:
        ds = split_dataset_by_node(ds, rank=rank, world_size=2)
    return ds.with_format("torch")


@needs("datasets")
@pytest.mark.parametrize("num_workers,ctx", CASES, ids=CASE_IDS)
def test_hf_iterable_set_epoch_as_torch(hf_path, num_workers, ctx):
    """to_iterable_dataset(num_shards=4).shuffle(...) with set_epoch before each epoch:
    HF shares the epoch with torch's persistent workers; nostall gives the same batches."""
    got = {}
    for impl in ("torch", "nostall"):
        ds = _hf_iterable(hf_path)
        loader = make(impl, ds, num_workers, ctx, batch_size=5)
        got[impl] = epochs(loader, 2, _hf, before=ds.set_epoch)
        close(loader)
    assert got["nostall"] == got["torch"]
    assert got["torch"][0] != got["torch"][1]  # set_epoch reshuffled
    assert sorted(i for b in got["torch"][1] for i in b[0]) == list(range(L.N_SAMPLES))


@needs("datasets")
def test_hf_split_dataset_by_node_as_torch(hf_path):
    ranks = []
    for rank in (0, 1):
        got = {}
        for impl in ("torch", "nostall"):
            loader = make(impl, _hf_iterable(hf_path, rank), 2, "fork", batch_size=4)
            got[impl] = epochs(loader, 1, _hf)[0]
            close(loader)
        assert got["nostall"] == got["torch"]
        ranks.append({i for b in got["torch"] for i in b[0]})
    assert not ranks[0] & ranks[1] and ranks[0] | ranks[1] == set(range(L.N_SAMPLES))


@needs("datasets")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_hf_iterable_resumes_mid_epoch_through_its_state_dict(hf_path, num_workers):
    """HF's IterableDataset has state_dict()/load_state_dict(): each worker's stream
    continues from its own state. (Not with shuffle(buffer_size=...): HF's state leaves
    the shuffle buffer out, so HF's own resume, and torchdata's, lose its samples.)"""
    def fresh():
        return make("nostall", _hf_iterable(hf_path, shuffle=False), num_workers, "fork", batch_size=4)

    loader = fresh()
    reference = epochs(loader, 2, _hf, before=loader.dataset.set_epoch)
    close(loader)
    for epoch, stop in ((0, 3), (1, 5)):
        got, caught = resumed(fresh, stop=stop, values=_hf, epoch=epoch, before=lambda ld, e: ld.dataset.set_epoch(e))
        assert got == reference[epoch] and not caught


# --------------------------------------------------------------------------- webdataset


@pytest.fixture(scope="module")
def tar_url(tmp_path_factory):
    if not importable("webdataset"):
        pytest.skip("`import webdataset` fails: webdataset is not installed")
    return L.make_tar_shards(str(tmp_path_factory.mktemp("tars")))


@needs("webdataset")
@pytest.mark.parametrize("num_workers,ctx", CASES, ids=CASE_IDS)
def test_webdataset_tar_shards_as_torch(tar_url, num_workers, ctx):
    got = {}
    for impl in ("torch", "nostall"):
        loader = make(impl, L.wds_pipeline(tar_url), num_workers, ctx, batch_size=4)
        got[impl] = epochs(loader, 2, L.wds_values)
        close(loader)
    assert got["nostall"] == got["torch"]
    assert sorted(k for b in got["torch"][0] for k in b[0]) == list(range(L.N_SAMPLES))


@needs("webdataset")
def test_webdataset_webloader_replaced_by_nostall(tar_url):
    """Where users write wds.WebLoader(dataset, ...), which is a DataPipeline over torch's
    DataLoader, wds.FluidWrapper(nostall.DataLoader(dataset, ...)) keeps the fluid calls
    (here webdataset's usual pattern: batches made in the workers, rebatched in the loop)."""
    import webdataset as wds

    def batched_in_workers():
        return wds.DataPipeline(*L.wds_pipeline(tar_url).pipeline, wds.batched(5))

    torch_loader = wds.WebLoader(batched_in_workers(), batch_size=None, num_workers=2).unbatched().batched(6)
    expected = [L.wds_values(b) for b in torch_loader]
    with nostall.DataLoader(batched_in_workers(), batch_size=None, num_workers=2) as loader:
        fluid = wds.FluidWrapper(loader).unbatched().batched(6)
        got = [[L.wds_values(b) for b in fluid] for _ in range(2)]
    assert got[0] == expected and got[1] == expected
    assert sorted(k for b in expected for k in b[0]) == list(range(L.N_SAMPLES))


@needs("webdataset")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_webdataset_detshuffle_resume_after_epoch_0_warns(tar_url, num_workers):
    """detshuffle advances its own epoch counter in each worker's copy: nostall cannot
    restore it and says so, naming the dataset, the counter and what to do."""
    def fresh():
        return make("nostall", L.wds_pipeline(tar_url, detshuffle=True), num_workers, "fork", batch_size=4)

    loader = fresh()
    reference = epochs(loader, 2, L.wds_values)
    close(loader)
    assert reference[0] != reference[1]  # detshuffle reshuffles each epoch
    got, caught = resumed(fresh, stop=2, values=L.wds_values, epoch=0)  # epoch 0: exact, silent
    assert got == reference[0] and not caught
    got, caught = resumed(fresh, stop=2, values=L.wds_values, epoch=1)
    assert len(caught) == 1
    assert ("cannot resume the DataPipeline exactly" in caught[0] and "epoch 1" in caught[0]
            and "dataset.pipeline[4].epoch" in caught[0] and "set_epoch" in caught[0])


@needs("webdataset")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_webdataset_detshuffle_following_set_epoch_resumes_exactly(tar_url, num_workers):
    """The fix the warning names: the epoch comes from the main process (set_epoch)."""
    def fresh():
        return make("nostall", L.epoch_pipeline(tar_url), num_workers, "fork", batch_size=4)

    loader = fresh()
    reference = epochs(loader, 3, L.wds_values, before=loader.dataset.set_epoch)
    close(loader)
    assert reference[1] != reference[2]
    got, caught = resumed(fresh, stop=2, values=L.wds_values, epoch=2, before=lambda ld, e: ld.dataset.set_epoch(e))
    assert got == reference[2] and not caught


# --------------------------------------------------------------------------- litdata


@pytest.fixture(scope="module")
def litdata_dir(tmp_path_factory):
    if not importable("litdata"):
        pytest.skip("`import litdata` fails: litdata is not installed")
    return L.make_litdata(str(tmp_path_factory.mktemp("lit")))


def _lit(batch):
    return batch["index"].tolist(), batch["x"].tolist()


@needs("litdata")
@pytest.mark.parametrize("shuffle,num_workers,ctx", [(False, *case) for case in CASES] + [(True, 0, None), (True, 2, "fork")],
                         ids=[f"ordered-{i}" for i in CASE_IDS] + ["shuffled-nw0", "shuffled-nw2-fork"])
def test_litdata_streaming_dataset_as_torch(litdata_dir, num_workers, ctx, shuffle):
    """litdata's state_dict takes arguments: nostall never calls it (it used to crash)."""
    import litdata

    got = {}
    for impl in ("torch", "nostall"):
        loader = make(impl, litdata.StreamingDataset(litdata_dir, shuffle=shuffle, seed=4), num_workers, ctx,
                      batch_size=4)
        got[impl] = epochs(loader, 2, _lit)
        close(loader)
    assert got["nostall"] == got["torch"]
    assert sorted(i for b in got["torch"][1] for i in b[0]) == list(range(L.N_SAMPLES))


@needs("litdata")
def test_thread_workers_shard_iterable_datasets_as_process_workers(litdata_dir):
    """Each thread worker has its own copy of an iterable dataset and its own
    get_worker_info(): litdata gives every sample once (it gave half, twice each)."""
    import litdata

    for dataset in (litdata.StreamingDataset(litdata_dir), L.ShardByWorker(L.N_SAMPLES)):
        values = (lambda b: b["index"].tolist()) if isinstance(dataset, litdata.StreamingDataset) else torch.Tensor.tolist
        expected = [values(b) for b in torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)]
        with nostall.DataLoader(dataset, batch_size=4, num_workers=2, worker_type="thread") as loader:
            got = epochs(loader, 2, values)
        assert got == [expected, expected]
        assert sorted(v for b in got[0] for v in b) == list(range(L.N_SAMPLES))


@needs("litdata")
def test_litdata_resume(litdata_dir):
    """Replay resume (litdata's state_dict needs its own loader's arguments): exact in
    epoch 0; after it, litdata's own current_epoch counter cannot be restored: a warning."""
    import litdata

    def fresh():
        return make("nostall", litdata.StreamingDataset(litdata_dir, shuffle=True, seed=4), 2, "fork", batch_size=4)

    loader = fresh()
    reference = epochs(loader, 1, _lit)
    close(loader)
    got, caught = resumed(fresh, stop=3, values=_lit, epoch=0)
    assert got == reference[0] and not caught
    _, caught = resumed(fresh, stop=3, values=_lit, epoch=1)
    assert len(caught) == 1 and "StreamingDataset" in caught[0] and "dataset.current_epoch" in caught[0]
    assert "state_dict(num_samples_yielded" in caught[0]


# --------------------------------------------------------------------------- MosaicML streaming


@pytest.fixture(scope="module")
def mds_dir(tmp_path_factory):
    if not importable("streaming"):
        pytest.skip("`import streaming` fails: mosaicml-streaming is not installed")
    return L.make_mds(str(tmp_path_factory.mktemp("mds")))


def _mds(batch):
    return batch["index"].tolist(), batch["x"].tolist()


@needs("streaming")
@pytest.mark.parametrize("num_workers,ctx", CASES, ids=CASE_IDS)
def test_mosaicml_streaming_dataset_as_torch(mds_dir, num_workers, ctx):
    """MosaicML's state_dict takes arguments: nostall never calls it (it used to crash)."""
    got = {}
    for impl in ("torch", "nostall"):
        dataset = L.MDSDataset(local=mds_dir, batch_size=4, shuffle=True, shuffle_seed=2)
        loader = make(impl, dataset, num_workers, ctx, batch_size=4)
        got[impl] = epochs(loader, 2, _mds)
        close(loader)
        del dataset, loader
        gc.collect()
    assert got["nostall"] == got["torch"]
    assert sorted(i for b in got["torch"][0] for i in b[0]) == list(range(L.N_SAMPLES))


@needs("streaming")
def test_mosaicml_streaming_resume(mds_dir):
    """Replay resume (its state_dict needs its own loader's arguments): exact in epoch 0;
    after it, its epoch (kept in shared memory) cannot be restored: a warning."""
    def fresh():
        return make("nostall", L.MDSDataset(local=mds_dir, batch_size=4, shuffle=True, shuffle_seed=2), 2, "fork",
                    batch_size=4)

    loader = fresh()
    reference = epochs(loader, 1, _mds)
    close(loader)
    del loader
    gc.collect()
    got, caught = resumed(fresh, stop=3, values=_mds, epoch=0)
    assert got == reference[0] and not caught
    _, caught = resumed(fresh, stop=3, values=_mds, epoch=1)
    assert len(caught) == 1 and "MDSDataset" in caught[0] and "state_dict(num_samples" in caught[0]
