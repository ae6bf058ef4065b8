"""Static configuration of a Meta Network (a frozen, hashable dataclass).

The config is passed to jitted functions by closure or as a static argument; it never lives
inside traced code as a mutable object.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

VARIANTS = ("metanet", "metanet-", "metanet+")
ARCHITECTURES = ("omniglot_cnn", "mini_imagenet_cnn", "mlp", "rows_lstm")
CONV_ARCHITECTURES = ("omniglot_cnn", "mini_imagenet_cnn")
REP_LOSSES = ("auto", "ce", "contrastive")
QUERY_PATHS = ("auto", "stacked", "patches")
TASK_BATCHING = ("auto", "loop", "vmap")
GENERATOR_KERNELS = ("auto", "xla", "fused")
BASE_INPUTS = ("x", "r")
COMPUTE_DTYPES = ("float32", "bfloat16", "float64")
GENERATOR_INITS = ("small", "authors")
NETWORK_INITS = ("he", "authors")
LR_SCHEDULES = ("constant", "cosine")
LABEL_UNITS = ("first", "any")
BN_STATISTICS = ("authors", "per_pass")

# Fields added after configurations were first saved, with the value that reproduces what a
# configuration saved without them meant (`checkpointing.config_from_dict`). A field's current
# default may differ: a checkpoint written before the field existed must keep its behaviour.
LEGACY_VALUES = {
    "generator_init": "small",
    "network_init": "he",
    "lr_schedule": "constant",
    "warmup_steps": 0,
    "schedule_steps": 0,
    "label_units": "first",
    "bn_statistics": "per_pass",
}

# Values that were removed (issue 9), with the kept value that computes the same numbers: a
# configuration saved with one still loads (`checkpointing.config_from_dict`,
# `legacy_to_current`); asking for one in a new configuration is an error naming the others.
REMOVED_VALUES = {
    "task_batching": {"scan": "loop"},  # per-task gradients summed: the same mean gradient
    "query_path": {"per_query": "stacked"},  # the same logits by linearity (tests)
}

# Per-architecture defaults (METANET.md, "Architectures").
_ARCH_DEFAULTS = {
    "omniglot_cnn": dict(conv_channels=64, num_conv_layers=5, hidden_units=64, batchnorm_layers=0),
    "mini_imagenet_cnn": dict(
        conv_channels=32, num_conv_layers=5, hidden_units=288, batchnorm_layers=3
    ),
    "mlp": dict(conv_channels=0, num_conv_layers=0, hidden_units=64, batchnorm_layers=0),
    # An image read row by row: H steps of W*C pixels through one augmented LSTM of
    # hidden_units (networks.py).
    "rows_lstm": dict(conv_channels=0, num_conv_layers=0, hidden_units=64, batchnorm_layers=0),
}


@dataclasses.dataclass(frozen=True)
class MetaNetConfig:
    """Hyperparameters of one MetaNet setting.

    Attributes:
      ways: classes per episode (N-way).
      shots: support examples per class (K-shot).
      queries_per_class: query (training) examples per class; L = ways * queries_per_class.
      image_shape: `(H, W, C)` of one example.
      variant: "metanet", "metanet-" (no task-level fast weights) or "metanet+" (an extra
        task-level fast weight for the base learner; METANET.md's reading).
      architecture: "omniglot_cnn", "mini_imagenet_cnn", "mlp" (continual / MNIST runs) or
        "rows_lstm" (each image read as a sequence of its rows by an augmented LSTM of
        `hidden_units`; `networks` module docstring).
      conv_channels, num_conv_layers, hidden_units, num_hidden_layers, batchnorm_layers:
        network sizes; `None` takes the architecture's default (METANET.md).
      max_ways: output units of the base learner (>= ways); an episode uses the first `ways`
        logits, so a model can be tested on more ways than it was trained with.
      base_input: "x" (the image) or "r" (u's representation; b is then an MLP on r).
      augment_base, augment_representation: names of the augmented layers of b and u;
        `None` takes METANET.md's defaults (see `networks.default_augmented`).
      rep_loss: "auto" (cross-entropy when shots == 1, contrastive otherwise), "ce" or
        "contrastive".
      rep_chunks: T, the number of support chunks (or sampled pairs) for task-level meta info.
      contrastive_margin: margin of the contrastive loss.
      second_order: differentiate through the meta information (no `stop_gradient`).
      rep_loss_in_objective: add the representation loss to the training objective.
      query_path: how the L queries run b with their own read-out weights W*_j (METANET.md).
        "stacked": memory kernels stacked along each conv's output channels, then mixed by
        the attention weights (linearity); "patches": W*_j built per query and applied as
        a batched matmul over 3x3 patches (a third of the stacked FLOPs at 5-way). "auto"
        (default): "patches" on CPU, where it measured fastest, "stacked" on accelerators
        (the one measured there). Both agree to float rounding with the per-query oracle of
        the tests.
      task_batching: how the jitted `make_*` entry points process a batch of tasks. "vmap"
        (one batched program; every task's fast convolutions become grouped convolutions),
        "loop" (one compiled per-task program dispatched from the host per task, then one
        program that combines them: the meta-batch-1 speed per episode) or "auto" ("loop" on
        CPU, "vmap" on accelerators), resolved once when the entry point is made
        (`resolved_task_batching`). The pure functions (`episode_loss`, `predict`,
        `train_step`) and the sharded step always `vmap` (no host loop inside a trace).
      generator_kernel: which code computes m and d (the same mathematics): "xla" (the JAX
        code of `generators`, the reference, on every backend), "fused" (float32 C++ kernels
        for the CPU, `metanet_jax.kernels`, built by `make kernels`; an error where they cannot
        run) or "auto" (default: "fused" for float32 compute on the CPU when the kernels are
        built, "xla" otherwise), resolved when a function is traced
        (`resolved_generator_kernel`). The two agree to float32 rounding. An execution
        choice: a resumed run may change it, and a saved configuration holding "fused" loads
        as "auto" (it runs where the kernels cannot).
      lstm_hidden, generator_hidden, grad_p: sizes of d and m, and the preprocessing's p.
      learning_rate, clip_norm: the outer optimiser (Adam after global-norm clipping).
      compute_dtype: dtype of the networks' activations and convolutions ("float32" default;
        parameters and optimiser state stay float32).
      generator_init: initialisation of m and d. "authors": Chainer v1's defaults, as in the
        authors' code (every linear weight N(0, 1/fan_in), biases 0, LSTM forget-gate bias 0),
        so the generated fast weights start of the order of the slow ones; "small": output
        layers scaled by 0.01/sqrt(hidden) and forget bias 1, so fast weights start as a small
        perturbation (this project's first choice; configurations saved without the field).
      network_init: initialisation of b's and u's kernels. "authors": Chainer v1's default
        N(0, 1/fan_in) for every layer; "he": He-normal (truncated, fan-in) before a ReLU and
        LeCun-normal otherwise (configurations saved without the field).
      lr_schedule: "constant" (the authors' Adam at `learning_rate`) or "cosine": linear
        warm-up over `warmup_steps`, then cosine decay to 0 at `schedule_steps`.
      warmup_steps: linear warm-up length of the learning rate (both schedules).
      schedule_steps: the schedule's recorded length (steps at which cosine reaches 0; kept
        at 0 afterwards). Its own field, so that raising a run's step count to continue it
        does not change the schedule of the steps already taken.
      label_units: which output units an episode uses. "first" (default): labels are
        0..ways-1 and the losses and predictions use the first `ways` logits. "any": labels
        may be any of the `output_units` units, and each loss or prediction uses the units
        among the support set's labels (the others are masked out), so a model trained
        5-way with 20 units trains all 20 (episodes with labels 0..ways-1 give the same
        results as "first"). Experimental: a 16-channel model trained so predicted one unit
        for every query of 19- and 20-way episodes (docs/RESULTS.md, demo_levers).
      attention_scale: s in the memory read a_j = softmax_i(s * cos(r'_i, r_j)). 1 (default):
        the paper's eq. 4 and the authors' code, no temperature; a cosine lies in [-1, 1], so
        with s = 1 a query's own support slot holds at most e^2 times the weight of any other
        and the read is mostly an average of the memory (more so the more ways). Larger
        values sharpen the read towards the nearest key (not in the paper; docs/RESULTS.md).
      bn_statistics: which examples a BatchNorm layer's statistics span (no effect without
        BatchNorm layers). "authors" (default; the authors' MetaNetPartial.py): b's
        per-example meta-gradients, u's representation-loss chunks (and MetaNet+'s chunks of
        b) use the statistics of the whole support set, u's keys normalise the support set
        and the queries separately. "per_pass" (the behaviour before this field existed,
        and what a saved configuration without it means): each pass through a network
        normalises over the examples of that pass, i.e. one support example for its
        meta-gradient (instance normalisation), one chunk for the representation loss, the
        support set and the queries together for the keys. Either way b's queries use the
        statistics of the query set. See `episode.task_forward`.
    """

    ways: int = 5
    shots: int = 1
    queries_per_class: int = 10
    image_shape: tuple[int, ...] = (28, 28, 1)
    variant: Literal["metanet", "metanet-", "metanet+"] = "metanet"
    architecture: Literal["omniglot_cnn", "mini_imagenet_cnn", "mlp", "rows_lstm"] = "omniglot_cnn"
    conv_channels: int | None = None
    num_conv_layers: int | None = None
    hidden_units: int | None = None
    num_hidden_layers: int = 2
    batchnorm_layers: int | None = None
    max_ways: int | None = None
    base_input: Literal["x", "r"] = "x"
    augment_base: tuple[str, ...] | None = None
    augment_representation: tuple[str, ...] | None = None
    rep_loss: Literal["auto", "ce", "contrastive"] = "auto"
    rep_chunks: int = 5
    contrastive_margin: float = 1.0
    second_order: bool = False
    rep_loss_in_objective: bool = False
    query_path: Literal["auto", "stacked", "patches"] = "auto"
    task_batching: Literal["auto", "loop", "vmap"] = "auto"
    generator_kernel: Literal["auto", "xla", "fused"] = "auto"
    lstm_hidden: int = 20
    generator_hidden: int = 20
    grad_p: float = 7.0
    learning_rate: float = 1e-3
    clip_norm: float = 10.0
    compute_dtype: Literal["float32", "bfloat16", "float64"] = "float32"
    generator_init: Literal["small", "authors"] = "small"
    network_init: Literal["he", "authors"] = "he"
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    schedule_steps: int = 0
    label_units: Literal["first", "any"] = "first"
    attention_scale: float = 1.0
    bn_statistics: Literal["authors", "per_pass"] = "authors"

    def __post_init__(self):
        """Checks every field (a `ValueError` naming the first bad one) and stores the
        sequence fields as tuples."""
        self._check_counts_and_choices()
        self._check_sizes()
        self._check_optimiser()
        for name in ("augment_base", "augment_representation"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))

    def _check_counts_and_choices(self) -> None:
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MetaNetConfig.{name} must be a positive int, got {value!r}")

        for name in ("ways", "shots", "queries_per_class", "rep_chunks", "lstm_hidden"):
            positive(name)
        positive("generator_hidden")
        for name, removed in REMOVED_VALUES.items():
            value = getattr(self, name)
            if value in removed:
                kept = TASK_BATCHING if name == "task_batching" else QUERY_PATHS
                raise ValueError(
                    f"MetaNetConfig.{name}={value!r} was removed; use one of {kept} "
                    f"({removed[value]!r} computes the same numbers)"
                )
        for name, allowed in (
            ("variant", VARIANTS),
            ("architecture", ARCHITECTURES),
            ("rep_loss", REP_LOSSES),
            ("query_path", QUERY_PATHS),
            ("task_batching", TASK_BATCHING),
            ("generator_kernel", GENERATOR_KERNELS),
            ("base_input", BASE_INPUTS),
            ("compute_dtype", COMPUTE_DTYPES),
            ("generator_init", GENERATOR_INITS),
            ("network_init", NETWORK_INITS),
            ("lr_schedule", LR_SCHEDULES),
            ("label_units", LABEL_UNITS),
            ("bn_statistics", BN_STATISTICS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"MetaNetConfig.{name}={getattr(self, name)!r} is unknown; "
                    f"expected one of {allowed}"
                )

    def _check_sizes(self) -> None:
        """The image shape (stored as a tuple), output units and network sizes."""
        shape = tuple(self.image_shape)
        if len(shape) != 3 or any((not isinstance(s, int)) or s <= 0 for s in shape):
            raise ValueError(f"MetaNetConfig.image_shape must be (H, W, C) > 0, got {shape!r}")
        object.__setattr__(self, "image_shape", shape)
        if self.max_ways is not None:
            if not isinstance(self.max_ways, int) or self.max_ways < self.ways:
                raise ValueError(
                    f"MetaNetConfig.max_ways={self.max_ways!r} must be an int >= ways={self.ways}"
                )
        for name in ("conv_channels", "num_conv_layers", "hidden_units", "batchnorm_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"MetaNetConfig.{name} must be a non-negative int, got {value!r}")
        if self.hidden_units is not None and self.hidden_units <= 0:
            raise ValueError("MetaNetConfig.hidden_units must be positive")
        if self.num_hidden_layers < 1:
            raise ValueError("MetaNetConfig.num_hidden_layers must be >= 1")
        conv = self.architecture in CONV_ARCHITECTURES
        if conv and self.resolved("num_conv_layers") <= 0:
            raise ValueError(f"architecture {self.architecture!r} needs num_conv_layers >= 1")
        if conv and self.resolved("conv_channels") <= 0:
            raise ValueError(f"architecture {self.architecture!r} needs conv_channels >= 1")

    def _check_optimiser(self) -> None:
        if not (isinstance(self.attention_scale, (int, float)) and self.attention_scale > 0):
            raise ValueError(
                f"MetaNetConfig.attention_scale must be a positive number, got "
                f"{self.attention_scale!r}"
            )
        if self.grad_p <= 0 or self.clip_norm <= 0 or self.learning_rate <= 0:
            raise ValueError("grad_p, clip_norm and learning_rate must be positive")
        for name in ("warmup_steps", "schedule_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"MetaNetConfig.{name} must be a non-negative int, got {value!r}")
        if self.lr_schedule == "cosine" and self.schedule_steps <= self.warmup_steps:
            raise ValueError(
                f"lr_schedule='cosine' needs schedule_steps > warmup_steps, got "
                f"schedule_steps={self.schedule_steps}, warmup_steps={self.warmup_steps}"
            )

    def resolved(self, name: str) -> int:
        """The value of a size field, with the architecture's default when it is `None`."""
        value = getattr(self, name)
        return _ARCH_DEFAULTS[self.architecture][name] if value is None else value

    @property
    def output_units(self) -> int:
        """Output units of b (and of u's representation head): `max_ways` or `ways`."""
        return self.max_ways if self.max_ways is not None else self.ways

    @property
    def support_size(self) -> int:
        """N = ways * shots."""
        return self.ways * self.shots

    @property
    def query_size(self) -> int:
        """L = ways * queries_per_class."""
        return self.ways * self.queries_per_class

    @property
    def uses_contrastive(self) -> bool:
        """Whether the representation loss is the contrastive pair loss."""
        if self.rep_loss == "auto":
            return self.shots > 1
        return self.rep_loss == "contrastive"

    @property
    def has_task_fast_weights(self) -> bool:
        """MetaNet- has no task-level fast weights for u."""
        return self.variant != "metanet-"

    def resolved_task_batching(self, backend: str | None = None) -> str:
        """The task batching the jitted entry points use ("auto" resolved by the backend:
        "loop" on CPU, "vmap" on accelerators)."""
        if self.task_batching != "auto":
            return self.task_batching
        return "loop" if _backend(backend) == "cpu" else "vmap"

    def resolved_query_path(self, backend: str | None = None) -> str:
        """The query path b runs ("auto" resolved by the backend)."""
        if self.query_path != "auto":
            return self.query_path
        return "patches" if _backend(backend) == "cpu" else "stacked"

    def fused_generator_unavailable(self, backend: str | None = None) -> str | None:
        """Why the fused generator kernels cannot run this configuration here (the
        compute dtype, the backend, or the kernels not built, with how to build them), or
        `None` when they can."""
        if self.compute_dtype != "float32":
            dtype = self.compute_dtype
            return f"the fused kernels compute in float32 only (compute_dtype={dtype!r})"
        backend = _backend(backend)
        if backend != "cpu":
            return f"the fused kernels run on the CPU only (backend {backend!r})"
        from metanet_jax import kernels

        return kernels.unavailable_reason()

    def resolved_generator_kernel(self, backend: str | None = None) -> str:
        """The code that computes m and d: "fused" or "xla" ("auto" resolved as in the
        field's description). Raises `ValueError` naming why, and how to build the kernels,
        when "fused" is asked for where it cannot run."""
        if self.generator_kernel == "xla":
            return "xla"
        reason = self.fused_generator_unavailable(backend)
        if self.generator_kernel == "fused" and reason is not None:
            raise ValueError(f"MetaNetConfig.generator_kernel='fused' cannot run: {reason}")
        return "xla" if reason is not None else "fused"

    def replace(self, **changes) -> MetaNetConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def legacy_to_current(values: dict) -> dict:
    """`values` (config fields, e.g. a saved config.json) with removed values replaced by
    the kept value that computes the same numbers (`REMOVED_VALUES`)."""
    out = dict(values)
    for name, removed in REMOVED_VALUES.items():
        if isinstance(out.get(name), str) and out[name] in removed:
            out[name] = removed[out[name]]
    return out


def _backend(backend: str | None) -> str:
    """`backend`, or JAX's default backend when it is `None` (imported here: the config
    module itself needs no JAX)."""
    if backend is not None:
        return backend
    import jax

    return jax.default_backend()
