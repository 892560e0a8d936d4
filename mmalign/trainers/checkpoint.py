"""Checkpoints that are never lost and never execute code: written new-then-rename, read without pickle.

A checkpoint is ``<output_dir>/checkpoints/checkpoint-<step>/`` holding only safetensors and JSON:

- ``trainable.safetensors``: the trainable weights (a LoRA is megabytes, not the 5 GB UNet);
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensors, and its scalars and param groups;
- ``scheduler.json``, ``scaler.json`` (fp16 only), ``method_state.safetensors`` (e.g. Self-NPO's EMA teacher);
- ``rng-<rank>.safetensors`` + ``rng-<rank>.json``: every process's torch/CUDA/python/numpy RNG state;
- ``state.json``: step, run id and data position (epoch, batches consumed in it, accelerate's micro-step);
- ``COMPLETE.json``, written last: size and sha256 of every other file. A folder without it is not a checkpoint.

Why not ``accelerator.save_state``: accelerate 1.15 pickles the optimizer, scheduler and RNG states, reads
registered custom state back with ``torch.load(weights_only=False)`` (a planted payload runs on resume) and
silently skips an unreadable RNG file (the resume is then no longer exact). Nothing here unpickles anything.

Saving: every file goes into ``.tmp-checkpoint-<step>`` and is fsynced, the marker last, then the folder is
renamed into place; an older folder of the same name is moved aside first and deleted only after the rename;
rotation then deletes the oldest *complete* checkpoints *of this run* (``checkpoint-<int>`` only; foreign,
incomplete and other runs' folders are never touched). :func:`recover` undoes a save cut short at any point.
Loading verifies the marker's checksums and parses every file before touching the model, so a corrupt
newest checkpoint is reported and the previous complete one is used instead. Weights and optimizer tensors are
read when applied, one tensor at a time, and under FSDP2 each process reads only the rows it holds
(:class:`StoredTensors`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmalign.trainers.master_weights import MASTER, MasterWeights
from mmalign.trainers.sharding import gathered, is_sharded, shard_from

CHECKPOINT_PREFIX = "checkpoint-"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_TENSORS, OPTIMIZER_META = "optimizer.safetensors", "optimizer.json"
SCHEDULER_FILE, SCALER_FILE = "scheduler.json", "scaler.json"
METHOD_STATE_FILE = "method_state.safetensors"
STATE_FILE, COMPLETE_FILE = "state.json", "COMPLETE.json"
RUN_FILE = "run.json"  # in output_dir: the id of the run that owns it
FORMAT = 1
FAULT_ENV = "MMALIGN_FAULT"  # test/bench hook: "<point>@<step>" -> SIGKILL (or raise, MMALIGN_FAULT_ACTION=raise) there
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class CheckpointError(RuntimeError):
    """One checkpoint cannot be used: the message names the folder, the file and why."""


class InjectedFault(BaseException):
    """Raised at a fault point with MMALIGN_FAULT_ACTION=raise: a crash, as far as the code around it can tell."""


def fault(point: str, step: int) -> None:
    """Die here if ``$MMALIGN_FAULT`` names this point (and step): lets tests and bench/kill_resume.py cut a
    run short at an exact place, e.g. between writing a checkpoint's files and its completeness marker."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, at = spec.partition("@")
    if name != point or (at and int(at) != step):
        return
    if os.environ.get("MMALIGN_FAULT_ACTION") == "raise":
        raise InjectedFault(f"{point}@{step}")
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# durable writes


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(obj))
        f.flush()
        os.fsync(f.fileno())


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    _fsync(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# what goes in: optimizer, RNG, trainable weights as plain tensors + JSON


def trainable_state(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The trainable weights as full CPU tensors. Sharded (FSDP2) weights are gathered, a collective: every
    process calls this, and those with ``keep=False`` return ``{}`` (only the writer holds the copy)."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            full = gathered(p.detach())
            if keep:
                out[n] = full.to("cpu", copy=True).contiguous()
    return out


def optimizer_files(
    state: dict[str, Any], keep: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer ``state_dict`` as (tensors keyed ``"<param>/<name>"``, JSON with scalars and param groups).

    Sharded (FSDP2) state is gathered in a fixed order, a collective, as in :func:`trainable_state`."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid in sorted(state["state"]):
        for name, value in sorted(state["state"][pid].items()):
            if isinstance(value, torch.Tensor):
                value = gathered(value)
                if keep:
                    tensors[f"{pid}/{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


class StoredTensors(Mapping[str, torch.Tensor]):
    """The tensors of one checkpoint file, read when used rather than when the checkpoint is parsed: ``[key]``
    reads that whole tensor, :meth:`read_like` only the part this process holds of a sharded (FSDP2) weight. A
    resume on N processes then reads each tensor once in all, with no communication; before, every process
    read every whole tensor (and copied it to its GPU) and rank 0's copy was scattered
    (``bench/bench_resume_memory.py``: 4 processes loaded a 1 GB file in 0.14-0.34 s instead of 1.1 s)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self._file = safe_open(str(path), framework="pt")  # parses the header; data is memory-mapped
        self._keys = dict.fromkeys(self._file.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __delitem__(self, key: str) -> None:
        del self._keys[key]  # from this view; the file is untouched

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def read_like(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """Tensor ``key`` laid out as ``like``: the whole tensor, or only this process's shard when ``like`` is one."""
        return shard_from(
            lambda region: self[key] if region is None else self._file.get_slice(key)[region], like
        )


def optimizer_state(tensors: StoredTensors, meta: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """The optimizer ``state_dict`` from its files, for ``optimizer``. Where its parameters are sharded (FSDP2),
    each per-parameter tensor of its parameter's shape is read in that parameter's layout: only this process's
    shard."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = is_sharded(params)
    state: dict[int, dict[str, Any]] = {}
    for key in tensors:
        pid, _, name = key.partition("/")
        like = params[int(pid)] if sharded else None
        keep_layout = like is not None and tensors.shape(key) == tuple(like.shape)
        state.setdefault(int(pid), {})[name] = tensors.read_like(key, like) if keep_layout else tensors[key]
    for pid, entries in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_files() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: torch CPU/CUDA as uint8 tensors, python and numpy as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def set_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len([k for k in tensors if k.startswith("cuda.")]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------------------------------
# listing and recovery


def checkpoint_step(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_FILE).is_file() and (path / STATE_FILE).is_file()


def run_id_of(path: Path) -> str | None:
    try:
        return json.loads((path / STATE_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def list_checkpoints(root: str | Path, run_id: str | None = None, *, unreadable: bool = False) -> list[Path]:
    """Complete ``checkpoint-<int>`` folders under ``root`` (of run ``run_id`` if given), oldest first.

    ``root`` is a run's ``checkpoints/`` folder, or its output_dir (``checkpoints/`` is then added).
    ``unreadable``: also those whose state.json cannot be read (so a resume reports them instead of
    taking them for another run's; rotation leaves them alone)."""
    root = Path(root)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None and is_complete(p)]
    if run_id is not None:
        found = [p for p in found if run_id_of(p) == run_id or (unreadable and run_id_of(p) is None)]
    return sorted(found, key=checkpoint_step)


def incomplete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None and not is_complete(p)
    )


def recover(root: Path) -> list[str]:
    """Finish or undo a save that was cut short; returns what was done (for the log).

    ``.old-checkpoint-N`` (moved aside for a re-save at the same step) goes back if ``checkpoint-N`` never
    arrived; leftover ``.tmp-*`` (unfinished) and ``.deleting-*`` (rotated out) folders are removed."""
    done = []
    if not root.is_dir():
        return done
    for p in sorted(root.iterdir()):
        if p.name.startswith(".old-"):
            final = root / p.name[len(".old-") :]
            if not final.exists() and is_complete(p):
                os.replace(p, final)
                done.append(f"restored {final.name} (a re-save of it was interrupted)")
                continue
        if p.name.startswith((".old-", ".tmp-", ".deleting-")):
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed unfinished {p.name}")
    return done


# --------------------------------------------------------------------------------------------------
# saving


@dataclass
class Saveable:
    """What a checkpoint captures. ``model`` is the unwrapped denoiser; the rest as prepared by accelerate."""

    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    scaler: Any = None
    method_state: Any = None  # state_dict() -> dict[str, Tensor], load_state_dict(dict[str, Tensor])


def save_checkpoint(
    root: Path, step: int, state: dict[str, Any], parts: Saveable, accelerator: Any, keep_last: int | None
) -> Path:
    """Write ``root/checkpoint-<step>`` so that no finished checkpoint is lost at any instant; then rotate.

    Args:
        root: the run's ``checkpoints/`` folder.
        step: the optimizer step the state is at.
        state: what state.json holds besides the step (run_id, method, data position ...).
        parts: the objects to save.
        accelerator: for the process rank and barriers (every process writes its RNG state).
        keep_last: keep this many complete checkpoints of this run (None: all).
    """
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f".tmp-{final.name}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    fault("ckpt-begin", step)
    if main or is_sharded(parts.model.parameters()):  # gathering shards: every process takes part
        weights = trainable_state(parts.model, keep=main)
        opt_tensors, opt_meta = optimizer_files(parts.optimizer.state_dict(), keep=main)
    if main:
        write_tensors(tmp / TRAINABLE_FILE, weights)
        fault("ckpt-weights", step)
        write_tensors(tmp / OPTIMIZER_TENSORS, opt_tensors)
        write_json(tmp / OPTIMIZER_META, opt_meta)
        write_json(tmp / SCHEDULER_FILE, parts.scheduler.state_dict())
        if parts.scaler is not None:
            write_json(tmp / SCALER_FILE, parts.scaler.state_dict())
        if parts.method_state is not None:
            write_tensors(tmp / METHOD_STATE_FILE, parts.method_state.state_dict())
        fault("ckpt-optimizer", step)
    tensors, meta = rng_files()
    write_tensors(tmp / f"rng-{accelerator.process_index}.safetensors", tensors)
    write_json(tmp / f"rng-{accelerator.process_index}.json", meta)
    accelerator.wait_for_everyone()  # every rank's RNG state is on disk before the marker
    if main:
        write_json(tmp / STATE_FILE, {"format": FORMAT, "step": step, **state})
        fault("ckpt-files", step)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        write_json(tmp / COMPLETE_FILE, {"files": files})
        _fsync(tmp)
        fault("ckpt-marker", step)
        old = root / f".old-{final.name}"
        if (
            final.exists()
        ):  # a re-save at the same step: move the old one aside, delete it only after the rename
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            fault("ckpt-old-moved", step)
        os.replace(tmp, final)
        _fsync(root)
        fault("ckpt-renamed", step)
        shutil.rmtree(old, ignore_errors=True)
        if keep_last is not None:
            rotate(root, state.get("run_id"), keep_last, step)
        fault("ckpt-done", step)
    accelerator.wait_for_everyone()
    return final


def rotate(root: Path, run_id: str | None, keep_last: int, step: int) -> None:
    """Delete this run's oldest complete checkpoints beyond ``keep_last`` (never others', never foreign names)."""
    mine = list_checkpoints(root, run_id)
    for old in mine[: max(len(mine) - keep_last, 0)]:
        doomed = root / f".deleting-{old.name}"
        os.replace(old, doomed)  # gone from the listing at once; a kill here leaves only a hidden folder
        fault("ckpt-rotating", step)
        shutil.rmtree(doomed, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# loading


@dataclass
class Checkpoint:
    """Everything a checkpoint holds, parsed and checked, not yet applied to any object."""

    path: Path
    state: dict[str, Any]
    trainable: StoredTensors
    optimizer_tensors: StoredTensors
    optimizer_meta: dict[str, Any]
    scheduler: dict[str, Any]
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]]
    scaler: dict[str, Any] | None = None
    method_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def step(self) -> int:
        return int(self.state["step"])


def read_checkpoint(path: Path, rank: int = 0) -> Checkpoint:
    """Verify ``path`` against its marker and parse every file (safetensors and JSON only, never pickle). The
    weights' and optimizer's tensors stay in their files until :func:`apply_checkpoint` reads them.

    Raises:
        CheckpointError: naming the folder, the file and the problem.
    """
    from safetensors.torch import load_file

    path = Path(path)
    try:
        marker = json.loads((path / COMPLETE_FILE).read_text())
        listed = marker["files"]
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: incomplete (no {COMPLETE_FILE}): its save never finished") from err
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{path}/{COMPLETE_FILE}: unreadable ({type(err).__name__}: {str(err)[:100]})"
        ) from err
    needed = {
        TRAINABLE_FILE,
        OPTIMIZER_TENSORS,
        OPTIMIZER_META,
        SCHEDULER_FILE,
        STATE_FILE,
        f"rng-{rank}.safetensors",
        f"rng-{rank}.json",
    }
    if not isinstance(listed, dict) or not needed <= set(listed):
        raise CheckpointError(f"{path}: {COMPLETE_FILE} does not list {sorted(needed - set(listed or ()))}")
    for name, info in listed.items():
        f = path / Path(name).name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != info.get("bytes") or _sha256(f) != info.get("sha256"):
            raise CheckpointError(f"{path}: {name} is corrupt (size or sha256 differs from {COMPLETE_FILE})")

    def tensors(name: str, lazy: bool = False) -> Mapping[str, torch.Tensor]:
        try:
            return StoredTensors(path / name) if lazy else load_file(str(path / name))
        except Exception as err:  # safetensors raises its own error type for every malformed file
            raise CheckpointError(f"{path}/{name}: not a safetensors file ({str(err)[:100]})") from err

    def js(name: str) -> Any:
        try:
            return json.loads((path / name).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path}/{name}: not JSON ({str(err)[:100]})") from err

    state = js(STATE_FILE)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}/{STATE_FILE}: not an mmalign checkpoint state (format {FORMAT} with a step)"
        )
    return Checkpoint(
        path=path,
        state=state,
        trainable=tensors(TRAINABLE_FILE, lazy=True),
        optimizer_tensors=tensors(OPTIMIZER_TENSORS, lazy=True),
        optimizer_meta=js(OPTIMIZER_META),
        scheduler=js(SCHEDULER_FILE),
        rng=(tensors(f"rng-{rank}.safetensors"), js(f"rng-{rank}.json")),
        scaler=js(SCALER_FILE) if SCALER_FILE in listed else None,
        method_state=tensors(METHOD_STATE_FILE) if METHOD_STATE_FILE in listed else None,
    )


def apply_checkpoint(ckpt: Checkpoint, parts: Saveable) -> None:
    """Load a parsed checkpoint into the run's objects; a mismatch raises :class:`CheckpointError` naming it."""
    params = {n: p for n, p in parts.model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(ckpt.trainable)), sorted(set(ckpt.trainable) - set(params))
    if missing or extra:
        raise CheckpointError(
            f"{ckpt.path}/{TRAINABLE_FILE}: does not match the model's trainable weights "
            f"({len(missing)} missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]}): "
            "was it written with another lora/model setting?"
        )
    for name, p in params.items():
        if ckpt.trainable.shape(name) != tuple(p.shape):
            raise CheckpointError(
                f"{ckpt.path}/{TRAINABLE_FILE}: {name} has shape {ckpt.trainable.shape(name)}, "
                f"the model {tuple(p.shape)}: was it written with another lora.rank or model?"
            )
    if (ckpt.method_state is None) != (parts.method_state is None):
        raise CheckpointError(
            f"{ckpt.path}: method state {'missing' if ckpt.method_state is None else 'unexpected'} "
            f"({METHOD_STATE_FILE}): was it written by another method or method.ema_decay?"
        )
    saved_masters = any(key.partition("/")[2] == MASTER for key in ckpt.optimizer_tensors)
    if saved_masters != isinstance(getattr(parts.optimizer, "optimizer", parts.optimizer), MasterWeights):
        was, now = ("bf16", "fp32") if saved_masters else ("fp32", "bf16")
        raise CheckpointError(
            f"{ckpt.path}: written with train.trainable_dtype={was}, this run has {now}: resume with the same setting"
        )
    _fit_param_groups(ckpt.optimizer_meta["param_groups"], parts.optimizer.state_dict()["param_groups"])
    try:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(ckpt.trainable.read_like(name, p))
        parts.optimizer.load_state_dict(
            optimizer_state(ckpt.optimizer_tensors, ckpt.optimizer_meta, parts.optimizer)
        )
        parts.scheduler.load_state_dict(ckpt.scheduler)
        if parts.scaler is not None and ckpt.scaler is not None:
            parts.scaler.load_state_dict(ckpt.scaler)
        if parts.method_state is not None:
            parts.method_state.load_state_dict(ckpt.method_state)
        set_rng(*ckpt.rng)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as err:
        raise CheckpointError(
            f"{ckpt.path}: does not fit this run ({type(err).__name__}: {str(err)[:160]})"
        ) from err


_KERNEL_KEYS = ("fused", "foreach", "capturable")  # how this run's optimizer computes, not what it has learnt


def _fit_param_groups(saved: list[dict[str, Any]], current: list[dict[str, Any]]) -> None:
    """Saved param groups as this run's optimizer needs them: JSON turned tuples (AdamW's betas) into lists, given
    back their type; and the kernel choice (fused / foreach) is this run's, so a checkpoint resumes on a device or
    torch where the saving run's kernel does not exist, and an older checkpoint gets the fused kernel."""
    for group, now in zip(saved, current):
        for key, value in now.items():
            if isinstance(value, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])
            elif key in _KERNEL_KEYS:
                group[key] = value


def load_latest(root: Path, run_id: str | None, rank: int, warn: Any = print) -> Checkpoint | None:
    """The newest complete checkpoint of ``run_id`` that reads back whole; older ones are tried in turn, with a
    warning naming each unusable one. None when there is none at all.

    Raises:
        CheckpointError: checkpoints exist but none can be read.
    """
    candidates = list_checkpoints(root, run_id, unreadable=True)
    errors = []
    for path in reversed(candidates):
        try:
            ckpt = read_checkpoint(path, rank)
        except CheckpointError as err:
            errors.append(str(err))
            warn(f"warning: skipping checkpoint {path.name}: {err}; trying the previous one")
            continue
        return ckpt
    if errors:
        raise CheckpointError(
            f"no usable checkpoint in {root}: {errors[0]}"
            + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
        )
    return None


# --------------------------------------------------------------------------------------------------
# run identity


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def read_run_id(output_dir: Path) -> str | None:
    try:
        return json.loads((output_dir / RUN_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------------------------------
# signals

STOP_SIGNALS = tuple(
    s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGHUP")) if s is not None
)


class StopOnSignal:
    """``with StopOnSignal() as stop:`` — the first SIGTERM/SIGINT/SIGHUP sets ``stop.signum`` (the loop saves a
    checkpoint at the next step boundary and stops); a second one exits at once with 128 + its number.

    Handlers are installed only in the main thread (Python allows no other) and restored on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            sys.stderr.write(f"\nmmalign: second {name}: exiting now, without a checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        sys.stderr.write(
            f"\nmmalign: {name}: saving a checkpoint after this step, then stopping (again to exit at once)\n"
        )
        sys.stderr.flush()
