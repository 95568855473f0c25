"""The whole job: its sections and the rules across them (which algorithm takes which data, what sharding can run)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, model_validator

from metascale.config.kubernetes import KubernetesSpec, cpu_millis
from metascale.config.data import DataSpec, DomainsData, NoisyLabelsData, SinusoidData
from metascale.config.spurious import SpuriousData
from metascale.config.halfcheetah import OBS_DIM, HalfCheetahDirData
from metascale.config.rl import NavigationData
from metascale.config.samplers import episodes_problem
from metascale.config.sections import (
    CHUNKED_QUERY,
    MIXED_MODE,
    PER_EXAMPLE_MODELS,
    BLOCK_NORM_MODELS,
    AlgorithmSpec,
    CheckpointSpec,
    ClusterSpec,
    EvalSpec,
    ExecutorSpec,
    LoggingSpec,
    MLPSpec,
    ModelSpec,
    NonNegInt,
    OuterLoopSpec,
    ShardingSpec,
    Spec,
)


RL_DATA = (NavigationData, HalfCheetahDirData)  # the environments maml_rl acts in
# differentiate through the inner loop unless inner.first_order
SECOND_ORDER = ("maml", "metasgd", "anil", "learned_hparams", "learned_loss")
SHARDED_FIRST_ORDER = ("fomaml", "reptile")  # the inner loop runs through the engine, at every ZeRO stage


def sharding_problem(job: "JobSpec") -> str | None:
    """What makes `job.sharding` impossible with the rest of the job, and what to use instead (None: fine)."""
    s, alg = job.sharding, job.algorithm
    if s.engine == "none":
        return None
    if job.outer.estimator != "backprop":
        return (
            f"sharding.engine deepspeed backpropagates its meta-gradients; outer.estimator '{job.outer.estimator}' "
            "runs on the Ray workers: set sharding.engine none"
        )
    second_order = alg.name in SECOND_ORDER and not alg.inner.first_order
    first_order_anil = alg.name == "anil" and alg.inner.first_order  # the head adapts, the sharded body is frozen
    if alg.name not in SHARDED_FIRST_ORDER and not second_order and not first_order_anil:
        return (
            f"sharding.engine deepspeed runs {', '.join(SHARDED_FIRST_ORDER)}, first-order anil and second-order "
            f"{', '.join(SECOND_ORDER)} (any zero_stage), not algorithm '{alg.name}'"
            + (" with inner.first_order: use fomaml" if alg.name in SECOND_ORDER else "; use sharding.engine: none")
        )
    if s.support_backprop_subset is not None:
        if second_order:
            return (
                "sharding.support_backprop_subset (LITE) applies to the first-order sharded inner loop; "
                "use algorithm fomaml or reptile"
            )
        if job.model.name in ("conv4", "resnet12", "custom"):  # a custom module may hold batch norm (unknown here)
            why = "uses" if job.model.name != "custom" else "may use (metascale cannot tell before building it)"
            return (
                f"sharding.support_backprop_subset (LITE) needs examples that do not interact in the forward pass; "
                f"model '{job.model.name}' {why} per-task batch norm over the support set; use model vit or mlp"
            )
    support, query = _episode_sizes(job.data)
    if s.support_backprop_subset is not None and s.support_backprop_subset > support:
        return (
            f"sharding.support_backprop_subset ({s.support_backprop_subset}) exceeds the support set "
            f"({support} examples)"
        )
    if not second_order and s.ranks > min(support, query):
        return (
            f"sharding.ranks ({s.ranks}) exceeds the examples a task splits over ranks (support {support}, query "
            f"{query}); lower ranks or raise shots/queries"
        )
    if s.activation_checkpointing and job.model.name not in ("vit", "resnet12"):
        return f"sharding.activation_checkpointing needs model vit or resnet12 (blocks to recompute), not '{job.model.name}'"
    if job.executor.dtype != "float32":
        return (
            "sharding.engine deepspeed keeps float32 master weights: set executor.dtype float32 (precision sets bf16)"
        )
    inner = job.algorithm.inner
    if inner.checkpoint != "none" or inner.autocast != "none":
        return (
            "algorithm.inner.checkpoint/autocast are the un-sharded knobs; with sharding.engine deepspeed use "
            "sharding.activation_checkpointing and sharding.precision"
        )
    if inner.query_chunk is not None and not second_order:  # the second-order learners run the algorithm's own pass
        return (
            f"algorithm.inner.query_chunk splits a second-order query pass; sharded '{alg.name}' splits each "
            "task's examples over the ranks instead: drop query_chunk"
        )
    if job.executor.strategy == "vmap":
        return (
            "sharding.engine deepspeed deals tasks to the ranks one at a time (it never batches them with vmap): "
            "set executor.strategy auto or per_task"
        )
    if job.cluster.address == "inline":
        return (
            "sharding.engine deepspeed runs rank groups as Ray actors: set cluster.address local (or a cluster's "
            "address); 'inline' runs one un-sharded worker in the driver"
        )
    return None


def pod_processes(job: "JobSpec") -> tuple[int, int]:
    """(worker pods, processes a pod hosts) on Kubernetes. A replica is a pod; a rank group is one pod holding all its
    ranks (the group's STRICT_PACK placement needs them on one node), or with `sharding.span_nodes` a pod per rank."""
    c, s = job.cluster, job.sharding
    if s.engine == "none" or s.span_nodes:
        return c.workers * s.ranks, 1
    return c.workers, s.ranks


def _episode_sizes(data: Any) -> tuple[int, int]:
    if isinstance(data, SinusoidData):
        return data.shots, data.queries
    return getattr(data, "ways", 1) * getattr(data, "shots", 1), getattr(data, "ways", 1) * getattr(data, "queries", 1)


# ------------------------------------------------------------------------------------------- the job
class JobSpec(Spec):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")] = "job"
    seed: NonNegInt = 0
    model: ModelSpec = MLPSpec()
    data: DataSpec = SinusoidData()
    algorithm: AlgorithmSpec = AlgorithmSpec()
    outer: OuterLoopSpec = OuterLoopSpec()
    eval: EvalSpec = EvalSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    logging: LoggingSpec = LoggingSpec()
    executor: ExecutorSpec = ExecutorSpec()
    cluster: ClusterSpec = ClusterSpec()
    sharding: ShardingSpec = ShardingSpec()
    kubernetes: KubernetesSpec = KubernetesSpec()  # only `submit --to k8s://` reads it

    @model_validator(mode="after")
    def _compatible(self) -> "JobSpec":
        regression = isinstance(self.data, SinusoidData)
        if regression and self.model.name != "mlp":
            raise ValueError(f"data.source 'sinusoid' needs model.name 'mlp' (got '{self.model.name}')")
        if regression and self.algorithm.name in ("protonet", "anil", "blackbox", "abml"):
            raise ValueError(f"algorithm '{self.algorithm.name}' needs a classification data source, not sinusoid")
        if isinstance(self.data, SpuriousData) and (self.model.name != "mlp" or self.model.in_features != 2):
            raise ValueError(
                "data.source 'spurious' gives 2-feature vectors: it needs model.name 'mlp' with "
                f"in_features 2 (got '{self.model.name}', in_features "
                f"{getattr(self.model, 'in_features', None)})"
            )
        # flattened images, observations, feature vectors
        vectors = self.algorithm.name == "lopt" or isinstance(self.data, (*RL_DATA, SpuriousData))
        if not regression and self.model.name == "mlp" and not vectors:
            raise ValueError("model 'mlp' takes vectors; image data needs conv4, resnet12 or vit")
        self._survey_compatible()
        if (problem := episodes_problem(self)) is not None:
            raise ValueError(problem)
        if (problem := sharding_problem(self)) is not None:
            raise ValueError(problem)
        worker_cpu, per_pod = self.kubernetes.worker.cpu, pod_processes(self)[1]
        if worker_cpu is not None and cpu_millis(worker_cpu) < round(self.cluster.cpus_per_process * per_pod * 1000):
            raise ValueError(
                f"kubernetes.worker.cpu ({worker_cpu}) is below what a worker pod's processes need "
                f"(cluster.cpus_per_process x {per_pod} = {self.cluster.cpus_per_process * per_pod:g})"
            )
        return self

    def _survey_compatible(self) -> None:
        """Combinations of the survey's other axes (docs/survey-map.md) that cannot mean anything."""
        alg, single_task = self.algorithm, isinstance(self.data, (NoisyLabelsData, DomainsData, SpuriousData))
        if (alg.name in ("mwn", "erm", "distill")) != isinstance(self.data, NoisyLabelsData):
            raise ValueError(
                f"algorithm '{alg.name}' with data.source '{self.data.source}': 'mwn', 'erm' and 'distill' train on "
                "one many-shot set and need data.source 'noisy_labels', which no other algorithm takes"
            )
        if (alg.name in ("mldg", "erm_pooled")) != isinstance(self.data, (DomainsData, SpuriousData)):
            raise ValueError(
                f"algorithm '{alg.name}' with data.source '{self.data.source}': 'mldg' and 'erm_pooled' learn across "
                "domains and need data.source 'domains' or 'spurious', which no other algorithm takes"
            )
        self._distill_compatible()
        self._rl_compatible()
        if alg.name == "mldg" and alg.inner.steps != 1:
            raise ValueError(
                f"algorithm 'mldg' takes one virtual step of inner.lr on the meta-train domains: "
                f"inner.steps must be 1 (got {alg.inner.steps})"
            )
        if alg.name in ("learned_hparams", "learned_loss") and (alg.inner.first_order or alg.inner.steps == 0):
            raise ValueError(
                f"algorithm '{alg.name}' learns through the inner loop's gradients: it needs inner.steps >= 1 and "
                "inner.first_order false (otherwise its hypergradient is zero)"
            )
        if alg.name == "darts" and self.model.name != "darts":
            raise ValueError(
                f"algorithm 'darts' learns a DARTS network's architecture weights: it needs model.name "
                f"'darts', not '{self.model.name}'"
            )
        if alg.name == "darts" and self.model.genotype is not None:
            raise ValueError(
                "model.genotype fixes the DARTS cell (no alpha): algorithm 'darts' has nothing to search; "
                "retrain the cell with algorithm 'maml' (inner.first_order true, as the search trained)"
            )
        if alg.name == "darts" and alg.inner.steps == 0:
            raise ValueError(
                "algorithm 'darts' adapts the weights on the support split and alpha on the query split: "
                "with inner.steps 0 the support split is never read (needs inner.steps >= 1)"
            )
        if alg.name == "darts" and not alg.darts.learn_alpha and self.outer.estimator == "es":
            raise ValueError(
                "algorithm.darts.learn_alpha false holds alpha out of the meta-gradient; outer.estimator "
                "'es' perturbs every meta-parameter, alpha included: use estimator backprop"
            )
        if alg.inner.differentiation == "mixed" and (alg.name not in MIXED_MODE or alg.inner.first_order):
            raise ValueError(
                f"inner.differentiation 'mixed' computes exact second-order meta-gradients through the "
                f"whole model: algorithms {', '.join(MIXED_MODE)} with inner.first_order false, not "
                f"'{alg.name}'" + (" with inner.first_order true" if alg.inner.first_order else "")
            )
        if alg.inner.differentiation == "mixed" and alg.inner.checkpoint == "steps":
            raise ValueError(
                "inner.checkpoint 'steps' recomputes reverse mode's graph of each inner step; 'mixed' "
                "keeps none: use checkpoint none (or all, for the query pass)"
            )
        if alg.inner.mixed_stride > 1 and alg.inner.differentiation != "mixed":
            raise ValueError(
                "inner.mixed_stride recomputes mixed mode's stored weights: it needs inner.differentiation 'mixed'"
            )
        if not alg.inner.mixed_blocks and alg.inner.differentiation != "mixed":
            raise ValueError(
                "inner.mixed_blocks false runs mixed mode's support products over the whole model: it needs "
                "inner.differentiation 'mixed'"
            )
        if alg.inner.support_chunk is not None and alg.inner.differentiation != "mixed":
            raise ValueError(
                "inner.support_chunk splits mixed mode's support products: it needs "
                "inner.differentiation 'mixed' (reverse mode's double backward keeps every chunk's graph)"
            )
        if alg.inner.support_chunk is not None and self.model.name not in PER_EXAMPLE_MODELS + BLOCK_NORM_MODELS:
            why = (  # a custom module may hold batch norm: metascale cannot tell before building it
                "its batch norm couples a task's examples and it has no blocks for mixed mode to split"
                if self.model.name != "custom"
                else "it may use batch norm, which couples a task's examples; metascale cannot tell before building it"
            )
            raise ValueError(
                f"inner.support_chunk is exact only where examples are independent or coupled by per-task batch "
                f"norm inside the model's blocks: models {', '.join(PER_EXAMPLE_MODELS + BLOCK_NORM_MODELS)}, "
                f"not '{self.model.name}' ({why})"
            )
        if alg.inner.support_chunk is not None and not alg.inner.mixed_blocks and self.model.name in BLOCK_NORM_MODELS:
            raise ValueError(
                f"inner.support_chunk on model '{self.model.name}' chunks each block with its batch statistics made "
                "explicit, so it needs inner.mixed_blocks true (whole-model chunks would split the statistics)"
            )
        if alg.name == "imaml" and (alg.inner.steps == 0 or alg.inner.checkpoint != "none"):
            raise ValueError(
                "algorithm 'imaml' needs inner.steps >= 1 and inner.checkpoint 'none' "
                "(its memory is already independent of the inner steps)"
            )
        if alg.inner.query_chunk is not None and alg.name not in CHUNKED_QUERY:
            raise ValueError(
                f"inner.query_chunk splits the adapted model's query pass: algorithms "
                f"{', '.join(CHUNKED_QUERY)}, not '{alg.name}'"
            )
        if alg.name in ("mwn", "erm", "mldg", "erm_pooled", "distill") and self.executor.strategy == "vmap":
            raise ValueError(f"algorithm '{alg.name}' runs per task (executor.strategy 'per_task' or 'auto'), not vmap")
        if self.outer.estimator == "es" and single_task:
            raise ValueError(f"outer.estimator 'es' needs a few-shot task stream, not algorithm '{alg.name}'")
        if self.outer.estimator == "es" and self.outer.es.objective == "error" and isinstance(self.data, SinusoidData):
            raise ValueError("outer.es.objective 'error' needs classification data (sinusoid has no accuracy)")
        if self.cluster.aggregation == "allreduce" and self.outer.estimator != "backprop":
            raise ValueError(
                f"cluster.aggregation 'allreduce' sums meta-gradients (outer.estimator 'backprop'), "
                f"not outer.estimator '{self.outer.estimator}'; use aggregation: coordinator"
            )
        if self.cluster.aggregation == "allreduce" and self.sharding.engine != "none":
            raise ValueError(
                "cluster.aggregation 'allreduce' is for replicated workers; with sharding.engine "
                "deepspeed the rank group already reduces (docs/sharding.md); use aggregation: coordinator"
            )
        if self.outer.estimator in ("pes", "tbptt") and alg.name != "lopt":
            raise ValueError(
                f"outer.estimator '{self.outer.estimator}' unrolls a learned optimiser's inner training "
                f"in truncations: it needs algorithm.name 'lopt', not '{alg.name}'"
            )
        if self.outer.estimator in ("pes", "tbptt") and alg.inner.steps % self.outer.pes.truncation:
            raise ValueError(
                f"outer.pes.truncation ({self.outer.pes.truncation}) must divide algorithm.inner.steps "
                f"({alg.inner.steps}), the inner run's length"
            )
        if alg.name == "lopt" and (single_task or isinstance(self.data, SinusoidData) or self.model.name != "mlp"):
            raise ValueError(
                "algorithm 'lopt' trains an MLP (model.name 'mlp', in_features the flattened input) "
                "on few-shot classification episodes (synthetic, glyphs or shards)"
            )
        size = getattr(self.data, "channels", 1) * getattr(self.data, "image_size", 0) ** 2
        if alg.name == "lopt" and size and self.model.in_features != size:  # type: ignore[union-attr]
            raise ValueError(
                f"algorithm 'lopt' flattens the {self.data.source} images: model.in_features must be "
                f"{size} (got {self.model.in_features})"
            )  # type: ignore[union-attr]
        if self.outer.estimator == "ftml" and single_task:
            raise ValueError(
                f"outer.estimator 'ftml' streams few-shot tasks; data.source '{self.data.source}' is one task"
            )

    def _rl_compatible(self) -> None:
        """Meta-RL (algorithms/maml_rl.py) acts in the navigation or HalfCheetah tasks with an MLP policy over the
        observation (the agent's 2D position; the cheetah's 17 joint positions and velocities)."""
        alg = self.algorithm
        if (alg.name == "maml_rl") != isinstance(self.data, RL_DATA):
            raise ValueError(
                f"algorithm '{alg.name}' with data.source '{self.data.source}': 'maml_rl' learns from "
                "rollouts in the navigation tasks or the halfcheetah_dir tasks, which no other algorithm takes"
            )
        if alg.name != "maml_rl":
            return
        obs = OBS_DIM if isinstance(self.data, HalfCheetahDirData) else 2
        if self.model.name != "mlp" or self.model.in_features != obs:  # type: ignore[union-attr]
            raise ValueError(
                f"algorithm 'maml_rl' on {self.data.source} needs an MLP policy over the {obs}-dimensional "
                f"observation: model.name 'mlp', in_features {obs}"
            )
        if self.executor.strategy == "vmap":
            raise ValueError("algorithm 'maml_rl' samples rollouts per task: executor.strategy 'per_task' or 'auto'")
        if alg.maml_rl.epochs > 1 and self.outer.estimator != "backprop":
            raise ValueError(
                f"algorithm.maml_rl.epochs {alg.maml_rl.epochs} takes several meta-gradient rounds per "
                f"meta-step: outer.estimator 'backprop' (got '{self.outer.estimator}')"
            )

    def _distill_compatible(self) -> None:
        """Dataset distillation's meaningless combinations (algorithms/distill.py)."""
        alg, data = self.algorithm, self.data
        if alg.name != "distill" or not isinstance(data, NoisyLabelsData):
            return
        if alg.inner.first_order or alg.inner.steps == 0:
            raise ValueError(
                "algorithm 'distill' learns its images through the inner steps' gradients: it needs "
                "inner.steps >= 1 and inner.first_order false"
            )
        if data.label_noise or data.imbalance != 1:
            raise ValueError("algorithm 'distill' distils a clean, balanced set: data.label_noise 0, imbalance 1")
        if data.meta_per_class < alg.distill.images_per_class or data.meta_batch_size < data.ways * data.meta_per_class:
            raise ValueError(
                f"algorithm 'distill': its baseline takes images_per_class ({alg.distill.images_per_class}) "
                "real images of each class from an evaluation task's support (the whole meta set): it "
                "needs data.meta_per_class >= images_per_class and meta_batch_size >= ways x meta_per_class"
            )
        if list(alg.distill.shape) != [1, data.image_size, data.image_size]:
            raise ValueError(
                f"algorithm.distill.shape {list(alg.distill.shape)} is not the data's example shape "
                f"[1, {data.image_size}, {data.image_size}]"
            )
        if self.model.init_from is not None:
            raise ValueError("algorithm 'distill' trains a fresh model for every task: model.init_from means nothing")

    def path(self, template: str) -> str:
        return template.format(name=self.name)
