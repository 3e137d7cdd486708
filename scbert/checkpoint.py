"""Checkpoints: our directory format, and the published scBERT layout (load and export).

Ours is a directory: ``config.json`` (ScBertConfig), ``model.safetensors`` (state dict, gene2vec
and random projections included), ``panel.txt`` (gene symbols in model order) and
``labels.json`` (the class names, fine-tuned models only: ``ModelBundle.classes``; the file keeps
its older name, which every checkpoint written so far uses). It rebuilds the model alone.

The published scripts save ``{'model_state_dict': PerformerLM.state_dict()}``; ``PUBLISHED_NAMES``
maps its keys to ours (docs/published_compat.md). Its to_q/to_k/to_v are fused into our to_qkv
and its Conv2d(1, 1, (1, dim)) weight is our per_gene Linear weight reshaped.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scbert.atomic import atomic_directory
from scbert.config import ScBertConfig
from scbert.model import ScBert

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
# the class names of a fine-tuned model (``ModelBundle.classes``). An on-disk name: checkpoints
# already written, and the model artifacts logged to MLflow and registered, hold labels.json, so
# the file keeps it
CLASSES_FILE = "labels.json"
# how every damaged-checkpoint message ends: where a good copy comes from
REWRITE_HINT = (
    "write it again (scbert pretrain/finetune --out DIR, or save_pretrained), or fetch it again "
    "from where it came (its MLflow run's artifacts, dvc checkout)"
)


class CheckpointError(ValueError):
    """A checkpoint directory whose files are damaged (truncated, changed, not what
    config.json describes); the message names the file and how to get a good copy."""


# (published key, our key); {name} fields match what _FIELDS allows and carry over.
PUBLISHED_NAMES: list[tuple[str, str]] = [
    ("token_emb.weight", "token_emb.weight"),
    ("pos_emb.emb.weight", "gene_emb.weight"),
    ("performer.calls_since_last_redraw", "encoder.calls_since_redraw"),
    ("performer.net.layers.{i}.0.norm.{p}", "encoder.blocks.{i}.attn_norm.{p}"),
    (
        "performer.net.layers.{i}.0.fn.fast_attention.projection_matrix",
        "encoder.blocks.{i}.attn.projection",
    ),
    ("performer.net.layers.{i}.0.fn.to_out.{p}", "encoder.blocks.{i}.attn.to_out.{p}"),
    ("performer.net.layers.{i}.1.norm.{p}", "encoder.blocks.{i}.ff_norm.{p}"),
    ("performer.net.layers.{i}.1.fn.fn.{w}.{p}", "encoder.blocks.{i}.ff.{w}.{p}"),
    ("norm.{p}", "norm.{p}"),
    ("to_out.weight", "head.proj.weight"),
    ("to_out.bias", "head.proj.bias"),
    ("to_out.conv1.{p}", "head.per_gene.{p}"),
    ("to_out.{fc}.{p}", "head.{fc}.{p}"),
]
_FIELDS = {"i": r"\d+", "p": "weight|bias", "w": "w1|w2", "fc": "fc1|fc2|fc3"}
_QKV = re.compile(r"performer\.net\.layers\.(\d+)\.0\.fn\.to_([qkv])\.(weight|bias)$")


def _pattern(template: str) -> re.Pattern[str]:
    escaped = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
    fields = re.sub(r"\{(\w+)\}", lambda m: f"(?P<{m[1]}>{_FIELDS[m[1]]})", escaped)
    return re.compile(fields + "$")


def _rename(key: str, to_ours: bool) -> str | None:
    for published, ours in PUBLISHED_NAMES:
        source, target = (published, ours) if to_ours else (ours, published)
        match = _pattern(source).match(key)
        if match:
            return target.format(**match.groupdict())
    return None


def infer_published_config(
    state_dict: Mapping[str, torch.Tensor], *, n_genes: int | None = None
) -> ScBertConfig:
    """ScBertConfig of a published state dict, from tensor shapes alone."""
    layer = "performer.net.layers.{}.0.fn."
    depth = len({m.group(1) for k in state_dict if (m := _QKV.match(k)) and m.group(2) == "q"})
    if depth == 0 or "token_emb.weight" not in state_dict:
        raise ValueError("not a published scBERT state dict (no token_emb / performer layers)")
    inner, dim = state_dict[layer.format(0) + "to_q.weight"].shape
    nb_features, dim_head = state_dict[layer.format(0) + "fast_attention.projection_matrix"].shape
    hidden = state_dict["performer.net.layers.0.1.fn.fn.w1.weight"].shape[0]
    kwargs: dict[str, object] = {}
    inferred: int | None = None
    if "pos_emb.emb.weight" in state_dict:
        inferred = state_dict["pos_emb.emb.weight"].shape[0] - 1
    else:
        kwargs["gene_embedding"] = "none"
    if "to_out.fc1.weight" in state_dict:
        h1, seq_len = state_dict["to_out.fc1.weight"].shape
        inferred = seq_len - 1
        kwargs["n_classes"] = state_dict["to_out.fc3.weight"].shape[0]
        kwargs["cls_hidden"] = (h1, state_dict["to_out.fc2.weight"].shape[0])
    if inferred is not None and n_genes is not None and n_genes != inferred:
        raise ValueError(f"n_genes={n_genes} given, but the state dict has {inferred} genes")
    n_genes = inferred if inferred is not None else n_genes
    if n_genes is None:
        raise ValueError(
            "the state dict does not say n_genes (no gene2vec, no classifier): pass it"
        )
    return ScBertConfig(
        n_genes=int(n_genes),
        n_bins=state_dict["token_emb.weight"].shape[0] - 2,
        dim=int(dim),
        depth=depth,
        heads=int(inner) // int(dim_head),
        dim_head=int(dim_head),
        nb_features=int(nb_features),
        ff_mult=int(hidden) // int(dim),
        qkv_bias=layer.format(0) + "to_q.bias" in state_dict,
        **kwargs,  # type: ignore[arg-type]
    )


def from_published_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v of) a published state dict into ours; unknown keys are an error."""
    ours: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        if match := _QKV.match(key):
            qkv.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = value
        elif (name := _rename(key, to_ours=True)) is not None:
            ours[name] = value.float() if value.is_floating_point() else value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected keys in published state dict: {unknown}")
    for (i, param), parts in qkv.items():
        ours[f"encoder.blocks.{i}.attn.to_qkv.{param}"] = torch.cat([parts[c] for c in "qkv"])
    if "head.per_gene.weight" in ours:
        ours["head.per_gene.weight"] = ours["head.per_gene.weight"].reshape(1, -1)
    return ours


def to_published_state_dict(model: ScBert) -> dict[str, torch.Tensor]:
    """Our model's state dict in the published PerformerLM layout (for the published scripts)."""
    published: dict[str, torch.Tensor] = {}
    for our_key, value in model.state_dict().items():
        key = our_key.replace("gene_emb.learned.weight", "gene_emb.weight")
        if match := re.match(r"encoder\.blocks\.(\d+)\.attn\.to_qkv\.(weight|bias)$", key):
            layer, param = match.groups()
            for letter, part in zip("qkv", value.chunk(3), strict=True):
                published[f"performer.net.layers.{layer}.0.fn.to_{letter}.{param}"] = part
            continue
        name = _rename(key, to_ours=False)
        if name is None:
            raise ValueError(f"no published name for {key}")
        published[name] = value.reshape(1, 1, 1, -1) if name == "to_out.conv1.weight" else value
    if model.config.gene_embedding == "none":
        published.pop("pos_emb.emb.weight", None)
    return {k: v.detach().clone() for k, v in published.items()}


def load_published(
    source: str | Path | Mapping[str, torch.Tensor], *, n_genes: int | None = None
) -> ScBert:
    """Build our model from a checkpoint saved by the published scripts (weights only, no pickle).

    The config (depth, heads, dim_head, n_bins, n_genes, n_classes, ...) is inferred from the
    state dict; ``n_genes`` is needed only for a pretrained checkpoint without gene2vec.
    """
    if isinstance(source, Mapping):
        loaded: Mapping[str, Any] = source
    else:
        loaded = torch.load(Path(source), map_location="cpu", weights_only=True)
    state: Mapping[str, torch.Tensor] = loaded.get("model_state_dict", loaded)
    config = infer_published_config(state, n_genes=n_genes)
    ours = from_published_state_dict(state)
    table = ours.get("gene_emb.weight") if config.gene_embedding == "gene2vec" else None
    model = ScBert(config=config, gene2vec=table)
    model.load_state_dict(ours, strict=True)
    return model


def export_published(model: ScBert, path: str | Path) -> None:
    """Save as the published scripts do: ``torch.save({'model_state_dict': ...})``."""
    torch.save({"model_state_dict": to_published_state_dict(model)}, Path(path))


@dataclass
class ModelBundle:
    """A model with what serving needs beside it: the gene panel and the class names."""

    model: ScBert
    panel: list[str]
    classes: list[str] | None = None  # a fine-tuned model's class names (None: pretraining)


def save_pretrained(
    model: ScBert,
    directory: str | Path,
    *,
    panel: Sequence[str],
    classes: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write our checkpoint directory atomically (a crash leaves any previous one intact).
    ``directory`` may be absent, empty or an earlier checkpoint; anything else is refused
    unless ``overwrite`` (``scbert.atomic.check_output``)."""
    from safetensors.torch import save_file

    config = model.config
    if len(panel) != config.n_genes:
        raise ValueError(f"panel has {len(panel)} genes, model has n_genes={config.n_genes}")
    if len(set(panel)) != len(panel):
        raise ValueError("panel has duplicated gene symbols")
    if config.n_classes is not None and (classes is None or len(classes) != config.n_classes):
        raise ValueError(f"a fine-tuned model needs {config.n_classes} classes, got {classes!r}")
    if config.n_classes is None and classes is not None:
        raise ValueError("classes given for a pretraining model (config.n_classes is None)")
    directory = Path(directory)
    with atomic_directory(directory, kind="checkpoint", overwrite=overwrite) as staging:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS))
        meta = {
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            # safetensors has no checksum: bytes changed inside a tensor load silently
            "weights_sha256": _sha256(staging / WEIGHTS),
        }
        (staging / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        (staging / "panel.txt").write_text("".join(f"{gene}\n" for gene in panel))
        if classes is not None:
            (staging / CLASSES_FILE).write_text(json.dumps(list(classes), indent=2) + "\n")
    return directory


def load_pretrained(directory: str | Path, *, device: str | torch.device = "cpu") -> ModelBundle:
    """Rebuild model, panel and class names from a directory written by ``save_pretrained``.

    A missing file is a ``FileNotFoundError``, a damaged one a ``CheckpointError``: both name the
    file and say how to get a good copy (not a safetensors or torch error from deep inside).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    missing = [n for n in ("config.json", WEIGHTS, "panel.txt") if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{', '.join(str(directory / n) for n in missing)} missing: {directory} is not a "
            f"complete scBERT checkpoint (config.json, {WEIGHTS}, panel.txt); {REWRITE_HINT}"
        )
    meta = _read_meta(directory / "config.json")
    config = ScBertConfig.from_dict(meta["config"])
    state = _read_weights(directory / WEIGHTS, meta.get("weights_sha256"))
    table = state.get("gene_emb.weight") if config.gene_embedding == "gene2vec" else None
    model = ScBert(config=config, gene2vec=table).to(device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{directory / WEIGHTS} does not hold the model config.json describes ({err}); "
            f"{REWRITE_HINT}"
        ) from None
    panel = (directory / "panel.txt").read_text().splitlines()
    classes = _read_classes(directory / CLASSES_FILE, config.n_classes)
    return ModelBundle(model=model, panel=panel, classes=classes)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); {REWRITE_HINT}") from None
    if not isinstance(meta, dict) or "config" not in meta:
        raise CheckpointError(f"{path} is not an scBERT checkpoint config; {REWRITE_HINT}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format {meta.get('format_version')}")
    return meta


def _read_weights(path: Path, sha256: str | None) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, checked against the digest config.json records (checkpoints
    written before the digest existed are only checked for a readable layout)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(
            f"{path} is truncated or corrupted (its sha256 is not the one config.json records); "
            f"{REWRITE_HINT}"
        )
    try:
        return load(data)
    except SafetensorError as err:
        raise CheckpointError(f"{path} is truncated or corrupted ({err}); {REWRITE_HINT}") from None


def _read_classes(path: Path, n_classes: int | None) -> list[str] | None:
    if n_classes is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.parent}: fine-tuned ({n_classes} classes) but no {path.name}"
        )
    classes = json.loads(path.read_text())
    if not isinstance(classes, list) or len(classes) != n_classes:
        raise ValueError(f"{path}: expected a list of {n_classes} class names, got {classes!r}")
    return classes
