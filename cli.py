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
              test_fraction: float = 0.2) -> None:
    """Generate train.bson, test.bson, test_labels.csv and category_names.csv in the Kaggle layout."""
    from retrieval.synth import SynthConfig, make_data as _make
    _setup_logging()
    try:
        paths = _make(out_dir, SynthConfig(products, categories, seed, image_size, test_fraction))
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


if __name__ == "__main__":
    app()
