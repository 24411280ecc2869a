"""Benchmark: MAE encoder step at 75 % masking (visible tokens only) vs the same encoder on all tokens.

    python bench/mae_speed.py                  # CPU sizes (3D ViT 96^3/16 and 3D TransUNet 96^3)
    python bench/mae_speed.py --quick          # tiny shapes, smoke run
    python bench/mae_speed.py --large          # ViT-B/16 and R50-ViT-B/16 sizes (for a GPU)

Per model, two comparisons, each timed interleaved (round-robin over the variants, median of the
repeats) in one process:

- **encoder step**: forward + backward of the encoder (patch embedding [+ CNN stem] + transformer)
  with 25 % of the tokens kept (MAE) vs all tokens;
- **training step**: the full MAE step (encoder on visible tokens, light decoder with mask tokens,
  masked loss, AdamW) vs the same model encoding every token (masked positions included, SimMIM style).

Models: MONAI's ``MaskedAutoEncoderViT`` (our seeded masking; the UNETR/ViT path) and our TransUNet MAE
(hybrid: its CNN stem always sees the whole image, so its ratio is lower). Prints JSON and a markdown
table (pasted into ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pretrain.losses import masked_patch_loss
from pretrain.mae_transunet import TransUNetMAE, gather_tokens, visible_index
from pretrain.mae_vit import ViTMAE

CPU_CASES = {
    "ViT MAE (MONAI, UNETR encoder) 3D": {
        "kind": "vit", "batch": (2, 1, 96, 96, 96),
        "model": {"name": "unetr", "spatial_dims": 3, "img_size": [96, 96, 96], "hidden_size": 384,
                  "mlp_dim": 1536, "num_heads": 6, "feature_size": 8},
    },
    "TransUNet MAE (hybrid) 3D": {
        "kind": "transunet", "batch": (2, 1, 96, 96, 96),
        "model": {"name": "transunet3d", "spatial_dims": 3, "img_size": [96, 96, 96], "hidden_size": 384,
                  "num_layers": 8, "num_heads": 6, "mlp_dim": 1536, "dropout_rate": 0.0, "resnet_units": [1, 1, 1],
                  "width_factor": 0.125, "decoder_channels": [16, 8, 8, 4], "head_channels": 16},
    },
}
QUICK_BATCH = (1, 1, 32, 32, 32)
LARGE_CASES = {
    "ViT-B/16 MAE (MONAI, UNETR encoder) 3D": {
        "kind": "vit", "batch": (4, 1, 160, 160, 160),
        "model": {"name": "unetr", "spatial_dims": 3, "img_size": [160, 160, 160], "hidden_size": 768,
                  "mlp_dim": 3072, "num_heads": 12, "feature_size": 16},
    },
    "TransUNet R50-ViT-B/16 MAE 2D": {
        "kind": "transunet", "batch": (32, 1, 224, 224),
        "model": {"name": "transunet_r50_vit_b16", "spatial_dims": 2, "img_size": [224, 224], "dropout_rate": 0.0},
    },
    "TransUNet R50-ViT-B/16 MAE 3D": {
        "kind": "transunet", "batch": (2, 1, 128, 128, 128),
        "model": {"name": "transunet3d", "spatial_dims": 3, "img_size": [128, 128, 128], "dropout_rate": 0.0},
    },
}
DECODER = {"decoder_hidden_size": 128, "decoder_num_layers": 2, "decoder_num_heads": 4, "decoder_mlp_dim": 256}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Runner:
    """Encoder / training steps of one MAE with and without dropping the masked tokens."""

    def __init__(self, kind: str, model_cfg: dict, batch: tuple[int, ...], device: torch.device, amp: bool) -> None:
        cfg = {"in_channels": batch[1], "out_channels": 2, **model_cfg}
        self.kind = kind
        self.model = (ViTMAE if kind == "vit" else TransUNetMAE)(cfg, mask_ratio=0.75, **DECODER).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.x = torch.randn(*batch, device=device)
        self.device, self.amp = device, amp
        m = self.model
        self.patch = m.patch if kind == "vit" else m.stride
        self.grid = tuple(s // self.patch for s in batch[2:])

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.kind == "vit":
            return m.mae.patch_embedding(x)  # [B, T, H]
        return m.encoder.embed(x)[0]

    def _transform(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.kind == "vit":
            return m.mae.blocks(tokens)
        return m.encoder.transform(tokens)

    def _mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.model.mask_generator(self.x.shape[0], self.grid, device=self.device).flatten(1)
        return mask, visible_index(mask)

    def encoder_step(self, drop: bool) -> None:
        mask, index = self._mask()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            tokens = self._tokens(self.x)
            if drop:
                tokens = gather_tokens(tokens, index)
            latent = self._transform(tokens)
        latent.float().pow(2).mean().backward()
        self.model.zero_grad(set_to_none=True)

    def train_step(self, drop: bool) -> None:
        m = self.model
        mask, index = self._mask()
        if not drop:
            index = torch.arange(mask.shape[1], device=self.device).expand(mask.shape[0], -1)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            tokens = gather_tokens(self._tokens(self.x), index)
            latent = self._transform(tokens)
            if self.kind == "vit":
                mae = m.mae
                x = mae.decoder_embed(latent)
                full = mae.mask_tokens.expand(x.shape[0], mask.shape[1], -1).to(x.dtype).clone()
                full = full.scatter(1, index[..., None].expand(-1, -1, x.shape[-1]), x) + mae.decoder_pos_embedding
                pred = mae.decoder_pred(mae.decoder_blocks(full))
            else:
                pred = m.decoder(latent, index, self.grid)
        loss = masked_patch_loss(pred.float(), self.x, mask, self.patch, norm_pix=True)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def time_variants(fns: dict[str, callable], device: torch.device, repeats: int, warmup: int = 2) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def run(cases: dict, device: torch.device, repeats: int, amp: bool) -> list[dict]:
    rows = []
    for name, case in cases.items():
        torch.manual_seed(0)
        r = Runner(case["kind"], case["model"], case["batch"], device, amp)
        n_tokens = int(torch.tensor(r.grid).prod())
        t = time_variants({
            "enc_all": lambda r=r: r.encoder_step(False), "enc_mae": lambda r=r: r.encoder_step(True),
            "step_all": lambda r=r: r.train_step(False), "step_mae": lambda r=r: r.train_step(True),
        }, device, repeats)
        rows.append({
            "case": name, "batch": list(case["batch"]), "tokens": n_tokens, "visible": n_tokens - round(0.75 * n_tokens),
            "parameters_m": sum(p.numel() for p in r.model.parameters()) / 1e6,
            "encoder_all_s": t["enc_all"], "encoder_mae_s": t["enc_mae"],
            "encoder_speedup": t["enc_all"] / t["enc_mae"],
            "step_all_s": t["step_all"], "step_mae_s": t["step_mae"], "step_speedup": t["step_all"] / t["step_mae"],
        })
        print(json.dumps(rows[-1]), flush=True)
        del r
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| model | batch | tokens (visible) | params (M) | encoder step: all / 75 % masked (s) | **encoder speed-up** "
             "| training step: all / MAE (s) | training speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {'x'.join(map(str, r['batch']))} | {r['tokens']} ({r['visible']}) | {r['parameters_m']:.1f} "
            f"| {r['encoder_all_s']:.4f} / {r['encoder_mae_s']:.4f} | **{r['encoder_speedup']:.1f}x** "
            f"| {r['step_all_s']:.4f} / {r['step_mae_s']:.4f} | {r['step_speedup']:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    parser.add_argument("--large", action="store_true", help="ViT-B/16 and R50-ViT-B/16 sizes (GPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cases = LARGE_CASES if args.large else CPU_CASES
    if args.quick:
        cases = {k: {**v, "batch": QUICK_BATCH if v["model"]["spatial_dims"] == 3 else (2, 1, 64, 64),
                     "model": {**v["model"], "img_size": list((QUICK_BATCH if v["model"]["spatial_dims"] == 3
                                                                else (2, 1, 64, 64))[2:])}}
                 for k, v in CPU_CASES.items()}
    rows = run(cases, device, args.repeats, args.amp)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))")
    cmd = "python bench/mae_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (f"Command: `{cmd.strip()}` on {where}, torch {torch.__version__}, "
              f"{'bf16 autocast' if args.amp else 'fp32'}; median of {args.repeats} interleaved repeats.")
    table = markdown(rows, header)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"device": where, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
