"""Checkpoint manifest: every file of a checkpoint with its size and checksum.

Written last into the temporary directory, before the rename that publishes the checkpoint;
verified on load. Hashing is shared out over the ranks (file i goes to rank i % world) so a
large checkpoint is hashed in parallel.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CheckpointCorrupt(RuntimeError):
    """A checkpoint whose files do not match its manifest (or that has none)."""


def list_files(root: str) -> List[str]:
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def file_digest(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _gather_dicts(local: Dict[str, dict]) -> Dict[str, dict]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts: List[Optional[Dict[str, dict]]] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: Dict[str, dict] = {}
    for p in parts:
        merged.update(p or {})
    return merged


def _my_share(files: List[str]) -> List[str]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return files
    r, w = dist.get_rank(), dist.get_world_size()
    return [f for i, f in enumerate(files) if i % w == r]


def write_manifest(root: str, meta: dict) -> None:
    """Collective: hash all files of `root` across ranks; rank 0 writes the manifest."""
    import torch.distributed as dist

    files = list_files(root)
    local = {}
    for rel in _my_share(files):
        p = os.path.join(root, rel)
        local[rel] = {"size": os.path.getsize(p), "blake2b": file_digest(p)}
    entries = _gather_dicts(local)
    if not dist.is_initialized() or dist.get_rank() == 0:
        manifest = {"format": FORMAT_VERSION, **meta, "files": {k: entries[k] for k in sorted(entries)}}
        tmp = os.path.join(root, MANIFEST + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, os.path.join(root, MANIFEST))


def read_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointCorrupt(f"{root}: no {MANIFEST} (an incomplete or foreign checkpoint)")
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointCorrupt(f"{path}: unreadable manifest ({e})") from None


def verify(root: str, checksums: bool = True) -> dict:
    """Collective when distributed: check sizes (and checksums, shared over ranks) against the
    manifest. Returns the manifest; raises CheckpointCorrupt naming the first bad file."""
    manifest = read_manifest(root)
    expected = manifest.get("files", {})
    problems = []
    present = set(list_files(root))
    for rel, entry in expected.items():
        if rel not in present:
            problems.append(f"{rel}: missing")
        elif os.path.getsize(os.path.join(root, rel)) != entry["size"]:
            problems.append(f"{rel}: size {os.path.getsize(os.path.join(root, rel))} != {entry['size']}")
    if checksums and not problems:
        local = {}
        for rel in _my_share(sorted(expected)):
            if file_digest(os.path.join(root, rel)) != expected[rel]["blake2b"]:
                local[rel] = {"problem": "checksum mismatch"}
        for rel, entry in sorted(_gather_dicts(local).items()):
            problems.append(f"{rel}: {entry['problem']}")
    if problems:
        raise CheckpointCorrupt(f"{root}: " + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
    return manifest
