"""The tiny checkpoints' tokenizer and processor files carry the fields Microsoft's own loaders
read (transformers 4.4x `AutoTokenizer` / `AutoProcessor` with `trust_remote_code`), and our
loader honours what they say."""

import json

import pytest
import torch

from hae_cli.model.phi3v.image import ProcessedImage, image_token_modalities, tokens_per_image
from hae_cli.model.loading import DEMO_MODEL_DIR
from hae_cli.model.phi3v.checkpoint import load_tokenizer
from hae_cli.model.phi3v.prompt import build_prompt, user_message
from hae_testing.checkpoints.phi3v import write_tiny_checkpoint
from hae_testing.checkpoints.phi3v_tokenizer import CHAT_TOKENS


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("checkpoint", ["tiny", "demo"])
def test_tokenizer_config_has_the_official_fields(folder, checkpoint):
    where = folder if checkpoint == "tiny" else DEMO_MODEL_DIR
    config = json.loads((where / "tokenizer_config.json").read_text())
    # 4.4x maps LlamaTokenizer to LlamaTokenizerFast, which reads tokenizer.json
    assert config["tokenizer_class"] == "LlamaTokenizer"
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["legacy"] is False and "add_prefix_space" not in config  # it would force the slow path
    assert "{% for message in messages %}" in config["chat_template"]  # inline: 4.4x reads no .jinja
    assert not (where / "chat_template.jinja").exists()
    assert "extra_special_tokens" not in config and config.get("backend") is None
    added = {entry["content"]: entry for entry in config["added_tokens_decoder"].values()}
    for token in ["<unk>", "<s>", "</s>", *CHAT_TOKENS]:
        assert added[token]["special"] is True, token
    special = json.loads((where / "special_tokens_map.json").read_text())
    assert special["bos_token"] == "<s>" and special["unk_token"] == "<unk>"
    assert (where / "tokenizer.json").is_file()


@pytest.mark.parametrize("checkpoint", ["tiny", "demo"])
def test_processor_files_map_to_phi35v_processing_module(folder, checkpoint):
    where = folder if checkpoint == "tiny" else DEMO_MODEL_DIR
    pre = json.loads((where / "preprocessor_config.json").read_text())
    assert pre["auto_map"] == {
        "AutoImageProcessor": "processing_phi3_v.Phi3VImageProcessor",
        "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
    }
    assert pre["image_processor_type"] == "Phi3VImageProcessor" and pre["processor_class"] == "Phi3VProcessor"
    processor = json.loads((where / "processor_config.json").read_text())
    assert processor["auto_map"]["AutoProcessor"] == "processing_phi3_v.Phi3VProcessor"


def test_loader_reads_the_official_files_and_honours_add_bos_token(folder, tmp_path):
    tokenizer = load_tokenizer(folder)
    assert tokenizer.encode("what")[0] == tokenizer.bos_token_id
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "what"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|>\nwhat<|end|>\n<|assistant|>\n"
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert tokenizer.decode([tokenizer.bos_token_id, end], skip_special_tokens=True) == ""

    # the same files with add_bos_token false: no <s> anywhere, as Microsoft's code would do
    for name in ("tokenizer.json", "special_tokens_map.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((folder / name).read_text())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    plain = load_tokenizer(tmp_path)
    assert plain.encode("what") == tokenizer.encode("what", add_special_tokens=False)
    image = ProcessedImage(torch.empty(0), 1, 1, tokens_per_image(1, 1, 2), image_token_modalities(1, 1, 2))
    assert tokenizer.bos_token_id not in build_prompt(plain, user_message("what", 1), [image]).input_ids.tolist()
    assert build_prompt(tokenizer, user_message("what", 1), [image]).input_ids.tolist().count(tokenizer.bos_token_id) == 2
