"""The data layer: streaming, offset tables, random access, decoding, categories, bad input."""
from __future__ import annotations

import csv
import io
import pickle

import bson
import numpy as np
import pytest
import torch
from conftest import shared_file
from PIL import Image

from retrieval.data.bsonio import BsonFormatError, iter_products
from retrieval.data.categories import CategoryTable
from retrieval.data.datasets import collate_products
from retrieval.data.images import ImageDecodeError, decode_image, encode_jpeg
from retrieval.data.offsets import RecordReader, load_offsets, scan_offsets
from retrieval.data.synth import SynthConfig, make_data
from retrieval.errors import UserError


def _write(path, docs, tail=b""):
    path.write_bytes(b"".join(bson.encode(d) for d in docs) + tail)
    return path


def _jpeg(color=(200, 10, 10), size=16):
    return encode_jpeg(np.full((size, size, 3), color, np.uint8))


def test_real_train_example_streams_and_scans():
    path = shared_file("train_example.bson")
    products = list(iter_products(path))
    assert len(products) == 82
    assert sum(len(p.images) for p in products) == 110
    assert len({p.category_id for p in products}) == 36
    table = scan_offsets(path, progress=False)
    assert table["product_id"].tolist() == [p.product_id for p in products]
    assert table["category_id"].tolist() == [p.category_id for p in products]
    assert table["offset"].tolist() == [p.offset for p in products]
    assert table["n_images"].tolist() == [len(p.images) for p in products]
    assert table["offset"][-1] + table["length"][-1] == path.stat().st_size
    img = decode_image(products[0].images[0])
    assert img.shape == (180, 180, 3) and img.dtype == np.uint8


def test_real_category_csv_parses_quotes_and_trailing_spaces():
    table = CategoryTable.from_csv(shared_file("category_names.csv"))
    assert len(table) == 5270 and table.n_level1 == 49 and table.n_level2 == 483
    with open(shared_file("category_names.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    by_id = dict(zip(table.ids, table.names, strict=True))
    quoted = [r for r in rows if '"' in r[3] or "," in r[3]]
    assert quoted, "the real file has quoted names"
    for r in quoted + [r for r in rows if r[3].endswith(" ")]:
        assert by_id[int(r[0])] == (r[1], r[2], r[3])
    assert any(n[2].endswith(" ") for n in table.names)
    assert by_id[1000019289][2] == 'VELO ENFANT (10" - 12" - 14" - 16")'
    # class indices are contiguous and round-trip
    cls = table.encode([1000019289, table.ids[0]])
    assert table.decode(cls).tolist() == [1000019289, table.ids[0]]
    l1, l2 = table.parents()
    assert l1.max() == 48 and l2.max() == 482


def test_category_table_from_ids_and_unknown_category_names_product():
    table = CategoryTable.from_ids([30, 10, 20, 10, -1])
    assert table.ids == (10, 20, 30)
    with pytest.raises(ValueError, match=r"product _id 7 has category_id 99"):
        table.encode([10, 99], product_ids=[5, 7])
    assert CategoryTable.from_dict(table.to_dict()) == table


def test_offset_table_cached_and_refreshed(tmp_path):
    p = _write(tmp_path / "a.bson", [{"_id": i, "imgs": [{"picture": _jpeg()}], "category_id": 5} for i in range(3)])
    t1 = load_offsets(p, cache_dir=tmp_path / "c", progress=False)
    assert len(list((tmp_path / "c").glob("*.npy"))) == 1
    _write(p, [{"_id": i, "imgs": [], "category_id": 5} for i in range(5)])
    t2 = load_offsets(p, cache_dir=tmp_path / "c", progress=False)
    assert len(t1) == 3 and len(t2) == 5 and t2["n_images"].sum() == 0


def test_offset_cache_beside_data_or_in_user_cache_when_folder_is_read_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    data.mkdir()
    p = _write(data / "a.bson", [{"_id": 1, "imgs": [], "category_id": 5}])
    load_offsets(p, progress=False)
    assert (data / "a.bson.offsets.npy").exists()
    (data / "a.bson.offsets.npy").unlink()
    data.chmod(0o555)
    try:
        assert len(load_offsets(p, progress=False)) == 1
        assert not (data / "a.bson.offsets.npy").exists()
        assert len(list((tmp_path / "home" / ".cache" / "cdiscount").glob("a.bson.*.offsets.npy"))) == 1
    finally:
        data.chmod(0o755)


def test_random_access_reader_matches_stream_and_pickles(small_data):
    path = small_data["train.bson"]
    stream = list(iter_products(path))
    reader = RecordReader(path)
    reader.read(0)  # opens a handle; the pickle must not carry it
    clone = pickle.loads(pickle.dumps(reader))
    for row in [5, 0, len(stream) - 1, 17]:
        got = clone.read(row)
        assert got.product_id == stream[row].product_id and got.images == stream[row].images


def test_offset_scan_blocks_join_exactly(small_data):
    whole = scan_offsets(small_data["train.bson"], progress=False)
    tiny_blocks = scan_offsets(small_data["train.bson"], progress=False, block_bytes=1000)  # < one record
    assert np.array_equal(whole, tiny_blocks) and len(whole) == 150


def test_grayscale_and_cmyk_decode_to_rgb():
    for mode in ("L", "CMYK"):
        buf = io.BytesIO()
        Image.new(mode, (20, 12), 128 if mode == "L" else (0, 255, 255, 0)).save(buf, format="JPEG")
        img = decode_image(buf.getvalue())
        assert img.shape == (12, 20, 3) and img.dtype == np.uint8
    red = decode_image(_jpeg((255, 0, 0), 32))
    assert red[..., 0].mean() > 200 and red[..., 1].mean() < 40
    with pytest.raises(ImageDecodeError):
        decode_image(b"\xff\xd8 not really a jpeg")


# ---- bad input ------------------------------------------------------------------------------------

def test_not_a_bson_file(tmp_path):
    p = tmp_path / "notes.bson"
    p.write_text("this is a text file, certainly not BSON\n" * 5)
    for fn in (lambda: list(iter_products(p)), lambda: scan_offsets(p, progress=False)):
        with pytest.raises(BsonFormatError, match=r"notes.bson, record 0, byte offset 0: not a BSON file"):
            fn()


def test_empty_file(tmp_path):
    p = tmp_path / "empty.bson"
    p.write_bytes(b"")
    with pytest.raises(BsonFormatError, match="empty"):
        list(iter_products(p))
    with pytest.raises(BsonFormatError, match="empty"):
        scan_offsets(p, progress=False)


def test_truncated_last_record_names_offset_and_id(tmp_path):
    good = [{"_id": i, "imgs": [{"picture": _jpeg()}], "category_id": 5} for i in (1, 2)]
    last = bson.encode({"_id": 42, "imgs": [{"picture": _jpeg()}], "category_id": 5})
    p = _write(tmp_path / "t.bson", good, last[:-30])
    offset = sum(len(bson.encode(d)) for d in good)
    pattern = rf"record 2, byte offset {offset}, product _id 42: truncated"
    with pytest.raises(BsonFormatError, match=pattern):
        list(iter_products(p))
    with pytest.raises(BsonFormatError, match=pattern):
        scan_offsets(p, progress=False)
    # the two good products were streamed before the error
    got = []
    with pytest.raises(BsonFormatError):
        for prod in iter_products(p):
            got.append(prod.product_id)
    assert got == [1, 2]


def test_declared_length_past_end(tmp_path):
    doc = bytearray(bson.encode({"_id": 9, "imgs": [], "category_id": 1}))
    doc[0:4] = (len(doc) + 1000).to_bytes(4, "little")
    p = tmp_path / "long.bson"
    p.write_bytes(bytes(doc))
    with pytest.raises(BsonFormatError, match=r"byte offset 0, product _id 9: truncated record: declared length"):
        scan_offsets(p, progress=False)
    with pytest.raises(BsonFormatError, match="past the end"):
        list(iter_products(p))


@pytest.mark.parametrize("doc,msg", [
    ({"imgs": []}, "no integer '_id'"),
    ({"_id": 3, "category_id": 1}, r"product _id 3: document has no 'imgs'"),
    ({"_id": 3, "imgs": "nope"}, r"product _id 3: 'imgs' is a str, not a list"),
    ({"_id": 3, "imgs": [{"pic": b"x"}]}, r"imgs\[0\] has no binary 'picture'"),
])
def test_malformed_documents(tmp_path, doc, msg):
    p = _write(tmp_path / "bad.bson", [{"_id": 1, "imgs": [], "category_id": 2}, doc])
    with pytest.raises(BsonFormatError, match=msg):
        list(iter_products(p))
    with pytest.raises(BsonFormatError, match=msg):
        scan_offsets(p, progress=False)
    reader = RecordReader(p, np.array([], dtype=[("offset", "<i8"), ("length", "<i4")]))
    with pytest.raises(BsonFormatError, match=msg):
        reader.read_at(len(bson.encode({"_id": 1, "imgs": [], "category_id": 2})), len(bson.encode(doc)))


def test_zero_image_and_corrupt_picture_products_are_kept(tmp_path):
    docs = [{"_id": 1, "imgs": [], "category_id": 2},
            {"_id": 2, "imgs": [{"picture": b"garbage"}, {"picture": _jpeg()}]},
            {"_id": 3, "imgs": [{"picture": _jpeg()[:40]}]}]
    p = _write(tmp_path / "mixed.bson", docs)
    products = list(iter_products(p))
    assert [len(x.images) for x in products] == [0, 2, 1]
    assert scan_offsets(p, progress=False)["n_images"].tolist() == [0, 2, 1]
    assert products[0].category_id == 2 and products[1].category_id is None
    with pytest.raises(ImageDecodeError):
        decode_image(products[1].images[0])
    assert decode_image(products[1].images[1]).shape == (16, 16, 3)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bson"):
        list(iter_products(tmp_path / "nope.bson"))


# ---- generated data -------------------------------------------------------------------------------

def test_generated_data_layout_and_determinism(tmp_path):
    cfg = SynthConfig(products=300, categories=12, seed=3, image_size=40)
    a = make_data(tmp_path / "a", cfg, progress=False)
    b = make_data(tmp_path / "b", cfg, progress=False)
    assert a["train.bson"].read_bytes() == b["train.bson"].read_bytes()
    table = CategoryTable.from_csv(a["category_names.csv"])
    assert len(table) == 12 and 1 < table.n_level1 < table.n_level2 < 12
    train = list(iter_products(a["train.bson"]))
    test = list(iter_products(a["test.bson"]))
    assert len(train) + len(test) == int(300 * 1.2)
    assert all(p.category_id is None for p in test)
    with open(a["test_labels.csv"]) as f:
        labels = list(csv.DictReader(f))
    assert [int(r["_id"]) for r in labels] == [p.product_id for p in test]
    assert not {p.product_id for p in train} & {p.product_id for p in test}
    table.encode([p.category_id for p in train])  # every category is in the CSV
    counts = np.bincount(table.encode([p.category_id for p in train]))
    assert counts.max() >= 4 * max(1, counts.min())  # skewed
    n_img = np.bincount([len(p.images) for p in train + test], minlength=5)[1:] / len(train + test)
    assert n_img[0] > 0.5 and n_img[3] > 0.02 and (n_img > 0).all()
    assert decode_image(train[0].images[0]).shape == (40, 40, 3)
    # images of one product look alike, more than images of two products of one category
    multi = [p for p in train if len(p.images) >= 2]
    same = np.mean([np.abs(decode_image(p.images[0]).astype(int) - decode_image(p.images[1])).mean() for p in multi])
    by_cat: dict = {}
    for p in train:
        by_cat.setdefault(p.category_id, []).append(p)
    pairs = [(v[0], v[1]) for v in by_cat.values() if len(v) >= 2]
    other = np.mean([np.abs(decode_image(x.images[0]).astype(int) - decode_image(y.images[0])).mean()
                     for x, y in pairs])
    assert same < other


def _tree_csv(path, n1: int, n2_per: list[int], n3_per: int):
    rows, cid = [], 1000000000
    for a in range(n1):
        for b in range(n2_per[a]):
            for c in range(n3_per):
                cid += 3
                rows.append((cid, f"L1 {a}", f"L1 {a} - L2 {b}", f"leaf {a}.{b}.{c}"))
    CategoryTable.from_rows(rows).to_csv(path)
    return path


def test_generator_draws_a_given_tree_with_a_set_largest_share(tmp_path):
    from retrieval.data.synth import tree_codes
    src = _tree_csv(tmp_path / "tree.csv", 3, [12, 2, 5], 20)  # 380 categories; one level 1 has > 8 children
    cfg = SynthConfig(products=4000, seed=2, image_size=16, test_fraction=0.1, categories_csv=str(src),
                      largest_share=0.02)
    out = make_data(tmp_path / "d", cfg, progress=False)
    table = CategoryTable.from_csv(out["category_names.csv"])
    assert table == CategoryTable.from_csv(src) and (table.n_level1, table.n_level2) == (3, 19)
    codes = tree_codes(table)
    assert len(set(codes)) == len(table) == 380 and max(b for _, b, _ in codes) == 11
    labels = [p.category_id for p in iter_products(out["train.bson"])]
    with open(out["test_labels.csv"]) as f:
        labels += [int(r["category_id"]) for r in csv.DictReader(f)]
    counts = np.bincount(table.encode(labels), minlength=len(table))
    assert len(labels) == 4400 and 0.014 < counts.max() / len(labels) < 0.027
    assert (counts == 0).sum() < 0.25 * len(table)  # the tree is used, not just its head


def test_generator_skew_matches_cdiscount_at_full_scale():
    from retrieval.data.synth import _sizes
    sizes = _sizes(7_069_896, 5270, np.random.default_rng(0), largest_share=0.0113)
    assert sizes.sum() == 7_069_896 and abs(sizes.max() / sizes.sum() - 0.0113) < 0.0008
    assert 1000 < (sizes < 100).sum() < 4000 and sizes.min() >= 2  # thousands of small categories
    plain = _sizes(7_069_896, 5270, np.random.default_rng(0))
    assert plain.max() / plain.sum() > 0.09  # without a share: Zipf 1/rank, far more skewed at the top


def test_generator_over_the_real_category_tree(tmp_path):
    from retrieval.data.synth import tree_codes
    real = CategoryTable.from_csv(shared_file("category_names.csv"))
    codes = tree_codes(real)
    assert len(set(codes)) == 5270 and len({a for a, _, _ in codes}) == 49
    out = make_data(tmp_path / "d", SynthConfig(products=600, seed=1, image_size=16, categories_csv=str(
        shared_file("category_names.csv")), largest_share=0.011), progress=False)
    assert CategoryTable.from_csv(out["category_names.csv"]) == real
    ids = [p.category_id for p in iter_products(out["train.bson"])]
    with open(shared_file("category_names.csv"), newline="", encoding="utf-8-sig") as f:  # read here, not by the table
        real_ids = {int(row["category_id"]) for row in csv.DictReader(f)}
    assert len(ids) == 600 and set(ids) <= real_ids
    assert len(set(ids)) > 200  # spread over the tree (307 of its 5270 leaves for this seed), not a handful
    assert [real.ids[i] for i in real.encode(ids)] == ids  # every label is a class of the real table


def test_stats_on_real_example(tmp_path):
    from retrieval.data.stats import file_stats
    st = file_stats(shared_file("train_example.bson"), CategoryTable.from_csv(shared_file("category_names.csv")),
                    tmp_path / "plots", progress=False)
    assert (st.products, st.images, st.categories["id"]) == (82, 110, 36)
    assert st.largest[0][:2] == (1000010653, 36) and "COQUE TELEPHONE" in st.largest[0][2]
    assert st.images_per_product == {1: 67, 2: 7, 3: 3, 4: 5}
    assert len(st.plots) == 5 and all(p.stat().st_size > 1000 for p in st.plots)


def test_training_augmentation_colour_jitter_is_bounded_and_off_by_default():
    from retrieval.data.datasets import Augment, to_model_input
    grey = np.full((40, 40, 3), 100, np.uint8)  # crops and mirrors leave a uniform picture as it is
    assert all(int(to_model_input(grey, 32, train=True).unique()[0]) == 100 for _ in range(10))
    means = [float(to_model_input(grey, 32, train=True, aug=Augment(colour=0.3)).float().mean()) for _ in range(30)]
    assert np.std(means) > 3 and 100 * 0.7 ** 2 - 1 <= min(means) and max(means) <= 100 * 1.3 + 1
    tinted = np.zeros((40, 40, 3), np.uint8)
    tinted[..., 0] = 200  # saturation jitter moves the channels apart or together
    spreads = {int(np.ptp(to_model_input(tinted, 32, True, Augment(colour=0.5))[:, 0, 0].numpy())) for _ in range(20)}
    assert len(spreads) > 5


def test_collate_accepts_a_first_product_without_pictures():
    img = torch.zeros(3, 8, 8, dtype=torch.uint8)
    b = collate_products([([], 0, -1, 1, []), ([img, img], 1, -1, 0, [7, 8]), ([], 2, -1, 0, [])])
    assert b.images.shape == (2, 3, 8, 8) and b.owner.tolist() == [1, 1] and b.failed.tolist() == [1, 0, 0]
    assert b.hashes.tolist() == [7, 8]
    assert collate_products([([], 5, -1, 0, [])]).images.shape[0] == 0


def test_make_data_refuses_to_overwrite(tmp_path):
    cfg = SynthConfig(products=10, categories=2, image_size=16)
    make_data(tmp_path, cfg, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_data(tmp_path, cfg, progress=False)
    assert make_data(tmp_path, SynthConfig(products=12, categories=2, image_size=16), progress=False,
                     overwrite=True)["train.bson"].exists()


def test_category_csv_bom_duplicates_and_encoding(tmp_path):
    p = tmp_path / "c.csv"
    p.write_bytes("\ufeffcategory_id,category_level1,category_level2,category_level3\n1,A,B,C\n".encode("utf-8"))
    assert CategoryTable.from_csv(p).ids == (1,)
    p.write_text("category_id,category_level1,category_level2,category_level3\n1,A,B,C\n2,A,B,D\n1,A,B,E\n")
    with pytest.raises(UserError, match=r"c.csv, line 4: category_id 1 repeats line 2"):
        CategoryTable.from_csv(p)
    p.write_bytes(b"category_id,category_level1,category_level2,category_level3\n1,A,B,C\n2,A,B,\xe9t\xe9\n")
    with pytest.raises(UserError, match=r"c.csv, line 3: not UTF-8"):
        CategoryTable.from_csv(p)


def test_loader_batches_never_cross_a_part_end():
    from retrieval.data.datasets import batches_within
    assert batches_within(np.array([3, 8, 9]), 2) == [[0, 1], [2], [3, 4], [5, 6], [7], [8]]
    assert batches_within(np.array([4]), 4) == [[0, 1, 2, 3]] and batches_within(np.zeros(0, np.int64), 3) == []


def test_an_undecodable_picture_is_named_without_an_object_repr():
    from retrieval.data.images import ImageDecodeError, decode_image
    for data in (b"garbage bytes here", b"\xff\xd8\xff\xe0" + b"\x00" * 40):
        with pytest.raises(ImageDecodeError) as e:
            decode_image(data)
        msg = str(e.value)
        assert f"({len(data)} bytes)" in msg and " object at 0x" not in msg and "BytesIO" not in msg
