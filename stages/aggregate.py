"""Merge the client models (or external checkpoints) into models/aggregated and write metrics/aggregate.json.

Mirrors the seed's average_runner.py:
    python stages/aggregate.py --checkpoints a.pt b.pt --weights 0.5 0.5 --save_dir DIR [--strategy S ...]
Weights and presets apply in the order the checkpoints are listed. Without --base (and no models/base), openai-whisper
.pt inputs merge into DIR/model.pt in the inputs' own form (a bare state dict, or dims + model_state_dict).
Without flags it reads everything from params.yaml (the DVC stage). Logs to W&B when WANDB_API_KEY is set, unless
--disable_wandb or WANDB_MODE=disabled.
"""

import argparse
import logging
import sys

from fedwhisper.errors import FedWhisperError
from fedwhisper.merge import run_aggregate_stage
from fedwhisper.merge.strategies import STRATEGIES
from fedwhisper.wandb_logging import log_wandb_run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (defaults are used when it is absent)")
    ap.add_argument("--checkpoints", nargs="+", help="inputs: HF dirs, .safetensors or .pt (overrides params)")
    ap.add_argument("--names", nargs="+", help="client names for --checkpoints (default: file stems)")
    ap.add_argument("--weights", nargs="+", type=float, help="non-negative weights, one per checkpoint")
    ap.add_argument("--preset", help="one of the seed's ten named weightings")
    ap.add_argument("--strategy", choices=STRATEGIES)
    ap.add_argument("--base", default="models/base", help="base model dir (delta strategies, config, tokenizer)")
    ap.add_argument("--out", "--save_dir", dest="out", default="models/aggregated", help="output model dir")
    ap.add_argument("--metrics", default="metrics/aggregate.json", help="metrics JSON path")
    ap.add_argument("--density", type=float)
    ap.add_argument("--lambda", dest="lambda_", type=float)
    ap.add_argument("--beta", type=float)
    ap.add_argument("--f", type=int)
    ap.add_argument("--m", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--out-dtype", dest="out_dtype", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--accumulate-dtype", dest="accumulate_dtype", choices=["float32", "float64"])
    ap.add_argument("--export-openai", dest="export_openai", action="store_true", default=None,
                    help="also write an openai-whisper model.pt into the output dir")
    ap.add_argument("--wandb_run_name", help="W&B run name (default: aggregate-<strategy>); W&B logs when "
                    "WANDB_API_KEY is set")
    ap.add_argument("--disable_wandb", action="store_true", help="never log to W&B (also: WANDB_MODE=disabled)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wandb_run_name, disable_wandb = args.wandb_run_name, args.disable_wandb
    del args.wandb_run_name, args.disable_wandb
    try:
        metrics = run_aggregate_stage(**{("params_path" if k == "params" else k): v for k, v in vars(args).items()})
    except FedWhisperError as exc:
        print(f"aggregate: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, file size limit, read-only file system, ... outside the library's checks
        print(f"aggregate: error: {exc.filename or ''}: {exc.strerror or exc}".replace("error: : ", "error: "),
              file=sys.stderr)
        return 2
    log_wandb_run(wandb_run_name or f"aggregate-{metrics['strategy']}", metrics, job_type="aggregate",
                  disabled=disable_wandb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
