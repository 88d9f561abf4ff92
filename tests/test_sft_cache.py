"""Tokenise once: the second load comes from the on-disk cache, the key changes with everything that changes the
tokens, a cache cut short is never read, and an unwritable cache dir only costs a warning."""

import sys

import pytest
import tokenizers
import transformers
from conftest import PERSONA_PATH, REPO, write_json

sys.path.insert(0, str(REPO / "phase2_lora"))
import sft_data  # noqa: E402
from qlora_model import UsageError, load_tokenizer  # noqa: E402
from sft_data import cache_key, load_sft_datasets, tokenized_dataset  # noqa: E402

RECS = [{"instruction": f"问题{i}", "input": "", "output": f"回答{i}。"} for i in range(6)]


@pytest.fixture()
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture()
def data(tmp_path):
    return write_json(tmp_path / "d.json", RECS)


def quiet(*_):
    pass


def no_rebuild(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("tokenised again although the cache holds this build")
    monkeypatch.setattr(sft_data, "build_examples", fail)


def test_second_load_comes_from_the_cache(tmp_path, tokenizer, data, monkeypatch):
    logs = []
    first, stats = tokenized_dataset([data], tokenizer, cache_dir=tmp_path / "cache", log=logs.append)
    assert any(line.startswith("tokenise: 6/6 conversations (100%)") for line in logs)  # plain progress lines
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"sft-{stats['cache'].rsplit('-', 1)[1]}"]
    no_rebuild(monkeypatch)
    logs.clear()
    again, stats_again = tokenized_dataset([data], tokenizer, cache_dir=tmp_path / "cache", log=logs.append)
    assert logs == [f"tokenised data: loaded from cache {stats['cache']}"]
    assert again.to_list() == first.to_list() and stats_again == stats
    # What training gets is identical too: the same seeded split, from the same examples.
    a = load_sft_datasets([data], tokenizer, val_size=2, cache_dir=tmp_path / "cache", log=lambda *_: None)
    monkeypatch.undo()
    b = load_sft_datasets([data], tokenizer, val_size=2, log=lambda *_: None)  # no cache at all
    assert [(d.to_list()) for d in a[:2]] == [(d.to_list()) for d in b[:2]]


def test_key_covers_data_tokenizer_template_versions_and_options(tmp_path, tokenizer, data, monkeypatch):
    options = {"system": None, "max_seq_len": 512, "max_samples": None, "train_on_prompt": False}
    key = cache_key([data], tokenizer, **options)
    copy = write_json(tmp_path / "copy.json", RECS)  # same bytes under another name: same tokens, same key
    assert cache_key([copy], tokenizer, **options) == key
    assert cache_key([data], load_tokenizer(tokenizer.name_or_path), **options) == key  # a fresh load of it
    changed = {"system": "你是小柒。", "max_seq_len": 256, "max_samples": 3, "train_on_prompt": True}
    keys = {name: cache_key([data], tokenizer, **{**options, name: value}) for name, value in changed.items()}
    keys["data"] = cache_key([write_json(tmp_path / "e.json", RECS[:-1])], tokenizer, **options)
    keys["file order"] = cache_key([data, PERSONA_PATH], tokenizer, **options)
    assert cache_key([PERSONA_PATH, data], tokenizer, **options) != keys["file order"]
    template = load_tokenizer(tokenizer.name_or_path)
    template.chat_template = template.chat_template.replace("\n", " ")  # turns on one line
    keys["chat template"] = cache_key([data], template, **options)
    vocab = load_tokenizer(tokenizer.name_or_path)
    vocab.add_tokens(["回答"])  # a new token changes how the answers tokenise
    keys["vocabulary"] = cache_key([data], vocab, **options)
    for library in (transformers, tokenizers):  # another release may render the template or split text differently
        with monkeypatch.context() as patch:
            patch.setattr(library, "__version__", library.__version__ + ".post1")
            keys[library.__name__] = cache_key([data], tokenizer, **options)
    assert len(set(keys.values()) | {key}) == len(keys) + 1, keys


@pytest.mark.parametrize("option, value", [("max_seq_len", None), ("system", "你是小柒。"), ("max_samples", 3),
                                           ("train_on_prompt", True)], ids=lambda v: v if isinstance(v, str) else "")
def test_loads_with_another_option_do_not_share_a_cache(tmp_path, tokenizer, data, option, value):
    """What the loader passes to cache_key: a second load into the same cache folder with one option changed
    must give what a load without any cache gives, not the first load's cached tokens."""
    if option == "max_seq_len":  # 2 tokens short of the records' length: every answer is cut
        value = max(tokenized_dataset([data], tokenizer, log=quiet)[0]["length"][:]) - 2
    tokenized_dataset([data], tokenizer, cache_dir=tmp_path / "cache", log=quiet)
    cached, stats = tokenized_dataset([data], tokenizer, cache_dir=tmp_path / "cache", log=quiet, **{option: value})
    fresh, fresh_stats = tokenized_dataset([data], tokenizer, log=quiet, **{option: value})
    assert cached.to_list() == fresh.to_list() and {**stats, "cache": None} == {**fresh_stats, "cache": None}
    assert len(list((tmp_path / "cache").glob("sft-*"))) == 2


def test_a_cache_cut_short_is_never_read(tmp_path, tokenizer, data, monkeypatch):
    def crash(src, dst):  # the process dies after writing the temp dir, before the rename
        raise KeyboardInterrupt
    monkeypatch.setattr(sft_data.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        tokenized_dataset([data], tokenizer, cache_dir=tmp_path / "cache", log=lambda *_: None)
    monkeypatch.undo()
    assert not list((tmp_path / "cache").glob("sft-*"))  # only the hidden temp dir is left
    ds, stats = tokenized_dataset([data], tokenizer, cache_dir=tmp_path / "cache", log=lambda *_: None)
    assert len(ds) == 6 and (tmp_path / "cache" / stats["cache"].rsplit("/", 1)[1] / "stats.json").is_file()


def test_overwrite_strict_and_unwritable(tmp_path, tokenizer, monkeypatch):
    bad = write_json(tmp_path / "bad.json", RECS + [{"instruction": "x", "output": 3}])
    _, stats = tokenized_dataset([bad], tokenizer, cache_dir=tmp_path / "cache", log=lambda *_: None)
    assert stats["invalid"] == 1
    with pytest.raises(UsageError, match="bad.json record 6: field 'output' is int"):  # not hidden by the cache
        tokenized_dataset([bad], tokenizer, strict=True, cache_dir=tmp_path / "cache", log=lambda *_: None)
    logs = []
    tokenized_dataset([bad], tokenizer, cache_dir=tmp_path / "cache", overwrite_cache=True, log=logs.append)
    assert logs[-1].startswith("tokenised data: cached in") and len(list((tmp_path / "cache").iterdir())) == 1
    blocked = write_json(tmp_path / "a_file", "not a directory")
    logs.clear()
    ds, stats = tokenized_dataset([bad], tokenizer, cache_dir=blocked / "cache", log=logs.append)
    assert len(ds) == 6 and "cache" not in stats
    assert any(line.startswith(f"warning: cannot write the tokenised-data cache {blocked}") for line in logs)


def test_benchmark_records_follow_the_length_statistics(tmp_path):
    """benchmark_data.py's synthetic Alpaca file has the length statistics it claims (log-normal fits)."""
    from benchmark_data import ALPACA_STATS, fit_stats, make_records
    path = write_json(tmp_path / "fake.json", make_records(4000, ALPACA_STATS, seed=0))
    fitted = fit_stats(path)
    for field in ("instruction", "input", "output"):
        assert fitted[field] == pytest.approx(ALPACA_STATS[field], abs=0.06), field
    assert fitted["p_input"] == pytest.approx(ALPACA_STATS["p_input"], abs=0.03)
    assert fitted["cjk_fraction"] == pytest.approx(ALPACA_STATS["cjk_fraction"], abs=0.02)
