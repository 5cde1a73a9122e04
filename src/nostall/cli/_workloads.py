"""Built-in workloads for the demo, the benchmarks and the tests.

Two datasets, both map-style ``torch.utils.data.Dataset`` classes that pickle
cheaply (they hold paths and a few numbers, never pixel data), so they start
fast under the ``spawn`` and ``forkserver`` start methods:

``SpotGeoFrames``
    SpotGEO-like telescope frames: 640x480 8-bit grayscale PNG files holding a
    dark noisy sky, a few hundred stars (small Gaussian blobs of varying
    brightness) and, in about a third of the frames, a faint satellite streak
    (the label: 1 when a streak is present). The frames are generated once,
    deterministically from a seed, into a cache directory, and reused. Each
    ``__getitem__`` opens and decodes one PNG with Pillow (about 1.5 ms on these
    machines), converts it to a float tensor in [0, 1], then takes a random crop
    and a random horizontal flip drawn from torch's global RNG -- the shape of a
    typical image pipeline, and the guide's case study.

``TinySamples``
    About 10 microseconds per sample: a 16-element tensor made from the index.
    It measures the loader's own per-sample and per-batch overhead.

``WORKLOADS`` maps a name to a :class:`Workload`, whose ``build(size, **options)``
returns a ready dataset (generating frames first where needed).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .._options import int_from

__all__ = [
    "FRAME_HEIGHT",
    "FRAME_WIDTH",
    "SpotGeoFrames",
    "TinySamples",
    "WORKLOADS",
    "Workload",
    "default_cache_dir",
    "ensure_spotgeo",
    "frame_label",
    "frame_path",
    "render_frame",
]

FRAME_HEIGHT = 480
FRAME_WIDTH = 640
DEFAULT_SEED = 0
# Bump when render_frame changes: frames of another version live in another
# directory, so a stale cache is never mistaken for the current one.
GENERATOR_VERSION = 1

_SATELLITE_PROBABILITY = 0.3
_BLOB_RADIUS = 5  # stars are drawn into an 11x11 patch


# --------------------------------------------------------------------------- #
# Cache location and file names
# --------------------------------------------------------------------------- #


def default_cache_dir() -> Path:
    """``$NOSTALL_CACHE/spotgeo`` when set, else ``~/.cache/nostall/spotgeo``."""
    base = os.environ.get("NOSTALL_CACHE")
    if base:
        return Path(base).expanduser() / "spotgeo"
    return Path.home() / ".cache" / "nostall" / "spotgeo"


def _frames_dir(root: Path, seed: int) -> Path:
    return root / f"v{GENERATOR_VERSION}-seed{seed}"


def frame_path(frames_dir: str | os.PathLike[str], index: int) -> Path:
    """Path of frame ``index`` inside a directory made by :func:`ensure_spotgeo`."""
    return Path(frames_dir) / f"frame_{index:06d}.png"


# --------------------------------------------------------------------------- #
# Frame generation (numpy only, deterministic from (seed, index))
# --------------------------------------------------------------------------- #


def frame_label(seed: int, index: int) -> int:
    """1 when frame ``index`` holds a satellite streak, else 0.

    Drawn from its own RNG stream so the label is known without rendering or
    decoding the frame.
    """
    rng = np.random.default_rng([seed, index, 1])
    return int(rng.random() < _SATELLITE_PROBABILITY)


def render_frame(seed: int, index: int) -> np.ndarray:
    """Render frame ``index`` as a ``(480, 640)`` uint8 array.

    The same ``(seed, index)`` always gives the same pixels (numpy's PCG64 is
    stable across platforms and numpy versions for these draws). About 6 ms.
    """
    rng = np.random.default_rng([seed, index, 0])
    height, width = FRAME_HEIGHT, FRAME_WIDTH

    # Dark sky with read noise and a faint large-scale gradient.
    sky = rng.normal(loc=10.0, scale=2.5, size=(height, width)).astype(np.float32)
    gy, gx = rng.uniform(-3.0, 3.0, size=2)
    sky += np.linspace(0.0, gy, height, dtype=np.float32)[:, None]
    sky += np.linspace(0.0, gx, width, dtype=np.float32)[None, :]

    # Stars: Gaussian blobs; brightness follows a steep power law (many faint
    # stars, a few bright ones that saturate).
    n_stars = int(rng.integers(200, 400))
    r = _BLOB_RADIUS
    ys = rng.uniform(0, height, n_stars)
    xs = rng.uniform(0, width, n_stars)
    sigmas = rng.uniform(0.6, 1.6, n_stars)
    peaks = 8.0 + 240.0 * rng.pareto(2.5, n_stars) / 4.0
    offsets = np.arange(-r, r + 1, dtype=np.float32)
    padded = np.zeros((height + 2 * r, width + 2 * r), dtype=np.float32)
    for y, x, sigma, peak in zip(ys, xs, sigmas, peaks):
        iy, ix = int(y), int(x)
        dy = offsets - (y - iy)
        dx = offsets - (x - ix)
        inv = -0.5 / (sigma * sigma)
        blob = peak * np.exp(inv * dy[:, None] ** 2) * np.exp(inv * dx[None, :] ** 2)
        padded[iy : iy + 2 * r + 1, ix : ix + 2 * r + 1] += blob
    sky += padded[r : r + height, r : r + width]

    # A faint satellite streak in some frames (the label).
    if frame_label(seed, index):
        y0, x0 = rng.uniform(40, height - 40), rng.uniform(40, width - 40)
        angle = rng.uniform(0.0, np.pi)
        length = rng.uniform(15.0, 60.0)
        brightness = rng.uniform(6.0, 18.0)
        t = np.linspace(0.0, 1.0, int(length * 2))
        py = np.clip(np.rint(y0 + t * length * np.sin(angle)), 0, height - 1).astype(int)
        px = np.clip(np.rint(x0 + t * length * np.cos(angle)), 0, width - 1).astype(int)
        streak = np.zeros((height, width), dtype=np.float32)
        streak[py, px] = brightness
        # Smear over the neighbouring pixels (the streak is a few pixels wide).
        streak = (
            streak
            + 0.5 * np.roll(streak, 1, axis=0)
            + 0.5 * np.roll(streak, -1, axis=0)
            + 0.5 * np.roll(streak, 1, axis=1)
            + 0.5 * np.roll(streak, -1, axis=1)
        )
        sky += np.minimum(streak, brightness)

    return np.clip(sky, 0.0, 255.0).astype(np.uint8)


def _write_png_atomic(path: Path, pixels: np.ndarray) -> None:
    """Write ``pixels`` as PNG so that ``path`` is either absent or complete."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(pixels).save(fh, format="PNG", compress_level=3)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _generate_range(frames_dir: str, seed: int, indices: list[int]) -> int:
    out = Path(frames_dir)
    for index in indices:
        path = frame_path(out, index)
        if not path.exists():
            _write_png_atomic(path, render_frame(seed, index))
    return len(indices)


def ensure_spotgeo(
    n_frames: int,
    root: str | os.PathLike[str] | None = None,
    *,
    seed: int = DEFAULT_SEED,
    jobs: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Make sure frames ``0 .. n_frames-1`` exist on disk; return their directory.

    Only missing frames are generated (in a process pool of ``jobs`` processes,
    default: the CPU count), each written atomically (temporary file, then
    rename), so an interrupted run leaves no partial PNG and the next call
    finishes the job. A directory holds frames of one generator version and
    seed: ``<root>/v<version>-seed<seed>/frame_000000.png``. ``root`` defaults
    to :func:`default_cache_dir`. Cost: about 15 ms per missing frame and core;
    a few stat calls when everything is there.
    """
    if not int_from(1)(n_frames):
        raise ValueError(f"`n_frames` must be a positive int; got {n_frames!r}.")
    base = Path(root).expanduser() if root is not None else default_cache_dir()
    out = _frames_dir(base, seed)
    out.mkdir(parents=True, exist_ok=True)
    # Leftovers of an interrupted run.
    for stale in out.glob(".frame_*.tmp"):
        try:
            if time.time() - stale.stat().st_mtime > 600:
                stale.unlink()
        except FileNotFoundError:
            pass
    missing = [i for i in range(n_frames) if not frame_path(out, i).exists()]
    if not missing:
        return out

    started = time.perf_counter()
    if progress:
        progress(f"generating {len(missing)} SpotGEO-like frames in {out} ...")
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(missing) // 16 or 1))
    if jobs == 1:
        _generate_range(str(out), seed, missing)
    else:
        import multiprocessing as mp

        # fork where available: the children only run numpy and Pillow, and it
        # saves re-importing torch in each of them.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        chunks = [missing[i : i + 32] for i in range(0, len(missing), 32)]
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context(method)) as pool:
            for _ in pool.map(_generate_range, [str(out)] * len(chunks), [seed] * len(chunks), chunks):
                pass
    if progress:
        progress(f"generated {len(missing)} frames in {time.perf_counter() - started:.1f} s")
    return out


# --------------------------------------------------------------------------- #
# Datasets
# --------------------------------------------------------------------------- #


class SpotGeoFrames(Dataset):
    """SpotGEO-like frames from a directory made by :func:`ensure_spotgeo`.

    ``dataset[i]`` is ``{"image": float32 tensor (1, crop, crop) in [0, 1],
    "label": int, "index": i}``. The crop position and the horizontal flip come
    from torch's global RNG (``torch.randint`` / ``torch.rand``), so they follow
    whatever seeding the loader gives its workers. ``crop=None`` keeps the whole
    480x640 frame. Cost: one PNG decode (about 1.5 ms) plus a few tensor ops.

    Pickles as a path, three ints and one byte per label: cheap for spawn.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        n_frames: int,
        crop: int | None = 224,
        *,
        seed: int = DEFAULT_SEED,
    ) -> None:
        if not int_from(1)(n_frames):
            raise ValueError(f"`n_frames` must be a positive int; got {n_frames!r}.")
        if crop is not None and not (1 <= crop <= min(FRAME_HEIGHT, FRAME_WIDTH)):
            raise ValueError(
                f"`crop` must be None or between 1 and {min(FRAME_HEIGHT, FRAME_WIDTH)}; got {crop!r}."
            )
        self.root = str(root)
        self.n_frames = n_frames
        self.crop = crop
        self.seed = seed
        last = frame_path(self.root, n_frames - 1)
        if not last.exists():
            raise FileNotFoundError(
                f"{last} is missing: the directory holds fewer than {n_frames} frames; "
                f"call nostall.cli._workloads.ensure_spotgeo({n_frames}) first."
            )
        self._labels = bytes(frame_label(seed, i) for i in range(n_frames))

    def __len__(self) -> int:
        return self.n_frames

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += self.n_frames
        if not 0 <= index < self.n_frames:
            raise IndexError(f"index {index} out of range for {self.n_frames} frames")
        with Image.open(frame_path(self.root, index)) as img:
            if img.mode != "L":
                img = img.convert("L")
            pixels = np.array(img)  # (H, W) uint8, a writable copy
        image = torch.from_numpy(pixels)
        if self.crop is not None:
            c = self.crop
            top = int(torch.randint(0, FRAME_HEIGHT - c + 1, ()).item())
            left = int(torch.randint(0, FRAME_WIDTH - c + 1, ()).item())
            image = image[top : top + c, left : left + c]
        if torch.rand(()).item() < 0.5:
            image = image.flip(-1)
        image = image.unsqueeze(0).to(torch.float32).div_(255.0)
        return {"image": image, "label": self._labels[index], "index": index}

    def __repr__(self) -> str:
        return f"SpotGeoFrames(root={self.root!r}, n_frames={self.n_frames}, crop={self.crop})"


class _Numbered(Dataset):
    """``n`` samples numbered 0..n-1; subclasses make sample ``i`` in ``_make``."""

    def __init__(self, n: int) -> None:
        if not int_from(1)(n):
            raise ValueError(f"`n` must be a positive int; got {n!r}.")
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        return self._make(index)

    def _make(self, index: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError


class TinySamples(_Numbered):
    """``n`` tiny samples, about 10 microseconds each.

    ``dataset[i]`` is ``(float32 tensor of 16 values, i % 10)``; the tensor is a
    function of ``i`` only. Measures a loader's own per-sample overhead.
    """

    def _make(self, index: int) -> tuple[torch.Tensor, int]:
        # Five small tensor ops: about 10 us on these machines.
        x = torch.arange(16, dtype=torch.float32).add_(index).mul_(1.0 / 16.0).sin_()
        x.div_(x.norm().add_(1.0))
        return x, index % 10

    def __repr__(self) -> str:
        return f"TinySamples(n={self.n})"


class RemoteReads(_Numbered):
    """``n`` samples that each wait ``delay_s`` (10 ms by default), as a read from
    object storage or a network file system would, then return a small tensor.

    ``dataset[i]`` is ``(float32 tensor of 64 values, i % 10)``, a function of
    ``i`` only. The wait releases the GIL and uses no CPU, so throughput grows
    with workers far beyond the number of cores.
    """

    def __init__(self, n: int, delay_s: float = 0.010) -> None:
        super().__init__(n)
        if not delay_s >= 0:
            raise ValueError(f"`delay_s` must be >= 0 seconds; got {delay_s!r}.")
        self.delay_s = delay_s

    def _make(self, index: int) -> tuple[torch.Tensor, int]:
        time.sleep(self.delay_s)
        return torch.full((64,), float(index)), index % 10

    def __repr__(self) -> str:
        return f"RemoteReads(n={self.n}, delay_s={self.delay_s})"


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Workload:
    """A named dataset recipe: ``build(size, **options)`` returns the dataset."""

    name: str
    description: str
    default_size: int
    build: Callable[..., Dataset]


def _build_spotgeo(
    size: int,
    *,
    root: str | os.PathLike[str] | None = None,
    crop: int | None = 224,
    seed: int = DEFAULT_SEED,
    progress: Callable[[str], None] | None = None,
) -> SpotGeoFrames:
    frames_dir = ensure_spotgeo(size, root, seed=seed, progress=progress)
    return SpotGeoFrames(frames_dir, size, crop=crop, seed=seed)


def _build_tiny(size: int, **_ignored: Any) -> TinySamples:
    return TinySamples(size)


def _build_latency(size: int, **_ignored: Any) -> RemoteReads:
    return RemoteReads(size)


WORKLOADS: dict[str, Workload] = {
    "spotgeo": Workload(
        name="spotgeo",
        description="SpotGEO-like 640x480 PNG star fields: decode, random 224 crop, flip",
        default_size=6400,
        build=_build_spotgeo,
    ),
    "tiny": Workload(
        name="tiny",
        description="tiny samples (~10 us each): the loader's own overhead",
        default_size=100_000,
        build=_build_tiny,
    ),
    "latency": Workload(
        name="latency",
        description="latency-bound samples: each waits 10 ms, as a remote read would",
        default_size=2_000,
        build=_build_latency,
    ),
}
