"""The job configuration: one dataclass per TOML section, every field typed and defaulted.

The defaults are the embedded debug job (a tiny random-init SD3 on the CPU, JPEG reward, on-policy
updates; train_configs/debug_cpu.toml spells it out); the recipes in train_configs/ set the reference's
values for real models (train_configs/shapes_grpo.toml: the shapes demo). Allowed values
for string fields are declared next to the field with `choices(...)`, so validation and the error
messages come from the same place as the definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field


# Fields whose right value depends on the weights are "auto" (None) until config.manager fills them from
# the model family (models/registry.py: ModelSpec.config_defaults).
AUTO = (
    "; auto (the default) = the family's published pipeline default with model.pretrained_path, the debug "
    "job's value for a random-init flavor"
)


def choices(default, *allowed, help: str = ""):
    """A field whose value must be one of `allowed` (checked by config.manager)."""
    return field(default=default, metadata={"choices": allowed, "help": help})


def doc(default, help: str, **kw):
    if callable(default):
        return field(default_factory=default, metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class Job:
    config_file: str = doc("", "TOML file this job was loaded from")
    run_name: str = doc("debug_cpu", "name of the run; outputs go to <output_dir>/<run_name>")
    output_dir: str = doc("outputs", "root folder for all runs")
    seed: int = doc(42, "global seed; each rank derives its own streams from it")
    description: str = doc("", "free text shown in the logs")


@dataclass
class Model:
    name: str = choices("sd3", "sd3", "flux", "qwen_image", "bagel", "wan", help="model family")
    flavor: str = doc("debug", "named hyper-parameter set from the family's args.py (used when pretrained_path is empty)")
    pretrained_path: str = doc("", "local diffusers pipeline directory (or the family's native directory); empty = random-init flavor")
    dtype: str = choices("float32", "float32", "bfloat16", "float16", help="dtype of the trained (master) weights")
    compute_dtype: str = choices("float32", "float32", "bfloat16", "float16", help="dtype of the forward pass (FSDP mixed-precision param dtype)")
    encoder_dtype: str = choices("float32", "float32", "bfloat16", "float16", help="dtype of frozen text encoders")
    vae_dtype: str = choices("float32", "float32", "bfloat16", "float16", help="dtype of the frozen VAE")
    resolution: int | None = doc(
        None, "image height and width in pixels (video families: the height; Bagel edits keep the source's aspect "
        "ratio: longest side at most this, shortest at least half of it)" + AUTO
    )
    width: int | None = doc(
        None,
        "width in pixels; image families make square images, so it must equal model.resolution; auto = "
        "model.resolution for image families, the pipeline's width for video families",
    )
    num_frames: int | None = doc(
        None,
        "frames of a generated video (Wan: 4k+1; 1 for image families); auto = the video pipeline's default "
        "(Wan: 81) with model.pretrained_path, the debug job's value for a random-init flavor",
    )
    max_sequence_length: int | None = doc(None, "T5/LLM text tokens (the reference uses 128 for SD3 training)" + AUTO)
    condition_size: str = choices(
        "resolution", "resolution", "native", "preferred",
        help="editing (FLUX.1-Kontext, Qwen-Image-Edit): the size the source image is resized to before it becomes "
        "condition tokens: resolution = model.resolution square (Kontext: the reference's rule; Qwen-Image-Edit: that "
        "area at the source's aspect), native = its own size floored to 16 px (Qwen: its own area, sides multiples "
        "of 32), preferred = diffusers' default, ~1 MP at the source's aspect (Qwen-Image-Edit: the reference's rule)",
    )
    attention_backend: str = choices(
        "auto", "auto", "flash", "flex", "sdpa",
        help="packed-sequence attention (Bagel): flash = flash-attn varlen (CUDA, bf16/fp16, the [gpu] extra), flex = "
        "FlexAttention with a block mask per sequence layout, sdpa = one SDPA call per sequence; auto = flash when "
        "installed on CUDA, else flex on CUDA, else sdpa",
    )
    trainable: str = choices(
        "all", "all", "gen_expert",
        help="which weights train: all, or only Bagel's generation expert (its MoT gen weights, as the reference)",
    )


@dataclass
class Sampling:
    num_steps: int | None = doc(None, "denoising steps during rollout" + AUTO)
    guidance_scale: float | None = doc(None, "CFG scale during rollout (<= 1 disables CFG)" + AUTO)
    noise_level: float = doc(1.0, "SDE noise level a (\"wan\": its noise is a sigma_1 sigma; the reference's is a = 1)")
    sde_type: str = choices(
        "sde", "sde", "cps", "wan",
        help="stochastic step used inside the SDE window: sde (Flow-GRPO), cps (coefficients-preserving), wan "
        "(flow_grpo's Wan2.1 step: noise sigma_1 sigma, exact Gaussian KL)",
    )
    negative_prompt: str = doc("", "prompt of the unconditional CFG branch")
    num_image_per_prompt: int = doc(8, "group size G")
    batch_size: int = doc(8, "prompts (with repeats) per rank per sampling round (B)")
    num_batches_per_epoch: int = doc(1, "sampling rounds per epoch (n_b)")
    same_latent: bool = doc(True, "all members of a group start from the same initial noise")
    sde_window_size: int = doc(0, "Flow-GRPO-Fast: number of SDE steps (0 = SDE on every step)")
    sde_window_range: list = doc(lambda: [0, 10], "Flow-GRPO-Fast: [lo, hi) range the window is placed in")
    branch_prefix: bool = doc(
        False,
        "legacy Flow-GRPO-Fast: the members of a group share one ODE prefix up to the window (initial noise per "
        "prompt, prefix run once per distinct prompt on each rank) and branch into independent SDE steps there",
    )
    cfg_interval: list = doc(lambda: [0.0, 1.0], "Bagel: CFG applies only where lo < sigma <= hi")
    image_guidance_scale: float = doc(1.0, "Bagel editing: image CFG scale (<= 1 disables)")
    cfg_renorm_min: float = doc(0.0, "Bagel: guided velocity is rescaled by clamp(|v_cond|/|v_cfg|, min, 1) per sample (1 disables)")


@dataclass
class RL:
    algorithm: str = choices(
        "grpo", "grpo", "awm", "dpo", "online_dpo", "sft", "online_sft", "supervised",
        help="grpo (Flow-GRPO, -Fast, GRPO-Guard); awm (GRPO's advantages on the flow-matching loss); dpo / sft: rollouts from the frozen initial policy; "
        "online_dpo / online_sft: that reference policy follows the trained one (rl.ref_update_interval); "
        "supervised: offline flow matching on data.path's (prompt, image) records (pretraining, SFT before RL)",
    )
    caption_dropout: float = doc(
        0.0, "supervised: probability that a caption is replaced by sampling.negative_prompt, so CFG has an "
        "unconditional model to sample with",
    )
    clip_range: float = doc(1e-4, "PPO clip range epsilon")
    adv_clip_max: float = doc(5.0, "advantages are clipped to [-adv_clip_max, adv_clip_max]")
    beta: float = doc(0.0, "weight of the KL to the reference policy (0 = no reference model)")
    timestep_fraction: float = doc(0.99, "train the first floor(T * fraction) steps")
    global_std: bool = doc(True, "normalise advantages by the std of all rewards instead of the group's")
    per_prompt_stat_tracking: bool = doc(True, "advantages relative to the prompt's group mean")
    train_cfg: bool = doc(True, "use the same CFG as rollout in the training forward")
    num_inner_epochs: int = doc(1, "passes over each epoch's collected data")
    ref_update_interval: int = doc(
        1,
        "online_dpo / online_sft: the reference policy (it samples the rollouts and anchors the DPO loss) is set "
        "to the trained policy every this many optimizer steps (the reference's ref_update_step; its example: 40)",
    )
    fm_sigma_min: float = doc(
        0.0,
        "awm / dpo / sft / supervised: > 0 draws the flow-matching loss's noise level uniformly from the schedule's "
        "levels >= this value (the high ones, where the composition is decided) instead of logit-normal over all",
    )
    dpo_beta: float = doc(100.0, "Flow-DPO: beta in -log sigmoid(-beta/2 ((e_w - e_w_ref) - (e_l - e_l_ref)))")
    ratio_norm: bool = doc(
        False, "GRPO-Guard RatioNorm: log-ratio <- S (log-ratio + b), b = mean (mu - mu_old)^2 / (2 S^2) per sample"
    )
    ratio_norm_batch_bias: bool = doc(
        False, "GRPO-Guard: average b over the batch, as the reference code does by accident (bit-compatible runs)"
    )
    grad_reweight: bool = doc(False, "GRPO-Guard: divide each denoising step's policy loss by its |dt|")


@dataclass
class Lora:
    enable: bool = doc(False, "train low-rank adapters on a frozen base model instead of every weight")
    rank: int = doc(32, "adapter rank r (the reference: SD3 32, FLUX/Qwen-Image/Bagel 64)")
    alpha: float = doc(64.0, "adapter output is scaled by alpha / rank (the reference: 2 * rank)")
    target_modules: list = doc(
        lambda: [
            "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
        ],
        "nn.Linear layers to adapt, by module name or dotted suffix (PEFT's rule); default: SD3's attention",
    )


@dataclass
class Optimizer:
    name: str = choices("adamw", "adamw", help="optimizer")
    lr: float | None = doc(
        None,
        "learning rate (constant, as the reference; its recipes use 3e-4 or 1e-4); auto = 3e-4 (the reference's "
        "base config) with model.pretrained_path, 5e-3 for a random-init flavor",
    )
    beta1: float = doc(0.9, "AdamW beta1")
    beta2: float = doc(0.999, "AdamW beta2")
    weight_decay: float = doc(1e-4, "AdamW weight decay")
    eps: float = doc(1e-8, "AdamW epsilon")
    max_grad_norm: float = doc(1.0, "global gradient norm clip (<= 0 disables)")
    implementation: str = choices(
        "fused", "fused", "foreach", "for-loop",
        help="AdamW kernels: fused (one kernel per dtype/device, CUDA and CPU), foreach (batched ops), for-loop "
        "(one op per tensor: with FSDP2's DTensor parameters this is ~9x slower on the debug model)",
    )


@dataclass
class Training:
    steps: int = doc(100, "RL epochs to run (one epoch = rollout of n_b batches + its optimizer updates)")
    gradient_accumulation_steps: int = doc(1, "training batches per optimizer update")
    ema: bool = doc(True, "keep an EMA of the trained weights (used for eval and export)")
    ema_update_interval: int = doc(8, "EMA is updated every this many optimizer steps (reference: 8)")
    ema_max_decay: float = doc(0.9, "EMA decay is min((1+k)/(10+k), ema_max_decay)")
    device: str = choices("auto", "auto", "cpu", "cuda", help="auto = cuda when available")
    deterministic: bool = doc(False, "torch.use_deterministic_algorithms (slower on GPU)")
    on_nonfinite: str = choices(
        "stop", "stop", "skip",
        help="a NaN/inf in rollouts, rewards, advantages, loss, gradient norm or weights: stop with an error naming "
        "it (the checkpoints stay good), or skip that epoch's training / that optimizer step and its EMA update",
    )
    max_nonfinite_skips: int = doc(3, "with on_nonfinite = skip: stop after this many skips in a row (a diverging run)")
    kernel_backend: str = choices(
        "auto", "auto", "triton", "torch",
        help="fused RL ops (kernels/): auto = Triton on CUDA tensors, the PyTorch reference elsewhere; "
        "triton on CPU tensors needs TRITON_INTERPRET=1",
    )


@dataclass
class Parallelism:
    data_parallel_shard_degree: int = doc(-1, "FSDP shard degree (-1 = all ranks not used by replicate)")
    data_parallel_replicate_degree: int = doc(1, "HSDP replicate degree")
    fsdp_reshard_after_forward: str = choices(
        "default", "default", "always", "never",
        help="free gathered weights after forward: default = every block but the last (needed again by backward) "
        "and not the root; always = lowest memory; never = no re-gather in backward (ZeRO-2 like)",
    )
    mixed_precision_reduce: str = choices(
        "float32", "float32", "bfloat16", help="dtype of the gradient reduce-scatter (params use model.compute_dtype)"
    )
    fsdp_cpu_offload: bool = doc(False, "keep sharded params, grads and optimizer state in CPU memory (CUDA only)")
    reference_placement: str = choices(
        "shard", "shard", "replicate",
        help="frozen reference policy (rl.beta > 0): shard it with FSDP2 like the policy, or keep a full copy in "
        "model.compute_dtype on every rank (no all-gathers in its forward, more memory)",
    )
    encoder_placement: str = choices(
        "replicate", "replicate", "shard",
        help="frozen text encoders (e.g. SD3's T5-XXL, 4.8 B): a full copy on every rank, or sharded with FSDP2 "
        "layer by layer (memory / shard degree, one all-gather per layer when prompts are encoded)",
    )
    backend: str = choices("auto", "auto", "nccl", "gloo", help="auto = nccl on CUDA, gloo on CPU")
    timeout_seconds: int = doc(600, "collective timeout; a hung rank fails the job after this")


@dataclass
class ActivationCheckpoint:
    mode: str = choices("none", "none", "full", "selective")
    selective_every_n_blocks: int = doc(2, "with mode=selective, checkpoint every n-th block")


@dataclass
class Compile:
    enable: bool = doc(False, "torch.compile each transformer block")


@dataclass
class Checkpoint:
    enable: bool = doc(True, "save DCP checkpoints (and resume from the newest complete one)")
    folder: str = doc("checkpoint", "subfolder of the run directory")
    interval: int = doc(25, "save every this many epochs")
    keep_latest_k: int = doc(3, "keep only the newest k checkpoints (0 = keep all)")
    async_mode: str = choices("disabled", "disabled", "async")
    load_step: int = doc(-1, "resume from this step (-1 = the latest complete checkpoint)")


@dataclass
class Metrics:
    log_freq: int = doc(1, "log scalars every this many epochs")
    enable_tensorboard: bool = doc(True, "write TensorBoard events under <run>/tb")
    image_log_freq: int = doc(10, "log an image grid every this many epochs (0 = never)")
    num_log_images: int = doc(8, "images in the logged grid")


@dataclass
class Reward:
    fns: dict = doc(lambda: {"jpeg_compressibility": 1.0}, "reward name -> weight (weight 0 = logged only)")
    model_paths: dict = doc(dict, "reward name -> local model directory or file")
    device: str = doc("", "device of the reward models (empty = the trainer's device)")
    urls: dict = doc(
        lambda: {
            "geneval": "http://127.0.0.1:18085",
            "deqa": "http://127.0.0.1:18086",
            "unifiedreward": "http://127.0.0.1:17140/v1",
        },
        "reward name -> server URL; geneval/deqa/unifiedreward always use theirs, any other listed name is "
        "scored by titan_flow's reward server at that URL (e.g. http://host:18090/pickscore)",
    )
    timeout_seconds: float = doc(120.0, "timeout of one reward-server request")
    max_retries: int = doc(30, "retries of a failed reward-server request before the job fails (nothing is scored 0)")
    retry_backoff_seconds: float = doc(1.0, "wait before the first retry; doubles each retry, capped at 60 s")
    options: dict = doc(dict, "reward name -> table of keyword options, e.g. {ocr = {backend = \"rapidocr\"}}")


@dataclass
class Data:
    path: str = doc(
        "",
        "dataset folder (with train.txt/test.txt or *_metadata.jsonl); empty = built-in debug prompts; "
        "builtin:counting_edit = a built-in counting-edit set with drawn source images (debug jobs of edit models)",
    )
    format: str = choices("auto", "auto", "text", "geneval", help="auto = jsonl -> geneval, txt -> text")
    train_split: str = doc("train", "split used for training")
    image_key: str = doc(
        "image",
        "jsonl field holding each record's image path, relative to data.path (the source image of an edit set such "
        "as counting_edit); '' ignores images",
    )
    num_workers: int = doc(
        2, "data loader worker processes per rank that read and decode images (datasets without images use none)"
    )
    test_split: str = doc("test", "split used for eval")


@dataclass
class Eval:
    freq: int = doc(25, "evaluate every this many epochs (0 = never)")
    num_steps: int | None = doc(None, "ODE steps during eval (the reference: 40 for SD3)" + AUTO)
    guidance_scale: float | None = doc(None, "CFG scale during eval" + AUTO)
    batch_size: int = doc(8, "prompts per rank per eval batch")
    max_prompts: int = doc(0, "evaluate on at most this many test prompts (0 = all)")
    at_end: bool = doc(
        False, "also evaluate the final weights after the last epoch (logged at step training.steps; works with "
        "eval.freq = 0, and with training.steps = 0 it evaluates the initial weights)",
    )


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    sampling: Sampling = field(default_factory=Sampling)
    rl: RL = field(default_factory=RL)
    lora: Lora = field(default_factory=Lora)
    optimizer: Optimizer = field(default_factory=Optimizer)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    reward: Reward = field(default_factory=Reward)
    data: Data = field(default_factory=Data)
    eval: Eval = field(default_factory=Eval)
