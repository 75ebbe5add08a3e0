"""`neuronmap plan`: memory per device, tokens, FLOPs, time and bytes written of every
model-running job, from the model's config and the run's config, before anything runs."""

from __future__ import annotations

import json
import logging

from .settings import PlanSettings

log = logging.getLogger("neuronmap")

SETTINGS = {"plan": PlanSettings}


def cmd_plan(args) -> None:
    """what each model-running job will need: memory per device, tokens, FLOPs, time"""
    from ..io.parquet import atomic_path
    from ..model.source import model_config
    from .estimate import check_fits, format_table, plan_jobs, token_lengths
    settings = args.settings
    trust = settings.extraction.model.trust_remote_code
    config = model_config(settings.spec, trust, args.model_dir)
    tokenizer = _tokenizer(args.model_dir, trust)
    plan = plan_jobs(config, settings, token_lengths(settings, tokenizer), tokenizer)
    print(format_table(plan))
    check_fits(plan, settings)
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(plan, indent=2) + "\n")


def _tokenizer(model_dir, trust_remote_code: bool):
    """The prepared model's tokenizer, if there is one (else lengths are estimated)."""
    from ..model.loading import load_tokenizer
    return None if model_dir is None else load_tokenizer(model_dir, trust_remote_code)


def args_plan(p) -> None:
    p.add_argument("--model-dir", help="directory written by prepare-model (its config and tokenizer); without "
                                       "it, the configured model's config, and prompt lengths estimated")
    p.add_argument("--out", required=True, help="plan.json")
