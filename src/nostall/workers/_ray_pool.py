"""Ray actors as workers (``worker_type="ray"``): batches made on any machine of a Ray cluster.

A batch depends only on its sample indices and its per-batch seed, so it can be
made anywhere; the engine's guarantees (order, exactly-once, the window, resume)
do not care where. ``RayPool`` has the interface of ``_pool.ProcessPool``:

* Shipping: the ``WorkSpec`` (dataset, collate_fn, worker_init_fn) is put in Ray's
  object store once (``ray.put``); each actor gets the reference (inside a list,
  so Ray hands over the reference, not the value) and reads it when it starts:
  one copy per node's object store, not one per actor.
* Order: Ray runs one caller's calls to a synchronous actor in the order they were
  sent, so tasks, attribute updates, pauses and resumes reach an actor in the
  engine's order, as through a pipe.
* Results: the actor turns the batch's tensors into numpy arrays, which Ray keeps
  out of band in its object store. Each call's answer comes as a future, which Ray
  completes when the answer is here (read without a copy from the object store on
  this machine) and which queues it for ``poll``; there each array becomes a tensor
  with one copy, and the reference is dropped: the object store holds a batch only
  while it is in flight, so the engine's window bounds its bytes there as locally.
* Deaths: an actor that dies (``ray.kill``, its process killed, its node removed)
  fails its pending calls with ``RayActorError``. The first such failure is
  reported as the worker's death (as a closed pipe is by ``ProcessPool``); the
  rest are ignored, and supervision starts a new actor and sends the batches again.
* Clocks: the engine compares the workers' time stamps with its own clock, and a
  remote machine's ``time.monotonic()`` is another clock: each actor's stamps are
  shifted by the smallest (arrival - done) seen, an upper bound on the offset.

Ray is imported only here, and this module only when a loader asks for Ray.
The engine-facing messages are built by the ``*_message`` functions below.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import queue
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy
import torch

from . import _pickling, _worker
from ._protocol import Result, Started, StartFailed, Stop, Task, WorkerDied

INSTALL_TEXT = "pip install 'nostall[ray]'"
# An actor the cluster has room for, yet not started after this long: resources held
# by other jobs, or a runtime_env that does not build. Raised, never waited on forever.
START_TIMEOUT_S = 120.0


def import_ray():
    """Ray, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            f"worker_type='ray' makes batches in Ray actors, and Ray is not installed here ({exc}). "
            f"Install it with `{INSTALL_TEXT}` (the Ray version nostall is tested with), or use "
            "worker_type='process'."
        ) from exc
    return ray


# --------------------------------------------------------------------------- #
# Messages to the engine (the only place that builds them)
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ActorExit:
    """How a Ray actor ended, with the members of ``_protocol.WorkerExit`` (supervision
    reads ``pid``, ``exitcode``, ``factory`` and ``describe``). ``reason`` is Ray's account."""

    worker_id: int
    pid: int | None
    node: str
    reason: str
    exitcode: int | None = None  # unknown: the process was on another machine, or Ray ended it
    factory: None = None

    def describe(self, doing: str = "") -> str:
        """``"nostall Ray actor 0 (pid 12 on node 10.0.0.3) died while making ...: <Ray's reason>"``."""
        return f"nostall Ray actor {self.worker_id} (pid {self.pid} on node {self.node}) died{doing}: {self.reason}"


def ready_message(worker_id: int) -> tuple:
    """The actor started (worker_init_fn returned): deaths from now on happen making batches."""
    return worker_id, Started()


def start_failed_message(worker_id: int, failed: StartFailed) -> tuple:
    """The actor could not start (an error in worker_init_fn, or reading the dataset)."""
    return worker_id, failed


def death_message(worker_id: int, exit: ActorExit) -> tuple:
    """The actor is gone; supervision replaces it and sends its batches again."""
    return worker_id, WorkerDied(worker_id, exit)


def result_message(worker_id: int, result: Result, offset: float) -> tuple:
    """A made batch, its tensors rebuilt, its time stamps moved to this process's clock."""
    if result.kind == "ok":
        result = result._replace(payload=unpack(result.payload))
    return worker_id, result._replace(started=result.started + offset, done=result.done + offset)


def unsendable_message(worker_id: int, task: Task, error: BaseException, where: str) -> tuple:
    """A batch Ray could not serialize in the actor (``error``: Ray's RayTaskError): raised
    in the loop as that batch's error, of the original type (e.g. TypeError)."""
    cause = getattr(error, "cause", None)
    try:
        raise cause if isinstance(cause, Exception) else RuntimeError(_reason(error))
    except Exception:
        wrapper = _worker.caught(worker_id, f"in nostall Ray actor {worker_id} {where} while sending batch "
                                 f"{task.batch_no} of epoch {task.epoch} (Ray could not serialize it: make the "
                                 f"batch of tensors, arrays and plain Python values). Ray's account: {error}")
    now = time.monotonic()
    return worker_id, Result("error", task.task_id, wrapper, now, now)


# --------------------------------------------------------------------------- #
# Batches through the object store
# --------------------------------------------------------------------------- #


class _Array(NamedTuple):
    """A tensor as a numpy array (Ray stores those out of band, read without a copy).
    ``view``: (dtype, shape) for dtypes numpy lacks (bfloat16), sent as their bytes."""

    array: Any
    view: tuple | None = None


def _rebuild(obj, convert):
    """``obj`` with ``convert`` applied to each value in its dicts, lists and tuples
    (containers rebuilt as they are, namedtuples as default_collate keeps them)."""
    kind = type(obj)
    if kind is dict:
        return {k: _rebuild(v, convert) for k, v in obj.items()}
    if kind is list:
        return [_rebuild(v, convert) for v in obj]
    if kind is tuple:
        return tuple(_rebuild(v, convert) for v in obj)
    if kind is not _Array and isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return kind(*(_rebuild(v, convert) for v in obj))
    return convert(obj)


def _to_array(obj):
    if type(obj) is not torch.Tensor or (
            obj.device.type != "cpu" or obj.requires_grad or obj.layout != torch.strided or obj.is_quantized
            or obj.is_nested or obj.is_conj() or obj.is_neg()):
        return obj
    try:
        return _Array(obj.numpy())
    except TypeError:  # a dtype numpy has not: its bytes
        return _Array(obj.contiguous().reshape(-1).view(torch.uint8).numpy(), (obj.dtype, tuple(obj.shape)))


def _from_array(obj):
    if type(obj) is not _Array:
        return obj
    tensor = torch.from_numpy(numpy.array(obj.array))
    return tensor if obj.view is None else tensor.view(obj.view[0]).reshape(obj.view[1])


def pack(obj):
    """The batch with its plain CPU tensors as :class:`_Array` (other objects, and
    tensors numpy cannot hold, travel as Ray pickles them)."""
    return _rebuild(obj, _to_array)


def unpack(obj):
    """Inverse of :func:`pack`. The arrays are views of Ray's object store, read-only
    and freed with their reference: each tensor gets its own memory, with one copy."""
    return _rebuild(obj, _from_array)


# --------------------------------------------------------------------------- #
# The actor
# --------------------------------------------------------------------------- #


class BatchActor:
    """The body of one Ray actor: nostall's ``BatchMaker``, fed by method calls in the
    order the loader sent them (Ray runs a synchronous actor's calls one at a time)."""

    def __init__(self, spec_box: list, worker_id: int, num_workers: int, base_seed: int, threads: int):
        self._spec_box = spec_box  # [ObjectRef]: read in start(), where its errors can be reported
        self._worker_id, self._num_workers, self._base_seed = worker_id, num_workers, base_seed
        self._threads = threads
        self._maker = None
        self._where = ""

    def start(self) -> tuple:
        """Read the dataset, seed and publish worker info as torch does, run worker_init_fn.
        Returns ``(Started or StartFailed, pid, node id, node IP, time.monotonic())``."""
        import ray

        torch.set_num_threads(self._threads)
        node_id, ip = ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
        self._where = f"on Ray node {ip} (node id {node_id})"
        worker_id = self._worker_id
        try:
            try:
                spec = ray.get(self._spec_box[0])
            except ray.exceptions.RaySystemError as exc:  # Ray's wrapper of the unpickling error
                cause = exc.client_exc
                raise cause if isinstance(cause, Exception) else exc
        except Exception:
            failure = StartFailed(_worker.caught(
                worker_id, f"in nostall Ray actor {worker_id} (pid {os.getpid()}) {self._where} while reading "
                "the dataset, collate_fn and worker_init_fn from Ray's object store (is every module they need "
                "installed on that node?)"))
            return failure, os.getpid(), node_id, ip, time.monotonic()
        maker, failure = _worker._start(spec, worker_id, self._num_workers, self._base_seed, "multiprocessing")
        if failure is not None:
            failure.error.exc_msg += f"\nThe actor ran {self._where}."
            return failure, os.getpid(), node_id, ip, time.monotonic()
        maker.no_shm = True  # batches go through Ray's object store, not /dev/shm files
        self._maker = maker
        return Started(), os.getpid(), node_id, ip, time.monotonic()

    def make(self, task: Task) -> Result:
        """Make one batch; its tensors as numpy arrays (see :func:`pack`)."""
        result = self._maker.make(task)
        if result.kind == "ok":
            return result._replace(payload=pack(result.payload))
        if result.kind == "error" and hasattr(result.payload, "exc_msg"):
            result.payload.exc_msg += f"\nThe actor ran {self._where}."
        return result

    def tell(self, msg) -> None:
        """A message other than a Task (``_protocol``: SetAttrs, Pause, Resume, PipeOnly), in order."""
        _worker.handle(self._maker, msg, _no_answer)


def _no_answer(msg) -> bool:
    return True  # only a Task is answered, and tasks go through BatchActor.make


_remote_class = None


def _actor_class(ray):
    global _remote_class
    if _remote_class is None:
        _remote_class = ray.remote(BatchActor)
    return _remote_class


# --------------------------------------------------------------------------- #
# Room on the cluster
# --------------------------------------------------------------------------- #


def _demand(options: dict) -> dict:
    """The resources one actor asks for, under the names ``ray.nodes()`` uses."""
    need = {"CPU": float(options.get("num_cpus") or 0), "GPU": float(options.get("num_gpus") or 0),
            "memory": float(options.get("memory") or 0)}
    need.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
    return {k: v for k, v in need.items() if v > 0}


def room(ray, options: dict, free: bool = False) -> int | None:
    """How many actors with ``options`` the cluster's alive nodes hold (``free``: in
    what is available now, else in total); None when that cannot be told (a
    scheduling strategy or placement group decides, or nothing is asked for)."""
    strategy = options.get("scheduling_strategy")
    need = _demand(options)
    if (strategy is not None and not isinstance(strategy, str)) or options.get("placement_group") or not need:
        return None
    if free:
        # Available resources per node are not in ray.nodes(); the cluster's sum is
        # enough for a count (it can overestimate for actors split across nodes).
        available = ray.available_resources()
        return int(min(available.get(k, 0.0) / v for k, v in need.items()) + 1e-9)
    count = 0
    for node in ray.nodes():
        if node.get("Alive"):
            have = node.get("Resources", {})
            count += int(min(have.get(k, 0.0) / v for k, v in need.items()) + 1e-9)
    return count


def _nodes_text(ray) -> str:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not nodes:
        return "no alive node"
    parts = []
    for n in nodes:
        res = {k: v for k, v in n.get("Resources", {}).items()
               if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
        parts.append(f"{n.get('NodeManagerAddress')}: " + ", ".join(f"{k} {v:g}" for k, v in sorted(res.items())))
    return f"{len(nodes)} alive node(s): " + "; ".join(parts)


def _check_room(ray, options: dict, count: int, doing: str) -> None:
    """Raise at once when the cluster cannot hold ``count`` such actors at all: Ray
    would leave them pending forever (and their batches with them)."""
    fits = room(ray, options)
    if fits is None or fits >= count:
        return
    need = ", ".join(f"{k} {v:g}" for k, v in _demand(options).items())
    raise RuntimeError(
        f"nostall cannot {doing}: each actor asks for {{{need}}} (ray_actor_options={options_text(options)}), "
        f"and the Ray cluster has room for {fits} such actor(s) in all ({_nodes_text(ray)}). Lower num_workers "
        "or what each actor asks for in ray_actor_options, or add nodes with those resources "
        "(`ray start --address=<head>:6379 --num-cpus=...`)."
    )


def options_text(options: dict) -> str:
    """The user's part of the actor options, for messages."""
    return repr({k: v for k, v in options.items() if k not in ("max_restarts", "max_task_retries")})


def actor_options_for(user: dict | None) -> dict:
    """Each actor's ``.options()``: the user's, with one CPU by default, and no restarts
    by Ray (nostall replaces a dead actor itself, and sends its batches again)."""
    return {"num_cpus": 1, **(user or {}), "max_restarts": 0, "max_task_retries": 0}


def auto_room(user_options: dict | None, most: int) -> tuple[int, float]:
    """``num_workers="auto"``: the most actors to use (at most ``most``, at most what the
    cluster has free now, at least one) and the CPUs they have, the tuner's budget."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init()
    options = actor_options_for(user_options)
    free = room(ray, options, free=True)
    count = max(1, min(most, most if free is None else free))
    return count, count * max(1.0, float(options.get("num_cpus") or 0))


def _reason(exc: BaseException) -> str:
    """Ray's account of a lost actor or object, on one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = "; ".join(lines) or type(exc).__name__
    return text if len(text) <= 600 else text[:597] + "..."


# --------------------------------------------------------------------------- #
# The pool
# --------------------------------------------------------------------------- #


class RayPool:
    """``num_workers`` Ray actors behind ``ProcessPool``'s interface (see the module docstring).

    ``pids`` are the actors' process ids on their own nodes; ``nodes`` their node IPs."""

    passes_attrs = True  # each actor holds its own copy of the dataset
    uses_shm = False  # batches travel through Ray's object store
    can_restart = True
    # An actor takes seconds to be placed and started (a new process, imports, runtime_env):
    # not counted as batch time by the hang check; START_TIMEOUT_S bounds it instead.
    starts_slowly = True
    poll_progressed = False
    blocked = 0.0

    def __init__(self, spec: _worker.WorkSpec, num_workers: int, base_seed: int, start: int | None = None,
                 actor_options: dict | None = None):
        ray = self._ray = import_ray()
        if not ray.is_initialized():
            ray.init()  # Ray's defaults: RAY_ADDRESS or a running cluster, else a local one
        self.num_workers = num_workers
        self._base_seed = base_seed
        self.options = actor_options_for(actor_options)
        cpus = float(self.options.get("num_cpus") or 0)
        self._threads = max(1, int(cpus))
        self.cpus = cpus * num_workers or None  # the scheduler's CPUs: the actors', not this machine's
        first = num_workers if start is None else start
        _check_room(ray, self.options, first, f"start {first} Ray actor(s)")
        self._spec_ref = _put_spec(ray, spec)
        self._actors: dict = {}
        self._gen: dict[int, int] = {}  # worker id -> its current actor's number (older actors' answers are dropped)
        # Answers arrive through futures: Ray calls back when an answer is ready (its value or
        # its error) and the callback queues it, so poll() is a queue read, not a ray.wait
        # over every reference in flight (measured: 1.6 ms per batch for two ray.wait calls).
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._starts: dict = {}  # worker id -> the future of its actor's start()
        self._starting: dict[int, float] = {}  # worker id -> when its actor was asked to start
        self._offset: dict[int, float] = {}  # worker id -> its clock's offset to ours (see the module docstring)
        self.pids: dict[int, int] = {}
        self.exits: dict[int, ActorExit] = {}
        self.nodes: dict[int, str] = {}
        self.node_ids: dict[int, str] = {}
        self._closed = False
        self.owner_pid = os.getpid()
        for worker_id in range(first):
            self._start_actor(worker_id)

    @property
    def foreign(self) -> bool:
        """True in a forked child: the actors belong to the process that started them."""
        return os.getpid() != self.owner_pid

    def _start_actor(self, worker_id: int) -> None:
        cls = _actor_class(self._ray)
        try:
            actor = cls.options(**self.options).remote(
                [self._spec_ref], worker_id, self.num_workers, self._base_seed, self._threads)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"`ray_actor_options` {options_text(self.options)} was refused by Ray: {exc}") from exc
        gen = self._gen[worker_id] = self._gen.get(worker_id, 0) + 1
        self._actors[worker_id] = actor
        self._starts[worker_id] = self._track(actor.start.remote(), worker_id, gen, "start")
        self._starting[worker_id] = time.monotonic()

    def add(self, worker_id: int) -> None:
        """Start one more actor (num_workers="auto")."""
        self._start_actor(worker_id)

    def restart(self, worker_id: int) -> None:
        """Start a new actor under ``worker_id`` in place of one that is gone; raise if
        the cluster has no room left for it (its nodes are gone)."""
        self.pids.pop(worker_id, None)
        self.nodes.pop(worker_id, None)
        self.node_ids.pop(worker_id, None)
        _check_room(self._ray, self.options, len(self._actors) + 1, f"replace Ray actor {worker_id}")
        self._start_actor(worker_id)

    def submit(self, worker_id: int, msg) -> None:
        """Send a task, or a message the actor applies before its next task."""
        actor = self._actors.get(worker_id)
        if actor is None:
            return  # gone and reported; restart() gives the id a new actor
        if isinstance(msg, Task):
            self._track(actor.make.remote(msg), worker_id, self._gen[worker_id], msg)
        elif not isinstance(msg, Stop):  # close() ends the actors
            actor.tell.remote(msg)  # ordered with the tasks; its answer is not needed

    def _track(self, ref, worker_id: int, gen: int, kind):
        """Queue ``ref``'s answer for poll() when it arrives; the reference itself goes
        with it and is dropped once poll() took the answer. ``kind``: "start", or the Task."""
        future = ref.future()
        future.add_done_callback(lambda f, entry=(worker_id, gen, kind, ref): self._inbox.put((entry, f)))
        return future

    def poll(self, timeout: float | None) -> list:
        """Wait up to ``timeout`` seconds for answers; return the messages for the engine."""
        ray = self._ray
        started = time.monotonic()
        out, answers = [], []
        try:
            if timeout == 0:
                answers.append(self._inbox.get_nowait())
            else:
                answers.append(self._inbox.get(timeout=timeout))
            while True:
                answers.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        self.blocked = time.monotonic() - started
        arrived = time.monotonic()
        for entry, future in answers:
            worker_id, gen, kind, _ref = entry
            if gen != self._gen.get(worker_id):
                continue  # an answer of an actor already reported dead
            error = future.exception()
            if error is None:
                value = future.result()
            elif isinstance(error, (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                                    ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                                    ray.exceptions.LocalRayletDiedError)):
                out.append(self._lost(worker_id, error))  # a lost object: its node went with the batch
                continue
            elif isinstance(error, ray.exceptions.RayTaskError) and kind != "start":
                # make() returns every error of the dataset as a Result: this one is Ray's,
                # serializing the batch (an object that cannot be pickled in it)
                out.append(unsendable_message(worker_id, kind, error, f"on node {self.nodes.get(worker_id)}"))
                continue
            elif kind == "start":  # e.g. its runtime_env could not be built: a new actor would fail too
                self.close()
                raise RuntimeError(f"nostall could not start Ray actor {worker_id} with ray_actor_options="
                                   f"{options_text(self.options)}: {type(error).__name__}: {_reason(error)}") from error
            else:
                raise self._cluster_gone(error) from error
            if kind == "start":
                out.append(self._started(worker_id, value, arrived))
            else:
                offset = self._offset[worker_id] = min(self._offset.get(worker_id, math.inf), arrived - value.done)
                out.append(result_message(worker_id, value, offset))
        answers = entry = future = value = _ref = None  # the references: Ray may free the batches in its object store now
        if not out:
            if not ray.is_initialized():
                raise self._cluster_gone(RuntimeError("ray.shutdown() was called, or Ray's connection ended"))
            self._check_starts()
        self.poll_progressed = bool(out)
        return out

    def _started(self, worker_id: int, value: tuple, arrived: float) -> tuple:
        result, pid, node_id, ip, clock = value
        self._starting.pop(worker_id, None)
        self._starts.pop(worker_id, None)  # its reference goes with it
        self.pids[worker_id], self.nodes[worker_id], self.node_ids[worker_id] = pid, ip, node_id
        self._offset[worker_id] = arrived - clock
        if isinstance(result, Started):
            return ready_message(worker_id)
        return start_failed_message(worker_id, result)

    def _lost(self, worker_id: int, exc: BaseException) -> tuple:
        """Report an actor gone; drop its other answers; end it if it lingers (a lost object)."""
        if isinstance(exc, self._ray.exceptions.RayActorError) and exc.actor_init_failed:
            self.close()  # it could not even be created: a new one would fail the same way
            raise RuntimeError(
                f"nostall could not create Ray actor {worker_id} with ray_actor_options={options_text(self.options)}: "
                f"{_reason(exc)}. Is nostall (and every module the dataset needs) installed on every node?"
            ) from exc
        self._gen[worker_id] += 1
        actor = self._actors.pop(worker_id, None)
        if actor is not None:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self._starting.pop(worker_id, None)
        self._starts.pop(worker_id, None)
        exit = self.exits[worker_id] = ActorExit(
            worker_id, self.pids.get(worker_id), self.nodes.get(worker_id, "unknown"), _reason(exc))
        return death_message(worker_id, exit)

    def _check_starts(self) -> None:
        """Raise when an actor waited too long for a place (see ``START_TIMEOUT_S``)."""
        if not self._starting:
            return
        now = time.monotonic()
        late = [w for w, since in self._starting.items() if now - since > START_TIMEOUT_S]
        if not late:
            return
        ray = self._ray
        available = {k: round(v, 2) for k, v in ray.available_resources().items()
                     if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
        self.close()
        raise RuntimeError(
            f"nostall's Ray actor(s) {late} did not start within {START_TIMEOUT_S:g} s "
            f"(ray_actor_options={options_text(self.options)}). The cluster has room for them in total, but "
            f"not free now (available: {available}; {_nodes_text(ray)}): other jobs hold the resources, or "
            "a runtime_env is still being built. Free resources, lower num_workers, or add nodes."
        )

    def _cluster_gone(self, exc: BaseException) -> RuntimeError:
        self._closed = True  # nothing left to end
        return RuntimeError(
            f"nostall lost the Ray cluster its actors ran on ({type(exc).__name__}: {_reason(exc)}). "
            "The loader cannot go on; check the cluster (`ray status`), then iterate again on a new loader "
            "(state_dict() resumes where this one stopped)."
        )

    def kill(self, worker_id: int) -> None:
        """End a (hung) actor; ``poll`` then reports it as died."""
        actor = self._actors.get(worker_id)
        if actor is not None:
            self._ray.kill(actor, no_restart=True)

    def stack(self, worker_id: int) -> str | None:
        """An actor's stack cannot be read from here (it may be on another machine)."""
        return None

    def wait_started(self, timeout: float = 30.0) -> dict:
        """Block until every actor has started; their pids (on their own nodes)."""
        starts = {f: w for w, f in self._starts.items() if w in self._actors}
        concurrent.futures.wait(list(starts), timeout=timeout)
        for future, w in starts.items():
            if future.done() and future.exception() is None:  # else poll() reports it
                _result, pid, node_id, ip, _clock = future.result()
                self.pids[w], self.nodes[w], self.node_ids[w] = pid, ip, node_id
        return {w: pid for w, pid in self.pids.items() if w in self._actors}

    def actor(self, worker_id: int):
        """The Ray actor handle of worker ``worker_id`` (for tests and diagnostics)."""
        return self._actors.get(worker_id)

    def close(self) -> None:
        """End every actor (Ray frees what they held) and release the dataset's copy."""
        if self._closed:
            return
        self._closed = True
        if self.foreign:
            return  # a forked child's copy: the actors are the parent's
        ray = self._ray
        actors, self._actors = list(self._actors.values()), {}
        self._starts.clear()
        if ray.is_initialized():
            for actor in actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # gone already, or the cluster is
                    pass
        self._spec_ref = None


def _put_spec(ray, spec: _worker.WorkSpec):
    """The spec in the object store, once; an unpicklable part is named."""
    try:
        return ray.put(spec)
    except Exception as exc:
        from ray import cloudpickle

        for name in ("dataset", "collate_fn", "worker_init_fn"):
            found = _pickling.unpicklable_path(getattr(spec, name), name, dumps=cloudpickle.dumps)
            if found is None:
                continue
            path, culprit, error = found
            raise TypeError(
                f"worker_type='ray' sends the {name} to other machines, so it must pickle (fork does not cross "
                f"machines): `{path}` ({type(culprit).__name__}: {_pickling._short(culprit)}) cannot be pickled "
                f"({error}). Open files, locks and connections in __getitem__ or worker_init_fn (or implement "
                "__getstate__/__setstate__ to drop and reopen them) instead of holding them from __init__."
            ) from exc
        raise
