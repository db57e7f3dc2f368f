"""Hub push and model card, offline: the real huggingface_hub client talks to a fake Hub on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from accel_distill.errors import UserError
from accel_distill.hub import files_to_upload, is_hub_id, model_card_text, push_export, write_model_card
from accel_distill.testing.tiny_wan import build_tiny_wan

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_TESTTOKEN_do_not_leak_123"
REPO = "tester/tiny-dmd2"
MAX_BODY = 64 * 1024 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".model")


class FakeHub(ThreadingHTTPServer):
    """Just the Hub endpoints create_repo + upload_folder use (shared/design/FACTS.md); the rest is 404."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.auth: list[str | None] = []
        self.unexpected: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.yaml_checked: list[str] = []
        self.lfs_blobs: dict[str, bytes] = {}
        self.committed: dict[str, bytes | str] = {}  # path -> content (regular) or sha256 (LFS)
        self.commit_headers: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def uploaded_bytes(self, path: str) -> bytes:
        value = self.committed[path]
        return self.lfs_blobs[value] if isinstance(value, str) else value


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub
    timeout = 20  # a stuck client cannot hold a thread forever

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
                if len(out) > MAX_BODY:
                    raise ValueError("body too large")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length)

    def _reply(self, status: int, payload: dict | None = None, *, body: bool = True) -> None:
        data = json.dumps(payload or {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if status == 404:
            self.send_header("X-Error-Code", "EntryNotFound")
        self.send_header("Content-Length", str(len(data)) if body else "0")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _record(self) -> None:
        with self.server.lock:
            self.server.requests.append((self.command, self.path))
            self.server.auth.append(self.headers.get("Authorization"))

    def _unexpected(self, body: bool = True) -> None:
        with self.server.lock:
            self.server.unexpected.append((self.command, self.path))
        self._reply(404, {"error": "not in the fake Hub"}, body=body)

    def do_HEAD(self) -> None:
        self._record()
        if self.path.split("?")[0] == f"/{REPO}/resolve/main/README.md":
            self._reply(404, body=False)  # no card yet; a HEAD reply has no body
        else:
            self._unexpected(body=False)

    def do_GET(self) -> None:
        self._record()
        self._unexpected()

    def do_PUT(self) -> None:
        self._record()
        body = self._body()
        oid = self.path.removeprefix("/lfs-upload/")
        if not self.path.startswith("/lfs-upload/") or hashlib.sha256(body).hexdigest() != oid:
            return self._unexpected()
        with self.server.lock:
            self.server.lfs_blobs[oid] = body
        self._reply(200)

    def do_POST(self) -> None:
        self._record()
        path = self.path.split("?")[0]
        body = self._body()
        srv = self.server
        if path == "/api/repos/create":
            payload = json.loads(body)
            with srv.lock:
                srv.created.append(payload)
            return self._reply(200, {"url": f"{srv.url}/{payload['organization']}/{payload['name']}"})
        if path == "/api/validate-yaml":
            with srv.lock:
                srv.yaml_checked.append(json.loads(body)["content"])
            return self._reply(200, {"errors": [], "warnings": []})
        if path == f"/api/models/{REPO}/preupload/main":
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular"}
                for f in files
            ]
            return self._reply(200, {"files": [{**m, "shouldIgnore": False} for m in modes]})
        if path == f"/{REPO}.git/info/lfs/objects/batch":
            objects = json.loads(body)["objects"]
            actions = [
                {
                    "oid": o["oid"],
                    "size": o["size"],
                    "actions": {"upload": {"href": f"{srv.url}/lfs-upload/{o['oid']}"}},
                }
                for o in objects
            ]
            return self._reply(200, {"transfer": "basic", "objects": actions})
        if path == f"/api/models/{REPO}/commit/main":
            for line in body.decode().splitlines():
                item = json.loads(line)
                value = item["value"]
                with srv.lock:
                    if item["key"] == "header":
                        srv.commit_headers.append(value)
                    elif item["key"] == "file":
                        srv.committed[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "lfsFile":
                        srv.committed[value["path"]] = value["oid"]
            return self._reply(200, {"commitUrl": f"{srv.url}/{REPO}/commit/{'a' * 40}", "commitOid": "a" * 40})
        self._unexpected()


@pytest.fixture
def fake_hub():
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def export_info(source: str, **extra) -> dict:
    info = {
        "format_version": 1,
        "source": source,
        "source_transformer_subfolder": "transformer",
        "num_inference_steps": 3,
        "timesteps": [1000.0, 757.0, 522.0],
        "sigmas": [1.0, 0.757, 0.522, 0.0],
        "scheduler": {"class": "FlowMatchLCMScheduler", "num_train_timesteps": 1000, "shift": 3.0},
        "sampling": {"num_inference_steps": 3, "guidance_scale": 1.0, "instructions": "..."},
    }
    info.update(extra)
    return info


@pytest.fixture(scope="module")
def export_folder(tmp_path_factory) -> Path:
    """A tiny real pipeline folder made into an export, with decoy training state inside it."""
    from diffusers import FlowMatchLCMScheduler

    folder = build_tiny_wan(tmp_path_factory.mktemp("hub") / "export")
    FlowMatchLCMScheduler(shift=3.0).save_pretrained(folder / "scheduler")  # as export.py writes it
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "FlowMatchLCMScheduler"]}))
    info = export_info("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", method="dmd2", adapter=None)
    (folder / "accel_distill_export.json").write_text(json.dumps(info, indent=2))
    decoys = [
        "checkpoints/checkpoint-2/optimizer.bin",
        "checkpoints/checkpoint-2/model.safetensors",
        "checkpoint-4/random_states_0.pkl",
        ".tmp-x/partial.safetensors",
        "optimizer.pt",
        "transformer/optimizer_state.pt",
    ]
    for rel in decoys:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(b"decoy training state " + rel.encode())
    return folder


def _is_decoy(path: str) -> bool:
    return any(s in path for s in ("checkpoint", "optimizer", ".tmp", "random_states"))


def test_hub_id_detection(tmp_path, monkeypatch):
    assert is_hub_id("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    for local in ["/data/models/wan", "./wan", "~/wan", "models/sub/wan", "..\\wan", "", "a/../b"]:
        assert not is_hub_id(local), local
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("owner/name")  # an existing relative folder is local


def test_card_full_pipeline(export_folder):
    path = write_model_card(export_folder, REPO)
    text = path.read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["base_model"] == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "text-to-video"
    for tag in ["diffusers", "distillation", "dmd2", "few-step", "accel_distill"]:
        assert tag in meta["tags"]
    assert "lora" not in meta["tags"]
    assert "[1000, 757, 522]" in text
    code = text.split("```python")[1].split("```")[0]
    assert "WanPipeline.from_pretrained(repo_id, vae=vae, torch_dtype=torch.bfloat16)" in code
    assert f'repo_id = "{REPO}"' in code
    assert "num_inference_steps=3, guidance_scale=1.0" in code
    compile(code, "card", "exec")  # the snippet is valid Python


def _python_block(card: str) -> str:
    blocks = card.split("```python")[1:]
    assert len(blocks) == 1
    return blocks[0].split("```")[0]


def _run_snippet(code: str, **assignments: str) -> dict:
    """Execute a card's snippet on CPU without generating: rebind ``name = "..."`` lines, drop cuda and the call."""
    lines = []
    for line in code.splitlines():
        name = line.split(" = ")[0]
        if name in assignments:
            line = f"{name} = {assignments[name]!r}"
        if line.startswith(("video = ", "export_to_video(", 'pipe.to("cuda")')):
            continue
        lines.append(line.replace('.to("cuda")', ""))
    scope: dict = {}
    exec(compile("\n".join(lines), "card-snippet", "exec"), scope)
    return scope


def test_card_full_pipeline_snippet_loads(export_folder):
    """The card's code, pointed at the folder instead of the Hub, loads the export with stock diffusers."""
    code = _python_block(model_card_text(export_folder, REPO))
    pipe = _run_snippet(code, repo_id=str(export_folder))["pipe"]
    assert type(pipe).__name__ == "WanPipeline"
    assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler"


def test_card_lora_snippet_loads(tmp_path, export_folder):
    """A LoRA export: the card's code loads the base, the LoRA file and the exported scheduler."""
    import torch
    from diffusers import FlowMatchLCMScheduler, WanPipeline, WanTransformer3DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = build_tiny_wan(tmp_path / "base")  # UniPC scheduler, like a stock Wan base
    transformer = WanTransformer3DModel.from_pretrained(base, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    folder = tmp_path / "lora-export"
    WanPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer))
    FlowMatchLCMScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    info = export_info(str(base), method="dmd2", adapter="lora")
    (folder / "accel_distill_export.json").write_text(json.dumps(info))

    code = _python_block(model_card_text(folder, REPO))
    assert 'base_model = "path/to/the/base/model"' in code  # a local source is not named in the card
    pipe = _run_snippet(code, repo_id=str(folder), base_model=str(base))["pipe"]
    assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler"
    assert pipe.get_active_adapters()
    with torch.no_grad():
        assert any("lora" in n for n, _ in pipe.transformer.named_parameters())


def test_card_lora_local_source(tmp_path):
    folder = tmp_path / "lora-export"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    info = export_info("/home/someone/models/wan-local", method="dmd2", adapter="lora")
    (folder / "accel_distill_export.json").write_text(json.dumps(info))
    text = model_card_text(folder, REPO)
    meta = yaml.safe_load(text.split("---")[1])
    assert "base_model" not in meta  # never a local path
    assert "/home/someone" not in text
    assert {"lora", "dmd2", "distillation", "few-step"} <= set(meta["tags"])
    code = text.split("```python")[1].split("```")[0]
    compile(code, "card", "exec")
    assert "pipe.load_lora_weights(repo_id)" in code
    assert 'FlowMatchLCMScheduler.from_pretrained(repo_id, subfolder="scheduler")' in code
    assert "num_inference_steps=3, guidance_scale=1.0" in code


def test_card_finetune_without_new_keys(tmp_path):
    """An older export (no "method"/"adapter") of a finetune: no steps, no distillation tags."""
    folder = tmp_path / "ft"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    info = {"format_version": 1, "source": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "source_transformer_subfolder": "t"}
    (folder / "accel_distill_export.json").write_text(json.dumps(info))
    text = model_card_text(folder, REPO)
    meta = yaml.safe_load(text.split("---")[1])
    assert "distillation" not in meta["tags"] and "few-step" not in meta["tags"]
    code = text.split("```python")[1].split("```")[0]
    assert "num_inference_steps" not in code
    compile(code, "card", "exec")


def test_ignore_patterns(export_folder):
    files = files_to_upload(export_folder)
    assert "transformer/diffusion_pytorch_model.safetensors" in files
    assert "scheduler/scheduler_config.json" in files
    assert not [f for f in files if _is_decoy(f)]


def test_not_an_export(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        push_export(tmp_path, REPO, token=TOKEN)
    proc = _run_hub(
        str(tmp_path), "--repo-id", REPO, env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "h")}
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert str(tmp_path) in proc.stderr and "Traceback" not in proc.stderr


def _run_hub(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python -m accel_distill.hub ARGS`` with a clean HF environment (no real cache, no real token)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    assert "HF_HOME" in env  # a temporary one: never the user's cache or cached login
    full = {
        **base,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "accel_distill.hub", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=full,
        cwd=ROOT,
    )


def test_push_export_subprocess(export_folder, fake_hub, tmp_path):
    proc = _run_hub(
        str(export_folder),
        "--repo-id",
        REPO,
        "--private",
        env={"HF_ENDPOINT": fake_hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf-home")},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{fake_hub.url}/{REPO}"
    assert not fake_hub.unexpected, fake_hub.unexpected

    # private reached create_repo
    assert fake_hub.created == [{"name": "tiny-dmd2", "organization": "tester", "visibility": "private"}]

    # what arrived: the card, weights (through LFS), scheduler config, model index; no training state
    uploaded = set(fake_hub.committed)
    for rel in [
        "README.md",
        "model_index.json",
        "accel_distill_export.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "transformer/config.json",
        "scheduler/scheduler_config.json",
    ]:
        assert rel in uploaded, rel
        if rel != "accel_distill_export.json":
            assert fake_hub.uploaded_bytes(rel) == (export_folder / rel).read_bytes(), rel
    local = json.loads((export_folder / "accel_distill_export.json").read_text())
    assert is_hub_id(local["source"])  # a Hub base model is published as it is
    assert json.loads(fake_hub.uploaded_bytes("accel_distill_export.json")) == local
    assert not [f for f in uploaded if _is_decoy(f)], uploaded
    assert uploaded == set(files_to_upload(export_folder))
    assert fake_hub.yaml_checked and "dmd2" in fake_hub.yaml_checked[0]

    # the token was used (every call to the Hub API carried it) and leaked nowhere
    api_auth = [a for (m, p), a in zip(fake_hub.requests, fake_hub.auth) if not p.startswith("/lfs-upload/")]
    assert api_auth and all(a == f"Bearer {TOKEN}" for a in api_auth)
    assert TOKEN not in proc.stdout and TOKEN not in proc.stderr
    for f in export_folder.rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f
    assert TOKEN not in fake_hub.commit_headers[0]["summary"]


def test_push_leaves_out_a_local_source_path(export_folder, fake_hub, tmp_path):
    """An export trained from a local folder records that path; the published info does not carry it."""
    folder = tmp_path / "export"
    shutil.copytree(export_folder, folder)
    info_file = folder / "accel_distill_export.json"
    local_source = str(tmp_path / "home" / "me" / "private-base-model")
    info = {**json.loads(info_file.read_text()), "source": local_source}
    info_file.write_text(json.dumps(info))
    proc = _run_hub(
        str(folder),
        "--repo-id",
        REPO,
        env={"HF_ENDPOINT": fake_hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "h")},
    )
    assert proc.returncode == 0, proc.stderr
    published = json.loads(fake_hub.uploaded_bytes("accel_distill_export.json"))
    assert published == {**info, "source": None, "source_is_local": True}
    assert json.loads(info_file.read_text()) == info  # the user's export is left as it was
    assert not [f for f in fake_hub.committed if local_source.encode() in fake_hub.uploaded_bytes(f)]


def test_push_without_token(export_folder, fake_hub, tmp_path):
    proc = _run_hub(
        str(export_folder), "--repo-id", REPO, env={"HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "h")}
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no Hugging Face token") and "Traceback" not in proc.stderr
    assert not fake_hub.requests  # nothing was sent
