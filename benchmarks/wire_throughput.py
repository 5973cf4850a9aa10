"""Wire throughput: tensors -> safetensors -> chunks -> reassembled, verified -> tensors.

Measures each stage and three end-to-end pipelines for a ~100 MB tensor set, beside a plain
``bytes`` copy of the same size timed in the same run, and prints a markdown table of MB/s and
the ratio to that copy. Run: ``python benchmarks/wire_throughput.py [--size-mb 100]``.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from crossfed.common.wire.chunk_stream import ChunkAssembler, ChunkFrame, split_payload
from crossfed.common.wire.tensor_codec import (
    decode_tensors,
    encode_tensor_chunks,
    encode_tensors,
    encode_tensors_with_digest,
)
from rich.progress import Progress


@dataclass(frozen=True)
class Row:
    """One measured stage or pipeline, with the bytes copy timed right beside it."""

    name: str
    what: str
    seconds: float
    baseline_seconds: float


def tensor_set(size_mb: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """A model-like mix: mostly float32 matrices, plus bfloat16, int8 and bool tensors."""
    gen = torch.Generator().manual_seed(seed)
    budget = int(size_mb * 1e6)
    tensors: dict[str, torch.Tensor] = {
        "emb.bf16": torch.randn(1024, 1024, generator=gen).to(torch.bfloat16),
        "quant.int8": torch.randint(-128, 128, (1000, 1000), generator=gen, dtype=torch.int8),
        "mask.bool": torch.rand(500_000, generator=gen) > 0.5,
    }
    used = sum(t.numel() * t.element_size() for t in tensors.values())
    layer = 0
    while used < budget:
        rows = min(1024, max(1, (budget - used) // (4 * 1024)))
        tensors[f"layer{layer}.weight"] = torch.randn(rows, 1024, generator=gen)
        used += rows * 1024 * 4
        layer += 1
    return tensors


def assemble(chunks: Iterable[ChunkFrame], limit: int) -> ChunkAssembler:
    assembler = ChunkAssembler(max_payload_bytes=limit)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler


def timed(
    fn: Callable[[], object],
    baseline: Callable[[], object],
    repeats: int,
    advance: Callable[[], None],
) -> tuple[float, float]:
    """Median wall times of ``fn`` and of ``baseline``, run alternately (after a warm-up each).

    Alternating keeps the ratio honest on a shared, noisy machine: both see the same load.
    """
    fn()
    baseline()
    ours, base = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        baseline()
        middle = time.perf_counter()
        fn()
        ours.append(time.perf_counter() - middle)
        base.append(middle - start)
        advance()
    return statistics.median(ours), statistics.median(base)


def run(size_mb: float, chunk_size: int, repeats: int, progress: bool) -> tuple[int, list[Row]]:
    tensors = tensor_set(size_mb)
    payload = encode_tensors(tensors)
    digest = hashlib.sha256(payload).digest()
    limit = len(payload)
    chunks = list(split_payload(payload, chunk_size, payload_sha256=digest))
    full = assemble(chunks, limit)

    # Correctness once, outside the clock: every pipeline must give back the same tensors.
    for decoded in (
        decode_tensors(full.result()),
        decode_tensors(assemble(encode_tensor_chunks(tensors, chunk_size), limit).result_view()),
        decode_tensors(full.result_view(writable=True), copy=False),
    ):
        assert decoded.keys() == tensors.keys()
        assert all(torch.equal(decoded[k], t) for k, t in tensors.items())
    del chunks

    def pipeline_simple() -> None:
        encoded = encode_tensors_with_digest(tensors)
        parts = split_payload(encoded.data, chunk_size, payload_sha256=encoded.sha256)
        decode_tensors(assemble(parts, limit).result())

    def pipeline_streamed() -> None:
        decode_tensors(assemble(encode_tensor_chunks(tensors, chunk_size), limit).result_view())

    def pipeline_zero_copy() -> None:
        assembler = assemble(encode_tensor_chunks(tensors, chunk_size), limit)
        decode_tensors(assembler.result_view(writable=True), copy=False)

    def copy() -> bytes:
        return bytes(memoryview(payload))

    scratch = bytearray(len(payload))

    def copy_into_existing() -> None:
        scratch[:] = payload

    cases: list[tuple[str, str, Callable[[], object]]] = [
        ("bytes copy (the baseline)", "`bytes(memoryview(payload))`: allocate + copy", copy),
        ("copy into existing buffer", "`scratch[:] = payload`: no page faults", copy_into_existing),
        (
            "sha256 of payload",
            "`hashlib.sha256`, one pass",
            lambda: hashlib.sha256(payload).digest(),
        ),
        ("encode", "`encode_tensors` (1 copy)", lambda: encode_tensors(tensors)),
        (
            "encode + digest",
            "`encode_tensors_with_digest`",
            lambda: encode_tensors_with_digest(tensors),
        ),
        (
            "split (streamed)",
            "`split_payload`, chunks consumed one by one",
            lambda: sum(
                len(c.data) for c in split_payload(payload, chunk_size, payload_sha256=digest)
            ),
        ),
        (
            "encode_tensor_chunks",
            "hash tensors + copy each chunk",
            lambda: sum(len(c.data) for c in encode_tensor_chunks(tensors, chunk_size)),
        ),
        (
            "reassemble + verify",
            "`ChunkAssembler.add` x N + `result_view`",
            lambda: assemble(
                split_payload(payload, chunk_size, payload_sha256=digest), limit
            ).result_view(),
        ),
        ("decode (copy)", "`decode_tensors`", lambda: decode_tensors(payload)),
        (
            "decode (zero-copy)",
            "`decode_tensors(copy=False)`",
            lambda: decode_tensors(full.result_view(writable=True), copy=False),
        ),
        (
            "**pipeline A: simple**",
            "encode+digest, split, reassemble, `result()` bytes, decode",
            pipeline_simple,
        ),
        (
            "**pipeline B: streamed**",
            "`encode_tensor_chunks`, reassemble, decode from `result_view()`",
            pipeline_streamed,
        ),
        (
            "**pipeline C: streamed, zero-copy**",
            "as B, `decode_tensors(copy=False)`",
            pipeline_zero_copy,
        ),
    ]
    rows: list[Row] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("measuring", total=len(cases) * repeats)
        for name, what, fn in cases:
            bar.update(task, description=name.strip("*"))
            ours, base = timed(fn, copy, repeats, lambda: bar.advance(task))
            rows.append(Row(name, what, ours, base))
    return len(payload), rows


def table(size: int, rows: list[Row]) -> str:
    lines = [
        "| stage | what | ms | MB/s | bytes copy beside it, ms | ratio to bytes copy |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        rate = size / row.seconds / 1e6
        lines.append(
            f"| {row.name} | {row.what} | {row.seconds * 1e3:.1f} | {rate:,.0f} | "
            f"{row.baseline_seconds * 1e3:.1f} | {row.baseline_seconds / row.seconds:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100.0, help="tensor set size (1e6 B)")
    parser.add_argument("--chunk-size", type=int, default=1024 * 1024, help="bytes per chunk")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per stage (median)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.size_mb <= 0 or args.chunk_size <= 0 or args.repeats <= 0:
        parser.error("--size-mb, --chunk-size and --repeats must be positive")
    size, rows = run(
        args.size_mb,
        args.chunk_size,
        args.repeats,
        progress=sys.stderr.isatty() and not args.no_progress,
    )
    print(
        f"wire throughput: {size / 1e6:.1f} MB payload, {args.chunk_size} B chunks, "
        f"median of {args.repeats}, torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print(table(size, rows))


if __name__ == "__main__":
    main()
