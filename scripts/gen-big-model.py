#!/usr/bin/env python3
"""Writes a big random-weight Llama-shaped GGUF, for scale tests and
benchmarks: many blocks, quantized, gigabytes if asked, without a download.

The tensors have llama.cpp's real names and metadata (the tokenizer is
copied from a real GGUF, by default the SmolLM2 test model), so the file
slices, fetches, runs and splits like a real model; its text is nonsense.

Weights are drawn once into a pool (seeded: the same arguments give the
same bytes), quantized once, and every tensor is a block-aligned rotation
of that pool, so writing several GB costs little more than the disk
writes. Tensors are streamed to the file one at a time: memory stays at
the largest tensor.

Default shape: 80 blocks of n_embd 2048, n_ff 5632, 16 heads (4 KV heads),
Q8_0: about 3.9 GB. Smaller for CI: --n-embd 768 --n-ff 2048 --n-head 12.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize

ROOT = Path(__file__).resolve().parent.parent
QTYPES = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "f16": Q.F16}
FILE_TYPES = {
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
}
# Values in the weight pool (before quantization).
POOL_VALUES = 1 << 22


def test_models_module():
    """scripts/gen-test-models.py, for its tokenizer reader."""
    spec = importlib.util.spec_from_file_location("gen_test_models", ROOT / "scripts" / "gen-test-models.py")
    if spec is None or spec.loader is None:
        raise SystemExit("cannot load scripts/gen-test-models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Pool:
    """Quantized random weights that tensors are cut from."""

    def __init__(self, seed: int, qtype: Q, std: float):
        self.rng = np.random.default_rng(seed)
        self.qtype = qtype
        self.block, self.type_size = GGML_QUANT_SIZES[qtype]
        values = self.rng.standard_normal(POOL_VALUES, dtype=np.float32) * np.float32(std)
        q = quantize(values.reshape(-1, 256), qtype)
        self.bytes = np.ascontiguousarray(q).view(np.uint8).reshape(-1)
        self.n_blocks = len(self.bytes) // self.type_size

    def tensor(self, ne: tuple[int, ...]) -> np.ndarray:
        """A tensor of ggml shape `ne`, as the quantized bytes gguf wants
        (numpy order, last axis in bytes)."""
        if ne[0] % self.block:
            raise SystemExit(f"row of {ne[0]} is not a multiple of {self.qtype.name}'s block of {self.block}")
        rows = math.prod(ne[1:])
        row_bytes = ne[0] // self.block * self.type_size
        rot = int(self.rng.integers(0, self.n_blocks)) * self.type_size
        rolled = np.concatenate((self.bytes[rot:], self.bytes[:rot]))
        out = np.resize(rolled, rows * row_bytes)
        return out.reshape(tuple(reversed(ne[1:])) + (row_bytes,))


def norm(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.float32(1.0) + rng.standard_normal(n, dtype=np.float32) * np.float32(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description="Writes a big random-weight Llama-shaped GGUF (see the module docstring).")
    ap.add_argument("--out", type=Path, required=True, help="output .gguf path")
    ap.add_argument("--layers", type=int, default=80, help="block count (default 80)")
    ap.add_argument("--n-embd", type=int, default=2048, help="hidden size (default 2048)")
    ap.add_argument("--n-ff", type=int, default=5632, help="feed-forward size (default 5632)")
    ap.add_argument("--n-head", type=int, default=16, help="attention heads (default 16)")
    ap.add_argument("--n-head-kv", type=int, default=4, help="KV heads (default 4)")
    ap.add_argument("--qtype", choices=sorted(QTYPES), default="q8_0", help="weight type (default q8_0)")
    ap.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    ap.add_argument("--tokenizer-from", default=None, metavar="GGUF",
                    help="GGUF to copy tokenizer.* from (default: the SmolLM2 test model)")
    args = ap.parse_args()
    if args.layers < 1 or args.n_head < 1 or args.n_head_kv < 1:
        ap.error("--layers, --n-head and --n-head-kv must be at least 1")
    if args.n_embd % args.n_head or args.n_head % args.n_head_kv:
        ap.error("--n-embd must divide by --n-head, and --n-head by --n-head-kv")
    head_dim = args.n_embd // args.n_head
    kv_dim = head_dim * args.n_head_kv

    tgm = test_models_module()
    kvs, n_vocab = tgm.read_tokenizer(args.tokenizer_from or tgm.default_tokenizer())
    qtype = QTYPES[args.qtype]
    # Weights of unit-scale outputs: std 1/sqrt(fan in), the pool drawn for
    # the hidden size (the FFN's down projection reuses it).
    pool = Pool(args.seed, qtype, 1.0 / math.sqrt(args.n_embd))
    rng = np.random.default_rng(args.seed + 1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".part")
    w = GGUFWriter(tmp, "llama")
    for name, value, vtype, sub in kvs:
        w.add_key_value(name, value, vtype, sub_type=sub)
    w.add_name("nakshatra-big-random")
    w.add_type("model")
    w.add_file_type(FILE_TYPES[args.qtype])
    w.add_vocab_size(n_vocab)
    w.add_context_length(4096)
    w.add_embedding_length(args.n_embd)
    w.add_block_count(args.layers)
    w.add_feed_forward_length(args.n_ff)
    w.add_head_count(args.n_head)
    w.add_head_count_kv(args.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)

    # (name, ggml shape, quantized?) in file order; output.weight absent:
    # tied to the token embeddings, as SmolLM2's.
    plan: list[tuple[str, tuple[int, ...], bool]] = [("token_embd.weight", (args.n_embd, n_vocab), True)]
    for i in range(args.layers):
        p = f"blk.{i}"
        plan += [
            (f"{p}.attn_norm.weight", (args.n_embd,), False),
            (f"{p}.attn_q.weight", (args.n_embd, args.n_embd), True),
            (f"{p}.attn_k.weight", (args.n_embd, kv_dim), True),
            (f"{p}.attn_v.weight", (args.n_embd, kv_dim), True),
            (f"{p}.attn_output.weight", (args.n_embd, args.n_embd), True),
            (f"{p}.ffn_norm.weight", (args.n_embd,), False),
            (f"{p}.ffn_gate.weight", (args.n_embd, args.n_ff), True),
            (f"{p}.ffn_up.weight", (args.n_embd, args.n_ff), True),
            (f"{p}.ffn_down.weight", (args.n_ff, args.n_embd), True),
        ]
    plan.append(("output_norm.weight", (args.n_embd,), False))

    block, type_size = GGML_QUANT_SIZES[qtype]
    for name, ne, quantized in plan:
        if quantized:
            byte_shape = tuple(reversed(ne[1:])) + (ne[0] // block * type_size,)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)
        else:
            w.add_tensor_info(name, tuple(reversed(ne)), np.dtype(np.float32), 4 * math.prod(ne))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, ne, quantized in plan:
        w.write_tensor_data(pool.tensor(ne) if quantized else norm(rng, ne[0]))
    w.close()
    tmp.replace(args.out)
    print(args.out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
