"""The demo: the whole system on generated data (make-data, train, build-index, evaluate, predict, similar)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .data.offsets import load_offsets
from .data.synth import SynthConfig, make_data
from .durable import write_json
from .errors import UserError
from .infer.evaluate import evaluate
from .infer.indexdir.build import IndexSettings, build_index
from .infer.pipeline.embed import LoaderSettings
from .infer.predict import predict, score_submission
from .infer.query import similar
from .train.config import TrainConfig
from .train.run import train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes for the demo; the defaults finish in a few minutes on 2 CPU cores."""

    products: int = 4000
    categories: int = 200
    image_size: int = 64
    epochs: int = 5
    colour_shift: float = 75.0  # hard enough that head, kNN and fused accuracies differ
    seed: int = 0
    workers: int = 2


def run_demo(workdir: str | Path, cfg: DemoConfig = DemoConfig()) -> dict:
    """Run every stage and return accuracies, timings and artefact paths."""
    work = Path(workdir)
    run = work / "run"
    if cfg.products < 20 or cfg.categories < 2 or cfg.epochs < 1:
        raise UserError("the demo needs at least 20 products, 2 categories and 1 epoch")
    if work.exists() and any(work.iterdir()):
        raise FileExistsError(f"{work} already holds files (a demo run?); choose an empty --workdir")
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    def lap(name: str) -> None:
        times[name] = round(time.perf_counter() - t0 - sum(times.values()), 1)

    data = make_data(work / "data", SynthConfig(cfg.products, cfg.categories, cfg.seed, cfg.image_size,
                                                colour_shift=cfg.colour_shift))
    lap("make-data")
    tcfg = TrainConfig.build(image_size=cfg.image_size, embed_dim=128, epochs=cfg.epochs, batch_size=64,
                             workers=cfg.workers, val_fraction=0.1, seed=cfg.seed)
    res = train(data["train.bson"], run, tcfg, data["category_names.csv"])
    lap("train")
    loader = LoaderSettings(workers=cfg.workers)
    index = work / "index"  # one build: every product embedded once, the validation ones held out by evaluate
    build_index(data["train.bson"], run, index, IndexSettings(), loader)
    lap("build-index")
    metrics = evaluate(index, out_dir=work / "eval", loader=loader)
    lap("evaluate")
    sub = work / "submission.csv"
    report = predict(data["test.bson"], index, sub, loader=loader)
    test_acc = score_submission(sub, data["test_labels.csv"])
    lap("predict")
    query = _some_train_id(data["train.bson"])
    sheet = work / "similar.png"
    found = similar(index, product_id=query, k=8, sheet=sheet)
    lap("similar")
    summary = {
        "val_head_accuracy": metrics["head_accuracy"], "val_knn_accuracy": metrics["knn_accuracy"],
        "val_fused_accuracy": metrics["fused_accuracy"],
        "val_fused_without_duplicate_vote": metrics["fused_without_duplicates_accuracy"],
        "val_exact_duplicate_coverage": metrics["duplicate_coverage"], "calibration": metrics["calibration"],
        "test_accuracy": test_acc, "predict_products_per_s": report.rate,
        "similar_query": query, "similar_top": [(n.product_id, round(n.similarity, 3)) for n in found[:3]],
        "seconds": times, "total_seconds": round(time.perf_counter() - t0, 1),
        "artefacts": {"data": str(work / "data"), "model": str(res.model_file), "checkpoint": str(res.best),
                      "metrics": str(run / "logs" / "metrics.csv"),
                      "evaluation": str(work / "eval" / "metrics.json"), "eval_plots": metrics["plots"],
                      "index": str(index),
                      "submission": str(sub), "contact_sheet": str(sheet), "summary": str(work / "summary.json")},
        "products": cfg.products, "categories": cfg.categories,
    }
    write_json(work / "summary.json", summary, indent=1)
    return summary


def summary_table(s: dict) -> str:
    """The demo's summary for a person: accuracies, the similar products found, timings and where things are."""
    a = s["artefacts"]
    rows = [f"demo: {s['products']:,} generated products in {s['categories']} categories, "
            f"{s['total_seconds']:.0f} s",
            "",
            f"{'':<22}{'head':>8}{'kNN':>8}{'fused':>8}",
            f"{'validation accuracy':<22}{s['val_head_accuracy']:>8.3f}{s['val_knn_accuracy']:>8.3f}"
            f"{s['val_fused_accuracy']:>8.3f}",
            f"{'test accuracy':<22}{'':>16}{s['test_accuracy']:>8.3f}   (the submission, scored)",
            "",
            f"similar to product {s['similar_query']}: "
            + ", ".join(f"{pid} ({sim:.3f})" for pid, sim in s["similar_top"]),
            "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items()),
            "",
            f"submission     {a['submission']}",
            f"index          {a['index']}",
            f"contact sheet  {a['contact_sheet']}",
            f"everything     {a['summary']} (JSON)"]
    return "\n".join(rows)


def _some_train_id(path: Path) -> int:
    table = load_offsets(path, progress=False)
    multi = table["product_id"][table["n_images"] >= 2]
    return int(multi[0] if len(multi) else table["product_id"][0])
