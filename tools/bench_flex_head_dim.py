"""FlexAttention fwd+bwd at head dims 256 and 512 on GPU, default vs smaller Triton block sizes (bf16).

    python tools/bench_flex_head_dim.py

Gemma 4 full layers have head dim 512, which overflows Hopper shared memory with Flex's default Triton configs.
"""

import argparse
import sys
import time


def main() -> None:
    # Parsed before torch loads: `--help` answers at once.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not torch.cuda.is_available():
        sys.exit("error: bench_flex_head_dim.py needs a CUDA device (FlexAttention's Triton kernels)")
    heads, canvas, keys = 16, 256, 4352
    for d in (256, 512):
        q = torch.randn(1, heads, canvas, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, heads, keys, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        bm = create_block_mask(lambda b, h, qi, ki: ki >= 0, 1, 1, canvas, keys, device="cuda")
        for opts in (None, {"BLOCK_M": 64, "BLOCK_N": 32, "num_stages": 1}, {"BLOCK_M": 32, "BLOCK_N": 32, "num_stages": 1, "BLOCK_M1": 16, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 16}):
            try:
                f = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=bm, kernel_options=opts))
                f(q, k, v).sum().backward(); torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(); t = time.perf_counter()
                for _ in range(5): f(q, k, v).sum().backward()
                torch.cuda.synchronize()
                print(f"d={d} opts={opts}: {(time.perf_counter()-t)/5*1e3:.2f} ms fwd+bwd, peak {torch.cuda.max_memory_allocated()/2**20:.0f} MiB", flush=True)
            except Exception as e:
                print(f"d={d} opts={opts}: failed {type(e).__name__}: {str(e)[:150]}", flush=True)
            torch._dynamo.reset()


if __name__ == "__main__":
    main()
