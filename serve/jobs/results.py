"""Where a job's files live: its artifacts (serve/pipeline/artifacts.py: embeddings, hand-offs, latents, the mp4,
its thumbnail, the preview).

A job must survive the replica that ran it, so its files go to a results location rather than an actor's memory:
a local directory by default (one machine), or any fsspec URL (memory://, s3://, gs://...) so that an object store
serves every node of a cluster. The layout is `<root>/<job_id>/<name>`.

`job_id` and `name` come from requests and end up in paths, so both are checked: only [A-Za-z0-9_.-], no leading dot
(which also keeps them apart from the hidden temporary names of `put`) and no "..".
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import fsspec

_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,254}")

# Object stores replace an object in one request: a reader sees the old object or the new one, never a part.
_ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory"}


def _check(argument: str, value) -> str:
    if not (isinstance(value, str) and _SAFE_NAME.fullmatch(value) and ".." not in value):
        raise ValueError(
            f"`{argument}` must be 1-255 characters of [A-Za-z0-9_.-], not starting with '.' and without '..', "
            f"but is {value!r}"
        )
    return value


class ResultStore:
    """Files of jobs under one root (a directory path or an fsspec URL). Holds no per-job state: any number of
    stores, in any processes, on the same root see the same files."""

    def __init__(self, url: str):
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/") or "/"
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self._atomic_put = bool(protocols & _ATOMIC_PUT)
        self.fs.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"ResultStore({self.url!r})"

    def _job_dir(self, job_id: str) -> str:
        return f"{self.root}/{_check('job_id', job_id)}"

    def _path(self, job_id: str, name: str) -> str:
        return f"{self._job_dir(job_id)}/{_check('name', name)}"

    def put(self, job_id: str, name: str, data: bytes) -> None:
        """Write a file whole. Readers never see a partial file under `name`: on a filesystem the bytes go to a
        hidden temporary name in the same directory, then one rename (atomic on POSIX) replaces the final name; an
        object store's put is already atomic, so there the bytes are written directly (a rename would be a copy)."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"`data` must be bytes, not {type(data).__name__}")
        path = self._path(job_id, name)
        self.fs.makedirs(self._job_dir(job_id), exist_ok=True)
        if self._atomic_put:
            self.fs.pipe_file(path, bytes(data))
            return
        temporary = f"{self._job_dir(job_id)}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            self.fs.pipe_file(temporary, bytes(data))
            self.fs.mv(temporary, path)
        except BaseException:
            if self.fs.exists(temporary):
                self.fs.rm(temporary)
            raise

    def get(self, job_id: str, name: str) -> bytes | None:
        """The file's bytes, or None if the job has no such file."""
        try:
            return self.fs.cat_file(self._path(job_id, name))
        except FileNotFoundError:
            return None

    def exists(self, job_id: str, name: str) -> bool:
        return self.fs.isfile(self._path(job_id, name))

    def size(self, job_id: str, name: str) -> int | None:
        """Size in bytes (for a Content-Length header), or None if absent."""
        try:
            return self.fs.size(self._path(job_id, name))
        except FileNotFoundError:
            return None

    def iter_chunks(self, job_id: str, name: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream a file in chunks (an HTTP response body) without holding it in memory. The file is opened now,
        so a missing one raises FileNotFoundError here, before a response has started."""
        if chunk_size < 1:
            raise ValueError(f"`chunk_size` must be >= 1 but is {chunk_size}")
        handle = self.fs.open(self._path(job_id, name), "rb")

        def chunks() -> Iterator[bytes]:
            with handle:
                while chunk := handle.read(chunk_size):
                    yield chunk

        return chunks()

    def delete(self, job_id: str) -> None:
        """Remove every file of the job; nothing to do if it has none."""
        try:
            self.fs.rm(self._job_dir(job_id), recursive=True)
        except FileNotFoundError:
            pass

    def names(self, job_id: str) -> list[str]:
        """The job's file names, sorted; temporary files of writes in progress are not listed."""
        try:
            entries = self.fs.ls(self._job_dir(job_id), detail=True)
        except FileNotFoundError:
            return []
        names = (entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry["type"] == "file")
        return sorted(n for n in names if not n.startswith("."))
