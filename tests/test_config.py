from __future__ import annotations

import json

import pytest

from mixchat.errors import ConfigError
from mixchat.release.config import ModelArgs

MISTRAL_7B = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
              "norm_eps": 1e-05, "sliding_window": 4096, "vocab_size": 32000}
MIXTRAL_TORRENT = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
                   "n_kv_heads": 8, "norm_eps": 1e-05, "vocab_size": 32000,
                   "moe": {"num_experts_per_tok": 2, "num_experts": 8}}


def test_mistral_7b_gets_rope_theta_1e4_because_it_has_a_window():
    a = ModelArgs.from_dict(MISTRAL_7B)
    assert a.rope_theta == 1e4 and a.sliding_window == 4096 and not a.is_moe
    assert "rope_theta" in a.defaulted and "sliding_window" not in a.defaulted
    assert a.n_rep == 4


def test_mixtral_torrent_gets_rope_theta_1e6_and_no_window():
    a = ModelArgs.from_dict(MIXTRAL_TORRENT)
    assert a.rope_theta == 1e6 and a.sliding_window is None
    assert a.moe.num_experts == 8 and a.moe.num_experts_per_tok == 2
    assert {"rope_theta", "sliding_window", "max_seq_len"} <= set(a.defaulted)


def test_explicit_rope_theta_and_null_window_are_taken_as_given():
    a = ModelArgs.from_dict({**MISTRAL_7B, "sliding_window": None, "rope_theta": 1000000.0})
    assert a.sliding_window is None and a.rope_theta == 1e6
    assert "rope_theta" not in a.defaulted and "sliding_window" not in a.defaulted


def test_omitted_optional_fields_get_documented_defaults():
    a = ModelArgs.from_dict({"dim": 64, "n_layers": 2, "hidden_dim": 128, "n_heads": 4, "vocab_size": 100})
    assert (a.head_dim, a.n_kv_heads, a.norm_eps, a.max_seq_len) == (16, 4, 1e-5, 32768)
    assert set(a.defaulted) == {"head_dim", "n_kv_heads", "norm_eps", "sliding_window", "rope_theta", "max_seq_len"}


def test_unknown_keys_do_not_crash_and_are_kept():
    a = ModelArgs.from_dict({**MISTRAL_7B, "model_type": "transformer", "lora": {"rank": 8}, "new_field": [1]})
    assert a.extra == {"lora": {"rank": 8}, "new_field": [1]}


@pytest.mark.parametrize("change, words", [
    ({"dim": None}, "missing required field(s) dim"),
    ({"n_layers": "32"}, "n_layers must be a positive integer"),
    ({"n_kv_heads": 5}, "multiple of n_kv_heads"),
    ({"moe": {"num_experts": 2, "num_experts_per_tok": 3}}, "exceeds"),
    ({"sliding_window": [4096, 4096, 4096]}, "do not repeat evenly over 32 layers"),
    ({"sliding_window": [4096, "x"]}, "sliding_window must be a positive integer"),
    ({"sliding_window": 4096, "_sliding_window": 4096}, "both sliding_window and _sliding_window"),
    ({"model_type": "mamba"}, "not a transformer"),
    ({"norm_eps": "tiny"}, "norm_eps must be a positive finite number"),
    ({"n_kv_heads": 64}, "n_kv_heads (64) exceeds n_heads (32)"),
    ({"head_dim": 127}, "head_dim (127) must be even"),
    ({"moe": [8, 2]}, "'moe' must be an object"),
])
def test_bad_params_name_the_field(change, words):
    params = {k: v for k, v in {**MISTRAL_7B, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")) as raised:
        ModelArgs.from_dict(params, source="x/params.json")
    # One line, naming the file and saying what to do about it.
    message = str(raised.value)
    assert "\n" not in message and message.startswith("x/params.json")
    assert any(fix in message for fix in ("use the params.json", "mixchat runs", "shipped with")), message


def test_from_file_reports_invalid_json(tmp_path):
    p = tmp_path / "params.json"
    p.write_text("{ not json")
    with pytest.raises(ConfigError, match="params.json: not valid JSON"):
        ModelArgs.from_file(p)


def test_to_params_round_trips():
    a = ModelArgs.from_dict(MIXTRAL_TORRENT)
    b = ModelArgs.from_dict(json.loads(json.dumps(a.to_params())))
    assert (b.dim, b.moe, b.rope_theta, b.sliding_window) == (a.dim, a.moe, a.rope_theta, a.sliding_window)


@pytest.mark.parametrize("window, expected", [
    (None, (None,) * 4),
    (4096, (4096,) * 4),
    ([8, None], (8, None, 8, None)),  # Ministral-style: a pattern repeated over the layers, null = full
    ([16, 16], (16,) * 4),
])
def test_sliding_windows_per_layer(window, expected):
    a = ModelArgs.from_dict({**MISTRAL_7B, "n_layers": 4, "sliding_window": window})
    assert a.layer_windows == expected and [a.window(i) for i in range(4)] == list(expected)
    assert a.sliding_window == (expected[0] if len(set(expected)) == 1 else None)
    assert a.has_window == any(w is not None for w in expected)
    assert ModelArgs.from_dict(a.to_params()).layer_windows == expected  # written back as read


def test_the_underscore_alias_of_sliding_window():
    a = ModelArgs.from_dict({**MIXTRAL_TORRENT, "_sliding_window": 4096})
    assert a.sliding_window == 4096 and a.rope_theta == 1e4 and "sliding_window" not in a.defaulted
