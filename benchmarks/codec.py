"""Codec throughput: reference vs C++ (vs CUDA) vs a plain clone, side by side.

    python benchmarks/codec.py                      # 1M, 8M, 64M elements; fp32, bf16
    python benchmarks/codec.py --sizes 1 4 --formats 0.5 2 --families rotated

Each row times encode+decode of one tensor and reports GB/s of input processed, the
C++ speed-up over the reference and the fraction of clone bandwidth (clone = read + write
of the same tensor). Both format families (seed: q2/q4/q8 and aq; rotated: h1/h2/h4/h8)
side by side. Targets on the 2-core CI machine: cpp >= 5x reference, >= 0.25x clone.
Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _util import best_of, print_json, print_table  # noqa: E402

from alam_dist import codec  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def round_trip(x: torch.Tensor, bits: float, backend: str, family: str):
    return lambda: codec.decode(codec.encode(x, bits, seed=1, backend=backend, formats=family),
                                backend=backend)


FAMILY_BITS = {"seed": (0.5, 2, 4, 8), "rotated": (1, 2, 4, 8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 64], help="millions of elements (2**20)")
    ap.add_argument("--formats", type=float, nargs="+", default=None,
                    help="bits to time (default: each family's own: seed 0.5 2 4 8, rotated 1 2 4 8)")
    ap.add_argument("--families", nargs="+", default=["seed", "rotated"], choices=list(FAMILY_BITS))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="skip the (slow) torch reference: C++/CUDA against clone only")
    args = ap.parse_args()
    available = codec.available_backends()
    rows = []
    for size in args.sizes:
        n = size << 20
        for dname in args.dtypes:
            x = torch.randn(n).to(DTYPES[dname])
            gb = x.numel() * x.element_size() / 1e9
            t_clone = best_of(lambda: x.clone(), args.repeats)
            cases = [(fam, 0.5 if b == 0.5 else int(b)) for fam in args.families
                     for b in (args.formats or FAMILY_BITS[fam])
                     if b in codec.allowed_bits(fam) and b < 16]
            for family, bits in cases:
                row = {"elements": n, "dtype": dname, "family": family, "bits": bits,
                       "clone_GBps": gb / t_clone}
                # The reference is slow (int64 temporaries): fewer repeats on big inputs.
                t_ref = None
                if args.reference:
                    t_ref = best_of(round_trip(x, bits, "reference", family), 1 if size > 8 else 2)
                    row["reference_GBps"] = gb / t_ref
                if available["cpp"]:
                    t_cpp = best_of(round_trip(x, bits, "cpp", family), args.repeats)
                    row["cpp_GBps"] = gb / t_cpp
                    if t_ref is not None:
                        row["cpp_vs_reference"] = t_ref / t_cpp
                    row["cpp_vs_clone"] = t_clone / t_cpp
                if available["cuda"]:
                    xc = x.cuda()
                    t_gpu_clone = best_of(lambda: xc.clone(), args.repeats, sync=True)
                    t_cuda = best_of(round_trip(xc, bits, "cuda", family), args.repeats, sync=True)
                    row["cuda_GBps"] = gb / t_cuda
                    row["cuda_vs_clone"] = t_gpu_clone / t_cuda
                row["bits_per_element"] = codec.encode(x, bits, formats=family).bits_per_element
                rows.append(row)
                print(f"  done {n} {dname} {family} bits={bits}", file=sys.stderr, flush=True)
    columns = ["elements", "dtype", "family", "bits", "bits_per_element", "clone_GBps", "reference_GBps",
               "cpp_GBps", "cpp_vs_reference", "cpp_vs_clone", "cuda_GBps", "cuda_vs_clone"]
    print_table(rows, columns)
    print_json("codec", rows, backends=available)


if __name__ == "__main__":
    main()
