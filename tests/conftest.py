"""Tiny configurations and a factory for random release folders in each of Mistral's layouts."""

from __future__ import annotations

import pytest
import torch

from mixchat.dev.synthetic import mistral_common_tokenizer, write_release
from mixchat.release.config import ModelArgs


def tiny_args(**overrides) -> ModelArgs:
    """A 2-layer model with the real 32000-piece vocabulary (so the real v1 tokenizer fits), GQA
    (4 query heads on 2 kv heads) and head_dim 16."""
    params = {"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 96, "n_heads": 4, "n_kv_heads": 2,
              "norm_eps": 1e-5, "vocab_size": 32000}
    params.update(overrides)
    return ModelArgs.from_dict(params)


@pytest.fixture(scope="session")
def v1_tokenizer():
    path = mistral_common_tokenizer("v1")
    assert path is not None, "mistral-common is a test dependency: pip install -e '.[test]'"
    return path


@pytest.fixture
def make_release(tmp_path, v1_tokenizer):
    """make_release(args, layout='dense', **write_release kwargs) -> folder."""
    count = iter(range(1000))

    def make(args: ModelArgs, layout: str = "dense", **kw):
        kw.setdefault("tokenizer", v1_tokenizer)
        return write_release(tmp_path / f"release{next(count)}", args, layout, **kw)

    return make


@pytest.fixture(scope="session", autouse=True)
def _kernels_built():
    """The C kernels compiled once, before any test times a model load: on a clean machine the first
    load compiles them (~15 s on 2 cores), which fell inside whichever wait came first (the e2e tests'
    wait for the loaded screen). The build is cached for the subprocesses too."""
    from mixchat.speed import kernels

    kernels.available()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXCHAT_HOME", str(tmp_path / "home"))


_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _main_thread_keeps_torchs_threads():
    """A MixchatApp built in a test makes this (pytest's main) thread serial for good, as it makes its
    UI thread: the tests after it would run their models on one thread."""
    yield
    if torch.get_num_threads() != _THREADS:
        from mixchat.engine.engine import keep_thread_serial

        keep_thread_serial(_THREADS)
