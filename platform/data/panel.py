"""Gene panels: the ordered gene list that fixes the model's input positions.

A panel comes from a text file of symbols (one per line), from a Gene2vec text file (the first
field of each line; the panel then matches the embedding's rows), or is built from the data (genes
expressed in at least ``min_cells`` cells, in the data's order). It is saved as ``panel.txt``;
its sha256 is that file's.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class PanelError(ValueError):
    """A panel file or gene list that cannot serve as a panel."""


@dataclass(frozen=True)
class Panel:
    genes: tuple[str, ...]
    name: str = "panel"
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.genes:
            raise PanelError(f"panel {self.name!r} is empty")
        counts = Counter(self.genes)
        duplicated = [g for g, c in counts.items() if c > 1]
        if duplicated:
            raise PanelError(
                f"panel {self.name!r} lists {len(duplicated)} genes more than once, "
                f"e.g. {duplicated[:5]}"
            )
        object.__setattr__(self, "index", {g: i for i, g in enumerate(self.genes)})

    def __len__(self) -> int:
        return len(self.genes)

    @property
    def text(self) -> str:
        return "".join(f"{gene}\n" for gene in self.genes)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.text)
        return path

    def positions(self, genes: Sequence[str]) -> np.ndarray:
        """Panel position of each of ``genes`` (int64), -1 where the gene is not in the panel."""
        return np.fromiter((self.index.get(g, -1) for g in genes), dtype=np.int64, count=len(genes))

    @classmethod
    def from_file(cls, path: str | Path, *, name: str | None = None) -> Panel:
        """Read a panel: one symbol per line, or a Gene2vec text file (symbol then floats)."""
        path = Path(path)
        if not path.is_file():
            raise PanelError(f"panel file {path} does not exist")
        lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
        if lines and len(lines[0]) == 2 and all(f.isdigit() for f in lines[0]):
            lines = lines[1:]  # word2vec header: "<n_words> <dim>"
        genes = tuple(fields[0] for fields in lines)
        return cls(genes=genes, name=name or path.stem)

    @classmethod
    def from_cell_counts(
        cls, genes: Sequence[str], cells_per_gene: np.ndarray, *, min_cells: int, name: str
    ) -> Panel:
        """The data's genes expressed in at least ``min_cells`` cells, in the data's order."""
        keep = np.asarray(cells_per_gene) >= min_cells
        chosen = tuple(g for g, k in zip(genes, keep, strict=True) if k)
        if not chosen:
            raise PanelError(
                f"no gene is expressed in at least {min_cells} cells (data.panel_min_cells): "
                "the data is empty or the threshold is too high"
            )
        return cls(genes=chosen, name=name)
