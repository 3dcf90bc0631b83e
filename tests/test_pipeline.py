"""build-index, similar, add-to-index, predict and evaluate on a tiny trained run."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import bson
import numpy as np
import pytest

import retrieval.infer.pipeline.parts as parts_mod
from index import knn_vote
from retrieval.data.bsonio import iter_products
from retrieval.data.offsets import RecordReader, load_offsets
from retrieval.errors import UserError
from retrieval.infer.evaluate import evaluate
from retrieval.infer.indexdir.build import IndexSettings, add_to_index, build_index, open_index
from retrieval.infer.indexdir.folder import IndexFolder
from retrieval.infer.pipeline.embed import LoaderSettings, embed_products
from retrieval.infer.pipeline.store import PartStore
from retrieval.infer.predict import PredictSettings, ScoresOutput, predict, read_submission, score_submission
from retrieval.infer.query import similar
from retrieval.infer.scoring.candidates import neighbour_labels
from retrieval.infer.scoring.fused import FusionOverrides


def test_train_index_holds_only_training_products(indexes, trained_run, small_data):
    b = open_index(indexes["train"])
    split = np.load(trained_run / "split.npz")
    assert set(b.product_ids) == set(split["train_ids"]) and not set(b.product_ids) & set(split["val_ids"])
    m = b.manifest
    assert m.backbone == "tiny" and m.dim == 32 and m.count == len(split["train_ids"])
    assert m.factory == "Flat" and len(m.model_sha256) == 64
    assert m.sources[0].fingerprint["size"] == small_data["train.bson"].stat().st_size
    assert len(open_index(indexes["all"]).product_ids) == 150


def test_interrupted_build_resumes_to_the_same_index(small_data, trained_run, indexes, tmp_path):
    out = tmp_path / "idx"
    build_index(small_data["train.bson"], trained_run, out, IndexSettings("all", part_products=40),
                LoaderSettings(workers=0))
    layout = IndexFolder(out)
    first = PartStore.part_file(layout.embeddings, 0).stat().st_mtime_ns
    # an interruption after two parts: later parts are missing and no generation was ever committed
    for p in (2, 3):
        PartStore.part_file(layout.embeddings, p).unlink()
    (out / "CURRENT").unlink()
    shutil.rmtree(out / "generations")
    with pytest.raises(FileNotFoundError, match="no index here"):
        open_index(out)
    build_index(small_data["train.bson"], trained_run, out, IndexSettings("all", part_products=40),
                LoaderSettings(workers=0))
    assert PartStore.part_file(layout.embeddings, 0).stat().st_mtime_ns == first  # not recomputed
    a, b = open_index(indexes["all"]), open_index(out)
    assert np.array_equal(a.product_ids, b.product_ids)
    q = np.stack([a.vector(i) for i in range(0, 150, 7)])
    assert np.array_equal(a.vectors.search(q, 5)[1], b.vectors.search(q, 5)[1])


def test_mismatches_are_refused(small_data, trained_run, indexes, tmp_path):
    with pytest.raises(UserError, match="holds unfinished work made with other settings.*split all -> train"):
        build_index(small_data["train.bson"], trained_run, indexes["all"], IndexSettings("train", part_products=40),
                    LoaderSettings(workers=0))
    with pytest.raises(ValueError, match="not the file run"):
        build_index(small_data["test.bson"], trained_run, tmp_path / "x", IndexSettings("train"),
                    LoaderSettings(workers=0))
    copy = tmp_path / "copy"
    shutil.copytree(indexes["train"], copy)
    ck = tmp_path / "model.pt"
    shutil.copy(open_index(indexes["train"]).run.model_file, ck)
    manifest_file = IndexFolder.manifest_file(IndexFolder(copy).generation())
    from dataclasses import replace

    from retrieval.infer.indexdir.manifest import IndexManifest
    replace(IndexManifest.load(manifest_file), model_file=str(ck)).save(manifest_file)  # a user's edit, re-sealed
    open_index(copy)
    with open(ck, "ab") as f:
        f.write(b"changed")
    with pytest.raises(ValueError, match="changed since the index was built"):
        open_index(copy)


def test_similar_by_id_by_images_and_by_category(indexes, small_data, tmp_path):
    b = open_index(indexes["all"])
    pid = int(b.product_ids[10])
    found = similar(b, product_id=pid, k=5, sheet=tmp_path / "s.png")
    assert len(found) == 5 and pid not in [n.product_id for n in found]  # not its own neighbour by default
    with_self = similar(b, product_id=pid, k=5, include_self=True)
    assert pid in [n.product_id for n in with_self]
    self_hit = next(n for n in with_self if n.product_id == pid)
    assert self_hit.similarity == pytest.approx(1.0, abs=1e-4)
    # the same list with the product itself taken out (the other results keep their order)
    assert [n.product_id for n in found][:4] == [n.product_id for n in with_self if n.product_id != pid][:4]
    assert (tmp_path / "s.png").stat().st_size > 2000
    prod = next(p for p in iter_products(small_data["train.bson"]) if p.product_id == pid)
    files = []
    for i, pic in enumerate(prod.images):
        files.append(tmp_path / f"q{i}.jpg")
        files[-1].write_bytes(pic)
    by_img = similar(b, images=files, k=3)  # a re-listing of the same item may tie with it: among the first 3
    assert any(n.product_id == pid and n.similarity > 0.99 for n in by_img)
    other = next(c for c in b.categories.ids if c != prod.category_id)
    assert all(n.category_id == other for n in similar(b, product_id=pid, k=4, category=other))
    with pytest.raises(UserError, match="not in the index"):
        similar(b, product_id=-5)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        similar(b, images=[tmp_path / "bad.jpg"])


def test_add_to_index_makes_new_products_findable(indexes, small_data, tmp_path):
    idx = tmp_path / "grow"
    shutil.copytree(indexes["train"], idx)
    split_val = np.load(open_index(idx).run.split_file)["val_rows"]
    reader = RecordReader(small_data["train.bson"])
    docs = []
    for r in split_val[:5].tolist() + [int(np.flatnonzero(~np.isin(np.arange(150), split_val))[0])]:
        p = reader.read(r)
        docs.append({"_id": p.product_id, "imgs": [{"picture": x} for x in p.images], "category_id": p.category_id})
    new = tmp_path / "new.bson"
    new.write_bytes(b"".join(bson.encode(d) for d in docs))
    added, dups = add_to_index(idx, new, LoaderSettings(workers=0))
    assert added == 5 and dups == [docs[-1]["_id"]]
    b = open_index(idx)
    assert len(b.product_ids) == len(set(b.product_ids.tolist()))
    for d in docs[:5]:  # found first (with any exact re-listing of the same pictures: an equally right answer)
        hits = similar(b, product_id=d["_id"], k=3, include_self=True)
        assert d["_id"] in [h.product_id for h in hits if h.similarity >= hits[0].similarity - 1e-4]
    from retrieval.data.images import picture_hash
    pos = int(np.flatnonzero(b.product_ids == docs[0]["_id"])[0])
    assert pos >= len(open_index(indexes["train"]).product_ids)  # appended, and its pictures keyed to it
    assert pos in b.duplicates.matches(np.array([picture_hash(docs[0]["imgs"][0]["picture"])]))[1].tolist()
    again, dups2 = add_to_index(idx, new, LoaderSettings(workers=0))
    assert again == 0 and len(dups2) == 6


def _bad_test_file(small_data, tmp_path):
    docs = [{"_id": p.product_id, "imgs": [{"picture": x} for x in p.images]}
            for p in iter_products(small_data["test.bson"])]
    docs.insert(3, {"_id": 999_001, "imgs": []})
    docs.insert(7, {"_id": 999_002, "imgs": [{"picture": b"\xff\xd8 broken"}]})
    path = tmp_path / "test_bad.bson"
    path.write_bytes(b"".join(bson.encode(d) for d in docs))
    return path, [d["_id"] for d in docs]


def test_predict_one_row_per_product_in_order_even_for_bad_products(indexes, small_data, tmp_path):
    path, ids = _bad_test_file(small_data, tmp_path)
    rep = predict(path, indexes["all"], tmp_path / "sub.csv", loader=LoaderSettings(workers=0),
                  settings=PredictSettings(8, scores=ScoresOutput(tmp_path / "scores.jsonl", 3)))
    sid, scat = read_submission(tmp_path / "sub.csv")
    assert sid.tolist() == ids and rep.products == len(ids) and rep.without_image == 2
    b = open_index(indexes["all"])
    mode = np.bincount(b.vectors.labels).argmax()
    assert scat[3] == scat[7] == b.categories.ids[mode]
    lines = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [x["_id"] for x in lines] == ids and all(1 <= len(x["top"]) <= 3 for x in lines)
    assert [x["top"][0]["category_id"] for x in lines] == scat.tolist()
    assert all(sum(t["score"] for t in x["top"]) <= 1 + 1e-5 for x in lines)  # probabilities (6 decimals): sum <= 1
    assert lines[3]["top"] == lines[7]["top"] == [{"category_id": int(scat[3]), "score": 1.0}]  # no image
    assert not (tmp_path / "sub.csv.parts").exists()


def test_predict_resumes_after_interruption(indexes, small_data, tmp_path, monkeypatch):
    full = tmp_path / "full.csv"
    predict(small_data["test.bson"], indexes["all"], full, loader=LoaderSettings(workers=0),
            settings=PredictSettings(8))
    calls = {"n": 0}
    real = parts_mod._take

    def dying(*a, **k):  # the third part's products never arrive
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(parts_mod, "_take", dying)
    part = tmp_path / "part.csv"
    with pytest.raises(KeyboardInterrupt):
        predict(small_data["test.bson"], indexes["all"], part, loader=LoaderSettings(workers=0),
                settings=PredictSettings(8))
    assert not part.exists() and len(list((tmp_path / "part.csv.parts").glob("part_*.npz"))) == 2
    monkeypatch.setattr(parts_mod, "_take", real)
    predict(small_data["test.bson"], indexes["all"], part, loader=LoaderSettings(workers=0),
            settings=PredictSettings(8))
    assert part.read_text() == full.read_text()
    # scored by hand against the labels, and far above answering the test set's largest class (a third of it;
    # the trained run scores 0.73)
    with open(part, newline="") as f, open(small_data["test_labels.csv"], newline="") as g:
        got, truth = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert [r["_id"] for r in got] == [r["_id"] for r in truth] and len(truth) == 30
    hand = sum(a["category_id"] == b["category_id"] for a, b in zip(got, truth, strict=True)) / len(truth)
    majority = max(np.unique([r["category_id"] for r in truth], return_counts=True)[1]) / len(truth)
    assert score_submission(part, small_data["test_labels.csv"]) == pytest.approx(hand)
    assert hand >= majority + 0.2, (hand, majority)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_endpoints_are_knn_only_and_head_only_without_dup_vote(indexes, small_data, tmp_path, alpha):
    predict(small_data["test.bson"], indexes["all"], tmp_path / "s.csv", FusionOverrides(alpha, 5, 0.05, 0.0),
            loader=LoaderSettings(workers=0))
    _, got = read_submission(tmp_path / "s.csv")
    b = open_index(indexes["all"])
    net, cats = b.net, b.categories
    table = load_offsets(small_data["test.bson"])
    outs = list(embed_products(net, RecordReader(small_data["test.bson"], table), np.arange(len(table)),
                               LoaderSettings(128, 0)))
    emb, probs = np.concatenate([o.emb for o in outs]), np.concatenate([o.probs for o in outs])
    sims, labels = neighbour_labels(b.vectors, emb, 5, np.ones(len(emb), bool))
    p = probs if alpha == 1 else knn_vote(sims, labels, len(cats), 0.05)
    assert np.array_equal(got, np.asarray(cats.ids)[p.argmax(1)])


def test_evaluate_refuses_indexes_holding_scored_products_and_calibrates(own_indexes, small_data, tmp_path):
    indexes = own_indexes  # evaluate writes the fusion it fits into the run
    with pytest.raises(ValueError, match="contains .* of the products being scored"):  # its held-out ones too
        evaluate(indexes["all"], small_data["train.bson"], loader=LoaderSettings(workers=0))
    with pytest.raises(ValueError, match="contains .* of the products being scored"):
        evaluate(indexes["train"], small_data["train.bson"], loader=LoaderSettings(workers=0))
    m = evaluate(indexes["train"], out_dir=tmp_path / "ev", loader=LoaderSettings(workers=0))
    assert (indexes["run"] / "calibration.json").exists()  # the copy's run, which predict below reads
    val_ids = set(np.load(indexes["run"] / "split.npz")["val_ids"].tolist())
    assert m["products"] == len(val_ids) == sum(v["products"] for v in m["by_frequency"].values())
    assert (tmp_path / "ev" / "metrics.json").exists() and all((tmp_path / "ev" / p).exists() for p in
                                                                ["accuracy_vs_alpha.png", "accuracy_by_frequency.png"])
    # oracle: the validation products written to their own file and predicted with the saved calibration;
    # accuracy and level-1 accuracy recomputed here from the labels and the category CSV
    docs = [d for d in bson.decode_file_iter(open(small_data["train.bson"], "rb")) if d["_id"] in val_ids]
    path = tmp_path / "val.bson"
    path.write_bytes(b"".join(bson.encode(d) for d in docs))
    predict(path, indexes["train"], tmp_path / "val.csv", loader=LoaderSettings(workers=0))
    _, got = read_submission(tmp_path / "val.csv")
    truth = np.array([d["category_id"] for d in docs])
    assert m["fused_accuracy"] == pytest.approx(float((got == truth).mean()))
    with open(small_data["category_names.csv"], newline="") as f:
        level1 = {int(r["category_id"]): r["category_level1"] for r in csv.DictReader(f)}
    hand = np.mean([level1[a] == level1[b] for a, b in zip(got, truth, strict=True)])
    assert m["level1_accuracy"] == pytest.approx(float(hand))


def test_exact_duplicate_vote_is_a_third_fused_signal(own_indexes, small_data, tmp_path):
    indexes = own_indexes  # evaluate writes the fusion it fits into the run; predict reads it there
    from retrieval.data.images import picture_hash
    from retrieval.infer.scoring.candidates import Candidates
    from retrieval.infer.scoring.fused import FusedClassifier
    b = open_index(indexes["train"])
    reader = RecordReader(small_data["train.bson"])
    rows = np.load(b.run.split_file)["train_rows"]
    n_pics = sum(len(reader.read(int(r)).images) for r in rows)
    assert len(b.duplicates) == n_pics  # every indexed picture, keyed to its product's position
    for pos in (0, len(rows) // 2, len(rows) - 1):
        pic = reader.read(int(rows[pos])).images[0]
        assert pos in b.duplicates.matches(np.array([picture_hash(pic)]))[1].tolist()
    # the head and the neighbours say class 0; two exact duplicates say class 1
    c = Candidates.build(np.array([[0.7, 0.3]]), (np.array([[0.9, 0.8]]), np.array([[0, 0]])), np.array([True]),
                         np.array([[1, 1]]))
    assert FusedClassifier(0.5, 2, 0.1, beta=0.0).predict_candidates(c)[0][0, 0] == 0
    assert FusedClassifier(0.5, 2, 0.1, beta=1.0).predict_candidates(c)[0][0, 0] == 1
    # generated re-listings reuse picture bytes: evaluate finds them, calibrates beta and predict uses it
    m = evaluate(indexes["train"], out_dir=tmp_path / "ev", loader=LoaderSettings(workers=0))
    assert m["duplicate_coverage"] > 0 and {g["beta"] for g in m["grid"]} == {0.0, 0.5, 1.0, 2.0}
    rep = predict(small_data["test.bson"], indexes["all"], tmp_path / "s.csv", loader=LoaderSettings(workers=0))
    assert rep.params["beta"] == m["calibration"]["beta"]


def test_an_indexed_picture_sent_as_a_query_gives_the_stored_vector(trained_run, tmp_path):
    """One decode path: a product's own JPEG, uploaded, embeds to the vector the index holds and finds it first
    (pictures of 96 px for a 32 px model, so a decoder that down-scales gives other pixels than one that does not)."""
    import torch

    from retrieval.data.synth import SynthConfig, make_data
    from retrieval.infer.query import embed_pictures, picture_inputs, product_pictures
    from retrieval.model.runtime import autocast_for
    data = make_data(tmp_path / "big", SynthConfig(products=40, categories=6, seed=3, image_size=96), progress=False)
    build_index(data["train.bson"], trained_run, tmp_path / "idx", IndexSettings("all"), LoaderSettings(workers=0))
    b = open_index(tmp_path / "idx")
    n_pics = np.array([len(product_pictures(b, p)) for p in range(len(b.product_ids))])
    for pos in np.flatnonzero(n_pics == 1)[:3]:
        picture = product_pictures(b, int(pos))[0]
        stored = b.vector(int(pos))
        emb, _, _ = embed_pictures(b, [picture], mirror=False)
        cos = float(emb @ stored / (np.linalg.norm(emb) * np.linalg.norm(stored)))
        assert cos >= 0.9999
        mirrored, _, _ = embed_pictures(b, [picture])  # the default: the picture and its mirror image, averaged
        x = picture_inputs(b, [picture])
        with torch.no_grad(), autocast_for(torch.device("cpu")):
            both = b.net(x)[0].float() + b.net(x.flip(-1))[0].float()
        assert np.allclose(mirrored, torch.nn.functional.normalize(both, dim=-1)[0].numpy(), atol=3e-3)
        f = tmp_path / "query.jpg"
        f.write_bytes(picture)
        assert similar(b, images=[f], k=1)[0].product_id == b.product_ids[pos]


def test_gpu_shape_buckets_pad_with_images_that_change_nothing(trained_run):
    """Product batches vary in image count; on a GPU they are padded to a few bucket sizes (one cuDNN plan each).
    Padded outputs must equal the network's own outputs computed image by image."""
    import torch

    from retrieval.infer.pipeline.embed import embed_images, shape_bucket
    from retrieval.model.export import load_model_file
    assert [shape_bucket(n) for n in (1, 2, 3, 5, 33, 64, 65, 128, 129, 300)] == \
        [1, 2, 4, 8, 64, 64, 128, 128, 192, 320]
    net = load_model_file(trained_run / "model.pt", torch.device("cpu")).net
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g)
    owner = torch.tensor([0, 0, 1, 2, 2])
    emb, probs = embed_images(net, images, owner, 3, pad=True)
    from retrieval.model.runtime import autocast_for
    with torch.no_grad(), autocast_for(torch.device("cpu")):  # the precision embed_images runs at
        one = [net(images[i:i + 1]) for i in range(5)]
    e = torch.nn.functional.normalize(torch.cat([o[0] for o in one]).float(), dim=-1)
    p = torch.cat([o[1] for o in one]).float().softmax(-1)
    want_e = torch.stack([e[[0, 1]].mean(0), e[2], e[[3, 4]].mean(0)])
    assert torch.allclose(emb, torch.nn.functional.normalize(want_e, dim=-1), atol=3e-3)
    assert torch.allclose(probs, torch.stack([p[[0, 1]].mean(0), p[2], p[[3, 4]].mean(0)]), atol=3e-3)
    assert len(emb) == 3 and len(probs) == 3


def test_predict_writes_a_row_when_the_first_product_has_no_picture(indexes, small_data, tmp_path):
    docs = [{"_id": p.product_id, "imgs": [{"picture": x} for x in p.images]}
            for p in iter_products(small_data["test.bson"])]
    docs.insert(0, {"_id": 5, "imgs": [{"picture": b"\xff\xd8 not a jpeg"}]})
    path = tmp_path / "t.bson"
    path.write_bytes(b"".join(bson.encode(d) for d in docs))
    predict(path, indexes["all"], tmp_path / "s.csv", loader=LoaderSettings(workers=0))
    ids, _ = read_submission(tmp_path / "s.csv")
    assert ids.tolist() == [d["_id"] for d in docs]


def test_predict_checks_arguments_before_making_state_and_can_restart(indexes, small_data, tmp_path):
    out = tmp_path / "s.csv"
    for bad in ({"k": 0}, {"alpha": 1.5}, {"tau": 0.0}):
        with pytest.raises(UserError):
            predict(small_data["test.bson"], indexes["all"], out, FusionOverrides(**bad),
                    loader=LoaderSettings(workers=0))
        assert not (tmp_path / "s.csv.parts").exists()
    with pytest.raises(UserError, match="batch size must be at least 1"):
        LoaderSettings(batch_size=0)
    parts = tmp_path / "s.csv.parts"
    parts.mkdir()
    (parts / "store.json").write_text('{"test": {}, "params": {"alpha": 0.9}}')  # left by an earlier, other run
    with pytest.raises(UserError, match=r"other settings \(.*params.alpha 0.9 -> .*--restart"):
        predict(small_data["test.bson"], indexes["all"], out, loader=LoaderSettings(workers=0))
    rep = predict(small_data["test.bson"], indexes["all"], out, loader=LoaderSettings(workers=0),
                  settings=PredictSettings(restart=True))
    assert rep.products == rep.computed == 30 and out.exists()


def test_serving_never_imports_training():
    code = ("import sys, retrieval.infer.query, retrieval.infer.predict, retrieval.infer.evaluate; "
            "bad = [m for m in sys.modules if m.startswith(('pytorch_lightning', 'lightning', 'retrieval.train', "
            "'pytorch_metric_learning'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_groups_reduced_on_a_thread_come_back_in_order_and_equal_the_serial_ones():
    """On a GPU, predict searches a group on a thread while the next one is embedded: the part's arrays must be
    the serial ones, group order kept, however long each reduction takes."""
    import time
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from retrieval.infer.pipeline.parts import PartWork, reduce_groups
    rng = np.random.default_rng(0)
    outs = [SimpleNamespace(rows=np.arange(lo, lo + n), n_images=np.ones(n, np.int64), failed=np.zeros(n, np.int64))
            for lo, n in zip(np.cumsum([0, 5, 3, 8, 1, 6, 2]), [5, 3, 8, 1, 6, 2, 4], strict=True)]

    def reduce(group):
        time.sleep(float(rng.uniform(0, 0.02)))
        rows = np.concatenate([o.rows for o in group]) if group else np.zeros(0, np.int64)
        return {"twice": rows * 2}
    work = PartWork(reduce, group=6)
    serial = reduce_groups(work, iter(outs))
    with ThreadPoolExecutor(1) as pool:
        threaded = reduce_groups(work, iter(outs), pool)
    assert np.array_equal(serial["twice"], np.arange(29) * 2)
    assert all(np.array_equal(serial[k], threaded[k]) for k in serial) and set(serial) == set(threaded)
