"""SimpleTuner 4.x compatibility tables: the names it uses for the options Relay implements, and the
options Relay deliberately does not implement, with the reason and what to do instead.

Facts from SimpleTuner 4.10.1 (its field registry and cmd_args.py): the current key names, their
legacy aliases, value aliases it normalises, and its defaults. Relay's own defaults live on the
TrainConfig fields; DEFAULT_DIFFERENCES lists where they deliberately differ, and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KEY_ALIASES: dict[str, str] = {
    "checkpointing_steps": "checkpoint_step_interval",  # SimpleTuner 4.x's legacy alias
    "validation_steps": "validation_step_interval",  # SimpleTuner 4.x's legacy alias
    "save_total_limit": "checkpoints_total_limit",  # SimpleTuner's legacy alias
    "flux_schedule_shift": "flow_schedule_shift",  # the seed's model card spells it so
}
"""Legacy or upstream key names and the key each one sets."""

NEGATED_ALIASES: dict[str, str] = {"vae_cache_preprocess": "vae_cache_ondemand"}
"""Legacy booleans that set the opposite of a current key (vae_cache_preprocess=false means on demand)."""

VALUE_ALIASES: dict[str, dict[str, str]] = {
    "lr_scheduler": {"cosine_with_warmup": "cosine"},  # as SimpleTuner normalises it
    "optimizer": {"adam_bfloat16": "adamw_bf16", "torch-adamw": "adamw"},
}
"""Values SimpleTuner accepts under another name, per key: written -> what Relay runs."""

MODEL_FLAVOURS: dict[str, str] = {
    "medium": "stabilityai/stable-diffusion-3.5-medium",
    "large": "stabilityai/stable-diffusion-3.5-large",
}
"""SimpleTuner's sd3 flavours and the Hub model each one names."""

# ---------------------------------------------------------------- refused options

_ALTERNATIVES = {
    "accelerate": "Relay distributes with Ray Train; set workers and strategy (ddp or deepspeed) in cluster.json",
    "arch": "Relay trains a LyCORIS LoKr adapter on the SD3 transformer only",
    "attention": "Relay uses diffusers' attention (PyTorch scaled_dot_product_attention picks the fastest kernel)",
    "cache": "Relay keeps its VAE and text-embedding caches where multidatabackend.json says (cache_dir_vae, "
    "the text_embeds backend's cache_dir)",
    "dataset": "set it on the dataset's entry in multidatabackend.json",
    "eval": "Relay scores validation renders with evaluation_type clip; it has no evaluation-loss pass",
    "lora": "Relay's adapter is shaped by the LyCORIS config file (lycoris_config)",
    "loss": "Relay trains SD3's flow-matching objective: logit-normal sigmas shifted by flow_schedule_shift, "
    "plain MSE on noise - latents",
    "memory": "Relay keeps the quantized base and the adapter on the accelerator; use base_model_precision "
    "int8-quanto and gradient_checkpointing to save memory",
    "model": "Relay loads the whole SD3 pipeline from pretrained_model_name_or_path",
    "noise": "Relay's noise is plain Gaussian noise on the flow-matching path",
    "optimizer": "Relay builds the optimizer from --optimizer with SimpleTuner's defaults for it",
    "publish": "Relay publishes through hub_model_id, push_to_hub and push_checkpoints_to_hub",
    "quant": "Relay quantizes the base with base_model_precision int8-quanto; the text encoders and VAE only "
    "build the caches and are freed before training",
    "schedule": "Relay decides the run's length with max_train_steps or num_train_epochs",
    "text": "Relay never trains the text encoders: their outputs are cached once",
    "tracker": "Relay reports to Weights & Biases (report_to wandb) and to webhooks (webhook_config)",
    "validation": "Relay renders validation_prompt (and the prompt library / file) on its validation actors",
    "checkpoint": "Relay checkpoints every checkpoint_step_interval steps and keeps checkpoints_total_limit",
    "uncond": "a dropped caption uses the empty prompt's cached embeddings (SimpleTuner's empty_string)",
}

_REFUSED_KEYS: dict[str, str] = {
    "accelerate": "accelerate_config deepspeed_config fsdp_enable fsdp_version fsdp_reshard_after_forward "
    "fsdp_state_dict_type fsdp_cpu_ram_efficient_loading fsdp_auto_wrap_policy fsdp_limit_all_gathers "
    "fsdp_cpu_offload fsdp_activation_checkpointing fsdp_transformer_layer_cls_to_wrap "
    "context_parallel_size context_parallel_comm_strategy find_unused_parameters num_processes "
    "num_machines accelerate_extra_args main_process_ip main_process_port machine_rank same_network "
    "dynamo_backend dynamo_mode dynamo_fullgraph dynamo_dynamic dynamo_use_regional_compilation "
    "local_rank seed_for_each_device max_workers torch_num_threads",
    "arch": "controlnet controlnet_model_name_or_path controlnet_custom_config control tread_config "
    "diffusion_blocks_config prediction_type rescale_betas_zero_snr slider_lora_target "
    "refiner_training refiner_training_invert_schedule refiner_training_strength distillation_method "
    "distillation_config",
    "attention": "attention_mechanism sla_config sageattention_usage",
    "cache": "cache_dir cache_dir_text cache_dir_vae text_cache_ondemand text_cache_disable text_embed_full_cache "
    "vae_cache_disable vae_cache_scan_behaviour write_batch_size read_batch_size text_encoder_batch_size "
    "enable_multiprocessing image_processing_batch_size keep_vae_loaded vae_dtype vae_enable_slicing "
    "vae_enable_tiling",
    "dataset": "caption_strategy instance_prompt parquet_caption_column parquet_filename_column "
    "maximum_image_size target_downsample_size prepend_instance_prompt only_instance_prompt "
    "preserve_data_backend_cache override_dataset_config aspect_bucket_disable_rebuild "
    "data_backend_sampling ignore_missing_files delete_unwanted_images max_upscale_threshold "
    "allow_dataset_oversubscription enable_nsfw_check",
    "eval": "num_eval_images eval_steps_interval eval_epoch_interval eval_timesteps eval_dataset_pooling "
    "eval_loss_disable eval_dataset_id pretrained_evaluation_model_name_or_path",
    "lora": "lora_dropout lora_init_type peft_lora_mode peft_lora_target_modules use_dora init_lokr_norm "
    "init_lora_ema lora_format assistant_lora_path assistant_lora_strength",
    "loss": "snr_gamma use_soft_min_snr loss_type huber_schedule huber_c masked_loss_probability "
    "flow_sigmoid_scale flow_use_uniform_schedule flow_use_beta_schedule flow_beta_schedule_alpha "
    "flow_beta_schedule_beta flow_schedule_auto_shift flow_custom_timesteps timestep_bias_strategy "
    "timestep_bias_begin timestep_bias_end timestep_bias_multiplier timestep_bias_portion "
    "training_scheduler_timestep_spacing weighting_scheme diff2flow_enabled crepa_enabled "
    "twinflow_enabled scheduled_sampling_max_step_offset",
    "memory": "ema_device ema_cpu_only ema_foreach_disable ema_warmup_steps gradient_checkpointing_backend "
    "gradient_checkpointing_offload_attention gradient_checkpointing_offload_prefetch "
    "gradient_checkpointing_offload_pin_memory_max_buckets offload_during_startup ramtorch musubi_blocks_to_swap "
    "accelerator_cache_clear_interval unet_attention_slice set_grads_to_none disable_tf32 "
    "offload_during_save delete_model_after_load gradient_precision",
    "model": "pretrained_vae_model_name_or_path pretrained_transformer_model_name_or_path "
    "pretrained_transformer_subfolder pretrained_unet_model_name_or_path pretrained_unet_subfolder "
    "pretrained_t5_model_name_or_path revision variant trust_remote_code t5_padding "
    "tokenizer_max_length",
    "noise": "noise_offset noise_offset_probability input_perturbation input_perturbation_steps offset_noise",
    "optimizer": "optimizer_config adam_beta1 adam_beta2 adam_epsilon adam_weight_decay optimizer_beta1 "
    "optimizer_beta2 optimizer_cpu_offload_method optimizer_offload_gradients fuse_optimizer "
    "optimizer_release_gradients prodigy_steps lr_scale lr_scale_sqrt lr_num_cycles "
    "use_8bit_adam use_prodigy_optimizer use_adafactor_optimizer adam_bfloat16",
    "publish": "publishing_config post_checkpoint_script post_upload_script push_to_hub_background "
    "model_card_safe_for_work model_card_note model_card_base_model modelspec_comment "
    "model_card_private",
    "quant": "text_encoder_1_precision text_encoder_2_precision text_encoder_3_precision quantization_config "
    "quantize_activations",
    "schedule": "strict_epoch_limit ignore_final_epochs checkpoint_epoch_interval checkpointing_rolling_steps "
    "checkpoints_rolling_total_limit checkpointing_use_tempdir disk_low_threshold disk_low_action "
    "disk_low_script",
    "text": "train_text_encoder text_encoder_lr freeze_encoder_before freeze_encoder_after freeze_encoder_strategy "
    "layer_freeze_strategy fully_unload_text_encoder save_text_encoder text_encoder_limit",
    "tracker": "logging_dir custom_tracker tracker_image_layout",
    "validation": "num_validation_images validation_epoch_interval validate_after_step validate_after_epoch "
    "validation_preview validation_preview_steps validation_image_format validation_image_quality "
    "validation_on_startup validation_method validation_external_script validation_using_datasets "
    "validation_randomize validation_multigpu validation_noise_scheduler validation_num_video_frames "
    "validation_seed_source enable_watermark validation_adapter_path validation_adapter_name "
    "validation_adapter_strength validation_adapter_mode validation_adapter_config "
    "user_prompt_library validation_input inference_scheduler_timestep_spacing "
    "validation_disable_unconditional",
    "checkpoint": "delete_invalid_checkpoints",
}

_REFUSED_MORE = {
    "accelerate": "aspect_bucket_worker_count aws_max_pool_connections dataloader_prefetch "
    "dataloader_prefetch_qlen dataloader_prefetch_device_threshold_mb metadata_update_interval",
    "dataset": "conditioning_multidataset_sampling disable_multiline_split data_aesthetic_score delete_nsfw_images "
    "framerate max_grounding_entities",
    "loss": "soft_min_snr_sigma_data snr_weight flow_cubic_schedule_weights flow_timesteps_mode "
    "disable_segmented_timestep_sampling audio_flow_schedule_shift",
    "memory": "offload_param_path",
    "model": "pretrained_gemma_model_name_or_path pretrained_grounding_model_name_or_path qwen_text_encoder_model_name_or_path",
    "lora": "disable_assistant_lora",
    "uncond": "sd3_clip_uncond_behaviour sd3_t5_uncond_behaviour",  # SimpleTuner's sd3 model registry
    "tracker": "print_filenames print_sampler_statistics debug_aspect_buckets debug_dataset_loader "
    "webhook_reporting_interval i_know_what_i_am_doing merge_environment_config configs_dir",
    "validation": "validation_external_background validation_internal_guidance_scale validation_stitch_input_location",
}

REFUSED: dict[str, str] = {
    key: reason for table in (_REFUSED_KEYS, _REFUSED_MORE) for reason, keys in table.items() for key in keys.split()
}
"""SimpleTuner options Relay does not implement -> the group whose alternative the refusal names."""

REFUSED_PREFIXES: dict[str, str] = {
    **dict.fromkeys(
        (
            "crepa_",
            "urepa_",
            "irepa_",
            "xm_",
            "nextlat_",
            "layersync_",
            "twinflow_",
            "internal_guidance_",
            "scheduled_sampling_",
            "mixflow_",
            "diff2flow_",
        ),
        "loss",
    ),
    **dict.fromkeys(("ramtorch_", "musubi_"), "memory"),  # gradient_checkpointing_interval/_segment_stride are built
    "sdnq_": "quant",
    "vae_enable_": "cache",
    "dynamo_": "accelerate",
    "fsdp_": "accelerate",
    "audio_": "dataset",
    "nsfw_check_": "dataset",
    "assistant_lora_": "lora",
    "singlora_": "lora",
    "validation_adapter_": "validation",
}
"""Families of SimpleTuner options, by name prefix (its regularisers, offloading, quantizers...)."""


def refused_group(key: str) -> str | None:
    """The group of a SimpleTuner option Relay does not implement, or None."""
    if key in REFUSED:
        return REFUSED[key]
    return next((group for prefix, group in REFUSED_PREFIXES.items() if key.startswith(prefix)), None)


MATCHES_RELAY: dict[str, tuple[Any, ...]] = {
    "controlnet": (False,),
    "train_text_encoder": (False,),
    "use_dora": (False,),
    "num_validation_images": (1,),
    "validation_disable_unconditional": (True,),
    "attention_mechanism": ("diffusers",),
    "use_8bit_adam": (False,),
    "ema_cpu_only": (False,),
    "disable_tf32": (False,),
    "noise_offset": (0, 0.0),
    "input_perturbation": (0, 0.0),
    "snr_gamma": (None,),
    "lora_dropout": (0, 0.0),
    "validation_noise_scheduler": (None, "flow_matching"),
    "vae_cache_disable": (False,),
    "text_cache_ondemand": (False,),
    "validation_randomize": (False,),
    "num_eval_images": (0,),
    "eval_steps_interval": (None, 0),
    "fsdp_enable": (False,),
    "sd3_clip_uncond_behaviour": ("empty_string",),
    "sd3_t5_uncond_behaviour": (None, "empty_string"),
}
"""A refused option set to the value that is what Relay does anyway is accepted (and logged as such)."""

REFUSED_VALUES: dict[str, dict[Any, str]] = {
    "model_type": {"full": "Relay trains an adapter on a frozen base; full fine-tuning is not built"},
    "lora_type": {
        "standard": "Relay trains LyCORIS adapters; set lora_type lycoris and point lycoris_config at "
        "a LoKr config (SimpleTuner's examples ship several)"
    },
    "mixed_precision": {
        "fp16": "fp16 autocast needs loss scaling, which Relay does not do; SD3.5 trains in bf16: use mixed_precision bf16",
        "fp8": "use mixed_precision bf16 with base_model_precision int8-quanto",
    },
    "base_model_precision": {
        name: "Relay quantizes with optimum-quanto only: use base_model_precision int8-quanto (int8 weights) or no_change"
        for name in (
            "int8-torchao",
            "int4-torchao",
            "fp8-torchao",
            "nf4-bnb",
            "int4-quanto",
            "int2-quanto",
            "fp8-quanto",
            "fp8uz-quanto",
            "int8-sdnq",
            "uint8-sdnq",
        )
    },
    "quantize_via": {"pipeline": "use quantize_via cpu or accelerator with base_model_precision int8-quanto"},
    "lr_scheduler": {
        "sine": "SimpleTuner's sine restarts are not built: use cosine, polynomial, linear or constant_with_warmup",
        "cosine_with_restarts": "use cosine, polynomial, linear or constant_with_warmup",
    },
    "resolution_type": {"area": "use resolution_type pixel_area with resolution as an edge in pixels (1 megapixel: 1024)"},
    "report_to": {
        name: "Relay reports to wandb, or none"
        for name in ("tensorboard", "swanlab", "comet_ml", "custom-tracker", "simpletuner", "all")
    },
}
"""Values of implemented keys that Relay deliberately refuses -> the reason and alternative."""

FAMILIES_WORDS = "it trains Stable Diffusion 3.x (model_family sd3) LyCORIS adapters only"


def refused_problem(key: str, shown: str) -> str:
    """The one line for a SimpleTuner option Relay does not implement."""
    return f"SimpleTuner option {shown} is not supported by Terminus Relay: {_ALTERNATIVES[refused_group(key)]}"


def refused_value_problem(key: str, value: Any, shown: str) -> str | None:
    reasons = REFUSED_VALUES.get(key, {})
    if isinstance(value, str) and value.strip().lower() in reasons:
        return f"SimpleTuner option {shown}={value!r} is not supported by Terminus Relay: {reasons[value.strip().lower()]}"
    return None


def _plain(value: Any) -> Any:
    """'false' -> False, '1' -> 1.0, as SimpleTuner reads flags and numbers written as text."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    words = {"true": True, "false": False, "none": None, "null": None, "": None}
    if text in words:
        return words[text]
    try:
        return float(text)
    except ValueError:
        return text


def matches_relay(key: str, value: Any) -> bool:
    """Whether a refused option is set to what Relay does anyway ('false' and False alike)."""
    value = _plain(value)
    return any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in MATCHES_RELAY.get(key, ()))


# ---------------------------------------------------------------- defaults

DEFAULT_DIFFERENCES: dict[str, tuple[str, str]] = {
    "model_family": ("none (the key is required)", "Relay trains SD3 only"),
    "model_type": ("'full'", "Relay trains adapters only; full fine-tuning is refused when asked for"),
    "lora_type": ("'standard' (PEFT LoRA)", "Relay trains LyCORIS adapters; standard is refused when asked for"),
    "output_dir": ("'simpletuner-results'", "the folder's name only; it changes nothing that trains"),
    "seed": (
        "none (a new random seed each start)",
        "a resumed run must draw the same noise and data order as an uninterrupted one",
    ),
    "tracker_project_name": ("'simpletuner'", "left unset, W&B uses its own default project"),
    "tracker_run_name": (
        "'simpletuner-testing'",
        (
            "the run name also names the Ray run and the exported files: it defaults to "
            "output_dir's folder name so two runs never share one"
        ),
    ),
}
"""Relay's deliberate default differences: key -> (SimpleTuner 4.10.1's default, why Relay differs)."""


UNSET_REFUSED_NOTES: dict[str, str] = {
    "attention_mechanism": "--attention_mechanism is not set: Relay uses diffusers' attention (PyTorch SDPA picks "
    "its kernel) where SimpleTuner 4.10.1 defaults to 'kohaku-fa-auto'",
    "validation_disable_unconditional": "--validation_disable_unconditional is not set: Relay renders only the "
    "prompts it is given, where SimpleTuner 4.10.1 adds a render of the empty "
    "prompt at each validation",
}
"""Options Relay does not implement whose SimpleTuner default differs from what Relay does: noted when unset."""


def default_notes(set_keys: set[str], values: Mapping[str, Any]) -> list[str]:
    """A start-up line for each deliberately different default that this config relied on."""
    notes = [note for key, note in UNSET_REFUSED_NOTES.items() if key not in set_keys]
    for key, (theirs, why) in DEFAULT_DIFFERENCES.items():
        if key in set_keys or key not in values:
            continue
        ours = "no value" if values[key] is None else repr(str(values[key]) if hasattr(values[key], "parts") else values[key])
        notes.append(f"--{key} is not set: Relay uses {ours} where SimpleTuner 4.10.1 uses {theirs} ({why})")
    return notes
