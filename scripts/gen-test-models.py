#!/usr/bin/env python3
"""Writes a tiny random-weight GGUF model of one llama.cpp architecture.

The file uses llama.cpp's real metadata keys, tensor names and tensor shapes
for the architecture (read off `load_arch_hparams` / `load_arch_tensors` in
the vendored `llama.cpp/src/models/<arch>.cpp`), so stock llama.cpp loads and
runs it. The weights are random, so the text it writes is noise, but it is
deterministic noise: the same arguments give a byte-identical file.

Usage (normally through `scripts/gen-test-models.sh`, which makes the venv
with the pinned gguf==0.19.0 and numpy):

    gen-test-models.py --arch ARCH --out PATH [--layers N] [--seed S]
                       [--tokenizer-from GGUF] [--split-max-tensors K]
    gen-test-models.py --arch ARCH [ARCH...] --out-dir DIR [same options]

The second form writes DIR/<arch>.gguf for each ARCH in one process (the
tokenizer is read once: GGUFReader takes seconds over its ~100k strings). It
prints the path of every file written, one a line.

Architectures (`general.architecture`): llama, qwen2, qwen3, qwen2moe,
qwen3moe, gemma3, gemma2, phi3, deepseek2, gpt-oss, olmo2, mistral3.

Tokenizer: every `tokenizer.*` key is copied, with its GGUF type, from a real
model (`--tokenizer-from`; default: the SmolLM2 test model printed by
`scripts/fetch-test-model.sh`): gpt2-style BPE, 49152 tokens, so
`token_embd.weight` is [n_embd, 49152] in ggml order. The vocabulary is not
cut down, because the merges refer to the token texts.

Shapes shared by every architecture: n_embd 64, 4 heads, 2 KV heads, head
dim 16 (= rope.dimension_count), n_ff 128, context_length 256, RMS eps 1e-6,
rope.freq_base 10000. Layers: 8 for the sliding-window archs (gemma3, gemma2,
gpt-oss, olmo2), 6 for the others; `--layers` overrides. All tensors are F32:
norm weights 1 + N(0, 0.05), biases N(0, 0.05), everything else N(0, 0.08)
(big enough that greedy decoding does not repeat one token).

Per-architecture choices:
  llama     tied head (no output.weight), like the real SmolLM2.
  qwen2     q/k/v biases; tied head.
  qwen3     attn_q_norm/attn_k_norm {head_dim}; tied head.
  qwen2moe  4 experts, 2 used, expert_feed_forward_length 32, shared expert
            (expert_shared_feed_forward_length 64, ffn_*_shexp,
            ffn_gate_inp_shexp); q/k/v biases; output.weight (required).
  qwen3moe  4 experts, 2 used, expert ffn 32, q/k norms; untied head.
  gemma3    sliding_window 8 (default pattern 6: layer 5 is the only full
            layer of 8), rope.freq_base 1e6 on full layers and
            rope.freq_base_swa 1e4, post-attention/post-ffw norms, q/k norms;
            tied head.
  gemma2    sliding_window 8 (default pattern 2), rope.freq_base_swa 1000,
            attn_logit_softcapping 50, final_logit_softcapping 30, post
            norms; tied head (llama.cpp never loads an output.weight here).
  phi3      fused attn_qkv {64, 128} and fused gate+up ffn_up {64, 256}, no
            rope factors; untied head.
  deepseek2 MLA: q_lora_rank 32, kv_lora_rank 32, rope dim 8, key_length 40
            / value_length 32 (the compressed cache), key_length_mla 24 /
            value_length_mla 16, head_count_kv 1; leading_dense_block_count
            1; 4 experts, 2 used, 1 shared, expert ffn 32, sigmoid gating
            (expert_gating_func 2) written explicitly, weights norm + scale
            2.5, exp_probs_b.bias; nextn_predict_layers 0; split attn_k_b /
            attn_v_b. Never 26/27 layers (llama.cpp's "lite" detection would
            then skip q_lora_rank). Untied head.
  gpt-oss   sliding_window 8 (default pattern 2), rope.freq_base_swa 1000,
            attn_sinks, q/k/v/o biases, router and expert biases, 4 experts,
            2 used, expert ffn 32; output.weight (required).
  olmo2     post-norm only (no attn_norm/ffn_norm), attn_q_norm {n_embd},
            attn_k_norm {n_kv*head_dim}, sliding_window 8 so the Olmo3 SWA
            path runs (default pattern 4), rope.freq_base_swa 1000;
            output.weight (required).
  mistral3  llama-like dense block, no attention temperature; untied head.
So the optional head is tied for llama, qwen2, qwen3, gemma3 and untied for
qwen3moe, phi3, deepseek2, mistral3; gemma2 is always tied and qwen2moe,
gpt-oss, olmo2 always carry output.weight. No arch writes
`attention.sliding_window_pattern`: llama.cpp's per-arch default applies.

`--split-max-tensors K` writes llama.cpp-style shards
`<stem>-00001-of-0000N.gguf`, ... (gguf-py's own splitting, the layout of
llama.cpp's gguf-split): at most K tensors a shard, all metadata in shard 1,
and every shard carries split.no (u16), split.count (u16) and
split.tensors.count (i32). Give llama.cpp the first shard.

Determinism: the weights come from numpy's PCG64 seeded with a hash of the
arch name and `--seed`; GGUFWriter writes no time stamps. The numpy version
is pinned by gen-test-models.sh.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGUFReader, GGUFValueType, GGUFWriter

ARCHS = [
    "llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "gemma3", "gemma2",
    "phi3", "deepseek2", "gpt-oss", "olmo2", "mistral3",
]
SWA_ARCHS = {"gemma3", "gemma2", "gpt-oss", "olmo2"}

N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
HEAD_DIM = N_EMBD // N_HEAD  # 16
N_FF = 128
N_CTX = 256
RMS_EPS = 1e-6
ROPE_BASE = 10000.0
N_EXPERT = 4
N_EXPERT_USED = 2
N_FF_EXP = 32
N_FF_SHEXP = 64
SLIDING_WINDOW = 8

STD = 0.08        # matrices and embeddings
STD_SMALL = 0.05  # biases, norm jitter

ROOT = Path(__file__).resolve().parent.parent


class Gen:
    """Collects tensors in write order; shapes are given in ggml order."""

    def __init__(self, seed_text: str):
        digest = hashlib.sha256(seed_text.encode()).digest()
        self.rng = np.random.default_rng(int.from_bytes(digest[:16], "little"))
        self.tensors: list[tuple[str, np.ndarray]] = []

    def _normal(self, ne: tuple[int, ...], std: float) -> np.ndarray:
        # gguf-py wants the numpy shape reversed: ggml {ne0, ne1} = numpy (ne1, ne0)
        a = self.rng.standard_normal(tuple(reversed(ne)), dtype=np.float32)
        return a * np.float32(std)

    def mat(self, name: str, *ne: int) -> None:
        self.tensors.append((name, self._normal(ne, STD)))

    def bias(self, name: str, *ne: int) -> None:
        self.tensors.append((name, self._normal(ne, STD_SMALL)))

    def norm(self, name: str, *ne: int) -> None:
        self.tensors.append((name, np.float32(1.0) + self._normal(ne, STD_SMALL)))


def default_tokenizer() -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "fetch-test-model.sh")],
        check=True, stdout=subprocess.PIPE, text=True,
    ).stdout.strip().splitlines()
    return out[-1]


TokenizerKV = list[tuple[str, object, GGUFValueType, "GGUFValueType | None"]]


def read_tokenizer(src: str) -> tuple[TokenizerKV, int]:
    """Every tokenizer.* key of `src` with its GGUF type, and the vocabulary size.

    Parsing the ~100k strings takes GGUFReader several seconds, so this runs
    once per process, however many models are written.
    """
    r = GGUFReader(src)
    kvs: TokenizerKV = []
    n_vocab = 0
    for name, field in r.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = None
        if vtype == GGUFValueType.ARRAY:
            if len(field.types) != 2:
                raise SystemExit(f"{src}: {name}: nested arrays are not supported")
            sub = field.types[1]
        value = field.contents()
        kvs.append((name, value, vtype, sub))
        if name == "tokenizer.ggml.tokens":
            n_vocab = len(value)
    if n_vocab == 0:
        raise SystemExit(f"{src}: no tokenizer.ggml.tokens")
    return kvs, n_vocab


# ---------------------------------------------------------------------------
# per-architecture metadata and tensors


def add_common_keys(w: GGUFWriter, arch: str, n_layer: int, n_vocab: int) -> None:
    # the few archs that differ from the shared shapes
    rope_base = 1e6 if arch == "gemma3" else ROPE_BASE  # gemma3: full layers
    n_head_kv = 1 if arch == "deepseek2" else N_HEAD_KV  # MLA: one latent KV head
    n_rot = 8 if arch == "deepseek2" else HEAD_DIM
    # not the arch: llama.cpp's vocab loader special-cases general.name values
    # containing "phi3" (looks up "</s>", which this vocabulary lacks)
    w.add_name("nakshatra-tiny-random")
    w.add_type("model")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(n_vocab)
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_rope_freq_base(rope_base)
    w.add_rope_dimension_count(n_rot)


def attn_qkv(g: Gen, p: str, biases: bool = False, n_kv: int = N_HEAD_KV) -> None:
    g.mat(f"{p}.attn_q.weight", N_EMBD, N_HEAD * HEAD_DIM)
    g.mat(f"{p}.attn_k.weight", N_EMBD, n_kv * HEAD_DIM)
    g.mat(f"{p}.attn_v.weight", N_EMBD, n_kv * HEAD_DIM)
    if biases:
        g.bias(f"{p}.attn_q.bias", N_HEAD * HEAD_DIM)
        g.bias(f"{p}.attn_k.bias", n_kv * HEAD_DIM)
        g.bias(f"{p}.attn_v.bias", n_kv * HEAD_DIM)
    g.mat(f"{p}.attn_output.weight", N_HEAD * HEAD_DIM, N_EMBD)


def dense_ffn(g: Gen, p: str, n_ff: int | None = None) -> None:
    # N_FF read at call time: --n-ff changes it after this is defined
    n_ff = N_FF if n_ff is None else n_ff
    g.mat(f"{p}.ffn_gate.weight", N_EMBD, n_ff)
    g.mat(f"{p}.ffn_up.weight", N_EMBD, n_ff)
    g.mat(f"{p}.ffn_down.weight", n_ff, N_EMBD)


def moe_ffn(g: Gen, p: str) -> None:
    g.mat(f"{p}.ffn_gate_inp.weight", N_EMBD, N_EXPERT)
    g.mat(f"{p}.ffn_gate_exps.weight", N_EMBD, N_FF_EXP, N_EXPERT)
    g.mat(f"{p}.ffn_up_exps.weight", N_EMBD, N_FF_EXP, N_EXPERT)
    g.mat(f"{p}.ffn_down_exps.weight", N_FF_EXP, N_EMBD, N_EXPERT)


def moe_keys(w: GGUFWriter) -> None:
    w.add_expert_count(N_EXPERT)
    w.add_expert_used_count(N_EXPERT_USED)
    w.add_expert_feed_forward_length(N_FF_EXP)


def build(arch: str, w: GGUFWriter, g: Gen, n_layer: int, n_vocab: int) -> None:
    """Adds the arch's own keys and all tensors (into `g`)."""
    a = arch
    head = {  # does the file carry output.weight?
        "llama": False, "qwen2": False, "qwen3": False, "gemma3": False,
        "gemma2": False, "qwen3moe": True, "phi3": True, "deepseek2": True,
        "mistral3": True, "qwen2moe": True, "gpt-oss": True, "olmo2": True,
    }[a]

    # --- keys
    if a in ("qwen2moe", "qwen3moe", "gpt-oss"):
        moe_keys(w)
    if a == "qwen2moe":
        w.add_expert_shared_feed_forward_length(N_FF_SHEXP)
    if a == "gemma3":
        w.add_sliding_window(SLIDING_WINDOW)
        w.add_rope_freq_base_swa(10000.0)  # full layers: 1e6
    if a in ("gemma2", "gpt-oss", "olmo2"):
        w.add_sliding_window(SLIDING_WINDOW)
        w.add_rope_freq_base_swa(1000.0)
    if a == "gemma2":
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
    if a == "deepseek2":
        moe_keys(w)
        w.add_leading_dense_block_count(1)
        w.add_q_lora_rank(32)
        w.add_kv_lora_rank(32)
        w.add_key_length(32 + 8)    # kv_lora_rank + rope: the cached K row
        w.add_value_length(32)      # kv_lora_rank: the cached V row
        w.add_key_length_mla(16 + 8)  # qk_nope + qk_rope per head
        w.add_value_length_mla(16)
        w.add_expert_shared_count(1)
        w.add_expert_weights_scale(2.5)
        w.add_expert_weights_norm(True)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_nextn_predict_layers(0)

    # --- global tensors
    g.mat("token_embd.weight", N_EMBD, n_vocab)
    g.norm("output_norm.weight", N_EMBD)
    if head:
        g.mat("output.weight", N_EMBD, n_vocab)

    # --- blocks
    for i in range(n_layer):
        p = f"blk.{i}"
        if a in ("llama", "mistral3"):
            g.norm(f"{p}.attn_norm.weight", N_EMBD)
            attn_qkv(g, p)
            g.norm(f"{p}.ffn_norm.weight", N_EMBD)
            dense_ffn(g, p)
        elif a in ("qwen2", "qwen3", "qwen2moe", "qwen3moe"):
            g.norm(f"{p}.attn_norm.weight", N_EMBD)
            attn_qkv(g, p, biases=a in ("qwen2", "qwen2moe"))
            if a in ("qwen3", "qwen3moe"):
                g.norm(f"{p}.attn_q_norm.weight", HEAD_DIM)
                g.norm(f"{p}.attn_k_norm.weight", HEAD_DIM)
            g.norm(f"{p}.ffn_norm.weight", N_EMBD)
            if a in ("qwen2", "qwen3"):
                dense_ffn(g, p)
            else:
                moe_ffn(g, p)
            if a == "qwen2moe":
                g.mat(f"{p}.ffn_gate_inp_shexp.weight", N_EMBD)
                g.mat(f"{p}.ffn_gate_shexp.weight", N_EMBD, N_FF_SHEXP)
                g.mat(f"{p}.ffn_up_shexp.weight", N_EMBD, N_FF_SHEXP)
                g.mat(f"{p}.ffn_down_shexp.weight", N_FF_SHEXP, N_EMBD)
        elif a in ("gemma3", "gemma2"):
            g.norm(f"{p}.attn_norm.weight", N_EMBD)
            attn_qkv(g, p)
            if a == "gemma3":
                g.norm(f"{p}.attn_q_norm.weight", HEAD_DIM)
                g.norm(f"{p}.attn_k_norm.weight", HEAD_DIM)
            g.norm(f"{p}.post_attention_norm.weight", N_EMBD)
            g.norm(f"{p}.ffn_norm.weight", N_EMBD)
            dense_ffn(g, p)
            g.norm(f"{p}.post_ffw_norm.weight", N_EMBD)
        elif a == "phi3":
            n_kv = N_HEAD_KV * HEAD_DIM
            g.norm(f"{p}.attn_norm.weight", N_EMBD)
            g.mat(f"{p}.attn_qkv.weight", N_EMBD, N_EMBD + 2 * n_kv)
            g.mat(f"{p}.attn_output.weight", N_EMBD, N_EMBD)
            g.norm(f"{p}.ffn_norm.weight", N_EMBD)
            g.mat(f"{p}.ffn_up.weight", N_EMBD, 2 * N_FF)  # gate and up, fused
            g.mat(f"{p}.ffn_down.weight", N_FF, N_EMBD)
        elif a == "deepseek2":
            q_lora, kv_lora, rope, nope, v_mla = 32, 32, 8, 16, 16
            g.norm(f"{p}.attn_norm.weight", N_EMBD)
            g.norm(f"{p}.attn_q_a_norm.weight", q_lora)
            g.mat(f"{p}.attn_q_a.weight", N_EMBD, q_lora)
            g.mat(f"{p}.attn_q_b.weight", q_lora, N_HEAD * (nope + rope))
            g.norm(f"{p}.attn_kv_a_norm.weight", kv_lora)
            g.mat(f"{p}.attn_kv_a_mqa.weight", N_EMBD, kv_lora + rope)
            g.mat(f"{p}.attn_k_b.weight", nope, kv_lora, N_HEAD)
            g.mat(f"{p}.attn_v_b.weight", kv_lora, v_mla, N_HEAD)
            g.mat(f"{p}.attn_output.weight", N_HEAD * v_mla, N_EMBD)
            g.norm(f"{p}.ffn_norm.weight", N_EMBD)
            if i < 1:  # leading_dense_block_count
                dense_ffn(g, p)
            else:
                moe_ffn(g, p)
                g.bias(f"{p}.exp_probs_b.bias", N_EXPERT)
                g.mat(f"{p}.ffn_gate_shexp.weight", N_EMBD, N_FF_EXP)
                g.mat(f"{p}.ffn_up_shexp.weight", N_EMBD, N_FF_EXP)
                g.mat(f"{p}.ffn_down_shexp.weight", N_FF_EXP, N_EMBD)
        elif a == "gpt-oss":
            g.norm(f"{p}.attn_norm.weight", N_EMBD)
            attn_qkv(g, p, biases=True)
            g.bias(f"{p}.attn_output.bias", N_EMBD)
            g.bias(f"{p}.attn_sinks.weight", N_HEAD)
            g.norm(f"{p}.post_attention_norm.weight", N_EMBD)
            moe_ffn(g, p)
            g.bias(f"{p}.ffn_gate_inp.bias", N_EXPERT)
            g.bias(f"{p}.ffn_gate_exps.bias", N_FF_EXP, N_EXPERT)
            g.bias(f"{p}.ffn_up_exps.bias", N_FF_EXP, N_EXPERT)
            g.bias(f"{p}.ffn_down_exps.bias", N_EMBD, N_EXPERT)
        elif a == "olmo2":
            attn_qkv(g, p)
            g.norm(f"{p}.attn_q_norm.weight", N_EMBD)
            g.norm(f"{p}.attn_k_norm.weight", N_HEAD_KV * HEAD_DIM)
            g.norm(f"{p}.post_attention_norm.weight", N_EMBD)
            dense_ffn(g, p)
            g.norm(f"{p}.post_ffw_norm.weight", N_EMBD)
        else:
            raise SystemExit(f"unknown arch {a!r}")


def write_model(arch: str, out: Path, n_layer: int, seed: int,
                tokenizer: tuple[TokenizerKV, int], split_max_tensors: int) -> list[Path]:
    """Writes one model (or its shards); returns the paths written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(out, arch, split_max_tensors=split_max_tensors)
    kvs, n_vocab = tokenizer
    for name, value, vtype, sub in kvs:
        w.add_key_value(name, value, vtype, sub_type=sub)
    add_common_keys(w, arch, n_layer, n_vocab)
    g = Gen(f"nakshatra-test-model/{arch}/{seed}")
    build(arch, w, g, n_layer, n_vocab)
    for name, data in g.tensors:
        w.add_tensor(name, data)
    paths = w.format_shard_names(out)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return paths


def default_layers(arch: str) -> int:
    return 8 if arch in SWA_ARCHS else 6


def main() -> int:
    global N_EMBD, HEAD_DIM, N_FF, N_EXPERT, N_FF_EXP
    ap = argparse.ArgumentParser(
        description="Writes tiny random-weight GGUF models (see the module docstring).")
    ap.add_argument("--arch", required=True, nargs="+", choices=ARCHS, metavar="ARCH",
                    help=f"one or more of: {', '.join(ARCHS)}")
    dest = ap.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", type=Path, help="output .gguf path (one --arch only)")
    dest.add_argument("--out-dir", type=Path, help="write DIR/<arch>.gguf for each --arch")
    ap.add_argument("--layers", type=int, default=None,
                    help="block count (default: 8 for gemma3, gemma2, gpt-oss, olmo2; 6 otherwise)")
    ap.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    ap.add_argument("--tokenizer-from", default=None, metavar="GGUF",
                    help="GGUF to copy tokenizer.* from (default: the SmolLM2 test model "
                         "from scripts/fetch-test-model.sh)")
    ap.add_argument("--split-max-tensors", type=int, default=0, metavar="K",
                    help="write llama.cpp shards of at most K tensors each (0: one file)")
    ap.add_argument("--n-embd", type=int, default=None, metavar="N",
                    help=f"hidden size (default {N_EMBD}; head dim = N / {N_HEAD}); "
                         "for benchmarks")
    ap.add_argument("--n-ff", type=int, default=None, metavar="N",
                    help=f"dense feed-forward size (default {N_FF})")
    ap.add_argument("--n-expert", type=int, default=None, metavar="N",
                    help=f"experts per MoE block (default {N_EXPERT})")
    ap.add_argument("--n-ff-exp", type=int, default=None, metavar="N",
                    help=f"feed-forward size of one expert (default {N_FF_EXP})")
    args = ap.parse_args()
    # Shape overrides (benchmarks want bigger models than the tests'): the
    # module constants are what every builder reads.
    if args.n_embd is not None:
        if args.n_embd < N_HEAD or args.n_embd % (2 * N_HEAD) != 0:
            ap.error(f"--n-embd must be a multiple of {2 * N_HEAD}")
        N_EMBD = args.n_embd
        HEAD_DIM = N_EMBD // N_HEAD
    if args.n_ff is not None:
        N_FF = args.n_ff
    if args.n_expert is not None:
        if args.n_expert < N_EXPERT_USED:
            ap.error(f"--n-expert must be at least {N_EXPERT_USED}")
        N_EXPERT = args.n_expert
    if args.n_ff_exp is not None:
        N_FF_EXP = args.n_ff_exp

    archs = list(dict.fromkeys(args.arch))
    if args.out is not None and len(archs) != 1:
        ap.error("--out takes one --arch; use --out-dir for several")
    if args.split_max_tensors < 0:
        ap.error("--split-max-tensors must be >= 0")
    for arch in archs:
        n_layer = args.layers if args.layers is not None else default_layers(arch)
        if n_layer < 1:
            ap.error("--layers must be at least 1")
        if arch == "deepseek2" and n_layer in (26, 27):
            ap.error("deepseek2 with 26 or 27 layers is read by llama.cpp as a 'lite' model")
        if arch == "deepseek2" and n_layer < 2:
            ap.error("deepseek2 needs at least 2 layers (1 dense + MoE)")

    tokenizer = read_tokenizer(args.tokenizer_from or default_tokenizer())
    for arch in archs:
        out = args.out if args.out is not None else args.out_dir / f"{arch}.gguf"
        n_layer = args.layers if args.layers is not None else default_layers(arch)
        for p in write_model(arch, out, n_layer, args.seed, tokenizer, args.split_max_tensors):
            print(p, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
