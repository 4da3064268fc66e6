"""The printout of `ddpm bench`, from its figures: one table of line templates.

Each entry of REPORT is (template, condition): the template is filled from the values
`_values` derives from the bench's result dict (numbers already formatted), and the
line is printed when the condition (a value's name, or None for always) is truthy.
A figure added to the bench is a key in the result and a row here.
"""

from __future__ import annotations

from typing import Any

REPORT: tuple[tuple[str, str | None], ...] = (
    ("ddpm bench  {date}  ({length})", None),
    ("device: {device}; torch {torch}; host load average {load} on {cores} cores at the start",
     None),
    ("model: {parameters:,} parameters, channels {channels}, {size}x{size} images, {gflop:.2f} "
     "GFLOP forward, {train_gflop:.1f} GFLOP per training image (3x forward)", None),
    ("batches: training {train_batch}, sampling {sample_batch}{lowered}", None),
    ("peak: {peak_what} on this {kind}: {peak} TFLOP/s (the MFU denominator)", None),
    ("", None),
    ("training: forward + backward + Adam + EMA on random data (a first step, then at least "
     "{train_budget} of steps)", None),
    ("  eager fp32 {eager_ips:>9} img/s {eager_tflops:>8} TFLOP/s {eager_mfu:5.1f} % MFU  "
     "{eager_step}/step ({eager_timed} timed), first {eager_first}  [{eager_config}]", None),
    ("  fast       {fast_ips:>9} img/s {fast_tflops:>8} TFLOP/s {fast_mfu:5.1f} % MFU  "
     "{fast_step}/step ({fast_timed} timed), first {fast_first}  [{fast_config}]", None),
    ("{fallbacks}", "fallbacks"),
    ("  compile: off (train.compile is {compile_setting!r}{compile_why})", "not_compiled"),
    ("  the fast path is the seed's here: training turns bf16, channels_last and fused Adam "
     "on for CUDA (train.precision: bf16, train.channels_last: on and train.compile: on force "
     "those three)", "same_path"),
    ("  fast / eager fp32: {speedup:.2f}x   {speedup_verdict}", None),
    ("  MFU of the fast path: {fast_mfu:.1f} %   {mfu_verdict}", None),
    ("", None),
    ("epoch ends (the train stage's strip every {strip_every} and checkpoint every "
     "{checkpoint_every} epochs):", None),
    ("  reverse strip: {T} batch-1 steps of the EMA model, {strip} ({strip_step} per step; "
     "{strip_timed} timed); the first call {strip_first} (compiling, where it compiles)", None),
    ("  checkpoint {ckpt_mib:,.0f} MiB: training waits {stall} (host copy; the first "
     "{first_stall}, allocating), written in {write} in the background; a synchronous save "
     "waits {sync} ({sync_ratio:.0f}x)", None),
    ("", None),
    ("sampling: eval U-Net, {sample_path}; batch {sample_batch}; time per model evaluation "
     "over runs of a few, times the full step count", None),
    ("  DDPM-{ddpm_steps:<4} {ddpm_ips:>9} img/s  ({ddpm_step} per step of {sample_batch}; "
     "{ddpm_timed} steps timed; first call {ddpm_first})  10,000 samples: {ddpm_10k}   "
     "{ddpm_verdict}", None),
    ("  DDIM-{ddim_steps:<4} {ddim_ips:>9} img/s  ({ddim_step} per step of {sample_batch}; "
     "{ddim_timed} steps timed; first call {ddim_first})  10,000 samples: {ddim_10k}   "
     "{ddim_verdict}", None),
    ("  at {equal_steps} model evaluations each: {per_sampler}", None),
    ("", None),
    ("inception: unavailable ({inception_unavailable})", "inception_unavailable"),
    ("inception (TF-Inception pool3, fp32, batch {inception_batch}):", "inception_ok"),
    ("  network alone on {kind} (299x299 input)  {network_ips:>9} img/s", "inception_ok"),
    ("  extract_features: unavailable ({extract_unavailable})", "extract_unavailable"),
    ("  extract_features (resize + network)        {extract_ips:>9} img/s over {extract_n} "
     "images; 10,000 images: {extract_10k}", "extract_ok"),
    ("", None),
    ("the train stage, {epochs} epochs x {dataset:,} images (step variant: {fast_config}):",
     None),
    ("  steps at the fast rate {p_steps} + strips {p_strips} + checkpoint waits {p_ckpt} + "
     "in-training FID {p_fid} + once (compiling, allocating) {p_once} = {p_total}   "
     "{train_verdict}", None),
    ("  in-training FID: {fid_evals} evaluations of {fid_samples} DDIM-{fid_steps} samples, "
     "{fid_each} each ({fid_share:.0%} of the stage)", "fid_every"),
    ("", None),
    ("{memory}", None),
    ("bench time: {bench_time}", None),
)


def number(x: float) -> str:
    """Three significant figures, without scientific notation for everyday sizes."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 3 * 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:,.1f} h"


def describe(bf16: bool, channels_last: bool, compiled: bool) -> str:
    return ", ".join(["bf16 autocast" if bf16 else "fp32",
                      "channels_last" if channels_last else "contiguous",
                      "torch.compile" if compiled else "eager"])


def render(r: dict[str, Any], params: Any, cuda: bool) -> list[str]:
    values = _values(r, params, cuda)
    return [line for template, when in REPORT if when is None or values.get(when)
            for line in template.format(**values).split("\n")]


def _verdict(r: dict[str, Any], name: str, shown: str, cuda: bool) -> str:
    target = r["targets"][name]
    at_least = name in ("speedup", "mfu")
    return f"target {'>=' if at_least else '<='} {shown}" + (
        f"  {'PASS' if target['pass'] else 'MISS'}" if cuda else "")


def _values(r: dict[str, Any], params: Any, cuda: bool) -> dict[str, Any]:
    train, sampling, inception = r["train"], r["sampling"], r["inception"]
    end, proj, cfg = train["epoch_end"], train["projected"], params.train
    v: dict[str, Any] = {
        "date": r["date"], "length": "quick" if r["quick"] else "full", "device": r["device"],
        "torch": r["torch"], "cores": r["host"]["cores"],
        "load": "unknown" if r["host"]["load_average_1min"] is None
        else f"{r['host']['load_average_1min']:.2f}",
        "parameters": r["model"]["parameters"], "channels": r["model"]["channels"],
        "size": r["model"]["image_size"], "gflop": r["model"]["train_flop_per_image"] / 3e9,
        "train_gflop": r["model"]["train_flop_per_image"] / 1e9,
        "train_batch": r["batches"]["train"], "sample_batch": r["batches"]["sample"],
        "lowered": f" ({'; '.join(r['batches']['lowered'])})" if r["batches"]["lowered"] else "",
        "peak_what": r["peak"]["what"], "peak": number(r["peak"]["tflops"]),
        "kind": "cuda" if cuda else "cpu",
        "fallbacks": "\n".join(f"  fell back: {x}" for x in train["fast"]["fallbacks"]),
        "not_compiled": not train["compiled"], "compile_setting": cfg.compile,
        "compile_why": "; compiling failed" if train["fast"]["fallbacks"]
        else "; 'auto' compiles on CUDA",
        "same_path": train["fast"]["config"] == train["eager_fp32"]["config"],
        "speedup": train["speedup"], "speedup_verdict": _verdict(r, "speedup", "2.5x", cuda),
        "mfu_verdict": _verdict(r, "mfu", "20 %", cuda),
        "strip_every": cfg.strip_every, "checkpoint_every": cfg.checkpoint_every,
        "T": params.diffusion.steps, "strip": seconds(end["strip_seconds"]),
        "strip_step": seconds(end["strip_step_s"]), "strip_timed": end["strip_timed_steps"],
        "strip_first": seconds(end["strip_first_call_s"]),
        "ckpt_mib": end["checkpoint_bytes"] / 2**20, "stall": seconds(end["checkpoint_stall_s"]),
        "first_stall": seconds(end["checkpoint_first_stall_s"]),
        "write": seconds(end["checkpoint_write_s"]), "sync": seconds(end["checkpoint_sync_s"]),
        "sync_ratio": end["checkpoint_sync_s"] / max(end["checkpoint_stall_s"], 1e-9),
        "sample_path": describe(**r.get("sample_path", {"bf16": False, "channels_last": False,
                                                        "compiled": False})),
        "epochs": proj["epochs"], "dataset": proj["images"],
        "p_steps": seconds(proj["steps_seconds"]), "p_strips": seconds(proj["strip_seconds"]),
        "p_ckpt": seconds(proj["checkpoint_seconds"]), "p_fid": seconds(proj["fid_seconds"]),
        "p_once": seconds(proj["one_off_seconds"]), "p_total": seconds(proj["seconds"]),
        "train_verdict": _verdict(r, "train_seconds", "25 min", cuda),
        "train_budget": seconds(r.get("budget", {}).get("train_s", 0)),
        "fid_every": cfg.fid_every, "fid_evals": proj["fid_evaluations"],
        "fid_samples": cfg.fid_samples, "fid_steps": min(cfg.fid_steps, params.diffusion.steps),
        "fid_each": seconds(end.get("fid_eval_s", 0.0)),
        "fid_share": proj["fid_seconds"] / max(proj["seconds"], 1e-9),
        "memory": ("peak GPU memory allocated: " + ", ".join(
            f"{k} {b / 2**30:.2f} GiB" for k, b in r["memory_bytes"].items())) if cuda
        else f"peak RSS of this process: {r['memory_bytes']['process_rss'] / 2**30:.2f} GiB",
        "bench_time": seconds(r["bench_seconds"]),
    }
    for name, key in (("eager", "eager_fp32"), ("fast", "fast")):
        f = train[key]
        v.update({f"{name}_ips": number(f["images_per_s"]), f"{name}_tflops": number(f["tflops"]),
                  f"{name}_mfu": 100 * f["mfu"], f"{name}_step": seconds(f["step_s"]),
                  f"{name}_timed": f["timed_steps"], f"{name}_first": seconds(f["first_step_s"]),
                  f"{name}_config": f["config"]})
    for name, shown in (("ddpm", "5 min"), ("ddim", "30 s")):
        f = sampling[name]
        v.update({f"{name}_steps": f["steps"], f"{name}_ips": number(f["images_per_s"]),
                  f"{name}_step": seconds(f["step_s"]), f"{name}_timed": f["timed_steps"],
                  f"{name}_first": seconds(f["first_call_s"]),
                  f"{name}_10k": seconds(f["seconds_10k"]),
                  f"{name}_verdict": _verdict(r, f"{name}_seconds_10k", shown, cuda)})
    equal = sampling["ddim"]["steps"]
    v["equal_steps"] = equal
    v["per_sampler"] = ", ".join(f"{name} {number(f['batch'] / (f['step_s'] * equal))} img/s"
                                 for name, f in sampling.items())
    v["inception_unavailable"] = inception.get("unavailable")
    v["inception_ok"] = "unavailable" not in inception
    v["inception_batch"] = inception.get("batch")
    v["network_ips"] = number(inception.get("network_images_per_s", 0))
    v["extract_unavailable"] = inception.get("extract_unavailable")
    v["extract_ok"] = "images_per_s" in inception
    v["extract_ips"] = number(inception.get("images_per_s", 0))
    v["extract_n"] = inception.get("images")
    v["extract_10k"] = seconds(inception.get("seconds_10k", 0))
    return v
