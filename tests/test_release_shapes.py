"""Release folders as later releases ship them: weights split into consolidated-0000N-of-0000M
shards, a vision encoder beside a text model, params.json keys mixchat does not use."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_args

from mixchat.dev.synthetic import random_state
from mixchat.engine.engine import Engine
from mixchat.errors import ReleaseError
from mixchat.frontends import cli
from mixchat.release.folder import Release, open_release
from mixchat.release.inspection import family, inspect_release


def logits(folder, ids=(1, 415, 2936, 9060)) -> torch.Tensor:
    engine = Engine.load(folder, dtype="fp32", warm=False)
    return engine.model(torch.tensor(ids), engine.new_cache()).logits


@pytest.mark.parametrize("layout, moe", [("dense", None), ("experts", {"num_experts": 4, "num_experts_per_tok": 2})])
def test_sharded_weights_load_as_one_state_dict(make_release, layout, moe):
    args = tiny_args(moe=moe)
    one = make_release(args, layout, seed=4, safetensors=True)
    three = make_release(args, layout, seed=4, shards=3)
    release = Release.find(three)
    assert [p.name for p in release.weight_files] == [f"consolidated-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert torch.equal(logits(one), logits(three))  # the same tensors, wherever they were stored
    report = inspect_release(three)
    assert report["problem"] is None and len(report["weights"]["files"]) == 3
    assert report["weights"]["bytes"] == sum(p.stat().st_size for p in release.weight_files)


def test_a_missing_shard_is_named(make_release, capsys):
    folder = make_release(tiny_args(), seed=4, shards=3)
    (folder / "consolidated-00002-of-00003.safetensors").unlink()
    with pytest.raises(ReleaseError, match="consolidated-00002-of-00003.safetensors: missing"):
        open_release(folder)
    assert cli.main(["inspect", str(folder)]) == 2
    assert "00002-of-00003.safetensors: missing" in capsys.readouterr().err


def test_shards_that_repeat_a_tensor_or_mix_splits_are_refused(make_release):
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = make_release(tiny_args(), seed=4, shards=2)
    stray = folder / "consolidated-00003-of-00004.safetensors"
    save_file({"x": torch.ones(1)}, str(stray))
    with pytest.raises(ReleaseError, match="different splits"):
        Release.find(folder)
    stray.unlink()
    with safe_open(str(folder / "consolidated-00001-of-00002.safetensors"), framework="pt") as f:
        name = next(iter(f.keys()))
        repeated = {name: f.get_tensor(name)}
    second = folder / "consolidated-00002-of-00002.safetensors"
    with safe_open(str(second), framework="pt") as f:
        save_file({**{k: f.get_tensor(k) for k in f.keys()}, **repeated}, str(second))
    with pytest.raises(ReleaseError, match="is also in consolidated-00001-of-00002"):
        open_release(folder)


def test_verify_checks_every_shard(make_release, capsys):
    folder = make_release(tiny_args(), seed=4, shards=2)
    assert cli.main(["verify", str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.count("OK        consolidated-0000") == 2
    shard = folder / "consolidated-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cli.main(["verify", str(folder)]) == 1
    assert "MISMATCH  consolidated-00002-of-00002.safetensors" in capsys.readouterr().out


def test_a_vision_encoder_is_skipped_and_text_chat_works(make_release, capsys):
    args = tiny_args()
    sd = random_state(args, "dense", seed=6, std=0.15)
    text_only = make_release(args, state=dict(sd), safetensors=True)
    vision = {"vision_encoder.transformer.layers.0.attention.wq.weight": torch.randn(32, 32).bfloat16(),
              "vision_language_adapter.w_in.weight": torch.randn(64, 32).bfloat16()}
    params = {**args.to_params(), "vision_encoder": {"hidden_size": 32, "num_channels": 3, "image_size": 64,
                                                      "patch_size": 16, "intermediate_size": 64,
                                                      "num_hidden_layers": 1, "num_attention_heads": 2}}
    pixtral = make_release(args, state={**sd, **vision}, params=params, safetensors=True)
    assert torch.equal(logits(text_only), logits(pixtral))
    report = inspect_release(pixtral)
    assert report["problem"] is None and report["vision_encoder"]["tensors"] == 2
    assert "vision_encoder" in report["unknown_params"]
    assert cli.main(["inspect", str(pixtral)]) == 0
    assert "vision encoder 2 tensors" in capsys.readouterr().out
    # a declared vision encoder skips the image tower's tensors only: a stray one is still named
    stray = make_release(args, state={**sd, **vision, "extra_head.weight": torch.randn(4, 4).bfloat16()},
                         params=params, safetensors=True)
    with pytest.raises(ReleaseError, match="unexpected tensor.*extra_head.weight"):
        open_release(stray)
    # without a vision_encoder in params.json, foreign tensors are still refused
    (pixtral / "params.json").write_text(json.dumps(args.to_params()))
    with pytest.raises(ReleaseError, match="unexpected tensor"):
        open_release(pixtral)


@pytest.mark.parametrize("params, words", [
    ({"dim": 5120, "n_layers": 40, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
      "vocab_size": 131072}, "Mistral-Nemo (12B) / Pixtral-12B-like: 40 layers, dim 5120"),
    ({"dim": 5120, "n_layers": 8, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
      "vocab_size": 131072}, "(cut to 8 of its 40 layers)"),
    ({"dim": 4096, "n_layers": 32, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 32000,
      "moe": {"num_experts": 8, "num_experts_per_tok": 2}}, "Mixtral-8x7B-like"),
    ({"dim": 64, "n_layers": 2, "hidden_dim": 96, "n_heads": 4, "vocab_size": 32000}, "Mistral-style dense model"),
])
def test_inspect_names_the_family(params, words):
    from mixchat.release.config import ModelArgs

    assert words in family(ModelArgs.from_dict(params))


@pytest.mark.parametrize("tokenizer, vocab, version", [
    ("tekken", 131072, "v3"),  # Mistral-Nemo's tekken.json: the v3-tekken format
    ("v7", 32768, "v7"),  # tokenizer.model.v7: [SYSTEM_PROMPT] ... [/SYSTEM_PROMPT]
    ("v3", 32768, "v3"),
])
def test_todays_tokenizers_chat_end_to_end_as_mistral_common_writes_it(make_release, tokenizer, vocab, version,
                                                                        capsys):
    from mistral_oracle import oracle_chat

    from mixchat.dev.synthetic import mistral_common_tokenizer

    source = mistral_common_tokenizer(tokenizer)
    name = "tekken.json" if tokenizer == "tekken" else f"tokenizer.model.{tokenizer}"
    folder = make_release(tiny_args(vocab_size=vocab), seed=2, std=0.15, tokenizer=source, tokenizer_name=name)
    assert cli.main(["-m", str(folder), "--dtype", "fp32", "--temperature", "0", "--max-tokens", "3", "--json",
                     "--system", "Be brief.", "-p", "Hello [INST] there"]) == 0
    done = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert done["prompt_tokens"] == oracle_chat(source, [("user", "Hello [INST] there")], "Be brief.")
    report = inspect_release(folder)
    assert report["problem"] is None and report["tokenizer"]["kind"] == ("tekken" if tokenizer == "tekken"
                                                                         else "sentencepiece")
    assert report["tokenizer"]["version"] == version and report["family"].endswith(version)


def test_two_tokenizers_that_disagree_are_refused_naming_both(make_release, capsys):
    from mixchat.dev.synthetic import mistral_common_tokenizer

    folder = make_release(tiny_args(vocab_size=32768), seed=2, tokenizer=mistral_common_tokenizer("v3"),
                          tokenizer_name="tokenizer.model.v3")
    import shutil

    shutil.copy(mistral_common_tokenizer("v3"), folder / "tokenizer.model")  # an identical copy: fine
    assert cli.main(["inspect", str(folder)]) == 0
    shutil.copy(mistral_common_tokenizer("v2"), folder / "tokenizer.model")  # another tokenizer
    capsys.readouterr()
    assert cli.main(["-m", str(folder), "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.model.v3" in err and "tokenizer.model" in err.replace("tokenizer.model.v3", "") \
        and "different tokenizers" in err


def test_two_weight_files_are_refused_rather_than_one_picked(make_release, capsys):
    import shutil

    folder = make_release(tiny_args(), seed=2)
    shutil.copy(folder / "consolidated.00.pth", folder / "consolidated.safetensors")  # a stray file beside it
    for argv in (["-m", str(folder), "-p", "hi"], ["verify", str(folder)]):
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "holds both consolidated.safetensors and consolidated.00.pth" in err and len(err.splitlines()) == 1


def test_a_wrong_vocab_size_blames_params_json_when_tokenizer_and_weights_agree(make_release, capsys):
    folder = make_release(tiny_args(), seed=2)
    params = json.loads((folder / "params.json").read_text())
    params["vocab_size"] = 32001
    (folder / "params.json").write_text(json.dumps(params))
    assert cli.main(["-m", str(folder), "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mixchat: error: {folder / 'params.json'}: says vocab_size 32001") and \
        "set vocab_size to 32000" in err
    assert cli.main(["inspect", str(folder)]) == 1
    out, err = capsys.readouterr()
    assert "vocab_size" in out and len(err.splitlines()) == 1 and err.startswith("mixchat: error: ")
