"""Decode throughput and prefill time, `hae` against `full`, from 1k to 12k cached tokens.

Phi-3.5-V's weights are not available, so this measures a random model in the official
layout, scaled down in width (hidden 512 by default) with its MLP width chosen so that the
KV bytes per token relative to the weight bytes equal Phi-3.5-V's:
32 layers x 32 KV heads x 96 dims x 2 (K, V) x 2 bytes = 393,216 B per token against
~4.15e9 params x 2 bytes. At N cached tokens the scaled model then moves the same mix of
weight and KV bytes per decoded token as Phi-3.5-V at N tokens, which is what bounds decode
speed: the memory-traffic limit of a cut cache is (W + K_full) / (W + K_hae).

Prompts are made of images (easy-VQA pictures, 313 slots each) so that HAE has visual
tokens to prune. On a random model attention is near uniform and HAE's default thresholds
keep everything, so HAE runs in budget mode with r_i = 1.0 (only the single most attended
token is "needed" on top of the top `visual_keep` share by global score).

    python benchmarks/speed.py                                  # 1k..12k; 5 decodes of 64 tokens, 2 prefills
    python benchmarks/speed.py --sizes 1024,4096 --repeats 3 --prefill-repeats 1 --decode-tokens 32

Writes benchmarks/results/speed.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

import torch  # noqa: E402

PHI35V_KV_BYTES_PER_TOKEN = 32 * 32 * 96 * 2 * 2  # 393,216
PHI35V_WEIGHT_BYTES = 4.15e9 * 2
PHI35V_RATIO = PHI35V_KV_BYTES_PER_TOKEN / PHI35V_WEIGHT_BYTES
HEAD_DIM = 64


# --------------------------------------------------------------------------- the scaled model


def text_dims(hidden: int, layers: int, intermediate: int) -> dict:
    heads = hidden // HEAD_DIM
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,  # Phi-3.5-V has as many KV heads as query heads
    )


def count_params(tokenizer, text: dict) -> int:
    from hae_cli.model.phi3v.config import ModelConfig
    from hae_cli.model.phi3v.network import Phi3VForCausalLM
    from hae_testing.checkpoints.phi3v import TINY_VISION, official_config

    raw = official_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, 0, text, TINY_VISION)
    with torch.device("meta"):
        model = Phi3VForCausalLM(ModelConfig.from_dict(raw))
    return sum(p.numel() for p in model.parameters())


def matching_intermediate(tokenizer, hidden: int, layers: int, ratio: float = PHI35V_RATIO) -> int:
    """MLP width (a multiple of 64) giving KV bytes per token / weight bytes = `ratio`.

    Parameters grow linearly with the MLP width, so two counts on the meta device pin it."""
    kv_elements = layers * 2 * hidden  # per token, K and V, all layers
    wanted = kv_elements / ratio
    low, high = count_params(tokenizer, text_dims(hidden, layers, 1024)), count_params(tokenizer, text_dims(hidden, layers, 2048))
    per_unit = (high - low) / 1024
    return max(64, int(round((1024 + (wanted - low) / per_unit) / 64)) * 64)


def build_scaled_model(hidden: int, layers: int, seed: int):
    """(the scaled model behind the model interface, its tokenizer, its MLP width)."""
    from hae_cli.model.phi3v import Phi35Vision
    from hae_testing.checkpoints.phi3v import build_model
    from hae_testing.checkpoints.phi3v_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(story_words())
    intermediate = matching_intermediate(tokenizer, hidden, layers)
    network = build_model(tokenizer, text=text_dims(hidden, layers, intermediate), seed=seed)
    return Phi35Vision.of_network(network, tokenizer, name="scaled"), tokenizer, intermediate


def story_words() -> list[str]:
    from hae_testing.data import easyvqa
    from hae_testing.checkpoints.phi3v import DEFAULT_WORDS

    return sorted(set(DEFAULT_WORDS) | set(easyvqa.STORY_PROMPT.lower().rstrip(".").split()))


def weight_bytes(model) -> dict:
    """All weights, and those one decoded token reads (not the vision tower, not the embedding table)."""
    total = decode = 0
    for name, p in model.network.language_model.named_parameters():
        size = p.numel() * p.element_size()
        total += size
        if "vision_embed_tokens" not in name and "embed_tokens" not in name:
            decode += size
    return {"total": total, "read_per_decoded_token": decode}


# --------------------------------------------------------------------------- prompts


def easyvqa_pictures() -> list:
    from hae_testing.data import easyvqa

    return list(easyvqa.image_paths("test").values())


def image_prompt(model, tokenizer, pictures: list, size: int):
    """A story prompt with as many images as fit in `size` tokens (at least one), taken in turn
    from `pictures` (paths or PIL images)."""
    from hae_testing.data.easyvqa import STORY_PROMPT
    from hae_cli.model.interface import UserTurn

    probe = model.read_image(pictures[0])
    text_tokens = len(model.prompt(UserTurn(STORY_PROMPT, 0), []))
    count = max(1, round((size - text_tokens) / (probe.num_tokens + 1)))
    images = [model.read_image(pictures[i % len(pictures)]) for i in range(count)]
    prompt = model.prompt(UserTurn(STORY_PROMPT, count), images)
    with torch.inference_mode():
        embeds = model.embed(prompt, images)
    return prompt, embeds, count


# --------------------------------------------------------------------------- timing


def clock(device: torch.device) -> float:
    """Seconds, after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed_prefill(model, prompt, embeds, policy: str, params: dict) -> dict:
    """One timed prefill into a fresh cache; returns the time and the cache with its logits."""
    from hae_cli.cache import EvictingCache
    from hae_cli.model.generate import prefill

    device = model.device
    cache = EvictingCache(policy, model.num_layers, sync_timing=device.type == "cuda", **params)
    with torch.inference_mode():
        position_ids, position = model.position_ids(prompt, 0)
        start = clock(device)
        logits = prefill(model, embeds, prompt, position_ids, cache)
        seconds = clock(device) - start
    return {
        "prefill_seconds": seconds,
        "prefill_overhead_seconds": cache.eviction_seconds,
        "held_after_prefill": cache.layers[-1].held,
        "cache": cache,
        "logits": logits,
        "position": position,
    }


def timed_decode(prefilled: dict, model, decode_tokens: int, compiled: bool = False, steps: int | None = None) -> dict:
    """`decode_tokens` greedy steps (no stop token) from a copy of a prefilled cache, each timed
    (from the token chosen to the next logits). `compiled`: through the compiled step, whose
    storage gets room for `decode_tokens` whatever `steps` (fewer: a warm-up) runs, so one
    warm-up per size compiles the graph the timed runs use."""
    from hae_cli.model.generate import SamplingConfig, compiled_step, decode

    cache = copy.deepcopy(prefilled["cache"])
    step = compiled_step(model, cache, decode_tokens) if compiled else None
    decode_tokens = steps or decode_tokens
    before = dict(cache.overhead_seconds)
    kv_bytes, kv_allocated, step_seconds, started = [], [], [], []

    def chosen(token: int) -> None:
        started.append(clock(model.device))

    def stepped() -> None:
        step_seconds.append(clock(model.device) - started[-1])
        kv_bytes.append(sum(layer.bytes_held for layer in cache.layers))
        kv_allocated.append(sum(layer.bytes_allocated for layer in cache.layers))

    with torch.inference_mode():
        decoded = decode(model, cache, prefilled["logits"], prefilled["position"],
                         SamplingConfig(max_new_tokens=decode_tokens), stop_ids=set(), feed_last=True,
                         on_token=chosen, on_step=stepped, feed=step)
    if step is not None and step.note:
        raise RuntimeError(step.note)
    overhead = {k: cache.overhead_seconds[k] - before.get(k, 0.0) for k in cache.overhead_seconds}
    decode_seconds = sum(step_seconds)
    rounds = sum(1 for e in cache.events if e.stage == "decode" and e.layer == 0 and e.action in ("binned", "evicted"))
    return {
        "decode_seconds": decode_seconds,
        "tokens_per_second": decode_tokens / decode_seconds,
        "decode_overhead_seconds": overhead,
        "decode_overhead_share": sum(overhead.values()) / decode_seconds,
        "kv_bytes_mean": statistics.fmean(kv_bytes),
        "kv_bytes_allocated_max": max(kv_allocated),
        "rounds": rounds,
        "seconds_per_round": overhead["rounds"] / rounds if rounds else None,  # every layer's part of a round
        "tokens": decoded.token_ids,
        "compile_seconds": step.warmup_seconds if step is not None else None,
    }


# --------------------------------------------------------------------------- peers: transformers' own Phi-3


PEERS = {"DynamicCache": "dynamic", "StaticCache": "static"}
COMPILED_PEER = "StaticCache compiled"  # with --compile: torch.compile of the forward over a StaticCache


def native_lm(model):
    """transformers' `Phi3ForCausalLM` with plain "sdpa" attention on our decoder's weights: the
    very tensors, by their official names (the checkpoint layout is transformers' own for the
    decoder). This is what a user would otherwise run."""
    from transformers import Phi3ForCausalLM
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    config = copy.deepcopy(model.config.text)
    config._attn_implementation = "sdpa"
    # Phi-3.5-V's window (262,144) is past any prompt here, so dropping it changes no output; with it,
    # StaticCache keeps its length as a Python int and a compiled forward recompiles at every step.
    config.sliding_window = None
    with torch.device("meta"):
        lm = Phi3ForCausalLM(config)
    decoder = {k: v for k, v in model.network.official_state_dict().items() if not k.startswith("model.vision_embed_tokens.")}
    lm.load_state_dict(decoder, strict=True, assign=True)
    lm.model.rotary_emb = Phi3RotaryEmbedding(config).to(model.device)  # buffers computed from the config
    return lm.eval()


def native_cache(lm, prefilled: dict, kind: str, decode_tokens: int):
    """A `DynamicCache` or a `StaticCache` (sized to prompt + decode, as `generate` sizes it) holding
    the prompt's K/V, copied from our full cache after the prefill: the same prompt forward on the
    same weights, so the peers' prefill is not paid again; their decode is their own."""
    from transformers import DynamicCache, StaticCache

    if kind == "static":
        cache = StaticCache(config=lm.config, max_cache_len=prefilled["position"] + decode_tokens)
    else:
        cache = DynamicCache(config=lm.config)
    for idx, layer in enumerate(prefilled["cache"].layers):
        cache.update(layer.keys.clone(), layer.values.clone(), idx)
    return cache


def compiled_forward(lm):
    """transformers' forward as a speed-minded user compiles it over a StaticCache (CUDA graphs
    on CUDA), once per process."""
    from hae_cli.model.compiled import default_mode

    if not hasattr(lm, "compiled_forward"):
        lm.compiled_forward = torch.compile(lm.forward, dynamic=False, mode=default_mode(lm.lm_head.weight.device))
    return lm.compiled_forward


def timed_native_decode(lm, prefilled: dict, kind: str, decode_tokens: int, steps: int | None = None) -> dict:
    """`decode_tokens` greedy steps (`steps`: fewer, a warm-up, over the same cache size) of
    transformers' own forward, from the full cache's prefill (`kind` "static compiled": the
    compiled forward over a StaticCache)."""
    device = lm.lm_head.weight.device
    forward = compiled_forward(lm) if kind == "static compiled" else lm
    cache = native_cache(lm, prefilled, kind.split()[0], decode_tokens)
    decode_tokens = steps or decode_tokens
    logits, position = prefilled["logits"], prefilled["position"]
    step_seconds, tokens = [], []
    with torch.inference_mode():
        for _ in range(decode_tokens):
            token = int(logits.argmax())
            tokens.append(token)
            start = clock(device)
            ids, positions = torch.tensor([[token]], device=device), torch.tensor([[position]], device=device)
            logits = forward(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
            step_seconds.append(clock(device) - start)
            position += 1
    decode_seconds = sum(step_seconds)
    return {"decode_seconds": decode_seconds, "tokens_per_second": decode_tokens / decode_seconds, "tokens": tokens}


def measure_size(model, tokenizer, pictures: list, size: int, policies: dict, args, native=None) -> dict:
    """Prefill `--prefill-repeats` times and decode `--repeats` times (each from a copy of the
    last prefilled cache) per policy, and as often each peer (`native`: transformers' own model,
    decoding from the full cache's prefill), interleaved so that load drift hits all alike.
    With `--compile`, each policy also decodes through the compiled step ("<policy> compiled")
    from the same prefills, and the peers gain transformers' compiled StaticCache forward; each
    compiled graph is warmed up once per size before anything is timed."""
    prompt, embeds, images = image_prompt(model, tokenizer, pictures, size)
    repeats = args.large_repeats if args.large_repeats and size >= args.large_size else args.repeats
    compiled = [f"{name} compiled" for name in policies] if args.compile else []
    peer_kinds = dict(PEERS, **({COMPILED_PEER: "static compiled"} if args.compile else {}))
    prefills: dict[str, list[dict]] = {name: [] for name in policies}
    decodes: dict[str, list[dict]] = {name: [] for name in list(policies) + compiled}
    peers: dict[str, list[dict]] = {name: [] for name in (peer_kinds if native is not None else ())}
    warmups: dict[str, float] = {}
    for rep in range(max(repeats, args.prefill_repeats)):
        for name, (policy, params) in policies.items():
            if rep < args.prefill_repeats or not prefills[name]:
                prefills[name].append(timed_prefill(model, prompt, embeds, policy, params))
            if rep >= repeats:
                continue
            decodes[name].append(timed_decode(prefills[name][-1], model, args.decode_tokens))
            if args.compile:
                if rep == 0:
                    warmup = timed_decode(prefills[name][-1], model, args.decode_tokens, compiled=True, steps=2)
                    warmups[f"{name} compiled"] = warmup["compile_seconds"]
                decodes[f"{name} compiled"].append(timed_decode(prefills[name][-1], model, args.decode_tokens, compiled=True))
        for name, kind in peer_kinds.items() if rep < repeats and peers else ():
            if rep == 0 and kind == "static compiled":
                start = time.perf_counter()
                timed_native_decode(native, prefills["full"][-1], kind, args.decode_tokens, steps=2)
                warmups[name] = time.perf_counter() - start
            peers[name].append(timed_native_decode(native, prefills["full"][-1], kind, args.decode_tokens))
        for name in policies:  # only the newest prefilled cache is decoded from; free the others
            for old in prefills[name][:-1]:
                old.pop("cache", None)
    summary = {"prompt_tokens": int(embeds.shape[1]), "images": images, "repeats": repeats,
               "compile_warmup_seconds": warmups}
    ours = [run["tokens"] for run in decodes["full"]]
    for name, runs in peers.items():
        summary[name] = {
            "tokens_per_second": median_of(runs, "tokens_per_second"),
            "decode_seconds": median_of(runs, "decode_seconds"),
            "same_tokens_as_full": all(run["tokens"] == ours[0] for run in runs),
            "decode_runs": runs,
        }
    for name in policies:
        for run in prefills[name]:
            run.pop("cache", None)
            run.pop("logits", None)
    for name, d in decodes.items():
        p = prefills[name.removesuffix(" compiled")]
        summary[name] = {
            "prefill_seconds": median_of(p, "prefill_seconds"),
            "prefill_overhead_seconds": median_of(p, "prefill_overhead_seconds"),
            "held_after_prefill": p[0]["held_after_prefill"],
            "tokens_per_second": median_of(d, "tokens_per_second"),
            "decode_seconds": median_of(d, "decode_seconds"),
            "decode_overhead_share": median_of(d, "decode_overhead_share"),
            "decode_overhead_share_by_part": {
                part: statistics.median(r["decode_overhead_seconds"][part] / r["decode_seconds"] for r in d)
                for part in d[0]["decode_overhead_seconds"]
            },
            "kv_bytes_mean": median_of(d, "kv_bytes_mean"),
            "kv_bytes_allocated_max": max(r["kv_bytes_allocated_max"] for r in d),
            "decode_rounds": d[0]["rounds"],
            "seconds_per_round": statistics.median(r["seconds_per_round"] for r in d) if d[0]["rounds"] else None,
            "same_tokens_as_eager": name in policies or all(
                r["tokens"] == decodes[name.removesuffix(" compiled")][0]["tokens"] for r in d),
            "prefill_runs": p if name in policies else "as for " + name.removesuffix(" compiled"),
            "decode_runs": d,
        }
    return summary


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def traffic_limit(weights: int, kv_full: float, kv_hae: float) -> float:
    """(W + K_full) / (W + K_hae): the speedup if a decode step moved each byte it needs once
    (the weights and the held K/V; our layers append in place, so attention's read is the pass)."""
    return (weights + kv_full) / (weights + kv_hae)


# --------------------------------------------------------------------------- main


COLUMNS = (
    "tokens",
    "full tok/s",
    "hae tok/s",
    "Dynamic tok/s",
    "Static tok/s",
    "full / Static",
    "speedup",
    "traffic limit",
    "speedup / limit",
    "KV cut %",
    "evict share %",
    "ms / round",
    "prefill full s",
    "prefill hae s",
    "prefill hae/full",
)


def compare(size: int, m: dict, weights_read: int) -> dict:
    """One size's measurements and the ratios the table shows."""
    full, hae = m["full"], m["hae"]
    speedup = hae["tokens_per_second"] / full["tokens_per_second"]
    limit = traffic_limit(weights_read, full["kv_bytes_mean"], hae["kv_bytes_mean"])
    peers = {name: m[name] for name in PEERS if name in m}
    return {
        "size": size,
        **m,
        "speedup": speedup,
        "traffic_limit": limit,
        "speedup_over_limit": speedup / limit,
        "full_over_peer": {name: full["tokens_per_second"] / peer["tokens_per_second"] for name, peer in peers.items()},
        "peers_same_tokens_as_full": all(peer["same_tokens_as_full"] for peer in peers.values()),
        "prefill_ratio": hae["prefill_seconds"] / full["prefill_seconds"],
        "kv_cut_pct": 100 * (1 - hae["kv_bytes_mean"] / full["kv_bytes_mean"]),
        "eviction_share_pct": 100 * hae["decode_overhead_share"],
        **(compiled_ratios(m, weights_read) if "hae compiled" in m else {}),
    }


def compiled_ratios(m: dict, weights_read: int) -> dict:
    full, hae = m["full compiled"], m["hae compiled"]
    speedup = hae["tokens_per_second"] / full["tokens_per_second"]
    limit = traffic_limit(weights_read, full["kv_bytes_mean"], hae["kv_bytes_mean"])
    return {
        "compiled_speedup": speedup,
        "compiled_traffic_limit": limit,
        "compiled_speedup_over_limit": speedup / limit,
        "compiled_over_eager": {name: m[f"{name} compiled"]["tokens_per_second"] / m[name]["tokens_per_second"]
                                for name in ("full", "hae")},
        "compiled_same_tokens": all(m[f"{name} compiled"]["same_tokens_as_eager"] for name in ("full", "hae")),
    }


def size_reaching(rows: list[dict], key: str, target: float = 1.5) -> str:
    """The prompt size where `key` (a speedup) first reaches `target`: measured, or linearly
    interpolated between the two sizes around it; or that it was not reached."""
    points = [(row["prompt_tokens"], row[key]) for row in rows if key in row]
    for (x0, y0), (x1, y1) in zip([(None, None)] + points, points):
        if y1 >= target:
            if x0 is None or y0 >= target:
                return f"{x1:,} tokens (measured {y1:.2f}x)"
            return f"about {x0 + (target - y0) * (x1 - x0) / (y1 - y0):,.0f} tokens (between {x0:,} at {y0:.2f}x and {x1:,} at {y1:.2f}x)"
    if not points:
        return "not measured"
    return f"not within the sizes measured (best {max(y for _, y in points):.2f}x)"


COMPILED_COLUMNS = (
    "tokens", "full eager", "full compiled", "compiled/eager", "hae eager", "hae compiled", "compiled/eager",
    "Static", "Static compiled", "speedup eager", "speedup compiled", "traffic limit", "compiled / limit",
    "warm-up s (full, hae, Static)",
)


def print_compiled(rows: list[dict]) -> None:
    """The compiled step beside eager, and transformers' compiled StaticCache forward (tok/s)."""
    table = []
    for row in rows:
        tps = {name: row[name]["tokens_per_second"] if name in row else None
               for name in ("full", "full compiled", "hae", "hae compiled", "StaticCache", COMPILED_PEER)}
        warm = row.get("compile_warmup_seconds", {})
        table.append([
            row["prompt_tokens"], tps["full"], tps["full compiled"], row["compiled_over_eager"]["full"],
            tps["hae"], tps["hae compiled"], row["compiled_over_eager"]["hae"], tps["StaticCache"], tps[COMPILED_PEER],
            row["speedup"], row["compiled_speedup"], row["compiled_traffic_limit"], row["compiled_speedup_over_limit"],
            ", ".join(f"{warm[k]:.1f}" if warm.get(k) is not None else "-"
                      for k in ("full compiled", "hae compiled", COMPILED_PEER)),
        ])
    same = all(row["compiled_same_tokens"] for row in rows)
    common.print_table(
        "tokens per second: the compiled decode step beside eager, and transformers' compiled StaticCache forward",
        COMPILED_COLUMNS, table,
        caption=f"greedy tokens of the compiled step equal to eager: {'yes' if same else 'NO'}; speedup = hae / full "
                "tok/s; warm-up = the first compiled call at that size (not in the tok/s)\n"
                f"where HAE reaches 1.5x over full: eager, {size_reaching(rows, 'speedup')}; "
                f"compiled, {size_reaching(rows, 'compiled_speedup')}",
    )


def print_rows(title: str, rows: list[dict], caption: str) -> None:
    parts = [p for p in rows[0]["hae"]["decode_overhead_share_by_part"] if p != "prefill"] if rows else []
    table = []
    for row in rows:
        full, hae = row["full"], row["hae"]
        peer = {name: row[name]["tokens_per_second"] if name in row else None for name in PEERS}
        round_ms = None if hae["seconds_per_round"] is None else 1000 * hae["seconds_per_round"]
        table.append(
            [
                row["prompt_tokens"],
                full["tokens_per_second"],
                hae["tokens_per_second"],
                peer["DynamicCache"],
                peer["StaticCache"],
                row["full_over_peer"].get("StaticCache"),
                row["speedup"],
                row["traffic_limit"],
                row["speedup_over_limit"],
                row["kv_cut_pct"],
                row["eviction_share_pct"],
                round_ms,
                full["prefill_seconds"],
                hae["prefill_seconds"],
                row["prefill_ratio"],
            ]
            + [100 * hae["decode_overhead_share_by_part"][part] for part in parts]
        )
    same = all(row["peers_same_tokens_as_full"] for row in rows)
    caption += (
        "\ntraffic limit = (W + K_full) / (W + K_hae), W = weight bytes read per decoded token, K = mean KV bytes held "
        "while decoding; Dynamic / Static = transformers' Phi3ForCausalLM (sdpa) on the same weights with DynamicCache / "
        f"StaticCache, decoding from the full cache's prefill (greedy tokens equal to full: {'yes' if same else 'NO'}); "
        "evict share = HAE's eviction work / decode time, ms / round = one round over every layer "
        f"(split by the cache's overhead_seconds: {', '.join(parts)})"
    )
    common.print_table(title, COLUMNS + tuple(f"{part} %" for part in parts), table, caption=caption)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,2048,4096,8192,12288", help="prompt sizes in tokens (default 1024..12288)")
    parser.add_argument("--repeats", type=int, default=5, help="timed decodes per size and policy, each from a copy of a prefilled cache; the median is reported (default 5)")
    parser.add_argument("--prefill-repeats", type=int, default=2, help="timed prefills per size and policy; the median is reported (default 2)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="decoded tokens per run (default 64: two HAE rounds at d=32)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the scaled model (default 512)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--visual-keep", type=float, default=0.4, help="HAE budget mode: share of visual tokens kept (default 0.4)")
    parser.add_argument("--hae-params", default="", help="extra HAE parameters, e.g. buffer=16,broadcast=true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out-dir", default=None, help="where to write speed.json (default benchmarks/results)")
    parser.add_argument("--no-peers", action="store_true", help="skip transformers' own Phi-3 (DynamicCache, StaticCache)")
    parser.add_argument("--compile", action="store_true",
                        help="also decode through the compiled step (full and hae), and time transformers' StaticCache "
                             "forward under torch.compile; one untimed warm-up per size compiles each graph")
    parser.add_argument("--large-size", type=int, default=16384, help="sizes from here on use --large-repeats")
    parser.add_argument("--large-repeats", type=int, default=0, help="timed decodes at the large sizes (0: --repeats)")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def hae_params(args) -> dict:
    # no per-image floor: the kept share is `visual_keep` alone, as in the tables measured so far
    return {"visual_keep": args.visual_keep, "r_i": 1.0, "image_floor": 0.0, **common.parse_params(args.hae_params)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.set_threads(args.threads)
    started = time.perf_counter()
    cond = common.conditions(note="timings are only meaningful with demo_training_running false")
    model, tokenizer, intermediate = build_scaled_model(args.hidden, args.layers, args.seed)
    weights = weight_bytes(model)
    text = model.config.text
    kv_per_token = text.num_hidden_layers * 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4
    model_info = {
        "hidden_size": text.hidden_size,
        "layers": text.num_hidden_layers,
        "heads": text.num_attention_heads,
        "kv_heads": text.num_key_value_heads,
        "head_dim": text.hidden_size // text.num_attention_heads,
        "intermediate_size": intermediate,
        "dtype": "float32",
        "weight_bytes": weights["total"],
        "weight_bytes_read_per_decoded_token": weights["read_per_decoded_token"],
        "kv_bytes_per_token": kv_per_token,
        "kv_per_token_over_weights": kv_per_token / weights["total"],
        "phi35v_kv_per_token_over_weights": PHI35V_RATIO,
    }
    print(
        f"scaled model: hidden {text.hidden_size}, {text.num_hidden_layers} layers, {text.num_attention_heads} heads "
        f"(= KV heads) x {kv_per_token // (2 * 4 * text.num_hidden_layers * text.num_key_value_heads)}, MLP {intermediate}, fp32; "
        f"W = {common.mib(weights['total']):.1f} MiB ({common.mib(weights['read_per_decoded_token']):.1f} MiB read per token)\n"
        f"KV bytes per token / weight bytes: ours {model_info['kv_per_token_over_weights']:.4e}, "
        f"Phi-3.5-V {PHI35V_RATIO:.4e} ({PHI35V_KV_BYTES_PER_TOKEN:,} B / {PHI35V_WEIGHT_BYTES:.3e} B)"
    )
    policies = {"full": ("full", {}), "hae": ("hae", hae_params(args))}
    sizes = common.parse_list(args.sizes, int)

    native = None if args.no_peers else native_lm(model)

    pictures = easyvqa_pictures()
    warm_prompt, warm_embeds, _ = image_prompt(model, tokenizer, pictures, min(sizes))
    for policy, params in policies.values():  # warm-up: allocator, kernels, lazy imports
        warm = timed_prefill(model, warm_prompt, warm_embeds, policy, params)
        timed_decode(warm, model, min(8, args.decode_tokens))
        for kind in PEERS.values() if native is not None and policy == "full" else ():
            timed_native_decode(native, warm, kind, min(8, args.decode_tokens))

    rows = []
    for size in sizes:
        if not args.quiet:
            print(f"  measuring {size} tokens ...", file=sys.stderr, flush=True)
        m = measure_size(model, tokenizer, pictures, size, policies, args, native)
        rows.append(compare(size, m, weights["read_per_decoded_token"]))
    print_rows(
        f"decode and prefill, hae (visual_keep {args.visual_keep}, r_i 1.0) vs full; median of {args.repeats} decodes "
        f"of {args.decode_tokens} tokens and {args.prefill_repeats} prefills",
        rows,
        common.describe_conditions(cond),
    )
    if args.compile:
        print_compiled(rows)
    out = {
        "benchmark": "speed",
        "conditions": cond,
        "args": vars(args),
        "model": model_info,
        "hae_params": policies["hae"][1],
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out["conditions"]["ended_with_training_running"] = bool(common.other_heavy_processes())
    path = common.write_json("speed", out, args.out_dir)
    print(f"wrote {path} in {out['seconds']} s")
    return out


if __name__ == "__main__":
    main()
