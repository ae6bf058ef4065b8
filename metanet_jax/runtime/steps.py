"""The one train-step factory: `make_step` builds the step of a run, for episodes of every
ways it trains on, on one device or data-parallel over a mesh, and compiles its programs
ahead of time, concurrently.

A step's programs are those of `training.make_train_step` (one device: the jitted
`training.train_step`, or on the CPU the per-task gradient program and the update program of
`batching.TaskLoop`) or of `parallel.make_sharded_train_step` (several devices or processes),
made for each ways with `config.replace(ways=w)` (the parameters and optimiser state do not
depend on the ways). So a `TrainStep` computes bitwise what those functions compute.

Ahead-of-time compilation (`TrainStep.compile`, `Compilations`): each program is lowered from
abstract inputs (`jax.ShapeDtypeStruct`s) and compiled (`jit(f).lower(...).compile()`) on a
thread pool (`default_workers`). XLA releases the GIL while it compiles, so the programs
compile at the same time as the training steps that are already possible (and, with more
than one worker, as each other); lowering (tracing) is Python and takes the GIL in turn. A
jitted function called later with arrays of those shapes finds the compiled executable in
JAX's caches and compiles nothing. A program is waited for (`Compilations.wait`) before its
first call, so none is compiled twice.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterable

import jax
import jax.numpy as jnp
import optax
from absl import logging

from metanet_jax import batching, parallel, training
from metanet_jax.config import MetaNetConfig
from metanet_jax.training import TrainState
from metanet_jax.types import Episode

# Work for a compile thread: lowers and compiles one or more programs (returns nothing).
Program = Callable[[], None]


# ----------------------------------------------------------------------------- abstract inputs
def abstract(tree):
    """`jax.ShapeDtypeStruct`s of a pytree of arrays (typed PRNG keys included)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def episode_shapes(
    config: MetaNetConfig, ways: int, meta_batch: int, queries_per_class: int | None = None
) -> tuple[Episode, Episode]:
    """The abstract `(support, query)` of a meta-batch of `ways`-way episodes, as the sampler
    (`data.sample_episodes`) makes them: x float32 `[B, n, *image_shape]`, y int32 `[B, n]`.

    Args:
      config: the model (its shots, queries per class and image shape).
      ways: the episodes' ways.
      meta_batch: tasks B.
      queries_per_class: default `config.queries_per_class`.
    """
    queries = config.queries_per_class if queries_per_class is None else queries_per_class

    def episode(n: int) -> Episode:
        return Episode(
            jax.ShapeDtypeStruct((meta_batch, n, *config.image_shape), jnp.float32),
            jax.ShapeDtypeStruct((meta_batch, n), jnp.int32),
        )

    return episode(ways * config.shots), episode(ways * queries)


def programs(fn, *args) -> list[Program]:
    """The compilation of the programs one call `fn(*args)` runs (`args` may be abstract).

    `fn` is a jitted function, a `batching.ValidatedFunction` (from `make_train_step`,
    `make_episode_loss`, ...: a jitted function or a `batching.TaskLoop`, whose per-task
    program and combining program are compiled one after the other,
    `batching.TaskLoop.compile`) or a `parallel.ShardedTrainStep`.
    """
    inner = getattr(fn, "_fn", fn)  # a ValidatedFunction's function
    if isinstance(inner, batching.TaskLoop):
        return [functools.partial(inner.compile, *args)]
    jitted = inner.jitted if isinstance(inner, parallel.ShardedTrainStep) else inner

    def compile_jitted():
        jitted.lower(*args).compile()

    return [compile_jitted]


# ----------------------------------------------------------------------------- compilation
def default_workers() -> int:
    """Compile threads: half the CPU cores (1 to 4).

    XLA's CPU compiler already spreads one compilation over about two threads (measured on
    this project's 2-core machine: two of its threads busy during one compile), so on 2
    cores a second concurrent compilation only competes with the first; there one thread
    compiles the programs one after the other while the loop trains the steps whose programs
    are ready. Machines with more cores compile several programs at once.
    """
    return max(1, min(4, (os.cpu_count() or 2) // 2))


class Compilations:
    """Programs compiling on a thread pool, each under a key (e.g. `("train", 5)`).

    `wait(key)` blocks until that key's programs are compiled (re-raising a compilation
    error) and is immediate for a key never submitted. `times` holds each key's seconds
    (lowering and compilation of its programs; measured in the worker, so concurrent keys
    overlap).

    Args:
      workers: threads (default `default_workers()`).
    """

    def __init__(self, workers: int | None = None):
        workers = workers or default_workers()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "metanet-compile")
        self._futures: dict[Hashable, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self.times: dict[Hashable, float] = {}

    def submit(
        self, key: Hashable, work: Iterable[Program], *, after: Iterable[Hashable] = ()
    ) -> None:
        """Compiles `work` (in this order, on one thread) under `key` (once per key).

        Args:
          key: what `wait` names.
          work: the programs' compilations.
          after: keys submitted before this one whose programs compile first (e.g. the
            evaluation's after the training's, which the first steps need).
        """
        work, after = list(work), list(after)

        def run():
            for earlier in after:  # submitted before: already started (the pool is FIFO)
                self.wait(earlier)
            t0 = time.perf_counter()
            for program in work:
                program()
            self.times[key] = time.perf_counter() - t0

        with self._lock:
            if key not in self._futures:
                self._futures[key] = self._pool.submit(run)

    def wait(self, key: Hashable) -> None:
        """Returns once `key`'s programs are compiled (at once for a key never submitted or
        dropped by `close`: its programs then compile on first call, as without this).

        A compilation ahead of time that failed is one warning (naming the key and the
        error), not an error: the program then compiles on its first call, where a real
        fault in it raises as it would have without this.
        """
        future = self._futures.get(key)
        if future is None or future.cancelled():
            return
        try:
            future.result()
        except Exception as e:  # noqa: BLE001 - reported, and met again on the first call
            with self._lock:
                if self._futures.get(key) is future:
                    del self._futures[key]
                    logging.warning(
                        "compiling %s ahead of time failed (%s: %s); it compiles on first use",
                        key, type(e).__name__, e,
                    )  # fmt: skip

    def wait_all(self) -> None:
        """Waits for every key submitted."""
        for key in list(self._futures):
            self.wait(key)

    def close(self) -> None:
        """Drops the programs not started yet; those compiling finish in the background."""
        self._pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------- the factory
@functools.lru_cache(maxsize=16)
def _optimizer(config: MetaNetConfig) -> optax.GradientTransformation:
    return training.make_optimizer(config)


def shared_optimizer(config: MetaNetConfig) -> optax.GradientTransformation:
    """`training.make_optimizer(config)`, one object for configurations that differ only in
    their ways (the optimiser does not depend on them), so the steps of every ways share one
    update program (`training.make_train_step`), compiled once."""
    return _optimizer(config.replace(ways=config.output_units))


@functools.lru_cache(maxsize=16)
def single_device_step(config: MetaNetConfig) -> batching.ValidatedFunction:
    """The single-device train step of `config` (labels unchecked: the sampler makes them),
    jitted once per configuration and reused by later runs in the same process."""
    return training.make_train_step(config, shared_optimizer(config), validate=False)


@functools.lru_cache(maxsize=16)
def sharded_step(config: MetaNetConfig, mesh) -> parallel.ShardedTrainStep:
    """The data-parallel train step of `config` over `mesh`, made once per configuration."""
    return parallel.make_sharded_train_step(config, training.make_optimizer(config), mesh)


class TrainStep:
    """`step(state, support, query) -> (state, metrics)` for episodes of any of `ways`.

    The ways of a call are read from the support labels' static shape
    (`support.y.shape[-1] // config.shots`); each ways has its own step (its own programs),
    made on first use or by `compile`; all share the state. See `make_step`.

    Attributes:
      config: the model (its `ways` is replaced by each step's).
      ways: the ways `compile` compiles.
      mesh: the mesh of a data-parallel step, else `None`.
      compilations: the `Compilations` of `compile`, else `None`.
    """

    def __init__(
        self,
        config: MetaNetConfig,
        make: Callable[[MetaNetConfig], Callable],
        ways: tuple[int, ...],
        mesh=None,
        compilable: bool = True,
    ):
        self.config = config
        self.ways = ways
        self.mesh = mesh
        self.compilations: Compilations | None = None
        self._make = make
        self._compilable = compilable
        self._steps: dict[int, Callable] = {}

    def for_ways(self, ways: int) -> Callable:
        """The step of `ways`-way episodes (made on first use)."""
        if ways not in self._steps:
            self._steps[ways] = self._make(self.config.replace(ways=ways))
        return self._steps[ways]

    def __call__(self, state: TrainState, support: Episode, query: Episode):
        ways = support.y.shape[-1] // self.config.shots
        if self.compilations is not None:
            self.compilations.wait(("train", ways))
        return self.for_ways(ways)(state, support, query)

    def programs(self, state: TrainState, meta_batch: int, ways: int) -> list[Program]:
        """The compilation of the `ways`-way step's programs for `meta_batch` tasks."""
        support, query = episode_shapes(self.config, ways, meta_batch)
        return programs(self.for_ways(ways), abstract(state), support, query)

    def compile(
        self,
        state: TrainState,
        meta_batch: int,
        *,
        first: int | None = None,
        compilations: Compilations | None = None,
    ) -> Compilations | None:
        """Starts compiling the programs of every ways of `self.ways` in the background.

        Args:
          state: the train state (only its shapes and dtypes are used).
          meta_batch: the tasks of a step.
          first: the ways needed first (e.g. the first step's), submitted first.
          compilations: where to submit (default: new `Compilations`); further programs
            (e.g. the evaluation's) may be submitted to it too.

        Returns:
          The `Compilations` (the calls of this step wait for their ways there), or `None`
          when the step cannot be compiled ahead of time (a step from a custom `make`).
        """
        if not self._compilable:
            return None
        compilations = Compilations() if compilations is None else compilations
        order = sorted(self.ways, key=lambda w: w != first)
        for ways in order:
            compilations.submit(("train", ways), self.programs(state, meta_batch, ways))
        self.compilations = compilations
        return compilations


def make_step(
    config: MetaNetConfig,
    optimizer: optax.GradientTransformation | None = None,
    *,
    ways: Iterable[int] = (),
    mesh=None,
    networks=None,
    validate: bool = False,
    make: Callable[[MetaNetConfig], Callable] | None = None,
) -> TrainStep:
    """The train step of a run: the one factory of the programs (and of the old names).

    Args:
      config: the model.
      optimizer: default `training.make_optimizer(config)` (then the steps are cached per
        configuration and shared by later runs in the process).
      ways: the ways of the training episodes (`compile` compiles these); default
        `(config.ways,)`. Episodes of other ways still work (their step is made on first
        use).
      mesh: a 1-D device mesh; when it has more than one device, or the run more than one
        process, the step is `parallel.make_sharded_train_step` over it (episodes and state
        as that function takes them); otherwise the single-device program
        (`training.make_train_step`), bitwise the same whatever the mesh.
      networks: b and u (`None`: the built-in ones).
      validate: check label values at every call (a host sync; the sampler's labels need
        no check).
      make: `config -> step` replacing the above for every ways (e.g. tests that inject
        faults); such steps are not compiled ahead of time.

    Returns:
      A `TrainStep`.
    """
    ways = tuple(ways) or (config.ways,)
    sharded = mesh is not None and parallel.is_sharded(mesh)
    if make is not None:
        return TrainStep(config, make, ways, mesh if sharded else None, compilable=False)
    if optimizer is None and networks is None and not validate:
        make = functools.partial(sharded_step, mesh=mesh) if sharded else single_device_step
    else:
        opt = optimizer

        def make(cfg):
            o = training.make_optimizer(cfg) if opt is None else opt
            if sharded:
                return parallel.make_sharded_train_step(
                    cfg, o, mesh, networks=networks, validate=validate
                )
            return training.make_train_step(cfg, o, networks=networks, validate=validate)

    return TrainStep(config, make, ways, mesh if sharded else None)
