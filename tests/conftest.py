"""Shared fixtures: the real data folder, and small generated data sets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from retrieval.data.synth import SynthConfig, make_data
from retrieval.infer.indexdir.build import IndexSettings
from retrieval.infer.pipeline.embed import LoaderSettings

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _threads():
    torch_threads = os.environ.get("TEST_TORCH_THREADS")
    if torch_threads:
        import torch
        torch.set_num_threads(int(torch_threads))


def shared_file(name: str) -> Path:
    p = SHARED / name
    if not p.exists():
        pytest.skip(f"real data file {p} is not present on this machine")
    return p


def assert_same_calibration(a: dict, b: dict) -> None:
    """Two evaluate runs' fitted fusions: the same rule and settings, the weights equal to float rounding
    (searches in batches of another shape sum in another order)."""
    import numpy as np
    assert {k: v for k, v in a.items() if k != "weights"} == {k: v for k, v in b.items() if k != "weights"}
    if a.get("weights") is None or b.get("weights") is None:  # the grid rule has no fitted weights
        assert a.get("weights") is None and b.get("weights") is None
        return
    np.testing.assert_allclose(a["weights"], b["weights"], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict[str, Path]:
    """150 training + 30 test products, 6 categories, 32 px images."""
    return make_data(tmp_path_factory.mktemp("gen"), SynthConfig(products=150, categories=6, seed=1, image_size=32,
                                                                 test_fraction=0.2), progress=False)


TRAINED_EPOCHS = 3


@pytest.fixture(scope="session")
def trained(small_data, tmp_path_factory):
    """``(run folder, TrainResult)`` of a tiny-tower run trained for ``TRAINED_EPOCHS`` epochs on ``small_data``;
    the result keeps the trained module in memory. Tests only read it."""
    from retrieval.train.config import TrainConfig
    from retrieval.train.run import train
    run = tmp_path_factory.mktemp("trained")
    res = train(small_data["train.bson"], run, TrainConfig.build(image_size=32, embed_dim=32, batch_size=16, workers=0,
                                                                 val_fraction=0.2, epochs=TRAINED_EPOCHS, lr=3e-3),
                small_data["category_names.csv"], progress=False)
    return run, res


@pytest.fixture(scope="session")
def trained_run(trained) -> Path:
    """The run folder of ``trained``."""
    return trained[0]


def build_world(root: Path, small_data: dict, trained_run: Path) -> Path:
    """``root`` holding a copy of ``small_data`` (``data/``), of the trained run (``run/``) and an index of all
    150 products (``idx/``), side by side (the index's relative paths hold wherever ``root`` is copied)."""
    import shutil

    from retrieval.infer.indexdir.build import build_index
    shutil.copytree(small_data["train.bson"].parent, root / "data")
    shutil.copytree(trained_run, root / "run")
    build_index(root / "data" / "train.bson", root / "run", root / "idx", IndexSettings("all", part_products=40),
                LoaderSettings(workers=0))
    return root


@pytest.fixture(scope="session")
def built_world(tmp_path_factory, small_data, trained_run) -> Path:
    """One :func:`build_world` for the session; tests never write into it (they take :func:`world`)."""
    return build_world(tmp_path_factory.mktemp("built") / "world", small_data, trained_run)


@pytest.fixture()
def world(tmp_path, built_world) -> Path:
    """A copy of :func:`built_world` of the test's own, to change at will."""
    import shutil
    shutil.copytree(built_world, tmp_path / "world")
    return tmp_path / "world"


@pytest.fixture(scope="session")
def indexes(small_data, trained_run, tmp_path_factory) -> dict[str, Path]:
    """A train-split index and an all-products index of ``small_data``."""
    from retrieval.infer.indexdir.build import build_index
    root = tmp_path_factory.mktemp("indexes")
    for split in ("train", "all"):
        build_index(small_data["train.bson"], trained_run, root / split, IndexSettings(split, part_products=40),
                    LoaderSettings(workers=0))
    return {"train": root / "train", "all": root / "all"}
