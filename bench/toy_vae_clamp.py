"""Why the toy VAE trained badly in toy runs 1 and 2 (bench/RESULTS.md): the same VAE, data and seeds, trained with
the reconstruction loss on diffusers' clamped decoder output and on the raw output before the clamp.

    python -m bench.toy_vae_clamp --steps 40 --batch 4      # CPU, ~4 min; the two variants run one after another

diffusers' AutoencoderKLWan.decode clamps its output to [-1, 1]. The toy's black and white backgrounds lie exactly
on that bound, so every pixel the decoder overshoots gives no gradient through the clamp. Prints, every 5 steps,
the MSE of the clamped output and the share of raw outputs outside [-1, 1].
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from toy import data, pair


def run(loss_on: str, steps: int, batch: int, lr: float) -> list[dict]:
    vae = pair.vae(seed=1).train()
    decoded = []
    vae.decoder.register_forward_hook(lambda module, inputs, output: decoded.append(output))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    rows = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        clips = data.render_clips(data.sample_scenes(batch, seed=step))
        decoded.clear()
        clamped = vae.decode(vae.encode(clips).latent_dist.mode()).sample
        raw = torch.cat(decoded, dim=2)
        mse = F.mse_loss(clamped, clips)
        opt.zero_grad()
        (mse if loss_on == "clamped" else F.mse_loss(raw, clips)).backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 5 == 0 or step == steps - 1:
            rows.append({"loss_on": loss_on, "step": step, "mse": round(mse.item(), 4),
                         "raw_outside": round((raw.abs() > 1).float().mean().item(), 3)})
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    for loss_on in ("clamped", "raw"):
        run(loss_on, args.steps, args.batch, args.lr)


if __name__ == "__main__":
    main()
