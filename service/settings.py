"""Server settings: one pydantic-settings model, filled from flags, then `GLM_SERVE_*` env vars, then defaults.

Every field is a flag (`max_queue_size` -> `--max-queue-size`) and an environment variable
(`GLM_SERVE_MAX_QUEUE_SIZE`). The argparse parser is generated from the fields so the two can never drift.
List fields take repeated flags or a comma-separated env value (`GLM_SERVE_API_KEY=k1,k2`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.engine.config import EngineConfig

ENV_PREFIX = "GLM_SERVE_"
# The engine's settings keep EngineConfig's defaults (one source); Settings adds their flags and bounds. `detokenize`
# is no setting: the server's EngineClient always detokenizes in the API process.
_ENGINE = {f.name: f.default for f in dataclasses.fields(EngineConfig) if f.name not in ("model", "detokenize")}
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "model" / "weights"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    model: Path | None = Field(None, description="Hugging Face-format checkpoint directory (default: the shipped "
                                                 "model under model/weights/)")
    served_model_name: str | None = Field(None, description="model id in /v1/models and responses "
                                                            "(default: the directory name)")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="bind port")
    device: Literal["auto", "cpu", "cuda"] = Field(_ENGINE["device"], description="auto = cuda when present, "
                                                                              "else cpu")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(_ENGINE["dtype"], description="auto = bfloat16 on "
                                                                                     "cuda, float32 on cpu")
    max_model_len: int | None = Field(_ENGINE["max_model_len"], ge=1, description="longest prompt + completion "
                                      "(default: the checkpoint's max_position_embeddings)")
    max_num_seqs: int = Field(_ENGINE["max_num_seqs"], ge=1, description="sequences batched per engine step")
    max_num_batched_tokens: int = Field(_ENGINE["max_num_batched_tokens"], ge=1,
                                        description="tokens per engine step (chunked prefill budget)")
    kv_cache_tokens: int | None = Field(_ENGINE["kv_cache_tokens"], ge=1, description="paged KV cache size in "
                                        "tokens (default: sized from --kv-cache-memory-fraction)")
    kv_cache_memory_fraction: float = Field(_ENGINE["kv_cache_memory_fraction"], gt=0.0, le=1.0,
                                            description="share of free device memory for the KV cache")
    block_size: int = Field(_ENGINE["block_size"], ge=1, description="tokens per KV cache block")
    quantization: Literal["fp8"] | None = Field(_ENGINE["quantization"], description="fp8: quantize a bf16/fp32 "
                                                "checkpoint's projections to 128x128 block FP8 at load (FP8 "
                                                "checkpoints need no flag)")
    num_speculative_tokens: int = Field(_ENGINE["num_speculative_tokens"], ge=0,
                                        description="MTP speculative decoding: most tokens drafted per step "
                                        "(checkpoints with an MTP layer); 0 disables it")
    speculative_policy: Literal["adaptive", "fixed"] = Field(
        _ENGINE["speculative_policy"], description="adaptive: each step drafts 0..K tokens, the depth with the "
        "most tokens/s by measured acceptance and step time at the running batch size; fixed: always K")
    enforce_eager: bool = Field(_ENGINE["enforce_eager"], description="CUDA: run every step eagerly instead of "
                                "replaying CUDA graphs for decode and verify steps")
    enable_prefix_caching: bool = Field(_ENGINE["enable_prefix_caching"], description="reuse the cache of prompt "
                                        "prefixes seen before (automatic prefix caching)")
    prefix_caching_hash_algo: Literal["builtin", "sha256"] = Field(
        _ENGINE["prefix_caching_hash_algo"], description="block hash of prefix caching: builtin (fastest, 64-bit) "
        "or sha256 (collision-resistant, for servers shared by tenants who distrust each other)")
    seed: int = Field(_ENGINE["seed"], description="engine seed for requests without their own")
    engine_process: bool = Field(True, description="run the engine in its own process, so the model's Python "
                                                   "never waits for the HTTP event loop's GIL (off: a thread)")
    torch_threads: int | None = Field(_ENGINE["torch_threads"], ge=1, description="CPU threads for the model "
                                      "(default: all cores but one, which the HTTP event loop keeps)")
    tensor_parallel_size: int = Field(_ENGINE["tensor_parallel_size"], ge=1, description="tensor + expert parallel "
                                      "ranks (vLLM's -tp): rank 0 runs the engine, the other ranks of each node "
                                      "are spawned by it")
    nnodes: int = Field(_ENGINE["nnodes"], ge=1, description="nodes the tensor-parallel ranks span (each runs "
                        "tp / nnodes)")
    node_rank: int = Field(_ENGINE["node_rank"], ge=0, description="this node: 0 serves HTTP and runs rank 0; "
                           "others are headless workers")
    master_addr: str | None = Field(_ENGINE["master_addr"], description="node 0's address for the "
                                    "torch.distributed rendezvous (default: $MASTER_ADDR, else 127.0.0.1 on one "
                                    "node)")
    master_port: int | None = Field(_ENGINE["master_port"], ge=1, le=65535, description="its port (default: "
                                    "$MASTER_PORT, else a free port on one node)")
    max_queue_size: int = Field(256, ge=1, description="requests waiting for their first token before new "
                                                       "ones get 503")
    retry_after: int = Field(1, ge=0, description="seconds in the Retry-After header of a 503")
    request_timeout: float | None = Field(None, gt=0, description="abort a request that runs longer than this "
                                                                  "many seconds (default: no limit)")
    max_request_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    api_key: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize "
                                          "(repeat the flag or comma-separate for several keys)")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="allowed CORS "
                                                         "origins (default: CORS off)")
    shutdown_timeout: float = Field(30.0, ge=0, description="on SIGTERM, drain in-flight requests for up to "
                                                            "this many seconds, then exit 0")
    responses_store_size: int = Field(256, ge=0, description="responses /v1/responses keeps for GET and "
                                      "previous_response_id (least recently used dropped first; 0 keeps none)")
    responses_store_ttl: float = Field(3600.0, gt=0, description="seconds a stored response is kept")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="log line format")
    log_prompts: bool = Field(False, description="log request prompts (off by default: they may hold user data)")
    enable_auto_tool_choice: bool = Field(False, description="parse tool calls the model writes under tool_choice "
                                                             "auto (on by itself when the chat template uses GLM's "
                                                             "tool-call tags)")
    tool_call_parser: Literal["glm47", "glm45"] | None = Field(None, description="tool-call format (both read "
                                                                                 "GLM-4.5 to GLM-5 output)")
    reasoning_parser: Literal["glm45"] | None = Field(None, description="split <think> reasoning into "
                                                                        "reasoning_content (on by itself when the "
                                                                        "chat template uses <think>)")

    @field_validator("api_key", "cors_origins", mode="before")
    @classmethod
    def _split_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list | tuple):  # every item may itself be a comma list (env and flags alike)
            return [p.strip() for item in v for p in str(item).split(",") if p.strip()]
        return v

    @model_validator(mode="after")
    def _nodes(self) -> Settings:
        if self.tensor_parallel_size % self.nnodes:
            raise ValueError(f"--tensor-parallel-size ({self.tensor_parallel_size}) must be a multiple of --nnodes "
                             f"({self.nnodes})")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"--node-rank ({self.node_rank}) must be below --nnodes ({self.nnodes})")
        return self

    @field_validator("log_level", "log_format", "device", "dtype", "quantization", "prefix_caching_hash_algo",
                     "tool_call_parser", "reasoning_parser", "speculative_policy", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    # -- derived ---------------------------------------------------------------------------------------------------
    def model_dir(self) -> Path:
        """The checkpoint to serve: --model, else the one directory under model/weights/ with a config.json."""
        if self.model is not None:
            if not (self.model / "config.json").is_file():
                raise SettingsError(f"--model {self.model}: no config.json there (expected a Hugging Face-format "
                                    "checkpoint directory)")
            return self.model
        found = sorted(p.parent for p in WEIGHTS_DIR.glob("*/config.json")) if WEIGHTS_DIR.is_dir() else []
        if len(found) == 1:
            return found[0]
        if not found:
            raise SettingsError(f"no default model: {WEIGHTS_DIR} holds no checkpoint directory with a "
                                "config.json; pass --model DIR (or set GLM_SERVE_MODEL)")
        names = ", ".join(p.name for p in found)
        raise SettingsError(f"several checkpoints under {WEIGHTS_DIR} ({names}); choose one with --model")

    def model_name(self, model_dir: Path) -> str:
        return self.served_model_name or model_dir.resolve().name

    def engine_config(self, model_dir: Path) -> EngineConfig:
        values = {name: getattr(self, name) for name in _ENGINE}
        values["torch_threads"] = self.torch_threads or max(1, (os.cpu_count() or 2) - 1)
        return EngineConfig(model=model_dir, **values)


class SettingsError(ValueError):
    """Settings that cannot start a server; the message names the flag."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


SHORT_FLAGS = {"tensor_parallel_size": "-tp"}  # vLLM's spellings


def build_parser() -> argparse.ArgumentParser:
    """argparse flags generated from Settings; values stay strings/None so pydantic does all validation."""
    parser = argparse.ArgumentParser(
        prog="glm-serve", description="OpenAI-compatible server for GLM-5-class models. Every flag also reads "
                                      f"the environment variable {ENV_PREFIX}<FLAG_IN_CAPS>.")
    for name, field in Settings.model_fields.items():
        env = ENV_PREFIX + name.upper()
        default = field.default if field.default_factory is None else field.default_factory()
        helptext = f"{field.description} [env {env}; default {json.dumps(default, default=str)}]"
        annotation = field.annotation
        if annotation is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=helptext)
        elif get_origin(annotation) is list:
            parser.add_argument(_flag(name), dest=name, action="append", default=None, metavar="VALUE",
                                help=helptext)
        else:
            choices = _literal_choices(annotation)
            # choices are checked by pydantic (case-insensitively), argparse only shows them
            metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
            flags = [_flag(name)] + ([SHORT_FLAGS[name]] if name in SHORT_FLAGS else [])
            parser.add_argument(*flags, dest=name, default=None, metavar=metavar, help=helptext)
    return parser


def _literal_choices(annotation: Any) -> list[str] | None:
    if get_origin(annotation) is Literal:
        return [str(a) for a in get_args(annotation)]
    return None


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Flags override env vars, which override defaults. Raises SettingsError with flag names on bad values."""
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as e:
        problems = "; ".join(f"{_flag(str(err['loc'][0])) if err['loc'] else 'settings'}: {err['msg']}"
                             for err in e.errors())
        raise SettingsError(problems) from None
