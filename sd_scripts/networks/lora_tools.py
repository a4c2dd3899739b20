"""What the LoRA command-line tools share: their declared options, reading a kohya LoRA file into up/down/alpha per
module, mapping LoRA module names to a loaded model's layers through the model family's naming, low-rank SVD, and
the metadata sd-scripts' tools write.

The tools (`python -m sd_scripts.networks.<tool>`): merge_lora, svd_merge_lora, extract_lora_from_models,
resize_lora, check_lora_weights, extract_lora_from_dylora; for LyCORIS files, through lycoris-lora, merge_lycoris and
extract_lycoris. Each declares its options as a list of `ToolOption`s (the argparse parser, and later a GUI form, come
from that list) and serves every model family: the family is read from the files through the registry
(sd_scripts.families), never named here.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..errors import NetworkError, UserError

log = logging.getLogger(__name__)

LORA_MODULE = "networks.lora"
MIN_SINGULAR_VALUE = 1e-6  # below this the update is treated as zero (kept as a rank-1 module of zeros)
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


# ------------------------------------------------------------------ declared options
@dataclass(frozen=True)
class ToolOption:
    """One command-line option of a tool. `type` bool is a flag (off by default); `nargs` '*' a list; `positional`
    an argument without '--'; `path` 'file' | 'out_file' | 'file_or_dir' tells a form what to offer."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    nargs: str | None = None
    required: bool = False
    positional: bool = False
    short: str | None = None
    path: str | None = None
    aliases: tuple[str, ...] = ()  # other names sd-scripts' family variants use for the same option

    @property
    def flags(self) -> list[str]:
        if self.positional:
            return [self.name]
        return ([self.short] if self.short else []) + ["--" + self.name] + ["--" + a for a in self.aliases]


class _ToolParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, as argparse does, without the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str, description: str, options: Sequence[ToolOption]) -> argparse.ArgumentParser:
    """An argparse parser from a tool's declared options."""
    parser = _ToolParser(prog=prog, description=description)
    for opt in options:
        kwargs: dict[str, Any] = {"help": opt.help}
        if opt.type is bool:
            kwargs.update(action="store_true", default=bool(opt.default))
        else:
            kwargs.update(type=opt.type, default=opt.default)
            if opt.choices:
                kwargs["choices"] = opt.choices
            if opt.nargs:
                kwargs["nargs"] = opt.nargs
        if not opt.positional:
            kwargs["dest"] = opt.name
            if opt.required:
                kwargs["required"] = True
        parser.add_argument(*opt.flags, **kwargs)
    return parser


def _part_file_options() -> tuple[ToolOption, ...]:
    """One ToolOption per part-file loading option of any family (the registry's FamilySpec.part_files: FLUX.1's
    clip_l / t5xxl / ae, SD3's clip_g, Lumina's gemma2, ...), its help and path kind as sd_scripts/options.py
    declares it."""
    from ..families import part_file_options
    from ..options import BY_NAME

    return tuple(ToolOption(name, str, None, BY_NAME[name].help, path=BY_NAME[name].path or "file",
                            aliases=tuple(BY_NAME[name].aliases))
                 for name in part_file_options())


#: the separate files of a whole model that the families' loaders read (text encoders, autoencoder, ...), for the
#: tools that load a whole model: they offer these and pass the given ones to the loader (`part_files`)
PART_FILE_OPTIONS: tuple[ToolOption, ...] = _part_file_options()


def part_files(args: argparse.Namespace) -> dict[str, str]:
    """The part files a tool's command line gives: {loading option: path}."""
    return {o.name: getattr(args, o.name) for o in PART_FILE_OPTIONS if getattr(args, o.name, None)}


def run_tool(name: str, parse: Callable[[Sequence[str] | None], argparse.Namespace],
             work: Callable[[argparse.Namespace], Any], argv: Sequence[str] | None) -> int:
    """Parse, run, and turn a user error into one line on stderr and exit status 1 (no traceback)."""
    root = logging.getLogger()
    for handler in list(root.handlers):  # (called in-process again: a handler of a stream closed since)
        if getattr(getattr(handler, "stream", None), "closed", False):
            root.removeHandler(handler)
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(argv)
    try:
        work(args)
    except UserError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    return 0


# precision name -> torch dtype name (names only, so the option lists stay torch-free for a GUI)
PRECISIONS: dict[str, str] = {
    "float": "float32", "float32": "float32", "fp32": "float32", "fp16": "float16", "float16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16", "fp8": "float8_e4m3fn", "fp8_e4m3fn": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}
PRECISION_CHOICES = ("float", "fp16", "bf16")  # what sd-scripts' SD tools take; the others are for FLUX files


def dtype_of(name: str | None, option: str) -> torch.dtype | None:
    """'fp16' -> torch.float16; None stays None. NetworkError naming the option for an unknown name."""
    import torch

    if name is None:
        return None
    try:
        return getattr(torch, PRECISIONS[str(name).lower()])
    except KeyError:
        raise NetworkError(f"option '--{option}': {name!r} is not a precision; use one of "
                           f"{', '.join(PRECISIONS)}") from None


def torch_device(name: str | None, option: str) -> torch.device:
    """The device of a --device style option (None: the CPU); NetworkError when it is unknown or unavailable."""
    import torch

    if not name:
        return torch.device("cpu")
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        raise NetworkError(f"option '--{option}': device {name!r} is not usable here ({str(e).splitlines()[0]}); "
                           f"use cpu, or cuda on a machine with a GPU") from None
    return device


# ------------------------------------------------------------------ LoRA files
@dataclass
class LoRAModuleWeights:
    """One module of a kohya LoRA file. Update = up @ down * alpha / rank (conv: down [r, in, kh, kw], up
    [out, r, 1, 1]); alpha 0 or missing means alpha = rank."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def is_conv_kxk(self) -> bool:
        return self.is_conv and tuple(self.down.shape[2:]) != (1, 1)

    def product(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
        """up @ down (no alpha/rank scale), shaped like the adapted weight ([out, in] or [out, in, kh, kw]), in
        `dtype` (default float32)."""
        import torch

        dtype = dtype or torch.float32
        down = self.down.to(device=device, dtype=dtype)
        up = self.up.to(device=device, dtype=dtype)
        if not self.is_conv:
            return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])

    def delta(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
        """The weight update up @ down * alpha / rank (multiplier 1), in `dtype` (default float32)."""
        return self.product(dtype, device) * self.scale


@dataclass
class LoRAFile:
    """A kohya-format LoRA file: its modules by name, header metadata, and the tensors that are neither."""

    path: str
    modules: dict[str, LoRAModuleWeights]
    metadata: dict[str, str]
    other: dict[str, torch.Tensor] = field(default_factory=dict)


def read_lora(path: str | os.PathLike, dtype: torch.dtype | None = None) -> LoRAFile:
    """The modules of a kohya LoRA file (.safetensors or torch), tensors cast to `dtype` when given. NetworkError
    naming the file when it has no LoRA modules or a module lacks its up or down weight."""
    import torch

    from .weights_file import load_weights_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NetworkError(f"{path}: no such LoRA file; check the path")
    tensors, metadata = load_weights_file(path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            parts.setdefault(name, {})[suffix] = value
        else:
            other[key] = value
    modules: dict[str, LoRAModuleWeights] = {}
    for name, found in parts.items():
        down, up = found.get("lora_down.weight"), found.get("lora_up.weight")
        if down is None or up is None:
            if down is None and up is None:  # a lone alpha
                other[f"{name}.alpha"] = found["alpha"]
                continue
            missing = "lora_down.weight" if down is None else "lora_up.weight"
            raise NetworkError(f"{path}: module {name} has no {missing}: the file is damaged or incomplete")
        if down.dim() != up.dim() or up.shape[1] != down.shape[0]:
            raise NetworkError(f"{path}: module {name} has lora_down {list(down.shape)} and lora_up "
                               f"{list(up.shape)}, which do not fit together: the file is damaged")
        alpha_t = found.get("alpha")
        alpha = float(alpha_t.float()) if alpha_t is not None else 0.0
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        modules[name] = LoRAModuleWeights(name, down, up, alpha if alpha > 0 else float(down.shape[0]))
    if not modules:
        markers = ("hada_", "lokr_", "oft_", "lora_A", "glora_")
        lycoris = next((m for m in markers if any(m in k for k in tensors)), None)
        kind = f" (its '{lycoris}' tensors are another adapter's, e.g. LyCORIS)" if lycoris else ""
        hint = "; merge LyCORIS files with merge_lycoris" if lycoris else ""
        raise NetworkError(f"{path}: no '<name>.lora_down.weight' / '.lora_up.weight' pairs{kind}: these tools take "
                           f"kohya-format LoRA / LoCon files{hint}")
    return LoRAFile(path, modules, metadata, other)


def module_tensors(modules: Mapping[str, LoRAModuleWeights]) -> dict[str, torch.Tensor]:
    """The file tensors of modules: '<name>.lora_down.weight', '.lora_up.weight', '.alpha'."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        out[f"{name}.lora_down.weight"] = m.down.detach().contiguous()
        out[f"{name}.lora_up.weight"] = m.up.detach().contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(m.alpha))
    return out


def write_lora(path: str, modules: Mapping[str, LoRAModuleWeights], metadata: Mapping[str, str],
               dtype: torch.dtype | None, extra: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write a LoRA file atomically, float tensors but alpha cast to `dtype`, with the given
    metadata plus sshs_model_hash / sshs_legacy_hash of the bytes written (safetensors). `extra`: other tensors
    of the input kept as they are (cast too)."""
    from .weights_file import save_weights_file

    tensors = dict(extra or {})
    tensors.update(module_tensors(modules))
    if dtype is not None:
        # alpha stays float32: it sets the update's scale, which a half-precision alpha would shift
        tensors = {k: v.to(dtype) if v.is_floating_point() and not k.endswith(".alpha") else v
                   for k, v in tensors.items()}
    check_output_path(path)
    save_weights_file(tensors, path, dict(metadata))


def check_output_path(path: str | None, option: str = "save_to") -> str:
    """A file path to write: given, with a known extension. NetworkError naming the option otherwise."""
    if not path:
        raise NetworkError(f"option '--{option}' is required: the file to write (.safetensors, .ckpt, .pt)")
    if not str(path).lower().endswith((".safetensors", ".ckpt", ".pt", ".pth")):
        raise NetworkError(f"option '--{option}': {path!r} must end in .safetensors, .ckpt, .pt or .pth")
    return str(path)


# ------------------------------------------------------------------ SVD to a rank
@dataclass
class LowRank:
    """A weight update factored as up @ down (scale not included), with how much of it the kept rank holds."""

    up: torch.Tensor
    down: torch.Tensor
    rank: int
    sum_retained: float  # sum of the kept singular values / sum of all
    fro_retained: float  # Frobenius norm of the kept part / of the whole
    max_ratio: float  # largest kept singular value / smallest kept


def choose_rank(singular: torch.Tensor, max_rank: int, method: str | None = None,
                param: float | None = None) -> int:
    """How many singular values (descending) to keep: `max_rank`, or with a dynamic method the fewest that reach
    `param` (at most `max_rank`):
    - sv_ratio: every value at least the largest / param;
    - sv_fro: the kept part's Frobenius norm at least param x the whole's;
    - sv_cumulative: the kept values' sum at least param x the sum of all.
    A zero update keeps 1 with a dynamic method (`low_rank(..., zero_rank_one=True)` also at a fixed rank)."""
    import torch

    s = singular.float()
    limit = max(1, min(int(max_rank), s.numel()))
    if method is None:
        return limit
    if s.numel() == 0 or float(s[0]) <= MIN_SINGULAR_VALUE:
        return 1
    if param is None:
        raise NetworkError(f"dynamic_method {method} needs --dynamic_param")
    if method == "sv_ratio":
        wanted = int((s >= s[0] / float(param)).sum())
    elif method in ("sv_fro", "sv_cumulative"):
        values = s.pow(2) if method == "sv_fro" else s
        target = float(param) ** 2 if method == "sv_fro" else float(param)
        share = torch.cumsum(values, 0) / values.sum()
        # the fewest values whose share reaches the target (a hair of float slack so 1.0 means everything)
        wanted = int((share < target - 1e-6).sum()) + 1
    else:
        raise NetworkError(f"unknown dynamic_method {method!r}: use one of {', '.join(DYNAMIC_METHODS)}")
    return max(1, min(wanted, limit))


def low_rank(matrix: torch.Tensor, max_rank: int, *, method: str | None = None, param: float | None = None,
             clamp_quantile: float | None = None, device: torch.device | None = None,
             zero_rank_one: bool = False) -> LowRank:
    """Factor a weight update ([out, in] or [out, in, kh, kw]) into up [out, r] (conv [out, r, 1, 1]) and down
    [r, in] (conv [r, in, kh, kw]) by SVD, at a fixed rank or one chosen by `method` (see choose_rank).
    `clamp_quantile` < 1 clips the factors' entries at that quantile of their magnitudes (as sd-scripts'
    extraction does to tame outliers; it costs fidelity). `zero_rank_one`: a zero update becomes rank 1 (as
    sd-scripts' resize does)."""
    import torch

    shape = tuple(matrix.shape)
    flat = matrix.to(device=device, dtype=torch.float32).reshape(shape[0], -1)
    u, s, vh = _svd(flat)
    rank = choose_rank(s, max_rank, method, param)
    if zero_rank_one and (s.numel() == 0 or float(s[0]) <= MIN_SINGULAR_VALUE):
        rank = 1
    up = u[:, :rank] * s[:rank]
    down = vh[:rank]
    if clamp_quantile is not None and clamp_quantile < 1:
        values = torch.cat([up.flatten(), down.flatten()])
        if values.numel() > 16_000_000:  # torch.quantile's limit: a strided sample tells the same quantile
            values = values[:: math.ceil(values.numel() / 16_000_000)]
        high = torch.quantile(values.abs(), float(clamp_quantile))
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    total = float(s.sum())
    fro_total = float(s.pow(2).sum().sqrt())
    kept = s[:rank]
    info = LowRank(up, down, rank,
                   sum_retained=float(kept.sum()) / total if total > 0 else 1.0,
                   fro_retained=float(kept.pow(2).sum().sqrt()) / fro_total if fro_total > 0 else 1.0,
                   max_ratio=float(kept[0] / kept[-1]) if float(kept[-1]) > 0 else float("inf"))
    if len(shape) == 4:
        info.up = up.reshape(shape[0], rank, 1, 1)
        info.down = down.reshape(rank, *shape[1:])
    info.up, info.down = info.up.cpu().contiguous(), info.down.cpu().contiguous()
    return info


SMALL_SVD = 1 << 20  # elements: below this a CPU SVD runs on one thread


def _svd(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.linalg.svd (thin). Small CPU matrices run on one thread: LAPACK's threading gains nothing there and,
    on a busy machine, made each tiny SVD a hundred times slower."""
    import torch

    if flat.device.type != "cpu" or flat.numel() >= SMALL_SVD:
        return torch.linalg.svd(flat, full_matrices=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.svd(flat, full_matrices=False)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ LoRA names <-> model layers
@dataclass
class ModelLayer:
    """The layer(s) of a loaded model that one LoRA file module adapts: one Linear/Conv2d, or the parts a file
    fuses into one module (their output rows stacked in part order); `swap_halves` when the file stores the two
    output halves the other way round."""

    name: str
    modules: list  # of torch.nn.Module
    swap_halves: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        first = tuple(self.modules[0].weight.shape)
        return (sum(int(m.weight.shape[0]) for m in self.modules),) + first[1:]

    def weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as the file's module sees it (parts stacked, halves as the file orders them), in `dtype`
        (default float32)."""
        import torch

        w = torch.cat([m.weight.detach().to(dtype or torch.float32) for m in self.modules], dim=0)
        return _swap(w) if self.swap_halves else w

    def add(self, delta: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """weight += delta (in the file's layout); computed in `dtype` (default the weight's), stored back in the
        weight's dtype."""
        import torch

        if self.swap_halves:
            delta = _swap(delta)
        rows = [int(m.weight.shape[0]) for m in self.modules]
        with torch.no_grad():
            for module, part in zip(self.modules, torch.split(delta, rows, dim=0)):
                w = module.weight
                work = dtype or w.dtype
                w.copy_((w.to(work) + part.to(device=w.device, dtype=work)).to(w.dtype))


def _swap(t: torch.Tensor) -> torch.Tensor:
    import torch

    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]], dim=0)


def model_layers(bundle, *, include_conv: bool = True, outside_blocks: bool = True) -> dict[str, ModelLayer]:
    """Every layer of a loaded model (ModelBundle) a kohya LoRA file of its family can adapt, by file module name,
    from the family's own LoRA naming (prefixes, name maps, target blocks). `include_conv`: also the ResNet /
    sampler layers (LoCon); the family's own target blocks, when it has them, decide instead. `outside_blocks`:
    also the layers outside the target blocks that the family's files may name (e.g. FLUX.1's in_dims
    embedders); without it, only the default targets (what an extraction adapts)."""
    from .lora import family_naming
    from .targets import text_encoder_targets, unet_targets

    naming = family_naming(bundle.family, bundle.denoiser)
    targets = []
    for encoder, prefix in zip(bundle.text_encoders, naming["te_prefixes"]):
        if encoder is not None:
            targets += text_encoder_targets(encoder, prefix, naming.get("te_block_classes"))
    extra = (naming.get("unet_file_name_map") or naming.get("unet_extra_name_map")) if outside_blocks else None
    targets += unet_targets(bundle.denoiser, naming["unet_prefix"], include_conv=include_conv,
                            name_map=naming.get("unet_name_map"), block_classes=naming.get("unet_block_classes"),
                            extra_name_map=extra)
    grouped: dict[str, list] = {}
    for t in targets:
        grouped.setdefault(t.lora_name, []).append(t)
    layers = {}
    for name, found in grouped.items():
        found.sort(key=lambda t: t.part[0] if t.part else 0)
        layers[name] = ModelLayer(name, [t.module for t in found], any(t.swap_halves for t in found))
    return layers


def text_encoder_prefixes(family: str) -> tuple[str, ...]:
    """The LoRA name prefixes of a family's text encoders (e.g. 'lora_te', 'lora_te1')."""
    from ..families import family_spec

    return tuple(family_spec(family).lora_te_prefixes)


def match_layers(lora: LoRAFile, layers: Mapping[str, ModelLayer], model_path: str,
                 *, allow_missing: bool = True) -> dict[str, ModelLayer]:
    """The model layer of each LoRA module. NetworkError naming the first module whose update does not fit its layer
    (a LoRA for another base model), or when no module has a layer; modules without a layer are warned about."""
    matched, missing = {}, []
    for name, module in lora.modules.items():
        layer = layers.get(name)
        if layer is None:
            missing.append(name)
            continue
        want, have = tuple(layer.shape), (module.up.shape[0], *module.down.shape[1:])
        if tuple(have) != want:
            raise NetworkError(f"{lora.path}: module {name} changes a {list(have)} weight but {model_path} has "
                               f"{list(want)} there: the LoRA was made for another base model; use a LoRA of this "
                               f"model's family and size")
        matched[name] = layer
    if not matched:
        raise NetworkError(f"{lora.path}: none of its {len(lora.modules)} modules (e.g. {next(iter(lora.modules))}) "
                           f"is a layer of {model_path}: the LoRA was made for another model family")
    if missing:
        if not allow_missing:
            raise NetworkError(f"{lora.path}: {len(missing)} modules (e.g. {missing[0]}) have no layer in "
                               f"{model_path}")
        log.warning("%s: %d of its modules have no layer in %s and are skipped (e.g. %s)", lora.path, len(missing),
                    model_path, missing[0])
    return matched


def family_flag_options() -> tuple[ToolOption, ...]:
    """One flag per registered family, named after it (sd-scripts' tools take the SDXL one): it says the models are
    of that family, which is checked against the files (the family is always read from them)."""
    from ..families import all_families

    return tuple(ToolOption(name, bool, False, f"the models are {spec.label} models (checked against the files)")
                 for name, spec in all_families().items())


def family_flags(args: argparse.Namespace, *others: str) -> dict[str, bool]:
    """The kind flags of parsed tool options: the family flags and the named others (e.g. v2)."""
    from ..families import family_names

    return {name: bool(getattr(args, name, False)) for name in (*family_names(), *others)}


def check_family_flags(family: str, flags: Mapping[str, bool], source: str) -> None:
    """sd-scripts' model-kind flags (--v2, --v_parameterization, a family's own flag such as SDXL's) must agree
    with the family detected from the file: a flag set means the family it names, or the families whose spec names
    it (a family-specific option they accept, a kohya_ss checkbox that means them). NetworkError naming the flag
    and the model otherwise."""
    from ..families import all_families, family_spec

    spec = family_spec(family)
    for flag, on in flags.items():
        if not on:
            continue
        meant = [s for s in all_families().values()
                 if s.name == flag or s.accepts_option(flag) or flag in s.kohya_ss_flags]
        if meant and spec not in meant:
            raise NetworkError(f"--{flag} is for {' / '.join(s.label for s in meant)} models, but {source} is a "
                               f"{spec.label} model: remove --{flag} (the model kind is read from the file)")


def _check_part_files(path: str, loading: Mapping[str, Any]) -> None:
    """NetworkError when a part-file option is given for a model whose family does not read it (it would be
    ignored); each given part file must exist. Unknown families (e.g. a .ckpt) are left to the loader."""
    from ..families import family_of_path, family_spec

    given = [o.name for o in PART_FILE_OPTIONS if loading.get(o.name)]
    for name in given:
        if not os.path.exists(loading[name]):
            raise NetworkError(f"option '--{name}': {loading[name]} does not exist; check the path")
    family = family_of_path(path) if given else None
    if family is None:
        return
    spec = family_spec(family)
    foreign = [name for name in given if name not in spec.part_files]
    if foreign:
        takes = ", ".join(f"--{o}" for o in spec.part_files) or "none"
        raise NetworkError(f"{path} is a {spec.label} model, which does not read "
                           f"{', '.join(f'--{o}' for o in foreign)}; remove it (its part-file options: {takes})")


def load_base_model(path: str, option: str, *, dtype: torch.dtype | None = None, device: torch.device | None = None,
                    flags: Mapping[str, bool] | None = None, **options):
    """A model (single file or diffusers folder) through the registry, with sd-scripts' kind flags checked."""
    import torch

    from ..models.loading import load_model

    if not path:
        raise NetworkError(f"option '--{option}' is required: the model file or folder")
    if not os.path.exists(path):
        raise NetworkError(f"option '--{option}': {path} does not exist; check the path")
    loading = {k: v for k, v in options.items() if v is not None}
    _check_part_files(path, loading)
    bundle = load_model(path, dtype=dtype or torch.float32, **loading)
    check_family_flags(bundle.family, flags or {}, path)
    if device is not None and device.type != "cpu":
        for part in (bundle.denoiser, *bundle.text_encoders):
            if part is not None:
                part.to(device)
    return bundle


# ------------------------------------------------------------------ metadata
def dim_text(values) -> str:
    """ss_network_dim / ss_network_alpha of a set of per-module values: the one value, or 'Dynamic'."""
    found = sorted({_num(v) for v in values})
    return str(found[0]) if len(found) == 1 else "Dynamic"


def _num(value):
    value = float(value)
    return int(value) if value.is_integer() else value


def title_of(path: str) -> str:
    """A model's modelspec.title, else its file name without extension (as sd-scripts names merge sources)."""
    if os.path.isfile(path) and path.lower().endswith(".safetensors"):
        from ..families import read_safetensors_header

        try:
            _, meta = read_safetensors_header(path)
            if meta.get("modelspec.title"):
                return meta["modelspec.title"]
        except (OSError, ValueError):
            pass
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def lora_family(metadata: Mapping[str, str]) -> tuple[str, bool] | None:
    """(family, v_prediction) of a LoRA file from its ss_base_model_version or modelspec.architecture; None when
    neither names a registered family."""
    from ..families import all_families

    version = metadata.get("ss_base_model_version")
    arch = str(metadata.get("modelspec.architecture", "")).split("/", 1)[0]
    for spec in all_families().values():
        for v in ((False, True) if spec.supports_v_prediction else (False,)):
            if version and version == spec.base_model_version_for(v):
                return spec.name, v
    for spec in all_families().values():
        for v in ((False, True) if spec.supports_v_prediction else (False,)):
            if arch and arch == spec.architecture_for(v):
                return spec.name, v
    return None


def network_metadata(*, v2: str | None, base_model: str | None, dim: str, alpha: str,
                     network_args: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The ss_* keys every LoRA file of the tools carries (also with --no_metadata)."""
    import json

    meta = {"ss_network_module": LORA_MODULE, "ss_network_dim": str(dim), "ss_network_alpha": str(alpha)}
    if v2 is not None:
        meta["ss_v2"] = str(v2)
    if base_model is not None:
        meta["ss_base_model_version"] = str(base_model)
    if network_args:
        meta["ss_network_args"] = json.dumps({k: str(v) for k, v in network_args.items()})
    return meta


def family_facts(family: str, v_prediction: bool) -> dict[str, str]:
    """ss_v2 and ss_base_model_version of a family."""
    from ..families import family_spec
    from ..training.metadata import base_model_version

    return {"ss_v2": str(family_spec(family).ss_v2), "ss_base_model_version": base_model_version(family, v_prediction)}


def modelspec(family: str | None, v_prediction: bool, *, title: str, merged_from: str | None = None,
              adapter: str = "lora") -> dict[str, str]:
    """modelspec.* keys of a tool's output (adapter '' for a full checkpoint); only title, date and merged_from
    when the family is unknown."""
    now = time.time()
    if family is None:
        from ..training.metadata import SAI_MODEL_SPEC_VERSION, _iso_date

        meta = {"modelspec.sai_model_spec": SAI_MODEL_SPEC_VERSION, "modelspec.title": title,
                "modelspec.date": _iso_date(now)}
    else:
        from ..families import family_spec
        from ..training.metadata import modelspec_metadata

        size = family_spec(family).default_resolution_for(v_prediction)
        meta = modelspec_metadata(argparse.Namespace(metadata_title=title), family=family, v_prediction=v_prediction,
                                  resolution=(size, size), timestamp=now, adapter=adapter)
        if not adapter:  # full checkpoints: the implementation sd-scripts writes for them
            from ..training.full_methods import IMPLEMENTATION_STABILITY_AI

            meta["modelspec.implementation"] = IMPLEMENTATION_STABILITY_AI
    if merged_from:
        meta["modelspec.merged_from"] = merged_from
    return meta


def output_title(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


# ------------------------------------------------------------------ fidelity reports
def fidelity_line(name: str, info: LowRank, *, alpha: float | None = None) -> str:
    """One module's line of a --verbose report (sd-scripts' resize_lora layout), with rank and alpha when given."""
    line = (f"{name:75} | sum(S) retained: {info.sum_retained:.1%}, fro retained: {info.fro_retained:.1%}, "
            f"max(S) ratio: {info.max_ratio:0.1f}")
    return line + (f", dim: {info.rank}, alpha: {alpha:g}" if alpha is not None else "")


def fidelity_summary(infos: Sequence[LowRank]) -> str:
    """The share of the updates' Frobenius norm kept, over all modules: mean, standard deviation and minimum."""
    import torch

    values = torch.tensor([i.fro_retained for i in infos if not math.isnan(i.fro_retained)] or [1.0])
    std = float(values.std(unbiased=False)) if values.numel() > 1 else 0.0
    return (f"Average Frobenius norm retention: {float(values.mean()):.2%} | std: {std:0.3f} | "
            f"min: {float(values.min()):.2%} over {len(infos)} modules")


# ------------------------------------------------------------------ block weights (--lbws)
# The 26 block slots of the U-Net "LoRA block weight" convention (A1111's LoRA Block Weight extension, which
# sd-scripts' --lbws follows): BASE (the text encoders), IN00-IN11 (the LDM input_blocks), MID, OUT00-OUT11.
LBW_SLOTS = ("BASE", *(f"IN{i:02d}" for i in range(12)), "MID", *(f"OUT{i:02d}" for i in range(12)))
# the slots a block-weight list of each length sets, in order (the others keep weight 1)
LBW_PRESETS = {
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(6))),
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(3, 12))),
    20: ("BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9))),
    26: LBW_SLOTS,
}
_DIFFUSERS_BLOCK = re.compile(r"_(down|up)_blocks_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)_")
_LDM_BLOCK = re.compile(r"^lora_unet_(input_blocks|output_blocks)_(\d+)_")


def lbw_slot(lora_name: str) -> str | None:
    """The block slot of a U-Net LoRA module name, in either U-Net naming (diffusers paths as SD 1.x/2.x files use,
    or LDM input/middle/output blocks as SDXL files use); 'BASE' for text-encoder modules; None when the name is in
    no block (e.g. a DiT's)."""
    if "text_model_encoder_" in lora_name or lora_name.startswith("lora_te"):
        return "BASE"
    found = _DIFFUSERS_BLOCK.search(lora_name)
    if found:
        kind, block, part, layer = found.group(1), int(found.group(2)), found.group(3), int(found.group(4))
        if kind == "down":  # input_blocks: 0 is conv_in; each level has two layers and a downsampler
            index = 3 * (block + 1) if part == "downsamplers" else 3 * block + layer + 1
            return f"IN{index:02d}"
        index = 3 * block + 2 if part == "upsamplers" else 3 * block + layer
        return f"OUT{index:02d}"
    if "_mid_block_" in lora_name or lora_name.startswith("lora_unet_middle_block_"):
        return "MID"
    found = _LDM_BLOCK.search(lora_name)
    if found:
        return f"{'IN' if found.group(1) == 'input_blocks' else 'OUT'}{int(found.group(2)):02d}"
    return None


def parse_lbws(texts: Sequence[str] | None, count: int) -> list[dict[str, float]] | None:
    """--lbws: one JSON list per LoRA ("[1,0.5,...]") of 12, 17, 20 or 26 weights (all the same length) -> per LoRA
    {slot: weight}. NetworkError naming the bad entry."""
    import json

    if not texts:
        return None
    if len(texts) != count:
        raise NetworkError(f"--lbws has {len(texts)} entries for {count} --models: give one block-weight list per "
                           f"LoRA")
    out = []
    for i, text in enumerate(texts, 1):
        try:
            values = json.loads(text)
        except ValueError:
            values = None
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
            raise NetworkError(f"--lbws entry {i} ({text!r}) is not a JSON list of numbers, e.g. \"[1,1,0.5,...]\"")
        if len(values) not in LBW_PRESETS:
            raise NetworkError(f"--lbws entry {i} has {len(values)} weights; use {', '.join(map(str, LBW_PRESETS))}")
        out.append(dict(zip(LBW_PRESETS[len(values)], map(float, values))))
    if len({len(w) for w in out}) > 1:
        raise NetworkError("--lbws lists must all have the same length")
    return out


def lbw_factor(weights: Mapping[str, float] | None, lora_name: str) -> float:
    """The block weight of a module (1 when no list is given or its slot is not set)."""
    if not weights:
        return 1.0
    slot = lbw_slot(lora_name)
    return weights.get(slot, 1.0) if slot else 1.0


def check_lbws_apply(weights: Sequence[Mapping[str, float]] | None, names: Sequence[str], source: str) -> None:
    """Block weights need modules in blocks: NetworkError when none of a LoRA's modules has a block slot."""
    if weights and not any(lbw_slot(n) not in (None, "BASE") for n in names):
        raise NetworkError(f"{source}: --lbws weights U-Net blocks, but none of its modules is in a U-Net block "
                           f"(block weights are for U-Net LoRAs); remove --lbws")
