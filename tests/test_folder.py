"""The index folder's owner: generations committed atomically, one writer, parts keyed by content, moves."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import build_world

from retrieval.data.synth import SynthConfig, make_data
from retrieval.errors import UserError
from retrieval.infer.indexdir.build import add_to_index, open_index
from retrieval.infer.indexdir.folder import IndexFolder, WriterBusy
from retrieval.infer.pipeline.embed import LoaderSettings
from retrieval.infer.query import embed_pictures, product_pictures, similar


def test_a_moved_folder_still_opens_and_a_missing_source_is_named(small_data, trained_run, tmp_path):
    # built here, not copied: a copy would still find the shared world's data through the folder's origin
    world = build_world(tmp_path / "world", small_data, trained_run)
    before = open_index(world / "idx")
    pid, pictures = int(before.product_ids[3]), product_pictures(before, 3)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(world, moved)
    after = open_index(moved / "idx")
    assert np.array_equal(after.product_ids, before.product_ids)
    assert similar(after, product_id=pid, k=1, include_self=True)[0].product_id == pid
    assert product_pictures(after, 3) == pictures  # read from the moved data file
    (moved / "data" / "train.bson").rename(moved / "data" / "gone.bson")
    with pytest.raises(UserError, match=r"indexed data file .*train\.bson is missing"):
        product_pictures(open_index(moved / "idx"), 3)


def test_a_second_writer_is_refused(world, small_data):
    with IndexFolder(world / "idx").writer():
        with pytest.raises(WriterBusy, match="another process is writing this index"):
            add_to_index(world / "idx", small_data["test.bson"], LoaderSettings(workers=0))
    assert len(open_index(world / "idx").product_ids) == 150  # nothing was added


def test_a_part_left_by_a_dead_add_is_never_taken_for_another_upload(world, tmp_path, monkeypatch):
    """An add dies after writing its part and before its commit; a different upload must get its own vectors."""
    idx = world / "idx"
    first = make_data(tmp_path / "first", SynthConfig(products=12, categories=3, seed=11, image_size=32),
                      progress=False)["train.bson"]
    second = make_data(tmp_path / "second", SynthConfig(products=12, categories=3, seed=12, image_size=32),
                       progress=False)["train.bson"]
    gen_before = IndexFolder(idx).generation()

    def die(self, write):
        raise KeyboardInterrupt  # killed between the part write and the commit

    monkeypatch.setattr(IndexFolder, "commit", die)
    with pytest.raises(KeyboardInterrupt):
        add_to_index(idx, first, LoaderSettings(workers=0))
    monkeypatch.undo()
    assert IndexFolder(idx).generation() == gen_before and len(open_index(idx).product_ids) == 150
    added, _ = add_to_index(idx, second, LoaderSettings(workers=0))
    b = open_index(idx)
    assert added > 0 and len(b.product_ids) == 150 + added
    for pos in range(150, len(b.product_ids)):  # each stored vector is the upload's own picture, re-embedded
        emb, _, _ = embed_pictures(b, product_pictures(b, pos), mirror=False)
        assert float(emb @ b.vector(pos)) > 0.9999


def test_commit_is_all_or_nothing(world):
    layout = IndexFolder(world / "idx")
    live = layout.generation()

    def half_written(gen):
        (gen / "manifest.json").write_text("{")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        layout.commit(half_written)
    assert layout.generation() == live and len(open_index(world / "idx").product_ids) == 150
    assert not [p for p in (world / "idx" / "generations").iterdir() if p.name.startswith(".new-")]


ADD = """
import sys
from retrieval.infer.indexdir.build import add_to_index
from retrieval.infer.pipeline.embed import LoaderSettings
print("added", add_to_index(sys.argv[1], sys.argv[2], LoaderSettings(workers=0))[0], flush=True)
"""


@pytest.mark.slow
def test_kill_9_at_random_moments_of_an_add_leaves_old_or_new_and_the_next_add_is_right(world, tmp_path):
    """An add in its own process, killed with SIGKILL at 10 random moments: each time the folder opens at the
    old or the new generation with consistent counts, and a final add completes it exactly."""
    import os
    import signal
    import subprocess
    import sys
    import time
    root = Path(__file__).resolve().parents[1]
    new = make_data(tmp_path / "new", SynthConfig(products=30, categories=3, seed=21, image_size=32),
                    progress=False)["train.bson"]
    script = tmp_path / "add.py"
    script.write_text(ADD)
    env = {**os.environ, "PYTHONPATH": str(root)}
    t = time.perf_counter()  # how long one whole add takes here, to spread the kills over it
    probe = world / "probe"  # beside the index: its relative paths hold
    shutil.copytree(world / "idx", probe)
    done = subprocess.run([sys.executable, str(script), str(probe), str(new)], check=True, env=env,
                          capture_output=True, text=True, timeout=300)
    whole = time.perf_counter() - t
    full = 150 + int(done.stdout.split()[-1])  # ids already indexed are skipped
    rng = np.random.default_rng(7)
    idx = world / "idx"
    for moment in rng.uniform(0.2 * whole, whole, 10):
        p = subprocess.Popen([sys.executable, str(script), str(idx), str(new)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        time.sleep(moment)
        p.send_signal(signal.SIGKILL)
        p.wait(60)
        b = open_index(idx)  # never torn
        n = len(b.product_ids)
        assert n in (150, full) and b.manifest.count == n == len(b.vectors) == len(b.arrays["category_ids"])
        if n == full:
            break
    out = subprocess.run([sys.executable, str(script), str(idx), str(new)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    b = open_index(idx)
    assert len(b.product_ids) == full > 150 and len(set(b.product_ids.tolist())) == full
    for pos in (150, full - 1):  # the added vectors are the added products' own
        emb, _, _ = embed_pictures(b, product_pictures(b, pos), mirror=False)
        assert float(emb @ b.vector(pos)) > 0.9999


def test_a_copy_of_the_folder_alone_still_finds_its_run_and_data(built_world, tmp_path):
    copy = tmp_path / "deep" / "er" / "copy"  # only reads the shared folder: copies its index elsewhere
    shutil.copytree(built_world / "idx", copy)
    b = open_index(copy)
    assert len(b.product_ids) == 150 and product_pictures(b, 0) == product_pictures(open_index(built_world / "idx"), 0)


def test_folders_are_named_by_their_path_in_messages(tmp_path):
    """A log line or error that formats a folder object shows its path, never ``<... object at 0x...>``."""
    from retrieval.infer.indexdir.folder import IndexFolder
    from retrieval.infer.pipeline.store import PartStore
    store = PartStore(tmp_path / "parts", {"k": 1})
    for obj, path in ((IndexFolder(tmp_path / "idx"), tmp_path / "idx"), (store, tmp_path / "parts")):
        assert f"written to {obj}" == f"written to {path}" and "object at" not in repr(obj)
