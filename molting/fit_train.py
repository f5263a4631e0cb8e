"""Will training fit? Memory of full fine-tuning, LoRA and QLoRA of a model, by term.

``molting fit MODEL --train`` adds up what ``molting.train`` holds at its peak, for one
setup (:class:`TrainSetup`: fine-tuning, LoRA rank, ``max_length``, batch size, activation
checkpointing, device), reading the model's shape with ``molting.fit.load_shape``:

- weights (:func:`weight_bytes`): fp32 for full fine-tuning and LoRA (``train.py`` loads fp32);
  for QLoRA the decoder blocks' linear weights in NF4 with their quantization state
  (:func:`nf4_bytes`), and what stays unquantized (embeddings, ``lm_head``, norms) in fp32,
  since peft's ``prepare_model_for_kbit_training`` casts it up;
- trainable parameters with their gradients and AdamW's two moments (:func:`trainable_bytes`);
- activations kept for the backward pass, per decoder layer, with and without checkpointing
  (:func:`activation_bytes`);
- the loss over the vocabulary (:func:`logits_bytes`): TRL 1.16's ``SFTTrainer`` projects
  through the LM head in tiles (``add_fused_lm_head``) instead of materializing the logits;
- bitsandbytes' dequantized copy of the largest 4-bit weight during its matmul (QLoRA);
- on CUDA, the context and the caching allocator's reserve (:func:`runtime_bytes`).

Two devices, two meanings. ``device="cuda"`` predicts the GPU's memory: the terms as torch's
allocator holds them (``max_memory_allocated``), plus the context and reserve that
``nvidia-smi`` shows besides. ``device="cpu"`` predicts the growth of the training process's
resident memory from before the model loads: no CUDA context, no autocast (activations
stay fp32 where CUDA's bf16 autocast halves them), and the LM head's loss computed by TRL's
torch fallback, which keeps several vocabulary-wide tiles alive where Triton keeps one.
Figures against measurements: ``benchmarks/train_memory.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from molting.errors import ConfigError
from molting.fit import MARGIN, MIB, ModelShape

FINETUNINGS = ("full", "lora", "qlora")
DEVICES = ("cuda", "cpu")
NF4_BLOCK = 64  # weights per absmax (bitsandbytes' default blocksize)
NESTED_BLOCK = 256  # absmaxes per fp32 scale with double quantization (bitsandbytes' blocksize for the nested state)
NF4_CODES_BYTES = 16 * 4 + 256 * 4  # the NF4 code table and the nested state's int8 code table, fp32, per linear
# The CUDA context (driver, kernels, cuBLAS workspace) seen by nvidia-smi beside torch's allocations:
# 250-500 MiB per process on recent cards (molting.fit counts 512 MiB for llama.cpp's buffers).
CUDA_CONTEXT_BYTES = 400 * MIB
# The caching allocator's reserve over its peak allocation (block rounding, fragmentation):
# PyTorch's CUDA memory notes; 10% until benchmarks/gpu_check.py measures it.
ALLOCATOR_RESERVE = 0.10
# TRL 1.16 (trl/kernels/chunked_logprob.py): tiles of TOKEN_CHUNK_SIZE tokens x _CHUNKED_LOGPROB_CHUNK_SIZE
# vocabulary columns, allocated at the full chunk width whatever the vocabulary.
TRL_TOKEN_TILE = 4096
TRL_VOCAB_TILE = 32768
# Vocabulary-wide fp32 tiles alive at once in TRL's torch fallback of the backward tile (no Triton, so the
# CPU): the tile, y, z, log_p, p, grad and the three temporaries of ``grad += g * (is_target - p)``.
CPU_LOSS_TILES = 9


@dataclass(frozen=True)
class TrainSetup:
    """One training configuration to estimate.

    Attributes:
        finetuning: "full" (every weight, fp32), "lora" (fp32 base) or "qlora" (NF4 base).
        r: LoRA rank (ignored for "full").
        max_length: tokens per sequence (the planner assumes every sequence is that long).
        batch_size: sequences per micro-batch (``per_device_train_batch_size``).
        checkpointing: activation checkpointing; None = ``molting.train``'s default (on for QLoRA only).
        device: "cuda" (GPU memory) or "cpu" (resident memory of the process, net of before loading).
        lora_dropout: > 0 makes peft keep a dropped-out copy of each adapted layer's input.
    """

    finetuning: str = "qlora"
    r: int = 16
    max_length: int = 512
    batch_size: int = 1
    checkpointing: bool | None = None
    device: str = "cuda"
    lora_dropout: float = 0.05

    def __post_init__(self) -> None:
        if self.finetuning not in FINETUNINGS:
            raise ConfigError(f"finetuning {self.finetuning!r} not in {FINETUNINGS}")
        if self.device not in DEVICES:
            raise ConfigError(f"device {self.device!r} not in {DEVICES}")
        for name in ("r", "max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def ckpt(self) -> bool:
        """Checkpointing as decided (the default: on exactly for QLoRA, as ``molting.train`` does)."""
        return self.finetuning == "qlora" if self.checkpointing is None else self.checkpointing

    @property
    def tokens(self) -> int:
        return self.batch_size * self.max_length


@dataclass(frozen=True)
class TrainEstimate:
    """Bytes of one setup at its peak, by term (see the module docstring).

    Attributes:
        setup: what was estimated.
        weights: the model's weights (NF4 data and fp32 remainder for QLoRA).
        quant_state: NF4 absmaxes and code tables (0 unless QLoRA).
        trainable_params: number of trained parameters.
        trainable: their values (LoRA: the adapter; full: counted in ``weights``), gradients and AdamW moments.
        activations: what the backward pass needs, every layer (and one recomputed layer with checkpointing).
        logits: the loss over the vocabulary.
        dequant: bitsandbytes' dequantized copy of the largest 4-bit weight (QLoRA).
        runtime: CUDA context and allocator reserve (0 on the CPU).
    """

    setup: TrainSetup
    weights: int
    quant_state: int
    trainable_params: int
    trainable: int
    activations: int
    logits: int
    dequant: int
    runtime: int

    @property
    def allocated(self) -> int:
        """Tensors only: torch's ``max_memory_allocated`` on CUDA, the resident growth on the CPU."""
        return self.weights + self.quant_state + self.trainable + self.activations + self.logits + self.dequant

    @property
    def total(self) -> int:
        return self.allocated + self.runtime

    def rows(self) -> list[tuple[str, int]]:
        """(term, bytes) in table order."""
        return [
            ("weights", self.weights),
            ("NF4 quantization state", self.quant_state),
            (f"trainable ({self.trainable_params / 1e6:.1f}M params) + grads + AdamW", self.trainable),
            (f"activations ({'checkpointed' if self.setup.ckpt else 'all kept'})", self.activations),
            ("loss over the vocabulary", self.logits),
            ("dequantized 4-bit weight", self.dequant),
            ("CUDA context + allocator reserve" if self.setup.device == "cuda" else "CPU: no runtime", self.runtime),
        ]


def estimate_training(shape: ModelShape, setup: TrainSetup) -> TrainEstimate:
    """Peak memory of training ``shape`` with ``setup``, by term (bytes)."""
    weights, quant_state = weight_bytes(shape, setup.finetuning)
    n_trainable, trainable = trainable_bytes(shape, setup)
    allocated = weights + quant_state + trainable
    activations = activation_bytes(shape, setup)
    logits = logits_bytes(shape, setup)
    dequant = 2 * max(t.n_elements for t in _linears(shape)) if setup.finetuning == "qlora" else 0
    allocated += activations + logits + dequant
    return TrainEstimate(
        setup=setup,
        weights=weights,
        quant_state=quant_state,
        trainable_params=n_trainable,
        trainable=trainable,
        activations=activations,
        logits=logits,
        dequant=dequant,
        runtime=runtime_bytes(setup.device, allocated),
    )


def _linears(shape: ModelShape):
    """The decoder blocks' linear weights (2-D tensors of a layer): what QLoRA quantizes and LoRA adapts."""
    return [t for t in shape.tensors if t.layer is not None and len(t.shape) == 2]


def nf4_bytes(n_weights: int, double_quant: bool = True) -> int:
    """Bytes of ``n_weights`` in NF4 with their quantization state, as bitsandbytes stores them.

    4 bits per weight (two per uint8) and one absmax per ``NF4_BLOCK`` weights: fp32, or with
    double quantization (Dettmers et al., 2023, QLoRA, arXiv:2305.14314, section 3) uint8 with an
    fp32 scale per ``NESTED_BLOCK`` absmaxes. Read from ``Params4bit.quant_state`` on
    bitsandbytes 0.50 (the CPU keeps the same dtypes as CUDA). Code tables not included.
    """
    blocks = -(-n_weights // NF4_BLOCK)
    state = blocks + 4 * -(-blocks // NESTED_BLOCK) if double_quant else 4 * blocks
    return n_weights // 2 + state


def weight_bytes(shape: ModelShape, finetuning: str) -> tuple[int, int]:
    """(weights, quantization state) in bytes.

    full, lora: every parameter fp32 (``molting.train`` loads the base in fp32). qlora: each
    decoder linear weight in NF4 (``molting.backends.nf4.load_nf4``), the rest (embeddings, an
    untied ``lm_head``, norms) fp32 after peft's ``prepare_model_for_kbit_training``.
    """
    n_all = sum(t.n_elements for t in shape.tensors)
    if finetuning != "qlora":
        return 4 * n_all, 0
    linears = _linears(shape)
    n_quantized = sum(t.n_elements for t in linears)
    packed = sum(nf4_bytes(t.n_elements) - t.n_elements // 2 for t in linears) + NF4_CODES_BYTES * len(linears)
    return n_quantized // 2 + 4 * (n_all - n_quantized), packed


def lora_parameters(shape: ModelShape, r: int) -> int:
    """Parameters of a rank-``r`` adapter on every decoder linear (``molting.train.LORA_TARGETS``):
    ``r x (in + out)`` per weight (Hu et al., 2021, LoRA, arXiv:2106.09685)."""
    return sum(r * (t.shape[0] + t.shape[1]) for t in _linears(shape))


def trainable_bytes(shape: ModelShape, setup: TrainSetup) -> tuple[int, int]:
    """(trained parameters, bytes of their values, gradients and AdamW moments).

    full: fp32 gradient and two fp32 moments per weight, 12 bytes (the value is in ``weights``).
    lora: the fp32 adapter, its gradient and moments, 16 bytes per parameter. qlora: TRL's
    ``SFTTrainer`` casts the adapter of a 4-bit model to bf16 (QLoRA paper, section 3), and
    torch's AdamW keeps its moments in the parameter's dtype: 8 bytes per parameter.
    """
    if setup.finetuning == "full":
        n = sum(t.n_elements for t in shape.tensors)
        return n, 12 * n
    n = lora_parameters(shape, setup.r)
    return n, (16 if setup.finetuning == "lora" else 8) * n


def layer_activation_bytes(shape: ModelShape, setup: TrainSetup) -> int:
    """Bytes one decoder layer keeps for the backward pass, per token.

    Counted from the tensors autograd saves (``torch.autograd.graph.saved_tensors_hooks``, one
    per storage) in a Llama and a Phi-3 layer of transformers 5.25 with SDPA attention (no
    ``n x n`` scores are kept) and peft 0.21; ``tests/test_fit_train.py`` recounts them. With
    ``h`` the hidden size, ``q``/``kv`` the query and key widths, ``f`` the feed-forward width:

    - the frozen layer: ``2h + 2q + 2kv + 3f`` values (norm inputs, rotated Q and K, V and the
      attention output, the gate, up and activation of the feed-forward);
    - training its weights too (full): ``3h + q + f`` more for Llama, ``4h + q + f`` for Phi-3
      (the linear layers' and norms' inputs for their weight gradients);
    - each adapted linear (LoRA): its input after dropout and the dropout mask (``2 x in``, none
      without dropout: then only the input itself, already counted) and the rank-``r`` hidden,
      in the adapter's dtype (bf16 for QLoRA).

    On CUDA, bf16 autocast keeps everything but the residual stream (``2h``) in bf16.
    """
    h, kv, f = shape.n_embd, shape.n_head_kv * shape.head_dim, shape.n_ff
    q = shape.n_head * shape.head_dim
    act = 2 if setup.device == "cuda" else 4
    frozen = 2 * h * 4 + (2 * q + 2 * kv + 3 * f) * act
    if setup.finetuning == "full":
        return frozen + ((4 if shape.arch == "phi3" else 3) * h + q + f) * act
    layer0 = [t for t in _linears(shape) if t.layer == 0]
    per_input = 2 if setup.lora_dropout > 0 else 0
    adapter_dtype = 2 if setup.finetuning == "qlora" or setup.device == "cuda" else 4
    return frozen + sum(per_input * t.shape[0] + setup.r for t in layer0) * adapter_dtype


def activation_bytes(shape: ModelShape, setup: TrainSetup) -> int:
    """Activations of the whole model at the start of the backward pass, bytes.

    Without checkpointing every layer's saved tensors (:func:`layer_activation_bytes`); with it
    (Chen et al., 2016, arXiv:1604.06174; transformers' ``GradientCheckpointingLayer``) each
    layer keeps only its fp32 input, and one layer at a time is recomputed in full during the
    backward pass. Outside the layers: the final norm's input and output, fp32 (``3h`` per token
    when its weight trains, ``h`` when frozen).
    """
    per_layer = layer_activation_bytes(shape, setup)
    stream = 4 * shape.n_embd
    outside = (3 if setup.finetuning == "full" else 1) * stream
    kept = shape.n_layer * stream + per_layer if setup.ckpt else shape.n_layer * per_layer
    return setup.tokens * (kept + outside)


def logits_bytes(shape: ModelShape, setup: TrainSetup) -> int:
    """The loss over the vocabulary, bytes: TRL 1.16's fused LM head (``add_fused_lm_head``).

    ``SFTTrainer`` never materializes the ``tokens x n_vocab`` logits (fp32 would be
    32,064 x 512 x 4 = 63 MiB per Phi-3 sequence, and their gradient as much again). It multiplies
    tiles of ``TRL_TOKEN_TILE`` tokens against ``TRL_VOCAB_TILE`` vocabulary rows into one
    buffer, folds each tile into running log-sum-exp statistics, and recomputes the tiles in
    the backward pass (``trl/kernels/chunked_logprob.py``):

    - CUDA (Triton kernels): the tile buffer in bf16, allocated ``TRL_VOCAB_TILE`` wide, and the
      bf16 copy of an fp32 ``lm_head`` the projection makes, plus the fp32 gradient of the hidden states;
    - CPU (torch fallback): ``CPU_LOSS_TILES`` fp32 temporaries the size of one tile
      (``tokens x min(n_vocab, TRL_VOCAB_TILE)``) alive in the backward tile; of the wide
      buffer only the touched columns become resident.
    """
    tokens = setup.tokens
    if setup.device == "cpu":
        return CPU_LOSS_TILES * 4 * min(tokens, TRL_TOKEN_TILE) * min(shape.n_vocab, TRL_VOCAB_TILE)
    tile = min(tokens, TRL_TOKEN_TILE) * TRL_VOCAB_TILE * 2
    head_copy = 2 * shape.n_vocab * shape.n_embd
    return tile + head_copy + 4 * tokens * shape.n_embd


def runtime_bytes(device: str, allocated: int) -> int:
    """CUDA: the context (``CUDA_CONTEXT_BYTES``) and the allocator's reserve over ``allocated``
    (``ALLOCATOR_RESERVE``). CPU: 0, the estimate being net of the process before loading."""
    if device == "cpu":
        return 0
    return CUDA_CONTEXT_BYTES + round(ALLOCATOR_RESERVE * allocated)


# --- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainPlan:
    """The planner's answer: the asked setup, its neighbours, and the best setup that fits.

    Attributes:
        asked: the estimate of the setup asked for.
        budget: device memory, bytes (fits: ``total <= (1 - MARGIN) x budget``).
        table: every fine-tuning x checkpointing at the asked length and batch.
        best: the asked setup if it fits, else the closest that does (see :func:`plan_training`);
            None when nothing fits.
        longest: the longest ``max_length`` (a power of two, 128 up to the model's context) that
            fits with ``best``'s other settings; None without ``best``.
        largest_batch: the largest batch (up to 64) that fits with ``best``'s other settings.
    """

    asked: TrainEstimate
    budget: int
    table: tuple[TrainEstimate, ...]
    best: TrainEstimate | None
    longest: int | None
    largest_batch: int | None

    def fits(self, estimate: TrainEstimate) -> bool:
        return estimate.total <= usable(self.budget)


def usable(budget: int) -> int:
    """The part of ``budget`` a plan may fill: ``MARGIN`` is kept for the estimate's own error."""
    return round(budget * (1 - MARGIN))


def plan_training(shape: ModelShape, setup: TrainSetup, budget: int) -> TrainPlan:
    """Estimate ``setup``; if it does not fit ``budget``, find the nearest that does.

    The nearest, in order: the same with checkpointing on; then each cheaper fine-tuning
    (full -> lora -> qlora) with checkpointing on; then, with QLoRA and checkpointing, a batch
    of one and ``max_length`` halved until it fits (not below 128).
    """
    fits = lambda s: estimate_training(shape, s).total <= usable(budget)  # noqa: E731
    candidates = [setup, replace(setup, checkpointing=True)]
    for finetuning in FINETUNINGS[FINETUNINGS.index(setup.finetuning) + 1 :]:
        candidates.append(replace(setup, finetuning=finetuning, checkpointing=True))
    length = setup.max_length
    while length >= 128:
        candidates.append(replace(setup, finetuning="qlora", checkpointing=True, batch_size=1, max_length=length))
        length //= 2
    best = next((s for s in candidates if fits(s)), None)
    longest = largest = None
    if best is not None:
        lengths = [n for n in (2**k for k in range(7, 18)) if n <= max(shape.n_ctx_train, best.max_length)]
        longest = max((n for n in lengths if fits(replace(best, max_length=n))), default=None)
        largest = max((b for b in range(1, 65) if fits(replace(best, batch_size=b))), default=None)
    table = tuple(
        estimate_training(shape, replace(setup, finetuning=ft, checkpointing=ck))
        for ft in FINETUNINGS
        for ck in (False, True)
    )
    return TrainPlan(
        asked=estimate_training(shape, setup),
        budget=budget,
        table=table,
        best=estimate_training(shape, best) if best else None,
        longest=longest,
        largest_batch=largest,
    )


def describe_setup(setup: TrainSetup) -> str:
    """``qlora r=16, max_length 512, batch 1, checkpointing on`` (the flags that give it)."""
    rank = "" if setup.finetuning == "full" else f" r={setup.r}"
    return (
        f"{setup.finetuning}{rank}, max_length {setup.max_length}, batch {setup.batch_size}, "
        f"checkpointing {'on' if setup.ckpt else 'off'}"
    )


def describe_plan(result: TrainPlan) -> list[str]:
    """The verdict and the best plan in words (MiB)."""
    asked, limit = result.asked, usable(result.budget) / MIB
    verdict = "fits" if result.fits(asked) else "does not fit"
    lines = [
        f"{describe_setup(asked.setup)}: {asked.total / MIB:.0f} MiB on {asked.setup.device} "
        f"{verdict} in {limit:.0f} MiB usable ({result.budget / MIB:.0f} MiB less {MARGIN:.0%} margin)"
    ]
    if result.best is None:
        lines.append("nothing fits, not even QLoRA with checkpointing at max_length 128")
        return lines
    if result.best.setup != asked.setup:
        lines.append(f"best plan that fits: {describe_setup(result.best.setup)} ({result.best.total / MIB:.0f} MiB)")
    lines.append(
        f"with those settings: longest max_length {result.longest}, largest batch {result.largest_batch} "
        f"at max_length {result.best.setup.max_length}"
    )
    return lines
