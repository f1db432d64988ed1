"""Model configuration read from a release folder's params.json.

Every derived value and every default lives here and nowhere else. `ModelArgs.defaulted` records
which fields params.json did not give, so `mixchat inspect` can show them.

Defaults (each documented because the release files disagree about what they spell out):
- head_dim     = dim // n_heads
- n_kv_heads   = n_heads (plain multi-head attention)
- norm_eps     = 1e-5
- sliding_window = None (full attention); Mixtral's torrent omits it, later releases write null.
                 A list (Ministral) is a pattern of per-layer windows repeated over the layers, as
                 mistral-inference reads it (null in it: full attention); `_sliding_window` is an
                 alias some releases use. `layer_windows` holds each layer's window either way.
- rope_theta   = 1e6 when there is no sliding window, else 1e4. This is Mistral's own reference
                 rule of Dec 2023: Mistral-7B-v0.1 (window 4096) was trained with 1e4 and the Mixtral
                 torrent (no window, no rope_theta) only works with 1e6.
- max_seq_len  = 32768, the longest context these releases were trained for (Mixtral's 32k). With
                 a sliding window the KV cache stays W tokens long whatever this says.
- moe          = None (dense feed-forward)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixchat.errors import ConfigError

# The fix for a params.json field that is missing, out of range or contradicts another: the weights came
# with a consistent one.
FIX = "; use the params.json that came with these weights"

REQUIRED = ("dim", "n_layers", "hidden_dim", "n_heads", "vocab_size")
DEFAULT_MAX_SEQ_LEN = 32768
MAX_PARAMS_BYTES = 1 << 20

# Upper bounds checked before anything is allocated or looped over: params.json is input, and a
# "n_layers": 1000000000 would otherwise have mixchat build a billion expected tensor names. Each
# bound is far above any released model (Mistral-Large: dim 12288, 88 layers; Mixtral-8x22B: 56
# experts' worth of hidden 16384; tekken: 131072 ids; 128k contexts) and far below what would hang.
LIMITS = {"dim": 1 << 16, "n_layers": 1024, "hidden_dim": 1 << 20, "n_heads": 1024, "n_kv_heads": 1024,
          "head_dim": 4096, "vocab_size": 1 << 22, "max_seq_len": 1 << 24, "sliding_window": 1 << 24,
          "num_experts": 1024, "num_experts_per_tok": 1024}


@dataclass(frozen=True)
class MoeArgs:
    num_experts: int
    num_experts_per_tok: int


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    hidden_dim: int
    n_heads: int
    vocab_size: int
    head_dim: int
    n_kv_heads: int
    norm_eps: float
    rope_theta: float
    sliding_window: int | None = None  # the window every layer shares; None: full attention, or per-layer
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    moe: MoeArgs | None = None
    defaulted: tuple[str, ...] = ()
    layer_windows: tuple[int | None, ...] = ()  # each layer's window (None: full attention); from_dict fills it
    # Keys of params.json mixchat does not use; kept so `inspect` can show them.
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer` in keys (self included), or None for full attention."""
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    @property
    def has_window(self) -> bool:
        return any(w is not None for w in (self.layer_windows or (self.sliding_window,)))

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_dict(cls, params: dict[str, Any], source: str = "params.json") -> ModelArgs:
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(params).__name__}")
        missing = [k for k in REQUIRED if k not in params]
        if missing:
            raise ConfigError(
                f"{source}: missing required field(s) {', '.join(missing)}{FIX}"
            )
        get_int = _reader(params, source)
        dim, n_heads = get_int("dim"), get_int("n_heads")
        defaulted: list[str] = []

        def opt(key: str, default: Any, kind: type = int) -> Any:
            if params.get(key) is None:
                defaulted.append(key)
                return default
            return get_int(key) if kind is int else _float(params, key, source)

        head_dim = opt("head_dim", dim // n_heads)
        n_kv_heads = opt("n_kv_heads", n_heads)
        norm_eps = opt("norm_eps", 1e-5, float)
        n_layers = get_int("n_layers")
        if params.get("sliding_window") is not None and params.get("_sliding_window") is not None:
            raise ConfigError(f"{source}: gives both sliding_window and _sliding_window; keep one{FIX}")
        key = "sliding_window" if params.get("_sliding_window") is None else "_sliding_window"
        raw_window = params.get(key)
        if "sliding_window" not in params and "_sliding_window" not in params:
            defaulted.append("sliding_window")
        if isinstance(raw_window, list):
            pattern = _window_pattern(raw_window, key, n_layers, source)
            layer_windows = tuple(pattern[i % len(pattern)] for i in range(n_layers))
            sliding_window = layer_windows[0] if len(set(layer_windows)) == 1 else None
        else:
            sliding_window = None if raw_window is None else _reader({key: raw_window}, source)(key)
            layer_windows = (sliding_window,) * n_layers
        has_window = any(w is not None for w in layer_windows)
        rope_theta = opt("rope_theta", 1e4 if has_window else 1e6, float)
        max_seq_len = opt("max_seq_len", DEFAULT_MAX_SEQ_LEN)

        moe = None
        if params.get("moe") is not None:
            raw = params["moe"]
            if not isinstance(raw, dict):
                raise ConfigError(f"{source}: 'moe' must be an object with num_experts and num_experts_per_tok{FIX}")
            moe_int = _reader(raw, f"{source} (moe)")
            moe = MoeArgs(moe_int("num_experts"), moe_int("num_experts_per_tok"))
            if moe.num_experts_per_tok > moe.num_experts:
                raise ConfigError(
                    f"{source}: moe.num_experts_per_tok ({moe.num_experts_per_tok}) exceeds "
                    f"moe.num_experts ({moe.num_experts}){FIX}"
                )
        if n_kv_heads > n_heads:
            raise ConfigError(f"{source}: n_kv_heads ({n_kv_heads}) exceeds n_heads ({n_heads}){FIX}")
        if n_heads % n_kv_heads:
            raise ConfigError(f"{source}: n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads}){FIX}")
        if head_dim < 2 or head_dim % 2:
            raise ConfigError(f"{source}: head_dim ({head_dim}) must be even for rotary embeddings{FIX}")

        model_type = params.get("model_type", "transformer")
        if model_type != "transformer":
            raise ConfigError(f"{source}: model_type {_shown(model_type)} is not a transformer (Codestral Mamba is a "
                              "state-space model); mixchat runs Mistral and Mixtral transformers")
        used = set(REQUIRED) | {
            "head_dim", "n_kv_heads", "norm_eps", "sliding_window", "_sliding_window", "rope_theta", "max_seq_len",
            "moe", "model_type",
        }
        return cls(
            dim=dim,
            n_layers=n_layers,
            hidden_dim=get_int("hidden_dim"),
            n_heads=n_heads,
            vocab_size=get_int("vocab_size"),
            head_dim=head_dim,
            n_kv_heads=n_kv_heads,
            norm_eps=norm_eps,
            rope_theta=rope_theta,
            sliding_window=sliding_window,
            max_seq_len=max_seq_len,
            moe=moe,
            defaulted=tuple(defaulted),
            layer_windows=layer_windows,
            extra={k: v for k, v in params.items() if k not in used},
        )

    @classmethod
    def from_file(cls, path: Path) -> ModelArgs:
        if not path.is_file():
            raise ConfigError(f"{path}: not found; a release folder needs the params.json shipped with its weights")
        try:
            size = path.stat().st_size
            if size > MAX_PARAMS_BYTES:  # a few hundred bytes in every release; never read gigabytes
                raise ConfigError(f"{path}: {size} bytes, not a params.json (those are under 1 KB); "
                                  "restore the params.json from the release")
            params = json.loads(path.read_text(encoding="utf-8"))
        except PermissionError:
            raise ConfigError(f"{path}: permission denied; make it readable (chmod a+r) or run mixchat as its "
                              "owner") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            reason = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
            raise ConfigError(f"{path}: not valid JSON ({reason}); restore the params.json from the release") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror}); restore the params.json from the "
                              "release") from None
        return cls.from_dict(params, source=str(path))

    def to_params(self) -> dict[str, Any]:
        """The params.json a release with these dimensions would carry (used by test/bench writers)."""
        out: dict[str, Any] = {
            "dim": self.dim, "n_layers": self.n_layers, "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps, "vocab_size": self.vocab_size, "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window if len(set(self.layer_windows)) <= 1 else list(self.layer_windows),
        }
        if "max_seq_len" not in self.defaulted:
            out["max_seq_len"] = self.max_seq_len
        if self.moe is not None:
            out["moe"] = {"num_experts": self.moe.num_experts, "num_experts_per_tok": self.moe.num_experts_per_tok}
        return out


def _window_pattern(raw: list, key: str, n_layers: int, source: str) -> tuple[int | None, ...]:
    """A per-layer window pattern: each entry a window or null (full attention), repeated over the layers."""
    if not raw or len(raw) > n_layers or n_layers % len(raw):
        raise ConfigError(f"{source}: {key} lists {len(raw)} windows, which do not repeat evenly over {n_layers} "
                          f"layers{FIX}")
    return tuple(None if w is None else _reader({"sliding_window": w}, f"{source} ({key} list)")("sliding_window")
                 for w in raw)


def _shown(value: Any) -> str:
    """A value from the file, quoted for one line and cut short (a 10 MB string stays a few words)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _reader(params: dict[str, Any], source: str):
    def get_int(key: str) -> int:
        if key not in params:
            raise ConfigError(f"{source}: missing required field {key}")
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{source}: {key} must be a positive integer, found {_shown(value)}{FIX}")
        if value > LIMITS.get(key, value):
            raise ConfigError(f"{source}: {key} is {value}, beyond the {LIMITS[key]} mixchat accepts (no released "
                              "model comes near); the file is damaged, use the params.json shipped with the weights")
        return value

    return get_int


def _float(params: dict[str, Any], key: str, source: str) -> float:
    value = params[key]
    # json.loads accepts NaN and Infinity, which would turn every rotary angle into NaN.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{source}: {key} must be a positive finite number, found {_shown(value)}{FIX}")
    return float(value)
