"""Hub push and model card, offline: the real huggingface_hub client talks to a fake Hub on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import base_config, write_config

from accel_distill.errors import UserError
from accel_distill.export import export_lora, export_student
from accel_distill.hub import files_to_upload, is_hub_id, model_card_text, push_export, write_model_card
from accel_distill.schedule import fit_few_step_schedule
from accel_distill.testing.loopback_hub import serve
from accel_distill.testing.tiny_wan import build_tiny_wan

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_TESTTOKEN_do_not_leak_123"
REPO = "tester/tiny-dmd2"
BASE_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"  # the student's source, served from an offline Hub cache


@pytest.fixture
def fake_hub():
    """The loopback Hub (accel_distill.testing.loopback_hub), accepting uploads to REPO."""
    with serve(REPO) as server:
        yield server


def _transformer(source: Path):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(source, subfolder="transformer")


def _schedule():
    return fit_few_step_schedule([1000, 757, 522])


@pytest.fixture(scope="module")
def export_folder(tmp_path_factory) -> Path:
    """export_student's folder for a student distilled from a Hub id, with decoy training state inside it.

    The Hub id resolves from an offline Hub cache holding a tiny pipeline, so the export takes its
    real Hub path (download of the components it copies) with no network.
    """
    import huggingface_hub.constants

    tmp = tmp_path_factory.mktemp("hub")
    commit = "0" * 40
    repo_cache = tmp / "hub-cache" / f"models--{BASE_REPO.replace('/', '--')}"
    build_tiny_wan(repo_cache / "snapshots" / commit)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(commit)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp / "hub-cache"))
        m.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        student = _transformer(repo_cache / "snapshots" / commit)
        folder = export_student(student, BASE_REPO, tmp / "export", _schedule(), info={"method": "dmd2"})
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


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory) -> tuple[Path, Path]:
    """(export_lora's folder, its local base): a LoRA student trained from a local folder."""
    from peft import LoraConfig

    tmp = tmp_path_factory.mktemp("hub-lora")
    base = build_tiny_wan(tmp / "home" / "someone" / "models" / "wan-local")  # UniPC scheduler, like Wan
    student = _transformer(base)
    student.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return export_lora(student, str(base), tmp / "lora-export", _schedule(), info={"method": "dmd2"}), base


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


def test_card_of_an_image_to_video_export_passes_the_image(export_folder, tmp_path):
    """An image-to-video export's card says so and its snippet gives the pipeline the first frame."""
    import shutil

    folder = shutil.copytree(export_folder, tmp_path / "i2v")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanImageToVideoPipeline"}))
    text = model_card_text(folder, REPO)
    assert yaml.safe_load(text.split("---")[1])["pipeline_tag"] == "image-to-video" and "image-to-video model" in text
    code = text.split("```python")[1].split("```")[0]
    assert 'image = load_image("first_frame.png")' in code and "pipe(image=image, prompt=" in code
    compile(code, "card", "exec")


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


def test_card_lora_snippet_loads(lora_export):
    """A LoRA export: the card's code loads the base, the LoRA file and the exported scheduler."""
    import torch

    folder, base = lora_export
    code = _python_block(model_card_text(folder, REPO))
    assert 'base_model = "path/to/the/base/model"' in code  # a local source is not named in the card
    pipe = _run_snippet(code, repo_id=str(folder), base_model=str(base))["pipe"]
    assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler"
    assert pipe.scheduler.config["shift_terminal"] == _schedule().scheduler_config()["shift_terminal"]
    assert pipe.get_active_adapters()
    with torch.no_grad():
        assert any("lora" in n for n, _ in pipe.transformer.named_parameters())


def test_card_lora_local_source(lora_export):
    folder, base = lora_export
    text = model_card_text(folder, REPO)
    meta = yaml.safe_load(text.split("---")[1])
    assert "base_model" not in meta  # never a local path
    assert str(base) not in text and "/home/someone" not in text
    assert {"lora", "dmd2", "distillation", "few-step"} <= set(meta["tags"])
    code = text.split("```python")[1].split("```")[0]
    compile(code, "card", "exec")
    assert "pipe.load_lora_weights(repo_id)" in code
    assert 'FlowMatchLCMScheduler.from_pretrained(repo_id, subfolder="scheduler")' in code
    assert "num_inference_steps=3, guidance_scale=1.0" in code


@pytest.mark.parametrize("older", [False, True], ids=["current", "older-export"])
def test_card_finetune(older, tmp_path, lora_export):
    """A finetune's export (many steps, the source's scheduler), also as an older export without the
    "method"/"adapter" keys: no steps, no distillation tags."""
    _, base = lora_export
    folder = export_student(_transformer(base), str(base), tmp_path / "ft", None, info={"method": "finetune"})
    info_file = folder / "accel_distill_export.json"
    info = json.loads(info_file.read_text())
    assert "num_inference_steps" not in info
    if older:
        info_file.write_text(json.dumps({k: v for k, v in info.items() if k not in ("method", "adapter")}))
    text = model_card_text(folder, REPO)
    meta = yaml.safe_load(text.split("---")[1])
    assert "distillation" not in meta["tags"] and "few-step" not in meta["tags"]
    assert ("finetune" in meta["tags"]) is not older
    code = text.split("```python")[1].split("```")[0]
    assert "num_inference_steps" not in code
    compile(code, "card", "exec")
    pipe = _run_snippet(code, repo_id=str(folder))["pipe"]
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"  # the source's


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


def _run_clean(command: list[str], env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    """``command`` with a clean HF environment (no real cache, no real token) plus ``env``."""
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
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full, cwd=ROOT)


def _run_hub(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python -m accel_distill.hub ARGS``."""
    return _run_clean([sys.executable, "-m", "accel_distill.hub", *args], env)


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
        if rel == "transformer/config.json":  # the same config, less the local path diffusers records
            local_config = json.loads((export_folder / rel).read_text())
            assert "_name_or_path" in local_config and "_name_or_path" not in json.loads(fake_hub.uploaded_bytes(rel))
            assert {
                **json.loads(fake_hub.uploaded_bytes(rel)),
                "_name_or_path": local_config["_name_or_path"],
            } == local_config
        elif rel != "accel_distill_export.json":
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


@pytest.fixture
def local_push(lora_export, fake_hub, tmp_path) -> tuple[Path, Path, dict, subprocess.CompletedProcess]:
    """(folder, base, its info, the push): an export trained from a local folder, pushed."""
    _, base = lora_export
    folder = export_student(_transformer(base), str(base), tmp_path / "export", _schedule(), info={"method": "dmd2"})
    info = json.loads((folder / "accel_distill_export.json").read_text())
    proc = _run_hub(
        str(folder),
        "--repo-id",
        REPO,
        env={"HF_ENDPOINT": fake_hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "h")},
    )
    assert proc.returncode == 0, proc.stderr
    return folder, base, info, proc


def test_push_leaves_out_a_local_source_path(local_push, fake_hub):
    """An export trained from a local folder records that path; the published info does not carry it."""
    folder, base, info, _ = local_push
    assert info["source"] == str(base)
    published = json.loads(fake_hub.uploaded_bytes("accel_distill_export.json"))
    assert published == {**info, "source": None, "source_is_local": True}
    assert json.loads((folder / "accel_distill_export.json").read_text()) == info  # the user's export as it was


def test_no_pushed_file_names_the_local_source(local_push, fake_hub):
    _, base, _, _ = local_push
    leaks = [f for f in fake_hub.committed if str(base).encode() in fake_hub.uploaded_bytes(f)]
    assert not leaks, leaks


def test_unreachable_hub_is_one_error_line(export_folder, tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "h")}  # port 9: closed
    proc = _run_hub(str(export_folder), "--repo-id", REPO, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        proc.stderr.startswith("error: cannot reach the Hub at http://127.0.0.1:9") and "Traceback" not in proc.stderr
    )


def test_push_without_token(export_folder, fake_hub, tmp_path):
    proc = _run_hub(
        str(export_folder), "--repo-id", REPO, env={"HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "h")}
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no Hugging Face token") and "Traceback" not in proc.stderr
    assert not fake_hub.requests  # nothing was sent


def test_train_distill_pushes_its_export(fake_hub, tmp_path, tiny_wan, tiny_teacher, latent_data):
    """``training.push_to_hub: true`` through train_distill.py: the export, its card and nothing else."""
    out = tmp_path / "out"
    cfg = base_config("dmd2", tiny_wan, tiny_teacher, latent_data, out)
    cfg["training"].update(max_train_steps=2, push_to_hub=True, hub_model_id=REPO, hub_private=True)
    command = [sys.executable, str(ROOT / "train_distill.py"), "--config", str(write_config(tmp_path / "r.yaml", cfg))]
    env = {"HF_ENDPOINT": fake_hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf-home")}
    proc = _run_clean(command, env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not fake_hub.unexpected, fake_hub.unexpected  # training itself asked the Hub for nothing
    export = out / "export"
    assert fake_hub.created == [{"name": "tiny-dmd2", "organization": "tester", "visibility": "private"}]

    uploaded = set(fake_hub.committed)
    assert uploaded == set(files_to_upload(export))
    assert {"README.md", "model_index.json", "transformer/diffusion_pytorch_model.safetensors"} <= uploaded
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and not [f for f in uploaded if _is_decoy(f)]
    for rel in uploaded - {"accel_distill_export.json"}:
        if rel.endswith(".json"):  # configs arrive whole but for the local path diffusers records
            local_config = {k: v for k, v in json.loads((export / rel).read_text()).items() if k != "_name_or_path"}
            assert json.loads(fake_hub.uploaded_bytes(rel)) == local_config, rel
        else:
            assert fake_hub.uploaded_bytes(rel) == (export / rel).read_bytes(), rel
    info = json.loads((export / "accel_distill_export.json").read_text())
    published = json.loads(fake_hub.uploaded_bytes("accel_distill_export.json"))
    assert published == {**info, "source": None, "source_is_local": True}  # trained from a local folder
    card = fake_hub.uploaded_bytes("README.md").decode()
    assert "dmd2" in yaml.safe_load(card.split("---")[1])["tags"] and "[1000, 757, 522]" in card
    api_auth = [a for (m, p), a in zip(fake_hub.requests, fake_hub.auth) if not p.startswith("/lfs-upload/")]
    assert api_auth and all(a == f"Bearer {TOKEN}" for a in api_auth)
    assert TOKEN not in proc.stdout + proc.stderr
