"""Where a trained model comes from: the MLflow registry or a directory, resolved and loaded the
same way by ``scbert annotate`` / ``embed`` / ``explain`` (offline) and by ``scbert serve``.

References: ``models:/NAME@ALIAS`` (resolved to the version the alias points at now),
``models:/NAME/VERSION``, an scBERT checkpoint directory (``config.json``) or an MLflow pyfunc
model directory (``MLmodel``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scbert_platform.data.panel import Panel
from scbert_platform.data.preprocess import Preprocessing, model_preprocessing


@dataclass(frozen=True)
class ModelSource:
    """What to load: ``uri`` (``models:/NAME/VERSION`` or a directory) and its names."""

    uri: str
    name: str
    version: str | None = None
    alias: str | None = None
    tracking_uri: str | None = None

    def describe(self) -> dict[str, str | None]:
        """Name, version, alias and URI, as recorded next to what the model produced."""
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "uri": self.uri,
        }


def resolve_model(ref: str) -> ModelSource:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (the registry), or a directory: a
    checkpoint (``config.json``) or an MLflow pyfunc model (``MLmodel``)."""
    if ref.startswith("models:/"):
        from mlflow.exceptions import MlflowException

        from scbert_platform.track.runs import registry_client, tracking_uri

        path = ref.removeprefix("models:/")
        name, at, alias = path.partition("@")
        client = registry_client()
        if at:
            try:
                version = str(client.get_model_version_by_alias(name, alias).version)
            except MlflowException as err:  # (a locked database is TrackingLocked: raised)
                raise ValueError(
                    f"{ref}: no version of {name!r} has the alias {alias!r} in "
                    f"{tracking_uri()} ({err}); scbert register and scbert promote one first"
                ) from None
            return ModelSource(f"models:/{name}/{version}", name, version, alias, tracking_uri())
        name, slash, version = path.partition("/")
        if not slash or not version.isdigit():
            raise ValueError(f"{ref}: name a version (models:/NAME/3) or an alias (NAME@champion)")
        client.get_model_version(name, version)  # fails clearly if it does not exist
        return ModelSource(ref, name, version, None, tracking_uri())
    path = Path(ref).expanduser().resolve()
    if not ((path / "config.json").is_file() or (path / "MLmodel").is_file()):
        raise ValueError(
            f"{ref}: neither a registry URI (models:/NAME@ALIAS) nor a model directory "
            "(an scBERT checkpoint with config.json, or an MLflow model with MLmodel)"
        )
    return ModelSource(str(path), path.name)


@dataclass
class LoadedModel:
    """A model ready to use: where it came from, the network (eval mode, on ``device``), its
    panel, class names (None for a pretraining checkpoint) and preprocessing record.
    ``preprocessing_source``: ``model`` (its ``preprocessing.json``) or ``published defaults``
    (a checkpoint without one)."""

    source: ModelSource
    model: Any
    panel: Panel
    classes: list[str] | None
    preprocessing: Preprocessing
    preprocessing_source: str
    device: Any = "cpu"

    @property
    def config(self) -> Any:
        """The network's ``ScBertConfig``."""
        return self.model.config

    @classmethod
    def load(cls, model: Any, *, device: str = "auto", fine_tuned: bool = True) -> LoadedModel:
        """``model``: a reference (``models:/NAME@ALIAS``, ``models:/NAME/3``, a directory), a
        ``ModelSource``, or a ``LoadedModel`` (returned as is). ``device``: ``auto`` = CUDA when
        present."""
        import torch

        if isinstance(model, LoadedModel):
            return model
        source = model if isinstance(model, ModelSource) else resolve_model(str(model))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return load_model(source, fine_tuned=fine_tuned, device=device)


def load_model(source: ModelSource, *, fine_tuned: bool = True, device: str = "cpu") -> LoadedModel:
    """The model of a source, in eval mode on ``device``, with its panel, class names and
    preprocessing record. With ``fine_tuned=False`` a pretraining checkpoint is accepted too
    (its class names are None): embeddings need no head."""
    import torch

    from scbert import load_pretrained

    if (Path(source.uri) / "config.json").is_file():
        bundle = load_pretrained(source.uri)
        if fine_tuned and bundle.classes is None:
            raise ValueError(
                f"{source.uri} is a pretraining checkpoint (no labels.json): cell types need a "
                "fine-tuned one (scbert finetune --out DIR)"
            )
        panel = Panel(tuple(bundle.panel))
        record, where = model_preprocessing(
            source.uri, n_bins=bundle.model.config.n_bins, panel_sha256=panel.sha256
        )
        net, classes = bundle.model, bundle.classes
    else:
        import mlflow

        if source.tracking_uri:
            mlflow.set_tracking_uri(source.tracking_uri)
            mlflow.set_registry_uri(source.tracking_uri)
        annotator = mlflow.pyfunc.load_model(source.uri).unwrap_python_model()
        net, panel = annotator.model, Panel(tuple(annotator.panel))
        classes = list(annotator.classes)
        record, where = annotator.preprocessing, annotator.preprocessing_source
    on = torch.device(device)
    return LoadedModel(source, net.eval().to(on), panel, classes, record, where, on)
