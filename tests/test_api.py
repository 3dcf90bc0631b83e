"""The HTTP API through FastAPI's test client, and the web page in a real headless Chromium."""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import bson
import numpy as np
import pytest
from conftest import read_only, thread_server
from fastapi.testclient import TestClient

from retrieval.data.bsonio import iter_products
from retrieval.infer.indexdir.bundle import open_index
from retrieval.serve.api import MAX_UPLOAD, create_app


@pytest.fixture(scope="module")
def served(indexes, tmp_path_factory):
    """A copy of the all-products index that this module's tests share: read-only (writes go to a copy)."""
    from retrieval.infer.indexdir.folder import IndexFolder
    folder = tmp_path_factory.mktemp("served") / "index"
    shutil.copytree(indexes["all"], folder)
    IndexFolder(folder).uploads.mkdir()  # a server makes it at its first upload: a refused one then leaves nothing
    read_only("served (test_api.py)", folder)
    return folder


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served), base_url="http://localhost") as c:
        yield c


def _first(small_data):
    return next(iter_products(small_data["train.bson"]))


def _check_nearest(served, product_id: int, found: list[int], k: int, skip: int = 0) -> None:
    """``found`` are ranks ``skip..skip+k-1`` of the products nearest to an indexed product: checked against a
    cosine scan over every stored vector in plain numpy (ties, e.g. re-listed twins, may come in any order)."""
    b = open_index(served)
    vecs = np.stack([b.vector(i) for i in range(len(b.product_ids))])
    own = int(np.flatnonzero(b.product_ids == product_id)[0])
    sims = vecs @ vecs[own]
    by_id = dict(zip(b.product_ids.tolist(), sims.tolist(), strict=True))
    expected = np.sort(np.delete(sims, own))[::-1][skip:skip + k]  # the query is not its own neighbour
    assert product_id not in found
    assert len(found) == k == len(set(found))
    np.testing.assert_allclose([by_id[i] for i in found], expected, atol=1e-5)


def test_similar_by_id_pages_and_filters_inside_the_search(client, served, small_data):
    p = _first(small_data)
    r = client.post("/similar", data={"product_id": p.product_id, "k": 4})
    assert r.status_code == 200
    body = r.json()
    ids = [x["product_id"] for x in body["results"]]
    _check_nearest(served, p.product_id, ids, 4)
    assert len(set(ids)) == 4 and body["next_offset"] == 4  # one result per product
    page2 = client.post("/similar", data={"product_id": p.product_id, "k": 4, "offset": 4}).json()["results"]
    _check_nearest(served, p.product_id, [x["product_id"] for x in page2], 4, skip=4)
    other = [c for c in open_index(served).categories.ids if c != p.category_id][0]
    filtered = client.post("/similar", data={"product_id": p.product_id, "k": 3, "category": other}).json()["results"]
    assert len(filtered) == 3 and {x["category_id"] for x in filtered} == {other}
    assert body["results"][0]["thumbnail"] == f"/products/{ids[0]}/images/0" and body["results"][0]["path"]


def test_similar_and_classify_by_uploaded_picture(client, small_data):
    p = _first(small_data)
    files = [("images", ("q.jpg", p.images[0], "image/jpeg"))]
    r = client.post("/similar", data={"k": 3}, files=files)
    assert r.status_code == 200 and p.product_id in [x["product_id"] for x in r.json()["results"]]
    c = client.post("/classify", data={"top": 3}, files=files).json()
    cats = c["categories"]
    assert len(cats) == 3 and cats[0]["fused"] >= cats[1]["fused"] >= cats[2]["fused"]
    assert cats[0]["category_id"] == p.category_id and cats[0]["duplicate"] == 1.0  # its own picture is indexed
    by_id = client.post("/classify", data={"product_id": p.product_id, "top": 3, "include_self": True}).json()
    assert [x["category_id"] for x in by_id["categories"]][0] == p.category_id  # its own vote (left out by default)


def test_pictures_health_and_docs(client, served, small_data):
    p = _first(small_data)
    r = client.get(f"/products/{p.product_id}/images/0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content == p.images[0]
    assert client.get(f"/products/{p.product_id}/images/{len(p.images)}").status_code == 404
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["products"] == len(open_index(served).product_ids)
    assert "/similar" in client.get("/openapi.json").json()["paths"]
    assert "<title>Similar products</title>" in client.get("/").text


def _png(w: int, h: int) -> bytes:
    """A valid PNG header claiming ``w x h`` pixels (a decompression bomb's first bytes; no pixel data needed)."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data, files, status, words", [
    ({"product_id": 987654321}, None, 404, "not in the index"),
    ({}, [("images", ("x.jpg", b"not a picture", "image/jpeg"))], 400, "x.jpg: not a readable image"),
    ({"product_id": 1, "k": 0}, None, 422, "greater than or equal to 1"),
    ({"product_id": 1, "k": 1000}, None, 422, "less than or equal to 100"),
    ({}, None, 400, "exactly one of product_id or one or more images"),
    ({"k": 2}, [("images", ("big.jpg", b"\xff" * (MAX_UPLOAD + (2 << 20)), "image/jpeg"))], 413, "request body over"),
    ({}, [("images", ("empty.jpg", b"", "image/jpeg"))], 400, "empty.jpg: empty file"),
    ({}, [("images", ("bomb.png", _png(20_000, 20_000), "image/png"))], 400, "over the 40,000,000-pixel limit"),
    ({"product_id": -1}, None, 422, "greater than or equal to 0"),
    ({"product_id": "abc"}, None, 422, "valid integer"),
    ({"product_id": 2 ** 64}, None, 422, "less than or equal to"),
    ({"product_id": 1, "offset": -1}, None, 422, "greater than or equal to 0"),
    ({"product_id": 1, "offset": 10 ** 6}, None, 422, "less than or equal to 10000"),
    ({"product_id": "FIRST", "category": 123}, None, 400, "category 123 is not in the model's category table"),
])
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(client, small_data, data, files, status, words):
    if data.get("product_id") == "FIRST":
        data = {**data, "product_id": _first(small_data).product_id}
    r = client.post("/similar", data=data, files=files)
    assert r.status_code == status and words in r.text
    assert client.post("/similar", data={"product_id": _first(small_data).product_id, "k": 1}).status_code == 200


def test_the_query_product_is_not_its_own_neighbour_unless_asked(client, small_data):
    p = _first(small_data)
    got = client.post("/similar", data={"product_id": p.product_id, "k": 3}).json()["results"]
    assert p.product_id not in [x["product_id"] for x in got] and len(got) == 3
    own = client.post("/similar", data={"product_id": p.product_id, "k": 3, "include_self": True}).json()["results"]
    assert own[0]["product_id"] == p.product_id and own[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    shares = client.post("/classify", data={"product_id": p.product_id, "top": 20}).json()["categories"]
    assert sum(x["fused"] for x in shares) == pytest.approx(1.0, abs=1e-4)  # probabilities over the candidates


def test_writes_need_the_token_and_read_only_refuses_them(served, small_data, tmp_path):
    from retrieval.serve.api import ServeSettings, check_exposure
    p = _first(small_data)
    new = {"_id": 555_000_002, "imgs": [{"picture": x} for x in p.images], "category_id": p.category_id}
    files = {"file": ("new.bson", bson.encode(new), "application/octet-stream")}
    folder = tmp_path / "idx"
    shutil.copytree(served, folder)
    with TestClient(create_app(folder, ServeSettings(token="s3cret")), base_url="http://localhost") as c:
        assert c.post("/products", files=files).status_code == 401
        assert c.post("/products", files=files, headers={"Authorization": "Bearer nope"}).status_code == 403
        r = c.post("/products", files=files, headers={"Authorization": "Bearer s3cret", "Origin": "http://evil.example"})
        assert r.status_code == 403 and "another site" in r.text
        before = c.get("/health").json()["products"]
        ok = c.post("/products", files=files, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["added"] == 1 and c.get("/health").json()["products"] == before + 1
    with TestClient(create_app(folder, ServeSettings(read_only=True)), base_url="http://localhost") as c:
        r = c.post("/products", files=files)
        assert r.status_code == 403 and "read-only" in r.text
    with pytest.raises(ValueError, match="without a credential"):
        check_exposure("0.0.0.0", ServeSettings())
    check_exposure("0.0.0.0", ServeSettings(token="t"))
    check_exposure("127.0.0.1", ServeSettings())


def test_a_refused_upload_leaves_no_file_and_no_path_leaks(served, tmp_path):
    from retrieval.infer.indexdir.folder import IndexFolder
    folder = tmp_path / "idx"  # an upload is written into the folder before it is read: a copy
    shutil.copytree(served, folder)
    uploads = IndexFolder(folder).uploads
    before = set(uploads.glob("*")) if uploads.exists() else set()
    with TestClient(create_app(folder), base_url="http://localhost") as client:
        bad = client.post("/products", files={"file": ("junk.bson", b"\x05\x00\x00\x00junk",
                                                       "application/octet-stream")})
    assert bad.status_code == 400 and "junk" in bad.text
    assert str(folder) not in bad.text and "/tmp" not in bad.text
    assert set(uploads.glob("*")) == before


def test_adding_products_makes_them_findable(served, small_data, tmp_path, monkeypatch):
    import retrieval.infer.indexdir.bundle as bundle_mod
    folder = tmp_path / "idx"
    shutil.copytree(served, folder)
    with TestClient(create_app(folder), base_url="http://localhost") as client:
        _add_and_find(client, folder, small_data, monkeypatch, bundle_mod)


def _add_and_find(client, folder, small_data, monkeypatch, bundle_mod) -> None:
    reads = []
    real = bundle_mod.load_model_file
    monkeypatch.setattr(bundle_mod, "load_model_file", lambda *a, **k: reads.append(a) or real(*a, **k))
    p = _first(small_data)
    new = {"_id": 555_000_001, "imgs": [{"picture": x} for x in p.images], "category_id": p.category_id}
    r = client.post("/products", files={"file": ("new.bson", bson.encode(new), "application/octet-stream")})
    assert r.status_code == 200 and r.json()["added"] == 1
    assert len(reads) == 1  # the writer's own copy; the committed generation is served as it is (no reload)
    on_disk = open_index(folder)  # what is served is the committed generation
    assert r.json()["products"] == len(on_disk.product_ids) and 555_000_001 in on_disk.product_ids
    found = client.post("/similar", data={"product_id": 555_000_001, "k": 2, "include_self": True}).json()["results"]
    assert 555_000_001 in [x["product_id"] for x in found]
    assert client.get("/products/555000001/images/0").content == p.images[0]  # served from the kept upload
    bad = client.post("/products", files={"file": ("junk.bson", b"\x05\x00\x00\x00junk", "application/octet-stream")})
    assert bad.status_code == 400 and "junk" in bad.text


# ---- the page, in a real browser --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(served):
    with thread_server(create_app(served)) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in ("/usr/bin/chromium", "/usr/bin/chromedriver") if not Path(p).exists()]
    if missing:
        reason = (f"the page test needs Debian's headless Chromium: {', '.join(missing)} missing "
                  "(apt-get install chromium chromium-driver; CI installs them)")
        if os.environ.get("REQUIRE_CHROMIUM"):  # set by .ci/run: there, a missing browser is a failure
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,900"):
        opts.add_argument(flag)
    service = webdriver.ChromeService(executable_path="/usr/bin/chromedriver")
    drv = webdriver.Chrome(options=opts, service=service)
    yield drv
    drv.quit()


def _cards(drv, n_min: int, timeout: float = 20.0) -> list:
    from selenium.webdriver.common.by import By
    end = time.time() + timeout
    while time.time() < end:
        cards = drv.find_elements(By.CSS_SELECTOR, "#results .card")
        if len(cards) >= n_min:
            return cards
        time.sleep(0.1)
    raise AssertionError(f"no results on the page: {drv.find_element(By.ID, 'status').text!r}")


def test_a_script_injected_through_the_page_url_does_not_run(server, browser):
    from selenium.webdriver.common.by import By
    browser.get(f"{server}/?id=%22%3E%3Cimg%20src%3Dx%20onerror%3D%22window.__pwned%3D1%22%3E")
    end = time.time() + 5
    while not browser.find_element(By.ID, "status").text and time.time() < end:
        time.sleep(0.1)
    time.sleep(0.5)
    assert browser.execute_script("return window.__pwned") is None
    assert "whole number" in browser.find_element(By.ID, "status").text
    assert not browser.find_elements(By.CSS_SELECTOR, "#query img[src='x']")


def test_page_searches_by_id_and_picture_and_more_like_this(server, browser, served, small_data, tmp_path):
    from selenium.webdriver.common.by import By
    p = _first(small_data)
    browser.get(f"{server}/?id={p.product_id}&k=6")
    cards = _cards(browser, 6)
    ids = [int(c.get_attribute("data-product-id")) for c in cards]
    _check_nearest(served, p.product_id, ids, 6)
    rows = browser.find_elements(By.CSS_SELECTOR, "#cats tbody tr")
    assert len(rows) == 5 and str(p.category_id) in rows[0].text
    end = time.time() + 20
    while True:  # one thumbnail a card, each from /products/{id}/images/0, all loaded
        shown, loaded = browser.execute_script("const i = [...document.querySelectorAll('#results img')]; "
                                               "return [i.length, i.filter(x => x.complete && x.naturalWidth > 0)"
                                               ".length]")
        if loaded == shown == len(cards) or time.time() > end:
            break
        time.sleep(0.1)
    assert shown == len(cards) == 6 and loaded == shown, (shown, loaded)
    target = ids[1]
    cards[1].find_element(By.TAG_NAME, "button").click()  # "more like this"
    end = time.time() + 20
    while f"id={target}" not in browser.current_url and time.time() < end:
        time.sleep(0.1)
    assert f"id={target}" in browser.current_url
    end = time.time() + 20
    while time.time() < end:
        first = _cards(browser, 1)[0].get_attribute("data-product-id")
        if int(first) != ids[0] or target == ids[0]:
            break
        time.sleep(0.1)
    assert browser.find_element(By.ID, "pid").get_attribute("value") == str(target)
    pic = tmp_path / "query.jpg"
    pic.write_bytes(p.images[0])
    browser.find_element(By.ID, "file").send_keys(str(pic))
    end = time.time() + 20
    while "id=" in browser.current_url and time.time() < end:
        time.sleep(0.1)
    assert p.product_id in [int(c.get_attribute("data-product-id")) for c in _cards(browser, 6)]
    shot = tmp_path / "page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def test_queries_answer_from_the_old_generation_while_an_add_runs(served, small_data, tmp_path, monkeypatch):
    """A slow add runs in the thread pool; /health and /similar keep answering at once, and the new product
    appears only when the add commits."""
    import retrieval.serve.writes as api  # the write routes
    folder = tmp_path / "idx"
    shutil.copytree(served, folder)
    real = api.add_to_index

    def slow_add(*a, **k):
        time.sleep(3.0)
        return real(*a, **k)

    monkeypatch.setattr(api, "add_to_index", slow_add)
    with thread_server(create_app(folder)) as port:
        _queries_during_a_slow_add(f"http://127.0.0.1:{port}", small_data)


def _queries_during_a_slow_add(url: str, small_data) -> None:
    import httpx
    p = _first(small_data)
    new = {"_id": 555_000_003, "imgs": [{"picture": x} for x in p.images], "category_id": p.category_id}
    before = httpx.get(url + "/health", timeout=10).json()["products"]
    result = {}
    adder = threading.Thread(target=lambda: result.update(r=httpx.post(
        url + "/products", files={"file": ("n.bson", bson.encode(new), "application/octet-stream")}, timeout=60)))
    adder.start()
    time.sleep(0.3)
    worst, during = 0.0, 0
    deadline = time.monotonic() + 90
    while adder.is_alive():
        assert time.monotonic() < deadline, "the add did not finish within 90 s"
        t = time.perf_counter()
        h = httpx.get(url + "/health", timeout=10).json()
        s = httpx.post(url + "/similar", data={"product_id": p.product_id, "k": 2}, timeout=10)
        worst = max(worst, time.perf_counter() - t)
        if adder.is_alive():
            assert h["products"] == before and s.status_code == 200  # the old generation, whole
            during += 1
        time.sleep(0.05)
    assert during >= 5, during  # queried while the add ran (it takes over 3 s), not only after it
    assert result["r"].status_code == 200 and result["r"].json()["products"] == before + 1
    assert worst < 1.0  # nothing waited behind the 3-second add


def test_batched_queries_give_what_each_query_gives_alone(served, small_data):
    """Sixteen picture queries in flight at once go through one forward and one search; each gets exactly the
    neighbours (and similarities) the same query gets on its own, unbatched."""
    from concurrent.futures import ThreadPoolExecutor

    from retrieval.infer.query import embed_pictures, neighbours
    from retrieval.serve.batching import QueryBatcher
    b = open_index(served)
    products = list(iter_products(small_data["test.bson"]))[:16]
    batcher = QueryBatcher(max_batch=16, max_wait=0.05)
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda p: batcher.submit(b, 5, pictures=p.images).result(timeout=60), products))
    for p, (sims, pos) in zip(products, got, strict=True):
        alone, alone_pos = neighbours(b, embed_pictures(b, p.images)[0], 5)
        np.testing.assert_allclose(sims, [n.similarity for n in alone], atol=1e-4)
        distinct = np.diff(sims) < -1e-5  # where neighbours are not tied (re-listed twins are), the same products
        assert np.array_equal(pos[:-1][distinct & np.r_[True, distinct[:-1]]],
                              alone_pos[:-1][distinct & np.r_[True, distinct[:-1]]])


def test_a_bad_picture_in_a_batch_fails_its_own_query_only(served, small_data):
    """Queries decoded on the batch thread: one that does not decode gets its error; the others in the same batch
    (picture bytes, an indexed position) get what they get alone."""
    from retrieval.errors import UserError
    from retrieval.infer.query import embed_pictures, neighbours
    from retrieval.serve.batching import QueryBatcher
    b = open_index(served)
    products = list(iter_products(small_data["test.bson"]))[:3]
    batcher = QueryBatcher(max_batch=8, max_wait=0.2)  # all four arrive within one batch
    futures = [batcher.submit(b, 4, pictures=products[0].images),
               batcher.submit(b, 4, pictures=[b"\xff\xd8 not a jpeg"], names=["bad.jpg"]),
               batcher.submit(b, 4, pictures=products[1].images),
               batcher.submit(b, 4, position=7)]
    with pytest.raises(UserError, match="bad.jpg"):
        futures[1].result(timeout=30)
    for fut, vec in ((futures[0], embed_pictures(b, products[0].images)[0]),
                     (futures[2], embed_pictures(b, products[1].images)[0]), (futures[3], b.vector(7))):
        sims, _ = fut.result(timeout=30)
        np.testing.assert_allclose(sims, [n.similarity for n in neighbours(b, vec, 4)[0]], atol=1e-4)


def _truncated_multipart() -> tuple[bytes, dict]:
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n\xff\xd8\xff\xe0 cut here")
    return body, {"Content-Type": "multipart/form-data; boundary=XyZ"}


def _damaged_bson() -> bytes:
    good = bson.encode({"_id": 777_000_001, "imgs": [{"picture": b"\xff\xd8"}], "category_id": 1})
    return good + good[:-9]  # the second record is cut short


@pytest.mark.parametrize("method, path, kwargs, status, words", [
    ("post", "/classify", {"data": {"top": 0, "product_id": 1}}, 422, "greater than or equal to 1"),
    ("post", "/classify", {"data": {"top": 21, "product_id": 1}}, 422, "less than or equal to 20"),
    ("post", "/classify", {"data": {}}, 400, "exactly one of product_id"),
    ("post", "/classify", {"data": {"product_id": 987654321}}, 404, "not in the index"),
    ("post", "/classify", {"files": [("images", ("n.txt", b"hello", "text/plain"))]}, 400,
     "n.txt: not a readable image"),
    ("get", "/products/987654321/images/0", {}, 404, "not in the index"),
    ("get", "/products/abc/images/0", {}, 422, "valid integer"),
    ("get", "/products/FIRST/images/9", {}, 404, "no picture 9"),
    ("post", "/products", {"files": {"file": ("d.bson", _damaged_bson(), "application/octet-stream")}}, 400,
     "truncated"),
    ("post", "/products", {"files": {"file": ("e.bson", b"", "application/octet-stream")}}, 400, "e.bson"),
    ("post", "/products", {"data": {}}, 422, "file"),
    # the cut part is dropped by the form parser, so the query has no picture left
    ("post", "/similar", {"content": _truncated_multipart()[0], "headers": _truncated_multipart()[1]}, 400,
     "exactly one of product_id or one or more images"),
    ("post", "/similar", {"content": b"x" * 100, "headers": {"Content-Length": str(MAX_UPLOAD * 4)}}, 413,
     "request body over"),
])
def test_more_bad_input_is_a_4xx_writes_nothing_and_the_server_keeps_serving(client, served, small_data, method,
                                                                             path, kwargs, status, words):
    p = _first(small_data)
    count = client.get("/health").json()["products"]
    r = getattr(client, method)(path.replace("FIRST", str(p.product_id)), **kwargs)
    assert r.status_code == status and words in r.text, r.text
    assert client.get("/health").json()["products"] == count  # nothing was added
    assert client.post("/similar", data={"product_id": p.product_id, "k": 1}).status_code == 200


def test_concurrent_adds_queue_behind_one_writer_and_errors_name_no_server_path(served, small_data, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from retrieval.serve.writes import no_paths as _no_paths
    folder = tmp_path / "idx"
    shutil.copytree(served, folder)
    p = _first(small_data)
    uploads = [bson.encode({"_id": 555_100_000 + i, "imgs": [{"picture": p.images[0]}], "category_id": p.category_id})
               for i in range(4)]
    with TestClient(create_app(folder), base_url="http://localhost") as c:
        before = c.get("/health").json()["products"]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda b: c.post("/products", files={"file": ("u.bson", b)}), uploads))
        assert [r.status_code for r in got] == [200] * 4  # queued, none refused
        assert c.get("/health").json()["products"] == before + 4
    assert _no_paths(f"{tmp_path}/data/train.bson changed; looked for /srv/x/y.bson") == "train.bson changed; " \
                                                                                           "looked for y.bson"
