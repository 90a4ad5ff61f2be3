"""Train the toy sketch/render pair on procedural clips and save it in diffusers' layout.

    python -m toy.train --out DIR --dit-steps 0          # the VAE alone: one H100, 8 minutes. Then each DiT alone
    CUDA_VISIBLE_DEVICES=0 python -m toy.train --out L --vae-from DIR/sketch --dits large &  # on its own GPU, both
    CUDA_VISIBLE_DEVICES=1 python -m toy.train --out S --vae-from DIR/sketch --dits small    # at once: 7 minutes
                                                         # the pair is then L/sketch with S/render
    python -m toy.train --out /tmp/toy --device cpu --vae-steps 2 --dit-steps 2 --bank 8 --vae-batch 2 --dit-batch 4 \
        --min-vae-adherence 0                                   # CPU smoke test, gate off

Phases, all on `--device`:
  1. VAE: the tiny AutoencoderKLWan (toy/pair.py) on fresh clips every step (toy/data.py, training split), with
     a reconstruction MSE on the decoder's raw output that weighs the moving shape's pixels up (`train_vae`). Then
     the per-channel latent mean and std over training clips go into its config (`latents_mean`/`latents_std`,
     which WanPipeline and the engine use to scale latents), and a gate: the detector must read the prompt back
     from >= `--min-vae-adherence` % of held-out reconstructions, else the run stops before the DiTs (exit 1),
     keeping the VAE.
  2. DiTs: a bank of `--bank` training clips is encoded once; the WanTransformer3DModels named by `--dits` train
     on the same batches (a seed gives every process the same ones) with Wan's flow-matching objective (x_t =
     (1 - s) x_0 + s e, target e - x_0, timestep 1000 s, s drawn uniformly then shifted by `--flow-shift` as the
     sampler's schedule is) and 10% of the prompts replaced by the empty prompt's embedding (classifier-free
     guidance). Weights are averaged (EMA) and the averages are saved.
Prompt embeddings come from WanPipeline.encode_prompt, the code path the engine runs, over every prompt of the
grammar. Each phase runs the steps that fit its `--*-seconds` (at most its step count; `StepPlan`); training.json
records the steps planned and run, and the loss curves.

The shipped pair (serve/presets/toy, bench/RESULTS.md toy runs 3 and 7) came from these defaults: the VAE on one
H100 in one call, then the two DiTs in a later one, one process per GPU.

Output: OUT/sketch (a full WanPipeline: tokenizer, text encoder, VAE, scheduler, and the large transformer if it
was trained), OUT/render (the small transformer, if trained) and OUT/training.json; weights stored in float16.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from toy import data, pair
from toy.detector import adherence, detect


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def all_prompts() -> list[str]:
    """Every prompt of the grammar (held-out ones included: the table is shared with evaluation)."""
    return [
        data.Scene(shape=sh, colour=c, size=si, direction=d, speed=sp, background=b, start_x=0.0, start_y=0.0).prompt
        for si, c, sh, d, sp, b in itertools.product(
            data.SIZES, data.COLOURS, data.SHAPES, data.DIRECTIONS, data.SPEEDS, data.BACKGROUNDS
        )
    ]


def encode_prompts(pipe, prompts: list[str], device, chunk: int = 128) -> torch.Tensor:
    """[len(prompts), 512, TEXT_DIM] float32, through diffusers' encode_prompt (as the Wan family's encode)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(prompts), chunk):
            embeds, _ = pipe.encode_prompt(
                prompt=prompts[i : i + chunk], do_classifier_free_guidance=False,
                max_sequence_length=pair.MAX_SEQUENCE_LENGTH, device=device,
            )
            out.append(embeds.float())
    return torch.cat(out).clone()


def flow_matching_example(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor):
    """Wan's flow-matching training example: (x_t, the timestep the model sees, the velocity it must predict).

    The sampler (diffusers' UniPC with flow sigmas) feeds the model timestep = 1000 sigma and reads its output as
    noise - x_0; tests/test_toy_train.py checks that a model answering exactly this target lets the engine's sampler
    land on x_0.
    """
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise, sigma * 1000, noise - x0


class StepPlan:
    """How many steps a phase runs, and its learning rate at each: linear warm-up, then cosine decay to 5%.

    A phase is limited both by a step count and by seconds. A schedule that decays over the step count alone would
    be cut off mid-decay by the time limit, so the plan times steps 5-24 and fixes the total then; from there the
    learning rate is a function of the step alone. The time limit stays a hard stop (a slower stretch can end a
    phase a few steps short of its plan).
    """

    def __init__(self, max_steps: int, seconds: float, warmup: int):
        self.total, self.seconds, self.warmup = max_steps, seconds, warmup
        self.start = time.perf_counter()
        self._t5 = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def keep_going(self, step: int) -> bool:
        if step == 5:
            self._t5 = time.perf_counter()
        elif step == 25 and self._t5 is not None:
            per_step = (time.perf_counter() - self._t5) / 20
            self.total = min(self.total, 25 + int(0.97 * (self.seconds - self.elapsed()) / per_step))
        return step < self.total and self.elapsed() < self.seconds

    def lr(self, step: int, base: float) -> float:
        if step < self.warmup:
            return base * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def foreground(clips: torch.Tensor) -> torch.Tensor:
    """[B, 1, F, H, W] mask of the pixels that differ from the frame's corner, which is always background."""
    return (clips - clips[..., :1, :1]).abs().amax(dim=1, keepdim=True) > 0.05


def train_vae(vae, args, device) -> dict:
    """Reconstruction MSE on the decoder's raw output, plus a small L2 pull on the latent means.

    The loss reads the decoder's output before diffusers' final clamp to [-1, 1] (a forward hook on the decoder
    collects it, one latent frame at a time): black and white backgrounds sit exactly on that bound, so a loss
    after the clamp gets no gradient from every pixel that overshoots. Pixels of the moving shape weigh
    `--vae-foreground-weight` times a background pixel: the shape covers 2-14% of a frame, yet it is all that the
    prompt describes. The latents are the posterior means: text-to-video only ever decodes, so the encoder's
    variance is never used, and sampling it only slowed learning. Every 250 steps the detector reads 64 held-out
    reconstructions, so the log shows when the VAE starts to keep what the prompt describes.
    """
    decoded = []
    hook = vae.decoder.register_forward_hook(lambda module, inputs, output: decoded.append(output))
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    plan, log, step = StepPlan(args.vae_steps, args.vae_seconds, warmup=100), [], 0
    try:
        while plan.keep_going(step):
            vae.train().requires_grad_(True)
            for group in opt.param_groups:
                group["lr"] = plan.lr(step, args.vae_lr)
            scenes = data.sample_scenes(args.vae_batch, seed=args.seed * 1_000_003 + step)
            clips = data.render_clips(scenes, frames=args.vae_frames, device=device)
            decoded.clear()
            with _autocast(device):
                latents = vae.encode(clips).latent_dist.mode()
                vae.decode(latents)
            weight = 1 + (args.vae_foreground_weight - 1) * foreground(clips).float()
            mse = (weight * (torch.cat(decoded, dim=2).float() - clips) ** 2).mean() / weight.mean()
            loss = mse + args.vae_l2 * latents.float().pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            if step % 250 == 0:
                row = {"step": step, "weighted_mse": mse.item(), "s": plan.elapsed(),
                       "lr": opt.param_groups[0]["lr"]}
                decoded.clear()
                # 64 held-out clips in the log (the final check takes --check-clips), fewer if asked for fewer
                clips_now = min(64, args.check_clips)
                row.update({f"held_out_{k}": v for k, v in check_vae(vae, device, args.seed + 8, clips_now).items()})
                log.append(row)
                print("vae " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
            step += 1
    finally:
        hook.remove()
    vae.eval().requires_grad_(False)
    return {"steps": step, "planned_steps": plan.total, "seconds": plan.elapsed(), "log": log}


@torch.no_grad()
def encode_clips(vae, scenes: list[data.Scene], device, chunk: int = 256) -> torch.Tensor:
    """Posterior means, unscaled, float32 on `device`."""
    out = []
    for i in range(0, len(scenes), chunk):
        clips = data.render_clips(scenes[i : i + chunk], device=device)
        with _autocast(device):
            out.append(vae.encode(clips).latent_dist.mode().float())
    return torch.cat(out)


def scaled_latents(vae, scenes: list[data.Scene], device) -> torch.Tensor:
    """The latents the DiTs see: posterior means scaled by the VAE config's per-channel mean and std."""
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    return (encode_clips(vae, scenes, device) - mean) / std


@torch.no_grad()
def set_latent_stats(vae, device, seed: int, count: int) -> dict:
    z = encode_clips(vae, data.sample_scenes(count, seed=seed), device)
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(latents_mean=[round(v, 5) for v in mean.tolist()],
                           latents_std=[round(v, 5) for v in std.tolist()])
    return {"latents_mean": vae.config.latents_mean, "latents_std": vae.config.latents_std}


@torch.no_grad()
def check_vae(vae, device, seed: int, count: int) -> dict:
    """On held-out clips: pixel MSE (in [-1, 1]) of encode-decode, and the share of reconstructions in which the
    detector (toy/detector.py) still reads the prompt's colour, shape and direction: the ceiling of every DiT."""
    scenes = data.sample_scenes(count, seed=seed, split="eval")
    clips = data.render_clips(scenes, device=device)
    vae.eval()
    with _autocast(device):
        recon = vae.decode(vae.encode(clips).latent_dist.mode()).sample.float()
    read = [adherence(detect(data.frames_uint8(r)), s.attributes)["all"] for r, s in zip(recon, scenes)]
    return {"mse": F.mse_loss(recon, clips).item(), "adherence": 100.0 * sum(read) / len(read)}


def train_dits(models: dict, bank: torch.Tensor, bank_prompts: torch.Tensor, embeds: torch.Tensor,
               null_embed: torch.Tensor, args, device) -> dict:
    opts = {n: torch.optim.AdamW(m.parameters(), lr=args.dit_lr, weight_decay=0.0) for n, m in models.items()}
    emas = {n: [p.detach().clone() for p in m.parameters()] for n, m in models.items()}
    for m in models.values():
        m.train().requires_grad_(True)
    gen = torch.Generator(device).manual_seed(args.seed)
    plan, log, step = StepPlan(args.dit_steps, args.dit_seconds, warmup=200), [], 0
    while plan.keep_going(step):
        idx = torch.randint(len(bank), (args.dit_batch,), device=device, generator=gen)
        x0 = bank[idx].float()
        text = embeds[bank_prompts[idx]]
        drop = torch.rand(args.dit_batch, device=device, generator=gen) < args.uncond_prob
        text = torch.where(drop[:, None, None], null_embed.expand_as(text), text)
        u = torch.rand(args.dit_batch, device=device, generator=gen)
        sigma = args.flow_shift * u / (1 + (args.flow_shift - 1) * u)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        xt, timestep, target = flow_matching_example(x0, noise, sigma)
        log_now = step % 100 == 0
        losses = {}
        for name, model in models.items():
            for group in opts[name].param_groups:
                group["lr"] = plan.lr(step, args.dit_lr)
            with _autocast(device):
                pred = model(hidden_states=xt, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), target)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opts[name].step()
            with torch.no_grad():
                torch._foreach_lerp_(emas[name], [p.detach() for p in model.parameters()], 1 - args.ema)
            if log_now:
                losses[name] = loss.item()
        if log_now:
            row = {"step": step, **losses, "s": plan.elapsed(), "lr": plan.lr(step, args.dit_lr)}
            log.append(row)
            print("dit " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
        step += 1
    with torch.no_grad():
        for name, model in models.items():
            for p, e in zip(model.parameters(), emas[name]):
                p.copy_(e)
            model.eval().requires_grad_(False)
    return {"steps": step, "planned_steps": plan.total, "seconds": plan.elapsed(), "log": log}


def save(out: Path, tokenizer, text_encoder, vae, large, small, flow_shift: float) -> dict:
    """OUT/sketch (the pipeline, without a transformer if `large` is None) and OUT/render (unless `small` is None)."""
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=large,
                       scheduler=pair.scheduler(flow_shift))
    pipe.to(torch.float16)
    # shards under 5 MB: the repository keeps no large files (the large DiT alone is 12 MB)
    pipe.save_pretrained(out / "sketch", max_shard_size="4MB")
    if small is not None:
        small.to(torch.float16).save_pretrained(out / "render", max_shard_size="4MB")
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    return {"bytes_total": sum(sizes.values()), "files": sizes}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for sketch/, render/ and training.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=3000)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-frames", type=int, default=17,
                    help="frames of the VAE's training clips; keep the clips' full length: a VAE trained on 9 "
                    "frames reconstructs frames 10-17 with 5-10x the error (bench/RESULTS.md, toy run 2)")
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--vae-foreground-weight", type=float, default=10.0,
                    help="loss weight of a pixel of the moving shape against one of the background (toy run 3: "
                    "with 1 the detector read 73.5%% of held-out reconstructions, with 10 85%%)")
    ap.add_argument("--vae-l2", type=float, default=1e-5, help="weight of the L2 pull on the latent means")
    ap.add_argument("--check-clips", type=int, default=200, help="held-out clips of the final VAE check (the "
                    "training log's checks take at most 64)")
    ap.add_argument("--vae-from", help="a pipeline directory whose trained VAE to reuse (skips the VAE phase)")
    ap.add_argument("--min-vae-adherence", type=float, default=80.0,
                    help="stop before the DiTs (exit 1, VAE saved) if the detector reads fewer %% of held-out "
                    "reconstructions correctly: no DiT can do better than its VAE (the shipped one: 85%%, every "
                    "miss the outline of a small shape)")
    ap.add_argument("--vae-seconds", type=float, default=450.0, help="the VAE phase's time budget")
    ap.add_argument("--bank", type=int, default=40_000, help="training clips encoded once for the DiTs")
    ap.add_argument("--dit-steps", type=int, default=20_000)
    ap.add_argument("--dit-batch", type=int, default=128)
    ap.add_argument("--dit-lr", type=float, default=5e-4)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--uncond-prob", type=float, default=0.1)
    ap.add_argument("--flow-shift", type=float, default=1.0,
                    help="the sampler's shift, which the toy preset uses too (Wan uses 3 at 480p and 5 at 720p: "
                    "the shift grows with resolution, and 64x64 is 1%% of 480p)")
    ap.add_argument("--dit-seconds", type=float, default=340.0, help="the DiT phase's time budget")
    ap.add_argument("--dits", default="large,small", type=lambda s: [n for n in s.split(",") if n],
                    help="which DiTs to train, comma-separated. Two processes, one DiT each on its own GPU, give "
                    "each DiT every step that fits its time budget; side by side they share one GPU's steps")
    ap.add_argument("--commit", default=os.environ.get("BENCH_COMMIT"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed clip shapes: the VAE's 3D convolutions get the fastest kernels
    t_start = time.perf_counter()
    from diffusers import WanPipeline

    tokenizer = pair.word_tokenizer()
    text_encoder = pair.text_encoder(len(tokenizer), seed=args.seed).to(device)
    vae = pair.vae(seed=args.seed + 1).to(device)
    unknown = set(args.dits) - {"large", "small"}
    if unknown or not args.dits:
        ap.error(f"--dits: expected 'large', 'small' or both, got {','.join(args.dits) or 'nothing'}")
    seeds = {"large": args.seed + 2, "small": args.seed + 3}
    models = {name: pair.transformer(name, seed=seeds[name]).to(device) for name in args.dits}
    report: dict = {"args": vars(args), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else platform.processor() or "cpu", "torch": torch.__version__,
                    "parameters": {"text_encoder": sum(p.numel() for p in text_encoder.parameters()),
                                   "vae": sum(p.numel() for p in vae.parameters()),
                                   **{n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}}}
    print(f"parameters: {report['parameters']}", flush=True)

    def save_all() -> None:
        report["save"] = save(out, tokenizer, text_encoder, vae, models.get("large"), models.get("small"),
                              args.flow_shift)
        report["seconds_total"] = time.perf_counter() - t_start
        (out / "training.json").write_text(json.dumps(report, indent=1))

    if args.vae_from:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(args.vae_from, subfolder="vae", torch_dtype=torch.float32).to(device)
        report["vae"] = {"from": args.vae_from}
    else:
        report["vae"] = train_vae(vae, args, device)
        report["vae"].update(set_latent_stats(vae, device, seed=args.seed + 7, count=min(2048, max(8, args.bank))))
    report["vae"]["check"] = check_vae(vae, device, seed=args.seed + 8, count=args.check_clips)
    print(f"vae: {report['vae'].get('steps', 0)} steps, held-out {report['vae']['check']}", flush=True)
    if report["vae"]["check"]["adherence"] < args.min_vae_adherence:
        save_all()
        raise SystemExit(f"the VAE's held-out reconstructions are read correctly {report['vae']['check']['adherence']:.1f}% "
                         f"of the time (< --min-vae-adherence {args.min_vae_adherence:g}): DiTs not trained; "
                         f"the VAE is saved in {out}/sketch/vae")

    if args.dit_steps == 0:  # the VAE alone (`--vae-from` reads it back): no bank to encode
        save_all()
        return report
    t0 = time.perf_counter()
    text_pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=None,
                            scheduler=pair.scheduler(args.flow_shift))
    prompts = all_prompts()
    embeds = encode_prompts(text_pipe, prompts + [""], device)
    embeds, null_embed = embeds[:-1], embeds[-1:]
    index = {p: i for i, p in enumerate(prompts)}
    scenes = data.sample_scenes(args.bank, seed=args.seed + 9, split="train")
    bank = scaled_latents(vae, scenes, device).half()
    bank_prompts = torch.tensor([index[s.prompt] for s in scenes], device=device)
    report["bank"] = {"clips": len(scenes), "prompts": len(set(bank_prompts.tolist())), "seconds": time.perf_counter() - t0}
    print(f"bank: {report['bank']}", flush=True)

    report["dit"] = train_dits(models, bank, bank_prompts, embeds, null_embed, args, device)
    save_all()
    print(f"saved {out} ({report['save']['bytes_total'] / 2**20:.1f} MiB) in {report['seconds_total']:.0f} s",
          flush=True)
    if not all(math.isfinite(row[name]) for row in report["dit"]["log"] for name in models):
        raise SystemExit("training diverged: a DiT's loss is not finite (see training.json)")
    return report


if __name__ == "__main__":
    main()
