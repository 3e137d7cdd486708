"""scBERT at paper size: inference and pretraining-step speed, peak memory, FLOPs.

    python bench/model_speed.py                    # CPU, 2 threads (this machine's figures)
    python bench/model_speed.py --device cuda      # a CUDA GPU: bf16 autocast, optional --compile

Each phase runs in a fresh subprocess so that its peak memory is its own: on CPU the peak
resident set (VmHWM, reset before the measured work) minus the resident set before it; on CUDA
torch.cuda.max_memory_allocated. FLOPs are counted by torch.utils.flop_counter on one cell
(matrix products only; the exp and other elementwise work are not counted).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from scbert import mask_tokens
from scbert.runtime import keep_freed_memory
from scbert_platform.demo import build_paper_model, random_cells

# The published implementation on this 2-core machine, 2 threads (issue #2).
PUBLISHED = {
    "infer_cells_per_s": 0.088,
    "infer_peak_gib": 1.2,
    "train_cells_per_s": 0.026,
    "train_peak_gib_per_cell": 8.2,
}
# Dense peak TFLOP/s for model FLOP utilisation on GPUs (bf16 tensor cores, fp32 without TF32).
GPU_PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp32": 67.0}, "H200": {"bf16": 989.0, "fp32": 67.0}}
GIB = 2**30


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


def _timed(fn, device: torch.device, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up (allocator, compile, caches)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def flops_per_cell(device: torch.device) -> dict[str, float]:
    """Forward FLOPs of one cell (classifier); a training step is ~3x (forward + backward)."""
    model = build_paper_model(n_classes=10).to(device).eval()
    tokens = random_cells(1, model.config.n_genes).to(device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(tokens)
    forward = float(counter.get_total_flops())
    return {"forward_flops": forward, "train_flops": 3 * forward}


def phase_infer(args: argparse.Namespace, device: torch.device, bf16: bool) -> dict[str, float]:
    model = build_paper_model(n_classes=10).to(device).eval()
    if args.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    tokens = random_cells(args.batch, 16_906).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def run() -> torch.Tensor:
        with torch.inference_mode(), autocast:
            return model(tokens)

    with PeakMemory(device) as memory:
        seconds = _timed(run, device, args.repeats)
    result = {
        "cells_per_s": args.batch / seconds,
        "peak_gib": memory.peak / GIB,
        "peak_gib_per_cell": memory.peak / GIB / args.batch,
    }
    if bf16:  # deviation from fp32 on the same cells and weights
        low = run().float()
        with torch.inference_mode():
            full = model(tokens).float()
        result["max_abs_dev_logits"] = (low - full).abs().max().item()
        result["max_abs_dev_proba"] = (low.softmax(-1) - full.softmax(-1)).abs().max().item()
    return result


def phase_train(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    model = build_paper_model(n_classes=None).to(device).train()
    model.encoder.activation_checkpointing = not args.no_checkpointing
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    cells = random_cells(args.train_batch, 16_906)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        masked, labels = mask_tokens(cells, n_bins=5, generator=generator)
        with autocast:
            logits = model(masked.to(device))
        loss = F.cross_entropy(logits.float().transpose(1, 2), labels.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with PeakMemory(device) as memory:  # the warm-up step and Adam's state included
        seconds = _timed(step, device, args.repeats)
    return {
        "cells_per_s": args.train_batch / seconds,
        "peak_gib": memory.peak / GIB,
        "peak_gib_per_cell": memory.peak / GIB / args.train_batch,
    }


def run_phase(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        keep_freed_memory()
    if args.phase == "flops":
        return flops_per_cell(device)
    if args.phase in ("infer-fp32", "infer-bf16"):
        return phase_infer(args, device, bf16=args.phase == "infer-bf16")
    return phase_train(args, device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (published figure: 2)")
    parser.add_argument("--batch", type=int, default=2, help="cells per inference batch")
    parser.add_argument("--train-batch", type=int, default=1, help="cells per pretraining step")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats after one warm-up")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep all activations")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.phase:
        print(json.dumps(run_phase(args, device)))
        return

    figures: dict[str, dict[str, float]] = {}
    for phase in ("flops", "infer-fp32", "infer-bf16", "train"):
        cmd = [sys.executable, __file__, "--phase", phase, *sys.argv[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"phase {phase} failed:\n{done.stderr}")
        figures[phase] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {phase}: done", file=sys.stderr, flush=True)
    report(figures, args, device)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def report(
    figures: dict[str, dict[str, float]], args: argparse.Namespace, device: torch.device
) -> None:
    fwd, train_flops = figures["flops"]["forward_flops"], figures["flops"]["train_flops"]
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {args.threads} threads"
    )
    peak = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
    print(
        f"scBERT paper size (16,906 genes + 1, dim 200, depth 6, heads 10, dim_head 64, n_bins 5)"
        f" on {name}; torch {torch.__version__}"
    )
    print(
        f"FLOPs per cell: forward {fwd / 1e9:.1f} GFLOP, "
        f"training step ~{train_flops / 1e9:.1f} GFLOP (3x forward)"
    )
    rows = [
        ("inference fp32", figures["infer-fp32"], fwd, "fp32", PUBLISHED["infer_cells_per_s"]),
        (
            "inference bf16 autocast",
            figures["infer-bf16"],
            fwd,
            "bf16",
            PUBLISHED["infer_cells_per_s"],
        ),
        (
            "pretraining step",
            figures["train"],
            train_flops,
            "bf16" if device.type == "cuda" else "fp32",
            PUBLISHED["train_cells_per_s"],
        ),
    ]
    print(
        f"{'':26}{'cells/s':>10}{'vs published':>14}{'GFLOP/s':>10}{'peak GiB/cell':>15}{'MFU':>7}"
    )
    for label, fig, flops, dtype, published in rows:
        achieved = fig["cells_per_s"] * flops / 1e9
        mfu = f"{achieved / 1e3 / peak[dtype]:.1%}" if peak else "-"
        ratio = f"{fig['cells_per_s'] / published:.1f}x" if device.type == "cpu" else "-"
        print(
            f"{label:26}{fig['cells_per_s']:>10.3f}{ratio:>14}{achieved:>10.1f}"
            f"{fig['peak_gib_per_cell']:>15.2f}{mfu:>7}"
        )
    dev = figures["infer-bf16"]
    print(
        f"bf16 vs fp32: max |logit diff| {dev['max_abs_dev_logits']:.2e}, "
        f"max |probability diff| {dev['max_abs_dev_proba']:.2e}"
    )
    print(
        "published implementation (this machine, 2 threads): inference "
        f"{PUBLISHED['infer_cells_per_s']} cells/s, {PUBLISHED['infer_peak_gib']} GiB peak; "
        f"pretraining step {PUBLISHED['train_cells_per_s']} cells/s, "
        f"{PUBLISHED['train_peak_gib_per_cell']} GiB peak per cell"
    )


if __name__ == "__main__":
    main()
