"""Settings, flags and GLM_SERVE_* env vars, default-model discovery, the console entry points, logging."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import service.settings as settings_mod
from service.logging_setup import configure_logging, request_id_var
from service.settings import Settings, SettingsError, parse_settings

REPO = Path(__file__).resolve().parent.parent

SAMPLE_ENV = {"model": "/tmp/m", "served_model_name": "glm", "host": "0.0.0.0", "port": "9001", "device": "cpu",
              "dtype": "float32", "max_model_len": "4096", "max_num_seqs": "8", "max_num_batched_tokens": "512",
              "kv_cache_tokens": "10000", "kv_cache_memory_fraction": "0.5", "block_size": "32",
              "num_speculative_tokens": "2", "speculative_policy": "fixed", "seed": "5", "engine_process": "false",
              "torch_threads": "1",
              "tensor_parallel_size": "4", "nnodes": "2", "node_rank": "1", "master_addr": "10.0.0.1",
              "master_port": "29500",
              "max_queue_size": "3", "retry_after": "7", "quantization": "fp8",
              "request_timeout": "60", "max_request_body_bytes": "2048", "api_key": "k1,k2",
              "cors_origins": "https://a,https://b", "shutdown_timeout": "12.5", "log_level": "debug",
              "log_format": "json", "log_prompts": "true", "enable_prefix_caching": "false", "enforce_eager": "true",
              "prefix_caching_hash_algo": "sha256", "enable_auto_tool_choice": "true",
              "tool_call_parser": "glm45", "reasoning_parser": "glm45", "responses_store_size": "16",
              "responses_store_ttl": "90.5"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv("GLM_SERVE_" + name.upper(), raising=False)


def test_defaults():
    s = parse_settings([])
    assert (s.host, s.port, s.device, s.dtype, s.api_key, s.cors_origins) == ("127.0.0.1", 8000, "auto", "auto", [],
                                                                              [])
    assert s.log_format == "text" and s.log_prompts is False and s.num_speculative_tokens == 3
    assert s.speculative_policy == "adaptive"  # with K > 0, the depth is chosen per step


def test_every_field_reads_its_env_var(monkeypatch):
    assert set(SAMPLE_ENV) == set(Settings.model_fields)
    for name, value in SAMPLE_ENV.items():
        monkeypatch.setenv("GLM_SERVE_" + name.upper(), value)
    s = parse_settings([])
    assert s.model == Path("/tmp/m") and s.port == 9001 and s.kv_cache_memory_fraction == 0.5
    assert s.enable_auto_tool_choice and s.tool_call_parser == "glm45" and s.reasoning_parser == "glm45"
    assert s.api_key == ["k1", "k2"] and s.cors_origins == ["https://a", "https://b"]
    assert s.shutdown_timeout == 12.5 and s.log_prompts is True and s.request_timeout == 60
    for name, value in SAMPLE_ENV.items():
        got = getattr(s, name)
        if isinstance(got, list):
            got = ",".join(got)
        elif isinstance(got, bool):
            got = str(got).lower()
        elif isinstance(got, float) and got.is_integer() and "." not in value:
            got = int(got)
        assert str(got) == value, name


def test_flags_beat_env(monkeypatch):
    monkeypatch.setenv("GLM_SERVE_PORT", "9001")
    monkeypatch.setenv("GLM_SERVE_API_KEY", "from-env")
    s = parse_settings(["--port", "9002", "--api-key", "a", "--api-key", "b,c", "--log-format", "JSON"])
    assert s.port == 9002 and s.api_key == ["a", "b", "c"] and s.log_format == "json"
    assert parse_settings([]).api_key == ["from-env"]


@pytest.mark.parametrize("argv,flag", [(["--port", "abc"], "--port"), (["--port", "70000"], "--port"),
                                       (["--device", "tpu"], "--device"), (["--max-queue-size", "0"],
                                                                           "--max-queue-size"),
                                       (["--kv-cache-memory-fraction", "2"], "--kv-cache-memory-fraction"),
                                       (["--quantization", "int4"], "--quantization")])
def test_bad_values_name_the_flag(argv, flag):
    with pytest.raises(SettingsError, match=flag):
        parse_settings(argv)


def test_engine_config_mapping(tmp_path):
    s = parse_settings(["--max-num-seqs", "4", "--kv-cache-tokens", "999", "--num-speculative-tokens", "2",
                        "--dtype", "bfloat16", "--quantization", "FP8", "--speculative-policy", "Fixed"])
    cfg = s.engine_config(tmp_path)
    assert cfg.speculative_policy == "fixed"
    assert (cfg.model, cfg.max_num_seqs, cfg.kv_cache_tokens, cfg.num_speculative_tokens, cfg.dtype) == \
        (tmp_path, 4, 999, 2, "bfloat16")
    assert cfg.quantization == "fp8" and parse_settings([]).engine_config(tmp_path).quantization is None


def test_default_model_discovery(tmp_path, monkeypatch):
    monkeypatch.setattr(settings_mod, "WEIGHTS_DIR", tmp_path)
    s = parse_settings([])
    with pytest.raises(SettingsError, match="no default model"):
        s.model_dir()
    (tmp_path / "notes").mkdir()  # a directory without config.json does not count
    (tmp_path / "glm-tiny").mkdir()
    (tmp_path / "glm-tiny" / "config.json").write_text("{}")
    assert s.model_dir() == tmp_path / "glm-tiny" and s.model_name(s.model_dir()) == "glm-tiny"
    assert parse_settings(["--served-model-name", "x"]).model_name(tmp_path / "glm-tiny") == "x"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    with pytest.raises(SettingsError, match="several checkpoints"):
        s.model_dir()
    with pytest.raises(SettingsError, match="no config.json"):
        parse_settings(["--model", str(tmp_path / "notes")]).model_dir()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_python_m_service_help():
    r = run_cli("--help")
    assert r.returncode == 0 and "--max-queue-size" in r.stdout and "GLM_SERVE_MAX_QUEUE_SIZE" in r.stdout


def test_python_m_service_errors(tmp_path):
    r = run_cli("--model", str(tmp_path / "missing"))
    assert r.returncode == 1 and "no config.json" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--port", "abc")
    assert r.returncode == 2 and "--port" in r.stderr


def test_console_script_declared():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["glm-serve"].split(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), func))


def test_json_logging_with_request_id():
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        token = request_id_var.set("req-123")
        logging.getLogger("service.test").info("completed", extra={"fields": {"prompt_tokens": 5}})
        request_id_var.reset(token)
        logging.getLogger("service.test").debug("hidden")
        entry = json.loads(stream.getvalue().strip())
        assert entry["message"] == "completed" and entry["request_id"] == "req-123" and entry["prompt_tokens"] == 5
        assert entry["level"] == "info" and "time" in entry and len(stream.getvalue().strip().splitlines()) == 1
    finally:
        configure_logging("warning", "text")


def test_text_logging_with_request_id():
    stream = io.StringIO()
    configure_logging("info", "text", stream=stream)
    try:
        token = request_id_var.set("abc")
        logging.getLogger("service.test").info("http", extra={"fields": {"path": "/v1/models", "status": 200}})
        request_id_var.reset(token)
        line = stream.getvalue()
        assert "[abc] http path=/v1/models status=200" in line
    finally:
        configure_logging("warning", "text")
