"""Random release folders in Mistral's exact format, for tests and benchmarks.

Real weights cannot be downloaded everywhere mixchat is developed, so tests and `benchmarks/`
write folders with the same key names, layouts, dtypes and files (params.json, consolidated.00.pth
via torch.save, tokenizer.model, RELEASE with md5 sums) as the real releases.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from mixchat.release.config import ModelArgs
from mixchat.release.folder import expected_shapes


def mistral_common_tokenizer(version: str = "v1") -> Path | None:
    """The real tokenizer.model that ships inside the mistral-common package, if it is installed."""
    try:
        import mistral_common
    except ImportError:
        return None
    data = Path(mistral_common.__file__).parent / "data"
    names = {"v1": "tokenizer.model.v1", "v2": "mistral_instruct_tokenizer_240216.model.v2",
             "v3": "mistral_instruct_tokenizer_240323.model.v3", "v7": "mistral_instruct_tokenizer_241114.model.v7",
             "tekken": "tekken_240911.json", "tekken-240718": "tekken_240718.json"}
    path = data / names[version]
    return path if path.is_file() else None


def random_state(args: ModelArgs, layout: str = "dense", dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """A state dict in `layout` ('dense', 'torrent' or 'experts') with N(0, std) matrices and
    norm weights near 1, so activations stay in a realistic range."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in expected_shapes(args, layout).items():
        if len(shape) == 1:
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * std
        sd[name] = t.to(dtype)
    return sd


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_release_file(folder: Path, names: list[str]) -> None:
    """A RELEASE like Mistral's: credits, then md5 sums inside a box drawn with ║ characters."""
    rows = [f"{md5(folder / n)}  {n}" for n in names if (folder / n).is_file()]
    width = max(len(r) for r in rows) + 16
    lines = ["Synthetic release written by mixchat for testing: random weights, not a trained model.", "",
             "╔" + "═" * width + "╗"]
    lines += ["║        " + r.ljust(width - 8) + "║" for r in rows]
    lines.append("╚" + "═" * width + "╝")
    (folder / "RELEASE").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_release(folder: str | Path, args: ModelArgs, layout: str = "dense", dtype: torch.dtype = torch.bfloat16,
                  seed: int = 0, tokenizer: Path | None = None, params: dict | None = None,
                  safetensors: bool = False, state: dict[str, torch.Tensor] | None = None,
                  std: float = 0.02, shards: int = 0, tokenizer_name: str | None = None) -> Path:
    """Write a complete release folder. `params` overrides the params.json written (to test
    defaults and omissions); `state` overrides the random weights; `shards` > 1 splits them into
    consolidated-0000N-of-0000M.safetensors files, as the larger releases ship. The tokenizer is
    copied as `tokenizer_name` (default: tekken.json for a tekken file, else tokenizer.model)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params if params is not None else args.to_params(), indent=2))
    sd = state if state is not None else random_state(args, layout, dtype, seed, std)
    if shards > 1:
        from safetensors.torch import save_file

        names = list(sd)
        files = [f"consolidated-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
        for i, name in enumerate(files):
            part = names[i * len(names) // shards : (i + 1) * len(names) // shards]
            save_file({k: sd[k].contiguous() for k in part}, str(folder / name))
        weights = files
    elif safetensors:
        from safetensors.torch import save_file

        weights = "consolidated.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / weights))
    else:
        weights = "consolidated.00.pth"
        torch.save(sd, folder / weights)
    del sd
    tokenizer = tokenizer or mistral_common_tokenizer("v1")
    name = tokenizer_name or ("tekken.json" if tokenizer is not None and str(tokenizer).endswith(".json")
                              else "tokenizer.model")
    if tokenizer is not None:
        shutil.copyfile(tokenizer, folder / name)
    write_release_file(folder, ["params.json", *([weights] if isinstance(weights, str) else weights), name])
    return folder
