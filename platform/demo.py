"""The main job's last step: scBERT at paper size (parameter count, one forward pass), the
pipeline's fine-tuned model annotating real test-fold cells (``data/cells/pbmc68k``), then the
sweep and cross-validation tables, and the CV run registered and promoted past the gate."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scbert import ScBert, ScBertConfig, tokenize
from scbert.runtime import keep_freed_memory

PAPER_N_GENES = 16_906  # the published gene panel


def build_paper_model(*, n_classes: int | None, seed: int = 0) -> ScBert:
    """scBERT with the paper's sizes and a random stand-in for the (unpublished) gene2vec matrix."""
    generator = torch.Generator().manual_seed(seed)
    config = ScBertConfig(n_genes=PAPER_N_GENES, n_classes=n_classes)
    gene2vec = torch.randn(config.n_genes, config.dim, generator=generator)
    torch.manual_seed(seed)
    return ScBert(config=config, gene2vec=gene2vec)


def random_cells(n_cells: int, n_genes: int, *, seed: int = 0) -> torch.Tensor:
    """log2(1 + x)-like values, ~10% of genes expressed (as in PBMC data), tokenised."""
    generator = torch.Generator().manual_seed(seed)
    expressed = torch.rand(n_cells, n_genes, generator=generator) < 0.1
    values = torch.log2(1 + torch.rand(n_cells, n_genes, generator=generator) * 60) * expressed
    return tokenize(values, n_bins=5)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, of which in the encoder)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    encoder = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))
    return trainable, encoder


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.tracked:
        print(" ".join(untracked_stages(args.tracked)))
        return
    keep_freed_memory()  # large intermediates reused, not re-faulted (docs/model.md)
    from scbert_platform.console import header, quiet_libraries

    quiet_libraries()
    header("scBERT at paper size (random weights)")
    paper_size_forward(n_cells=args.cells, n_classes=args.classes)
    summary: list[str] = []
    if args.cells_dir:
        summary.append(dataset_line(Path(args.cells_dir)))
    if args.cells_dir and args.model:
        header("the pipeline's fine-tuned model on real test-fold cells")
        run_on_shards(args.cells_dir, args.model, n_cells=max(args.cells, 8))
    if args.sweep_report:
        header(f"sweep ({args.sweep_report})")
        print(Path(args.sweep_report).read_text().rstrip())
    if args.cv_report:
        summary += _registry_and_endpoint(args)
    if summary:
        print_summary(summary)


def _parser() -> argparse.ArgumentParser:
    """The command line (``make demo`` calls it twice: ``--tracked``, then the demo)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, default=2, help="cells in the forward pass")
    parser.add_argument("--classes", type=int, default=10, help="cell types of the classifier head")
    parser.add_argument("--cells-dir", help="ingested shards: also annotate their test-fold cells")
    parser.add_argument("--model", help="a fine-tuned checkpoint directory for --cells-dir")
    parser.add_argument("--sweep-report", help="the sweep stage's table (reports/sweep.md)")
    parser.add_argument(
        "--cv-report", help="the cv stage's summary (reports/cv.json): registered and promoted"
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="then serve the champion over HTTP and annotate the --cells-dir cells through it",
    )
    parser.add_argument("--params", default="params.yaml", help="its serve section is used")
    parser.add_argument(
        "--tracked",
        nargs="+",
        metavar="REPORT",
        help="only check that each report's MLflow run is in this machine's tracking store, "
        "and print the stages that must run again here (a report's stage: its file's stem)",
    )
    return parser


def paper_size_forward(*, n_cells: int, n_classes: int) -> None:
    """scBERT at the paper's sizes: its configuration and parameter count, and one forward pass
    of ``n_cells`` random cells, timed."""
    model = build_paper_model(n_classes=n_classes).eval()
    trainable, encoder = count_parameters(model)
    c = model.config
    print(
        f"scBERT at paper size: n_genes={c.n_genes} (+1 appended), n_bins={c.n_bins}, dim={c.dim}, "
        f"depth={c.depth}, heads={c.heads}, dim_head={c.dim_head}, nb_features={c.nb_features}"
    )
    print(f"trainable parameters: {trainable:,} (encoder {encoder:,}; paper: about 5.0 M encoder)")
    tokens = random_cells(n_cells, c.n_genes)
    start = time.perf_counter()
    with torch.inference_mode():
        logits = model(tokens)
    elapsed = time.perf_counter() - start
    print(f"input tokens {tuple(tokens.shape)} -> logits {tuple(logits.shape)} in {elapsed:.1f} s")


def _registry_and_endpoint(args: argparse.Namespace) -> list[str]:
    """The CV run's model registered and put to the gate, then (``--serve``) the champion served
    and annotating the ``--cells-dir`` cells; returns the summary's lines."""
    from scbert_platform.console import header

    header("registry: the CV run's model, registered and put to the promotion gate")
    cv_report = Path(args.cv_report)
    name, decision, has_champion = register_and_promote(cv_report)
    lines = [
        f"5-fold CV on the same folds ({cv_report.with_suffix('.md')}):",
        *cv_table(cv_report),
        decision,
    ]
    if args.serve and args.cells_dir and not has_champion:
        nothing = (
            f"endpoint: not served, {name} has no champion (the gate refused the CV model; "
            f'scbert promote {name} --force "REASON" serves it anyway)'
        )
        print(nothing)
        lines.append(nothing)
    elif args.serve and args.cells_dir:
        header(f"serving {name}@champion over HTTP with Ray Serve on 127.0.0.1")
        lines.append(serve_and_annotate(args.cells_dir, name, cv_report, args.params))
    return lines


def dataset_line(cells_dir: Path) -> str:
    """The ingested dataset in one line, from its shard manifest."""
    from scbert_platform.data.manifest import read_manifest

    manifest = read_manifest(cells_dir)
    cells, genes = manifest["cells"], manifest["genes"]
    return (
        f"data: {manifest['dataset']} ({manifest['source']['path']}): {cells['kept']} of "
        f"{cells['input']} cells kept, {genes['panel']} panel genes, "
        f"{len(manifest['labels']['counts'])} expert cell types; shards in {cells_dir}"
    )


def cv_table(cv_report: Path) -> list[str]:
    """The first table of the CV report: scBERT next to the baselines, mean ± std over folds."""
    lines = cv_report.with_suffix(".md").read_text().splitlines()
    table = []
    for line in lines:
        if not line.startswith("|"):
            if table:
                break
            continue
        table.append(line)
    return table


def print_summary(lines: list[str]) -> None:
    """The block the demo ends with: what ran, on what, how good, and where to look further."""
    from scbert_platform.console import header
    from scbert_platform.track.runs import tracking_uri

    header("summary")
    for line in lines:
        print(line)
    print("look further:")
    print(f"  mlflow ui --backend-store-uri {tracking_uri()}   # runs, models, the registry")
    print("  reports/cv.md, reports/sweep.md, reports/finetune.json   # tables and metrics")
    print("  reports/annotate/, reports/explain/   # UMAP, confusion matrix, top genes per type")


def run_on_shards(directory: str, model_dir: str, *, n_cells: int, fold: int = 0) -> None:
    """The pipeline's fine-tuned model on real cells of the test fold (never used to train it or
    to choose its checkpoint): predicted against expert cell types."""
    from scbert import assign_cell_types, load_pretrained
    from scbert_platform.data.loader import ShardInfo, iter_local_batches

    info = ShardInfo.read(directory)
    bundle = load_pretrained(model_dir)
    assert bundle.classes is not None, f"{model_dir} is not a fine-tuned checkpoint"
    model = bundle.model.eval()
    tokens, labels = [], []
    for batch in iter_local_batches(directory, model.config.n_bins, folds=[fold], batch_size=64):
        tokens.append(torch.from_numpy(batch["tokens"]))
        labels += batch["label"].tolist()
        if len(labels) >= n_cells:
            break
    with torch.inference_mode():
        proba = model.predict_proba(torch.cat(tokens)[:n_cells])
    predicted = assign_cell_types(proba, bundle.classes)  # the paper's threshold, 0.5
    truth = [info.labels[i] for i in labels[:n_cells]]
    c = model.config
    print(
        f"fine-tuned model {model_dir} (dim {c.dim}, depth {c.depth}, {c.n_genes} genes) on "
        f"{len(truth)} real cells of test fold {fold} from {directory}:"
    )
    for true, guess, p in zip(truth, predicted, proba.max(dim=1).values.tolist(), strict=True):
        print(f"  {'ok ' if true == guess else 'x  '}{true:30} -> {guess} ({p:.2f})")


def untracked_stages(reports: list[str]) -> list[str]:
    """The stages (each report's file stem: ``reports/cv.json`` is the ``cv`` stage's) whose
    report names no MLflow run of this machine's tracking store; each is named on stderr."""
    stages = []
    for report in map(Path, reports):
        if not tracked(report):
            print(
                f"{report}: its MLflow run is not in this machine's tracking store", file=sys.stderr
            )
            stages.append(report.stem)
    return stages


def tracked(report: Path) -> bool:
    """Whether the run a stage report names (``mlflow_run_id``) is in the tracking store."""
    from scbert_platform.track.runs import registry_client

    if not report.is_file():
        return False
    run_id = json.loads(report.read_text()).get("mlflow_run_id")
    try:
        return bool(run_id) and registry_client().get_run(run_id) is not None
    except Exception:  # MlflowException: no such run (a fresh clone with committed reports)
        return False


def register_and_promote(cv_report: Path) -> tuple[str, str, bool]:
    """Register the CV run's model (once per run) and promote it if it passes the gate; a
    refusal is reported, not an error: the gate doing its job is part of the demo (on a fresh
    registry it leaves no champion to serve). Returns the registered name, the gate's decision
    in one line, and whether the name has a champion."""
    from scbert_platform.track.registry import CHAMPION, GateRefused, promote, register
    from scbert_platform.track.runs import registry_client

    summary = json.loads(cv_report.read_text())
    run_id = summary["mlflow_run_id"]
    client = registry_client()
    existing = client.search_model_versions(f"run_id = '{run_id}'")
    if existing:
        name, version = existing[0].name, existing[0].version
        print(f"CV run {run_id} is already {name} version {version}")
    else:
        move = register(run_id)
        name, version = move.name, move.version
        print(f"registered CV run {run_id} as {name} version {version} (alias challenger)")
    try:
        move = promote(name)
        gate = f"promoted: {move.reason}"
    except GateRefused as refused:
        gate = f"not promoted, the gate refused: {refused}"
    held = client.get_registered_model(name).aliases.get(CHAMPION)
    if held is None:
        decision = f"champion: none; version {version}: {gate}"
    else:
        champion = client.get_model_version(name, held)
        decision = (
            f"champion: {name}@{CHAMPION} = version {champion.version} (cv/macro_f1 "
            f"{float(champion.tags.get('metric.cv/macro_f1', 'nan')):.3f}); version {version}: "
            f"{gate}"
        )
    print(decision)
    return str(name), decision, held is not None


def serve_and_annotate(cells_dir: str, name: str, cv_report: Path, params_file: str) -> str:
    """Serve ``NAME@champion`` with Ray Serve on this machine and annotate every ingested cell
    over HTTP (sparse JSON, 100 cells a request), printing accuracy against the expert labels:
    over all cells, and over the fold the champion never saw (it is one CV fold's model).
    Returns the endpoint's answer in one line."""
    from scbert_platform.cluster import start_ray
    from scbert_platform.data.loader import ShardInfo
    from scbert_platform.params import Params
    from scbert_platform.track.pyfunc import shard_counts
    from scbert_platform.track.runs import registry_client
    from scbert_serve.app import TOKEN_ENV, metrics_port, resolve_model, run, stop
    from scbert_serve.client import Client

    champion = {"serve.model": f"models:/{name}@champion"}
    params = Params.load(params_file).replace(champion).serve
    source = resolve_model(params.model)
    held_out = _held_out_fold(source, cv_report, registry_client())
    start_ray()
    started = time.perf_counter()
    url = run(params, source)
    prometheus = f"http://127.0.0.1:{metrics_port()}/metrics"
    print(
        f"serving {name} version {source.version} (champion) at {url} "
        f"(started in {time.perf_counter() - started:.0f} s); docs at {url}/docs"
    )
    client = Client(url, token=os.environ.get(TOKEN_ENV))  # retries a lost replica's 503
    counts, obs = shard_counts(cells_dir, ShardInfo.read(cells_dir).panel)
    try:
        replies = _annotate_over_http(client, counts)
    finally:
        stop()
    answer = _endpoint_accuracy(replies, obs, source.version, params.threshold, held_out)
    print(f"  (Prometheus metrics were at {prometheus})")
    return answer


@dataclass
class _HttpAnswers:
    """What the endpoint answered for the cells, request by request."""

    predicted: list[str]  # cell types (Unassigned below the threshold)
    top1: list[str]  # the most probable type of each cell
    elapsed: float  # seconds, from GET /v1/model to the last answer
    coverage: dict[str, Any]  # the last answer's panel coverage
    requests: int


def _annotate_over_http(client: Any, counts: Any) -> _HttpAnswers:
    """GET /v1/model, then POST /v1/annotate with every cell of ``counts``, 100 a request."""
    from scbert_serve.schema import sparse_cells

    predicted: list[str] = []
    top1: list[str] = []
    started = time.perf_counter()
    info = client.model()
    print(
        f"GET /v1/model: {info['name']} v{info['version']}, {len(info['classes'])} classes, "
        f"panel of {info['panel_size']} genes (sha256 {info['panel_sha256'][:12]}...)"
    )
    for start in range(0, len(counts), 100):
        cells = sparse_cells(counts.iloc[start : start + 100])
        reply = client.annotate(cells=cells)
        predicted += [cell["cell_type"] for cell in reply["cells"]]
        top1 += [cell["top_k"][0]["cell_type"] for cell in reply["cells"]]
    elapsed = time.perf_counter() - started
    return _HttpAnswers(predicted, top1, elapsed, reply["coverage"], -(-len(counts) // 100))


def _endpoint_accuracy(
    answers: _HttpAnswers,
    obs: Any,
    version: Any,
    threshold: float,
    held_out: tuple[int, float] | None,
) -> str:
    """Prints the endpoint's speed and its accuracy against the expert labels (all cells, and
    the champion's held-out fold); returns them in one line."""
    predicted = answers.predicted
    truth = obs["label"].to_numpy()
    hits, top_hits = np.asarray(predicted) == truth, np.asarray(answers.top1) == truth
    n_unassigned = sum(p == "Unassigned" for p in predicted)
    print(
        f"POST /v1/annotate: {len(predicted)} real pbmc68k cells in {answers.requests} "
        f"requests, {answers.elapsed:.1f} s ({len(predicted) / answers.elapsed:.0f} cells/s); "
        f"panel coverage {answers.coverage['fraction']:.0%}; Unassigned (top probability < "
        f"{threshold}): {n_unassigned}"
    )
    print(
        f"  accuracy against the expert labels, all cells: {hits.mean():.3f} (Unassigned counted "
        f"wrong), {top_hits.mean():.3f} (most probable type)"
    )
    answer = (
        f"endpoint: {len(predicted)} cells annotated over HTTP by version {version}, "
        f"accuracy {hits.mean():.3f} ({top_hits.mean():.3f} for the most probable type, "
        f"{n_unassigned} Unassigned)"
    )
    if held_out is not None:
        fold, cv_accuracy = held_out
        mask = obs["fold"].to_numpy() == fold
        print(
            f"  on fold {fold}, the {int(mask.sum())} cells the champion never trained on: "
            f"{hits[mask].mean():.3f} (Unassigned wrong), {top_hits[mask].mean():.3f} (most "
            f"probable type; scbert cv measured {cv_accuracy:.3f} on this fold in-process)"
        )
        answer += f"; on its held-out fold {fold}: {top_hits[mask].mean():.3f}"
    return answer


def _held_out_fold(source: Any, cv_report: Path, client: Any) -> tuple[int, float] | None:
    """(fold, CV accuracy) of the fold the champion's model was tested on, when it is a CV fold
    model of this report."""
    if not source.version:
        return None
    run_id = client.get_model_version(source.name, source.version).tags.get("scbert.run_id")
    fold_run = client.get_run(run_id).data.tags.get("scbert.cv_model_run_id") if run_id else None
    for group in json.loads(cv_report.read_text())["groups"]:
        for fold in group.get("folds", []):
            if fold.get("run_id") == fold_run and fold["held_out"].startswith("fold "):
                return int(fold["held_out"].split()[1]), float(fold["accuracy"])
    return None


if __name__ == "__main__":
    main()
