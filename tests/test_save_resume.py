"""Save and resume options on the real Trainer, in-process on the tiny SD 1.x model: save_n_epoch_ratio,
save_last_n_epochs_state / save_last_n_steps_state (state folders pruned on their own counts), initial_step /
initial_epoch / skip_until_initial_step (where the run starts, which batches it skips, the schedule's position).

Exact resume from a state folder is test_train_network_e2e.py::test_save_state_and_resume_continue_the_same_run.
"""
from __future__ import annotations

import os

import pytest
from PIL import Image

from sd_scripts.options import OptionError, parse_args
from sd_scripts.training.events import read_events
from sd_scripts.training.loop import Trainer
from sd_scripts.training.methods import NetworkMethod
from sd_scripts.training.saving import epochs_between_saves

pytestmark = pytest.mark.timeout(300)


def make_images(root, count: int) -> str:
    folder = root / "1_sks dog"
    os.makedirs(folder)
    for i in range(count):
        Image.new("RGB", (64, 64), (60 * i, 180 - 40 * i, 90)).save(folder / f"{i}.png")
    return str(root)


def arguments(model: str, data: str, out, *options: str):
    return parse_args("network", [
        "--pretrained_model_name_or_path", model, "--output_dir", str(out), "--train_data_dir", data,
        "--resolution", "64", "--train_batch_size", "2", "--cache_latents", "--seed", "3", "--output_name", "r",
        *options])


def test_epochs_between_saves_follows_sd_scripts():
    assert [epochs_between_saves(n, 10) for n in (1, 3, 5, 10, 20)] == [10, 3, 2, 1, 1]


def test_save_n_epoch_ratio_and_state_folders_pruned_on_their_own_counts(tiny_sd1, tmp_path):
    data = make_images(tmp_path / "data", 2)  # one step per epoch
    out, events = tmp_path / "out", tmp_path / "events.jsonl"
    args = arguments(tiny_sd1.diffusers_dir, data, out, "--max_train_epochs", "5", "--save_n_epoch_ratio", "2",
                     "--save_last_n_epochs", "2", "--save_state", "--save_last_n_epochs_state", "1",
                     "--save_every_n_steps", "2", "--save_last_n_steps_state", "1", "--events_file", str(events))
    assert Trainer(args, NetworkMethod(args)).run() == "completed"
    names = sorted(os.listdir(out))
    # every floor(5 / 2) = 2 epochs: 2 and 4 (5 is the final file); both models kept (save_last_n_epochs 2)
    assert [n for n in names if n.startswith("r-0") and n.endswith(".safetensors")] == \
        ["r-000002.safetensors", "r-000004.safetensors"]
    # epoch states: only the last one (save_last_n_epochs_state 1 overrides the models' 2)
    assert [n for n in names if n.startswith("r-0") and n.endswith("-state")] == ["r-000004-state"]
    # step saves at 2 and 4 (5 is the final save): their models kept, their states only from the last step (1)
    # before the end (sd-scripts keeps the one made exactly N steps ago)
    assert [n for n in names if n.startswith("r-step") and n.endswith(".safetensors")] == \
        ["r-step00000002.safetensors", "r-step00000004.safetensors"]
    assert [n for n in names if n.startswith("r-step") and n.endswith("-state")] == ["r-step00000004-state"]
    assert "r-state" in names and "r.safetensors" in names  # the final state and model
    saved_states = [e["path"] for e in read_events(str(events)) if e["type"] == "save" and e["kind"] == "state"]
    assert len(saved_states) == 2 + 2 + 1


def test_initial_step_with_skip_until_initial_step_continues_with_the_right_batches(tiny_sd1, tmp_path):
    data = make_images(tmp_path / "data", 4)  # two steps per epoch
    events = tmp_path / "events.jsonl"
    args = arguments(tiny_sd1.diffusers_dir, data, tmp_path / "out", "--max_train_steps", "6", "--initial_step", "3",
                     "--skip_until_initial_step", "--events_file", str(events))
    trainer = Trainer(args, NetworkMethod(args))
    seen = []
    step = trainer.training_step

    def recording_step(batch):
        seen.append(batch["image_paths"])
        return step(batch)

    trainer.training_step = recording_step
    assert trainer.run() == "completed"
    plan = trainer.dataset.batch_plan

    def paths(epoch, index):  # the data loader gives the dataset its epochs counted from 0
        return [trainer.dataset.records[i].path for i in plan(epoch - 1)[index]]

    # steps 4, 5, 6 of the straight run: epoch 2's second batch, then epoch 3
    assert seen == [paths(2, 1), paths(3, 0), paths(3, 1)]
    progress = [(e["step"], e["epoch"]) for e in read_events(str(events)) if e["type"] == "progress"]
    assert progress == [(4, 2), (5, 3), (6, 3)]
    # without resume the learning-rate schedule starts at its beginning (sd-scripts): 3 scheduler steps
    assert trainer.lr_scheduler.last_epoch == 3 and trainer.global_step == 6


def test_where_the_run_starts(tiny_sd1, tmp_path):
    data = make_images(tmp_path / "data", 4)
    args = arguments(tiny_sd1.diffusers_dir, data, tmp_path / "out", "--max_train_steps", "6")
    trainer = Trainer(args, NetworkMethod(args))
    for name in ("setup_accelerator", "load_model", "prepare_data", "load_dataset", "cache_latents", "build_method",
                 "create_optimizer", "prepare"):
        getattr(trainer, name)()
    assert trainer.plan.steps_per_epoch == 2

    def start(**options):
        for name in ("initial_step", "initial_epoch", "skip_until_initial_step"):
            setattr(args, name, options.get(name))
        trainer.resume_state()
        return trainer.global_step, trainer.first_epoch, trainer.resume_skip_batches

    assert start() == (0, 0, 0)
    assert start(initial_step=3) == (3, 1, 0)  # counted from step 3, epoch 2 from its first batch
    assert start(initial_step=3, skip_until_initial_step=True) == (3, 1, 1)
    assert start(initial_epoch=3) == (4, 2, 0) and start(initial_epoch=3, initial_step=1) == (1, 0, 0)
    args.gradient_accumulation_steps = 2  # batches are skipped, steps counted
    assert start(initial_step=1, skip_until_initial_step=True) == (1, 0, 2)
    args.gradient_accumulation_steps = 1
    with pytest.raises(OptionError, match="initial_step"):
        start(initial_step=6)
