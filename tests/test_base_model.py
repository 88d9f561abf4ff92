"""finetune.py refuses a base model (pre-trained only, like Qwen/Qwen1.5-1.8B rather than -Chat) in one line:
its <|im_end|> rows were never trained and LoRA, which freezes embeddings and lm_head, cannot teach it to stop.
The check is qlora_model.check_chat_model (phase3_ddp has a byte-identical copy). The tiny base model is
make_tiny_model.py --variant base: the chat template, but stop tokens of a base model; with --tokenizer qwen, the
real ids (<|im_end|> 151645, <|endoftext|> 151643)."""

import json
import shutil
import sys

import pytest
from conftest import PERSONA_PATH, REPO, run_script

sys.path.insert(0, str(REPO / "phase2_lora"))
import finetune  # noqa: E402
from qlora_model import UsageError, check_chat_model, load_tokenizer, stop_token_ids  # noqa: E402
from qwen_tiny import qwen_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "tiny-qwen-base"
    proc = run_script("phase2_lora/make_tiny_model.py", "--variant", "base", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr
    return out


def read(folder, name):
    return json.loads((folder / name).read_text(encoding="utf-8"))


def test_base_variant_ships_a_base_models_stop_tokens(base_model_dir, tiny_model_dir):
    """As Qwen1.5 base vs -Chat: the same template, EOS <|endoftext|> instead of <|im_end|>."""
    base, chat = load_tokenizer(base_model_dir), load_tokenizer(tiny_model_dir)
    assert base.chat_template == chat.chat_template and base.get_vocab() == chat.get_vocab()
    assert (base.eos_token, chat.eos_token) == ("<|endoftext|>", "<|im_end|>")
    end_of_text, im_end = chat.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert read(base_model_dir, "generation_config.json")["eos_token_id"] == [end_of_text]
    assert read(tiny_model_dir, "generation_config.json")["eos_token_id"] == [im_end, end_of_text]
    assert (read(base_model_dir, "config.json")["eos_token_id"], read(tiny_model_dir, "config.json")["eos_token_id"]) \
        == (end_of_text, im_end)


def test_finetune_refuses_a_base_model(base_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--model_name_or_path", base_model_dir, "--data_path", PERSONA_PATH, "--output_dir", out, "--no_cache"]
    assert finetune.main([str(a) for a in argv]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {base_model_dir} looks like a base model, not a chat model: its template ends "
                           f"each answer with <|im_end|> (id 2) but it stops only at <|endoftext|> (0), so its "
                           f"<|im_end|> rows were never trained")
    assert "fine-tune the chat model (e.g. Qwen/Qwen1.5-1.8B-Chat)" in line
    assert not out.exists()


def test_chat_model_passes_and_the_documented_fix_works(base_model_dir, tiny_model_dir, tmp_path):
    check_chat_model(str(tiny_model_dir), load_tokenizer(tiny_model_dir))  # the tiny chat model: accepted
    # "if this is one (a chat model), add <|im_end|>'s id to eos_token_id in its generation_config.json"
    fixed = shutil.copytree(base_model_dir, tmp_path / "fixed")
    cfg = read(fixed, "generation_config.json")
    (fixed / "generation_config.json").write_text(json.dumps({**cfg, "eos_token_id": [2, 0]}), encoding="utf-8")
    check_chat_model(str(fixed), load_tokenizer(fixed))
    assert stop_token_ids(str(fixed), load_tokenizer(fixed)) == {0, 2}


def test_a_tokenizer_without_a_chat_template_is_refused(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = None
    with pytest.raises(UsageError, match=r"has no chat template \(a base model\?\)"):
        check_chat_model(str(tiny_model_dir), tokenizer)


def test_real_qwen_ids_chat_accepted_base_refused():
    """On Qwen's real tokenizer: Qwen1.5-Chat's stop ids pass, the base model's (<|endoftext|> only) do not."""
    chat, base = qwen_model_dir("chat"), qwen_model_dir("base")
    assert stop_token_ids(str(chat), load_tokenizer(chat)) == {151643, 151645}
    check_chat_model(str(chat), load_tokenizer(chat))
    with pytest.raises(UsageError) as refused:
        check_chat_model(str(base), load_tokenizer(base))
    assert str(refused.value).startswith(
        f"{base} looks like a base model, not a chat model: its template ends each answer with <|im_end|> (id "
        f"151645) but it stops only at <|endoftext|> (151643)")
