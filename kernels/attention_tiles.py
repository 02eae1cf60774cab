"""Tile configurations of kernels/attention.py's three GPU kernels, and their shared-memory estimate.

Every entry was compiled ahead of time (`python -m kernels.aot`, report in benchmarks/results/aot/) for
the arch it is listed under and spills no register there; the per-kernel register and shared-memory
figures, and what was given up to get there, are in benchmarks/NOTES.md ("Ahead-of-time compile
check"). The tables are arch-specific because the two generations spill differently: Hopper's wgmma
keeps the dK/dV accumulators in a layout that costs more registers than Ampere's mma.
"""

from __future__ import annotations

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per arch major, kernel, head-dim pad bucket ("64" covers
# BLOCK_D 16..64) and dtype class ("lp": fp16/bf16 on tensor cores, the only GPU dtypes; fp32 runs the
# kernels only under the interpreter, on a GPU llm.ops sends it to the reference).
Tile = tuple[int, int, int, int]
_TILES: dict[int, dict[str, dict[str, dict[str, list[Tile]]]]] = {
    9: {
        "fwd": {"lp": {"64": [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)],
                       "128": [(128, 64, 8, 1), (128, 32, 8, 2), (64, 64, 8, 2)],
                       "256": [(64, 32, 8, 1), (32, 64, 8, 1), (32, 32, 4, 1)]}},
        "dkdv": {"lp": {"64": [(64, 64, 8, 2), (32, 128, 8, 1), (32, 64, 8, 1)],
                        "128": [(32, 32, 4, 2), (32, 32, 4, 1)],
                        "256": [(32, 32, 8, 1), (16, 32, 8, 1)]}},
        "dq": {"lp": {"64": [(128, 64, 8, 1), (128, 32, 8, 2), (64, 64, 8, 2)],
                      "128": [(128, 64, 8, 1), (128, 32, 8, 2), (64, 64, 8, 2)],
                      "256": [(128, 32, 8, 2), (64, 32, 8, 2)]}},
    },
    8: {
        "fwd": {"lp": {"64": [(128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
                       "128": [(128, 64, 8, 1), (64, 64, 8, 2)],
                       "256": [(64, 64, 8, 1), (32, 64, 8, 1), (32, 32, 4, 1)]}},
        "dkdv": {"lp": {"64": [(16, 64, 4, 1), (32, 32, 4, 2)],
                        "128": [(64, 64, 8, 1), (32, 64, 8, 1), (32, 32, 4, 1)],
                        "256": [(32, 32, 8, 1), (16, 32, 8, 1)]}},
        "dq": {"lp": {"64": [(128, 32, 8, 2), (64, 32, 4, 2)],
                      "128": [(64, 64, 8, 2), (64, 32, 4, 2)],
                      "256": [(32, 32, 4, 2)]}},
    },
}
# Entries that spill with the document mask on (DOC=True keeps each query's document start live through the
# loop): (arch major, kernel, head-dim bucket) -> tiles dropped for document-masked attention, from the AOT report.
_DOC_SPILLS: dict[tuple[int, str, str], set[Tile]] = {
    (9, "dq", "256"): {(64, 32, 8, 2)},
}


def _bucket(block_d: int) -> str:
    return "64" if block_d <= 64 else ("128" if block_d <= 128 else "256")


def tile_shapes(kind: str, block_d: int, major: int, doc: bool = False) -> list[Tile]:
    """Candidates for one kernel ("fwd", "dkdv", "dq"), head-dim pad and arch major (fp16/bf16); `doc`: for the
    document-masked kernels (the entries that spill there dropped).

    Archs other than sm_80 / sm_90 take the table of the nearest checked one (major >= 9: Hopper's);
    the launcher then drops entries whose estimated shared memory exceeds the device's limit.
    """
    arch = 9 if major >= 9 else 8
    drop = _DOC_SPILLS.get((arch, kind, _bucket(block_d)), set()) if doc else set()
    return [t for t in _TILES[arch][kind]["lp"][_bucket(block_d)] if t not in drop]


def smem_estimate(kind: str, tile: Tile, block_d: int, elem: int) -> int:
    """Upper bound of the shared memory (bytes) Triton allocates for a tile: each pipeline stage holds
    the two tiles the inner loop streams (K and V; Q and dO for dK/dV); the backward stages one set
    more (its streamed tiles also feed a transposed dot); the tiles a program keeps for its whole life (Q; Q and dO
    for dQ; K and V for dK/dV) are staged once. Checked against the measured shared memory of every
    compiled configuration by tests/test_aot.py."""
    m, n, _, stages = tile
    streamed = (m if kind == "dkdv" else n) * block_d * elem * 2
    resident = {"fwd": m * block_d * elem, "dq": 2 * m * block_d * elem, "dkdv": 2 * n * block_d * elem}[kind]
    return (max(stages, 1) + (kind != "fwd")) * streamed + resident


def fitting(kind: str, block_d: int, major: int, elem: int, smem_limit: int, doc: bool = False) -> list[Tile]:
    """tile_shapes pruned to the device's shared memory per block; the smallest entry is always kept."""
    shapes = tile_shapes(kind, block_d, major, doc)
    fit = [t for t in shapes if smem_estimate(kind, t, block_d, elem) <= smem_limit]
    return fit or [min(shapes, key=lambda t: smem_estimate(kind, t, block_d, elem))]
