from __future__ import annotations

import json

from conftest import tiny_args
from test_release import run_cli

MOE = {"num_experts": 4, "num_experts_per_tok": 2}


def test_inspect_mixtral_torrent_shows_defaults_roles_and_estimates(make_release):
    args = tiny_args(moe=MOE, n_layers=3)
    params = args.to_params()
    del params["rope_theta"], params["sliding_window"]
    params["some_future_key"] = 1
    folder = make_release(args, "torrent", params=params)

    proc = run_cli("inspect", str(folder), "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["layout"] == "torrent" and r["architecture"].startswith("Mixtral")
    assert {"rope_theta", "sliding_window"} <= set(r["defaulted"]) and r["params"]["rope_theta"] == 1e6
    assert r["unknown_params"] == ["some_future_key"]
    assert r["namespaces"] == {"tok_embeddings": 1, "norm": 1, "output": 1, "layers": 3 * 10}
    assert r["layers"] == 3 and r["tensors_per_layer"] == [10]
    roles = {x["role"]: x for x in r["roles"]}
    assert roles["layers.N.block_sparse_moe.w2"] == {"role": "layers.N.block_sparse_moe.w2", "shape": [4 * 96, 64],
                                                     "dtype": "bfloat16", "count": 3}
    # wq, wo + wk, wv + two norms + gate + 4 experts × (w1, w2, w3)
    per_layer = 2 * 64 * 64 + 2 * 32 * 64 + 2 * 64 + 4 * 64 + 3 * 4 * 96 * 64
    total = 2 * 32000 * 64 + 64 + 3 * per_layer
    assert r["parameters"] == total and r["bytes"] == 2 * total
    assert r["active_parameters_per_token"] == total - 3 * 3 * 2 * 96 * 64  # 2 of 4 experts idle
    assert r["kv_cache_bytes_per_token_bf16"] == 2 * 3 * 2 * 16 * 2
    est = r["memory_estimate_bytes"]
    # dim 64 and hidden_dim 96 (w2's input, stored transposed here): only groups of 32 divide both
    assert list(est) == ["bf16", "int8", "int4-32"] and est["int4-32"] < est["int8"] < est["bf16"] == r["bytes"]
    assert all(c["ok"] for c in r["shape_check"]) and r["problem"] is None

    text = run_cli("inspect", str(folder)).stdout
    assert "* rope_theta      1000000.0" in text and "verdict: consistent" in text
    assert "layers.N.block_sparse_moe.w1" in text and "3 layers × 10 tensors per layer" in text


def test_inspect_flags_params_that_contradict_the_shapes(make_release):
    folder = make_release(tiny_args())
    params = json.loads((folder / "params.json").read_text())
    params["n_kv_heads"] = 4
    (folder / "params.json").write_text(json.dumps(params))
    proc = run_cli("inspect", str(folder))
    assert proc.returncode == 1
    assert "BAD n_kv_heads * head_dim  params.json 64" in proc.stdout
    assert "verdict: " in proc.stdout and "layers.0.attention.wk.weight has shape [32, 64]" in proc.stdout


def test_a_folder_name_with_control_characters_is_one_visible_line(make_release, tmp_path):
    """The header names the folder: a newline in its name broke it over two lines (ESC was already shown as ␛)."""
    folder = make_release(tiny_args())
    odd = folder.rename(tmp_path / "ev\x1b[31mil\nx")
    proc = run_cli("inspect", str(odd))
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0]
    assert "\x1b" not in proc.stdout and header.endswith("ev␛[31mil x"), header
