"""Bytes the cache holds and allocates, per layer and per modality, against the formula; and
the peak during prefill with and without index broadcasting.

1. For every policy, after prefill and after decoding: each layer's K/V bytes held (its
   tokens x the bytes of one row, read from the storage's shape and dtype) against
   `tokens held x 2 x kv_heads x head_dim x dtype size` from the model's config, and the
   recycle bin's bytes measured from its tensors against the same formula for its tokens.
   Layers write K/V in place into preallocated storage, so the bytes **allocated** (the
   storage, measured from the tensors) are reported too, against the bound of a policy with
   a budget: (budget + buffer) x the bytes of one row. Per modality the bytes are that
   modality's tokens times the per-token size (one tensor holds all modalities).
2. HAE's index broadcasting prunes the hidden states at the scoring layer, so later layers
   never compute nor cache the dropped tokens. Without it (hae has no switch for this, so
   the same policy runs in a cache whose `after_layer` returns nothing: the cache then
   applies the very same selection, taken from the same attention rows at the scoring
   layer, to every layer once the prompt's forward is done; this is its documented path
   under transformers' own `generate`), every layer first caches the whole prompt. The
   peak is the largest total of K/V storage across layers, sampled after every layer's
   append and every compaction during prefill.

    python benchmarks/memory.py                          # demo model, 4 easy-VQA images
    python benchmarks/memory.py --images 8 --budget 0.3 --decode-tokens 48

Writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

import torch  # noqa: E402

from hae_cli.cache import EvictingCache  # noqa: E402
from hae_cli.cache.modality import MODALITY_NAMES  # noqa: E402
from hae_cli.cache.rounds import held_bound  # noqa: E402

class PeakRecordingCache(EvictingCache):
    """An `EvictingCache` that samples the K/V storage across layers during the prompt's
    forward, and the rows each layer computed. `broadcast=False` declines the decoder's
    between-layer pruning, so the policy's prefill selection is applied after the forward."""

    def __init__(self, *args, broadcast: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.broadcast = broadcast
        self.prefill_peak = 0
        self.rows_computed: dict[int, int] = {}

    def _sample(self) -> None:
        if self.step == 0:
            self.prefill_peak = max(self.prefill_peak, sum(layer.bytes_allocated for layer in self.layers))

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.step == 0:
            self.rows_computed[layer_idx] = key_states.shape[2]
        self._sample()
        return out

    def after_layer(self, layer_idx: int, hidden):
        if not self.broadcast:
            return None
        keep = super().after_layer(layer_idx, hidden)
        self._sample()
        return keep


def formula_bytes(tokens: int, kv_heads: int, head_dim: int, dtype_size: int) -> int:
    return tokens * 2 * kv_heads * head_dim * dtype_size


def layer_report(cache, kv_heads: int, head_dim: int, dtype_size: int) -> list[dict]:
    """Per layer: tokens by modality, held vs formula bytes, allocated vs the bound, bin likewise."""
    stats = cache.stats()
    per_token = formula_bytes(1, kv_heads, head_dim, dtype_size)
    rows = []
    for layer in stats.layers:
        formula = formula_bytes(layer.tokens_held, kv_heads, head_dim, dtype_size)
        bin_formula = formula_bytes(layer.bin_tokens, kv_heads, head_dim, dtype_size)
        bound = held_bound(layer.budget, cache.policy.buffer)
        bound_bytes = None if bound is None else bound * per_token
        rows.append(
            {
                "layer": layer.layer,
                "tokens_held": layer.tokens_held,
                "tokens_by_modality": layer.tokens_by_modality,
                "bytes_by_modality": {m: n * per_token for m, n in layer.tokens_by_modality.items()},
                "bytes_held": layer.bytes_held,
                "bytes_formula": formula,
                "deviation_pct": _deviation(layer.bytes_held, formula),
                "bytes_allocated": layer.bytes_allocated,
                "bound_rows": bound,
                "bound_bytes": bound_bytes,
                "allocated_within_bound": None if bound is None else layer.bytes_allocated <= bound_bytes,
                "bin_tokens": layer.bin_tokens,
                "bin_bytes_measured": layer.bin_bytes,
                "bin_bytes_formula": bin_formula,
                "bin_deviation_pct": _deviation(layer.bin_bytes, bin_formula),
            }
        )
    return rows


def _deviation(measured: int, formula: int) -> float:
    if formula == 0:
        return 0.0 if measured == 0 else float("inf")
    return 100 * (measured - formula) / formula


def run_policy(loaded, prompt, embeds, policy: str, params: dict, decode_tokens: int, broadcast: bool = True):
    """Prefill (report), decode `decode_tokens` greedy steps (report); returns both and the cache."""
    from hae_cli.model.generate import SamplingConfig, decode, prefill

    text = loaded.text_config
    kv_heads = text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    dtype_size = torch.finfo(loaded.dtype).bits // 8
    cache = PeakRecordingCache(policy, loaded.num_layers, broadcast=broadcast, **params)
    with torch.inference_mode():
        position_ids, position = loaded.position_ids(prompt, 0)
        logits = prefill(loaded, embeds, prompt, position_ids, cache)
        after_prefill = layer_report(cache, kv_heads, head_dim, dtype_size)
        kept = [layer.token_index.clone() for layer in cache.layers]
        if decode_tokens:
            decode(loaded, cache, logits, position, SamplingConfig(max_new_tokens=decode_tokens), stop_ids=set(),
                   feed_last=True)
        after_decode = layer_report(cache, kv_heads, head_dim, dtype_size)
    return {
        "after_prefill": after_prefill,
        "after_decode": after_decode,
        "prefill_peak_bytes": cache.prefill_peak,
        "rows_computed": [cache.rows_computed.get(i, 0) for i in range(cache.num_layers)],
        "full_prompt_bytes": formula_bytes(embeds.shape[1], kv_heads, head_dim, dtype_size) * cache.num_layers,
        "kept_positions": kept,
        "events": len(cache.events),
    }


def worst(report: list[dict]) -> float:
    values = [abs(r["deviation_pct"]) for r in report] + [abs(r["bin_deviation_pct"]) for r in report]
    return max(values)


def build_prompt_for(loaded, images: int, seed: int):
    from hae_testing.data import easyvqa
    from hae_cli.model.interface import UserTurn

    image_ids = easyvqa.story_sets("test", 1, images, seed=seed)[0]
    processed = [loaded.read_image(easyvqa.image_path(i, "test")) for i in image_ids]
    prompt = loaded.prompt(UserTurn(easyvqa.STORY_PROMPT, images), processed)
    with torch.inference_mode():
        embeds = loaded.embed(prompt, processed)
    return prompt, embeds, image_ids


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="checkpoint: demo, a folder or a hub id (default: demo)")
    parser.add_argument("--images", type=int, default=4, help="easy-VQA test images in the prompt (default 4)")
    parser.add_argument("--decode-tokens", type=int, default=48, help="greedy decode steps after prefill (default 48)")
    parser.add_argument("--budget", type=float, default=0.3, help="decode budget (fraction of the prompt) for the evicting policies (default 0.3)")
    parser.add_argument("--hae-params", default="visual_keep=0.4,buffer=8", help="HAE parameters (default visual_keep=0.4,buffer=8)")
    parser.add_argument("--fastv-layer", type=int, default=2, help="FastV's K (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out-dir", default=None, help="where to write memory.json (default benchmarks/results)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.set_threads(args.threads)
    from hae_cli.api import load_model

    started = time.perf_counter()
    cond = common.conditions(model=args.model)
    loaded = load_model(args.model)
    prompt, embeds, image_ids = build_prompt_for(loaded, args.images, args.seed)
    hae = {**common.parse_params(args.hae_params), "budget": args.budget}
    policies = {
        "full": ("full", {}),
        "hae": ("hae", hae),
        "mustdrop": ("mustdrop", {k: v for k, v in hae.items() if k in ("visual_keep", "r_g", "r_i", "score_layer", "buffer", "budget")}),
        "h2o": ("h2o", {"budget": args.budget}),
        "streaming": ("streaming", {"budget": args.budget}),
        "snapkv": ("snapkv", {"budget": args.budget}),
        "fastv": ("fastv", {"prune_layer": args.fastv_layer}),
    }
    results = {name: run_policy(loaded, prompt, embeds, p, params, args.decode_tokens) for name, (p, params) in policies.items()}
    prefill_only = {k: v for k, v in hae.items() if k != "budget"}  # no budget round: the selection alone
    broadcast = run_policy(loaded, prompt, embeds, "hae", prefill_only, 0, broadcast=True)
    unbroadcast = run_policy(loaded, prompt, embeds, "hae", prefill_only, 0, broadcast=False)

    detail = results["hae"]
    modalities = list(MODALITY_NAMES.values())
    for stage in ("after_prefill", "after_decode"):
        rows = [
            [r["layer"], r["tokens_held"]]
            + [r["tokens_by_modality"][m] for m in modalities]
            + [r["bytes_held"], r["bytes_formula"], r["deviation_pct"], r["bytes_allocated"], r["bound_bytes"]]
            + [r["bin_tokens"], r["bin_bytes_measured"], r["bin_bytes_formula"]]
            for r in detail[stage]
        ]
        common.print_table(
            f"hae {hae}: bytes per layer {stage.replace('_', ' ')} ({embeds.shape[1]} prompt tokens, {args.images} images)",
            ["layer", "tokens"] + modalities
            + ["bytes held", "formula", "dev %", "allocated", "(B + d) x row", "bin tokens", "bin bytes", "bin formula"],
            rows,
        )
    summary = []
    for name, r in results.items():
        dev = max(worst(r["after_prefill"]), worst(r["after_decode"]))
        layers = r["after_prefill"] + r["after_decode"]
        bounded = [x["allocated_within_bound"] for x in layers if x["allocated_within_bound"] is not None]
        summary.append(
            {
                "policy": name,
                "params": policies[name][1],
                "max_abs_deviation_pct": dev,
                "held_equals_formula": dev == 0,
                "allocated_within_bound": all(bounded) if bounded else None,  # None: no budget, no bound
                "bytes_after_prefill": sum(x["bytes_held"] for x in r["after_prefill"]),
                "bytes_after_decode": sum(x["bytes_held"] for x in r["after_decode"]),
                "allocated_after_decode": sum(x["bytes_allocated"] for x in r["after_decode"]),
                "bound_bytes": sum(x["bound_bytes"] for x in r["after_decode"]) if bounded else None,
                "bin_bytes_after_decode": sum(x["bin_bytes_measured"] for x in r["after_decode"]),
            }
        )

    def verdict(value) -> str:
        return "-" if value is None else "yes" if value else "NO"

    common.print_table(
        "every policy: bytes held vs formula and storage vs (budget + buffer) x row, worst layer (prefill and decode, bin included)",
        ["policy", "max |dev| %", "held = formula", "held after prefill", "held after decode", "allocated after decode",
         "(B + d) x row", "allocated <= bound", "bin bytes"],
        [[s["policy"], s["max_abs_deviation_pct"], verdict(s["held_equals_formula"]), s["bytes_after_prefill"], s["bytes_after_decode"],
          s["allocated_after_decode"], s["bound_bytes"], verdict(s["allocated_within_bound"]), s["bin_bytes_after_decode"]] for s in summary],
        caption=common.describe_conditions(cond) + "\nbound: every layer, after prefill and after decoding; "
        "'-': no decode budget, so no bound (snapkv and fastv evict at prefill only; such a layer gets room for an eighth more rows, at least 64, after the prompt and whenever full)",
    )

    same_kept = all(torch.equal(a, b) for a, b in zip(broadcast["kept_positions"], unbroadcast["kept_positions"]))
    full_peak = results["full"]["prefill_peak_bytes"]
    peaks = [
        ["full", full_peak, 100.0, sum(results["full"]["rows_computed"])],
        ["hae, index broadcasting", broadcast["prefill_peak_bytes"], 100 * broadcast["prefill_peak_bytes"] / full_peak, sum(broadcast["rows_computed"])],
        ["hae, selection applied after prefill", unbroadcast["prefill_peak_bytes"], 100 * unbroadcast["prefill_peak_bytes"] / full_peak, sum(unbroadcast["rows_computed"])],
    ]
    common.print_table(
        f"peak K/V storage during prefill; hae {prefill_only} (no decode budget)",
        ["cache", "peak bytes", "% of full", "rows computed (all layers)"],
        peaks,
        caption=f"same kept set in every layer with and without broadcasting: {same_kept}; "
        f"rows computed per layer: broadcasting {broadcast['rows_computed']}, after prefill {unbroadcast['rows_computed']}",
    )
    for r in list(results.values()) + [broadcast, unbroadcast]:
        r["kept_positions"] = None  # tensors; not needed in the JSON
    out = {
        "benchmark": "memory",
        "conditions": cond,
        "args": vars(args),
        "prompt": {"tokens": int(embeds.shape[1]), "image_ids": image_ids, "by_modality": prompt.counts_by_modality()},
        "policies": {name: {"params": policies[name][1], **r} for name, r in results.items()},
        "summary": summary,
        "all_held_equal_formula": all(s["held_equals_formula"] for s in summary),
        "all_allocated_within_bound": all(s["allocated_within_bound"] is not False for s in summary),
        "prefill_peak": {
            "full": full_peak,
            "hae_params": prefill_only,
            "hae_broadcasting": broadcast["prefill_peak_bytes"],
            "hae_after_prefill": unbroadcast["prefill_peak_bytes"],
            "same_kept_set": same_kept,
            "rows_computed_broadcasting": broadcast["rows_computed"],
            "rows_computed_after_prefill": unbroadcast["rows_computed"],
            "how": "largest total K/V storage across layers, sampled after every append and compaction during prefill",
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    path = common.write_json("memory", out, args.out_dir)
    print(f"wrote {path} in {out['seconds']} s")
    return out


if __name__ == "__main__":
    main()
