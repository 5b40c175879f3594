"""Text-to-image (and image-to-image) generation: text encoder -> latent sampler -> autoencoder decoder.

    pipe = LatentDiffusionPipeline.from_pretrained("runs/ldm-openmoji-32/pipeline")
    pipe.set_scheduler("dpm++")
    image = pipe("a red apple", num_inference_steps=25, generator=torch.Generator().manual_seed(0)).images[0]

The folder is the diffusers layout (model_index.json + vae/, text_encoder/, tokenizer/, unet/,
scheduler/), so a pipeline with a CLIP text encoder also loads in diffusers'
``StableDiffusionPipeline``, and Stable-Diffusion folders load here; a Stable Diffusion XL folder opens as its
sibling ``LatentDiffusionXLPipeline`` (``ldm/sdxl.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import runtime
from autoencoder.latents import denormalize_latents, downsampling_factor, encode_latents
from runtime.errors import InputError
from runtime.files import atomic_dir

from .consistency import guidance_condition
from .folders import check_pipeline_folder, is_xl_index, resolve_dtype
from .guidance import classifier_free_guidance
from .inputs import ImageInput, check_inputs, image_tensor, negative_prompts
from .schedulers import make_scheduler, set_sampling_timesteps, step_kwargs
from .text import TextEmbedding, encode_text, uses_attention_mask
from .unet import unet_downsampling


class LatentDiffusionPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Text-conditioned latent diffusion: any transformers text encoder (CLIP, BERT-like), a
    ``UNet2DConditionModel`` over the latents of an ``AutoencoderKL``, any diffusers scheduler.

    LoRA: ``load_lora_weights(dir)`` reads diffusers' ``pytorch_lora_weights.safetensors`` (U-Net
    and text-encoder adapters); ``cross_attention_kwargs={"scale": s}`` blends it at generation
    time; ``fuse_lora()`` merges it into the weights."""

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
    ) -> None:
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = downsampling_factor(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ---- loading, saving, speed ------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        compile: bool = False,
        **kwargs: Any,
    ) -> LatentDiffusionPipeline:
        """Load a local pipeline folder (ours or a Stable-Diffusion one), safetensors only, no code
        from the folder, then :meth:`prepare_for_inference` with ``dtype``/``device``/``compile``."""
        runtime.configure()  # before any kernel is built: some VMs advertise AMX that traps
        if kwargs.get("custom_pipeline") or kwargs.get("trust_remote_code"):
            raise InputError("custom_pipeline / trust_remote_code run code from the folder; not supported")
        if "torch_dtype" in kwargs:  # the diffusers spelling
            dtype = kwargs.pop("torch_dtype")
        kwargs.setdefault("use_safetensors", True)
        if not Path(path).is_dir():  # a hub id: fetch it first, so the check below sees the files
            fetch = ("cache_dir", "revision", "token", "variant", "use_safetensors", "local_files_only")
            path = cls.download(str(path), **{k: kwargs[k] for k in fetch if k in kwargs})
        index = check_pipeline_folder(path)
        if cls is LatentDiffusionPipeline and is_xl_index(index):  # a Stable Diffusion XL folder: its sibling
            from .sdxl import LatentDiffusionXLPipeline

            return LatentDiffusionXLPipeline.from_pretrained(path, dtype, device, compile, **kwargs)
        pipe = super().from_pretrained(path, **kwargs)
        return pipe.prepare_for_inference(device=device, dtype=dtype, compile=compile)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """The diffusers layout with safetensors weights, written to a temporary folder first and
        swapped into place, so an interrupted save never leaves a half-written pipeline."""
        kwargs.setdefault("safe_serialization", True)
        with atomic_dir(save_directory) as tmp:
            super().save_pretrained(tmp, **kwargs)

    def prepare_for_inference(
        self,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
        channels_last: bool | None = None,
        compile: bool = False,
    ) -> LatentDiffusionPipeline:
        """Move to ``device`` and pick the fast path for it.

        - ``dtype="auto"`` is bf16 where bf16 is faster (see :func:`resolve_dtype`), else fp32. The
          text encoder and U-Net run in it; the autoencoder decodes in fp32 or bf16, never fp16
          (its activations overflow fp16's range).
        - ``channels_last`` (default: on for CUDA and fp32; off for bf16 on a CPU, where it measured slower).
        - ``compile=True`` compiles the U-Net with torch.compile (the first call then takes a while).
        """
        device = torch.device(device) if device is not None else self.device
        dtype = resolve_dtype(dtype, device)
        if channels_last is None:  # measured: bf16 on a CPU runs ~10% faster in the default layout
            channels_last = device.type == "cuda" or dtype == torch.float32
        vae_dtype = torch.float32 if dtype == torch.float16 else dtype
        for module, module_dtype in [*((m, dtype) for m in self.text_encoders), (self.unet, dtype), (self.vae, vae_dtype)]:
            torch.nn.Module.to(module, device=device, dtype=module_dtype)  # not ModelMixin.to: it warns on casts
            module.eval().requires_grad_(False)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.unet.to(memory_format=memory_format)
        self.vae.to(memory_format=memory_format)
        if compile:
            # On a CPU, "freezing" folds the (frozen) weights into the graph so oneDNN can prepack
            # them: ~10% off a U-Net forward in the generation benchmark (94 -> 86 ms, benchmarks/NOTES.md).
            self.unet.compile(options={"freezing": True} if device.type == "cpu" else None)
        return self

    def set_scheduler(self, name: str) -> None:
        """Sample with another algorithm (ddpm, ddim, dpm++, euler, euler-a, heun, unipc) on the
        model's own noise schedule."""
        self.scheduler = make_scheduler(name, self.scheduler.config)

    @property
    def text_encoders(self) -> list:
        return [self.text_encoder]

    @property
    def default_resolution(self) -> int:
        """The resolution the U-Net was trained at: its latent sample size times the autoencoder's factor."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def downsampling(self) -> int:
        """Total downsampling from pixels to the U-Net's deepest level: sizes must divide by it."""
        return total_downsampling(self.vae, self.unet)

    # ---- generation ----------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        image: ImageInput | None = None,
        strength: float = 0.8,
        eta: float = 0.0,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate ``num_images_per_prompt`` images per prompt; with ``image``, start from it
        (img2img): ``strength`` 1 ignores it, towards 0 returns it (through the autoencoder)."""
        # 0. Check every input before any work.
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompts(negative_prompt, len(prompts))
        if image is not None:
            image = image_tensor(image, len(prompts))  # (1 or B, 3, H, W) in [-1, 1]
            asked = (height or image.shape[-2], width or image.shape[-1])
            if asked != tuple(image.shape[-2:]):
                raise InputError(
                    f"image is {image.shape[-2]}x{image.shape[-1]} (HxW) but height/width ask for {asked[0]}x{asked[1]}; "
                    "resize the image or leave height/width unset"
                )
            height, width = image.shape[-2:]
        height, width = height or self.default_resolution, width or self.default_resolution
        batch = len(prompts) * num_images_per_prompt
        check_inputs(
            self, prompts, num_inference_steps, height, width, num_images_per_prompt, output_type, strength, generator, batch
        )
        device = self._execution_device
        timestep_cond = guidance_condition(self.unet, guidance_scale, batch, device)  # a few-step student's: no CFG pass
        do_cfg = guidance_scale > 1.0 and timestep_cond is None

        # 1. Encode the prompts (and, for guidance, the negative/empty prompts in the same batch): the U-Net's
        #    text keyword arguments, rows [negative x (B*n), prompt x (B*n)] with guidance, [prompt x (B*n)] without
        cond = self._condition(
            prompts, negatives, negative_prompt is None, do_cfg, num_images_per_prompt, cross_attention_kwargs, (height, width)
        )

        # 2. Timesteps; img2img skips the first (1 - strength) of them.
        set_sampling_timesteps(self.scheduler, num_inference_steps, device)
        timesteps = self.scheduler.timesteps
        start_from_image = image is not None and strength < 1.0
        if start_from_image:
            skip = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
            timesteps = timesteps[skip * self.scheduler.order :]
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(skip * self.scheduler.order)

        # 3. Initial latents: pure noise, or the image's latent noised to the first timestep:
        #    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (the scheduler's add_noise), or on a flow model's
        #    straight path x = (1 - sigma) x_0 + sigma eps (its scale_noise; DPM++ / UniPC: add_noise with flow sigmas).
        latent_shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        noise = randn_tensor(latent_shape, generator=generator, device=device, dtype=torch.float32)
        if start_from_image:
            x0 = self._encode_image(image, batch)  # (B*n, C, h, w)
            latents = self._noised(x0, noise, timesteps[:1].repeat(batch)) if len(timesteps) else x0
        else:
            latents = noise * getattr(self.scheduler, "init_noise_sigma", 1.0)  # diffusers' flow schedulers: none (1)

        # 4. Denoise: guidance batches the unconditional and conditional predictions in one forward.
        extra = step_kwargs(self.scheduler, generator, eta)
        with self.progress_bar(total=len(timesteps)) as progress:
            for t in timesteps:
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                if hasattr(self.scheduler, "scale_model_input"):  # diffusers' flow schedulers have none
                    model_input = self.scheduler.scale_model_input(model_input, t)
                pred = self.unet(
                    model_input.to(self.unet.dtype),
                    t,
                    **cond,
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=cross_attention_kwargs,
                    return_dict=False,
                )[0].float()
                if do_cfg:
                    pred = classifier_free_guidance(*pred.chunk(2), guidance_scale)  # rows: [negative, prompt]
                latents = self.scheduler.step(pred, t, latents, **extra, return_dict=False)[0]
                progress.update()

        # 5. Decode with the autoencoder's own scaling/shift factor.
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(denormalize_latents(self.vae, latents).to(self.vae.dtype), return_dict=False)[0]
            # 6. Post-process: [-1, 1] -> PIL / numpy / tensor in [0, 1].
            images = self.image_processor.postprocess(decoded.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    # ---- the steps' helpers ------------------------------------------------------------------

    def _condition(self, prompts, negatives, unset_negatives, do_cfg, per_prompt, cross_attention_kwargs, size) -> dict:
        """The U-Net's text keyword arguments; a LoRA scale applies to every text encoder's adapters too, as in Stable
        Diffusion (both helpers leave an encoder without adapters, and a scale of None, alone)."""
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        for encoder in self.text_encoders:
            scale_lora_layers(encoder, lora_scale if lora_scale is not None else 1.0)
        text = self._encode(prompts, negatives if do_cfg else None, unset_negatives)
        for encoder in self.text_encoders:
            unscale_lora_layers(encoder, lora_scale)
        return self._text_kwargs(text, per_prompt, size)

    def _encode(self, prompts: list[str], negatives: list[str] | None, unset_negatives: bool) -> TextEmbedding:
        """The prompts' embedding, rows [negatives, prompts] (``negatives`` None: the prompts only)."""
        return encode_text(self.tokenizer, self.text_encoder, negatives + prompts if negatives is not None else prompts)

    def _text_kwargs(self, text: TextEmbedding, per_prompt: int, size: tuple[int, int]) -> dict:
        """``encoder_hidden_states`` (rows x per_prompt, L, D) and ``encoder_attention_mask``, each row repeated."""
        states = text.states.to(self.unet.dtype).repeat_interleave(per_prompt, dim=0)
        mask = text.mask.repeat_interleave(per_prompt, dim=0) if text.mask is not None else None
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask}

    def _noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if hasattr(self.scheduler, "add_noise"):
            return self.scheduler.add_noise(x0, noise, t)
        return self.scheduler.scale_noise(x0, t, noise)  # FlowMatchEuler / Heun: (1 - sigma) x_0 + sigma noise

    def _encode_image(self, image: torch.Tensor, batch: int) -> torch.Tensor:
        """Image (1 or B, 3, H, W) in [-1, 1] -> normalised latents (B*n, C, h, w), the posterior mean."""
        image = image.to(self._execution_device, self.vae.dtype)
        z = encode_latents(self.vae, image)  # (1 or B, C, h, w), float32
        return z.repeat_interleave(batch // z.shape[0], dim=0)


def total_downsampling(vae: AutoencoderKL, unet: UNet2DConditionModel) -> int:
    """Pixels per latent pixel at the U-Net's deepest level (the autoencoder's factor x the U-Net's): image sizes must
    divide by it."""
    return downsampling_factor(vae) * unet_downsampling(unet)


__all__ = ["LatentDiffusionPipeline", "total_downsampling", "check_pipeline_folder", "resolve_dtype", "uses_attention_mask"]
