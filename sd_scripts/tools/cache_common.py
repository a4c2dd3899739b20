"""What cache_latents and cache_text_encoder_outputs share: they take the LoRA trainer's options (the same schema,
so a command line or --config_file written for training works unchanged, as in sd-scripts), load the model through
the registry, build the dataset exactly as the trainer does, and run the trainer's own caching step. The files
and keys written are therefore the ones a training run reads back (and reuses without encoding).

Besides the training options each tool takes `TOOL_OPTIONS`: sd-scripts' model-kind flags (`--sdxl`, `--flux`,
... made from the registry's script names; they are checked against the model's family read from its files), the
deprecated `--skip_existing` (existing files are always checked; `--skip_cache_check` trusts them) and the tool's
own extras.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from typing import Sequence

from ..errors import UserError
from .tool_cli import ToolOption

log = logging.getLogger(__name__)

SKIP_EXISTING = ToolOption("skip_existing", bool, False, "deprecated, no effect: existing caches are always checked "
                                                         "(--skip_cache_check trusts them)")


def model_kind_flags() -> dict[str, str]:
    """sd-scripts' model-kind flag -> family: the prefix of each family's own script names (e.g. the X of
    X_train_network), from the registry."""
    from ..families import all_families

    flags: dict[str, str] = {}
    for spec in all_families().values():
        for script in spec.scripts:
            prefix = script.split("_train")[0]
            if prefix and prefix != script:
                flags.setdefault(prefix, spec.name)
    return flags


def kind_options() -> tuple[ToolOption, ...]:
    from ..families import family_spec

    return tuple(ToolOption(flag, bool, False, f"the model is a {family_spec(family).label} model (checked against "
                                               f"its files)") for flag, family in model_kind_flags().items())


def parse(prog: str, argv: Sequence[str] | None, extras: Sequence[ToolOption]) -> tuple[argparse.Namespace, dict]:
    """(the trainer's options, the tool's own option values) of a command line."""
    from ..options import parse_args
    from .tool_cli import build_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    own_options = (*kind_options(), *extras)
    own_parser = build_parser(prog, "", own_options)
    if "-h" in argv or "--help" in argv:  # the tool's own options, then the trainer's (argparse exits there)
        print("options of this tool:\n" + "\n".join(own_parser.format_help().split("options:", 1)[-1]
                                                     .splitlines()[2:]) + "\n\ntraining options it takes:")
    own, rest = own_parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    if "-h" in argv or "--help" in argv:
        rest.append("--help")
    args = parse_args("network", rest, prog=prog)
    return args, vars(own)


def _check_kind(own: dict, family: str, path: str) -> None:
    from ..families import family_spec

    for flag, flag_family in model_kind_flags().items():
        if own.get(flag) and flag_family != family:
            raise UserError(f"--{flag} is set but {path} is a {family_spec(family).label} model: remove --{flag}")


def cache_run(prog: str, argv: Sequence[str] | None, extras: Sequence[ToolOption], what: str) -> int:
    """Parse, set up like the trainer and cache `what` ('latents' | 'text_encoder_outputs') to disk; one-line user
    errors and exit 1."""
    from ..options import OptionError

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        args, own = parse(prog, argv, extras)
        with tempfile.TemporaryDirectory(prefix="cache-") as scratch:
            _cache(args, own, what, scratch)
    except (UserError, OptionError) as e:
        print(f"{prog.split()[-1]}: error: {e}", file=sys.stderr)
        return 1
    return 0


def _cache(args: argparse.Namespace, own: dict, what: str, scratch: str) -> None:
    import torch

    from ..families import family_class, probe_model
    from ..models.loading import load_model
    from ..training.loop import Trainer
    from ..training.methods import NetworkMethod
    from ..training.run_setup import load_dtype

    if own.get("skip_existing"):
        log.warning("--skip_existing is deprecated and has no effect: existing caches are checked and reused when "
                    "they match (--skip_cache_check trusts them)")
    if not args.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required: the model whose VAE / text encoders encode")
    probe = probe_model(args.pretrained_model_name_or_path)
    if probe.family:
        _check_kind(own, probe.family, args.pretrained_model_name_or_path)
    args.output_dir = args.output_dir or scratch  # nothing is written there
    args.trainer_kind, args.trainer_script = "network", None
    if what == "latents":
        args.cache_latents = args.cache_latents_to_disk = True
    else:
        args.cache_text_encoder_outputs = args.cache_text_encoder_outputs_to_disk = True
        args.network_train_unet_only = True  # the encoders are frozen: what the trainer caches for
    trainer = Trainer(args, NetworkMethod(args))
    trainer.setup_accelerator()
    try:
        bundle = load_model(args.pretrained_model_name_or_path,
                            dtype=load_dtype(trainer.weight_dtype, trainer.method, bool(args.no_half_vae)),
                            **trainer._load_options())
        device = trainer.accelerator.device
        if what == "latents":  # only the part that encodes goes to the device
            half_vae_ok = trainer.weight_dtype != torch.float16 and not args.no_half_vae
            bundle.vae.to(device, dtype=trainer.weight_dtype if half_vae_ok else torch.float32)
        else:
            from .tool_cli import torch_dtype

            te_dtype = torch_dtype(own.get("text_encoder_dtype"), "text_encoder_dtype") or trainer.weight_dtype
            for te in bundle.text_encoders:
                te.to(device, dtype=te_dtype)
        trainer.bundle = bundle
        trainer.family = family_class(bundle.family)(bundle, args)
        trainer.spec = trainer.family.spec
        trainer.load_dataset()
        if what == "latents":
            trainer.cache_latents()
        else:
            trainer.cache_text_encoder_outputs()
    finally:
        trainer.accelerator.end_training()
    log.info("cached %s for %d images", what.replace("_", " "), trainer.summary.num_train_images +
             trainer.summary.num_reg_images)
