"""Will it fit? Memory of a model under llama.cpp by quantization, KV cache type, context and offload.

For a model (a GGUF file, a Hugging Face model directory or a name of
``molting.models.REFERENCE_CONFIGS``) and a context ``n_ctx``, :func:`estimate` adds up what
llama.cpp allocates, split between the GPU and the CPU by ``n_gpu_layers``:

- weights: every tensor at the ggml type llama.cpp's quantizer gives it for a file type
  (``Q4_K_M`` is a mix: Q6_K for the output and for ``attn_v``/``ffn_down`` of "more bits"
  layers, types falling back where rows are not a multiple of the block; rules read from
  llama.cpp's ``src/llama-quant.cpp``), at the type's bytes per weight
  (``gguf.GGML_QUANT_SIZES``: Q4_K 4.5 bits, Q6_K 6.5625, Q8_0 8.5, Q5_0 5.5, F16 16);
  a GGUF's own file type is read from the file, tensor by tensor;
- KV cache: ``2 x n_layer x n_ctx x n_head_kv x head_dim x bytes`` (f16: 2 bytes, q8_0: 34/32);
  llama.cpp quantizes the V cache only with flash attention;
- compute buffer: the largest set of intermediate tensors in one ubatch of ``n_ubatch``
  tokens (llama.cpp reserves the graph of a full ubatch against the full context): the
  attention scores ``n_head x n_ctx x n_ubatch`` f32 without flash attention, the logits
  ``n_vocab x n_ubatch`` f32, the feed-forward activations; see :func:`compute_bytes`;
- the host: the process itself (Python, llama-cpp-python, ggml: ``HOST_BASE_BYTES``), the
  tokenizer's tables (``TOKENIZER_BYTES`` per token and merge), the logits output buffer;
  on a GPU, ``reserve`` for the CUDA context and allocator pools;
- repacked weights: llama.cpp's CPU backend copies some weights into interleaved layouts
  for its matrix kernels (the ``CPU_REPACK`` buffer, e.g. Q4_K -> q4_K_8x8 on AVX2), a
  second, malloc'ed copy of the same bytes beside the memory-mapped file; see :func:`repacked`.

VRAM counts buffers as allocated. Resident CPU memory (``Estimate.ram``) counts what is
touched: every weight of a memory-mapped file that the CPU computes with (a repacked
tensor's file pages are read to repack it and stay mapped, so it counts twice), the whole
KV cache (llama.cpp clears it), and of the compute buffer only the graph of the longest
prompt actually evaluated (``n_prompt``), with logits for its last token.

Layer placement is llama.cpp's: ``n_gpu_layers = k`` offloads the last ``k`` repeating
layers with their KV cache; ``k = n_layer + 1`` (or -1) also offloads the output layer;
the token embeddings stay on the CPU.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from molting.errors import ConfigError
from molting.models import REFERENCE_CONFIGS, is_hub_id, reference_config, resolve_base

MIB = 2**20
GIB = 2**30
QUANTS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")  # the planner's candidates, most precise first
KV_TYPES = ("f16", "q8_0")
N_UBATCH = 512  # llama.cpp's default physical batch
# Resident memory of a Python process that has imported llama_cpp and numpy, before a model
# is loaded: 48-50 MiB measured on this project's CPU machine (benchmarks/RESULTS.md).
HOST_BASE_BYTES = 50 * MIB
# llama.cpp's vocabulary and merge tables in memory, per entry: 16.6 MiB measured for
# SmolLM2's 49152 tokens and 48900 merges (RSS growth while loading, beyond the tensors).
TOKENIZER_BYTES = 178
# VRAM that llama.cpp's buffers cannot use: the CUDA context, cuBLAS workspace and the
# allocator's pools (nvidia-smi shows 250-500 MiB per process beyond the buffers).
DEFAULT_RESERVE_BYTES = 512 * MIB
# Share of the budget left unplanned, for the estimate's own error: a plan must fit in
# (1 - MARGIN) x vram. The CPU estimates were within 5% of llama.cpp's buffers (RESULTS.md).
MARGIN = 0.05
# The file types' default ggml type (llama.cpp's llama_model_quantize_impl).
BASE_TYPE = {"F16": "F16", "Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_M": "Q5_K", "Q4_K_M": "Q4_K", "Q4_0": "Q4_0"}
# ggml type -> the type used when a row is not a multiple of its block (tensor_type_fallback).
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0"}
# ggml types the CPU backend repacks on an x86-64 CPU with AVX2 (no AMX), for tensors whose
# row count ne[1] is a multiple of REPACK_ROWS: ggml_repack_get_optimal_repack_type in
# ggml/src/ggml-cpu/repack.cpp (llama-cpp-python 0.3.36). Q2_K is repacked with AVX-512 only;
# ARM CPUs (NEON, i8mm) also repack Q5_K, Q6_K and Q8_0, which this table does not model.
REPACK_TYPES = ("Q4_0", "Q4_K", "IQ4_NL", "MXFP4")
REPACK_ROWS = 8
_ARCHES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Phi3ForCausalLM": "phi3"}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def bytes_per_weight(ggml_type: str) -> float:
    """Bytes per weight of a ggml type, from its block layout (``gguf.GGML_QUANT_SIZES``).

    Args:
        ggml_type: ``"Q4_K"``, ``"Q8_0"``, ``"F16"``, ... (case-insensitive).

    Raises:
        ConfigError: not a ggml type.
    """
    import gguf

    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type.upper()]]
    except KeyError:
        raise ConfigError(f"unknown ggml type {ggml_type!r}") from None
    return size / block


def kv_bytes_per_value(kv_type: str) -> float:
    """Bytes per cached K or V value: f16 2, q8_0 34/32 (``kv_type`` as llama.cpp's ``--cache-type-k``).

    Raises:
        ConfigError: not one of ``KV_TYPES``.
    """
    if kv_type not in KV_TYPES:
        raise ConfigError(f"KV cache type {kv_type!r} not in {KV_TYPES}")
    return bytes_per_weight(kv_type)


@dataclass(frozen=True)
class Tensor:
    """One weight tensor in GGUF terms.

    Attributes:
        name: GGUF name (``blk.3.attn_v.weight``).
        shape: ggml order, row length first (``ne[0]`` = columns = input features).
        nbytes: bytes in the file when read from a GGUF; None when computed from a config.
        ggml_type: the type in the file; None when computed from a config.
    """

    name: str
    shape: tuple[int, ...]
    nbytes: int | None = None
    ggml_type: str | None = None

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def layer(self) -> int | None:
        """The repeating layer this tensor belongs to; None for embeddings and output."""
        match = _LAYER.match(self.name)
        return int(match.group(1)) if match else None


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model.

    Attributes:
        name: where it came from (file, directory or reference name).
        arch: GGUF architecture (``llama``, ``phi3``).
        n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab: hyperparameters.
        n_ctx_train: the context it was trained for, in tokens.
        tensors: every weight tensor.
        file_type: the GGUF's own quantization (``Q4_K_M``) when read from a file, else None.
        n_merges: BPE merges in the GGUF's tokenizer; None from a config (then ``n_vocab`` is assumed).
    """

    name: str
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    tensors: tuple[Tensor, ...] = field(repr=False)
    file_type: str | None = None
    n_merges: int | None = None

    @property
    def tied(self) -> bool:
        """The output projection reuses the token embeddings (no ``output.weight``)."""
        return not any(t.name == "output.weight" for t in self.tensors)


# --- reading a model's shape -------------------------------------------------------------------


def load_shape(model: str | Path) -> ModelShape:
    """The shape of a GGUF file, a Hugging Face directory (``config.json``), a reference name, or a
    Hub id ``ORG/NAME[@REVISION]`` (its ``config.json`` alone is fetched into the Hugging Face cache).

    Raises:
        HubError: a Hub id that cannot be resolved.
        ConfigError: none of those, an unreadable file, or an architecture the planner does not know.
    """
    if str(model) in REFERENCE_CONFIGS:
        return shape_from_config(reference_config(str(model)), str(model))
    path = Path(model)
    if path.suffix == ".gguf":
        return shape_from_gguf(path)
    if is_hub_id(model):
        config = resolve_base(model, weights=False).path / "config.json"
        return shape_from_config(json.loads(config.read_text()), str(model))
    if (path / "config.json").is_file():
        return shape_from_config(json.loads((path / "config.json").read_text()), str(path))
    raise ConfigError(
        f"{model}: not a .gguf file, a model directory with config.json or a known model {sorted(REFERENCE_CONFIGS)}"
    )


def shape_from_config(config: dict, name: str) -> ModelShape:
    """A ModelShape from a transformers ``config.json`` dict, with GGUF tensor names and shapes.

    Raises:
        ConfigError: an architecture other than Llama/Mistral/Phi-3.
    """
    hf_arch = (config.get("architectures") or ["<none>"])[0]
    if hf_arch not in _ARCHES:
        raise ConfigError(f"{name}: architecture {hf_arch!r} unknown to the planner; known: {sorted(_ARCHES)}")
    n_head = config["num_attention_heads"]
    n_embd = config["hidden_size"]
    shape = ModelShape(
        name=name,
        arch=_ARCHES[hf_arch],
        n_layer=config["num_hidden_layers"],
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=config.get("num_key_value_heads") or n_head,
        head_dim=config.get("head_dim") or n_embd // n_head,
        n_ff=config["intermediate_size"],
        n_vocab=config["vocab_size"],
        n_ctx_train=config.get("max_position_embeddings", 0),
        tensors=(),
    )
    return replace(shape, tensors=tuple(_config_tensors(shape, config.get("tie_word_embeddings", False))))


def _config_tensors(s: ModelShape, tied: bool) -> list[Tensor]:
    """GGUF tensors of a Llama-like (separate q/k/v, gate/up) or Phi-3 (fused qkv, gate_up) model."""
    q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    tensors = [Tensor("token_embd.weight", (s.n_embd, s.n_vocab)), Tensor("output_norm.weight", (s.n_embd,))]
    if not tied:
        tensors.append(Tensor("output.weight", (s.n_embd, s.n_vocab)))
    for i in range(s.n_layer):
        blk = f"blk.{i}."
        if s.arch == "phi3":
            attn = [Tensor(blk + "attn_qkv.weight", (s.n_embd, q + 2 * kv))]
            ffn = [Tensor(blk + "ffn_up.weight", (s.n_embd, 2 * s.n_ff))]
        else:
            attn = [Tensor(blk + f"attn_{x}.weight", (s.n_embd, n)) for x, n in (("q", q), ("k", kv), ("v", kv))]
            ffn = [Tensor(blk + f"ffn_{x}.weight", (s.n_embd, s.n_ff)) for x in ("gate", "up")]
        tensors += [
            Tensor(blk + "attn_norm.weight", (s.n_embd,)),
            *attn,
            Tensor(blk + "attn_output.weight", (q, s.n_embd)),
        ]
        tensors += [
            Tensor(blk + "ffn_norm.weight", (s.n_embd,)),
            *ffn,
            Tensor(blk + "ffn_down.weight", (s.n_ff, s.n_embd)),
        ]
    return tensors


def shape_from_gguf(path: Path) -> ModelShape:
    """A ModelShape from a GGUF file's metadata and tensor table (no tensor data is read).

    Raises:
        ConfigError: the file is missing or not a readable GGUF.
    """
    import gguf

    if not path.is_file():
        raise ConfigError(f"{path}: GGUF file not found")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - gguf raises ValueError, struct.error, ... on bad files
        raise ConfigError(f"{path}: not a readable GGUF file ({exc})") from None
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("tokenizer.")}
    merges = reader.get_field("tokenizer.ggml.merges")
    arch = fields["general.architecture"]
    n_head = fields[f"{arch}.attention.head_count"]
    n_embd = fields[f"{arch}.embedding_length"]
    tensors = tuple(
        Tensor(t.name, tuple(int(d) for d in t.shape), int(t.n_bytes), t.tensor_type.name) for t in reader.tensors
    )
    n_vocab = next(t.shape[1] for t in tensors if t.name == "token_embd.weight")
    file_type = fields.get("general.file_type")
    return ModelShape(
        name=str(path),
        arch=arch,
        n_layer=fields[f"{arch}.block_count"],
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=fields.get(f"{arch}.attention.head_count_kv", n_head),
        head_dim=fields.get(f"{arch}.attention.key_length", n_embd // n_head),
        n_ff=fields[f"{arch}.feed_forward_length"],
        n_vocab=n_vocab,
        n_ctx_train=fields.get(f"{arch}.context_length", 0),
        tensors=tensors,
        file_type=gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None,
        n_merges=len(merges.data) if merges is not None else 0,
    )


# --- weights ----------------------------------------------------------------------------------


def tensor_type(tensor: Tensor, quant: str, shape: ModelShape) -> str:
    """The ggml type llama.cpp's quantizer gives ``tensor`` for the file type ``quant``.

    Follows ``llama_tensor_get_type`` of llama.cpp's ``src/llama-quant.cpp`` for F16, Q8_0,
    Q6_K, Q5_K_M, Q4_K_M and Q4_0 on dense models: 1-D tensors stay F32; the output
    (and tied embeddings) become Q6_K, or Q8_0 when its rows do not fit the block; in
    Q4_K_M and Q5_K_M, ``attn_v``/``attn_qkv`` and ``ffn_down`` of layers where
    ``use_more_bits`` holds become Q6_K; a row length not divisible by the type's block
    falls back (``FALLBACK``), and to F16 when that does not fit either.

    Raises:
        ConfigError: ``quant`` not in ``BASE_TYPE``.
    """
    if quant not in BASE_TYPE:
        raise ConfigError(f"quantization {quant!r} not in {sorted(BASE_TYPE)}")
    base = BASE_TYPE[quant]
    if len(tensor.shape) < 2 or tensor.name.endswith("_norm.weight"):
        return "F32"
    if base == "F16":
        return "F16"
    chosen = _mixed_type(tensor, quant, base, shape)
    if chosen in ("Q6_K", "Q8_0") and tensor.name in ("output.weight", "token_embd.weight"):
        return chosen  # the output's own rule already checked the row length
    return _fallback(chosen, tensor.shape[0])


def _mixed_type(tensor: Tensor, quant: str, base: str, shape: ModelShape) -> str:
    is_output = tensor.name == "output.weight" or (shape.tied and tensor.name == "token_embd.weight")
    if is_output:
        return "Q8_0" if tensor.shape[0] % _block(base) or base == "Q8_0" else "Q6_K"
    more_bits = (
        quant in ("Q4_K_M", "Q5_K_M") and tensor.layer is not None and use_more_bits(tensor.layer, shape.n_layer)
    )
    if more_bits and any(k in tensor.name for k in ("attn_v.weight", "attn_qkv.weight", "ffn_down")):
        return "Q6_K"
    return base


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the _M mixes: the first and last eighth, every third."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _block(ggml_type: str) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]][0]


def _fallback(ggml_type: str, ncols: int) -> str:
    if ncols % _block(ggml_type) == 0:
        return ggml_type
    fallback = FALLBACK.get(ggml_type, "F16")
    return fallback if ncols % _block(fallback) == 0 else "F16"


def tensor_bytes(tensor: Tensor, quant: str, shape: ModelShape) -> int:
    """Bytes of ``tensor`` at ``quant``: the file's own bytes when ``quant`` is the GGUF's type."""
    if tensor.nbytes is not None and quant == shape.file_type:
        return tensor.nbytes
    return round(tensor.n_elements * bytes_per_weight(tensor_type(tensor, quant, shape)))


def repacked(tensor: Tensor, quant: str, shape: ModelShape) -> bool:
    """Whether llama.cpp's CPU backend repacks ``tensor`` at ``quant`` on an AVX2 CPU.

    A weight goes to the ``CPU_REPACK`` buffer when llama.cpp multiplies by it
    (``GGML_OP_MUL_MAT``; ``token_embd`` is looked up with ``GET_ROWS`` and stays in the
    mapped file) and its type is in ``REPACK_TYPES`` with ``ne[1]`` (``shape[1]``, the rows)
    a multiple of ``REPACK_ROWS``. The copy has the tensor's own size (the repack buffer
    type has no ``get_alloc_size``). Source: ``ggml_repack_get_optimal_repack_type`` in
    ``ggml/src/ggml-cpu/repack.cpp``; checked against llama.cpp's "CPU_REPACK model buffer
    size" log line (benchmarks/RESULTS.md).
    """
    if tensor.name == "token_embd.weight" or len(tensor.shape) != 2:
        return False
    own = tensor.ggml_type if tensor.ggml_type is not None and quant == shape.file_type else None
    ggml_type = own or tensor_type(tensor, quant, shape)
    return ggml_type in REPACK_TYPES and tensor.shape[1] % REPACK_ROWS == 0


def repack_bytes(shape: ModelShape, quant: str, n_gpu_layers: int = 0) -> int:
    """Bytes of llama.cpp's ``CPU_REPACK`` buffer: the repacked tensors left on the CPU (see :func:`repacked`).

    Args:
        shape: from :func:`load_shape`.
        quant: a file type of ``BASE_TYPE`` (or the GGUF's own).
        n_gpu_layers: as in :func:`estimate` (0 to ``n_layer + 1``, -1 = all); offloaded tensors are
            not repacked.
    """
    on_gpu = _placement(shape, shape.n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers)
    return sum(tensor_bytes(t, quant, shape) for t in shape.tensors if not on_gpu(t) and repacked(t, quant, shape))


# --- the estimate -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """Memory of one configuration, in bytes, by device and by part.

    Attributes:
        quant, kv_type, n_ctx, n_gpu_layers, flash_attn: the configuration (``n_gpu_layers``
            from 0 to ``n_layer + 1``; ``n_layer + 1`` includes the output layer).
        weights_gpu, weights_cpu: tensor bytes on each device.
        weights_repack: the CPU's repacked copy of some of ``weights_cpu`` (0 with ``repack=False``).
        kv_gpu, kv_cpu: KV cache bytes on each device.
        compute_gpu: the GPU compute buffer as reserved.
        compute_cpu: the CPU compute buffer's resident part (see the module docstring) and the output buffer.
        host_base: the process before loading (``HOST_BASE_BYTES``) and the tokenizer's tables.
        reserve: VRAM kept for the CUDA context and pools; 0 when nothing is offloaded.
    """

    quant: str
    kv_type: str
    n_ctx: int
    n_gpu_layers: int
    flash_attn: bool
    weights_gpu: int
    weights_cpu: int
    weights_repack: int
    kv_gpu: int
    kv_cpu: int
    compute_gpu: int
    compute_cpu: int
    host_base: int
    reserve: int

    @property
    def vram(self) -> int:
        """GPU memory needed, reserve included (0 on CPU only)."""
        return self.weights_gpu + self.kv_gpu + self.compute_gpu + self.reserve

    @property
    def ram(self) -> int:
        """Resident CPU memory of the process at its peak, running (weights memory-mapped and all read).

        With layers offloaded, loading reads their weights from the mapped file too: the
        peak RSS while loading can reach the file's size (not measured on a GPU yet).
        """
        return self.host_base + self.weights_cpu + self.weights_repack + self.kv_cpu + self.compute_cpu

    @property
    def weights(self) -> int:
        return self.weights_gpu + self.weights_cpu


def estimate(
    shape: ModelShape,
    quant: str,
    n_ctx: int,
    n_gpu_layers: int = 0,
    kv_type: str = "f16",
    flash_attn: bool | None = None,
    n_ubatch: int = N_UBATCH,
    reserve: int = DEFAULT_RESERVE_BYTES,
    n_prompt: int | None = None,
    repack: bool = True,
) -> Estimate:
    """Memory of ``shape`` at ``quant`` and ``n_ctx`` with ``n_gpu_layers`` offloaded.

    Args:
        shape: from :func:`load_shape`.
        quant: a file type of ``BASE_TYPE`` (or the GGUF's own).
        n_ctx: context window, tokens.
        n_gpu_layers: 0 (CPU only) to ``n_layer + 1`` (every layer and the output); -1 = all.
        kv_type: ``"f16"`` or ``"q8_0"`` for both K and V.
        flash_attn: default: on exactly when ``kv_type`` is quantized (llama.cpp needs it then).
        n_ubatch: physical batch, tokens.
        reserve: VRAM for the CUDA context and pools, bytes; counted when a layer is offloaded.
        n_prompt: the longest prompt evaluated at once, tokens (for resident CPU memory);
            default ``n_ctx``.
        repack: llama.cpp's CPU weight repacking is on (its default; off is ``--no-repack``,
            ``use_extra_bufts=False``): the repacked tensors count twice in ``ram``.

    Raises:
        ConfigError: a quantized V cache without flash attention, or an out-of-range value.
    """
    flash_attn = kv_type != "f16" if flash_attn is None else flash_attn
    if kv_type != "f16" and not flash_attn:
        raise ConfigError(f"a {kv_type} V cache needs flash attention in llama.cpp (flash_attn=True)")
    ngl = shape.n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers
    if not 0 <= ngl <= shape.n_layer + 1 or n_ctx < 1:
        raise ConfigError(f"n_gpu_layers {n_gpu_layers} not in -1..{shape.n_layer + 1}, or n_ctx {n_ctx} < 1")
    on_gpu = _placement(shape, ngl)
    weights_gpu = weights_cpu = 0
    for t in shape.tensors:
        size = tensor_bytes(t, quant, shape)
        if on_gpu(t):
            weights_gpu += size
        if not on_gpu(t) or (t.name == "token_embd.weight" and shape.tied and ngl > shape.n_layer):
            weights_cpu += size  # tied embeddings: the output copy goes to the GPU, the lookup stays
    kv_layer = kv_cache_bytes(shape, n_ctx, kv_type) // shape.n_layer
    n_kv_gpu = min(ngl, shape.n_layer)
    compute = compute_bytes(shape, n_ctx, flash_attn, n_ubatch)
    output = shape.n_vocab * 4  # logits of the last token, host memory
    if ngl <= shape.n_layer:  # some layer computes on the CPU
        touched = resident_compute_bytes(shape, min(n_prompt or n_ctx, n_ctx), flash_attn, n_ubatch)
    else:
        touched = 4 * shape.n_embd * n_ubatch  # the embedding lookup only
    tokenizer = TOKENIZER_BYTES * (shape.n_vocab + (shape.n_vocab if shape.n_merges is None else shape.n_merges))
    return Estimate(
        quant=quant,
        kv_type=kv_type,
        n_ctx=n_ctx,
        n_gpu_layers=ngl,
        flash_attn=flash_attn,
        weights_gpu=weights_gpu,
        weights_cpu=weights_cpu,
        weights_repack=repack_bytes(shape, quant, ngl) if repack else 0,
        kv_gpu=kv_layer * n_kv_gpu,
        kv_cpu=kv_layer * (shape.n_layer - n_kv_gpu),
        compute_gpu=compute if ngl else 0,
        compute_cpu=touched + output,
        host_base=HOST_BASE_BYTES + tokenizer,
        reserve=reserve if ngl else 0,
    )


def _placement(shape: ModelShape, ngl: int):
    """``on_gpu(tensor)`` for llama.cpp's layout: the last ``ngl`` layers, the output when ``ngl > n_layer``."""
    first_gpu_layer = shape.n_layer - min(ngl, shape.n_layer)

    def on_gpu(t: Tensor) -> bool:
        if t.layer is not None:
            return t.layer >= first_gpu_layer
        if t.name in ("output.weight", "output_norm.weight"):
            return ngl > shape.n_layer
        return False  # token_embd: looked up on the CPU

    return on_gpu


def kv_cache_bytes(shape: ModelShape, n_ctx: int, kv_type: str = "f16") -> int:
    """KV cache of every layer: ``2 x n_layer x n_ctx x n_head_kv x head_dim x bytes per value``."""
    values = 2 * shape.n_layer * n_ctx * shape.n_head_kv * shape.head_dim
    return round(values * kv_bytes_per_value(kv_type))


def compute_bytes(shape: ModelShape, n_ctx: int, flash_attn: bool = False, n_ubatch: int = N_UBATCH) -> int:
    """llama.cpp's compute buffer as it reserves it: one ubatch against the full context.

    The reserved graph has ``n_tokens = min(n_ctx, n_ubatch)`` tokens attending to all
    ``n_ctx`` cells, every token producing logits; see :func:`graph_bytes`. Checked against
    llama.cpp's "compute buffer size" log line (benchmarks/RESULTS.md).
    """
    n_tokens = min(n_ctx, n_ubatch)
    return graph_bytes(shape, n_kv=n_ctx, n_tokens=n_tokens, n_outputs=n_tokens, flash_attn=flash_attn)


def resident_compute_bytes(shape: ModelShape, n_prompt: int, flash_attn: bool = False, n_ubatch: int = N_UBATCH) -> int:
    """The part of the CPU compute buffer a prompt of ``n_prompt`` tokens touches.

    Its last ubatch attends to the cells used so far, which llama.cpp pads to 256, and
    produces logits for one token; the rest of the malloc'ed buffer is never paged in.
    """
    n_tokens = min(n_prompt, n_ubatch)
    n_kv = -(-n_prompt // 256) * 256
    return graph_bytes(shape, n_kv=n_kv, n_tokens=n_tokens, n_outputs=1, flash_attn=flash_attn)


def graph_bytes(shape: ModelShape, n_kv: int, n_tokens: int, n_outputs: int, flash_attn: bool = False) -> int:
    """Peak activations of one forward pass of ``n_tokens`` over ``n_kv`` cells, bytes.

    The largest of: attention, its scores (``n_head x n_kv x n_tokens`` f32; the softmax
    works in place; absent with flash attention) beside the mask (``n_kv x n_tokens``, f32,
    f16 with flash attention); the feed-forward's gate, up and product (``3 x n_ff x n_tokens``
    f32); the logits (``n_vocab x n_outputs`` f32). Plus the hidden states alive beside
    it (``3 x n_embd x n_tokens`` f32).
    """
    scores = 0 if flash_attn else 4 * shape.n_head * n_kv * n_tokens
    attention = scores + (2 if flash_attn else 4) * n_kv * n_tokens
    feed_forward = 4 * 3 * shape.n_ff * n_tokens
    logits = 4 * shape.n_vocab * n_outputs
    return max(attention, feed_forward, logits) + 4 * 3 * shape.n_embd * n_tokens


# --- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The planner's answer for one model, budget and context.

    Attributes:
        shape: the model.
        vram: the GPU budget, bytes.
        n_ctx: the context, tokens.
        reserve: VRAM counted for the CUDA context and pools, bytes.
        options: for every quantization x KV type, the estimate with the most layers that fit
            (``n_gpu_layers = 0`` when none does).
        best: the recommended option, or None when the model does not even fit with 0 layers
            offloaded (the CPU holds it then; the budget only bounds VRAM).
        repack: llama.cpp's CPU weight repacking counted in ``ram`` (see :func:`estimate`).
    """

    shape: ModelShape
    vram: int
    n_ctx: int
    reserve: int
    options: tuple[Estimate, ...]
    best: Estimate | None
    repack: bool = True

    def full(self, quant: str, kv_type: str) -> Estimate:
        """The estimate of ``quant``/``kv_type`` with every layer and the output on the GPU."""
        return estimate(self.shape, quant, self.n_ctx, -1, kv_type, reserve=self.reserve, repack=self.repack)


def plan(
    shape: ModelShape,
    vram: int,
    n_ctx: int,
    quants: tuple[str, ...] = QUANTS,
    kv_types: tuple[str, ...] = KV_TYPES,
    reserve: int = DEFAULT_RESERVE_BYTES,
    repack: bool = True,
) -> Plan:
    """Every quantization x KV type at its most offloaded fitting layout, and the best of them.

    The best plan puts the most layers on the GPU (all of them, output included, before
    anything else: a layer left on the CPU costs more speed than any quantization step),
    then keeps the KV cache f16 (a q8_0 cache needs flash attention), then takes the most
    precise quantization. ``quants`` stop at Q4_K_M on purpose: below it quality drops
    steeply (llama.cpp's perplexity tables), so a smaller quant is not offered to fit more.

    Args:
        shape: from :func:`load_shape`.
        vram: GPU memory budget, bytes (the card's total); plans fit in ``(1 - MARGIN) x vram``
            with ``reserve`` counted.
        n_ctx: context window, tokens.
        quants, kv_types: the candidates.
        reserve: VRAM for the CUDA context and pools, bytes.
        repack: llama.cpp's CPU weight repacking is on (``ram`` only; VRAM is the same either way).
    """
    usable = round(vram * (1 - MARGIN))
    options = tuple(max_layers(shape, q, kv, n_ctx, usable, reserve, repack) for q in quants for kv in kv_types)
    ranked = sorted(
        (o for o in options if o.vram <= usable),
        key=lambda o: (-o.n_gpu_layers, kv_types.index(o.kv_type), quants.index(o.quant)),
    )
    best = ranked[0] if ranked else None
    return Plan(shape=shape, vram=vram, n_ctx=n_ctx, reserve=reserve, options=options, best=best, repack=repack)


def describe(result: Plan) -> list[str]:
    """The best plan in words, and what it gave up, with the numbers (MiB)."""
    s, best = result.shape, result.best
    usable = result.vram * (1 - MARGIN) / MIB
    if best is None:
        return [f"nothing fits in {usable:.0f} MiB, not even with 0 layers offloaded"]
    if best.n_gpu_layers > s.n_layer:
        layers = f"-1 (all {s.n_layer} layers and the output)"
    else:
        layers = f"{best.n_gpu_layers} (of {s.n_layer} layers; the rest on the CPU)"
    flash = ", flash attention on" if best.flash_attn else ""
    lines = [
        f"best plan: {best.quant}, n_gpu_layers={layers}, n_ctx={result.n_ctx}, KV cache {best.kv_type}{flash}: "
        f"VRAM {best.vram / MIB:.0f} MiB of {usable:.0f} MiB usable ({result.vram / MIB:.0f} MiB less "
        f"{MARGIN:.0%} margin; {best.reserve / MIB:.0f} MiB reserve included), RAM {best.ram / MIB:.0f} MiB"
    ]
    if best.kv_type != "f16":
        f16 = result.full(best.quant, "f16")
        fitting = next(o for o in result.options if o.quant == best.quant and o.kv_type == "f16")
        lines.append(
            f"with an f16 KV cache ({(f16.kv_gpu + f16.kv_cpu) / MIB:.0f} MiB instead of "
            f"{(best.kv_gpu + best.kv_cpu) / MIB:.0f} MiB) all layers need {f16.vram / MIB:.0f} MiB: "
            f"n_gpu_layers={fitting.n_gpu_layers} would fit"
        )
    quants = [o.quant for o in result.options]
    better = quants[: quants.index(best.quant)]
    if better:
        more = result.full(better[-1], best.kv_type)
        lines.append(f"{better[-1]} with a {best.kv_type} KV cache needs {more.vram / MIB:.0f} MiB for all layers")
    return lines


def max_layers(
    shape: ModelShape, quant: str, kv_type: str, n_ctx: int, vram: int, reserve: int, repack: bool = True
) -> Estimate:
    """The estimate with the largest ``n_gpu_layers`` whose VRAM fits ``vram`` (0 layers when none)."""
    layouts = layer_table(shape, quant, kv_type, n_ctx, reserve, repack)
    fitting = [e for e in layouts if e.vram <= vram]
    return fitting[-1] if fitting else layouts[0]


def layer_table(
    shape: ModelShape,
    quant: str,
    kv_type: str,
    n_ctx: int,
    reserve: int = DEFAULT_RESERVE_BYTES,
    repack: bool = True,
) -> list[Estimate]:
    """Estimates for ``n_gpu_layers`` = 0, 1, ..., ``n_layer + 1`` (the last: the output layer too)."""
    return [estimate(shape, quant, n_ctx, k, kv_type, reserve=reserve, repack=repack) for k in range(shape.n_layer + 2)]


def parse_size(text: str) -> int:
    """Bytes of a size such as ``4GiB``, ``512MiB``, ``4GB`` (10^9) or ``3.5 GiB``.

    Raises:
        ConfigError: no number or no known unit.
    """
    units = {"kib": 2**10, "mib": MIB, "gib": GIB, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", text)
    if not match or match.group(2).lower() not in units:
        raise ConfigError(f"size {text!r}: a number and a unit from {sorted(units)}, e.g. 4GiB")
    return round(float(match.group(1)) * units[match.group(2).lower()])
