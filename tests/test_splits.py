"""Cell splits, sweep specs, CV plans, the CV table of a non-fold protocol and novel-type scores:
the rules, without Ray. (The fold trials themselves run on Ray: tests/test_cv.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import PBMC_PARAMS, tiny_params

from scbert_platform.data.loader import iter_local_batches
from scbert_platform.data.manifest import read_manifest
from scbert_platform.data.splits import CellSplit
from scbert_platform.params import Params
from scbert_tune.cv import SCRATCH, _aggregate, novel_type_scores, plan, report_markdown
from scbert_tune.sweep import PAPER_SPACE, SweepSpec, _search_alg, default_spec, tune_space


def table(n: int = 2000, *, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "cell_id": [f"cell-{i}" for i in range(n)],
            "label": rng.choice(["B", "NK", "T"], n).tolist(),
            "fold": rng.integers(0, 5, n).astype(np.int8),
            "batch": rng.choice(["d1", "d2", "d3"], n).tolist(),
        }
    )


def roles(split: CellSplit, t: pa.Table) -> dict[str, np.ndarray]:
    return {role: split.mask(t, role) for role in ("train", "val", "test")}


def test_roles_are_disjoint_and_follow_the_rules() -> None:
    t = table()
    split = CellSplit(test_folds=(0,), val_fraction=0.1, train_fraction=0.5, exclude_labels=("NK",))
    r = roles(split, t)
    assert not (r["train"] & r["val"]).any() and not (r["train"] & r["test"]).any()
    assert not (r["val"] & r["test"]).any()
    fold = t.column("fold").to_numpy()
    label = np.array(t.column("label").to_pylist())
    assert (r["test"] == (fold == 0)).all()  # novel NK cells stay in the test fold
    assert (label[r["test"]] == "NK").any()
    assert not (label[r["train"] | r["val"]] == "NK").any()  # never trained or validated on
    outside = (fold != 0) & (label != "NK")
    assert abs(r["val"].sum() / outside.sum() - 0.1) < 0.03
    assert abs(r["train"].sum() / (outside & ~r["val"]).sum() - 0.5) < 0.05


def test_a_cells_role_depends_only_on_its_id_and_the_seed() -> None:
    t = table()
    split = CellSplit(test_folds=(1,), val_fraction=0.2, train_fraction=0.7, seed=3)
    order = np.random.default_rng(1).permutation(t.num_rows)
    shuffled = t.take(pa.array(order))
    for role in ("train", "val", "test"):
        assert (split.mask(t, role)[order] == split.mask(shuffled, role)).all()
    halves = [t.slice(0, 700), t.slice(700)]  # block boundaries do not matter either
    assert (np.concatenate([split.mask(h, "val") for h in halves]) == split.mask(t, "val")).all()
    other_seed = CellSplit(test_folds=(1,), val_fraction=0.2, train_fraction=0.7, seed=4)
    assert (other_seed.mask(t, "val") != split.mask(t, "val")).any()


def test_leave_one_dataset_out_and_fold_validation() -> None:
    t = table()
    split = CellSplit(test_batches=("d2",), val_folds=(3,))
    r = roles(split, t)
    batch = np.array(t.column("batch").to_pylist())
    fold = t.column("fold").to_numpy()
    assert (r["test"] == (batch == "d2")).all()
    assert (r["val"] == ((fold == 3) & (batch != "d2"))).all()
    assert split.columns == ("fold", "label", "batch")  # no cell_id needed: nothing hashed


def test_round_trip_and_bad_splits() -> None:
    split = CellSplit(test_folds=(0,), val_fraction=0.1, exclude_labels=("B",), seed=2)
    assert CellSplit.from_dict(split.to_dict()) == split
    assert "never trained on ['B']" in split.describe()
    for bad in (
        {"val_fraction": 1.0},
        {"train_fraction": 0.0},
        {"val_folds": (1,), "val_fraction": 0.1},
        {"val_folds": (0,), "test_folds": (0,)},
    ):
        with pytest.raises(ValueError, match="invalid cell split"):
            CellSplit(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="role"):
        split.mask(table(10), "holdout")


def test_split_on_real_shards_matches_the_loader(pbmc_shards: Path) -> None:
    split = CellSplit(test_folds=(0,), val_fraction=0.1)
    counts = split.counts(pbmc_shards)
    manifest = read_manifest(pbmc_shards)
    assert counts["test"] == manifest["folds"]["counts"]["0"]
    assert sum(counts.values()) == manifest["cells"]["kept"]
    for role, n in counts.items():
        loaded = iter_local_batches(pbmc_shards, 5, split=split, role=role, batch_size=50)
        assert sum(len(b["label"]) for b in loaded) == n
    with pytest.raises(ValueError, match="--batch-key"):
        CellSplit(test_batches=("x",)).counts(pbmc_shards)


def test_sweep_spec_file_and_checks(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        "search: grid\nnum_samples: 2\nspace:\n  model.n_bins: [3, 5]\n"
        "  train.lr: {loguniform: [1.0e-4, 1.0e-2]}\n  train.batch_size: {randint: [8, 33]}\n"
        "fixed:\n  train.max_steps: 10\n"
    )
    spec = SweepSpec.load(path)
    spec.check(Params(), pretrained=False)
    space = tune_space(spec)
    assert space["model.n_bins"] == {"grid_search": [3, 5]}  # lists become grids for grid search
    assert space["train.max_steps"] == 10
    assert type(space["train.lr"]).__name__ == "Float"
    with pytest.raises(ValueError, match="cannot be swept from a pretrained"):
        spec.check(Params(), pretrained=True)
    bad = SweepSpec(
        space={"model.depth": [2.5], "train.nope": [1], "train.lr": {"loguniform": [0, 1]}}
    )
    with pytest.raises(ValueError) as err:
        bad.check(Params(), pretrained=False)
    for text in ("model.depth", "train.nope", "loguniform"):
        assert text in str(err.value)
    with pytest.raises(ValueError, match="cannot take grid"):
        SweepSpec(search="optuna", space={"train.seed": {"grid": [0, 1]}}).check(
            Params(), pretrained=False
        )
    (tmp_path / "typo.yaml").write_text("spaces: {}\n")
    with pytest.raises(ValueError, match="unknown keys"):
        SweepSpec.load(tmp_path / "typo.yaml")


def test_default_space_is_the_papers_grid() -> None:
    learned = Params().replace({"model.gene_embedding": "learned"})
    assert default_spec(learned).space == PAPER_SPACE
    assert set(PAPER_SPACE) == {
        "model.n_bins",
        "model.depth",
        "model.heads",
        "model.dim",
        "train.lr",
    }
    assert "model.dim" not in default_spec(Params()).space  # a gene2vec file fixes the width


def test_cv_plans_of_each_protocol(pbmc_shards: Path, tmp_path: Path) -> None:
    params = tiny_params(tmp_path)
    folds = plan(pbmc_shards, params)
    assert [t["held_out"] for t in folds] == [f"fold {k}" for k in range(5)]
    assert all(CellSplit.from_dict(t["split"]).val_fraction == 0.1 for t in folds)
    sizes = plan(pbmc_shards, params, protocol="reference-size", fractions=(0.1, 0.5))
    assert len(sizes) == 10 and {t["group"] for t in sizes} == {"reference 10%", "reference 50%"}
    novel = plan(pbmc_shards, params, protocol="novel-type", novel_types=("CD34+",))
    assert {tuple(t["split"]["exclude_labels"]) for t in novel} == {("CD34+",)}
    each = plan(pbmc_shards, params, protocol="novel-type", novel_types=("each",))
    assert len(each) == 5 * 10
    with pytest.raises(ValueError, match="--batch-key"):
        plan(pbmc_shards, params, protocol="leave-one-dataset-out")
    with pytest.raises(ValueError, match="not among the cell types"):
        plan(pbmc_shards, params, protocol="novel-type", novel_types=("Neuron",))
    with pytest.raises(ValueError, match="needs --novel-type"):
        plan(pbmc_shards, params, protocol="novel-type")


def test_leave_one_dataset_out_plans_and_reports_one_trial_per_dataset(
    pbmc_h5ad: Path, tmp_path: Path
) -> None:
    """Real cells in two artificial 'datasets' (alternate cells), ingested with --batch-key: one
    trial per dataset, whose test cells are exactly that dataset's, and a CV table with a row
    per model and group over both held-out datasets. The trials run on Ray as the fold protocol's
    do (tests/test_cv.py); only the plan and the table differ."""
    import anndata

    from scbert_platform.data.ingest import ingest
    from scbert_platform.params import DataParams

    adata = anndata.read_h5ad(pbmc_h5ad)
    adata.obs["dataset"] = np.where(np.arange(adata.n_obs) % 2 == 0, "lab_a", "lab_b")
    adata.write_h5ad(tmp_path / "two.h5ad")
    shards = tmp_path / "two"
    data = DataParams(**PBMC_PARAMS, batch_key="dataset")
    ingest(tmp_path / "two.h5ad", shards, data, executor="local", log=lambda _: None)
    trials = plan(shards, tiny_params(tmp_path), protocol="leave-one-dataset-out")
    assert [t["held_out"] for t in trials] == ["lab_a", "lab_b"]
    assert {t["group"] for t in trials} == {"all"}
    batches = read_manifest(shards)["batches"]["counts"]
    for t in trials:
        split = CellSplit.from_dict(t["split"])
        counts = split.counts(shards)
        assert counts["test"] == batches[t["held_out"]]
        (other,) = set(batches) - {t["held_out"]}
        assert counts["train"] + counts["val"] == batches[other]

    # the table: two held-out datasets of one model, scored as _evaluate_trial hands them over
    labels = ["B", "NK", "T"]
    rng = np.random.default_rng(0)
    evaluated = []
    for k, t in enumerate(trials):
        y_true = rng.integers(0, 3, 40)
        proba = rng.dirichlet(np.ones(3), 40)
        proba[np.arange(20), y_true[:20]] += 2.0  # half the cells called right
        evaluated.append(
            {
                "variant": SCRATCH,
                "group": t["group"],
                "held_out": t["held_out"],
                "trial_id": f"t{k}",
                "run_id": f"run{k}",
                "model_uri": f"runs:/run{k}/model",
                "val_macro_f1": 0.5 + k / 10,
                "labels": labels,
                "excluded": [],
                "y_true": y_true,
                "proba": proba / proba.sum(axis=1, keepdims=True),
                "temperature": None,
                "threshold": 0.5,
            }
        )
    (group,) = _aggregate(evaluated[::-1], "leave-one-dataset-out")
    assert [f["held_out"] for f in group["folds"]] == ["lab_a", "lab_b"]
    assert [f["n"] for f in group["folds"]] == [40, 40]
    assert group["chosen"] == "runs:/run1/model"  # the better validation score, never the test's
    text = report_markdown([group], "leave-one-dataset-out", 0.5)
    assert text.startswith("| model | group | folds | accuracy | macro F1 |")
    assert f"| {SCRATCH} | all | 2 |" in text


def test_novel_type_scores_by_hand() -> None:
    labels = ["B", "NK", "T"]
    # cells: B (confident), NK (confident), T (novel, unsure), T (novel, wrongly confident B),
    # B (unsure: Unassigned although known)
    proba = np.array(
        [
            [0.9, 0.05, 0.05],
            [0.1, 0.85, 0.05],
            [0.3, 0.3, 0.4],  # over the known types: 0.5 / 0.5 -> max 0.5, not below threshold
            [0.8, 0.1, 0.1],
            [0.35, 0.3, 0.35],  # known types: 0.54 / 0.46
        ]
    )
    y_true = np.array([0, 1, 2, 2, 0])
    scores = novel_type_scores(y_true, proba, labels, ["T"], threshold=0.6)
    # Unassigned (max known prob < 0.6): cells 2 and 4. Novel: cells 2 and 3.
    assert scores["novel_accuracy"] == pytest.approx(1 / 3)  # both: {2}; either: {2, 3, 4}
    assert scores["novel_recall"] == pytest.approx(0.5)
    assert scores["known_accuracy"] == pytest.approx(2 / 3)  # cells 0, 1 right; 4 Unassigned
    assert scores["n_novel"] == 2


def test_search_algorithms() -> None:
    pytest.importorskip("optuna")
    assert type(_search_alg(SweepSpec(search="optuna"), 0)).__name__ == "OptunaSearch"
    assert _search_alg(SweepSpec(search="random"), 0) is None  # Tune's random / grid variants
    try:
        import hyperopt  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install hyperopt"):
            _search_alg(SweepSpec(search="hyperopt"), 0)
