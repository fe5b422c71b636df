"""Shared fixtures: the offline data folder, the real SmolLM2 source, and a tiny random Llama with a
tokenizer trained here (so tests that use only the tiny model need no GGUF)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton has no CPU backend: its kernels run in the interpreter here. Must be set before triton is
# imported (its @jit reads it at decoration); a GPU run sets TRITON_INTERPRET=0 to test real launches.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



def _enter_loopback_only_network() -> bool:
    """Servers the tests start (moto's S3, a `ray start` cluster) must be reachable from this machine
    only, and Ray binds its node's address, not 127.0.0.1 alone (ray-project/ray#26293). So, as root
    on Linux, this test process — and with it every server and worker it starts — moves into a new
    network namespace whose only interface is loopback (unshare(2) CLONE_NEWNET, then `lo` up).
    Done at import, before any thread exists. RANKFOLD_TEST_NETNS=0 opts out; False when not possible."""
    import ctypes
    import shutil
    import subprocess
    import sys

    if os.environ.get("RANKFOLD_TEST_NETNS") == "0" or sys.platform != "linux" or os.geteuid() != 0 \
            or shutil.which("ip") is None:  # without `ip`, lo could not be brought up: stay put
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
        return False
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    return True


LOOPBACK_ONLY = _enter_loopback_only_network()
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RANKFOLD_SHARED_DATA", REPO.parent / "shared" / "data"))
CALIBRATION_TEXT = SHARED_DATA / "calibration" / "enwiki_excerpt.txt"
WIKITEXT_TEST = SHARED_DATA / "wikitext2" / "wiki.test.raw"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not CALIBRATION_TEXT.is_file():
        pytest.fail(f"offline data not found at {SHARED_DATA} (set RANKFOLD_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct GGUF source (read layer by layer)."""
    from rankfold.models.sources import open_source

    return open_source("smollm2-135m")


def _tiny_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True, rms_norm_eps=1e-5)


def tiny_tokenizer(vocab_size: int = 4096):
    """A byte-level BPE trained on the calibration text (seconds): the tiny model's tokenizer, so unit
    tests need neither the SmolLM2 GGUF nor a hub. Its end-of-text token is bos, eos and unk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train([str(CALIBRATION_TEXT)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, shared_data) -> Path:
    """A random 2-layer Llama saved as a HF safetensors folder, with a small BPE tokenizer (tiny_tokenizer)."""
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_config(len(tokenizer)))
    # Random init has tiny weights; scale up so activations are not near-isotropic noise.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.mul_(4.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_spec_dict(model_dir: Path, out_dir: Path, method: str = "svd_llm", ratio: float = 0.3) -> dict:
    return {
        "model": {"source": str(model_dir)},
        "method": {"name": method},
        "target": {"ratio": ratio},
        "calibration": {"data": {"path": str(CALIBRATION_TEXT)}, "num_samples": 8, "seq_len": 64, "batch_size": 4},
        "evaluation": {"perplexity": [{"name": "wikitext2", "data": {"path": str(WIKITEXT_TEST), "lines_as_rows": True},
                                       "window": 64, "max_tokens": 512, "batch_size": 2}]},
        "output": {"dir": str(out_dir)},
    }


# Credentials for the local S3 server; Ray workers get them from their node's environment, as a
# cluster's nodes would from theirs (never shipped through Ray).
TEST_AWS_ENV = {"AWS_ACCESS_KEY_ID": "rankfold-test", "AWS_SECRET_ACCESS_KEY": "rankfold-test",
                "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_s3(extra_env: dict[str, str] | None = None):
    """moto's S3 server through infra/local-s3.sh on a free 127.0.0.1 port; returns (process, endpoint)."""
    import subprocess
    import time
    import urllib.request

    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    process = subprocess.Popen(["bash", str(REPO / "infra" / "local-s3.sh"), str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return process, endpoint
        except OSError as err:
            if getattr(err, "code", None):  # an HTTP error response: the server is up
                return process, endpoint
            if process.poll() is not None:
                raise RuntimeError(f"local S3 server exited with {process.returncode}") from None
            time.sleep(0.2)
    _stop(process)
    raise RuntimeError("local S3 server did not start within 30 s")


def _stop(process) -> None:
    """Stop a server started in its own session, and everything it started."""
    import signal
    import subprocess

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible HTTP server on 127.0.0.1 (moto), with test credentials in the environment."""
    pytest.importorskip("moto")
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(TEST_AWS_ENV)
    process, endpoint = _start_s3()
    try:
        yield endpoint
    finally:
        _stop(process)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def s3_endpoint_enforcing_auth(s3_endpoint):
    """A second server that checks credentials (moto's IAM enforcement): unknown keys are refused."""
    process, endpoint = _start_s3({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        yield endpoint
    finally:
        _stop(process)


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket per test."""
    import uuid

    import boto3

    name = f"rankfold-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real local Ray cluster (`ray start --head`, 2 CPUs and 2 declared GPUs — Ray schedules them on a
    machine without any —, 127.0.0.1 only, Job API on a free port);
    yields {"address": GCS HOST:PORT, "api": http://HOST:PORT}. Token auth is off on both sides
    (RAY_AUTH_MODE=disabled), as Ray requires the setting to agree."""
    import subprocess
    import sys

    pytest.importorskip("ray")
    port, dashboard = free_port(), free_port()
    temp = tmp_path_factory.mktemp("ray")
    bin_dir = str(Path(sys.executable).parent)  # jobs run `python -m rankfold.cli`: this environment's
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, **TEST_AWS_ENV, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "RANKFOLD_CACHE": str(temp / "cache")}  # checkpoints workers fetch from the store land here
    start = [str(Path(bin_dir) / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
             "--num-cpus=2", "--num-gpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", "--disable-usage-stats", f"--temp-dir={temp}"]
    result = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    if result.returncode != 0:
        raise RuntimeError(f"ray start failed:\n{result.stdout}\n{result.stderr}")
    try:
        yield {"address": f"127.0.0.1:{port}", "api": f"http://127.0.0.1:{dashboard}"}
    finally:
        _stop_ray_started_in(temp, port)


def _stop_ray_started_in(temp: Path, port: int, grace_s: float = 15.0) -> None:
    """Stop the Ray processes of the cluster this session started, and only those: `ray stop`
    would kill every Ray instance on the machine (another user's embedded one too). Ours name
    their temp dir or our GCS port on the command line; their children (workers) go with them."""
    import psutil

    marks = (str(temp), f":{port}\x00")  # e.g. the client server: --address=HOST:PORT
    ours: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        command = "\x00".join(process.info["cmdline"] or []) + "\x00"
        if any(mark in command for mark in marks):
            try:
                for member in [process, *process.children(recursive=True)]:
                    ours[member.pid] = member
            except psutil.Error:  # exited meanwhile
                pass
    for process in ours.values():
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(ours.values()), timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def ray_executor(ray_cluster):
    """This process connected to the local cluster: 2 workers of 1 CPU."""
    from rankfold.execution.ray import RayExecutor

    executor = RayExecutor(address=ray_cluster["address"], workers=2, cpus_per_worker=1)
    yield executor
    executor.close()


# What a test needs, read from the fixtures it uses (so the markers cannot drift from the tests):
# `-m "not ray and not s3"` runs without starting Ray or an S3 server, `-m "not realmodel"` without the GGUF.
_NEEDS = {"ray": {"ray_cluster", "ray_executor"}, "s3": {"s3_endpoint", "s3_bucket", "s3_endpoint_enforcing_auth"},
          "realmodel": {"smollm2"}}


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for marker, fixtures in _NEEDS.items():
            if used & fixtures:
                item.add_marker(getattr(pytest.mark, marker))
