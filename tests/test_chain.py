"""The paper chain as shipped: stage 1 -> 2 -> 3 shapes from the shipped YAMLs and the real model configs of
``experiments/models/`` (weights absent; the big networks are built on the meta device or not at all).

Each stage YAML is parsed by the real LightningCLI parser (nothing instantiated). The shapes come from the
configs: the CLIP dimension from open_clip's config of the stage-1 CLIP teacher, the VAE latent from
``sd21_vae.json`` and the stage-1 ``image_size``, what Stable unCLIP expects from ``sd21_unclip_small_unet.json``,
the LLM width from ``llama3_8b.json``. :func:`chain_problems` compares them (and is shown to catch the old
512-px VAE teacher); the project's own checks (``ReconstructionTask.configure_models``,
``InstructTask.configure_models``) run on a stage-1 checkpoint built from the same YAML at a tiny depth.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from neurovision.sources import nsd

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
MODELS = EXPERIMENTS / "models"
STAGES = {"stage1": ("fit", EXPERIMENTS / "stage1_vit3d.yaml"),
          "stage2": ("fit", EXPERIMENTS / "stage2_instruct.yaml"),
          "stage3": ("test", EXPERIMENTS / "stage3_reconstruct.yaml")}
#: subj01's func1pt8mm volume, the common grid of `prepare nsd` (X, Y, Z)
NSD_GRID = (81, 104, 83)
#: the stage-1 teacher arguments that decide its embedding space (stage 3 selects and scores in it)
CLIP_IDENTITY = ("model_name", "checkpoint", "model_config", "image_size", "normalize")


def model_config(name: str) -> dict[str, Any]:
    return json.loads((MODELS / name).read_text())


@pytest.fixture(scope="module")
def shipped() -> dict[str, Any]:
    """The parsed shipped stage YAMLs (the subcommand's namespace of each)."""
    from neurovision.runs.sweep import parse

    return {k: parse([cmd, "-c", str(path)]) for k, (cmd, path) in STAGES.items()}


# --------------------------------------------------------------------------------------------- shapes
def clip_dim(teacher: Any) -> int:
    """Embedding dimension of an ``OpenCLIPImageTeacher`` block, from open_clip's config (no model built)."""
    from neurovision.pretrained.teachers import resolve_clip_arch

    a = teacher.init_args
    return int(resolve_clip_arch(a.model_name, a.model_config, "model.init_args.clip_teacher")[1]["embed_dim"])


def vae_latent_shape(vae: dict[str, Any], image_size: int) -> tuple[int, int, int]:
    """An AutoencoderKL's latent at ``image_size`` px: one /2 per block after the first."""
    down = 2 ** (len(vae["block_out_channels"]) - 1)
    if image_size % down:
        raise ValueError(f"image_size {image_size} is not a multiple of the VAE's downsampling {down}")
    s = image_size // down
    return (int(vae["latent_channels"]), s, s)


def unclip_expects(unet: dict[str, Any]) -> tuple[int, tuple[int, int, int]]:
    """(CLIP image-embedding dim, latent shape) a Stable unCLIP UNet config takes."""
    assert unet["class_embed_type"] == "projection"
    s = int(unet["sample_size"])
    return int(unet["projection_class_embeddings_input_dim"]) // 2, (int(unet["in_channels"]), s, s)


def stage1_checkpoint_path(stage1: Any) -> str:
    """Where the stage-1 run's ModelCheckpoint writes ``last.ckpt``: ``<save_dir>/<name>/version_0/checkpoints``
    of its logger (a fresh run)."""
    logger = stage1.trainer.logger.init_args
    (ckpt,) = [c for c in stage1.trainer.callbacks if c.class_path.endswith("ModelCheckpoint")]
    assert ckpt.init_args.save_last and ckpt.init_args.dirpath is None
    return str(Path(logger.save_dir) / logger.name / "version_0" / "checkpoints" / "last.ckpt")


def chain_problems(cfg: dict[str, Any], vae: dict[str, Any], unet: dict[str, Any],
                   llm: dict[str, Any]) -> list[str]:
    """Every place where stage 1 -> 2 -> 3 as configured does not fit together (empty: the chain holds)."""
    s1, s2, s3 = (cfg[k].model.init_args for k in ("stage1", "stage2", "stage3"))
    out = []
    want_clip, want_latent = unclip_expects(unet)
    have_clip = clip_dim(s1.clip_teacher)
    if have_clip != want_clip:
        out.append(f"CLIP: stage 1 predicts {have_clip}-d embeddings, Stable unCLIP takes {want_clip}-d")
    if s1.vae_teacher is None:
        betas = s3.beta if isinstance(s3.beta, list | tuple) else [s3.beta]  # one β or a list of them
        if min(betas) < 1:
            out.append(f"VAE: stage 1 has no VAE stream, stage 3 needs one at beta {min(betas)}")
    else:
        have_latent = vae_latent_shape(vae, int(s1.vae_teacher.init_args.image_size))
        if have_latent != want_latent:
            out.append(f"VAE latent: stage 1 predicts {have_latent}, Stable unCLIP denoises {want_latent}")
        if int(s1.vae_teacher.init_args.image_size) != int(vae["sample_size"]):
            out.append(f"VAE image size: stage 1 encodes at {s1.vae_teacher.init_args.image_size} px, the VAE "
                       f"(and unCLIP) work at {vae['sample_size']} px")
    for name, teacher in (("stage 2", s2.clip_teacher), ("stage 3", s3.clip_teacher)):
        if teacher is not None:
            diff = [k for k in CLIP_IDENTITY if teacher.init_args[k] != s1.clip_teacher.init_args[k]]
            if diff:
                out.append(f"CLIP teacher: {name}'s differs from stage 1's in {diff}")
    ckpt = stage1_checkpoint_path(cfg["stage1"])
    for name, s in (("stage 2", s2), ("stage 3", s3)):
        if s.stage1 != ckpt:
            out.append(f"checkpoint: {name} reads {s.stage1}, stage 1 writes {ckpt}")
    stores = {k: cfg[k].data.init_args.store for k in cfg}
    if len(set(stores.values())) != 1:
        out.append(f"store: the stages read different stores {stores}")
    # stage 2's sequences: max_length tokens, the <fmri> placeholder replaced by CLS + every active patch
    # (at most every patch of the NSD grid at prepare nsd's patch size)
    patch = inspect.signature(nsd.prepare).parameters["patch_size"].default
    fmri_tokens = 1 + math.prod(math.ceil(g / patch) for g in NSD_GRID)
    longest = int(cfg["stage2"].data.init_args.max_length) - 1 + fmri_tokens
    if longest > int(llm["max_position_embeddings"]):
        out.append(f"LLM context: stage 2's sequences reach {longest} tokens, the LLM has "
                   f"{llm['max_position_embeddings']} positions")
    return out


def test_model_configs_are_the_public_ones():
    vae, unet, llm = (model_config(n) for n in ("sd21_vae.json", "sd21_unclip_small_unet.json", "llama3_8b.json"))
    assert vae["_class_name"] == "AutoencoderKL" and vae["block_out_channels"] == [128, 256, 512, 512]
    assert (vae["latent_channels"], vae["scaling_factor"], vae["sample_size"]) == (4, 0.18215, 768)
    assert unet["_class_name"] == "UNet2DConditionModel" and unet["attention_head_dim"] == [5, 10, 20, 20]
    assert (unet["cross_attention_dim"], unet["projection_class_embeddings_input_dim"], unet["sample_size"]) \
        == (1024, 1536, 96)
    assert unet["use_linear_projection"] and unet["class_embed_type"] == "projection"
    assert (llm["hidden_size"], llm["num_hidden_layers"], llm["num_attention_heads"], llm["num_key_value_heads"],
            llm["intermediate_size"], llm["vocab_size"], llm["rope_theta"], llm["max_position_embeddings"]) \
        == (4096, 32, 32, 8, 14336, 128256, 500000.0, 8192)


def test_shapes_resolve_from_the_shipped_yamls(shipped):
    """The numbers the chain rests on, each from its config (a failure names which one moved)."""
    s1 = shipped["stage1"].model.init_args
    assert clip_dim(s1.clip_teacher) == 768  # ViT-L/14
    assert vae_latent_shape(model_config("sd21_vae.json"), s1.vae_teacher.init_args.image_size) == (4, 96, 96)
    assert unclip_expects(model_config("sd21_unclip_small_unet.json")) == (768, (4, 96, 96))
    assert math.prod((4, 96, 96)) == 36_864  # the stage-1 VAE head's outputs


def test_the_shipped_chain_holds(shipped):
    vae, unet, llm = (model_config(n) for n in ("sd21_vae.json", "sd21_unclip_small_unet.json", "llama3_8b.json"))
    assert chain_problems(shipped, vae, unet, llm) == []


@pytest.mark.parametrize("change, problem", [
    ({"model.init_args.vae_teacher.init_args.image_size": 512}, "VAE latent: stage 1 predicts (4, 64, 64)"),
    ({"model.init_args.clip_teacher.init_args.model_name": "ViT-B-32-quickgelu"}, "CLIP: stage 1 predicts 512-d"),
    ({"trainer.logger.init_args.save_dir": "runs/elsewhere"}, "checkpoint: stage 2 reads"),
    ({"model.init_args.vae_teacher": None}, "VAE: stage 1 has no VAE stream"),
    ({"stage2:data.init_args.max_length": 8000}, "LLM context: stage 2's sequences reach 8288 tokens"),
], ids=["vae-512px", "clip-vit-b32", "stage1-run-dir", "no-vae", "stage2-too-long"])
def test_the_chain_check_catches_a_broken_chain(shipped, change, problem):
    """The same comparison fails for the old 512-px VAE teacher (and other changes; keys of stage 1 unless
    prefixed with the stage)."""
    cfg = dict(shipped)
    for k, v in change.items():
        stage, key = k.split(":") if ":" in k else ("stage1", k)
        cfg[stage] = cfg[stage].clone()
        cfg[stage][key] = v
    vae, unet, llm = (model_config(n) for n in ("sd21_vae.json", "sd21_unclip_small_unet.json", "llama3_8b.json"))
    problems = chain_problems(cfg, vae, unet, llm)
    assert any(p.startswith(problem) for p in problems), problems


def test_vae_teacher_computes_the_same_latent(shipped):
    """The project's VAETeacher, built from the real SD-2.1 VAE config (random weights) at the stage-1 YAML's
    image size, predicts the latent Stable unCLIP takes."""
    from neurovision.pretrained.teachers import VAETeacher

    size = shipped["stage1"].model.init_args.vae_teacher.init_args.image_size
    teacher = VAETeacher(config=str(MODELS / "sd21_vae.json"), image_size=size, device="cpu")
    assert teacher.latent_shape == unclip_expects(model_config("sd21_unclip_small_unet.json"))[1]
    assert teacher.scaling_factor == pytest.approx(0.18215)


# --------------------------------------------------------------------------------------------- the tasks' checks
SPEC = dict(num_active_patches=2, patch_size=2, grid_shape=(4, 4, 4), patch_coords=((0, 0, 0), (1, 1, 1)),
            num_subjects=4, image_shape=(425, 425, 3))


def _stage1_checkpoint(stage1: Any, path: Path, image_size: int | None = None) -> Path:
    """A stage-1 checkpoint as the shipped YAML's run would write it (its width, heads, teachers' output sizes),
    one block deep, heads 8 wide: the later stages read only these shapes."""
    from neurovision.tasks import AlignmentTask
    from neurovision.tasks.base import DataSpec

    a = stage1.model.init_args
    size = image_size or a.vae_teacher.init_args.image_size
    vae = model_config("sd21_vae.json")
    clip = SimpleNamespace(dim=clip_dim(a.clip_teacher), id=f"open_clip:{a.clip_teacher.init_args.model_name}")
    vae_t = SimpleNamespace(latent_shape=vae_latent_shape(vae, size), id=f"sd21-vae@{size}")
    task = AlignmentTask(DataSpec(**SPEC), clip_teacher=clip, vae_teacher=vae_t, dim=a.dim, depth=1, heads=a.heads,
                         head_hidden=8, drop_path=0.0)
    torch.save({"hyper_parameters": dict(task.hparams), "state_dict": task.state_dict(),
                "teacher_ids": {"clip": clip.id, "vae": vae_t.id}}, path)
    return path


def _meta_reconstructor() -> Any:
    """Stable unCLIP 2.1 small's VAE and UNet from their real configs, on the meta device (no memory, no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from neurovision.pretrained.unclip import UnCLIPReconstructor

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(model_config("sd21_unclip_small_unet.json"))
        vae = AutoencoderKL.from_config(model_config("sd21_vae.json"))
    return UnCLIPReconstructor(vae, unet, scheduler=None, text_encoder=None, tokenizer=None)


@pytest.mark.parametrize("image_size", [None, 512], ids=["shipped", "old-512px"])
def test_reconstruction_task_accepts_the_shipped_stage1(shipped, tmp_path, monkeypatch, image_size):
    """``ReconstructionTask.configure_models`` (stage 3's own comparison) on a stage-1 checkpoint of the shipped
    YAML and the real unCLIP config: accepted; with the old 512-px VAE teacher: refused."""
    from neurovision.pretrained.unclip import UnCLIPReconstructor
    from neurovision.tasks import ReconstructionTask
    from neurovision.tasks.base import DataSpec

    s3 = shipped["stage3"].model.init_args
    ckpt = _stage1_checkpoint(shipped["stage1"], tmp_path / "last.ckpt", image_size)
    opened = []

    def from_pretrained(path, key="model.init_args.reconstructor", torch_dtype=torch.float32):
        opened.append(path)
        return _meta_reconstructor()

    monkeypatch.setattr(UnCLIPReconstructor, "from_pretrained", staticmethod(from_pretrained))
    kw = dict(stage1=str(ckpt), reconstructor=s3.reconstructor, beta=s3.beta, steps=s3.steps, dtype=s3.dtype)
    if image_size is None:
        task = ReconstructionTask(DataSpec(**SPEC), **kw)
        assert task.recon.latent_shape == (4, 96, 96) and task.recon.clip_dim == 768
        assert task.stage1.vae_head[-1].out_features == 36_864
    else:
        with pytest.raises(ValueError, match=r"latents \(4, 96, 96\) \(36864 values\) differ from the stage-1 VAE "
                                             r"head's 16384 outputs"):
            ReconstructionTask(DataSpec(**SPEC), **kw)
    assert opened == [s3.reconstructor]


def test_instruct_task_builds_on_the_shipped_stage1_and_llama3(shipped, tmp_path, monkeypatch):
    """``InstructTask.configure_models`` with the shipped stage-2 YAML (LoRA targets included) on a Llama-3-8B
    built from its real config on the meta device (one layer: the widths are what matter): the projector maps
    the stage-1 ViT3D width to the LLM width."""
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    import neurovision.tasks.instruct as instruct
    from neurovision.tasks.base import DataSpec

    llm_cfg = model_config("llama3_8b.json")
    s2 = shipped["stage2"].model.init_args
    ckpt = _stage1_checkpoint(shipped["stage1"], tmp_path / "last.ckpt")

    def load_llm(path, key="model.init_args.llm", dtype=None, chat_template=None):
        assert path == s2.llm
        cfg = LlamaConfig(**{**llm_cfg, "num_hidden_layers": 1})
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg).to(dtype or torch.float32)
        return model, SimpleNamespace(convert_tokens_to_ids=lambda token: cfg.vocab_size - 1)

    monkeypatch.setattr(instruct, "load_llm", load_llm)
    import yaml

    raw = yaml.safe_load(STAGES["stage2"][1].read_text())["model"]["init_args"]["lora"]["init_args"]
    lora = LoraConfig(**{k: s2.lora.init_args[k] for k in raw})  # as the YAML sets it (the rest: peft defaults)
    task = instruct.InstructTask(DataSpec(**SPEC), llm=s2.llm, stage1=str(ckpt), phase=s2.phase, lora=lora,
                                 llm_dtype=s2.llm_dtype, gradient_checkpointing=s2.gradient_checkpointing,
                                 projector_hidden=s2.projector_hidden)
    first, last = task.projector[0], task.projector[-1]
    assert first.in_features == shipped["stage1"].model.init_args.dim == 768
    assert last.out_features == llm_cfg["hidden_size"] == 4096
    adapted = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in task.llm.named_parameters() if ".lora_A." in n}
    assert adapted == set(s2.lora.init_args.target_modules)  # every LoRA target exists in Llama-3
