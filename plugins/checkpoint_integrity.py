"""Checkpoint integrity: every committed step carries a fingerprint of its content, and a
restore reads a step only if it verifies. Not a plugin (nothing here is registered).

- **Fingerprint** (written by ``orbax_checkpoint.save`` into the ``meta`` item): per
  array, a 32-bit sum of a bijective mix of each 32-bit word of its bytes and the word's
  position, computed on the device together with the "no NaN state is written" check
  (:func:`nnx_trainer.state.finite_and_checksums`); it works on any sharding (the global
  array is summed) and flags any single changed word for certain (a floating-point sum
  would not). The ``meta`` item's
  own JSON gets a SHA-256. Checkpoints of an older format (no fingerprint) restore with
  a warning that they are not verified.
- **Structure**: a committed step (Orbax 0.12 on a local disk calls every directory
  named like a step committed) must hold ``_CHECKPOINT_METADATA``, ``meta/metadata``,
  ``state/_METADATA`` and ``state/manifest.ocdbt``, the JSON ones non-empty and valid.
  Orbax's background deletion unlinks the files of a step and then its directories, so
  a kill during it leaves a step that fails this check; so do power loss and removed
  files.
- **Damage** (:class:`DamagedCheckpoint`) names the step, the file and the cause. In the
  plugin's own directory a damaged step is moved into ``checkpoints/_damaged/`` (never
  deleted; not a step name, so Orbax neither lists nor removes it) and ``"last"`` /
  ``"best"`` / ``"auto"`` fall back; an explicitly named damaged step is refused
  (``checkpoint_restore.py`` reads and decides).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from nnx_trainer.state import finite_and_checksums
from nnx_trainer_plugins.checkpoint_layout import STEP_NAME, listdir, log

DAMAGED_DIR = "_damaged"
JSON_FILES = ("_CHECKPOINT_METADATA", "meta/metadata", "state/_METADATA")
REQUIRED = (*JSON_FILES, "state/manifest.ocdbt")
FINGERPRINTED = 3  # the first checkpoint format that carries a fingerprint


class DamagedCheckpoint(Exception):
    """A committed step that cannot be read or does not verify."""

    def __init__(self, step: int, file: str, cause: str) -> None:
        self.step, self.file, self.cause = step, file, cause
        super().__init__(f"checkpoint step {step} is damaged: {file}: {cause}")


# ---------------------------------------------------------------------- fingerprint


def array_path(path: tuple) -> str:
    """``model/fc1/kernel`` for a pytree key path (an NNX Variable's ``.value`` dropped)."""
    names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return "/".join(names[:-1] if names and names[-1] == "value" else names)


def array_leaves(tree: Any) -> list[tuple[str, Any]]:
    return [(array_path(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(x, "dtype")]


def fingerprint(tree: Any) -> tuple[bool, dict[str, str]]:
    """(every float array finite, ``{array path: checksum}``)."""
    leaves = array_leaves(tree)
    checks = finite_and_checksums([x for _, x in leaves])
    return (all(finite for finite, _ in checks),
            {p: f"{s:08x}" for (p, _), (_, s) in zip(leaves, checks, strict=True)})


def _meta_digest(meta: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def seal(meta: dict[str, Any], arrays: Mapping[str, str]) -> dict[str, Any]:
    """``meta`` (JSON types) with its fingerprint: the arrays' checksums and its own digest."""
    digest = _meta_digest(meta)
    meta["checkpoint"] = {**meta["checkpoint"],
                          "fingerprint": {"arrays": dict(arrays), "meta": digest}}
    return meta


def verify_meta(meta: Mapping[str, Any], step: int) -> dict[str, str] | None:
    """The stored array checksums after checking the meta digest (None: an older format)."""
    info = dict(meta.get("checkpoint") or {})
    stored = info.pop("fingerprint", None)
    if stored is None:
        if int(info.get("format", 0)) >= FINGERPRINTED:
            raise DamagedCheckpoint(step, "meta/metadata", "its fingerprint is missing")
        if jax.process_index() == 0:
            log.warning("checkpoint step %d predates checkpoint fingerprints (format %s): "
                        "its content cannot be verified", step, info.get("format"))
        return None
    if _meta_digest({**meta, "checkpoint": info}) != stored.get("meta"):
        raise DamagedCheckpoint(step, "meta/metadata",
                                "its content does not match its fingerprint")
    return dict(stored.get("arrays") or {})


def verify_arrays(arrays: Any, stored: Mapping[str, str], step: int) -> None:
    """Raise naming the first restored array whose checksum differs from the stored one."""
    _, now = fingerprint(arrays)
    for path, value in now.items():
        if path in stored and stored[path] != value:
            raise DamagedCheckpoint(step, f"state/ (array {path})",
                                    "its bytes do not match the fingerprint saved with it "
                                    "(corrupted on disk)")


# ------------------------------------------------------------------------ structure


def structure_problem(step_dir: Path) -> tuple[str, str] | None:
    """``(file, cause)`` when ``step_dir`` lacks what a committed step holds, else None."""
    if not step_dir.is_dir():
        return f"{step_dir.name}/", "missing"
    if not listdir(step_dir):
        return f"{step_dir.name}/", "the step directory is empty"
    for rel in REQUIRED:
        path = step_dir / rel
        if rel.startswith("state/") and not (step_dir / "state").is_dir():
            return "state/", "missing"
        if not path.is_file():
            return rel, "missing (a save or a deletion was cut short, or it was removed)"
        if path.stat().st_size == 0:
            return rel, "empty (0 bytes)"
    for rel in (*JSON_FILES, "metrics/metrics"):
        path = step_dir / rel
        if rel.startswith("metrics/") and not path.is_file():
            continue
        try:
            json.loads(path.read_bytes() or b"{}")
        except (ValueError, OSError) as exc:
            return rel, f"not valid JSON ({exc})"
    return None


def tree_problem(step_dir: Path) -> tuple[str, str] | None:
    """``(file, cause)`` when the ``state`` item's OCDBT tree does not decode (TensorStore
    checks each node's CRC), found synchronously: a failure inside Orbax's restore also
    leaves TensorStore callbacks printing tracebacks onto its closed event loop."""
    import tensorstore as ts

    try:
        ts.KvStore.open({"driver": "ocdbt", "base": f"file://{step_dir / 'state'}/"}
                        ).result().list().result()
    except Exception as exc:  # TensorStore raises ValueError for every failure
        return describe(exc, step_dir, "state/")
    return None


def describe(exc: BaseException, step_dir: Path, item: str) -> tuple[str, str]:
    """``(file, cause)`` of a read error: the file it names (TensorStore's innermost
    ``local file "..."``, an ``OSError``'s filename), else the item, and one line. Orbax
    wraps TensorStore's error (``raise Exception(...) from e``): the innermost one says most.
    """
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(str(exc).split())
    files = re.findall(r'local file "([^"]+)"', text)
    name = files[-1] if files else getattr(exc, "filename", None)
    cause = text.rsplit(f'"{files[-1]}": ', 1)[-1] if files else text
    cause = cause.split(" [tensorstore_spec=")[0]  # (the spec: a page of JSON)
    file = item
    if name:
        try:
            file = str(Path(name).resolve().relative_to(step_dir.resolve())) or item
        except ValueError:
            file = str(name)
    key = re.search(r'Error reading "([^"/]+)[^"]*" in OCDBT database', text)
    if key and file.rstrip("/") == "state":  # no file named, but the array it was reading
        file = f"state/ (array {key[1].removesuffix('.value').replace('.', '/')})"
    cause = f"{type(exc).__name__}: {cause}" if cause else type(exc).__name__
    return file, cause if len(cause) <= 300 else cause[:297] + "..."


def set_aside(directory: Path, damage: DamagedCheckpoint) -> Path:
    """Move the damaged step into ``directory/_damaged/<step>-<n>`` (never deleted)."""
    root = directory / DAMAGED_DIR
    root.mkdir(parents=True, exist_ok=True)
    n = 1 + sum(1 for name in listdir(root) if name.startswith(f"{damage.step}-"))
    aside = root / f"{damage.step}-{n}"
    os.replace(directory / str(damage.step), aside)
    (aside.parent / f"{aside.name}.reason.txt").write_text(f"{damage}\n")
    log.warning("%s; moved it to %s (not deleted)", damage, aside)
    return aside


def set_aside_incomplete(directory: Path) -> list[tuple[int, Path]]:
    """Move every step of ``directory`` that fails :func:`structure_problem` aside."""
    moved = []
    for name in listdir(directory):
        if STEP_NAME.match(name) and (problem := structure_problem(directory / name)):
            damage = DamagedCheckpoint(int(name), *problem)
            moved.append((damage.step, set_aside(directory, damage)))
    return moved


def refusal(damage: DamagedCheckpoint, directory: Path) -> ValueError:
    """The error for a damaged step named explicitly: left as it is, with the fix."""
    from nnx_trainer_plugins.checkpoint_layout import fmt_steps

    others = [int(n) for n in listdir(directory) if STEP_NAME.match(n) and int(n) != damage.step]
    there = f"steps there: {fmt_steps(others)}" if others else "no other step is there"
    return ValueError(
        f"{damage} ({directory / str(damage.step)}, left as it is). Pass another step "
        f"directory ({there}), or ckpt_path='last' (or 'auto') for its run directory, which "
        "moves damaged steps aside and resumes from the newest intact one")
