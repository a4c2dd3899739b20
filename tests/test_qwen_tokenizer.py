"""The bundled Qwen tokenizer (sd_scripts/models/qwen_tokenizer.py): ids of the special tokens Qwen3 and Qwen2.5-VL
share, padding, and the one-line errors for a folder without a tokenizer."""
import os

import pytest

from sd_scripts.errors import ModelLoadError
from sd_scripts.models.qwen_tokenizer import QWEN_SPECIAL_TOKEN_IDS, QWEN_TOKENIZER_DIR, load_qwen_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_qwen_tokenizer()


def test_bundled_files_and_licence():
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "LICENSE", "NOTICE"):
        assert os.path.isfile(os.path.join(QWEN_TOKENIZER_DIR, name)), name
    assert "Apache License" in open(os.path.join(QWEN_TOKENIZER_DIR, "LICENSE")).read(200)


def test_special_tokens_and_text_ids(tok):
    for text, i in QWEN_SPECIAL_TOKEN_IDS.items():
        assert tok.convert_tokens_to_ids(text) == i
    # the vision markers of Qwen2.5-VL have the same ids in this vocabulary
    assert tok.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>"]) == [151652, 151655]
    ids = tok("<|im_start|>user\na cat<|im_end|>").input_ids
    assert ids == [151644, 872, 198, 64, 8251, 151645]  # no BOS/EOS added; special tokens kept whole


def test_pads_right_with_endoftext(tok):
    enc = tok(["a cat", "a photo of a dog"], padding=True)
    assert enc.input_ids[0][-1] == 151643 and enc.attention_mask[0][-1] == 0
    assert enc.attention_mask[1] == [1] * len(enc.input_ids[1])


def test_folder_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such tokenizer folder"):
        load_qwen_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="no Qwen tokenizer here"):
        load_qwen_tokenizer(str(tmp_path))
