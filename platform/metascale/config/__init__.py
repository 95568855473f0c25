"""The job spec: typed, validated pydantic models, the single source of every knob.

A spec is YAML; every field has a default that runs, so `name: x` alone is a valid job (sinusoid MAML).
`load_spec` turns any problem into a `SpecError` whose lines read `field.path: what was expected (got ...)`.
sections.py holds one model per section (data.py the data section's), job.py the whole job and the rules across sections, load.py YAML and errors.
"""

from metascale.config.job import SECOND_ORDER, SHARDED_FIRST_ORDER, JobSpec, pod_processes, sharding_problem
from metascale.config.kubernetes import KubernetesSpec, Volume, VolumeMount
from metascale.config.load import dump_spec, load_spec, parse_spec
from metascale.config.data import (
    AugmentSpec, DataSpec, DomainsData, EpisodicData, GlyphsData, MultiData, NoisyLabelsData, ShardsData,
    SinusoidData, SourceSpec, StreamSpec, SyntheticImagesData,
)
from metascale.config.rl import MAMLRLSpec, NavigationData
from metascale.config.halfcheetah import HalfCheetahDirData
from metascale.config.spurious import SpuriousData
from metascale.config.samplers import FixedSampler, MetaDatasetSampler
from metascale.config.sections import (
    CHUNKED_QUERY, AlgorithmSpec, CheckpointSpec, ClusterSpec, Conv4Spec, CustomModelSpec, DartsSpec, ESSpec, EvalSpec,
    ExecutorSpec, IMAMLSpec, InnerLoopSpec, LearnedSpec, LoggingSpec, LRScheduleSpec, MLPSpec, ModelInit, ModelSpec,
    DistillSpec, MLDGSpec, MWNSpec, OuterLoopSpec, ResNet12Spec, ShardingSpec, Spec, ViTSpec, WandbSpec,
)

__all__ = [
    "CHUNKED_QUERY", "SECOND_ORDER", "SHARDED_FIRST_ORDER", "AlgorithmSpec", "AugmentSpec", "CheckpointSpec", "ClusterSpec",
    "Conv4Spec", "CustomModelSpec", "DataSpec", "DistillSpec", "DomainsData", "FixedSampler", "MetaDatasetSampler", "MultiData", "SourceSpec", "EpisodicData", "ESSpec", "EvalSpec", "ExecutorSpec", "GlyphsData", "DartsSpec",
    "IMAMLSpec", "InnerLoopSpec", "JobSpec", "KubernetesSpec", "LearnedSpec", "LoggingSpec", "LRScheduleSpec",
    "MLDGSpec", "MLPSpec", "ModelInit", "ModelSpec", "MWNSpec", "NoisyLabelsData", "OuterLoopSpec", "ResNet12Spec",
    "ShardingSpec", "ShardsData", "SinusoidData", "Spec", "StreamSpec", "SyntheticImagesData", "ViTSpec", "Volume",
    "VolumeMount", "WandbSpec", "MAMLRLSpec", "NavigationData", "HalfCheetahDirData", "dump_spec", "load_spec", "parse_spec", "pod_processes", "sharding_problem",
    "SpuriousData",
]
