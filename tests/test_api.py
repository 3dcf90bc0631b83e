"""The HTTP API through FastAPI's test client, and the web page in a real headless Chromium."""
from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import bson
import numpy as np
import pytest
from fastapi.testclient import TestClient

from retrieval.data.bsonio import iter_products
from retrieval.serve.api import MAX_UPLOAD, create_app
from retrieval.infer.folder import open_index


@pytest.fixture(scope="module")
def served(indexes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served") / "index"
    shutil.copytree(indexes["all"], folder)
    return folder


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served)) as c:
        yield c


def _first(small_data):
    return next(iter_products(small_data["train.bson"]))


def _check_nearest(served, product_id: int, found: list[int], k: int, skip: int = 0) -> None:
    """``found`` are ranks ``skip..skip+k-1`` of the products nearest to an indexed product: checked against a
    cosine scan over every stored vector in plain numpy (ties, e.g. re-listed twins, may come in any order)."""
    b = open_index(served)
    vecs = np.stack([b.vector(i) for i in range(len(b.product_ids))])
    sims = vecs @ vecs[int(np.flatnonzero(b.product_ids == product_id)[0])]
    by_id = dict(zip(b.product_ids.tolist(), sims.tolist()))
    expected = np.sort(sims)[::-1][skip:skip + k]
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
    by_id = client.post("/classify", data={"product_id": p.product_id, "top": 3}).json()["categories"]
    assert [x["category_id"] for x in by_id][0] == p.category_id


def test_pictures_health_and_docs(client, served, small_data):
    p = _first(small_data)
    r = client.get(f"/products/{p.product_id}/images/0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content == p.images[0]
    assert client.get(f"/products/{p.product_id}/images/{len(p.images)}").status_code == 404
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["products"] == len(open_index(served).product_ids)
    assert "/similar" in client.get("/openapi.json").json()["paths"]
    assert "<title>Similar products</title>" in client.get("/").text


@pytest.mark.parametrize("data, files, status, words", [
    ({"product_id": 987654321}, None, 404, "not in the index"),
    ({}, [("images", ("x.jpg", b"not a picture", "image/jpeg"))], 400, "x.jpg: not a readable image"),
    ({"product_id": 1, "k": 0}, None, 422, "greater than or equal to 1"),
    ({"product_id": 1, "k": 1000}, None, 422, "less than or equal to 100"),
    ({}, None, 400, "exactly one of product_id or one or more images"),
    ({"k": 2}, [("images", ("big.jpg", b"\xff" * (MAX_UPLOAD + 10), "image/jpeg"))], 413, "MB in all"),
])
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(client, small_data, data, files, status, words):
    r = client.post("/similar", data=data, files=files)
    assert r.status_code == status and words in r.text
    assert client.post("/similar", data={"product_id": _first(small_data).product_id, "k": 1}).status_code == 200


def test_adding_products_makes_them_findable(client, small_data, tmp_path):
    p = _first(small_data)
    new = {"_id": 555_000_001, "imgs": [{"picture": x} for x in p.images], "category_id": p.category_id}
    r = client.post("/products", files={"file": ("new.bson", bson.encode(new), "application/octet-stream")})
    assert r.status_code == 200 and r.json()["added"] == 1
    found = client.post("/similar", data={"product_id": 555_000_001, "k": 2}).json()["results"]
    assert 555_000_001 in [x["product_id"] for x in found]
    assert client.get("/products/555000001/images/0").content == p.images[0]  # served from the kept upload
    bad = client.post("/products", files={"file": ("junk.bson", b"\x05\x00\x00\x00junk", "application/octet-stream")})
    assert bad.status_code == 400 and "junk" in bad.text


# ---- the page, in a real browser --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(served):
    import uvicorn
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(served), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    t.join(10)


@pytest.fixture(scope="module")
def browser():
    if not Path("/usr/bin/chromium").exists():
        pytest.fail("Debian's chromium is needed for the page test (apt-get install chromium chromium-driver)")
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


def test_page_searches_by_id_and_picture_and_more_like_this(server, browser, served, small_data, tmp_path):
    from selenium.webdriver.common.by import By
    p = _first(small_data)
    browser.get(f"{server}/?id={p.product_id}&k=6")
    cards = _cards(browser, 6)
    ids = [int(c.get_attribute("data-product-id")) for c in cards]
    _check_nearest(served, p.product_id, ids, 6)
    rows = browser.find_elements(By.CSS_SELECTOR, "#cats tbody tr")
    assert len(rows) == 5 and str(p.category_id) in rows[0].text
    loaded = browser.execute_script("return [...document.querySelectorAll('#results img')]"
                                    ".every(i => i.complete && i.naturalWidth > 0)")
    assert loaded  # thumbnails came from /products/{id}/images/0
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
