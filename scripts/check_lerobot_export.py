"""By-hand check of `xvla export --layout lerobot` against the real LeRobot (docs/model.md, "Export").

LeRobot 0.6.1 needs Python >= 3.12 and torch < 2.12, so it lives in its own environment, e.g.:

    python3.12 -m venv /work/venv_lerobot && /work/venv_lerobot/bin/pip install "lerobot[xvla]==0.6.1"

Then, from the repository root, with this project's environment:

    python scripts/check_lerobot_export.py CHECKPOINT --lerobot-python /work/venv_lerobot/bin/python [EXPORT_ARGS]

It exports CHECKPOINT with `xvla export --layout lerobot [EXPORT_ARGS]`, loads the folder with LeRobot's
`XVLAPolicy.from_pretrained` in the other environment and runs `predict_action_chunk` on seeded random inputs (two
samples, every view given), recording the noise LeRobot draws; then ours generates from the same inputs and noise,
and the two chunks are compared. LeRobot also saves the policy again (0.6.1 writes
transformers' native key names) and ours loads that folder and generates once more. Exit 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path


def lerobot_side(folder: str, inputs: str, out: str) -> None:
    """In LeRobot's environment: load `folder`, one chunk from `inputs`, the noise it drew; save the policy again."""
    import torch
    from lerobot.policies.xvla.modeling_xvla import XVLAPolicy
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    policy = XVLAPolicy.from_pretrained(folder)
    r = load_file(inputs)
    pixels = r["pixel_values"]
    batch = {f"observation.images.image{k + 1 if k else ''}": pixels[:, k] for k in range(pixels.shape[1])}
    batch |= {
        "observation.state": r["proprio"],
        "observation.language.tokens": r["input_ids"],
        "domain_id": r["domain_id"],
    }
    drawn: list[torch.Tensor] = []
    randn = torch.randn

    def recording_randn(*args: object, **kwargs: object) -> torch.Tensor:
        drawn.append(randn(*args, **kwargs))  # type: ignore[call-overload]
        return drawn[-1]

    torch.randn = recording_randn  # type: ignore[assignment]
    torch.manual_seed(0)
    actions = policy.predict_action_chunk(batch)
    torch.randn = randn
    assert len(drawn) == 1, f"expected one noise draw, saw {len(drawn)}"
    save_file({"actions": actions.contiguous(), "noise": drawn[0].contiguous()}, out)
    policy.save_pretrained(Path(out).parent / "resaved")
    import lerobot
    import transformers

    print(
        f"lerobot {lerobot.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        f"LeRobot loaded {folder}: chunk {tuple(actions.shape)}, saved again to {Path(out).parent / 'resaved'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--lerobot-python", required=True, help="the Python of the LeRobot environment")
    parser.add_argument(
        "--lerobot-side", nargs=3, metavar=("FOLDER", "INPUTS", "OUT"), help=argparse.SUPPRESS
    )
    args, export_args = parser.parse_known_args()
    if args.lerobot_side:
        lerobot_side(*args.lerobot_side)
        return 0

    import torch
    from safetensors.torch import load_file, save_file

    from xvla.cli import main as xvla
    from xvla.model import XVLA

    torch.set_num_threads(1)
    model = XVLA.from_pretrained(args.checkpoint)
    cfg, g = model.config, torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(2, cfg.num_views, 3, cfg.image_size, cfg.image_size, generator=g),
        "image_mask": torch.ones(2, cfg.num_views, dtype=torch.bool),  # LeRobot: a key given is a valid view
        "input_ids": torch.randint(3, min(cfg.text.vocab_size, 50265), (2, cfg.max_text_len), generator=g),
        "domain_id": torch.tensor([0, cfg.head.num_domains - 1]),
        "proprio": torch.randn(2, cfg.proprio_dim, generator=g),
    }
    with tempfile.TemporaryDirectory() as tmp:
        exported, inputs, result = (
            Path(tmp) / n for n in ("exported", "inputs.safetensors", "out.safetensors")
        )
        if xvla(["export", args.checkpoint, str(exported), "--layout", "lerobot", *export_args]) != 0:
            return 1
        save_file({k: v for k, v in batch.items() if k != "image_mask"}, str(inputs))
        side = [str(exported), str(inputs), str(result)]
        subprocess.run(
            [args.lerobot_python, __file__, "-", "--lerobot-python", "-", "--lerobot-side", *side], check=True
        )
        theirs = load_file(str(result))
        failed = False
        for name, folder in (
            ("ours (the checkpoint)", args.checkpoint),
            ("ours (LeRobot's re-save)", f"{tmp}/resaved"),
        ):
            ours = XVLA.from_pretrained(folder).generate(batch, noise=theirs["noise"])
            err = (ours - theirs["actions"]).abs().max().item()
            print(
                f"{name} vs LeRobot: max |diff| {err:.3e} over {tuple(ours.shape)} (bit-identical: {err == 0})"
            )
            failed |= err > 1e-5
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
