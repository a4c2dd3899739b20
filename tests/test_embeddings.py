"""sd_scripts.networks.embeddings: every embedding layout users bring loads; ours round-trips; bad files are named."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sd_scripts.errors import UserError
from sd_scripts.networks.embeddings import (EmbeddingFileError, a1111_torch_data, load_embedding,
                                            save_embedding)


def test_safetensors_round_trip_with_modelspec_metadata(tmp_path):
    vectors = torch.randn(3, 32)
    path = tmp_path / "emb.safetensors"
    save_embedding(path, {"emb_params": vectors}, name="mychar", metadata={"modelspec.title": "mychar"})
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.metadata() == {"modelspec.title": "mychar"}
    loaded = load_embedding(path)
    assert torch.equal(loaded.vectors["emb_params"], vectors) and loaded.num_vectors == 3
    assert loaded.name == "mychar"
    assert list(tmp_path.iterdir()) == [path], "no temp file left behind"


def test_a1111_pt_written_by_a1111_loads(tmp_path):
    """A .pt as A1111 writes it (string_to_token/string_to_param/name/step/sd_checkpoint...)."""
    vectors = torch.randn(2, 32)
    path = tmp_path / "pekora.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "pekora", "step": 1500,
                "sd_checkpoint": "45dee52b", "sd_checkpoint_name": "wd12"}, path)
    loaded = load_embedding(path)
    assert torch.equal(loaded.vectors_for("emb_params"), vectors)
    assert loaded.name == "pekora" and loaded.step == 1500


def test_our_pt_is_the_a1111_layout_and_round_trips(tmp_path):
    vectors = torch.randn(4, 32)
    path = tmp_path / "emb.pt"
    save_embedding(path, {"emb_params": vectors}, name="mychar", step=7, sd_checkpoint_name="tiny.safetensors",
                   dtype=torch.float16)
    data = torch.load(path, weights_only=True)  # what diffusers and a careful loader do
    assert set(data) == set(a1111_torch_data(vectors, name="x"))
    assert data["name"] == "mychar" and data["step"] == 7 and data["string_to_param"]["*"].dtype == torch.float16
    loaded = load_embedding(path)
    assert torch.allclose(loaded.vectors["emb_params"], vectors, atol=1e-2) and loaded.step == 7


def test_diffusers_learned_embeds_and_single_vectors(tmp_path):
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<cat-toy>": torch.randn(32)}, path)
    loaded = load_embedding(path)
    assert loaded.vectors["emb_params"].shape == (1, 32) and loaded.name == "<cat-toy>"


def test_sdxl_file_has_both_encoders_and_refuses_sd1(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(path))
    loaded = load_embedding(path)
    assert loaded.vectors_for("clip_g").shape == (2, 1280)
    with pytest.raises(EmbeddingFileError, match="another model family"):
        loaded.vectors_for("emb_params", str(path))


@pytest.mark.parametrize("content", [b"", b"not a torch file"])
def test_unreadable_files_are_one_line_user_errors(tmp_path, content):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_embedding(path)
    assert "broken.pt" in str(err.value) and "\n" not in str(err.value)


def test_other_files_are_refused_by_name(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"a.lora_down.weight": torch.zeros(2, 2), "a.lora_up.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(EmbeddingFileError, match="holds 2 tensors"):
        load_embedding(lora)
    with pytest.raises(EmbeddingFileError, match="does not exist"):
        load_embedding(tmp_path / "missing.safetensors")
    odd = tmp_path / "odd.pt"
    torch.save({"step": 3}, odd)
    with pytest.raises(EmbeddingFileError, match="not a textual-inversion embedding"):
        load_embedding(odd)
