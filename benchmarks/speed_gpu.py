"""Decode at Phi-3.5-V's real size on one GPU: `full` vs `hae` at 2k / 8k / 16k / 32k cached
tokens, beside transformers' own Phi3ForCausalLM with DynamicCache and StaticCache.

The model has Phi-3.5-V's decoder exactly (32 layers, hidden 3072, 32 heads = 32 KV heads of
96, MLP 8192, vocab 32064), random weights in the official layout, bf16, SDPA. The vision
tower is the tiny one: it only fills the image slots (313 per picture), and decoding never
runs it. HAE runs in budget mode as in `speed.py` (`visual_keep=0.4, r_i=1.0`; random weights
attend near uniformly). Per size, interleaved as in `speed.py`: one prefill per policy, then
`--repeats` timed decodes of `--decode-tokens` greedy tokens for full, hae and both peers
(CUDA synchronised around every step and every timed region of the cache), and (unless
`--no-compile`) full and hae through the compiled step and transformers' StaticCache forward
under torch.compile, each replayed as a CUDA graph, warmed up once per size. Reported:

- decode tok/s, the traffic limit (W + K_full) / (W + K_hae) and the share of it achieved;
- the eviction share of decode time and the time of one eviction round over all 32 layers;
- the recycle bin's transfer time per restored token (one layer: pinned host -> GPU, a
  gather of every other token of 4,096, as a round's restore is);
- NVML's used device memory with a cache alive minus without, against our bytes held and
  allocated (after `torch.cuda.empty_cache()`, so the allocator's pool holds little else).

Budget on an H200 (about 10 minutes with a fresh machine): building the model ~1 min (4.15e9
parameters made on the GPU), prompts and prefills a few seconds per size, decodes ~1 min at
32k (4 runners x `--repeats` 3 x 64 tokens), NVML probes seconds. The script times itself:
before each size it projects that size's time from the last one (x size ratio) and skips
what would end past `--budget-seconds` (default 420), recording the skip; the JSON is
rewritten after every size, so a run cut short still leaves what it measured.

    python benchmarks/speed_gpu.py --out-dir "$OUT"                          # the H200 run
    python benchmarks/speed_gpu.py --tiny --sizes 330,660 --repeats 1        # CPU, seconds (the smoke test)

Writes benchmarks/results/speed_gpu.json.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
import speed  # noqa: E402

import torch  # noqa: E402

PHI35V_TEXT = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
PHI35V_VOCAB = 32064
TINY_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)


def build_model(text: dict, device: torch.device, dtype: torch.dtype, seed: int):
    from hae_cli.model.phi3v import Phi35Vision
    from hae_testing.checkpoints.phi3v import build_model as build_random_model
    from hae_testing.checkpoints.phi3v_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(speed.story_words())
    network = build_random_model(tokenizer, text=text, seed=seed, vocab_size=PHI35V_VOCAB, device=device)
    return Phi35Vision.of_network(network.to(dtype), tokenizer, name="random Phi-3.5-V"), tokenizer


def synthetic_pictures(count: int = 16, seed: int = 0) -> list:
    """Seeded noise pictures (content does not matter to random weights; no data set needed)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (96, 128, 3), generator=gen, dtype=torch.uint8).numpy()) for _ in range(count)]


def bin_transfer(layer_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, tokens: int = 4096, repeats: int = 5) -> dict:
    """Seconds per restored token for one layer's bin: `RecycleBin.take` of every other token
    (pinned host memory on CUDA) to `device`, synchronised; the median of `repeats`."""
    from hae_cli.cache.recycle_bin import RecycleBin, TokenRows

    def rows(n: int) -> TokenRows:
        return TokenRows(
            keys=torch.randn(1, layer_heads, n, head_dim, device=device, dtype=dtype),
            values=torch.randn(1, layer_heads, n, head_dim, device=device, dtype=dtype),
            token_index=torch.arange(n, device=device).expand(layer_heads, n),
            modality=torch.ones(layer_heads, n, dtype=torch.int8, device=device),
            image_id=torch.ones(layer_heads, n, dtype=torch.int16, device=device),
            scores=torch.zeros(layer_heads, n, device=device),
        )

    seconds = []
    for _ in range(repeats):
        bin_ = RecycleBin()
        bin_.add(rows(tokens))
        index = torch.arange(0, tokens, 2)
        start = speed.clock(device)
        bin_.take(index, device)
        seconds.append((speed.clock(device) - start) / index.numel())
    return {
        "pinned": bin_.pinned,
        "tokens_restored": tokens // 2,
        "seconds_per_token_per_layer": statistics.median(seconds),
        "bytes_per_token_per_layer": 2 * layer_heads * head_dim * torch.finfo(dtype).bits // 8,
    }


class DeviceMemory:
    """NVML's used memory of this GPU (None without CUDA or NVML)."""

    def __init__(self, device: torch.device) -> None:
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self.pynvml = pynvml
        except Exception as error:  # NVML absent or not permitted: say so in the JSON
            self.error = repr(error)

    def used(self) -> int | None:
        if self.handle is None:
            return None
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return int(self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)


def memory_probe(model, prompt, embeds, policies: dict, args, memory: DeviceMemory) -> dict:
    """Per policy: NVML's used memory with a prefilled cache (+ `decode_tokens` steps) minus
    without it, beside the bytes that cache holds and allocates (K/V; tags and scores add
    15 bytes per row and head; the bin is on the host)."""
    from hae_cli.model.generate import SamplingConfig, decode

    out = {}
    for name, (policy, params) in policies.items():
        before = memory.used()
        prefilled = speed.timed_prefill(model, prompt, embeds, policy, params)
        cache, logits, position = prefilled["cache"], prefilled["logits"], prefilled["position"]
        with torch.inference_mode():
            decode(model, cache, logits, position, SamplingConfig(max_new_tokens=args.decode_tokens), stop_ids=set(),
                   feed_last=True)
        after = memory.used()
        out[name] = {
            "bytes_held": sum(layer.bytes_held for layer in cache.layers),
            "bytes_allocated": sum(layer.bytes_allocated for layer in cache.layers),
            "nvml_used_delta": None if before is None else after - before,
        }
        del prefilled, cache, logits
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2048,8192,16384,32768", help="prompt sizes in tokens (default 2k..32k)")
    parser.add_argument("--repeats", type=int, default=3, help="timed decodes per size and runner (default 3)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="decoded tokens per run (default 64: two HAE rounds at d=32)")
    parser.add_argument("--visual-keep", type=float, default=0.4, help="HAE budget mode: share of visual tokens kept (default 0.4)")
    parser.add_argument("--hae-params", default="", help="extra HAE parameters, e.g. buffer=16")
    parser.add_argument("--budget-seconds", type=float, default=420.0, help="skip sizes projected to end past this (default 420)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of hidden 128 (the CPU smoke test)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the compiled rows (our compiled step for full and hae, transformers' StaticCache "
                             "forward under torch.compile; CUDA graphs on CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None, help="where to write speed_gpu.json (default benchmarks/results)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    args.prefill_repeats, args.threads, args.no_peers = 1, 0, False  # what speed.measure_size reads
    args.large_size, args.large_repeats = 0, 0
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cond = common.conditions(gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    memory = DeviceMemory(device)
    text = TINY_TEXT if args.tiny else PHI35V_TEXT
    model, tokenizer = build_model(text, device, dtype, args.seed)
    native = speed.native_lm(model)
    weights = speed.weight_bytes(model)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    out = {
        "benchmark": "speed_gpu",
        "conditions": cond,
        "args": vars(args),
        "model": {**text, "vocab_size": PHI35V_VOCAB, "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."),
                  "weight_bytes": weights["total"], "weight_bytes_read_per_decoded_token": weights["read_per_decoded_token"],
                  "build_seconds": round(time.perf_counter() - started, 1)},
        "nvml": "used" if memory.handle is not None else getattr(memory, "error", "no CUDA"),
        "bin_transfer": bin_transfer(text["num_key_value_heads"], head_dim, dtype, device),
        "rows": [],
        "skipped_sizes": [],
    }
    policies = {"full": ("full", {}), "hae": ("hae", speed.hae_params(args))}
    out["hae_params"] = policies["hae"][1]
    sizes = common.parse_list(args.sizes, int)
    pictures = synthetic_pictures()

    warm_prompt, warm_embeds, _ = speed.image_prompt(model, tokenizer, pictures, min(sizes))
    for policy, params in policies.values():  # warm-up: allocator, kernels, lazy imports
        warm = speed.timed_prefill(model, warm_prompt, warm_embeds, policy, params)
        speed.timed_decode(warm, model, min(8, args.decode_tokens))
        for kind in speed.PEERS.values() if policy == "full" else ():
            speed.timed_native_decode(native, warm, kind, min(8, args.decode_tokens))
    del warm

    last = None  # (size, seconds) of the last size measured
    for size in sizes:
        elapsed = time.perf_counter() - started
        projected = 0.0 if last is None else last[1] * size / last[0]
        if elapsed + projected > args.budget_seconds:
            out["skipped_sizes"].append({"size": size, "projected_seconds": round(projected, 1), "elapsed_seconds": round(elapsed, 1)})
            continue
        if not args.quiet:
            print(f"  measuring {size} tokens ({elapsed:.0f} s in) ...", file=sys.stderr, flush=True)
        begun = time.perf_counter()
        m = speed.measure_size(model, tokenizer, pictures, size, policies, args, native)
        row = speed.compare(size, m, weights["read_per_decoded_token"])
        prompt, embeds, _ = speed.image_prompt(model, tokenizer, pictures, size)
        row["memory"] = memory_probe(model, prompt, embeds, policies, args, memory)
        del prompt, embeds
        last = (size, time.perf_counter() - begun)
        row["seconds"] = round(last[1], 1)
        out["rows"].append(row)
        out["seconds"] = round(time.perf_counter() - started, 1)
        common.write_json("speed_gpu", out, args.out_dir)

    gpu = cond.get("gpu") or "no GPU (CPU, float32)"
    speed.print_rows(
        f"{gpu}: decode, hae (visual_keep {args.visual_keep}, r_i 1.0) vs full and transformers' Phi-3; "
        f"median of {args.repeats} decodes of {args.decode_tokens} tokens",
        out["rows"],
        common.describe_conditions(cond),
    )
    if args.compile and out["rows"]:
        speed.print_compiled(out["rows"])
    transfer = out["bin_transfer"]
    common.print_table(
        "memory: NVML used with the cache minus without, against our K/V bytes (after decoding)",
        ["tokens", "policy", "bytes held", "bytes allocated", "NVML delta", "NVML / allocated"],
        [
            [row["prompt_tokens"], name, probe["bytes_held"], probe["bytes_allocated"], probe["nvml_used_delta"],
             None if probe["nvml_used_delta"] is None else probe["nvml_used_delta"] / probe["bytes_allocated"]]
            for row in out["rows"]
            for name, probe in row["memory"].items()
        ],
        caption=f"recycle bin, one layer ({'pinned' if transfer['pinned'] else 'not pinned'}): "
        f"{1e6 * transfer['seconds_per_token_per_layer']:.3f} us per restored token "
        f"({transfer['bytes_per_token_per_layer']:,} B); skipped sizes: {out['skipped_sizes'] or 'none'}",
    )
    out["seconds"] = round(time.perf_counter() - started, 1)
    path = common.write_json("speed_gpu", out, args.out_dir)
    print(f"wrote {path} in {out['seconds']} s")
    return out


if __name__ == "__main__":
    main()
