"""``memtrain-consolidate CKPT OUT``: one plain state dict file (for inference) from a sharded checkpoint.

    memtrain-consolidate outputs/<run>/checkpoints/last.ckpt model.pt --strip-prefix model.
    python -c "import torch; from memtrain.models import GPT, GPTConfig; \
               m = GPT(GPTConfig()); m.load_state_dict(torch.load('model.pt'))"

Works on checkpoints from any stage and world size; runs in one process, on CPU, without a process group.
"""
from __future__ import annotations

import argparse

from memtrain.checkpoint import consolidate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a sharded checkpoint folder (memtrain-train's *.ckpt or step-N)")
    parser.add_argument("output", help="the .pt file to write")
    parser.add_argument("--strip-prefix", default="",
                        help="drop this prefix from every name (e.g. 'model.' for memtrain-train's LightningModule)")
    args = parser.parse_args(argv)
    state = consolidate(args.checkpoint, args.output, strip_prefix=args.strip_prefix)
    n = sum(t.numel() for t in state.values() if hasattr(t, "numel"))
    print(f"wrote {args.output}: {len(state)} tensors, {n:,} elements")


if __name__ == "__main__":
    main()
