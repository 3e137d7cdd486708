"""scBERT speed, peak memory and FLOP utilisation, beside the published lineage's Performer.

    python bench/model_speed.py --device cpu [--quick] [--json PATH]   # this machine: 2 threads
    python bench/model_speed.py --device cuda [--quick] [--json PATH]  # + torch.compile, GPU = CPU

The anchor is ``performer_pytorch.PerformerLM`` 1.1.4 from PyPI (``pip install -e '.[bench]'``),
configured as the published scBERT: no rotary embedding, a learned absolute position table where
scBERT had its gene2vec table (the same lookup and add), attn_out_bias, no local heads. It gets our
weights (``to_published_state_dict``) and must give our logits on one cell. Differences that
remain: its key stabiliser is per (cell, head), scBERT's the max over the batch tensor and ours
the max over the cell; its q/k/v are three matrix products, ours one.

Every measurement is a fresh subprocess, so its peak memory is its own: on CPU the peak resident
set (VmHWM, reset before the measured work) minus the resident set before it; on CUDA
torch.cuda.max_memory_allocated. Phases alternate ours, anchor, ours, anchor, ... for ``--rounds``
rounds; a phase times its fastest repeat after a warm-up, a row shows the fastest round (the least
disturbed on a shared machine) and a ratio is taken between the two fastest. Process settings are
the same for both (threads; on CPU ``keep_freed_memory``, which speeds the anchor up too).
The machine's peak is measured in the same run: square matrix products (torch.matmul, the
model's thread count) in fp32 and bf16, before and after the model phases (the best is used).
FLOPs per cell are counted by torch.utils.flop_counter on our model (matrix products only, the exp
and other elementwise work not counted) and used for both: the same model, the same model FLOPs.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from scbert import ScBert, ScBertConfig, mask_tokens
from scbert.checkpoint import to_published_state_dict
from scbert.model import CellTypeHead
from scbert.runtime import keep_freed_memory
from scbert_platform.demo import PAPER_N_GENES, random_cells

ANCHOR = "performer-pytorch==1.1.4"
# Dense peak TFLOP/s of the card's data sheet (bf16 tensor cores; fp32 without TF32).
GPU_PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp32": 67.0},
}
# Largest |logit| deviation accepted between devices on the same weights and cells.
CHECK_BOUNDS = {"fp32": 1e-3, "bf16": 5e-2}
GIB = 2**30
Figures = dict[str, Any]


def model_config(quick: bool, n_classes: int | None) -> ScBertConfig:
    """The paper's sizes, or tiny ones (--quick) that exercise the same code."""
    if quick:
        return ScBertConfig(n_genes=512, dim=32, depth=2, heads=2, dim_head=16, n_classes=n_classes)
    return ScBertConfig(n_genes=PAPER_N_GENES, n_classes=n_classes)


def build_ours(config: ScBertConfig) -> ScBert:
    """Our model, seeded, with a random stand-in for the gene2vec matrix."""
    gene2vec = torch.randn(config.n_genes, config.dim, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    return ScBert(config=config, gene2vec=gene2vec)


def build_anchor(config: ScBertConfig) -> nn.Module:
    """performer_pytorch.PerformerLM as scBERT configured it; with n_classes, scBERT's classifier
    (its Conv2d(1, 1, (1, dim)) head, here our equal CellTypeHead) replaces to_out."""
    from performer_pytorch import PerformerLM

    torch.manual_seed(0)
    model = PerformerLM(
        num_tokens=config.vocab_size,
        max_seq_len=config.seq_len,
        dim=config.dim,
        depth=config.depth,
        heads=config.heads,
        dim_head=config.dim_head,
        nb_features=config.nb_features,
        local_attn_heads=0,
        ff_mult=config.ff_mult,
        feature_redraw_interval=config.feature_redraw_interval,
        rotary_position_emb=False,  # scBERT: g2v_position_emb, no layer position embedding
        qkv_bias=config.qkv_bias,
        attn_out_bias=True,
    )
    if config.n_classes is not None:
        model.to_out = CellTypeHead(config=config)
    return model


def anchor_state_dict(ours: ScBert) -> dict[str, torch.Tensor]:
    """Our weights under PerformerLM 1.1.4's names (published layout, two renames)."""
    state = to_published_state_dict(ours)
    state["performer.proj_updater.calls_since_last_redraw"] = state.pop(
        "performer.calls_since_last_redraw"
    )
    for param in ("weight", "bias"):
        if (conv := state.pop(f"to_out.conv1.{param}", None)) is not None:
            state[f"to_out.per_gene.{param}"] = conv.reshape(1, -1) if param == "weight" else conv
    return state


def load_anchor(anchor: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict but for 1.1.4's proj_updater.instance: the same modules as performer.net."""
    result = anchor.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("performer.proj_updater.inst")]
    if missing or result.unexpected_keys:
        raise KeyError(f"anchor weights: missing {missing}, unexpected {result.unexpected_keys}")


def build(impl: str, config: ScBertConfig) -> nn.Module:
    return build_ours(config) if impl == "ours" else build_anchor(config)


# ------------------------------------------------------------------------------- measuring


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory of a block of work, above what was in use when it started."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # reset VmHWM to the current resident set
            self.start = _rss_bytes("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = _rss_bytes("VmHWM") - self.start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls after one warm-up call (allocator, compile,
    caches); the fastest is the least disturbed by other work on a shared machine."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _deviation(got: torch.Tensor, want: torch.Tensor, dtype: str) -> dict[str, Any]:
    dev = (got.float().cpu() - want.float().cpu()).abs().max().item()
    return {"max_abs_dev": dev, "bound": CHECK_BOUNDS[dtype], "pass": dev <= CHECK_BOUNDS[dtype]}


# ---------------------------------------------------------------------------------- phases


def phase_peak(args: argparse.Namespace, device: torch.device) -> Figures:
    """GFLOP/s of a square matrix product, fp32 and bf16, best of the repeats after a warm-up."""
    n = 2048 if args.quick else (8192 if device.type == "cuda" else 4096)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        seconds = _timed(partial(torch.matmul, a, b), device, 3)
        out[name] = 2 * n**3 / seconds / 1e9
    return {"gflops": out, "n": n}


def phase_flops(args: argparse.Namespace, device: torch.device) -> Figures:
    """Our forward FLOPs per cell (classifier); with the anchor, its count and its logits beside
    ours on the same weights and one cell (where the stabilisers agree up to the eps term)."""
    ours = build_ours(model_config(args.quick, n_classes=10)).to(device).eval()
    tokens = random_cells(1, ours.config.n_genes).to(device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        logits = ours(tokens)
    out: Figures = {"ours_forward": float(counter.get_total_flops())}
    if args.anchor:
        anchor = build_anchor(ours.config)
        load_anchor(anchor, anchor_state_dict(ours))
        anchor = anchor.to(device).eval()
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            anchor_logits = anchor(tokens)
        out["anchor_forward"] = float(counter.get_total_flops())
        out["anchor_vs_ours_fp32"] = _deviation(anchor_logits, logits, "fp32")
    return out


def phase_infer(args: argparse.Namespace, device: torch.device, mode: str) -> Figures:
    """Classifier inference in eval mode: mode fp32, bf16 (autocast), bf16w (weights and
    activations in bf16, no autocast) or compile (+ bf16 autocast)."""
    config = model_config(args.quick, n_classes=10)
    model = build(args.impl, config).to(device).eval()
    tokens = random_cells(args.batch, config.n_genes).to(device)
    reference = model
    if mode == "bf16w":
        reference = copy.deepcopy(model)
        model = model.to(torch.bfloat16)
    if mode == "compile":
        model = torch.compile(model)  # type: ignore[assignment]
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=mode in ("bf16", "compile"))

    def run() -> torch.Tensor:
        with torch.inference_mode(), autocast:
            return model(tokens)

    with PeakMemory(device) as memory:
        seconds = _timed(run, device, args.repeats)
    result: Figures = _rates(args.batch, seconds, memory.peak)
    if mode != "fp32":  # deviation from fp32 on the same cells and weights
        low = run().float()
        with torch.inference_mode():
            full = reference(tokens).float()
        result["vs_fp32"] = _deviation(low, full, "bf16")
        result["vs_fp32"]["max_abs_dev_proba"] = (
            (low.softmax(-1) - full.softmax(-1)).abs().max().item()
        )
    return result


def phase_train(args: argparse.Namespace, device: torch.device) -> Figures:
    """Pretraining step: mask, forward, loss, backward, Adam (bf16 autocast on CUDA). Ours with
    activation checkpointing per block; the anchor as published (everything kept)."""
    config = model_config(args.quick, n_classes=None)
    model = build(args.impl, config).to(device).train()
    if isinstance(model, ScBert):
        model.encoder.activation_checkpointing = not args.no_checkpointing
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    cells = random_cells(args.train_batch, config.n_genes)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        masked, labels = mask_tokens(cells, n_bins=config.n_bins, generator=generator)
        with autocast:
            logits = model(masked.to(device))
        loss = F.cross_entropy(logits.float().transpose(1, 2), labels.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with PeakMemory(device) as memory:  # the warm-up step and Adam's state included
        seconds = _timed(step, device, args.repeats)
    return _rates(args.train_batch, seconds, memory.peak)


def _rates(n_cells: int, seconds: float, peak: int) -> Figures:
    return {
        "cells_per_s": n_cells / seconds,
        "peak_gib": peak / GIB,
        "peak_gib_per_cell": peak / GIB / n_cells,
    }


def phase_check(args: argparse.Namespace, device: torch.device) -> Figures:
    """Our model on the GPU against the CPU, same weights and cells: fp32 (TF32 off), bf16
    autocast, and compiled bf16."""
    model = build_ours(model_config(args.quick, n_classes=10)).eval()
    tokens = random_cells(2, model.config.n_genes)
    with torch.inference_mode():
        want = model(tokens)
        model, tokens = model.to(device), tokens.to(device)
        out = {"gpu_fp32_vs_cpu_fp32": _deviation(model(tokens), want, "fp32")}
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out["gpu_bf16_vs_cpu_fp32"] = _deviation(model(tokens), want, "bf16")
    try:
        compiled = torch.compile(model)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            out["gpu_compiled_bf16_vs_cpu_fp32"] = _deviation(compiled(tokens), want, "bf16")
    except Exception as error:  # compile is optional: report, do not fail the benchmark
        out["gpu_compiled_bf16_vs_cpu_fp32"] = {"error": f"{type(error).__name__}: {error}"}
    return out


def run_phase(args: argparse.Namespace, device: torch.device) -> Figures:
    """One measurement, in this (fresh) process."""
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        keep_freed_memory()  # both implementations: the same process settings
    else:  # fp32 means fp32: the card's fp32 peak and the CPU comparison are without TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if args.phase == "peak":
        return phase_peak(args, device)
    if args.phase == "flops":
        return phase_flops(args, device)
    if args.phase == "check":
        return phase_check(args, device)
    if args.phase.startswith("infer-"):
        return phase_infer(args, device, args.phase.removeprefix("infer-"))
    return phase_train(args, device)


# ------------------------------------------------------------------------------ the driver


def rows(device: torch.device, compile_cpu: bool) -> list[tuple[str, str, str, bool]]:
    """(label, phase, dtype of the matching peak, also run for the anchor)."""
    train_dtype = "bf16" if device.type == "cuda" else "fp32"
    out = [
        ("inference fp32", "infer-fp32", "fp32", True),
        ("inference bf16 autocast", "infer-bf16", "bf16", True),
        ("inference bf16 weights", "infer-bf16w", "bf16", True),
        (f"pretraining step {train_dtype}", "train", train_dtype, True),
    ]
    if device.type == "cuda" or compile_cpu:
        out.insert(3, ("inference bf16 + compile", "infer-compile", "bf16", False))
    return out


def spawn(phase: str, impl: str, argv: list[str]) -> Figures:
    """Run one phase in a fresh interpreter; a failure comes back as {"error": ...}."""
    cmd = [sys.executable, __file__, *argv, "--phase", phase, "--impl", impl]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    print(f"  {phase} {impl}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
    result: Figures = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure(args: argparse.Namespace, device: torch.device, argv: list[str]) -> Figures:
    """Every subprocess of the run, in order; returns the raw figures."""
    impls = ["ours", "anchor"] if args.anchor else ["ours"]
    raw: Figures = {"peak": [spawn("peak", "ours", argv)], "flops": spawn("flops", "ours", argv)}
    for failed in ("peak", "flops"):
        if "error" in (raw[failed][0] if failed == "peak" else raw[failed]):
            sys.exit(f"phase {failed} failed: {raw[failed]}")
    raw["runs"] = {impl: {} for impl in impls}
    for _ in range(args.rounds):
        for _, phase, _, with_anchor in rows(device, args.compile):
            for impl in impls if with_anchor else ["ours"]:
                raw["runs"][impl].setdefault(phase, []).append(spawn(phase, impl, argv))
    if not args.quick:  # the machine again, after the model phases
        raw["peak"].append(spawn("peak", "ours", argv))
    if device.type == "cuda":
        raw["check"] = spawn("check", "ours", argv)
    return raw


def summarise(args: argparse.Namespace, device: torch.device, raw: Figures) -> Figures:
    """The JSON written by --json: peaks, per-row figures, ratios and checks."""
    peaks = [p["gflops"] for p in raw["peak"] if "gflops" in p]
    peak = {dtype: max(p[dtype] for p in peaks) for dtype in ("fp32", "bf16")}
    flops = raw["flops"]
    fwd = flops["ours_forward"]
    out: Figures = {
        "device": device_name(args, device),
        "torch": torch.__version__,
        "threads": args.threads if device.type == "cpu" else None,
        "quick": args.quick,
        "model": model_config(args.quick, None).to_dict(),
        "batch": args.batch,
        "train_batch": args.train_batch,
        "rounds": args.rounds,
        "peak_gflops": peak,
        "peak_runs": raw["peak"],
        "card_peak_gflops": card_peak(args, device),
        "flops_per_cell": {"forward": fwd, "train": 3 * fwd, "anchor_forward": None},
        "anchor": {"package": ANCHOR, "skipped": args.anchor_note},
        "rows": {},
        "ratios": {},
        "checks": {},
    }
    out["flops_per_cell"]["anchor_forward"] = flops.get("anchor_forward")
    if "anchor_vs_ours_fp32" in flops:
        out["checks"]["anchor_vs_ours_fp32"] = flops["anchor_vs_ours_fp32"]
    for label, phase, dtype, _ in rows(device, args.compile):
        row_flops = 3 * fwd if phase == "train" else fwd
        for impl, runs in raw["runs"].items():
            if phase in runs:
                figures = best(runs[phase], row_flops, peak[dtype], out["card_peak_gflops"])
                out["rows"].setdefault(phase, {"label": label, "dtype": dtype})[impl] = figures
        out["ratios"][phase] = ratio(out["rows"][phase])
        if "vs_fp32" in out["rows"][phase]["ours"]:
            out["checks"][f"{phase}_vs_fp32"] = out["rows"][phase]["ours"]["vs_fp32"]
    if "check" in raw:
        out["checks"].update(raw["check"])
    train = out["ratios"].get("train", {})
    if "peak_gib_per_cell" in train:
        train["memory_target"] = "ours <= 1/5 of the anchor's per cell"
        train["memory_target_met"] = train["peak_gib_per_cell"] <= 0.2
    return out


def best(runs: list[Figures], flops: float, peak: float, card: dict[str, float] | None) -> Figures:
    """The fastest round of a row, with its GFLOP/s and their fraction of the matching peak."""
    good = [run for run in runs if "error" not in run]
    if not good:
        return {"error": runs[-1]["error"]}
    fastest = max(good, key=lambda run: run["cells_per_s"])
    gflops = fastest["cells_per_s"] * flops / 1e9
    figures = {
        **fastest,
        "peak_gib_per_cell": max(run["peak_gib_per_cell"] for run in good),
        "gflops": gflops,
        "fraction_of_peak": gflops / peak,
        "rounds_cells_per_s": [run["cells_per_s"] for run in good],
    }
    if card is not None:
        figures["mfu_card_bf16"] = gflops / card["bf16"]
    return figures


def ratio(row: Figures) -> Figures:
    """ours / anchor, in cells/s and in peak memory per cell (empty when either is missing)."""
    ours, anchor = row.get("ours", {}), row.get("anchor", {})
    if "cells_per_s" not in ours or "cells_per_s" not in anchor:
        return {}
    return {
        "cells_per_s": ours["cells_per_s"] / anchor["cells_per_s"],
        "peak_gib_per_cell": ours["peak_gib_per_cell"] / anchor["peak_gib_per_cell"],
    }


def device_name(args: argparse.Namespace, device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if "Model name" in ln)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return f"{model}, {args.threads} threads"


def card_peak(args: argparse.Namespace, device: torch.device) -> dict[str, float] | None:
    """The card's data-sheet dense peak in GFLOP/s (None on CPU or an unknown card)."""
    if device.type != "cuda":
        return None
    name = device_name(args, device)
    peak = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
    return None if peak is None else {k: v * 1e3 for k, v in peak.items()}


def report(out: Figures) -> None:
    """The table printed at the end of a run."""
    size = out["model"]
    print(
        f"scBERT {'--quick' if out['quick'] else 'paper'} size ({size['n_genes']:,} genes + 1, "
        f"dim {size['dim']}, depth {size['depth']}, heads {size['heads']}, dim_head "
        f"{size['dim_head']}, nb_features {size['nb_features']}) on {out['device']}; "
        f"torch {out['torch']}; anchor {ANCHOR}"
        + (f" (skipped: {out['anchor']['skipped']})" if out["anchor"]["skipped"] else "")
    )
    peak, fpc = out["peak_gflops"], out["flops_per_cell"]
    print(f"measured peak (torch.matmul): fp32 {peak['fp32']:.1f}, bf16 {peak['bf16']:.1f} GFLOP/s")
    if out["card_peak_gflops"]:
        card = out["card_peak_gflops"]
        print(f"card data sheet (dense): fp32 {card['fp32']:.0f}, bf16 {card['bf16']:.0f} GFLOP/s")
    anchor_count = "-" if fpc["anchor_forward"] is None else f"{fpc['anchor_forward'] / 1e9:.2f}"
    print(
        f"FLOPs per cell: forward {fpc['forward'] / 1e9:.2f} GFLOP (ours; anchor's count "
        f"{anchor_count}), training step ~{fpc['train'] / 1e9:.2f}"
    )
    head = ("cells/s", "anchor", "ratio", "GFLOP/s", "of peak", "anchor", "GiB/cell", "anchor")
    print(f"{'':27}" + "".join(f"{h:>10}" for h in head))
    for phase, row in out["rows"].items():
        ours, anchor = row["ours"], row.get("anchor", {})
        cells = [
            _fmt(ours, "cells_per_s", "{:.3f}"),
            _fmt(anchor, "cells_per_s", "{:.3f}"),
            _fmt(out["ratios"][phase], "cells_per_s", "{:.2f}x"),
            _fmt(ours, "gflops", "{:.1f}"),
            _fmt(ours, "fraction_of_peak", "{:.0%}"),
            _fmt(anchor, "fraction_of_peak", "{:.0%}"),
            _fmt(ours, "peak_gib_per_cell", "{:.3f}"),
            _fmt(anchor, "peak_gib_per_cell", "{:.3f}"),
        ]
        print(f"{row['label']:27}" + "".join(f"{c:>10}" for c in cells))
    for name, check in out["checks"].items():
        verdict = "error" if "error" in check else ("pass" if check["pass"] else "FAIL")
        print(f"check {name}: {verdict} {check.get('max_abs_dev', check.get('error'))}")
    train = out["ratios"].get("train", {})
    if "peak_gib_per_cell" in train:
        met = "met" if train["memory_target_met"] else "NOT met"
        print(
            f"training memory per cell, ours/anchor: {train['peak_gib_per_cell']:.2f} "
            f"(target <= 0.20: {met})"
        )


def _fmt(figures: Figures, key: str, spec: str) -> str:
    if "error" in figures:
        return "error"
    return spec.format(figures[key]) if key in figures else "-"


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--batch", type=int, help="cells per inference batch (CPU 2, CUDA 16)")
    parser.add_argument(
        "--train-batch", type=int, help="cells per pretraining step (CPU 1, CUDA 4)"
    )
    parser.add_argument("--repeats", type=int, help="timed repeats after one warm-up (CPU 2)")
    parser.add_argument("--rounds", type=int, help="ours/anchor alternations per row (2; quick 1)")
    parser.add_argument("--compile", action="store_true", help="also a torch.compile row on CPU")
    parser.add_argument("--no-anchor", action="store_true", help="ours only")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep all activations")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    args = parser.parse_args()
    argv = sys.argv[1:]  # passed on to the phases
    cuda, quick = args.device.startswith("cuda"), args.quick
    args.batch = args.batch or (16 if cuda else 8 if quick else 2)
    args.train_batch = args.train_batch or (4 if cuda or quick else 1)
    args.repeats = args.repeats or (10 if cuda or quick else 2)
    args.rounds = args.rounds or (1 if quick else 2)
    args.anchor_note = None
    if args.no_anchor:
        args.anchor_note = "--no-anchor"
    elif importlib.util.find_spec("performer_pytorch") is None:
        args.anchor_note = f"performer_pytorch not importable (pip install '{ANCHOR}')"
    args.anchor = args.anchor_note is None
    return args, argv


def main() -> None:
    args, argv = parse_args()
    device = torch.device(args.device)
    if args.phase:
        print(json.dumps(run_phase(args, device)))
        return
    if args.anchor_note:
        print(f"note: the anchor is skipped: {args.anchor_note}", file=sys.stderr)
    out = summarise(args, device, measure(args, device, argv))
    report(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
