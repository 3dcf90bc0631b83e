"""Command line: a thin typer layer over the `retrieval` library. Run as ``python cli.py COMMAND``."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cdiscount product classification and similar-product retrieval.")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError)


@app.command("make-data")
def make_data(out_dir: Path, products: int = typer.Option(2000, help="training + test products"),
              categories: int = 40, seed: int = 0, image_size: int = 180,
              test_fraction: float = 0.2,
              relist_fraction: float = typer.Option(0.25, help="share of products re-listing an earlier item"),
              colour_jitter: float = typer.Option(45.0, help="per-product colour shift; larger is harder")) -> None:
    """Generate train.bson, test.bson, test_labels.csv and category_names.csv in the Kaggle layout."""
    from retrieval.synth import SynthConfig, make_data as _make
    _setup_logging()
    try:
        paths = _make(out_dir, SynthConfig(products, categories, seed, image_size, test_fraction,
                                           relist_fraction=relist_fraction, colour_jitter=colour_jitter))
    except USER_ERRORS as e:
        _fail(e)
    for p in paths.values():
        typer.echo(str(p))


@app.command()
def stats(file: Path, categories: Optional[Path] = typer.Option(None, help="category_names.csv"),
          out: Path = typer.Option(Path("stats_out"), help="folder for the PNG plots")) -> None:
    """Count products, images and categories of a BSON file and plot their distributions."""
    from retrieval.categories import CategoryTable
    from retrieval.stats import file_stats
    _setup_logging()
    try:
        table = CategoryTable.from_csv(categories) if categories else None
        typer.echo(file_stats(file, table, out).report())
    except USER_ERRORS as e:
        _fail(e)


@app.command()
def train(train_file: Path, out: Path = typer.Option(..., "--out", help="run folder"),
          categories: Optional[Path] = typer.Option(None, help="category_names.csv (default: ids seen in training)"),
          backbone: str = typer.Option("tiny", help="tiny, RN50, RN101, convnext_tiny, convnext_small, convnext_base"),
          pretrained: Optional[str] = typer.Option(None, help="open_clip pretrained tag, or a local weights file"),
          image_size: int = 64, embed_dim: int = 512,
          metric_loss: str = typer.Option("multisimilarity", help="multisimilarity, subcenter_arcface or none"),
          metric_weight: float = 0.5, hier_heads: bool = typer.Option(False, help="auxiliary level-1/2 heads"),
          sampled_negatives: int = typer.Option(0, help="> 0: sampled softmax with this many negatives"),
          epochs: int = 5, max_steps: int = typer.Option(-1, help="stop after this many steps (overrides epochs)"),
          batch_size: int = 64, lr: float = 2e-3, devices: str = typer.Option("auto", help="Lightning devices"),
          num_nodes: int = 1, workers: int = 2, precision: str = "auto", resume: bool = False,
          val_fraction: float = 0.05, seed: int = 0) -> None:
    """Fine-tune an open_clip backbone with a metric-learning loss plus a classification head."""
    from retrieval.train import TrainConfig, train as _train
    _setup_logging()
    cfg = TrainConfig(backbone=backbone, pretrained=pretrained, image_size=image_size, embed_dim=embed_dim,
                      metric_loss=metric_loss, metric_weight=metric_weight, hier_heads=hier_heads,
                      sampled_negatives=sampled_negatives, lr=lr, epochs=epochs, max_steps=max_steps,
                      batch_size=batch_size, val_fraction=val_fraction, seed=seed, workers=workers,
                      devices=int(devices) if devices.isdigit() else devices, num_nodes=num_nodes, precision=precision)
    try:
        res = _train(train_file, out, cfg, categories, resume=resume)
    except USER_ERRORS as e:
        _fail(e)
    typer.echo(f"best checkpoint: {res.best}")


@app.command("build-index")
def build_index(train_file: Path, model: Path = typer.Option(..., help="run folder of `train`"),
                out: Path = typer.Option(..., help="index folder"),
                split: str = typer.Option("train", help="train: the run's training split; all: every product"),
                index_type: str = typer.Option("auto", help="auto or a FAISS factory string"),
                batch_size: int = 256, tta_flip: bool = False, workers: int = 2,
                memory_budget_gb: float = 8.0) -> None:
    """Embed every product and build a FAISS index (resumes an interrupted build)."""
    from retrieval.indexing import build_index as _build
    _setup_logging()
    try:
        man = _build(train_file, model, out, split, index_type, batch_size, tta_flip, workers,
                     memory_budget=memory_budget_gb * 1e9)
    except USER_ERRORS as e:
        _fail(e)
    typer.echo(f"indexed {man['count']} products with {man['factory']} into {out}")


@app.command()
def similar(index: Path = typer.Option(..., help="index folder"),
            product_id: Optional[int] = typer.Option(None, help="query by an indexed product id"),
            image: Optional[List[Path]] = typer.Option(None, help="query image file(s); several are averaged"),
            k: int = typer.Option(10, "-k", "--k"), category: Optional[int] = None, json_out: bool = typer.Option(
                False, "--json", help="machine-readable output"), sheet: Optional[Path] = None) -> None:
    """The k products most similar to an indexed product or to image files."""
    import json
    from retrieval.similar import similar as _similar
    _setup_logging()
    try:
        found = _similar(index, product_id, image or None, k, category, sheet)
    except USER_ERRORS as e:
        _fail(e)
    if json_out:
        typer.echo(json.dumps([n.to_dict() for n in found]))
        return
    for n in found:
        typer.echo(f"{n.product_id:>12}  {n.similarity:.4f}  {n.category_id}  {n.level1} > {n.level2} > {n.level3}")
    if sheet:
        typer.echo(f"contact sheet: {sheet}")


@app.command("add-to-index")
def add_to_index(new_file: Path, index: Path = typer.Option(..., help="index folder"), batch_size: int = 256,
                 workers: int = 2) -> None:
    """Append new products to an index without retraining or rebuilding."""
    from retrieval.indexing import add_to_index as _add
    _setup_logging()
    try:
        added, dups = _add(index, new_file, batch_size, workers)
    except USER_ERRORS as e:
        _fail(e)
    typer.echo(f"added {added} products; {len(dups)} already indexed" + (f" (e.g. {dups[:5]})" if dups else ""))


@app.command()
def predict(test_file: Path, index: Path = typer.Option(..., help="index folder (build-index --split all)"),
            out: Path = typer.Option(Path("submission.csv"), help="submission CSV"),
            alpha: Optional[float] = typer.Option(None, help="weight of the head (default: calibration, else 0.5)"),
            k: Optional[int] = typer.Option(None, "--k", "-k", help="neighbours (default: calibration, else 20)"),
            tau: Optional[float] = typer.Option(None, help="vote temperature (default: calibration, else 0.07)"),
            tta_flip: bool = False, top: int = typer.Option(0, help="with --scores-out: categories per product"),
            scores_out: Optional[Path] = None, batch_size: int = 256, workers: int = 2) -> None:
    """Predict a category for every product of TEST_FILE, in file order (resumes if interrupted)."""
    from retrieval.predict import predict as _predict
    _setup_logging()
    if scores_out and top < 1:
        top = 5
    try:
        r = _predict(test_file, index, out, alpha, k, tau, tta_flip, top, scores_out, batch_size, workers)
    except USER_ERRORS as e:
        _fail(e)
    typer.echo(f"{r.products} rows written to {out} ({r.products / r.seconds:.0f} products/s); "
               f"{r.without_image} products without a decodable image; alpha={r.params['alpha']} "
               f"k={r.params['k']} tau={r.params['tau']}")


@app.command()
def evaluate(index: Path = typer.Option(..., help="index folder (build-index --split train)"),
             val_file: Optional[Path] = typer.Argument(
                 None, help="labelled BSON (default: the run's validation split)"),
             out: Optional[Path] = typer.Option(None, help="folder for metrics.json and plots"),
             batch_size: int = 256, workers: int = 2, max_products: int = 20000) -> None:
    """Head, kNN and fused accuracy on held-out products; saves the best alpha, k, tau for predict."""
    from retrieval.evaluate import evaluate as _evaluate
    _setup_logging()
    try:
        m = _evaluate(index, val_file, out, batch_size, workers, max_products)
    except USER_ERRORS as e:
        _fail(e)
    for key in ("products", "head_accuracy", "knn_accuracy", "fused_accuracy", "calibration", "fused_top5_accuracy",
                "level1_accuracy", "level2_accuracy", "image_accuracy", "by_frequency", "plots"):
        typer.echo(f"{key}: {m[key]}")


@app.command()
def demo(workdir: Path = typer.Option(Path("demo_work"), help="empty folder for everything the demo makes"),
         products: int = 4000, categories: int = 200, epochs: int = 5, workers: int = 2) -> None:
    """Run the whole system on generated data and print a summary."""
    import json
    from retrieval.demo import DemoConfig, run_demo
    _setup_logging()
    try:
        s = run_demo(workdir, DemoConfig(products=products, categories=categories, epochs=epochs, workers=workers))
    except USER_ERRORS as e:
        _fail(e)
    typer.echo(json.dumps(s, indent=1))


if __name__ == "__main__":
    app()
