"""ResultStore (serve/jobs/results.py) on a local directory and on fsspec's in-memory filesystem (standing in for an
object store): the file operations, atomic puts, refused path traversal, and a second store on the same root."""

from __future__ import annotations

import uuid

import fsspec
import pytest

from serve.jobs.results import ResultStore
from serve.pipeline import artifacts

VIDEO, HANDOFF, THUMBNAIL = artifacts.VIDEO.file, artifacts.HANDOFF.file, artifacts.THUMBNAIL.file
PREVIEW, LATENTS = artifacts.PREVIEW.file, artifacts.LATENTS.file


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "results" / "not-yet-there")  # created by the store
    else:
        root = f"memory://srd-results-{uuid.uuid4().hex}"
        yield root
        fs, path = fsspec.core.url_to_fs(root)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def test_file_names_are_distinct_and_valid(url):
    names = [a.file for a in (artifacts.EMBEDS, artifacts.HANDOFF, artifacts.handoff(1), artifacts.LATENTS,
                              artifacts.VIDEO, artifacts.THUMBNAIL, artifacts.PREVIEW)]
    assert len(set(names)) == len(names)
    store = ResultStore(url)
    for i, name in enumerate(names):
        store.put("job-1", name, bytes([i]))
    assert store.names("job-1") == sorted(names)


def test_put_get_exists_size_names_delete(url):
    store = ResultStore(url)
    assert store.fs.isdir(store.root)
    assert store.get("job-1", VIDEO) is None and not store.exists("job-1", VIDEO) and store.size("job-1", VIDEO) is None
    assert store.names("job-1") == []

    store.put("job-1", VIDEO, b"mp4 bytes")
    store.put("job-1", HANDOFF, bytearray(b"checkpoint"))
    store.put("job-2", VIDEO, memoryview(b"other job"))
    assert store.get("job-1", VIDEO) == b"mp4 bytes" and store.get("job-1", HANDOFF) == b"checkpoint"
    assert store.exists("job-1", VIDEO) and not store.exists("job-1", THUMBNAIL)
    assert store.size("job-1", VIDEO) == len(b"mp4 bytes")
    assert store.names("job-1") == [HANDOFF, VIDEO] and store.names("job-2") == [VIDEO]

    store.put("job-1", VIDEO, b"replaced")
    assert store.get("job-1", VIDEO) == b"replaced" and store.names("job-1") == [HANDOFF, VIDEO]

    store.delete("job-1")
    store.delete("job-1")  # absent: no error
    store.delete("never-existed")
    assert store.names("job-1") == [] and store.get("job-1", VIDEO) is None and not store.exists("job-1", HANDOFF)
    assert store.get("job-2", VIDEO) == b"other job"  # other jobs untouched

    with pytest.raises(TypeError, match="`data` must be bytes"):
        store.put("job-2", VIDEO, "text")


def test_iter_chunks_streams_the_whole_file(url):
    store = ResultStore(url)
    data = bytes(range(256)) * 10  # 2,560 bytes
    store.put("job", VIDEO, data)
    chunks = list(store.iter_chunks("job", VIDEO, chunk_size=1000))
    assert [len(c) for c in chunks] == [1000, 1000, 560] and b"".join(chunks) == data
    assert b"".join(store.iter_chunks("job", VIDEO)) == data  # default 1 MiB: one chunk
    store.put("job", PREVIEW, b"")
    assert list(store.iter_chunks("job", PREVIEW)) == []
    with pytest.raises(FileNotFoundError):
        store.iter_chunks("job", THUMBNAIL)  # raised at the call, before any response starts
    with pytest.raises(ValueError, match="`chunk_size`"):
        store.iter_chunks("job", VIDEO, chunk_size=0)


def test_a_second_store_on_the_same_root_sees_the_files(url):
    writer, reader = ResultStore(url), ResultStore(url)
    writer.put("job", LATENTS, b"latents")
    assert reader.exists("job", LATENTS) and reader.get("job", LATENTS) == b"latents"
    assert reader.names("job") == [LATENTS]
    reader.delete("job")
    assert not writer.exists("job", LATENTS)


def test_local_urls_with_a_scheme(tmp_path):
    store = ResultStore(f"file://{tmp_path}/with-scheme/")
    store.put("job", VIDEO, b"x")
    assert (tmp_path / "with-scheme" / "job" / VIDEO).read_bytes() == b"x"
    assert ResultStore(str(tmp_path / "with-scheme")).get("job", VIDEO) == b"x"


BAD = ["", ".", "..", "../etc", "a/b", "/abs", ".hidden", "a..b", "a\\b", "a b", "x" * 256, "é", None, 3]


@pytest.mark.parametrize("bad", BAD)
def test_path_traversal_is_refused(tmp_path, bad):
    store = ResultStore(str(tmp_path))
    calls = [
        lambda job, name: store.put(job, name, b"x"), store.get, store.exists, store.size, store.iter_chunks,
    ]
    for call in calls:
        with pytest.raises(ValueError, match="`job_id`"):
            call(bad, VIDEO)
        with pytest.raises(ValueError, match="`name`"):
            call("job", bad)
    for call in (store.delete, store.names):
        with pytest.raises(ValueError, match="`job_id`"):
            call(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written anywhere


def test_local_put_is_atomic_for_readers(tmp_path, monkeypatch):
    """The bytes are written whole under a hidden temporary name; the final name appears (or changes) in one rename."""
    store = ResultStore(str(tmp_path))
    store.put("job", VIDEO, b"old video")
    seen = []
    real_mv = store.fs.mv

    def watching_mv(source, target, **kwargs):
        source_name = source.rsplit("/", 1)[-1]
        seen.append(source_name)
        assert source_name.startswith(".") and source_name != VIDEO and target.endswith(f"/job/{VIDEO}")
        assert store.fs.cat_file(source) == b"new video, complete"  # complete before it gets the final name
        assert store.get("job", VIDEO) == b"old video"  # readers still see the old file whole
        assert store.names("job") == [VIDEO]  # the temporary file is not listed
        return real_mv(source, target, **kwargs)

    monkeypatch.setattr(store.fs, "mv", watching_mv)
    store.put("job", VIDEO, b"new video, complete")
    assert len(seen) == 1
    assert store.get("job", VIDEO) == b"new video, complete"
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == [VIDEO]  # no temporary file left


def test_failed_local_put_leaves_no_file(tmp_path, monkeypatch):
    store = ResultStore(str(tmp_path))

    def failing_mv(source, target, **kwargs):
        raise OSError("disk went away")

    monkeypatch.setattr(store.fs, "mv", failing_mv)
    with pytest.raises(OSError, match="disk went away"):
        store.put("job", VIDEO, b"data")
    assert not store.exists("job", VIDEO)
    assert list((tmp_path / "job").iterdir()) == []  # the temporary file is cleaned up too


def test_object_store_put_writes_the_final_name_once(monkeypatch):
    """An object store's put is atomic already: one write to the final key, no temporary copy."""
    store = ResultStore(f"memory://srd-results-{uuid.uuid4().hex}")
    written = []
    real_pipe = store.fs.pipe_file

    def recording_pipe(path, data, **kwargs):
        written.append(path)
        return real_pipe(path, data, **kwargs)

    monkeypatch.setattr(store.fs, "pipe_file", recording_pipe)
    store.put("job", VIDEO, b"video")
    assert written == [f"{store.root}/job/{VIDEO}"]
    assert store.fs.ls(f"{store.root}/job", detail=False) == [f"{store.root}/job/{VIDEO}"]
    store.delete("job")
