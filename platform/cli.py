"""The ``scbert`` command line. Each verb is a thin layer over a ``scbert_platform`` function.

Parameters come from ``params.yaml`` (``--params``), then ``--set section.key=value`` overrides,
then a verb's own flags (which are shorthands for ``--set``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from scbert_platform.params import Params, ParamsError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: params.yaml if present)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one parameter (repeatable)",
    )


def _params(args: argparse.Namespace, flags: dict[str, object]) -> Params:
    params = Params.load(args.params, args.overrides)
    for dotted, value in flags.items():
        if value is not None:
            params.set(dotted, value)
    return params


def cmd_ingest(args: argparse.Namespace) -> int:
    from scbert_platform.ingest import ingest

    params = _params(
        args,
        {
            "data.name": args.name,
            "data.panel": args.panel,
            "data.label_key": args.label_key,
            "data.layer": args.layer,
            "data.gene_id_column": args.gene_id_column,
            "data.use_raw": True if args.use_raw else None,
            "data.input_normalized": True if args.input_normalized else None,
            "data.make_unique": True if args.make_unique else None,
        },
    )
    report = ingest(args.input, args.out, params.data, executor=args.executor)
    if args.metrics:
        _write_metrics(Path(args.metrics), report.manifest)
    return 0


def _write_metrics(path: Path, manifest: dict[str, object]) -> None:
    import json

    cells = manifest["cells"]
    genes = manifest["genes"]
    assert isinstance(cells, dict) and isinstance(genes, dict)
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {
        "cells_input": cells["input"],
        "cells_kept": cells["kept"],
        "gene_coverage": genes["coverage"],
        "n_shards": len(manifest["shards"]),  # type: ignore[arg-type]
    }
    path.write_text(json.dumps(metrics, indent=2) + "\n")


def cmd_train(args: argparse.Namespace) -> int:
    from scbert_platform.train_ray import fit

    params = _params(args, {})
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
    print(json.dumps(summary, indent=2, default=float))
    if args.metrics:
        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics).write_text(json.dumps(summary, indent=2, default=float) + "\n")
    if args.out:
        import shutil

        shutil.rmtree(args.out, ignore_errors=True)
        shutil.copytree(result.checkpoint, args.out)
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from scbert_tune.registry import register

    move = register(args.run_id, name=args.name)
    print(f"{move.name} version {move.version} is the {move.alias}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from scbert_tune.registry import promote, rollback

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


def cmd_cv(args: argparse.Namespace) -> int:
    from scbert_tune.baselines import cross_validate, markdown

    if not args.baseline:
        raise ValueError(
            "scBERT's own cross-validation (one Ray Tune trial per fold) is not built yet; "
            "--baseline logreg or --baseline knn runs the simple baselines on the same folds"
        )
    results = [cross_validate(args.shards, kind) for kind in args.baseline]
    print(markdown(results))
    if args.metrics:
        Path(args.metrics).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from scbert_platform.datasets import fetch

    path = fetch(args.name, args.out)
    print(f"copied bundled dataset {args.name} to {path}", file=sys.stderr)
    return 0


def cmd_gene_embed(args: argparse.Namespace) -> int:
    from scbert_platform.gene_embed import main

    return main(args.rest)


def cmd_synth(args: argparse.Namespace) -> int:
    from scbert_platform.synthetic import main

    return main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scbert", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    ingest = verbs.add_parser(
        "ingest", help="raw counts (.h5ad, 10x .h5/mtx, .loom) -> Parquet cell shards"
    )
    ingest.add_argument("input", help=".h5ad, 10x .h5, .loom, or a 10x matrix.mtx directory")
    ingest.add_argument("--out", required=True, help="output shard directory (replaced)")
    ingest.add_argument("--name", help="dataset name (data.name)")
    ingest.add_argument("--panel", help="gene panel: symbols file or Gene2vec text (data.panel)")
    ingest.add_argument("--label-key", help="obs column with cell-type labels (data.label_key)")
    ingest.add_argument("--layer", help="read counts from this layer (data.layer)")
    ingest.add_argument("--use-raw", action="store_true", help="read counts from .raw")
    ingest.add_argument("--gene-id-column", help="align genes by this var column")
    ingest.add_argument(
        "--input-normalized",
        action="store_true",
        help="values are log1p of normalised counts (inverted first)",
    )
    ingest.add_argument(
        "--make-unique", action="store_true", help="suffix duplicated gene symbols / cell ids"
    )
    ingest.add_argument("--executor", choices=["auto", "ray", "local"], default="auto")
    ingest.add_argument("--metrics", help="also write a small metrics JSON (for DVC)")
    _common(ingest)
    ingest.set_defaults(run=cmd_ingest)

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
        _common(sub)
        sub.set_defaults(run=cmd_train)

    cv = verbs.add_parser("cv", help="cross-validation on the shards' folds")
    cv.add_argument("shards", help="an ingested shard directory")
    cv.add_argument(
        "--baseline",
        action="append",
        choices=["logreg", "knn"],
        help="a scikit-learn baseline on the same folds and input (repeatable)",
    )
    cv.add_argument("--metrics", help="also write the results as JSON")
    cv.set_defaults(run=cmd_cv)

    reg = verbs.add_parser("register", help="register a fine-tuning run's model (challenger)")
    reg.add_argument("run_id", help="the MLflow run id of a scbert finetune run")
    reg.add_argument("--name", help="registered model name (default: scbert-<dataset>)")
    reg.set_defaults(run=cmd_register)

    pro = verbs.add_parser("promote", help="move champion to the challenger, past the gate")
    pro.add_argument("name", help="registered model name, e.g. scbert-pbmc68k")
    pro.add_argument("--force", metavar="REASON", help="skip the gate (the reason is recorded)")
    pro.add_argument("--rollback", action="store_true", help="restore the previous champion")
    _common(pro)
    pro.set_defaults(run=cmd_promote)

    fetch = verbs.add_parser("fetch", help="copy a dataset bundled with an installed package")
    fetch.add_argument("name", help="pbmc68k_reduced")
    fetch.add_argument("--out", required=True, help="destination file")
    fetch.set_defaults(run=cmd_fetch)

    for verb, run, text in (
        ("gene-embed", cmd_gene_embed, "gene2vec-style embeddings from ingested shards"),
        ("synth", cmd_synth, "write a synthetic count matrix (.h5ad) for scale tests"),
    ):
        sub = verbs.add_parser(verb, help=text, add_help=False)
        sub.add_argument("rest", nargs=argparse.REMAINDER)
        sub.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from scbert_platform.ingest import IngestError
    from scbert_platform.panel import PanelError
    from scbert_platform.train_ray import TrainingError
    from scbert_tune.registry import GateRefused

    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except (
        IngestError,
        ParamsError,
        PanelError,
        TrainingError,
        GateRefused,
        FileNotFoundError,
        KeyError,
        ValueError,
    ) as err:
        print(f"scbert {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"scbert {args.verb}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
