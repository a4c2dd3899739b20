"""Sample images during training: the prompt file, the samplers, the file names and the generation itself.

Prompt file (FORMATS.md, 'Training run files'; sd-scripts compatible): one prompt per line; blank lines and lines
starting with `#` are skipped; options follow ` --`:

    a photo of sks dog --n blurry, lowres --w 640 --h 512 --d 42 --s 20 --l 7 --ss euler_a

`--n` negative prompt, `--w`/`--h` size (512; rounded down to a multiple of 8, at least 64, as sd-scripts does),
`--d` seed (a random one when absent), `--s` steps (30; clamped to 1..1000), `--l` CFG scale (7.5), `--ss` sampler,
`--g` the guidance embedding of guidance-distilled models (families that have none ignore it). Families may have
their own defaults for what a prompt does not set (`SamplePrompt.given` tells which it set). sd-scripts options that
do not apply to these models (`--cn`, `--ctr`, `--rcfg`, `--fs`) are accepted and ignored; any other option, or a value that is not a number where one is needed, is an error naming the file and line
(sd-scripts silently ignores those). `.toml` (`[prompt]` defaults + `[[prompt.subset]]` entries) and `.json` (a list of
strings or objects) prompt files with sd-scripts' keys (prompt, negative_prompt, width, height, seed, sample_steps,
scale, sample_sampler) are read too.

Samplers are diffusers schedulers built from the training scheduler's config, so beta schedule, timestep spacing and
prediction type (epsilon or v) carry over. Unlike sd-scripts, DDIM keeps the model's `clip_sample` setting instead of
forcing it on. `lms` needs scipy.
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import inspect
import json
import logging
import os
import random
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from ..errors import UserError

log = logging.getLogger(__name__)

# sampler name -> (diffusers scheduler class name, extra config)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # PLMS, as SD's own config; PRK steps fail at few steps
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {"lower_order_final": True}),
}
SAMPLER_ALIASES = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2",
                   "k_dpm_2_a": "dpm_2_a"}
SAMPLER_NAMES = tuple(SAMPLERS) + tuple(SAMPLER_ALIASES)
IGNORED_OPTIONS = ("cn", "ctr", "rcfg")  # sd-scripts options for other model families / ControlNet


class SamplePromptError(UserError):
    """A sample prompt file, or a line in it, cannot be used."""


@dataclass
class SamplePrompt:
    """One sample image to make."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    steps: int = 30
    scale: float = 7.5
    sampler: str | None = None
    guidance: float | None = None  # --g: the guidance embedding (guidance-distilled models)
    flow_shift: float | None = None  # --fs: the sampling schedule's shift (flow-matching families that take it)
    given: frozenset = field(default=frozenset(), compare=False)  # the fields the prompt set itself


# ------------------------------------------------------------------ prompt files
def round_size(value: int) -> int:
    """Image side for sampling: rounded down to a multiple of 8, at least 64 (as sd-scripts)."""
    return max(64, value - value % 8)


def clamp_steps(value: int) -> int:
    """Sampling steps limited to 1..1000 (as sd-scripts)."""
    return max(1, min(1000, value))


def _number(kind: type, text: str, where: str, flag: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        word = "a whole number" if kind is int else "a number"
        raise SamplePromptError(f"{where}: --{flag} needs {word}, got {text!r} (e.g. --{flag} "
                                f"{ {'w': 512, 'h': 512, 'd': 42, 's': 30, 'l': 7.5}.get(flag, 1) })") from None
    if value < 0:
        raise SamplePromptError(f"{where}: --{flag} must not be negative, got {text!r}")
    return value


def _sampler_name(text: str, where: str) -> str:
    name = text.strip().lower()
    if name not in SAMPLER_NAMES:
        raise SamplePromptError(f"{where}: unknown sampler {text!r}; use one of {', '.join(SAMPLER_NAMES)}")
    return name


def parse_prompt_line(line: str, where: str = "prompt", default_sampler: str | None = "ddim") -> SamplePrompt:
    """One prompt line (without comment handling) -> SamplePrompt. `where` names the file and line in errors."""
    prompt, *options = line.strip().split(" --")
    sample = SamplePrompt(prompt=prompt.strip(), sampler=default_sampler)
    given = set()
    for option in options:
        flag, _, value = option.strip().partition(" ")
        flag, value = flag.lower(), value.strip()
        if flag == "n":
            sample.negative_prompt = value
        elif flag in ("w", "h"):
            setattr(sample, "width" if flag == "w" else "height", round_size(_number(int, value, where, flag)))
        elif flag == "d":
            sample.seed = _number(int, value, where, flag)
        elif flag == "s":
            sample.steps = clamp_steps(_number(int, value, where, flag))
        elif flag == "l":
            sample.scale = _number(float, value, where, flag)
        elif flag == "ss":
            sample.sampler = _sampler_name(value, where)
        elif flag == "g":
            sample.guidance = _number(float, value, where, flag)
        elif flag == "fs":
            sample.flow_shift = _number(float, value, where, flag)
        elif flag in IGNORED_OPTIONS:
            log.warning("%s: option --%s does not apply here and is ignored", where, flag)
        else:
            raise SamplePromptError(f"{where}: unknown option --{flag}; options are --n --w --h --d --s --l --ss "
                                    f"--g --fs")
        given.add(_FLAG_FIELDS.get(flag, flag))
    sample.given = frozenset(given)
    return sample


_FLAG_FIELDS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "s": "steps", "l": "scale",
                "ss": "sampler", "g": "guidance", "fs": "flow_shift"}


# sd-scripts' keys in .toml/.json prompt files -> SamplePrompt fields
_DICT_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
              "seed": "seed", "sample_steps": "steps", "steps": "steps", "scale": "scale",
              "sample_sampler": "sampler", "sampler": "sampler", "guidance_scale": "guidance",
              "flow_shift": "flow_shift"}
_DICT_IGNORED = {"enum", "subset", "controlnet_image", "cfg_trunc_ratio", "renorm_cfg"}


def _prompt_from_dict(entry: dict, where: str, default_sampler: str | None) -> SamplePrompt:
    sample = SamplePrompt(prompt="", sampler=default_sampler)
    given = set()
    for key, value in entry.items():
        if key in _DICT_IGNORED:
            continue
        if key in _DICT_KEYS and value is not None:
            given.add(_DICT_KEYS[key])
        if key not in _DICT_KEYS:
            raise SamplePromptError(f"{where}: unknown key {key!r}; keys are {', '.join(sorted(_DICT_KEYS))}")
        field = _DICT_KEYS[key]
        if field in ("prompt", "negative_prompt"):
            setattr(sample, field, str(value))
        elif field == "sampler":
            sample.sampler = _sampler_name(str(value), where)
        elif value is not None:
            kind = float if field in ("scale", "guidance", "flow_shift") else int
            number = _number(kind, str(value), where, {"width": "w", "height": "h", "seed": "d", "steps": "s",
                                                       "guidance": "g", "flow_shift": "fs"}.get(field, "l"))
            if field in ("width", "height"):
                number = round_size(number)
            elif field == "steps":
                number = clamp_steps(number)
            setattr(sample, field, number)
    sample.given = frozenset(given)
    return sample


def _read_structured(path: str, default_sampler: str | None) -> list[SamplePrompt]:
    if path.lower().endswith(".toml"):
        from ..options import read_toml

        data = read_toml(path).get("prompt")
        if not isinstance(data, dict):
            raise SamplePromptError(f"{path}: a TOML prompt file needs a [prompt] table with [[prompt.subset]] entries")
        common = {k: v for k, v in data.items() if k != "subset"}
        entries = [{**common, **subset} for subset in data.get("subset", [])]
    else:
        try:
            with open(path, encoding="utf-8") as f:
                entries = json.load(f)
        except ValueError as e:
            raise SamplePromptError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(entries, list):
            raise SamplePromptError(f"{path}: a JSON prompt file must hold a list of prompts")
    prompts = []
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i + 1}"
        if isinstance(entry, str):
            prompts.append(parse_prompt_line(entry, where, default_sampler))
        elif isinstance(entry, dict):
            prompts.append(_prompt_from_dict(entry, where, default_sampler))
        else:
            raise SamplePromptError(f"{where}: expected a prompt string or an object, got {type(entry).__name__}")
    return prompts


def parse_prompt_file(path: str, default_sampler: str = "ddim") -> list[SamplePrompt]:
    """Read a sample prompt file (.txt, or sd-scripts' .toml/.json forms) into SamplePrompts.

    Prompts without `--ss` get `default_sampler`. Raises SamplePromptError naming the file and line.
    """
    default_sampler = _sampler_name(default_sampler, "option 'sample_sampler'")
    if not os.path.isfile(path):
        raise SamplePromptError(f"sample prompt file {path!r} does not exist: check the path given to sample_prompts")
    if path.lower().endswith((".toml", ".json")):
        return _read_structured(path, default_sampler)
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            prompts.append(parse_prompt_line(text, f"{path}: line {number}", default_sampler))
    return prompts


# ------------------------------------------------------------------ samplers and file names
def make_scheduler(sampler_name: str, scheduler_config: dict) -> Any:
    """A diffusers scheduler for `sampler_name`, configured like the training scheduler (betas, prediction type)."""
    import diffusers

    name = SAMPLER_ALIASES.get(sampler_name.lower(), sampler_name.lower())
    if name not in SAMPLERS:
        raise SamplePromptError(f"unknown sampler {sampler_name!r}; use one of {', '.join(SAMPLER_NAMES)}")
    if name == "lms" and importlib.util.find_spec("scipy") is None:
        raise SamplePromptError("sampler 'lms' needs scipy, which is not installed: pip install scipy, or pick "
                                "another sampler (e.g. --ss euler)")
    class_name, extra = SAMPLERS[name]
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    config.update(extra)
    scheduler_class = getattr(diffusers, class_name)
    accepted = inspect.signature(scheduler_class.__init__).parameters  # drop other schedulers' keys quietly
    with warnings.catch_warnings():  # diffusers deprecates algorithm_type="dpmsolver"; sd-scripts users still pick it
        warnings.simplefilter("ignore", FutureWarning)
        return scheduler_class.from_config({k: v for k, v in config.items() if k in accepted})


def sample_file_name(output_name: str | None, *, epoch: int | None = None, step: int | None = None, index: int,
                     seed: int | None, now: _dt.datetime | float | None = None) -> str:
    """`[<name>_]<e{epoch:06d}|{step:06d}>_<index:02d>_<YYYYmmddHHMMSS>[_<seed>].png` (FORMATS.md).

    The epoch form wins when `epoch` is given; `now` is a datetime or unix time (default: the current local time).
    """
    if epoch is None and step is None:
        raise ValueError("sample_file_name needs an epoch or a step")
    if now is None:
        now = _dt.datetime.now()
    elif not isinstance(now, _dt.datetime):
        now = _dt.datetime.fromtimestamp(now)
    prefix = f"{output_name}_" if output_name else ""
    when = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    suffix = f"_{seed}" if seed is not None else ""
    return f"{prefix}{when}_{index:02d}_{now:%Y%m%d%H%M%S}{suffix}.png"


# ------------------------------------------------------------------ generation
@contextmanager
def preserved_rng_states() -> Iterator[None]:
    """Restore Python's, numpy's and torch's (CPU and all CUDA devices) global random states on exit."""
    import numpy as np
    import torch

    py_state, np_state, cpu_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextmanager
def eval_mode(modules: Sequence[Any], device: Any) -> Iterator[None]:
    """Put modules (and every submodule) in eval mode on `device`; put modes and devices back on exit."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    devices = []
    for module in modules:
        param = next(module.parameters(), None)
        if param is not None and param.device != device:
            devices.append((module, param.device))
            module.to(device)
        module.eval()
    try:
        yield
    finally:
        for module, original in devices:
            module.to(original)
        for m, training in modes:
            m.training = training


def generate_samples(family, *, prompts: list[SamplePrompt], out_dir: str, output_name: str | None,
                     epoch: int | None = None, step: int | None = None, device: Any, dtype: Any,
                     clip_skip: int | None = None, eval_modules: Sequence[Any] = (), write: bool = True) -> list[str]:
    """Generate one PNG per prompt with the family's sample pipeline into `out_dir` (created); returns the paths.

    Runs under torch.no_grad (not inference_mode: tensors cached by adapters must stay usable for training) and
    autocast to `dtype` on half precision, with the family's modules (plus `eval_modules`, e.g. a LoRA network with
    dropout) in eval mode on `device`. The caller's random states, train/eval modes and module devices are restored
    afterwards. Each prompt's sampler, steps, size, seed, negative prompt and guidance scale are used as given;
    `clip_skip` follows sd-scripts where the family has it (2 = the penultimate text-encoder layer). With
    `write=False` (the other processes of a sharded run) the images are generated but not written.
    """
    import torch

    device = torch.device(device)
    if write:
        os.makedirs(out_dir, exist_ok=True)
    modules = [*family.sample_modules(), *eval_modules]
    use_autocast = dtype in (torch.float16, torch.bfloat16)
    autocast = torch.autocast(device.type, dtype=dtype) if use_autocast else nullcontext()
    paths = []
    with preserved_rng_states(), eval_mode(modules, device), torch.no_grad(), autocast:
        sampling = family.sample_pipeline(None, clip_skip=clip_skip)
        for index, sample in enumerate(prompts):
            sampling.pipeline.scheduler = family.scheduler(sample.sampler)
            seed = sample.seed if sample.seed is not None else random.SystemRandom().randrange(2**32)
            generator = torch.Generator("cpu").manual_seed(seed)  # CPU: the same image on every device
            kwargs = dict(width=round_size(sample.width), height=round_size(sample.height),
                          num_inference_steps=sample.steps, guidance_scale=sample.scale, generator=generator,
                          output_type="pil")
            kwargs.update(sampling.inputs(sample, device))  # the family's own meaning of a prompt's settings wins
            image = sampling.pipeline(**kwargs).images[0]
            name = sample_file_name(output_name, epoch=epoch, step=step if step is not None else 0, index=index,
                                    seed=sample.seed)
            path = os.path.join(out_dir, name)
            if not write:
                continue
            tmp = path + ".tmp"
            image.save(tmp, format="PNG")
            os.replace(tmp, path)
            paths.append(path)
        del sampling
    return paths
