"""End to end: real `accelerate launch -m sd_scripts.train_textual_inversion` runs on the tiny SD1 model."""
from __future__ import annotations

import subprocess

import pytest
import torch
from safetensors import safe_open

from conftest import PYTHON, REPO, accelerate_cmd, subprocess_env
from sd_scripts.networks.embeddings import load_embedding
from sd_scripts.training.events import read_events

pytestmark = pytest.mark.timeout(600)
MODULE = "sd_scripts.train_textual_inversion"


def write_run_toml(path, **values) -> str:
    from sd_scripts.options import dump_toml

    path.write_text(dump_toml(values, "ti"))
    return str(path)


def run_trainer(cmd, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"trainer failed rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def ti_data(tmp_path_factory):
    """Four 64 px images in '2_mychar' with captions that name the token."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("ti_data") / "2_mychar"
    folder.mkdir()
    for i, (colour, rgb) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220)), ("green", (30, 200, 30)),
                                       ("yellow", (230, 220, 20))]):
        image = Image.new("RGB", (64, 64), (240, 240, 240))
        ImageDraw.Draw(image).ellipse((8 + 4 * i, 8, 48 + 4 * i, 48), fill=rgb)
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of mychar, {colour} circle\n")
    return str(folder.parent)


def base_values(model: str, data: str, out, **extra) -> dict:
    values = dict(pretrained_model_name_or_path=model, train_data_dir=data, output_dir=str(out), resolution="64",
                  caption_extension=".txt", token_string="mychar", max_data_loader_n_workers=0, seed=1)
    values.update(extra)
    return values


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd1, ti_data):
    """One run: 2 vectors from 'dog', 4 steps, a save at step 2, samples at step 4."""
    tmp = tmp_path_factory.mktemp("ti_run")
    prompts = tmp / "prompts.txt"
    prompts.write_text("a photo of mychar --w 64 --h 64 --s 2 --d 3\n")
    events_file = tmp / "job" / "events.jsonl"
    values = base_values(tiny_sd1.single_file, ti_data, tmp / "out", output_name="emb", init_word="dog",
                         num_vectors_per_token=2, learning_rate=5e-2, max_train_steps=4, save_every_n_steps=2,
                         sample_prompts=str(prompts), sample_every_n_steps=4, events_file=str(events_file),
                         save_state_on_train_end=True)
    run_trainer(accelerate_cmd("--config_file", write_run_toml(tmp / "run.toml", **values), module=MODULE))
    return tmp / "out", events_file, values


def original_token_row(model_path: str, word: str) -> torch.Tensor:
    from sd_scripts.models.loading import load_model

    bundle = load_model(model_path)
    ids = bundle.tokenizer(word, add_special_tokens=False).input_ids
    return bundle.text_encoder.get_input_embeddings().weight[ids[0]].detach()


def test_embedding_file_events_and_samples(trained, tiny_sd1):
    out, events_file, _ = trained
    with safe_open(str(out / "emb.safetensors"), "pt") as f:
        assert list(f.keys()) == ["emb_params"]
        vectors, meta = f.get_tensor("emb_params"), f.metadata()
    assert vectors.shape == (2, 32)  # [n_vectors, hidden size of the tiny CLIP]
    assert set(meta) <= {k for k in meta if k.startswith("modelspec.")}, "only modelspec metadata"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert meta["modelspec.title"] == "mychar" and meta["modelspec.resolution"] == "64x64"
    dog = original_token_row(tiny_sd1.single_file, "dog")
    for row in vectors:
        assert not torch.allclose(row, dog), "the vectors trained away from the init word's embedding"
    assert (out / "emb-step00000002.safetensors").exists()

    events = read_events(str(events_file))
    types = [e["type"] for e in events]
    assert types[0] == "start" and events[0]["trainer"] == "ti" and types[-1] == "done"
    assert events[-1]["status"] == "completed" and str(out / "emb.safetensors") in events[-1]["outputs"]
    assert {"progress", "save", "sample"} <= set(types) and "warning" not in types
    assert [e["step"] for e in events if e["type"] == "progress"][-1] == 4
    assert {e["kind"] for e in events if e["type"] == "save"} == {"step", "final", "state"}
    [sample] = [e for e in events if e["type"] == "sample"]
    assert sample["prompts"] == ["a photo of mychar mychar1"], "sample prompts use every vector of the token"


def test_diffusers_load_textual_inversion_reads_our_file(trained, tiny_sd1):
    from diffusers import StableDiffusionPipeline

    out, _, _ = trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1.diffusers_dir, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    before = pipe.encode_prompt("a photo of mychar", "cpu", 1, False)[0]
    pipe.load_textual_inversion(str(out / "emb.safetensors"), token="mychar")
    after = pipe.encode_prompt("a photo of mychar", "cpu", 1, False)[0]
    assert not torch.allclose(before, after)
    ids = pipe.tokenizer.convert_tokens_to_ids(["mychar", "mychar_1"])
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(table[ids], load_embedding(out / "emb.safetensors").vectors["emb_params"])


def test_weights_continue_into_an_a1111_pt_with_templates(trained, tmp_path, tiny_sd1, ti_data):
    """learning_rate 0: the saved vectors are exactly those of the `weights` file the run started from."""
    from diffusers import StableDiffusionPipeline

    out, _, _ = trained
    cfg = write_run_toml(tmp_path / "run.toml", **base_values(
        tiny_sd1.single_file, ti_data, tmp_path / "out", output_name="cont", token_string="zqother",
        num_vectors_per_token=2, weights=str(out / "emb.safetensors"), learning_rate=0.0, max_train_steps=2,
        use_object_template=True, save_model_as="pt"))
    run_trainer(accelerate_cmd("--config_file", cfg, module=MODULE))
    pt = tmp_path / "out" / "cont.pt"
    data = torch.load(pt, weights_only=True)
    assert data["name"] == "zqother" and data["step"] == 2 and set(data["string_to_param"]) == {"*"}
    start = load_embedding(out / "emb.safetensors").vectors["emb_params"]
    assert torch.equal(load_embedding(pt).vectors["emb_params"], start)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1.diffusers_dir, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(pt))  # A1111 layout: the token is the file's 'name'
    assert pipe.tokenizer.convert_tokens_to_ids("zqother_1") == 49409


@pytest.mark.parametrize("extra,message", [
    (["--token_string", "dog"], "option 'token_string': 'dog' is already a token"),
    (["--token_string", "mychar", "--init_word", "red dog"], "option 'init_word': 'red dog' is 2 tokens but "
                                                              "num_vectors_per_token is 1"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, tiny_sd1, ti_data, extra, message):
    events_file = tmp_path / "events.jsonl"
    cmd = [PYTHON, "-m", MODULE, "--pretrained_model_name_or_path", tiny_sd1.single_file, "--train_data_dir",
           ti_data, "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--caption_extension", ".txt",
           "--max_train_steps", "1", "--max_data_loader_n_workers", "0", "--events_file", str(events_file), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in proc.stderr
    events = read_events(str(events_file))
    assert events[-2]["type"] == "error" and message in events[-2]["message"]
    assert events[-1]["type"] == "done" and events[-1]["status"] == "failed"
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_resume_continues_from_the_saved_vectors(trained, tmp_path, tiny_sd1):
    """The state folder holds the trained vectors: a resumed run continues from them, not from the init word."""
    out, _, first_values = trained
    values = dict(first_values, output_dir=str(tmp_path), output_name="b", max_train_steps=5,
                  resume=str(out / "emb-state"), sample_prompts=None, save_every_n_steps=None, events_file=None,
                  save_state_on_train_end=False)
    run_trainer([PYTHON, "-m", MODULE, "--config_file", write_run_toml(tmp_path / "run.toml", **values)])
    first = load_embedding(out / "emb.safetensors").vectors["emb_params"]
    resumed = load_embedding(tmp_path / "b.safetensors").vectors["emb_params"]
    dog = original_token_row(tiny_sd1.single_file, "dog")
    assert (resumed - first).norm() < (resumed - dog).norm(), "one more step from the saved vectors"


def test_sdxl_run_saves_clip_l_and_clip_g(tmp_path, ti_data):
    from sd_scripts.tools.tiny_model import build_tiny_model

    model = build_tiny_model(str(tmp_path / "sdxl"), "sdxl", layout="single", seed=0).single_file
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of mychar --w 64 --h 64 --s 2 --d 3\n")
    events_file = tmp_path / "events.jsonl"
    run_trainer([PYTHON, "-m", MODULE, "--pretrained_model_name_or_path", model, "--train_data_dir", ti_data,
                 "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--caption_extension", ".txt",
                 "--token_string", "mychar", "--init_word", "dog", "--num_vectors_per_token", "2",
                 "--learning_rate", "5e-2", "--max_train_steps", "2", "--max_data_loader_n_workers", "0",
                 "--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--events_file", str(events_file)])
    with safe_open(str(tmp_path / "out" / "last.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
        meta = f.metadata()
    assert set(shapes) == {"clip_l", "clip_g"} and all(s[0] == 2 for s in shapes.values())
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    events = read_events(str(events_file))
    assert events[-1]["status"] == "completed" and any(e["type"] == "sample" for e in events)
