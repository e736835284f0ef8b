"""Stage 2 of Shen et al.: fMRI tokens from the stage-1 ViT3D enter a causal LM tuned to caption, describe,
reason, converse and write reconstruction prompts (LLaVA style).

The penultimate-layer token states of the ViT3D (CLS + active patches) go through a 2-layer MLP projector and
replace the ``<fmri>`` placeholder in the LLM's input embeddings; with ``clip_token`` the stage-1 CLIP prediction
(CLIP head plus voxel read-out, what stage 3 reconstructs from) follows them as one more token. Two phases as in the paper:
``phase="projector"`` (A: projector only, LLM frozen) and ``phase="lora"`` (B: projector + peft LoRA adapters;
``phase="full"`` tunes the whole LLM instead). The ViT3D is frozen unless ``tune_encoder``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from peft import LoraConfig
from torch import nn

from neurovision.data.atomic import atomic_dir, write_json, write_jsonl
from neurovision.data.instructions import FMRI_TOKEN, IGNORE_INDEX
from neurovision.models import with_readout
from neurovision.models.stage1 import check_stage1_spec, load_stage1
from neurovision.pretrained.llm import load_llm
from neurovision.pretrained.teachers import OpenCLIPImageTeacher
from neurovision.tasks.base import TORCH_DTYPES, BaseTask, DataSpec, adamw

Phase = Literal["projector", "lora", "full"]


class Projector(nn.Sequential):
    """LLaVA-1.5's projector: Linear -> GELU -> Linear, ViT3D width -> LLM width."""

    def __init__(self, dim: int, hidden: int, out: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))


def splice_fmri(embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None, fmri: torch.Tensor, fmri_token_id: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Replace the one ``<fmri>`` token of every sequence by its T fMRI embeddings.

    embeds: (B, L, H) token embeddings; input_ids/attention_mask/labels: (B, L); fmri: (B, T, H).
    Returns (B, L - 1 + T, H) embeddings, the attention mask and the labels (``IGNORE_INDEX`` on fMRI tokens).
    """
    is_fmri = input_ids == fmri_token_id
    counts = is_fmri.sum(1)
    if bool((counts != 1).any()):
        bad = int((counts != 1).nonzero()[0, 0])
        raise ValueError(f"every sequence needs exactly one {FMRI_TOKEN} token; sequence {bad} has "
                         f"{int(counts[bad])}")
    b, seq_len = input_ids.shape
    t = fmri.shape[1]
    pos = is_fmri.float().argmax(1)  # (B,)
    # output position j of sample b takes: token j (j < p), fMRI j - p (p <= j < p + T), token j - T + 1
    j = torch.arange(seq_len - 1 + t, device=input_ids.device)[None].expand(b, -1)
    p = pos[:, None]
    in_fmri = (j >= p) & (j < p + t)
    tok_idx = torch.where(j < p, j, j - t + 1).clamp(0, seq_len - 1)
    fmri_idx = (j - p).clamp(0, t - 1)
    tok_e = embeds.gather(1, tok_idx[..., None].expand(-1, -1, embeds.shape[-1]))
    fm_e = fmri.to(embeds.dtype).gather(1, fmri_idx[..., None].expand(-1, -1, embeds.shape[-1]))
    out = torch.where(in_fmri[..., None], fm_e, tok_e)
    mask = torch.where(in_fmri, torch.ones_like(tok_idx), attention_mask.gather(1, tok_idx))
    lab = None
    if labels is not None:
        lab = torch.where(in_fmri, torch.full_like(labels, IGNORE_INDEX)[:, :1].expand(-1, j.shape[1]),
                          labels.gather(1, tok_idx))
    return out, mask, lab


class InstructTask(BaseTask):
    """ViT3D (stage 1) -> projector -> fMRI tokens in a causal LM (LLaVA style), tuned on instruction data.

    Training: loss on the answer tokens only (labels from :class:`data_modules.instruct.InstructionDataModule`).
    Validation: the same teacher-forced loss. Test: generation for every evaluation prompt, then caption metrics
    (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE where available; CLIP-S with ``clip_teacher``) and exact-match
    accuracy per question type, per condition (``average``, ``single``); generations are written as JSONL in
    the run's log directory. Predict: generations as rows (see ``callbacks.JSONLPredictionWriter``).

    Args:
        data_spec: sizes the data decides (linked by the CLI; must match the stage-1 run's).
        llm: local directory of a Hugging Face causal LM + tokenizer with a chat template
            (Llama-3-8B-Instruct, Vicuna-13B, or a tiny one from ``neurovision tiny llm``).
        stage1: the stage-1 :class:`~neurovision.tasks.AlignmentTask` checkpoint (ViT3D + CLIP head).
        chat_template: Jinja chat template (string or ``.jinja`` path) for LLMs whose tokenizer has none.
        phase: ``projector`` (A), ``lora`` (B) or ``full`` (B with full fine-tuning).
        lora: peft ``LoraConfig`` for ``phase="lora"`` (``class_path: peft.LoraConfig`` in YAML).
        init_from: a stage-2 checkpoint (e.g. phase A's) whose projector (and encoder) weights start this run.
        adapter: a directory written by :meth:`save_adapters` to load (projector + LoRA adapter), e.g. for predict.
        tune_encoder: also train the ViT3D (off: frozen, as the paper's stage 2).
        clip_token: append one more fMRI token: the stage-1 CLIP prediction (the CLIP head on the CLS output
            plus the run's voxel read-out, ``Stage1Parts.predict_clip``), L2-normalised, through its own
            projector. It carries what stage 1 learned end to end, the read-out included, which the ViT3D's
            token states alone do not (measured on the demo phantom: docs/stage2.md).
        projector_hidden: hidden width of the projector (default: the LLM width).
        llm_dtype: dtype of the LLM weights (``bfloat16`` on GPUs).
        max_new_tokens: generation length limit.
        clip_teacher: CLIP teacher for CLIP-S of generated captions (optional).
        clip_score_prefix: text put before each caption for CLIP-S (Hessel et al.: "A photo depicts "; ""
            for a CLIP trained on bare captions, like the phantom's tiny one).
        gradient_checkpointing: in the LLM (and the ViT3D if tuned).
        optimizer: optimiser factory (trainable parameters only).
        scheduler: learning-rate scheduler factory.
    """

    IMMUTABLE_HPARAMS: ClassVar[tuple[str, ...]] = ("phase", "projector_hidden", "clip_token")  # fixed by training (see BaseTask)

    def __init__(
        self,
        data_spec: DataSpec | None = None,
        llm: str = "",
        stage1: str = "",
        chat_template: str | None = None,
        phase: Phase = "projector",
        lora: LoraConfig | None = None,
        init_from: str | None = None,
        adapter: str | None = None,
        tune_encoder: bool = False,
        clip_token: bool = False,
        projector_hidden: int | None = None,
        llm_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        max_new_tokens: int = 64,
        clip_teacher: OpenCLIPImageTeacher | None = None,
        clip_score_prefix: str = "A photo depicts ",
        gradient_checkpointing: bool = False,
        optimizer: OptimizerCallable = adamw,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if not llm:
            raise ValueError("InstructTask needs model.init_args.llm (a local causal LM directory)")
        if not stage1:
            raise ValueError("InstructTask needs model.init_args.stage1 (a stage-1 checkpoint)")
        if phase not in ("projector", "lora", "full"):
            raise ValueError(f"model.init_args.phase must be projector, lora or full, got {phase!r}")
        if phase == "lora" and lora is None:
            raise ValueError("model.init_args.phase='lora' needs model.init_args.lora (class_path: peft.LoraConfig)")
        # the paths before anything is built (the LLM's is load_llm's; `neurovision fit` checks all of them
        # before any class is built: neurovision.runs.lightning)
        if not Path(stage1).is_file():
            raise FileNotFoundError(f"{stage1}: stage-1 checkpoint does not exist (YAML key model.init_args.stage1)")
        for key, path in (("init_from", init_from), ("adapter", adapter)):
            if path and not Path(path).exists():
                what = "checkpoint" if key == "init_from" else "adapter folder"
                raise FileNotFoundError(f"{path}: {what} does not exist (YAML key model.init_args.{key})")
        self.llm_path, self.stage1_path, self.phase, self.lora_config = llm, stage1, phase, lora
        self.chat_template = chat_template
        self.init_from, self.adapter = init_from, adapter
        self.tune_encoder, self.projector_hidden = tune_encoder, projector_hidden
        self.clip_token = clip_token
        self.llm_dtype = TORCH_DTYPES[llm_dtype]
        self.max_new_tokens = max_new_tokens
        self.clip_teacher = clip_teacher
        self.clip_score_prefix = clip_score_prefix
        self.gradient_checkpointing = gradient_checkpointing
        super().__init__(data_spec, optimizer, scheduler)
        self.drop_hparams("lora", "clip_teacher")  # objects: the YAML gives them again on reload
        # frozen LLM weights are left out of checkpoints (see on_save_checkpoint)
        self.strict_loading = False

    # hooks ------------------------------------------------------------------------------------------
    def configure_models(self) -> None:
        parts = load_stage1(self.stage1_path)
        check_stage1_spec(parts.spec, self.spec, self.stage1_path)
        self.encoder = parts.encoder
        self.clip_head = parts.clip_head  # kept for concept localisation (GradCAM against CLIP text)
        self.skip = parts.skip  # the voxel read-out of the CLIP prediction (None without one)
        self.llm, self.tokenizer = load_llm(self.llm_path, dtype=self.llm_dtype, chat_template=self.chat_template)
        self.fmri_token_id = int(self.tokenizer.convert_tokens_to_ids(FMRI_TOKEN))
        width = int(self.llm.get_input_embeddings().embedding_dim)
        self.projector = Projector(self.encoder.dim, self.projector_hidden or width, width)
        clip_dim = self.clip_head.out_features
        self.clip_projector = (Projector(clip_dim, self.projector_hidden or width, width) if self.clip_token
                               else None)
        for p in self.llm.parameters():
            p.requires_grad_(self.phase == "full")
        if self.phase == "lora":
            from peft import get_peft_model

            assert self.lora_config is not None  # __init__ refuses phase="lora" without one
            self.llm = get_peft_model(self.llm, self.lora_config)
        if self.gradient_checkpointing:
            self.llm.gradient_checkpointing_enable()
            if self.phase != "full":
                self.llm.enable_input_require_grads()
        for m in (self.encoder, self.clip_head, self.skip):
            for p in (m.parameters() if m is not None else ()):
                p.requires_grad_(self.tune_encoder)
        self.encoder.gradient_checkpointing = self.gradient_checkpointing and self.tune_encoder
        if self.init_from:
            self._init_from(self.init_from)
        if self.adapter:
            self.load_adapters(self.adapter)

    def configure_metrics(self) -> None:
        """Per test condition (built at its first batch by :meth:`_build_metrics`): the generation rows and
        their scores (:class:`~neurovision.metrics.instruct.GenerationScores`, gathered from every rank)."""

    def _build_metrics(self) -> dict[str, Any]:
        from neurovision.metrics.instruct import GenerationScores

        images = (lambda s: self.data_store.image(s)) if self.spec.store else None
        return {"generations": GenerationScores(clip_teacher=self.clip_teacher, images=images,
                                                clip_prefix=self.clip_score_prefix).to(self.device)}

    def _init_from(self, path: str) -> None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: checkpoint does not exist (YAML key model.init_args.init_from)")
        sd = torch.load(p, map_location="cpu", weights_only=True).get("state_dict", {})
        self._load_fmri_parts(sd, f"{p}: field 'state_dict/projector.*': missing (YAML key model.init_args.init_from)")

    def _load_fmri_parts(self, tensors: dict[str, torch.Tensor], missing: str) -> None:
        """The projectors (required; ``missing`` is the error) and, when present, the ViT3D from prefixed tensors."""
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        proj = part("projector.")
        if not proj:
            raise ValueError(missing)
        self.projector.load_state_dict(proj)
        if self.clip_projector is not None:
            clip = part("clip_projector.")
            if not clip:
                raise ValueError(missing.replace("projector.*", "clip_projector.*") + " (model.init_args.clip_token "
                                 "is true: was it trained with clip_token: false?)")
            self.clip_projector.load_state_dict(clip)
        enc = part("encoder.")
        if enc:
            self.encoder.load_state_dict(enc)

    # adapters ---------------------------------------------------------------------------------------
    def save_adapters(self, directory: str | Path) -> Path:
        """Projector (+ ViT3D if tuned) as safetensors and the LLM's LoRA adapter via peft ``save_pretrained``
        (the whole LLM for ``phase='full'``), written atomically into ``directory``."""
        from safetensors.torch import save_file

        out = Path(directory)
        with atomic_dir(out) as tmp:
            tensors = {f"projector.{k}": v.detach().contiguous() for k, v in self.projector.state_dict().items()}
            if self.clip_projector is not None:
                tensors.update({f"clip_projector.{k}": v.detach().contiguous()
                                for k, v in self.clip_projector.state_dict().items()})
            if self.tune_encoder:
                tensors.update({f"encoder.{k}": v.detach().contiguous() for k, v in self.encoder.state_dict().items()})
            save_file(tensors, str(tmp / "fmri_projector.safetensors"))
            if self.phase != "projector":
                self.llm.save_pretrained(tmp / "llm")
            (tmp / "adapter_info.json").write_text(json.dumps(
                {"phase": self.phase, "llm": self.llm_path, "stage1": self.stage1_path}, indent=1))
        return out

    def load_adapters(self, directory: str | Path) -> None:
        """Load what :meth:`save_adapters` wrote (LoRA weights into this model's adapter)."""
        from safetensors.torch import load_file

        d = Path(directory)
        f = d / "fmri_projector.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (YAML key model.init_args.adapter)")
        self._load_fmri_parts(load_file(str(f)), f"{f}: field 'projector.*': missing (YAML key model.init_args.adapter)")
        if (d / "llm" / "adapter_config.json").is_file():
            if self.phase != "lora":
                raise ValueError(f"{d}: holds a LoRA adapter; set model.init_args.phase: lora to load it")
            from peft import set_peft_model_state_dict
            from peft.utils import load_peft_weights

            set_peft_model_state_dict(self.llm, load_peft_weights(str(d / "llm"), device="cpu"))
        elif (d / "llm" / "config.json").is_file():
            from transformers import AutoModelForCausalLM

            full = AutoModelForCausalLM.from_pretrained(d / "llm", local_files_only=True, dtype=self.llm_dtype)
            self.llm.load_state_dict(full.state_dict())

    def on_fit_end(self) -> None:
        log_dir = self.trainer.log_dir  # on every rank: a collective (broadcast) under DDP
        if self.trainer.is_global_zero and log_dir:
            self.save_adapters(Path(log_dir) / "adapters")

    def train(self, mode: bool = True) -> InstructTask:
        """Frozen parts stay in eval mode (no dropout / stochastic depth in what is not trained)."""
        super().train(mode)
        if not self.tune_encoder:
            self.encoder.eval()
            self.clip_head.eval()
            if self.skip is not None:
                self.skip.eval()
        if self.phase == "projector":
            self.llm.eval()
        return self

    # checkpoints: keep what is trained (and the small encoder), drop the frozen LLM ----------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.phase == "full":
            return
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        sd = checkpoint["state_dict"]
        for k in list(sd):
            if k.startswith("llm.") and k not in trainable:
                del sd[k]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint.get("state_dict", {})
        missing = [n for n, p in self.named_parameters() if p.requires_grad and n not in sd]
        if missing:
            raise ValueError(f"checkpoint: field 'state_dict/{missing[0]}': missing ({len(missing)} trained "
                             f"parameters absent; was it written with the same phase/lora settings?)")

    # forward ----------------------------------------------------------------------------------------
    def fmri_tokens(self, patches: torch.Tensor, subject: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1 + A, H): projected penultimate ViT3D token states; (B, 2 + A, H) with ``clip_token``, the
        projected stage-1 CLIP prediction last."""
        use_subject = subject if self.encoder.num_subjects > 0 else None
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.tune_encoder):
            out = self.encoder(patches, use_subject)
            clip = (with_readout(self.clip_head(out.cls), self.skip, patches) if self.clip_projector is not None
                    else None)
        tokens = self.projector(out.penultimate)
        if clip is None or self.clip_projector is None:
            return tokens
        clip = torch.nn.functional.normalize(clip.float(), dim=-1).to(tokens.dtype)
        return torch.cat([tokens, self.clip_projector(clip)[:, None]], dim=1)

    def _inputs(self, batch: dict[str, Any], ids: str = "input_ids", mask: str = "attention_mask",
                labels: str | None = "labels") -> dict[str, torch.Tensor]:
        fmri = self.fmri_tokens(batch["patches"], batch.get("subject"))
        emb = self.llm.get_input_embeddings()(batch[ids])
        e, m, lab = splice_fmri(emb, batch[ids], batch[mask], batch[labels] if labels else None, fmri,
                                self.fmri_token_id)
        out = {"inputs_embeds": e, "attention_mask": m}
        if lab is not None:
            out["labels"] = lab
        return out

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.llm(**self._inputs(batch)).loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["patches"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        loss = self(batch)
        self.log(f"val/{self.condition(dataloader_idx)}/loss", loss, batch_size=len(batch["patches"]),
                 add_dataloader_idx=False, sync_dist=True)

    @torch.no_grad()
    def generate(self, batch: dict[str, Any]) -> list[str]:
        """Greedy answers to the batch's prompts (``prompt_ids`` left-padded, ending in the generation prompt)."""
        inp = self._inputs(batch, "prompt_ids", "prompt_mask", None)
        eos = [self.tokenizer.eos_token_id]
        out = self.llm.generate(**inp, max_new_tokens=self.max_new_tokens, do_sample=False, eos_token_id=eos,
                                pad_token_id=self.tokenizer.pad_token_id)
        return [s.strip() for s in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def _rows(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        answers = self.generate(batch)
        rows = []
        for i, a in enumerate(answers):
            meta = batch["meta"][i]
            rows.append({"subject": int(batch["subject"][i]), "stimulus": int(batch["stimulus"][i]),
                         "trial": int(batch["trial"][i]), **meta, "prediction": a})
        return rows

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.condition_metrics(dataloader_idx, self._build_metrics)["generations"].update(self._rows(batch))

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        return self._rows(batch)

    def on_test_epoch_end(self) -> None:
        log_dir = self.trainer.log_dir  # on every rank: a collective (broadcast) under DDP
        for _, cond, metrics in self.pop_condition_metrics():
            gen = metrics["generations"]
            rows = gen.gather()  # every rank's rows, the samplers' padding dropped (a collective under DDP)
            for r in rows:
                r["condition"] = cond
                r["subject_name"] = self.spec.subject_name(int(r["subject"]))
            scores = gen.score(rows)
            for k, v in scores.items():
                if v is not None:
                    self.log(f"test/{cond}/{k}", float(v), sync_dist=False)
            if self.trainer.is_global_zero and log_dir:
                write_jsonl(Path(log_dir) / f"test_generations_{cond}.jsonl", rows)
                write_json(Path(log_dir) / f"test_scores_{cond}.json", scores)
