"""The LM head and its loss alone, forward and backward: scratchlm's fused, chunked
``linear_cross_entropy`` at several chunk sizes against the plain route
``F.cross_entropy(F.linear(x, W).float(), y)``, on the same random features.

    python benchmarks/head_loss.py --vocab 50257 --rows 20,64,256,512,1024 --dtype fp32,bf16

One line per case: ``vocab=<V> d_model=<D> tokens=<N> dtype=<d> route=<fused|plain> rows=<r> ms=<t>``,
``rows=default`` being the chunk size the library picks. The median of ``--repeats`` timings after
one untimed call; ``bf16`` is CPU autocast around both routes."""

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from scratchlm.objectives.cross_entropy import default_chunk_rows, linear_cross_entropy


def time_ms(step, repeats: int) -> float:
    step()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4096, help="rows N of the features")
    parser.add_argument("--rows", default="default,64,256,512,1024", help="chunk sizes, comma-separated ('default' too)")
    parser.add_argument("--dtype", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    N, D, V = args.tokens, args.d_model, args.vocab
    x = torch.randn(N, D, requires_grad=True)
    w = (torch.randn(V, D) * 0.02).requires_grad_()
    y = torch.randint(V, (N,))
    print(f"# torch={torch.__version__} threads={torch.get_num_threads()}", flush=True)
    for dtype in args.dtype.split(","):
        bf16 = dtype == "bf16"

        def fused(rows):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = linear_cross_entropy(x, w, None, y, chunk_rows=rows)
            loss.backward()

        def plain():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(F.linear(x, w).float(), y)
            loss.backward()

        for rows in args.rows.split(","):
            chosen = None if rows == "default" else int(rows)
            label = f"default({default_chunk_rows('cpu', V, low_precision=bf16)})" if chosen is None else rows
            ms = time_ms(lambda: fused(chosen), args.repeats)
            print(f"vocab={V} d_model={D} tokens={N} dtype={dtype} route=fused rows={label} ms={ms:.1f}", flush=True)
        ms = time_ms(plain, args.repeats)
        print(f"vocab={V} d_model={D} tokens={N} dtype={dtype} route=plain rows=- ms={ms:.1f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
